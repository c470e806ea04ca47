"""Per-chunk wall time of the cached streaming flow vs the official recompute loop (JSON).

Full-size flow with random (re-drawn) weights from the oracle, a 20 s utterance (500 tokens) after
a 75-token prompt, chunked as the official runtime does: the pip snapshot's fixed hop of 25
("fixed") and HEAD's 25 -> 50 -> 100 ("head"). Ours: one warm-up pass per schedule (compiles one
program per window length), then ``--repeats`` timed passes (median per chunk). Official: the
oracle's ``flow_stream:stream_loop`` (torch, ``ORACLE_THREADS`` threads, default 2) in the same run.
Acceptance of issue 7: our 8th chunk <= 1.2 x our 2nd chunk on the fixed schedule.

Run (minutes; needs the oracle venv): ``.venv/bin/python scripts/bench_flow_stream.py``
(``--official-chunks 8`` times only the first 8 official chunks; ``--no-official`` skips it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=75)
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--schedules", default="fixed,head")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--key-block", type=int, default=200)
    ap.add_argument("--official-chunks", type=int, default=None, help="time only the first N official chunks")
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test of the script)")
    args = ap.parse_args()

    from cosyvoice2_jax.config import ModelConfig
    from cosyvoice2_jax.flow import params as flow_params
    from cosyvoice2_jax.flow.streaming import FlowStreamer, official_pushes
    from oracle_client import Oracle, unflatten_state_dict

    cfg = (ModelConfig.tiny() if args.tiny else ModelConfig.cosyvoice2()).flow
    dims = None
    if args.tiny:
        e, d = cfg.encoder, cfg.decoder
        dims = dict(input_size=cfg.input_size, enc_heads=e.attention_heads, enc_units=e.linear_units,
                    enc_blocks=e.num_blocks, enc_up_blocks=e.num_up_blocks, dec_channels=d.channels[0],
                    dec_head_dim=d.attention_head_dim, dec_heads=d.num_heads, dec_blocks=d.n_blocks,
                    dec_mid=d.num_mid_blocks)
    oracle = Oracle()
    params = flow_params.from_torch(unflatten_state_dict(oracle("flow:state_dict", {}, dims=dims, seed=5)), cfg)
    r = np.random.default_rng(5)
    S0, N = args.prompt, args.tokens
    inp = dict(token=r.integers(0, 6561, N).astype(np.int32), prompt_token=r.integers(0, 6561, S0).astype(np.int32),
               prompt_feat=r.normal(size=(2 * S0, 80)).astype(np.float32),
               embedding=r.normal(size=192).astype(np.float32))
    chunk2 = 2 * cfg.encoder.static_chunk_size
    max_frames = -(-(2 * (S0 + N) + chunk2) // chunk2) * chunk2
    t0 = time.perf_counter()
    fs = FlowStreamer(params, cfg, max_frames=max_frames, key_block=args.key_block)
    setup_s = time.perf_counter() - t0

    def run_ours(pushes):
        st = fs.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"])
        fed, times, mels = 0, [], []
        for n, fin in pushes:
            t = time.perf_counter()
            st, mel = fs.push(st, inp["token"][fed: fed + n], fin)
            times.append(time.perf_counter() - t)
            mels.append(mel)
            fed += n
        return times, mels

    result = {"config": "tiny" if args.tiny else "cosyvoice2", "prompt_tokens": S0, "tokens": N,
              "max_frames": max_frames, "key_block": args.key_block, "jax_threads": os.cpu_count(),
              "streamer_setup_s": round(setup_s, 3), "schedules": {}}
    for name in args.schedules.split(","):
        max_hop = {"fixed": 25, "head": 100}[name]
        pushes = official_pushes(S0, N, max_hop=max_hop)
        t = time.perf_counter()
        warm, mels = run_ours(pushes)
        warm_s = time.perf_counter() - t
        reps = [run_ours(pushes)[0] for _ in range(args.repeats)]
        ours = np.median(np.asarray(reps), axis=0)
        entry = {"pushes": [n for n, _ in pushes], "ours_chunk_s": [round(float(x), 4) for x in ours],
                 "ours_warmup_pass_s (incl. compiles)": round(warm_s, 2),
                 "ours_total_s": round(float(ours.sum()), 3)}
        if name == "fixed" and len(ours) > 8:
            entry["ours_chunk8_over_chunk2"] = round(float(ours[7] / ours[1]), 3)
        if not args.no_official:
            load0 = os.getloadavg()
            ref = oracle("flow_stream:stream_loop", {k: v[None] for k, v in inp.items()}, dims=dims, seed=5,
                         max_hop=max_hop, max_chunks=args.official_chunks,
                         final=args.official_chunks is None)
            off = ref["times"]
            n_ch = sum(k.startswith("chunk_") for k in ref)
            err = max(float(np.max(np.abs(mels[k] - ref[f"chunk_{k}"]))) for k in range(n_ch))
            if "final_stream" in ref:
                err = max(err, float(np.max(np.abs(mels[-1] - ref["final_stream"]))))
            entry.update({"official_chunk_s": [round(float(x), 4) for x in off],
                          "official_threads": int(ref["threads"]),
                          "official_total_s": round(float(off.sum()), 3),
                          "official_final_is_non_streaming": "final_official" in ref,
                          "max_abs_diff_vs_official": err,
                          "loadavg_before_after_official": [round(load0[0], 2), round(os.getloadavg()[0], 2)]})
            m = min(len(off), len(ours))
            entry["speedup_per_chunk"] = [round(float(off[i] / ours[i]), 2) for i in range(m)]
        result["schedules"][name] = entry
        print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    oracle.close()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
