"""Few-step flow: distil the official 20-pass sampler (10 Euler steps x CFG rows) into 1-2 passes.

The teacher is any frozen flow (the converted official ``flow.pt`` in practice), sampled with CFG
``v_w = (1 + w) v(x | mu, spk, cond) - w v(x | 0, 0, 0)``. The student is the *same* network
(``flow/decoder.py``) with optional extra inputs added to its time embedding through
zero-initialised MLPs (``FlowConfig.student``), so the initial student equals the teacher; it
runs one estimator pass per evaluation (guidance folded in). Three objectives:

* ``guidance`` (guidance distillation, Meng et al. 2023): the student takes the guidance rate
  ``w`` (input ``"w"``, drawn from ``w_range``) and matches the teacher's CFG velocity ``v_w`` in
  one pass: ``|v_S(y, t, w) - v_w(y, t)|^2``. Inference: the teacher's grid and steps at half the
  passes.
* ``meanflow`` (MeanFlow, Geng et al. 2025, arXiv 2505.13447, distilled from the teacher's field
  as IntMeanFlow does): the student predicts the *average* velocity over a step ``[t, r]``
  (input ``"d" = r - t``), ``u(x_t, t, r) = 1/(r - t) int_t^r v(x_s, s) ds``, so one Euler step
  ``x_r = x_t + (r - t) u`` lands on the ODE trajectory. Differentiating ``(r - t) u`` in ``t``
  along the trajectory gives the identity ``u = v - (t - r) du/dt`` with
  ``du/dt = v . d_x u + d_t u`` (one ``jax.jvp`` with tangent ``(v, 1, 0)``); the loss is
  ``|u - sg(v - (t - r) du/dt)|^2`` with ``v = v_w`` the teacher's CFG velocity. ``d = 0`` is
  the instantaneous velocity, so the fresh student (which ignores ``d``) is exact at ``r = t``.
* ``reflow`` (Liu et al. 2023), the simple baseline: couplings ``(z, x1 = teacher sampler(z))``
  computed on the fly inside the step (or, when the batch carries ``teacher_noise`` and
  ``teacher_mel`` arrays, taken from it), and flow matching on the straight path between them.

Times: flow time ``t`` in [0, 1] (0 = noise), ``y = (1 - (1 - sigma_min) t) z + t x1`` as in
training (``cfm.cfm_loss``). ``grid_ratio`` of the rows draw ``(t, r)`` from the steps of the
student's 1- and 2-step uniform grids (``(0, 1), (0, .5), (.5, 1)``), the others ``t ~ U(0, 1)``,
``r ~ U(t, 1)``; ``flow_ratio`` of those get ``r = t`` (MeanFlow's plain flow-matching rows).

The pure functions below (:func:`guidance_loss`, :func:`meanflow_target`, :func:`meanflow_loss`,
:func:`reflow_loss`) take velocity fields as callables, so the tests check them on toy fields
against hand-derived values; :class:`~cosyvoice2_jax.train.distill.DistillObjective` applies them
to the flow on the training parquet shards (``configs/train/distill_*.yaml``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import FlowConfig, FlowStudentConfig, TScheduler
from ..errors import ConfigError

Array = jax.Array
METHODS = ("guidance", "meanflow", "reflow")
STUDENT_INPUTS_OF = {"guidance": ("w",), "meanflow": ("d",), "reflow": ()}
GRID_STEPS = np.asarray([[0.0, 1.0], [0.0, 0.5], [0.5, 1.0]], np.float32)  # (t, r) of 1-/2-step grids; numpy: no backend at import


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """``distill:`` in a training YAML (``configs/train/distill_*.yaml``).

    ``method``: guidance | meanflow | reflow; ``w_range``: guidance rates drawn for ``guidance``;
    ``teacher_cfg_rate``: the teacher's CFG weight in the meanflow / reflow targets (official 0.7);
    ``teacher_steps``: Euler steps of the teacher's sampler for reflow couplings (cosine grid);
    ``student_steps``: the student's default sampler steps (exported with it; uniform grid, except
    ``guidance``: the teacher's cosine grid); ``grid_ratio``, ``flow_ratio``: see the module doc;
    ``teacher_couplings`` (meanflow): interpolate towards the teacher's sampler output for the
    row's noise (its ODE trajectory's end, as reflow) instead of the data mel.
    """

    method: str = "meanflow"
    w_range: tuple[float, float] = (0.0, 1.0)
    teacher_cfg_rate: float = 0.7
    teacher_steps: int = 10
    student_steps: int = 2
    grid_ratio: float = 0.5
    flow_ratio: float = 0.25
    teacher_couplings: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"distill.method: {self.method!r} is not one of {', '.join(METHODS)}")
        lo, hi = self.w_range
        if not 0.0 <= lo <= hi:
            raise ConfigError(f"distill.w_range must be (lo, hi) with 0 <= lo <= hi, got {self.w_range}")
        if self.teacher_cfg_rate < 0:
            raise ConfigError(f"distill.teacher_cfg_rate must be >= 0, got {self.teacher_cfg_rate}")
        for f in ("teacher_steps", "student_steps"):
            if int(getattr(self, f)) < 1:
                raise ConfigError(f"distill.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("grid_ratio", "flow_ratio"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ConfigError(f"distill.{f} must be in [0, 1], got {getattr(self, f)}")


def student_config(teacher: FlowConfig, opts: DistillOptions) -> FlowConfig:
    """The student's :class:`FlowConfig`: the teacher's network plus the method's inputs, and its
    sampler (``student_steps``; uniform grid, or the teacher's cosine grid for ``guidance``)."""
    sched = teacher.cfm.t_scheduler if opts.method == "guidance" else TScheduler.LINEAR
    cfm = dataclasses.replace(teacher.cfm, n_timesteps=int(opts.student_steps), t_scheduler=sched)
    return dataclasses.replace(teacher, cfm=cfm, student=FlowStudentConfig(True, STUDENT_INPUTS_OF[opts.method]))


def student_from_teacher(teacher_params: dict, student_params: dict) -> dict:
    """Student params = the teacher's, plus the student's extra (zero-effect) ``time_mlp_*``."""
    def merge(t, s):
        if not isinstance(s, dict):
            return t
        return {k: (merge(t[k], v) if k in t else v) for k, v in s.items()}
    return merge(teacher_params, student_params)


# ----------------------------------------------------------------------------- pure pieces
def interpolate(z: Array, x1: Array, t: Array, sigma_min: float = 1e-6) -> Array:
    """``y = (1 - (1 - sigma_min) t) z + t x1`` with ``t (B,)``."""
    t = t[:, None, None]
    return (1.0 - (1.0 - sigma_min) * t) * z + t * x1


def cfg_combine(vc: Array, vu: Array, w: Array) -> Array:
    """CFG velocity ``(1 + w) v_c - w v_u`` with a per-row ``w (B,)`` or a scalar."""
    w = jnp.asarray(w, jnp.float32)
    w = w[:, None, None] if w.ndim == 1 else w
    return (1.0 + w) * vc - w * vu


def masked_mse(pred: Array, target: Array, mask: Array) -> Array:
    """Mean squared error over the valid frames ``mask (B, F)`` and channels."""
    m = mask[..., None].astype(pred.dtype)
    err = (pred - target) * m
    return jnp.sum(err * err) / jnp.maximum(jnp.sum(m) * pred.shape[-1], 1.0)


def guidance_loss(student_v: Callable, teacher_v: Callable, y: Array, t: Array, w: Array, mask: Array) -> Array:
    """``|student_v(y, t, w) - sg(teacher_v(y, t, w))|^2`` (teacher_v: the CFG velocity)."""
    target = jax.lax.stop_gradient(teacher_v(y, t, w))
    return masked_mse(student_v(y, t, w), target, mask)


def meanflow_target(u_fn: Callable, v: Array, y: Array, t: Array, r: Array) -> tuple[Array, Array]:
    """``(u, v - (t - r) du/dt)`` for the average velocity ``u_fn(y, t, r)`` at ``y`` with the
    instantaneous velocity ``v`` there; ``du/dt = jvp(u_fn, (y, t, r), (v, 1, 0))``."""
    u, dudt = jax.jvp(u_fn, (y, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
    return u, v - (t - r)[:, None, None] * dudt


def meanflow_loss(u_fn: Callable, v: Array, y: Array, t: Array, r: Array, mask: Array) -> Array:
    """``|u - sg(v - (t - r) du/dt)|^2`` (MeanFlow's objective, :func:`meanflow_target`)."""
    u, target = meanflow_target(u_fn, jax.lax.stop_gradient(v), y, t, r)
    return masked_mse(u, jax.lax.stop_gradient(target), mask)


def reflow_loss(v_fn: Callable, z: Array, x1: Array, t: Array, mask: Array, sigma_min: float = 1e-6) -> Array:
    """Flow matching on the coupling ``(z, x1)``: ``|v_fn(y_t, t) - (x1 - (1 - sigma_min) z)|^2``."""
    y = interpolate(z, x1, t, sigma_min)
    return masked_mse(v_fn(y, t), jax.lax.stop_gradient(x1 - (1.0 - sigma_min) * z), mask)


def draw_times(key: Array, batch: int, opts: DistillOptions) -> tuple[Array, Array]:
    """``(t, r)`` per row (module doc): grid steps for ``grid_ratio`` of the rows, else
    ``t ~ U(0, 1)``, ``r ~ U(t, 1)`` with ``r = t`` for ``flow_ratio`` of them."""
    kg, ki, kt, kr, kf = jax.random.split(key, 5)
    on_grid = jax.random.uniform(kg, (batch,)) < opts.grid_ratio
    g = jnp.asarray(GRID_STEPS)[jax.random.randint(ki, (batch,), 0, GRID_STEPS.shape[0])]
    t = jax.random.uniform(kt, (batch,))
    r = t + (1.0 - t) * jax.random.uniform(kr, (batch,))
    r = jnp.where(jax.random.uniform(kf, (batch,)) < opts.flow_ratio, t, r)
    return jnp.where(on_grid, g[:, 0], t), jnp.where(on_grid, g[:, 1], r)


def euler_solve(v_fn: Callable, z: Array, ts: Array) -> Array:
    """Euler integration of ``v_fn(x, t (B,))`` over the grid ``ts`` (the official loop's update)."""
    def body(i, x):
        t = jnp.broadcast_to(ts[i], (x.shape[0],))
        return x + (ts[i + 1] - ts[i]) * v_fn(x, t)
    return jax.lax.fori_loop(0, ts.shape[0] - 1, body, z)
