"""The fused native CPU attention (cosyvoice2_jax/layers/native) against float64 and the XLA path.

The flow decoder's parity tests against the official modules (test_flow*.py, test_pipeline_e2e.py)
run through this kernel too whenever it is built, which is the default on a machine with g++.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyvoice2_jax import aot
from cosyvoice2_jax.layers import attention as A
from cosyvoice2_jax.layers import native

needs_kernel = pytest.mark.skipif(native.attention_backend() != "native",
                                  reason="native attention kernel not built (no g++, or COSYVOICE2_ATTENTION=xla)")


def _qkv(rng, B, Tq, Tk, H=8, d=64):
    return [rng.standard_normal(s).astype(np.float32) for s in ((B, Tq, H, d), (B, Tk, H, d), (B, Tk, H, d))]


def _reference(q, k, v, mask):
    """float64 diffusers attention with the official additive -1e10 mask bias. The bias is added in
    float32 as in the official model (a fully masked row becomes uniform: ``s - 1e10`` rounds to
    ``-1e10`` in float32, while float64 would keep the scores' differences)."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        biased = (s.astype(np.float32) - np.float32(1.0e10)).astype(np.float64)
        s = np.where(np.asarray(mask)[:, None], s, biased)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", s, v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _mask(rng, kind, B, Tq, Tk):
    if kind == "none":
        return None
    if kind == "key_padding":      # (B, 1, Tk): rows of different lengths
        lens = rng.integers(Tk // 2, Tk + 1, size=B)
        return np.arange(Tk)[None, None, :] < lens[:, None, None]
    if kind == "chunk":            # (1, Tq, Tk): the streaming static-chunk mask over a cached prefix
        return ((np.arange(Tk)[None, :] < (np.arange(Tq)[:, None] // 10 + 1) * 10 + (Tk - Tq)))[None]
    if kind == "dense":            # (B, Tq, Tk), including rows with every key masked
        m = rng.random((B, Tq, Tk)) > 0.3
        m[:, 0] = False
        return m
    raise ValueError(kind)


@needs_kernel
@pytest.mark.parametrize("B,Tq,Tk,kind", [(2, 304, 304, "none"), (2, 37, 53, "key_padding"),
                                          (1, 25, 100, "chunk"), (2, 17, 17, "dense"), (3, 5, 130, "key_padding"),
                                          (1, 1, 1, "none"), (2, 64, 65, "key_padding")])
def test_kernel_matches_float64_and_the_xla_path(B, Tq, Tk, kind):
    rng = np.random.default_rng(Tq * 1000 + Tk)
    q, k, v = _qkv(rng, B, Tq, Tk)
    mask = _mask(rng, kind, B, Tq, Tk)
    m = None if mask is None else jnp.asarray(mask)
    lowered = jax.jit(A._dot_attention).lower(q, k, v, m).as_text()
    assert native.ATTENTION_TARGET in lowered   # the kernel is what runs
    got = np.asarray(jax.jit(A._dot_attention)(q, k, v, m))
    xla = np.asarray(jax.jit(A._xla_dot_attention)(q, k, v, m))
    ref = _reference(q, k, v, mask)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(xla, ref, rtol=0, atol=2e-6)


@needs_kernel
def test_gradient_is_the_xla_paths():
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 2, 40, 48)
    m = jnp.asarray(_mask(rng, "key_padding", 2, 40, 48))

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, m))), argnums=(0, 1, 2)))(q, k, v)

    for a, b in zip(grads(A._dot_attention), grads(A._xla_dot_attention)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_other_dtypes_and_head_sizes_use_the_xla_path():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 6, 6, H=2, d=32)
    assert native.ATTENTION_TARGET not in jax.jit(A._dot_attention).lower(q, k, v, None).as_text()
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(rng, 1, 6, 6))
    assert native.ATTENTION_TARGET not in jax.jit(A._dot_attention).lower(qb, kb, vb, None).as_text()


@needs_kernel
def test_cached_programs_calling_the_kernel_reload_in_a_new_process(tmp_path):
    """aot exports the custom call (not one of jax's stable targets) and a new process registers
    the kernel before it calls the loaded program."""
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from cosyvoice2_jax import aot
        from cosyvoice2_jax.layers import attention as A
        traces = []
        def f(q, k, v):
            traces.append(1)
            return A._dot_attention(q, k, v, None)
        aot.enable({str(tmp_path / "programs")!r})
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 9, 2, 64)).astype(np.float32) for _ in range(3))
        out = np.asarray(aot.jit(f, name="attn")(q, k, v))
        print(len(traces), float(np.abs(out).sum()))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first, second = (subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                                    timeout=300) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    (n1, s1), (n2, s2) = (r.stdout.split()[-2:] for r in (first, second))
    assert (n1, n2) == ("1", "0") and s1 == s2          # traced once, then loaded; same output
    assert len(list((tmp_path / "programs").glob("attn-*.jaxexp"))) == 1


def test_without_a_compiler_or_when_disabled_everything_runs_on_xla(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("COSYVOICE2_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.setenv("CXX", "/bin/false")   # a "compiler" that fails
    assert native._build() is None
    assert "building the native attention kernel failed" in caplog.text
    assert not any((tmp_path / "native").glob("*"))   # no partial library left behind
    script = ("from cosyvoice2_jax.layers import native, attention as A; import numpy as np, jax;"
              "q=np.ones((1,3,1,64),np.float32); print(native.attention_backend(),"
              f" {native.ATTENTION_TARGET!r} in jax.jit(A._dot_attention).lower(q,q,q,None).as_text())")
    env = dict(os.environ, COSYVOICE2_ATTENTION="xla", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["xla", "False"]
