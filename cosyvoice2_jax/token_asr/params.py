"""Token-ASR weights: init, logical axes, and its own checkpoint format ``token_asr.npz``.

There is no official token-level ASR, so the "release" of this component is ours: one ``.npz``
holding every param under its dotted Flax path (``blocks_0.attn.query.kernel``, ...) and the
model config as JSON under ``__config__``, written atomically (temporary file, then rename).
``from_release`` reads that file, a mapping of the same names (``to_release`` output), or a
training work directory of ``cosyvoice2-jax train --config configs/train/token_asr.yaml`` (its
latest Orbax checkpoint), strictly: missing, unexpected and mis-shaped names are listed in one
:class:`~cosyvoice2_jax.errors.ConversionError`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..config import TokenASRConfig, from_dict, to_dict
from ..errors import ConversionError
from ..params_util import flatten, unflatten
from .modeling import TokenASR

CONFIG_KEY = "__config__"


def init_params(cfg: TokenASRConfig, key) -> dict:
    """Random params of :class:`TokenASR` for ``cfg``."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(lambda k: TokenASR(cfg).init(k, ids, jnp.full((1,), 8, jnp.int32))["params"])(key)


def abstract_params(cfg: TokenASRConfig) -> dict:
    """ShapeDtypeStruct tree of the params (no allocation)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def param_axes(cfg: TokenASRConfig) -> dict:
    """Logical axes of every param leaf (:func:`cosyvoice2_jax.sharding.axes_by_rule`)."""
    from ..sharding import axes_by_rule

    return axes_by_rule(abstract_params(cfg))


def to_release(params: Mapping[str, Any], cfg: TokenASRConfig | None = None) -> dict[str, np.ndarray]:
    """Params -> ``{dotted name: numpy array}`` (what ``token_asr.npz`` holds besides the config)."""
    return {k.replace("/", "."): np.asarray(v) for k, v in flatten(params).items()}


def save_release(params: Mapping[str, Any], cfg: TokenASRConfig, path: str | Path, *,
                 overwrite: bool = False) -> Path:
    """Write ``token_asr.npz`` (params + config). An existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        path = path / "token_asr.npz"
    if path.exists() and not overwrite:
        raise ConversionError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    arrays = dict(to_release(params, cfg))
    arrays[CONFIG_KEY] = np.array(json.dumps(to_dict(cfg)))
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def config_from_release(path: str | Path, base: TokenASRConfig = TokenASRConfig()) -> TokenASRConfig:
    """The config stored in ``token_asr.npz`` (``base`` where the file has none)."""
    with np.load(Path(path), allow_pickle=False) as z:
        if CONFIG_KEY not in z.files:
            return base
        return from_dict(TokenASRConfig, json.loads(str(z[CONFIG_KEY])))


def _from_workdir(workdir: Path) -> dict[str, np.ndarray]:
    from ..train.checkpoint import Checkpointer
    import orbax.checkpoint as ocp

    ck = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        step = ck.latest_step()
        if step is None:
            raise ConversionError(f"{workdir} has no checkpoint; train the token ASR first "
                                  "(cosyvoice2-jax train --config configs/train/token_asr.yaml)")
        out = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        ck.close()
    return to_release(jax.tree.map(np.asarray, out["state"]["params"]))


def from_release(source: str | Path | Mapping[str, Any], cfg: TokenASRConfig) -> dict:
    """``token_asr.npz``, a training work directory, or a ``{dotted name: array}`` mapping -> params."""
    if isinstance(source, Mapping):
        flat, what = dict(source), "token-ASR state dict"
    else:
        p = Path(source)
        what = str(p)
        if p.is_dir() and (p / "checkpoints").is_dir():
            flat = _from_workdir(p)
        elif p.is_dir() and (p / "token_asr.npz").is_file():
            return from_release(p / "token_asr.npz", cfg)
        elif p.is_file():
            with np.load(p, allow_pickle=False) as z:
                flat = {k: z[k] for k in z.files}
            stored = flat.pop(CONFIG_KEY, None)
            if stored is not None:
                have = from_dict(TokenASRConfig, json.loads(str(stored)))
                if have != cfg:
                    diff = [f"{f.name}: file {getattr(have, f.name)!r} vs config {getattr(cfg, f.name)!r}"
                            for f in dataclasses.fields(cfg) if getattr(have, f.name) != getattr(cfg, f.name)]
                    raise ConversionError(f"{p} was trained with another token-ASR config ({'; '.join(diff)}); "
                                          "set token_asr: to the values it was trained with")
        else:
            raise ConversionError(f"token ASR {p} not found: give token_asr.npz or the training work directory "
                                  "of configs/train/token_asr.yaml")
    flat.pop(CONFIG_KEY, None)
    want = {k.replace("/", "."): v for k, v in flatten(abstract_params(cfg)).items()}
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    shape = sorted(k for k in set(want) & set(flat) if tuple(np.shape(flat[k])) != tuple(want[k].shape))
    if missing or extra or shape:
        parts = [f"{n} {name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for name, keys, n in (("missing", missing, len(missing)), ("unexpected", extra, len(extra)),
                                       ("mis-shaped", shape, len(shape))) if keys]
        raise ConversionError(f"{what} does not match the token-ASR config ({'; '.join(parts)})")
    return unflatten({k.replace(".", "/"): jnp.asarray(flat[k], want[k].dtype) for k in want})
