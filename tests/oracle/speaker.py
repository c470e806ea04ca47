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


# --------------------------------------------------------------------------- release files
def _synthetic_speech(seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """16 kHz speech-like test signal (harmonic tone with a gliding pitch, syllable envelope, noise):
    enough to estimate BatchNorm statistics for a random-weight model."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t) + 20 * rng.standard_normal() * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.1 * env * voiced + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def _with_block_layers(m, block_layers, growth_rate: int, bn_size: int, init_channels: int, embedding_size: int):
    """The CAMPPlus class fixes its dense-block depths at (12, 24, 16): for other depths, replace
    the blocks, transits, output BN and dense layer by the same official classes at the new
    depths (module names unchanged, so the state dict keeps the release naming)."""
    x = campplus_module()
    c = init_channels
    for i, (n, k, d) in enumerate(zip(block_layers, (3, 3, 3), (1, 2, 2)), start=1):
        setattr(m.xvector, f"block{i}", x.CAMDenseTDNNBlock(
            num_layers=n, in_channels=c, out_channels=growth_rate, bn_channels=bn_size * growth_rate,
            kernel_size=k, dilation=d, config_str="batchnorm-relu", memory_efficient=False))
        c += n * growth_rate
        setattr(m.xvector, f"transit{i}", x.TransitLayer(c, c // 2, bias=False, config_str="batchnorm-relu"))
        c //= 2
    m.xvector.out_nonlinear = x.get_nonlinear("batchnorm-relu", c)
    m.xvector.dense = x.DenseLayer(c * 2, embedding_size, config_str="batchnorm_")
    return m


def export_release_onnx(inputs, path: str, seed: int = 0, growth_rate: int = 32, init_channels: int = 128,
                        bn_size: int = 4, block_layers=(12, 24, 16), frames: int = 200):
    """``campplus.onnx`` of a random-weight release: the official CAMPPlus with the given sizes
    (other block depths than the class's (12, 24, 16): see ``_with_block_layers``), weights
    re-drawn, BatchNorm statistics estimated on a synthetic signal (train-mode pass, cumulative
    averages), exported in eval mode like ``export_onnx`` (BNs after convs folded). Returns the
    embedding of that signal by the torch model and by onnxruntime, and the node counts."""
    import onnx
    import onnxruntime

    m = campplus_module().CAMPPlus(feat_dim=80, embedding_size=192, growth_rate=growth_rate, bn_size=bn_size,
                                   init_channels=init_channels, memory_efficient=False)
    if tuple(block_layers) != (12, 24, 16):
        m = _with_block_layers(m, tuple(block_layers), growth_rate, bn_size, init_channels, 192)
    reinit_(m, seed)
    feats = [_fbank(_synthetic_speech(seconds=4.0, seed=seed + i)) for i in range(2)]
    crops = torch.stack([f[s:s + 200] for f in feats for s in range(0, f.shape[0] - 199, 100)])
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(crops.float())
    m.eval()
    torch.onnx.export(m, (torch.randn(1, frames, 80),), path, dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["output"], training=torch.onnx.TrainingMode.EVAL,
                      dynamic_axes={"input": {0: "B", 1: "T"}, "output": {0: "B"}})
    with torch.no_grad():
        ref = to_np(m(feats[0][None].float())[0])
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: to_np(feats[0][None].float())})[0][0]
    ops = [n.op_type for n in onnx.load(path).graph.node]
    return {"emb_torch": ref, "emb_onnx": got, "n_conv": np.array(ops.count("Conv")),
            "n_bn": np.array(ops.count("BatchNormalization"))}
