"""Oracle tasks for Whisper (named hf_whisper: a module `whisper` here would shadow openai-whisper, which
the official tokenizer imports): transformers' PyTorch ``WhisperForConditionalGeneration`` on random weights.

``build`` draws a tiny model (HF's own init, seeded) and saves it as an HF directory; ``logits`` and
``greedy`` run it from that directory. ``greedy`` is a plain argmax loop on HF's own KV cache
(``past_key_values``), stopping at ``eos_token_id`` and honouring ``suppress``/``begin_suppress``
token lists the way HF's logits processors do (-inf before the argmax). ``features`` is HF's
``WhisperFeatureExtractor`` on a wave padded to ``n_samples``.
"""
from __future__ import annotations

import numpy as np
import torch

_MODELS: dict = {}


def _model(path: str):
    if path not in _MODELS:
        from transformers import WhisperForConditionalGeneration

        _MODELS[path] = WhisperForConditionalGeneration.from_pretrained(path).eval()
    return _MODELS[path]


def build(inputs, config: dict, out_dir: str, seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    m = WhisperForConditionalGeneration(WhisperConfig(**config)).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0) so they are exercised
        for name, p in m.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(out_dir, safe_serialization=True)
    return {}


@torch.inference_mode()
def logits(inputs, path: str):
    """features (B, F, n_mels), tokens (B, T) -> logits (B, T, V)."""
    m = _model(path)
    feats = torch.from_numpy(np.ascontiguousarray(inputs["features"].transpose(0, 2, 1))).float()
    out = m(input_features=feats, decoder_input_ids=torch.from_numpy(inputs["tokens"]).long())
    return {"logits": out.logits.float().numpy()}


@torch.inference_mode()
def greedy(inputs, path: str, max_new: int, suppress=(), begin_suppress=()):
    """features (B, F, n_mels), prompt (P,) -> tokens (B, max_new) (eos-padded after the stop)."""
    m = _model(path)
    eos = m.config.eos_token_id
    feats = torch.from_numpy(np.ascontiguousarray(inputs["features"].transpose(0, 2, 1))).float()
    b = feats.shape[0]
    enc = m.model.encoder(feats).last_hidden_state
    ids = torch.from_numpy(inputs["prompt"]).long()[None].repeat(b, 1)
    past, out = None, []
    done = torch.zeros(b, dtype=torch.bool)
    for i in range(max_new):
        o = m(encoder_outputs=(enc,), decoder_input_ids=ids, past_key_values=past, use_cache=True)
        past = o.past_key_values
        last = o.logits[:, -1].clone()
        if suppress:
            last[:, list(suppress)] = -float("inf")
        if i == 0 and begin_suppress:
            last[:, list(begin_suppress)] = -float("inf")
        tok = torch.where(done, torch.full((b,), eos), last.argmax(-1))
        out.append(tok)
        done |= tok == eos
        if bool(done.all()):
            break
        ids = tok[:, None]
    res = torch.full((b, max_new), eos, dtype=torch.long)
    res[:, :len(out)] = torch.stack(out, 1)
    return {"tokens": res.numpy().astype(np.int32)}


def features(inputs, n_mels: int, n_samples: int):
    """wav (N,) 16 kHz -> HF WhisperFeatureExtractor log-mel (frames, n_mels)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels, n_samples=n_samples, chunk_length=n_samples // 16000 or 1)
    f = fe(inputs["wav"].astype(np.float32), sampling_rate=16000, return_tensors="np", padding="max_length",
           max_length=n_samples)
    return {"features": f["input_features"][0].T.astype(np.float32)}
