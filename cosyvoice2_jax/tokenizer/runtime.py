"""The speech tokenizer at inference: batched, bucketed, jitted, with long-audio windowing."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from .. import aot
from ..buckets import round_up, split_pow2
from ..config import TokenizerConfig
from ..errors import AudioError
from .modeling import S3TokenizerV2


class SpeechTokenizer:
    """Batched, bucketed, jitted speech tokenization with long-audio windowing.

    ``tokenize(mels)`` takes a list of (F_i, 128) whisper log-mels (one per utterance, see
    ``cosyvoice2_jax.frontend.audio.whisper_log_mel``) and returns a list of int32 token arrays.

    Shapes given to the jitted network: utterances are grouped by frames rounded up to
    ``frame_bucket`` (default 100 frames = 1 s, at most the 3000-frame window: a 3 s prompt runs
    unpadded, where 5 s buckets spent 40 % of the call on padding; at most 30 programs per batch
    size), each group is cut into batches whose sizes
    are powers of two up to ``max_batch`` (:func:`split_pow2`: no padded rows); so a stream of
    requests compiles a handful of programs and short rows are not padded to the longest one. Rows longer than 30 s are windowed (module docstring).
    """

    WINDOW = 3000  # frames = 30 s at 100 Hz
    OVERLAP = 400  # frames = 4 s
    TOKEN_RATE = 25

    def __init__(self, params, config: TokenizerConfig = TokenizerConfig(), *,
                 frame_bucket: int = 100, max_batch: int = 16):
        self.params = params
        self.config = config
        self.frame_bucket = frame_bucket
        self.max_batch = max_batch
        self.model = S3TokenizerV2(config)
        self._fn = aot.jit(lambda p, m, l: self.model.apply({"params": p}, m, l, method="features"),
                           name="speech_tokenizer", context=config)

    # windows ------------------------------------------------------------------------------
    def _windows(self, n_frames: int) -> list[tuple[int, int]]:
        if n_frames <= self.WINDOW:
            return [(0, n_frames)]
        stride = self.WINDOW - self.OVERLAP
        out, start = [], 0
        while start < n_frames:
            out.append((start, min(start + self.WINDOW, n_frames)))
            start += stride
        return out

    def _merge(self, pieces: list[np.ndarray]) -> np.ndarray:
        if len(pieces) == 1:
            return pieces[0]
        drop = (self.OVERLAP // 100 // 2) * self.TOKEN_RATE  # 2 s = 50 tokens
        kept = []
        for i, p in enumerate(pieces):
            lo = 0 if i == 0 else drop
            hi = len(p) if i == len(pieces) - 1 else len(p) - drop
            kept.append(p[lo:hi])
        return np.concatenate(kept).astype(np.int32)

    # running ------------------------------------------------------------------------------
    def _batches(self, segs: list[np.ndarray]):
        """Group segments by frame bucket (little padding), then chunk each group by max_batch.
        Yields (indices, mel (B_pad, F_pad, n_mels), lengths (B_pad,))."""
        groups: dict[int, list[int]] = {}
        for i, seg in enumerate(segs):
            f_pad = min(round_up(max(len(seg), 1), self.frame_bucket), self.WINDOW)
            groups.setdefault(f_pad, []).append(i)
        for f_pad in sorted(groups, reverse=True):
            members = groups[f_pad]
            start = 0
            for size in split_pow2(len(members), self.max_batch):
                idx = members[start:start + size]
                start += size
                mel = np.zeros((size, f_pad, self.config.n_mels), np.float32)
                lens = np.zeros((mel.shape[0],), np.int32)
                for r, i in enumerate(idx):
                    mel[r, :len(segs[i])] = segs[i]
                    lens[r] = len(segs[i])
                yield idx, mel, lens

    def _run(self, segs: list[np.ndarray], features: bool = False) -> list:
        """Segments of <= WINDOW frames -> token arrays (or feature dicts), in bucketed batches."""
        out: list = [None] * len(segs)
        for idx, mel, lens in self._batches(segs):
            res = self._fn(self.params, mel, lens)
            keys = ("ids", "lengths", "hidden", "z") if features else ("ids", "lengths")
            res = jax.device_get({k: res[k] for k in keys})
            for r, i in enumerate(idx):
                n = int(res["lengths"][r])
                if features:
                    out[i] = {k: np.asarray(res[k][r, :n]) for k in ("ids", "hidden", "z")}
                else:
                    out[i] = np.asarray(res["ids"][r, :n], np.int32)
        return out

    def _check(self, mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for u, mel in enumerate(mels):
            mel = np.asarray(mel, np.float32)
            if mel.ndim != 2 or mel.shape[1] != self.config.n_mels:
                raise AudioError(f"utterance {u}: expected a (frames, {self.config.n_mels}) whisper log-mel, "
                                 f"got shape {mel.shape}; compute it with frontend.audio.whisper_log_mel(wav_16k)")
            out.append(mel)
        return out

    def features(self, mels: Sequence[np.ndarray]) -> list[dict]:
        """Per utterance (<= 30 s each): dict(ids (S,), hidden (S, D), z (S, 8) before tanh)."""
        mels = self._check(mels)
        for u, mel in enumerate(mels):
            if mel.shape[0] > self.WINDOW:
                raise AudioError(f"utterance {u}: features() takes <= 30 s ({self.WINDOW} frames), got "
                                 f"{mel.shape[0]}; use tokenize() for long audio (windowed)")
        return self._run(mels, features=True)

    def tokenize(self, mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """List of (F_i, n_mels) log-mels -> list of (S_i,) int32 ids, S_i = ceil(F_i / 4)
        (long rows: merged windows, see the module docstring)."""
        segs, owner = [], []
        for u, mel in enumerate(self._check(mels)):
            for lo, hi in self._windows(mel.shape[0]):
                segs.append(mel[lo:hi])
                owner.append(u)
        toks = self._run(segs)
        result = []
        for u in range(len(mels)):
            result.append(self._merge([t for t, o in zip(toks, owner) if o == u]))
        return result

    def tokenize_wavs(self, wavs_16k: Sequence[np.ndarray]) -> list[np.ndarray]:
        """16 kHz mono float waveforms -> token arrays (features by the project front end)."""
        from ..frontend.audio import whisper_log_mel

        return self.tokenize([whisper_log_mel(w, self.config.n_mels) for w in wavs_16k])

    def compiled_programs(self) -> int:
        """Number of programs the jitted network has compiled so far."""
        return self._fn._cache_size()
