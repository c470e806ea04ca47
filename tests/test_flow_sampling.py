"""Flow samplers (cosyvoice2_jax/flow/sampling.py) on toy fields with hand-derived answers.

Grids against their formulas and the F5-TTS EPSS tables, solver convergence orders on a linear
ODE with a closed-form solution, the diffrax adapter against our solvers, every guidance variant
against a hand-computed Euler sum, the vmapped sweep against the loop, the default sampler against
today's ``cfm.solve(cfm.cfg_velocity(...))`` bit for bit, and the config errors.
"""
from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.errors import ConfigError
from cosyvoice2_jax.flow import cfm
from cosyvoice2_jax.flow import sampling as S

F, C = 6, 8


def _toy_estimate(seed=0):
    """A nonlinear, t-dependent field; conditioned rows get an offset the unconditioned ones lack."""
    W = jax.random.normal(jax.random.PRNGKey(seed), (C, C)) * 0.5

    def est2(x2, t):
        half = x2.shape[0] // 2
        off = jnp.concatenate([jnp.ones_like(x2[:half]), jnp.zeros_like(x2[half:])])
        return jnp.tanh(x2 @ W) * (1.0 + t) + off

    return est2, (lambda x, t, k, st: (est2(x, t), st))


X0 = jax.random.normal(jax.random.PRNGKey(1), (2, F, C))


# ----------------------------------------------------------------------------- grids
def test_grids_hand_values():
    u = np.linspace(0, 1, 11)
    np.testing.assert_allclose(S.time_grid("uniform", 10), u, atol=6e-8)
    np.testing.assert_allclose(S.time_grid("cosine", 10), 1 - np.cos(np.pi * u / 2), atol=1e-7)
    np.testing.assert_array_equal(S.time_grid("cosine", 10), cfm.t_span(10, "cosine"))  # the official grid
    np.testing.assert_allclose(S.time_grid("sway:-1", 10), S.time_grid("cosine", 10), atol=1e-7)
    s = -0.4
    np.testing.assert_allclose(S.time_grid(f"sway:{s}", 10), u + s * (np.cos(np.pi * u / 2) - 1 + u), atol=1e-7)
    # sway:-0.5 at u = 1/2: 1/2 - 1/2 (cos(pi/4) - 1/2) = 0.39644661
    assert abs(float(S.time_grid("sway:-0.5", 2)[1]) - (0.5 - 0.5 * (math.sqrt(0.5) - 0.5))) < 1e-7
    # F5-TTS EPSS tables (lattice 1/32)
    np.testing.assert_array_equal(S.time_grid("epss", 7),
                                  np.float32([0, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 1 / 2, 3 / 4, 1]))
    np.testing.assert_array_equal(S.time_grid("epss", 5), np.float32([0, 1, 2, 4, 8, 16]) / 16)
    np.testing.assert_array_equal(S.time_grid("epss", 16)[:11], np.float32([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12]) / 32)
    for n, tab in S.EPSS_TABLES.items():
        assert len(tab) == n + 1 and tab[0] == 0 and tab[-1] == 32 and all(np.diff(tab) > 0)
    np.testing.assert_array_equal(S.time_grid("explicit", 3, (0.0, 0.2, 0.7, 1.0)), np.float32([0, 0.2, 0.7, 1]))
    # re-timing: uniform re-timed to the cosine scheduler is the cosine grid; EPSS + sway as F5-TTS
    np.testing.assert_array_equal(S.time_grid("uniform", 10, retime_to="cosine"), S.time_grid("cosine", 10))
    e = np.float64(S.EPSS_TABLES[7]) / 32
    np.testing.assert_allclose(S.time_grid("epss", 7, retime_to="sway:-1"), 1 - np.cos(np.pi * e / 2), atol=1e-7)


# ----------------------------------------------------------------------------- solvers
def _linear_ode_error(solver, n):
    """dx/dt = (-3 + 4t) x, x(0) = 1  ->  x(1) = exp(-1); float64, uniform grid."""
    with jax.enable_x64(True):
        ts = jnp.linspace(0.0, 1.0, n + 1, dtype=jnp.float64)
        x0 = jnp.ones((1, 1, 1), jnp.float64)
        x1, _ = S.solve(lambda x, t, k, st: ((-3.0 + 4.0 * t) * x, st), x0, ts, solver)
        return abs(float(x1[0, 0, 0]) - math.exp(-1.0))


