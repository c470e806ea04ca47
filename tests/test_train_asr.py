"""Differentiable ASR reward (paper section 2.7) and the token-ASR training objective: Gumbel-softmax
limits, the speech-position map, gradients reaching the LM (finite differences on a toy), the
relaxed path tending to the hard path as the temperature goes to 0, combination with CE and DPO
(frozen ASR and reference), and the two training YAMLs through the CLI (slow)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax import token_asr as TA
from cosyvoice2_jax.config import LLMConfig, QwenConfig, TokenASRConfig
from cosyvoice2_jax.llm.modeling import init_params as lm_init
from cosyvoice2_jax.llm.objectives import (asr_reward_loss, gumbel_softmax, lm_forward, sequence_layout,
                                           speech_target_positions)

LM = LLMConfig(qwen=QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16))
ASR = TokenASRConfig(text_vocab_size=64, d_model=16, n_heads=2, n_layers=1, fsmn_kernel_size=5)


def _batch():
    rng = np.random.default_rng(5)
    tl, sl = np.array([6, 3]), np.array([30, 12])
    b = {"text_token": rng.integers(0, 64, (2, 6)), "speech_token": rng.integers(0, 6561, (2, 30)),
         "text_token_len": tl, "speech_token_len": sl, "valid": np.array([True, True]),
         "bistream_u": np.array([0.1, 0.9])}  # row 0 bistream (30 * 5 > 15 * 6), row 1 unistream
    for i in range(2):
        b["text_token"][i, tl[i]:] = 0
        b["speech_token"][i, sl[i]:] = 0
    return {k: jnp.asarray(v) for k, v in b.items()}


@pytest.fixture(scope="module")
def asr_params():
    return TA.init_params(ASR, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def toy(asr_params):
    return jax.jit(lambda k: lm_init(LM, k))(jax.random.PRNGKey(0)), asr_params


def test_gumbel_softmax_limits():
    key = jax.random.PRNGKey(4)
    logits = jax.random.normal(jax.random.PRNGKey(5), (3, 7, 11)) * 2
    w = jax.random.normal(jax.random.PRNGKey(6), logits.shape)

    @jax.jit
    def all_(x):
        g = jax.random.gumbel(key, x.shape, jnp.float32)
        hard = jax.nn.one_hot(jnp.argmax(x + g, -1), 11)
        g_st = jax.grad(lambda z: jnp.sum(w * gumbel_softmax(key, z, 0.7, True)))(x)
        g_rx = jax.grad(lambda z: jnp.sum(w * gumbel_softmax(key, z, 0.7, False)))(x)
        return hard, gumbel_softmax(key, x, 1e-4, False), gumbel_softmax(key, x, 0.7, True), g_st, g_rx

    hard, cold, st, g_st, g_rx = all_(logits)
    np.testing.assert_allclose(np.asarray(cold), np.asarray(hard), atol=1e-6)
    np.testing.assert_allclose(np.asarray(st), np.asarray(hard), atol=1e-6)  # forward: the exact sample
    np.testing.assert_allclose(np.asarray(g_st), np.asarray(g_rx), atol=1e-6)  # backward: the relaxed one
    assert float(jnp.abs(g_st).max()) > 1e-3


def test_speech_positions_follow_the_lm_layout():
    b = _batch()
    bi = jnp.array([True, False])
    t_out = 6 + 30 + 2
    where = jax.jit(speech_target_positions, static_argnums=(3, 4, 5))(b["text_token_len"], b["speech_token_len"], bi,
                                                                        t_out, 30, 6561)
    # every valid speech token is predicted at exactly one position, padding at none
    np.testing.assert_array_equal(np.asarray(where.sum(1)), np.asarray(jnp.arange(30)[None] < b["speech_token_len"][:, None]))
    # and that position's LM target is that token (the layout of prepare_lm_input_target)
    _, _, tgt, is_speech, idx, _ = jax.jit(sequence_layout, static_argnums=(3, 4))(
        b["text_token_len"], b["speech_token_len"], bi, t_out, 6561)
    lm_tgt = jnp.where(is_speech, jnp.take_along_axis(b["speech_token"], idx, 1), tgt)
    gathered = jnp.einsum("bts,bt->bs", where, lm_tgt.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(gathered), np.asarray(b["speech_token"]))


def _logit_loss_fn(asr_params, straight_through: bool):
    """``L_ASR`` as a function of the LM's speech logits (the LM itself left out: fast)."""
    b = _batch()
    bi = jnp.array([True, False])
    asr = TA.TokenASR(ASR)

    def asr_fn(codes, n):
        return asr.apply({"params": asr_params}, codes, n, method=TA.TokenASR.from_codes)

    def f(logits, tau):
        loss, _ = asr_reward_loss(jax.random.PRNGKey(9), logits, b, bi, asr_fn, speech_token_size=6561,
                                  temperature=tau, straight_through=straight_through, valid_b=b["valid"],
                                  blank_id=ASR.blank_id)
        return loss

    return f


