"""CAM++ speaker encoder (192-d x-vectors): model, converters (torch / ONNX), batched runtime.

Component contract (the same names in ``llm``, ``flow``, ``hift``, ``tokenizer``, ``speaker``):
``abstract_params(cfg)``, ``init_params(cfg, key)``, ``param_axes(cfg)``, ``from_release(source, cfg)``
(``campplus.onnx`` or a torch state dict), ``to_release(params, cfg)`` (the torch state dict),
``RELEASE_FILE``, ``config_from_release(path, base)`` and the runtime wrapper (here
:class:`SpeakerEncoder`).
"""
from .modeling import CAMPPlus
from .params import abstract_params, config_from_release, from_release, init_params, param_axes, to_release
from .runtime import SpeakerEncoder

RELEASE_FILE = "campplus.onnx"

__all__ = ["CAMPPlus", "RELEASE_FILE", "SpeakerEncoder", "abstract_params", "config_from_release", "from_release",
           "init_params", "param_axes", "to_release"]
