"""Audio front end: loading, resampling and the three feature extractors CosyVoice 2 uses.

=====================  =======================================  ==========================
function               what it feeds                            official reference
=====================  =======================================  ==========================
``load_wav``           everything (mono float32 at a target sr)  ``file_utils.load_wav``
``resample``           16 kHz <-> 24 kHz and any other rates     ``torchaudio Resample``
``mel_24k``            flow prompt feature (80 x 50 Hz)          ``matcha mel_spectrogram``
``whisper_log_mel``    S3Tokenizer v2 input (128 x 100 Hz)       ``whisper.log_mel_spectrogram``
``kaldi_fbank``        CAM++ input (80 x 100 Hz, mean-normed)    ``torchaudio kaldi.fbank``
=====================  =======================================  ==========================

All features are returned channel-last, ``(frames, bins)`` for one utterance (or
``(B, frames, bins)`` with ``*_batch`` helpers that also return lengths). They are computed in
numpy float64 and returned as float32: they run outside jit (front end, data workers) and the
float64 path is closer to the exact value than the official float32 torch code.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AudioError

__all__ = ["load_wav", "resample", "mel_24k", "whisper_log_mel", "kaldi_fbank", "mel_24k_batch",
           "whisper_log_mel_batch", "kaldi_fbank_batch", "pad_batch"]


# ----------------------------------------------------------------------------------- validation
def _check_wave(wav, what: str = "audio") -> np.ndarray:
    """Return a finite, non-empty, non-silent mono float array (any float/int dtype accepted)."""
    a = np.asarray(wav)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise AudioError(f"{what} must be a numeric array of samples, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.integer):  # PCM integers -> [-1, 1)
        a = a.astype(np.float64) / float(2 ** (8 * a.dtype.itemsize - 1))
    if a.ndim != 1:
        raise AudioError(f"{what} must be one mono waveform of shape (samples,), got shape {a.shape}; "
                         "use load_wav() to mix channels down")
    if a.size == 0:
        raise AudioError(f"{what} is empty (0 samples)")
    if not np.all(np.isfinite(a)):
        n = int(np.sum(~np.isfinite(a)))
        raise AudioError(f"{what} contains {n} non-finite sample(s) (NaN/Inf); fix or re-export the audio")
    if not np.any(a):
        raise AudioError(f"{what} is silent (all samples are zero); a prompt must contain speech")
    return a


def _check_sr(sr: int | None, expected: int, fn: str) -> None:
    if sr is not None and int(sr) != expected:
        raise AudioError(f"{fn} expects {expected} Hz audio but got sr={sr}; resample first, e.g. "
                         f"load_wav(path, {expected}) or resample(wav, {sr}, {expected})")


# ----------------------------------------------------------------------------------- loading
def load_wav(path_or_array, target_sr: int, *, sr: int | None = None) -> np.ndarray:
    """Load audio as mono float32 at ``target_sr``.

    Args:
      path_or_array: a file readable by libsndfile (wav, flac, ogg, ...) or an array of samples
        ``(samples,)`` or ``(channels, samples)``; integer PCM is scaled to [-1, 1).
      target_sr: wanted sample rate in Hz (16000 for the tokenizer/CAM++, 24000 for the flow).
      sr: the sample rate of an array input (required then; must not be given for a path).

    Channels are averaged (as the official loader). Resampling uses :func:`resample`
    (torchaudio-compatible windowed sinc), in both directions.

    Raises:
      AudioError: missing/unreadable file, empty, silent-only or non-finite audio, bad rates.
    """
    if not isinstance(target_sr, (int, np.integer)) or target_sr <= 0:
        raise AudioError(f"target_sr must be a positive integer (Hz), got {target_sr!r}")
    if isinstance(path_or_array, (str, Path)):
        if sr is not None:
            raise AudioError("sr= is only for array input; a file carries its own sample rate")
        path = Path(path_or_array)
        if not path.exists():
            raise AudioError(f"audio file not found: {path}")
        if path.is_dir():
            raise AudioError(f"{path} is a directory, not an audio file")
        import soundfile as sf

        try:
            data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile error text is useful; the traceback is not
            raise AudioError(f"cannot read {path} as audio ({e}); supported: wav, flac, ogg and other "
                             "libsndfile formats (convert mp3/m4a with ffmpeg first)") from None
        what = f"audio file {path}"
        if data.shape[0] == 0:
            raise AudioError(f"{what} is empty (0 samples)")
        wav = data.mean(axis=1)
    else:
        what = "audio array"
        if sr is None:
            raise AudioError("an audio array needs its sample rate: load_wav(array, target_sr, sr=...)")
        a = np.asarray(path_or_array)
        if a.ndim == 2:  # (channels, samples), or (samples, channels) when that is unambiguous
            if a.shape[0] > a.shape[1]:
                a = a.T
            if a.shape[0] > 16:
                raise AudioError(f"audio array of shape {a.shape} looks like neither (channels, samples) "
                                 "nor (samples, channels)")
            a = _check_wave(a.reshape(-1), what).reshape(a.shape).mean(axis=0)
        wav = a
    if not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise AudioError(f"sample rate must be a positive integer, got {sr!r}")
    wav = _check_wave(wav, what)
    if sr != target_sr:
        wav = resample(wav, int(sr), int(target_sr))
    return wav.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99):
    """Polyphase windowed-sinc (Hann) kernel as torchaudio's ``sinc_interp_hann``: (new, K)."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64) / orig
    t = (np.arange(0, -new, -1, dtype=np.float32).astype(np.float64)[:, None] / new + idx[None, :]) * base
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(t == 0, 1.0, np.sin(t) / t)
    k = (k * window * (base / orig)).astype(np.float32)
    return k, width


