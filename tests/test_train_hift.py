"""HiFT-GAN training (official HiFiGan wrapper + train_one_epoc_gan) and the mixed-precision policy.

* both turns' losses and gradients equal the official ``HiFiGan.forward`` on the same batch and
  the same source noise (tiny generator, full discriminator, re-drawn weights);
* padding rows change nothing; one two-turn step on mesh (2,2,2) equals the 1-device step; the
  generator's mel loss falls on a fixed batch; checkpoint + restore of the two-optimizer state;
* the F0 target equals the official ``processor.compute_f0``; GAN-mode batches have one shape;
  ``cosyvoice2-jax train --config <hift yaml>`` runs end to end on tiny shards;
* ``precision: bf16``: a bf16 GAN step computes bf16 convs/dots (flow: tests/test_train_flow.py);
  a bf16 LM step really computes bf16 dots, keeps fp32 params, and its loss
  is close to the fp32 loss.
"""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.config import ModelConfig
from cosyvoice2_jax.frontend import audio as A
from cosyvoice2_jax.hift.params import from_torch
from cosyvoice2_jax.train import data as D
from cosyvoice2_jax import sharding as M
from cosyvoice2_jax.train import trainer as TR
from cosyvoice2_jax.train.checkpoint import Checkpointer
from cosyvoice2_jax.hift.params import discriminator_from_torch
from cosyvoice2_jax.train.hift import (GANConfig, HiFTGANObjective, gan_step, make_discriminator,
                                       init_gan_state, make_gan_optimizers, make_gan_train_step)
from cosyvoice2_jax.train.optim import OptimConfig

# the tiny HiFT with one resblock kernel per stage instead of three: the generator's gradient is the
# costliest thing to compile here (XLA:CPU), and the structure is otherwise the official one
CFG = dataclasses.replace(ModelConfig.tiny().hift, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3, 5),))
# one period D (p = 7: W is not a multiple, the reflect pad runs) + one spectrogram D (512/50/240):
# the official sub-discriminators 3 and 2; the full set is compared in test_hift_gan.py and below (slow)
GAN = GANConfig(mpd_periods=(7,), mrd_fft_sizes=(512,), mrd_hop_sizes=(50,), mrd_win_lengths=(240,))
B, FRAMES = 4, 4
W = FRAMES * CFG.hop_size
KW = dict(seed=0, base_channels=CFG.base_channels, cond_channels=CFG.f0_predictor.cond_channels, disc_seed=0,
          f0_scale=100.0, post_scale=0.15, mpd_idx=[3], mrd_idx=[2], resblock_kernel_sizes=[3],
          resblock_dilation_sizes=[[1, 3, 5]])


def _batch(seed=0, rows=B):
    """Speech-like crops (harmonics + noise) with their mels, a random F0 target and two noises."""
    r = np.random.default_rng(seed)
    t = np.arange(W) / 24000.0
    f = r.uniform(100, 250, (rows, 1))
    speech = (0.3 * np.sin(2 * np.pi * f * t) + 0.1 * np.sin(4 * np.pi * f * t)
              + 0.02 * r.standard_normal((rows, W))).astype(np.float32)
    return {"speech": speech, "speech_feat": np.stack([A.mel_24k(s) for s in speech]),
            "pitch_feat": r.uniform(80, 250, (rows, FRAMES)).astype(np.float32),
            "noise_d": r.standard_normal((rows, W, 9)).astype(np.float32),
            "noise_g": r.standard_normal((rows, W, 9)).astype(np.float32),
            "valid": np.ones((rows,), bool)}


TC = TR.TrainConfig(optim=OptimConfig(lr=1e-3), optim_d=OptimConfig(lr=2e-4))


def _step_batch():
    return {k: v for k, v in _batch().items()}


