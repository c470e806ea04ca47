"""CosyVoice 2 flow (speech tokens -> mel): encoder, causal U-Net estimator, CFM, converter.

Quick use::

    from cosyvoice2_jax.flow import load_params, inference
    params = load_params("CosyVoice2-0.5B/flow.pt", cfg.flow)
    mel = inference(params, cfg.flow, token, prompt_token, prompt_feat, embedding)  # (1, F, 80)
"""
from .modeling import (CausalMaskedDiffWithXvec, abstract_params, inference, inference_batch, init_params,
                       loss_masks, training_loss)
from .params import from_torch, load as load_params, to_torch

__all__ = ["CausalMaskedDiffWithXvec", "abstract_params", "inference", "inference_batch", "init_params",
           "loss_masks", "training_loss", "from_torch", "load_params", "to_torch"]