def _directional_check(vg, x, tau, eps, weighted: bool):
    """Analytic vs central finite-difference derivative of ``vg``'s value along a random unit direction."""
    loss, grads = vg(x, tau)
    # random; ``weighted``: towards the coordinates that matter (a plain random direction in a
    # 500k-dim logit space is nearly orthogonal to the sparse gradient)
    d = jax.tree.map(lambda v, g: jax.random.normal(jax.random.PRNGKey(v.size % 97), v.shape)
                     * ((jnp.abs(g) + 1e-3 * jnp.mean(jnp.abs(g))) if weighted else 1.0), x, grads)
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(d)))
    d = jax.tree.map(lambda v: v / norm, d)
    plus, _ = vg(jax.tree.map(lambda p, v: p + eps * v, x, d), tau)
    minus, _ = vg(jax.tree.map(lambda p, v: p - eps * v, x, d), tau)
    fd = (float(plus) - float(minus)) / (2 * eps)
    ad = float(sum(jnp.sum(g * v) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d))))
    assert np.isfinite(float(loss)) and abs(ad) > 1e-3
    np.testing.assert_allclose(ad, fd, rtol=2e-2)
    return grads


def test_asr_reward_gradient_and_temperature_limit_on_logits(asr_params):
    """The ASR loss is differentiable in the LM's speech logits (finite differences, relaxed path)
    and the relaxed loss tends to the hard (straight-through forward) loss as the temperature -> 0.
    (Through the LM backbone itself: the slow test below.)"""
    asr = asr_params
    logits = 2.0 * jax.random.normal(jax.random.PRNGKey(3), (2, 38, 6564))
    vg = jax.jit(jax.value_and_grad(_logit_loss_fn(asr, straight_through=False)))
    grads = _directional_check(vg, logits, 0.5, 1e-2, weighted=True)
    # only the codebook ids (not eos / specials) and only speech target positions get gradient
    assert float(jnp.abs(grads[..., 6561:]).max()) == 0.0 and float(jnp.abs(grads[0, 0]).max()) == 0.0
    hard = float(jax.jit(_logit_loss_fn(asr, True))(logits, 1.0))
    gaps = [abs(float(vg(logits, t)[0]) - hard) for t in (3.0, 1e-3, 1e-4)]
    assert gaps[0] > 1e-2, gaps  # the two paths differ at a high temperature
    assert max(gaps[1:]) < 1e-3 * max(1.0, abs(hard)), gaps


