"""Speech tokens -> 24 kHz waveform: the flow, the HiFT vocoder and the official streaming runtime.

The official runtime (``CosyVoice2Model.token2wav`` / ``tts`` in ``cosyvoice/cli/model.py``):

* non-streaming: one flow call over all tokens (full attention), optional speed change by linear
  interpolation of the mel along time, one HiFT call;
* streaming: chunks of ``hop`` tokens plus ``pre_lookahead_len`` look-ahead tokens; the first hop
  is padded so that prompt tokens + first hop is a multiple of the hop; the hop grows by
  ``stream_scale_factor`` up to ``token_max_hop_len`` (HEAD; the 2025 pip snapshot keeps 25). Each
  chunk's mel is vocoded together with the last ``mel_cache_len`` mel frames of the previous chunk;
  the previous source tail is forced into the new source (``cache_source``); the last
  ``source_cache_len`` (= ``mel_cache_len`` frames) samples are held back and cross-faded (Hamming window) into the next chunk.
  The final chunk runs the flow *without* chunk masks (the official passes no ``streaming`` flag
  there) over all tokens and keeps the frames after the offset.

:class:`Token2Wav` does the same. The official re-runs the flow from token 0 for every chunk; here
the intermediate chunks go through :class:`cosyvoice2_jax.flow.streaming.FlowStreamer` (cached
state, constant cost per chunk, equal output) unless ``flow_cache=False``. The components' runtime
wrappers live in their folders: :class:`cosyvoice2_jax.flow.runtime.MelGenerator` and
:class:`cosyvoice2_jax.hift.runtime.Vocoder`.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, Optional

import jax
import numpy as np

from ..config import ModelConfig, StreamingConfig
from ..errors import ConfigError
from ..flow.runtime import FlowPrompt, MelGenerator
from ..flow.sampling import SamplerConfig
from ..hift.runtime import NoiseFn, Vocoder


def hamming(n: int) -> np.ndarray:
    """Symmetric Hamming window (``numpy.hamming``), as the official fade window."""
    return np.hamming(n)


def fade_in_out(new: np.ndarray, prev_tail: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Cross-fade the first ``len(window)//2`` samples of ``new`` with ``prev_tail`` (its last as many):
    ``new[:h] * w[:h] + prev_tail[-h:] * w[h:]`` (official ``fade_in_out``)."""
    h = window.shape[0] // 2
    out = np.array(new, copy=True)
    out[..., :h] = out[..., :h] * window[:h] + prev_tail[..., -h:] * window[h:]
    return out


