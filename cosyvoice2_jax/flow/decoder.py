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

Distilled students (``FlowConfig.student``, ``flow/distill.py``): each extra input ``name`` in
``extra_inputs`` (``"w"`` guidance rate, ``"d"`` step size) is embedded like ``t`` by its own
``time_mlp_{name}`` (Linear-SiLU-Linear, the second Linear zero-initialised) and added to the time
embedding, so a fresh student computes exactly its teacher's velocity. Params
``decoder/estimator/time_mlp_{name}/linear_{1,2}`` (torch ``decoder.estimator.time_mlp_{name}.linear_{1,2}``).

Attention masks: key padding, plus the static chunk (50 frames) when streaming; ``chunk`` may be
a ``(B,)`` array (per-example mask types). Every op is per-frame or causal except attention, so
per-chunk caching needs only the transformer K/V of earlier chunks and 2-frame conv tails:
:meth:`CausalConditionalDecoder.forward_features` takes them as an optional ``cache`` (a tree
shaped like the module tree, :func:`init_decoder_cache`) with a :class:`~..layers.attention.Window`
(used by ``flow/streaming.py``).

Dtype: matmuls and convs run in ``dtype`` (bf16 with ``FlowConfig.dtype = "bfloat16"``); the
LayerNorms, the softmax and the time embedding run in float32 and the output is float32.

Only one U-Net level (``len(channels) == 1``, as in the release) is implemented: the official
multi-level path needs stride-2 down/transposed up convs that no CosyVoice 2 model uses.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import FlowDecoderConfig
from ..errors import ConfigError
from ..layers.activations import gelu, mish
from ..layers.attention import KV, DiffusersAttention, Window, torch_linear
from ..layers.conv import Conv1d, causal_conv
from ..layers.remat import remat_policy
from ..layers.masks import attention_mask
from ..layers.positional import sinusoidal_time_emb

Array = jax.Array


def _ln(name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)


def _slot(tail: Array | None, window: Window | None) -> Array | None:
    """This evaluation's tail from a cache leaf with leading slot axes."""
    return None if tail is None else tail[tuple(window.slot)]


def _put(tail: Array | None, new: Array | None, window: Window | None) -> Array | None:
    return None if tail is None else tail.at[tuple(window.slot)].set(new)


class CausalBlock1D(nn.Module):
    """``mish(LN(causal_conv_k3(x * m))) * m``; params ``conv`` (torch ``block.0``), ``norm`` (``block.2``).

    ``cache``: the conv's 2-frame tail ``(*slots, B, 2, C_in)`` (streaming) or ``None``.
    Returns ``(y, cache)``."""

    dim_out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, m: Array, cache: Array | None = None, window: Window | None = None
                 ) -> tuple[Array, Array | None]:
        conv = Conv1d(self.dim_out, 3, padding="causal", name="conv", dtype=self.dtype)
        h, tail = causal_conv(conv, x * m, _slot(cache, window), None if window is None else window.advance)
        h = _ln("norm")(h)
        return mish(h) * m, _put(cache, tail, window)


