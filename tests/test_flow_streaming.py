"""Cached streaming flow (``flow/streaming.py``) vs the recompute path and the official chunk loop.

Every chunk the official runtime returns is ``inference(token[:end], streaming=True,
finalize=...)[2 * offset:]`` recomputed from token 0; :class:`FlowStreamer` must return the same
frames (<= 1e-4 abs) from its caches. The streamer drives the real flow modules and the same
``cfm.solve`` as offline inference, so a 2-evaluation solver (Heun) streams too. Tiny config; window
lengths are kept to 25/50/100 tokens and capacities to 800 (plus one 400-frame tier) so the file
compiles the Euler chunk program four times, the Heun one once and the recompute reference twice.

Run: ``.venv/bin/python -m pytest tests/test_flow_streaming.py -q`` (full size:
``-m slow tests/test_flow_streaming.py``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax import params_util
from cosyvoice2_jax.config import ModelConfig
from cosyvoice2_jax.errors import ConfigError
from cosyvoice2_jax.flow import modeling
from cosyvoice2_jax.flow import params as flow_params
from cosyvoice2_jax.flow.streaming import FlowStreamer, StreamingError, official_pushes
from cosyvoice2_jax.layers.attention import skew
from oracle_client import unflatten_state_dict

CFG = ModelConfig.tiny().flow
TOL = 1e-4
REF_BUCKET = 250  # one compiled recompute program for every reference call


def dims_of(cfg) -> dict:
    e, d = cfg.encoder, cfg.decoder
    return dict(input_size=cfg.input_size, enc_heads=e.attention_heads, enc_units=e.linear_units,
                enc_blocks=e.num_blocks, enc_up_blocks=e.num_up_blocks, dec_channels=d.channels[0],
                dec_head_dim=d.attention_head_dim, dec_heads=d.num_heads, dec_blocks=d.n_blocks,
                dec_mid=d.num_mid_blocks)


def redraw(params, seed):
    """Variance-preserving re-draw of every weight (default init makes outputs input-insensitive)."""
    return params_util.redraw(params, seed)


@pytest.fixture(scope="module")
def params():
    return redraw(modeling.abstract_params(CFG), 0)  # shapes only: no init program to compile


def make_inputs(seed, S0, N):
    r = np.random.default_rng(seed)
    return dict(token=r.integers(0, CFG.vocab_size, N).astype(np.int32),
                prompt_token=r.integers(0, CFG.vocab_size, S0).astype(np.int32),
                prompt_feat=r.normal(size=(2 * S0, 80)).astype(np.float32),
                embedding=r.normal(size=192).astype(np.float32))


def run_stream(fs, inp, pushes, with_state=False):
    """Push the token stream in the given sizes; returns the list of chunk mels (and the state)."""
    st = fs.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"])
    fed, mels = 0, []
    for n, fin in pushes:
        old = st.caches
        st, mel = fs.push(st, inp["token"][fed: fed + n], fin)
        if old is not None and st.caches is not None and st.caches is not old:
            # a push consumes its caches (donated to the chunk program; when they grow, each old
            # array is deleted once copied): nothing of the old tier stays alive
            assert all(x.is_deleted() for x in jax.tree.leaves(old)[2:]), "old stream caches still alive"
        fed += n
        mels.append(mel)
    return (mels, st) if with_state else mels


def recompute(params, inp, pushes, lookahead=3, cfg=CFG):
    """The official runtime's recompute path with our own ``modeling.inference``."""
    fed, emitted, out = 0, 0, []
    for n, fin in pushes:
        fed += n
        end = fed if fin else fed - lookahead
        if end <= emitted:
            out.append(np.zeros((0, 80), np.float32))
            continue
        mel = modeling.inference(params, cfg, inp["token"][None, :fed], inp["prompt_token"][None],
                                 inp["prompt_feat"][None], inp["embedding"][None], streaming=True,
                                 finalize=fin, token_bucket=REF_BUCKET)[0]
        out.append(mel[2 * emitted:])
        emitted = end
    return out


