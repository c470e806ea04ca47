"""Few-step flow distillation (flow/distill.py, train/distill.py): each loss against a hand-derived
value on a toy field, the MeanFlow identity by finite differences, the zero-initialised student ==
teacher, export/checkpoint round trips, streaming == recompute for a student, and a toy student
that beats the teacher's own 1-pass error."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.config import FlowStudentConfig, ModelConfig
from cosyvoice2_jax.errors import ConfigError
from cosyvoice2_jax.flow import config_from_release, from_release, modeling, to_release
from cosyvoice2_jax.flow import distill as D
from cosyvoice2_jax.params_util import flatten
from test_flow_streaming import REF_BUCKET, assert_chunks_equal, make_inputs, recompute, redraw, run_stream

CFG = ModelConfig.tiny().flow
STUDENT = dataclasses.replace(CFG, student=FlowStudentConfig(True, ("w", "d")))


def _toy(seed=0, B=3, F=7, C=4):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(B, F, C)), jnp.float32)
    mask = jnp.asarray(np.arange(F)[None] < np.array([7, 5, 2])[:, None])
    return r, x, mask


def _hand_mse(pred, target, mask):
    m = np.asarray(mask, np.float64)[..., None]
    d = (np.asarray(pred, np.float64) - np.asarray(target, np.float64)) * m
    return float((d * d).sum() / (m.sum() * pred.shape[-1]))


# ----------------------------------------------------------------------------- losses on toy fields
def test_guidance_loss_hand_derived():
    r, x, mask = _toy(0)
    a, b, c, e = 1.3, -0.4, 0.9, 0.25
    t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    w = jnp.asarray([0.0, 0.7, 2.0], jnp.float32)
    teacher = lambda y, t_, w_: D.cfg_combine(a * y, b * y, w_)  # noqa: E731
    student = lambda y, t_, w_: c * y + e * w_[:, None, None]  # noqa: E731
    got = float(D.guidance_loss(student, teacher, x, t, w, mask))
    xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)[:, None, None]
    want = _hand_mse(c * xn + e * wn, ((1 + wn) * a - wn * b) * xn, mask)
    assert abs(got - want) <= 1e-6 * max(1.0, want), (got, want)


def _affine_u(a, b):
    """Exact average velocity of dx/dt = a x + b over [t, r] from x: (x + b/a)(e^{a d} - 1)/d."""
    def u(x, t, r):
        d = (r - t)[:, None, None]
        return (x + b / a) * jnp.expm1(a * d) / d
    return u


def test_meanflow_identity_and_jvp_against_finite_differences():
    _, x, _ = _toy(1)
    a, b = 0.8, 0.3
    t = jnp.asarray([0.0, 0.2, 0.5], jnp.float32)
    r = jnp.asarray([1.0, 0.7, 0.9], jnp.float32)
    u_fn = _affine_u(a, b)
    v = a * x + b
    u, target = D.meanflow_target(u_fn, v, x, t, r)
    # the identity u = v - (t - r) du/dt holds for the exact average velocity
    np.testing.assert_allclose(np.asarray(target), np.asarray(u), rtol=2e-5, atol=2e-5)
    # du/dt along the trajectory by central differences: x(t +- h) = (x + b/a) e^{+-a h} - b/a
    h = 1e-2
    xs = lambda s: (x + b / a) * jnp.exp(a * s) - b / a  # noqa: E731
    fd = (u_fn(xs(h), t + h, r) - u_fn(xs(-h), t - h, r)) / (2 * h)
    _, dudt = jax.jvp(u_fn, (x, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
    np.testing.assert_allclose(np.asarray(dudt), np.asarray(fd), rtol=1e-3, atol=1e-4)
    # one MeanFlow step lands on the exact solution
    x_r = x + (r - t)[:, None, None] * u
    np.testing.assert_allclose(np.asarray(x_r), np.asarray(xs((r - t)[:, None, None])), rtol=1e-5, atol=1e-5)


def test_meanflow_loss_hand_derived():
    _, x, mask = _toy(2)
    a, c = 1.1, 0.6
    t = jnp.asarray([0.0, 0.3, 0.5], jnp.float32)
    r = jnp.asarray([1.0, 0.3, 0.75], jnp.float32)
    u_fn = lambda y, t_, r_: c * y  # noqa: E731  (du/dt = c v)
    v = a * x
    got = float(D.meanflow_loss(u_fn, v, x, t, r, mask))
    xn, tr = np.asarray(x, np.float64), (np.asarray(t, np.float64) - np.asarray(r, np.float64))[:, None, None]
    want = _hand_mse(c * xn, a * xn - tr * c * a * xn, mask)
    assert abs(got - want) <= 1e-6 * max(1.0, want), (got, want)
    # gradients flow through u only (the target is stopped): d/dc at c = a with r = t is 0
    g = jax.grad(lambda c_: D.meanflow_loss(lambda y, t_, r_: c_ * y, v, x, t, t, mask))(a)
    assert abs(float(g)) < 1e-5


def test_reflow_loss_and_euler_hand_derived():
    r, x1, mask = _toy(3)
    z = jnp.asarray(r.normal(size=x1.shape), jnp.float32)
    t = jnp.asarray([0.0, 0.4, 1.0], jnp.float32)
    c, s = 0.7, 1e-6
    got = float(D.reflow_loss(lambda y, t_: c * y, z, x1, t, mask, s))
    zn, xn, tn = (np.asarray(v, np.float64) for v in (z, x1, t))
    tn = tn[:, None, None]
    want = _hand_mse(c * ((1 - (1 - s) * tn) * zn + tn * xn), xn - (1 - s) * zn, mask)
    assert abs(got - want) <= 1e-6 * max(1.0, want), (got, want)
    ts = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(np.asarray(D.euler_solve(lambda x, t_: 0.5 * x, z, ts)),
                               np.asarray(z) * 1.125 ** 4, rtol=1e-6)


def test_draw_times_and_options():
    o = D.DistillOptions(grid_ratio=0.5, flow_ratio=0.25)
    t, r = D.draw_times(jax.random.key(0), 4000, o)
    t, r = np.asarray(t), np.asarray(r)
    assert np.all((0 <= t) & (t <= r) & (r <= 1))
    on_grid = ((t == 0) & (r == 1)) | ((t == 0) & (r == 0.5)) | ((t == 0.5) & (r == 1))
    assert 0.45 < on_grid.mean() < 0.55 and 0.1 < (t == r).mean() < 0.15
    for bad in (dict(method="consistency"), dict(w_range=(1.0, 0.5)), dict(student_steps=0), dict(grid_ratio=2.0)):
        with pytest.raises(ConfigError, match="distill"):
            D.DistillOptions(**bad)


# ----------------------------------------------------------------------------- the student network
@pytest.fixture(scope="module")
def teacher_params():
    return redraw(modeling.abstract_params(CFG), 0)


@pytest.fixture(scope="module")
def student_params(teacher_params):
    s = D.student_from_teacher(teacher_params, modeling.init_params(STUDENT, jax.random.key(1)))
    extra = {k for k in flatten(s) if "time_mlp_w" in k or "time_mlp_d" in k}
    assert extra == {f"decoder/estimator/time_mlp_{n}/linear_{i}/{p}" for n in "wd" for i in (1, 2)
                     for p in ("kernel", "bias")}
    return s


@pytest.mark.slow  # tiny-flow compiles: ~2-4 min on the shared CI CPU
def test_student_starts_equal_to_teacher(teacher_params, student_params):
    """Zero-initialised extra inputs: the student's velocity is the teacher's, bit for bit, for any
    w and d; its single-pass inference equals the teacher's with cfg_rate 0 (v_c alone)."""
    r = np.random.default_rng(0)
    B, F = 2, 16
    x, mu, cond = (jnp.asarray(r.normal(size=(B, F, 80)), jnp.float32) for _ in range(3))
    spk = jnp.asarray(r.normal(size=(B, 80)), jnp.float32)
    valid = jnp.ones((B, F), bool)
    t = jnp.asarray([0.2, 0.7])
    tm, sm = modeling.CausalMaskedDiffWithXvec(CFG), modeling.CausalMaskedDiffWithXvec(STUDENT)
    vt = tm.apply({"params": teacher_params}, x, valid, mu, t, spk, cond, method=tm.estimate)
    vs = sm.apply({"params": student_params}, x, valid, mu, t, spk, cond, 0,
                  {"w": jnp.asarray([0.7, 3.0]), "d": jnp.asarray([0.5, 0.1])}, method=sm.estimate)
    np.testing.assert_array_equal(np.asarray(vs), np.asarray(vt))
    inp = make_inputs(3, 20, 30)
    args = (inp["token"][None], inp["prompt_token"][None], inp["prompt_feat"][None], inp["embedding"][None])
    want = modeling.inference(teacher_params, CFG, *args, cfg_rate=0.0)
    got = modeling.inference(student_params, STUDENT, *args, cfg_rate=0.7)
    # one row instead of two changes XLA's summation order only (measured 1.2e-6 abs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="student.inputs"):
        modeling.init_params(dataclasses.replace(CFG, student=FlowStudentConfig(True, ("x",))), jax.random.key(0))


