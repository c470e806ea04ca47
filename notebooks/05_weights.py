# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 - Weights: convert, inspect, shard, export back
#
# The official release holds PyTorch state dicts (`llm.pt`, `flow.pt`, `hift.pt`) and two ONNX graphs
# (`speech_tokenizer_v2.onnx`, `campplus.onnx`). Each component package has one contract:
# `from_release(file, cfg)` / `to_release(params, cfg)` (strict, declarative conversion tables),
# `abstract_params(cfg)` (`jax.eval_shape`, no compute) and `param_axes(cfg)` (logical sharding axes).
# This notebook converts a release, looks at the parameter trees and their axes, sizes the full
# `CosyVoice2-0.5B` model without allocating it, exports back and compares the state dicts.
#
# Tiny random-weight release built with `scripts/make_random_release.py`; set `MODEL_DIR` to the real
# `CosyVoice2-0.5B` to convert the real weights. Outputs: `notebooks/out/05_weights/`.

# %%
import sys
import time
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

REPO = next(p for p in (Path.cwd().resolve(), *Path.cwd().resolve().parents)
            if (p / "scripts" / "make_random_release.py").is_file())
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
from make_random_release import notebook_release  # noqa: E402  (the project's release builder)

MODEL_DIR = None  # e.g. REPO / "pretrained_models" / "CosyVoice2-0.5B" for the real weights
OUT, MODEL_DIR = notebook_release("05_weights", MODEL_DIR)  # a tiny random-weight release unless MODEL_DIR is set
for p in sorted(MODEL_DIR.iterdir()):
    size = sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size
    print(f"  {p.name:28s} {size / 2**20:8.2f} MB")

# %% [markdown]
# ## Convert
# `convert_release` (the `cosyvoice2-jax convert` command) reads every file and writes a converted directory:
# our config as YAML, one Orbax checkpoint of all params, the speakers, the tokenizer files.

# %%
from cosyvoice2_jax.pipeline.loading import COMPONENTS, convert_release, export_release, read_converted

t0 = time.perf_counter()
converted = convert_release(MODEL_DIR, OUT / "converted", overwrite=True)
print(f"converted in {time.perf_counter() - t0:.1f} s ->", sorted(p.name for p in converted.iterdir()))
loaded = read_converted(converted)
cfg, params = loaded.config, loaded.params
print("components:", list(params))

# %% [markdown]
# ## The parameter trees
# Plain nested dicts named after the official PyTorch modules (`params_util.flatten` joins the path with `/`).

# %%
import jax

from cosyvoice2_jax.params_util import flatten

flat = {c: flatten(params[c]) for c in COMPONENTS}
counts = {c: sum(int(np.prod(np.shape(v))) for v in flat[c].values()) for c in COMPONENTS}
for c in COMPONENTS:
    print(f"{c:10s} {len(flat[c]):5d} arrays {counts[c]:>12,d} params")
print("\nfirst flow entries:")
for k in list(flat["flow"])[:8]:
    print(f"  {k:60s} {tuple(np.shape(flat['flow'][k]))}")

