"""LM and DPO training objectives: losses equal the official module's on the same batch and the
same random choices; padding rows/lengths change nothing; the frozen DPO reference never moves;
the tiny LM learns on real shards."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.config import ModelConfig
from cosyvoice2_jax.frontend import audio as A
from cosyvoice2_jax.frontend.text import QwenTextTokenizer
from toy_tokenizer import write_toy_qwen_tokenizer
from cosyvoice2_jax.llm import params as P
from cosyvoice2_jax.train import data as D
from cosyvoice2_jax import sharding as M
from cosyvoice2_jax.train import trainer as TR
from cosyvoice2_jax.llm.objectives import dpo_losses
from cosyvoice2_jax.train.lm import DPOObjective, LMObjective
from cosyvoice2_jax.train.optim import OptimConfig, make_optimizer
from oracle_client import unflatten_state_dict
from test_llm import SEED, qwen_json
from test_train_data import make_shards

CFG = ModelConfig.tiny().llm


@pytest.fixture(scope="module")
def official(oracle):
    sd = unflatten_state_dict(oracle("llm:build", cfg=qwen_json(CFG), seed=SEED))
    return P.from_release(sd, CFG)


def _batch():
    rng = np.random.default_rng(7)
    b = {"text_token_len": np.array([9, 4, 5, 7]), "speech_token_len": np.array([40, 30, 16, 11])}
    b["text_token"] = rng.integers(0, CFG.qwen.vocab_size, (4, 9))
    b["speech_token"] = rng.integers(0, 6561, (4, 40))
    b["reject_speech_token_len"] = np.array([33, 12, 20, 9])
    b["reject_speech_token"] = rng.integers(0, 6561, (4, 33))
    for i in range(4):
        b["text_token"][i, b["text_token_len"][i]:] = 0
        b["speech_token"][i, b["speech_token_len"][i]:] = 0
        b["reject_speech_token"][i, b["reject_speech_token_len"][i]:] = 0
    return b


def _pad_like_data(b, rows=6, text=16, speech=50):
    """What the data pipeline hands the step: bucketed lengths and padding rows (valid=False)."""
    out = {}
    for k, v in b.items():
        v = np.asarray(v)
        if v.ndim == 2:
            width = text if k == "text_token" else speech
            v = np.pad(v, ((0, 0), (0, width - v.shape[1])))
        out[k] = np.pad(v, [(0, rows - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
    out["valid"] = np.arange(rows) < b["text_token"].shape[0]
    return {k: jnp.asarray(v) for k, v in out.items()}


def test_lm_objective_loss_equals_official(official, oracle):
    b = _batch()
    u = np.array([0.2, 0.7, 0.1, 0.3])
    ref = oracle("llm:forward", {**{k: v for k, v in b.items() if "reject" not in k}, "uniforms": u},
                 cfg=qwen_json(CFG), seed=SEED)
    obj = LMObjective(CFG)
    padded = _pad_like_data(b)
    padded["bistream_u"] = jnp.asarray(np.pad(u, (0, 2), constant_values=0.9))
    loss, m = jax.jit(obj.loss_fn)(official, padded, jax.random.key(0))
    np.testing.assert_allclose(float(loss), float(ref["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m["acc"]), float(ref["acc"]), atol=1e-7)
    # a different bistream draw gives a different loss (the choice matters and is honoured)
    padded["bistream_u"] = jnp.full((6,), 0.9)
    loss2, _ = jax.jit(obj.loss_fn)(official, padded, jax.random.key(0))
    assert abs(float(loss2) - float(loss)) > 1e-4


def test_dpo_objective_matches_official_logps_and_loss(official, oracle):
    b = _batch()
    u_dpo = np.array([0.9, 0.1, 0.1, 0.2, 0.3, 0.2, 0.5, 0.4])
    ref = oracle("llm:forward", {**b, "uniforms": u_dpo[:4], "dpo_uniforms": u_dpo}, cfg=qwen_json(CFG), seed=SEED)
    # exact official shapes (its averaging depends on the padded length): no extra padding here
    obj = DPOObjective(CFG, official_mask=True)
    jb = {k: jnp.asarray(v) for k, v in b.items()}
    jb["valid"] = jnp.ones((4,), bool)
    jb["speech_token"] = jnp.pad(jb["speech_token"], ((0, 0), (0, 0)))
    from cosyvoice2_jax.llm.objectives import bistream_from_uniforms

    bi = bistream_from_uniforms(jnp.asarray(u_dpo), jnp.concatenate([jb["text_token_len"]] * 2),
                                jnp.concatenate([jb["speech_token_len"], jb["reject_speech_token_len"]]), CFG.mix_ratio)
    chosen, rejected, _ = obj.logps(official, jb, bi)
    np.testing.assert_allclose(np.asarray(chosen), ref["dpo_chosen_logps"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rejected), ref["dpo_rejected_logps"], rtol=2e-5, atol=2e-5)
    # DPOLoss formula, hand-derived: -log(sigmoid(beta * ((c - r) - (rc - rr))))
    c, r = np.array([-1.0, -2.0]), np.array([-1.5, -1.0])
    rc, rr = np.array([-1.2, -2.1]), np.array([-1.4, -1.1])
    losses, cr, rrw = dpo_losses(jnp.asarray(c), jnp.asarray(r), jnp.asarray(rc), jnp.asarray(rr), beta=0.5)
    z = 0.5 * ((c - r) - (rc - rr))
    np.testing.assert_allclose(np.asarray(losses), np.log1p(np.exp(-z)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cr), 0.5 * (c - rc), rtol=1e-6)
    # policy == reference at the start: the preference term is log 2, the total adds the SFT CE
    loss, m = jax.jit(obj.loss_fn)({"policy": official, "ref": official}, {**jb, "bistream_u": jnp.asarray(u_dpo)},
                                   jax.random.key(0))
    np.testing.assert_allclose(float(m["dpo_loss"]), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(float(m["sft_loss"]), float(ref["dpo_loss"]), rtol=1e-5)


def test_dpo_reference_stays_frozen(official):
    b = _pad_like_data(_batch())
    obj = DPOObjective(CFG, init_from=official)
    mesh = M.make_mesh((1, 1, 1))
    tx = TR.with_trainable_mask(obj, make_optimizer(OptimConfig(lr=1e-2)))
    state, sh = TR.init_state(obj, tx, mesh, 0)
    step = TR.make_train_step(obj, tx, sh, mesh, donate=False)
    new, metrics = step(state, {k: np.asarray(v) for k, v in b.items()})
    for a, c in zip(jax.tree.leaves(state["params"]["ref"]), jax.tree.leaves(new["params"]["ref"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    moved = [float(jnp.abs(a - c).max()) for a, c in zip(jax.tree.leaves(state["params"]["policy"]),
                                                          jax.tree.leaves(new["params"]["policy"]))]
    assert max(moved) > 1e-4
    assert np.isfinite(float(metrics["loss"]))


def test_tiny_lm_loss_decreases_on_real_shards(tmp_path, shared_wavs):
    """Acceptance: the tiny LM's loss falls over 50 steps, run through the training YAML + CLI path."""
    import yaml

    from cosyvoice2_jax import cli

    real = [A.load_wav(p, 16000) for p in shared_wavs]
    lst, _ = make_shards(tmp_path, n_rows=8, n_shards=1, real=real, seed=21)
    tok_dir = write_toy_qwen_tokenizer(tmp_path / "tok")
    spec = {"objective": "lm", "model": "tiny", "tokenizer_dir": str(tok_dir), "eval_data_list": str(lst),
            "data": {"data_list": str(lst), "max_frames_in_batch": 1000, "token_buckets": [150], "text_buckets": [32],
                     "num_threads": 1, "min_length": 50},
            "train": {"steps": 50, "save_every": 25, "eval_every": 25, "log_every": 1, "workdir": str(tmp_path / "run"),
                      "async_save": False, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "optim": {"lr": 2e-3}}}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(spec))
    assert cli.main(["train", "--config", str(tmp_path / "lm.yaml"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 50
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    events = list((tmp_path / "run" / "tb").iterdir())
    assert events  # TensorBoard event file written, with train and held-out eval scalars
    from tensorboardX.proto import event_pb2  # noqa: F401  (format check below reads raw records)
    raw = b"".join(p.read_bytes() for p in events)
    assert b"train/loss" in raw and b"eval/loss" in raw
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [25, 50]
    # running it again resumes at step 50 and does nothing more
    assert cli.main(["train", "--config", str(tmp_path / "lm.yaml"), "--no-progress"]) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 50


def test_shipped_train_configs_load():
    from pathlib import Path

    from cosyvoice2_jax.train.run import load_train_file

    root = Path(__file__).resolve().parent.parent / "configs" / "train"
    for name in ("lm", "flow", "dpo"):
        tf = load_train_file(root / f"{name}.yaml", ["train.steps=3"])
        assert tf.objective == name and tf.train.steps == 3
    with pytest.raises(Exception, match="unknown config key 'train.stepz'"):
        load_train_file(root / "lm.yaml", ["train.stepz=3"])


def test_trained_tiny_lm_exports_to_official_names(official, oracle):
    """A few training steps, then export to llm.pt names: the official Qwen2LM loads the state dict
    strictly and computes the same loss as our objective on a batch."""
    b = _pad_like_data(_batch(), rows=4, text=9, speech=40)
    obj = LMObjective(CFG, init_from=official)
    mesh = M.make_mesh((1, 1, 1))
    tx = make_optimizer(OptimConfig(lr=1e-2))
    state, sh = TR.init_state(obj, tx, mesh, 0)
    step = TR.make_train_step(obj, tx, sh, mesh, donate=False)
    for _ in range(3):
        state, _ = step(state, {k: np.asarray(v) for k, v in b.items()})
    trained = jax.device_get(state["params"])
    assert max(float(np.abs(a - c).max()) for a, c in zip(jax.tree.leaves(trained), jax.tree.leaves(official))) > 1e-3
    sd = P.to_release(trained, CFG)
    u = np.array([0.2, 0.7, 0.1, 0.3])
    raw = {k: np.asarray(v) for k, v in _batch().items() if "reject" not in k}
    ref = oracle("train:lm_forward_from_sd", {**{f"sd/{k}": v for k, v in sd.items()}, **raw, "uniforms": u},
                 cfg=qwen_json(CFG))
    ours, m = jax.jit(obj.loss_fn)(trained, {**b, "bistream_u": jnp.asarray(u)}, jax.random.key(0))
    np.testing.assert_allclose(float(ours), float(ref["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m["acc"]), float(ref["acc"]), atol=1e-7)
