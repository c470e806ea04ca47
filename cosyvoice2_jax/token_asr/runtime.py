"""The token ASR at inference: speech-token lists -> text-token lists (greedy CTC), batched and
bucketed like the speech tokenizer's runtime (one compiled program per length bucket and
power-of-two batch size)."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from ..buckets import round_up, split_pow2
from ..config import TokenASRConfig
from ..errors import ConfigError
from .modeling import TokenASR, ctc_greedy


class TokenRecognizer:
    """``transcribe(token_lists) -> text-id lists``; ``logits(token_lists)`` for the CTC
    posteriors. Rows are grouped by length rounded up to ``token_bucket`` and cut into
    power-of-two batches (:func:`cosyvoice2_jax.buckets.split_pow2`)."""

    def __init__(self, params, config: TokenASRConfig, *, token_bucket: int = 100, max_batch: int = 16):
        self.params = params
        self.config = config
        self.token_bucket = token_bucket
        self.max_batch = max_batch
        self.model = TokenASR(config)
        self._fn = jax.jit(lambda p, ids, n: self.model.apply({"params": p}, ids, n))

    def _check(self, tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
        out = []
        for u, t in enumerate(tokens):
            a = np.asarray(t, np.int64).reshape(-1)
            if a.size and (a.min() < 0 or a.max() >= self.config.codebook_size):
                raise ConfigError(f"row {u}: speech tokens must lie in [0, {self.config.codebook_size}), got "
                                  f"{int(a.min())}..{int(a.max())} (drop the LM's eos/special ids first)")
            out.append(a.astype(np.int32))
        return out

    def logits(self, tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per row: (S_i, V + 1) CTC logits."""
        rows = self._check(tokens)
        out: list = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(round_up(max(len(r), 1), self.token_bucket), []).append(i)
        for s_pad, members in sorted(groups.items()):
            start = 0
            for size in split_pow2(len(members), self.max_batch):
                idx = members[start:start + size]
                start += size
                ids = np.zeros((size, s_pad), np.int32)
                lens = np.zeros((size,), np.int32)
                for r, i in enumerate(idx):
                    ids[r, : len(rows[i])] = rows[i]
                    lens[r] = len(rows[i])
                lg = np.asarray(jax.device_get(self._fn(self.params, ids, lens)))
                for r, i in enumerate(idx):
                    out[i] = lg[r, : lens[r]]
        return out

    def transcribe(self, tokens: Sequence[Sequence[int]]) -> list[list[int]]:
        """Greedy CTC text ids per row (decode them with the LM's text tokenizer)."""
        out = []
        for lg in self.logits(tokens):
            out.extend(ctc_greedy(lg[None], np.array([lg.shape[0]]), self.config.blank_id))
        return out

    def compiled_programs(self) -> int:
        return self._fn._cache_size()