def _loss_fn(asr_params, straight_through: bool):
    b = _batch()
    bi = jnp.array([True, False])
    t_out = 6 + 30 + 2
    asr = TA.TokenASR(ASR)

    def asr_fn(codes, n):
        return asr.apply({"params": asr_params}, codes, n, method=TA.TokenASR.from_codes)

    def f(lm_params, tau):
        from cosyvoice2_jax.llm.modeling import Qwen2LM

        logits = lm_forward(Qwen2LM(LM), lm_params, b, bi, t_out, b["valid"])["logits"]
        loss, _ = asr_reward_loss(jax.random.PRNGKey(9), logits, b, bi, asr_fn, speech_token_size=6561,
                                  temperature=tau, straight_through=straight_through, valid_b=b["valid"],
                                  blank_id=ASR.blank_id)
        return loss

    return f


@pytest.mark.slow  # compiles the toy LM forward + backward (~20 s CPU); run with -m slow
def test_asr_reward_gradient_reaches_lm_finite_differences(toy):
    """Through the whole toy LM: the directional derivative of L_ASR along a random direction in
    the LM params equals the finite difference, the backbone gets gradient, and the relaxed loss
    tends to the hard one as the temperature -> 0."""
    lm, asr = toy
    vg = jax.jit(jax.value_and_grad(_loss_fn(asr, straight_through=False)))
    grads = _directional_check(vg, lm, 0.5, 1e-2, weighted=False)
    layer = grads["llm"]["model"]["model"]["layers_0"]
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(layer)) > 0
    hard = float(jax.jit(_loss_fn(asr, True))(lm, 1.0))
    gaps = [abs(float(vg(lm, t)[0]) - hard) for t in (3.0, 1e-3, 1e-4)]
    assert gaps[0] > 1e-2, gaps
    assert max(gaps[1:]) < 1e-3 * max(1.0, abs(hard)), gaps


