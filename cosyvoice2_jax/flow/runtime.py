"""The flow at inference: token-bucketed offline calls (one row or a batch) and the streamer."""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import sharding
from ..config import FlowConfig
from . import modeling as flow_model
from .sampling import SamplerConfig


@dataclasses.dataclass
class FlowPrompt:
    """Flow conditioning of one utterance: prompt tokens (S0,), prompt mel (F0, mel bins), x-vector."""

    token: np.ndarray
    feat: np.ndarray
    embedding: np.ndarray


class MelGenerator:
    """Speech tokens + :class:`FlowPrompt` -> mel frames, with bucketed shapes.

    ``mel`` runs one utterance (the official ``flow.inference``), ``mel_batch`` many at once
    (non-streaming, per-row lengths; with a ``mesh`` the rows split over its batch axes and the
    params are replicated), ``streamer()`` the cached streaming state machine
    (:class:`~cosyvoice2_jax.flow.streaming.FlowStreamer`, built on first use). All three integrate
    the flow ODE with ``sampler`` (a :class:`~cosyvoice2_jax.flow.sampling.SamplerConfig`; default
    ``cfg.inference_sampler``, the config's, official unless the config's ``flow.sampler`` says otherwise).

    ``token_bucket``: ``None`` pads the packed prompt + tokens to a geometric bucket (under 6.25%
    padding, :func:`cosyvoice2_jax.flow.modeling.packed_length`), an int to a multiple of it.
    Streaming caches: ``initial_stream_frames`` (``"request"``: sized to the prompt, doubling on
    demand; or a frame count), ``stream_cache_dtype`` and ``stream_memory_budget`` (bytes per stream,
    recompute fallback past it) as :class:`~cosyvoice2_jax.flow.streaming.FlowStreamer`.
    """

    def __init__(self, cfg: FlowConfig, params, *, token_bucket: int | None = None, max_stream_frames: int = 6000,
                 initial_stream_frames: int | str = "request", stream_cache_dtype=None,
                 stream_memory_budget: int | None = None, mesh=None, sampler: SamplerConfig | None = None):
        self.cfg, self.mesh, self.token_bucket = cfg, mesh, token_bucket
        self.sampler = flow_model.resolve_sampler(cfg, sampler)
        self.params = sharding.place_replicated(params, mesh)
        self.max_stream_frames, self.initial_stream_frames = max_stream_frames, initial_stream_frames
        self.stream_cache_dtype, self.stream_memory_budget = stream_cache_dtype, stream_memory_budget
        self._streamer = None

    def set_sampler(self, sampler: SamplerConfig | None) -> None:
        """Use ``sampler`` from now on (None: the config's); the streamer is rebuilt on next use."""
        self.sampler = flow_model.resolve_sampler(self.cfg, sampler)
        self._streamer = None

    def mel(self, tokens: np.ndarray, prompt: FlowPrompt, *, streaming: bool, finalize: bool) -> np.ndarray:
        """Official ``flow.inference`` for one utterance: mel frames after the prompt, (F, mel bins)."""
        mels, _ = flow_model.inference_batch(
            self.params, self.cfg, np.asarray(tokens, np.int32)[None], [len(tokens)],
            prompt.token[None], [len(prompt.token)], prompt.feat[None], [prompt.feat.shape[0]],
            prompt.embedding[None], streaming=streaming, finalize=finalize, token_bucket=self.token_bucket,
            sampler=self.sampler)
        return mels[0]

    def mel_batch(self, tokens: list[np.ndarray], prompts: list[FlowPrompt]) -> list[np.ndarray]:
        """Non-streaming flow for many utterances at once (per-row lengths, bucketed)."""
        n = len(tokens)
        b = sharding.pad_rows(n, self.mesh)
        tokens, prompts = list(tokens) + [tokens[0]] * (b - n), list(prompts) + [prompts[0]] * (b - n)
        s1 = max(1, max(len(t) for t in tokens))
        s0 = max(1, max(len(p.token) for p in prompts))
        f0 = max(1, max(p.feat.shape[0] for p in prompts))
        tok = np.zeros((b, s1), np.int32)
        ptok = np.zeros((b, s0), np.int32)
        pfeat = np.zeros((b, f0, self.cfg.output_size), np.float32)
        for i, (t, p) in enumerate(zip(tokens, prompts)):
            tok[i, : len(t)] = t
            ptok[i, : len(p.token)] = p.token
            pfeat[i, : p.feat.shape[0]] = p.feat
        mels, _ = flow_model.inference_batch(
            self.params, self.cfg, tok, [len(t) for t in tokens], ptok, [len(p.token) for p in prompts],
            pfeat, [p.feat.shape[0] for p in prompts], np.stack([p.embedding for p in prompts]),
            streaming=False, finalize=True, token_bucket=self.token_bucket, sampler=self.sampler,
            place=None if self.mesh is None else (lambda a: sharding.place_rows(a, self.mesh)))
        return mels[:n]

    def streamer(self):
        if self._streamer is None:
            from .streaming import FlowStreamer

            # caches start at initial_stream_frames and double on demand (4.6 MB per frame at full size, fp32)
            self._streamer = FlowStreamer(self.params, self.cfg, max_frames=self.max_stream_frames,
                                          initial_frames=self.initial_stream_frames, sampler=self.sampler,
                                          cache_dtype=self.stream_cache_dtype,
                                          memory_budget_bytes=self.stream_memory_budget)
        return self._streamer
