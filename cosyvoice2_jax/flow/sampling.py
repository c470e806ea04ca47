"""Flow-matching samplers: time grids x ODE solvers x guidance, one frozen :class:`SamplerConfig`.

The flow integrates ``dx/dt = v(x, t)`` from noise (``t = 0``) to mel (``t = 1``). A sampler is

* a **time grid** ``ts (steps + 1,)`` from 0 to 1 (:func:`time_grid`): ``uniform``; ``cosine``
  ``1 - cos(pi u / 2)`` (the official CosyVoice grid); ``sway:S`` (F5-TTS sway sampling
  ``u + S (cos(pi u / 2) - 1 + u)``; ``sway:-1`` is the cosine grid); ``epss`` (F5-TTS's empirically
  pruned step tables, :data:`EPSS_TABLES`); ``explicit`` (``SamplerConfig.times``); optionally
  re-timed by a scheduler (``retime``: ``t_i -> kappa(t_i)``; an ODE solution does not depend on the
  time parametrisation, only the discretisation does, so this moves the steps, not the target);
* a **solver**: ``euler`` (the official loop, bit for bit), ``midpoint``, ``heun``, ``rk4`` (our
  ``lax.fori_loop`` solvers, which thread a streaming ``state`` and index every velocity
  evaluation ``k``), or ``diffrax:NAME`` (any explicit diffrax solver stepping exactly on the grid
  with ``StepTo``; offline only). :func:`reference_solve` integrates the same ODE with an adaptive
  diffrax solver (Tsit5/Dopri5, PID step control) to a tight tolerance (study reference);
* **guidance** (classifier-free, rows ``[conditioned; unconditioned]`` in one estimator batch):
  ``cfg`` ``v = (1 + w) v_c - w v_u`` (official ``w = 0.7``) with a constant ``cfg_rate`` or a
  per-step ``cfg_schedule``, optionally only for ``t`` inside ``cfg_interval``; ``cfg_zero_star``
  (CFG-Zero*, Fan et al. 2025, arXiv 2503.18886: ``v = (1 + w) v_c - w s* v_u`` with the
  per-row optimised scale ``s* = <v_c, v_u> / (|v_u|^2 + 1e-8)``); ``zero_steps`` (CFG-Zero*'s
  zero-init: the velocity of the first ``zero_steps`` solver steps is 0); ``none`` (one estimator
  pass per evaluation: half the cost of CFG).

The loop protocol shared with ``cfm.py`` and the streaming flow::

    velocity(x (B, F, C), t () f32, k () int32, state) -> (v, state)   # k: evaluation index in the solve
    estimate(x_rows (R*B, F, C), t, k, state) -> (v_rows, state)      # R = rows(sampler): 2 with CFG, 1 without

``state`` is any pytree threaded through the loop (``None`` offline; the streaming caches indexed by
``k``, sized by :func:`n_evals`). Entry points: :func:`sample` (one config), :func:`sweep` (many
configs of the same structure in one compiled program, ``vmap`` over the config arrays),
:func:`solve` / :func:`cfg_velocity` (the protocol pieces).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError

Array = jax.Array
Velocity = Callable[[Array, Array, Array, Any], tuple[Array, Any]]
Estimate = Callable[[Array, Array, Array, Any], tuple[Array, Any]]

# ----------------------------------------------------------------------------- solvers: tables
# our solvers: evaluation-time fractions c_j of one step (velocity evaluations per step = len)
SOLVER_STAGES: dict[str, tuple[float, ...]] = {
    "euler": (0.0,),
    "midpoint": (0.0, 0.5),
    "heun": (0.0, 1.0),
    "rk4": (0.0, 0.5, 0.5, 1.0),
}
# diffrax explicit solvers usable on a fixed grid: (evaluations per step, extra evaluations per
# solve: FSAL solvers evaluate the field once more at the start). Measured by counting the
# vector-field calls of diffrax 0.7 (tests/test_flow_sampling.py checks the table).
DIFFRAX_EVALS: dict[str, tuple[int, int]] = {
    "Euler": (1, 0), "Heun": (2, 0), "Midpoint": (2, 0), "Ralston": (2, 0),
    "Bosh3": (3, 1), "Tsit5": (6, 1), "Dopri5": (6, 1), "Dopri8": (13, 1),
}
ADAPTIVE = ("Tsit5", "Dopri5", "Dopri8", "Bosh3")

# F5-TTS "empirically pruned step sampling" (EPSS) tables: grid points on a 1/32 lattice, keyed by
# the number of steps. Source: SWivid/F5-TTS, src/f5_tts/model/utils.py, get_epss_timesteps
# (F5-TTS falls back to a uniform grid for other step counts; here other counts are an error).
EPSS_LATTICE = 32
EPSS_TABLES: dict[int, tuple[int, ...]] = {
    5: (0, 2, 4, 8, 16, 32),
    6: (0, 2, 4, 6, 8, 16, 32),
    7: (0, 2, 4, 6, 8, 16, 24, 32),
    10: (0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32),
    12: (0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32),
    16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32),
}
GUIDANCE = ("cfg", "cfg_zero_star", "none")


# ----------------------------------------------------------------------------- time grids
def scheduler_fn(spec: str) -> Callable[[Array], Array]:
    """``[0, 1] -> [0, 1]`` time map named by ``spec``: ``linear``/``none``, ``cosine``, ``sway:S``."""
    spec = str(spec)
    if spec in ("linear", "none", "uniform"):
        return lambda u: u
    if spec == "cosine":
        return lambda u: 1.0 - jnp.cos(u * 0.5 * jnp.pi)  # the expression of cfm.schedule (bit-equal)
    if spec.startswith("sway:"):
        s = _sway_coef(spec)
        return lambda u: u + s * (jnp.cos(jnp.pi / 2 * u) - 1.0 + u)
    raise ConfigError(f"unknown time scheduler {spec!r}: use linear, cosine or sway:S (e.g. sway:-1)")


def _sway_coef(spec: str) -> float:
    try:
        return float(spec.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"time scheduler {spec!r}: the sway coefficient must be a number, e.g. sway:-1") from None


def uniform_grid(steps: int) -> Array:
    """``(steps + 1,)`` float32 ``linspace(0, 1)`` (the official ``torch.linspace``)."""
    return jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)


def epss_grid(steps: int) -> Array:
    """F5-TTS EPSS table for ``steps`` (5, 6, 7, 10, 12 or 16) as times in [0, 1]."""
    if steps not in EPSS_TABLES:
        raise ConfigError(f"sampler.grid: epss has tables for steps {sorted(EPSS_TABLES)}, not {steps}; "
                          "pick one of those or another grid")
    return jnp.asarray(EPSS_TABLES[steps], jnp.float32) / EPSS_LATTICE


def retime(ts: Array, scheduler: str) -> Array:
    """Re-time a grid to another scheduler: ``t_i -> kappa(t_i)`` (keeps 0 and 1 fixed)."""
    return scheduler_fn(scheduler)(ts)


def time_grid(grid: str, steps: int, times: Sequence[float] = (), retime_to: str = "none") -> Array:
    """The ``(steps + 1,)`` float32 grid named by ``grid`` (see the module doc)."""
    if grid == "explicit":
        ts = jnp.asarray(np.asarray(times, np.float32))
    elif grid == "epss":
        ts = epss_grid(steps)
    elif grid == "uniform":
        ts = uniform_grid(steps)
    else:
        ts = scheduler_fn(grid)(uniform_grid(steps))
    return ts if retime_to in ("none", "linear") else retime(ts, retime_to)


# ----------------------------------------------------------------------------- the config
@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """One flow sampler. Defaults = the official CosyVoice 2 sampler (``CFMConfig`` defaults:
    cosine grid, 10 Euler steps, CFG 0.7), which reproduces the official output bit for bit.

    Fields: ``steps`` solver steps (NFE = steps x evaluations per step, :func:`n_evals`);
    ``solver``; ``grid`` (+ ``times`` for ``explicit``) and ``retime``; ``guidance``,
    ``cfg_rate`` or ``cfg_schedule`` (one weight per step), ``cfg_interval`` ``(lo, hi)``: guidance
    only where ``lo <= t <= hi`` (0 elsewhere); ``zero_steps``: zero-init steps.
    Invalid values raise one :class:`ConfigError` naming the field.
    """

    steps: int = 10
    solver: str = "euler"
    grid: str = "cosine"
    times: tuple[float, ...] = ()
    retime: str = "none"
    guidance: str = "cfg"
    cfg_rate: float = 0.7
    cfg_schedule: tuple[float, ...] = ()
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    zero_steps: int = 0

    def __post_init__(self):
        def bad(field, why):
            raise ConfigError(f"sampler.{field}: {why}")

        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            bad("steps", f"must be an integer >= 1 (NFE >= 1), got {self.steps!r}")
        if self.solver not in SOLVER_STAGES:
            name = self.solver[len("diffrax:"):] if str(self.solver).startswith("diffrax:") else None
            if name not in DIFFRAX_EVALS:
                bad("solver", f"unknown solver {self.solver!r}; use one of {', '.join(SOLVER_STAGES)} or "
                              f"diffrax:NAME with NAME in {', '.join(DIFFRAX_EVALS)}")
        if self.grid == "explicit":
            t = np.asarray(self.times, np.float64)
            if t.shape != (self.steps + 1,):
                bad("times", f"an explicit grid needs steps + 1 = {self.steps + 1} values, got {len(self.times)}")
            if t[0] != 0.0 or t[-1] != 1.0 or np.any(np.diff(t) <= 0):
                bad("times", f"must increase strictly from 0 to 1, got {list(self.times)}")
        elif self.times:
            bad("times", f"only used with grid: explicit (grid is {self.grid!r}); remove it")
        elif self.grid == "epss" and self.steps not in EPSS_TABLES:
            bad("grid", f"epss has tables for steps {sorted(EPSS_TABLES)}, not steps={self.steps}")
        elif self.grid not in ("uniform", "epss", "cosine") and not str(self.grid).startswith("sway:"):
            bad("grid", f"unknown grid {self.grid!r}; use uniform, cosine, sway:S, epss or explicit")
        for field in ("grid", "retime"):
            v = getattr(self, field)
            if str(v).startswith("sway:"):
                try:
                    _sway_coef(v)
                except ConfigError as e:
                    bad(field, str(e))
        if self.retime not in ("none", "linear", "cosine") and not str(self.retime).startswith("sway:"):
            bad("retime", f"unknown scheduler {self.retime!r}; use none, cosine or sway:S")
        if self.grid != "explicit" or self.retime not in ("none", "linear"):
            with jax.ensure_compile_time_eval():  # configs are built inside jitted functions too
                ts = np.asarray(self.time_grid(), np.float64)
            if abs(ts[0]) > 1e-6 or abs(ts[-1] - 1.0) > 1e-6 or np.any(np.diff(ts) <= 0):
                bad("grid" if self.retime in ("none", "linear") else "retime",
                    f"gives a grid that does not increase from 0 to 1 ({np.round(ts, 4).tolist()}); "
                    "for sway:S keep -1 <= S <= 2/(pi-2)")
        if self.guidance not in GUIDANCE:
            bad("guidance", f"unknown guidance {self.guidance!r}; use one of {', '.join(GUIDANCE)}")
        if not (self.cfg_rate >= 0.0) or not math.isfinite(self.cfg_rate):
            bad("cfg_rate", f"must be a finite number >= 0, got {self.cfg_rate!r}")
        if self.cfg_schedule:
            if len(self.cfg_schedule) != self.steps:
                bad("cfg_schedule", f"needs one weight per step ({self.steps}), got {len(self.cfg_schedule)}")
            if any(not (w >= 0.0) or not math.isfinite(w) for w in self.cfg_schedule):
                bad("cfg_schedule", f"weights must be finite and >= 0, got {list(self.cfg_schedule)}")
        lo, hi = self.cfg_interval
        if not (0.0 <= lo <= hi <= 1.0):
            bad("cfg_interval", f"must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        z = self.zero_steps
        if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z <= self.steps:
            bad("zero_steps", f"must be an integer in [0, steps={self.steps}], got {self.zero_steps!r}")
        if self.guidance == "none" and (self.cfg_schedule or self.cfg_interval != (0.0, 1.0)):
            bad("guidance", "is 'none' but cfg_schedule/cfg_interval are set; remove them or use guidance: cfg")

    # ---- derived
    def time_grid(self) -> Array:
        return time_grid(self.grid, self.steps, self.times, self.retime)

    @property
    def structure(self) -> tuple:
        """What fixes the compiled program: configs with equal structure sweep in one program.
        ``gated``: a t-interval or zero-init steps (their selects stay out of the plain path, whose
        floating-point program is then exactly the official one)."""
        return (self.solver, self.steps, self.guidance, self.gated)

    @property
    def gated(self) -> bool:
        return self.zero_steps > 0 or tuple(self.cfg_interval) != (0.0, 1.0)

    @property
    def label(self) -> str:
        g = self.grid if self.grid != "explicit" else "explicit"
        g += f">{self.retime}" if self.retime not in ("none", "linear") else ""
        if self.guidance == "none":
            gd = "nocfg"
        else:
            gd = "cfg*" if self.guidance == "cfg_zero_star" else "cfg"
            gd += "[sched]" if self.cfg_schedule else f"{self.cfg_rate:g}"
            gd += f"@[{self.cfg_interval[0]:g},{self.cfg_interval[1]:g}]" if self.cfg_interval != (0.0, 1.0) else ""
        gd += f"+z{self.zero_steps}" if self.zero_steps else ""
        return f"{self.solver}/{g}/{gd}/{self.steps}"

    @classmethod
    def from_cfm(cls, cfm, **overrides) -> "SamplerConfig":
        """The sampler of a :class:`~cosyvoice2_jax.config.CFMConfig` (solver, t_scheduler,
        n_timesteps, inference_cfg_rate), with ``overrides`` (``None`` values ignored)."""
        base = dict(steps=int(cfm.n_timesteps), solver=_value(cfm.solver), grid=_value(cfm.t_scheduler),
                    cfg_rate=float(cfm.inference_cfg_rate))
        base.update({k: _value(v) for k, v in overrides.items() if v is not None})
        if base["grid"] == "linear":  # TScheduler.LINEAR is the uniform grid
            base["grid"] = "uniform"
        return cls(**base)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "SamplerConfig":
        """From a YAML mapping (``config.py`` conventions: unknown keys and wrong types name the key)."""
        from ..config import from_dict

        return from_dict(cls, data or {})

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> "SamplerConfig":
        from ..config import load_yaml

        return load_yaml(cls, path, overrides)


def _value(x) -> str:
    return getattr(x, "value", x)


def n_evals(sampler_or_solver: SamplerConfig | str, n_steps: int | None = None) -> int:
    """Static number of velocity evaluations of one solve (``n_evals(cfg)`` or ``n_evals(solver, steps)``)."""
    if isinstance(sampler_or_solver, SamplerConfig):
        solver, n_steps = sampler_or_solver.solver, sampler_or_solver.steps
    else:
        solver = _value(sampler_or_solver)
    if solver in SOLVER_STAGES:
        return len(SOLVER_STAGES[solver]) * int(n_steps)
    if str(solver).startswith("diffrax:") and solver[8:] in DIFFRAX_EVALS:
        per, extra = DIFFRAX_EVALS[solver[8:]]
        return per * int(n_steps) + extra
    raise ConfigError(f"unknown solver {solver!r}")


def rows(sampler: SamplerConfig | tuple) -> int:
    """Estimator rows per utterance: 2 with guidance (conditioned + unconditioned), 1 without
    (``sampler``: a config or its :attr:`SamplerConfig.structure`)."""
    guidance = sampler.guidance if isinstance(sampler, SamplerConfig) else sampler[2]
    return 1 if guidance == "none" else 2


def estimator_passes(sampler: SamplerConfig) -> int:
    """Cost in single-row estimator passes: ``n_evals * rows`` (official: 10 x 2 = 20)."""
    return n_evals(sampler) * rows(sampler)


# ----------------------------------------------------------------------------- solvers
def solve(velocity: Velocity, x0: Array, ts: Array, solver: str = "euler", state: Any = None) -> tuple[Array, Any]:
    """Integrate ``dx/dt = velocity(x, t, k, state)`` over ``ts`` in one ``lax.fori_loop``.

    Euler is the official loop bit for bit, including its running time ``t += dt`` and
    ``dt = ts[i+1] - t`` (``t`` drifts from ``ts`` by float rounding as in torch). Midpoint, Heun
    and RK4 are the textbook tableaus (orders 2, 2, 4); evaluation ``j`` of step ``i`` has
    ``k = i * stages + j``. ``diffrax:NAME`` runs diffrax on the grid (``state`` must be ``None``).
    ``x`` keeps the dtype of ``x0`` (velocities of a bf16 estimator are cast to it).
    """
    solver = _value(solver)
    n = ts.shape[0] - 1
    if str(solver).startswith("diffrax:"):
        if state is not None:
            raise ConfigError(f"solver {solver!r} cannot thread a streaming state; use euler/midpoint/heun/rk4")
        return solve_diffrax(lambda x, t, k: velocity(x, t, k, None)[0], x0, ts, solver[8:]), None
    if solver not in SOLVER_STAGES:
        raise ConfigError(f"unknown solver {solver!r}")
    i32 = jnp.int32

    if solver == "euler":
        def body(i, carry):
            x, t, dt, st = carry
            v, st = velocity(x, t, i.astype(i32), st)
            x = x + dt * v.astype(x.dtype)
            t = t + dt
            dt = ts[jnp.minimum(i + 2, n)] - t
            return x, t, dt, st
        x, _, _, state = jax.lax.fori_loop(0, n, body, (x0, ts[0], ts[1] - ts[0], state))
        return x, state

    def step(i, carry):
        x, st = carry
        t0, t1 = ts[i], ts[i + 1]
        dt = t1 - t0
        k = i.astype(i32) * len(SOLVER_STAGES[solver])

        def f(y, t, j, st):  # evaluation j of this step, in the dtype of x
            v, st = velocity(y, t, k + j, st)
            return v.astype(x.dtype), st
        v0, st = f(x, t0, 0, st)
        if solver == "midpoint":
            v1, st = f(x + 0.5 * dt * v0, t0 + 0.5 * dt, 1, st)
            return x + dt * v1, st
        if solver == "heun":
            v1, st = f(x + dt * v0, t1, 1, st)
            return x + 0.5 * dt * (v0 + v1), st
        th = t0 + 0.5 * dt  # rk4
        v1, st = f(x + 0.5 * dt * v0, th, 1, st)
        v2, st = f(x + 0.5 * dt * v1, th, 2, st)
        v3, st = f(x + dt * v2, t1, 3, st)
        return x + (dt / 6.0) * (v0 + 2.0 * v1 + 2.0 * v2 + v3), st
    return jax.lax.fori_loop(0, n, step, (x0, state))


def _term(field: Callable[[Array, Array, Array], Array], ts: Array, stages: int):
    import diffrax

    n = ts.shape[0] - 1

    def vf(t, y, args):
        i = jnp.clip(jnp.searchsorted(ts, t, side="right") - 1, 0, n - 1).astype(jnp.int32)
        return field(y, jnp.asarray(t, jnp.float32), i * stages)
    return diffrax.ODETerm(vf)


def solve_diffrax(field: Callable[[Array, Array, Array], Array], x0: Array, ts: Array, name: str) -> Array:
    """diffrax solver ``name`` stepping exactly on the grid ``ts`` (``StepTo``).

    ``field(x, t, k)``: diffrax gives no evaluation index, so ``k`` is ``stages * i`` for the grid
    interval ``[ts[i], ts[i+1])`` holding ``t`` (piecewise-constant step quantities such as a per-step
    CFG schedule follow the grid in ``t``).
    """
    import diffrax

    if name not in DIFFRAX_EVALS:
        raise ConfigError(f"unknown diffrax solver {name!r}; use one of {', '.join(DIFFRAX_EVALS)}")
    n = ts.shape[0] - 1
    sol = diffrax.diffeqsolve(_term(field, ts, 1), getattr(diffrax, name)(), ts[0], ts[-1], None, x0,
                              stepsize_controller=diffrax.StepTo(ts), saveat=diffrax.SaveAt(t1=True), max_steps=n)
    return sol.ys[0]


def reference_solve(field: Callable[[Array, Array, Array], Array], x0: Array, *, rtol: float = 1e-6,
                    atol: float = 1e-6, solver: str = "Tsit5", grid: Array | None = None,
                    max_steps: int = 4096) -> tuple[Array, dict]:
    """Adaptive diffrax solve of ``dx/dt = field(x, t, k)`` from 0 to 1 (PID step control): the
    tight-tolerance reference of a study. ``grid``: the sampler grid whose step index ``k``
    piecewise-constant guidance uses (its points are passed as ``jump_ts``; ``k = i``).
    Returns ``(x1, stats)`` with ``num_steps``, ``num_rejected_steps`` and ``n_evals``.
    """
    import diffrax

    if solver not in ADAPTIVE:
        raise ConfigError(f"reference solver {solver!r}: use one of {', '.join(ADAPTIVE)} (adaptive diffrax solvers)")
    ts = jnp.asarray([0.0, 1.0], jnp.float32) if grid is None else jnp.asarray(grid, jnp.float32)
    jump = None if grid is None or ts.shape[0] <= 2 else ts[1:-1]
    ctrl = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4, jump_ts=jump)
    sol = diffrax.diffeqsolve(_term(field, ts, 1), getattr(diffrax, solver)(), 0.0, 1.0, 0.05, x0,
                              stepsize_controller=ctrl, saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
    per, extra = DIFFRAX_EVALS[solver]
    st = sol.stats
    stats = {"num_steps": st["num_steps"], "num_rejected_steps": st["num_rejected_steps"],
             "n_evals": per * st["num_steps"] + extra}
    return sol.ys[0], stats


# ----------------------------------------------------------------------------- guidance
def cfg_velocity(estimate: Estimate, rate) -> Velocity:
    """Constant classifier-free guidance: ``estimate`` runs ``[x; x]`` (conditioned rows first);
    ``v = (1 + rate) v_c - rate v_u`` (the official combination)."""
    def velocity(x, t, k, state):
        v, state = estimate(jnp.concatenate([x, x], axis=0), t, k, state)
        vc, vu = jnp.split(v, 2, axis=0)
        return (1.0 + rate) * vc - rate * vu, state
    return velocity


def optimized_scale(vc: Array, vu: Array, eps: float = 1e-8) -> Array:
    """CFG-Zero* ``s* = <v_c, v_u> / (|v_u|^2 + eps)`` per batch row, shaped to broadcast."""
    axes = tuple(range(1, vc.ndim))
    s = jnp.sum(vc * vu, axis=axes, keepdims=True) / (jnp.sum(vu * vu, axis=axes, keepdims=True) + eps)
    return s


def guidance_arrays(sampler: SamplerConfig) -> dict[str, Array]:
    """The per-config arrays of a sampler (what :func:`sweep` vmaps over): ``ts (steps+1,)``,
    ``w (steps,)`` per-step CFG weight, ``interval (2,)``, ``zero_steps ()`` int32."""
    w = sampler.cfg_schedule or (sampler.cfg_rate,) * sampler.steps
    # host arrays where no arithmetic is involved (the values are the config's, rounded to float32 as
    # before): an eager jnp.asarray is one more small XLA program per process
    return {"ts": sampler.time_grid(), "w": np.asarray(w, np.float32),
            "interval": np.asarray(sampler.cfg_interval, np.float32),
            "zero_steps": np.asarray(sampler.zero_steps, np.int32)}


# the arrays of one sampler, computed once per process (each eager op is one small XLA program, a compile
# or a cache read in a new process); jax arrays are immutable, so callers share them
cached_guidance_arrays = functools.lru_cache(maxsize=64)(guidance_arrays)


def guided_velocity(estimate: Estimate, arrays: Mapping[str, Array], guidance: str, stages: int,
                    gated: bool = True) -> Velocity:
    """The velocity of ``guidance`` (``cfg``, ``cfg_zero_star``, ``none``) from the per-config
    ``arrays`` (:func:`guidance_arrays`); step index ``i = k // stages``. ``gated=False`` leaves out
    the t-interval and zero-init selects (valid when the config has neither)."""
    w_all, z, interval = (jnp.asarray(arrays[k]) for k in ("w", "zero_steps", "interval"))

    def velocity(x, t, k, state):
        i = k // stages
        if guidance == "none":
            v, state = estimate(x, t, k, state)
        else:
            vr, state = estimate(jnp.concatenate([x, x], axis=0), t, k, state)
            vc, vu = jnp.split(vr, 2, axis=0)
            w = jnp.where((t >= interval[0]) & (t <= interval[1]), w_all[i], jnp.float32(0.0)) if gated else w_all[i]
            if guidance == "cfg_zero_star":
                vu = vu * optimized_scale(vc, vu)
            v = (1.0 + w) * vc - w * vu
        return (jnp.where(i < z, jnp.zeros_like(v), v) if gated else v), state
    return velocity


# ----------------------------------------------------------------------------- entry points
def stages(solver: str) -> int:
    return len(SOLVER_STAGES[solver]) if solver in SOLVER_STAGES else 1


def sample_arrays(estimate: Estimate, x0: Array, structure: tuple, arrays: Mapping[str, Array],
                  state: Any = None) -> tuple[Array, Any]:
    """:func:`sample` with the config split into its static ``structure`` and its ``arrays``."""
    solver, _, guidance, gated = structure
    velocity = guided_velocity(estimate, arrays, guidance, stages(solver), gated)
    return solve(velocity, x0, arrays["ts"], solver, state)


def sample(estimate: Estimate, x0: Array, sampler: SamplerConfig | None = None, state: Any = None
           ) -> tuple[Array, Any]:
    """Integrate the flow from the noise ``x0 (B, F, C)`` with ``sampler``; jit-able (``sampler``
    static; ``None``: the official sampler). ``estimate(x_rows (rows(sampler) * B, F, C), t, k, state)
    -> (v_rows, state)``."""
    sampler = SamplerConfig() if sampler is None else sampler
    return sample_arrays(estimate, x0, sampler.structure, guidance_arrays(sampler), state)


def stack_arrays(samplers: Sequence[SamplerConfig]) -> tuple[tuple, dict[str, Array]]:
    """Check that ``samplers`` share one structure and stack their arrays on a leading axis."""
    if not samplers:
        raise ConfigError("sweep: no sampler configs given")
    structs = {s.structure for s in samplers}
    if len(structs) > 1:
        raise ConfigError("sweep: one compiled program needs the same (solver, steps, guidance, gated) in every "
                          "config (gated: a cfg_interval or zero_steps), "
                          f"got {sorted(structs)}; split the sweep by structure (scripts/flow_study.py does)")
    per = [guidance_arrays(s) for s in samplers]
    return samplers[0].structure, {k: jnp.stack([p[k] for p in per]) for k in per[0]}


def sweep(estimate: Estimate, x0: Array, samplers: Sequence[SamplerConfig]) -> Array:
    """Run many samplers of one structure in one program (``vmap`` over their grids and guidance
    arrays): ``(len(samplers), B, F, C)``, equal to calling :func:`sample` per config. Offline only
    (``estimate``'s state is ``None``)."""
    structure, arrays = stack_arrays(samplers)
    return _sweep_jit(estimate, structure)(x0, arrays)


def _sweep_jit(estimate, structure):
    def one(x0, arrays):
        return sample_arrays(estimate, x0, structure, arrays)[0]
    return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def reference_field(estimate: Estimate, sampler: SamplerConfig | str, arrays: Mapping[str, Array] | None = None
                    ) -> tuple[Callable, Array]:
    """``(field(x, t, k), grid)`` of the ODE ``sampler`` discretises, for :func:`reference_solve`:
    the same guidance with ``k`` = the grid step holding ``t``. ``sampler`` may be a guidance name
    with its ``arrays`` (:func:`guidance_arrays`; traced values share one compiled reference)."""
    if isinstance(sampler, SamplerConfig):
        guidance, arrays = sampler.guidance, guidance_arrays(sampler)
    else:
        guidance = sampler
    vel = guided_velocity(estimate, arrays, guidance, 1)
    return (lambda x, t, k: vel(x, t, k, None)[0]), arrays["ts"]


def step_indexed(sampler: SamplerConfig) -> bool:
    """Whether the sampler's ODE depends on its grid (per-step CFG weights or zero-init steps)."""
    return bool(sampler.cfg_schedule) or sampler.zero_steps > 0


# ----------------------------------------------------------------------------- CLI
def add_cli_arguments(parser) -> None:
    """``--flow-steps --flow-solver --flow-grid --cfg-rate --flow-guidance --flow-sampler`` (synth)."""
    g = parser.add_argument_group("flow sampler (default: the official 10 Euler steps, cosine grid, CFG 0.7)")
    g.add_argument("--flow-sampler", type=Path, metavar="YAML", help="SamplerConfig YAML (flags below override it)")
    g.add_argument("--flow-steps", type=int, metavar="N", help="solver steps (NFE = N x evaluations per step)")
    g.add_argument("--flow-solver", metavar="NAME", help=f"{', '.join(SOLVER_STAGES)} or diffrax:NAME")
    g.add_argument("--flow-grid", metavar="GRID", help="uniform, cosine, sway:S (e.g. sway:-0.5) or epss")
    g.add_argument("--flow-guidance", choices=GUIDANCE, help="cfg (official), cfg_zero_star or none (half the cost)")
    g.add_argument("--cfg-rate", type=float, metavar="W", help="CFG weight w in (1 + w) v_c - w v_u (official 0.7)")


FLAGS = {"steps": "--flow-steps", "solver": "--flow-solver", "grid": "--flow-grid", "guidance": "--flow-guidance",
         "cfg_rate": "--cfg-rate"}


def cli_given(args) -> bool:
    """Whether any :func:`add_cli_arguments` flag was given (else the config's sampler applies)."""
    return getattr(args, "flow_sampler", None) is not None or any(
        getattr(args, f.lstrip("-").replace("-", "_"), None) is not None for f in FLAGS.values())


def sampler_from_args(args, base=None) -> SamplerConfig:
    """The :class:`SamplerConfig` of parsed :func:`add_cli_arguments` flags over ``base`` (a
    ``SamplerConfig``, a ``FlowConfig`` (its ``inference_sampler``), a ``CFMConfig`` (its official
    sampler) or ``None`` (the official sampler)); ``--flow-sampler YAML`` replaces ``base``.
    Bad values raise one :class:`ConfigError` naming the flag and the field."""
    if getattr(args, "flow_sampler", None):
        try:
            base = SamplerConfig.from_yaml(args.flow_sampler)
        except ConfigError as e:
            raise ConfigError(f"--flow-sampler {args.flow_sampler}: {e}") from None
    elif isinstance(base, SamplerConfig):
        pass
    elif hasattr(base, "inference_sampler"):
        base = base.inference_sampler
    elif base is not None:
        base = SamplerConfig.from_cfm(base)
    else:
        base = SamplerConfig()
    over = {k: getattr(args, flag.lstrip("-").replace("-", "_"), None) for k, flag in FLAGS.items()}
    over = {k: v for k, v in over.items() if v is not None}
    if "steps" in over and base.cfg_schedule:
        raise ConfigError(f"--flow-steps {over['steps']}: the sampler has a per-step cfg_schedule of "
                          f"{len(base.cfg_schedule)} steps; edit the YAML instead")
    try:
        return dataclasses.replace(base, **over) if over else base
    except ConfigError as e:  # name the flag of the field the message starts with
        field = str(e).split(":", 1)[0].removeprefix("sampler.")
        flag = f"{FLAGS[field]} {over[field]}: " if field in over else ""
        raise ConfigError(f"{flag}{e}") from None
