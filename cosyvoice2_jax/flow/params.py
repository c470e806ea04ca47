"""Release ``flow.pt`` (``CausalMaskedDiffWithXvec.state_dict()``) <-> flow params, strictly.

The table maps torch keys to Flax paths (``.`` -> ``/``, list index ``k`` -> ``name_k``,
``nn.Sequential`` index ``k`` -> ``name_k`` or a descriptive name); ``params_util.convert``
checks that every key is used and every parameter produced with the expected shape
(``jax.eval_shape`` of the model for the given config), ``params_util.export`` inverts it.
Layouts: Linear ``(out, in)`` -> ``(in, out)``; Conv1d ``(out, in, k)`` -> ``(k, in, out)``;
LayerNorm ``weight`` -> ``scale``.

A distilled student (``FlowConfig.student``, ``flow/distill.py``) exports to the same format with
these extra keys (documented here, read back by :func:`from_release` / :func:`config_from_release`):

* ``decoder.estimator.time_mlp_w.linear_{1,2}.{weight,bias}``: the guidance-rate input's MLP
  (``student.inputs`` has ``"w"``); ``time_mlp_d``: the step-size input's (``"d"``);
* ``student.n_timesteps`` (int64 scalar): the student's default solver steps; its presence marks a
  single-pass student (guidance folded in);
* ``student.cosine_grid`` (int64 scalar, 0/1): the student's time grid (1: the official cosine,
  0: uniform).
"""
from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import STUDENT_INPUTS, FlowConfig, FlowStudentConfig, TScheduler
from ..errors import ConfigError
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


STUDENT_MARKERS = ("student.n_timesteps", "student.cosine_grid")


def rules(student_inputs: tuple[str, ...] = ()) -> list[Rule]:
    """The conversion table (flow.pt of CosyVoice2-0.5B: 1121 keys; plus a student's extra MLPs)."""
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
    for n in student_inputs:
        for lin in ("linear_1", "linear_2"):
            r += _linear(f"{est}.time_mlp_{n}.{lin}", f"{jest}/time_mlp_{n}/{lin}")
    return r


def _inputs_in(params_or_keys) -> tuple[str, ...]:
    text = " ".join(params_or_keys)
    return tuple(n for n in STUDENT_INPUTS if f"time_mlp_{n}" in text)


def config_from_release(source: str | Path | Mapping[str, np.ndarray], cfg: FlowConfig) -> FlowConfig:
    """``cfg`` with the student settings a ``flow.pt`` carries (its extra keys, see the module
    docstring); an official ``flow.pt`` returns ``cfg`` unchanged."""
    sd = source if isinstance(source, Mapping) else load_torch_checkpoint(source)
    if "student.n_timesteps" not in sd:
        return cfg
    cosine = bool(int(np.asarray(sd.get("student.cosine_grid", 0))))
    cfm = dataclasses.replace(cfg.cfm, n_timesteps=int(np.asarray(sd["student.n_timesteps"])),
                              t_scheduler=TScheduler.COSINE if cosine else TScheduler.LINEAR)
    est = [k for k in sd if k.startswith("decoder.estimator.")]
    return dataclasses.replace(cfg, cfm=cfm, student=FlowStudentConfig(enabled=True, inputs=_inputs_in(est)))


def from_torch(state_dict: Mapping[str, np.ndarray], cfg: FlowConfig, what: str = "flow.pt") -> dict:
    """Official flow state dict -> params (strict: unexpected/missing/mis-shaped keys raise
    :class:`ConversionError` listing all of them)."""
    from .modeling import abstract_params, student_inputs

    if any(k in state_dict for k in STUDENT_MARKERS) and not cfg.student.enabled:
        raise ConfigError(f"{what} is a distilled flow student (it has the student.* keys) but the flow config is the "
                          "official flow; build the config with flow.config_from_release(path, cfg) (the pipeline "
                          "does this for a release directory)")
    sd = {k: v for k, v in state_dict.items() if k not in STUDENT_MARKERS}
    return convert(sd, rules(student_inputs(cfg)), expected=abstract_params(cfg), what=what)


def to_torch(params: Mapping, cfg: FlowConfig | None = None) -> dict[str, np.ndarray]:
    """Params -> official flow state dict (numpy), the inverse of :func:`from_torch`; a student
    (extra ``time_mlp_*`` params, ``cfg.student.enabled``) also gets the ``student.*`` keys."""
    from ..params_util import flatten

    inputs = _inputs_in(flatten(params).keys())
    sd = export(params, rules(inputs), what="flow params")
    if cfg is not None and cfg.student.enabled:
        sd["student.n_timesteps"] = np.asarray(int(cfg.cfm.n_timesteps), np.int64)
        sd["student.cosine_grid"] = np.asarray(int(TScheduler(cfg.cfm.t_scheduler) is TScheduler.COSINE), np.int64)
    elif inputs:
        raise ConfigError("flow params have student inputs (time_mlp_*) but no student config; "
                          "pass the student's FlowConfig to to_release")
    return sd


def from_release(source: str | Path | Mapping[str, np.ndarray], cfg: FlowConfig) -> dict:
    """A release ``flow.pt`` (read weights-only) or a state dict -> params for ``cfg`` (strict)."""
    if isinstance(source, Mapping):
        return from_torch(source, cfg)
    return from_torch(load_torch_checkpoint(source), cfg, what=Path(source).name)


def to_release(params: Mapping, cfg: FlowConfig | None = None) -> dict[str, np.ndarray]:
    """Params -> the official ``flow.pt`` state dict (numpy); ``cfg`` is needed for a distilled
    student only (its ``student.*`` keys)."""
    return to_torch(params, cfg)


def param_axes(cfg: FlowConfig) -> dict:
    """Logical axes of every param leaf (:func:`cosyvoice2_jax.sharding.axes_by_rule`)."""
    from ..sharding import axes_by_rule
    from .modeling import abstract_params

    return axes_by_rule(abstract_params(cfg))
