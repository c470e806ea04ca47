"""Converting the official release to our checkpoint format, caching it, and exporting it back.

A *converted* directory (written by :func:`convert_release`, ``cosyvoice2-jax convert`` and the
automatic cache of ``CosyVoice2.from_pretrained``)::

    OUT/
      cosyvoice2_jax.json   format marker: source release dir, its file fingerprint
      config.yaml           the ModelConfig (our YAML schema; cosyvoice2_jax.config)
      params/               Orbax checkpoint: {llm, flow, hift, tokenizer, speaker} params (COMPONENTS)
      spk2info.npz          built-in and added speakers (flattened arrays)
      CosyVoice-BlankEN/    copy of the Qwen tokenizer files
      text_tokenizer.json   the text tokenizer built from them (with the CosyVoice special tokens) in
                            the ``tokenizers`` format: later loads skip transformers (~1.5 s CPU)
      cosyvoice2.yaml       copy of the release YAML (for export)

The release's ONNX files are not copied (``export`` takes them from the recorded source directory,
or from ``--onnx-from``), since only the LM, flow and HiFT are trained by this project.

The cache lives in ``$COSYVOICE2_JAX_CACHE`` (default ``~/.cache/cosyvoice2_jax``), keyed by the
release path and the size and mtime of its files: a changed file triggers a fresh conversion.
Directories of format 1 (params keys ``speech_tokenizer`` / ``campplus``, config sections ``lm`` /
``campplus``) are still read, under today's names.

Every component is loaded the same way, through its package contract (``from_release``,
``to_release``, ``RELEASE_FILE``, optionally ``config_from_release``): see :data:`COMPONENTS`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig, from_dict, rename_legacy_keys
from ..errors import ReleaseDirError
from .release import (REQUIRED_FILES, TOKENIZER_DIR, ReleasePaths, check_release_dir, config_from_release_yaml,
                      qwen_config_from_dir)

FORMAT = 2
MARKER = "cosyvoice2_jax.json"
TEXT_TOKENIZER_FILE = "text_tokenizer.json"
# one word per component: package cosyvoice2_jax.<name>, ModelConfig.<name>, params[<name>]
COMPONENTS = ("llm", "flow", "hift", "tokenizer", "speaker")
# format 1 stored the tokenizer and speaker params under other keys
_FORMAT1_KEYS = {"tokenizer": "speech_tokenizer", "speaker": "campplus"}


def component(name: str):
    """The package of a component (``cosyvoice2_jax.llm``, ...), which holds its contract."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; one of {', '.join(COMPONENTS)}")
    return importlib.import_module(f"cosyvoice2_jax.{name}")


@dataclasses.dataclass
class Loaded:
    """What a synthesis model is built from."""

    config: ModelConfig
    params: dict[str, Any]
    tokenizer_dir: Path
    spk2info: dict[str, dict[str, np.ndarray]]
    source_dir: Path | None
    timings: dict[str, float]
    text_tokenizer_file: Path | None = None  # QwenTextTokenizer.save of tokenizer_dir (converted dirs)

    def text_tokenizer(self):
        """The :class:`~cosyvoice2_jax.frontend.text.QwenTextTokenizer`: from ``text_tokenizer_file``
        when there is one (no transformers import), else built from ``tokenizer_dir``."""
        from ..frontend.text import QwenTextTokenizer

        if self.text_tokenizer_file is not None:
            return QwenTextTokenizer.from_file(self.text_tokenizer_file)
        return QwenTextTokenizer.from_dir(self.tokenizer_dir)


# ----------------------------------------------------------------------------------- release -> params
def release_config(paths: ReleasePaths) -> ModelConfig:
    """ModelConfig of a release: YAML hyperparameters, Qwen sizes from ``config.json``, tokenizer and
    CAM++ sizes from the ONNX initializers (the components' ``config_from_release``)."""
    cfg = config_from_release_yaml(paths.yaml)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(
        cfg.llm, qwen=qwen_config_from_dir(paths.tokenizer_dir, cfg.llm).qwen))
    for name in COMPONENTS:
        read = getattr(component(name), "config_from_release", None)
        if read is not None:
            cfg = dataclasses.replace(cfg, **{name: read(paths.file(name), getattr(cfg, name))})
    return cfg


def _spk2info_from_pt(path: Path | None) -> dict[str, dict[str, np.ndarray]]:
    if path is None:
        return {}
    from ..torch_pt import load_pt

    raw = load_pt(path)
    if not isinstance(raw, dict):
        raise ReleaseDirError(f"{path}: expected a dict of speakers, got {type(raw).__name__}")
    out = {}
    for spk, info in raw.items():
        if not isinstance(info, dict) or "embedding" not in info:
            raise ReleaseDirError(f"{path}: speaker {spk!r} has no 'embedding' (keys: {sorted(info) if isinstance(info, dict) else type(info).__name__})")
        out[str(spk)] = {k: np.asarray(v) for k, v in info.items() if hasattr(v, "shape") or isinstance(v, np.ndarray)}
    return out


