"""A tiny random-weight pipeline (no oracle, no release files): fast unit tests of the plumbing."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from cosyvoice2_jax.config import ModelConfig
from cosyvoice2_jax.flow import modeling as flow_model
from toy_tokenizer import write_toy_qwen_tokenizer
from cosyvoice2_jax.hift import params as hift_params
from cosyvoice2_jax.llm import modeling as llm_model
from cosyvoice2_jax.pipeline.loading import Loaded
from cosyvoice2_jax.speaker import params as spk_params
from cosyvoice2_jax.tokenizer import params as tok_params


def _fill(tree, seed: int):
    """Random values for an abstract param tree: fan-in scaled kernels, unit scales/variances."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = str(path[-1]).lower()
        shape, dtype = leaf.shape, leaf.dtype
        if any(s in name for s in ("var", "scale", "weight_g", "alpha", "gamma")):
            v = np.ones(shape) + 0.05 * rng.standard_normal(shape)
        elif any(s in name for s in ("bias", "mean", "beta")):
            v = 0.02 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if len(shape) >= 2 else max(shape[0] if shape else 1, 1)
            v = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        out.append(np.asarray(v, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def toy_loaded(tmp: Path, seed: int = 0, spk: bool = True) -> Loaded:
    cfg = ModelConfig.tiny()
    tok_dir = write_toy_qwen_tokenizer(Path(tmp) / "CosyVoice-BlankEN")
    params = {
        # numpy draws on the abstract trees: a flax init (eager, or jitted) compiles ~20 s of XLA programs
        "llm": _fill(llm_model.abstract_params(cfg.llm), seed),
        "flow": _fill(flow_model.abstract_params(cfg.flow), seed + 1),
        "hift": _fill(hift_params.abstract_params(cfg.hift), seed + 2),
        "tokenizer": _fill(tok_params.abstract_params(cfg.tokenizer), seed + 3),
        "speaker": _fill(spk_params.abstract_params(cfg.speaker), seed + 4),
    }
    params = jax.tree.map(np.asarray, params)
    spk2info = {"spk_a": {"embedding": np.random.default_rng(seed).standard_normal(192).astype(np.float32)}} if spk else {}
    return Loaded(cfg, params, tok_dir, spk2info, None, {})
