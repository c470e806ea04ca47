"""CAM++ weights: torch ``CAMPPlus`` state dict (3D-Speaker names) or ``campplus.onnx`` -> params.

Torch path: a declarative rule table (937 keys; ``num_batches_tracked`` is dropped on load and
written back as 0 on export).

ONNX path (the release ships only ``campplus.onnx``; its initializer names are whatever the
exporter chose, and an eval-mode ``torch.onnx.export`` folds every BatchNorm that directly follows
a Conv into that Conv). The graph is therefore read by **structure, not names**:

1. the graph's parametrised nodes (``Conv`` with a weight, ``BatchNormalization``, and
   ``MatMul``/``Gemm`` for a dense layer exported as a matrix product) are listed in graph order
   (ONNX graphs are topologically sorted; the torch exporter keeps the forward order);
2. the module's forward order is generated from the config: each entry is a conv (optionally
   followed by a BN) or a stand-alone BN;
3. the two lists are walked together. A conv entry takes the next ``Conv`` and checks its
   kernel shape. If a BN should follow, either the next node is a ``BatchNormalization`` fed by
   that conv (unfolded) or the conv carries a bias (folded). A BN entry takes the next
   ``BatchNormalization``, or, when the exporter folded it into the conv just before it (e.g.
   ``transit3.linear`` -> ``out_nonlinear.batchnorm``, whose only consumer it is), that conv's
   bias. A folded BN is written back as an identity BN plus the bias: ``scale 1, bias 0,
   mean -b, var 1 - eps``, which computes exactly ``conv'(x) + b`` with the folded kernel
   ``conv'``; so the converted model equals the exported graph, not the unfolded original
   (the same function up to float rounding).

Every mismatch (count, order, shape) raises a :class:`ConversionError` naming the torch module
and the ONNX node.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from ..config import SpeakerConfig
from ..errors import ConversionError
from ..params_util import CONV1D, CONV2D, Rule, convert, export, load_onnx, init_sequence_model, onnx_constants, onnx_release_io
from .modeling import CAMPPlus

_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def _bn(torch_prefix: str, jax_prefix: str, affine: bool = True) -> list[Rule]:
    return [Rule(f"{torch_prefix}.{t}", f"{jax_prefix}/{j}") for t, j in _BN if affine or t.startswith("running")]


RULES = [
    Rule("head.conv{n}.weight", "head/conv{n}/kernel", CONV2D),
    *_bn("head.bn{n}", "head/bn{n}"),
    Rule("head.layer{l}.{b}.conv{n}.weight", "head/layer{l}_{b}/conv{n}/kernel", CONV2D),
    *_bn("head.layer{l}.{b}.bn{n}", "head/layer{l}_{b}/bn{n}"),
    Rule("head.layer{l}.{b}.shortcut.0.weight", "head/layer{l}_{b}/shortcut_0/kernel", CONV2D),
    *_bn("head.layer{l}.{b}.shortcut.1", "head/layer{l}_{b}/shortcut_1"),
    Rule("xvector.tdnn.linear.weight", "xvector/tdnn/linear/kernel", CONV1D),
    *_bn("xvector.tdnn.nonlinear.batchnorm", "xvector/tdnn/nonlinear_batchnorm"),
    *_bn("xvector.block{k}.tdnnd{i}.nonlinear{n}.batchnorm", "xvector/block{k}/tdnnd{i}/nonlinear{n}_batchnorm"),
    Rule("xvector.block{k}.tdnnd{i}.linear1.weight", "xvector/block{k}/tdnnd{i}/linear1/kernel", CONV1D),
    Rule("xvector.block{k}.tdnnd{i}.cam_layer.{c}.weight", "xvector/block{k}/tdnnd{i}/cam_layer/{c}/kernel", CONV1D),
    Rule("xvector.block{k}.tdnnd{i}.cam_layer.{c}.bias", "xvector/block{k}/tdnnd{i}/cam_layer/{c}/bias"),
    *_bn("xvector.transit{k}.nonlinear.batchnorm", "xvector/transit{k}/nonlinear_batchnorm"),
    Rule("xvector.transit{k}.linear.weight", "xvector/transit{k}/linear/kernel", CONV1D),
    *_bn("xvector.out_nonlinear.batchnorm", "xvector/out_nonlinear_batchnorm"),
    Rule("xvector.dense.linear.weight", "xvector/dense_linear/kernel", CONV1D),
    *_bn("xvector.dense.nonlinear.batchnorm", "xvector/dense_nonlinear_batchnorm", affine=False),
]
IGNORE = (r".*num_batches_tracked$",)


def init_params(cfg: SpeakerConfig, key) -> dict:
    """Random params of :class:`CAMPPlus` for ``cfg`` (batch-norm statistics included: mean 0, var 1)."""
    return init_sequence_model(CAMPPlus(cfg), key, cfg.feat_dim)


def abstract_params(cfg: SpeakerConfig = SpeakerConfig()):
    """ShapeDtypeStruct tree of the model's params (no allocation)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def from_torch_state_dict(sd: Mapping[str, Any], config: SpeakerConfig = SpeakerConfig(),
                          what: str = "CAMPPlus state dict") -> dict:
    """Torch ``CAMPPlus.state_dict()`` -> params, strictly."""
    return convert(sd, RULES, expected=abstract_params(config), ignore=IGNORE, what=what)