def convert_params(paths: ReleasePaths, cfg: ModelConfig) -> dict[str, Any]:
    """Every component of the release -> params (strict converters; errors name the file and key).
    HiFT keeps its weight norm (g, v) so that export writes what the official loads; the runtime
    :class:`~cosyvoice2_jax.hift.Vocoder` folds it."""
    return {name: component(name).from_release(paths.file(name), getattr(cfg, name)) for name in COMPONENTS}


# ----------------------------------------------------------------------------------- converted dir
def fingerprint(paths: ReleasePaths) -> dict[str, list[int]]:
    files = [paths.root / f for f in REQUIRED_FILES] + sorted(paths.tokenizer_dir.iterdir())
    if paths.spk2info is not None:
        files.append(paths.spk2info)
    out = {}
    for f in files:
        if f.is_file():
            st = f.stat()
            out[str(f.relative_to(paths.root))] = [st.st_size, st.st_mtime_ns]
    return out


def is_converted(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_spk2info(path: Path, spk2info: dict) -> None:
    """Speakers as one ``.npz`` of flattened arrays (written to a temp file, then renamed)."""
    flat = {}
    for spk, info in spk2info.items():
        for k, v in info.items():
            flat[f"{spk}\x1f{k}"] = np.asarray(v)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_spk2info(path: Path) -> dict:
    """Inverse of :func:`save_spk2info` (empty when the file does not exist)."""
    if not path.is_file():
        return {}
    out: dict[str, dict] = {}
    with np.load(path) as z:
        for key in z.files:
            spk, k = key.split("\x1f", 1)
            out.setdefault(spk, {})[k] = z[key]
    return out


def save_text_tokenizer(tokenizer_dir: Path, path: Path) -> None:
    """Build the text tokenizer of ``tokenizer_dir`` (transformers) and write it to ``path`` as one
    ``tokenizers`` file (temp file, then renamed)."""
    from ..frontend.text import QwenTextTokenizer

    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    QwenTextTokenizer.from_dir(tokenizer_dir).save(tmp)
    os.replace(tmp, path)


def write_converted(out: Path, cfg: ModelConfig, params: dict, spk2info: dict, paths: ReleasePaths,
                    *, overwrite: bool = False) -> Path:
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ReleaseDirError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
        if not is_converted(out):
            raise ReleaseDirError(f"{out} is not a converted cosyvoice2_jax directory; refusing to delete it. "
                                  "Choose an empty or new output path")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg.to_yaml(tmp / "config.yaml")
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp / "params", {k: params[k] for k in COMPONENTS})
        ck.wait_until_finished()
    save_spk2info(tmp / "spk2info.npz", spk2info)
    shutil.copytree(paths.tokenizer_dir, tmp / TOKENIZER_DIR)
    save_text_tokenizer(tmp / TOKENIZER_DIR, tmp / TEXT_TOKENIZER_FILE)
    shutil.copy2(paths.yaml, tmp / "cosyvoice2.yaml")
    meta = {"format": FORMAT, "source": str(paths.root.absolute()), "fingerprint": fingerprint(paths),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / MARKER).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, out)
    return out


def read_converted(path: Path) -> Loaded:
    import orbax.checkpoint as ocp

    t0 = time.perf_counter()
    path = Path(path).absolute()
    meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
    fmt = meta.get("format")
    if fmt not in (1, FORMAT):
        raise ReleaseDirError(f"{path} was written by another cosyvoice2_jax format ({fmt}); "
                              "convert the release again")
    import yaml

    cfg = from_dict(ModelConfig, rename_legacy_keys(
        ModelConfig, yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}))
    with ocp.StandardCheckpointer() as ck:
        params = ck.restore(path / "params")
    stored = {k: (_FORMAT1_KEYS.get(k, k) if fmt == 1 else k) for k in COMPONENTS}
    params = {k: params[stored[k]] for k in COMPONENTS}
    src = Path(meta["source"]) if meta.get("source") else None
    text_tok = path / TEXT_TOKENIZER_FILE
    return Loaded(cfg, params, path / TOKENIZER_DIR, load_spk2info(path / "spk2info.npz"), src,
                  {"restore_s": time.perf_counter() - t0}, text_tok if text_tok.is_file() else None)


def cache_root() -> Path:
    return Path(os.environ.get("COSYVOICE2_JAX_CACHE", Path.home() / ".cache" / "cosyvoice2_jax"))


