"""The speaker encoder at inference: batched, bucketed, jitted x-vector extraction."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from .. import aot
from ..buckets import round_up, split_pow2
from ..config import SpeakerConfig
from ..errors import AudioError
from .modeling import CAMPPlus


class SpeakerEncoder:
    """Batched, bucketed, jitted x-vector extraction.

    ``embed(feats)`` takes a list of (T_i, 80) mean-normalised kaldi fbanks (see
    ``cosyvoice2_jax.frontend.audio.kaldi_fbank``) and returns (N, 192) float32 embeddings.
    Rows are grouped by frames rounded up to ``frame_bucket``; each group runs in batches whose
    sizes are powers of two up to ``max_batch`` (no padded rows).
    """

    def __init__(self, params, config: SpeakerConfig = SpeakerConfig(), *, frame_bucket: int = 200,
                 max_batch: int = 16):
        self.params = params
        self.config = config
        self.frame_bucket = frame_bucket
        self.max_batch = max_batch
        self.model = CAMPPlus(config)
        self._fn = aot.jit(lambda p, f, l: self.model.apply({"params": p}, f, l), name="speaker_encoder",
                           context=config)

    def embed(self, feats: Sequence[np.ndarray]) -> np.ndarray:
        feats = [np.asarray(f, np.float32) for f in feats]
        for u, f in enumerate(feats):
            if f.ndim != 2 or f.shape[1] != self.config.feat_dim:
                raise AudioError(f"utterance {u}: expected a (frames, {self.config.feat_dim}) kaldi fbank, got "
                                 f"shape {f.shape}; compute it with frontend.audio.kaldi_fbank(wav_16k)")
            if f.shape[0] < 2:
                raise AudioError(f"utterance {u}: {f.shape[0]} fbank frame(s) is too short for a speaker "
                                 "embedding (statistics pooling needs >= 2 frames after the stride-2 TDNN, "
                                 "i.e. >= 0.05 s of audio)")
        out = np.zeros((len(feats), self.config.embedding_size), np.float32)
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(feats):
            groups.setdefault(round_up(len(f), self.frame_bucket), []).append(i)
        for t_pad, members in sorted(groups.items()):
            start = 0
            for size in split_pow2(len(members), self.max_batch):
                idx = members[start:start + size]
                start += size
                x = np.zeros((size, t_pad, self.config.feat_dim), np.float32)
                lens = np.zeros((size,), np.int32)
                for r, i in enumerate(idx):
                    x[r, :len(feats[i])] = feats[i]
                    lens[r] = len(feats[i])
                emb = np.asarray(jax.device_get(self._fn(self.params, x, lens)))
                out[idx] = emb
        return out

    def embed_wavs(self, wavs_16k: Sequence[np.ndarray]) -> np.ndarray:
        """16 kHz mono waveforms -> (N, 192) (features by the project front end)."""
        from ..frontend.audio import kaldi_fbank

        return self.embed([kaldi_fbank(w) for w in wavs_16k])

    def compiled_programs(self) -> int:
        return self._fn._cache_size()
