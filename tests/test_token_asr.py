"""Token-level ASR (cosyvoice2_jax.token_asr): CTC against hand-enumerated alignments, soft FSQ
codes equal the hard path on one-hot inputs, its own checkpoint format round-trips strictly, and
the runtime's greedy decoding / bucketing."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax import token_asr as TA
from cosyvoice2_jax.config import TokenASRConfig
from cosyvoice2_jax.errors import ConversionError
from cosyvoice2_jax.tokenizer.fsq import fsq_decode, fsq_soft_decode

CFG = TokenASRConfig(text_vocab_size=12, d_model=32, n_heads=2, n_layers=1)


@pytest.fixture(scope="module")
def params():
    return TA.init_params(CFG, jax.random.PRNGKey(3))


def _collapse(path, blank):
    out, prev = [], None
    for t in path:
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return out


def _ctc_by_enumeration(logits, label, blank):
    """-log sum over every frame path that collapses to ``label`` of prod softmax(logits)[t, path_t]."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    total = 0.0
    for path in itertools.product(range(logits.shape[1]), repeat=logits.shape[0]):
        if _collapse(path, blank) == list(label):
            total += np.prod([p[t, k] for t, k in enumerate(path)])
    return -np.log(total)


def test_ctc_loss_equals_hand_enumerated_alignments():
    rng = np.random.default_rng(0)
    v, blank = 3, 3  # classes 0..2 plus blank 3
    logits = rng.standard_normal((3, 5, v + 1)).astype(np.float32)
    labels = np.array([[1, 0], [2, 2], [1, 0]], np.int32)
    label_len = np.array([2, 2, 1], np.int32)
    frames = np.array([5, 4, 3], np.int32)  # row 2: only 3 valid frames (the rest padding)
    got = jax.jit(TA.ctc_loss, static_argnums=4)(jnp.asarray(logits), jnp.asarray(frames), jnp.asarray(labels), jnp.asarray(label_len), blank)
    want = [_ctc_by_enumeration(logits[b, : frames[b]], labels[b, : label_len[b]], blank) for b in range(3)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # the smallest case by hand: 2 frames, label [a]: paths (a a), (a -), (- a)
    lg = np.log(np.array([[0.5, 0.2, 0.1, 0.2], [0.3, 0.3, 0.1, 0.3]], np.float32))
    hand = -np.log(0.5 * 0.3 + 0.5 * 0.3 + 0.2 * 0.3)
    one = jax.jit(TA.ctc_loss, static_argnums=4)(jnp.asarray(lg[None]), jnp.array([2]), jnp.array([[0]]), jnp.array([1]), blank)
    np.testing.assert_allclose(float(one[0]), hand, rtol=1e-6)
    # mean per text token over valid rows
    mean, _ = jax.jit(TA.ctc_mean_loss, static_argnums=4)(jnp.asarray(logits), jnp.asarray(frames), jnp.asarray(labels), jnp.asarray(label_len),
                               blank, jnp.array([True, True, False]))
    np.testing.assert_allclose(float(mean), (want[0] + want[1]) / 4, rtol=1e-5)


def test_soft_codes_equal_hard_path(params):
    ids = jnp.array([[0, 6560, 3280, 17, 5, 9], [1, 2, 3, 0, 0, 0]])
    lens = jnp.array([6, 3])
    onehot = jax.nn.one_hot(ids, 6561)
    np.testing.assert_array_equal(np.asarray(fsq_soft_decode(onehot)), np.asarray(fsq_decode(ids)))
    # a mixture decodes to the expectation of the code vectors
    mix = 0.25 * jax.nn.one_hot(5, 6561) + 0.75 * jax.nn.one_hot(7, 6561)
    np.testing.assert_allclose(np.asarray(fsq_soft_decode(mix)),
                               0.25 * np.asarray(fsq_decode(5)) + 0.75 * np.asarray(fsq_decode(7)), atol=1e-7)
    m = TA.TokenASR(CFG)
    both = jax.jit(lambda p, i, c, n: (m.apply({"params": p}, i, n),
                                       m.apply({"params": p}, c, n, method=TA.TokenASR.from_codes)))
    hard, soft = both(params, ids, fsq_soft_decode(onehot), lens)
    np.testing.assert_allclose(np.asarray(soft), np.asarray(hard), atol=1e-6)
    assert hard.shape == (2, 6, CFG.text_vocab_size + 1)


def test_release_roundtrip_and_strict(params, tmp_path):
    path = TA.save_release(params, CFG, tmp_path / "token_asr.npz")
    back = TA.from_release(path, CFG)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert TA.config_from_release(path) == CFG
    assert TA.from_release(tmp_path, CFG) is not None  # a directory holding token_asr.npz
    with pytest.raises(ConversionError, match="exists"):
        TA.save_release(params, CFG, path)
    other = TokenASRConfig(text_vocab_size=12, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ConversionError, match="d_model"):
        TA.from_release(path, other)
    sd = TA.to_release(params, CFG)
    sd.pop("ctc_head.bias")
    sd["extra.weight"] = np.zeros(3)
    with pytest.raises(ConversionError, match="missing.*ctc_head.bias.*unexpected.*extra.weight"):
        TA.from_release(sd, CFG)
    with pytest.raises(ConversionError, match="not found"):
        TA.from_release(tmp_path / "nope.npz", CFG)
    assert set(jax.tree.leaves(TA.param_axes(CFG), is_leaf=lambda x: isinstance(x, tuple))) >= {("embed", "mlp")}


@pytest.mark.slow  # compile-heavy on the 2-core CI; run with -m slow
def test_runtime_greedy_and_buckets(params):
    rec = TA.TokenRecognizer(params, CFG, token_bucket=16, max_batch=4)
    rows = [[1, 2, 3], list(range(20)), [7] * 9]
    texts = rec.transcribe(rows)
    # a row alone, unpadded, decodes the same: padding and batching change nothing
    lg = jax.jit(TA.TokenASR(CFG).apply)({"params": params}, jnp.asarray([rows[2]]), jnp.asarray([9]))
    np.testing.assert_allclose(rec.logits([rows[2]])[0], np.asarray(lg[0]), atol=1e-5)
    assert texts[2] == TA.ctc_greedy(lg, np.array([9]), CFG.blank_id)[0]
    assert texts == [TA.ctc_greedy(x[None], np.array([len(x)]), CFG.blank_id)[0] for x in rec.logits(rows)]
    assert rec.compiled_programs() == 3  # (2 rows x 16), (1 row x 16: the single call), (1 row x 32)
    rec.transcribe([[5, 5], [1] * 15])
    assert rec.compiled_programs() == 3
    # greedy collapse rule by hand: argmax [a a - a b b] -> [a a b]
    lg = jax.nn.one_hot(jnp.array([[0, 0, 12, 0, 1, 1]]), 13)
    assert TA.ctc_greedy(lg, np.array([6]), 12) == [[0, 0, 1]]
    from cosyvoice2_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="6561"):
        rec.transcribe([[6561]])
