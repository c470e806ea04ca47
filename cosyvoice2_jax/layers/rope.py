"""Rotary position embedding (RoPE), half-split rotation.

Used by the Qwen2 backbone (theta 1e6, head 64) and the S3Tokenizer v2 encoder (theta 1e4,
head 64). Both rotate the two halves of each head: ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = concat(-x2, x1)`` and frequencies ``theta ** (-2i / d)`` repeated over the two
halves.
"""
from __future__ import annotations

import jax.numpy as jnp


def rope_cos_sin(positions, head_dim: int, theta: float, dtype=jnp.float32):
    """cos/sin tables for integer ``positions`` of any shape -> ``positions.shape + (head_dim,)``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # (..., head_dim/2)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x_bsnh, cos_bsh, sin_bsh):
    """Rotate ``x`` (B, S, N, H) with tables (B, S, H) or (S, H) (broadcast over heads)."""
    cos = jnp.expand_dims(cos_bsh, -2)
    sin = jnp.expand_dims(sin_bsh, -2)
    return x_bsnh * cos + rotate_half(x_bsnh) * sin
