"""The five components (llm, flow, hift, tokenizer, speaker) expose one contract.

Each package ``cosyvoice2_jax.<name>`` has ``abstract_params(cfg)``, ``init_params(cfg, key)``,
``param_axes(cfg)``, ``from_release(source, cfg)``, ``to_release(params, cfg)``, ``RELEASE_FILE``
and one runtime wrapper defined in its own folder; ``ModelConfig.<name>`` is its config and
``params[<name>]`` its params (pipeline/loading.py). Checked on the tiny config: init and
abstract trees agree, every leaf has logical axes and the tree shards on an 8-device mesh, and
``from_release(to_release(p)) == p``.
"""
from __future__ import annotations

import importlib
import inspect

import jax
import numpy as np
import pytest

from cosyvoice2_jax import sharding
from cosyvoice2_jax.config import ModelConfig
from cosyvoice2_jax.pipeline.loading import COMPONENTS
from cosyvoice2_jax.pipeline.release import REQUIRED_FILES

RUNTIME = {"llm": "LMGenerator", "flow": "MelGenerator", "hift": "Vocoder", "tokenizer": "SpeechTokenizer",
           "speaker": "SpeakerEncoder"}
SIGNATURES = {"abstract_params": ("cfg",), "init_params": ("cfg", "key"), "param_axes": ("cfg",),
              "from_release": ("source", "cfg"), "to_release": ("params", "cfg")}
TINY = ModelConfig.tiny()


def _pkg(name):
    return importlib.import_module(f"cosyvoice2_jax.{name}")


def test_components_are_the_config_fields():
    assert set(COMPONENTS) == set(RUNTIME)
    fields = {f for f in ModelConfig.__dataclass_fields__}
    for name in COMPONENTS:
        assert name in fields, f"ModelConfig has no '{name}' field"
        assert type(getattr(TINY, name)).__name__.lower() == f"{name}config"


@pytest.mark.parametrize("name", COMPONENTS)
def test_same_names_and_signatures(name):
    pkg = _pkg(name)
    for fn, params in SIGNATURES.items():
        f = getattr(pkg, fn, None)
        assert callable(f), f"cosyvoice2_jax.{name} lacks {fn}"
        sig = list(inspect.signature(f).parameters.values())
        assert tuple(p.name for p in sig[:len(params)]) == params, f"{name}.{fn}{inspect.signature(f)}"
        # anything beyond the contract's arguments is optional
        assert all(p.default is not p.empty or p.kind is p.VAR_KEYWORD for p in sig[len(params):]), \
            f"{name}.{fn} has extra required arguments"
    assert pkg.RELEASE_FILE in REQUIRED_FILES
    runtime = getattr(pkg, RUNTIME[name])
    assert inspect.isclass(runtime) and runtime.__module__.startswith(f"cosyvoice2_jax.{name}."), \
        f"the runtime wrapper of {name} must live in its folder, not {runtime.__module__}"


def _fill(abstract, seed: int):
    """Random numpy arrays of the abstract shapes (a real init costs minutes of CPU for all five)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype) if np.issubdtype(s.dtype, np.floating)
                        else rng.integers(-127, 127, size=s.shape).astype(s.dtype), abstract)


@pytest.fixture(scope="module")
def tiny_params():
    return {name: _fill(_pkg(name).abstract_params(getattr(TINY, name)), i) for i, name in enumerate(COMPONENTS)}


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype).name), tree)


@pytest.mark.parametrize("name", COMPONENTS)
def test_init_matches_abstract_and_round_trips(name, tiny_params):
    pkg, cfg, params = _pkg(name), getattr(TINY, name), tiny_params[name]
    traced = jax.eval_shape(lambda k: pkg.init_params(cfg, k), jax.random.PRNGKey(0))  # no FLOPs
    abstract = pkg.abstract_params(cfg)
    assert jax.tree.structure(abstract) == jax.tree.structure(traced)
    assert _shapes(abstract) == _shapes(traced)
    sd = pkg.to_release(params, cfg)
    assert sd and all(isinstance(k, str) and "/" not in k for k in sd), "to_release gives torch-style names"
    back = pkg.from_release(sd, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPONENTS)
def test_real_init_matches_abstract(name):
    pkg, cfg = _pkg(name), getattr(TINY, name)
    params = jax.jit(pkg.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    assert _shapes(pkg.abstract_params(cfg)) == _shapes(params)


def test_every_leaf_has_logical_axes_and_shards_on_8_devices(tiny_params):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    names = {n for n, _ in sharding.LOGICAL_RULES}
    for name in COMPONENTS:
        params = tiny_params[name]
        axes = _pkg(name).param_axes(getattr(TINY, name))
        flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
        flat_a = jax.tree.leaves(axes, is_leaf=sharding.is_axes)
        assert len(flat_a) == len(flat_p), name
        for (path, x), ax in zip(flat_p, flat_a):
            where = f"{name}{jax.tree_util.keystr(path)}"
            assert sharding.is_axes(ax) and len(ax) == x.ndim, f"{where}: axes {ax} for shape {x.shape}"
            assert set(ax) <= names, f"{where}: {ax} names an axis the rules table lacks"
        placed = sharding.place_params(params, mesh, axes)
        leaves = jax.tree.leaves(placed)
        assert all(leaf.sharding.mesh.shape == mesh.shape for leaf in leaves)
        # the big matrices really are split (not everything replicated)
        assert any(not leaf.sharding.is_fully_replicated for leaf in leaves), name
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), placed, params)