@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_convergence_order(solver, order):
    e1, e2 = _linear_ode_error(solver, 16), _linear_ode_error(solver, 32)
    assert abs(math.log2(e1 / e2) - order) < 0.15, (e1, e2, math.log2(e1 / e2))


def test_evaluation_indices_and_state():
    """k runs 0..n_evals-1 in order and the state is threaded through every evaluation."""
    for solver in S.SOLVER_STAGES:
        n = S.n_evals(solver, 3)

        def vel(x, t, k, st):
            ks, m = st
            return jnp.zeros_like(x), (ks.at[m].set(k), m + 1)

        _, (ks, m) = jax.jit(lambda x: S.solve(vel, x, S.uniform_grid(3), solver,
                                                (jnp.full((n,), -1, jnp.int32), jnp.int32(0))))(X0)
        assert int(m) == n and ks.tolist() == list(range(n)), solver


@pytest.mark.parametrize("ours,name", [("heun", "Heun"), pytest.param("euler", "Euler", marks=pytest.mark.slow),
                                       pytest.param("midpoint", "Midpoint", marks=pytest.mark.slow)])
def test_diffrax_fixed_grid_equals_ours(ours, name):
    """diffrax:NAME through the config equals our solver of the same method (<= 1e-6)."""
    _, est = _toy_estimate()
    a = jax.jit(lambda x: S.sample(est, x, S.SamplerConfig(steps=8, solver=ours))[0])(X0)
    b = jax.jit(lambda x: S.sample(est, x, S.SamplerConfig(steps=8, solver=f"diffrax:{name}"))[0])(X0)
    assert float(jnp.abs(a - b).max()) <= 1e-6, float(jnp.abs(a - b).max())


@pytest.mark.parametrize("name", [n if n in ("Heun", "Tsit5") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in S.DIFFRAX_EVALS])
def test_diffrax_eval_table(name):
    """DIFFRAX_EVALS = the number of vector-field calls diffrax makes on a 4-step grid."""
    import diffrax

    per, extra = S.DIFFRAX_EVALS[name]
    count = [0]

    def vf(t, y, a):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return -y

    sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), getattr(diffrax, name)(), 0.0, 1.0, None, jnp.ones(2),
                              stepsize_controller=diffrax.StepTo(jnp.linspace(0, 1, 5)),
                              saveat=diffrax.SaveAt(t1=True), max_steps=4)
    sol.ys.block_until_ready()
    jax.effects_barrier()
    assert count[0] == S.n_evals(f"diffrax:{name}", 4) == per * 4 + extra, name


def test_reference_solve_tight():
    x1, stats = jax.jit(lambda x: S.reference_solve(lambda y, t, k: (-3.0 + 4.0 * t) * y, x, rtol=1e-7, atol=1e-7))(
        jnp.ones((1, 1, 1)))
    assert abs(float(x1[0, 0, 0]) - math.exp(-1.0)) < 2e-6
    assert int(stats["num_steps"]) > 1 and int(stats["n_evals"]) == 6 * int(stats["num_steps"]) + 1
    with pytest.raises(ConfigError, match="adaptive"):
        S.reference_solve(lambda y, t, k: y, jnp.ones(1), solver="Euler")


# ----------------------------------------------------------------------------- guidance
VC = np.random.default_rng(0).standard_normal((2, F, C)).astype(np.float32)
VU = np.random.default_rng(1).standard_normal((2, F, C)).astype(np.float32)


def _const_estimate(calls):
    """Conditioned rows -> VC, unconditioned rows -> VU (independent of x and t); records row counts."""
    def est(x_rows, t, k, st):
        calls.append(x_rows.shape[0])
        if x_rows.shape[0] == 2 * VC.shape[0]:
            return jnp.concatenate([jnp.asarray(VC), jnp.asarray(VU)]), st
        return jnp.asarray(VC), st
    return est


def _euler_sum(ts, per_step_v):
    """x1 - x0 of Euler on a grid with a velocity that depends only on the step."""
    dts = np.diff(np.float64(ts))
    return sum(dt * v for dt, v in zip(dts, per_step_v))