class CausalResnetBlock1D(nn.Module):
    """``block2(block1(x) + mlp_1(mish(t))) + res_conv(x * m)``.

    ``x (B, F, C_in)``, ``m (B, F, 1)`` float mask, ``t_emb (B, T_dim)`` -> ``((B, F, dim_out), cache)``;
    ``cache``: ``{"block1": tail, "block2": tail}`` or ``None``.
    """

    dim_out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, m: Array, t_emb: Array, cache: dict | None = None,
                 window: Window | None = None) -> tuple[Array, dict | None]:
        c = cache or {}
        h, t1 = CausalBlock1D(self.dim_out, self.dtype, name="block1")(x, m, c.get("block1"), window)
        h = h + torch_linear(self.dim_out, name="mlp_1", dtype=self.dtype)(mish(t_emb))[:, None, :]
        h, t2 = CausalBlock1D(self.dim_out, self.dtype, name="block2")(h, m, c.get("block2"), window)
        out = h + Conv1d(self.dim_out, 1, name="res_conv", dtype=self.dtype)(x * m)
        return out, (None if cache is None else {"block1": t1, "block2": t2})


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with ``activation_fn='gelu'``: ``net_2(gelu(net_0_proj(x)))`` (exact GELU)."""

    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = gelu(torch_linear(self.dim * self.mult, name="net_0_proj", dtype=self.dtype)(x))
        return torch_linear(self.dim, name="net_2", dtype=self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers/Matcha ``BasicTransformerBlock`` (self-attention + FF, layer-norm type):
    ``x + attn1(norm1(x)); x + ff(norm3(x))``. Returns ``(x, kv_cache)``."""

    dim: int
    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, cache: KV | None = None, window: Window | None = None
                 ) -> tuple[Array, KV | None]:
        h, cache = DiffusersAttention(self.num_heads, self.head_dim, self.dtype, name="attn1")(
            _ln("norm1")(x), mask, cache, window)
        x = x + h
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(_ln("norm3")(x)), cache


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))`` (float32: the time embedding keeps full precision).
    ``zero_out``: ``linear_2`` starts at zero (a student's extra input starts with no effect)."""

    dim: int
    zero_out: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = jax.nn.silu(torch_linear(self.dim, name="linear_1", dtype=jnp.float32)(x))
        if self.zero_out:
            return nn.Dense(self.dim, name="linear_2", dtype=jnp.float32, kernel_init=nn.initializers.zeros)(h)
        return torch_linear(self.dim, name="linear_2", dtype=jnp.float32)(h)


class Stage(nn.Module):
    """One U-Net level: resnet, ``n_blocks`` transformer blocks, optional causal conv k3.

    Params: ``resnet`` (torch ``.0``), ``transformer_blocks_{j}`` (``.1.{j}``), ``conv`` (``.2``).
    Returns ``(hidden before the conv, output, cache)`` (the down level keeps the former as its
    skip); ``cache`` has the same keys as the params (resnet tails, block K/V, conv tail).
    """

    cfg: FlowDecoderConfig
    dim_out: int
    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, m: Array, t_emb: Array, att_mask: Array | None, cache: dict | None = None,
                 window: Window | None = None) -> tuple[Array, Array, dict | None]:
        c = self.cfg
        cc = cache or {}
        new = {}
        x, new["resnet"] = CausalResnetBlock1D(self.dim_out, self.dtype, name="resnet")(
            x, m, t_emb, cc.get("resnet"), window)
        for j in range(c.n_blocks):
            name = f"transformer_blocks_{j}"
            x, new[name] = BasicTransformerBlock(self.dim_out, c.num_heads, c.attention_head_dim, self.dtype,
                                                 name=name)(x, att_mask, cc.get(name), window)
        if not self.with_conv:
            return x, x, (None if cache is None else new)
        conv = Conv1d(self.dim_out, 3, padding="causal", name="conv", dtype=self.dtype)
        y, tail = causal_conv(conv, x * m, _slot(cc.get("conv"), window), None if window is None else window.advance)
        new["conv"] = _put(cc.get("conv"), tail, window)
        return x, y, (None if cache is None else new)


