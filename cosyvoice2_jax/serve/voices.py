"""Registered voices: prompt features extracted once (``CosyVoice2.add_zero_shot_spk``), persisted.

Each voice is one ``<name>.npz`` in the voices directory (prompt text ids, speech tokens, prompt
mel, x-vector, the transcript), written to a temporary file and renamed, so a crash never leaves a
truncated voice under its final name. At start the store loads every voice into the pipeline's
speakers, so registered voices survive a restart; every replica pointed at the same directory (a
shared volume) sees the same voices.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import CosyVoiceError

NAME = re.compile(r"^\w[\w.-]{0,63}$")  # letters (any script), digits, '_', '.', '-': a safe file name


class VoiceError(CosyVoiceError, ValueError):
    status = 400


class VoiceExists(VoiceError):
    status = 409


class VoiceNotFound(VoiceError):
    status = 404


class VoiceStore:
    def __init__(self, tts, directory: str | Path):
        self.tts = tts
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.builtin = set(tts.spk2info)           # the release's speakers (sft)
        self.meta: dict[str, dict] = {}
        self._mtime: dict[str, int] = {}  # file version each loaded voice came from
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self, name: str | None = None) -> None:
        """Follow the directory: voices another server process (e.g. a Ray Serve replica sharing the
        directory) added, replaced or deleted. ``name``: that voice only (one ``stat``)."""
        files = [self.dir / f"{name}.npz"] if name is not None else sorted(self.dir.glob("*.npz"))
        seen = set()
        for f in files:
            try:
                mtime = f.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            seen.add(f.stem)
            if self._mtime.get(f.stem) != mtime:
                try:
                    self._load(f)
                except (OSError, ValueError, KeyError):  # being replaced by another process: next time
                    continue
                self._mtime[f.stem] = mtime
        for gone in ([name] if name is not None else list(self.meta)):
            if gone in self.meta and gone not in seen:
                self.meta.pop(gone)
                self._mtime.pop(gone, None)
                self.tts.spk2info.pop(gone, None)

    def _load(self, f: Path) -> None:
        name = f.stem
        if not NAME.match(name) or name in self.builtin:
            return
        with np.load(f) as z:
            info = {k: z[k] for k in z.files if k not in ("transcript", "created")}
            meta = {"transcript": str(z["transcript"]) if "transcript" in z.files else "",
                    "created": float(z["created"]) if "created" in z.files else f.stat().st_mtime}
        self.tts.spk2info[name] = info
        self.meta[name] = meta

    def check_name(self, name: str) -> None:
        if not NAME.match(name or ""):
            raise VoiceError(f"voice name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                             "starting with a letter, digit or '_'")

    def kind(self, name: str) -> str:
        if NAME.match(name or "") and name not in self.builtin:
            with self._lock:
                self.refresh(name)
        if name in self.meta:
            return "registered"
        if name in self.builtin:
            return "builtin"
        raise VoiceNotFound(f"unknown voice {name!r}; available: {', '.join(self.names()) or 'none'}. "
                            "Register one with POST /v1/audio/voices")

    def names(self) -> list[str]:
        with self._lock:
            self.refresh()
        return sorted(self.builtin) + sorted(self.meta)

    def describe(self) -> list[dict]:
        with self._lock:
            self.refresh()
        out = [{"name": n, "type": "builtin", "modes": ["sft"]} for n in sorted(self.builtin)]
        for n in sorted(self.meta):
            m = self.meta[n]
            modes = (["zero_shot"] if m["transcript"] else []) + ["cross_lingual", "instruct2"]
            out.append({"name": n, "type": "registered", "transcript": m["transcript"], "created": m["created"],
                        "modes": modes})
        return out

    def add(self, name: str, transcript: str, wav_path: str | Path, overwrite: bool = False) -> dict:
        """Extract the prompt features of ``wav_path`` once and persist them under ``name``."""
        self.check_name(name)
        transcript = transcript or ""
        with self._lock:
            if name in self.builtin:
                raise VoiceExists(f"voice {name!r} is a built-in speaker of the release; choose another name")
            if name in self.meta and not overwrite:
                raise VoiceExists(f"voice {name!r} exists; DELETE it first or pass overwrite=true")
            tmp_name = f"\x00tmp-{name}"
            # the pipeline's own extraction (front end, speech tokens, prompt mel, x-vector); without a
            # transcript the voice serves cross_lingual / instruct2 only, which never read its prompt text
            self.tts.add_zero_shot_spk(transcript if transcript.strip() else "x", str(wav_path), tmp_name)
            info = self.tts.spk2info.pop(tmp_name)
            if not transcript.strip():
                info["prompt_text"] = np.zeros((0,), np.int32)
            created = time.time()
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npz.partial", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, transcript=np.asarray(transcript or ""), created=np.asarray(created),
                             **{k: np.asarray(v) for k, v in info.items()})
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.dir / f"{name}.npz")
                self._mtime[name] = (self.dir / f"{name}.npz").stat().st_mtime_ns
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self.tts.spk2info[name] = info
            self.meta[name] = {"transcript": transcript or "", "created": created}
        return next(v for v in self.describe() if v["name"] == name)

    def delete(self, name: str) -> None:
        with self._lock:
            if name in self.builtin:
                raise VoiceError(f"voice {name!r} is a built-in speaker of the release and cannot be deleted")
            if name not in self.meta:
                raise VoiceNotFound(f"unknown voice {name!r}; registered: {', '.join(sorted(self.meta)) or 'none'}")
            (self.dir / f"{name}.npz").unlink(missing_ok=True)
            self.meta.pop(name)
            self._mtime.pop(name, None)
            self.tts.spk2info.pop(name, None)