def to_torch_state_dict(params) -> dict[str, np.ndarray]:
    """Params -> torch ``CAMPPlus`` state dict (``num_batches_tracked`` = 0), loadable strictly."""
    sd = export(params, RULES, what="CAMPPlus params")
    for k in [k for k in sd if k.endswith(".running_var")]:
        sd[k[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return sd


# ----------------------------------------------------------------------------------------- ONNX
def forward_order(config: SpeakerConfig = SpeakerConfig()) -> list[tuple]:
    """The parametrised layers in forward order: ``("conv", prefix, bn_prefix | None, has_bias)``
    or ``("bn", prefix, affine)``, torch module prefixes."""
    out: list[tuple] = [("conv", "head.conv1", "head.bn1", False)]
    in_planes = config.head_channels
    for layer in (1, 2):
        for j, stride in enumerate((2, 1)):
            p = f"head.layer{layer}.{j}"
            out += [("conv", f"{p}.conv1", f"{p}.bn1", False), ("conv", f"{p}.conv2", f"{p}.bn2", False)]
            if stride != 1 or in_planes != config.head_channels:
                out.append(("conv", f"{p}.shortcut.0", f"{p}.shortcut.1", False))
    out.append(("conv", "head.conv2", "head.bn2", False))
    out.append(("conv", "xvector.tdnn.linear", "xvector.tdnn.nonlinear.batchnorm", False))
    for k, layers in enumerate(config.block_layers, start=1):
        for i in range(1, layers + 1):
            p = f"xvector.block{k}.tdnnd{i}"
            out += [("bn", f"{p}.nonlinear1.batchnorm", True),
                    ("conv", f"{p}.linear1", f"{p}.nonlinear2.batchnorm", False),
                    ("conv", f"{p}.cam_layer.linear_local", None, False),
                    ("conv", f"{p}.cam_layer.linear1", None, True),
                    ("conv", f"{p}.cam_layer.linear2", None, True)]
        out += [("bn", f"xvector.transit{k}.nonlinear.batchnorm", True),
                ("conv", f"xvector.transit{k}.linear", None, False)]
    out.append(("bn", "xvector.out_nonlinear.batchnorm", True))
    out.append(("conv", "xvector.dense.linear", "xvector.dense.nonlinear.batchnorm", False))
    return out


_PASS_THROUGH = {"Squeeze", "Unsqueeze", "Reshape", "Identity", "Flatten", "Cast"}


def onnx_to_state_dict(path_or_model, config: SpeakerConfig = SpeakerConfig()) -> dict[str, np.ndarray]:
    """Read ``campplus.onnx`` by graph structure -> torch-named state dict (see module docstring)."""
    model, numpy_helper = load_onnx(path_or_model)
    consts = onnx_constants(model, numpy_helper)
    expected = to_torch_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(config)))
    eps = config.bn_eps
    producer = {o: n for n in model.graph.node for o in n.output}

    def source(name):
        """The node that computes ``name``, skipping shape-only ops."""
        n = producer.get(name)
        while n is not None and n.op_type in _PASS_THROUGH:
            n = producer.get(n.input[0])
        return n

    nodes = []
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in consts:
            nodes.append(n)
        elif n.op_type == "BatchNormalization" and all(i in consts for i in n.input[1:5]):
            nodes.append(n)
        elif n.op_type in ("MatMul", "Gemm") and any(i in consts and consts[i].ndim == 2 for i in n.input[:2]):
            nodes.append(n)

    def desc(n):
        return f"{n.op_type} node {n.name or n.output[0]!r}"

    sd: dict[str, np.ndarray] = {}
    pos = 0

    def take(kind: str, what: str):
        nonlocal pos
        if pos >= len(nodes):
            raise ConversionError(f"campplus.onnx: graph ends before {what} ({kind}); is it a CAM++ "
                                  f"(3D-Speaker CAMPPlus) graph with this config?")
        n = nodes[pos]
        pos += 1
        return n

    def bn_from_node(n, prefix, affine):
        g, b, m, v = (np.asarray(consts[i], np.float32) for i in n.input[1:5])
        n_eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        # fold a different epsilon into var so that var + eps is preserved
        v = v + (n_eps - eps)
        if affine:
            sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = g, b
        elif not (np.allclose(g, 1) and np.allclose(b, 0)):
            # affine-free BN with a non-trivial scale: fold scale/bias into the statistics
            m = m - b * np.sqrt(v + eps) / g
            v = (v + eps) / g**2 - eps
        sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"] = m, v

    def identity_bn(prefix, b, affine):
        """A BN that computes ``y + b``: what remains of a BN folded into the conv before it."""
        if affine:
            sd[f"{prefix}.weight"] = np.ones_like(b)
            sd[f"{prefix}.bias"] = np.zeros_like(b)
        sd[f"{prefix}.running_mean"] = -b
        sd[f"{prefix}.running_var"] = np.full_like(b, 1.0 - eps)

    pending = None  # (conv prefix, its ONNX bias, node) of a bias-free conv that had no BN of its own

    def settle_pending():
        nonlocal pending
        if pending is not None and pending[1] is not None and np.any(pending[1] != 0):
            raise ConversionError(f"campplus.onnx: {desc(pending[2])} has a bias, but {pending[0]} has none "
                                  "and no BatchNorm follows it")
        pending = None

    for entry in forward_order(config):
        if entry[0] == "bn":
            _, prefix, affine = entry
            want = expected[f"{prefix}.running_mean"].shape
            nxt = nodes[pos] if pos < len(nodes) else None
            if nxt is not None and nxt.op_type == "BatchNormalization":
                pos += 1
                if consts[nxt.input[3]].shape != want:
                    raise ConversionError(f"campplus.onnx: {desc(nxt)} has {consts[nxt.input[3]].shape[0]} channels, "
                                          f"{prefix} expects {want[0]}")
                bn_from_node(nxt, prefix, affine)
                settle_pending()
            elif pending is not None and pending[1] is not None and pending[1].shape == want:
                # this BN directly followed the previous conv, and the export folded it into that conv
                identity_bn(prefix, pending[1], affine)
                pending = None
            else:
                found = desc(nxt) if nxt is not None else "the end of the graph"
                raise ConversionError(f"campplus.onnx: expected the BatchNorm {prefix} (or a conv bias it was "
                                      f"folded into), found {found}")
            continue
        settle_pending()
        _, prefix, bn_prefix, has_bias = entry
        n = take("Conv", prefix)
        want = expected[f"{prefix}.weight"].shape
        if n.op_type == "Conv":
            w = np.asarray(consts[n.input[1]], np.float32)
            bias = np.asarray(consts[n.input[2]], np.float32) if len(n.input) > 2 and n.input[2] in consts else None
        else:  # a 1x1 conv on a vector exported as MatMul/Gemm: weight (in, out) or (out, in)
            w = next(np.asarray(consts[i], np.float32) for i in n.input[:2] if i in consts and consts[i].ndim == 2)
            trans_b = any(a.name == "transB" and a.i == 1 for a in n.attribute)
            w = (w if trans_b else w.T).reshape(want)
            bias = None
            if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in consts:
                bias = np.asarray(consts[n.input[2]], np.float32)
        if w.shape != want:
            raise ConversionError(f"campplus.onnx: {desc(n)} has a kernel {w.shape}; {prefix} expects {want} "
                                  "(the graph's layers are not in CAM++ order, or the config differs)")
        sd[f"{prefix}.weight"] = w
        if has_bias:
            sd[f"{prefix}.bias"] = bias if bias is not None else np.zeros(want[0], np.float32)
            continue
        if bn_prefix is None:
            pending = (prefix, bias, n)
            continue
        affine = f"{bn_prefix}.weight" in expected
        nxt = nodes[pos] if pos < len(nodes) else None
        if nxt is not None and nxt.op_type == "BatchNormalization" and source(nxt.input[0]) is n:
            pos += 1
            bn_from_node(nxt, bn_prefix, affine)
            if bias is not None and np.any(bias != 0):  # conv bias before an explicit BN: move it into the mean
                sd[f"{bn_prefix}.running_mean"] = sd[f"{bn_prefix}.running_mean"] - bias
        else:  # BN folded into the conv
            identity_bn(bn_prefix, bias if bias is not None else np.zeros(want[0], np.float32), affine)
    settle_pending()
    if pos != len(nodes):
        rest = ", ".join(desc(n) for n in nodes[pos:pos + 5])
        raise ConversionError(f"campplus.onnx: {len(nodes) - pos} parametrised node(s) left after the last CAM++ "
                              f"layer: {rest}")
    return sd