def assert_chunks_equal(got, want, what):
    assert len(got) == len(want), (what, len(got), len(want))
    worst = 0.0
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (what, k, g.shape, w.shape)
        if g.size:
            worst = max(worst, float(np.max(np.abs(g - w))))
    print(f"[stream] {what}: {len(got)} chunks, max abs diff {worst:.3g}")
    assert worst <= TOL, (what, worst)
    return worst


# ----------------------------------------------------------------------------- schedules
def test_official_pushes_schedule():
    # prompt 30 -> pad 20: first chunk 45 + 3 look-ahead; then 50 (HEAD growth); rest final
    assert official_pushes(30, 140, max_hop=100) == [(48, False), (50, False), (42, True)]
    fixed = official_pushes(75, 500)
    assert fixed[0] == (28, False) and all(n == 25 for n, f in fixed[1:-1]) and fixed[-1][1]
    assert sum(n for n, _ in fixed) == 500 and len(fixed) == 20  # 19 hops of 25 + final 25
    assert official_pushes(10, 5) == [(5, True)]  # too short for a chunk: one final push


def test_skew_matches_gather():
    W, K = 5, 9
    x = np.random.default_rng(0).normal(size=(3, W, W - 1 + K)).astype(np.float32)
    a, j = np.meshgrid(np.arange(W), np.arange(K), indexing="ij")
    np.testing.assert_array_equal(np.asarray(skew(x, K)), x[:, a, W - 1 - a + j])


# ----------------------------------------------------------------------------- vs recompute
@pytest.fixture(scope="module")
def streamer(params):
    return FlowStreamer(params, CFG, max_frames=800, key_block=200)


def test_fixed_hop_equals_recompute(params, streamer):
    # prompt 25 (no pad), fixed hop 25 -> 7 chunks + a final partial chunk (10 new tokens, 13 emitted)
    inp = make_inputs(1, 25, 25 * 7 + 13)
    pushes = official_pushes(25, len(inp["token"]))
    assert len(pushes) == 8 and pushes[-1] == (10, True)
    got = run_stream(streamer, inp, pushes)
    assert_chunks_equal(got, recompute(params, inp, pushes), "hop 25")
    assert all(g.shape[0] == 50 for g in got[:-1]) and got[-1].shape[0] == 2 * 13
    # the output depends on the tokens (random weights are not input-insensitive)
    inp2 = dict(inp, token=inp["token"].copy())
    inp2["token"][-20] = (inp2["token"][-20] + 1) % CFG.vocab_size
    got2 = run_stream(streamer, inp2, pushes)
    assert np.array_equal(got2[0], got[0]) and np.max(np.abs(got2[-1] - got[-1])) > 1e-2


@pytest.mark.slow  # CI budget: fixed-hop and unaligned pushes stay in CI
def test_growing_hop_with_prompt_padding(params, streamer):
    # prompt 60 -> pad 15: first chunk 40 (+3), then 50, 100, 100 (HEAD), final partial
    inp = make_inputs(2, 60, 40 + 50 + 100 + 37)
    pushes = official_pushes(60, len(inp["token"]), max_hop=100)
    assert [n for n, _ in pushes] == [43, 50, 100, 34]
    got = run_stream(streamer, inp, pushes)
    assert_chunks_equal(got, recompute(params, inp, pushes), "hop 25->50->100")


def test_unaligned_pushes_and_growing_caches(params):
    # pushes that do not end on the 25-token chunk (partial chunks are recomputed), one push too
    # short to emit anything (look-ahead only), a final push; caches start at 400 frames and
    # double to 800 on the way (474 frames needed); every window is 50 tokens
    inp = make_inputs(3, 17, 220)
    pushes = [(2, False), (20, False), (31, False), (9, False), (44, False), (30, False), (40, False), (30, False),
              (14, True)]
    fs = FlowStreamer(params, CFG, max_frames=800, initial_frames=400, key_block=200)
    got, st = run_stream(fs, inp, pushes, with_state=True)
    assert got[0].shape == (0, 80) and st.caches.frames == 800 and st.caches.enc["encoders_0"].k.shape[1] == 400
    assert fs.tiers(17, 220) == [400, 800]  # the capacities the stream went through (server admission)
    assert_chunks_equal(got, recompute(params, inp, pushes), "unaligned pushes")
    fs.close(st)  # caches deleted at once (the pipeline does this before its unmasked last chunk)
    assert all(x.is_deleted() for x in jax.tree.leaves(st.caches))
    fs.close(st)  # closing twice (or a recompute-path state) is harmless
    fs.close(st._replace(caches=None))


