"""Multi-head attention blocks of the flow, channel-last ``(B, T, D)``, with optional K/V caches.

* :class:`RelPositionMultiHeadedAttention`: ESPnet/WeNet relative-position self-attention
  (Transformer-XL, Dai et al. 2019, section 3.3) used by the flow's conformer encoder
  (``cosyvoice.transformer.attention.RelPositionMultiHeadedAttention``)::

      scores = ((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(d_k),  p = linear_pos(pos_emb)

  masked keys get ``-inf`` before the softmax and probability 0 after it.
* :class:`DiffusersAttention`: the self-attention of diffusers' ``Attention`` as used by the
  Matcha ``BasicTransformerBlock`` of the flow decoder: bias-free q/k/v projections, output
  projection ``to_out_0`` with bias, scale ``1/sqrt(head_dim)``, masked keys get an additive
  ``-1e10`` (the official ``mask_to_bias``).

Both take a boolean mask broadcastable to ``(B, T_q, T_k)`` (see :mod:`.masks`) and return
``(out, cache)`` like the LM's ``Qwen2Attention``. Without a cache (training, offline inference)
the keys are the ``T`` inputs and the returned cache is ``None``. With a :class:`KV` cache and a
:class:`Window` (chunked streaming, ``flow/streaming.py``) the queries are ``T`` consecutive
positions starting at ``window.offset``: their keys/values are written into the cache there, the
queries attend to the cache prefix under the static-chunk mask computed on absolute positions
(keys at ``>= window.n_valid`` masked), and the updated cache is returned. The prefix is read in
buckets of ``window.key_block`` slots (one ``lax.switch``), so the attention cost follows the real
prefix, not the cache capacity, within one compiled program.

Softmax and scores run in float32 whatever the compute dtype. The diffusers attention runs the
fused native kernel of :mod:`.native` on CPU (float32, head size 64; its gradient and every other
case use plain einsums, which on XLA:CPU were ~2x faster than ``jax.nn.dot_product_attention``);
docs/performance.md, section Attention. Both modules reach the cache through :func:`cached_attention` with their own
attention over the cached keys, so a cached call computes exactly what an uncached one does.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from . import native

Array = jax.Array


def torch_linear(features: int, use_bias: bool = True, name: str | None = None, dtype: Any = None) -> nn.Dense:
    """``nn.Dense`` with torch ``nn.Linear``'s default init (params: ``kernel (in, out)``, ``bias``).

    ``dtype``: compute dtype (inputs and the fp32 kernel are cast to it); ``None`` keeps the
    input's dtype promoted with the params' (fp32).
    """
    return nn.Dense(features, use_bias=use_bias, name=name, dtype=dtype,
                    kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))


def rel_shift(x: Array) -> Array:
    """``(B, H, T, 2T-1)`` scores against relative positions ``T-1 .. -(T-1)`` -> ``(B, H, T, T)``.

    ``out[..., i, j] = x[..., i, T - 1 - i + j]`` (relative position ``i - j``), done with the
    pad-and-reshape trick of Transformer-XL (no gather).
    """
    B, H, T, P = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (1, 0)))          # (B, H, T, P+1)
    x = x.reshape(B, H, P + 1, T)[:, :, 1:]                     # drop the first row
    return x.reshape(B, H, T, P)[..., : P // 2 + 1]


def skew(x: Array, n_keys: int) -> Array:
    """``x (..., W, W-1+K)`` scores against relative-position rows -> ``(..., W, K)`` with
    ``out[a, j] = x[a, W-1-a+j]`` (a slice of the flattened array; the cached form of
    :func:`rel_shift` for ``W`` queries against ``K >= W`` keys)."""
    *lead, W, L = x.shape
    flat = x.reshape(*lead, W * L)[..., W - 1: W - 1 + W * (L - 1)]
    return flat.reshape(*lead, W, L - 1)[..., :n_keys]


def _masked_softmax_attend(scores: Array, v_bhtd: Array, mask: Array | None) -> Array:
    """ESPnet attention: ``scores (B, H, Tq, Tk)``, ``v (B, H, Tk, d)``, bool ``mask (B|1, Tq|1, Tk)``
    -> ``(B, Tq, H*d)``. Masked keys get ``-inf`` before the softmax and probability 0 after it.

    The softmax runs in float32; the probabilities are cast to ``v``'s dtype for the product."""
    scores = scores.astype(jnp.float32)
    if mask is not None:
        m = mask[:, None]
        attn = jnp.where(m, jax.nn.softmax(jnp.where(m, scores, -jnp.inf), axis=-1), 0.0)
    else:
        attn = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bqhd", attn.astype(v_bhtd.dtype), v_bhtd)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _dot_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """diffusers attention: ``q (B, Tq, H, d)``, ``k, v (B, Tk, H, d)``, bool ``mask (B|1, Tq|1, Tk)``
    -> ``(B, Tq, H*d)``; masked keys get ``-1e10`` added (the official ``mask_to_bias``).

    On CPU, for float32 and ``d = 64`` (the flow decoder), the forward pass runs the fused native
    kernel (:mod:`.native`; the scores never go to memory) when it is built; other platforms,
    dtypes and head sizes, and every gradient, use :func:`_xla_dot_attention`. Both compute the
    same float32 arithmetic; they differ by rounding only.
    """
    B, Tq, H, d = q.shape
    Tk = k.shape[1]
    if (d != native.HEAD_SIZE or any(a.dtype != jnp.float32 for a in (q, k, v))
            or native.attention_backend() != "native"):
        return _xla_dot_attention(q, k, v, mask)
    if mask is None:
        mask = jnp.ones((1, 1, Tk), bool)
    elif (mask.ndim != 3 or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, Tq)
          or mask.shape[2] != Tk):
        mask = jnp.broadcast_to(mask, (B, Tq, Tk))
    mask = mask.astype(bool)
    return lax.platform_dependent(q, k, v, mask, cpu=_native_dot_attention, default=_xla_dot_attention)


@jax.custom_vjp
def _native_dot_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    B, Tq, H, d = q.shape
    return native.fused_attention(q, k, v, mask).reshape(B, Tq, H * d)


def _native_fwd(q, k, v, mask):
    return _native_dot_attention(q, k, v, mask), (q, k, v, mask)


def _native_bwd(res, g):
    q, k, v, mask = res
    _, vjp = jax.vjp(lambda q, k, v: _xla_dot_attention(q, k, v, mask), q, k, v)
    return (*vjp(g), None)


_native_dot_attention.defvjp(_native_fwd, _native_bwd)


def _xla_dot_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """diffusers attention: ``q (B, Tq, H, d)``, ``k, v (B, Tk, H, d)``, bool ``mask (B|1, Tq|1, Tk)``
    -> ``(B, Tq, H*d)``; masked keys get ``-1e10`` added (the official ``mask_to_bias``).

    The operands go head-major with the feature axis before the positions, ``(B, H, d, T)``, and
    the products are written ``scores = q^T k`` and ``out^T = v^T attn^T``: on XLA:CPU this sends
    ``q^T k`` to Eigen's batched GEMM instead of YNNPACK (1.5x faster for ``d = 64``) and lets
    YNNPACK fuse the softmax into the second product without a strided output (docs/performance.md).
    The plain-XLA form of :func:`_dot_attention` (every backend; the gradient of the native one).
    """
    B, Tq, H, d = q.shape
    qt, kt, vt = (jnp.transpose(a, (0, 2, 3, 1)) for a in (q, k, v))
    scores = jnp.einsum("bhdq,bhdk->bhqk", qt, kt).astype(jnp.float32) * (d ** -0.5)
    if mask is not None:
        scores = jnp.where(mask[:, None], scores, scores - 1.0e10)
    attn = jax.nn.softmax(scores, axis=-1).astype(vt.dtype)
    out = jnp.einsum("bhdk,bhqk->bhdq", vt, attn)
    return jnp.transpose(out, (0, 3, 1, 2)).reshape(B, Tq, H * d)


# ----------------------------------------------------------------------------- caches
class KV(NamedTuple):
    """Keys and values of one attention layer: ``(*slots, B, capacity, H, d)`` each."""

    k: Array
    v: Array


class Window(NamedTuple):
    """Where a chunk of ``T`` query positions sits in a cached sequence (built inside jit; not a carry).

    offset: absolute position of the first query (int32); its keys/values are written there.
    n_valid: positions ``>= n_valid`` are padding (masked as keys).
    chunk: static-chunk size of the mask (query ``i`` sees keys ``< (i // chunk + 1) * chunk``).
    advance: the committed position moves to ``offset + advance`` after this call; causal convs
      keep their left context (tail) from there.
    key_block: the cache prefix is read in buckets of multiples of this many slots.
    slot: indices into the leading ``slots`` axes of every cache array (e.g. the velocity
      evaluation of the flow solver); ``()`` when the caches have no slot axes.
    """

    offset: Array
    n_valid: Array
    chunk: int
    advance: Array
    key_block: int
    slot: tuple = ()

    def scaled(self, s: int) -> "Window":
        """The same window at ``s`` times the resolution (e.g. frames after a x``s`` upsample)."""
        return self._replace(offset=self.offset * s, n_valid=self.n_valid * s, chunk=self.chunk * s,
                             advance=self.advance * s, key_block=self.key_block * s)


def _by_key_bucket(n_needed: Array, cap: int, block: int, attend: Callable[[int], Array]) -> Array:
    """``attend(K)`` for the smallest bucket ``K`` (multiple of ``block``, at most ``cap``) with
    ``K >= n_needed``; one ``lax.switch`` so all buckets live in one compiled program."""
    sizes = sorted({min(cap, b) for b in range(block, cap + block, block)})
    if len(sizes) == 1:
        return attend(sizes[0])
    idx = jnp.clip(jnp.searchsorted(jnp.asarray(sizes), n_needed, side="left"), 0, len(sizes) - 1)
    return lax.switch(idx, [functools.partial(attend, K) for K in sizes])


def cached_attention(k: Array, v: Array, cache: KV, window: Window,
                     attend_keys: Callable[[Array, Array, Array, int], Array]) -> tuple[Array, KV]:
    """Write ``k, v (B, T, H, d)`` at ``window.offset`` and attend over the cache prefix.

    ``attend_keys(keys (B, K, H, d), values (B, K, H, d), mask (1, T, K) bool, K) -> (B, T, H*d)``
    is the module's attention over ``K`` cached positions. Returns ``(out (B, T, H*d), cache)``.
    """
    T = k.shape[1]
    lead = tuple(window.slot)
    zero = jnp.zeros((), jnp.int32)
    start = lead + (zero, window.offset, zero, zero)
    pad = (None,) * len(lead)
    cache = KV(lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype)[pad], start),
               lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype)[pad], start))
    B, cap, H, d = cache.k.shape[len(lead):]
    qpos = window.offset + jnp.arange(T)
    end = (qpos // window.chunk + 1) * window.chunk

    def attend(K):
        at = lead + (zero, zero, zero, zero)
        size = (1,) * len(lead) + (B, K, H, d)
        keys = lax.dynamic_slice(cache.k, at, size).reshape(B, K, H, d).astype(k.dtype)
        values = lax.dynamic_slice(cache.v, at, size).reshape(B, K, H, d).astype(v.dtype)
        kpos = jnp.arange(K)
        mask = ((kpos[None, :] < end[:, None]) & (kpos[None, :] < window.n_valid))[None]
        return attend_keys(keys, values, mask, K)

    return _by_key_bucket(window.offset + T, cap, window.key_block, attend), cache


# ----------------------------------------------------------------------------- modules
class RelPositionMultiHeadedAttention(nn.Module):
    """ESPnet rel-pos self-attention. Params: ``linear_{q,k,v,out}`` (with bias), ``linear_pos``
    (no bias), ``pos_bias_u``/``pos_bias_v`` ``(H, d_k)``.

    ``__call__(x (B, T, D), mask (B, T|1, T) bool, pos_emb (1, 2T-1, D)) -> (out (B, T, D), None)``.
    With ``cache``/``window`` (see the module docstring) ``pos`` must be :meth:`project_pos` of a
    table over at least ``offset + T`` positions (param-only: compute it once per capacity) and
    ``mask`` is ignored.
    """

    n_head: int
    n_feat: int
    dtype: Any = None

    def setup(self):
        H, dk = self.n_head, self.n_feat // self.n_head
        lin = functools.partial(torch_linear, self.n_feat, dtype=self.dtype)
        self.linear_q, self.linear_k, self.linear_v, self.linear_out = lin(), lin(), lin(), lin()
        self.linear_pos = lin(use_bias=False)
        init = nn.initializers.xavier_uniform()
        self.pos_bias_u = self.param("pos_bias_u", init, (H, dk))
        self.pos_bias_v = self.param("pos_bias_v", init, (H, dk))

    def project_pos(self, pos_emb: Array) -> Array:
        """``linear_pos`` of a relative-position table ``(1, P, D)`` -> ``(P, H, d_k)``."""
        p = self.linear_pos(pos_emb[0])
        return p.reshape(p.shape[0], self.n_head, -1)

    def __call__(self, x: Array, mask: Array | None, pos: Array, cache: KV | None = None,
                 window: Window | None = None) -> tuple[Array, KV | None]:
        B, T, _ = x.shape
        H, dk = self.n_head, self.n_feat // self.n_head
        q = self.linear_q(x).reshape(B, T, H, dk)
        k = self.linear_k(x).reshape(B, T, H, dk)
        v = self.linear_v(x).reshape(B, T, H, dk)
        qu = q + self.pos_bias_u.astype(q.dtype)
        qv = q + self.pos_bias_v.astype(q.dtype)
        root = jnp.sqrt(jnp.asarray(dk, jnp.float32))
        if cache is None:
            p = self.project_pos(pos.astype(x.dtype))
            ac = jnp.einsum("bqhd,bkhd->bhqk", qu, k)
            bd = rel_shift(jnp.einsum("bqhd,phd->bhqp", qv, p.astype(qv.dtype)))
            scores = (ac.astype(jnp.float32) + bd.astype(jnp.float32)) / root
            out = _masked_softmax_attend(scores, jnp.transpose(v, (0, 2, 1, 3)), mask)
            return self.linear_out(out), None
        # relative position r of (query offset + a, key j) is row M-1-r of a table over M positions;
        # rows for query W-1 .. 0 against keys 0 .. K-1 start at the row of r = offset + T - 1
        row0 = (pos.shape[0] + 1) // 2 - T - window.offset

        def scores(keys, K):
            rows = lax.dynamic_slice(pos, (row0, 0, 0), (T - 1 + K, H, dk)).astype(qv.dtype)
            ac = jnp.einsum("bqhd,bkhd->bhqk", qu, keys)
            bd = skew(jnp.einsum("bqhd,rhd->bhqr", qv, rows), K)
            return (ac.astype(jnp.float32) + bd.astype(jnp.float32)) / root

        def attend_keys(keys, values, mask, K):
            return _masked_softmax_attend(scores(keys, K), jnp.transpose(values, (0, 2, 1, 3)), mask)

        out, cache = cached_attention(k, v, cache, window, attend_keys)
        return self.linear_out(out), cache


class DiffusersAttention(nn.Module):
    """diffusers ``Attention`` (self-attention only). Params: ``to_q/to_k/to_v`` ``(D, H*d)``
    without bias, ``to_out_0`` ``(H*d, D)`` with bias.

    ``__call__(x (B, T, D), mask (B, T|1, T) bool, cache=None, window=None) -> (out (B, T, D), cache)``.
    """

    heads: int
    dim_head: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, cache: KV | None = None,
                 window: Window | None = None) -> tuple[Array, KV | None]:
        B, T, D = x.shape
        H, d = self.heads, self.dim_head
        q = torch_linear(H * d, use_bias=False, name="to_q", dtype=self.dtype)(x).reshape(B, T, H, d)
        k = torch_linear(H * d, use_bias=False, name="to_k", dtype=self.dtype)(x).reshape(B, T, H, d)
        v = torch_linear(H * d, use_bias=False, name="to_v", dtype=self.dtype)(x).reshape(B, T, H, d)

        if cache is None:
            out = _dot_attention(q, k, v, mask)
        else:
            out, cache = cached_attention(k, v, cache, window,
                                          lambda keys, values, m, K: _dot_attention(q, keys, values, m))
        return torch_linear(D, name="to_out_0", dtype=self.dtype)(out), cache
