"""Constant-cost streaming flow: cached chunks that equal the official recompute path.

The official streaming runtime (``cosyvoice/cli/model.py``, ``CosyVoice2Model.tts(stream=True)``)
re-runs ``flow.inference(token[:offset + hop + 3], prompt..., streaming=True, finalize=False)``
from token 0 for every chunk and keeps the frames after ``2 * offset``, so the k-th chunk pays
for the whole prefix. :class:`FlowStreamer` returns the same frames (float tolerance) at a
roughly constant cost per chunk by keeping per-layer state between pushes. It runs the real
modules (``encoder.py``, ``decoder.py`` through ``modeling.CausalMaskedDiffWithXvec``) with
their optional caches, and the same ODE loop as offline inference (``sampling.sample_arrays``): there is no
second copy of the network here, only the driver. See docs/architecture.md (streaming flow).

Why caching is exact (``streaming=True``, i.e. static-chunk attention masks):

* Every operation of the encoder and of the estimator is either per position (linear layers,
  norms, activations, the speaker/cond inputs, the noise row of each frame), a causal
  convolution (a fixed number of left frames), the pre-lookahead conv (reads 3 tokens ahead),
  or attention under the static-chunk mask with *all* left chunks visible (the official code
  passes ``num_left_chunks=-1`` to the encoder and never forwards ``num_decoding_left_chunks``
  to the estimator's mask): query ``i`` sees key ``j`` iff ``j < (i // c + 1) * c``
  (``c`` = 25 tokens, 50 frames after the upsample).
* The encoder's relative positions make its attention scores a function of ``i - j`` only,
  through a sinusoid table whose rows do not depend on the sequence length, so scores computed
  against a longer table are the same numbers.
* The ODE time grid and the fixed official noise (sliced from frame 0) do not depend on the
  length either, so every velocity evaluation of the solve sees the same inputs at a position.

Hence once a chunk is complete (all its tokens and their 3 look-ahead tokens are known), the
hidden states of its positions in every layer and every velocity evaluation never change when
tokens are appended. A push therefore recomputes only the window from the last completed chunk
boundary ``C`` ("committed") to the new end ``E`` of frame-producing tokens:

* each attention layer writes the window's keys/values into its cache at ``C`` and attends to
  the cache prefix (keys ``>= E`` masked); the estimator has one such cache per velocity
  evaluation (``sampling.n_evals``: 10 for 10 Euler steps, 20 for Heun, 40 for RK4) and per
  estimator row (``sampling.rows``: 2 with CFG, 1 with guidance ``none``; the evaluation index
  ``k`` of the solver selects the slot), so any sampler of ``flow/sampling.py`` with our
  solvers (Euler, midpoint, Heun, RK4) streams;
* each causal conv takes its left context from a saved tail (2 frames; 4 for the up-layer) and
  saves the frames before the next boundary;
* a partial chunk (``E`` not a multiple of the chunk) is recomputed by the next push, so any push
  sizes are exact; the official schedules (prompt padded so that prompt + first hop is a multiple
  of 25; hops of 25, or 25 -> 50 -> 100) leave no partial chunk before the final push.

Fixed shapes: caches hold ``max_frames`` mel frames (prompt included) and the window is rounded
up to a multiple of the chunk and computed in pieces of ``chunk * 2**k`` tokens up to
``max_window`` (25, 50, 100), so there are at most three compiled programs per capacity whatever
the prompt length and hop.
With ``initial_frames`` the caches start smaller and double up to ``max_frames`` when a push
needs room (one more program per capacity tier). Attention reads only the cache prefix that
covers the window, in buckets of ``key_block`` frames (one ``lax.switch``), so its cost follows
the real prefix rather than the capacity.

Memory (fp32, full size): the estimator caches dominate: ``2 (k, v) x n_evals x rows x
n_blocks x heads * head_dim`` values per frame, 4.6 MB per mel frame for 10 Euler steps (56 blocks
of 8 x 64): 1200 frames (24 s with the prompt) take 5.5 GB, 4096 take 18.8 GB; Heun doubles it, guidance ``none`` (1 estimator row)
halves it. Three knobs bound it:

* ``initial_frames="request"``: caches start at the smallest tier (``key_block`` times a power of
  two) that holds the prompt and the first chunk, and double when a push needs room;
* ``cache_dtype="bfloat16"``: attention caches stored in bf16 (half the bytes; keys/values are
  rounded once when written and computed in the flow's dtype otherwise; deviation from fp32 caches
  measured in tests/test_flow_streaming.py and the README); ``flow.dtype: bfloat16`` does the same
  and computes in bf16 too;
* ``memory_budget_bytes``: a stream whose caches would outgrow the budget (at start or when they
  grow) drops them and continues on the recompute path (``modeling.inference_batch`` from token 0
  for every later chunk, the official runtime's method): the same frames (float tolerance), memory
  bounded by one offline call, cost growing with the prefix as in the official code.

A state's caches are freed when the state is dropped or closed (:meth:`FlowStreamer.close`: at once, and their
memory handed back to the OS; the pipeline closes it before its final,
unmasked chunk).

The official runtime's last chunk runs *without* chunk masks (``token2wav(..., finalize=True)``
passes no ``streaming`` flag), which changes every frame and cannot be cached;
``push(..., finalize=True)`` here is the chunk-masked finalize (the recompute path
``inference(..., streaming=True, finalize=True)``). The pipeline runs the official unmasked last
chunk itself (``pipeline/token2wav.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import aot
from ..config import FlowConfig
from ..errors import ConfigError
from ..layers.attention import KV, Window
from . import cfm as cfm_lib
from . import sampling
from .decoder import init_decoder_cache
from .encoder import init_encoder_cache, rel_pos_inputs
from . import modeling as flow_model
from .modeling import CausalMaskedDiffWithXvec, compute_dtype, resolve_sampler, student_extra

Array = jax.Array


class StreamingError(ConfigError):
    """A streaming request cannot be served (capacity exceeded, push after finalize, bad input)."""


# ----------------------------------------------------------------------------- state
class StreamCaches(NamedTuple):
    """Device state of one utterance (fixed shapes; capacity ``cap_f`` frames, ``cap_t = cap_f / 2``
    tokens; ``cap_f = max_frames`` unless the streamer grows its caches in tiers).

    ``spk (n_mels,)``; ``cond (max_frames, n_mels)`` prompt mel then zeros; ``enc``: the encoder
    cache (:func:`encoder.init_encoder_cache`, batch 1: K/V of ``cap_t`` token / ``cap_f`` frame
    slots, conv tails); ``dec``: the estimator cache (:func:`decoder.init_decoder_cache`, slots
    ``(n_evals,)``, batch ``rows`` = 2 CFG rows conditioned/unconditioned (1 without guidance),
    ``cap_f`` frames).
    """

    spk: Array
    cond: Array
    enc: dict
    dec: dict

    @property
    def frames(self) -> int:
        """Current capacity in mel frames."""
        kv = [x for x in jax.tree.leaves(self.dec, is_leaf=lambda x: isinstance(x, KV)) if isinstance(x, KV)]
        return kv[0].k.shape[-3]


class FlowStreamState(NamedTuple):
    """One utterance's streaming state (host bookkeeping + :class:`StreamCaches`).

    ``tokens``: prompt ++ speech tokens received so far; ``emitted``: tokens whose frames were
    returned (starts at the prompt length); ``committed``: tokens whose caches are final (a
    multiple of the encoder chunk). A state is consumed by :meth:`FlowStreamer.push` (its device
    buffers are donated): always continue with the returned state.
    """

    tokens: np.ndarray
    n_prompt: int
    emitted: int
    committed: int
    finalized: bool
    caches: StreamCaches | None
    prompt: Any = None  # (prompt_feat, embedding) on the host, for the recompute fallback

    @property
    def recompute(self) -> bool:
        """True once the stream runs on the recompute path (no caches; memory budget)."""
        return self.caches is None


# ----------------------------------------------------------------------------- host memory
_LIBC: Any = None


def trim_host_memory() -> None:
    """Give memory that deleted XLA:CPU buffers left in glibc's free lists back to the OS.

    XLA:CPU buffers come from ``malloc``; glibc keeps freed chunks below its (dynamic, up to 32 MB)
    mmap threshold in its arenas, so a stream's old cache tier stays in the process RSS after it
    is deleted (measured at full size: +1 GB after growing 200 -> 400 frames). ``malloc_trim(0)``
    returns them (a few ms). No-op without glibc (macOS, musl)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


