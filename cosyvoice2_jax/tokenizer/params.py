"""S3TokenizerV2 weights: torch state dict or the release's ``speech_tokenizer_v2.onnx`` -> params.

Torch names are those of ``s3tokenizer.model_v2.S3TokenizerV2.state_dict()`` (102 keys, listed in
the oracle report). The release ships only an ONNX graph; its initializers are read with the
``onnx`` package and named from the graph the way ``s3tokenizer.utils.onnx2torch`` does:

* ``Conv`` nodes: the two dense k3 convs in graph order -> ``encoder.conv1``, ``encoder.conv2``
  (the release names their initializers ``onnx::Conv_NNNN``);
  the depthwise ones are named by their node (``/blocks.i/attn/fsmn_block/Conv``).
* ``/blocks.i/<path>/MatMul`` -> ``encoder.blocks.i.<path>.weight`` (stored (in, out), transposed
  back to torch's (out, in)); the ``Add`` (or ``Add_1``) with a constant input of the same node
  path -> ``.bias``; ``mlp/mlp.0`` is the torch ``mlp.0``.
* ``/blocks.i/<ln>/LayerNormalization`` -> ``<ln>.weight`` / ``<ln>.bias`` (inputs 1 and 2); a
  LayerNorm exported op by op (opset < 17) gives ``/blocks.i/<ln>/Mul`` (weight) and
  ``/blocks.i/<ln>/Add_1`` (bias; the scalar eps ``Add`` is skipped).
* the (D, 8) ``MatMul`` -> ``quantizer._codebook.project_down.weight``, the (8,) bias added to
  its output -> ``.bias``.

An optional leading scope (``/encoder``) on node names is accepted, so a graph exported from the
torch ``S3TokenizerV2`` itself loads too.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from ..config import TokenizerConfig
from ..errors import ConversionError
from ..params_util import CONV1D, LINEAR, Rule, convert, export, load_onnx, init_sequence_model, onnx_constants, onnx_release_io
from .modeling import S3TokenizerV2

RULES = [
    Rule("encoder.conv{c}.weight", "encoder/conv{c}/kernel", CONV1D),
    Rule("encoder.conv{c}.bias", "encoder/conv{c}/bias"),
    *[Rule(f"encoder.blocks.{{i}}.attn.{n}.weight", f"encoder/blocks_{{i}}/attn/{n}/kernel", LINEAR)
      for n in ("query", "key", "value", "out")],
    *[Rule(f"encoder.blocks.{{i}}.attn.{n}.bias", f"encoder/blocks_{{i}}/attn/{n}/bias")
      for n in ("query", "value", "out")],
    Rule("encoder.blocks.{i}.attn.fsmn_block.weight", "encoder/blocks_{i}/attn/fsmn_block/kernel", CONV1D),
    *[Rule(f"encoder.blocks.{{i}}.{ln}.weight", f"encoder/blocks_{{i}}/{ln}/scale") for ln in ("attn_ln", "mlp_ln")],
    *[Rule(f"encoder.blocks.{{i}}.{ln}.bias", f"encoder/blocks_{{i}}/{ln}/bias") for ln in ("attn_ln", "mlp_ln")],
    *[Rule(f"encoder.blocks.{{i}}.mlp.{j}.weight", f"encoder/blocks_{{i}}/mlp_{j}/kernel", LINEAR) for j in (0, 2)],
    *[Rule(f"encoder.blocks.{{i}}.mlp.{j}.bias", f"encoder/blocks_{{i}}/mlp_{j}/bias") for j in (0, 2)],
    Rule("quantizer._codebook.project_down.weight", "quantizer/project_down/kernel", LINEAR),
    Rule("quantizer._codebook.project_down.bias", "quantizer/project_down/bias"),
]


def init_params(cfg: TokenizerConfig, key) -> dict:
    """Random params of :class:`S3TokenizerV2` for ``cfg``."""
    return init_sequence_model(S3TokenizerV2(cfg), key, cfg.n_mels)


def abstract_params(cfg: TokenizerConfig = TokenizerConfig()):
    """ShapeDtypeStruct tree of the model's params (no allocation)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def from_torch_state_dict(sd: Mapping[str, Any], config: TokenizerConfig = TokenizerConfig(),
                          what: str = "S3TokenizerV2 state dict") -> dict:
    """Torch ``S3TokenizerV2.state_dict()`` (tensors or arrays) -> params, strictly."""
    return convert(sd, RULES, expected=abstract_params(config), what=what)


def to_torch_state_dict(params) -> dict[str, np.ndarray]:
    """Params -> torch ``S3TokenizerV2`` state dict (numpy), inverse of :func:`from_torch_state_dict`."""
    return export(params, RULES, what="S3TokenizerV2 params")


# ----------------------------------------------------------------------------------------- ONNX
_BLOCK = re.compile(r"^(?:/encoder)?/blocks\.(\d+)/(.+)/([A-Za-z]+)(?:_\d+)?$")


