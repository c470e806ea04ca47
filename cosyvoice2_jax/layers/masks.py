"""Boolean masks: padding validity, chunk (block-causal) attention, attention biases.

Conventions (docs/architecture.md): validity masks are ``(B, T)`` bool (True = real frame);
attention masks are bool and broadcastable to ``(B, T_q, T_k)`` (True = may attend).

The chunk mask is the static-chunk mask of the official code (``cosyvoice.utils.mask.
subsequent_chunk_mask`` as used by ``add_optional_chunk_mask`` with all left chunks visible):
query ``i`` sees key ``j`` iff ``j < (i // chunk + 1) * chunk``. ``chunk = 0`` means full
attention, ``chunk = 1`` a causal mask; the chunk may be a per-example ``(B,)`` array, which is
how the paper's four training masks (non-causal, full-causal, chunk-M, chunk-2M; CosyVoice 2
section 2.5) are expressed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def valid_mask(lengths: Array, max_len: int) -> Array:
    """``(B,)`` lengths -> ``(B, max_len)`` bool, True where ``t < length``."""
    return jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]


def chunk_mask(size: int, chunk: int | Array, offset: int = 0) -> Array:
    """Static-chunk visibility ``(T, T)`` (int chunk) or ``(B, T, T)`` (``(B,)`` chunk array).

    ``chunk <= 0`` gives all-True (full attention). ``offset`` shifts the query/key positions
    (for chunked streaming with caches, where position 0 of this call is ``offset`` overall).
    """
    pos = jnp.arange(size) + offset
    if isinstance(chunk, int):
        if chunk <= 0:
            return jnp.ones((size, size), bool)
        end = (pos // chunk + 1) * chunk
        return pos[None, :] < end[:, None]
    c = jnp.asarray(chunk)[:, None, None]
    safe = jnp.maximum(c, 1)
    end = (pos[None, :, None] // safe + 1) * safe
    return jnp.where(c > 0, pos[None, None, :] < end, True)


def attention_mask(valid_bt: Array, chunk: int | Array = 0) -> Array:
    """Key-padding mask combined with the chunk mask: ``(B, T, T)`` bool.

    Rows of padded queries keep their key mask (their outputs are garbage and get masked later,
    as in the official code). A row with no visible key cannot occur for length >= 1 (key 0 is
    always visible), so the official "force all-False rows to True" fix-up is not needed.
    """
    T = valid_bt.shape[1]
    return valid_bt[:, None, :] & chunk_mask(T, chunk)
