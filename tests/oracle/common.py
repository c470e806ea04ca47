"""Shared helpers for the oracle tasks (run inside the oracle venv only).

Import side effects, on purpose:
* ``matcha/utils/__init__.py`` pulls hydra/lightning/rich (training only); we register a bare
  ``matcha.utils`` package (real ``__path__``, ``__init__`` not run) and a minimal ``pylogger``
  so ``matcha.utils.audio`` and ``matcha.models.components.*`` import.
* torch runs with ``ORACLE_THREADS`` threads (default 2).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import types

import numpy as np


def _install_matcha_shims() -> None:
    if "matcha.utils" in sys.modules:
        return
    spec = importlib.util.find_spec("matcha")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("package 'matcha' missing: install cosyvoice-minicpmo==0.1.0 --no-deps")
    base = list(spec.submodule_search_locations)[0]
    import matcha  # noqa: F401

    pkg = types.ModuleType("matcha.utils")
    pkg.__path__ = [os.path.join(base, "utils")]
    pkg.__package__ = "matcha.utils"
    sys.modules["matcha.utils"] = pkg
    log = types.ModuleType("matcha.utils.pylogger")
    log.get_pylogger = lambda name=__name__: logging.getLogger(name)
    sys.modules["matcha.utils.pylogger"] = log
    pkg.pylogger = log


_install_matcha_shims()
logging.disable(logging.WARNING)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("ORACLE_THREADS", "2")))


def to_torch(x, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(dtype) if dtype is not None else t


def to_np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Module state dict as numpy (keys unchanged; int buffers keep their dtype)."""
    return {k: to_np(v) for k, v in module.state_dict().items()}


def load_state_dict_np(module: torch.nn.Module, sd: dict[str, np.ndarray]) -> None:
    missing, unexpected = module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                                                 strict=True)
    assert not missing and not unexpected


@torch.no_grad()
def reinit_(module: torch.nn.Module, seed: int) -> None:
    """Re-draw all weights variance-preserving so outputs really depend on inputs.

    Default inits make weak tests (outputs hardly depend on inputs). Here: matrices/kernels
    N(0, 1/fan_in) (fan_in = prod of all dims but the first), embeddings N(0, 1), weight-norm
    gains ~ N(1, 0.1) * ||v|| rows (so w rows keep unit-ish norm), 1-D scales 1 + N(0, 0.1),
    biases N(0, 0.1), BatchNorm running mean N(0, 0.1) and var U(0.5, 1.5).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)

    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        last = name.rsplit(".", 1)[-1]
        if not torch.is_floating_point(p):
            continue
        if last in ("running_mean",):
            p.copy_(0.1 * randn(p.shape))
        elif last in ("running_var",):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif last == "original0" or last == "weight_g":  # weight-norm gain, shape (d0, 1, ...)
            p.copy_(1.0 + 0.1 * randn(p.shape))
        elif p.ndim >= 2:
            if "embed" in name.lower() and p.ndim == 2 and last == "weight":
                p.copy_(randn(p.shape))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(randn(p.shape) / math.sqrt(max(fan_in, 1)))
        elif last == "bias":
            p.copy_(0.1 * randn(p.shape))
        elif p.ndim == 1:
            p.copy_(1.0 + 0.1 * randn(p.shape))
        else:
            p.copy_(randn(p.shape))


@torch.no_grad()
def scale_hift_(hift, f0_scale: float, post_scale: float) -> None:
    """Re-drawn HiFT weights give f0 ~ 1 Hz (all unvoiced) and a clipped waveform; scaling the F0
    classifier and ``conv_post`` puts the random model where a trained one works (voiced/unvoiced
    mix, |audio| < 1)."""
    hift.f0_predictor.classifier.weight.mul_(f0_scale)
    hift.f0_predictor.classifier.bias.mul_(f0_scale)
    hift.conv_post.parametrizations.weight.original0.mul_(post_scale)
    hift.conv_post.bias.mul_(post_scale)


def load_file_module(modname: str, path: str):
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def campplus_module():
    """chatterbox's CAMPPlus file (3D-Speaker structure) loaded without chatterbox/__init__."""
    if "oracle_xvector" in sys.modules:
        return sys.modules["oracle_xvector"]
    spec = importlib.util.find_spec("chatterbox")
    if spec is None:
        raise ImportError("chatterbox-tts missing: pip install --no-deps chatterbox-tts==0.1.7")
    root = list(spec.submodule_search_locations)[0]
    return load_file_module("oracle_xvector", os.path.join(root, "models", "s3gen", "xvector.py"))


def selftest() -> None:
    import cosyvoice.flow.flow  # noqa: F401
    import cosyvoice.hifigan.generator  # noqa: F401
    import cosyvoice.llm.llm  # noqa: F401
    import cosyvoice.utils.frontend_utils  # noqa: F401
    import s3tokenizer.model_v2  # noqa: F401
    import torchaudio.compliance.kaldi  # noqa: F401
    from matcha.utils.audio import mel_spectrogram  # noqa: F401

    campplus_module()
