"""Benchmark: JAX flow inference vs the official ``CausalMaskedDiffWithXvec.inference``, same run.

Full-size flow with random weights (official module re-drawn with ``reinit_``, converted to JAX
params), a 75-token prompt (150 prompt mel frames) and 50 / 200 target tokens, 10 Euler steps,
CFG batch 2, non-streaming. The official model runs in the oracle venv (torch threads =
``ORACLE_THREADS``, default 2); JAX uses XLA's default thread pool. After one warm-up call each
(compile excluded, reported separately) the two sides run in ``--repeats`` pairs, alternating which
goes first, so that slow drift of a shared machine hits both alike. Prints JSON: median wall
seconds of each side, the ratio of the medians, the median of the per-pair ratios and the max
abs difference of the mels (full-size parity check as a side effect).

    .venv/bin/python scripts/bench_flow.py [--repeats 3] [--tokens 50 200] [--threads 1]

On a shared machine compare only numbers from the same run and look at ``loadavg`` in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--threads" in sys.argv:  # must happen before jax is imported
    _n = sys.argv[sys.argv.index("--threads") + 1]
    os.environ["ORACLE_THREADS"] = _n
    if _n == "1":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cosyvoice2_jax.config import ModelConfig  # noqa: E402
from cosyvoice2_jax.flow import modeling  # noqa: E402
from cosyvoice2_jax.flow import params as flow_params  # noqa: E402
from oracle_client import Oracle, unflatten_state_dict  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--prompt-tokens", type=int, default=75)
    ap.add_argument("--streaming", action="store_true")
    ap.add_argument("--token-bucket", type=int, default=None,
                    help="pad prompt+tokens to a multiple of this (default: the library's geometric bucket, "
                         "modeling.packed_length)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 2); 1 also pins XLA to one thread (per-core comparison, "
                         "robust to other load on the machine)")
    args = ap.parse_args()
    cfg = ModelConfig.cosyvoice2().flow
    oracle = Oracle()
    try:
        log("building the official flow and converting its weights")
        params = flow_params.from_torch(unflatten_state_dict(oracle("flow:state_dict", {}, seed=0)), cfg)
        params = jax.device_put(params)
        log("converted")
        r = np.random.default_rng(0)
        results = []
        for n in args.tokens:
            inputs = {"token": r.integers(0, 6561, (1, n)),
                      "prompt_token": r.integers(0, 6561, (1, args.prompt_tokens)),
                      "prompt_feat": r.normal(size=(1, 2 * args.prompt_tokens, 80)).astype(np.float32),
                      "embedding": r.normal(size=(1, 192)).astype(np.float32)}
            # warm both sides once (the official's first call, our compile), then time them in pairs,
            # alternating which side goes first: slow drift of a shared machine hits both alike
            ref = oracle("flow:timed_inference", inputs, seed=0, streaming=args.streaming, repeats=1)
            t0 = time.perf_counter()
            mel = modeling.inference(params, cfg, **inputs, streaming=args.streaming,
                                     token_bucket=args.token_bucket)
            first = time.perf_counter() - t0
            off_times, times = [], []

            def ours():
                t0 = time.perf_counter()
                modeling.inference(params, cfg, **inputs, streaming=args.streaming, token_bucket=args.token_bucket)
                times.append(time.perf_counter() - t0)

            def official():
                off_times.append(float(oracle("flow:timed_inference", inputs, seed=0, streaming=args.streaming,
                                              repeats=1, warmup=False)["times"][0]))

            for i in range(args.repeats):
                for side in ((official, ours) if i % 2 == 0 else (ours, official)):
                    side()
            ref["times"] = np.asarray(off_times)
            log(f"{n} tokens: official {off_times}; jax first call {first:.1f}s, then {times}")
            off = float(np.median(ref["times"]))
            jx = statistics.median(times)
            results.append({
                "tokens": n, "prompt_tokens": args.prompt_tokens, "frames_total": 2 * (n + args.prompt_tokens),
                "frames_computed": 2 * modeling.packed_length(n + args.prompt_tokens, args.token_bucket),
                "official_s": round(off, 3), "official_all_s": [round(float(t), 3) for t in ref["times"]],
                "jax_s": round(jx, 3), "jax_all_s": [round(t, 3) for t in times],
                "jax_first_call_s": round(first, 2), "ratio_jax_over_official": round(jx / off, 3),
                "ratio_median_of_pairs": round(statistics.median(a / b for a, b in zip(times, off_times)), 3),
                "max_abs_diff_mel": float(np.max(np.abs(mel - np.transpose(ref["mel"], (0, 2, 1))))),
            })
        print(json.dumps({"streaming": args.streaming, "n_timesteps": cfg.cfm.n_timesteps,
                          "torch_threads": int(ref["threads"]), "jax_devices": str(jax.devices()),
                          "cpu_count": os.cpu_count(), "token_bucket": args.token_bucket,
                          "loadavg_end": os.getloadavg(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}, indent=1))
    finally:
        oracle.close()


if __name__ == "__main__":
    main()