@pytest.mark.parametrize("kind", ["cfg", "schedule", "interval", "zero_star", "zero_init", "none"])
def test_guidance_variants(kind):
    n = 6
    w_sched = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    cfgs = {"cfg": S.SamplerConfig(steps=n, cfg_rate=0.7),
            "schedule": S.SamplerConfig(steps=n, cfg_schedule=w_sched),
            "interval": S.SamplerConfig(steps=n, grid="uniform", cfg_rate=0.7, cfg_interval=(0.3, 0.6)),
            "zero_star": S.SamplerConfig(steps=n, guidance="cfg_zero_star", cfg_rate=0.7),
            "zero_init": S.SamplerConfig(steps=n, guidance="cfg_zero_star", cfg_rate=0.7, zero_steps=2),
            "none": S.SamplerConfig(steps=n, guidance="none")}
    cfg = cfgs[kind]
    calls = []
    x1, _ = jax.jit(lambda x: S.sample(_const_estimate(calls), x, cfg))(X0)
    ts = np.float64(cfg.time_grid())
    vc, vu = np.float64(VC), np.float64(VU)
    s_star = (vc * vu).sum(axis=(1, 2), keepdims=True) / ((vu * vu).sum(axis=(1, 2), keepdims=True) + 1e-8)
    per = []
    for i in range(n):
        w = {"schedule": w_sched[i], "none": 0.0}.get(kind, 0.7)
        if kind == "interval":
            w = 0.7 if 0.3 <= ts[i] <= 0.6 else 0.0  # Euler evaluates at the step start
        u = s_star * vu if kind in ("zero_star", "zero_init") else vu
        v = (1 + w) * vc - w * u
        per.append(0 * v if kind == "zero_init" and i < 2 else v)
    np.testing.assert_allclose(np.asarray(x1) - np.asarray(X0), _euler_sum(ts, per), atol=2e-6)
    assert set(calls) == {X0.shape[0] * S.rows(cfg)}  # no CFG: one B-row estimator pass per step
    assert S.estimator_passes(cfg) == n * S.rows(cfg)


def test_optimized_scale_hand_value():
    vc = jnp.asarray([[[1.0, 2.0]], [[0.0, 1.0]]])
    vu = jnp.asarray([[[2.0, 0.0]], [[0.0, 3.0]]])
    np.testing.assert_allclose(np.asarray(S.optimized_scale(vc, vu)).ravel(), [2 / 4, 3 / 9], rtol=1e-6)


# ----------------------------------------------------------------------------- entry points
def _cfm_solve(est2, est, x, rate, solver):
    """Today's ``cfm.solve(cfm.cfg_velocity(...))`` (either loop protocol: with or without k/state)."""
    ts = cfm.t_span(10, "cosine")
    if "state" in inspect.signature(cfm.solve).parameters:
        return cfm.solve(cfm.cfg_velocity(est, rate), x, ts, solver)[0]
    return cfm.solve(cfm.cfg_velocity(est2, rate), x, ts, solver)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
