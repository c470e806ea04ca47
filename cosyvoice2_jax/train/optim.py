"""Optimizers and learning-rate schedules as the official recipes configure them.

Official ``train_conf`` (cosyvoice2.yaml): Adam, lr 1e-5 for SFT (1e-3 from scratch with
``warmuplr``), ``grad_clip: 5``, ``accum_grad: 2``. Schedules:

* ``constantlr``: the base lr at every step;
* ``warmuplr`` (Noam): ``lr * w**0.5 * min(s**-0.5, s * w**-1.5)`` with 1-based step ``s``
  (linear warm-up to ``lr`` at ``s = w``, then inverse-sqrt decay).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optim: str = "adam"  # adam | adamw
    lr: float = 1e-5
    weight_decay: float = 0.0
    scheduler: str = "constantlr"  # constantlr | warmuplr
    warmup_steps: int = 2500
    grad_clip: float = 5.0
    accum_grad: int = 1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.scheduler == "constantlr":
        return optax.constant_schedule(cfg.lr)
    if cfg.scheduler == "warmuplr":
        w = float(cfg.warmup_steps)

        def noam(count):
            s = jnp.asarray(count, jnp.float32) + 1.0  # optax counts from 0, the official from 1
            if w == 0:
                return cfg.lr * s ** -0.5
            return cfg.lr * w ** 0.5 * jnp.minimum(s ** -0.5, s * w ** -1.5)

        return noam
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}; use constantlr or warmuplr")


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm, then Adam(W) with the schedule; wrapped for gradient accumulation
    when ``accum_grad > 1`` (the update is applied every ``accum_grad`` calls, averaged)."""
    sched = schedule(cfg)
    if cfg.optim == "adam":
        opt = optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.optim == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optim!r}; use adam or adamw")
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt) if cfg.grad_clip > 0 else opt
    if cfg.accum_grad > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_grad)
    return tx
