"""Flow parity against the official CausalMaskedDiffWithXvec at tiny size (random weights,
re-drawn variance-preserving), plus invariants, converter round trip and compile counts.

Run: ``.venv/bin/python -m pytest tests/test_flow.py -q`` (full-size parity:
``-m slow tests/test_flow_slow.py``).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.config import CFMConfig, FlowConfig, ModelConfig, Solver
from cosyvoice2_jax.errors import ConfigError, ConversionError
from cosyvoice2_jax.flow import cfm as cfm_lib
from cosyvoice2_jax.flow import modeling
from cosyvoice2_jax.flow import params as flow_params
from cosyvoice2_jax.flow.decoder import BasicTransformerBlock, CausalConditionalDecoder, CausalResnetBlock1D
from cosyvoice2_jax.flow.encoder import (LinearNoSubsampling, PreLookaheadLayer, Upsample1D,
                                         UpsampleConformerEncoder)
from cosyvoice2_jax.layers.attention import RelPositionMultiHeadedAttention, rel_shift
from cosyvoice2_jax.layers.masks import attention_mask, chunk_mask, valid_mask
from cosyvoice2_jax.layers.positional import espnet_rel_pos_emb
from cosyvoice2_jax.params_util import flatten
from oracle_client import unflatten_state_dict

CFG: FlowConfig = ModelConfig.tiny().flow


def dims_of(cfg: FlowConfig) -> dict:
    e, d = cfg.encoder, cfg.decoder
    return dict(input_size=cfg.input_size, enc_heads=e.attention_heads, enc_units=e.linear_units,
                enc_blocks=e.num_blocks, enc_up_blocks=e.num_up_blocks, dec_channels=d.channels[0],
                dec_head_dim=d.attention_head_dim, dec_heads=d.num_heads, dec_blocks=d.n_blocks,
                dec_mid=d.num_mid_blocks)


DIMS = dims_of(CFG)
rng = np.random.default_rng(0)


def close(a, b, tol=2e-5, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    print(f"[parity] {what}: max abs diff {err:.3g}")
    assert err <= tol * max(1.0, float(np.max(np.abs(b)))), f"{what}: max abs diff {err}"
    return err


@pytest.fixture(scope="module")
def torch_sd(oracle):
    return unflatten_state_dict(oracle("flow:state_dict", {}, dims=DIMS, seed=1))


@pytest.fixture(scope="module")
def params(torch_sd):
    return flow_params.from_torch(torch_sd, CFG)


# ----------------------------------------------------------------------------- pure functions
def test_rel_shift_matches_gather():
    B, H, T = 2, 3, 7
    x = jnp.asarray(rng.normal(size=(B, H, T, 2 * T - 1)), jnp.float32)
    i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    want = np.asarray(x)[:, :, i, T - 1 - i + j]
    np.testing.assert_array_equal(np.asarray(rel_shift(x)), want)


def test_chunk_mask_and_per_example_chunks():
    m = np.asarray(chunk_mask(5, 2))
    np.testing.assert_array_equal(m, np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0],
                                               [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool))
    per = np.asarray(chunk_mask(5, jnp.asarray([0, 1, 2])))
    assert per[0].all() and (per[1] == np.tril(np.ones((5, 5), bool))).all() and (per[2] == m).all()
    am = np.asarray(attention_mask(valid_mask(jnp.asarray([3]), 5), 2))
    assert not am[0, :, 3:].any() and am[0, 0, :2].all()


def test_rel_pos_table_rows():
    pe = np.asarray(espnet_rel_pos_emb(4, 8))[0]
    assert pe.shape == (7, 8)
    np.testing.assert_allclose(pe[3], [0, 1] * 4, atol=0)  # relative position 0
    np.testing.assert_allclose(pe[0, 0], np.sin(3.0), rtol=1e-6)  # row 0 = position +3


def test_t_span_schedules():
    np.testing.assert_allclose(np.asarray(cfm_lib.t_span(4, "linear")), [0, .25, .5, .75, 1], atol=1e-7)
    c = np.asarray(cfm_lib.t_span(10, "cosine"))
    np.testing.assert_allclose(c, 1 - np.cos(np.linspace(0, 1, 11) * np.pi / 2), atol=1e-6)


def test_solvers_integrate_linear_ode():
    # dx/dt = -x from t=0..1: Euler/midpoint/Heun errors shrink with order
    x0 = jnp.ones((1, 1, 1))
    ts = cfm_lib.t_span(8, "linear")
    errs = {s: abs(float(cfm_lib.solve(lambda x, t, k, st: (-x, st), x0, ts, s)[0][0, 0, 0]) - np.exp(-1))
            for s in Solver}
    assert errs[Solver.MIDPOINT] < errs[Solver.EULER] / 5 and errs[Solver.HEUN] < errs[Solver.EULER] / 5


def test_initial_noise_sources():
    a = cfm_lib.initial_noise(jax.random.key(0), 2, 5, 80)
    b = cfm_lib.initial_noise(jax.random.key(0), 2, 5, 80)
    assert a.shape == (2, 5, 80) and np.array_equal(a, b) and not np.allclose(a[0], a[1])
    off = cfm_lib.initial_noise("official", 2, 5, 80)
    assert np.array_equal(off[0], off[1])
    with pytest.raises(ConfigError, match="noise='gauss'"):
        cfm_lib.initial_noise("gauss", 1, 5, 80)


def test_official_noise_file():
    z = np.asarray(cfm_lib.official_noise(3))
    np.testing.assert_allclose(z[0, :3], [-1.1258398, 0.86917937, -1.7485445], rtol=1e-6)
    with pytest.raises(ConfigError, match="exceed the official fixed noise"):
        cfm_lib.official_noise(15001)


# ----------------------------------------------------------------------------- converter
def test_converter_round_trip_and_strict(torch_sd, params):
    back = flow_params.to_torch(params)
    assert set(back) == set(torch_sd)
    for k, v in torch_sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    bad = dict(torch_sd)
    bad.pop("encoder.after_norm.weight")
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match="missing.*encoder/after_norm/scale|unexpected.*encoder.extra"):
        flow_params.from_torch(bad, CFG)


def test_eval_shape_full_size():
    full = ModelConfig.cosyvoice2().flow
    flat = flatten(modeling.abstract_params(full))
    assert len(flat) == 1121
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 112_549_360
    assert flat["decoder/estimator/mid_blocks_11/transformer_blocks_3/attn1/to_q/kernel"].shape == (256, 512)


# ----------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("streaming", [False, True])
def test_encoder_parity(oracle, params, streaming):
    B, T, D = 2, 57, CFG.input_size
    lens = np.array([57, 40])
    xs = rng.normal(size=(B, T, D)).astype(np.float32) * (np.arange(T)[None, :, None] < lens[:, None, None])
    ref = oracle("flow:encoder_parts", {"xs": xs, "lens": lens}, dims=DIMS, seed=1, streaming=streaming)
    enc = UpsampleConformerEncoder(CFG.encoder)
    p = {"params": params["encoder"]}
    chunk = CFG.encoder.static_chunk_size if streaming else 0
    valid = valid_mask(jnp.asarray(lens), T)
    h, vf = jax.jit(lambda p, x, v: enc.apply(p, x, v, chunk=chunk))(p, jnp.asarray(xs), valid)
    vf = np.asarray(vf)
    np.testing.assert_array_equal(vf, ref["out_mask"][:, 0])
    # compare valid frames only (the official padded frames see its padded look-ahead too)
    for b in range(B):
        n = 2 * lens[b] - 8 if b else 2 * lens[b]  # row 1: last look-ahead frames read padding
        close(np.asarray(h)[b, :n], ref["out"][b, :n], what=f"encoder out row {b}")
    # submodules on the full-length row 0
    x, pe = LinearNoSubsampling(CFG.encoder).apply({"params": params["encoder"]["embed"]}, jnp.asarray(xs))
    close(x, ref["embed"], what="embed")
    close(pe, ref["pos_emb"], 1e-5, what="pos_emb")
    pl = PreLookaheadLayer(D, 3)
    pp = {"params": params["encoder"]["pre_lookahead_layer"]}
    close(pl.apply(pp, x)[0], ref["pre"], what="pre_lookahead")
    close(pl.apply(pp, x[:, :-3], x[:, -3:])[0], ref["pre_ctx"], what="pre_lookahead with context")
    attn = RelPositionMultiHeadedAttention(CFG.encoder.attention_heads, D)
    lp = params["encoder"]["encoders_0"]
    hn = nn.LayerNorm(epsilon=1e-5).apply({"params": lp["norm_mha"]}, jnp.asarray(ref["pre"]))
    am = attention_mask(valid, chunk)
    close(attn.apply({"params": lp["self_attn"]}, hn, am, pe)[0], ref["attn"], what="rel-pos attention")
    up, _ = Upsample1D(D, 2).apply({"params": params["encoder"]["up_layer"]}, x)
    close(up, ref["up"], what="upsample")


# ----------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("streaming", [False, True])
def test_estimator_parity(oracle, params, streaming):
    B, F = 2, 123
    lens = np.array([123, 77])
    m = (np.arange(F)[None, :] < lens[:, None]).astype(np.float32)
    x, mu, cond = (rng.normal(size=(B, 80, F)).astype(np.float32) for _ in range(3))
    t, spks = np.array([0.3, 0.85], np.float32), rng.normal(size=(B, 80)).astype(np.float32)
    ref = oracle("flow:decoder_parts", {"x": x, "mu": mu, "cond": cond, "mask": m[:, None], "t": t, "spks": spks},
                 dims=DIMS, seed=1, streaming=streaming)
    est = CausalConditionalDecoder(CFG.decoder)
    p = {"params": params["decoder"]["estimator"]}
    tr = lambda a: jnp.asarray(np.transpose(a, (0, 2, 1)))  # noqa: E731
    valid = jnp.asarray(m > 0)
    chunk = CFG.decoder.static_chunk_size if streaming else 0
    run = jax.jit(lambda p, *a: est.apply(p, *a, chunk))
    out = run(p, tr(x), valid, tr(mu), jnp.asarray(t), jnp.asarray(spks), tr(cond))
    close(out, np.transpose(ref["out"], (0, 2, 1)), what="estimator")
    close(est.apply(p, jnp.asarray(t), method=est.time_embedding), ref["t_emb"], what="time embedding")
    packed = jnp.concatenate([tr(x), tr(mu), jnp.broadcast_to(jnp.asarray(spks)[:, None], (B, F, 80)), tr(cond)], -1)
    sp = params["decoder"]["estimator"]["down_blocks_0"]
    r, _ = CausalResnetBlock1D(CFG.decoder.channels[0]).apply({"params": sp["resnet"]}, packed,
                                                              valid[..., None].astype(jnp.float32),
                                                              jnp.asarray(ref["t_emb"]))
    close(r, np.transpose(ref["resnet"], (0, 2, 1)), what="resnet block")
    tb = BasicTransformerBlock(CFG.decoder.channels[0], CFG.decoder.num_heads, CFG.decoder.attention_head_dim)
    y, _ = tb.apply({"params": sp["transformer_blocks_0"]}, jnp.asarray(np.transpose(ref["resnet"], (0, 2, 1))),
                    attention_mask(valid, chunk))
    close(y, ref["tblock"], what="transformer block")
    # outputs depend on the inputs and are zero on padding
    assert float(jnp.abs(out[1, lens[1]:]).max()) == 0.0
    out2 = run(p, tr(x), valid, tr(mu), jnp.asarray(t), jnp.asarray(spks), tr(cond) * 0)
    assert float(jnp.abs(out2 - out).max()) > 1e-2


# ----------------------------------------------------------------------------- CFM
@pytest.mark.parametrize("n_steps", [1, 3])
def test_cfm_solver_parity(oracle, params, n_steps):
    F = 90
    mu, cond = rng.normal(size=(1, 80, F)).astype(np.float32), np.zeros((1, 80, F), np.float32)
    cond[:, :, :30] = rng.normal(size=(1, 80, 30))
    spks = rng.normal(size=(1, 80)).astype(np.float32)
    ref = oracle("flow:cfm_solve", {"mu": mu, "cond": cond, "spks": spks}, dims=DIMS, seed=1,
                 streaming=True, n_timesteps=n_steps)["out"]
    model = modeling.CausalMaskedDiffWithXvec(CFG)
    p = {"params": params}
    tr = lambda a: jnp.asarray(np.transpose(a, (0, 2, 1)))  # noqa: E731
    valid = jnp.ones((2, F), bool)
    rest = jnp.concatenate([tr(mu), jnp.broadcast_to(jnp.asarray(spks)[:, None], (1, F, 80)), tr(cond)], -1)
    rest2 = jnp.concatenate([rest, jnp.zeros_like(rest)], 0)

    def estimate(x2, t, k, state):
        t_emb = model.apply(p, jnp.broadcast_to(t, (2,)), method=model.time_embedding)
        return model.apply(p, jnp.concatenate([x2, rest2], -1), valid, t_emb, 50, method=model.estimate_features)

    z = cfm_lib.initial_noise("official", 1, F, 80)
    out, _ = cfm_lib.solve(cfm_lib.cfg_velocity(estimate, 0.7), z, cfm_lib.t_span(n_steps, "cosine"), "euler")
    close(out, np.transpose(ref, (0, 2, 1)), 5e-5, what=f"{n_steps} Euler steps")


# ----------------------------------------------------------------------------- full inference
@pytest.fixture(scope="module")
def infer_inputs():
    r = np.random.default_rng(5)
    return {"token": r.integers(0, 6561, (1, 31)), "prompt_token": r.integers(0, 6561, (1, 17)),
            "prompt_feat": r.normal(size=(1, 34, 80)).astype(np.float32),
            "embedding": r.normal(size=(1, 192)).astype(np.float32)}


@pytest.fixture(scope="module")
def infer_ref(oracle, infer_inputs):
    return oracle("flow:inference", infer_inputs, dims=DIMS, seed=1,
                  cases=[["0", "1"], ["1", "1"], ["0", "0"], ["1", "0"]])


@pytest.mark.parametrize("streaming,finalize", [(False, True), (True, True), (False, False), (True, False)])
def test_inference_parity(params, infer_inputs, infer_ref, streaming, finalize):
    mel = modeling.inference(params, CFG, **infer_inputs, streaming=streaming, finalize=finalize)
    ref = np.transpose(infer_ref[f"mel_{int(streaming)}{int(finalize)}"], (0, 2, 1))
    close(mel, ref, 5e-5, what=f"inference streaming={streaming} finalize={finalize}")


# bf16 matmuls/convs: the 10-step CFG solve moved the mel by 0.86% of its peak (max abs diff, mean
# 0.71% of the mean magnitude) on these inputs; bound ~3x that
BF16_MEL_TOL = 0.025


def test_bf16_inference_close_to_fp32(params, infer_inputs):
    """``FlowConfig.dtype = bfloat16``: matmuls/convs in bf16 from the fp32 params, norms, softmax,
    time embedding and the ODE state in fp32; the mel stays within a measured tolerance of fp32."""
    bf = dataclasses.replace(CFG, dtype="bfloat16")
    ref = modeling.inference(params, CFG, **infer_inputs, streaming=True, finalize=True)  # compiled above
    got = modeling.inference(params, bf, **infer_inputs, streaming=True, finalize=True)
    assert got.dtype == np.float32 and got.shape == ref.shape
    err = float(np.max(np.abs(got - ref))) / float(np.max(np.abs(ref)))
    mean = float(np.mean(np.abs(got - ref))) / float(np.mean(np.abs(ref)))
    print(f"[bf16] flow mel: max abs diff {err:.3g}, mean abs diff {mean:.3g} (relative to fp32 max / mean)")
    assert 0 < err < BF16_MEL_TOL


def test_batch_equals_single_runs(params):
    r = np.random.default_rng(7)
    lens, plens = [40, 23, 31], [17, 9, 25]
    token = r.integers(0, 6561, (3, 40))
    ptoken = r.integers(0, 6561, (3, 25))
    pfeat = r.normal(size=(3, 50, 80)).astype(np.float32)
    emb = r.normal(size=(3, 192)).astype(np.float32)
    for streaming, finalize in [(True, False)]:
        mels, mlens = modeling.inference_batch(params, CFG, token, lens, ptoken, plens, pfeat, [2 * p for p in plens],
                                               emb, streaming=streaming, finalize=finalize)
        for b in range(3):
            single = modeling.inference(params, CFG, token[b:b + 1, :lens[b]], ptoken[b:b + 1, :plens[b]],
                                        pfeat[b:b + 1, :2 * plens[b]], emb[b:b + 1], streaming=streaming,
                                        finalize=finalize)[0]
            assert mels[b].shape == single.shape == (mlens[b], 80)
            close(mels[b], single, 1e-5, what=f"row {b}")
        assert np.abs(mels[0][:20] - mels[1][:20]).max() > 1e-2  # rows really differ


def test_bucketed_shapes_do_not_recompile(params, compiles):
    r = np.random.default_rng(9)
    emb = r.normal(size=(1, 192)).astype(np.float32)
    pf = r.normal(size=(1, 20, 80)).astype(np.float32)
    pt = r.integers(0, 6561, (1, 10))
    modeling.inference(params, CFG, r.integers(0, 6561, (1, 121)), pt, pf, emb)  # 131 packed -> bucket 136
    compiles.mark()
    for n in (122, 126):  # same bucket: no new compilation
        modeling.inference(params, CFG, r.integers(0, 6561, (1, n)), pt, pf, emb)
    assert not [n for n in compiles.since() if "_solve_packed" in n]
    modeling.inference(params, CFG, r.integers(0, 6561, (1, 127)), pt, pf, emb)  # 137 tokens: bucket 144
    assert [n for n in compiles.since() if "_solve_packed" in n] == ["jit(_solve_packed)"]


def test_sampler_programs_keyed_by_structure(params, compiles):
    """inference takes a SamplerConfig (per call or from flow.sampler): one program per structure
    (solver, steps, guidance), the grid and CFG weight are traced; the old per-call overrides are
    the same sampler."""
    from cosyvoice2_jax.flow.sampling import SamplerConfig

    r = np.random.default_rng(11)
    emb = r.normal(size=(1, 192)).astype(np.float32)
    pf = r.normal(size=(1, 20, 80)).astype(np.float32)
    pt, tok = r.integers(0, 6561, (1, 10)), r.integers(0, 6561, (1, 21))
    heun = SamplerConfig(steps=2, solver="heun")
    a = modeling.inference(params, CFG, tok, pt, pf, emb, sampler=heun)
    compiles.mark()
    b = modeling.inference(params, CFG, tok, pt, pf, emb, sampler=dataclasses.replace(heun, grid="uniform", cfg_rate=0.3))
    c = modeling.inference(params, CFG, tok, pt, pf, emb, n_timesteps=2, solver="heun")
    d = modeling.inference(params, dataclasses.replace(CFG, sampler=heun), tok, pt, pf, emb)
    assert not [n for n in compiles.since() if "_solve_packed" in n]
    assert np.abs(a - b).max() > 1e-3  # the grid and weight reached the solve
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, d)


def test_packed_length_padding_bound():
    """Geometric buckets: < 1/16 padding from 128 packed tokens up, 16 programs per octave."""
    for n in range(128, 4097):
        b = modeling.packed_length(n)
        assert n <= b and (b - n) / n < 1 / 16, (n, b)
    assert len({modeling.packed_length(n) for n in range(129, 257)}) == 16
    assert len({modeling.packed_length(n) for n in range(1, 1025)}) == 64
    assert modeling.packed_length(162) == 168 and modeling.packed_length(162, 50) == 200


def test_inference_input_errors(params):
    emb = np.zeros((1, 192), np.float32)
    with pytest.raises(ConfigError, match="pre_lookahead_len"):
        modeling.inference(params, CFG, np.zeros((1, 2), int), np.zeros((1, 0), int), np.zeros((1, 0, 80)), emb,
                           finalize=False)
    with pytest.raises(ConfigError, match="prompt_feat is longer"):
        modeling.inference(params, CFG, np.zeros((1, 5), int), np.zeros((1, 2), int), np.zeros((1, 30, 80)), emb)
    with pytest.raises(ConfigError, match="token must be"):
        modeling.inference(params, CFG, np.zeros((2, 5), int), np.zeros((1, 2), int), np.zeros((1, 4, 80)), emb)


# ----------------------------------------------------------------------------- training loss
@pytest.mark.parametrize("streaming", [False, True])
def test_training_loss_parity(oracle, params, streaming):
    r = np.random.default_rng(11)
    B, S = 3, 30
    tl = np.array([30, 22, 27])
    tok = r.integers(0, 6561, (B, S)) * (np.arange(S)[None] < tl[:, None])
    F = 2 * S
    fl = 2 * tl
    feat = r.normal(size=(B, F, 80)).astype(np.float32) * (np.arange(F)[None, :, None] < fl[:, None, None])
    emb = r.normal(size=(B, 192)).astype(np.float32)
    draws = {"t_u": r.uniform(size=B).astype(np.float32), "z": r.normal(size=(B, F, 80)).astype(np.float32),
             "cfg_u": np.array([0.5, 0.1, 0.9], np.float32), "prompt_len": np.array([0, 9, 12])}
    ref = oracle("flow:training_loss", {"speech_token": tok, "speech_token_len": tl, "speech_feat": feat,
                                        "speech_feat_len": fl, "embedding": emb, "prompt_len": draws["prompt_len"],
                                        "t_u": draws["t_u"], "z": np.transpose(draws["z"], (0, 2, 1)),
                                        "cfg_u": draws["cfg_u"]}, dims=DIMS, seed=1, streaming=streaming)["loss"]
    chunk = CFG.encoder.static_chunk_size if streaming else 0
    jd = {k: jnp.asarray(v) for k, v in draws.items()}
    args = (jnp.asarray(tok), jnp.asarray(tl), jnp.asarray(feat), jnp.asarray(fl), jnp.asarray(emb), jd)
    loss_fn = jax.jit(lambda p, *a: modeling.training_loss(p, CFG, *a, chunk=chunk))
    close(loss_fn(params, *args), ref, 1e-5, what="training loss")
    if streaming:  # per-example chunk sizes (paper mask types) take the same path
        per_row = jax.jit(lambda p, *a: modeling.training_loss(p, CFG, *a, chunk=jnp.full((B,), chunk)))
        close(per_row(params, *args), ref, 1e-5, what="training loss, per-example chunks")


def test_loss_draws_and_paper_masks():
    cfg = FlowConfig(cfm=CFMConfig(train_masks="paper"))
    chunks = np.asarray(modeling.loss_masks(cfg, jax.random.key(0), 64))
    assert set(chunks.tolist()) == {0, 1, 25, 50}
    off = np.asarray(modeling.loss_masks(FlowConfig(), jax.random.key(1), 8))
    assert len(set(off.tolist())) == 1 and off[0] in (0, 25)
    d = cfm_lib.sample_loss_draws(jax.random.key(2), 256, 10, jnp.full((256,), 100), CFMConfig(), 80)
    pl = np.asarray(d["prompt_len"])
    assert pl.max() <= 30 and 0.4 < (pl > 0).mean() < 0.6 and d["z"].shape == (256, 10, 80)


def test_loss_variants_hand_derived():
    """MSE/L1 over all valid frames (official) or only the non-prompt frames (paper): with an
    estimator that predicts zeros the loss is the mean of u^2 / |u| over the kept frames."""
    r = np.random.default_rng(3)
    B, Fr, C = 2, 10, 80
    x1 = jnp.asarray(r.normal(size=(B, Fr, C)), jnp.float32)
    z = jnp.asarray(r.normal(size=(B, Fr, C)), jnp.float32)
    valid = jnp.asarray(np.arange(Fr)[None] < np.array([[10], [7]]))
    draws = {"t_u": jnp.array([0.3, 0.6]), "z": z, "cfg_u": jnp.array([0.9, 0.9]), "prompt_len": jnp.array([4, 0])}
    zero = lambda y, v, mu, t, s, c: jnp.zeros_like(y)  # noqa: E731
    u = np.asarray(x1 - (1 - 1e-6) * z)
    for loss, fn in (("mse", np.square), ("l1", np.abs)):
        for on_prompt in (True, False):
            cfg = CFMConfig(loss=loss, loss_on_prompt=on_prompt)
            got, _ = cfm_lib.cfm_loss(zero, x1, valid, x1, jnp.zeros((B, 80)), x1, draws, cfg)
            keep = np.asarray(valid).copy()
            if not on_prompt:
                keep[0, :4] = False
            want = fn(u)[keep].sum() / (keep.sum() * C)
            np.testing.assert_allclose(float(got), want, rtol=1e-5)