@pytest.fixture(scope="module")
def gan(oracle):
    """The official step (oracle) and ours, 1 device, from the same weights on the same batch."""
    batch = _step_batch()
    ref = oracle("train:hifigan_train_step", {k: v for k, v in batch.items() if k != "valid"}, **KW,
                 lr_g=TC.optim.lr, lr_d=TC.optim_d.lr, grad_clip=5.0)

    def params(prefix):
        sd = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
        return {"generator": from_torch({k: v for k, v in sd.items() if k.startswith("generator.")}, CFG),
                "discriminator": discriminator_from_torch(
                    {k: v for k, v in sd.items() if k.startswith("discriminator.")}, make_discriminator(GAN))}

    p0 = params("sd/")
    obj = HiFTGANObjective(CFG, GAN, init_from=p0)
    mesh = M.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    txs, clips = make_gan_optimizers(TC.optim, TC.optim_d)
    state0, sh = init_gan_state(obj, txs, mesh, 0)
    step = make_gan_train_step(obj, txs, clips, sh, mesh, seed=0, donate=False)
    state1, m1 = step(state0, batch)
    return SimpleNamespace(batch=batch, ref=ref, p0=p0, p1_official=params("after/"), mu_official=params("mu/"),
                           obj=obj, mesh=mesh, txs=txs,
                           clips=clips, state0=state0, sh=sh, step=step, state1=state1, m1=jax.device_get(m1))


# ----------------------------------------------------------------------------------- parity
def test_step_equals_official(gan):
    """Losses of both turns, torch's clip norms, and the params after both Adam steps."""
    ref, m = gan.ref, gan.m1
    pairs = [("d/loss", "loss_d"), ("g/loss", "loss"), ("d/grad_norm", "grad_norm_d"), ("g/grad_norm", "grad_norm")]
    pairs += [(f"d/{k}", f"d_{k}") for k in ("loss_disc", "loss_tpr")]
    pairs += [(f"g/{k}", f"g_{k}") for k in ("loss_gen", "loss_fm", "loss_mel", "loss_tpr", "loss_f0")]
    assert {k for k in ref if k[:2] in ("d/", "g/")} == {a for a, _ in pairs}  # every official term compared
    for theirs, ours in pairs:
        rtol = 1e-3 if "grad_norm" in ours else 1e-4  # norms sum ~10M float32 grads in another order
        np.testing.assert_allclose(float(m[ours]), float(ref[theirs]), rtol=rtol, atol=1e-6, err_msg=theirs)
    assert float(ref["g/loss_mel"]) > 0.1 and float(ref["g/loss_f0"]) > 1 and float(ref["d/loss_disc"]) > 0.1
    assert float(ref["g/grad_norm"]) > 5  # the generator turn really clips (by the norm of G and D grads)
    # the clipped gradients of both turns, every tensor: Adam's first moment after one step (0.1 g)
    _assert_grads_close(_mu(gan.state1), gan.mu_official, median=5e-3, worst=5e-2)
    # params after the step: first Adam step = -lr * g / (|g| + eps), i.e. about lr * sign(g)
    flipped, worst, _ = _adam_step_agreement(jax.device_get(gan.state1["params"]), gan.p1_official)
    # opposite signs only where a gradient is at float32 rounding level: measured 2.5e-4 of all
    # elements, at most 1 of 32 in any tensor (a wrong tensor would flip ~50%)
    assert flipped < 1e-3 and worst[0] < 0.05, (flipped, worst)
    moved = [np.abs(b - c).max() > 0.5 * TC.optim_d.lr for part in ("generator", "discriminator")
             for b, c in zip(jax.tree.leaves(gan.p1_official[part]), jax.tree.leaves(gan.p0[part]))]
    # (a tensor can have an exactly zero gradient: e.g. the F0 classifier bias under an L1 loss
    # whose signs cancel over the 16 frames)
    assert np.mean(moved) > 0.95, np.mean(moved)


def _mu(state):
    """Adam's first moments of both optimizers, as a params-shaped tree."""
    opt = jax.device_get(state["opt_state"])
    return {t: opt[t][0].mu for t in ("generator", "discriminator")}


