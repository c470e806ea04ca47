"""CosyVoice 2 text-speech LM: Qwen2 backbone + ``Qwen2LM`` heads, RAS sampling, batched generation.

* :mod:`.modeling` - Flax modules (``Qwen2LM``), sequence layout, params init.
* :mod:`.objectives` - training losses (cross entropy, DPO log-probs) and the training forward.
* :mod:`.sampling` - repetition-aware sampling (official semantics, explicit PRNG keys).
* :mod:`.generate` - the runtime wrapper: jitted prefill + KV-cache decode (``LMGenerator``), bistream.
* :mod:`.params` - release ``llm.pt`` <-> params, logical axes.

Component contract (the same names in ``llm``, ``flow``, ``hift``, ``tokenizer``, ``speaker``):
``abstract_params(cfg)``, ``init_params(cfg, key)``, ``param_axes(cfg)``, ``from_release(source, cfg)``,
``to_release(params, cfg)``, ``RELEASE_FILE`` and the runtime wrapper (here :class:`LMGenerator`).
"""
from .generate import BistreamSession, GenerationError, LMGenerator, Request
from .modeling import Qwen2LM, abstract_params, init_params, quantize_params
from .params import from_release, param_axes, to_release

RELEASE_FILE = "llm.pt"

__all__ = ["BistreamSession", "GenerationError", "LMGenerator", "Request", "Qwen2LM", "RELEASE_FILE",
           "abstract_params", "init_params", "param_axes", "from_release", "to_release", "quantize_params"]
