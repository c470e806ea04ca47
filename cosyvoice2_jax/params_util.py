"""Declarative checkpoint conversion: official PyTorch state dicts <-> Flax param trees.

Each component's ``params.py`` lists :class:`Rule` s, one per tensor family::

    Rule("encoder.encoders.{i}.self_attn.linear_q.weight",
         "encoder/encoders_{i}/self_attn/linear_q/kernel", LINEAR)

``{name}`` placeholders match one key component (digits or a name) and must appear in both
templates. :func:`convert` applies the table torch -> JAX and is strict: every state-dict key must
match exactly one rule (else "unexpected"), every expected parameter must be produced (else
"missing") with the expected shape (else "mis-shaped"); all problems are listed in one
:class:`ConversionError`. :func:`export` is the inverse, so ``export(convert(sd)) == sd``.

Weight norm: both release spellings load (``X.weight_g/X.weight_v`` of torch<2.1 and
``X.parametrizations.weight.original0/1``); :func:`canonical_weight_norm_keys` rewrites the old
spelling to the new one before matching.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import ConversionError, ReleaseDirError

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of array maps: ``to_jax`` (torch layout -> JAX layout) and its inverse."""

    name: str
    to_jax: Callable[[Array], Array]
    to_torch: Callable[[Array], Array]


IDENTITY = Transform("identity", lambda w: w, lambda w: w)
# torch Linear weight (out, in) -> Flax Dense kernel (in, out)
LINEAR = Transform("linear", lambda w: w.T, lambda w: w.T)
# torch Conv1d weight (out, in, k) -> (k, in, out) for NWC convolution
CONV1D = Transform("conv1d", lambda w: np.transpose(w, (2, 1, 0)), lambda w: np.transpose(w, (2, 1, 0)))
# torch ConvTranspose1d weight (in, out, k) -> (k, in, out)
CONV_TRANSPOSE1D = Transform("conv_transpose1d", lambda w: np.transpose(w, (2, 0, 1)),
                             lambda w: np.transpose(w, (1, 2, 0)))
# torch Conv2d weight (out, in, kh, kw) -> (kh, kw, in, out) for NHWC convolution
CONV2D = Transform("conv2d", lambda w: np.transpose(w, (2, 3, 1, 0)), lambda w: np.transpose(w, (3, 2, 0, 1)))


def reshape(shape_jax: Sequence[int], shape_torch: Sequence[int], name: str = "reshape") -> Transform:
    return Transform(name, lambda w: np.reshape(w, shape_jax), lambda w: np.reshape(w, shape_torch))


_PH = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str
    jax: str
    transform: Transform = IDENTITY

    def _regex(self, template: str, sep: str) -> re.Pattern:
        out, pos = [], 0
        for m in _PH.finditer(template):
            out.append(re.escape(template[pos:m.start()]))
            out.append(f"(?P<{m.group(1)}>[^{re.escape(sep)}]+)")
            pos = m.end()
        out.append(re.escape(template[pos:]))
        return re.compile("".join(out) + r"\Z")

    def match_torch(self, key: str) -> dict | None:
        m = self._regex(self.torch, ".").match(key)
        return m.groupdict() if m else None

    def match_jax(self, path: str) -> dict | None:
        m = self._regex(self.jax, "/").match(path)
        return m.groupdict() if m else None


def linear_rules(t: str, j: str, bias: bool = True) -> list[Rule]:
    """torch ``Linear`` at key prefix ``t`` -> Flax ``Dense`` at path ``j``."""
    out = [Rule(f"{t}.weight", f"{j}/kernel", LINEAR)]
    return out + [Rule(f"{t}.bias", f"{j}/bias")] if bias else out


def conv1d_rules(t: str, j: str, bias: bool = True) -> list[Rule]:
    """torch ``Conv1d`` (no weight norm) at ``t`` -> NWC conv at ``j``."""
    out = [Rule(f"{t}.weight", f"{j}/kernel", CONV1D)]
    return out + [Rule(f"{t}.bias", f"{j}/bias")] if bias else out


def norm_rules(t: str, j: str) -> list[Rule]:
    """torch ``LayerNorm`` at ``t`` -> Flax ``LayerNorm`` at ``j``."""
    return [Rule(f"{t}.weight", f"{j}/scale"), Rule(f"{t}.bias", f"{j}/bias")]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, p))
        else:
            out[p] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def canonical_weight_norm_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rewrite ``X.weight_g``/``X.weight_v`` to ``X.parametrizations.weight.original0/1``."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight_g"):
            k = k[: -len(".weight_g")] + ".parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len(".weight_v")] + ".parametrizations.weight.original1"
        out[k] = v
    return out


