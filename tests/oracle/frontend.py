"""Oracle tasks for the audio and text front end (official feature functions)."""
from __future__ import annotations

import glob
import os
import re

import numpy as np

from common import to_np, to_torch


def ping(inputs):
    return {"x": inputs["x"] * 2}


def s3tokenizer_assets(inputs):
    import s3tokenizer

    base = os.path.dirname(s3tokenizer.__file__)
    paths = sorted(glob.glob(os.path.join(base, "assets", "*.wav")))
    return {"paths": np.array(paths)}


def load_wav_official(inputs, path: str, target_sr: int):
    """cosyvoice.utils.file_utils.load_wav semantics with a soundfile reader (torchaudio.load
    needs torchcodec here): mean over channels, torchaudio Resample to target_sr."""
    import soundfile as sf
    import torch
    import torchaudio

    data, sr = sf.read(path, dtype="float32", always_2d=True)
    speech = torch.from_numpy(data.T.copy()).mean(dim=0, keepdim=True)
    if sr != target_sr:
        assert sr > target_sr, f"wav sample rate {sr} must be greater than {target_sr}"
        speech = torchaudio.transforms.Resample(orig_freq=sr, new_freq=target_sr)(speech)
    return {"wav": to_np(speech[0]), "sr": np.array(sr)}


def load_wav_head(path: str, target_sr: int, min_sr: int = 16000):
    """``cosyvoice/utils/file_utils.py:load_wav`` as at official git HEAD (github FunAudioLLM/CosyVoice;
    the PyPI snapshot here predates it): ``torchaudio.load(wav, backend='soundfile')`` (read here with
    soundfile directly, what that backend does: float32, channels first; torchaudio.load needs torchcodec
    in this venv), mean over channels, ``torchaudio.transforms.Resample(file rate -> target_sr)``,
    refusing rates below ``min_sr`` when resampling. Returns a (1, samples) tensor."""
    import soundfile as sf
    import torch
    import torchaudio

    data, sr = sf.read(path, dtype="float32", always_2d=True)
    speech = torch.from_numpy(data.T.copy()).mean(dim=0, keepdim=True)
    if sr != target_sr:
        assert sr >= min_sr, f"wav sample rate {sr} must be greater than {target_sr}"
        speech = torchaudio.transforms.Resample(orig_freq=sr, new_freq=target_sr)(speech)
    return speech


def head_prompt_features(inputs, path: str):
    """The features git HEAD's ``CosyVoiceFrontEnd`` computes from a prompt *file*
    (cosyvoice/cli/frontend.py at HEAD): ``_extract_speech_feat`` = cosyvoice2.yaml feat_extractor
    (matcha mel, fmax 8000) of ``load_wav(path, 24000)``; ``_extract_speech_token`` input =
    ``whisper.log_mel_spectrogram(load_wav(path, 16000), n_mels=128)``; ``_extract_spk_embedding``
    input = kaldi fbank of ``load_wav(path, 16000)`` minus its mean. Each load resamples from the
    file's own rate. Returns ``mel`` (F, 80), ``whisper`` (F', 128), ``fbank`` (T, 80), ``wav16``, ``wav24``."""
    import torchaudio.compliance.kaldi as kaldi
    import whisper
    from matcha.utils.audio import mel_spectrogram

    speech16, speech24 = load_wav_head(path, 16000), load_wav_head(path, 24000)
    mel = mel_spectrogram(speech24, n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920,
                          fmin=0, fmax=8000, center=False)
    wmel = whisper.log_mel_spectrogram(speech16, n_mels=128)
    fb = kaldi.fbank(speech16, num_mel_bins=80, dither=0, sample_frequency=16000)
    return {"mel": to_np(mel[0].T), "whisper": to_np(wmel[0].T), "fbank": to_np(fb - fb.mean(dim=0, keepdim=True)),
            "wav16": to_np(speech16[0]), "wav24": to_np(speech24[0])}


