"""Native XLA:CPU kernels, compiled on first use and called through the XLA FFI.

One kernel today: the flow decoder's attention (``attention.cc``), fused so that the
``(B, H, Tq, Tk)`` scores never go to memory. XLA:CPU runs that attention as a GEMM, a softmax
and a second GEMM through memory and is ~2x slower than torch's fused CPU attention there
(docs/performance.md); no library offers a fused CPU attention for XLA, so the kernel is ours.

The C++ source is compiled once per machine with the system's ``g++`` (``-O3 -march=native``;
about 3 s) into ``$COSYVOICE2_NATIVE_CACHE`` (default ``<cache>/native``, ``<cache>`` being
``$COSYVOICE2_JAX_CACHE`` or ``~/.cache/cosyvoice2_jax`` as for converted models), named
by a hash of the source, the flags, the jax version and the CPU, written under a temporary name
and renamed, so concurrent or interrupted builds never leave a broken library. Without a
compiler, or with ``COSYVOICE2_ATTENTION=xla``, everything runs the plain XLA path (same results
to float32 rounding); :func:`attention_backend` says which one is active.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

log = logging.getLogger(__name__)

ATTENTION_TARGET = "cosyvoice2_attention_f32"
HEAD_SIZE = 64  # the kernel's only head size (the flow decoder's)
_SOURCE = Path(__file__).with_name("attention.cc")
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w"]


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    if os.environ.get("COSYVOICE2_NATIVE_CACHE"):
        return Path(os.environ["COSYVOICE2_NATIVE_CACHE"])
    return Path(os.environ.get("COSYVOICE2_JAX_CACHE", Path.home() / ".cache" / "cosyvoice2_jax")) / "native"


def _build() -> Path | None:
    """Compile ``attention.cc`` (once per source/flags/jax/CPU); the library path or ``None``."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None or platform.system() != "Linux":
        log.info("no C++ compiler (g++): the flow attention runs on plain XLA")
        return None
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(_FLAGS).encode(), jax.__version__.encode(),
                                     _cpu_id().encode(), cxx.encode()])).hexdigest()[:16]
    out = _cache_dir() / f"attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log.warning("building the native attention kernel failed (%s); the flow attention runs "
                        "on plain XLA:\n%s", " ".join(cmd), res.stderr[-2000:])
            return None
        os.replace(tmp, out)
        return out
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _load() -> bool:
    if os.environ.get("COSYVOICE2_ATTENTION", "").lower() == "xla":
        return False
    path = _build()
    if path is None:
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.CosyVoice2AttentionF32), platform="cpu")
    except (OSError, AttributeError, ValueError) as e:  # a library this process cannot load
        log.warning("loading the native attention kernel %s failed (%s); the flow attention runs on plain XLA",
                    path, e)
        return False
    return True


def attention_backend() -> str:
    """``"native"`` when the fused CPU kernel is built and enabled, else ``"xla"``."""
    return "native" if _load() else "xla"


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """The kernel: float32 ``q (B, Tq, H, 64)``, ``k, v (B, Tk, H, 64)``, bool ``mask (B|1, Tq|1, Tk)``
    -> ``(B, Tq, H, 64)``; CPU only, forward only (callers wrap it, see ``layers.attention``)."""
    if not _load():
        raise RuntimeError("the native attention kernel is not available; check attention_backend() first")
    return jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype),
                            vmap_method="sequential")(q, k, v, mask)