@pytest.mark.slow
def test_asr_reward_objective_trains_only_the_policy(toy):
    """CE + L_ASR + DPO in one step: the terms add up, DPO starts at log 2, the ASR and the
    reference stay frozen, the policy moves."""
    from cosyvoice2_jax import sharding as M
    from cosyvoice2_jax.train import trainer as TR
    from cosyvoice2_jax.train.lm import ASRRewardObjective, ASRRewardOptions
    from cosyvoice2_jax.train.optim import OptimConfig, make_optimizer

    lm, asr = toy
    b = _batch()
    b["reject_speech_token"] = jnp.roll(b["speech_token"], 3, axis=1)
    b["reject_speech_token_len"] = jnp.array([25, 12])
    b["bistream_u"] = jnp.array([0.1, 0.9, 0.1, 0.9])  # chosen rows then rejected rows
    opts = ASRRewardOptions(temperature=0.5, dpo_weight=1.0, asr_weight=0.5)
    obj = ASRRewardObjective(LM, ASR, asr, opts, init_from=lm)
    mesh = M.make_mesh((1, 1, 1))
    tx = TR.with_trainable_mask(obj, make_optimizer(OptimConfig(lr=1e-2)))
    state, sh = TR.init_state(obj, tx, mesh, 0)
    step = TR.make_train_step(obj, tx, sh, mesh, donate=False)
    new, m = step(state, {k: np.asarray(v) for k, v in b.items()})
    np.testing.assert_allclose(float(m["loss"]), float(m["lm_loss"] + 0.5 * m["asr_loss"] + m["dpo_loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m["dpo_loss"]), np.log(2.0), rtol=1e-6)
    for part in ("asr", "ref"):
        for a, c in zip(jax.tree.leaves(state["params"][part]), jax.tree.leaves(new["params"][part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    moved = max(float(jnp.abs(a - c).max()) for a, c in zip(jax.tree.leaves(state["params"]["policy"]),
                                                           jax.tree.leaves(new["params"]["policy"])))
    assert moved > 1e-4


@pytest.mark.slow  # compile-heavy on the 2-core CI; run with -m slow
def test_token_asr_objective_loss(asr_params):
    """The token-ASR objective is the per-text-token CTC of the valid rows after the mSFT prefix: a
    padding row and a speaker prefix change nothing."""
    from cosyvoice2_jax.train.asr import TokenASRObjective

    asr = asr_params
    obj = TokenASRObjective(ASR)
    rng = np.random.default_rng(2)
    speech = jnp.asarray(rng.integers(0, 6561, (3, 20)))
    text = jnp.asarray(rng.integers(0, 64, (3, 8)))
    plain = {"speech_token": speech, "speech_token_len": jnp.array([20, 11, 5]), "text_token": text,
             "text_token_len": jnp.array([5, 3, 4]), "valid": jnp.array([True, True, False]),
             "text_prompt_len": jnp.array([0, 0, 0])}
    prefixed = dict(plain, text_token=jnp.concatenate([jnp.full((3, 2), 7), text[:, :6]], 1),
                    text_token_len=plain["text_token_len"] + 2, text_prompt_len=jnp.array([2, 2, 2]),
                    speech_token=plain["speech_token"].at[2].set(99))
    f = jax.jit(obj.loss_fn)
    (l1, m1), (l2, _) = f(asr, plain, jax.random.key(0)), f(asr, prefixed, jax.random.key(0))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    per_row = jax.jit(lambda p: TA.ctc_loss(TA.TokenASR(ASR).apply({"params": p}, speech[:2], jnp.array([20, 11])),
                                            jnp.array([20, 11]), text[:2], jnp.array([5, 3]), ASR.blank_id))(asr)
    np.testing.assert_allclose(float(l1), float(per_row.sum()) / 8, rtol=1e-5)
    assert 0.0 <= float(m1["blank_frac"]) <= 1.0


def test_spoken_text_drops_speaker_prefix():
    text = jnp.array([[7, 8, 1, 2, 3, 0], [7, 9, 4, 0, 0, 0]])
    labels, n = TA.spoken_text(text, jnp.array([5, 3]), jnp.array([2, 2]))
    np.testing.assert_array_equal(np.asarray(n), [3, 1])
    np.testing.assert_array_equal(np.asarray(labels[0, :3]), [1, 2, 3])
    assert int(labels[1, 0]) == 4


@pytest.mark.slow
def test_token_asr_then_asr_reward_through_cli(tmp_path):
    """configs/train/token_asr.yaml and asr_reward.yaml, shrunk: the token ASR's CTC falls on tiny
    shards, its work directory feeds the ASR reward run, and both write their metrics."""
    import yaml

    from cosyvoice2_jax import cli
    from test_train_data import make_shards
    from toy_tokenizer import write_toy_qwen_tokenizer

    lst, _ = make_shards(tmp_path, n_rows=8, n_shards=1, seed=3)
    tok = write_toy_qwen_tokenizer(tmp_path / "tok")
    data = {"data_list": str(lst), "max_frames_in_batch": 1000, "token_buckets": [150], "text_buckets": [32],
            "num_threads": 1, "min_length": 50}
    tiny_asr = {"d_model": 32, "n_heads": 2, "n_layers": 1}

    def run(name, objective, steps, lr, **extra):
        spec = {"objective": objective, "model": "tiny", "tokenizer_dir": str(tok), "data": data,
                "token_asr": tiny_asr, **extra,
                "train": {"steps": steps, "save_every": steps, "log_every": 1, "workdir": str(tmp_path / name),
                          "async_save": False, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "optim": {"lr": lr}}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        assert cli.main(["train", "--config", str(tmp_path / f"{name}.yaml"), "--no-progress"]) == 0
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    rows = run("asr", "token_asr", 40, 3e-3)
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.8 * np.mean([r["loss"] for r in rows[:5]])
    rows = run("rw", "asr_reward", 3, 1e-4, asr_reward={"asr_from": str(tmp_path / "asr"), "temperature": 0.5})
    assert len(rows) == 3 and all(np.isfinite(r["asr_loss"]) and np.isfinite(r["lm_loss"]) for r in rows)
