"""The text-to-speech pipeline: release loading (:mod:`.loading`, :mod:`.release`), front end
(:mod:`.frontend`), token-to-waveform with streaming (:mod:`.token2wav`) and the ``CosyVoice2``
class with the official method names (:mod:`.model`)."""
from __future__ import annotations


def __getattr__(name):  # lazy: importing the package must not build JAX programs
    if name in ("CosyVoice2", "SynthesisRequest", "ModeError"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)


__all__ = ["CosyVoice2", "SynthesisRequest", "ModeError"]