@pytest.mark.slow  # tiny-flow compiles: ~2-4 min on the shared CI CPU
def test_student_export_round_trip(student_params, teacher_params):
    scfg = dataclasses.replace(STUDENT, cfm=dataclasses.replace(STUDENT.cfm, n_timesteps=2, t_scheduler="linear"))
    sd = to_release(student_params, scfg)
    assert int(sd["student.n_timesteps"]) == 2 and int(sd["student.cosine_grid"]) == 0
    assert "decoder.estimator.time_mlp_d.linear_2.weight" in sd
    cfg2 = config_from_release(sd, CFG)
    assert cfg2.student == scfg.student and cfg2.cfm.n_timesteps == 2 and cfg2.cfm.t_scheduler.value == "linear"
    back = from_release(sd, cfg2)
    fa, fb = flatten(student_params), flatten(back)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    with pytest.raises(ConfigError, match="distilled flow student"):
        from_release(sd, CFG)
    assert config_from_release(to_release(teacher_params, CFG), CFG) is CFG


@pytest.mark.slow  # tiny-flow compiles: ~2-4 min on the shared CI CPU
def test_student_streaming_equals_recompute(student_params):
    """A 2-step MeanFlow-style student (uniform grid, step-size input, one pass) streams from its
    caches exactly as the recompute path."""
    from cosyvoice2_jax.flow.streaming import FlowStreamer

    p = redraw(student_params, 7)  # non-zero extra MLPs: the inputs matter
    scfg = dataclasses.replace(STUDENT, cfm=dataclasses.replace(STUDENT.cfm, n_timesteps=2, t_scheduler="linear"))
    inp = make_inputs(11, 20, 70)
    pushes = [(33, False), (25, False), (12, True)]
    fs = FlowStreamer(p, scfg, max_frames=400, key_block=REF_BUCKET)
    got = run_stream(fs, inp, pushes)
    want = recompute(p, inp, pushes, cfg=scfg)
    assert_chunks_equal(got, want, "student 2-step")


