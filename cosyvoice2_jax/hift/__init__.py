"""HiFT vocoder (mel -> 24 kHz waveform): generator, NSF source, iSTFT, GAN discriminators, converter.

Typical inference::

    from cosyvoice2_jax.hift import HiFTGenerator, from_torch, make_inference_fn
    params = from_torch(load_torch_checkpoint("hift.pt"), cfg.hift, fold=True)
    run = make_inference_fn(cfg.hift)                 # jitted, one compile per (B, F) bucket
    audio, source = run(params, mel_bfc, jax.random.PRNGKey(0), lengths, cache_source)
"""
from .modeling import (ConvRNNF0Predictor, HiFTGenerator, ResBlock, Snake, SourceModuleHnNSF, istft,
                       make_inference_fn, source_noise, stft_source)
from .params import discriminator_from_torch, discriminator_to_torch, from_torch, hift_rules, to_torch

__all__ = ["ConvRNNF0Predictor", "HiFTGenerator", "ResBlock", "Snake", "SourceModuleHnNSF", "istft",
           "make_inference_fn", "source_noise", "stft_source", "from_torch", "to_torch", "hift_rules",
           "discriminator_from_torch", "discriminator_to_torch"]
