"""Flow text-to-mel encoder: ``UpsampleConformerEncoder`` of CosyVoice 2 (paper section 2.4).

Official module: ``cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder`` with
``input_layer='linear'``, ``pos_enc_layer_type='rel_pos_espnet'``, ``rel_selfattn``, no macaron
FFN, no conv module, pre-norm, SiLU FFN. Shapes are channel-last:

    tokens (B, S, D) --embed--> (B, S, D) --pre_lookahead--> 6 x conformer (chunk S_c)
        --up_layer (x2)--> (B, 2S, D) --up_embed--> 4 x conformer (chunk 2 S_c) --after_norm-->

Masks: ``valid (B, S)`` per-row validity. Attention uses the key-padding mask and, when
``chunk > 0``, the static-chunk mask (25 tokens, 50 frames after the upsample); ``chunk`` may be
a ``(B,)`` array (per-example mask types of the paper). The pre-lookahead layer sees
``pre_lookahead_len`` (3) future tokens; ``lookahead_valid (B, S)`` (optional) zeroes the embedded
frames it may read, so a padded row sees zeros past its end exactly like an unpadded single run
(the official code feeds the padded frames' embeddings instead; it only ever runs batch 1 at
inference).

The official ``context`` argument (``finalize=False``: the last ``L`` tokens only feed the
look-ahead) is expressed without a separate input: keep those tokens in ``xs`` and in
``lookahead_valid`` but not in ``valid``; outputs past ``2 * (S - L)`` are then ignored. Attention
is relative-position and the convs are causal, so this equals the official shorter sequence.

Streaming (:meth:`UpsampleConformerEncoder.__call__` with ``cache``): the input is a window of
``W + L`` tokens starting at ``window.offset`` (the last ``L`` feed the look-ahead only); the
attention layers read and write their K/V caches and the two causal convs (pre-lookahead conv2:
2 frames of left context; up_layer: 4 frames) their tails; see ``flow/streaming.py`` for why this
equals the full computation.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import FlowEncoderConfig
from ..layers.attention import KV, RelPositionMultiHeadedAttention, Window, torch_linear
from ..layers.conv import Conv1d, causal_conv
from ..layers.masks import attention_mask
from ..layers.positional import espnet_rel_pos_emb

Array = jax.Array


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed and returned in float32 (whatever the compute dtype)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


class LinearNoSubsampling(nn.Module):
    """``Linear -> LayerNorm`` then ``x * sqrt(D)`` (EspnetRelPositionalEncoding's x-scale).

    Params ``out_0`` (Dense), ``out_1`` (LayerNorm) = torch ``embed.out.{0,1}``.
    Returns ``(x (B, T, D), pos_emb (1, 2T-1, D))``.
    """

    cfg: FlowEncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        d = self.cfg.output_size
        x = torch_linear(d, name="out_0", dtype=self.dtype)(x)
        x = layer_norm(self.cfg.layer_norm_eps, "out_1")(x)
        x = x * jnp.sqrt(jnp.asarray(d, x.dtype))
        return x, espnet_rel_pos_emb(x.shape[1], d, x.dtype)


class PreLookaheadLayer(nn.Module):
    """``x + conv2(causal pad 2)(leaky_relu(conv1(right pad L)(x)))``, kernels ``L+1`` and 3.

    ``x (B, T, C)``. ``context (B, L', C)`` (optional, ``L' <= L``): the embedded next tokens
    (official ``context`` argument, used when not finalizing); without it the look-ahead reads
    zeros. ``tail (B, 2, C)``: conv2's left context (streaming; zeros at the start), advanced to
    ``advance``. Returns ``(y, tail)``.
    """

    channels: int
    pre_lookahead_len: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, tail: Array | None = None,
                 advance: Array | None = None) -> tuple[Array, Array | None]:
        L = self.pre_lookahead_len
        if context is None:
            h = jnp.pad(x, ((0, 0), (0, L), (0, 0)))
        else:
            h = jnp.concatenate([x, context], axis=1)
            h = jnp.pad(h, ((0, 0), (0, L - context.shape[1]), (0, 0)))
        h = Conv1d(self.channels, L + 1, name="conv1", dtype=self.dtype)(h)
        h = jax.nn.leaky_relu(h, 0.01)
        h, tail = causal_conv(Conv1d(self.channels, 3, padding="causal", name="conv2", dtype=self.dtype),
                              h, tail, advance)
        return h + x, tail


class PositionwiseFeedForward(nn.Module):
    """``w_2(silu(w_1(x)))`` (params ``w_1``, ``w_2``)."""

    d_model: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = jax.nn.silu(torch_linear(self.hidden, name="w_1", dtype=self.dtype)(x))
        return torch_linear(self.d_model, name="w_2", dtype=self.dtype)(h)


class ConformerEncoderLayer(nn.Module):
    """Pre-norm ``x + MHA(norm_mha(x)); x + FFN(norm_ff(x))`` (no macaron, no conv module).

    ``__call__(x, mask, pos, cache=None, window=None) -> (x, cache)`` (see the attention)."""

    cfg: FlowEncoderConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.cfg
        self.norm_mha = layer_norm(c.layer_norm_eps)
        self.self_attn = RelPositionMultiHeadedAttention(c.attention_heads, c.output_size, self.dtype)
        self.norm_ff = layer_norm(c.layer_norm_eps)
        self.feed_forward = PositionwiseFeedForward(c.output_size, c.linear_units, self.dtype)

    def __call__(self, x: Array, mask: Array | None, pos: Array, cache: KV | None = None,
                 window: Window | None = None) -> tuple[Array, KV | None]:
        h, cache = self.self_attn(self.norm_mha(x), mask, pos, cache, window)
        x = x + h
        return x + self.feed_forward(self.norm_ff(x)), cache


class Upsample1D(nn.Module):
    """Nearest-neighbour x``stride`` then a causal conv with kernel ``2*stride+1``.

    ``tail (B, 2*stride, C)``: the conv's left context (streaming), advanced to ``advance``
    (upsampled frames). Returns ``(y, tail)``."""

    channels: int
    stride: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, tail: Array | None = None, advance: Array | None = None
                 ) -> tuple[Array, Array | None]:
        x = jnp.repeat(x, self.stride, axis=1)
        conv = Conv1d(self.channels, 2 * self.stride + 1, padding="causal", name="conv", dtype=self.dtype)
        return causal_conv(conv, x, tail, advance)


class UpsampleConformerEncoder(nn.Module):
    """See module docstring. Params follow the torch names (``encoders_{i}`` = ``encoders.{i}``)."""

    cfg: FlowEncoderConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.cfg
        self.embed = LinearNoSubsampling(c, self.dtype)
        self.pre_lookahead_layer = PreLookaheadLayer(c.output_size, c.pre_lookahead_len, self.dtype)
        self.encoders = [ConformerEncoderLayer(c, self.dtype) for _ in range(c.num_blocks)]  # encoders_{i}
        self.up_layer = Upsample1D(c.output_size, c.upsample_stride, self.dtype)
        self.up_embed = LinearNoSubsampling(c, self.dtype)
        self.up_encoders = [ConformerEncoderLayer(c, self.dtype) for _ in range(c.num_up_blocks)]
        self.after_norm = layer_norm(c.layer_norm_eps)

    def __call__(self, xs: Array, valid: Array, *, chunk: int | Array = 0,
                 lookahead_valid: Array | None = None) -> tuple[Array, Array]:
        """Encode a whole sequence.

        Args:
          xs: ``(B, S, input_size)`` token embeddings (zero past each row's length).
          valid: ``(B, S)`` bool, frames taking part in attention.
          chunk: static chunk in tokens (0 = full attention), int or ``(B,)``.
          lookahead_valid: ``(B, S)`` bool, embedded frames the look-ahead may read (others are
            zeroed first); ``None`` reads everything (official behaviour).
        Returns:
          ``(h (B, 2S, D), valid_up (B, 2S))``.
        """
        x, pos_emb = self.embed(xs)
        if lookahead_valid is not None:
            x = x * lookahead_valid[..., None].astype(x.dtype)
        x, _ = self.pre_lookahead_layer(x)
        mask = attention_mask(valid, chunk)
        for layer in self.encoders:
            x, _ = layer(x, mask, pos_emb)
        x, _ = self.up_layer(x)
        valid_up = jnp.repeat(valid, self.cfg.upsample_stride, axis=1)
        x, pos_emb = self.up_embed(x)
        mask = attention_mask(valid_up, chunk * self.cfg.upsample_stride)
        for layer in self.up_encoders:
            x, _ = layer(x, mask, pos_emb)
        return self.after_norm(x), valid_up

    # ---- streaming
    def pos_tables(self, tokens: int, tables: dict[str, Array] | None = None) -> dict[str, Array]:
        """``linear_pos`` of the relative-position tables for ``tokens`` positions (and the
        upsampled frames), per attention layer: ``{"encoders_i": (2T-1, H, dk), "up_encoders_i": ...}``.
        Param-only: compute once per capacity and pass to :meth:`stream`. ``tables``: the sinusoid
        tables (:func:`rel_pos_inputs`) as arguments, so a jitted caller holds no 36 MB constants."""
        c = self.cfg
        tables = rel_pos_inputs(c, tokens) if tables is None else tables
        out = {}
        for name, layers in (("encoders", self.encoders), ("up_encoders", self.up_encoders)):
            table = tables[name]
            for i, layer in enumerate(layers):
                out[f"{name}_{i}"] = layer.self_attn.project_pos(table).astype(jnp.float32)
        return out

    def init_cache(self, batch: int, tokens: int) -> dict[str, Array | KV]:
        """Zero streaming state for ``tokens`` positions: K/V per attention layer (``tokens`` or
        ``stride * tokens`` slots) and the two conv tails. Shapes only (no params needed)."""
        return init_encoder_cache(self.cfg, batch, tokens)

    def stream(self, xs: Array, lookahead_valid: Array, cache: dict, pos_tables: dict, window: Window
               ) -> tuple[Array, dict]:
        """One streaming window: ``xs (B, W + L, input_size)`` embeddings of the tokens at
        positions ``window.offset ..`` (the last ``L`` feed the look-ahead only),
        ``lookahead_valid (B, W + L)`` (tokens that exist). ``window`` is in tokens (``key_block``
        included); the upsampled layers use it scaled by the stride. Returns
        ``(h (B, stride * W, D), cache)``; outputs at positions ``>= window.n_valid`` are padding."""
        c = self.cfg
        L, s = c.pre_lookahead_len, c.upsample_stride
        new = {}
        x, _ = self.embed(xs)
        x = x * lookahead_valid[..., None].astype(x.dtype)
        W = x.shape[1] - L
        x, new["pre_lookahead_layer"] = self.pre_lookahead_layer(
            x[:, :W], x[:, W:], cache["pre_lookahead_layer"], window.advance)
        for i, layer in enumerate(self.encoders):
            k = f"encoders_{i}"
            x, new[k] = layer(x, None, pos_tables[k], cache[k], window)
        x, new["up_layer"] = self.up_layer(x, cache["up_layer"], window.advance * s)
        x, _ = self.up_embed(x)
        up = window.scaled(s)
        for i, layer in enumerate(self.up_encoders):
            k = f"up_encoders_{i}"
            x, new[k] = layer(x, None, pos_tables[k], cache[k], up)
        return self.after_norm(x), new


def init_encoder_cache(c: FlowEncoderConfig, batch: int, tokens: int, dtype=jnp.float32) -> dict[str, Array | KV]:
    """See :meth:`UpsampleConformerEncoder.init_cache`."""
    H, D, s = c.attention_heads, c.output_size, c.upsample_stride
    kv = lambda n: KV(*(jnp.zeros((batch, n, H, D // H), dtype) for _ in range(2)))  # noqa: E731
    cache: dict[str, Array | KV] = {"pre_lookahead_layer": jnp.zeros((batch, 2, D), dtype),
                                    "up_layer": jnp.zeros((batch, 2 * s, D), dtype)}
    cache.update({f"encoders_{i}": kv(tokens) for i in range(c.num_blocks)})
    cache.update({f"up_encoders_{i}": kv(s * tokens) for i in range(c.num_up_blocks)})
    return cache


def rel_pos_inputs(cfg, tokens: int) -> dict[str, Array]:
    """The sinusoid relative-position tables of :meth:`pos_tables` for ``tokens`` token positions
    (``encoders``) and their upsampled frames (``up_encoders``); ``cfg``: the encoder config."""
    return {"encoders": espnet_rel_pos_emb(tokens, cfg.output_size),
            "up_encoders": espnet_rel_pos_emb(tokens * cfg.upsample_stride, cfg.output_size)}
