"""CosyVoice 2 flow (speech tokens -> mel): encoder, causal U-Net estimator, CFM, converter.

Quick use::

    from cosyvoice2_jax import flow
    params = flow.from_release("CosyVoice2-0.5B/flow.pt", cfg.flow)
    mel = flow.inference(params, cfg.flow, token, prompt_token, prompt_feat, embedding)  # (1, F, mel bins)

Component contract (the same names in ``llm``, ``flow``, ``hift``, ``tokenizer``, ``speaker``):
``abstract_params(cfg)``, ``init_params(cfg, key)``, ``param_axes(cfg)``, ``from_release(source, cfg)``,
``to_release(params, cfg)``, ``config_from_release(source, cfg)`` (a distilled student's settings), ``RELEASE_FILE`` and the runtime wrapper (here :class:`MelGenerator`).
"""
from .modeling import CausalMaskedDiffWithXvec, abstract_params, inference, inference_batch, init_params
from .params import config_from_release, from_release, param_axes, to_release
from .runtime import FlowPrompt, MelGenerator

RELEASE_FILE = "flow.pt"

__all__ = ["CausalMaskedDiffWithXvec", "FlowPrompt", "MelGenerator", "RELEASE_FILE", "abstract_params",
           "inference", "inference_batch", "init_params", "param_axes", "config_from_release", "from_release", "to_release"]
