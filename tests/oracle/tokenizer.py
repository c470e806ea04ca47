"""Oracle tasks for the S3Tokenizer v2 (s3tokenizer 0.3.0, ``s3tokenizer.model_v2``).

The model is built once per (seed, config) and cached in this process, so later tasks only send
mels. Mels travel in the official layout (B, 128, F).
"""
from __future__ import annotations

import numpy as np
import torch

from common import reinit_, state_dict_np, to_np, to_torch

_MODELS: dict = {}


def _model(seed: int = 0, n_audio_state: int = 1280, n_audio_head: int = 20, n_audio_layer: int = 6):
    key = (seed, n_audio_state, n_audio_head, n_audio_layer)
    if key not in _MODELS:
        from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

        cfg = ModelConfig(n_audio_state=n_audio_state, n_audio_head=n_audio_head, n_audio_layer=n_audio_layer)
        m = S3TokenizerV2("speech_tokenizer_v2_25hz", cfg).eval()
        reinit_(m, seed)
        _MODELS[key] = m
    return _MODELS[key]


def build(inputs, seed: int = 0, **cfg):
    """Re-drawn weights -> ``sd/<key>`` arrays."""
    return {f"sd/{k}": v for k, v in state_dict_np(_model(seed, **cfg)).items()}


@torch.inference_mode()
def run(inputs, seed: int = 0, **cfg):
    """mel (B, 128, F), lens (B,) -> hidden (B, S, D), z (B, S, 8), ids (B, S), lens (B,)."""
    m = _model(seed, **cfg)
    mel, lens = to_torch(inputs["mel"]).float(), to_torch(inputs["lens"]).long()
    h, hl = m.encoder(mel, lens)
    z = m.quantizer._codebook.project_down(h)
    ids = m.quantizer.encode(h)
    return {"hidden": to_np(h), "z": to_np(z), "ids": to_np(ids).astype(np.int32), "lens": to_np(hl).astype(np.int32)}


@torch.inference_mode()
def quantize(inputs, seed: int = 0, **cfg):
    """The official entry point (with its > 30 s windowing): mel (B, 128, F), lens -> ids, lens."""
    m = _model(seed, **cfg)
    ids, il = m.quantize(to_torch(inputs["mel"]).float(), to_torch(inputs["lens"]).long())
    return {"ids": to_np(ids).astype(np.int32), "lens": to_np(il).astype(np.int32)}


def real_mels(inputs, paths: list, concat: bool = False):
    """Official features of real wavs: 16 kHz load (frontend oracle) + s3tokenizer log-mel.
    ``concat``: one long utterance made of all the wavs, repeated to > 30 s."""
    from frontend import load_wav_official
    from s3tokenizer.utils import log_mel_spectrogram

    wavs = [load_wav_official({}, p, 16000)["wav"] for p in paths]
    if concat:
        long = np.concatenate(wavs)
        while len(long) < 35 * 16000:
            long = np.concatenate([long, long])
        wavs = [long[: 35 * 16000]]
    out = {}
    for i, w in enumerate(wavs):
        out[f"mel{i}"] = to_np(log_mel_spectrogram(to_torch(w).float(), n_mels=128))
        out[f"wav{i}"] = w
    return out


