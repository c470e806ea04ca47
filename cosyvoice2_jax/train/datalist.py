"""Data lists shared by the data-preparation scripts: Kaldi ``wav.scp``-style files, audio folders,
and the token/embedding mapping files the official recipe writes."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import CosyVoiceError

AUDIO_EXT = {".wav", ".flac", ".ogg", ".opus", ".aiff", ".aif", ".au", ".w64", ".caf"}


def read_kv(path: str | Path) -> dict[str, str]:
    """``key value...`` per line (Kaldi ``wav.scp``, ``text``, ``utt2spk``); blank lines skipped."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            k, _, v = line.partition(" ")
            out[k] = v.strip()
    return out


def read_wav_list(data_dir: str | Path | None = None, wav_dir: str | Path | None = None,
                  repeat: int = 1) -> list[tuple[str, str]]:
    """``[(utt, path)]`` from ``data_dir/wav.scp`` or every audio file under ``wav_dir`` (utt =
    file stem). ``repeat`` lists everything N times (benchmarking)."""
    if data_dir:
        scp = Path(data_dir) / "wav.scp"
        if not scp.is_file():
            raise CosyVoiceError(f"{scp} not found; give a Kaldi-style data dir (wav.scp: 'utt path' lines) "
                                 "or a folder of audio files")
        items = []
        for n, line in enumerate(scp.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split(maxsplit=1)
            if not parts:
                continue
            if len(parts) != 2:
                raise CosyVoiceError(f"{scp}:{n}: expected 'utt path', got {line!r}")
            items.append((parts[0], parts[1].strip()))
    else:
        folder = Path(wav_dir)
        if not folder.is_dir():
            raise CosyVoiceError(f"{folder} is not a directory")
        items = [(p.stem, str(p)) for p in sorted(folder.rglob("*")) if p.suffix.lower() in AUDIO_EXT]
    if not items:
        raise CosyVoiceError("no utterances found")
    if repeat > 1:
        items = [(f"{u}#{r}" if r else u, p) for r in range(repeat) for u, p in items]
    return items


def save_mapping(out_dir: str | Path, name: str, mapping: Mapping[str, np.ndarray],
                 as_list: Callable) -> list[str]:
    """Write ``name.npz`` (always) and the official ``torch.save`` dict ``name.pt`` (when torch is
    importable); returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / f"{name}.npz", **{k: np.asarray(v) for k, v in mapping.items()})
    written = [str(out_dir / f"{name}.npz")]
    try:
        import torch
    except ImportError:
        print(f"note: torch not importable, {name}.pt not written (the .npz has the same content)", file=sys.stderr)
    else:
        torch.save({k: as_list(v) for k, v in mapping.items()}, out_dir / f"{name}.pt")
        written.append(str(out_dir / f"{name}.pt"))
    return written
