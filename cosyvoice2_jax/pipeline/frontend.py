"""The pipeline's front end: prompt audio -> flow/LM conditioning (official ``CosyVoiceFrontEnd``).

For a 16 kHz prompt waveform: speech tokens (S3Tokenizer v2 on the Whisper log-mel), the flow's
24 kHz mel (resampled 16 -> 24 kHz as the official), and the CAM++ x-vector (mean-normalised Kaldi
fbank). With a 24 kHz flow the official trims both to ``n = min(frames // 2, tokens)``: ``2n``
mel frames and ``n`` tokens, so that the prompt mel and prompt tokens line up.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AudioError
from ..frontend.audio import kaldi_fbank, load_wav, mel_24k, resample, whisper_log_mel


@dataclasses.dataclass
class PromptFeatures:
    """Everything the models need from one prompt utterance."""

    speech_token: np.ndarray   # (S,) int32
    speech_feat: np.ndarray    # (2S, 80) float32 (24 kHz mel, 50 frames/s)
    embedding: np.ndarray      # (192,) float32 CAM++ x-vector

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"speech_token": self.speech_token, "speech_feat": self.speech_feat, "embedding": self.embedding}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptFeatures":
        return cls(np.asarray(d["speech_token"], np.int32).reshape(-1),
                   np.asarray(d["speech_feat"], np.float32).reshape(-1, 80),
                   np.asarray(d["embedding"], np.float32).reshape(-1))


def as_wav_16k(wav: Any, what: str = "prompt") -> np.ndarray:
    """A 16 kHz mono waveform from a path (any rate, resampled) or an array that is already 16 kHz
    (``(samples,)`` or ``(1, samples)``, the official ``prompt_speech_16k``)."""
    if isinstance(wav, (str, Path)):
        return load_wav(wav, 16000)
    a = np.asarray(wav)
    if hasattr(wav, "numpy") and not isinstance(wav, np.ndarray):  # a torch tensor
        a = np.asarray(wav.detach().cpu().numpy())
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise AudioError(f"{what} audio must be mono 16 kHz samples (samples,) or (1, samples), got shape {a.shape}; "
                         "pass a file path to load and resample other formats")
    return load_wav(a, 16000, sr=16000)


def extract_prompt(wav_16k: np.ndarray, speech_tokenizer, speaker_encoder, *, trim: bool = True) -> PromptFeatures:
    """Official ``frontend_zero_shot`` audio part (``trim``: the 24 kHz token/frame alignment)."""
    if wav_16k.shape[0] < 16000 * 0.2:
        raise AudioError(f"prompt audio is {wav_16k.shape[0] / 16000:.2f} s long; give at least 0.2 s "
                         "(3-10 s of clean speech works best)")
    tokens = speech_tokenizer.tokenize([whisper_log_mel(wav_16k, speech_tokenizer.config.n_mels)])[0]
    feat = mel_24k(resample(wav_16k, 16000, 24000), sr=24000)
    emb = speaker_encoder.embed([kaldi_fbank(wav_16k)])[0]
    tokens = np.asarray(tokens, np.int32)
    if trim:
        n = min(feat.shape[0] // 2, tokens.shape[0])
        tokens, feat = tokens[:n], feat[: 2 * n]
    return PromptFeatures(tokens, np.asarray(feat, np.float32), np.asarray(emb, np.float32))


def source_tokens(wav_16k: np.ndarray, speech_tokenizer) -> np.ndarray:
    """Speech tokens of the source utterance (voice conversion)."""
    return np.asarray(speech_tokenizer.tokenize([whisper_log_mel(wav_16k, speech_tokenizer.config.n_mels)])[0], np.int32)
