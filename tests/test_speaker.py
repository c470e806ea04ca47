"""CAM++ vs the official CAMPPlus (3D-Speaker structure, chatterbox's xvector.py), full size, on
real speech; converters from the torch state dict and from an eval-mode ONNX export.

Weights: re-drawn (``reinit_``) with BatchNorm statistics re-estimated on the real wavs, so
embeddings of different speakers really differ. Features: the official kaldi fbank - mean.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from oracle_client import unflatten_state_dict
from cosyvoice2_jax.config import SpeakerConfig
from cosyvoice2_jax.errors import AudioError, ConversionError
from cosyvoice2_jax.speaker import modeling as smod, params as sparams
from cosyvoice2_jax.speaker.runtime import SpeakerEncoder

CFG = SpeakerConfig()


def _cos(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ------------------------------------------------------------------------------ masked ops (no oracle)
def test_segment_mean_and_stats_pool_hand_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 250, 3)).astype(np.float32)
    lens = np.array([250, 130])
    mask = jnp.arange(250)[None] < jnp.asarray(lens)[:, None]
    seg = np.asarray(smod.segment_mean(jnp.asarray(x), mask))
    for b, n in enumerate(lens):
        for s in range(0, n, 100):
            want = x[b, s:min(s + 100, n)].mean(0)  # a partial last segment averages its own frames
            np.testing.assert_allclose(seg[b, s:min(s + 100, n)], np.broadcast_to(want, (min(100, n - s), 3)),
                                       rtol=1e-5, atol=1e-6)
    st = np.asarray(smod.stats_pool(jnp.asarray(x), mask))
    for b, n in enumerate(lens):
        np.testing.assert_allclose(st[b], np.concatenate([x[b, :n].mean(0), x[b, :n].std(0, ddof=1)]), rtol=1e-5)


# ------------------------------------------------------------------------------ full-size parity
@pytest.fixture(scope="module")
def spk(oracle, real_wavs):
    paths = [str(p) for p in real_wavs]
    sd = unflatten_state_dict(oracle("speaker:build", seed=0, paths=paths))
    params = sparams.from_torch_state_dict(sd, CFG)
    f = oracle("speaker:real_fbanks", paths=paths)
    feats = [f[f"feat{i}"] for i in range(len(paths))]
    ref = oracle("speaker:embed", {f"feat{i}": x for i, x in enumerate(feats)}, seed=0)["emb"]
    # one frame bucket for all four wavs: one (4, 1500) program (CAM++ compiles slowly on CPU)
    enc = SpeakerEncoder(params, CFG, frame_bucket=1500)
    return {"sd": sd, "params": params, "feats": feats, "ref": ref, "enc": enc, "emb": enc.embed(feats),
            "names": [p.rsplit("/", 1)[-1] for p in paths]}


def test_parity_real_speech_batched(spk):
    emb, ref = spk["emb"], spk["ref"]
    cos = _cos(emb, ref)
    print(f"\nCAM++ full size, {len(emb)} real utterances (batched, bucketed): cosine to official "
          f"min {cos.min():.7f}, max|d| {np.abs(emb - ref).max():.2e} (|emb| max {np.abs(ref).max():.2f})")
    assert cos.min() >= 0.9999
    # embeddings depend on the speaker: the two shared prompts are different speakers
    cross = _cos(emb[0], emb[1])
    print(f"cosine between {spk['names'][0]} and {spk['names'][1]}: {cross:.3f}")
    assert cross < 0.9


def test_batch_equals_singles(spk):
    enc = spk["enc"]
    n_programs = enc.compiled_programs()
    lens = [len(f) for f in spk["feats"]]
    assert len(set(lens)) == len(lens) and max(lens) <= enc.frame_bucket  # padded rows of different lengths
    for i, f in enumerate(spk["feats"]):
        single = enc.embed([f])[0]
        assert _cos(single, spk["emb"][i]) >= 0.999999
        np.testing.assert_allclose(single, spk["emb"][i], atol=1e-4)
    assert enc.compiled_programs() == n_programs + 1  # one (1, 1500) program for all singles
    with pytest.raises(AudioError, match="kaldi fbank"):
        enc.embed([np.zeros((100, 128), np.float32)])
    with pytest.raises(AudioError, match="too short"):
        enc.embed([np.zeros((1, 80), np.float32)])


def test_converter_round_trip(spk):
    back = sparams.to_torch_state_dict(spk["params"])
    assert set(back) == set(spk["sd"])
    for k, v in spk["sd"].items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], v)
    bad = {k: v for k, v in spk["sd"].items() if k != "xvector.block2.tdnnd7.cam_layer.linear2.bias"}
    with pytest.raises(ConversionError, match="missing.*block2/tdnnd7/cam_layer/linear2/bias"):
        sparams.from_torch_state_dict(bad, CFG)


@pytest.mark.parametrize("fold", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_onnx_export_converts(oracle, spk, tmp_path, fold):
    """An eval-mode torch.onnx.export of the oracle (BatchNorms folded into the preceding convs,
    names arbitrary) converts from the graph structure and gives the official embeddings."""
    path = tmp_path / "campplus.onnx"
    rep = oracle("speaker:export_onnx", path=str(path), seed=0, fold=fold)
    n_bn_torch = sum(k.endswith("running_var") for k in spk["sd"])
    if fold:
        assert int(rep["n_bn"]) < n_bn_torch  # the export really folded BatchNorms
    else:
        assert int(rep["n_bn"]) == n_bn_torch
    params = sparams.from_onnx(path, CFG)
    enc = spk["enc"]
    keep = enc.params
    try:
        enc.params = params  # same programs, new weights
        emb = enc.embed(spk["feats"])
    finally:
        enc.params = keep
    cos = _cos(emb, spk["ref"])
    print(f"\nCAM++ from ONNX (fold={fold}, {int(rep['n_bn'])} BN nodes left of {n_bn_torch}): "
          f"cosine min {cos.min():.7f}")
    assert cos.min() >= 0.9999


def test_onnx_structure_errors(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((32, 1, 3, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    with pytest.raises(ConversionError, match="graph ends before head.layer1.0.conv1"):
        sparams.from_onnx(helper.make_model(g), CFG)
    with pytest.raises(Exception, match="does not exist"):
        sparams.from_onnx(tmp_path / "nope.onnx", CFG)