# ----------------------------------------------------------------------------- one chunk
@aot.jit(name="flow_stream_chunk", static_argnames=("cfg", "W", "key_block", "structure"), donate_argnames=("caches",))
def _chunk(params, tables, noise, arrays, caches: StreamCaches, ids, C, E, n_total, *,
           cfg: FlowConfig, W: int, key_block: int, structure: tuple):
    """Encoder + CFM solve on the token window ``[C, C+W)`` -> ``(caches, mel (r W, n_mels))``.

    ``ids (W + L,)``: token ids at positions ``C .. C+W+L-1`` (any value at ``>= n_total``);
    ``E``: tokens producing frames; ``n_total``: tokens the look-ahead may read. ``structure`` /
    ``arrays``: the sampler (``sampling.sample_arrays``); the estimator runs ``rows`` = 2 rows
    (CFG: conditioned, unconditioned) or 1 (guidance ``none``), the rows of ``caches.dec``.
    """
    model = CausalMaskedDiffWithXvec(cfg)
    p = {"params": params}
    r, chunk = cfg.token_mel_ratio, cfg.encoder.static_chunk_size
    C_new = (E // chunk) * chunk
    window = Window(offset=C, n_valid=E, chunk=chunk, advance=C_new - C, key_block=key_block // r)
    readable = (C + jnp.arange(ids.shape[0]) < n_total)[None]
    mu, enc = model.apply(p, ids[None], readable, caches.enc, tables, window, method=model.encode_stream)
    frames = window.scaled(r)  # the estimator's frame window (chunk: decoder.static_chunk_size)
    Wf, f0 = r * W, r * C
    rows = sampling.rows(structure)
    valid = jnp.broadcast_to(f0 + jnp.arange(Wf) < r * E, (rows, Wf))
    cond = lax.dynamic_slice_in_dim(caches.cond, f0, Wf, axis=0)
    z = lax.dynamic_slice_in_dim(noise, f0, Wf, axis=0)[None]
    rest = jnp.concatenate([mu[0], jnp.broadcast_to(caches.spk, (Wf, caches.spk.shape[-1])), cond], axis=-1)
    rest_r = jnp.stack([rest, jnp.zeros_like(rest)][:rows])              # CFG rows: conditioned, unconditioned

    def estimate(x_rows, t, k, dec):
        extra = student_extra(cfg, rows, arrays, structure, t, k)
        t_emb = model.apply(p, jnp.broadcast_to(t, (rows,)), extra, method=model.time_embedding)
        h = jnp.concatenate([x_rows, rest_r], axis=-1)
        return model.apply(p, h, valid, t_emb, 0, dec, frames._replace(slot=(k,)), method=model.estimate_features)

    x, dec = sampling.sample_arrays(estimate, z, structure, arrays, caches.dec)
    return caches._replace(enc=enc, dec=dec), x[0]


@aot.jit(name="flow_stream_pos_tables", static_argnames=("cfg", "tokens"))
def _pos_tables(params, tables, *, cfg: FlowConfig, tokens: int):
    """Projected relative-position tables of every encoder attention layer (param-only, once);
    ``tables``: :func:`encoder.rel_pos_inputs` (arguments, not constants of the program)."""
    model = CausalMaskedDiffWithXvec(cfg)
    return model.apply({"params": params}, tokens, tables, method=model.pos_tables)


@functools.partial(jax.jit, static_argnames=("cfg", "frames", "n_evals", "rows", "dtype", "cache_dtype"))
def _zero_state(*, cfg: FlowConfig, frames: int, n_evals: int, rows: int, dtype: str, cache_dtype: str) -> dict:
    """Zero encoder and estimator caches of one tier, as one program (eager ``jnp.zeros`` would be one
    program per distinct leaf shape). K/V in ``cache_dtype``, conv tails in ``dtype``."""
    def kv_dtype(tree):
        return jax.tree.map(lambda x: KV(x.k.astype(cache_dtype), x.v.astype(cache_dtype)) if isinstance(x, KV) else x,
                            tree, is_leaf=lambda x: isinstance(x, KV))
    return {"enc": kv_dtype(init_encoder_cache(cfg.encoder, 1, frames // cfg.token_mel_ratio, dtype)),
            "dec": kv_dtype(init_decoder_cache(cfg.decoder, (n_evals,), rows, frames, dtype))}


@aot.jit(name="flow_stream_speaker", static_argnames=("cfg",))
def _speaker(params, embedding, *, cfg: FlowConfig):
    model = CausalMaskedDiffWithXvec(cfg)
    return model.apply({"params": params}, embedding, method=model.embed_speaker)


# ----------------------------------------------------------------------------- public API
class FlowStreamer:
    """Cached chunked flow inference for one utterance at a time (see the module docstring).

    ``start(prompt_token (S0,), prompt_feat (2*S0, n_mels), embedding (spk_embed_dim,)) -> state``;
    ``push(state, tokens, finalize) -> (state, mel (F, n_mels))`` where ``tokens`` are all speech
    tokens received since the previous push. With ``finalize=False`` the last
    ``pre_lookahead_len`` tokens of the stream are look-ahead only (their frames come with a later
    push); the frames returned are those the official recompute path returns for that chunk.

    Args:
      params: flow params (``flow.params.from_torch`` / ``init_params``).
      cfg: the flow config; its sampler (``cfg.inference_sampler``) and ``dtype`` are used as in
        offline inference.
      sampler: a :class:`~cosyvoice2_jax.flow.sampling.SamplerConfig` instead of the config's: any
        grid and guidance, solvers euler/midpoint/heun/rk4 (diffrax solvers cannot thread the
        caches); ``n_timesteps``/``cfg_rate`` override its ``steps``/``cfg_rate``.
      max_frames: cache capacity in mel frames, prompt included (a multiple of
        ``2 * static_chunk_size``); memory grows linearly with it (module docstring).
      initial_frames: if set (a multiple of ``2 * static_chunk_size``), caches start with this
        capacity and double up to ``max_frames`` when needed (one more compile per tier).
        ``"request"``: start at the smallest tier (``key_block * 2**k``, at most ``max_frames``) that
        holds the prompt and its first chunk, then double likewise.
      noise: ``"official"`` (fixed noise of the release), a ``jax.random`` key, or an array
        ``(>= max_frames, n_mels)``; frame ``f`` of every request uses row ``f``.
      key_block: attention reads cache prefixes in buckets of this many frames.
      cache_dtype: dtype of the attention caches (``None``: the flow's compute dtype;
        ``"bfloat16"`` halves the cache memory, module docstring).
      memory_budget_bytes: per-stream cap on the cache bytes; past it the stream falls back to the
        recompute path (module docstring). ``None``: no cap (``max_frames`` bounds the caches).
      max_window: a push computes its tokens in windows of ``chunk * 2**k`` tokens up to this many
        (e.g. 25, 50, 100), so few programs compile whatever the prompt length; ``None``: one window
        per push (one program per push length).
    """

    def __init__(self, params, cfg: FlowConfig, *, max_frames: int = 4096, noise: Any = "official",
                 n_timesteps: int | None = None, cfg_rate: float | None = None, key_block: int = 200,
                 initial_frames: int | str | None = None, sampler: sampling.SamplerConfig | None = None,
                 cache_dtype: Any = None, memory_budget_bytes: int | None = None, max_window: int | None = 100):
        ec, dc = cfg.encoder, cfg.decoder
        r, chunk = cfg.token_mel_ratio, ec.static_chunk_size
        if ec.upsample_stride != r or dc.static_chunk_size != r * chunk or len(dc.channels) != 1:
            raise ConfigError("FlowStreamer needs upsample_stride == token_mel_ratio, decoder static_chunk_size == "
                              f"token_mel_ratio * encoder static_chunk_size and one U-Net level (got stride "
                              f"{ec.upsample_stride}, ratio {r}, chunks {chunk}/{dc.static_chunk_size}, channels "
                              f"{dc.channels}); use flow.modeling.inference(streaming=True) for other configs")
        if chunk <= 0:  # (num_decoding_left_chunks is ignored: the official passes -1 = all left chunks)
            raise ConfigError(f"FlowStreamer needs a static chunk: encoder static_chunk_size={chunk} must be > 0")
        if max_frames <= 0 or max_frames % (r * chunk):
            raise ConfigError(f"max_frames={max_frames} must be a positive multiple of {r * chunk} "
                              f"(token_mel_ratio * static_chunk_size)")
        if initial_frames == "request":
            pass
        elif initial_frames is not None and (isinstance(initial_frames, str) or initial_frames <= 0
                                             or initial_frames % (r * chunk) or initial_frames > max_frames):
            raise ConfigError(f"initial_frames={initial_frames} must be a positive multiple of {r * chunk} and at "
                              f"most max_frames={max_frames} (or None: allocate max_frames at start; 'request': "
                              "size to the prompt)")
        if max_window is not None and (max_window < chunk or max_window % chunk):
            raise ConfigError(f"max_window={max_window} must be a positive multiple of the chunk ({chunk} tokens) "
                              "or None")
        self.max_window = max_window
        if key_block <= 0 or key_block % r:
            raise ConfigError(f"key_block={key_block} must be a positive multiple of token_mel_ratio={r}")
        self.params = params
        self.max_frames, self.cap_t, self.key_block = max_frames, max_frames // r, key_block
        self.initial_frames = initial_frames or max_frames
        self.sampler = resolve_sampler(cfg, sampler, n_timesteps=n_timesteps, cfg_rate=cfg_rate)
        if self.sampler.solver not in sampling.SOLVER_STAGES:
            raise ConfigError(f"sampler.solver={self.sampler.solver!r} cannot stream (diffrax solvers cannot thread "
                              f"the per-evaluation caches); use one of {', '.join(sampling.SOLVER_STAGES)}, or "
                              "flow_cache=False (the recompute path)")
        # one estimator cache per velocity evaluation and estimator row (no guidance: 1 row, half the memory)
        self.n_evals, self.rows = sampling.n_evals(self.sampler), sampling.rows(self.sampler)
        self.arrays = sampling.cached_guidance_arrays(self.sampler)
        self.cfg = cfg = dataclasses.replace(cfg, sampler=None)  # jit key: the sampler enters by structure only
        self.dtype = compute_dtype(cfg)
        try:
            self.cache_dtype = self.dtype if cache_dtype is None else jnp.dtype(cache_dtype)
        except TypeError:
            raise ConfigError(f"cache_dtype={cache_dtype!r} is not a dtype; use float32 or bfloat16") from None
        if memory_budget_bytes is not None and memory_budget_bytes < 0:
            raise ConfigError(f"memory_budget_bytes={memory_budget_bytes} must be >= 0 (or None: no budget)")
        self.memory_budget_bytes = memory_budget_bytes
        self.noise_arg = noise
        if isinstance(noise, str) or cfm_lib.is_prng_key(noise):
            self.noise = cfm_lib.initial_noise(noise, 1, max_frames, cfg.output_size)[0]
        else:
            noise = jnp.asarray(noise, jnp.float32)
            if noise.ndim != 2 or noise.shape[0] < max_frames or noise.shape[1] != cfg.output_size:
                raise ConfigError(f"noise array must be (>= max_frames={max_frames}, {cfg.output_size}), "
                                  f"got {noise.shape}")
            self.noise = noise[:max_frames]
        self.tables = _pos_tables(params, rel_pos_inputs(cfg.encoder, self.cap_t), cfg=cfg, tokens=self.cap_t)

    # ---- helpers
    def _zero_caches(self, spk: Array, cond: Array, frames: int) -> StreamCaches:
        zeros = _zero_state(cfg=self.cfg, frames=frames, n_evals=self.n_evals, rows=self.rows,
                            dtype=jnp.dtype(self.dtype).name, cache_dtype=jnp.dtype(self.cache_dtype).name)
        return StreamCaches(spk=spk, cond=cond, enc=zeros["enc"], dec=zeros["dec"])

    def cache_bytes(self, frames: int) -> int:
        """Device bytes of one stream's caches at a capacity of ``frames`` mel frames (no compute)."""
        shapes = jax.eval_shape(lambda: self._zero_caches(jnp.zeros((self.cfg.output_size,)),
                                                          jnp.zeros((self.max_frames, self.cfg.output_size)), frames))
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))

    def _capacity(self, frames: int, tokens_needed: int) -> int:
        """The tier ``frames * 2**k`` (at most ``max_frames``) that holds ``tokens_needed`` tokens."""
        r = self.cfg.token_mel_ratio
        while frames < r * tokens_needed:
            frames = min(self.max_frames, 2 * frames)
        return frames

    def start_frames(self, n_prompt: int) -> int:
        """Cache capacity (mel frames) :meth:`start` allocates for a prompt of ``n_prompt`` tokens."""
        if self.initial_frames != "request":
            return self.initial_frames
        chunk, r = self.cfg.encoder.static_chunk_size, self.cfg.token_mel_ratio
        base = min(self.max_frames, -(-self.key_block // (r * chunk)) * r * chunk)
        return self._capacity(base, -(-n_prompt // chunk) * chunk + chunk)  # prompt + its first (padded) chunk

    def tiers(self, n_prompt: int, n_tokens: int) -> list[int]:
        """Cache capacities (mel frames) a stream of ``n_prompt`` prompt and at most ``n_tokens`` speech
        tokens passes through, from :meth:`start` to its last push (ignoring the memory budget):
        pushes never need more than the prompt + tokens rounded up to the chunk."""
        chunk = self.cfg.encoder.static_chunk_size
        need = min(self.cap_t, -(-(n_prompt + n_tokens) // chunk) * chunk)
        out = [self.start_frames(n_prompt)]
        while self._capacity(out[-1], need) != out[-1]:
            out.append(min(self.max_frames, 2 * out[-1]))
        return out

    def peak_cache_bytes(self, n_prompt: int, n_tokens: int) -> int:
        """Most cache bytes such a stream holds at once: while a push grows the caches the new tier
        and one array of the old tier coexist (:meth:`_grow`); past ``memory_budget_bytes`` the
        caches are dropped (recompute path)."""
        peak, prev = 0, 0
        for frames in self.tiers(n_prompt, n_tokens):
            if not self._within_budget(frames):
                break
            b = self.cache_bytes(frames)
            peak, prev = max(peak, b + prev), self._largest_cache_array(frames)
        return peak

    def _largest_cache_array(self, frames: int) -> int:
        shapes = jax.eval_shape(lambda: self._zero_caches(jnp.zeros((self.cfg.output_size,)),
                                                          jnp.zeros((self.max_frames, self.cfg.output_size)), frames))
        return int(max(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))

    def _within_budget(self, frames: int) -> bool:
        return self.memory_budget_bytes is None or self.cache_bytes(frames) <= self.memory_budget_bytes

    def _recompute(self, state: FlowStreamState, all_tok: np.ndarray, E: int, finalize: bool) -> np.ndarray:
        """The official recompute path for the frames of tokens ``[emitted, E)`` (no caches)."""
        cfg, r = self.cfg, self.cfg.token_mel_ratio
        feat, emb = state.prompt
        S0, n = state.n_prompt, all_tok.shape[0]
        F = r * flow_model.packed_length(n)
        z = self.noise[:F]
        if z.shape[0] < F:  # rows past the tokens are padding; any value
            z = jnp.pad(z, ((0, F - z.shape[0]), (0, 0)))
        mels, _ = flow_model.inference_batch(
            self.params, cfg, all_tok[S0:][None], [n - S0], all_tok[:S0][None], [S0], feat[None], [feat.shape[0]],
            emb[None], streaming=True, finalize=finalize, noise=z, sampler=self.sampler)
        return mels[0][r * (state.emitted - S0): r * (E - S0)]

    def _grow(self, caches: StreamCaches, tokens_needed: int) -> StreamCaches:
        """Double the capacity (up to ``max_frames``) until ``tokens_needed`` tokens fit.

        The old caches are consumed (as a push donates them): each old array is deleted as soon as
        its grown copy exists, so growing holds the new tier plus one old array, not both tiers."""
        frames = caches.frames
        new = self._capacity(frames, tokens_needed)
        if new == frames:
            return caches

        freed = [0]

        def grown(x):
            widths = [(0, 0)] * x.ndim
            widths[-3] = (0, x.shape[-3] * new // frames - x.shape[-3])
            out = jnp.pad(x, widths).block_until_ready()
            freed[0] += x.nbytes
            x.delete()
            if freed[0] >= 64 << 20:  # hand the old tier back to the OS as it goes, not after the growth
                trim_host_memory()
                freed[0] = 0
            return out

        def pad(leaf):  # K/V caches grow along their slot axis (-3); conv tails keep their shape
            return KV(grown(leaf.k), grown(leaf.v)) if isinstance(leaf, KV) else leaf
        grow = functools.partial(jax.tree.map, pad, is_leaf=lambda x: isinstance(x, KV))
        out = caches._replace(enc=grow(caches.enc), dec=grow(caches.dec))
        trim_host_memory()
        return out

    def close(self, state: FlowStreamState | None) -> None:
        """End a stream early or before its final unmasked chunk: delete its caches now (not when the
        last reference goes) and hand their memory back to the OS. The state cannot be pushed again."""
        if state is not None and state.caches is not None:
            for x in jax.tree.leaves(state.caches):
                if not x.is_deleted():
                    x.delete()
            trim_host_memory()

    def _check_tokens(self, tokens, what: str) -> np.ndarray:
        t = np.asarray(tokens)
        if t.ndim != 1 or (t.size and not np.issubdtype(t.dtype, np.integer)):
            raise StreamingError(f"{what} must be a 1-D integer array of speech tokens, got shape {t.shape} "
                                 f"dtype {t.dtype}; pass e.g. np.asarray(tokens, np.int32)")
        if t.size and (t.min() < 0 or t.max() >= self.cfg.vocab_size):
            raise StreamingError(f"{what} holds ids outside [0, {self.cfg.vocab_size}) (min {t.min()}, max {t.max()}); "
                                 "drop the LM's special tokens (eos/fill) before the flow")
        return t.astype(np.int32)

    # ---- API
    def start(self, prompt_token: np.ndarray, prompt_feat: np.ndarray, embedding: np.ndarray) -> FlowStreamState:
        """New utterance: ``prompt_token (S0,)``, ``prompt_feat (2*S0, n_mels)``, ``embedding (spk_embed_dim,)``."""
        cfg = self.cfg
        prompt_token = self._check_tokens(prompt_token, "prompt_token")
        prompt_feat = np.asarray(prompt_feat, np.float32)
        S0 = prompt_token.shape[0]
        if prompt_feat.ndim != 2 or prompt_feat.shape != (cfg.token_mel_ratio * S0, cfg.output_size):
            raise StreamingError(f"prompt_feat must be ({cfg.token_mel_ratio} * {S0} prompt tokens, {cfg.output_size}) = "
                                 f"({cfg.token_mel_ratio * S0}, {cfg.output_size}), got {prompt_feat.shape}; trim "
                                 "prompt mel and tokens to 2 frames per token as the official frontend does")
        embedding = np.asarray(embedding, np.float32).reshape(-1)
        if embedding.shape != (cfg.spk_embed_dim,):
            raise StreamingError(f"embedding must have {cfg.spk_embed_dim} values, got {embedding.shape}")
        first = prompt_feat.shape[0] + cfg.token_mel_ratio * cfg.encoder.static_chunk_size
        if first > self.max_frames:
            raise StreamingError(f"the prompt ({prompt_feat.shape[0]} frames) leaves no room in max_frames="
                                 f"{self.max_frames}; build the FlowStreamer with a larger max_frames")
        frames = self.start_frames(S0)
        state = FlowStreamState(tokens=prompt_token, n_prompt=S0, emitted=S0, committed=0, finalized=False,
                                caches=None, prompt=(prompt_feat, embedding))
        if not self._within_budget(frames):  # memory budget: recompute path from the start
            return state
        cond = np.zeros((self.max_frames, cfg.output_size), np.float32)  # built on the host: no eager device
        cond[: prompt_feat.shape[0]] = prompt_feat                         # programs (each one is a compile or
        spk = _speaker(self.params, embedding[None], cfg=cfg)[0]           # a cache read in a new process)
        return state._replace(caches=self._zero_caches(spk, jnp.asarray(cond), frames))

    def push(self, state: FlowStreamState, tokens: np.ndarray, finalize: bool) -> tuple[FlowStreamState, np.ndarray]:
        """Add ``tokens`` (all new speech tokens) and return the new mel frames ``(F, n_mels)``."""
        if state.finalized:
            raise StreamingError("push after finalize: this utterance is finished; call start() for a new one")
        cfg = self.cfg
        L, r, chunk = cfg.pre_lookahead_len, cfg.token_mel_ratio, cfg.encoder.static_chunk_size
        new = self._check_tokens(tokens, "tokens")
        all_tok = np.concatenate([state.tokens, new])
        n = all_tok.shape[0]
        E = n if finalize else n - L
        empty = np.zeros((0, cfg.output_size), np.float32)
        if E <= state.emitted:  # nothing new to emit yet (too few tokens for the look-ahead)
            return state._replace(tokens=all_tok, finalized=bool(finalize)), empty
        C = state.committed
        W = -(-(E - C) // chunk) * chunk
        if C + W > self.cap_t:
            raise StreamingError(f"this push needs {r * (C + W)} mel frames of cache (prompt + tokens so far, rounded "
                                 f"up to the {chunk}-token chunk) but max_frames={self.max_frames}; build the "
                                 "FlowStreamer with a larger max_frames or split the utterance")
        if state.caches is not None and not self._within_budget(self._capacity(state.caches.frames, C + W)):
            state = state._replace(caches=None)  # past the memory budget: drop the caches, recompute from here on
        if state.caches is None:
            out = self._recompute(state, all_tok, E, finalize)
            return state._replace(tokens=all_tok, emitted=E, committed=(E // chunk) * chunk,
                                  finalized=bool(finalize)), out
        caches = self._grow(state.caches, C + W)
        outs, emitted = [], state.emitted
        for w in self._windows(W):  # fixed window lengths: a bounded number of programs per capacity
            e = min(E, C + w)
            pos = np.arange(C, C + w + L)
            ids = np.where(pos < n, all_tok[np.clip(pos, 0, n - 1)], 0).astype(np.int32)
            caches, mel = _chunk(self.params, self.tables, self.noise, self.arrays, caches,
                                 jnp.asarray(ids), np.int32(C), np.int32(e), np.int32(n),
                                 cfg=cfg, W=w, key_block=self.key_block, structure=self.sampler.structure)
            outs.append(np.asarray(mel)[r * (emitted - C): r * (e - C)])
            emitted, C = e, C + w
        out = outs[0] if len(outs) == 1 else np.concatenate(outs)
        return state._replace(tokens=all_tok, emitted=E, committed=(E // chunk) * chunk,
                              finalized=bool(finalize), caches=caches), out

    def _windows(self, W: int) -> list[int]:
        """``W`` tokens (a multiple of the chunk) as windows of ``chunk * 2**k <= max_window`` tokens,
        largest first (125 -> [100, 25]); one window of ``W`` when ``max_window`` is None."""
        chunk = self.cfg.encoder.static_chunk_size
        if self.max_window is None:
            return [W]
        out, left = [], W // chunk
        while left:
            k = min(left, self.max_window // chunk)
            k = 1 << (k.bit_length() - 1)
            out.append(k * chunk)
            left -= k
        return out


def official_pushes(n_prompt: int, n_tokens: int, *, hop: int = 25, max_hop: int = 25, scale: int = 2,
                    lookahead: int = 3) -> list[tuple[int, bool]]:
    """The official runtime's chunking of ``n_tokens`` speech tokens (all available) as pushes.

    Returns ``[(new_tokens, finalize), ...]``: the first hop is ``hop + pad`` with ``pad`` making
    prompt + first hop a multiple of ``hop``; later hops grow by ``scale`` up to ``max_hop``
    (official pip snapshot: ``max_hop = hop``; HEAD: ``max_hop = 4 * hop``, ``scale = 2``); each
    non-final chunk needs ``hop + lookahead`` tokens past the offset; the rest is the final push.
    """
    pad = math.ceil(n_prompt / hop) * hop - n_prompt
    offset, fed, cur, out = 0, 0, hop, []
    while True:
        this = cur + pad if offset == 0 else cur
        if n_tokens - offset < this + lookahead:
            break
        end = offset + this + lookahead
        out.append((end - fed, False))
        fed, offset = end, offset + this
        cur = min(max_hop, cur * scale)
    out.append((n_tokens - fed, True))
    return out
