"""Pipeline plumbing on a tiny random-weight model (no release files, no oracle).

End-to-end parity with the official classes lives in tests/test_pipeline_e2e.py; here: the
streaming schedule and caches, batch == single requests, compile counts, speaker cache, errors.
"""
from __future__ import annotations

import numpy as np
import pytest

from cosyvoice2_jax.config import StreamingConfig
from cosyvoice2_jax.errors import AudioError, ConfigError, InputWarning, TextError
from cosyvoice2_jax.pipeline import token2wav as T
from cosyvoice2_jax.pipeline.model import CosyVoice2, ModeError, SynthesisRequest
from pipeline_toy import toy_loaded

import jax


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return toy_loaded(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def tts(loaded):
    return CosyVoice2(loaded, sampling="ras", seed=0, flow_cache=False)


@pytest.fixture(scope="module")
def prompt(prompt_wav):
    from cosyvoice2_jax.frontend.audio import load_wav

    return load_wav(prompt_wav[0], 16000)[: 16000 * 3]


def _cap_lm(tts, n):
    """Limit LM output length (random weights rarely emit EOS): max_len = n tokens per text token."""
    import dataclasses

    tts.lm.cfg = dataclasses.replace(tts.lm.cfg, max_token_text_ratio=float(n), min_token_text_ratio=1.0)


# ----------------------------------------------------------------------------- hand-derived helpers
def test_interpolate_linear_matches_torch_formula():
    x = np.array([[0.0], [4.0]], np.float32)
    # align_corners=False: src = (i + 0.5) * 0.5 - 0.5 -> [-0.25 (clamped 0), 0.25, 0.75, 1.25 (clamped)]
    np.testing.assert_allclose(T.interpolate_linear(x, 4)[:, 0], [0.0, 1.0, 3.0, 4.0])
    y = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    np.testing.assert_array_equal(T.interpolate_linear(y, 7), y)
    # shrinking 4 -> 2: src = (i + 0.5) * 2 - 0.5 = [0.5, 2.5]
    z = np.array([[0.0], [2.0], [4.0], [6.0]], np.float32)
    np.testing.assert_allclose(T.interpolate_linear(z, 2)[:, 0], [1.0, 5.0])


def test_fade_in_out_hand_derived():
    w = np.hamming(4)  # overlap 2
    new = np.ones(5)
    prev = np.array([9.0, 9.0, 2.0, 3.0])
    out = T.fade_in_out(new, prev, w)
    np.testing.assert_allclose(out[:2], [1 * w[0] + 2 * w[2], 1 * w[1] + 3 * w[3]])
    np.testing.assert_array_equal(out[2:], 1.0)


def test_hop_schedule():
    s = StreamingConfig()
    it = T.hop_schedule(37, s)  # pad 13: 37 + 38 = 75
    assert [next(it) for _ in range(5)] == [38, 50, 100, 100, 100]
    it = T.hop_schedule(50, StreamingConfig(stream_scale_factor=1))
    assert [next(it) for _ in range(3)] == [25, 25, 25]


# ----------------------------------------------------------------------------- streaming
def test_stream_schedule_and_lengths(tts, prompt):
    """Chunks follow the official schedule and the streamed audio is as long as the non-streamed."""
    _cap_lm(tts, 30)
    chunks = []
    key = jax.random.PRNGKey(3)
    pf_info, flow = tts._prompt(prompt, "")
    tokens = np.random.default_rng(0).integers(0, 6561, 150)
    outs = list(tts.token2wav.stream([list(tokens[:60]), list(tokens[60:])], flow, key,
                                     on_chunk=chunks.append))
    s0 = len(flow.token)
    first = 25 + (-(-s0 // 25) * 25 - s0)
    hops = [c["hop"] for c in chunks[:-1]]
    assert hops[0] == first and hops[1:] == [50, 100][: len(hops) - 1]
    assert chunks[-1].get("final")
    total = sum(o.shape[0] for o in outs)
    full = tts.token2wav.full(tokens.astype(np.int32), flow, key)
    assert total == full.shape[0] == 2 * 150 * 480
    # hop-aligned: every intermediate chunk holds 2 * hop frames minus the held-back fade tail
    for c, o in zip(chunks[:-1], outs[:-1]):
        assert c["frames"] == 2 * c["hop"]


def test_streamed_audio_continuous(tts, prompt):
    """The official cross-fade: chunk boundaries carry no jump larger than the signal's own steps."""
    _, flow = tts._prompt(prompt, "")
    tokens = np.random.default_rng(1).integers(0, 6561, 150)
    outs = list(tts.token2wav.stream([list(tokens)], flow, jax.random.PRNGKey(0)))
    audio = np.concatenate(outs)
    d = np.abs(np.diff(audio))
    edges = np.cumsum([o.shape[0] for o in outs])[:-1]
    assert np.all(d[edges - 1] <= 5 * np.percentile(d, 99.9) + 1e-6)


# ----------------------------------------------------------------------------- modes, batch
def test_modes_and_batch_equal_single(tts, prompt):
    _cap_lm(tts, 4)
    keys = [jax.random.PRNGKey(i) for i in range(4)]
    single = [
        np.concatenate([o["tts_speech"][0] for o in tts.inference_zero_shot("Hello there.", "A prompt text.", prompt,
                                                                              key=keys[0])]),
        np.concatenate([o["tts_speech"][0] for o in tts.inference_cross_lingual("Good morning to you all.", prompt,
                                                                                  key=keys[1])]),
        np.concatenate([o["tts_speech"][0] for o in tts.inference_sft("Nice weather.", "spk_a", key=keys[2])]),
        np.concatenate([o["tts_speech"][0] for o in tts.inference_vc(prompt[:16000], prompt, key=keys[3])]),
    ]
    batch = tts.synthesize_batch([
        SynthesisRequest("zero_shot", "Hello there.", prompt, "A prompt text.", key=keys[0]),
        SynthesisRequest("cross_lingual", "Good morning to you all.", prompt, key=keys[1]),
        SynthesisRequest("sft", "Nice weather.", spk_id="spk_a", key=keys[2]),
        SynthesisRequest("vc", prompt_wav=prompt, source_wav=prompt[:16000], key=keys[3]),
    ])
    for s, b in zip(single, batch):
        assert s.shape == b.shape
        # same tokens (equal lengths); audio equal up to float32 reassociation of the batched
        # convolutions (observed 2e-5 on samples of amplitude ~0.7)
        np.testing.assert_allclose(b, s, atol=1e-4)
    # vc speaks the source's tokens: 25 tokens/s * 1 s -> 50 frames -> 24000 samples
    assert single[3].shape[0] == 25 * 2 * 480
    # different key -> different audio (the sampler and the source noise are used)
    other = np.concatenate([o["tts_speech"][0] for o in tts.inference_sft("Nice weather.", "spk_a",
                                                                          key=jax.random.PRNGKey(99))])
    assert other.shape != single[2].shape or not np.allclose(other, single[2])


def test_no_recompile_across_requests(tts, prompt, compiles):
    _cap_lm(tts, 4)
    list(tts.inference_cross_lingual("One two three.", prompt, key=jax.random.PRNGKey(0)))
    before = (tts.lm.compile_counts(), tts.token2wav.vocoder.compiled_programs())
    compiles.mark()
    list(tts.inference_cross_lingual("Four five six seven.", prompt, key=jax.random.PRNGKey(1)))
    assert (tts.lm.compile_counts(), tts.token2wav.vocoder.compiled_programs()) == before
    assert compiles.since() == [], "a second request of other lengths compiled new programs"


def test_speed_changes_length(tts, prompt):
    _cap_lm(tts, 4)
    k = jax.random.PRNGKey(5)
    a = next(tts.inference_sft("Speed test.", "spk_a", key=k))["tts_speech"]
    b = next(tts.inference_sft("Speed test.", "spk_a", key=k, speed=2.0))["tts_speech"]
    assert b.shape[1] == (a.shape[1] // 480 // 2) * 480


def test_zero_shot_speaker_cache(tts, prompt, tmp_path):
    _cap_lm(tts, 4)
    assert tts.add_zero_shot_spk("A prompt text.", prompt, "me")
    assert "me" in tts.list_available_spks()
    k = jax.random.PRNGKey(7)
    direct = next(tts.inference_zero_shot("Hello there.", "A prompt text.", prompt, key=k))["tts_speech"]
    cached = next(tts.inference_zero_shot("Hello there.", "", zero_shot_spk_id="me", key=k))["tts_speech"]
    np.testing.assert_allclose(cached, direct, atol=1e-6)
    path = tts.save_spkinfo(tmp_path / "spk.npz")
    with pytest.raises(ModeError, match="exists"):
        tts.save_spkinfo(path, overwrite=False)
    saved = tts.spk2info.pop("me")
    tts.load_spkinfo(path)
    np.testing.assert_array_equal(tts.spk2info["me"]["speech_token"], saved["speech_token"])


def test_bad_input(tts, prompt):
    with pytest.raises(ModeError, match="unknown speaker 'nobody'.*spk_a"):
        list(tts.inference_sft("Hi.", "nobody"))
    with pytest.raises(ModeError, match="prompt_text"):
        list(tts.inference_zero_shot("Hi.", "", prompt))
    with pytest.raises(ModeError, match="prompt audio"):
        list(tts.inference_cross_lingual("Hi.", None))
    with pytest.raises(TextError, match="empty"):
        list(tts.inference_cross_lingual("   ", prompt))
    with pytest.raises(ConfigError, match="stream=False"):
        list(tts.inference_sft("Hi.", "spk_a", stream=True, speed=1.5))
    with pytest.raises(AudioError, match="at least 0.2 s"):
        list(tts.inference_cross_lingual("Hi.", np.zeros(100, np.float32) + 0.1))
    with pytest.raises(AudioError, match="not found"):
        list(tts.inference_cross_lingual("Hi.", "/nonexistent.wav"))
    with pytest.raises(ModeError, match="unknown mode"):
        tts.synthesize_batch([SynthesisRequest("karaoke", "Hi.")])
    # non-finite speed is refused up front (it used to pass `speed <= 0` and fail after the LM ran)
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(ConfigError, match="finite number > 0"):
            next(tts.inference_sft("Hi.", "spk_a", speed=bad))
        with pytest.raises(ConfigError, match="finite number > 0"):
            tts.synthesize_batch([SynthesisRequest("sft", "Hi.", spk_id="spk_a", speed=bad)])
    # zero-width-only text is empty; characters the tokenizer only has as raw bytes warn, named
    with pytest.raises(TextError, match="zero-width"):
        next(tts.inference_sft("\u200b\u2060\ufeff", "spk_a"))
    with pytest.warns(InputWarning, match=r"U\+E000.*U\+200B"):
        tts._inputs(SynthesisRequest("sft", "Hi \ue000 there\u200b.", spk_id="spk_a"))
    # prompts: over 30 s refused with the reason, over 15 s warn
    with pytest.raises(AudioError, match="the limit is 30 s"):
        next(tts.inference_cross_lingual("Hi.", np.tile(prompt, 11)))
    with pytest.warns(InputWarning, match="prompts over 15 s"):
        tts._inputs(SynthesisRequest("cross_lingual", "Hi.", np.tile(prompt, 6)))


@pytest.mark.slow  # ~30-50 s on the 2-core CI machine; run with -m slow
def test_sharded_batch_equals_single_device(loaded, tts, prompt):
    """synthesize_batch on a ('data',) mesh of the 8 simulated CPU devices == on one device."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = CosyVoice2(loaded, sampling="ras", seed=0, flow_cache=False, mesh=mesh)
    _cap_lm(tts, 4)
    _cap_lm(sharded, 4)
    reqs = [SynthesisRequest("cross_lingual", "Good morning.", prompt, key=jax.random.PRNGKey(1)),
            SynthesisRequest("sft", "Nice weather today.", spk_id="spk_a", key=jax.random.PRNGKey(2)),
            SynthesisRequest("zero_shot", "Hello.", prompt, "A prompt text.", key=jax.random.PRNGKey(3))]
    ref = tts.synthesize_batch(reqs)
    got = sharded.synthesize_batch(reqs)
    assert sharded.lm.params["speech_embedding"]["embedding"].sharding.mesh.shape["data"] == 8
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, atol=1e-4)


@pytest.mark.slow  # ~30-50 s on the 2-core CI machine; run with -m slow
def test_cached_stream_equals_recompute(loaded, tts, prompt):
    """Streaming with the cached flow state == the official recompute-from-token-0 path (HEAD hops)."""
    cached = CosyVoice2(loaded, sampling="ras", seed=0, flow_cache=True)
    _, flow = tts._prompt(prompt, "")
    tokens = np.random.default_rng(2).integers(0, 6561, 190)
    src = [list(tokens[:70]), list(tokens[70:])]
    a = list(cached.token2wav.stream(src, flow, jax.random.PRNGKey(4)))
    b = list(tts.token2wav.stream(src, flow, jax.random.PRNGKey(4)))
    assert len(a) == len(b) >= 4
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-4)


@pytest.mark.slow  # ~20-40 s per sampler on the 2-core CI machine (streaming + HiFT programs); run with -m slow
@pytest.mark.parametrize("sampler", [dict(steps=2, solver="heun", guidance="none"),
                                     dict(steps=1, solver="rk4", grid="uniform", cfg_rate=0.5)],
                         ids=["heun-noguidance", "rk4-cfg"])  # (not cfg_zero_star: its scale spans the chunk)
def test_sampler_cached_stream_equals_recompute(loaded, sampler):
    """A non-default flow sampler reaches every streaming path: the cached streamer (its caches sized
    by the sampler: one slot per velocity evaluation, one row without guidance) == the recompute path."""
    from cosyvoice2_jax.flow import sampling
    from cosyvoice2_jax.flow.runtime import FlowPrompt

    s = sampling.SamplerConfig(**sampler)
    p, cfg = loaded.params, loaded.config
    t2w = {c: T.Token2Wav(cfg, p["flow"], p["hift"], flow_cache=c, sampler=s, initial_stream_frames=300)
           for c in (True, False)}
    rng = np.random.default_rng(5)
    prompt = FlowPrompt(rng.integers(0, 6561, 20).astype(np.int32),
                        rng.normal(-5.0, 1.0, (40, 80)).astype(np.float32), rng.normal(size=192).astype(np.float32))
    streamer = t2w[True].flow.streamer()
    assert streamer.sampler == t2w[False].flow.sampler == s
    tails = streamer.start(prompt.token, prompt.feat, prompt.embedding).caches.dec["final_block"]
    assert tails.shape[:2] == (sampling.n_evals(s), sampling.rows(s))  # heun/none: (4, 1); rk4/cfg: (4, 2)
    tokens = rng.integers(0, 6561, 90)
    src = [list(tokens[:40]), list(tokens[40:])]
    a = list(t2w[True].stream(src, prompt, jax.random.PRNGKey(4)))
    b = list(t2w[False].stream(src, prompt, jax.random.PRNGKey(4)))
    assert len(a) == len(b) >= 3
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_speaker_tag_prefix(tts, prompt):
    """mSFT (paper section 2.8): speaker_tag puts the tokens of "Speaker <tag><|endofprompt|>" in the
    LM prompt text, as the official instruct path puts an instruction (tests/test_msft.py checks
    these ids against the official tokenizer); zero_shot keeps its prompt text and speech after it."""
    from cosyvoice2_jax.frontend.text import speaker_prompt

    enc = tts.text_tokenizer.encode
    assert tts._inputs(SynthesisRequest("sft", "Hello there.", spk_id="spk_a"))[0].prompt_text == []
    for tag in ("A", ""):
        mi = tts._inputs(SynthesisRequest("sft", "Hello there.", spk_id="spk_a", speaker_tag=tag))[0]
        assert mi.prompt_text == enc(speaker_prompt(tag)) and list(mi.text) == enc("Hello there.")
    ins = tts._inputs(SynthesisRequest("instruct2", "Hello there.", prompt, instruct_text="Speaker A<|endofprompt|>"))
    assert ins[0].prompt_text == enc(speaker_prompt("A"))
    zs = tts._inputs(SynthesisRequest("zero_shot", "Hello there.", prompt, "The prompt text.", speaker_tag="B"))[0]
    plain = tts._inputs(SynthesisRequest("zero_shot", "Hello there.", prompt, "The prompt text."))[0]
    assert zs.prompt_text == enc("Speaker B<|endofprompt|>") + list(plain.prompt_text)
    np.testing.assert_array_equal(zs.llm_prompt_speech, plain.llm_prompt_speech)
    with pytest.raises(ModeError, match="speaker_tag"):
        tts._inputs(SynthesisRequest("cross_lingual", "Hello there.", prompt, speaker_tag="B"))


def test_to_device_in_place_moves_every_host_array_and_keeps_values():
    """from_pretrained's load step: numpy leaves become device arrays in the same dict (so the host
    copies can be freed one by one); values, dtypes and non-array leaves are unchanged."""
    from cosyvoice2_jax.pipeline.model import _to_device_in_place

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 2], np.int32)
    tree = {"x": {"kernel": a.copy(), "bias": b.copy()}, "y": a.copy() * 2, "n": 3}
    _to_device_in_place(tree)
    assert isinstance(tree["x"]["kernel"], jax.Array) and isinstance(tree["y"], jax.Array)
    assert isinstance(tree["x"]["bias"], jax.Array) and tree["x"]["bias"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(tree["x"]["kernel"]), a)
    np.testing.assert_array_equal(np.asarray(tree["y"]), a * 2)
    assert tree["n"] == 3


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_call_keys_equal_the_eager_derivation(seed):
    """The pipeline derives its per-call keys with three small jitted programs; they must equal the
    eager ``jax.random`` ops they replace (same seeds, same audio as before)."""
    from cosyvoice2_jax.pipeline.model import _call_key, _fold_in, _split2

    for n in (0, 1, 5):
        ref = jax.random.fold_in(jax.random.PRNGKey(seed), n)
        key = _call_key(seed, n)
        np.testing.assert_array_equal(np.asarray(key), np.asarray(ref))
        np.testing.assert_array_equal(np.asarray(_fold_in(key, 2)), np.asarray(jax.random.fold_in(ref, 2)))
        for a, b in zip(_split2(key), jax.random.split(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