def cache_path(paths: ReleasePaths) -> Path:
    key = json.dumps([str(paths.root.absolute()), fingerprint(paths)], sort_keys=True)
    return cache_root() / f"{paths.root.name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def load_release(model_dir: str | Path, *, cache: bool = True, cache_dir: str | Path | None = None) -> Loaded:
    """Load a release directory or a converted directory.

    A release is converted (timed as ``convert_s``) and, with ``cache``, written to the cache so the
    next load only restores the Orbax checkpoint (``restore_s``).
    """
    model_dir = Path(model_dir)
    if is_converted(model_dir):
        return read_converted(model_dir)
    paths = check_release_dir(model_dir)
    target = Path(cache_dir) / cache_path(paths).name if cache_dir else cache_path(paths)
    if cache and is_converted(target):
        try:
            loaded = read_converted(target)
            loaded.source_dir = paths.root
            if loaded.text_tokenizer_file is None:  # a cache from before text_tokenizer.json: add it
                try:
                    save_text_tokenizer(loaded.tokenizer_dir, target / TEXT_TOKENIZER_FILE)
                    loaded.text_tokenizer_file = target / TEXT_TOKENIZER_FILE
                except OSError:
                    pass
            return loaded
        except Exception as e:  # a corrupt cache must not block loading the release itself
            import warnings

            warnings.warn(f"ignoring unreadable cache {target} ({e}); converting again")
    t0 = time.perf_counter()
    cfg = release_config(paths)
    params = convert_params(paths, cfg)
    spk2info = _spk2info_from_pt(paths.spk2info)
    timings = {"convert_s": time.perf_counter() - t0}
    if cache:
        t1 = time.perf_counter()
        target.parent.mkdir(parents=True, exist_ok=True)
        write_converted(target, cfg, params, spk2info, paths, overwrite=is_converted(target))
        timings["cache_write_s"] = time.perf_counter() - t1
        return Loaded(cfg, params, paths.tokenizer_dir, spk2info, paths.root, timings, target / TEXT_TOKENIZER_FILE)
    return Loaded(cfg, params, paths.tokenizer_dir, spk2info, paths.root, timings)


def convert_release(model_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """``cosyvoice2-jax convert``: release -> converted directory at ``out``."""
    paths = check_release_dir(model_dir)
    cfg = release_config(paths)
    params = convert_params(paths, cfg)
    return write_converted(Path(out), cfg, params, _spk2info_from_pt(paths.spk2info), paths, overwrite=overwrite)


# ----------------------------------------------------------------------------------- export
def export_release(converted: str | Path, out: str | Path, *, onnx_from: str | Path | None = None,
                   overwrite: bool = False, params: dict | None = None) -> Path:
    """Write the official layout from a converted directory (``llm.pt``/``flow.pt``/``hift.pt`` from
    its params, or from ``params`` (e.g. after training); the ONNX files, YAML and tokenizer dir
    copied). ``.pt`` files are written without PyTorch (:func:`cosyvoice2_jax.torch_pt.save_pt`)."""
    loaded = read_converted(Path(converted))
    params = params or loaded.params
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ReleaseDirError(f"{out} exists and is not empty; pass --overwrite to write into it")
    onnx_dir = Path(onnx_from) if onnx_from else loaded.source_dir
    onnx_files = [component(n).RELEASE_FILE for n in COMPONENTS if not component(n).RELEASE_FILE.endswith(".pt")]
    missing = [f for f in onnx_files if onnx_dir is None or not (onnx_dir / f).is_file()]
    if missing:
        raise ReleaseDirError(f"export needs {', '.join(missing)}: the recorded source release "
                              f"({onnx_dir}) lacks them; pass --onnx-from <release dir>")
    from ..torch_pt import save_pt

    cfg = loaded.config
    out.mkdir(parents=True, exist_ok=True)

    def save(sd: dict, name: str) -> None:
        save_pt({k: np.asarray(v) for k, v in sd.items()}, out / name)

    for name in COMPONENTS:
        mod = component(name)
        if mod.RELEASE_FILE.endswith(".pt"):
            save(mod.to_release(params[name], getattr(cfg, name)), mod.RELEASE_FILE)
        else:  # the ONNX graphs are copied (only the LM, flow and HiFT are trained here)
            shutil.copy2(onnx_dir / mod.RELEASE_FILE, out / mod.RELEASE_FILE)
    shutil.copy2(Path(converted) / "cosyvoice2.yaml", out / "cosyvoice2.yaml")
    if (out / TOKENIZER_DIR).exists():
        shutil.rmtree(out / TOKENIZER_DIR)
    shutil.copytree(Path(converted) / TOKENIZER_DIR, out / TOKENIZER_DIR)
    if loaded.spk2info:
        save_pt({s: dict(info) for s, info in loaded.spk2info.items()}, out / "spk2info.pt")
    return out
