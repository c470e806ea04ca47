"""Oracle tasks for CAM++ (chatterbox's ``xvector.CAMPPlus`` = 3D-Speaker CAMPPlus structure).

Weights: all re-drawn (``reinit_``), then the BatchNorm statistics are re-estimated on real speech
(one train-mode pass over 2 s crops of the given wavs, cumulative averages), so embeddings differ
across speakers. The model is cached per seed in this process.
"""
from __future__ import annotations

import numpy as np
import torch

from common import campplus_module, reinit_, state_dict_np, to_np, to_torch

_MODELS: dict = {}


def _fbank(wav):
    import torchaudio.compliance.kaldi as kaldi

    feat = kaldi.fbank(to_torch(wav).float()[None], num_mel_bins=80, dither=0, sample_frequency=16000)
    return feat - feat.mean(dim=0, keepdim=True)


def real_fbanks(inputs, paths: list):
    """Official CAM++ features of real wavs: 16 kHz load (frontend oracle) + kaldi fbank - mean."""
    from frontend import load_wav_official

    out = {}
    for i, p in enumerate(paths):
        w = load_wav_official({}, p, 16000)["wav"]
        out[f"feat{i}"] = to_np(_fbank(w))
        out[f"wav{i}"] = w
    return out


def _model(seed: int, paths=None):
    if seed not in _MODELS:
        m = campplus_module().CAMPPlus(feat_dim=80, embedding_size=192, memory_efficient=False)
        reinit_(m, seed)
        if paths:
            feats = [x for k, x in real_fbanks({}, paths).items() if k.startswith("feat")]
            crops = [f[s:s + 200] for f in feats for s in range(0, len(f) - 199, 200)]
            for mod in m.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.reset_running_stats()
                    mod.momentum = None  # cumulative average
            m.train()
            with torch.no_grad():
                m(to_torch(np.stack(crops)).float())
        _MODELS[seed] = m.eval()
    return _MODELS[seed]


def build(inputs, seed: int = 0, paths=None):
    return {f"sd/{k}": v for k, v in state_dict_np(_model(seed, paths)).items()}


@torch.inference_mode()
def embed(inputs, seed: int = 0):
    """feat{i} (T_i, 80) -> emb (N, 192), each utterance alone (the official has no lengths)."""
    m = _model(seed)
    keys = sorted((k for k in inputs if k.startswith("feat")), key=lambda k: int(k[4:]))
    return {"emb": np.stack([to_np(m(to_torch(inputs[k]).float()[None])[0]) for k in keys])}


def export_onnx(inputs, path: str, seed: int = 0, frames: int = 200, fold: bool = True):
    """``torch.onnx.export`` of the eval-mode model (legacy TorchScript exporter, as a 2023-era
    export would be); BatchNorms that directly follow a Conv get folded into it. ``fold=False``
    exports with ``TrainingMode.PRESERVE`` (model still in eval mode), which keeps every
    BatchNormalization node. Returns node counts."""
    import onnx

    m = _model(seed).eval()
    mode = torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE
    torch.onnx.export(m, (torch.randn(1, frames, 80),), path, dynamo=False, opset_version=13,
                      input_names=["feats"], output_names=["embs"], training=mode,
                      dynamic_axes={"feats": {0: "B", 1: "T"}, "embs": {0: "B"}})
    g = onnx.load(path).graph
    ops = [n.op_type for n in g.node]
    return {"n_conv": np.array(ops.count("Conv")), "n_bn": np.array(ops.count("BatchNormalization"))}
