"""Qwen2 backbone and the CosyVoice 2 text-speech LM (``Qwen2LM``) in Flax Linen.

Paper: CosyVoice 2 (arXiv 2412.10117) section 2.3 ("Unified text-speech language model"); the
official module is ``cosyvoice/llm/llm.py:Qwen2LM`` around a HuggingFace ``Qwen2ForCausalLM``.

Parameter tree (mirrors the torch state-dict names so ``params.py`` stays a short table)::

    llm/model/model/embed_tokens/embedding            (V_text, D)
    llm/model/model/layers_{i}/self_attn/{q,k,v}_proj/{weight,bias}, o_proj/weight
    llm/model/model/layers_{i}/mlp/{gate,up,down}_proj/weight
    llm/model/model/layers_{i}/{input,post_attention}_layernorm/weight
    llm/model/model/norm/weight
    llm_embedding/embedding (2, D)     rows: 0 = sos/eos, 1 = task id
    speech_embedding/embedding (S+3, D), llm_decoder/{weight (S+3, D), bias}

With ``scan_layers`` the layers live under ``layers/`` with a leading layer axis instead.
Linear weights keep the torch layout ``(out, in)`` and are contracted with ``dot_general`` on
dim 1 of both operands: on XLA:CPU this is the fastest GEMV layout (notes/CPU_PERF.md). The tied
``lm_head`` is not a parameter: CosyVoice only uses the backbone's last hidden state.

Shapes: B batch, T query positions, S key/cache slots, D model dim, N query heads, K kv heads,
H head dim, V vocabulary.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import LMConfig, QwenConfig
from ..layers.remat import remat_policy
from ..layers.rope import apply_rope, rope_cos_sin

IGNORE_ID = -1

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    return _DTYPES[name]


def _fan_in_init(in_axis: int = 1):
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=in_axis, out_axis=0)


# ----------------------------------------------------------------------------------- int8 helpers
def quantize_rows(w_oi: jnp.ndarray):
    """Symmetric per-output-row int8 quantisation of a ``(out, in)`` weight -> (int8, scale (out,))."""
    w = jnp.asarray(w_oi, jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=1), 1e-12) / 127.0
    q = jnp.clip(jnp.round(w / scale[:, None]), -127, 127).astype(jnp.int8)
    return q, scale


def _int8_matmul(x, w_q, w_scale):
    """W8A8: per-row dynamic int8 activations x int8 weights -> int32 -> rescale (CPU_PERF.md)."""
    xf = x.astype(jnp.float32)
    a_scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), 1e-12) / 127.0
    xq = jnp.clip(jnp.round(xf / a_scale), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, w_q, (((x.ndim - 1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * a_scale * w_scale


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored ``(out, in)`` like ``torch.nn.Linear``.

    ``quant=True`` expects int8 ``weight`` plus a per-row ``scale`` (see :func:`quantize_params`)
    and runs the W8A8 path. ``pad_rows``: XLA:CPU only uses its fast (YNNPACK) dot for more than
    one row, so a single-row input is duplicated and the copy dropped (CPU_PERF.md).
    """

    features: int
    use_bias: bool = False
    axes: tuple[str, str] = ("mlp", "embed")
    dtype: Any = jnp.float32
    quant: bool = False
    pad_rows: bool = False

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        if self.quant:
            w = self.param("weight", nn.with_logical_partitioning(nn.initializers.zeros, self.axes),
                           (self.features, d_in), jnp.int8)
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes[:1]),
                               (self.features,), jnp.float32)
        else:
            w = self.param("weight", nn.with_logical_partitioning(_fan_in_init(1), self.axes),
                           (self.features, d_in), jnp.float32)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, d_in)
        single = self.pad_rows and x2.shape[0] == 1
        if single:
            x2 = jnp.concatenate([x2, x2], axis=0)
        if self.quant:
            y = _int8_matmul(x2, w, scale).astype(self.dtype)
        else:
            y = jax.lax.dot_general(x2.astype(self.dtype), w.astype(self.dtype),
                                    (((1,), (1,)), ((), ())))
        if single:
            y = y[:1]
        if self.use_bias:
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[:1]),
                           (self.features,), jnp.float32)
            y = y + b.astype(self.dtype)
        return y.reshape(*lead, self.features)


