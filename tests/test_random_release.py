"""The random-weight release directory (``scripts/make_random_release.py``) and the official
end-to-end reference (``tests/oracle/pipeline.py``).

One tiny release is built per module by the official modules; the tests check that our loaders
read every file of it strictly, that the configs inferred from its yaml / config.json / ONNX
files are the ones it was made with, and that the official pipeline assembled on it runs.
Full-size ONNX configs: ``pytest tests/test_random_release.py -m slow``.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cosyvoice2_jax.config import SpeakerConfig, ModelConfig, TokenizerConfig
from cosyvoice2_jax.errors import ConversionError
from cosyvoice2_jax.pipeline.release import check_release_dir, config_from_release_yaml, qwen_config_from_dir

from conftest import load_script


mrr = load_script("make_random_release")


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.8 * t)) / 16000
    env = (1 + np.sin(2 * np.pi * 3.5 * t)) / 2
    wav = 0.2 * env * sum(np.sin(k * phase) / k for k in range(1, 8)) + 0.005 * rng.standard_normal(t.shape)
    return wav.astype(np.float32)


@pytest.fixture(scope="module")
def release(tiny_release):
    return tiny_release  # conftest: one per session, shared with tests/test_flow_study.py


# ----------------------------------------------------------------------------------- layout, yaml
def test_layout_and_yaml_config(release, oracle):
    out, summary = release
    paths = check_release_dir(out)
    assert paths.spk2info is not None
    cfg = config_from_release_yaml(paths.yaml)
    lm = dataclasses.replace(cfg.llm, qwen=qwen_config_from_dir(paths.tokenizer_dir).qwen)
    want = mrr.tiny_release_config()
    assert lm == want.llm
    assert cfg.flow == want.flow
    assert cfg.hift == want.hift
    # the tiny release is ModelConfig.tiny() except what the official classes hard-code
    tiny = ModelConfig.tiny()
    assert want.llm == tiny.llm and want.hift == tiny.hift and want.tokenizer == tiny.tokenizer
    assert want.speaker == tiny.speaker
    assert want.flow.decoder == tiny.flow.decoder and want.flow.encoder.num_blocks == tiny.flow.encoder.num_blocks
    # the official CosyVoice2 loading path (load_hyperpyyaml + CosyVoice2Model.load + llm.pt) accepts it
    off = oracle("pipeline:load_official", model_dir=str(out))
    assert int(off["sample_rate"]) == 24000
    assert sorted(off["spks"].tolist()) == sorted(mrr.SPEAKERS)
    for part in ("llm", "flow", "hift"):
        assert int(off[f"n_params_{part}"]) == summary["params"][part]


def test_release_yaml_full_dims():
    """The full-size yaml text describes ModelConfig.cosyvoice2() (read as data; no torch needed)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "cosyvoice2.yaml"
        p.write_text(mrr.release_yaml(mrr.FULL), encoding="utf-8")
        cfg = config_from_release_yaml(p)
        (Path(d) / "config.json").write_text(json.dumps(mrr.FULL.qwen))
        lm = dataclasses.replace(cfg.llm, qwen=qwen_config_from_dir(d).qwen)
    full = ModelConfig.cosyvoice2()
    assert lm == full.llm and cfg.flow == full.flow and cfg.hift == full.hift


# ----------------------------------------------------------------------------------- weights
def test_checkpoints_load_strictly(release):
    from cosyvoice2_jax.flow import params as flow_params
    from cosyvoice2_jax.hift import params as hift_params
    from cosyvoice2_jax.llm import params as llm_params
    from cosyvoice2_jax.params_util import load_torch_checkpoint

    out, summary = release
    want = mrr.tiny_release_config()

    def count(tree):
        import jax

        return sum(int(np.size(x)) for x in jax.tree.leaves(tree))

    lm = llm_params.from_release(out / "llm.pt", want.llm)
    assert count(lm) == summary["params"]["llm"]  # lm_head is tied to embed_tokens: counted once
    flow = flow_params.from_release(out / "flow.pt", want.flow)
    assert count(flow) == summary["params"]["flow"]
    sd = load_torch_checkpoint(out / "hift.pt")
    assert "conv_pre.weight_g" in sd and not any("parametrizations" in k for k in sd)  # release spelling
    hift = hift_params.from_torch(sd, want.hift)
    assert count(hift) == summary["params"]["hift"]
    with pytest.raises(ConversionError):
        flow_params.from_release(out / "flow.pt", ModelConfig.tiny().flow)  # 64-wide encoder: shapes differ


