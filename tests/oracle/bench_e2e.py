"""Oracle tasks for scripts/bench_e2e.py: the official pipeline (tests/oracle/pipeline.py) with the
wall time of every yielded chunk, its load time and the peak RSS of this (fresh) process."""
from __future__ import annotations

import time

import numpy as np

from pipeline import _hift_noise, _pipeline, _run_mode


def _peak_rss_bytes() -> int:
    """VmHWM of this process (peak resident set)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def timed_tts(inputs, model_dir: str, mode: str, tts_text: str = "", prompt_text: str = "", stream: bool = True,
              repeats: int = 1, instruct_text: str = "", spk_id: str = ""):
    """Per repeat: seconds from the call to each chunk (``t_<r>``, cumulative) and chunk lengths."""
    cv = _pipeline(model_dir)
    out = {}
    for r in range(repeats):
        times, lens = [], []
        with _hift_noise(cv.model.hift, inputs["hift_noise"]):
            t0 = time.perf_counter()
            for o in _run_mode(cv, inputs, mode, tts_text, prompt_text, instruct_text, spk_id, stream, True, 1.0, ""):
                times.append(time.perf_counter() - t0)
                lens.append(o["tts_speech"].shape[1])
        out[f"t_{r}"] = np.array(times)
        out[f"len_{r}"] = np.array(lens)
    return out


def fresh_stream(inputs, model_dir: str, tts_text: str, prompt_text: str):
    """In a fresh oracle process: build the official pipeline (``load_s``), then one streaming
    zero_shot call; ``first_chunk_epoch`` (``time.time()`` of its first chunk, for the caller's
    process-start clock), ``total_s`` and ``peak_rss`` (bytes)."""
    t = time.perf_counter()
    cv = _pipeline(model_dir)
    load_s = time.perf_counter() - t
    first = None
    with _hift_noise(cv.model.hift, inputs["hift_noise"]):
        t0 = time.perf_counter()
        for _ in _run_mode(cv, inputs, "zero_shot", tts_text, prompt_text, "", "", True, True, 1.0, ""):
            if first is None:
                first = time.time()
        total = time.perf_counter() - t0
    return {"load_s": np.float64(load_s), "first_chunk_epoch": np.float64(first), "total_s": np.float64(total),
            "peak_rss": np.int64(_peak_rss_bytes())}
