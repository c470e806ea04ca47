"""The pipeline's front end: prompt audio -> flow/LM conditioning (official ``CosyVoiceFrontEnd``).

From one prompt utterance: speech tokens (S3Tokenizer v2 on the Whisper log-mel of the 16 kHz
waveform), the flow's prompt mel (of the 24 kHz waveform) and the CAM++ x-vector (mean-normalised
Kaldi fbank of the 16 kHz waveform). With a 24 kHz flow the official trims both to
``n = min(frames // 2, tokens)``: ``2n`` mel frames and ``n`` tokens, so that the prompt mel and
prompt tokens line up (zero_shot / cross_lingual / instruct2; not vc).

Where the 16 kHz and 24 kHz waveforms come from depends on how the prompt is given
(:func:`prompt_audio`):

==============================  ===============================================================
prompt given as                 16 kHz (tokens, CAM++) / 24 kHz (flow prompt mel)
==============================  ===============================================================
a file path (any rate >= 16k)   both resampled **from the file's own rate** (official git HEAD,
                                ``file_utils.load_wav(prompt_wav, 16000 / 24000)``)
``(array, sample_rate)``        the same, from the array's rate
a bare array (old convention)   taken as 16 kHz; 24 kHz = resample 16 -> 24 kHz (the official
                                2025 API that took ``prompt_speech_16k``)
:class:`PromptAudio`            used as is (already loaded and checked)
==============================  ===============================================================

For a 16 kHz file all routes agree. For other rates the routes differ in the top mel bins of the
prompt mel (a 24 kHz file keeps its 8-12 kHz band only on the direct route).

Prompt length: longer than :data:`MAX_PROMPT_S` (30 s) is refused as the official does (the
speech tokenizer's single window; the LM prompt would crowd out the text), longer than
:data:`WARN_PROMPT_S` (15 s) warns (quality falls with long prompts; 3-10 s works best). Sample
rates below 16 kHz are refused as the official does (the tokenizer needs the 0-8 kHz band).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AudioError, InputWarning
from ..frontend.audio import kaldi_fbank, load_wav, mel_24k, resample, whisper_log_mel

EXAMPLE_PROMPT_WAV = Path(__file__).resolve().parent.parent / "data" / "prompt_en.wav"
MAX_PROMPT_S = 30.0
WARN_PROMPT_S = 15.0
MIN_PROMPT_S = 0.2
MIN_FILE_SR = 16000


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


@dataclasses.dataclass
class PromptAudio:
    """A prompt (or vc source) utterance at the two rates the models need.

    ``wav16``: (samples,) float32 at 16 kHz (tokens, CAM++); ``wav24``: at 24 kHz (flow prompt
    mel); ``source_sr``: the rate it was given at (``None`` for the bare-array convention);
    ``origin``: a path or ``"array"`` (for messages).
    """

    wav16: np.ndarray
    wav24: np.ndarray
    source_sr: int | None = None
    origin: str = "array"

    @property
    def seconds(self) -> float:
        return self.wav16.shape[0] / 16000


def example_prompt() -> tuple[Path, str]:
    """The prompt shipped with the package: ``(path, transcript)``; 3.2 s of English made with
    espeak-ng (22.05 kHz mono), free to redistribute. For trying the pipeline; real voices clone
    better from real speech."""
    return EXAMPLE_PROMPT_WAV, EXAMPLE_PROMPT_WAV.with_suffix(".txt").read_text(encoding="utf-8").strip()


def _bare_16k(wav: Any, what: str) -> np.ndarray:
    a = wav
    if hasattr(wav, "detach") and not isinstance(wav, np.ndarray):  # a torch tensor
        a = wav.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise AudioError(f"{what} audio as a bare array must be mono 16 kHz samples (samples,) or (1, samples), "
                         f"got shape {a.shape}; pass (array, sample_rate) or a file path for other formats")
    return load_wav(a, 16000, sr=16000)


def _file_sr(path: Path, what: str) -> int:
    if not path.exists():
        raise AudioError(f"{what} audio file not found: {path}")
    if path.is_dir():
        raise AudioError(f"{what} audio {path} is a directory, not an audio file")
    import soundfile as sf

    try:
        return int(sf.info(str(path)).samplerate)
    except Exception as e:
        raise AudioError(f"cannot read {path} as audio ({e}); supported: wav, flac, ogg and other "
                         "libsndfile formats (convert mp3/m4a with ffmpeg first)") from None


def _check_rate(sr: int, origin: str, what: str) -> None:
    if sr < MIN_FILE_SR:
        raise AudioError(f"{what} audio {origin} is sampled at {sr} Hz; the front end needs at least {MIN_FILE_SR} Hz "
                         "(as the official, which refuses lower rates: the speech tokenizer uses the 0-8 kHz band). "
                         "Use a recording at 16 kHz or more")


def prompt_audio(wav: Any, what: str = "prompt", *, check_length: bool = True) -> PromptAudio:
    """Load a prompt as the official git-HEAD front end does (see the module docstring).

    Args:
      wav: a path (``str``/``Path``), ``(array, sample_rate)``, a bare 16 kHz array (or torch
        tensor) ``(samples,)``/``(1, samples)``, or a :class:`PromptAudio`.
      what: ``"prompt"`` or ``"source"`` (messages; the length limits apply to prompts only).
      check_length: apply the 0.2 s minimum, the 15 s warning and the 30 s limit.

    Raises:
      AudioError: unreadable/empty/silent/non-finite audio, a rate below 16 kHz, a prompt longer
        than 30 s or shorter than 0.2 s.
    Warns:
      InputWarning: a prompt longer than 15 s.
    """
    if isinstance(wav, PromptAudio):
        return wav  # made by this function: already checked
    if isinstance(wav, (str, Path)):
        path = Path(wav)
        sr = _file_sr(path, what)
        _check_rate(sr, str(path), what)
        pa = PromptAudio(load_wav(path, 16000), load_wav(path, 24000), sr, str(path))
    elif isinstance(wav, tuple) and len(wav) == 2 and isinstance(wav[1], (int, np.integer)) \
            and not isinstance(wav[1], bool):
        arr, sr = wav
        if hasattr(arr, "detach"):
            arr = arr.detach().cpu().numpy()
        _check_rate(int(sr), f"array ({int(sr)} Hz)", what)
        pa = PromptAudio(load_wav(arr, 16000, sr=int(sr)), load_wav(arr, 24000, sr=int(sr)), int(sr), "array")
    else:
        w16 = _bare_16k(wav, what)
        pa = PromptAudio(w16, resample(w16, 16000, 24000), None, "array")
    if check_length and what == "prompt":
        check_prompt_length(pa.seconds, pa.origin)
    return pa


def check_prompt_length(seconds: float, origin: str = "prompt") -> None:
    """Refuse prompts over 30 s or under 0.2 s; warn past 15 s (see the module docstring)."""
    if seconds > MAX_PROMPT_S:
        raise AudioError(f"prompt audio {origin} is {seconds:.1f} s long; the limit is {MAX_PROMPT_S:.0f} s (as the "
                         "official: the speech tokenizer reads one 30 s window and a long prompt leaves the LM "
                         "little room). Cut a 3-10 s stretch of clean speech, e.g. "
                         "sox in.wav out.wav trim 0 10 (and give its transcript with zero_shot)")
    if seconds < MIN_PROMPT_S:
        raise AudioError(f"prompt audio {origin} is {seconds:.2f} s long; give at least {MIN_PROMPT_S} s "
                         "(3-10 s of clean speech works best)")
    if seconds > WARN_PROMPT_S:
        warnings.warn(f"prompt audio {origin} is {seconds:.1f} s long; prompts over {WARN_PROMPT_S:.0f} s tend to "
                      "lower quality (3-10 s of clean speech works best)", InputWarning, stacklevel=3)


def as_wav_16k(wav: Any, what: str = "prompt") -> np.ndarray:
    """The 16 kHz waveform of :func:`prompt_audio` (no length checks; e.g. a vc source)."""
    return prompt_audio(wav, what, check_length=False).wav16


def extract_prompt(audio: PromptAudio | np.ndarray, speech_tokenizer, speaker_encoder, *,
                   trim: bool = True) -> PromptFeatures:
    """Official ``frontend_zero_shot`` audio part (``trim``: the 24 kHz token/frame alignment).

    ``audio``: a :class:`PromptAudio` (any input :func:`prompt_audio` takes is accepted too)."""
    if not isinstance(audio, PromptAudio):
        audio = prompt_audio(audio)
    wav16 = audio.wav16
    if wav16.shape[0] < 16000 * MIN_PROMPT_S:
        raise AudioError(f"prompt audio is {wav16.shape[0] / 16000:.2f} s long; give at least {MIN_PROMPT_S} s "
                         "(3-10 s of clean speech works best)")
    tokens = speech_tokenizer.tokenize([whisper_log_mel(wav16, speech_tokenizer.config.n_mels)])[0]
    feat = mel_24k(audio.wav24, sr=24000)
    emb = speaker_encoder.embed([kaldi_fbank(wav16)])[0]
    tokens = np.asarray(tokens, np.int32)
    if trim:
        n = min(feat.shape[0] // 2, tokens.shape[0])
        tokens, feat = tokens[:n], feat[: 2 * n]
    return PromptFeatures(tokens, np.asarray(feat, np.float32), np.asarray(emb, np.float32))


def source_tokens(wav: Any, speech_tokenizer) -> np.ndarray:
    """Speech tokens of the source utterance (voice conversion); ``wav``: a 16 kHz array or any
    :func:`prompt_audio` input."""
    wav16 = as_wav_16k(wav, "source")
    return np.asarray(speech_tokenizer.tokenize([whisper_log_mel(wav16, speech_tokenizer.config.n_mels)])[0], np.int32)