def resample(wav, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling (windowed sinc, Hann, 6 zero crossings, rolloff 0.99).

    Same result as ``torchaudio.transforms.Resample(orig_sr, new_sr)`` (what the official
    front end uses), so prompt features match the official ones. ``wav``: (samples,) or
    (..., samples); output length ``ceil(samples * new_sr / orig_sr)``.
    """
    for name, v in (("orig_sr", orig_sr), ("new_sr", new_sr)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise AudioError(f"{name} must be a positive integer (Hz), got {v!r}")
    x = np.asarray(wav, dtype=np.float32)
    if orig_sr == new_sr:
        return x.copy()
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[-1]
    xp = np.pad(x2, ((0, 0), (width, width + orig)))
    frames = np.lib.stride_tricks.sliding_window_view(xp, kernel.shape[1], axis=-1)[:, ::orig]
    # float64 accumulation: torch sums the up-to-~500 taps in float32 (differences ~5e-6)
    y = np.einsum("bfk,pk->bfp", frames, kernel.astype(np.float64), optimize=True).reshape(x2.shape[0], -1)
    target = math.ceil(new * n / orig)
    return y[:, :target].reshape(lead + (-1,)).astype(np.float32)


# ----------------------------------------------------------------------------------- features
def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    n = 1 + (x.shape[-1] - size) // hop
    return np.lib.stride_tricks.sliding_window_view(x, size, axis=-1)[..., : (n - 1) * hop + 1: hop, :]


def _hann(n: int, periodic: bool = True) -> np.ndarray:
    m = n if periodic else n - 1
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / m)


MEL_FILTERS = Path(__file__).resolve().parent.parent / "data" / "mel_filters.npz"


@functools.lru_cache(maxsize=8)
def _librosa_mel(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """``librosa.filters.mel`` (slaney) as float64. The banks synthesis uses (flow prompt mel, S3Tokenizer
    mel) ship in ``data/mel_filters.npz`` (librosa's values, checked in tests/test_frontend_audio.py):
    importing librosa costs ~1.6 s of CPU at start-up."""
    name = f"{sr}_{n_fft}_{n_mels}_{float(fmin)}_{None if fmax is None else float(fmax)}"
    with np.load(MEL_FILTERS) as shipped:
        if name in shipped.files:
            return shipped[name]
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float64)


def mel_24k(wav, *, sr: int | None = None, n_fft: int = 1920, hop: int = 480, win: int = 1920,
            n_mels: int = 80, fmin: float = 0.0, fmax: float | None = 8000.0) -> np.ndarray:
    """The flow's prompt feature: log mel of 24 kHz audio, (frames, 80), 50 frames/s.

    As the official ``mel_spectrogram`` (matcha) with the cosyvoice2.yaml values: reflect pad
    (n_fft - hop)/2 = 720 on both sides, STFT without centering (periodic Hann 1920, hop 480),
    magnitude ``sqrt(re^2 + im^2 + 1e-9)``, slaney mel (fmax 8000), ``log(max(x, 1e-5))``.
    ``frames = samples // 480``. Pass ``fmax=None`` for the GAN-loss mel.
    """
    _check_sr(sr, 24000, "mel_24k")
    x = _check_wave(wav, "mel_24k input")
    pad = (n_fft - hop) // 2
    if x.shape[0] <= pad:
        raise AudioError(f"mel_24k input is too short ({x.shape[0]} samples); need more than {pad} "
                         f"samples ({pad / 24000 * 1000:.0f} ms) at 24 kHz")
    x = np.pad(x.astype(np.float64), (pad, pad), mode="reflect")
    window = np.zeros(n_fft)
    off = (n_fft - win) // 2
    window[off: off + win] = _hann(win)
    spec = np.fft.rfft(_frames(x, n_fft, hop) * window, n=n_fft, axis=-1)
    mag = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = mag @ _librosa_mel(24000, n_fft, n_mels, fmin, fmax).T
    return np.log(np.maximum(mel, 1e-5)).astype(np.float32)


def whisper_log_mel(wav_16k, n_mels: int = 128, *, sr: int | None = None) -> np.ndarray:
    """S3Tokenizer v2 input: Whisper log-mel of 16 kHz audio, (frames, n_mels), 100 frames/s.

    Official quirks kept: centered STFT (reflect pad 200, periodic Hann 400, hop 160) whose
    **last frame is dropped** (``frames = samples // 160``), power spectrum, slaney mel,
    ``log10(max(x, 1e-10))``, floor at ``max - 8`` (max over this utterance), ``(x + 4) / 4``.
    """
    _check_sr(sr, 16000, "whisper_log_mel")
    x = _check_wave(wav_16k, "whisper_log_mel input")
    if x.shape[0] <= 200:
        raise AudioError(f"whisper_log_mel input is too short ({x.shape[0]} samples); need more than 200 "
                         "samples (12.5 ms) at 16 kHz")
    x = np.pad(x.astype(np.float64), (200, 200), mode="reflect")
    spec = np.fft.rfft(_frames(x, 400, 160) * _hann(400), axis=-1)[:-1]
    power = spec.real ** 2 + spec.imag ** 2
    mel = power @ _librosa_mel(16000, 400, n_mels, 0.0, None).T
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


def _kaldi_mel_scale(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=4)
def _kaldi_mel_banks(num_bins: int, n_fft: int, sample_freq: float, low_freq: float, high_freq: float):
    nyquist = 0.5 * sample_freq
    if high_freq <= 0:
        high_freq += nyquist
    fft_bin_width = sample_freq / n_fft
    mel_low, mel_high = _kaldi_mel_scale(low_freq), _kaldi_mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _kaldi_mel_scale(fft_bin_width * np.arange(n_fft // 2))[None, :]
    banks = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    banks = banks.astype(np.float32).astype(np.float64)  # torchaudio builds them in float32
    return np.pad(banks, ((0, 0), (0, 1)))  # zero weight for the Nyquist bin


def kaldi_fbank(wav_16k, *, sr: int | None = None, num_mel_bins: int = 80) -> np.ndarray:
    """CAM++ input: Kaldi log fbank of 16 kHz audio minus its time mean, (frames, 80).

    As ``torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80, dither=0,
    sample_frequency=16000)`` with the other defaults (25 ms / 10 ms frames with snip_edges,
    per-frame DC removal, pre-emphasis 0.97, Povey window, 512-point FFT, power spectrum,
    triangular mel banks 20 Hz .. Nyquist, ``log(max(x, float32 eps))``), then the official
    front end's ``feat - feat.mean(0)``. Samples are in [-1, 1] (not scaled by 32768).
    """
    _check_sr(sr, 16000, "kaldi_fbank")
    x = _check_wave(wav_16k, "kaldi_fbank input").astype(np.float64)
    if x.shape[0] < 400:
        raise AudioError(f"kaldi_fbank input is too short ({x.shape[0]} samples); need at least 400 "
                         "samples (25 ms) at 16 kHz")
    fr = _frames(x, 400, 160)
    fr = fr - fr.mean(axis=-1, keepdims=True)
    prev = np.concatenate([fr[:, :1], fr[:, :-1]], axis=-1)
    fr = fr - 0.97 * prev
    fr = fr * _hann(400, periodic=False) ** 0.85
    spec = np.fft.rfft(fr, n=512, axis=-1)
    power = spec.real ** 2 + spec.imag ** 2
    mel = power @ _kaldi_mel_banks(num_mel_bins, 512, 16000.0, 20.0, 0.0).T
    feat = np.log(np.maximum(mel, np.finfo(np.float32).eps))
    return (feat - feat.mean(axis=0, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------- batching
def pad_batch(feats: Sequence[np.ndarray], multiple: int = 1, value: float = 0.0):
    """Stack (T_i, C) arrays into (B, T_max, C) padded with ``value``; T_max rounded up to
    ``multiple`` (bucketing); returns ``(batch, lengths)``."""
    if len(feats) == 0:
        raise AudioError("pad_batch needs at least one feature array")
    lens = np.array([f.shape[0] for f in feats], dtype=np.int32)
    tmax = int(lens.max())
    tmax = -(-tmax // multiple) * multiple
    out = np.full((len(feats), tmax) + feats[0].shape[1:], value, dtype=feats[0].dtype)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, lens


def mel_24k_batch(wavs: Sequence, multiple: int = 1):
    """``mel_24k`` of each waveform, padded: ``((B, F_max, 80), lengths)``."""
    return pad_batch([mel_24k(w) for w in wavs], multiple)


def whisper_log_mel_batch(wavs: Sequence, n_mels: int = 128, multiple: int = 1):
    """``whisper_log_mel`` per utterance (its max-8 floor is per utterance), padded with 0."""
    return pad_batch([whisper_log_mel(w, n_mels) for w in wavs], multiple)


def kaldi_fbank_batch(wavs: Sequence, multiple: int = 1):
    """``kaldi_fbank`` per utterance (mean over its own frames), padded with 0."""
    return pad_batch([kaldi_fbank(w) for w in wavs], multiple)
