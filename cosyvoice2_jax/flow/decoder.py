"""Flow-matching estimator: the causal conditional U-Net of CosyVoice 2 (paper section 2.4).

Official module: ``cosyvoice.flow.decoder.CausalConditionalDecoder`` (Matcha-TTS decoder with
causal convs, LayerNorm instead of GroupNorm, diffusers ``BasicTransformerBlock``). Shapes are
channel-last; with the release config (``channels=(256,)``)::

    [x, mu, spk (broadcast), cond] (B, F, 4*80)
      -> down: CausalResnetBlock1D(320->256) + 4 transformer blocks, CausalConv1d k3
      -> mid:  12 x (CausalResnetBlock1D(256->256) + 4 transformer blocks)
      -> up:   concat skip (512) -> CausalResnetBlock1D(512->256) + 4 blocks, CausalConv1d k3
      -> final_block (causal conv k3, LN, Mish) -> final_proj (1x1) -> * mask   (B, F, 80)

Time: ``t (B,)`` -> Matcha ``SinusoidalPosEmb(320)`` -> ``time_mlp`` (Linear-SiLU-Linear, 1024)
-> each resnet adds ``mlp_1(mish(t_emb))`` after its first block.

Attention masks: key padding, plus the static chunk (50 frames) when streaming; ``chunk`` may be
a ``(B,)`` array (per-example mask types). Every op is per-frame or causal except attention, so
per-chunk caching needs only the transformer K/V of earlier chunks and 2-frame conv tails.

Only one U-Net level (``len(channels) == 1``, as in the release) is implemented: the official
multi-level path needs stride-2 down/transposed up convs that no CosyVoice 2 model uses.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import FlowDecoderConfig
from ..errors import ConfigError
from ..layers.attention import DiffusersAttention, torch_linear
from ..layers.conv import Conv1d
from ..layers.masks import attention_mask
from ..layers.positional import sinusoidal_time_emb

Array = jax.Array


def mish(x: Array) -> Array:
    return x * jnp.tanh(jax.nn.softplus(x))


class CausalBlock1D(nn.Module):
    """``mish(LN(causal_conv_k3(x * m))) * m``; params ``conv`` (torch ``block.0``), ``norm`` (``block.2``)."""

    dim_out: int

    @nn.compact
    def __call__(self, x: Array, m: Array) -> Array:
        h = Conv1d(self.dim_out, 3, padding="causal", name="conv")(x * m)
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(h)
        return mish(h) * m


class CausalResnetBlock1D(nn.Module):
    """``block2(block1(x) + mlp_1(mish(t))) + res_conv(x * m)``.

    ``x (B, F, C_in)``, ``m (B, F, 1)`` float mask, ``t_emb (B, T_dim)`` -> ``(B, F, dim_out)``.

    """

    dim_out: int

    @nn.compact
    def __call__(self, x: Array, m: Array, t_emb: Array) -> Array:
        h = CausalBlock1D(self.dim_out, name="block1")(x, m)
        h = h + torch_linear(self.dim_out, name="mlp_1")(mish(t_emb))[:, None, :]
        h = CausalBlock1D(self.dim_out, name="block2")(h, m)
        return h + Conv1d(self.dim_out, 1, name="res_conv")(x * m)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with ``activation_fn='gelu'``: ``net_2(gelu(net_0_proj(x)))`` (exact GELU)."""

    dim: int
    mult: int = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = jax.nn.gelu(torch_linear(self.dim * self.mult, name="net_0_proj")(x), approximate=False)
        return torch_linear(self.dim, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """diffusers/Matcha ``BasicTransformerBlock`` (self-attention + FF, layer-norm type):
    ``x + attn1(norm1(x)); x + ff(norm3(x))``."""

    dim: int
    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        h = nn.LayerNorm(epsilon=1e-5, name="norm1")(x)
        x = x + DiffusersAttention(self.num_heads, self.head_dim, name="attn1")(h, mask)
        h = nn.LayerNorm(epsilon=1e-5, name="norm3")(x)
        return x + FeedForward(self.dim, name="ff")(h)


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))``."""

    dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return torch_linear(self.dim, name="linear_2")(jax.nn.silu(torch_linear(self.dim, name="linear_1")(x)))


class Stage(nn.Module):
    """One U-Net level: resnet, ``n_blocks`` transformer blocks, optional causal conv k3.

    Params: ``resnet`` (torch ``.0``), ``transformer_blocks_{j}`` (``.1.{j}``), ``conv`` (``.2``).
    Returns ``(hidden before the conv, output)`` (the down level keeps the former as its skip).
    """

    cfg: FlowDecoderConfig
    dim_out: int
    with_conv: bool

    @nn.compact
    def __call__(self, x: Array, m: Array, t_emb: Array, att_mask: Array) -> tuple[Array, Array]:
        c = self.cfg
        x = CausalResnetBlock1D(self.dim_out, name="resnet")(x, m, t_emb)
        for j in range(c.n_blocks):
            x = BasicTransformerBlock(self.dim_out, c.num_heads, c.attention_head_dim,
                                      name=f"transformer_blocks_{j}")(x, att_mask)
        if not self.with_conv:
            return x, x
        return x, Conv1d(self.dim_out, 3, padding="causal", name="conv")(x * m)


class CausalConditionalDecoder(nn.Module):
    """The estimator ``v(x, t | mu, spk, cond)``.

    ``__call__(x, valid, mu, t, spks, cond, chunk)``: ``x, mu, cond (B, F, 80)``, ``valid (B, F)``
    bool, ``t (B,)`` or scalar, ``spks (B, 80)``, ``chunk`` int or ``(B,)`` (0 = full attention)
    -> ``(B, F, 80)``, zero on padded frames.
    """

    cfg: FlowDecoderConfig

    def setup(self):
        c = self.cfg
        if len(c.channels) != 1:
            raise ConfigError(f"flow.decoder.channels={c.channels}: only one U-Net level is implemented "
                              "(the CosyVoice 2 release uses channels=[256]); use a single channel count")
        ch = c.channels[0]
        self.time_mlp = TimestepEmbedding(ch * 4)
        self.down_blocks_0 = Stage(c, ch, True)
        self.mid_blocks = [Stage(c, ch, False) for _ in range(c.num_mid_blocks)]
        self.up_blocks_0 = Stage(c, ch, True)
        self.final_block = CausalBlock1D(ch)
        self.final_proj = Conv1d(c.out_channels, 1)

    def time_embedding(self, t: Array) -> Array:
        """``t (B,)`` -> ``(B, 4 * channels)`` (step-invariant given t: hoistable)."""
        return self.time_mlp(sinusoidal_time_emb(t, self.cfg.in_channels))

    def __call__(self, x: Array, valid: Array, mu: Array, t: Array, spks: Array, cond: Array,
                 chunk: int | Array = 0) -> Array:
        t_emb = self.time_embedding(jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],)))
        spk = jnp.broadcast_to(spks[:, None, :], x.shape[:2] + spks.shape[-1:])
        h = jnp.concatenate([x, mu, spk, cond], axis=-1)
        return self.forward_features(h, valid, t_emb, chunk)

    def forward_features(self, h: Array, valid: Array, t_emb: Array, chunk: int | Array = 0) -> Array:
        """U-Net on the packed input ``h (B, F, in_channels)`` with a precomputed ``t_emb``."""
        m = valid[..., None].astype(h.dtype)
        att = attention_mask(valid, chunk)
        skip, h = self.down_blocks_0(h, m, t_emb, att)
        for blk in self.mid_blocks:
            _, h = blk(h, m, t_emb, att)
        h = jnp.concatenate([h[:, : skip.shape[1]], skip], axis=-1)
        _, h = self.up_blocks_0(h, m, t_emb, att)
        h = self.final_block(h, m)
        return self.final_proj(h * m) * m