class Embedding(nn.Module):
    """Row lookup ``table[ids]`` (``torch.nn.Embedding``); param ``embedding`` (num, D)."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: ``w * x / sqrt(mean(x^2) + eps)``, statistics in fp32."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (w * xf.astype(self.dtype)).astype(self.dtype)


# ----------------------------------------------------------------------------------- backbone
class Qwen2Attention(nn.Module):
    """GQA self-attention with RoPE and q/k/v bias (HF ``Qwen2Attention``).

    Without a cache, keys are the ``T`` inputs themselves. With a cache ``(k, v)`` of shape
    ``(B, S, K, H)``, the new keys/values are first written at slots ``positions`` (per row), then
    the queries attend over all ``S`` slots; ``mask_bts`` selects the visible slots.
    """

    cfg: QwenConfig
    dtype: Any = jnp.float32
    quant: bool = False
    pad_rows: bool = False

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, mask_bts, positions_bt, cache=None):
        c = self.cfg
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        lin = dict(dtype=self.dtype, quant=self.quant, pad_rows=self.pad_rows)
        b, t, _ = x_btd.shape
        q = Linear(n * h, c.qkv_bias, ("heads", "embed"), name="q_proj", **lin)(x_btd).reshape(b, t, n, h)
        kk = Linear(k * h, c.qkv_bias, ("kv", "embed"), name="k_proj", **lin)(x_btd).reshape(b, t, k, h)
        vv = Linear(k * h, c.qkv_bias, ("kv", "embed"), name="v_proj", **lin)(x_btd).reshape(b, t, k, h)
        q = apply_rope(q, cos_bth, sin_bth)
        kk = apply_rope(kk, cos_bth, sin_bth)
        if cache is not None:
            k_cache, v_cache = cache
            rows = jnp.arange(b)[:, None]
            k_cache = k_cache.at[rows, positions_bt].set(kk.astype(k_cache.dtype))
            v_cache = v_cache.at[rows, positions_bt].set(vv.astype(v_cache.dtype))
            keys, values, new_cache = k_cache, v_cache, (k_cache, v_cache)
        else:
            keys, values, new_cache = kk, vv, None
        g = n // k
        qg = q.reshape(b, t, k, g, h)
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, keys.astype(self.dtype)).astype(jnp.float32)
        scores = scores * (h ** -0.5)
        scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, values.astype(self.dtype)).reshape(b, t, n * h)
        out = Linear(c.hidden_size, False, ("embed", "heads"), name="o_proj", **lin)(out)
        return out, new_cache


class Qwen2MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    cfg: QwenConfig
    dtype: Any = jnp.float32
    quant: bool = False
    pad_rows: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        lin = dict(dtype=self.dtype, quant=self.quant, pad_rows=self.pad_rows)
        gate = Linear(c.intermediate_size, False, ("mlp", "embed"), name="gate_proj", **lin)(x)
        up = Linear(c.intermediate_size, False, ("mlp", "embed"), name="up_proj", **lin)(x)
        return Linear(c.hidden_size, False, ("embed", "mlp"), name="down_proj", **lin)(jax.nn.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    cfg: QwenConfig
    dtype: Any = jnp.float32
    quant: bool = False
    pad_rows: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, positions, cache=None):
        c = self.cfg
        kw = dict(dtype=self.dtype, quant=self.quant, pad_rows=self.pad_rows)
        h, new_cache = Qwen2Attention(c, name="self_attn", **kw)(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), cos, sin, mask, positions, cache)
        x = x + h
        x = x + Qwen2MLP(c, name="mlp", **kw)(RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
        return x, new_cache


class _ScanLayer(nn.Module):
    """Adapter so ``nn.scan`` can carry the hidden state and scan over per-layer caches."""

    cfg: QwenConfig
    dtype: Any = jnp.float32
    quant: bool = False
    pad_rows: bool = False

    @nn.compact
    def __call__(self, x, cache, cos, sin, mask, positions):
        layer = Qwen2DecoderLayer(self.cfg, self.dtype, self.quant, self.pad_rows, name="layer")
        layer_cache = cache if isinstance(cache, tuple) else None
        x, new_cache = layer(x, cos, sin, mask, positions, layer_cache)
        return x, (new_cache if layer_cache is not None else cache)


class Qwen2Model(nn.Module):
    """HF ``Qwen2Model`` (``llm.model.model``): embeddings, decoder layers, final norm.

    ``__call__(inputs_embeds (B,T,D), positions (B,T), mask (B,T,S), cache)`` returns the final
    normed hidden states (B,T,D) (HF ``hidden_states[-1]``) and the updated cache. The cache is
    ``None`` or a pair ``(k, v)``: stacked arrays ``(num_layers, B, S, K, H)`` (required with
    ``scan_layers``) or, unrolled, tuples of per-layer ``(B, S, K, H)`` arrays (no re-stacking
    copies in decode).
    """

    cfg: QwenConfig
    dtype: Any = jnp.float32
    scan_layers: bool = False
    quant: bool = False
    pad_rows: bool = False
    remat: str = "none"  # training: per-layer rematerialisation policy (layers/remat.py)

    def setup(self):
        c = self.cfg
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, self.dtype)
        kw = dict(dtype=self.dtype, quant=self.quant, pad_rows=self.pad_rows)
        policy = remat_policy(self.remat)
        if self.scan_layers:
            block = _ScanLayer if self.remat == "none" else nn.remat(_ScanLayer, policy=policy, prevent_cse=False)
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, **kw)
        else:
            block = Qwen2DecoderLayer if self.remat == "none" else nn.remat(Qwen2DecoderLayer, policy=policy)
            self.layers = [block(c, **kw) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

    def __call__(self, inputs_embeds, positions, mask, cache=None):
        c = self.cfg
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, self.dtype)
        x = inputs_embeds.astype(self.dtype)
        if self.scan_layers:
            # nn.scan needs something to scan over: a dummy per-layer array stands for "no cache"
            xs = jnp.zeros((c.num_hidden_layers,), jnp.int32) if cache is None else cache
            x, new_cache = self.layers(x, xs, cos, sin, mask, positions)
            new_cache = None if cache is None else new_cache
        else:
            # per-layer buffers (tuples) are updated in place; a stacked array is sliced and re-stacked
            per_layer = cache is not None and isinstance(cache[0], (tuple, list))
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else (cache[0][i], cache[1][i])
                x, lc = layer(x, cos, sin, mask, positions, layer_cache)
                if lc is not None:
                    new_k.append(lc[0])
                    new_v.append(lc[1])
            if cache is None:
                new_cache = None
            elif per_layer:
                new_cache = (tuple(new_k), tuple(new_v))
            else:
                new_cache = (jnp.stack(new_k), jnp.stack(new_v))
        return self.norm(x), new_cache


class Qwen2ForCausalLM(nn.Module):
    """Holds ``model`` only: the tied ``lm_head`` is never used by CosyVoice (hidden states only)."""

    cfg: QwenConfig
    dtype: Any = jnp.float32
    scan_layers: bool = False
    quant: bool = False
    pad_rows: bool = False
    remat: str = "none"

    def _inner(self) -> nn.Module:
        return Qwen2Model(self.cfg, self.dtype, self.scan_layers, self.quant, self.pad_rows, self.remat)

    def setup(self):
        self.model = self._inner()

    def __call__(self, inputs_embeds, positions, mask, cache=None):
        return self.model(inputs_embeds, positions, mask, cache)


class Qwen2Encoder(Qwen2ForCausalLM):
    """``cosyvoice.llm.llm.Qwen2Encoder``: its torch attribute ``model`` is the HF causal LM, so the
    param path is ``llm/model/model/...`` as in ``llm.pt``."""

    def _inner(self) -> nn.Module:
        return Qwen2ForCausalLM(self.cfg, self.dtype, self.scan_layers, self.quant, self.pad_rows, self.remat)


# ----------------------------------------------------------------------------------- masks / positions
def causal_padding_mask(lengths_b, t: int):
    """Training/prefill mask (B, T, T): key ``s`` visible to query ``t`` iff ``s <= t`` and ``s < len``.

    Same as HF Qwen2 with a right-padded 2-D ``attention_mask`` (padded query rows see the valid
    keys; their outputs are ignored or, in the official DPO code, averaged in).
    """
    s = jnp.arange(t)
    return (s[None, None, :] <= s[None, :, None]) & (s[None, None, :] < lengths_b[:, None, None])


def cache_mask(positions_bt, num_slots: int):
    """Mask over cache slots (B, T, S): slot ``s`` visible to a query at position ``p`` iff ``s <= p``."""
    return jnp.arange(num_slots)[None, None, :] <= positions_bt[:, :, None]


# ----------------------------------------------------------------------------------- Qwen2LM
class Qwen2LM(nn.Module):
    """CosyVoice 2 LM: ``Qwen2Encoder`` + ``llm_embedding`` (sos, task) + speech embedding/head.

    Methods (use with ``apply(..., method=...)``):
      * ``embed_text(ids)``, ``embed_speech(ids)``, ``embed_special(ids)`` -> (..., D)
      * ``backbone(x, positions, mask, cache)`` -> hidden (B,T,D), cache
      * ``speech_logits(hidden)`` -> (..., S+3) (``llm_decoder``)
      * ``__call__(lm_input (B,T,D), lengths (B,))`` -> logits (B,T,S+3): the training forward.
    """

    cfg: LMConfig
    quant: bool = False
    pad_rows: bool = False
    remat: str = "none"  # training: per-decoder-layer remat policy (layers/remat.py)

    def setup(self):
        c = self.cfg
        dt = compute_dtype(c.dtype)
        d = c.qwen.hidden_size
        self.llm_embedding = Embedding(2, d, dt)
        self.llm = Qwen2Encoder(c.qwen, dt, c.scan_layers, self.quant, self.pad_rows, self.remat)
        self.llm_decoder = Linear(c.speech_vocab, True, ("vocab", "embed"), dt, self.quant, self.pad_rows)
        self.speech_embedding = Embedding(c.speech_vocab, d, dt)

    def embed_text(self, ids):
        return self.llm.model.model.embed_tokens(ids)

    def embed_speech(self, ids):
        return self.speech_embedding(ids)

    def embed_special(self, ids):
        return self.llm_embedding(ids)

    def backbone(self, x_btd, positions_bt, mask_bts, cache=None):
        return self.llm(x_btd, positions_bt, mask_bts, cache)

    def speech_logits(self, hidden):
        return self.llm_decoder(hidden)

    def hidden_states(self, lm_input_btd, lengths_b):
        b, t, _ = lm_input_btd.shape
        positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        h, _ = self.backbone(lm_input_btd, positions, causal_padding_mask(lengths_b, t))
        return h

    def __call__(self, lm_input_btd, lengths_b):
        # touch every submodule so init creates all params
        h = self.hidden_states(lm_input_btd, lengths_b)
        _ = self.embed_text(jnp.zeros((1,), jnp.int32)), self.embed_speech(jnp.zeros((1,), jnp.int32))
        _ = self.embed_special(jnp.zeros((1,), jnp.int32))
        return self.speech_logits(h)


def init_params(cfg: LMConfig, key, *, quant: bool = False):
    """Random params (plain nested dict, boxes removed) for ``Qwen2LM(cfg)``."""
    model = Qwen2LM(cfg, quant=quant)
    x = jnp.zeros((1, 4, cfg.qwen.hidden_size), jnp.float32)
    variables = model.init(key, x, jnp.array([4], jnp.int32))
    return nn.meta.unbox(variables["params"])


def abstract_params(cfg: LMConfig, *, quant: bool = False, boxed: bool = False):
    """``jax.eval_shape`` of the param tree (no memory, no FLOPs); ``boxed`` keeps logical axes."""
    model = Qwen2LM(cfg, quant=quant)

    def f(key):
        x = jnp.zeros((1, 4, cfg.qwen.hidden_size), jnp.float32)
        return model.init(key, x, jnp.array([4], jnp.int32))["params"]

    tree = jax.eval_shape(f, jax.random.PRNGKey(0))
    return tree if boxed else nn.meta.unbox(tree)


def quantize_params(params):
    """fp32 params -> the ``quant=True`` tree: every 2-D ``weight`` of a Linear becomes int8 + ``scale``.

    Embedding tables and norms stay fp32. Use with ``Qwen2LM(cfg, quant=True)``.
    """
    def rec(node, path):
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out[k] = rec(v, path + (k,))
            elif k == "weight" and getattr(v, "ndim", 0) >= 2:
                if v.ndim == 2:
                    q, s = quantize_rows(v)
                else:  # scanned layers: (L, out, in)
                    q, s = jax.vmap(quantize_rows)(v)
                out["weight"], out["scale"] = q, s
            else:
                out[k] = v
        return out
    return rec(params, ())


def stack_layers(params, num_layers: int):
    """Unrolled ``layers_{i}`` -> scanned ``layers/layer`` (leading layer axis); other keys unchanged."""
    p = dict(params)
    llm = p["llm"]["model"]["model"]
    layers = [llm[f"layers_{i}"] for i in range(num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    new = {k: v for k, v in llm.items() if not k.startswith("layers_")}
    new["layers"] = {"layer": stacked}
    return {**p, "llm": {"model": {"model": new}}}


def unstack_layers(params, num_layers: int):
    """Inverse of :func:`stack_layers`."""
    p = dict(params)
    llm = p["llm"]["model"]["model"]
    stacked = llm["layers"]["layer"]
    new = {k: v for k, v in llm.items() if k != "layers"}
    for i in range(num_layers):
        new[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return {**p, "llm": {"model": {"model": new}}}


# ----------------------------------------------------------------------------------- training
def choose_bistream(key, text_len_b, speech_len_b, mix_ratio=(5, 15), prob: float = 0.5):
    """Per-example sequence type, the official rule: bistream with probability ``prob`` and only
    when ``speech_len / text_len > mix[1] / mix[0]`` (so every full text chunk has a full speech
    chunk). Returns a bool (B,)."""
    u = jax.random.uniform(key, text_len_b.shape)
    return bistream_from_uniforms(u, text_len_b, speech_len_b, mix_ratio, prob)


def bistream_from_uniforms(u_b, text_len_b, speech_len_b, mix_ratio=(5, 15), prob: float = 0.5):
    a, s = mix_ratio
    return (u_b < prob) & (speech_len_b * a > s * text_len_b)


def sequence_layout(text_len_b, speech_len_b, bistream_b, t_out: int, speech_token_size: int,
                    mix_ratio=(5, 15)):
    """Index form of ``Qwen2LM.prepare_lm_input_target`` for fixed length ``t_out``.

    Row layout (paper section 2.3; official ``prepare_lm_input_target``), ``a:s`` = mix ratio:
      * unistream: ``[sos, text, task, speech]`` -> targets ``[-1]*(1+Lt), speech, eos``;
      * bistream: ``sos``, then ``Lt // a`` full chunks ``[a text, s speech]`` with targets
        ``[-1]*(a-1), s speech, fill``, then a tail ``[rest text, task, rest speech]`` with
        targets ``[-1]*len(rest text), rest speech, eos``.
    Both have length ``Lt + Ls + 2``; unistream is the bistream formula with zero full chunks.

    Returns ``(src_kind, src_idx, target, length)``: kind per position (B,T) in
    {0 sos, 1 task, 2 text, 3 speech, 4 pad}, the index into the text/speech sequence, the target
    id (-1 = ignored) and the row length (B,).
    """
    a, s = mix_ratio
    w = a + s
    eos, fill = speech_token_size, speech_token_size + 2
    lt, ls = text_len_b[:, None], speech_len_b[:, None]
    nfull = jnp.where(bistream_b, text_len_b // a, 0)[:, None]
    p = jnp.arange(t_out)[None, :]
    q = p - 1                                  # position after sos
    j, o = q // w, q % w                       # chunk index / offset inside a full chunk
    in_full = (q >= 0) & (j < nfull)
    u = q - w * nfull                          # offset inside the tail
    r = lt - a * nfull                         # text tokens in the tail
    rest = ls - s * nfull                      # speech tokens in the tail
    length = lt + ls + 2

    # full chunks
    f_kind = jnp.where(o < a, 2, 3)
    f_idx = jnp.where(o < a, a * j + o, s * j + o - a)
    f_tgt = jnp.where(o < a - 1, IGNORE_ID, jnp.where(o < w - 1, 0, fill))
    f_tgt_idx = s * j + o - (a - 1)
    # tail
    t_kind = jnp.where(u < r, 2, jnp.where(u == r, 1, 3))
    t_idx = jnp.where(u < r, a * nfull + u, s * nfull + u - r - 1)
    k = u - r                                  # target k of the tail: speech[s*n + k] or eos
    t_tgt = jnp.where(u < r, IGNORE_ID, jnp.where(k < rest, 0, eos))
    t_tgt_idx = s * nfull + k

    kind = jnp.where(q < 0, 0, jnp.where(in_full, f_kind, t_kind))
    idx = jnp.where(q < 0, 0, jnp.where(in_full, f_idx, t_idx))
    tgt_is_speech = jnp.where(in_full, (o >= a - 1) & (o < w - 1), (u >= r) & (k < rest)) & (q >= 0)
    tgt = jnp.where(q < 0, IGNORE_ID, jnp.where(in_full, f_tgt, t_tgt))
    tgt_idx = jnp.where(in_full, f_tgt_idx, t_tgt_idx)
    valid = p < length
    tgt = jnp.where(valid, tgt, IGNORE_ID)
    kind = jnp.where(valid, kind, 4)
    idx = jnp.where(valid, jnp.maximum(idx, 0), 0)
    return kind, idx, tgt, tgt_is_speech & valid, jnp.maximum(tgt_idx, 0), length[:, 0]


def prepare_lm_input_target(text_emb_bld, speech_emb_bsd, special_emb_2d, text_len_b, speech_token_bs,
                            speech_len_b, bistream_b, t_out: int, speech_token_size: int,
                            mix_ratio=(5, 15), pad_value: float = float(IGNORE_ID)):
    """Fixed-shape ``prepare_lm_input_target``: lm_input (B,T,D), lm_target (B,T), lengths (B,).

    Padded input positions hold ``pad_value`` (the official ``pad_sequence(padding_value=-1)``).
    """
    kind, idx, tgt, tgt_is_speech, tgt_idx, length = sequence_layout(
        text_len_b, speech_len_b, bistream_b, t_out, speech_token_size, mix_ratio)
    b, lmax, d = text_emb_bld.shape
    smax = speech_emb_bsd.shape[1]
    dt = text_emb_bld.dtype
    table = jnp.concatenate([
        jnp.broadcast_to(special_emb_2d[None].astype(dt), (b, 2, d)),
        text_emb_bld, speech_emb_bsd.astype(dt), jnp.full((b, 1, d), pad_value, dt)], axis=1)
    offset = jnp.select([kind == 0, kind == 1, kind == 2, kind == 3], [0, 1, 2, 2 + lmax], 2 + lmax + smax)
    gather = jnp.where(kind >= 2, offset + idx, offset)
    gather = jnp.where(kind == 4, 2 + lmax + smax, gather)
    lm_input = jnp.take_along_axis(table, gather[..., None], axis=1)
    speech_tgt = jnp.take_along_axis(speech_token_bs, jnp.minimum(tgt_idx, smax - 1), axis=1)
    lm_target = jnp.where(tgt_is_speech, speech_tgt, tgt)
    return lm_input, lm_target.astype(jnp.int32), length.astype(jnp.int32)


def ce_loss(logits_btv, target_bt, lsm_weight: float = 0.0, normalize_length: bool = True):
    """Official ``LabelSmoothingLoss`` (KL to the smoothed one-hot, -1 ignored) and ``th_accuracy``.

    Returns ``(loss, acc)``; the loss is divided by the number of valid targets when
    ``normalize_length`` else by the batch size.
    """
    v = logits_btv.shape[-1]
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    valid = target_bt != IGNORE_ID
    tgt = jnp.where(valid, target_bt, 0)
    lp_t = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    conf = 1.0 - lsm_weight
    if lsm_weight > 0:
        off = lsm_weight / (v - 1)
        kl = (conf * (np.log(conf) - lp_t)
              + off * ((v - 1) * np.log(off) - (jnp.sum(logp, -1) - lp_t)))
    else:
        kl = -lp_t
    total = jnp.sum(valid)
    denom = total if normalize_length else logits_btv.shape[0]
    loss = jnp.sum(jnp.where(valid, kl, 0.0)) / denom
    pred = jnp.argmax(logits_btv, axis=-1)
    acc = jnp.sum((pred == target_bt) & valid) / total
    return loss, acc


def target_logps(logits_btv, target_bt, official_mask: bool = True):
    """Mean per-position target log-prob of each row, as the official ``forward_dpo``.

    The official code multiplies by ``target == IGNORE_ID`` (so it averages the log-prob of token
    0 at the *ignored* positions, padding included) and divides by the padded length; it also
    uses the chosen rows' mask for the rejected rows. ``official_mask=False`` gives the intended
    mean over valid targets instead.
    """
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    ignore = target_bt == IGNORE_ID
    lp = jnp.take_along_axis(logp, jnp.where(ignore, 0, target_bt)[..., None], axis=-1)[..., 0]
    if official_mask:
        return jnp.mean(lp * ignore, axis=-1)
    valid = ~ignore
    return jnp.sum(lp * valid, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1)


def lm_forward(model: Qwen2LM, params, batch: Mapping, bistream_b, t_out: int):
    """``Qwen2LM.forward``: batch with ``text_token (B,L)``, ``text_token_len``, ``speech_token
    (B,S)``, ``speech_token_len``; returns dict(loss, acc, logits, lm_target, lm_input, lengths)."""
    cfg = model.cfg
    v = {"params": params}
    text_emb = model.apply(v, batch["text_token"], method=Qwen2LM.embed_text)
    speech_emb = model.apply(v, batch["speech_token"], method=Qwen2LM.embed_speech)
    special = model.apply(v, jnp.arange(2), method=Qwen2LM.embed_special)
    lm_input, lm_target, lengths = prepare_lm_input_target(
        text_emb, speech_emb, special, batch["text_token_len"], batch["speech_token"],
        batch["speech_token_len"], bistream_b, t_out, cfg.speech_token_size, cfg.mix_ratio)
    logits = model.apply(v, lm_input, lengths)
    loss, acc = ce_loss(logits, lm_target, cfg.lsm_weight, cfg.length_normalized_loss)
    return {"loss": loss, "acc": acc, "logits": logits, "lm_target": lm_target, "lm_input": lm_input,
            "lengths": lengths}


def lm_forward_dpo(model: Qwen2LM, params, batch: Mapping, bistream_2b, t_out: int,
                   official_mask: bool = True):
    """``Qwen2LM.forward_dpo``: chosen (``speech_token``) and rejected (``reject_speech_token``)
    sequences in one batch of 2B; returns loss/acc on the chosen rows and chosen/rejected logps.
    ``bistream_2b`` holds the per-example choice for the chosen rows then the rejected rows."""
    b = batch["text_token"].shape[0]
    sp, rj = batch["speech_token"], batch["reject_speech_token"]
    smax = max(sp.shape[1], rj.shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, smax - x.shape[1])))  # noqa: E731
    both = {
        "text_token": jnp.concatenate([batch["text_token"]] * 2),
        "text_token_len": jnp.concatenate([batch["text_token_len"]] * 2),
        "speech_token": jnp.concatenate([pad(sp), pad(rj)]),
        "speech_token_len": jnp.concatenate([batch["speech_token_len"], batch["reject_speech_token_len"]]),
    }
    out = lm_forward(model, params, both, bistream_2b, t_out)
    logits, tgt = out["logits"], out["lm_target"]
    loss, acc = ce_loss(logits[:b], tgt[:b], model.cfg.lsm_weight, model.cfg.length_normalized_loss)
    if official_mask:
        ignore_c = tgt[:b] == IGNORE_ID
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lp = jnp.take_along_axis(logp, jnp.where(tgt == IGNORE_ID, 0, tgt)[..., None], axis=-1)[..., 0]
        chosen = jnp.mean(lp[:b] * ignore_c, axis=-1)
        rejected = jnp.mean(lp[b:] * ignore_c, axis=-1)
    else:
        chosen = target_logps(logits[:b], tgt[:b], False)
        rejected = target_logps(logits[b:], tgt[b:], False)
    return {"loss": loss, "acc": acc, "chosen_logps": chosen, "rejected_logps": rejected}
