"""Whisper ASR (the evaluation harness's default recogniser), loaded from a local Hugging Face directory.

Component contract (as ``llm``, ``flow``, ``hift``, ``tokenizer``, ``speaker``): ``abstract_params(cfg)``,
``init_params(cfg, key)``, ``param_axes(cfg)``, ``from_release(source, cfg)`` (an HF Whisper directory
or a torch state dict), ``to_release(params, cfg)`` (the HF state dict), ``RELEASE_FILES``,
``config_from_release(dir)`` and the runtime wrapper :class:`WhisperASR` (batched greedy decoding
with a KV cache).
"""
from . import params
from .modeling import Whisper, WhisperConfig
from .params import (RELEASE_FILES, abstract_params, config_from_release, from_release, init_params, param_axes,
                     save_hf_dir, to_release)
from .runtime import WhisperASR, WhisperText

__all__ = ["RELEASE_FILES", "params", "Whisper", "WhisperASR", "WhisperConfig", "WhisperText", "abstract_params",
           "config_from_release", "from_release", "init_params", "param_axes", "save_hf_dir", "to_release"]
