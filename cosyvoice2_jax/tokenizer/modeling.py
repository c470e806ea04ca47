"""S3Tokenizer v2: the CosyVoice 2 supervised semantic speech tokenizer (25 tokens/s, 6561 codes).

CosyVoice 2 paper, section 2.1; official module ``s3tokenizer.model_v2.S3TokenizerV2``
(torch names ``encoder.*`` and ``quantizer._codebook.*``, which the param tree mirrors).

Data flow (B batch, F mel frames at 100 Hz, S tokens at 25 Hz, D = 1280, N = 20 heads, H = 64)::

    log-mel (B, F, 128) ─ mask ─ conv1 k3 s2 ─ GELU ─ mask ─ conv2 k3 s2 ─ GELU ─▶ (B, S, D)
      ─▶ 6 x [ x + Attn(LN(x)) ; x + MLP(LN(x)) ] ─▶ FSQ (project_down 8, tanh, round) ─▶ ids

Attention block (``FSMNMultiHeadAttention``): q = Wq x + b, k = Wk x (no bias), v = Wv x + b;
RoPE (theta 1e4, half-split rotation, positions from 0) on q and k; q and k are each scaled by
H**-0.25; keys past the row length are masked; the FSMN memory ``m = (dwconv31(v*mask) + v*mask)
* mask`` (depthwise kernel 31, zero padding 15/15) is added to ``out(attn)``. MLP: 4x, exact GELU.

Long audio: the network is applied to windows of at most 30 s (3000 frames). Longer rows are cut
into 30 s windows every 26 s (4 s overlap) and the window outputs are merged by dropping
2 s (50 tokens) on each side of every inner boundary: exactly what s3tokenizer 0.3.0 does
(``S3TokenizerV2._quantize_mixed_batch`` + ``merge_tokenized_segments``), so tokens of long
files agree with the official extraction. :class:`SpeechTokenizer` implements this.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import TokenizerConfig
from ..layers.activations import gelu
from ..layers.rope import apply_rope, rope_cos_sin
from .fsq import FSQCodebook


def conv_out_len(lengths, kernel: int = 3, stride: int = 2, pad: int = 1):
    """Valid length after a strided conv: ``(L + 2p - k) // s + 1`` (0 stays 0)."""
    return jnp.maximum((lengths + 2 * pad - kernel) // stride + 1, 0) * (lengths > 0)


def length_mask(lengths, max_len: int):
    """(B,) lengths -> (B, max_len) bool validity."""
    return jnp.arange(max_len)[None, :] < lengths[:, None]


class FSMNMultiHeadAttention(nn.Module):
    """Self-attention with RoPE and an FSMN memory on v (``model_v2.FSMNMultiHeadAttention``)."""

    n_state: int
    n_head: int
    kernel_size: int = 31
    rope_theta: float = 10000.0

    @nn.compact
    def __call__(self, x_bsd, mask_bs):
        b, s, d = x_bsd.shape
        n, h = self.n_head, d // self.n_head
        q = nn.Dense(d, name="query")(x_bsd).reshape(b, s, n, h)
        k = nn.Dense(d, use_bias=False, name="key")(x_bsd).reshape(b, s, n, h)
        v = nn.Dense(d, name="value")(x_bsd)

        cos, sin = rope_cos_sin(jnp.arange(s), h, self.rope_theta)
        scale = h**-0.25
        q = apply_rope(q, cos, sin) * scale
        k = apply_rope(k, cos, sin) * scale

        # FSMN memory block: depthwise conv over time on the masked values, plus a residual.
        m = mask_bs[:, :, None].astype(v.dtype)
        vm = v * m
        left = (self.kernel_size - 1) // 2
        mem = nn.Conv(d, (self.kernel_size,), padding=[(left, self.kernel_size - 1 - left)],
                      feature_group_count=d, use_bias=False, name="fsmn_block")(vm)
        mem = (mem + vm) * m

        logits = jnp.einsum("bqnh,bknh->bnqk", q, k)
        logits = jnp.where(mask_bs[:, None, None, :], logits, -1e10)
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        att = jnp.einsum("bnqk,bknh->bqnh", w, v.reshape(b, s, n, h)).reshape(b, s, d)
        return nn.Dense(d, name="out")(att) + mem


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: attention (with FSMN memory) then a 4x GELU MLP (``model_v2.ResidualAttentionBlock``)."""

    n_state: int
    n_head: int
    kernel_size: int = 31
    rope_theta: float = 10000.0

    @nn.compact
    def __call__(self, x_bsd, mask_bs):
        d = self.n_state
        y = nn.LayerNorm(epsilon=1e-5, name="attn_ln")(x_bsd)
        x_bsd = x_bsd + FSMNMultiHeadAttention(d, self.n_head, self.kernel_size, self.rope_theta,
                                               name="attn")(y, mask_bs)
        y = nn.LayerNorm(epsilon=1e-5, name="mlp_ln")(x_bsd)
        y = nn.Dense(4 * d, name="mlp_0")(y)
        y = nn.Dense(d, name="mlp_2")(gelu(y))
        return x_bsd + y


class AudioEncoderV2(nn.Module):
    """Log-mel (B, F, n_mels) + lengths (B,) -> hidden (B, S, D), token lengths (B,).

    ``S = ceil(F / 4)`` (two stride-2 convs, padding 1). Rows are independent: values past a
    row's length never reach its valid positions.
    """

    config: TokenizerConfig

    @nn.compact
    def __call__(self, mel_bfc, lengths_b):
        c = self.config
        d = c.n_audio_state
        x = mel_bfc * length_mask(lengths_b, mel_bfc.shape[1])[..., None]
        x = gelu(nn.Conv(d, (3,), strides=(2,), padding=[(1, 1)], name="conv1")(x))
        lengths_b = conv_out_len(lengths_b)
        x = x * length_mask(lengths_b, x.shape[1])[..., None]
        x = gelu(nn.Conv(d, (3,), strides=(2,), padding=[(1, 1)], name="conv2")(x))
        lengths_b = conv_out_len(lengths_b)
        mask = length_mask(lengths_b, x.shape[1])
        for i in range(c.n_audio_layer):
            x = ResidualAttentionBlock(d, c.n_audio_head, c.fsmn_kernel_size, c.rope_theta,
                                       name=f"blocks_{i}")(x, mask)
        return x, lengths_b


class S3TokenizerV2(nn.Module):
    """Encoder + FSQ. ``__call__(mel_bfc, lengths_b) -> (ids (B, S) int32, lengths (B,))``.

    Ids past a row's token length are set to 0. ``features`` returns the encoder hidden states
    and the pre-quantization projection (before tanh) as well.
    """

    config: TokenizerConfig = TokenizerConfig()

    def setup(self):
        self.encoder = AudioEncoderV2(self.config, name="encoder")
        self.quantizer = FSQCodebook(self.config.fsq_dim, self.config.fsq_levels, name="quantizer")

    def features(self, mel_bfc, lengths_b):
        """-> dict(hidden (B,S,D), z (B,S,8), ids (B,S), lengths (B,))."""
        h, lengths = self.encoder(mel_bfc, lengths_b)
        ids, z = self.quantizer(h)
        ids = jnp.where(length_mask(lengths, ids.shape[1]), ids, 0)
        return {"hidden": h, "z": z, "ids": ids, "lengths": lengths}

    def __call__(self, mel_bfc, lengths_b):
        out = self.features(mel_bfc, lengths_b)
        return out["ids"], out["lengths"]
