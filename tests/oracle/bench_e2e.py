"""Oracle task for scripts/bench_e2e.py: the official pipeline (tests/oracle/pipeline.py) with the
wall time of every yielded chunk."""
from __future__ import annotations

import time

import numpy as np

from pipeline import _hift_noise, _pipeline, _run_mode


def timed_tts(inputs, model_dir: str, mode: str, tts_text: str = "", prompt_text: str = "", stream: bool = True,
              repeats: int = 1):
    """Per repeat: seconds from the call to each chunk (``t_<r>``, cumulative) and chunk lengths."""
    cv = _pipeline(model_dir)
    out = {}
    for r in range(repeats):
        times, lens = [], []
        with _hift_noise(cv.model.hift, inputs["hift_noise"]):
            t0 = time.perf_counter()
            for o in _run_mode(cv, inputs, mode, tts_text, prompt_text, "", "", stream, True, 1.0, ""):
                times.append(time.perf_counter() - t0)
                lens.append(o["tts_speech"].shape[1])
        out[f"t_{r}"] = np.array(times)
        out[f"len_{r}"] = np.array(lens)
    return out
