"""Configs: official values, YAML round trip, strict errors, overrides."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from cosyvoice2_jax.config import (CFMConfig, ModelConfig, Solver, TScheduler, apply_overrides, from_dict,
                                   to_dict)
from cosyvoice2_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_official_yaml_gives_design_values():
    c = ModelConfig.from_yaml(ROOT / "configs" / "cosyvoice2-0.5b.yaml")
    assert c == ModelConfig.cosyvoice2()
    q = c.llm.qwen
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.num_key_value_heads, q.head_dim,
            q.intermediate_size, q.vocab_size, q.rope_theta, q.rms_norm_eps, q.qkv_bias) == \
        (896, 24, 14, 2, 64, 4864, 151936, 1e6, 1e-6, True)
    assert c.llm.speech_token_size == 6561 and c.llm.speech_vocab == 6564 and c.llm.fill_token == 6563
    assert c.llm.eos_token == 6561 and c.llm.mix_ratio == (5, 15)
    s = c.llm.sampling
    assert (s.top_p, s.top_k, s.win_size, s.tau_r) == (0.8, 25, 10, 0.1)
    assert (c.llm.min_token_text_ratio, c.llm.max_token_text_ratio) == (2, 20)
    f = c.flow
    assert (f.input_size, f.output_size, f.spk_embed_dim, f.pre_lookahead_len, f.token_mel_ratio) == (512, 80, 192, 3, 2)
    e = f.encoder
    assert (e.num_blocks, e.num_up_blocks, e.output_size, e.attention_heads, e.linear_units, e.static_chunk_size) == \
        (6, 4, 512, 8, 2048, 25)
    d = f.decoder
    assert (d.in_channels, d.channels, d.n_blocks, d.num_mid_blocks, d.num_heads, d.attention_head_dim,
            d.act_fn, d.static_chunk_size) == (320, (256,), 4, 12, 8, 64, "gelu", 50)
    m = f.cfm
    assert (m.sigma_min, m.solver, m.t_scheduler, m.training_cfg_rate, m.inference_cfg_rate, m.n_timesteps) == \
        (1e-6, Solver.EULER, TScheduler.COSINE, 0.2, 0.7, 10)
    h = c.hift
    assert (h.base_channels, h.nb_harmonics, h.upsample_rates, h.upsample_kernel_sizes, h.istft_n_fft,
            h.istft_hop_len, h.resblock_kernel_sizes, h.source_resblock_kernel_sizes, h.nsf_alpha, h.nsf_sigma,
            h.nsf_voiced_threshold, h.audio_limit, h.f0_predictor.cond_channels) == \
        (512, 8, (8, 5, 3), (16, 11, 7), 16, 4, (3, 7, 11), (7, 7, 11), 0.1, 0.003, 10, 0.99, 512)
    assert h.hop_size == 480
    assert c.tokenizer.codebook_size == 6561 and c.tokenizer.n_mels == 128
    assert c.speaker.embedding_size == 192
    mel = c.mel
    assert (mel.n_fft, mel.hop_size, mel.win_size, mel.num_mels, mel.fmin, mel.fmax, mel.sample_rate) == \
        (1920, 480, 1920, 80, 0, 8000, 24000)
    st = c.streaming
    assert (st.token_hop_len, st.token_max_hop_len, st.mel_cache_len, c.source_cache_len) == (25, 100, 8, 3840)
    # one source of truth for the look-ahead: the encoder's (the flow and the runtime derive it)
    assert not hasattr(st, "pre_lookahead_len") and c.flow.encoder.pre_lookahead_len == 3
    assert ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml", ["flow.encoder.pre_lookahead_len=2"]).flow.pre_lookahead_len == 2


def test_shipped_yaml_files_are_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    import write_configs

    for name in ("cosyvoice2-0.5b.yaml", "tiny.yaml"):
        assert (ROOT / "configs" / name).read_text(encoding="utf-8") == write_configs.render(name), \
            f"configs/{name} is stale: run python scripts/write_configs.py"
    assert ModelConfig.from_yaml(ROOT / "configs" / "tiny.yaml") == ModelConfig.tiny()


def test_yaml_round_trip(tmp_path):
    c = apply_overrides(ModelConfig.tiny(), ["flow.cfm.solver=heun", "hift.upsample_kernel_sizes=[16,11,9]"])
    p = tmp_path / "c.yaml"
    c.to_yaml(p)
    assert ModelConfig.from_yaml(p) == c


def test_overrides():
    c = apply_overrides(ModelConfig.cosyvoice2(), ["flow.cfm.inference_cfg_rate=0.5", "llm.sampling.top_k=10",
                                                   "flow.cfm.t_scheduler=linear", "llm.scan_layers=true"])
    assert c.flow.cfm.inference_cfg_rate == 0.5 and c.llm.sampling.top_k == 10
    assert c.flow.cfm.t_scheduler is TScheduler.LINEAR and c.llm.scan_layers is True
    assert c.flow.encoder == ModelConfig.cosyvoice2().flow.encoder  # untouched parts unchanged
    # int given for a float field is accepted and converted
    assert apply_overrides(c, ["flow.cfm.inference_cfg_rate=1"]).flow.cfm.inference_cfg_rate == 1.0


@pytest.mark.parametrize("data,msg", [
    ({"llm": {"qwen": {"hiden_size": 8}}}, r"unknown config key 'llm\.qwen\.hiden_size'"),
    ({"flow": {"cfm": {"solver": "rk45"}}}, r"'flow\.cfm\.solver'.*not one of"),
    ({"llm": {"qwen": {"num_hidden_layers": "24"}}}, r"'llm\.qwen\.num_hidden_layers' must be an integer"),
    ({"llm": {"qwen": {"num_hidden_layers": 2.5}}}, r"must be an integer"),
    ({"llm": {"scan_layers": "yes"}}, r"'llm\.scan_layers' must be true/false"),
    ({"hift": {"upsample_rates": 8}}, r"'hift\.upsample_rates' must be a list"),
    ({"llm": {"mix_ratio": [5, 15, 3]}}, r"'llm\.mix_ratio' must have 2 items"),
    ({"flow": 3}, r"'flow' must be a mapping"),
    ({"sample_rate": True}, r"'sample_rate' must be an integer"),
])
def test_bad_config_names_the_key(data, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(ModelConfig, data)


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'flow.cfm.nope'"):
        apply_overrides(ModelConfig.tiny(), ["flow.cfm.nope=1"])
    with pytest.raises(ConfigError, match="unknown config key 'flwo'"):
        apply_overrides(ModelConfig.tiny(), ["flwo.cfm.solver=euler"])
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides(ModelConfig.tiny(), ["flow.cfm.solver"])
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lm: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ModelConfig.from_yaml(bad)


def test_to_dict_is_plain():
    d = to_dict(CFMConfig())
    assert d["solver"] == "euler" and d["t_scheduler"] == "cosine"


def test_old_files_load_under_new_names(tmp_path):
    """Files written before the components had one name (``lm:``, ``campplus:``, a stated
    ``streaming.source_cache_len``) still load; contradicting the derived value is an error."""
    old = to_dict(ModelConfig.tiny())
    old["lm"], old["campplus"] = old.pop("llm"), old.pop("speaker")
    old["streaming"]["source_cache_len"] = 3840
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump(old))
    assert ModelConfig.from_yaml(p) == ModelConfig.tiny()
    old["streaming"]["source_cache_len"] = 1000
    p.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="source_cache_len = 1000 is no longer a setting"):
        ModelConfig.from_yaml(p)
    old["llm"] = old["lm"]
    p.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="both 'lm'"):
        ModelConfig.from_yaml(p)


def test_shared_values_must_agree():
    import dataclasses

    c = ModelConfig.tiny()
    with pytest.raises(ConfigError, match=r"flow.spk_embed_dim = 192 but speaker.embedding_size = 64"):
        dataclasses.replace(c, speaker=dataclasses.replace(c.speaker, embedding_size=64))
    with pytest.raises(ConfigError, match=r"hift.in_channels = 80 but flow.output_size = 100"):
        apply_overrides(c, ["flow.output_size=100", "mel.num_mels=100"])