class CausalConditionalDecoder(nn.Module):
    """The estimator ``v(x, t | mu, spk, cond)``.

    ``__call__(x, valid, mu, t, spks, cond, chunk)``: ``x, mu, cond (B, F, n_mels)``, ``valid (B, F)``
    bool, ``t (B,)`` or scalar, ``spks (B, n_mels)``, ``chunk`` int or ``(B,)`` (0 = full attention)
    -> ``(B, F, n_mels)`` float32, zero on padded frames.
    """

    cfg: FlowDecoderConfig
    dtype: Any = jnp.float32
    extra_inputs: tuple[str, ...] = ()  # student conditioning ("w", "d"), see the module docstring

    def setup(self):
        c = self.cfg
        if len(c.channels) != 1:
            raise ConfigError(f"flow.decoder.channels={c.channels}: only one U-Net level is implemented "
                              "(the CosyVoice 2 release uses channels=[256]); use a single channel count")
        ch = c.channels[0]
        self.time_mlp = TimestepEmbedding(ch * 4)
        for n in self.extra_inputs:
            setattr(self, f"time_mlp_{n}", TimestepEmbedding(ch * 4, zero_out=True))
        # training memory: cfg.remat wraps every U-Net stage in nn.remat (the backward keeps what the policy
        # saves and recomputes the rest, stage by stage); cache and window (None offline) are static
        stage = Stage if c.remat == "none" else nn.remat(Stage, policy=remat_policy(c.remat),
                                                           static_argnums=(5, 6))
        self.down_blocks_0 = stage(c, ch, True, self.dtype)
        self.mid_blocks = [stage(c, ch, False, self.dtype) for _ in range(c.num_mid_blocks)]
        self.up_blocks_0 = stage(c, ch, True, self.dtype)
        self.final_block = CausalBlock1D(ch, self.dtype)
        self.final_proj = Conv1d(c.out_channels, 1, dtype=self.dtype)

    def time_embedding(self, t: Array, extra: dict[str, Array] | None = None) -> Array:
        """``t (B,)`` -> ``(B, 4 * channels)`` float32 (step-invariant given t: hoistable).
        ``extra``: the student's inputs ``{name: (B,) or scalar}`` (every name of ``extra_inputs``)."""
        t_emb = self.time_mlp(sinusoidal_time_emb(t, self.cfg.in_channels))
        extra = extra or {}
        if set(extra) != set(self.extra_inputs):
            raise ConfigError(f"flow estimator: the student inputs are {list(self.extra_inputs)} "
                              f"(FlowConfig.student.inputs) but {sorted(extra)} were given")
        for n in self.extra_inputs:
            e = jnp.broadcast_to(jnp.asarray(extra[n], jnp.float32), t.shape)
            t_emb = t_emb + getattr(self, f"time_mlp_{n}")(sinusoidal_time_emb(e, self.cfg.in_channels))
        return t_emb

    def __call__(self, x: Array, valid: Array, mu: Array, t: Array, spks: Array, cond: Array,
                 chunk: int | Array = 0, extra: dict[str, Array] | None = None) -> Array:
        t_emb = self.time_embedding(jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],)), extra)
        spk = jnp.broadcast_to(spks[:, None, :], x.shape[:2] + spks.shape[-1:])
        h = jnp.concatenate([x, mu, spk, cond], axis=-1)
        return self.forward_features(h, valid, t_emb, chunk)[0]

    def forward_features(self, h: Array, valid: Array, t_emb: Array, chunk: int | Array = 0,
                         cache: dict | None = None, window: Window | None = None) -> tuple[Array, dict | None]:
        """U-Net on the packed input ``h (B, F, in_channels)`` with a precomputed ``t_emb``.

        Offline: ``chunk`` sets the attention mask. Streaming: ``cache`` (:func:`init_decoder_cache`,
        indexed by ``window.slot``) and ``window`` (frames at ``window.offset``; ``chunk`` unused).
        Returns ``(out (B, F, out_channels) float32, cache)``.
        """
        if self.cfg.remat != "none" and (cache is not None or window is not None):
            raise ConfigError(f"flow.decoder.remat={self.cfg.remat!r} is a training option (offline calls); "
                              "streaming needs remat: none")
        m = valid[..., None].astype(h.dtype)
        att = attention_mask(valid, chunk) if cache is None else None
        cc = cache or {}
        new = {}
        skip, x, new["down_blocks_0"] = self.down_blocks_0(h, m, t_emb, att, cc.get("down_blocks_0"), window)
        for i, blk in enumerate(self.mid_blocks):
            _, x, new[f"mid_blocks_{i}"] = blk(x, m, t_emb, att, cc.get(f"mid_blocks_{i}"), window)
        x = jnp.concatenate([x[:, : skip.shape[1]], skip.astype(x.dtype)], axis=-1)
        _, x, new["up_blocks_0"] = self.up_blocks_0(x, m, t_emb, att, cc.get("up_blocks_0"), window)
        x, new["final_block"] = self.final_block(x, m, cc.get("final_block"), window)
        out = (self.final_proj(x * m) * m).astype(jnp.float32)
        return out, (None if cache is None else new)


def init_decoder_cache(c: FlowDecoderConfig, slots: tuple[int, ...], batch: int, frames: int,
                       dtype=jnp.float32) -> dict:
    """Zero streaming state of the estimator, shaped like its module tree: per causal conv a
    2-frame tail ``(*slots, batch, 2, C_in)``, per transformer block a :class:`KV` of
    ``(*slots, batch, frames, heads, head_dim)``. ``slots``: e.g. ``(n_evals,)`` (one cache per
    velocity evaluation of the solver)."""
    ch = c.channels[0]
    tail = lambda ci: jnp.zeros((*slots, batch, 2, ci), dtype)  # noqa: E731
    kv = lambda: KV(*(jnp.zeros((*slots, batch, frames, c.num_heads, c.attention_head_dim), dtype)  # noqa: E731
                      for _ in range(2)))

    def stage(c_in, with_conv):
        out = {"resnet": {"block1": tail(c_in), "block2": tail(ch)}}
        out.update({f"transformer_blocks_{j}": kv() for j in range(c.n_blocks)})
        if with_conv:
            out["conv"] = tail(ch)
        return out

    cache = {"down_blocks_0": stage(c.in_channels, True), "up_blocks_0": stage(2 * ch, True),
             "final_block": tail(ch)}
    cache.update({f"mid_blocks_{i}": stage(ch, False) for i in range(c.num_mid_blocks)})
    return cache
