"""CosyVoice 2 flow (speech tokens -> mel): encoder, causal U-Net estimator, CFM, converter.

Quick use::

    from cosyvoice2_jax import flow
    params = flow.from_release("CosyVoice2-0.5B/flow.pt", cfg.flow)
    mel = flow.inference(params, cfg.flow, token, prompt_token, prompt_feat, embedding)  # (1, F, mel bins)

Component contract (the same names in ``llm``, ``flow``, ``hift``, ``tokenizer``, ``speaker``):
``abstract_params(cfg)``, ``init_params(cfg, key)``, ``param_axes(cfg)``, ``from_release(source, cfg)``,
``to_release(params, cfg)``, ``config_from_release(source, cfg)`` (a distilled student's settings), ``RELEASE_FILE`` and the runtime wrapper (here :class:`MelGenerator`).
"""
import importlib

RELEASE_FILE = "flow.pt"
# names resolved on first use (PEP 562): importing a light submodule (e.g. ``flow.sampling`` for the
# CLI's flags) does not import flax and the network code
_LAZY = {"CausalMaskedDiffWithXvec": "modeling", "abstract_params": "modeling", "inference": "modeling",
         "inference_batch": "modeling", "init_params": "modeling", "config_from_release": "params",
         "from_release": "params", "param_axes": "params", "to_release": "params", "FlowPrompt": "runtime",
         "MelGenerator": "runtime"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["CausalMaskedDiffWithXvec", "FlowPrompt", "MelGenerator", "RELEASE_FILE", "abstract_params",
           "inference", "inference_batch", "init_params", "param_axes", "config_from_release", "from_release", "to_release"]