def test_default_equals_cfm_solve_bit_for_bit(solver):
    from cosyvoice2_jax.config import CFMConfig

    est2, est = _toy_estimate()
    a = jax.jit(lambda x, r: _cfm_solve(est2, est, x, r, solver))(X0, jnp.float32(0.7))
    b = jax.jit(lambda x: S.sample(est, x, S.SamplerConfig(solver=solver))[0])(X0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert S.SamplerConfig() == S.SamplerConfig.from_cfm(CFMConfig())


def test_sweep_equals_loop():
    _, est = _toy_estimate()
    cfgs = [S.SamplerConfig(steps=5, solver="heun", grid="cosine"),
            S.SamplerConfig(steps=5, solver="heun", grid="epss", cfg_rate=1.2),
            S.SamplerConfig(steps=5, solver="heun", grid="explicit", times=(0, 0.1, 0.3, 0.6, 0.8, 1.0),
                            cfg_schedule=(0, 0.2, 0.4, 0.6, 0.8))]
    out = S.sweep(est, X0, cfgs)
    assert out.shape == (3,) + X0.shape
    for i, c in enumerate(cfgs):
        one = jax.jit(lambda x: S.sample(est, x, c)[0])(X0)
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(one), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="same"):
        S.sweep(est, X0, [cfgs[0], S.SamplerConfig(steps=5, solver="rk4")])


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,field", [
    (dict(solver="adams"), "sampler.solver"), (dict(solver="diffrax:Nope"), "sampler.solver"),
    (dict(steps=0), "sampler.steps"), (dict(cfg_rate=-0.1), "sampler.cfg_rate"),
    (dict(grid="explicit", steps=3, times=(0.0, 0.5, 0.4, 1.0)), "sampler.times"),
    (dict(grid="explicit", steps=2, times=(0.1, 0.5, 1.0)), "sampler.times"),
    (dict(grid="explicit", steps=3, times=(0.0, 1.0)), "sampler.times"),
    (dict(grid="epss", steps=8), "sampler.grid"), (dict(grid="sway:3"), "sampler.grid"),
    (dict(grid="zigzag"), "sampler.grid"), (dict(grid="sway:abc"), "sampler.grid"),
    (dict(guidance="pag"), "sampler.guidance"),
    (dict(cfg_schedule=(0.7,) * 3), "sampler.cfg_schedule"), (dict(cfg_interval=(0.6, 0.2)), "sampler.cfg_interval"),
    (dict(zero_steps=11), "sampler.zero_steps"), (dict(retime="cubic"), "sampler.retime"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        S.SamplerConfig(**kwargs)


def test_yaml(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("steps: 7\ngrid: epss\nsolver: heun\ncfg_interval: [0.0, 0.8]\n")
    cfg = S.SamplerConfig.from_yaml(p)
    assert cfg == S.SamplerConfig(steps=7, grid="epss", solver="heun", cfg_interval=(0.0, 0.8))
    assert S.n_evals(cfg) == 14 and S.rows(cfg) == 2
    with pytest.raises(ConfigError, match="stepz"):
        S.SamplerConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="sampler.steps"):
        S.SamplerConfig.from_dict({"steps": 0})


def test_cli_flags():
    import argparse

    from cosyvoice2_jax.config import CFMConfig

    p = argparse.ArgumentParser()
    S.add_cli_arguments(p)
    assert S.sampler_from_args(p.parse_args([]), CFMConfig()) == S.SamplerConfig()
    got = S.sampler_from_args(p.parse_args(["--flow-steps", "7", "--flow-grid", "epss", "--flow-solver", "heun",
                                            "--cfg-rate", "0.5"]), CFMConfig())
    assert got == S.SamplerConfig(steps=7, grid="epss", solver="heun", cfg_rate=0.5)
    assert S.rows(S.sampler_from_args(p.parse_args(["--flow-guidance", "none"]))) == 1
    with pytest.raises(ConfigError, match="sampler.cfg_rate"):
        S.sampler_from_args(p.parse_args(["--cfg-rate", "-1"]))
    with pytest.raises(ConfigError, match="sampler.solver"):
        S.sampler_from_args(p.parse_args(["--flow-solver", "rk5"]))


def test_model_config_sampler_section(tmp_path):
    """The model config holds the sampler (flow.sampler; null = the official sampler of flow.cfm);
    configs written before it existed load; bad values name the dotted key."""
    from pathlib import Path

    from cosyvoice2_jax.config import ModelConfig, apply_overrides

    tiny = ModelConfig.tiny()
    assert tiny.flow.sampler is None and tiny.flow.inference_sampler == S.SamplerConfig()
    text = (Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text()
    assert "  sampler: null\n" in text
    old = tmp_path / "old.yaml"
    old.write_text(text.replace("  sampler: null\n", ""))  # a config from before the sampler section
    assert ModelConfig.from_yaml(old) == tiny
    new = tmp_path / "new.yaml"
    new.write_text(text.replace("  sampler: null\n", "  sampler: {steps: 4, solver: rk4, guidance: none}\n"))
    assert ModelConfig.from_yaml(new).flow.inference_sampler == S.SamplerConfig(steps=4, solver="rk4", guidance="none")
    assert apply_overrides(tiny, ["flow.sampler.grid=epss", "flow.sampler.steps=7"]).flow.sampler == \
        S.SamplerConfig(steps=7, grid="epss")
    for bad, field in ((["flow.sampler.steps=0"], "flow.sampler.steps"), (["flow.sampler.solver=rk5"], "flow.sampler.solver"),
                       (["flow.sampler.cfg_rate=-1"], "flow.sampler.cfg_rate"),
                       (["flow.sampler.grid=explicit", "flow.sampler.steps=2", "flow.sampler.times=[0, 0.6, 0.4]"],
                        "flow.sampler.times"),
                       (["flow.sampler.steps=4", "flow.cfm.n_timesteps=5"], "flow.cfm.n_timesteps")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            apply_overrides(tiny, bad)
