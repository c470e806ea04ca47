"""Batched jitted generation vs the official ``Qwen2LM.inference`` loop (tiny config).

Greedy decoding (the official ``sampling`` callable replaced by argmax) must give the official
tokens; a padded batch must equal single-row runs (greedy and RAS with per-row keys); requests of
different lengths within a bucket must not recompile; streaming must equal ``generate``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.llm import generate as G
from cosyvoice2_jax.llm import params as P
from test_llm import CFG, SEED, qwen_json
from oracle_client import unflatten_state_dict


@pytest.fixture(scope="module")
def params(oracle):
    return P.from_release(unflatten_state_dict(oracle("llm:build", cfg=qwen_json(CFG), seed=SEED)), CFG)


def _req(rng, n_text, n_ptext, n_pspeech, **kw):
    return G.Request(text=rng.integers(0, CFG.qwen.vocab_size, n_text).tolist(),
                     prompt_text=rng.integers(0, CFG.qwen.vocab_size, n_ptext).tolist(),
                     prompt_speech=rng.integers(0, CFG.speech_token_size, n_pspeech).tolist(), **kw)


@pytest.fixture(scope="module")
def greedy(params):
    return G.LMGenerator(CFG, params, sampling="greedy", steps_per_call=16)


def test_greedy_matches_official_inference(oracle, greedy):
    rng = np.random.default_rng(5)
    req = _req(rng, 6, 4, 9)
    ref = oracle("llm:greedy_inference", {"text": np.array(req.text), "prompt_text": np.array(req.prompt_text),
                                          "prompt_speech": np.array(req.prompt_speech)},
                 cfg=qwen_json(CFG), seed=SEED)["tokens"]
    assert len(ref) >= 64
    out = greedy.generate([req])[0]
    assert out == ref.tolist()


def test_batch_equals_single_rows(params):
    """Padding and batch neighbours do not change a row: RAS with per-row keys, so this covers
    the sampling state (history window, min/max lengths, EOS) as well as the forward."""
    rng = np.random.default_rng(7)
    reqs = [_req(rng, 3, 2, 5), _req(rng, 7, 0, 11, max_len=40), _req(rng, 2, 5, 0), _req(rng, 5, 1, 20, max_len=40)]
    ras = G.LMGenerator(CFG, params, sampling="ras", steps_per_call=16)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    batch = ras.generate(reqs, keys)
    singles = [ras.generate([r], keys[i:i + 1])[0] for i, r in enumerate(reqs)]
    assert batch == singles
    for r, toks in zip(reqs, batch):  # lengths within the text ratios, no EOS/special ids emitted
        assert 2 * len(r.text) <= len(toks) <= (r.max_len or 20 * len(r.text))
        assert all(0 <= t < CFG.speech_token_size for t in toks)
    assert batch != ras.generate(reqs, jax.random.split(jax.random.PRNGKey(4), 4))
    # new-style typed keys (jax.random.key) are the same keys: one or one per row
    assert ras.generate(reqs, jax.random.split(jax.random.key(3), 4)) == batch
    assert ras.generate(reqs, jax.random.key(5)) == ras.generate(reqs, jax.random.PRNGKey(5))


def test_no_recompile_within_bucket(params):
    gen = G.LMGenerator(CFG, params, sampling="ras", steps_per_call=8, batch_bucket=2)
    rng = np.random.default_rng(9)
    lens = [(3, 2, 5), (5, 0, 9), (4, 6, 1), (9, 3, 30), (6, 1, 17)]
    for i, (a, b, c) in enumerate(lens):
        reqs = [_req(rng, a, b, c, max_len=12)] + [_req(rng, b + 1, a, c, max_len=12)] * (i % 2)
        out = gen.generate(reqs, jax.random.PRNGKey(i))
        assert len(out) == len(reqs) and all(len(o) <= 12 for o in out)
    assert gen.compile_counts() == {"prefill": 1, "decode": 1}


def test_stream_equals_generate(greedy):
    rng = np.random.default_rng(11)
    reqs = [_req(rng, 4, 2, 3), _req(rng, 2, 0, 6)]
    chunks = list(greedy.stream(reqs))
    assert len(chunks) > 2 and all(len(c) == 2 for c in chunks)
    assert all(len(c[0]) <= greedy.steps_per_call for c in chunks)
    joined = [sum((c[i] for c in chunks), []) for i in range(2)]
    assert joined == greedy.generate(reqs)


def test_min_max_len(greedy):
    rng = np.random.default_rng(13)
    out = greedy.generate([_req(rng, 4, 0, 3, max_len=5), _req(rng, 4, 0, 3, min_len=0, max_len=0)])
    assert len(out[0]) <= 5 and out[1] == []


def test_bad_requests_raise(params, greedy):
    with pytest.raises(G.GenerationError, match="empty text"):
        greedy.generate([G.Request(text=[])])
    with pytest.raises(G.GenerationError, match=r"prompt speech tokens must be in \[0, 6561\)"):
        greedy.generate([G.Request(text=[1], prompt_speech=[6562])])
    with pytest.raises(G.GenerationError, match="needs a PRNG key"):
        G.LMGenerator(CFG, params, sampling="ras").generate([G.Request(text=[1])])
    with pytest.raises(G.GenerationError, match="sampling="):
        G.LMGenerator(CFG, params, sampling="top1")


def _scripted(fill_at, end_at, eos=6561, fill=6563):
    def rule(logp, decoded, ignore_eos):
        n = len(decoded)
        if n == fill_at:
            return fill
        if n >= end_at:
            assert not ignore_eos
            return eos
        return int(np.argmax(logp[:eos]))
    return rule


@pytest.mark.parametrize("n_ptext,n_pspeech,pieces", [(0, 0, [3, 4, 6, 5, 5, 2]), (6, 20, [3, 4, 7, 5, 1])])
def test_bistream_matches_official(oracle, greedy, n_ptext, n_pspeech, pieces):
    rng = np.random.default_rng(17)
    text = rng.integers(0, CFG.qwen.vocab_size, sum(pieces))
    ptext = rng.integers(0, CFG.qwen.vocab_size, n_ptext)
    pspeech = rng.integers(0, CFG.speech_token_size, n_pspeech)
    ref = oracle("llm:bistream_inference", {"text": text, "piece_lens": np.array(pieces), "prompt_text": ptext,
                                            "prompt_speech": pspeech}, cfg=qwen_json(CFG), seed=SEED,
                 fill_at=7, end_at=120)["tokens"].tolist()
    starts = np.cumsum([0] + pieces)
    sess = G.BistreamSession(greedy, num_slots=256, sampler=_scripted(7, 120))
    out = list(sess.run((text[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])), ptext.tolist(),
                        pspeech.tolist()))
    assert len(ref) > 60 and out == ref


def test_scan_layers_generation_equals_unrolled(params, greedy):
    import dataclasses

    from cosyvoice2_jax.llm import modeling as M

    cfg_s = dataclasses.replace(CFG, scan_layers=True)
    gen_s = G.LMGenerator(cfg_s, M.stack_layers(params, CFG.qwen.num_hidden_layers), sampling="greedy",
                          steps_per_call=16)
    req = _req(np.random.default_rng(19), 3, 2, 4, max_len=24)
    assert gen_s.generate([req]) == greedy.generate([req])


def test_slots_continuous_batching_equals_generate(params):
    """Slot API (serving engine): requests joining and leaving a fixed-shape batch between decode
    calls get the tokens ``generate`` gives them alone (RAS, per-request keys); one compiled shape."""
    rng = np.random.default_rng(11)
    reqs = [_req(rng, 3, 2, 5, max_len=30), _req(rng, 6, 0, 11, max_len=50), _req(rng, 2, 4, 0),
            _req(rng, 4, 1, 7, max_len=20), _req(rng, 5, 3, 2, max_len=25)]
    keys = jax.random.split(jax.random.PRNGKey(8), len(reqs))
    ras = G.LMGenerator(CFG, params, sampling="ras", steps_per_call=4)
    singles = [ras.generate([r], keys[i:i + 1])[0] for i, r in enumerate(reqs)]
    st = ras.slots_init(2, 512)
    out: dict[int, list[int]] = {}
    rows: list = [None, None]
    todo = list(range(len(reqs)))
    while todo or any(r is not None for r in rows):
        for r in range(2):  # join between decode calls
            if rows[r] is None and todo:
                i = todo.pop(0)
                st = ras.slot_insert(st, r, reqs[i], keys[i])
                rows[r], out[i] = i, []
        st, toks, done = ras.slots_step(st)
        for r in range(2):
            if rows[r] is not None:
                out[rows[r]].extend(int(t) for t in toks[r] if t >= 0)
                if done[r]:
                    rows[r] = None
    assert [out[i] for i in range(len(reqs))] == singles
    assert ras.compile_counts()["decode"] == 2  # generate's cache size + the slot batch
    # a cancelled request leaves its slot: the row is finished at once and emits nothing more
    st = ras.slot_insert(st, 0, reqs[1], keys[1])
    st = ras.slot_free(st, 0)
    st, toks, done = ras.slots_step(st)
    assert done[0] and (toks[0] < 0).all()
    with pytest.raises(G.GenerationError, match="cache positions"):
        ras.slot_insert(st, 1, _req(rng, 30, 0, 0), keys[0])
