"""HiFT vocoder (mel -> 24 kHz waveform): generator, NSF source, iSTFT, GAN discriminators, converter.

Typical inference::

    from cosyvoice2_jax import hift
    vocoder = hift.Vocoder(cfg.hift, hift.from_release("CosyVoice2-0.5B/hift.pt", cfg.hift))
    audio, source = vocoder([mel], [jax.random.PRNGKey(0)])   # lists of (samples,) arrays

Component contract (the same names in ``llm``, ``flow``, ``hift``, ``tokenizer``, ``speaker``):
``abstract_params(cfg)``, ``init_params(cfg, key)``, ``param_axes(cfg)``, ``from_release(source, cfg)``,
``to_release(params, cfg)``, ``RELEASE_FILE`` and the runtime wrapper (here :class:`Vocoder`).
"""
from .modeling import HiFTGenerator, make_inference_fn, source_noise
from .params import abstract_params, from_release, init_params, param_axes, to_release
from .runtime import Vocoder

RELEASE_FILE = "hift.pt"

__all__ = ["HiFTGenerator", "RELEASE_FILE", "Vocoder", "abstract_params", "from_release", "init_params",
           "make_inference_fn", "param_axes", "source_noise", "to_release"]