def test_spk2info_readable(release):
    from cosyvoice2_jax.torch_pt import load_pt

    out, _ = release
    info = load_pt(out / "spk2info.pt")
    assert sorted(info) == sorted(mrr.SPEAKERS)
    for v in info.values():
        emb = np.asarray(v["embedding"])
        assert emb.shape == (1, 192) and emb.dtype == np.float32 and np.isfinite(emb).all()


# ----------------------------------------------------------------------------------- ONNX
def test_onnx_configs_and_weights(release):
    from cosyvoice2_jax.speaker import params as cam_params
    from cosyvoice2_jax.tokenizer import params as tok_params

    out, _ = release
    want = mrr.tiny_release_config()
    tcfg = tok_params.config_from_release(out / "speech_tokenizer_v2.onnx")
    assert tcfg == ModelConfig.tiny().tokenizer == want.tokenizer
    tok_params.from_onnx(out / "speech_tokenizer_v2.onnx", tcfg)
    ccfg = cam_params.config_from_release(out / "campplus.onnx")
    assert ccfg == want.speaker == ModelConfig.tiny().speaker
    cam_params.from_onnx(out / "campplus.onnx", ccfg)
    with pytest.raises(ConversionError, match="S3Tokenizer"):
        tok_params.config_from_release(out / "campplus.onnx")
    with pytest.raises(ConversionError, match="CAM"):
        cam_params.config_from_release(out / "speech_tokenizer_v2.onnx")


@pytest.mark.slow
def test_onnx_configs_full_size(oracle, tmp_path):
    """The release sizes come back from full-size files written by the same writers."""
    from cosyvoice2_jax.speaker import params as cam_params
    from cosyvoice2_jax.tokenizer import params as tok_params

    oracle("tokenizer:write_release_onnx", path=str(tmp_path / "tok.onnx"), seed=0)
    assert tok_params.config_from_release(tmp_path / "tok.onnx") == TokenizerConfig()
    oracle("speaker:export_release_onnx", path=str(tmp_path / "cam.onnx"), seed=0)
    assert cam_params.config_from_release(tmp_path / "cam.onnx") == SpeakerConfig()


# ----------------------------------------------------------------------------------- official e2e
PROMPT = _speechlike(1.0)


@pytest.fixture(scope="module")
def zero_shot(release, oracle):
    out, _ = release
    noise = np.random.default_rng(0).standard_normal((24000 * 8, 9)).astype(np.float32)
    return oracle("pipeline:tts", {"prompt_wav_16k": PROMPT, "hift_noise": noise}, model_dir=str(out),
                  mode="zero_shot", tts_text="Hi there.", prompt_text="Quick fox.", stream=False)


def test_official_zero_shot_runs(release, zero_shot):
    from cosyvoice2_jax.frontend.text import QwenTextTokenizer

    out, _ = release
    res = zero_shot
    tokens = res["tokens"]
    assert int(res["n_chunks"]) == 1 and len(tokens) > 0
    assert ((tokens >= 0) & (tokens < 6561)).all()
    n_text = len(res["text_token"])
    assert 2 * n_text <= len(tokens) <= 20 * n_text  # official min/max token-text ratios
    audio = res["chunk_0"]
    assert abs(len(audio) - len(tokens) * 2 * 480) <= 25 * 2 * 480
    assert len(audio) == len(tokens) * 2 * 480  # non-streaming: every token's two mel frames
    assert np.isfinite(audio).all() and 1e-3 < np.abs(audio).max() < 1.0 and audio.std() > 1e-4
    assert res["schedule"].tolist() == [[0, len(tokens), 0, 1]]
    # frontend intermediates: the prompt is 1 s = 25 tokens, 50 mel frames; text from our tokenizer
    assert len(res["prompt_speech_token"]) == 25 and res["prompt_speech_feat"].shape == (50, 80)
    tok = QwenTextTokenizer.from_dir(out / "CosyVoice-BlankEN")
    assert res["text_token"].tolist() == tok.encode("Hi there.")
    assert res["prompt_text_token"].tolist() == tok.encode("Quick fox.")