def _to_numpy(v: Any) -> Array:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", np.shape(x)))


def convert(state_dict: Mapping[str, Any], rules: Sequence[Rule], *, expected: Mapping[str, Any] | None = None,
            ignore: Iterable[str] = (), what: str = "checkpoint", dtype=np.float32) -> dict[str, Any]:
    """torch state dict -> nested Flax params, strictly.

    Args:
      state_dict: torch keys -> tensors/arrays.
      rules: the component's conversion table.
      expected: a param tree (arrays or ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``)
        the result must equal in structure and shapes; ``None`` skips that check.
      ignore: regexes of torch keys to drop (e.g. the tied ``lm_head.weight``).
      what: name used in error messages (``"llm.pt"``).
    """
    ignore_re = [re.compile(p) for p in ignore]
    sd = canonical_weight_norm_keys(state_dict)
    flat: dict[str, Array] = {}
    unexpected, ambiguous = [], []
    for key, value in sd.items():
        if any(r.match(key) for r in ignore_re):
            continue
        hits = [(r, g) for r in rules if (g := r.match_torch(key)) is not None]
        if not hits:
            unexpected.append(key)
            continue
        if len(hits) > 1:
            ambiguous.append(key)
            continue
        rule, groups = hits[0]
        arr = _to_numpy(value)
        if np.issubdtype(arr.dtype, np.floating) and dtype is not None:
            arr = arr.astype(dtype)
        flat[rule.jax.format(**groups)] = rule.transform.to_jax(arr)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + _clip(unexpected))
    if ambiguous:
        problems.append(f"{len(ambiguous)} key(s) matched several rules: " + _clip(ambiguous))
    if expected is not None:
        exp = flatten(expected)
        missing = [p for p in exp if p not in flat]
        extra = [p for p in flat if p not in exp]
        shapes = [f"{p}: got {_shape_of(flat[p])}, model expects {_shape_of(exp[p])}"
                  for p in exp if p in flat and _shape_of(flat[p]) != _shape_of(exp[p])]
        if missing:
            problems.append(f"{len(missing)} missing parameter(s) (no key in the {what} produced them): "
                            + _clip(missing))
        if extra:
            problems.append(f"{len(extra)} converted tensor(s) the model has no parameter for: " + _clip(extra))
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es) (is the config right for this {what}?): "
                            + _clip(shapes))
    if problems:
        raise ConversionError(f"{what} does not match the model:\n  " + "\n  ".join(problems))
    return unflatten(flat)


def export(params: Mapping[str, Any], rules: Sequence[Rule], *, what: str = "params") -> dict[str, Array]:
    """Nested Flax params -> torch state dict (numpy arrays), strictly (inverse of convert)."""
    out: dict[str, Array] = {}
    unmatched = []
    for path, value in flatten(params).items():
        hits = [(r, g) for r in rules if (g := r.match_jax(path)) is not None]
        if len(hits) != 1:
            unmatched.append(path)
            continue
        rule, groups = hits[0]
        out[rule.torch.format(**groups)] = np.ascontiguousarray(rule.transform.to_torch(np.asarray(value)))
    if unmatched:
        raise ConversionError(f"{what}: {len(unmatched)} parameter(s) match no export rule: " + _clip(unmatched))
    return out


def _clip(items: Sequence[str], n: int = 12) -> str:
    items = list(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_torch_checkpoint(path: str | Path) -> dict[str, Array]:
    """Read a ``.pt`` state dict safely into numpy arrays.

    With PyTorch installed this is ``torch.load(weights_only=True)``; without it, the
    allow-listed zip/pickle reader in :mod:`cosyvoice2_jax.torch_pt` (tensors and dicts only), so
    converting a release needs no torch.
    """
    path = Path(path)
    if not path.is_file():
        raise ReleaseDirError(f"checkpoint file {path} does not exist")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        from .torch_pt import load_pt

        sd = load_pt(path)
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # corrupted file, pickled objects, ...
            raise ConversionError(f"could not read {path} as a weights-only torch state dict: {e}") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k: _to_numpy(v) for k, v in sd.items()}


