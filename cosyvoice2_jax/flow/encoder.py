"""Flow text-to-mel encoder: ``UpsampleConformerEncoder`` of CosyVoice 2 (paper section 2.4).

Official module: ``cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder`` with
``input_layer='linear'``, ``pos_enc_layer_type='rel_pos_espnet'``, ``rel_selfattn``, no macaron
FFN, no conv module, pre-norm, SiLU FFN. Shapes are channel-last:

    tokens (B, S, D) --embed--> (B, S, D) --pre_lookahead--> 6 x conformer (chunk S_c)
        --up_layer (x2)--> (B, 2S, D) --up_embed--> 4 x conformer (chunk 2 S_c) --after_norm-->

Masks: ``valid (B, S)`` per-row validity. Attention uses the key-padding mask and, when
``chunk > 0``, the static-chunk mask (25 tokens, 50 frames after the upsample); ``chunk`` may be
a ``(B,)`` array (per-example mask types of the paper). The pre-lookahead layer sees 3 future
tokens; ``lookahead_valid (B, S)`` (optional) zeroes the embedded frames it may read, so a padded
row sees zeros past its end exactly like an unpadded single run (the official code feeds the
padded frames' embeddings instead; it only ever runs batch 1 at inference).

The official ``context`` argument (``finalize=False``: the last ``L`` tokens only feed the
look-ahead) is expressed without a separate input: keep those tokens in ``xs`` and in
``lookahead_valid`` but not in ``valid``; outputs past ``2 * (S - L)`` are then ignored. Attention
is relative-position and the convs are causal, so this equals the official shorter sequence.

Streaming note (for the cached chunked path): every layer is position-local except attention
(mask + rel-pos, both expressed relative to query/key positions) and the two causal convs
(pre-lookahead conv2: 2 frames of left context; up_layer: 4 frames), so per-chunk state is the
attention K/V of earlier chunks plus those conv tails.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import FlowEncoderConfig
from ..layers.attention import RelPositionMultiHeadedAttention, torch_linear
from ..layers.conv import Conv1d
from ..layers.masks import attention_mask
from ..layers.positional import espnet_rel_pos_emb

Array = jax.Array


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, name=name)


class LinearNoSubsampling(nn.Module):
    """``Linear -> LayerNorm`` then ``x * sqrt(D)`` (EspnetRelPositionalEncoding's x-scale).

    Params ``out_0`` (Dense), ``out_1`` (LayerNorm) = torch ``embed.out.{0,1}``.
    Returns ``(x (B, T, D), pos_emb (1, 2T-1, D))``.
    """

    cfg: FlowEncoderConfig

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        d = self.cfg.output_size
        x = torch_linear(d, name="out_0")(x)
        x = layer_norm(self.cfg.layer_norm_eps, "out_1")(x)
        x = x * jnp.sqrt(jnp.asarray(d, x.dtype))
        return x, espnet_rel_pos_emb(x.shape[1], d, x.dtype)


class PreLookaheadLayer(nn.Module):
    """``x + conv2(causal pad 2)(leaky_relu(conv1(right pad L)(x)))``, kernels ``L+1`` and 3.

    ``x (B, T, C)``. ``context (B, L, C)`` (optional): the embedded next ``L`` tokens (official
    ``context`` argument, used when not finalizing); without it the look-ahead reads zeros.
    """

    channels: int
    pre_lookahead_len: int = 3

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        L = self.pre_lookahead_len
        if context is None:
            h = jnp.pad(x, ((0, 0), (0, L), (0, 0)))
        else:
            h = jnp.concatenate([x, context], axis=1)
            h = jnp.pad(h, ((0, 0), (0, L - context.shape[1]), (0, 0)))
        h = Conv1d(self.channels, L + 1, name="conv1")(h)
        h = jax.nn.leaky_relu(h, 0.01)
        h = Conv1d(self.channels, 3, padding="causal", name="conv2")(h)
        return h + x


class PositionwiseFeedForward(nn.Module):
    """``w_2(silu(w_1(x)))`` (params ``w_1``, ``w_2``)."""

    d_model: int
    hidden: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return torch_linear(self.d_model, name="w_2")(jax.nn.silu(torch_linear(self.hidden, name="w_1")(x)))


class ConformerEncoderLayer(nn.Module):
    """Pre-norm ``x + MHA(norm_mha(x)); x + FFN(norm_ff(x))`` (no macaron, no conv module)."""

    cfg: FlowEncoderConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, pos_emb: Array) -> Array:
        c = self.cfg
        h = layer_norm(c.layer_norm_eps, "norm_mha")(x)
        x = x + RelPositionMultiHeadedAttention(c.attention_heads, c.output_size, name="self_attn")(h, mask, pos_emb)
        h = layer_norm(c.layer_norm_eps, "norm_ff")(x)
        return x + PositionwiseFeedForward(c.output_size, c.linear_units, name="feed_forward")(h)


class Upsample1D(nn.Module):
    """Nearest-neighbour x``stride`` then a causal conv with kernel ``2*stride+1``."""

    channels: int
    stride: int = 2

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(x, self.stride, axis=1)
        return Conv1d(self.channels, 2 * self.stride + 1, padding="causal", name="conv")(x)


class UpsampleConformerEncoder(nn.Module):
    """See module docstring. Params follow the torch names (``encoders_{i}`` = ``encoders.{i}``)."""

    cfg: FlowEncoderConfig

    @nn.compact
    def __call__(self, xs: Array, valid: Array, *, chunk: int | Array = 0,
                 lookahead_valid: Array | None = None) -> tuple[Array, Array]:
        """Encode.

        Args:
          xs: ``(B, S, input_size)`` token embeddings (zero past each row's length).
          valid: ``(B, S)`` bool, frames taking part in attention.
          chunk: static chunk in tokens (0 = full attention), int or ``(B,)``.
          lookahead_valid: ``(B, S)`` bool, embedded frames the look-ahead may read (others are
            zeroed first); ``None`` reads everything (official behaviour).
        Returns:
          ``(h (B, 2S, D), valid_up (B, 2S))``.
        """
        c = self.cfg
        x, pos_emb = LinearNoSubsampling(c, name="embed")(xs)
        if lookahead_valid is not None:
            x = x * lookahead_valid[..., None].astype(x.dtype)
        x = PreLookaheadLayer(c.output_size, c.pre_lookahead_len, name="pre_lookahead_layer")(x)
        mask = attention_mask(valid, chunk)
        for i in range(c.num_blocks):
            x = ConformerEncoderLayer(c, name=f"encoders_{i}")(x, mask, pos_emb)

        s = c.upsample_stride
        x = Upsample1D(c.output_size, s, name="up_layer")(x)
        valid_up = jnp.repeat(valid, s, axis=1)
        x, pos_emb = LinearNoSubsampling(c, name="up_embed")(x)
        mask = attention_mask(valid_up, chunk * s)
        for i in range(c.num_up_blocks):
            x = ConformerEncoderLayer(c, name=f"up_encoders_{i}")(x, mask, pos_emb)
        x = layer_norm(c.layer_norm_eps, "after_norm")(x)
        return x, valid_up