def test_release_onnx_models_match_official_frontend(release, zero_shot, oracle):
    """Our tokenizer / CAM++ built from the release's ONNX files (inferred configs) give the
    official frontend's prompt tokens (s3tokenizer torch model read from the same ONNX) and
    speaker embedding (onnxruntime on campplus.onnx)."""
    from cosyvoice2_jax.speaker import params as cam_params
    from cosyvoice2_jax.speaker.runtime import SpeakerEncoder
    from cosyvoice2_jax.tokenizer import params as tok_params
    from cosyvoice2_jax.tokenizer.runtime import SpeechTokenizer

    out, _ = release
    tcfg = tok_params.config_from_release(out / "speech_tokenizer_v2.onnx")
    tokenizer = SpeechTokenizer(tok_params.from_onnx(out / "speech_tokenizer_v2.onnx", tcfg), tcfg)
    ours = tokenizer.tokenize_wavs([PROMPT])[0]
    np.testing.assert_array_equal(ours[:25], zero_shot["prompt_speech_token"])
    ccfg = cam_params.config_from_release(out / "campplus.onnx")
    enc = SpeakerEncoder(cam_params.from_onnx(out / "campplus.onnx", ccfg), ccfg)
    feat = oracle("frontend:kaldi_fbank", {"wav": PROMPT})["feat"]
    emb = enc.embed([feat])[0]
    ref = zero_shot["embedding"]
    assert np.abs(emb - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max()), np.abs(emb - ref).max()


# ----------------------------------------------------------------------------------- CLI behaviour
def test_refuses_non_empty_dir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(mrr.ReleaseWriteError, match="not empty.*--overwrite"):
        mrr.make_release(tmp_path, "tiny")
    assert mrr.main([str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(mrr.ReleaseWriteError, match="--size"):
        mrr.make_release(tmp_path / "new", "huge")


def test_overwrite_replaces_only_release_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "llm.pt").write_text("old")
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "vocab.json").write_text("{}")
    mrr._prepare(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_missing_oracle_env_is_explained(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COSYVOICE2_ORACLE_PYTHON", str(tmp_path / "no-such-python"))
    assert mrr.main([str(tmp_path / "out")]) == 2
    assert "scripts/setup_oracle_env.sh" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_official_all_modes(release, oracle, stream):
    """Every mode of the official reference runs; streaming follows the official schedule (first
    hop padded so prompt + hop is a multiple of 25, +3 lookahead tokens, fixed hop 25 in the
    packaged CosyVoice2Model) and the chunks add up to two mel frames (960 samples) per token."""
    out, _ = release
    noise = np.random.default_rng(0).standard_normal((24000 * 8, 9)).astype(np.float32)
    base = {"prompt_wav_16k": _speechlike(1.0), "hift_noise": noise}
    cases = [("sft", dict(spk_id=mrr.SPEAKERS[0])), ("cross_lingual", {}),
             ("instruct2", dict(instruct_text="Speak slowly.")), ("zero_shot", dict(prompt_text="Quick fox.")),
             ("zero_shot", dict(prompt_text="Quick fox.", tts_text_pieces=["Hi ", "there."], bistream_max_tokens=60)),
             ("vc", {})]
    for mode, kw in cases:
        inputs = dict(base, source_wav_16k=_speechlike(1.6, seed=3)) if mode == "vc" else base
        res = oracle("pipeline:tts", inputs, model_dir=str(out), mode=mode, tts_text="Hi there.", stream=stream, **kw)
        n = len(res["tokens"])
        chunks = [res[f"chunk_{i}"] for i in range(int(res["n_chunks"]))]
        assert sum(len(c) for c in chunks) == n * 960, (mode, kw)
        sched = res["schedule"]
        assert sched[-1, 3] == 1 and (sched[:-1, 3] == 0).all()
        if stream:
            hop, pad = int(res["token_hop_len"]), (-len(res["prompt_speech_token"])) % 25
            offsets = [0] + [hop + pad + hop * i for i in range(len(sched) - 1)]
            assert sched[:, 2].tolist() == offsets
            assert (sched[:-1, 1] == sched[:-1, 2] + np.where(sched[:-1, 2] == 0, hop + pad, hop) + 3).all()
            assert sched[-1, 1] == n
        else:
            assert sched.tolist() == [[0, n, 0, 1]]
        if mode == "vc":
            assert n == 40 and len(res["source_speech_token"]) == 40  # 1.6 s of source speech