def resample(inputs, orig_sr: int, new_sr: int):
    import torchaudio

    return {"y": to_np(torchaudio.transforms.Resample(orig_freq=orig_sr, new_freq=new_sr)(to_torch(inputs["x"])))}


def flow_mel(inputs):
    """cosyvoice2.yaml feat_extractor (matcha mel_spectrogram, fmax 8000): [1, W] -> [1, 80, F]."""
    from matcha.utils.audio import mel_spectrogram

    wav = to_torch(inputs["wav"]).float()
    if wav.ndim == 1:
        wav = wav[None]
    return {"mel": to_np(mel_spectrogram(wav, n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480,
                                         win_size=1920, fmin=0, fmax=8000, center=False))}


def whisper_mel(inputs, n_mels: int = 128):
    from s3tokenizer.utils import log_mel_spectrogram

    return {"mel": to_np(log_mel_spectrogram(to_torch(inputs["wav"]).float(), n_mels=n_mels))}


def kaldi_fbank(inputs):
    """CosyVoiceFrontEnd._extract_spk_embedding features."""
    import torchaudio.compliance.kaldi as kaldi

    wav = to_torch(inputs["wav"]).float()
    if wav.ndim == 1:
        wav = wav[None]
    feat = kaldi.fbank(wav, num_mel_bins=80, dither=0, sample_frequency=16000)
    return {"feat": to_np(feat - feat.mean(dim=0, keepdim=True))}


# --------------------------------------------------------------------------- text
def _qwen(token_dir: str, skip_special_tokens: bool = True):
    from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer

    return get_qwen_tokenizer(token_path=token_dir, skip_special_tokens=skip_special_tokens)


def qwen_encode(inputs, token_dir: str, texts: list):
    tok = _qwen(token_dir)
    ids = [tok.encode(t) for t in texts]
    lens = np.array([len(i) for i in ids])
    flat = np.array([x for i in ids for x in i], dtype=np.int64)
    dec = [tok.decode(i) for i in ids]
    dec_sp = [_qwen(token_dir, False).decode(i) for i in ids]
    return {"ids": flat, "lens": lens, "decoded": np.array(dec), "decoded_special": np.array(dec_sp)}


def text_normalize(inputs, token_dir: str, texts: list):
    """CosyVoiceFrontEnd.text_normalize (CosyVoice2, text_frontend=True) with the optional
    wetext/ttsfrd normalizer disabled: exactly the official rule chain from frontend_utils."""
    from functools import partial

    import inflect
    from cosyvoice.utils.frontend_utils import (contains_chinese, is_only_punctuation, remove_bracket,
                                                replace_blank, replace_corner_mark, spell_out_number,
                                                split_paragraph)

    tok = _qwen(token_dir)
    parser = inflect.engine()
    out, lens = [], []
    for text in texts:
        text = text.strip()
        if contains_chinese(text):
            text = text.replace("\n", "")
            text = replace_blank(text)
            text = replace_corner_mark(text)
            text = text.replace(".", "。")
            text = text.replace(" - ", "，")
            text = remove_bracket(text)
            text = re.sub(r'[，,、]+$', '。', text)
            pieces = list(split_paragraph(text, partial(tok.encode, allowed_special="all"), "zh",
                                          token_max_n=80, token_min_n=60, merge_len=20, comma_split=False))
        else:
            text = spell_out_number(text, parser)
            pieces = list(split_paragraph(text, partial(tok.encode, allowed_special="all"), "en",
                                          token_max_n=80, token_min_n=60, merge_len=20, comma_split=False))
        pieces = [p for p in pieces if not is_only_punctuation(p)]
        out.extend(pieces)
        lens.append(len(pieces))
    return {"pieces": np.array(out, dtype=object).astype(str) if out else np.zeros((0,), dtype="<U1"),
            "counts": np.array(lens)}