def _assert_grads_close(a, b, median: float, worst: float):
    """Per tensor ``max|a - b| / max|b|``: its median over tensors <= ``median`` and its maximum <=
    ``worst``. Why not 1e-5: the GAN gradients are not continuous in the inputs. The mel, feature
    matching and F0 losses are L1 (gradient = sign of each difference) and TPR selects score
    elements by a comparison (``dr < dg + median``): a term whose two sides agree to float32
    rounding flips between two computations (another framework, another sharding), and each flip
    moves a gradient by ~1/N of its N terms (N = 1280 mel bins in this batch). Measured: median
    2.5e-3, maximum 1.5e-2, for torch vs ours and for mesh (2,2,2) vs 1 device alike."""
    errs = []
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        y = np.asarray(y)
        errs.append((float(np.abs(np.asarray(x) - y).max()) / max(float(np.abs(y).max()), 1e-12),
                     jax.tree_util.keystr(path)))
    errs.sort()
    assert errs[len(errs) // 2][0] <= median and errs[-1][0] <= worst, (errs[len(errs) // 2], errs[-3:])


def _adam_step_agreement(a, b):
    """Compare params after one Adam step from the same start: (fraction of elements whose update
    sign differs, (worst tensor's fraction, its name), max difference elsewhere). A first Adam step
    moves every element by ~lr * sign(g), so a gradient at rounding level can flip: those are
    counted, everything else must agree closely."""
    flipped, total, worst, max_rest = 0, 0, (0.0, ""), 0.0
    for part, lr in (("generator", TC.optim.lr), ("discriminator", TC.optim_d.lr)):
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a[part])[0], jax.tree.leaves(b[part])):
            diff = np.abs(np.asarray(x) - np.asarray(y))
            assert diff.max() <= 2.01 * lr
            flip = diff > 0.5 * lr
            flipped += int(flip.sum())
            total += diff.size
            worst = max(worst, (float(flip.mean()), f"{part}{jax.tree_util.keystr(path)}"))
            if (~flip).any():
                max_rest = max(max_rest, float(diff[~flip].max()))
    return flipped / total, worst, max_rest


def test_padding_rows_change_nothing(gan):
    """Rows with valid=False (the data pipeline's fill rows) add nothing to either loss."""
    obj = gan.obj
    pad = _batch(seed=5, rows=2)
    big = {k: np.concatenate([gan.batch[k], pad[k]]) for k in gan.batch}
    big["valid"] = np.arange(B + 2) < B
    key = jax.random.key(0)
    # D turn at the initial weights; G turn against the official step's updated discriminator
    p_g = {"generator": gan.p0["generator"], "discriminator": gan.p1_official["discriminator"]}
    f = jax.jit(lambda b: (obj.generator_loss(p_g, b, key)[0], obj.discriminator_loss(gan.p0, b, key)[0]))
    lg, ld = f(big)
    np.testing.assert_allclose(float(lg), float(gan.ref["g/loss"]), rtol=1e-4)
    np.testing.assert_allclose(float(ld), float(gan.ref["d/loss"]), rtol=1e-4)
    big["valid"] = np.ones(B + 2, bool)  # the same rows counted: a different loss
    assert abs(float(f(big)[0]) - float(lg)) > 1e-3


# ----------------------------------------------------------------------------------- steps
@pytest.fixture(scope="module")
def single(gan):
    return gan


@pytest.mark.slow  # a second compile of the two-turn step, SPMD-partitioned: ~2 min on 2 CPU cores
def test_step_on_mesh_equals_single_device(single):
    assert len(jax.devices()) == 8
    mesh = M.make_mesh((2, 2, 2))
    state, sh, step = single.obj.init_train(TC, mesh)
    state, m = step(state, gan_batch := _step_batch())
    assert set(gan_batch) >= {"noise_d", "noise_g"}
    m = jax.device_get(m)
    for k in ("loss", "loss_d", "grad_norm", "grad_norm_d"):
        # the norms sum ~10M squared grads in another order, and the TPR selection of a few score
        # elements can differ at float32 level: 1e-4 measured
        np.testing.assert_allclose(m[k], single.m1[k], rtol=1e-5 if "loss" in k else 1e-3, err_msg=k)
    a, b = jax.device_get(single.state1), jax.device_get(state)
    _assert_grads_close(_mu(b), _mu(a), median=5e-3, worst=5e-2)  # the clipped gradients of both turns
    # params <= 1e-5 apart, except where a gradient at rounding level flips its first-Adam-step sign
    flipped, worst, _ = _adam_step_agreement(a["params"], b["params"])
    assert flipped < 1e-3 and worst[0] < 0.05, (flipped, worst)
    close = [float(np.mean(np.abs(x - y) <= 1e-5)) for x, y in zip(jax.tree.leaves(a["params"]),
                                                                   jax.tree.leaves(b["params"]))]
    assert np.mean(close) > 0.99, min(close)
    # both turns moved their own params
    for t in ("generator", "discriminator"):
        before = jax.tree.leaves(jax.device_get(single.state0)["params"][t])
        moved = max(float(np.abs(x - y).max()) for x, y in zip(before, jax.tree.leaves(a["params"][t])))
        assert moved > 1e-5, t
    # params are sharded by the rules (FSDP over the largest divisible dim), the step counter replicated
    conv = state["params"]["discriminator"]["mpd"]["discriminators_0"]["convs_4"]["weight_v"]
    assert "fsdp" in str(conv.sharding.spec)
    assert state["step"].sharding.spec == jax.sharding.PartitionSpec()
    assert len(step.compiled) == 1


