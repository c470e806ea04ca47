"""S3Tokenizer v2 + FSQ vs the official s3tokenizer 0.3.0, full size, on real speech.

Weights: the official module with all weights re-drawn variance-preserving (``reinit_``), so the
tokens really depend on the input. Features: the official ``log_mel_spectrogram`` of each wav
(the model is tested here, the front end in its own tests).
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from oracle_client import unflatten_state_dict
from cosyvoice2_jax.config import TokenizerConfig
from cosyvoice2_jax.errors import AudioError, ConversionError
from cosyvoice2_jax.tokenizer import fsq, params as tparams
from cosyvoice2_jax.tokenizer.runtime import SpeechTokenizer

CFG = TokenizerConfig()
TINY = dict(n_audio_state=192, n_audio_head=3, n_audio_layer=2)


# ------------------------------------------------------------------------------------- FSQ (no oracle)
def test_fsq_hand_values():
    # tanh(z)*0.999 rounds to -1 below -atanh(0.5/0.999), 0 in between, +1 above
    z = jnp.asarray([[-3.0, 0.0, 3.0, 0.2, -0.2, 0.6, -0.6, 10.0]])
    # digits: 0, 1, 2, 1, 1, 2, 0, 2 -> 0*1 + 1*3 + 2*9 + 1*27 + 1*81 + 2*243 + 0*729 + 2*2187
    assert int(fsq.fsq_quantize(z)[0]) == 3 + 18 + 27 + 81 + 486 + 4374
    codes = fsq.fsq_decode(jnp.arange(6561))
    assert codes.shape == (6561, 8)
    assert set(np.unique(np.asarray(codes)).tolist()) == {-1.0, 0.0, 1.0}
    # decode is the inverse of the rounding: quantizing the code vector scaled up gives the index back
    np.testing.assert_array_equal(np.asarray(fsq.fsq_quantize(codes * 5.0)), np.arange(6561))
    with pytest.raises(ValueError, match="3 levels"):
        fsq.fsq_quantize(z, levels=5)


# ------------------------------------------------------------------------------------- full-size parity
@pytest.fixture(scope="module")
def tok(oracle, real_wavs):
    sd = unflatten_state_dict(oracle("tokenizer:build", seed=0))
    params = tparams.from_torch_state_dict(sd, CFG)
    feats = oracle("tokenizer:real_mels", paths=[str(p) for p in real_wavs])
    mels = [feats[f"mel{i}"].T for i in range(len(real_wavs))]  # (F, 128)
    return {"sd": sd, "params": params, "mels": mels, "tokenizer": SpeechTokenizer(params, CFG, frame_bucket=500)}  # 5 s groups: padded mixed rows


def _pad(mels, frames=None):
    f = frames or max(len(m) for m in mels)
    out = np.zeros((len(mels), f, 128), np.float32)
    for i, m in enumerate(mels):
        out[i, :len(m)] = m
    return out, np.array([len(m) for m in mels], np.int32)


def test_parity_real_speech_batched(oracle, tok):
    """Full-size parity through the batched API (rows grouped by 5 s buckets, padded)."""
    mels = tok["mels"]
    t = tok["tokenizer"]
    ours = t.features(mels)
    # the oracle gets the same groups (padding to the longest in each), in its (B, 128, F) layout
    groups = {}
    for i, m in enumerate(mels):
        groups.setdefault(-(-len(m) // t.frame_bucket), []).append(i)
    hid, zd, same, total = 0.0, 0.0, 0, 0
    for idx in groups.values():
        mel, lens = _pad([mels[i] for i in idx])
        ref = oracle("tokenizer:run", {"mel": mel.transpose(0, 2, 1), "lens": lens}, seed=0)
        for r, i in enumerate(idx):
            n = int(ref["lens"][r])
            assert len(ours[i]["ids"]) == n == (len(mels[i]) + 3) // 4
            hid = max(hid, float(np.abs(ours[i]["hidden"] - ref["hidden"][r, :n]).max()))
            zd = max(zd, float(np.abs(ours[i]["z"] - ref["z"][r, :n]).max()))
            same += int((ours[i]["ids"] == ref["ids"][r, :n]).sum())
            total += n
    agree = same / total
    print(f"\nS3TokenizerV2 full size, {len(mels)} real utterances, {total} tokens: hidden max|d| {hid:.2e}, "
          f"pre-quantization z max|d| {zd:.2e}, token agreement {agree:.5f} ({total - same} differ)")
    assert hid <= 1e-4 and zd <= 1e-4
    assert agree >= 0.995
    # the tokens depend on the input: many distinct codes, different utterances differ
    assert len(np.unique(ours[0]["ids"])) > 30
    n = min(len(ours[0]["ids"]), len(ours[1]["ids"]))
    assert (ours[0]["ids"][:n] != ours[1]["ids"][:n]).mean() > 0.5


def test_batch_equals_singles_and_bucketing(tok):
    t = tok["tokenizer"]
    n_programs = t.compiled_programs()
    batch = t.tokenize(tok["mels"])  # same programs as the parity test: no new compile
    assert t.compiled_programs() == n_programs
    short = [i for i, m in enumerate(tok["mels"]) if len(m) <= t.frame_bucket]
    assert len(short) >= 3  # a padded multi-row batch (2 rows of different lengths) really was compared
    for i in short:
        single = t.tokenize([tok["mels"][i]])[0]
        np.testing.assert_array_equal(batch[i], single)
    assert t.compiled_programs() <= n_programs + 1  # at most one (1, 500) program for all singles
    with pytest.raises(AudioError, match="whisper log-mel"):
        t.tokenize([np.zeros((100, 80), np.float32)])
    with pytest.raises(AudioError, match="long audio"):
        t.features([np.zeros((3001, 128), np.float32)])


def _long_audio_check(oracle, real_wavs, tokenizer, **cfg):
    feats = oracle("tokenizer:real_mels", paths=[str(p) for p in real_wavs], concat=True)
    mel = feats["mel0"].T  # (3500, 128): 35 s
    assert mel.shape[0] > 3000
    short = feats["mel0"].T[:700]
    mel_b, lens = _pad([mel, short])  # a mixed batch: one windowed row, one plain row
    ref = oracle("tokenizer:quantize", {"mel": mel_b.transpose(0, 2, 1), "lens": lens}, seed=0, **cfg)
    ours = tokenizer.tokenize([mel, short])
    same = total = 0
    for r in range(2):
        n = int(ref["lens"][r])
        assert len(ours[r]) == n
        same += int((ours[r] == ref["ids"][r, :n]).sum())
        total += n
    print(f"\nlong audio (35 s, windowed) + 7 s row: {total} tokens, agreement {same / total:.5f}")
    assert same / total >= 0.995


def test_long_audio_windowing_matches_official_tiny(oracle, real_wavs):
    """The official > 30 s windowing + merge, on a small model (the full size: slow test below)."""
    cfg = TokenizerConfig(**TINY)
    sd = unflatten_state_dict(oracle("tokenizer:build", seed=0, **TINY))
    _long_audio_check(oracle, real_wavs, SpeechTokenizer(tparams.from_torch_state_dict(sd, cfg), cfg), **TINY)


@pytest.mark.slow
def test_long_audio_windowing_matches_official(oracle, tok, real_wavs):
    _long_audio_check(oracle, real_wavs, tok["tokenizer"])


def test_converter_round_trip_and_errors(tok):
    back = tparams.to_torch_state_dict(tok["params"])
    assert set(back) == set(tok["sd"])
    for k, v in tok["sd"].items():
        np.testing.assert_array_equal(back[k], v)
    bad = dict(tok["sd"])
    bad.pop("encoder.blocks.3.attn.key.weight")
    bad["encoder.blocks.0.attn.key.bias"] = np.zeros(1280, np.float32)
    with pytest.raises(ConversionError, match=r"missing.*blocks_3/attn/key/kernel"):
        tparams.from_torch_state_dict(bad, CFG)
    with pytest.raises(ConversionError, match="unexpected"):
        tparams.from_torch_state_dict(bad, CFG)


@pytest.mark.parametrize("size,ln_ops", [("tiny", False), ("tiny", True),
                                         pytest.param("full", False, marks=pytest.mark.slow)])
def test_onnx_release_layout(oracle, tmp_path, size, ln_ops):
    """A graph laid out like the release's speech_tokenizer_v2.onnx (which the official
    ``onnx2torch`` reads back exactly) converts to the same params as the torch state dict;
    also with LayerNorms exported op by op."""
    kw = TINY if size == "tiny" else {}
    cfg = TokenizerConfig(**kw)
    path = tmp_path / "speech_tokenizer_v2.onnx"
    rep = oracle("tokenizer:write_release_onnx", path=str(path), seed=1, ln_ops=ln_ops, **kw)
    assert bool(rep["same_keys"]) and float(rep["max_diff"]) == 0.0
    sd = unflatten_state_dict(oracle("tokenizer:build", seed=1, **kw))
    want = tparams.from_torch_state_dict(sd, cfg)
    got = tparams.from_onnx(path, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, got)
    with pytest.raises(Exception, match="does not exist"):
        tparams.from_onnx(tmp_path / "missing.onnx", cfg)
