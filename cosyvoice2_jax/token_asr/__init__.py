"""Token-level ASR (speech tokens -> text, CTC) for the differentiable ASR reward (paper section 2.7).

Component contract (as ``llm``, ``flow``, ``tokenizer``...): ``abstract_params(cfg)``,
``init_params(cfg, key)``, ``param_axes(cfg)``, ``from_release(source, cfg)`` /
``to_release(params, cfg)`` (its own format, ``token_asr.npz``: no official model exists),
``RELEASE_FILE``, ``config_from_release(path, base)`` and the runtime wrapper
(:class:`TokenRecognizer`). Trained by ``cosyvoice2-jax train --config configs/train/token_asr.yaml``.
"""
from .modeling import TokenASR, ctc_greedy, ctc_loss, ctc_mean_loss, spoken_text
from .params import (abstract_params, config_from_release, from_release, init_params, param_axes, save_release,
                     to_release)
from .runtime import TokenRecognizer

RELEASE_FILE = "token_asr.npz"

__all__ = ["RELEASE_FILE", "TokenASR", "TokenRecognizer", "abstract_params", "config_from_release", "ctc_greedy",
           "ctc_loss", "ctc_mean_loss", "from_release", "init_params", "param_axes", "save_release", "spoken_text",
           "to_release"]