def weight_norm_fold(g: Array, v: Array, axes: Sequence[int]) -> Array:
    """``w = g * v / ||v||`` with the norm over ``axes`` (numpy or jax arrays)."""
    xp = np if isinstance(v, np.ndarray) else __import__("jax.numpy", fromlist=["numpy"])
    return g * v / xp.sqrt(xp.sum(v * v, axis=tuple(axes), keepdims=True))


# ----------------------------------------------------------------------------------- ONNX
def load_onnx(path_or_model):
    """``(onnx.ModelProto, onnx.numpy_helper)`` for a path or an already loaded model."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ConversionError("reading an ONNX file needs the `onnx` package: pip install onnx") from None
    if isinstance(path_or_model, (str, Path)):
        p = Path(path_or_model)
        if not p.is_file():
            raise ReleaseDirError(f"ONNX file {p} does not exist (the release ships campplus.onnx and "
                                  "speech_tokenizer_v2.onnx next to llm.pt / flow.pt / hift.pt)")
        try:
            model = onnx.load(str(p))
        except Exception as e:
            raise ConversionError(f"could not parse {p} as ONNX: {e}") from None
    else:
        model = path_or_model
    return model, numpy_helper


def onnx_constants(model, numpy_helper) -> dict[str, np.ndarray]:
    """Initializers plus ``Constant`` node outputs, by tensor name."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    return consts



def onnx_release_io(release_file: str, torch_class: str, onnx_to_state_dict: Callable,
                    from_state_dict: Callable, to_state_dict: Callable, default_cfg: Any):
    """``(from_onnx, from_release, to_release)`` of a component released as ONNX (tokenizer, speaker).

    ``from_onnx(path_or_model, config)``: the ``.onnx`` file (path or ``onnx.ModelProto``) -> params
    (strict); ``from_release(source, cfg)``: that, or a torch state dict (a mapping, e.g.
    ``to_release`` output); ``to_release(params, cfg)``: the torch state dict (numpy). The ONNX graph
    itself is not re-exported: ``export`` copies the release's file.
    """
    def from_onnx(path_or_model, config=default_cfg) -> dict:
        return from_state_dict(onnx_to_state_dict(path_or_model, config), config, what=release_file)

    def from_release(source, cfg) -> dict:
        if isinstance(source, Mapping):
            return from_state_dict(source, cfg)
        return from_onnx(source, cfg)

    def to_release(params, cfg=None) -> dict[str, Array]:
        return to_state_dict(params)

    from_onnx.__doc__ = f"``{release_file}`` (path or ``onnx.ModelProto``) -> params (strict)."
    from_release.__doc__ = (f"The release's ``{release_file}``, or a torch ``{torch_class}`` state dict "
                            "(a mapping, e.g. ``to_release`` output) -> params.")
    to_release.__doc__ = (f"Params -> the torch ``{torch_class}`` state dict (numpy), which ``from_release`` "
                          "reads back; the ONNX graph itself is not re-exported.")
    return from_onnx, from_release, to_release


def init_sequence_model(module, key, channels: int, frames: int = 16) -> dict:
    """Random params of a module called as ``module(feats (B, T, channels), lengths (B,))`` (the
    tokenizer and the speaker encoder), initialised on a dummy ``(1, frames, channels)`` input."""
    import jax.numpy as jnp

    feats = jnp.zeros((1, frames, channels), jnp.float32)
    return module.init(key, feats, jnp.full((1,), frames, jnp.int32))["params"]


def redraw(params, seed: int):
    """Variance-preserving random re-draw of every leaf of ``params`` (arrays or
    ``jax.ShapeDtypeStruct`` shapes), as numpy float32, deterministic in ``seed``: matrices
    ``N(0, 1 / fan_in)`` (embeddings ``N(0, 1)``), norm scales ``1 + N(0, 0.01)``, other vectors
    ``N(0, 0.01)``. Random-weight studies use it: a framework's default init (zero biases, small
    output layers) makes the flow almost insensitive to its inputs."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    r = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name, shape = jax.tree_util.keystr(path), tuple(leaf.shape)
        if "embedding" in name and len(shape) == 2:
            v = r.normal(size=shape)
        elif len(shape) >= 2:
            v = r.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif "scale" in name:
            v = 1.0 + 0.1 * r.normal(size=shape)
        else:
            v = 0.1 * r.normal(size=shape)
        out.append(np.asarray(v, np.float32))
    return jax.tree_util.tree_unflatten(tree, out)
