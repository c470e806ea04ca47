"""Multi-head attention blocks of the flow, channel-last ``(B, T, D)``.

* :class:`RelPositionMultiHeadedAttention`: ESPnet/WeNet relative-position self-attention
  (Transformer-XL, Dai et al. 2019, section 3.3) used by the flow's conformer encoder
  (``cosyvoice.transformer.attention.RelPositionMultiHeadedAttention``)::

      scores = ((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(d_k),  p = linear_pos(pos_emb)

  masked keys get ``-inf`` before the softmax and probability 0 after it.
* :class:`DiffusersAttention`: the self-attention of diffusers' ``Attention`` as used by the
  Matcha ``BasicTransformerBlock`` of the flow decoder: bias-free q/k/v projections, output
  projection ``to_out_0`` with bias, scale ``1/sqrt(head_dim)``, masked keys get an additive
  ``-1e10`` (the official ``mask_to_bias``).

Both take a boolean mask broadcastable to ``(B, T_q, T_k)`` (see :mod:`.masks`). Softmax runs as
plain einsums: on XLA:CPU this was ~2x faster than ``jax.nn.dot_product_attention``
(docs/performance.md).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def torch_linear(features: int, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    """``nn.Dense`` with torch ``nn.Linear``'s default init (params: ``kernel (in, out)``, ``bias``)."""
    return nn.Dense(features, use_bias=use_bias, name=name,
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


def _masked_softmax_attend(scores: Array, v_bhtd: Array, mask: Array | None, fill: str) -> Array:
    """``scores (B, H, Tq, Tk)``, ``v (B, H, Tk, d)``, bool ``mask (B, Tq|1, Tk)`` -> ``(B, Tq, H*d)``."""
    if mask is not None:
        m = mask[:, None]
        if fill == "inf":  # ESPnet: -inf, softmax, then zero the masked probabilities
            scores = jnp.where(m, scores, -jnp.inf)
            attn = jnp.where(m, jax.nn.softmax(scores, axis=-1), 0.0)
        else:  # diffusers with mask_to_bias: additive -1e10
            attn = jax.nn.softmax(jnp.where(m, scores, scores - 1.0e10), axis=-1)
    else:
        attn = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bqhd", attn, v_bhtd)
    return out.reshape(out.shape[0], out.shape[1], -1)


class RelPositionMultiHeadedAttention(nn.Module):
    """ESPnet rel-pos self-attention. Params: ``linear_{q,k,v,out}`` (with bias), ``linear_pos``
    (no bias), ``pos_bias_u``/``pos_bias_v`` ``(H, d_k)``.

    ``__call__(x (B, T, D), mask (B, T|1, T) bool, pos_emb (1, 2T-1, D)) -> (B, T, D)``.
    """

    n_head: int
    n_feat: int

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, pos_emb: Array) -> Array:
        B, T, _ = x.shape
        H, dk = self.n_head, self.n_feat // self.n_head
        q = torch_linear(self.n_feat, name="linear_q")(x).reshape(B, T, H, dk)
        k = torch_linear(self.n_feat, name="linear_k")(x).reshape(B, T, H, dk)
        v = torch_linear(self.n_feat, name="linear_v")(x).reshape(B, T, H, dk)
        p = torch_linear(self.n_feat, use_bias=False, name="linear_pos")(pos_emb.astype(x.dtype))
        p = p.reshape(p.shape[0], -1, H, dk)
        init = nn.initializers.xavier_uniform()
        u_bias = self.param("pos_bias_u", init, (H, dk)).astype(x.dtype)
        v_bias = self.param("pos_bias_v", init, (H, dk)).astype(x.dtype)
        ac = jnp.einsum("bqhd,bkhd->bhqk", q + u_bias, k)
        bd = jnp.einsum("bqhd,phd->bhqp", q + v_bias, p[0]) if p.shape[0] == 1 else \
            jnp.einsum("bqhd,bphd->bhqp", q + v_bias, p)
        if bd.shape[-1] != ac.shape[-1]:
            bd = rel_shift(bd)
        scores = (ac + bd) / jnp.sqrt(jnp.asarray(dk, x.dtype))
        out = _masked_softmax_attend(scores, jnp.transpose(v, (0, 2, 1, 3)), mask, fill="inf")
        return torch_linear(self.n_feat, name="linear_out")(out)


class DiffusersAttention(nn.Module):
    """diffusers ``Attention`` (self-attention only). Params: ``to_q/to_k/to_v`` ``(D, H*d)``
    without bias, ``to_out_0`` ``(H*d, D)`` with bias.

    ``__call__(x (B, T, D), mask (B, T|1, T) bool) -> (B, T, D)``.
    """

    heads: int
    dim_head: int

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        B, T, D = x.shape
        H, d = self.heads, self.dim_head
        q = torch_linear(H * d, use_bias=False, name="to_q")(x).reshape(B, T, H, d)
        k = torch_linear(H * d, use_bias=False, name="to_k")(x).reshape(B, T, H, d)
        v = torch_linear(H * d, use_bias=False, name="to_v")(x).reshape(B, T, H, d)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d ** -0.5)
        out = _masked_softmax_attend(scores, jnp.transpose(v, (0, 2, 1, 3)), mask, fill="bias")
        return torch_linear(D, name="to_out_0")(out)
