"""Gradient checkpointing (rematerialisation) policies for repeated blocks in training.

A model wraps each repeated block (e.g. a decoder layer) with ``nn.remat(Block,
policy=remat_policy(name))``: the backward pass keeps only what the policy saves of the block's
forward and recomputes the rest, one block at a time.

* ``none``: no remat (everything the backward needs is kept);
* ``full``: keep only each block's inputs;
* ``dots``: keep every matmul output;
* ``dots_no_batch``: keep the matmul outputs without batch dimensions (the weight matmuls);
  attention scores and probabilities are recomputed.
"""
from __future__ import annotations

import jax

from ..errors import ConfigError

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str, what: str = "train.remat") -> str:
    if name not in REMAT_POLICIES:
        raise ConfigError(f"{what}={name!r} is not one of {', '.join(REMAT_POLICIES)}")
    return name


def remat_policy(name: str):
    return REMAT_POLICIES[check_remat(name)]