def test_heun_equals_recompute(params):
    # the streamer runs cfm.solve like offline inference: a 2-evaluation solver streams too (one
    # estimator cache per evaluation); every window is 50 tokens (one program), 3 Heun steps
    cfg = dataclasses.replace(CFG, cfm=dataclasses.replace(CFG.cfm, solver="heun", n_timesteps=3))
    inp = make_inputs(8, 25, 28 + 50 + 47)
    pushes = [(28, False), (50, False), (47, True)]
    fs = FlowStreamer(params, cfg, max_frames=400, key_block=200)
    got, st = run_stream(fs, inp, pushes, with_state=True)
    tails = np.asarray(st.caches.dec["final_block"])  # (evaluations, CFG rows, 2, C): all 6 used
    assert tails.shape[0] == 6 and all(np.abs(tails[k]).max() > 0 for k in range(6))
    assert_chunks_equal(got, recompute(params, inp, pushes, cfg=cfg), "heun, 3 steps")


def test_split_windows_equal_recompute(params, streamer):
    # a push of 125 tokens runs as windows of 100 + 25, one of 75 as 50 + 25 (programs of the tests
    # above: no new compile); the frames equal the recompute path
    assert streamer._windows(125) == [100, 25] and streamer._windows(75) == [50, 25]
    assert streamer._windows(300) == [100, 100, 100]
    inp = make_inputs(6, 40, 88 + 75 + 20)
    pushes = [(88, False), (75, False), (20, True)]
    got = run_stream(streamer, inp, pushes)
    assert [g.shape[0] for g in got] == [2 * 85, 2 * 75, 2 * 23]
    assert_chunks_equal(got, recompute(params, inp, pushes), "split windows")


def test_compile_count(params, streamer, compiles):
    inp = make_inputs(4, 25, 25 * 3 + 10)
    pushes = official_pushes(25, len(inp["token"]))
    run_stream(streamer, inp, pushes)  # window lengths 50, 25, 25, 25(final): compiled by now
    compiles.mark()
    other = FlowStreamer(params, CFG, max_frames=800, key_block=200)  # same shapes: no new program
    inp = make_inputs(5, 25, 25 * 6 + 4)
    run_stream(other, inp, official_pushes(25, len(inp["token"])))
    assert not [n for n in compiles.since() if "_chunk" in n]


# ----------------------------------------------------------------------------- memory
def test_request_sized_caches_and_cache_bytes(params):
    # "request": the smallest key_block * 2**k tier holding the prompt and its first chunk
    fs = FlowStreamer(params, CFG, max_frames=800, initial_frames="request", key_block=200)
    for S0, frames in ((17, 200), (80, 400), (180, 800)):  # (25 + 25, 100 + 25, 200 + 25 tokens) * 2 frames
        inp = make_inputs(3, S0, 4)
        assert fs.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"]).caches.frames == frames
        assert fs.start_frames(S0) == frames
    # bytes: linear in the capacity; bf16 attention caches halve the K/V part
    half = FlowStreamer(params, CFG, max_frames=800, key_block=200, cache_dtype="bfloat16")
    kv32 = fs.cache_bytes(800) - fs.cache_bytes(400)
    assert kv32 == 2 * (fs.cache_bytes(400) - fs.cache_bytes(200)) > 0  # K/V of 400, then of 200 frames
    assert half.cache_bytes(800) - half.cache_bytes(400) == kv32 // 2
    st = half.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"])
    assert st.caches.dec["final_block"].dtype == np.float32 and st.caches.enc["encoders_0"].k.dtype == jnp.bfloat16
    assert int(sum(x.nbytes for x in jax.tree.leaves(st.caches))) == half.cache_bytes(800)


