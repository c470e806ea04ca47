"""Encoding synthesised audio for HTTP responses (soundfile / libsndfile)."""
from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

# response_format -> (soundfile format, subtype, media type)
FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "pcm": (None, None, "audio/pcm"),            # raw 16-bit little-endian mono at the model rate
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
}


def available_formats() -> list[str]:
    """The formats this libsndfile can write (mp3 needs libsndfile >= 1.1, opus >= 1.0.29)."""
    out = []
    for name, (fmt, sub, _) in FORMATS.items():
        if fmt is None or (fmt in sf.available_formats() and sub in sf.available_subtypes(fmt)):
            out.append(name)
    return out


def pcm16(audio: np.ndarray) -> bytes:
    """Raw 16-bit little-endian samples, converted by libsndfile as in the wav/flac files."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, np.float32).reshape(-1), -1.0, 1.0), 24000, format="RAW",
             subtype="PCM_16", endian="LITTLE")
    return buf.getvalue()


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole file of ``fmt`` from float audio in [-1, 1]."""
    if fmt == "pcm":
        return pcm16(audio)
    sf_fmt, sub, _ = FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, np.float32).reshape(-1), -1.0, 1.0), sample_rate, format=sf_fmt,
             subtype=sub)
    return buf.getvalue()


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header with unknown length (sizes 0xFFFFFFFF), for chunked responses."""
    byte_rate = sample_rate * 2
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
                                                                                  byte_rate, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))
