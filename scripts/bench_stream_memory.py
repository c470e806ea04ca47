"""Benchmark: host memory (RSS) of our pipeline call by call and chunk by chunk, in one process.

    PYTHONPATH=. python scripts/bench_stream_memory.py --model-dir REL [--modes zero_shot,vc] [--source-seconds 8]

Loads the release as ``scripts/bench_e2e.py`` does (greedy LM, fixed 25-token streaming hop, the same
inputs), then runs each mode offline and streaming and prints one JSON line per event: seconds since
start, current RSS and peak RSS (MB), after the load, after every streamed chunk and after every call.
It exists to find where the memory of a full-size streaming call goes (bench_e2e's warm part was
OOM-killed at 24 GB on a 23 GiB box); the lines are printed as they happen, so a killed run still
shows how far it got.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as B  # noqa: E402  (same inputs and loader as the end-to-end benchmark)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--modes", default="zero_shot,vc", help="comma-separated subset of " + ",".join(B.MODES))
    ap.add_argument("--source-seconds", type=float, default=8.0, help="length of the streamed vc source")
    ap.add_argument("--text", default="Hello there, this is a streaming synthesis benchmark.")
    ap.add_argument("--flow-cache-dtype", choices=["float32", "bfloat16"], help="StreamingConfig.flow_cache_dtype")
    ap.add_argument("--flow-cache-budget-mb", type=float, help="StreamingConfig.flow_cache_budget_mb (recompute past it)")
    ap.add_argument("--malloc-trim", action="store_true",
                    help="also report RSS after glibc malloc_trim(0) at every event (memory freed but kept by malloc)")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in B.MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {B.MODES}")
    t0 = time.perf_counter()

    def log(event: str, **kw) -> None:
        peak = B._peak_rss_bytes() / 2**20
        line = {"t_s": round(time.perf_counter() - t0, 1), "rss_mb": round(_rss_mb()), "peak_mb": round(peak)}
        if args.malloc_trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            line["rss_trimmed_mb"] = round(_rss_mb())
        print(json.dumps({**line, "event": event, **kw}), flush=True)

    noise = B._noise(max(args.source_seconds, 40.0))  # HiFT source noise for outputs up to a minute
    prompt, vc_source = B._speechlike(3.0, 0), B._speechlike(3.0, 7)
    streaming = {k: v for k, v in (("flow_cache_dtype", args.flow_cache_dtype),
                                   ("flow_cache_budget_mb", args.flow_cache_budget_mb)) if v is not None}
    tts = B._load_ours(args.model_dir, noise, **streaming)
    log("loaded")
    spk_id = (tts.list_available_spks() or [""])[0]
    for mode in modes:
        for stream in (False, True):
            n = 0
            for _ in B._ours_call(tts, mode, args.text, prompt, vc_source, stream, spk_id):
                n += 1
                if stream:
                    log("chunk", mode=mode, chunk=n)
            log("call", mode=mode, stream=stream, chunks=n)
    if "vc" in modes:
        source = B._speechlike(args.source_seconds, 5)
        for n, _ in enumerate(tts.inference_vc(source, prompt, stream=True), 1):
            log("chunk", mode=f"vc_{args.source_seconds:g}s", chunk=n)
    log("end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
