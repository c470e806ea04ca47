"""layers/activations.py against float64 values of the defining formulas (torch's definitions)."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from cosyvoice2_jax.layers.activations import gelu, mish

X = np.concatenate([np.linspace(-40.0, 40.0, 20001), [-1e4, -90.0, 19.999, 20.0, 20.001, 88.0, 1e4]])


def _softplus64(x):
    return np.where(x > 30, x, np.log1p(np.exp(np.minimum(x, 30))))


def test_gelu_matches_erf_definition():
    ref = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in X])
    got = np.asarray(jax.jit(gelu)(jnp.asarray(X, jnp.float32)), np.float64)
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    assert err.max() < 1e-6, (err.max(), X[err.argmax()])


def test_mish_matches_definition_and_gradient():
    ref = X * np.tanh(_softplus64(X))
    x32 = jnp.asarray(X, jnp.float32)
    got = np.asarray(jax.jit(mish)(x32), np.float64)
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    assert err.max() < 1e-6, (err.max(), X[err.argmax()])
    assert np.isfinite(got).all()
    # d/dx x tanh(sp(x)) = tanh(sp) + x sech^2(sp) sigmoid(x)
    sp = _softplus64(X)
    dref = np.tanh(sp) + X * (1.0 - np.tanh(sp) ** 2) / (1.0 + np.exp(-np.clip(X, -700, 700)))
    dgot = np.asarray(jax.jit(jax.vmap(jax.grad(mish)))(x32), np.float64)
    assert np.isfinite(dgot).all()
    derr = np.abs(dgot - dref) / np.maximum(1.0, np.abs(dref))
    assert derr.max() < 1e-5, (derr.max(), X[derr.argmax()])
