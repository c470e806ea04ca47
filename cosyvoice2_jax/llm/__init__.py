"""CosyVoice 2 text-speech LM: Qwen2 backbone + ``Qwen2LM`` heads, RAS sampling, batched generation.

* :mod:`.modeling` - Flax modules (``Qwen2LM``), training sequence assembly, loss, DPO log-probs.
* :mod:`.sampling` - repetition-aware sampling (official semantics, explicit PRNG keys).
* :mod:`.generate` - jitted prefill + KV-cache decode (``LMGenerator``), bistream sessions.
* :mod:`.params` - release ``llm.pt`` <-> params.
"""
from .generate import BistreamSession, GenerationError, LMGenerator, Request
from .modeling import (Qwen2LM, abstract_params, choose_bistream, init_params, lm_forward, lm_forward_dpo,
                       prepare_lm_input_target, quantize_params)
from .params import export_state_dict, load_params

__all__ = ["BistreamSession", "GenerationError", "LMGenerator", "Request", "Qwen2LM", "abstract_params",
           "choose_bistream", "init_params", "lm_forward", "lm_forward_dpo", "prepare_lm_input_target",
           "quantize_params", "export_state_dict", "load_params"]
