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
dim 1 of both operands: on XLA:CPU this is the fastest GEMV layout (docs/performance.md). The tied
``lm_head`` is not a parameter: CosyVoice only uses the backbone's last hidden state.

Shapes: B batch, T query positions, S key/cache slots, D model dim, N query heads, K kv heads,
H head dim, V vocabulary.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import LLMConfig, QwenConfig
from ..layers.dense import Embedding, Linear, quantize_rows
from ..layers.dtypes import compute_dtype
from ..layers.norm import RMSNorm
from ..layers.remat import remat_policy
from ..layers.rope import apply_rope, rope_cos_sin

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

    cfg: LLMConfig
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


def init_params(cfg: LLMConfig, key, *, quant: bool = False):
    """Random params (plain nested dict, boxes removed) for ``Qwen2LM(cfg)``."""
    model = Qwen2LM(cfg, quant=quant)
    x = jnp.zeros((1, 4, cfg.qwen.hidden_size), jnp.float32)
    variables = model.init(key, x, jnp.array([4], jnp.int32))
    return nn.meta.unbox(variables["params"])


def abstract_params(cfg: LLMConfig, *, quant: bool = False, boxed: bool = False):
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
