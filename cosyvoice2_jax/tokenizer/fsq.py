"""Finite scalar quantization (FSQ) of the S3Tokenizer v2 (CosyVoice 2 paper, section 2.1).

The encoder output ``h`` (B, S, D) is projected down to ``dim`` = 8 values, bounded with
``tanh`` and scaled by 0.999 (so that |x| < 1 and the rounding below never reaches +-2),
rounded to the levels {-1, 0, 1} and read as an 8-digit base-3 number::

    code_i = round(0.999 * tanh(W h + b)_i) + 1        in {0, 1, 2}
    index  = sum_i code_i * 3**i                        in [0, 3**8) = [0, 6561)

Official: ``s3tokenizer.model_v2.FSQCodebook.encode`` (torch module ``quantizer._codebook``).
The official code has no decoder; :func:`fsq_decode` returns the code vector in {-1, 0, 1}^8
(the exact inverse of the rounding step), which is what a learned up-projection would read.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

# float32(0.999): the official multiplies by this literal after tanh.
FSQ_SCALE = 0.9990000128746033


def fsq_powers(dim: int = 8, levels: int = 3):
    """(dim,) int32 place values ``levels**i``."""
    return jnp.asarray([levels**i for i in range(dim)], dtype=jnp.int32)


def fsq_quantize(z_bsd, levels: int = 3):
    """Bounded rounding + base-``levels`` index.

    Args:
      z_bsd: (..., dim) projected features (before tanh).
    Returns:
      index (...,) int32 in [0, levels**dim).
    """
    if levels != 3:
        # the official bound (tanh * 0.999, round) gives exactly 3 levels; other level counts
        # would need a different bound, which the official model never uses.
        raise ValueError(f"FSQ here supports 3 levels (the S3Tokenizer v2 value), got {levels}")
    digits = jnp.round(jnp.tanh(z_bsd.astype(jnp.float32)) * FSQ_SCALE) + 1.0  # {0, 1, 2}
    powers = fsq_powers(z_bsd.shape[-1], levels).astype(jnp.float32)
    return jnp.sum(digits * powers, axis=-1).astype(jnp.int32)


def fsq_decode(index, dim: int = 8, levels: int = 3, dtype=jnp.float32):
    """Index -> code vector: (...,) int -> (..., dim) with values in {-1, 0, 1}.

    Inverse of :func:`fsq_quantize` on the rounded values: digit ``i`` is
    ``(index // levels**i) % levels``, centred by subtracting ``levels // 2``.
    """
    index = jnp.asarray(index, jnp.int32)
    digits = (index[..., None] // fsq_powers(dim, levels)) % levels
    return (digits - levels // 2).astype(dtype)


def fsq_soft_decode(probs, dim: int = 8, levels: int = 3):
    """Expected code vector of a distribution over the ``levels**dim`` ids: (..., V) -> (..., dim).

    ``probs @ C`` with ``C[v] = fsq_decode(v)``; for a one-hot row it is exactly
    :func:`fsq_decode` of that id, so a relaxed (Gumbel-softmax) sample of speech tokens gets a
    differentiable FSQ embedding (the differentiable ASR reward, paper section 2.7).
    """
    n = levels**dim
    if probs.shape[-1] != n:
        raise ValueError(f"fsq_soft_decode: last axis must hold the {n} FSQ ids, got {probs.shape[-1]}")
    table = fsq_decode(jnp.arange(n), dim, levels, dtype=probs.dtype)
    return probs @ table


class FSQCodebook(nn.Module):
    """``project_down`` (D -> dim) followed by :func:`fsq_quantize`.

    Torch name: ``quantizer._codebook`` (``project_down`` is a ``Linear(D, 8)`` with bias).
    """

    dim: int = 8
    levels: int = 3

    def setup(self):
        self.project_down = nn.Dense(self.dim, name="project_down")

    def project(self, h_bsd):
        """(B, S, D) -> (B, S, dim) pre-quantization values (before tanh)."""
        return self.project_down(h_bsd)

    def encode(self, h_bsd):
        """(B, S, D) -> (B, S) int32 token ids."""
        return fsq_quantize(self.project(h_bsd), self.levels)

    def decode(self, index_bs):
        """(B, S) ids -> (B, S, dim) code vectors in {-1, 0, 1}."""
        return fsq_decode(index_bs, self.dim, self.levels)

    def __call__(self, h_bsd):
        z = self.project(h_bsd)
        return fsq_quantize(z, self.levels), z
