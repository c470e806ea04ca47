"""cosyvoice2_jax.aot: the disk cache of traced programs (a new process skips Python tracing)."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax import aot

Pair = collections.namedtuple("Pair", "a b")


def make(traces: list):
    def f(params, state: Pair, x, n: int, scale=None):
        traces.append(n)  # runs only while tracing
        y = jnp.tanh(x @ params["w"]) * n
        if scale is not None:
            y = y * scale
        return Pair(state.a + y.sum(), state.b), y

    return f


@pytest.fixture
def cache_dir(tmp_path):
    aot.enable(tmp_path / "programs")
    yield tmp_path / "programs"
    aot.enable(None)


def args():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    return params, Pair(jnp.zeros(()), jnp.ones(2)), jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)


def test_programs_persist_and_a_new_instance_does_not_trace(cache_dir):
    traces: list = []
    params, state, x = args()
    ref = jax.jit(make([]), static_argnames="n")(params, state, x, n=2)
    first = aot.jit(make(traces), name="f", static_argnames="n", donate_argnames="state")
    out = first(params, state, x, n=2)
    assert traces == [2] and len(list(cache_dir.glob("f-*.jaxexp"))) == 1
    np.testing.assert_array_equal(out[1], ref[1])           # bit-identical to plain jit
    np.testing.assert_array_equal(out[0].a, ref[0].a)
    assert isinstance(out[0], Pair) and first._cache_size() == 1

    traces.clear()  # a "new process": a new wrapper over the same folder loads the program, no tracing
    again = aot.jit(make(traces), name="f", static_argnames="n", donate_argnames="state")
    _, state2, _ = args()
    out2 = again(params, state2, x, n=2)
    assert traces == []
    np.testing.assert_array_equal(out2[1], ref[1])
    again(params, Pair(jnp.zeros(()), jnp.ones(2)), x, n=3)   # another static value: a new program
    again(params, Pair(jnp.zeros(()), jnp.ones(2)), x[:2], n=2)  # another shape: a new program
    again(params, Pair(jnp.zeros(()), jnp.ones(2)), x, n=2, scale=jnp.float32(2))  # another tree
    assert traces == [3, 2, 2] and len(list(cache_dir.glob("f-*.jaxexp"))) == 4 and again._cache_size() == 4


def test_context_and_code_are_in_the_key_and_bad_files_are_replaced(cache_dir, monkeypatch):
    traces: list = []
    params, _, x = args()
    aot.jit(make(traces), name="g", static_argnames="n", context=("cfg", 1))(params, Pair(0.0, 1.0), x, n=2)
    aot.jit(make(traces), name="g", static_argnames="n", context=("cfg", 2))(params, Pair(0.0, 1.0), x, n=2)
    assert traces == [2, 2]
    files = sorted(cache_dir.glob("g-*.jaxexp"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(b"truncated")  # an unreadable file is exported again, not an error
    out = aot.jit(make(traces), name="g", static_argnames="n", context=("cfg", 1))(params, Pair(0.0, 1.0), x, n=2)
    assert traces == [2, 2, 2] and out[1].shape == (5, 3)
    monkeypatch.setattr(aot, "code_fingerprint", lambda: "0123456789abcdef")  # the code changed
    aot.jit(make(traces), name="g", static_argnames="n", context=("cfg", 1))(params, Pair(0.0, 1.0), x, n=2)
    assert traces == [2, 2, 2, 2]
    assert [f.name.split("-")[1] for f in cache_dir.glob("g-*.jaxexp")] == ["0123456789ab"]  # old ones pruned
    assert not list(cache_dir.glob("*.partial"))


def test_off_by_default_and_unstable_statics_use_plain_jit(tmp_path):
    assert aot.folder() is None
    traces: list = []
    params, state, x = args()
    f = aot.jit(make(traces), name="h", static_argnames="n")
    f(params, state, x, n=2)
    f(params, Pair(jnp.zeros(()), jnp.ones(2)), x, n=2)
    assert traces == [2] and f._cache_size() == 1
    aot.enable(tmp_path)
    try:
        g = aot.jit(lambda x, fn: fn(x), name="k", static_argnames="fn")
        g(x, fn=jnp.sin)  # a function's repr holds its address: not cached on disk
        assert not list(tmp_path.glob("k-*"))
    finally:
        aot.enable(None)


def test_programs_export_cannot_serialize_keep_the_jit_path(cache_dir):
    def host_sq(x):  # a host callback: jax.export refuses to serialize it
        return jax.pure_callback(lambda v: np.asarray(v) ** 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    f = aot.jit(host_sq, name="cb")
    np.testing.assert_array_equal(f(jnp.arange(3.0)), [0.0, 1.0, 4.0])
    np.testing.assert_array_equal(f(jnp.arange(3.0)), [0.0, 1.0, 4.0])
    assert not list(cache_dir.glob("cb-*")) and f._cache_size() == 1


@pytest.mark.parametrize("cached", [False, True], ids=["plain-jit", "cached-program"])
def test_donated_argument_is_donated_when_passed_by_position(tmp_path, cached):
    """donate_argnames must reach a positional argument on both paths (jax.jit ignores argnames for
    positional arguments when empty argnums are given explicitly; the streaming flow's caches,
    3.7 GB at full size, were copied on every chunk because of it)."""
    aot.enable(tmp_path / "programs" if cached else None)
    try:
        f = aot.jit(make([]), name="g", static_argnames="n", donate_argnames="state")
        params, state, x = args()
        state = Pair(jnp.zeros((64,)), jnp.ones(2))
        new, _ = f(params, state, x, 2)       # state by position, n by position too (static)
        assert state.a.is_deleted() and state.b.is_deleted()
        assert not params["w"].is_deleted() and not x.is_deleted()
        assert not new.a.is_deleted()
    finally:
        aot.enable(None)
