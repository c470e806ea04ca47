"""Trainer mechanics: sharded step == single-device step, cross-mesh restore, exact resume
after SIGKILL, schedules. Uses the 8 simulated CPU devices from conftest."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.train import data as D
from cosyvoice2_jax import sharding as M
from cosyvoice2_jax.train import trainer as TR
from cosyvoice2_jax.train.checkpoint import Checkpointer
from cosyvoice2_jax.train.optim import OptimConfig, make_optimizer, schedule
from test_train_data import cfg_for, make_shards
from train_toy import ToyObjective

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("toyshards"), n_rows=24, n_shards=2, seed=11)


def _tok(t):
    return list(t.encode())[:60]


def _one_step(mesh, batch, seed=0):
    obj = ToyObjective()
    tx = make_optimizer(OptimConfig(lr=1e-2))
    state, sh = TR.init_state(obj, tx, mesh, seed)
    step = TR.make_train_step(obj, tx, sh, mesh, seed)
    state, metrics = step(state, batch)
    return jax.device_get(state), jax.device_get(metrics), state


def test_mesh_step_equals_single_device(toy_shards):
    assert len(jax.devices()) == 8
    lst, _ = toy_shards
    batch = next(D.TrainData(cfg_for(lst, batch_multiple=4, max_frames_in_batch=1200), _tok))
    s1, m1, _ = _one_step(M.make_mesh((1, 1, 1), devices=jax.devices()[:1]), batch)
    mesh = M.make_mesh((2, 2, 2))
    s8, m8, live = _one_step(mesh, batch)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # params really are sharded as the rules say
    emb = live["params"]["embedding"]  # ("vocab", "embed"): 6561 rows do not split in 2 -> replicated
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    k = live["params"]["Dense_0"]["kernel"]
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    obj = ToyObjective()
    tx = make_optimizer(OptimConfig())
    m8 = M.make_mesh((8, 1, 1))
    state, _ = TR.init_state(obj, tx, m8, seed=3)
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(7, state, data_state={"epoch": 2, "grain": {"next_index": 5}}, meta={"x": 1})
    m222 = M.make_mesh((2, 2, 2))
    target, sh222 = TR.init_state(obj, tx, m222, seed=99)  # different values, new mesh
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        restored, dstate, meta = ck.restore(None, target, sh222)
    assert dstate == {"epoch": 2, "grain": {"next_index": 5}} and meta == {"x": 1}
    for a, b, s in zip(jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(sh222)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == s


def _read_losses(workdir):
    rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    out = {}
    for r in rows:  # later rows (after a resume) overwrite earlier ones for the same step
        out[r["step"]] = r["loss"]
    return out


def test_sigkill_resume_is_exact(toy_shards, tmp_path):
    lst, _ = toy_shards
    # one batch shape -> one compilation per process keeps the three runs short
    data_cfg = dict(data_list=str(lst), max_frames_in_batch=600, token_buckets=[150],
                    text_buckets=[64], sort_window=8, num_threads=1, min_length=50)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    steps, every = 10, 3

    def run(workdir):
        args = json.dumps({"data": data_cfg, "workdir": str(workdir), "steps": steps, "save_every": every})
        return subprocess.Popen([sys.executable, str(TESTS / "train_toy.py"), args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    p = run(ref_dir)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    ref = _read_losses(ref_dir)
    assert sorted(ref) == list(range(1, steps + 1))

    p = run(kill_dir)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once it is past the second checkpoint
        m = kill_dir / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 2 * every + 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_before = len((kill_dir / "metrics.jsonl").read_text().splitlines())
    assert done_before < steps, "the run finished before it could be killed"
    p = run(kill_dir)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    resumed = _read_losses(kill_dir)
    assert sorted(resumed) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert resumed[s] == ref[s], (s, resumed[s], ref[s])


def test_schedules_hand_derived():
    w = OptimConfig(lr=1e-3, scheduler="warmuplr", warmup_steps=100)
    f = schedule(w)
    # official WarmupLR: lr * w^0.5 * min(s^-0.5, s * w^-1.5), s = count + 1
    for count in (0, 49, 99, 399):
        s = count + 1
        want = 1e-3 * 100 ** 0.5 * min(s ** -0.5, s * 100 ** -1.5)
        np.testing.assert_allclose(float(f(count)), want, rtol=1e-6)
    assert float(schedule(OptimConfig(lr=2e-5))(1234)) == pytest.approx(2e-5)
    with pytest.raises(ValueError, match="unknown scheduler"):
        schedule(OptimConfig(scheduler="cosine_restarts"))


def test_grad_accumulation_and_clip():
    tx = make_optimizer(OptimConfig(lr=0.1, accum_grad=2, grad_clip=1.0))
    p = {"w": jnp.ones(3)}
    st = tx.init(p)
    g1, g2 = {"w": jnp.array([10.0, 0, 0])}, {"w": jnp.array([0, 10.0, 0])}
    u1, st = tx.update(g1, st, p)
    assert not np.any(np.asarray(u1["w"]))  # no update on the first micro-step
    u2, st = tx.update(g2, st, p)
    # mean grad (5, 5, 0), clipped to norm 1 -> Adam's first step moves by lr * sign = 0.1
    np.testing.assert_allclose(np.asarray(u2["w"]), [-0.1, -0.1, 0.0], atol=1e-6)


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs"):
        M.make_mesh((3, 3, 1))
    with pytest.raises(ValueError, match="divisible"):
        M.shard_batch({"x": np.zeros((3, 2))}, M.make_mesh((2, 2, 2)))



@pytest.mark.slow  # six compilations of the tiny LM: ~1 min alone, ~5 min on the loaded CI cores
def test_lm_remat_policies_keep_the_loss_and_cut_memory():
    """Per-layer remat of the LM: the loss and gradients are those without remat, and the compiled
    train step keeps less ("full" and "dots_no_batch" temp memory below "none"); bad names: ConfigError."""
    from cosyvoice2_jax.config import ModelConfig
    from cosyvoice2_jax.errors import ConfigError
    from cosyvoice2_jax.train.lm import LMObjective

    cfg = ModelConfig.tiny().llm
    r = np.random.default_rng(0)
    rows, text, speech = 4, 16, 120
    batch = {"text_token": r.integers(0, 600, (rows, text)).astype(np.int32),
             "text_token_len": np.array([16, 9, 12, 5], np.int32),
             "speech_token": r.integers(0, 6561, (rows, speech)).astype(np.int32),
             "speech_token_len": np.array([120, 80, 101, 30], np.int32), "valid": np.ones((rows,), bool)}
    key = jax.random.key(3)
    params = LMObjective(cfg).init_params(jax.random.key(0))
    tx = make_optimizer(OptimConfig(lr=1e-3))
    mesh = M.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    grads, temp = {}, {}
    for remat in ("none", "full", "dots_no_batch"):
        obj = LMObjective(cfg, remat=remat)
        (loss, _), g = jax.jit(jax.value_and_grad(lambda p: obj.loss_fn(p, batch, key), has_aux=True))(params)
        grads[remat] = (float(loss), g)
        abstract, sh = TR.abstract_state(obj, tx, mesh)
        step = TR.make_train_step(obj, tx, sh, mesh).step
        b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        temp[remat] = jax.jit(step).lower(abstract, b).compile().memory_analysis().temp_size_in_bytes
    for remat in ("full", "dots_no_batch"):
        assert grads[remat][0] == pytest.approx(grads["none"][0], rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads[remat][1]), jax.tree.leaves(grads["none"][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert temp["full"] < temp["none"] and temp["dots_no_batch"] < temp["none"], temp
    with pytest.raises(ConfigError, match="train.remat='everything'"):
        LMObjective(cfg, remat="everything").init_params(jax.random.key(0))


# XLA CPU's default, concurrency-optimised (breadth-first) scheduler runs every recomputation as soon as
# its saved inputs exist, i.e. right after the forward pass, which undoes remat in the CPU memory
# analysis; the memory-minimising scheduler (as TPU/GPU schedule under memory pressure) shows the saving.
# It is a backend flag (XLA_FLAGS), so the memory is measured by scripts/bench_train.py in a subprocess.


@pytest.mark.slow  # two compilations of the tiny flow here and two in subprocesses: 9 min at load average ~25
def test_flow_remat_keeps_the_loss_and_cuts_memory():
    """train.remat for the flow wraps each U-Net stage: same loss and gradients; the compiled train
    step (bench_train.py scale, memory-minimising CPU scheduler, 4 x 500 frames) has more FLOPs
    (recomputation) and less temp memory; streaming calls refuse it with a ConfigError."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_train import flow_batch
    from cosyvoice2_jax.config import ModelConfig
    from cosyvoice2_jax.errors import ConfigError
    from cosyvoice2_jax.flow.decoder import CausalConditionalDecoder
    from cosyvoice2_jax.train.flow import FlowObjective

    cfg = ModelConfig.tiny().flow
    batch = flow_batch(2, 120)
    key = jax.random.key(3)
    params = FlowObjective(cfg).init_params(jax.random.key(0))
    res = {}
    repo = Path(__file__).resolve().parent.parent
    for remat in ("none", "full"):
        obj = FlowObjective(cfg, remat=remat)
        (loss, _), g = jax.jit(jax.value_and_grad(lambda p: obj.loss_fn(p, batch, key), has_aux=True))(params)
        out = subprocess.run([sys.executable, str(repo / "scripts" / "bench_train.py"), "scale", "--objective", "flow",
                              "--model", "tiny", "--chips", "1", "--mesh", "1", "1", "1", "--rows-per-shard", "4",
                              "--speech", "250", "--precision", "fp32", "--remat", remat, "--cpu-scheduler", "memory"],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(repo)}).stdout
        r = json.loads(out)
        res[remat] = (float(loss), g, r["memory_per_chip_gib"]["temp"], r["flops_per_step_per_chip"])
    assert res["full"][0] == pytest.approx(res["none"][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(res["full"][1]), jax.tree.leaves(res["none"][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert res["full"][3] > res["none"][3]  # the stages' forward runs again in the backward
    assert res["full"][2] < res["none"][2], (res["full"][2], res["none"][2])
    with pytest.raises(ConfigError, match="train.remat='all'"):
        FlowObjective(cfg, remat="all")
    dec = CausalConditionalDecoder(dataclasses.replace(cfg.decoder, remat="full"))
    h, valid, t_emb = jnp.zeros((1, 8, cfg.decoder.in_channels)), jnp.ones((1, 8), bool), jnp.zeros((1, 4 * 64))
    with pytest.raises(ConfigError, match="streaming needs remat: none"):
        dec.init(jax.random.key(0), h, valid, t_emb, 0, {}, None, method="forward_features")
