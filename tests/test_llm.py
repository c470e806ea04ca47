"""Qwen2 backbone, Qwen2LM training forward / DPO and the llm.pt converter vs the official code.

Tiny config (2 layers, hidden 64) against transformers ``Qwen2ForCausalLM`` and the official
``cosyvoice.llm.llm.Qwen2LM`` on the same random weights (oracle). Full size: shapes only here
(``jax.eval_shape``); the full-size hidden-state parity is ``tests/test_llm_slow.py``.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.config import LLMConfig, ModelConfig
from cosyvoice2_jax.errors import ConversionError
from cosyvoice2_jax.llm import modeling as M
from cosyvoice2_jax.llm import objectives as O
from cosyvoice2_jax.llm import params as P
from oracle_client import unflatten_state_dict

CFG = ModelConfig.tiny().llm
SEED = 3


def qwen_json(cfg: LLMConfig) -> str:
    q = cfg.qwen
    return json.dumps(dict(vocab_size=q.vocab_size, hidden_size=q.hidden_size,
                           intermediate_size=q.intermediate_size, num_hidden_layers=q.num_hidden_layers,
                           num_attention_heads=q.num_attention_heads,
                           num_key_value_heads=q.num_key_value_heads, rope_theta=q.rope_theta,
                           rms_norm_eps=q.rms_norm_eps))


@pytest.fixture(scope="module")
def official_sd(oracle):
    return unflatten_state_dict(oracle("llm:build", cfg=qwen_json(CFG), seed=SEED))


@pytest.fixture(scope="module")
def params(official_sd):
    return P.from_release(official_sd, CFG)


def _batch(rng, b=4, lmax=9, smax=40):
    text_len = np.array([9, 4, 5, 7][:b], np.int64)
    speech_len = np.array([40, 30, 16, 11][:b], np.int64)
    text = rng.integers(0, CFG.qwen.vocab_size, (b, lmax))
    speech = rng.integers(0, CFG.speech_token_size, (b, smax))
    for i in range(b):
        text[i, text_len[i]:] = 0
        speech[i, speech_len[i]:] = 0
    return dict(text_token=text, text_token_len=text_len, speech_token=speech, speech_token_len=speech_len)


# ----------------------------------------------------------------------------------- backbone
def test_backbone_hidden_states_match_transformers(oracle, params):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 11, CFG.qwen.hidden_size)).astype(np.float32)
    lengths = np.array([11, 7, 1])
    ref = oracle("llm:hidden", {"x": x, "lengths": lengths}, cfg=qwen_json(CFG), seed=SEED)["h"]
    model = M.Qwen2LM(CFG)
    h = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(lengths), method=M.Qwen2LM.hidden_states)
    for i, n in enumerate(lengths):  # all valid positions (HF computes padded rows too: compare them as well)
        np.testing.assert_allclose(np.asarray(h[i, :n]), ref[i, :n], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(h), ref, atol=2e-5, rtol=1e-5)
    # the output depends on the inputs (weights are not degenerate)
    assert np.abs(ref[0, 3] - ref[0, 4]).max() > 0.1


def test_scan_layers_equals_unrolled(params):
    cfg_s = dataclasses.replace(CFG, scan_layers=True)
    ps = M.stack_layers(params, CFG.qwen.num_hidden_layers)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, CFG.qwen.hidden_size))
    lens = jnp.array([6, 3])
    a = jax.jit(M.Qwen2LM(CFG).apply)({"params": params}, x, lens)
    b = jax.jit(M.Qwen2LM(cfg_s).apply)({"params": ps}, x, lens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    back = M.unstack_layers(ps, CFG.qwen.num_hidden_layers)
    assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), back, params))


def test_logical_axes_on_every_param():
    boxed = M.abstract_params(CFG, boxed=True)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(x, "names") and len(x.names) == len(x.value.shape) for x in leaves)
    boxed_s = M.abstract_params(dataclasses.replace(CFG, scan_layers=True), boxed=True)
    layer = boxed_s["llm"]["model"]["model"]["layers"]["layer"]["self_attn"]["q_proj"]["weight"]
    assert layer.names == ("layers", "heads", "embed")


def test_full_size_shapes_eval_shape():
    cfg = ModelConfig.cosyvoice2().llm
    tree = M.abstract_params(cfg)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    qwen = tree["llm"]["model"]["model"]
    assert qwen["embed_tokens"]["embedding"].shape == (151936, 896)
    assert qwen["layers_23"]["self_attn"]["k_proj"]["weight"].shape == (128, 896)
    assert qwen["layers_0"]["mlp"]["down_proj"]["weight"].shape == (896, 4864)
    assert tree["llm_decoder"]["weight"].shape == (6564, 896)
    # 494.0M Qwen2.5-0.5B without the tied head + 2*6564*896 + 6564 + 2*896 (505.8M with it)
    assert n == 494_032_768 + 2 * 6564 * 896 + 6564 + 2 * 896


# ----------------------------------------------------------------------------------- converter
def test_converter_round_trip_is_identity(official_sd, params):
    sd = {k: np.asarray(v) for k, v in official_sd.items()}
    back = P.to_release(params, CFG)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # scanned layout converts too
    cfg_s = dataclasses.replace(CFG, scan_layers=True)
    ps = P.from_release(sd, cfg_s)
    back_s = P.to_release(ps, cfg_s)
    assert all(np.array_equal(back_s[k], sd[k]) for k in sd)


def test_converter_is_strict(official_sd):
    sd = {k: np.asarray(v) for k, v in official_sd.items()}
    bad = dict(sd)
    bad.pop("llm.model.model.layers.1.mlp.up_proj.weight")
    bad["llm.extra.weight"] = np.zeros(3, np.float32)
    bad["llm_decoder.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ConversionError, match=r"(?s)unexpected.*llm\.extra\.weight.*missing.*"
                                              r"layers_1/mlp/up_proj/weight.*shape mismatch.*llm_decoder/bias"):
        P.from_release(bad, CFG)


# ----------------------------------------------------------------------------------- Qwen2LM forward
@pytest.fixture(scope="module")
def lm_batch():
    rng = np.random.default_rng(1)
    b = _batch(rng)
    rej_len = np.array([33, 12, 20, 9])
    rej = rng.integers(0, CFG.speech_token_size, (4, 33))
    for i in range(4):
        rej[i, rej_len[i]:] = 0
    b.update(reject_speech_token=rej, reject_speech_token_len=rej_len)
    return b


@pytest.fixture(scope="module")
def lm_ref(oracle, lm_batch):
    # rows 0, 1, 2 qualify for bistream (speech/text > 3): u < 0.5 picks it for rows 0 and 2 (row 2 has
    # Lt = 5: one full chunk and an empty text tail), 0.7 keeps row 1 unistream
    u = np.array([0.2, 0.7, 0.1, 0.3])
    u_dpo = np.array([0.9, 0.1, 0.1, 0.2, 0.3, 0.2, 0.5, 0.4])
    out = oracle("llm:forward", {**lm_batch, "uniforms": u, "dpo_uniforms": u_dpo}, cfg=qwen_json(CFG), seed=SEED)
    return out, u, u_dpo


_forward = jax.jit(lambda p, b, bi, t: O.lm_forward(M.Qwen2LM(CFG), p, b, bi, t), static_argnums=3)
_forward_dpo = jax.jit(lambda p, b, bi, t, m: O.lm_forward_dpo(M.Qwen2LM(CFG), p, b, bi, t, m),
                       static_argnums=(3, 4))


def _jnp(batch):
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def test_sequence_assembly_matches_official(params, lm_batch, lm_ref):
    ref, u, _ = lm_ref
    b = _jnp(lm_batch)
    bi = O.bistream_from_uniforms(jnp.asarray(u), b["text_token_len"], b["speech_token_len"], CFG.mix_ratio)
    assert bi.tolist() == [True, False, True, False]
    t_out = ref["lm_target"].shape[1]
    out = _forward(params, b, bi, t_out)
    np.testing.assert_array_equal(np.asarray(out["lm_target"]), ref["lm_target"])
    np.testing.assert_array_equal(np.asarray(out["lengths"]), ref["lm_input_len"])
    np.testing.assert_allclose(np.asarray(out["lm_input"]), ref["lm_input"], atol=1e-6)
    # the fill token appears in the bistream row only, once per full chunk
    fill = CFG.fill_token
    assert [(r == fill).sum() for r in ref["lm_target"]] == [9 // 5, 0, 5 // 5, 0]


def test_sequence_assembly_all_bistream_shapes():
    """Every (text, speech) length pair that qualifies, with bistream forced on: targets hold each
    speech token once in order, fills after every full chunk, one eos; lengths Lt + Ls + 2."""
    lt, ls = np.meshgrid(np.arange(1, 13), np.arange(1, 50))
    lt, ls = lt.ravel(), ls.ravel()
    ok = ls * 5 > 15 * lt
    lt, ls = jnp.asarray(lt[ok]), jnp.asarray(ls[ok])
    out = jax.jit(O.sequence_layout, static_argnums=(3, 4))(lt, ls, jnp.ones_like(lt, bool), 64, 6561)
    kind, idx, tgt, is_sp, tidx, length = map(np.asarray, out)
    lt, ls = np.asarray(lt), np.asarray(ls)
    for i in range(len(lt)):
        n = int(length[i])
        assert n == lt[i] + ls[i] + 2
        assert is_sp[i].sum() == ls[i]
        np.testing.assert_array_equal(tidx[i][is_sp[i]], np.arange(ls[i]))
        assert (tgt[i] == 6563).sum() == lt[i] // 5
        assert (tgt[i] == 6561).sum() == 1 and tgt[i, n - 1] == 6561 and (tgt[i, n:] == -1).all()
        assert (kind[i, :n] == 2).sum() == lt[i] and (kind[i, n:] == 4).all()
        np.testing.assert_array_equal(idx[i][kind[i] == 2], np.arange(lt[i]))


def test_logits_loss_acc_match_official(params, lm_batch, lm_ref):
    ref, u, _ = lm_ref
    b = _jnp(lm_batch)
    bi = O.bistream_from_uniforms(jnp.asarray(u), b["text_token_len"], b["speech_token_len"], CFG.mix_ratio)
    out = _forward(params, b, bi, ref["lm_target"].shape[1])
    lens = ref["lm_input_len"]
    for i, n in enumerate(lens):
        np.testing.assert_allclose(np.asarray(out["logits"][i, :n]), ref["logits"][i, :n], atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), float(ref["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(out["acc"]), float(ref["acc"]), atol=1e-7)
    assert float(ref["loss"]) > 1.0


def test_dpo_logps_match_official(params, lm_batch, lm_ref):
    ref, _, u_dpo = lm_ref
    b = _jnp(lm_batch)
    tl2 = jnp.concatenate([b["text_token_len"]] * 2)
    sl2 = jnp.concatenate([b["speech_token_len"], b["reject_speech_token_len"]])
    bi = O.bistream_from_uniforms(jnp.asarray(u_dpo), tl2, sl2, CFG.mix_ratio)
    assert bool(bi.any())
    t_out = int(jnp.max(tl2 + sl2 + 2))
    out = _forward_dpo(params, b, bi, t_out, True)
    for k in ("loss", "acc", "chosen_logps", "rejected_logps"):
        np.testing.assert_allclose(np.asarray(out[k]), ref[f"dpo_{k}"], rtol=2e-5, atol=2e-5, err_msg=k)
    fixed = _forward_dpo(params, b, bi, t_out, False)
    assert np.all(np.asarray(fixed["chosen_logps"]) < 0)


def test_choose_bistream_rule():
    tl = jnp.array([5, 5, 5, 10] * 500)
    sl = jnp.array([15, 16, 40, 31] * 500)
    bi = np.asarray(O.choose_bistream(jax.random.PRNGKey(0), tl, sl)).reshape(500, 4)
    assert not bi[:, 0].any()  # ratio exactly 3 never qualifies
    frac = bi[:, [1, 2, 3]].mean()
    assert 0.4 < frac < 0.6


def test_int8_path_close_to_fp32(params):
    """W8A8 (``quant=True``) is a speed path: its logits track fp32 closely, argmax mostly agrees."""
    qp = M.quantize_params(params)
    assert qp["llm_decoder"]["weight"].dtype == jnp.int8 and "scale" in qp["llm_decoder"]
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, CFG.qwen.hidden_size))
    lens = jnp.array([16, 9])
    ref = jax.jit(M.Qwen2LM(CFG).apply)({"params": params}, x, lens)
    out = jax.jit(M.Qwen2LM(CFG, quant=True).apply)({"params": qp}, x, lens)
    err_max = float(jnp.abs(out - ref).max() / jnp.std(ref))
    err_mean = float(jnp.abs(out - ref).mean() / jnp.std(ref))
    agree = float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))
    assert err_max < 0.2 and err_mean < 0.03 and agree > 0.9, (err_max, err_mean, agree)


def test_load_params_from_pt_path(tmp_path, official_sd, oracle):
    from cosyvoice2_jax.errors import ReleaseDirError

    with pytest.raises(ReleaseDirError, match="does not exist"):
        P.from_release(tmp_path / "llm.pt", CFG)
    # written by torch.save in the oracle venv, read here (torch-free reader when torch is absent)
    oracle("ptfiles:save_state_dict", {f"sd/{k}": v for k, v in official_sd.items()}, path=str(tmp_path / "llm.pt"))
    p = P.from_release(tmp_path / "llm.pt", CFG)
    np.testing.assert_array_equal(p["llm_decoder"]["bias"], official_sd["llm_decoder.bias"])
