"""LM speed: prefill time and decode tokens/s, JAX (fp32 and int8 W8A8) vs the official PyTorch loop.

Full-size Qwen2LM (CosyVoice2-0.5B shapes), random weights. The official side runs first in the
oracle venv (``Qwen2LM.inference``: HF DynamicCache + llm_decoder + RAS, batch 1), then its
model is freed and the JAX side loads (one 2 GB model in memory at a time). Decode steps use RAS
sampling inside the jitted loop; ``--steps`` steps per jitted call.

    .venv/bin/python scripts/bench_llm.py [--repeats 3] [--tokens 64] [--skip-official]

Prints one JSON object: medians over repeats, thread counts, ratios vs the official.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cosyvoice2_jax.config import ModelConfig  # noqa: E402
from cosyvoice2_jax.llm import generate as G  # noqa: E402
from cosyvoice2_jax.llm import modeling as M  # noqa: E402


def random_params(cfg, seed=0):
    """Numpy-drawn random params (fast; jax's threefry init of 500M values takes ~30 s on CPU)."""
    rng = np.random.default_rng(seed)
    tree = M.abstract_params(cfg)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if "embedding" in name:
            return rng.standard_normal(x.shape, dtype=np.float32)
        if "weight" in name and len(x.shape) == 2:
            return rng.standard_normal(x.shape, dtype=np.float32) * np.float32(1 / np.sqrt(x.shape[1]))
        if "bias" in name:
            return rng.standard_normal(x.shape, dtype=np.float32) * np.float32(0.1)
        return np.ones(x.shape, np.float32)
    return jax.tree_util.tree_map_with_path(leaf, tree)


def bench_jax(cfg, params, batch, n_prompt_text, n_prompt_speech, tokens, steps, repeats, quant):
    gen = G.LMGenerator(cfg, params, sampling="ras", quant=quant, steps_per_call=steps)
    rng = np.random.default_rng(1)
    reqs = [G.Request(text=rng.integers(0, cfg.qwen.vocab_size, 10).tolist(),
                      prompt_text=rng.integers(0, cfg.qwen.vocab_size, n_prompt_text - 10).tolist(),
                      prompt_speech=rng.integers(0, 6561, n_prompt_speech).tolist(),
                      min_len=tokens + 2 * steps, max_len=tokens + 2 * steps) for _ in range(batch)]
    slots, args = gen._pack(reqs, jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    st = gen.prefill(slots, gen.params, *args)
    jax.block_until_ready(st)
    st, toks = gen.decode(steps, gen.params, st)
    jax.block_until_ready(toks)
    compile_s = time.perf_counter() - t0
    pre, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        st = gen.prefill(slots, gen.params, *args)
        jax.block_until_ready(st)
        pre.append(time.perf_counter() - t0)
        times = []
        for _ in range(tokens // steps):
            t0 = time.perf_counter()
            st, toks = gen.decode(steps, gen.params, st)
            toks.block_until_ready()
            times.append(time.perf_counter() - t0)
        dec.append(sum(times) / (steps * len(times)))
        assert not bool(np.any(np.asarray(st.done)))
    step_s = statistics.median(dec)
    return {"batch": batch, "quant": "int8_w8a8" if quant else "fp32", "loadavg_1m": os.getloadavg()[0],
            "compile_s": round(compile_s, 2),
            "prefill_s": round(statistics.median(pre), 4), "decode_s_per_step": round(step_s, 5),
            "decode_tok_per_s": round(batch / step_s, 2), "compile_counts": gen.compile_counts()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per repeat")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per jitted call")
    ap.add_argument("--prompt-text", type=int, default=150)
    ap.add_argument("--prompt-speech", type=int, default=48)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--skip-official", action="store_true")
    ap.add_argument("--official-threads", default="2,1", help="torch thread counts to try (best is the reference)")
    ap.add_argument("--skip-fp32", action="store_true")
    ap.add_argument("--skip-int8", action="store_true")
    a = ap.parse_args()
    cfg = ModelConfig.cosyvoice2().llm
    out = {"config": "cosyvoice2-0.5b (random weights)", "loadavg_1m_start": os.getloadavg()[0], "prompt_len": a.prompt_text + a.prompt_speech + 2,
           "decode_steps_timed": a.tokens, "repeats": a.repeats, "jax": jax.__version__,
           "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if not a.skip_official:
        from oracle_client import Oracle
        from test_llm import qwen_json

        # torch's 2-thread OpenMP loop degrades badly when other processes share the 2 cores, so
        # the official loop is timed at each thread count and the best one is the reference
        out["official_by_threads"] = []
        for th in [int(t) for t in a.official_threads.split(",")]:
            o = Oracle(threads=th)
            r = o("llm:bench_decode", cfg=qwen_json(cfg), n_prompt_text=a.prompt_text,
                  n_prompt_speech=a.prompt_speech, n_tokens=a.tokens, repeats=a.repeats)
            o.close()
            step = float(np.median(r["decode_s_per_token"]))
            out["official_by_threads"].append({
                "batch": 1, "torch_threads": int(r["threads"]), "loadavg_1m": os.getloadavg()[0],
                "prefill_s": round(float(np.median(r["prefill_s"])), 4),
                "decode_s_per_step": round(step, 5), "decode_tok_per_s": round(1 / step, 2)})
        out["official"] = max(out["official_by_threads"], key=lambda d: d["decode_tok_per_s"])
    params = jax.device_put(random_params(cfg))  # the numpy copy is freed right away
    batches = [int(b) for b in a.batches.split(",")]
    runs = []
    if not a.skip_fp32:
        for b in batches:
            runs.append(bench_jax(cfg, params, b, a.prompt_text, a.prompt_speech, a.tokens, a.steps, a.repeats, False))
    if not a.skip_int8:
        qparams = jax.block_until_ready(jax.jit(M.quantize_params)(params))
        del params
        for b in batches:
            runs.append(bench_jax(cfg, qparams, b, a.prompt_text, a.prompt_speech, a.tokens, a.steps, a.repeats, True))
    out["jax_runs"] = runs
    ref = out.get("official", {}).get("decode_tok_per_s")
    by = {(r["quant"], r["batch"]): r["decode_tok_per_s"] for r in runs}
    summary = {}
    for q in ("fp32", "int8_w8a8"):
        if ref and (q, 1) in by:
            summary[f"{q}_b1_vs_official"] = round(by[(q, 1)] / ref, 2)
        if (q, 1) in by and (q, 8) in by:
            summary[f"{q}_b8_over_b1"] = round(by[(q, 8)] / by[(q, 1)], 2)
    if ref and ("fp32", 8) in by:
        summary["fp32_b8_vs_official_b1"] = round(by[("fp32", 8)] / ref, 2)
    if ref and ("int8_w8a8", 8) in by:
        summary["int8_b8_vs_official_b1"] = round(by[("int8_w8a8", 8)] / ref, 2)
    out["summary"] = summary
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