def test_memory_budget_falls_back_to_recompute(params):
    # caches allowed up to 400 frames: the pushes of test_unaligned_pushes_and_growing_caches run
    # cached until the stream needs 450 frames, then drop the caches and recompute from token 0
    inp = make_inputs(3, 17, 220)
    pushes = [(2, False), (20, False), (31, False), (9, False), (44, False), (30, False), (40, False), (30, False),
              (14, True)]
    probe = FlowStreamer(params, CFG, max_frames=800, key_block=200)
    fs = FlowStreamer(params, CFG, max_frames=800, initial_frames=400, key_block=200,
                      memory_budget_bytes=probe.cache_bytes(400))
    st = fs.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"])
    fed, got, modes = 0, [], []
    for n, fin in pushes:
        st, mel = fs.push(st, inp["token"][fed: fed + n], fin)
        fed += n
        got.append(mel)
        modes.append(st.recompute)
    assert modes == [False] * 7 + [True] * 2
    # the server's admission bound: at most the 400-frame tier here (dropped instead of growing);
    # without a budget, growing 400 -> 800 holds both tiers for a moment
    assert fs.peak_cache_bytes(17, 220) == probe.cache_bytes(400)
    assert probe.peak_cache_bytes(17, 220) == probe.cache_bytes(800)  # (no tiers: max_frames from the start)
    grow = FlowStreamer(params, CFG, max_frames=800, initial_frames=400, key_block=200)
    # growing 400 -> 800 holds the new tier and one array of the old (each is deleted once copied)
    largest_400 = max(x.nbytes for x in jax.tree.leaves(FlowStreamer(params, CFG, max_frames=400, key_block=200).start(
        inp["prompt_token"], inp["prompt_feat"], inp["embedding"]).caches))
    assert grow.peak_cache_bytes(17, 220) == probe.cache_bytes(800) + largest_400
    assert_chunks_equal(got, recompute(params, inp, pushes), "budget fallback")
    # a budget below the first tier: recompute from the start (no caches allocated)
    tiny = FlowStreamer(params, CFG, max_frames=800, initial_frames="request", key_block=200, memory_budget_bytes=0)
    assert tiny.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"]).caches is None
    with pytest.raises(ConfigError, match="memory_budget_bytes"):
        FlowStreamer(params, CFG, max_frames=800, memory_budget_bytes=-1)
    with pytest.raises(ConfigError, match="cache_dtype"):
        FlowStreamer(params, CFG, max_frames=800, cache_dtype="half-ish")


@pytest.mark.slow
def test_bf16_caches_deviation(params, streamer):
    """bf16 attention caches vs fp32 (same fp32 compute): measured 1.1e-3 max abs on mels of max 5.4
    (tiny config, 8 chunks); docs/performance.md states it."""
    inp = make_inputs(1, 25, 25 * 7 + 13)
    pushes = official_pushes(25, len(inp["token"]))
    want = run_stream(streamer, inp, pushes)
    got = run_stream(FlowStreamer(params, CFG, max_frames=800, key_block=200, cache_dtype="bfloat16"), inp, pushes)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    scale = max(float(np.abs(w).max()) for w in want)
    print(f"[stream] bf16 caches: max abs diff {diff:.3g} (mel max {scale:.3g})")
    assert 0 < diff < 1e-3 * scale


