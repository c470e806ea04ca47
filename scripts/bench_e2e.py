"""Benchmark: end-to-end streaming synthesis, ours vs the official pipeline, same run, same release.

    .venv/bin/python scripts/bench_e2e.py --model-dir REL [--source-seconds 20] [--repeats 2]

Two measurements on a release directory (``scripts/make_random_release.py``; random weights, so
the LM runs to its length limit and the audio is noise-like: only the timing is meaningful):

* ``first_chunk``: zero_shot, stream=True: seconds from the call to the first audio chunk
  (front end + LM prefill and first 25 + pad + 3 tokens + flow + HiFT), ours and official.
* ``vc_chunks``: voice conversion of a ``--source-seconds`` utterance, stream=True (the source
  tokens are all known, so each chunk's time is the token2wav cost alone): per-chunk seconds,
  ours (cached flow state) and official (flow re-run from token 0 each chunk). The fixed-hop
  schedule of the official 2025 snapshot (25 tokens) is used on both sides.

Prints one JSON object: medians over ``--repeats`` (after one warm-up run of ours: compile time
excluded and reported separately), thread counts and the load average. The official runs with
``ORACLE_THREADS`` torch threads (default 2).
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
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.8 * t)) / 16000
    env = (1 + np.sin(2 * np.pi * 3.5 * t)) / 2
    return (0.2 * env * sum(np.sin(k * phase) / k for k in range(1, 8))
            + 0.005 * rng.standard_normal(t.shape)).astype(np.float32)


def _ours_timed(gen_fn):
    times, lens = [], []
    t0 = time.perf_counter()
    for o in gen_fn():
        times.append(time.perf_counter() - t0)
        lens.append(o["tts_speech"].shape[1])
    return times, lens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--source-seconds", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--text", default="Hello there, this is a streaming synthesis benchmark.")
    ap.add_argument("--skip-official", action="store_true")
    args = ap.parse_args()

    import jax

    from cosyvoice2_jax.config import StreamingConfig
    from cosyvoice2_jax.pipeline.model import CosyVoice2
    from oracle_client import Oracle

    noise = np.random.default_rng(0).standard_normal((24000 * int(args.source_seconds + 20), 9)).astype(np.float32)

    def noise_fn(batch, samples):
        return np.broadcast_to(noise[:samples][None], (batch, samples, 9))

    t = time.perf_counter()
    tts = CosyVoice2.from_pretrained(args.model_dir, sampling="greedy", hift_noise=noise_fn,
                                     streaming=StreamingConfig(stream_scale_factor=1), use_wetext=False)
    load_s = time.perf_counter() - t
    prompt, source = _speechlike(3.0, 0), _speechlike(args.source_seconds, 5)
    res = {"model_dir": str(args.model_dir), "jax_devices": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
           "oracle_threads": int(os.environ.get("ORACLE_THREADS", "2")), "loadavg_start": os.getloadavg(),
           "load_s": round(load_s, 2), "load_timings": {k: round(v, 2) for k, v in tts.loaded.timings.items()}}

    def first_chunk():
        return tts.inference_zero_shot(args.text, "This is the prompt transcript.", prompt, stream=True)

    def vc():
        return tts.inference_vc(source, prompt, stream=True)

    t = time.perf_counter()
    _ours_timed(first_chunk)
    _ours_timed(vc)
    res["ours_warmup_s"] = round(time.perf_counter() - t, 2)
    fc, chunks = [], []
    for _ in range(args.repeats):
        fc.append(_ours_timed(first_chunk)[0][0])
        times, _ = _ours_timed(vc)
        chunks.append(np.diff([0.0] + times))
    ours_chunks = np.median(np.array(chunks), axis=0)
    res["ours"] = {"first_chunk_s": round(statistics.median(fc), 3),
                   "vc_chunk_s": [round(float(x), 3) for x in ours_chunks]}
    if len(ours_chunks) >= 8:
        res["ours"]["chunk8_over_chunk2"] = round(float(ours_chunks[7] / ours_chunks[1]), 3)
    if not args.skip_official:
        o = Oracle()
        try:
            inputs = {"prompt_wav_16k": prompt, "source_wav_16k": source, "hift_noise": noise}
            o("bench_e2e:timed_tts", inputs, model_dir=str(args.model_dir), mode="zero_shot", tts_text=args.text,
              prompt_text="This is the prompt transcript.", repeats=1)  # warm-up (model build)
            r1 = o("bench_e2e:timed_tts", inputs, model_dir=str(args.model_dir), mode="zero_shot",
                   tts_text=args.text, prompt_text="This is the prompt transcript.", repeats=args.repeats)
            r2 = o("bench_e2e:timed_tts", inputs, model_dir=str(args.model_dir), mode="vc", repeats=args.repeats)
        finally:
            o.close()
        ofc = [float(r1[f"t_{r}"][0]) for r in range(args.repeats)]
        och = np.median(np.array([np.diff([0.0] + list(r2[f"t_{r}"])) for r in range(args.repeats)]), axis=0)
        res["official"] = {"first_chunk_s": round(statistics.median(ofc), 3),
                           "vc_chunk_s": [round(float(x), 3) for x in och]}
        if len(och) >= 8:
            res["official"]["chunk8_over_chunk2"] = round(float(och[7] / och[1]), 3)
        res["first_chunk_ratio_ours_over_official"] = round(res["ours"]["first_chunk_s"] / res["official"]["first_chunk_s"], 3)
        res["vc_total_ratio_ours_over_official"] = round(float(ours_chunks.sum() / och.sum()), 3)
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
