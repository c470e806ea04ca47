"""Compute dtypes by config name (``LLMConfig.dtype`` and friends); params stay fp32."""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    """``"bfloat16"`` -> ``jnp.bfloat16`` (unknown names raise ``KeyError`` naming the choices)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise KeyError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None
