"""RAS sampling vs the official ``ras_sampling`` given the same random draws.

The oracle runs the official function with a seeded torch generator and also records the
exponential variates torch's ``multinomial(1)`` consumes (it draws ``argmax(p / E)``); it checks
that this model of ``multinomial`` reproduces the real picks. Our ``ras_choose`` given the same
variates must pick the same ids, with the same candidate sets and the same fallback decisions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.config import SamplingConfig
from cosyvoice2_jax.llm import sampling as S

V = 6564
EOS = 6561


def _logp_rows(rng):
    rows = []
    for scale in (0.5, 2.0, 4.0, 8.0):  # flat (top_k binds) ... peaked (top_p binds)
        rows.append(rng.standard_normal(V) * scale)
    tie = rng.standard_normal(V) * 0.5
    tie[[7, 300, 301, 5000]] = 6.0  # four equal maxima: stable order = lower id first
    rows.append(tie)
    spike = rng.standard_normal(V)
    spike[42] = 30.0  # one candidate only
    rows.append(spike)
    rows.append(rng.standard_normal(V) * 3.0)
    rows.append(rng.standard_normal(V) * 3.0)
    x = np.stack(rows).astype(np.float32)
    return x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)


@pytest.fixture(scope="module")
def case(oracle):
    rng = np.random.default_rng(0)
    logp = _logp_rows(rng)
    r = logp.shape[0]
    top = np.argsort(-logp, axis=1, kind="stable")
    decoded = rng.integers(0, 6561, (r, 14))
    n_dec = np.array([0, 14, 3, 14, 10, 5, 14, 14])
    # rows 3, 5, 6: the likely candidates were decoded recently -> RAS falls back to random sampling
    decoded[3, -3:] = top[3, 0]
    decoded[5, 2] = 42
    decoded[6, -10:] = top[6, :10]
    decoded[7, :4] = top[7, 0]  # older than the window of 10: no fallback because of it
    seeds = np.arange(r) + 11
    out = oracle("llm:ras", {"logp": logp, "decoded": decoded, "n_decoded": n_dec, "seeds": seeds})
    return logp, decoded, n_dec, out


def _history(decoded, n_dec, w=10):
    r = decoded.shape[0]
    hist = np.zeros((r, w), np.int32)
    valid = np.zeros((r, w), bool)
    for i in range(r):
        h = decoded[i, :n_dec[i]][-w:]
        hist[i, :len(h)] = h
        valid[i, :len(h)] = True
    return jnp.asarray(hist), jnp.asarray(valid)


def test_multinomial_model_reproduces_torch(case):
    _, _, _, out = case
    np.testing.assert_array_equal(out["ids"], out["ids_rec"])


def test_candidate_sets_match_official(case):
    logp, _, _, out = case
    probs = jax.nn.softmax(jnp.asarray(logp), axis=-1)
    ids, vals, mask = S.nucleus_candidates(probs, 0.8, 25)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), out["n_cand"])
    assert out["n_cand"][5] == 1 and out["n_cand"][0] == 25 and 1 < out["n_cand"][2] < 25
    assert np.asarray(ids)[4, :4].tolist() == [7, 300, 301, 5000]  # ties: stable order
    # candidates are the most probable ids in order
    ref = np.argsort(-np.asarray(probs), axis=1, kind="stable")[:, :25]
    np.testing.assert_array_equal(np.where(mask, ids, -1), np.where(mask, ref, -1))


def test_ras_picks_what_the_official_picks(case):
    logp, decoded, n_dec, out = case
    hist, valid = _history(decoded, n_dec)
    ids, fell = S.ras_choose(jnp.asarray(logp), hist, valid, jnp.asarray(out["e_nuc"]) + (out["e_nuc"] == 0),
                             jnp.asarray(out["e_rand"]) + (out["e_rand"] == 0))
    np.testing.assert_array_equal(np.asarray(fell), out["fallback"])
    assert out["fallback"][[3, 5, 6]].all() and not out["fallback"][[0, 7]].any()
    np.testing.assert_array_equal(np.asarray(ids), out["ids"])


def test_fallback_rule_threshold():
    cfg = SamplingConfig(win_size=10, tau_r=0.3)  # needs 3 repetitions
    logp = jnp.log(jnp.zeros((2, 50)).at[:, 5].set(1.0) + 1e-9)
    hist = jnp.array([[5, 5, 1, 2, 3, 4, 6, 7, 8, 9], [5, 5, 5, 0, 0, 0, 0, 0, 0, 0]])
    valid = jnp.ones((2, 10), bool)
    e = jnp.ones((2, 25))
    _, fell = S.ras_choose(logp, hist, valid, e, jnp.ones((2, 50)), cfg)
    assert fell.tolist() == [False, True]
    _, fell = S.ras_choose(logp, hist, valid.at[1, 2].set(False), e, jnp.ones((2, 50)), cfg)
    assert fell.tolist() == [False, False]


def test_ras_sample_ignores_eos_and_follows_probs():
    n = 400
    logits = np.full((n, 100), -5.0, np.float32)
    logits[:, 10] = 2.0   # EOS most likely
    logits[:, 20] = 1.0
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    hist = jnp.zeros((n, 10), jnp.int32)
    valid = jnp.zeros((n, 10), bool)
    ignore = jnp.arange(n) % 2 == 0
    picks = np.asarray(jax.jit(S.ras_sample, static_argnums=5)(
        jax.random.split(jax.random.PRNGKey(0), n), logp, hist, valid, ignore, 10))
    assert (picks[0::2] != 10).all() and (picks[0::2] == 20).mean() > 0.95
    # rows allowed to stop: p(EOS | candidates {10, 20}) = e^2 / (e^2 + e) = 0.73
    assert 0.63 < (picks[1::2] == 10).mean() < 0.83
    logp, ignore = logp[:4], ignore[:4]
    g = S.greedy(logp, ignore, 10)
    assert g.tolist() == [20, 10, 20, 10]