def onnx_to_state_dict(path_or_model, config: TokenizerConfig = TokenizerConfig()) -> dict[str, np.ndarray]:
    """Read ``speech_tokenizer_v2.onnx`` (path or loaded ``onnx.ModelProto``) -> torch-named state dict."""
    model, numpy_helper = load_onnx(path_or_model)
    consts = onnx_constants(model, numpy_helper)
    d = config.n_audio_state
    sd: dict[str, np.ndarray] = {}
    proj_out = None
    n_dense_convs = 0

    def put(key, value):
        if key in sd:
            raise ConversionError(f"ONNX graph: two tensors map to {key}; is this an S3Tokenizer v2 graph?")
        sd[key] = np.array(value, dtype=np.float32)

    for node in model.graph.node:
        params = [consts[i] for i in node.input if i in consts and consts[i].size > 1]
        if node.op_type == "Conv":
            w = consts.get(node.input[1])
            if w is None or w.ndim != 3:
                continue
            b = consts.get(node.input[2]) if len(node.input) > 2 else None
            if w.shape[1] == 1 and w.shape[0] == d:  # depthwise FSMN conv
                m = _BLOCK.match(node.name)
                if not m:
                    raise ConversionError(f"ONNX graph: depthwise Conv node {node.name!r} is not inside a block")
                put(f"encoder.blocks.{m.group(1)}.attn.fsmn_block.weight", w)
                continue
            n_dense_convs += 1
            if n_dense_convs > 2:
                raise ConversionError(f"ONNX graph: unexpected third k3 Conv node {node.name!r}")
            name = f"conv{n_dense_convs}"  # graph order: conv1 (mel -> D) runs before conv2
            put(f"encoder.{name}.weight", w)
            if b is not None:
                put(f"encoder.{name}.bias", b)
            continue
        if not params:
            continue
        m = _BLOCK.match(node.name)
        if node.op_type == "MatMul" and params[0].ndim == 2 and params[0].shape == (d, config.fsq_dim):
            put("quantizer._codebook.project_down.weight", params[0].T)
            proj_out = node.output[0]
            continue
        if node.op_type == "Add" and proj_out is not None and proj_out in node.input:
            put("quantizer._codebook.project_down.bias", params[0])
            continue
        if m is None:
            continue
        blk, path, op = m.group(1), m.group(2).replace("/", ".").replace("mlp.mlp.", "mlp."), m.group(3)
        prefix = f"encoder.blocks.{blk}.{path}"
        if op == "LayerNormalization":
            put(prefix + ".weight", consts[node.input[1]])
            put(prefix + ".bias", consts[node.input[2]])
        elif op == "MatMul" and params[0].ndim == 2:
            put(prefix + ".weight", params[0].T)
        elif op == "Add" and params[0].ndim == 1:
            put(prefix + ".bias", params[0])
        elif op == "Mul" and params[0].ndim == 1 and path.endswith("_ln"):  # LayerNorm exported op by op
            put(prefix + ".weight", params[0])
    if not sd:
        raise ConversionError("ONNX graph has no S3Tokenizer v2 weights (no Conv/MatMul initializers found)")
    return sd


# the contract's release I/O (and from_onnx), shared with the other ONNX component
from_onnx, from_release, to_release = onnx_release_io(
    "speech_tokenizer_v2.onnx", "S3TokenizerV2", onnx_to_state_dict, from_torch_state_dict, to_torch_state_dict, TokenizerConfig())


def config_from_release(path_or_model, base: TokenizerConfig = TokenizerConfig()) -> TokenizerConfig:
    """Read the model sizes of a ``speech_tokenizer_v2.onnx`` from its initializer shapes.

    ``n_audio_state`` and ``n_mels`` come from the first dense conv (``(D, n_mels, 3)``), the layer
    count from the ``/blocks.i/`` node names, the FSMN kernel from the depthwise conv, ``fsq_dim``
    from the ``(D, k)`` projection. The head count is not in any shape: it is read from the ONNX
    metadata key ``n_audio_head`` when present, else D / 64 (Whisper-style 64-wide heads: the
    release's 1280 / 20). Other fields keep ``base``.
    """
    import dataclasses

    model, numpy_helper = load_onnx(path_or_model)
    consts = onnx_constants(model, numpy_helper)
    d = n_mels = fsmn = None
    blocks = set()
    for node in model.graph.node:
        m = _BLOCK.match(node.name)
        if m:
            blocks.add(int(m.group(1)))
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        w = consts[node.input[1]]
        if w.ndim != 3:
            continue
        if w.shape[1] == 1:
            fsmn = fsmn or int(w.shape[2])
        elif d is None:
            d, n_mels = int(w.shape[0]), int(w.shape[1])
    if d is None or not blocks:
        raise ConversionError("ONNX graph: no S3Tokenizer v2 layout found (needs a (D, n_mels, 3) Conv and "
                              "/blocks.i/... nodes); is this speech_tokenizer_v2.onnx?")
    fsq = next((int(c.shape[1]) for c in consts.values() if c.ndim == 2 and c.shape[0] == d and c.shape[1] < 64),
               base.fsq_dim)
    meta = {p.key: p.value for p in model.metadata_props}
    heads = int(meta["n_audio_head"]) if "n_audio_head" in meta else max(d // 64, 1)
    if d % heads:
        raise ConversionError(f"ONNX graph: width {d} is not divisible by {heads} heads; set the metadata key "
                              "n_audio_head")
    return dataclasses.replace(base, n_mels=n_mels, n_audio_state=d, n_audio_head=heads,
                               n_audio_layer=max(blocks) + 1, fsmn_kernel_size=fsmn or base.fsmn_kernel_size,
                               fsq_dim=fsq)


def param_axes(cfg: TokenizerConfig) -> dict:
    """Logical axes of every param leaf (:func:`cosyvoice2_jax.sharding.axes_by_rule`)."""
    from ..sharding import axes_by_rule

    return axes_by_rule(abstract_params(cfg))
