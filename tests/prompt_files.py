"""Prompt files at the common sample rates, mono and stereo, for the front-end parity tests.

The signal is synthetic and defined in continuous time (so every rate carries the same sound):
a gliding 120-170 Hz harmonic voice whose harmonics reach 11 kHz (above the 8 kHz that a 16 kHz
detour would cut off), syllable envelopes, a noise hiss and a constant noise floor (as any recording has; without it the
lowest mel bins sit near the log floor, where float32 rounding in the official code dominates),
both white up to the file's Nyquist.
Stereo files carry a different mix in each channel (the front end averages channels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

RATES = (16000, 22050, 24000, 44100, 48000)


def speechlike(sr: int, seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 145 + 25 * np.sin(2 * np.pi * 0.8 * t)
    phase = 2 * np.pi * (145 * t - 25 / (2 * np.pi * 0.8) * (np.cos(2 * np.pi * 0.8 * t) - 1))  # integral of f0
    top = min(11000.0, 0.45 * sr)
    voice = sum(np.where(k * f0 < top, np.sin(k * phase) / k ** 0.7, 0.0) for k in range(1, int(top / 120) + 1))
    env = (1 + np.sin(2 * np.pi * 3.5 * t)) / 2
    hiss = rng.standard_normal(t.shape) * (np.sin(2 * np.pi * 1.7 * t) > 0.6)
    wav = 0.05 * env * voice + 0.02 * hiss + 0.004 * rng.standard_normal(t.shape)
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)


def write_prompt(path: Path, sr: int, channels: int = 1, seconds: float = 3.0) -> Path:
    """16-bit PCM wav of :func:`speechlike` at ``sr``; stereo: left = voice, right = a softer, shifted mix."""
    a = speechlike(sr, seconds, seed=sr)
    if channels == 2:
        b = 0.6 * np.roll(a, sr // 100) + 0.2 * speechlike(sr, seconds, seed=sr + 1)
        a = np.stack([a, b], axis=1)
    sf.write(str(path), a, sr, subtype="PCM_16")
    return Path(path)


def prompt_files(folder: Path, seconds: float = 3.0) -> list[tuple[Path, int, int]]:
    """One file per rate in :data:`RATES` x (mono, stereo): ``[(path, sr, channels), ...]``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [(write_prompt(folder / f"prompt_{sr}_{ch}ch.wav", sr, ch, seconds), sr, ch)
            for sr in RATES for ch in (1, 2)]
