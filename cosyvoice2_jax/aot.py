"""Ahead-of-time program cache: jitted entry points whose traced programs persist across processes.

JAX's persistent compilation cache (``cli.enable_compilation_cache``) skips XLA compilation in a
new process, but every process still *traces* the Python model code and lowers it to StableHLO
before it can look the program up, and for a model of this size that is most of the start-up
time (a tiny release's second CLI run spent ~9 s wall tracing and ~5 s lowering before its first
streamed chunk, against ~5 s reading compiled programs).

:func:`jit` is ``jax.jit`` with an optional disk cache of the traced program: once :func:`enable`
names a folder, the first call of each signature exports the program with :mod:`jax.export`
(StableHLO, serialized) to ``<folder>/<name>-<hash>.jaxexp`` (atomic write: a temporary file
renamed into place); a later process deserializes it and calls it, so no Python model code runs.
The compiled executable then comes from the persistent compilation cache as before.

The file name (``<name>-<code fingerprint>-<key>``) hashes everything the program depends on: the entry point's name, a fingerprint of
this package's source files (any code change invalidates every file), the jax/jaxlib versions,
the backend and device kind, the JAX flags that change lowering (x64, default matmul precision),
the static arguments (their ``repr``), a ``context`` the caller passes for state its function
closes over (configs, sampling mode), the argument tree structure and every leaf's shape, dtype
and weak type. A file that cannot be read, or whose recorded input types differ, is re-exported;
writing a program removes that entry point's files from other code versions.

Not cached (plain ``jax.jit``): while :func:`enable` has not been called (the default; tests and
library use are unchanged), for arguments sharded over several devices (meshes keep the jit path),
inside another trace, for typed PRNG key arguments, when a static argument or the context has no
stable ``repr`` (one that prints an object address), or when exporting fails (logged once). The cached program is the same StableHLO the jit path compiles, so
outputs are the same.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

log = logging.getLogger(__name__)
SUFFIX = ".jaxexp"
_FORMAT = 1  # bump when the file payload changes
_dir: Path | None = None


def enable(folder: str | Path | None) -> None:
    """Cache traced programs in ``folder`` (``None``: off, every entry point is plain ``jax.jit``)."""
    global _dir
    _dir = None if folder is None else Path(folder)


def folder() -> Path | None:
    return _dir


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 over this package's ``.py`` and ``.cc`` files (path and bytes): any code change gives new keys."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted([*root.rglob("*.py"), *root.rglob("*.cc")]):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    import jaxlib

    from .layers import native

    dev = jax.devices()[0]
    # the attention backend decides whether programs call the native kernel (and registers it
    # before a cached program that calls it is loaded)
    return repr((_FORMAT, code_fingerprint(), jax.__version__, jaxlib.__version__, dev.platform,
                 getattr(dev, "device_kind", ""), bool(jax.config.jax_enable_x64),
                 str(jax.config.jax_default_matmul_precision), native.attention_backend()))


def _stable_repr(x: Any) -> str | None:
    r = repr(x)
    return None if " at 0x" in r else r


class ExportedJit:
    """``jax.jit(fun, ...)`` plus the disk cache of traced programs (module docstring).

    ``name``: the file-name prefix (unique per entry point); ``context``: anything else the program
    depends on that is not an argument (e.g. the config a bound method reads from ``self``); it
    must have a stable ``repr``.
    """

    def __init__(self, fun: Callable, name: str, *, static_argnums: Sequence[int] = (),
                 static_argnames: Sequence[str] = (), donate_argnums: Sequence[int] = (),
                 donate_argnames: Sequence[str] = (), context: Any = ()):
        self.fun, self.name, self.context = fun, name, context
        one = lambda v: (v,) if isinstance(v, (str, int)) else tuple(v)  # noqa: E731 (jax.jit's forms)
        static_argnums, static_argnames = one(static_argnums), one(static_argnames)
        donate_argnums, donate_argnames = one(donate_argnums), one(donate_argnames)
        # only the forms given: jax.jit takes explicit empty argnums as "none by position" and then
        # does not map argnames to positions (a positional donated argument would not be donated)
        given = {k: tuple(v) for k, v in (("static_argnums", static_argnums), ("static_argnames", static_argnames),
                                           ("donate_argnums", donate_argnums), ("donate_argnames", donate_argnames))
                 if v}
        self._jit = jax.jit(fun, **given)
        self._sig = inspect.signature(fun)
        names = list(self._sig.parameters)
        self._static = set(static_argnames) | {names[i] for i in static_argnums}
        self._donate = set(donate_argnames) | {names[i] for i in donate_argnums}
        self._calls: dict[str, tuple[Callable, Any]] = {}
        functools.update_wrapper(self, fun)

    def _cache_size(self) -> int:
        """Distinct programs this entry point holds (jit path + cached-program path)."""
        return self._jit._cache_size() + sum(call is not None for call, _ in self._calls.values())

    def __call__(self, *args, **kwargs):
        if _dir is None:
            return self._jit(*args, **kwargs)
        bound = self._sig.bind(*args, **kwargs)
        bound.apply_defaults()
        statics = {k: v for k, v in bound.arguments.items() if k in self._static}
        dyn_names = [k for k in bound.arguments if k not in self._static]
        per_arg = [jax.tree.flatten(bound.arguments[k]) for k in dyn_names]
        leaves = [leaf for lv, _ in per_arg for leaf in lv]
        if any(isinstance(leaf, jax.core.Tracer) or len(getattr(getattr(leaf, "sharding", None), "device_set", ())) > 1
               for leaf in leaves):  # inside a trace, or sharded over several devices: the jit path
            return self._jit(*args, **kwargs)
        static_repr, context_repr = _stable_repr(sorted(statics.items())), _stable_repr(self.context)
        if static_repr is None or context_repr is None:
            return self._jit(*args, **kwargs)
        types = [jax.typeof(leaf) for leaf in leaves]
        if any(jax.dtypes.issubdtype(a.dtype, jax.dtypes.extended) for a in types):  # typed PRNG keys
            return self._jit(*args, **kwargs)
        avals = [jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype), weak_type=a.weak_type)
                 for a in types]
        treedefs = [td for _, td in per_arg]
        key = hashlib.sha256(repr((self.name, _environment(), context_repr, static_repr, dyn_names,
                                   [str(td) for td in treedefs],
                                   [(a.shape, str(a.dtype), a.weak_type) for a in avals])).encode()).hexdigest()
        hit = self._calls.get(key)
        if hit is None:
            try:
                hit = self._load_or_export(key, statics, dyn_names, treedefs, per_arg, avals)
            except Exception as e:  # e.g. an op jax.export cannot serialize: this signature keeps the jit path
                log.warning("%s: program not cached (%s: %s)", self.name, type(e).__name__, e)
                hit = (None, None)
            self._calls[key] = hit
        call, out_tree = hit
        if call is None:
            return self._jit(*args, **kwargs)
        return jax.tree.unflatten(out_tree, call(*leaves))

    def _load_or_export(self, key, statics, dyn_names, treedefs, per_arg, avals):
        code = code_fingerprint()[:12]
        path = _dir / f"{self.name}-{code}-{key[:32]}{SUFFIX}"
        exp = out_tree = None
        if path.is_file():
            try:
                payload = pickle.loads(path.read_bytes())
                exp, out_tree = jax.export.deserialize(bytearray(payload["exported"])), payload["out_tree"]
                if [(a.shape, a.dtype) for a in exp.in_avals] != [(a.shape, a.dtype) for a in avals]:
                    exp = None
            except Exception as e:  # unreadable or from another format: export again
                log.warning("ignoring cached program %s (%s)", path, e)
                exp = None
        if exp is None:
            holder = {}

            def flat(*lv):
                it, kw = iter(lv), dict(statics)
                for name, (arg_leaves, td) in zip(dyn_names, per_arg):
                    kw[name] = jax.tree.unflatten(td, [next(it) for _ in arg_leaves])
                out, holder["tree"] = jax.tree.flatten(self.fun(**kw))
                return out

            from .layers import native

            # the native kernel's custom call is ours, not one of jax's stable targets
            checks = [jax.export.DisabledSafetyCheck.custom_call(native.ATTENTION_TARGET)]
            exp = jax.export.export(jax.jit(flat), disabled_checks=checks)(*avals)
            out_tree = holder["tree"]
            _write_atomic(path, pickle.dumps({"exported": bytes(exp.serialize()), "out_tree": out_tree}))
            for stale in _dir.glob(f"{self.name}-*{SUFFIX}"):  # programs of other code versions
                if stale.name.count("-") == path.name.count("-") and stale.name.split("-")[-2] != code:
                    stale.unlink(missing_ok=True)
        donate, i = [], 0
        for name, (arg_leaves, _) in zip(dyn_names, per_arg):
            if name in self._donate:
                donate.extend(range(i, i + len(arg_leaves)))
            i += len(arg_leaves)
        return jax.jit(exp.call, donate_argnums=tuple(donate)), out_tree


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # a read-only cache folder costs speed, not correctness
        log.warning("cannot write the program cache %s: %s", path, e)


def jit(fun: Callable | None = None, *, name: str | None = None, **kw):
    """``jax.jit`` with the program cache; usable as ``@aot.jit(name=..., static_argnames=...)``."""
    if fun is None:
        return functools.partial(jit, name=name, **kw)
    return ExportedJit(fun, name or f"{fun.__module__}.{fun.__qualname__}", **kw)