# top-level modules of each component, by size
fig, axes = plt.subplots(1, len(COMPONENTS), figsize=(17, 3.8), constrained_layout=True)
for ax, c in zip(axes, COMPONENTS):
    parts = [k.split("/") for k in flat[c]]
    depth = next((i for i in range(min(map(len, parts))) if len({p[i] for p in parts}) > 1), 0)  # skip the common prefix
    by_mod = Counter()
    for p, v in zip(parts, flat[c].values()):
        by_mod["/".join(p[: depth + 1])] += int(np.prod(np.shape(v)))
    names, sizes = zip(*by_mod.most_common(6))
    ax.barh(range(len(names)), np.asarray(sizes) / 1e6)
    ax.set_yticks(range(len(names)), [n[-28:] for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set(title=f"{c} ({counts[c] / 1e6:.2f} M)", xlabel="parameters (millions)")
fig.suptitle("Largest modules per component (first level below the common prefix; this release)")
plt.show()

# %% [markdown]
# ## Logical axes and sharding
# `param_axes(cfg)` names each dimension of each param (`embed`, `mlp`, `heads`, `vocab`, `conv_in`, ...);
# `sharding.LOGICAL_RULES` maps names to mesh axes `('data', 'fsdp', 'tensor')`, one table for every model;
# `sharding.logical_to_spec` turns a param's axes into its `PartitionSpec`.

# %%
import importlib

from cosyvoice2_jax import sharding

axes = {c: flatten(importlib.import_module(f"cosyvoice2_jax.{c}").param_axes(getattr(cfg, c)),)
        for c in ("llm", "flow", "hift")}
print("rules:", dict(sharding.LOGICAL_RULES))
for c in ("llm", "flow"):
    print(f"\n{c}:")
    for k in list(axes[c])[:6]:
        print(f"  {k:55s} {str(axes[c][k]):32s} -> {sharding.logical_to_spec(axes[c][k])}")

names = sorted({a for c in axes for t in axes[c].values() for a in t if a})
fig, ax = plt.subplots(figsize=(10, 3.6), constrained_layout=True)
w = 0.27
for i, c in enumerate(axes):
    cnt = Counter(a for k, t in axes[c].items() for a, n in zip(t, np.shape(flat[c][k])) if a)
    ax.bar(np.arange(len(names)) + (i - 1) * w, [cnt[n] for n in names], w, label=c)
ax.set_xticks(range(len(names)), names, rotation=30)
ax.set(title="Logical axis names used by the param dimensions", xlabel="logical axis",
       ylabel="number of param dimensions")
ax.legend()
plt.show()

# %% [markdown]
# ## The full-size model without allocating it
# `abstract_params` is `jax.eval_shape` of the initialiser: shapes and dtypes only, no memory, no compute.
# Here for the published sizes (`configs/cosyvoice2-0.5b.yaml`), with the memory their weights take in fp32
# and bf16.

# %%
from cosyvoice2_jax.config import ModelConfig

full = ModelConfig.from_yaml(REPO / "configs" / "cosyvoice2-0.5b.yaml")
t0 = time.perf_counter()
abstract = {c: importlib.import_module(f"cosyvoice2_jax.{c}").abstract_params(getattr(full, c)) for c in COMPONENTS}
full_counts = {c: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract[c])) for c in COMPONENTS}
print(f"eval_shape of all components: {time.perf_counter() - t0:.1f} s")
for c in COMPONENTS:
    print(f"{c:10s} {full_counts[c]:>13,d} params  {4 * full_counts[c] / 2**20:9.1f} MB fp32  "
          f"{2 * full_counts[c] / 2**20:8.1f} MB bf16")
print(f"total      {sum(full_counts.values()):>13,d} params")

fig, ax = plt.subplots(figsize=(8, 3.5), constrained_layout=True)
x = np.arange(len(COMPONENTS))
ax.bar(x - 0.2, [counts[c] for c in COMPONENTS], 0.4, label="this release")
ax.bar(x + 0.2, [full_counts[c] for c in COMPONENTS], 0.4, label="CosyVoice2-0.5B (eval_shape)")
ax.set_yscale("log")
ax.set_xticks(x, COMPONENTS)
ax.set(title="Parameters per component", xlabel="component", ylabel="parameters (log scale)")
ax.legend()
plt.show()

# %% [markdown]
# ## Export back and compare
# `export_release` (`cosyvoice2-jax export`) writes the official layout from the converted directory; `.pt`
# files are written without PyTorch. Every tensor of the export is compared with the original file (the
# weight-norm spelling of `hift.pt` is canonicalised first: the release may use `weight_g/weight_v` or
# `parametrizations.weight.original0/1`).

# %%
from cosyvoice2_jax.params_util import canonical_weight_norm_keys, load_torch_checkpoint

exported = export_release(converted, OUT / "exported", overwrite=True)
print(sorted(p.name for p in exported.iterdir()))
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), constrained_layout=True)
for ax, name in zip(axes, ("llm.pt", "flow.pt", "hift.pt")):
    a = canonical_weight_norm_keys(load_torch_checkpoint(MODEL_DIR / name))
    b = canonical_weight_norm_keys(load_torch_checkpoint(exported / name))
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    common = sorted(set(a) & set(b))
    diffs = np.array([float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
                      if np.size(a[k]) else 0.0 for k in common])
    shapes_ok = all(np.shape(a[k]) == np.shape(b[k]) for k in common)
    print(f"{name}: {len(common)} tensors in both, {len(missing)} missing, {len(extra)} extra, shapes equal: "
          f"{shapes_ok}, max |difference| {diffs.max():.2e}")
    ax.hist(np.log10(np.maximum(diffs, 1e-12)), bins=30)
    ax.set(title=f"{name}: export vs original", xlabel="log10(max |exported - original|) per tensor (1e-12 = equal)",
           ylabel="number of tensors")
plt.show()
