"""Release ``llm.pt`` (a ``Qwen2LM.state_dict()``) <-> Flax params of :class:`.modeling.Qwen2LM`.

One declarative table; torch ``Linear`` weights keep their ``(out, in)`` layout (the JAX module
contracts dim 1 of both operands), so every transform is the identity. The tied
``llm.model.lm_head.weight`` is ignored on import (CosyVoice uses hidden states only) and written
back as a copy of ``embed_tokens`` on export, so ``to_release(from_release(sd)) == sd`` for a release file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ..config import LLMConfig
from ..params_util import Rule, convert, export, load_torch_checkpoint
from .modeling import abstract_params, stack_layers, unstack_layers

_QWEN = "llm.model.model"
_JQWEN = "llm/model/model"

RULES = (
    Rule(f"{_QWEN}.embed_tokens.weight", f"{_JQWEN}/embed_tokens/embedding"),
    Rule(f"{_QWEN}.layers.{{i}}.self_attn.{{proj}}.weight", f"{_JQWEN}/layers_{{i}}/self_attn/{{proj}}/weight"),
    Rule(f"{_QWEN}.layers.{{i}}.self_attn.{{proj}}.bias", f"{_JQWEN}/layers_{{i}}/self_attn/{{proj}}/bias"),
    Rule(f"{_QWEN}.layers.{{i}}.mlp.{{proj}}.weight", f"{_JQWEN}/layers_{{i}}/mlp/{{proj}}/weight"),
    Rule(f"{_QWEN}.layers.{{i}}.{{norm}}.weight", f"{_JQWEN}/layers_{{i}}/{{norm}}/weight"),
    Rule(f"{_QWEN}.norm.weight", f"{_JQWEN}/norm/weight"),
    Rule("llm_embedding.weight", "llm_embedding/embedding"),
    Rule("speech_embedding.weight", "speech_embedding/embedding"),
    Rule("llm_decoder.weight", "llm_decoder/weight"),
    Rule("llm_decoder.bias", "llm_decoder/bias"),
)
TIED_HEAD = "llm.model.lm_head.weight"


def from_release(source: str | Path | Mapping[str, Any], cfg: LLMConfig) -> dict:
    """``llm.pt`` path (read with ``torch.load(weights_only=True)``) or a dict of arrays -> params.

    Strict: unexpected, missing and mis-shaped keys are all listed in one ``ConversionError``.
    With ``cfg.scan_layers`` the layers come back stacked (``layers/layer``).
    """
    sd = load_torch_checkpoint(source) if isinstance(source, (str, Path)) else source
    unrolled = cfg if not cfg.scan_layers else _unrolled(cfg)
    params = convert(sd, RULES, expected=abstract_params(unrolled), ignore=[r"llm\.model\.lm_head\.weight\Z"],
                     what="llm.pt")
    return stack_layers(params, cfg.qwen.num_hidden_layers) if cfg.scan_layers else params


def to_release(params: Mapping[str, Any], cfg: LLMConfig, *, include_tied_head: bool = True) -> dict:
    """params -> torch state dict (numpy), the tied ``lm_head`` included as a copy of the text embedding."""
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.qwen.num_hidden_layers)
    sd = export(params, RULES, what="Qwen2LM params")
    if include_tied_head:
        sd[TIED_HEAD] = sd[f"{_QWEN}.embed_tokens.weight"].copy()
    return sd


def _unrolled(cfg: LLMConfig) -> LLMConfig:
    return dataclasses.replace(cfg, scan_layers=False)


def param_axes(cfg: LLMConfig, *, quant: bool = False) -> dict:
    """Logical axes of every param leaf, from the modules' ``nn.with_logical_partitioning``."""
    from ..sharding import axes_from_boxed

    return axes_from_boxed(abstract_params(cfg, quant=quant, boxed=True))
