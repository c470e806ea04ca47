"""Torch-layout dense layers shared by the models: ``Linear`` (weight ``(out, in)``, optional W8A8
int8 path), ``Embedding`` and the int8 helpers.

Weights keep the ``torch.nn.Linear`` layout ``(out, in)`` and are contracted with ``dot_general``
on dim 1 of both operands: on XLA:CPU this is the fastest GEMV layout (docs/performance.md). Params
carry logical axis names (``nn.with_logical_partitioning``) for :mod:`cosyvoice2_jax.sharding`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _fan_in_init(in_axis: int = 1):
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=in_axis, out_axis=0)


def quantize_rows(w_oi: jnp.ndarray):
    """Symmetric per-output-row int8 quantisation of a ``(out, in)`` weight -> (int8, scale (out,))."""
    w = jnp.asarray(w_oi, jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=1), 1e-12) / 127.0
    q = jnp.clip(jnp.round(w / scale[:, None]), -127, 127).astype(jnp.int8)
    return q, scale


def int8_matmul(x, w_q, w_scale):
    """W8A8: per-row dynamic int8 activations x int8 weights -> int32 -> rescale (docs/performance.md)."""
    xf = x.astype(jnp.float32)
    a_scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), 1e-12) / 127.0
    xq = jnp.clip(jnp.round(xf / a_scale), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, w_q, (((x.ndim - 1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * a_scale * w_scale


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored ``(out, in)`` like ``torch.nn.Linear``.

    ``quant=True`` expects int8 ``weight`` plus a per-row ``scale`` (see :func:`quantize_params`)
    and runs the W8A8 path. ``pad_rows``: XLA:CPU only uses its fast (YNNPACK) dot for more than
    one row, so a single-row input is duplicated and the copy dropped (docs/performance.md).
    """

    features: int
    use_bias: bool = False
    axes: tuple[str, str] = ("mlp", "embed")
    dtype: Any = jnp.float32
    quant: bool = False
    pad_rows: bool = False

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        if self.quant:
            w = self.param("weight", nn.with_logical_partitioning(nn.initializers.zeros, self.axes),
                           (self.features, d_in), jnp.int8)
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes[:1]),
                               (self.features,), jnp.float32)
        else:
            w = self.param("weight", nn.with_logical_partitioning(_fan_in_init(1), self.axes),
                           (self.features, d_in), jnp.float32)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d_in)
        single = self.pad_rows and x2.shape[0] == 1
        if single:
            x2 = jnp.concatenate([x2, x2], axis=0)
        if self.quant:
            y = int8_matmul(x2, w, scale).astype(self.dtype)
        else:
            y = jax.lax.dot_general(x2.astype(self.dtype), w.astype(self.dtype),
                                    (((1,), (1,)), ((), ())))
        if single:
            y = y[:1]
        if self.use_bias:
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[:1]),
                           (self.features,), jnp.float32)
            y = y + b.astype(self.dtype)
        return y.reshape(*lead, self.features)


class Embedding(nn.Module):
    """Row lookup ``table[ids]`` (``torch.nn.Embedding``); param ``embedding`` (num, D)."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