def test_generator_mel_loss_falls_on_fixed_batch(single):
    state, mel = single.state1, [float(single.m1["g_loss_mel"])]
    for _ in range(5):
        state, m = single.step(state, _step_batch())
        mel.append(float(m["g_loss_mel"]))
    assert np.isfinite(mel).all()
    assert np.mean(mel[-2:]) < 0.9 * mel[0], mel
    assert len(single.step.compiled) == 1  # fixed shapes: one compilation


def test_checkpoint_restores_both_optimizers(single, tmp_path):
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(1, single.state1, data_state={"epoch": 0}, meta={"objective": "hift"})
    other, _ = init_gan_state(single.obj, single.txs, single.mesh, 7)  # a different init as the target
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        restored, data_state, meta = ck.restore(None, other, single.sh)
    assert data_state == {"epoch": 0} and meta["objective"] == "hift"
    assert set(restored["opt_state"]) == {"generator", "discriminator"}
    for x, y in zip(jax.tree.leaves(jax.device_get(single.state1)), jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(x, y)
    # the resumed run continues exactly as the uninterrupted one
    a, _ = single.step(single.state1, _step_batch())
    b, _ = single.step(restored, _step_batch())
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


def test_gan_config_errors(single):
    from cosyvoice2_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="accum_grad 1"):
        make_gan_optimizers(OptimConfig(accum_grad=2), OptimConfig())
    with pytest.raises(ConfigError, match="precision='fp16' is not one of"):
        single.obj.init_train(dataclasses.replace(TC, precision="fp16"), single.mesh)
    with pytest.raises(ValueError, match="pitch_feat"):
        b = _step_batch()
        del b["pitch_feat"]
        jax.eval_shape(lambda s: gan_step(single.obj, single.txs, single.clips, s, b, jax.random.key(0)),
                       single.state0)


# ----------------------------------------------------------------------------------- data
def test_pitch_feature_equals_official(oracle, shared_wavs):
    pytest.importorskip("pyworld", reason="pip install 'cosyvoice2-jax[train]' (pyworld-prebuilt)")
    wav = A.load_wav(shared_wavs[0], 24000)[: 24000 + 4321]
    for n_frames in (52, 37):
        ref = oracle("train:compute_f0", {"wav": wav, "n_frames": np.array(n_frames)})["pitch_feat"]
        ours = D.pitch_feature(wav, n_frames)
        assert ours.shape == (n_frames,)
        assert (ref > 0).sum() > 5  # real speech: voiced frames
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-3)
    # torch interpolate(linear, align_corners=False), hand-derived for 4 -> 6 samples:
    # src = max((i + 0.5) * 4/6 - 0.5, 0) = [0, 0.5, 7/6, 11/6, 2.5, 19/6 (clamped to the last sample)]
    np.testing.assert_allclose(D.linear_resize(np.array([0.0, 1.0, 2.0, 3.0]), 6),
                               [0.0, 0.5, 7 / 6, 11 / 6, 2.5, 3.0], atol=1e-12)


def test_gan_batches_have_one_shape(tmp_path, shared_wavs):
    pytest.importorskip("pyworld", reason="pip install 'cosyvoice2-jax[train]' (pyworld-prebuilt)")
    from test_train_data import make_shards

    real = [A.load_wav(p, 16000) for p in shared_wavs]
    lst, _ = make_shards(tmp_path, n_rows=6, n_shards=1, real=real, seed=3)
    cfg = D.DataConfig(data_list=str(lst), truncate_length=2400, align_samples=960, features=("pitch",),
                       max_frames_in_batch=12, num_threads=1, min_length=50)
    assert D.gan_segment_samples(cfg) == 2880 and D.rows_for_bucket(0, cfg) == 2
    data = D.TrainData(cfg, lambda t: [0])
    shapes = set()
    for _ in range(4):
        b = next(data)
        shapes.add(tuple(sorted((k, v.shape) for k, v in b.items())))
        assert b["valid"].any()
        v = b["valid"]
        assert (b["pitch_feat"][v] >= 0).all() and np.abs(b["speech"][v]).max() > 0.01
        np.testing.assert_allclose(b["speech_feat"][v][0], A.mel_24k(b["speech"][v][0]), atol=1e-5)
    assert shapes == {(("pitch_feat", (2, 6)), ("speech", (2, 2880)), ("speech_feat", (2, 6, 80)),
                       ("valid", (2,)))}
    with pytest.raises(D.DataError, match="unknown data feature"):
        D.Collate(data.source, dataclasses.replace(cfg, features=("pitchh",)), lambda t: [0])
    with pytest.raises(D.DataError, match="multiple of the mel hop"):
        D.Collate(data.source, dataclasses.replace(cfg, align_samples=0, truncate_length=1000), lambda t: [0])


