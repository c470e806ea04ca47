"""Training-side flow-matching options: time-sampling law, CFG drop rate, per-t loss weighting.

The official objective (``cfm.cfm_loss``) draws ``t = cosine(u)``, ``u ~ U(0, 1)`` (uniform then
the ``t_scheduler``), drops the condition of 20% of the rows and weights every ``t`` alike. The
research options (``FlowTrainOptions``; ``flow:`` in ``configs/train/flow.yaml``):

* ``time_law``: ``official`` (``t = t_scheduler(u)``), ``uniform`` (``t = u``), ``logit_normal``
  (``t = sigmoid(m + s z)``, ``z ~ N(0, 1)``; Esser et al. 2024, SD3), drawn from the *same*
  uniform ``t_u`` through the normal inverse CDF, so the draws of a step stay one dict;
* ``cfg_drop``: the CFG drop rate (``None`` keeps ``flow.cfm.training_cfg_rate``, official 0.2);
* ``loss_weighting``: a per-row factor ``w(t)`` on the loss: ``none``, ``cosmap``
  (``2 / (pi (1 - 2t + 2t^2))``, SD3's CosMap density) or ``logit_normal`` (the logit-normal
  density with ``logit_mean``/``logit_std``), normalised like the official mean (sum over valid
  frames / their count).

They reach ``cfm_loss`` through the draws dict: ``draws["t"]`` (the flow time, instead of
``t_scheduler(t_u)``) and ``draws["loss_weight"]`` ``(B,)``; the default options add neither key,
so the official loss is unchanged bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from ..errors import ConfigError

Array = jax.Array
TIME_LAWS = ("official", "uniform", "logit_normal")
WEIGHTINGS = ("none", "cosmap", "logit_normal")


@dataclasses.dataclass(frozen=True)
class FlowTrainOptions:
    time_law: str = "official"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cfg_drop: float | None = None
    loss_weighting: str = "none"

    def __post_init__(self):
        if self.time_law not in TIME_LAWS:
            raise ConfigError(f"flow.time_law: {self.time_law!r} is not one of {', '.join(TIME_LAWS)}")
        if self.loss_weighting not in WEIGHTINGS:
            raise ConfigError(f"flow.loss_weighting: {self.loss_weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if not (self.logit_std > 0 and math.isfinite(self.logit_std)) or not math.isfinite(self.logit_mean):
            raise ConfigError(f"flow.logit_std must be > 0 and logit_mean finite, "
                              f"got ({self.logit_mean}, {self.logit_std})")
        if self.cfg_drop is not None and not 0.0 <= self.cfg_drop < 1.0:
            raise ConfigError(f"flow.cfg_drop must be in [0, 1) (or null for the model's 0.2), got {self.cfg_drop}")

    @property
    def official(self) -> bool:
        """True when the loss is the official one (no draws keys are added)."""
        return self.time_law == "official" and self.loss_weighting == "none"


def flow_time(u: Array, opts: FlowTrainOptions, t_scheduler="cosine") -> Array:
    """The flow time ``t`` of the uniform draws ``u`` under ``opts.time_law``."""
    if opts.time_law == "official":
        from .cfm import schedule

        return schedule(u, t_scheduler)
    if opts.time_law == "uniform":
        return u
    # logit-normal through the inverse normal CDF; u in (0, 1) (jax.random.uniform can return 0)
    z = ndtri(jnp.clip(u, 1e-7, 1.0 - 1e-7))
    return jax.nn.sigmoid(opts.logit_mean + opts.logit_std * z)


def loss_weight(t: Array, opts: FlowTrainOptions) -> Array | None:
    """Per-row loss factor ``w(t)`` (``None`` for ``none``)."""
    if opts.loss_weighting == "none":
        return None
    if opts.loss_weighting == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * t + 2.0 * t * t))
    tc = jnp.clip(t, 1e-6, 1.0 - 1e-6)
    logit = jnp.log(tc) - jnp.log1p(-tc)
    return jnp.exp(-0.5 * ((logit - opts.logit_mean) / opts.logit_std) ** 2) / (
        opts.logit_std * math.sqrt(2.0 * math.pi) * tc * (1.0 - tc))


def apply_to_draws(draws: dict[str, Array], opts: FlowTrainOptions, t_scheduler="cosine") -> dict[str, Array]:
    """Add ``t`` and ``loss_weight`` to a step's draws for non-official options (else unchanged)."""
    if opts.official:
        return draws
    t = flow_time(draws["t_u"], opts, t_scheduler)
    out = dict(draws, t=t)
    w = loss_weight(t, opts)
    if w is not None:
        out["loss_weight"] = w
    return out


def apply_to_cfm(cfm_cfg, opts: FlowTrainOptions):
    """``CFMConfig`` with ``opts.cfg_drop`` as ``training_cfg_rate`` (when set)."""
    if opts.cfg_drop is None:
        return cfm_cfg
    return dataclasses.replace(cfm_cfg, training_cfg_rate=float(opts.cfg_drop))