def interpolate_linear(mel_ft: np.ndarray, size: int) -> np.ndarray:
    """``F.interpolate(mel (1, C, F), size, mode='linear', align_corners=False)`` along time, channel-last."""
    f = mel_ft.shape[0]
    if size <= 0:
        raise ConfigError(f"speed change leaves {size} mel frames; use a speed closer to 1")
    scale = f / size
    src = np.maximum((np.arange(size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), f - 1)
    i1 = np.minimum(i0 + 1, f - 1)
    w = (src - i0)[:, None]
    return (mel_ft[i0] * (1.0 - w) + mel_ft[i1] * w).astype(np.float32)


def hop_schedule(prompt_len: int, s: StreamingConfig) -> Iterator[int]:
    """Token hops of the streaming runtime: first ``hop + pad`` (pad aligns prompt + hop to the
    hop), then the hop times ``stream_scale_factor`` per chunk, capped at ``token_max_hop_len``."""
    hop = s.token_hop_len
    pad = -(-prompt_len // hop) * hop - prompt_len
    yield hop + pad
    while True:
        hop = min(s.token_max_hop_len, hop * s.stream_scale_factor)
        yield hop


class Token2Wav:
    """Flow + vocoder for one model; stateless apart from jit caches (safe to share between requests).

    ``sampler``: the flow's :class:`~cosyvoice2_jax.flow.sampling.SamplerConfig` (default: the
    config's ``flow.sampler``, else the official sampler of ``flow.cfm``)."""

    def __init__(self, cfg: ModelConfig, flow_params, hift_params, *, flow_cache: bool = True,
                 streaming: StreamingConfig | None = None, noise_fn: Optional[NoiseFn] = None,
                 token_bucket: int | None = None, max_stream_frames: int = 6000,
                 initial_stream_frames: int | str = "request", mesh=None, sampler: SamplerConfig | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.stream_cfg = s = streaming or cfg.streaming
        budget = None if s.flow_cache_budget_mb is None else int(s.flow_cache_budget_mb * 2**20)
        # one flow sampler for every path (whole utterance, batch, cached and recomputed chunks, last chunk)
        self.flow = MelGenerator(cfg.flow, flow_params, token_bucket=token_bucket, mesh=mesh,
                                 max_stream_frames=max_stream_frames, initial_stream_frames=initial_stream_frames,
                                 stream_cache_dtype=s.flow_cache_dtype, stream_memory_budget=budget, sampler=sampler)
        self.vocoder = Vocoder(cfg.hift, hift_params, noise_fn=noise_fn, mesh=mesh)
        self.flow_cache = flow_cache

    # -------------------------------------------------------------------------------- whole utterance
    def full(self, tokens: np.ndarray, prompt: FlowPrompt, key, speed: float = 1.0) -> np.ndarray:
        """Non-streaming: flow over all tokens, speed change, one HiFT call -> (samples,)."""
        mel = self.flow.mel(tokens, prompt, streaming=False, finalize=True)
        if speed != 1.0:
            mel = interpolate_linear(mel, int(mel.shape[0] / speed))
        audio, _ = self.vocoder([mel], [key])
        return audio[0]

    def full_batch(self, tokens: list[np.ndarray], prompts: list[FlowPrompt], keys: list, speeds: list[float],
                   times: Optional[dict] = None) -> list[np.ndarray]:
        """Non-streaming, many utterances at once; ``times`` (a dict) gets the seconds of the flow
        and of HiFT added under ``"flow"`` / ``"hift"`` (the server's per-stage metrics)."""
        t0 = time.perf_counter()
        mels = self.flow.mel_batch(tokens, prompts)
        t1 = time.perf_counter()
        mels = [interpolate_linear(m, int(m.shape[0] / s)) if s != 1.0 else m for m, s in zip(mels, speeds)]
        audio, _ = self.vocoder(mels, keys)
        if times is not None:
            times["flow"] = times.get("flow", 0.0) + t1 - t0
            times["hift"] = times.get("hift", 0.0) + time.perf_counter() - t1
        return audio

    # -------------------------------------------------------------------------------- streaming
    def stream(self, token_source: Iterable[list[int]], prompt: FlowPrompt, key, *,
               on_chunk: Optional[Callable[[dict], None]] = None) -> Iterator[np.ndarray]:
        """Streaming token2wav: consumes new-token lists as the LM yields them, yields audio chunks.

        The chunk schedule, HiFT caches and fade are the official ones (module docstring).
        ``on_chunk`` receives per-chunk facts (tokens, hop, frames) for benchmarks and tests.
        """
        s, L = self.stream_cfg, self.cfg.flow.pre_lookahead_len
        hops = hop_schedule(len(prompt.token), s)
        hop = next(hops)
        tokens: list[int] = []
        offset = 0
        src_cache = self.cfg.source_cache_len
        window = hamming(2 * src_cache)
        hift_cache: Optional[dict] = None
        keys = iter(jax.random.split(key, 1 << 12))
        use_cache = self.flow_cache
        state = self.flow.streamer().start(prompt.token, prompt.feat, prompt.embedding) if use_cache else None
        fed = 0  # tokens given to the cached streamer so far

        def vocode(mel: np.ndarray, finalize: bool) -> np.ndarray:
            nonlocal hift_cache
            cache_src = None
            if hift_cache is not None:
                mel = np.concatenate([hift_cache["mel"], mel])
                cache_src = hift_cache["source"][None]
            audio, source = self.vocoder([mel], [next(keys)], cache_src)
            audio, source = audio[0], source[0]
            if hift_cache is not None:
                audio = fade_in_out(audio, hift_cache["speech"], window)
            if finalize:
                return audio
            hift_cache = {"mel": mel[-s.mel_cache_len:], "source": source[-src_cache:],
                          "speech": audio[-src_cache:]}
            return audio[: -src_cache]

        for new in token_source:
            tokens.extend(int(t) for t in new)
            while len(tokens) - offset >= hop + L:
                end = offset + hop + L
                if use_cache:
                    state, mel = self.flow.streamer().push(state, np.asarray(tokens[fed:end], np.int32), finalize=False)
                    fed = end
                else:
                    mel = self.flow.mel(np.asarray(tokens[:end]), prompt, streaming=True, finalize=False)[self.cfg.flow.token_mel_ratio * offset:]
                if on_chunk:
                    on_chunk({"tokens": end, "hop": hop, "frames": mel.shape[0]})
                yield vocode(mel, finalize=False)
                offset += hop
                hop = next(hops)
        if use_cache:  # free the flow caches before the final (offline) flow call
            self.flow.streamer().close(state)
        state = None
        if not tokens:
            raise ConfigError("streaming token2wav: the token source produced no speech tokens")
        # final chunk: the official runs the flow without chunk masks over everything
        mel = self.flow.mel(np.asarray(tokens), prompt, streaming=False, finalize=True)[self.cfg.flow.token_mel_ratio * offset:]
        if on_chunk:
            on_chunk({"tokens": len(tokens), "hop": len(tokens) - offset, "frames": mel.shape[0], "final": True})
        yield vocode(mel, finalize=True)
