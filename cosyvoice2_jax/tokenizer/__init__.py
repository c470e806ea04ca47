"""S3TokenizerV2 (speech -> 25 Hz FSQ tokens): model, FSQ, converters, batched runtime.

Component contract (the same names in ``llm``, ``flow``, ``hift``, ``tokenizer``, ``speaker``):
``abstract_params(cfg)``, ``init_params(cfg, key)``, ``param_axes(cfg)``, ``from_release(source, cfg)``
(``speech_tokenizer_v2.onnx`` or a torch state dict), ``to_release(params, cfg)`` (the torch state
dict), ``RELEASE_FILE``, ``config_from_release(path, base)`` and the runtime wrapper
(here :class:`SpeechTokenizer`).
"""
from .modeling import S3TokenizerV2
from .params import abstract_params, config_from_release, from_release, init_params, param_axes, to_release
from .runtime import SpeechTokenizer

RELEASE_FILE = "speech_tokenizer_v2.onnx"

__all__ = ["RELEASE_FILE", "S3TokenizerV2", "SpeechTokenizer", "abstract_params", "config_from_release",
           "from_release", "init_params", "param_axes", "to_release"]
