"""Repetition-aware sampling (RAS), batched, explicit PRNG keys.

CosyVoice 2 paper section 2.3 / VALL-E 2; official ``cosyvoice/utils/common.py`` (``ras_sampling``,
``nucleus_sampling``, ``random_sampling``) and ``TransformerLM.sampling_ids``. Semantics per row:

1. ``p = softmax(logp)``; sort descending (ties: lower id first); keep the prefix of candidates
   while the running fp32 sum of the kept ones is ``< top_p`` and fewer than ``top_k`` are kept
   (the first is always kept); draw one candidate proportionally to ``p``.
2. If the drawn id occurs ``>= win_size * tau_r`` times among the last ``win_size`` decoded
   tokens, draw again from the full ``p`` instead ("random sampling").
3. While EOS must be ignored (fewer than ``min_len`` steps), repeat 1-2 with fresh randomness
   until the id is not EOS (at most ``max_trials``, then the best non-EOS id: the official
   raises ``RuntimeError`` there).

A categorical draw is ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d., which is exactly how torch's
``multinomial(1)`` draws one sample, so given the same exponential variates this module picks the
same id as the official code (tests/test_llm_sampling.py).

Shapes: B rows, V vocabulary, K = top_k, W = win_size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import SamplingConfig


def nucleus_candidates(probs_bv, top_p: float, top_k: int):
    """Candidate set of ``nucleus_sampling``: ids (B,K), probs (B,K), mask (B,K) (a prefix)."""
    vals, ids = jax.lax.top_k(probs_bv, top_k)  # descending; equal values keep the lower index first
    cum = jnp.zeros(vals.shape[:1], jnp.float32)
    keep = []
    for i in range(top_k):  # the official running sum is sequential fp32: reproduce its rounding
        keep.append(cum < top_p)
        cum = jnp.where(keep[-1], cum + vals[:, i], cum)
    return ids, vals, jnp.stack(keep, axis=1)


def draw(weights_bn, exp_bn, mask_bn=None):
    """Index of ``argmax(w / E)`` per row (torch ``multinomial(1)`` given its exponential draws)."""
    ratio = weights_bn / exp_bn
    if mask_bn is not None:
        ratio = jnp.where(mask_bn, ratio, -1.0)
    return jnp.argmax(ratio, axis=-1)


def repetitions(ids_b, history_bw, hist_valid_bw):
    """How often ``ids`` occurs among the valid history entries (B,)."""
    return jnp.sum((history_bw == ids_b[:, None]) & hist_valid_bw, axis=-1)


def ras_choose(logp_bv, history_bw, hist_valid_bw, e_nuc_bk, e_rand_bv, cfg: SamplingConfig = SamplingConfig()):
    """One RAS draw given the exponential variates: returns ids (B,) and whether the fallback ran (B,)."""
    probs = jax.nn.softmax(logp_bv.astype(jnp.float32), axis=-1)
    ids, vals, mask = nucleus_candidates(probs, cfg.top_p, cfg.top_k)
    nuc = jnp.take_along_axis(ids, draw(vals, e_nuc_bk, mask)[:, None], axis=1)[:, 0]
    fallback = repetitions(nuc, history_bw, hist_valid_bw) >= cfg.win_size * cfg.tau_r
    rand = draw(probs, e_rand_bv)
    return jnp.where(fallback, rand, nuc).astype(jnp.int32), fallback


def ras_sample(keys_b, logp_bv, history_bw, hist_valid_bw, ignore_eos_b, eos_id: int,
               cfg: SamplingConfig = SamplingConfig(), max_trials: int = 100):
    """``sampling_ids(ras_sampling)`` for a batch: RAS with EOS rejection for rows in ``ignore_eos``.

    ``keys_b`` holds one PRNG key per row (B, 2), so a row's draws do not depend on the other rows
    of the batch (batched decoding equals single-row decoding for the same key).
    """
    v = logp_bv.shape[-1]

    def trial(keys):
        k = jax.vmap(lambda kk: jax.random.split(kk, 2))(keys)
        e_nuc = jax.vmap(lambda kk: jax.random.exponential(kk, (cfg.top_k,), jnp.float32))(k[:, 0])
        e_rand = jax.vmap(lambda kk: jax.random.exponential(kk, (v,), jnp.float32))(k[:, 1])
        return ras_choose(logp_bv, history_bw, hist_valid_bw, e_nuc, e_rand, cfg)[0]

    def split(keys):
        k = jax.vmap(lambda kk: jax.random.split(kk, 2))(keys)
        return k[:, 0], k[:, 1]

    def cond(state):
        _, _, need, n = state
        return jnp.any(need) & (n <= max_trials)

    def body(state):
        keys, ids, need, n = state
        keys, sub = split(keys)
        ids = jnp.where(need, trial(sub), ids)
        return keys, ids, need & (ids == eos_id), n + 1

    keys, sub = split(keys_b)
    ids = trial(sub)
    need = ignore_eos_b & (ids == eos_id)
    _, ids, need, _ = jax.lax.while_loop(cond, body, (keys, ids, need, jnp.int32(1)))
    best_non_eos = jnp.argmax(logp_bv.at[:, eos_id].set(-jnp.inf), axis=-1).astype(jnp.int32)
    return jnp.where(need, best_non_eos, ids)


def greedy(logp_bv, ignore_eos_b, eos_id: int):
    """Argmax, EOS excluded for rows in ``ignore_eos`` (the official loop with an argmax sampler
    would retry forever and raise there)."""
    masked = jnp.where(ignore_eos_b[:, None] & (jnp.arange(logp_bv.shape[-1]) == eos_id), -jnp.inf, logp_bv)
    return jnp.argmax(masked, axis=-1).astype(jnp.int32)
