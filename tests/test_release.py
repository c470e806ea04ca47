"""Release directory checks and the hyperpyyaml config reader (no code in the YAML runs)."""
from __future__ import annotations

import json

import pytest

from cosyvoice2_jax.config import ModelConfig, Solver
from cosyvoice2_jax.errors import ReleaseDirError
from cosyvoice2_jax.pipeline import release as R

# A config in the release's hyperpyyaml style, written for this test: tags construct objects in
# the official loader; here they must be read as data, refs and arithmetic resolved.
YAML = """
__set_seed1: !apply:random.seed [1986]
sample_rate: 24000
llm_input_size: 896
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 20
        win_size: 10
        tau_r: 0.1
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: 8
        linear_units: 1024
        num_blocks: 3
        input_size: 512
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.5
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [128]
            attention_head_dim: 64
            n_blocks: 2
            num_mid_blocks: 6
            num_heads: 4
            act_fn: 'gelu'
            static_chunk_size: !ref <token_frame_rate> * <token_mel_ratio>
            num_decoding_left_chunks: 2
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 256
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 256
"""


def test_release_yaml_maps_onto_config(tmp_path):
    p = tmp_path / "cosyvoice2.yaml"
    p.write_text(YAML)
    c = R.config_from_release_yaml(p)
    assert c.llm.sampling.top_k == 20 and c.llm.mix_ratio == (5, 15)
    assert c.flow.encoder.linear_units == 1024 and c.flow.encoder.num_blocks == 3
    assert c.flow.decoder.static_chunk_size == 50  # !ref <a> * <b> resolved
    assert c.flow.decoder.channels == (128,) and c.flow.decoder.num_decoding_left_chunks == 2
    assert c.flow.cfm.inference_cfg_rate == 0.5 and c.flow.cfm.solver is Solver.EULER
    assert c.flow.cfm.sigma_min == 1e-6
    assert c.hift.base_channels == 256 and c.hift.f0_predictor.cond_channels == 256
    assert c.hift.resblock_dilation_sizes == ((1, 3, 5),) * 3
    # unspecified values keep the official defaults
    assert c.llm.qwen == ModelConfig.cosyvoice2().llm.qwen and c.hift.nsf_alpha == 0.1


def test_qwen_sizes_from_tokenizer_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                      "num_hidden_layers": 2, "num_key_value_heads": 2,
                                                      "intermediate_size": 128, "vocab_size": 1024}))
    q = R.qwen_config_from_dir(tmp_path).qwen
    assert (q.hidden_size, q.head_dim, q.num_hidden_layers, q.vocab_size) == (64, 16, 2, 1024)


def test_release_dir_errors_list_everything(tmp_path):
    with pytest.raises(ReleaseDirError, match="does not exist"):
        R.check_release_dir(tmp_path / "nope")
    (tmp_path / "llm.pt").write_bytes(b"")
    (tmp_path / "flow.pt").write_bytes(b"x")
    with pytest.raises(ReleaseDirError) as e:
        R.check_release_dir(tmp_path)
    msg = str(e.value)
    for part in ("cosyvoice2.yaml missing", "llm.pt is empty", "hift.pt missing", "campplus.onnx missing",
                 "speech_tokenizer_v2.onnx missing", "CosyVoice-BlankEN/ missing"):
        assert part in msg, msg
    bad = tmp_path / "cfg.yaml"
    bad.write_text("just: [unclosed\n")
    with pytest.raises(ReleaseDirError, match="not a readable hyperpyyaml"):
        R.read_release_yaml(bad)
    bad.write_text("sample_rate: 24000\n")
    with pytest.raises(ReleaseDirError, match="no 'llm' section"):
        R.config_from_release_yaml(bad)


def test_converted_dir_of_format_1_reads_under_todays_names(tmp_path):
    """Converted directories (and caches) written before the components had one name each
    (format 1: params ``speech_tokenizer`` / ``campplus``, config ``lm:`` / ``campplus:``) load."""
    import numpy as np
    import orbax.checkpoint as ocp
    import yaml

    from cosyvoice2_jax.config import to_dict
    from cosyvoice2_jax.pipeline import loading as L

    out = tmp_path / "old"
    out.mkdir()
    cfg = to_dict(ModelConfig.tiny())
    cfg["lm"], cfg["campplus"] = cfg.pop("llm"), cfg.pop("speaker")
    cfg["streaming"]["source_cache_len"] = 3840
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    old_keys = ("llm", "flow", "hift", "speech_tokenizer", "campplus")
    with ocp.StandardCheckpointer() as ck:
        ck.save(out / "params", {k: {"w": np.full((2,), i, np.float32)} for i, k in enumerate(old_keys)})
        ck.wait_until_finished()
    (out / L.MARKER).write_text(json.dumps({"format": 1, "source": ""}))
    loaded = L.read_converted(out)
    assert loaded.config == ModelConfig.tiny()
    assert list(loaded.params) == list(L.COMPONENTS)
    assert [float(loaded.params[k]["w"][0]) for k in L.COMPONENTS] == [0, 1, 2, 3, 4]
    (out / L.MARKER).write_text(json.dumps({"format": 0, "source": ""}))
    with pytest.raises(ReleaseDirError, match="another cosyvoice2_jax format"):
        L.read_converted(out)