# ----------------------------------------------------------------------------- objective + checkpoint
def _batch(seed, B=2, S=20):
    r = np.random.default_rng(seed)
    tl = np.array([S, S - 6])[:B]
    return {"speech_token": r.integers(0, CFG.vocab_size, (B, S)).astype(np.int32), "speech_token_len": tl,
            "speech_feat": r.normal(size=(B, 2 * S, 80)).astype(np.float32), "speech_feat_len": 2 * tl,
            "embedding": r.normal(size=(B, 192)).astype(np.float32), "valid": np.ones(B, bool)}


@pytest.mark.slow  # tiny-flow compiles: ~2-4 min on the shared CI CPU
@pytest.mark.parametrize("method", ["guidance", "meanflow", "reflow"])
def test_objective_losses_finite_and_student_trainable(teacher_params, method):
    from cosyvoice2_jax.train.distill import DistillObjective

    obj = DistillObjective(CFG, D.DistillOptions(method=method, teacher_steps=2), init_from=teacher_params)
    params = obj.init_params(jax.random.key(0))
    loss, grads = jax.jit(jax.value_and_grad(lambda p: obj.loss_fn(p, _batch(0), jax.random.key(1))[0]))(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    gs = flatten(grads["student"])
    assert max(float(jnp.abs(g).max()) for g in gs.values()) > 0
    if method != "reflow":  # the extra input's zero-initialised output layer gets a gradient
        name = "w" if method == "guidance" else "d"
        assert float(jnp.abs(gs[f"decoder/estimator/time_mlp_{name}/linear_2/kernel"]).max()) > 0


@pytest.mark.slow  # tiny-flow compiles: ~2-4 min on the shared CI CPU
def test_checkpoint_round_trip(tmp_path, teacher_params):
    from cosyvoice2_jax import sharding as M
    from cosyvoice2_jax.train import trainer as TR
    from cosyvoice2_jax.train.checkpoint import Checkpointer
    from cosyvoice2_jax.train.distill import DistillObjective, restore_student
    from cosyvoice2_jax.train.optim import OptimConfig, make_optimizer

    obj = DistillObjective(CFG, D.DistillOptions(method="meanflow"), init_from=teacher_params)
    mesh = M.make_mesh(M.MeshConfig())
    tx = TR.with_trainable_mask(obj, make_optimizer(OptimConfig()))
    state, _ = TR.init_state(obj, tx, mesh, 0)
    state = dict(state, params=dict(state["params"], student=redraw(state["params"]["student"], 5)))
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ck:
        ck.save(3, state)
    back = restore_student(tmp_path, obj, OptimConfig())
    fa, fb = flatten(state["params"]["student"]), flatten(back)
    assert fa.keys() == fb.keys() and any("time_mlp_d" in k for k in fa)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.slow  # tiny release (oracle) + streaming compiles
def test_student_release_loads_and_streams(tiny_release, tmp_path):
    """A release whose flow.pt is a student: the loader reads its sampler (2 uniform steps, one
    pass), and the loaded student streams from caches exactly as the recompute path."""
    from cosyvoice2_jax.flow import MelGenerator
    from cosyvoice2_jax.pipeline.loading import release_config
    from cosyvoice2_jax.pipeline.release import check_release_dir, config_from_release_yaml
    from cosyvoice2_jax.train.distill import export_student

    src = tiny_release[0]
    cfg = config_from_release_yaml(check_release_dir(src).yaml)
    teacher = from_release(src / "flow.pt", cfg.flow)
    obj_cfg = D.student_config(cfg.flow, D.DistillOptions(method="meanflow", student_steps=2))
    student = D.student_from_teacher(teacher, redraw(modeling.abstract_params(obj_cfg), 4))
    out = export_student(student, obj_cfg, src, tmp_path / "student")
    with pytest.raises(ConfigError, match="exists"):
        export_student(student, obj_cfg, src, tmp_path / "student")
    loaded_cfg = release_config(check_release_dir(out)).flow
    assert loaded_cfg.student == obj_cfg.student and loaded_cfg.cfm.n_timesteps == 2
    params = from_release(out / "flow.pt", loaded_cfg)
    gen = MelGenerator(loaded_cfg, params, max_stream_frames=400, initial_stream_frames=400)
    inp = make_inputs(5, 20, 60)
    pushes = [(33, False), (27, True)]
    got = run_stream(gen.streamer(), inp, pushes)
    assert_chunks_equal(got, recompute(params, inp, pushes, cfg=loaded_cfg), "student release")


# ----------------------------------------------------------------------------- a toy student beats the teacher
_W = np.random.default_rng(0).normal(size=(2, 2)).astype(np.float32) * 1.5


def _toy_fields(x, t, c):
    """Toy CFG pair in 2-D with a per-row condition ``c``: ``v_u = (1 + t) tanh(x W)``, ``v_c = v_u + c``."""
    vu = jnp.tanh(x @ _W) * (1.0 + t)[:, None, None]
    return vu + c, vu


def _toy_mlp(p, x, c, t, d):
    B, F, _ = x.shape
    col = lambda a: jnp.broadcast_to(a[:, None, None], (B, F, 1))  # noqa: E731
    h = jax.nn.silu(jnp.concatenate([x, c, col(t), col(d)], -1) @ p["w1"] + p["b1"])
    h = jax.nn.silu(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


def test_toy_meanflow_student_beats_teacher_one_pass():
    """A small MLP student (inputs x, condition, t, step size d) trained 200 steps with
    :func:`meanflow_loss` on the toy teacher's CFG velocity (w = 0.7) gets closer to the teacher's
    official-sampler output (10 cosine Euler steps with CFG) in 1 pass than the teacher's own 1-pass
    (one Euler step of v_c) and 2-pass (one CFG step) samplers. Measured (seed 0): student 1 pass
    0.116, teacher 1 pass 0.77, teacher 2 passes 0.40 (mean abs error)."""
    import optax

    B, h = 128, 64
    opts = D.DistillOptions(method="meanflow", grid_ratio=0.5)
    ts10 = 1.0 - jnp.cos(jnp.linspace(0.0, 1.0, 11) * jnp.pi / 2)

    def v_cfg(x, t, c):
        return D.cfg_combine(*_toy_fields(x, t, c), 0.7)

    def teacher(z, c):
        return D.euler_solve(lambda x, t: v_cfg(x, t, c), z, ts10)

    def draw(key, n):
        kz, kc = jax.random.split(key)
        return jax.random.normal(kz, (n, 1, 2)), jax.random.normal(kc, (n, 1, 2))

    k = jax.random.split(jax.random.key(1), 2)
    p = {"w1": jax.random.normal(k[0], (6, h)) / np.sqrt(6), "b1": jnp.zeros(h),
         "w2": jax.random.normal(k[1], (h, h)) / np.sqrt(h), "b2": jnp.zeros(h),
         "w3": jnp.zeros((h, 2)), "b3": jnp.zeros(2)}
    tx = optax.adam(3e-3)
    mask = jnp.ones((B, 1), bool)

    def loss(p, key):
        kz, kt = jax.random.split(key)
        z, c = draw(kz, B)
        t, r = D.draw_times(kt, B, opts)
        y = D.interpolate(z, teacher(z, c), t)
        return D.meanflow_loss(lambda y_, t_, r_: _toy_mlp(p, y_, c, t_, r_ - t_), v_cfg(y, t, c), y, t, r, mask)

    def train(p):
        def body(i, carry):
            p, o = carry
            g = jax.grad(loss)(p, jax.random.fold_in(jax.random.key(100), i))
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o
        return jax.lax.fori_loop(0, 200, body, (p, tx.init(p)))[0]

    p = jax.jit(train)(p)
    z, c = draw(jax.random.key(999), 2000)
    ref, zero, one = teacher(z, c), jnp.zeros(2000), jnp.ones(2000)
    err = lambda x: float(jnp.mean(jnp.abs(x - ref)))  # noqa: E731
    teacher_1 = err(z + _toy_fields(z, zero, c)[0])
    teacher_2 = err(z + v_cfg(z, zero, c))
    student_1 = err(z + _toy_mlp(p, z, c, zero, one))
    print(f"[toy distill] teacher 1 pass {teacher_1:.3f}, 2 passes {teacher_2:.3f}, student 1 pass {student_1:.3f}")
    assert teacher_1 > 0.7 and teacher_2 > 0.35
    assert student_1 < 0.2 < teacher_2 / 1.5