# the contract's release I/O (and from_onnx), shared with the other ONNX component
from_onnx, from_release, to_release = onnx_release_io(
    "campplus.onnx", "CAMPPlus", onnx_to_state_dict, from_torch_state_dict, to_torch_state_dict, SpeakerConfig())



def config_from_release(path_or_model, base: SpeakerConfig = SpeakerConfig()) -> SpeakerConfig:
    """Read the CAM++ sizes of a ``campplus.onnx`` from its weight shapes, in graph order.

    * the first 4-D conv (``head.conv1``, ``(head_channels, 1, 3, 3)``) gives ``head_channels``;
    * the first 3-D conv (``xvector.tdnn``, ``(init_channels, head_channels * feat_dim / 8, 5)``)
      gives ``init_channels`` and ``feat_dim``;
    * then, while ``C`` channels flow: a k=1 conv reading ``C`` channels that is followed by a
      conv with kernel > 1 starts a dense layer (``linear1`` ``(bn_size * growth, C, 1)``,
      ``cam_layer.linear_local`` ``(growth, bn_size * growth, k)`` with its ``dilations``, then
      the CAM context convs); any other k=1 conv reading ``C`` channels is a transit layer
      (``C -> C / 2``) and closes a block;
    * the last dense layer (conv or MatMul/Gemm, ``2 C -> embedding_size``) gives ``embedding_size``.
    ``bn_eps`` keeps ``base``.
    """
    import dataclasses

    model, numpy_helper = load_onnx(path_or_model)
    consts = onnx_constants(model, numpy_helper)
    convs = []  # (weight shape, dilation) of parametrised 1-D convs / dense layers, graph order
    head_channels = None
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in consts:
            w = consts[n.input[1]]
            if w.ndim == 4:
                head_channels = head_channels or int(w.shape[0])
            elif w.ndim == 3:
                dil = next((list(a.ints)[0] for a in n.attribute if a.name == "dilations" and a.ints), 1)
                convs.append((tuple(int(s) for s in w.shape), int(dil)))
        elif n.op_type in ("MatMul", "Gemm"):
            w = next((consts[i] for i in n.input[:2] if i in consts and consts[i].ndim == 2), None)
            if w is not None:
                trans_b = any(a.name == "transB" and a.i == 1 for a in n.attribute)
                out, inp = (w.shape if trans_b else w.shape[::-1])
                convs.append(((int(out), int(inp), 1), 1))
    if head_channels is None or len(convs) < 3:
        raise ConversionError("campplus.onnx: no CAM++ layout found (needs the head's 2-D convs and the "
                              "TDNN's 1-D convs); is this a CAM++ (3D-Speaker CAMPPlus) graph?")
    (init_channels, tdnn_in, _), _ = convs[0]
    if tdnn_in % head_channels:
        raise ConversionError(f"campplus.onnx: TDNN input {tdnn_in} is not a multiple of the head's "
                              f"{head_channels} channels")
    feat_dim = tdnn_in // head_channels * 8
    c, i = init_channels, 1
    blocks, kernels, dilations = [], [], []
    layers = growth = bn_channels = None
    while i < len(convs) - 1:
        (out, inp, k), _ = convs[i]
        if inp != c or k != 1:
            raise ConversionError(f"campplus.onnx: 1-D layer {i} has shape {(out, inp, k)}, expected a k=1 conv "
                                  f"reading {c} channels (a dense layer's linear1 or a transit layer)")
        nxt, dil = convs[i + 1]
        if nxt[2] > 1:  # dense layer: linear1, linear_local, cam linear1, cam linear2
            if layers is None:
                layers, kernels, dilations = 0, kernels + [nxt[2]], dilations + [dil]
            growth, bn_channels = nxt[0], out
            layers += 1
            c += growth
            i += 4
        else:  # transit
            if layers is None:
                raise ConversionError(f"campplus.onnx: transit layer {i} before any dense layer")
            blocks.append(layers)
            layers = None
            c = out
            i += 1
    (emb, dense_in, _), _ = convs[-1]
    if layers is not None or not blocks or dense_in != 2 * c:
        raise ConversionError(f"campplus.onnx: layer structure does not end in a transit + stats-pool dense "
                              f"layer ({dense_in} inputs, {c} channels after the last block)")
    return dataclasses.replace(base, feat_dim=feat_dim, embedding_size=emb, growth_rate=growth,
                               bn_size=bn_channels // growth, init_channels=init_channels,
                               block_layers=tuple(blocks), block_kernel_sizes=tuple(kernels),
                               block_dilations=tuple(dilations), head_channels=head_channels)


def param_axes(cfg: SpeakerConfig) -> dict:
    """Logical axes of every param leaf (:func:`cosyvoice2_jax.sharding.axes_by_rule`)."""
    from ..sharding import axes_by_rule

    return axes_by_rule(abstract_params(cfg))
