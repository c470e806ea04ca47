"""Project exceptions.

Every user-facing problem raises one of these with the cause *and* the fix in the message, so a
user never has to read a traceback from deep inside jit to know what went wrong.
"""
from __future__ import annotations


class CosyVoiceError(Exception):
    """Base class of all cosyvoice2_jax user-facing errors."""


class ConfigError(CosyVoiceError, ValueError):
    """A config file, preset or ``--set`` override is malformed (names the key)."""


class AudioError(CosyVoiceError, ValueError):
    """Audio input is missing, unreadable, empty, silent-only, non-finite or at a wrong rate."""


class TextError(CosyVoiceError, ValueError):
    """Text input is empty or unusable, or a tokenizer directory is malformed."""


class ReleaseDirError(CosyVoiceError, FileNotFoundError):
    """A model/release directory lacks files or has the wrong layout."""


class ConversionError(CosyVoiceError, ValueError):
    """A checkpoint does not match the model: missing, unexpected or mis-shaped keys."""


class InputWarning(UserWarning):
    """Input that works but will likely sound wrong: a long prompt, characters the tokenizer only
    spells as raw bytes. The CLI prints these as ``warning: ...`` lines."""