def write_release_onnx(inputs, path: str, seed: int = 0, ln_ops: bool = False, **cfg):
    """Write the model's weights as an ONNX graph laid out like the release's
    ``speech_tokenizer_v2.onnx`` (node names ``/blocks.i/...``, ``onnx::Conv_2216``-style conv
    initializers, ``onnx::MatMul_*`` (in, out) weights, ``quantizer.project_in.bias``), then load it
    back with the official ``s3tokenizer.utils.onnx2torch``. Returns that loader's max abs
    difference to the state dict and whether the key sets agree (proves the layout is what the
    official loader expects). ``ln_ops``: LayerNorms written op by op (ReduceMean ... Mul, Add_1),
    as an opset < 17 export does; the official v2 loader cannot read that, so it is not checked."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from s3tokenizer.utils import onnx2torch

    m = _model(seed, **cfg)
    sd = state_dict_np(m)
    nblocks = len(m.encoder.blocks)
    inits, nodes = [], []
    counter = [2300]

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        return name

    def anon(kind, arr):
        counter[0] += 1
        return init(f"onnx::{kind}_{counter[0]}", arr)

    def node(op, name, ins, **attrs):
        out = name + "_output_0"
        nodes.append(helper.make_node(op, ins, [out], name=name, **attrs))
        return out

    def linear(x, scope, key, bias=True):
        y = node("MatMul", f"{scope}/MatMul", [x, anon("MatMul", sd[key + ".weight"].T)])
        if bias:
            y = node("Add", f"{scope}/Add", [init(key + ".bias", sd[key + ".bias"]), y])
        return y

    def layer_norm(x, scope, key):
        if not ln_ops:
            return node("LayerNormalization", f"{scope}/LayerNormalization",
                        [x, init(f"{key}.weight", sd[f"{key}.weight"]), init(f"{key}.bias", sd[f"{key}.bias"])],
                        epsilon=1e-5, axis=-1)
        mu = node("ReduceMean", f"{scope}/ReduceMean", [x], axes=[-1])
        xc = node("Sub", f"{scope}/Sub", [x, mu])
        var = node("ReduceMean", f"{scope}/ReduceMean_1", [node("Mul", f"{scope}/Mul_sq", [xc, xc])], axes=[-1])
        den = node("Sqrt", f"{scope}/Sqrt", [node("Add", f"{scope}/Add", [var, init(f"{key}.eps", np.array([1e-5]))])])
        y = node("Div", f"{scope}/Div", [xc, den])
        y = node("Mul", f"{scope}/Mul", [y, anon("Mul", sd[f"{key}.weight"])])
        return node("Add", f"{scope}/Add_1", [y, anon("Add", sd[f"{key}.bias"])])

    x = node("Conv", "/conv1/Conv", ["mel", init("onnx::Conv_2216", sd["encoder.conv1.weight"]),
                                      init("onnx::Conv_2217", sd["encoder.conv1.bias"])],
             kernel_shape=[3], strides=[2], pads=[1, 1])
    x = node("Erf", "/Erf", [x])
    x = node("Conv", "/conv2/Conv", [x, init("onnx::Conv_2218", sd["encoder.conv2.weight"]),
                                      init("onnx::Conv_2219", sd["encoder.conv2.bias"])],
             kernel_shape=[3], strides=[2], pads=[1, 1])
    x = node("Erf", "/Erf_1", [x])
    x = node("Transpose", "/Transpose", [x], perm=[0, 2, 1])
    d = sd["encoder.conv2.bias"].shape[0]
    for i in range(nblocks):
        p, s = f"encoder.blocks.{i}", f"/blocks.{i}"
        h = layer_norm(x, f"{s}/attn_ln", f"{p}.attn_ln")
        q = linear(h, f"{s}/attn/query", f"{p}.attn.query")
        k = linear(h, f"{s}/attn/key", f"{p}.attn.key", bias=False)
        v = linear(h, f"{s}/attn/value", f"{p}.attn.value")
        vt = node("Transpose", f"{s}/attn/Transpose", [v], perm=[0, 2, 1])
        mem = node("Conv", f"{s}/attn/fsmn_block/Conv",
                   [vt, anon("Conv", sd[f"{p}.attn.fsmn_block.weight"])],
                   kernel_shape=[31], group=d, pads=[15, 15])
        a = node("Add", f"{s}/attn/Add_qk", [q, k])
        o = linear(a, f"{s}/attn/out", f"{p}.attn.out")
        x = node("Add", f"{s}/Add", [x, o])
        x = node("Add", f"{s}/Add_mem", [x, mem])
        h = layer_norm(x, f"{s}/mlp_ln", f"{p}.mlp_ln")
        h = linear(h, f"{s}/mlp/mlp.0", f"{p}.mlp.0")
        h = node("Erf", f"{s}/mlp/mlp.1/Erf", [h])
        h = linear(h, f"{s}/mlp/mlp.2", f"{p}.mlp.2")
        x = node("Add", f"{s}/Add_1", [x, h])
    z = node("MatMul", "/quantizer/project_in/MatMul",
             [x, init("onnx::MatMul_2536", sd["quantizer._codebook.project_down.weight"].T)])
    z = node("Add", "/quantizer/project_in/Add",
             [init("quantizer.project_in.bias", sd["quantizer._codebook.project_down.bias"]), z])
    z = node("Tanh", "/quantizer/Tanh", [z])
    graph = helper.make_graph(
        nodes, "speech_tokenizer_v2",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, 128, None])],
        [helper.make_tensor_value_info(z, TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    if ln_ops:
        return {"same_keys": np.array(True), "max_diff": np.array(0.0)}
    back = {k: to_np(v) for k, v in onnx2torch(path, None, False).items()}
    same_keys = set(back) == set(sd)
    diff = max(float(np.abs(back[k] - sd[k]).max()) for k in sd) if same_keys else float("inf")
    return {"same_keys": np.array(same_keys), "max_diff": np.array(diff)}
