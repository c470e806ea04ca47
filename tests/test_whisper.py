"""Whisper ASR (cosyvoice2_jax/whisper): parity with transformers' PyTorch Whisper on random weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cosyvoice2_jax.errors import ConfigError, ReleaseDirError
from cosyvoice2_jax import whisper as W

TINY, GEN = W.params.TINY_HF_CONFIG, W.params.TINY_GENERATION


def make_tiny_whisper(d, oracle=None, seed=0):
    """A tiny random Whisper HF directory: drawn by transformers (oracle) or by our own init."""
    if oracle is None:
        return W.params.save_random_hf_dir(d, seed)
    oracle("hf_whisper:build", config=TINY, out_dir=str(d), seed=seed)
    W.params.write_byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf_dir(oracle, tmp_path_factory):
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny", oracle)


def _speechlike(n, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) * (1 + np.sin(2 * np.pi * 3 * t))
            + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_logits_and_greedy_match_transformers(hf_dir, oracle):
    asr = W.WhisperASR.from_dir(hf_dir, max_batch=4)
    cfg = asr.config
    assert cfg.n_frames == 200 and asr.prompt_ids("en") == [257, 258, 260, 262]
    wavs = [_speechlike(n, i) for i, n in enumerate((8000, 32000, 40000))]  # short, full, cut
    feats = np.stack([asr.features(w) for w in wavs])
    assert feats.shape == (3, 200, 80)
    # our front end == HF WhisperFeatureExtractor on the padded wave
    ref = oracle("hf_whisper:features", {"wav": wavs[0]}, n_mels=80, n_samples=32000)["features"]
    np.testing.assert_allclose(feats[0], ref, atol=2e-4)
    # teacher-forced logits
    tokens = np.random.default_rng(0).integers(0, 264, (3, 12)).astype(np.int32)
    want = oracle("hf_whisper:logits", {"features": feats, "tokens": tokens}, path=str(hf_dir))["logits"]
    import jax

    got = np.asarray(jax.jit(asr.model.apply)({"params": asr.params}, feats, tokens))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # greedy tokens on the KV cache == HF's argmax loop on its own cache
    max_new = 40 - 4
    want = oracle("hf_whisper:greedy", {"features": feats, "prompt": np.asarray(asr.prompt_ids("en"), np.int32)},
                  path=str(hf_dir), max_new=max_new, suppress=[263], begin_suppress=[32])["tokens"]
    got = asr.generate(wavs, language="en")
    for g, w in zip(got, want):
        stop = np.flatnonzero(w == 256)
        assert g == w[: stop[0] if stop.size else max_new].tolist()
    assert asr.compiled_programs() == 2  # batch 3 = 2 + 1


def test_roundtrip_text_and_errors(tmp_path):
    import jax
    from cosyvoice2_jax.whisper.runtime import _byte_decoder

    d = make_tiny_whisper(tmp_path / "w")
    asr = W.WhisperASR.from_dir(d)
    cfg = asr.config
    sd = W.to_release(asr.params)
    assert "proj_out.weight" not in sd and sd["model.decoder.embed_tokens.weight"].shape == (264, 32)
    back = W.from_release(sd, cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), back, asr.params))
    # text: byte-level tokens, specials (>= eot) dropped, UTF-8 reassembled
    by_byte = {b: tid for c, b in _byte_decoder().items() for tid in [json.loads((d / "vocab.json").read_text())[c]]}
    ids = [258, 262] + [by_byte[b] for b in " héllo 你好".encode()] + [256]
    assert asr.text.decode(ids) == "héllo 你好"
    assert asr.prompt_ids(None) == [257, 260, 262]
    with pytest.raises(ConfigError, match="no language 'xx'.*en, zh"):
        asr.prompt_ids("xx")
    with pytest.raises(ReleaseDirError, match="config.json missing"):
        W.WhisperASR.from_dir(tmp_path)
    (d / "model.safetensors").rename(d / "other.bin")
    with pytest.raises(ReleaseDirError, match="no Whisper weights"):
        W.WhisperASR.from_dir(d)
