"""Constant-cost streaming flow: cached chunks that equal the official recompute path.

The official streaming runtime (``cosyvoice/cli/model.py``, ``CosyVoice2Model.tts(stream=True)``)
calls ``flow.inference(token[:offset + hop + 3], prompt..., streaming=True, finalize=False)`` for
every chunk, from token 0, and keeps the mel frames after ``2 * offset``: chunk ``k`` costs the
whole prefix. :class:`FlowStreamer` returns the same frames (float tolerance) while every chunk
costs about the same: it keeps per-layer caches instead of recomputing the prefix.

Why the cache is exact (``streaming=True``; checked against the official modules):

* Encoder (``UpsampleConformerEncoder``): attention uses the static chunk mask (query ``i`` sees
  key ``j`` iff ``j < (i // c + 1) * c``; ``c`` = 25 tokens, 50 frames after the upsample; all
  left chunks: the official passes ``num_left_chunks=-1``) with ESPnet relative
  positions (scores depend on ``i - j`` only, through a table whose rows do not depend on the
  sequence length). The pre-lookahead layer reads tokens ``i .. i+3`` (``finalize=False`` feeds
  the last 3 as context only) and then a causal conv (2 left); the up-layer conv is causal
  (4 left frames). Every other op is per position.
* Estimator (``CausalConditionalDecoder``): causal k3 convs, per-frame LayerNorm/FFN, attention
  with the static chunk mask of 50 frames and all left chunks (its ``forward`` passes -1 to
  ``add_optional_chunk_mask``: the stored ``num_decoding_left_chunks`` is never used).
* CFM: the fixed official noise is sliced from frame 0; ``cond`` is the prompt mel on frame
  positions; the Euler grid does not depend on the length.

So the hidden state of a position in a *completed* attention chunk never changes when tokens are
appended. A push therefore runs only the window of tokens from the last completed chunk boundary
``C`` (the "committed" position) to the new end ``E`` of frame-producing tokens:

* per encoder layer the keys/values of positions ``< C`` come from a cache; the window's own
  keys/values are written into it (positions ``>= E`` are masked);
* the causal convs take their left context from saved tails (the 2 pre-lookahead positions are
  recomputed from the token ids; the up-layer keeps 4 input frames);
* per Euler step (10) x CFG row (2) x estimator transformer block: a key/value cache; per
  step x row x causal conv of the estimator: a 2-frame tail.

Tokens of a partial chunk (``[C, E)`` with ``E`` not a multiple of the chunk) are recomputed by the
next push, so any push sizes give exact results; the official schedules (prompt padded so that
prompt + first hop is a multiple of 25; hops of 25, or 25 -> 50 -> 100) never leave a partial
chunk before the final push, so no work is repeated there.

Fixed shapes: the cache capacity is ``max_frames`` mel frames (prompt included); the window is
rounded up to a multiple of the chunk (25 tokens), so there is one compiled program per distinct
window length (= hop length). With ``initial_frames`` the caches start smaller and double (up to
``max_frames``) when a push needs more room: memory then follows the utterance, at the price of
one more compiled program per capacity tier. Attention reads only the first ``key_block * n``
cache entries that cover the window (a ``lax.switch`` over key-length buckets), so the attention
cost follows the real prefix instead of the capacity without recompiling.

Memory (fp32): the estimator cache dominates: ``2 (k, v) x 10 steps x 2 rows x n_blocks x
(heads * head_dim)`` floats per frame, i.e. 4.6 MB per mel frame at full size (56 blocks of
8 x 64): 1200 frames (24 s incl. prompt) take 5.5 GB, 4096 take 18.8 GB.

The final chunk of the official runtime runs *without* chunk masks (``token2wav(...,
finalize=True)`` passes no ``streaming`` flag), which changes every frame and cannot be cached;
``push(..., finalize=True)`` here is the streaming (chunk-masked) finalize, i.e. the recompute path
``inference(..., streaming=True, finalize=True)``. The pipeline runs the official non-streaming
last chunk itself (``pipeline/token2wav.py``).
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..config import FlowConfig, Solver
from ..errors import ConfigError
from ..layers.conv import conv1d
from ..layers.positional import espnet_rel_pos_emb, sinusoidal_time_emb
from . import cfm as cfm_lib
from .decoder import mish

Array = jax.Array


class StreamingError(ConfigError):
    """A streaming request cannot be served (capacity exceeded, push after finalize, bad input)."""


# ----------------------------------------------------------------------------- state
class StreamCaches(NamedTuple):
    """Device state of one utterance (fixed shapes; capacity ``cap_f`` frames, ``cap_t = cap_f // 2``
    tokens, ``cap_f = max_frames`` unless the streamer grows its caches in tiers).

    ``spk (80,)``; ``cond (max_frames, 80)`` prompt mel then zeros; ``enc_k/enc_v (n_enc, cap_t,
    H, dk)``; ``up_tail (2 * stride, D)`` up-layer conv input before ``C``; ``up_k/up_v (n_up,
    cap_f, H, dk)``; ``dec_k/dec_v (n_att, n_steps, 2, cap_f, H_d, d)`` (CFG rows:
    conditioned, unconditioned); ``dec_tails``: conv name -> ``(n_steps, 2, 2, C_in)``.
    """

    spk: Array
    cond: Array
    enc_k: Array
    enc_v: Array
    up_tail: Array
    up_k: Array
    up_v: Array
    dec_k: Array
    dec_v: Array
    dec_tails: dict


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
    caches: StreamCaches


# ----------------------------------------------------------------------------- small pieces
def _linear(p: dict, x: Array) -> Array:
    return nn.Dense(p["kernel"].shape[-1], use_bias="bias" in p).apply({"params": p}, x)


def _ln(p: dict, x: Array, eps: float = 1e-5) -> Array:
    return nn.LayerNorm(epsilon=eps).apply({"params": p}, x)


def _conv(p: dict, x: Array) -> Array:
    """Valid (unpadded) conv of ``x (B, T, I)`` with ``kernel (K, I, O)`` -> ``(B, T-K+1, O)``."""
    return conv1d(x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)


def _embed_linear(p: dict, x: Array, eps: float) -> Array:
    """``LinearNoSubsampling``: Linear -> LayerNorm -> ``* sqrt(D)``."""
    h = _ln(p["out_1"], _linear(p["out_0"], x), eps)
    return h * jnp.sqrt(jnp.asarray(h.shape[-1], h.dtype))


def _skew(x: Array, n_keys: int) -> Array:
    """``x (..., W, W-1+K)`` scores against relative-position rows -> ``(..., W, K)`` with
    ``out[a, j] = x[a, W-1-a+j]`` (a slice of the flattened array; Transformer-XL's shift)."""
    *lead, W, L = x.shape
    flat = x.reshape(*lead, W * L)[..., W - 1: W - 1 + W * (L - 1)]
    return flat.reshape(*lead, W, L - 1)[..., :n_keys]


def _by_key_bucket(n_needed: Array, cap: int, block: int, attend) -> Array:
    """``attend(K)`` for the smallest bucket ``K`` (multiple of ``block``, at most ``cap``) with
    ``K >= n_needed``; one ``lax.switch`` so all buckets live in one compiled program."""
    sizes = sorted({min(cap, b) for b in range(block, cap + block, block)})
    if len(sizes) == 1:
        return attend(sizes[0])
    idx = jnp.searchsorted(jnp.asarray(sizes), n_needed, side="left")
    idx = jnp.clip(idx, 0, len(sizes) - 1)
    return lax.switch(idx, [functools.partial(attend, K) for K in sizes])


def _chunk_visible(qpos: Array, kpos: Array, chunk: int, n_valid: Array) -> Array:
    """Static-chunk mask on absolute positions plus key validity: ``(Wq, K)`` bool."""
    end = (qpos // chunk + 1) * chunk
    return (kpos[None, :] < end[:, None]) & (kpos[None, :] < n_valid)


# ----------------------------------------------------------------------------- encoder
def _relpos_attention(p: dict, x: Array, k_cache: Array, v_cache: Array, layer: int, table: Array, q0: Array,
                      n_valid: Array, chunk: int, key_block: int) -> tuple[Array, Array, Array]:
    """ESPnet rel-pos self-attention of the window ``x (W, D)`` at absolute positions ``q0 + a``
    against layer ``layer`` of the stacked cache ``(n_layers, cap, H, dk)`` (the window's own
    keys are written first, in place).

    ``table (2 M - 1, H, dk)`` (``M >= cap``) = ``linear_pos`` of the relative-position table, row
    ``M-1-r`` for relative position ``r`` (see :func:`_pos_tables`).
    """
    W, D = x.shape
    _, cap, H, dk = k_cache.shape
    cap_table = (table.shape[0] + 1) // 2  # the table may cover more positions than the cache
    q = _linear(p["linear_q"], x).reshape(W, H, dk)
    k = _linear(p["linear_k"], x).reshape(W, H, dk)
    v = _linear(p["linear_v"], x).reshape(W, H, dk)
    zero = jnp.zeros((), jnp.int32)
    k_cache = lax.dynamic_update_slice(k_cache, k[None], (layer, q0, zero, zero))
    v_cache = lax.dynamic_update_slice(v_cache, v[None], (layer, q0, zero, zero))
    qu = q + p["pos_bias_u"].astype(x.dtype)
    qv = q + p["pos_bias_v"].astype(x.dtype)
    qpos = q0 + jnp.arange(W)
    row0 = cap_table - W - q0  # row of relative position q0 + W - 1 (query W-1, key 0)

    def attend(K, k_all, v_all, tbl):
        k_c = lax.dynamic_slice(k_all, (layer, zero, zero, zero), (1, K, H, dk))[0]
        v_c = lax.dynamic_slice(v_all, (layer, zero, zero, zero), (1, K, H, dk))[0]
        ac = jnp.einsum("qhd,khd->hqk", qu, k_c)
        rows = lax.dynamic_slice(tbl, (row0, 0, 0), (W - 1 + K, H, dk))
        bd = _skew(jnp.einsum("qhd,rhd->hqr", qv, rows), K)
        scores = (ac + bd) / jnp.sqrt(jnp.asarray(dk, x.dtype))
        m = _chunk_visible(qpos, jnp.arange(K), chunk, n_valid)[None]
        attn = jnp.where(m, jax.nn.softmax(jnp.where(m, scores, -jnp.inf), axis=-1), 0.0)
        return jnp.einsum("hqk,khd->qhd", attn, v_c).reshape(W, H * dk)

    out = _by_key_bucket(q0 + W, cap, key_block,
                         lambda K: attend(K, k_cache, v_cache, table))
    return _linear(p["linear_out"], out), k_cache, v_cache


def _conformer_layer(p: dict, x: Array, k_cache, v_cache, layer, table, q0, n_valid, chunk, eps, key_block):
    """Pre-norm ``x + MHA(norm_mha(x)); x + FFN(norm_ff(x))`` (SiLU FFN) on a window."""
    a, k_cache, v_cache = _relpos_attention(p["self_attn"], _ln(p["norm_mha"], x, eps), k_cache, v_cache,
                                            layer, table, q0, n_valid, chunk, key_block)
    x = x + a
    h = _ln(p["norm_ff"], x, eps)
    ff = p["feed_forward"]
    return x + _linear(ff["w_2"], jax.nn.silu(_linear(ff["w_1"], h))), k_cache, v_cache


def _encode_window(params, tables, caches: StreamCaches, ids, C, E, n_total, C_new, *, cfg: FlowConfig,
                   W: int, key_block: int):
    """Encoder + ``encoder_proj`` on tokens ``[C, C+W)`` -> ``mu (2W, 80)`` and updated caches.

    ``ids (W + 2 + L,)``: token ids at absolute positions ``C-2 .. C+W+L-1`` (any value outside
    ``[0, n_total)``); ``E``: tokens producing frames; ``n_total``: tokens the look-ahead may read.
    """
    ec = cfg.encoder
    pe = params["encoder"]
    L, s, eps = ec.pre_lookahead_len, ec.upsample_stride, ec.layer_norm_eps
    pos = C - 2 + jnp.arange(W + 2 + L)
    x = params["input_embedding"]["embedding"][jnp.clip(ids, 0, cfg.vocab_size - 1)]
    x = _embed_linear(pe["embed"], x, eps) * (pos < n_total)[:, None].astype(x.dtype)
    # pre-lookahead: conv1 reads i..i+L, conv2 is causal over conv1's outputs (zeros before 0)
    pl = pe["pre_lookahead_layer"]
    h = jax.nn.leaky_relu(_conv(pl["conv1"], x[None]), 0.01)[0]           # positions C-2 .. C+W-1
    h = h * (pos[: W + 2] >= 0)[:, None].astype(h.dtype)
    x = _conv(pl["conv2"], h[None])[0] + x[2: W + 2]                      # positions C .. C+W-1
    enc_k, enc_v = caches.enc_k, caches.enc_v
    for i in range(ec.num_blocks):
        x, enc_k, enc_v = _conformer_layer(pe[f"encoders_{i}"], x, enc_k, enc_v, i, tables["enc"][i], C, E,
                                           ec.static_chunk_size, eps, key_block // s)
    # up-layer: nearest x s, causal conv (kernel 2s+1) with the saved left frames
    u = jnp.concatenate([caches.up_tail, jnp.repeat(x, s, axis=0)], axis=0)
    up_tail = lax.dynamic_slice_in_dim(u, s * (C_new - C), 2 * s, axis=0)
    x = _conv(pe["up_layer"]["conv"], u[None])[0]
    x = _embed_linear(pe["up_embed"], x, eps)
    up_k, up_v = caches.up_k, caches.up_v
    for i in range(ec.num_up_blocks):
        x, up_k, up_v = _conformer_layer(pe[f"up_encoders_{i}"], x, up_k, up_v, i, tables["up"][i], s * C, s * E,
                                         ec.static_chunk_size * s, eps, key_block)
    mu = _linear(params["encoder_proj"], _ln(pe["after_norm"], x, eps))
    return mu, caches._replace(enc_k=enc_k, enc_v=enc_v, up_tail=up_tail, up_k=up_k, up_v=up_v)


# ----------------------------------------------------------------------------- estimator
class _UNetStep:
    """One estimator evaluation on a frame window for Euler step ``step`` (both CFG rows),
    reading/writing the per-step caches. Mirrors ``decoder.CausalConditionalDecoder``."""

    def __init__(self, p, cfg: FlowConfig, m, t_emb, step, dec_k, dec_v, tails, f0, n_valid_f, adv_f, key_block):
        self.p, self.dc = p, cfg.decoder
        self.m, self.t_emb, self.step = m, t_emb, step
        self.dec_k, self.dec_v, self.tails = dec_k, dec_v, dict(tails)
        self.f0, self.n_valid_f, self.adv_f, self.key_block = f0, n_valid_f, adv_f, key_block
        self.att_index = 0

    def conv3(self, name: str, p, u):
        """Causal k3 conv of ``u (2, Wf, C)`` (already masked) with the saved 2-frame tail."""
        full = jnp.concatenate([self.tails[name][self.step], u], axis=1)
        self.tails[name] = self.tails[name].at[self.step].set(
            lax.dynamic_slice_in_dim(full, self.adv_f, 2, axis=1))
        return _conv(p, full)

    def block(self, name, p, x):
        return mish(_ln(p["norm"], self.conv3(name, p["conv"], x * self.m))) * self.m

    def resnet(self, name, p, x):
        h = self.block(name + "/block1", p["block1"], x)
        h = h + _linear(p["mlp_1"], mish(self.t_emb))[:, None, :]
        h = self.block(name + "/block2", p["block2"], h)
        return h + _conv(p["res_conv"], x * self.m)

    def attention(self, p, x):
        B, Wf, _ = x.shape
        H, d = self.dc.num_heads, self.dc.attention_head_dim
        i = self.att_index
        self.att_index += 1
        q = _linear(p["to_q"], x).reshape(B, Wf, H, d)
        k = _linear(p["to_k"], x).reshape(B, Wf, H, d)
        v = _linear(p["to_v"], x).reshape(B, Wf, H, d)
        zero = jnp.zeros((), jnp.int32)
        self.dec_k = lax.dynamic_update_slice(self.dec_k, k[None, None], (i, self.step, zero, self.f0, zero, zero))
        self.dec_v = lax.dynamic_update_slice(self.dec_v, v[None, None], (i, self.step, zero, self.f0, zero, zero))
        cap = self.dec_k.shape[3]
        qpos = self.f0 + jnp.arange(Wf)
        dk_all, dv_all = self.dec_k, self.dec_v

        def attend(K):
            start = (i, self.step, zero, zero, zero, zero)
            kk = lax.dynamic_slice(dk_all, start, (1, 1, B, K, H, d))[0, 0]
            vv = lax.dynamic_slice(dv_all, start, (1, 1, B, K, H, d))[0, 0]
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * (d ** -0.5)
            m = _chunk_visible(qpos, jnp.arange(K), self.dc.static_chunk_size, self.n_valid_f)[None, None]
            attn = jax.nn.softmax(jnp.where(m, scores, scores - 1.0e10), axis=-1)
            return jnp.einsum("bhqk,bkhd->bqhd", attn, vv).reshape(B, Wf, H * d)

        out = _by_key_bucket(self.f0 + Wf, cap, self.key_block, attend)
        return _linear(p["to_out_0"], out)

    def transformer(self, p, x):
        x = x + self.attention(p["attn1"], _ln(p["norm1"], x))
        h = _ln(p["norm3"], x)
        ff = p["ff"]
        return x + _linear(ff["net_2"], jax.nn.gelu(_linear(ff["net_0_proj"], h), approximate=False))

    def stage(self, name, p, x, with_conv):
        x = self.resnet(name + "/resnet", p["resnet"], x)
        for j in range(self.dc.n_blocks):
            x = self.transformer(p[f"transformer_blocks_{j}"], x)
        if not with_conv:
            return x, x
        return x, self.conv3(name + "/conv", p["conv"], x * self.m)

    def __call__(self, h):
        p = self.p
        skip, x = self.stage("down", p["down_blocks_0"], h, True)
        for i in range(self.dc.num_mid_blocks):
            _, x = self.stage(f"mid{i}", p[f"mid_blocks_{i}"], x, False)
        x = jnp.concatenate([x, skip], axis=-1)
        _, x = self.stage("up", p["up_blocks_0"], x, True)
        x = self.block("final", p["final_block"], x)
        return _conv(p["final_proj"], x * self.m) * self.m


def _dec_tail_shapes(cfg: FlowConfig) -> dict[str, int]:
    """Input channels of every causal k3 conv of the estimator (their 2-frame tails)."""
    dc = cfg.decoder
    ch = dc.channels[0]
    out = {"down/resnet/block1": dc.in_channels, "down/resnet/block2": ch, "down/conv": ch,
           "up/resnet/block1": 2 * ch, "up/resnet/block2": ch, "up/conv": ch, "final": ch}
    for i in range(dc.num_mid_blocks):
        out[f"mid{i}/resnet/block1"] = ch
        out[f"mid{i}/resnet/block2"] = ch
    return out


# ----------------------------------------------------------------------------- one chunk
_TRACE_COUNT = [0]


def trace_count() -> int:
    """How many times the jitted chunk function was traced (= compiled) in this process."""
    return _TRACE_COUNT[0]


@functools.partial(jax.jit, static_argnames=("cfg", "W", "key_block"), donate_argnames=("caches",))
def _chunk(params, tables, noise, ts, cfg_rate, caches: StreamCaches, ids, C, E, n_total, *,
           cfg: FlowConfig, W: int, key_block: int):
    """Encoder + CFM on the token window ``[C, C+W)`` -> ``(caches, mel (2W, 80))``."""
    _TRACE_COUNT[0] += 1
    r = cfg.token_mel_ratio
    chunk = cfg.encoder.static_chunk_size
    C_new = (E // chunk) * chunk
    mu, caches = _encode_window(params, tables, caches, ids, C, E, n_total, C_new, cfg=cfg, W=W,
                                key_block=key_block)
    Wf, f0 = r * W, r * C
    fpos = f0 + jnp.arange(Wf)
    m = (fpos < r * E)[None, :, None].astype(mu.dtype)
    cond = lax.dynamic_slice_in_dim(caches.cond, f0, Wf, axis=0)
    z = lax.dynamic_slice_in_dim(noise, f0, Wf, axis=0)
    rest = jnp.concatenate([mu, jnp.broadcast_to(caches.spk, (Wf, caches.spk.shape[-1])), cond], axis=-1)
    rest2 = jnp.stack([rest, jnp.zeros_like(rest)])                      # CFG rows
    est = params["decoder"]["estimator"]
    n = ts.shape[0] - 1

    def body(i, carry):
        x, t, dt, dec_k, dec_v, tails = carry
        t_emb = _linear(est["time_mlp"]["linear_2"], jax.nn.silu(_linear(
            est["time_mlp"]["linear_1"], sinusoidal_time_emb(jnp.broadcast_to(t, (2,)), cfg.decoder.in_channels))))
        h = jnp.concatenate([jnp.stack([x, x]), rest2], axis=-1)
        unet = _UNetStep(est, cfg, m, t_emb, i, dec_k, dec_v, tails, f0, r * E, r * (C_new - C), key_block)
        v2 = unet(h)
        v = (1.0 + cfg_rate) * v2[0] - cfg_rate * v2[1]
        x = x + dt * v
        t = t + dt
        dt = ts[jnp.minimum(i + 2, n)] - t
        return x, t, dt, unet.dec_k, unet.dec_v, unet.tails

    x, _, _, dec_k, dec_v, tails = lax.fori_loop(
        0, n, body, (z, ts[0], ts[1] - ts[0], caches.dec_k, caches.dec_v, caches.dec_tails))
    return caches._replace(dec_k=dec_k, dec_v=dec_v, dec_tails=tails), x


@functools.partial(jax.jit, static_argnames=("cap_t", "cap_f", "heads"))
def _pos_tables(enc_params, *, cap_t: int, cap_f: int, heads: int):
    """``linear_pos`` of the relative-position tables of every encoder layer (param-only, once)."""
    def table(p, cap):
        D = p["kernel"].shape[0]
        t = _linear(p, espnet_rel_pos_emb(cap, D)[0])
        return t.reshape(t.shape[0], heads, D // heads)

    n = sum(1 for k in enc_params if k.startswith("encoders_"))
    n_up = sum(1 for k in enc_params if k.startswith("up_encoders_"))
    return {"enc": jnp.stack([table(enc_params[f"encoders_{i}"]["self_attn"]["linear_pos"], cap_t) for i in range(n)]),
            "up": jnp.stack([table(enc_params[f"up_encoders_{i}"]["self_attn"]["linear_pos"], cap_f)
                             for i in range(n_up)])}


@jax.jit
def _speaker(params, embedding):
    e = embedding / jnp.maximum(jnp.sqrt(jnp.sum(embedding * embedding)), 1e-12)
    return _linear(params["spk_embed_affine_layer"], e)


# ----------------------------------------------------------------------------- public API
class FlowStreamer:
    """Cached chunked flow inference for one utterance at a time (see the module docstring).

    ``start(prompt_token (S0,), prompt_feat (2*S0, 80), embedding (192,)) -> state``;
    ``push(state, tokens, finalize) -> (state, mel (F, 80))`` where ``tokens`` are all speech
    tokens received since the previous push. With ``finalize=False`` the last
    ``pre_lookahead_len`` tokens of the stream are look-ahead only (their frames come with a later
    push); the frames returned are those the official recompute path returns for that chunk.

    Args:
      params: flow params (``flow.params.from_torch`` / ``init_params``).
      max_frames: cache capacity in mel frames, prompt included (a multiple of
        ``2 * static_chunk_size``); memory grows linearly with it (module docstring).
      initial_frames: if set (a multiple of ``2 * static_chunk_size``), caches start with this
        capacity and double up to ``max_frames`` when needed (one more compile per tier).
      noise: ``"official"`` (fixed noise of the release), a ``jax.random`` key, or an array
        ``(>= max_frames, 80)``; frame ``f`` of every request uses row ``f``.
      key_block: attention reads cache prefixes in buckets of this many frames.
    """

    def __init__(self, params, cfg: FlowConfig, *, max_frames: int = 4096, noise: Any = "official",
                 n_timesteps: int | None = None, cfg_rate: float | None = None, key_block: int = 200,
                 initial_frames: int | None = None):
        ec, dc = cfg.encoder, cfg.decoder
        r, chunk = cfg.token_mel_ratio, ec.static_chunk_size
        if Solver(cfg.cfm.solver) is not Solver.EULER:
            raise ConfigError(f"FlowStreamer supports the Euler solver only (got {cfg.cfm.solver}); "
                              "set flow.cfm.solver=euler or use flow.modeling.inference")
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
        if initial_frames is not None and (initial_frames <= 0 or initial_frames % (r * chunk)
                                           or initial_frames > max_frames):
            raise ConfigError(f"initial_frames={initial_frames} must be a positive multiple of {r * chunk} and at "
                              f"most max_frames={max_frames} (or None: allocate max_frames at start)")
        if key_block <= 0 or key_block % r:
            raise ConfigError(f"key_block={key_block} must be a positive multiple of token_mel_ratio={r}")
        self.params, self.cfg = params, cfg
        self.max_frames, self.cap_t, self.key_block = max_frames, max_frames // r, key_block
        self.initial_frames = initial_frames or max_frames
        self.n_timesteps = int(n_timesteps or cfg.cfm.n_timesteps)
        self.cfg_rate = jnp.float32(cfg.cfm.inference_cfg_rate if cfg_rate is None else cfg_rate)
        self.ts = cfm_lib.t_span(self.n_timesteps, cfg.cfm.t_scheduler)
        if isinstance(noise, str) or cfm_lib._is_key(noise):
            self.noise = cfm_lib.initial_noise(noise, 1, max_frames, cfg.output_size)[0]
        else:
            noise = jnp.asarray(noise, jnp.float32)
            if noise.ndim != 2 or noise.shape[0] < max_frames or noise.shape[1] != cfg.output_size:
                raise ConfigError(f"noise array must be (>= max_frames={max_frames}, {cfg.output_size}), "
                                  f"got {noise.shape}")
            self.noise = noise[:max_frames]
        self.tables = _pos_tables(params["encoder"], cap_t=self.cap_t, cap_f=max_frames, heads=ec.attention_heads)

    # ---- helpers
    def _zero_caches(self, spk: Array, cond: Array, frames: int) -> StreamCaches:
        ec, dc, cfg = self.cfg.encoder, self.cfg.decoder, self.cfg
        D, H, tok = ec.output_size, ec.attention_heads, frames // cfg.token_mel_ratio
        n_att = dc.n_blocks * (dc.num_mid_blocks + 2)
        z = functools.partial(jnp.zeros, dtype=jnp.float32)
        return StreamCaches(
            spk=spk, cond=cond,
            enc_k=z((ec.num_blocks, tok, H, D // H)), enc_v=z((ec.num_blocks, tok, H, D // H)),
            up_tail=z((2 * ec.upsample_stride, D)),
            up_k=z((ec.num_up_blocks, frames, H, D // H)), up_v=z((ec.num_up_blocks, frames, H, D // H)),
            dec_k=z((n_att, self.n_timesteps, 2, frames, dc.num_heads, dc.attention_head_dim)),
            dec_v=z((n_att, self.n_timesteps, 2, frames, dc.num_heads, dc.attention_head_dim)),
            dec_tails={k: z((self.n_timesteps, 2, 2, c)) for k, c in _dec_tail_shapes(cfg).items()})

    def _grow(self, caches: StreamCaches, tokens_needed: int) -> StreamCaches:
        """Double the capacity (up to ``max_frames``) until ``tokens_needed`` tokens fit."""
        r = self.cfg.token_mel_ratio
        frames = caches.up_k.shape[1]
        new = frames
        while new < r * tokens_needed:
            new = min(self.max_frames, 2 * new)
        if new == frames:
            return caches
        pad_t, pad_f = (new - frames) // r, new - frames

        def pad(x, axis, n):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, n)
            return jnp.pad(x, widths)
        return caches._replace(enc_k=pad(caches.enc_k, 1, pad_t), enc_v=pad(caches.enc_v, 1, pad_t),
                               up_k=pad(caches.up_k, 1, pad_f), up_v=pad(caches.up_v, 1, pad_f),
                               dec_k=pad(caches.dec_k, 3, pad_f), dec_v=pad(caches.dec_v, 3, pad_f))

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
        """New utterance: ``prompt_token (S0,)``, ``prompt_feat (2*S0, 80)``, ``embedding (192,)``."""
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
        cond = jnp.zeros((self.max_frames, cfg.output_size), jnp.float32).at[: prompt_feat.shape[0]].set(prompt_feat)
        spk = _speaker(self.params, jnp.asarray(embedding))
        return FlowStreamState(tokens=prompt_token, n_prompt=S0, emitted=S0, committed=0, finalized=False,
                               caches=self._zero_caches(spk, cond, self.initial_frames))

    def push(self, state: FlowStreamState, tokens: np.ndarray, finalize: bool) -> tuple[FlowStreamState, np.ndarray]:
        """Add ``tokens`` (all new speech tokens) and return the new mel frames ``(F, 80)``."""
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
        caches = self._grow(state.caches, C + W)
        pos = np.arange(C - 2, C + W + L)
        ids = np.where((pos >= 0) & (pos < n), all_tok[np.clip(pos, 0, n - 1)], 0).astype(np.int32)
        caches, mel = _chunk(self.params, self.tables, self.noise, self.ts, self.cfg_rate, caches,
                             jnp.asarray(ids), np.int32(C), np.int32(E), np.int32(n),
                             cfg=cfg, W=W, key_block=self.key_block)
        out = np.asarray(mel)[r * (state.emitted - C): r * (E - C)]
        return FlowStreamState(tokens=all_tok, n_prompt=state.n_prompt, emitted=E, committed=(E // chunk) * chunk,
                               finalized=bool(finalize), caches=caches), out


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