# ----------------------------------------------------------------------------- errors
def test_bad_input_errors(params, streamer):
    inp = make_inputs(6, 25, 400)
    st = streamer.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"])
    with pytest.raises(StreamingError, match="max_frames=800"):  # 25 + 397 tokens > 400 (checked before any work)
        streamer.push(st, inp["token"], False)
    st = streamer.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"])
    st, _ = streamer.push(st, inp["token"][:10], True)
    with pytest.raises(StreamingError, match="push after finalize"):
        streamer.push(st, inp["token"][10:20], False)
    with pytest.raises(StreamingError, match="prompt_feat must be"):
        streamer.start(inp["prompt_token"], inp["prompt_feat"][:-2], inp["embedding"])
    st = streamer.start(inp["prompt_token"], inp["prompt_feat"], inp["embedding"])
    with pytest.raises(StreamingError, match="outside"):
        streamer.push(st, np.array([1, 6561, 2]), False)
    with pytest.raises(StreamingError, match="1-D integer"):
        streamer.push(st, np.zeros((2, 3), np.float32), False)
    with pytest.raises(ConfigError, match="multiple of 50"):
        FlowStreamer(params, CFG, max_frames=120)
    with pytest.raises(ConfigError, match="initial_frames=200"):
        FlowStreamer(params, CFG, max_frames=100, initial_frames=200)
    with pytest.raises(ConfigError, match="static chunk"):
        FlowStreamer(params, dataclasses.replace(CFG, encoder=dataclasses.replace(CFG.encoder, static_chunk_size=0),
                                                 decoder=dataclasses.replace(CFG.decoder, static_chunk_size=0)))


# ----------------------------------------------------------------------------- vs the official
@pytest.mark.parametrize("max_hop", [25, pytest.param(100, marks=pytest.mark.slow)])  # 100: slow (CI budget)
def test_equals_official_chunk_loop(oracle, max_hop):
    dims = dims_of(CFG)
    p = flow_params.from_torch(unflatten_state_dict(oracle("flow:state_dict", {}, dims=dims, seed=7)), CFG)
    S0, N = 25, 25 * 3 + 12 if max_hop == 25 else 200
    inp = make_inputs(7, S0, N)
    ref = oracle("flow_stream:stream_loop", {"token": inp["token"][None], "prompt_token": inp["prompt_token"][None],
                                             "prompt_feat": inp["prompt_feat"][None],
                                             "embedding": inp["embedding"][None]},
                 dims=dims, seed=7, max_hop=max_hop)
    pushes = official_pushes(S0, N, max_hop=max_hop)
    n_chunks = len(pushes) - 1
    assert n_chunks == sum(k.startswith("chunk_") for k in ref) and n_chunks == 3
    want = [ref[f"chunk_{k}"] for k in range(n_chunks)] + [ref["final_stream"]]
    got = run_stream(FlowStreamer(p, CFG, max_frames=800, key_block=200), inp, pushes)
    assert_chunks_equal(got, want, f"official loop, max hop {max_hop}")
    # the official final chunk runs without chunk masks (non-streaming inference over all tokens):
    # it differs from the chunk-masked finalize, so the pipeline runs it separately
    assert ref["final_official"].shape == ref["final_stream"].shape
    assert np.max(np.abs(ref["final_official"] - ref["final_stream"])) > 1e-3


# ----------------------------------------------------------------------------- full size
@pytest.mark.slow
def test_full_size_equals_official(oracle):
    cfg = ModelConfig.cosyvoice2().flow
    p = flow_params.from_torch(unflatten_state_dict(oracle("flow:state_dict", {}, seed=3)), cfg)
    S0, N = 30, 120
    r = np.random.default_rng(3)
    inp = dict(token=r.integers(0, 6561, N).astype(np.int32), prompt_token=r.integers(0, 6561, S0).astype(np.int32),
               prompt_feat=r.normal(size=(2 * S0, 80)).astype(np.float32),
               embedding=r.normal(size=192).astype(np.float32))
    ref = oracle("flow_stream:stream_loop", {"token": inp["token"][None], "prompt_token": inp["prompt_token"][None],
                                             "prompt_feat": inp["prompt_feat"][None],
                                             "embedding": inp["embedding"][None]}, seed=3, max_hop=100)
    pushes = official_pushes(S0, N, max_hop=100)
    want = [ref[f"chunk_{k}"] for k in range(len(pushes) - 1)] + [ref["final_stream"]]
    got = run_stream(FlowStreamer(p, cfg, max_frames=400), inp, pushes)
    assert_chunks_equal(got, want, "full size, official loop (HEAD hops)")
