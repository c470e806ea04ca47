"""Positional encodings of the flow.

* :func:`espnet_rel_pos_emb`: ESPnet's "new" relative positional encoding
  (``EspnetRelPositionalEncoding``, Transformer-XL appendix B; espnet PR 2816): a table over the
  relative positions ``T-1, ..., 1, 0, -1, ..., -(T-1)`` (in that order), with interleaved
  ``sin`` (even channels) / ``cos`` (odd channels) of ``pos * 10000^(-2i/d)``.
* :func:`sinusoidal_time_emb`: Matcha-TTS ``SinusoidalPosEmb`` for the flow-matching time
  ``t``: ``[sin(s t f_i), cos(s t f_i)]`` with ``f_i = exp(-i log(1e4) / (d/2 - 1))`` and scale
  ``s = 1000``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def espnet_rel_pos_emb(size: int, d_model: int, dtype=jnp.float32) -> Array:
    """Relative position table ``(1, 2*size - 1, d_model)`` for a sequence of ``size`` frames.

    Row ``k`` encodes relative position ``size - 1 - k`` (query index minus key index).
    Computed in numpy (float32, like the official table) so it is a constant under jit.
    """
    pos = np.arange(size - 1, -size, -1, dtype=np.float32)[:, None]  # T-1 .. -(T-1)
    div = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * -(math.log(10000.0) / d_model))
    pe = np.zeros((2 * size - 1, d_model), np.float32)
    pe[:, 0::2] = np.sin(pos * div)
    pe[:, 1::2] = np.cos(pos * div)
    return jnp.asarray(pe[None], dtype)


def sinusoidal_time_emb(t: Array, dim: int, scale: float = 1000.0) -> Array:
    """``t (B,)`` -> ``(B, dim)``: ``[sin | cos]`` halves (Matcha ``SinusoidalPosEmb``)."""
    if dim % 2:
        raise ValueError(f"sinusoidal_time_emb needs an even dim, got {dim}")
    half = dim // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    arg = scale * jnp.asarray(t, jnp.float32)[:, None] * freq[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
