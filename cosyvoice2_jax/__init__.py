"""cosyvoice2_jax: a JAX/Flax reimplementation of CosyVoice 2 (arXiv 2412.10117).

Components live one per folder (``llm/``, ``flow/``, ``hift/``, ``tokenizer/``, ``speaker/``),
each with ``modeling.py`` and ``params.py``; the front end is in ``frontend/``; configs in
:mod:`cosyvoice2_jax.config`.
"""
from .config import ModelConfig
from .errors import (AudioError, ConfigError, ConversionError, CosyVoiceError, ReleaseDirError,
                     TextError)

__version__ = "0.1.0.dev0"
__all__ = ["ModelConfig", "AudioError", "ConfigError", "ConversionError", "CosyVoiceError",
           "ReleaseDirError", "TextError", "__version__"]
