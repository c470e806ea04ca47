"""Release ``flow.pt`` (``CausalMaskedDiffWithXvec.state_dict()``) <-> flow params, strictly.

The table maps torch keys to Flax paths (``.`` -> ``/``, list index ``k`` -> ``name_k``,
``nn.Sequential`` index ``k`` -> ``name_k`` or a descriptive name); ``params_util.convert``
checks that every key is used and every parameter produced with the expected shape
(``jax.eval_shape`` of the model for the given config), ``params_util.export`` inverts it.
Layouts: Linear ``(out, in)`` -> ``(in, out)``; Conv1d ``(out, in, k)`` -> ``(k, in, out)``;
LayerNorm ``weight`` -> ``scale``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import FlowConfig
from ..params_util import (IDENTITY, Rule, conv1d_rules, convert, export, linear_rules, load_torch_checkpoint,
                           norm_rules)


_linear, _conv, _norm = linear_rules, conv1d_rules, norm_rules


def _encoder_layers(stack: str) -> list[Rule]:
    t, j = f"encoder.{stack}.{{i}}", f"encoder/{stack}_{{i}}"
    rules = []
    for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
        rules += _linear(f"{t}.self_attn.{lin}", f"{j}/self_attn/{lin}")
    rules += _linear(f"{t}.self_attn.linear_pos", f"{j}/self_attn/linear_pos", bias=False)
    rules += [Rule(f"{t}.self_attn.pos_bias_u", f"{j}/self_attn/pos_bias_u"),
              Rule(f"{t}.self_attn.pos_bias_v", f"{j}/self_attn/pos_bias_v")]
    rules += _linear(f"{t}.feed_forward.w_1", f"{j}/feed_forward/w_1")
    rules += _linear(f"{t}.feed_forward.w_2", f"{j}/feed_forward/w_2")
    rules += _norm(f"{t}.norm_ff", f"{j}/norm_ff") + _norm(f"{t}.norm_mha", f"{j}/norm_mha")
    return rules


def _stage(t: str, j: str, with_conv: bool) -> list[Rule]:
    """U-Net level ``t`` = torch ``...blocks.{i}``, ``j`` = Flax ``..._blocks_{i}``."""
    r, b = f"{t}.0", f"{j}/resnet"
    rules = []
    for blk in ("block1", "block2"):
        rules += _conv(f"{r}.{blk}.block.0", f"{b}/{blk}/conv") + _norm(f"{r}.{blk}.block.2", f"{b}/{blk}/norm")
    rules += _linear(f"{r}.mlp.1", f"{b}/mlp_1") + _conv(f"{r}.res_conv", f"{b}/res_conv")
    tb, jb = f"{t}.1.{{k}}", f"{j}/transformer_blocks_{{k}}"
    rules += _norm(f"{tb}.norm1", f"{jb}/norm1") + _norm(f"{tb}.norm3", f"{jb}/norm3")
    for q in ("to_q", "to_k", "to_v"):
        rules += _linear(f"{tb}.attn1.{q}", f"{jb}/attn1/{q}", bias=False)
    rules += _linear(f"{tb}.attn1.to_out.0", f"{jb}/attn1/to_out_0")
    rules += _linear(f"{tb}.ff.net.0.proj", f"{jb}/ff/net_0_proj") + _linear(f"{tb}.ff.net.2", f"{jb}/ff/net_2")
    if with_conv:
        rules += _conv(f"{t}.2", f"{j}/conv")
    return rules


def rules() -> list[Rule]:
    """The conversion table (flow.pt of CosyVoice2-0.5B: 1121 keys)."""
    est, jest = "decoder.estimator", "decoder/estimator"
    r = [Rule("input_embedding.weight", "input_embedding/embedding", IDENTITY)]
    r += _linear("spk_embed_affine_layer", "spk_embed_affine_layer") + _linear("encoder_proj", "encoder_proj")
    for emb in ("embed", "up_embed"):
        r += _linear(f"encoder.{emb}.out.0", f"encoder/{emb}/out_0") + _norm(f"encoder.{emb}.out.1", f"encoder/{emb}/out_1")
    r += _conv("encoder.pre_lookahead_layer.conv1", "encoder/pre_lookahead_layer/conv1")
    r += _conv("encoder.pre_lookahead_layer.conv2", "encoder/pre_lookahead_layer/conv2")
    r += _conv("encoder.up_layer.conv", "encoder/up_layer/conv") + _norm("encoder.after_norm", "encoder/after_norm")
    r += _encoder_layers("encoders") + _encoder_layers("up_encoders")
    r += _linear(f"{est}.time_mlp.linear_1", f"{jest}/time_mlp/linear_1")
    r += _linear(f"{est}.time_mlp.linear_2", f"{jest}/time_mlp/linear_2")
    r += _stage(f"{est}.down_blocks.0", f"{jest}/down_blocks_0", True)
    r += _stage(f"{est}.mid_blocks.{{i}}", f"{jest}/mid_blocks_{{i}}", False)
    r += _stage(f"{est}.up_blocks.0", f"{jest}/up_blocks_0", True)
    r += _conv(f"{est}.final_block.block.0", f"{jest}/final_block/conv")
    r += _norm(f"{est}.final_block.block.2", f"{jest}/final_block/norm")
    r += _conv(f"{est}.final_proj", f"{jest}/final_proj")
    return r


def from_torch(state_dict: Mapping[str, np.ndarray], cfg: FlowConfig, what: str = "flow.pt") -> dict:
    """Official flow state dict -> params (strict: unexpected/missing/mis-shaped keys raise
    :class:`ConversionError` listing all of them)."""
    from .modeling import abstract_params

    return convert(state_dict, rules(), expected=abstract_params(cfg), what=what)


def to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Params -> official flow state dict (numpy), the inverse of :func:`from_torch`."""
    return export(params, rules(), what="flow params")


def from_release(source: str | Path | Mapping[str, np.ndarray], cfg: FlowConfig) -> dict:
    """A release ``flow.pt`` (read weights-only) or a state dict -> params for ``cfg`` (strict)."""
    if isinstance(source, Mapping):
        return from_torch(source, cfg)
    return from_torch(load_torch_checkpoint(source), cfg, what=Path(source).name)


def to_release(params: Mapping, cfg: FlowConfig | None = None) -> dict[str, np.ndarray]:
    """Params -> the official ``flow.pt`` state dict (numpy); ``cfg`` is not needed (contract)."""
    return to_torch(params)


def param_axes(cfg: FlowConfig) -> dict:
    """Logical axes of every param leaf (:func:`cosyvoice2_jax.sharding.axes_by_rule`)."""
    from ..sharding import axes_by_rule
    from .modeling import abstract_params

    return axes_by_rule(abstract_params(cfg))
