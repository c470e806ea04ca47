"""cosyvoice2_jax.layers.conv vs torch conv1d / conv_transpose1d / weight_norm (oracle)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax.layers.conv import (Conv1d, ConvTranspose1d, conv_transpose1d, fold_weight_norm,
                                        weight_norm_kernel)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 23, 6)).astype(np.float32)


def _init(module, x=X, seed=0):
    return module.init(jax.random.PRNGKey(seed), x)["params"]


def test_param_names_and_shapes():
    p = _init(Conv1d(5, 7, padding=3))
    assert p["kernel"].shape == (7, 6, 5) and p["bias"].shape == (5,)
    p = _init(Conv1d(5, 7, padding=3, weight_norm=True))
    assert set(p) == {"weight_g", "weight_v", "bias"}
    assert p["weight_g"].shape == (1, 1, 5) and p["weight_v"].shape == (7, 6, 5)
    p = _init(ConvTranspose1d(5, 16, 8, padding=4, weight_norm=True))
    assert p["weight_g"].shape == (1, 6, 1) and p["weight_v"].shape == (16, 6, 5)
    # at init the weight-normed kernel equals v (g = ||v||)
    np.testing.assert_allclose(weight_norm_kernel(p["weight_g"], p["weight_v"]), p["weight_v"], rtol=1e-5)
    assert "bias" not in _init(Conv1d(5, 3, use_bias=False))


@pytest.mark.parametrize("k,s,d,pad", [(11, 1, 3, (15, 15)), (30, 15, 1, 7), (4, 1, 2, "causal"), (6, 2, 1, "same")])
def test_conv1d_matches_torch(oracle, k, s, d, pad):
    m = Conv1d(5, k, stride=s, dilation=d, padding=pad, weight_norm=True)
    p = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(RNG.standard_normal(a.shape), jnp.float32), _init(m))
    y = np.asarray(m.apply({"params": p}, X))
    if pad == "causal":
        pl, pr = d * (k - 1), 0
    elif pad == "same":
        pl, pr = (d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2
    elif isinstance(pad, tuple):
        pl, pr = pad
    else:
        pl = pr = pad
    g = np.asarray(p["weight_g"]).reshape(-1, 1, 1)
    v = np.transpose(np.asarray(p["weight_v"]), (2, 1, 0))
    ref = oracle("hift:conv_ref", {"x": X, "g": g, "v": v, "b": np.asarray(p["bias"])}, kind="conv", stride=s,
                 dilation=d, pad_left=pl, pad_right=pr)
    assert y.shape == ref["y"].shape
    np.testing.assert_allclose(y, ref["y"], atol=2e-5, rtol=1e-5)
    # folded kernel == torch's weight-normed weight; folded params give the same output
    folded = fold_weight_norm(p)
    assert set(folded) == {"kernel", "bias"}
    np.testing.assert_allclose(np.transpose(np.asarray(folded["kernel"]), (2, 1, 0)), ref["w"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.apply({"params": folded}, X)), y, atol=1e-5)


@pytest.mark.parametrize("k,s,pad,opad", [(16, 8, 4, 0), (11, 5, 3, 0), (5, 3, 0, 2), (2, 4, 0, 0)])
def test_conv_transpose1d_matches_torch(oracle, k, s, pad, opad):
    m = ConvTranspose1d(5, k, s, padding=pad, output_padding=opad, weight_norm=True)
    p = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(RNG.standard_normal(a.shape), jnp.float32), _init(m))
    y = np.asarray(m.apply({"params": p}, X))
    g = np.asarray(p["weight_g"]).reshape(-1, 1, 1)
    v = np.transpose(np.asarray(p["weight_v"]), (1, 2, 0))            # (I, O, K)
    ref = oracle("hift:conv_ref", {"x": X, "g": g, "v": v, "b": np.asarray(p["bias"])}, kind="transpose",
                 stride=s, padding=pad, output_padding=opad)
    assert y.shape == ref["y"].shape == (2, (23 - 1) * s - 2 * pad + k + opad, 5)
    np.testing.assert_allclose(y, ref["y"], atol=2e-5, rtol=1e-5)
    folded = fold_weight_norm(p)
    np.testing.assert_allclose(np.transpose(np.asarray(folded["kernel"]), (1, 2, 0)), ref["w"], atol=1e-6)
    # the lhs_dilation formulation agrees with the polyphase one
    y2 = conv_transpose1d(X, folded["kernel"], stride=s, padding=pad, output_padding=opad, polyphase=False)
    np.testing.assert_allclose(np.asarray(y2) + np.asarray(p["bias"]), y, atol=1e-5)


def test_conv_transpose1d_dilation_matches_torch(oracle):
    w = RNG.standard_normal((3, 6, 4)).astype(np.float32)
    y = conv_transpose1d(X, w, stride=2, padding=1, dilation=2)
    ref = oracle("hift:conv_ref", {"x": X, "w": w}, kind="transpose", stride=2, padding=1, dilation=2)
    np.testing.assert_allclose(np.asarray(y), ref["y"], atol=2e-5)


def test_causal_conv_does_not_look_ahead():
    m = Conv1d(4, 5, dilation=2, padding="causal")
    p = _init(m)
    x2 = X.copy()
    x2[:, 15:] += 1.0
    y1, y2 = m.apply({"params": p}, X), m.apply({"params": p}, x2)
    np.testing.assert_array_equal(np.asarray(y1[:, :15]), np.asarray(y2[:, :15]))
    assert not np.allclose(np.asarray(y1[:, 15:]), np.asarray(y2[:, 15:]))


def test_bad_padding_raises():
    with pytest.raises(ValueError, match="padding must be"):
        _init(Conv1d(4, 3, padding="valid-ish"))
    with pytest.raises(ValueError, match="non-positive output length"):
        conv_transpose1d(X[:, :1], np.ones((2, 6, 3), np.float32), stride=1, padding=3)
