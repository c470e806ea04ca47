"""Token-level ASR: 25 Hz speech tokens -> text tokens with CTC (the ASR of the differentiable ASR
reward, CosyVoice 2 paper section 2.7).

The paper back-propagates an ASR loss through the LM's sampled speech tokens into the ASR backend
of the speech tokenizer, reading each token as its FSQ code projected back up
(``H_hat = Proj_up(H_bar)``). The released tokenizer ships only the encoder up to the FSQ (no
``Proj_up``, no ASR backend), so this module is that backend, trained here on the same parquet
shards as the LM::

    ids (B, S) ─ fsq_decode ─▶ codes (B, S, 8) in {-1, 0, 1}        (or soft codes, see below)
      ─ project_up (8 -> D) ─▶ n_layers x S3-tokenizer encoder block (RoPE attention + FSMN memory)
      ─ LayerNorm ─ ctc_head (D -> V + 1) ─▶ CTC logits (B, S, V + 1), blank = V

``from_codes`` takes the code vectors directly: a relaxed sample ``p`` over the 6561 ids enters
as ``fsq_soft_decode(p) = p @ C`` (``cosyvoice2_jax.tokenizer.fsq``), which equals the hard path
for a one-hot ``p``. The encoder block is the tokenizer's own
(:class:`cosyvoice2_jax.tokenizer.modeling.ResidualAttentionBlock`).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import optax

from ..config import TokenASRConfig
from ..tokenizer.fsq import fsq_decode
from ..tokenizer.modeling import ResidualAttentionBlock, length_mask


class TokenASR(nn.Module):
    """``__call__(ids (B, S), lengths (B,)) -> CTC logits (B, S, V + 1)``; ``from_codes`` for
    (soft) code vectors ``(B, S, fsq_dim)``."""

    config: TokenASRConfig

    def setup(self):
        c = self.config
        if c.text_vocab_size <= 0:
            raise ValueError("TokenASRConfig.text_vocab_size must be set (> 0) before building the model")
        self.project_up = nn.Dense(c.d_model)
        self.blocks = [ResidualAttentionBlock(c.d_model, c.n_heads, c.fsmn_kernel_size, c.rope_theta)
                       for _ in range(c.n_layers)]
        self.ln_post = nn.LayerNorm(epsilon=1e-5)
        self.ctc_head = nn.Dense(c.text_vocab_size + 1)

    def codes(self, ids_bs):
        """(B, S) ids -> (B, S, fsq_dim) code vectors in {-1, 0, 1}."""
        return fsq_decode(ids_bs, self.config.fsq_dim, self.config.fsq_levels)

    def from_codes(self, codes_bsk, lengths_b):
        mask = length_mask(lengths_b, codes_bsk.shape[1])
        x = self.project_up(codes_bsk.astype(jnp.float32)) * mask[..., None]
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ctc_head(self.ln_post(x)).astype(jnp.float32)

    def __call__(self, ids_bs, lengths_b):
        return self.from_codes(self.codes(ids_bs), lengths_b)


def ctc_loss(logits_bsv, lengths_b, labels_bl, label_lengths_b, blank_id: int):
    """Per-row CTC negative log-likelihood ``-log P(labels | logits)`` (optax), shape (B,).

    Frames past ``lengths_b`` and labels past ``label_lengths_b`` are padding. A row whose labels
    cannot be aligned in its frames (``S < L + repeats``) has an infinite-like loss (optax: ~1e5 per
    row); the data filter keeps speech much longer than text (25 tokens/s vs a few text tokens/s).
    """
    s, l_ = logits_bsv.shape[1], labels_bl.shape[1]
    logit_pad = 1.0 - length_mask(lengths_b, s).astype(jnp.float32)
    label_pad = 1.0 - length_mask(label_lengths_b, l_).astype(jnp.float32)
    return optax.ctc_loss(logits_bsv.astype(jnp.float32), logit_pad, labels_bl.astype(jnp.int32), label_pad,
                          blank_id=blank_id)


def ctc_mean_loss(logits_bsv, lengths_b, labels_bl, label_lengths_b, blank_id: int, valid_b=None):
    """CTC NLL summed over the (valid) rows and divided by their total label count: the loss per
    text token, as the LM's length-normalised CE. Returns ``(loss, per_row (B,))``."""
    per_row = ctc_loss(logits_bsv, lengths_b, labels_bl, label_lengths_b, blank_id)
    valid = jnp.ones(per_row.shape, bool) if valid_b is None else valid_b
    valid = valid & (label_lengths_b > 0)
    n = jnp.maximum(jnp.sum(jnp.where(valid, label_lengths_b, 0)), 1)
    return jnp.sum(jnp.where(valid, per_row, 0.0)) / n, per_row


def spoken_text(text_bl, text_len_b, prompt_len_b=None):
    """ASR targets of a training batch: the text tokens after the mSFT speaker prefix
    (``text_prompt_len``, see ``train/data.py``), left-aligned. Returns ``(labels (B, L), lengths (B,))``."""
    if prompt_len_b is None:
        return text_bl, text_len_b
    idx = jnp.minimum(jnp.arange(text_bl.shape[1])[None, :] + prompt_len_b[:, None], text_bl.shape[1] - 1)
    return jnp.take_along_axis(text_bl, idx, axis=1), jnp.maximum(text_len_b - prompt_len_b, 0)


def ctc_greedy(logits_bsv, lengths_b, blank_id: int) -> list[list[int]]:
    """Best-path decoding (host side): argmax per frame, repeats merged, blanks dropped."""
    import numpy as np

    best = np.asarray(jnp.argmax(logits_bsv, axis=-1))
    out = []
    for row, n in zip(best, np.asarray(lengths_b)):
        ids, prev = [], None
        for t in row[: int(n)]:
            t = int(t)
            if t != prev and t != blank_id:
                ids.append(t)
            prev = t
        out.append(ids)
    return out
