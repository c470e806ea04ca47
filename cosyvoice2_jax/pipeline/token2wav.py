"""Speech tokens -> 24 kHz waveform: the flow, the HiFT vocoder and the official streaming runtime.

The official runtime (``CosyVoice2Model.token2wav`` / ``tts`` in ``cosyvoice/cli/model.py``):

* non-streaming: one flow call over all tokens (full attention), optional speed change by linear
  interpolation of the mel along time, one HiFT call;
* streaming: chunks of ``hop`` tokens plus ``pre_lookahead_len`` look-ahead tokens; the first hop
  is padded so that prompt tokens + first hop is a multiple of the hop; the hop grows by
  ``stream_scale_factor`` up to ``token_max_hop_len`` (HEAD; the 2025 pip snapshot keeps 25). Each
  chunk's mel is vocoded together with the last ``mel_cache_len`` mel frames of the previous chunk;
  the previous source tail is forced into the new source (``cache_source``); the last
  ``source_cache_len`` samples are held back and cross-faded (Hamming window) into the next chunk.
  The final chunk runs the flow *without* chunk masks (the official passes no ``streaming`` flag
  there) over all tokens and keeps the frames after the offset.

:class:`Token2Wav` does the same. The official re-runs the flow from token 0 for every chunk; here
the intermediate chunks go through :class:`cosyvoice2_jax.flow.streaming.FlowStreamer` (cached
state, constant cost per chunk, equal output) unless ``flow_cache=False``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig, StreamingConfig
from ..errors import ConfigError
from ..flow import modeling as flow_model
from ..hift.modeling import make_inference_fn

NoiseFn = Callable[[int, int], np.ndarray]  # (batch, samples) -> (batch, samples, harmonics + 1)


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


def _replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P())


def _row_sharded(mesh, ndim: int):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def _pad_rows(n: int, mesh) -> int:
    if mesh is None:
        return n
    d = mesh.shape["data"]
    return -(-n // d) * d


@dataclasses.dataclass
class FlowPrompt:
    """Flow conditioning of one utterance: prompt tokens (S0,), prompt mel (F0, 80), x-vector (192,)."""

    token: np.ndarray
    feat: np.ndarray
    embedding: np.ndarray


class Vocoder:
    """HiFT with frame-bucketed shapes (one compile per bucket and cache size) and the noise source.

    Source noise is drawn per row in blocks of ``frame_bucket`` frames (block ``i`` from
    ``fold_in(key_row, i)``), so a row's audio does not depend on the batch it runs in or on its
    padding. ``noise_fn(batch, samples)`` overrides it (tests inject the official draws).
    """

    def __init__(self, cfg: ModelConfig, params, *, frame_bucket: int = 100, noise_fn: Optional[NoiseFn] = None,
                 mesh=None):
        self.cfg, self.frame_bucket, self.noise_fn, self.mesh = cfg.hift, frame_bucket, noise_fn, mesh
        self.params = jax.device_put(params, _replicated(mesh)) if mesh is not None else jax.device_put(params)
        self._run = make_inference_fn(cfg.hift)
        block = (frame_bucket * cfg.hift.hop_size, cfg.hift.nb_harmonics + 1)

        def draw(key, n_blocks: int):
            ks = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n_blocks))
            return jax.vmap(lambda k: jax.random.normal(k, block, jnp.float32))(ks).reshape(-1, block[1])

        self._draw = jax.jit(jax.vmap(draw, in_axes=(0, None)), static_argnums=1)

    def noise(self, keys, frames_padded: int) -> np.ndarray:
        if self.noise_fn is not None:
            return np.asarray(self.noise_fn(len(keys), frames_padded * self.cfg.hop_size), np.float32)
        return self._draw(jnp.stack(list(keys)), frames_padded // self.frame_bucket)

    def __call__(self, mels: list[np.ndarray], keys, cache_source: Optional[np.ndarray] = None
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``mels``: list of (F_b, 80), ``keys``: one PRNG key per row ->
        (audio list (F_b*hop,), source list (F_b*hop,))."""
        hop = self.cfg.hop_size
        n = len(mels)
        keys = list(keys)
        lens = np.array([m.shape[0] for m in mels], np.int32)
        if np.any(lens <= 0):
            raise ConfigError("vocoder: a mel has no frames")
        rows = _pad_rows(n, self.mesh)
        if rows > n:  # dummy rows (copies of row 0) so the batch splits evenly over the mesh
            mels, keys = list(mels) + [mels[0]] * (rows - n), keys + [keys[0]] * (rows - n)
            lens = np.concatenate([lens, np.repeat(lens[:1], rows - n)])
        fpad = -(-int(lens.max()) // self.frame_bucket) * self.frame_bucket
        x = np.zeros((rows, fpad, mels[0].shape[1]), np.float32)
        for b, m in enumerate(mels):
            x[b, : m.shape[0]] = m
        noise = self.noise(keys, fpad)
        if self.mesh is not None:
            x, lens_d, noise = (jax.device_put(a, _row_sharded(self.mesh, np.ndim(a))) for a in (x, lens, noise))
            audio, source = self._run(self.params, x, None, lens_d, cache_source, noise)
        else:
            audio, source = self._run(self.params, x, None, lens, cache_source, noise)
        audio, source = np.asarray(audio), np.asarray(source)
        return ([audio[b, : lens[b] * hop] for b in range(n)], [source[b, : lens[b] * hop] for b in range(n)])

    def compiled_programs(self) -> int:
        return self._run._cache_size()


class Token2Wav:
    """Flow + vocoder for one model; stateless apart from jit caches (safe to share between requests)."""

    def __init__(self, cfg: ModelConfig, flow_params, hift_params, *, flow_cache: bool = True,
                 streaming: StreamingConfig | None = None, noise_fn: Optional[NoiseFn] = None,
                 token_bucket: int = 50, max_stream_frames: int = 6000, initial_stream_frames: int = 600,
                 mesh=None):
        self.cfg, self.mesh = cfg, mesh
        self.flow_params = jax.device_put(flow_params, _replicated(mesh)) if mesh is not None else jax.device_put(flow_params)
        self.stream_cfg = streaming or cfg.streaming
        self.vocoder = Vocoder(cfg, hift_params, noise_fn=noise_fn, mesh=mesh)
        self.flow_cache, self.token_bucket = flow_cache, token_bucket
        self.max_stream_frames, self.initial_stream_frames = max_stream_frames, initial_stream_frames
        self._streamer = None

    # -------------------------------------------------------------------------------- flow
    def flow_mel(self, tokens: np.ndarray, prompt: FlowPrompt, *, streaming: bool, finalize: bool) -> np.ndarray:
        """Official ``flow.inference`` for one utterance: mel frames after the prompt, (F, 80)."""
        mels, _ = flow_model.inference_batch(
            self.flow_params, self.cfg.flow, np.asarray(tokens, np.int32)[None], [len(tokens)],
            prompt.token[None], [len(prompt.token)], prompt.feat[None], [prompt.feat.shape[0]],
            prompt.embedding[None], streaming=streaming, finalize=finalize, token_bucket=self.token_bucket)
        return mels[0]

    def flow_mel_batch(self, tokens: list[np.ndarray], prompts: list[FlowPrompt]) -> list[np.ndarray]:
        """Non-streaming flow for many utterances at once (per-row lengths, bucketed; with a mesh the
        rows are split over its ``data`` axis)."""
        n = len(tokens)
        b = _pad_rows(n, self.mesh)
        tokens, prompts = list(tokens) + [tokens[0]] * (b - n), list(prompts) + [prompts[0]] * (b - n)
        s1 = max(1, max(len(t) for t in tokens))
        s0 = max(1, max(len(p.token) for p in prompts))
        f0 = max(1, max(p.feat.shape[0] for p in prompts))
        tok = np.zeros((b, s1), np.int32)
        ptok = np.zeros((b, s0), np.int32)
        pfeat = np.zeros((b, f0, self.cfg.flow.output_size), np.float32)
        for i, (t, p) in enumerate(zip(tokens, prompts)):
            tok[i, : len(t)] = t
            ptok[i, : len(p.token)] = p.token
            pfeat[i, : p.feat.shape[0]] = p.feat
        mels, _ = flow_model.inference_batch(
            self.flow_params, self.cfg.flow, tok, [len(t) for t in tokens], ptok, [len(p.token) for p in prompts],
            pfeat, [p.feat.shape[0] for p in prompts], np.stack([p.embedding for p in prompts]),
            streaming=False, finalize=True, token_bucket=self.token_bucket,
            place=None if self.mesh is None else (lambda a: jax.device_put(a, _row_sharded(self.mesh, np.ndim(a)))))
        return mels[:n]

    def streamer(self):
        if self._streamer is None:
            from ..flow.streaming import FlowStreamer

            # caches start at initial_stream_frames and double on demand (4.6 MB per frame at full size)
            self._streamer = FlowStreamer(self.flow_params, self.cfg.flow, max_frames=self.max_stream_frames,
                                          initial_frames=self.initial_stream_frames)
        return self._streamer

    # -------------------------------------------------------------------------------- whole utterance
    def full(self, tokens: np.ndarray, prompt: FlowPrompt, key, speed: float = 1.0) -> np.ndarray:
        """Non-streaming: flow over all tokens, speed change, one HiFT call -> (samples,)."""
        mel = self.flow_mel(tokens, prompt, streaming=False, finalize=True)
        if speed != 1.0:
            mel = interpolate_linear(mel, int(mel.shape[0] / speed))
        audio, _ = self.vocoder([mel], [key])
        return audio[0]

    def full_batch(self, tokens: list[np.ndarray], prompts: list[FlowPrompt], keys: list, speeds: list[float]
                   ) -> list[np.ndarray]:
        mels = self.flow_mel_batch(tokens, prompts)
        mels = [interpolate_linear(m, int(m.shape[0] / s)) if s != 1.0 else m for m, s in zip(mels, speeds)]
        audio, _ = self.vocoder(mels, keys)
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
        window = hamming(2 * s.source_cache_len)
        hift_cache: Optional[dict] = None
        keys = iter(jax.random.split(key, 1 << 12))
        use_cache = self.flow_cache
        state = self.streamer().start(prompt.token, prompt.feat, prompt.embedding) if use_cache else None
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
            hift_cache = {"mel": mel[-s.mel_cache_len:], "source": source[-s.source_cache_len:],
                          "speech": audio[-s.source_cache_len:]}
            return audio[: -s.source_cache_len]

        for new in token_source:
            tokens.extend(int(t) for t in new)
            while len(tokens) - offset >= hop + L:
                end = offset + hop + L
                if use_cache:
                    state, mel = self.streamer().push(state, np.asarray(tokens[fed:end], np.int32), finalize=False)
                    fed = end
                else:
                    mel = self.flow_mel(np.asarray(tokens[:end]), prompt, streaming=True, finalize=False)[self.cfg.flow.token_mel_ratio * offset:]
                if on_chunk:
                    on_chunk({"tokens": end, "hop": hop, "frames": mel.shape[0]})
                yield vocode(mel, finalize=False)
                offset += hop
                hop = next(hops)
        if not tokens:
            raise ConfigError("streaming token2wav: the token source produced no speech tokens")
        # final chunk: the official runs the flow without chunk masks over everything
        mel = self.flow_mel(np.asarray(tokens), prompt, streaming=False, finalize=True)[self.cfg.flow.token_mel_ratio * offset:]
        if on_chunk:
            on_chunk({"tokens": len(tokens), "hop": len(tokens) - offset, "frames": mel.shape[0], "final": True})
        yield vocode(mel, finalize=True)