@pytest.mark.slow  # compiles the step again (batches without recorded noise): ~1-2 min on 2 CPU cores
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cli_trains_hift_end_to_end(tmp_path, shared_wavs, precision):
    """``cosyvoice2-jax train --config <hift yaml>`` on tiny shards: GAN-mode data with pitch,
    both turns, metrics, checkpoints; also with ``train.precision: bf16``."""
    pytest.importorskip("pyworld", reason="pip install 'cosyvoice2-jax[train]' (pyworld-prebuilt)")
    import yaml

    from cosyvoice2_jax import cli
    from test_train_data import make_shards

    real = [A.load_wav(p, 16000) for p in shared_wavs]
    lst, _ = make_shards(tmp_path, n_rows=6, n_shards=1, real=real, seed=4)
    model_yaml = tmp_path / "model.yaml"
    dataclasses.replace(ModelConfig.tiny(), hift=CFG).to_yaml(model_yaml)
    spec = {"objective": "hift", "model": str(model_yaml),
            "data": {"data_list": str(lst), "truncate_length": 1920, "align_samples": 960,
                     "max_frames_in_batch": B * FRAMES, "num_threads": 1, "min_length": 50},
            "gan": {"mpd_periods": list(GAN.mpd_periods), "mrd_fft_sizes": list(GAN.mrd_fft_sizes),
                    "mrd_hop_sizes": list(GAN.mrd_hop_sizes), "mrd_win_lengths": list(GAN.mrd_win_lengths)},
            "train": {"steps": 3, "save_every": 2, "log_every": 1, "workdir": str(tmp_path / "run"),
                      "async_save": False, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
                      "optim": {"lr": 1e-3}, "optim_d": {"lr": 2e-4}, "precision": precision}}
    (tmp_path / "hift.yaml").write_text(yaml.safe_dump(spec))
    assert cli.main(["train", "--config", str(tmp_path / "hift.yaml"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"loss", "loss_d", "g_loss_mel", "g_loss_f0", "d_loss_disc", "grad_norm_d"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    assert rows[0]["g_loss_f0"] > 1  # real F0 targets (pyworld) reached the loss
    ck = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert ck == [2, 3]


def test_shipped_hift_yaml_is_current_and_loads():
    import sys
    from pathlib import Path

    from cosyvoice2_jax.train.run import load_train_file

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    import write_configs

    path = root / "configs" / "train" / "hift.yaml"
    assert path.read_text(encoding="utf-8") == write_configs.render("train/hift.yaml"), \
        "configs/train/hift.yaml is stale: run python scripts/write_configs.py"
    tf = load_train_file(path, ["train.steps=3"])
    assert tf.objective == "hift" and tf.train.steps == 3
    assert (tf.train.optim.lr, tf.train.optim_d.lr, tf.train.optim.grad_clip) == (2e-4, 2e-4, 5.0)
    assert D.gan_segment_samples(tf.data) == 24960 and D.rows_for_bucket(0, tf.data) == 38
    assert tf.gan == GANConfig() and tf.gan.mpd_periods == (2, 3, 5, 7, 11)


# ----------------------------------------------------------------------------------- mixed precision
from jax.extend import core as jax_core  # noqa: E402


def _dots(jaxpr) -> list[tuple[str, ...]]:
    """Operand dtypes of every dot_general and convolution in a (closed) jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax_core.jaxprs_in_params(eqn.params):
            out.extend(_dots(sub))
    return out


@pytest.mark.slow  # CI budget: the LM bf16 step stays in CI
def test_bf16_gan_step_computes_bf16_keeps_fp32_state():
    """``train.precision: bf16`` for the HiFT GAN: both turns' convs and matmuls (forward and
    backward, generator and discriminator) take bf16 operands; params, optimizer states, loss and
    metrics stay fp32. (Traced and shape-evaluated only: compiling the bf16 two-turn step costs a
    minute on 2 cores; the CLI run with precision bf16 is covered by the slow test below.)"""
    cfg = TR.precision_model_config(ModelConfig(hift=CFG), "bf16").hift
    assert cfg.dtype == "bfloat16"
    obj = HiFTGANObjective(cfg, GAN)
    mesh = M.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    txs, clips = make_gan_optimizers(TC.optim, TC.optim_d)
    state = jax.eval_shape(lambda: init_gan_state(obj, txs, mesh, 0)[0])
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _step_batch().items()}
    step = lambda s, b: gan_step(obj, txs, clips, s, b, jax.random.key(0), "bf16")  # noqa: E731
    ops = _dots(jax.make_jaxpr(step)(state, batch).jaxpr)
    out_state, metrics = jax.eval_shape(step, state, batch)
    n_bf16 = sum(d == ("bfloat16", "bfloat16") for d in ops)
    print(f"[bf16] GAN step: {n_bf16} of {len(ops)} dot/conv ops in bf16")
    assert len(ops) > 100 and n_bf16 >= 0.9 * len(ops), ops
    floats = [x for x in jax.tree.leaves(out_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(metrics))


def test_bf16_lm_step_computes_bf16_keeps_fp32_state():
    from cosyvoice2_jax.train.lm import LMObjective
    from cosyvoice2_jax.train.optim import make_optimizer

    lm = ModelConfig.tiny().llm
    r = np.random.default_rng(0)
    batch = {"text_token": r.integers(0, 1000, (4, 16)).astype(np.int32),
             "text_token_len": np.array([16, 9, 12, 5], np.int32),
             "speech_token": r.integers(0, 6561, (4, 40)).astype(np.int32),
             "speech_token_len": np.array([40, 31, 22, 17], np.int32), "valid": np.ones((4,), bool)}
    mesh = M.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimConfig(lr=1e-3))
    runs = {}
    for prec in ("fp32", "bf16"):
        obj = LMObjective(TR.precision_model_config(lm, prec))
        state, sh = TR.init_state(obj, tx, mesh, 0)
        step = TR.make_train_step(obj, tx, sh, mesh, donate=False, precision=prec)
        dots = _dots(jax.make_jaxpr(step.step)(state, batch).jaxpr)
        if prec == "bf16":  # run the whole bf16 step; the fp32 reference needs only its loss
            new, m = jax.device_get(step(state, batch))
        else:
            loss, _ = jax.jit(obj.loss_fn)(state["params"], batch, jax.random.fold_in(jax.random.key(1), 0))
            new, m = None, {"loss": np.asarray(loss)}
        runs[prec] = SimpleNamespace(state=state, new=new, m=m, dots=dots)
    f, b = runs["fp32"], runs["bf16"]
    assert TR.precision_model_config(lm, "bf16").dtype == "bfloat16"
    # the policy is not a no-op: the bf16 step's matmuls (forward and backward) run on bf16 operands
    assert f.dots and all(d == ("float32", "float32") for d in f.dots)
    n_bf16 = sum(d == ("bfloat16", "bfloat16") for d in b.dots)
    assert n_bf16 >= 0.9 * len(b.dots), b.dots
    # params and optimizer state stay fp32; both runs start from the same fp32 params
    pf, pb = jax.device_get(f.state["params"]), jax.device_get(b.state["params"])
    for x, y in zip(jax.tree.leaves(pf), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    floats = [x for x in jax.tree.leaves(b.new) if np.issubdtype(x.dtype, np.floating)]
    assert floats and all(x.dtype == np.float32 for x in floats)
    assert b.m["loss"].dtype == np.float32 and b.m["grad_norm"].dtype == np.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%) per rounded operand; the tiny
    # LM's ~10 matmuls in series and the bf16 logits give a CE within ~1% of fp32 (measured 0.1-0.3%)
    rel = abs(float(b.m["loss"]) - float(f.m["loss"])) / float(f.m["loss"])
    assert rel < 1e-2, (float(b.m["loss"]), float(f.m["loss"]))
    assert rel > 0  # really a different computation
    with pytest.raises(Exception, match="precision='fp16' is not one of"):
        TR.make_train_step(LMObjective(lm), tx, None, mesh, precision="fp16")
