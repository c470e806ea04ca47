"""Whisper (Radford et al. 2022) encoder-decoder in Flax: the default ASR of the evaluation harness.

The layout and names follow Hugging Face ``WhisperForConditionalGeneration`` (``model.encoder.*``,
``model.decoder.*``; the output projection is tied to ``decoder.embed_tokens``), so a local HF
directory loads with a declarative rule table (:mod:`.params`). Shapes (B batch, F = 2 *
``max_source_positions`` mel frames, S = F / 2 encoder frames, T decoder tokens, D width)::

    log-mel (B, F, n_mels) ─ conv1 k3 ─ GELU ─ conv2 k3 s2 ─ GELU ─ + sinusoidal table ─▶ (B, S, D)
      ─▶ N x [ x + SelfAttn(LN(x)) ; x + MLP(LN(x)) ] ─ LN ─▶ encoder states
    tokens (B, T) ─ embed + learned positions ─▶ N x [ x + CausalSelfAttn(LN(x)) (KV cache)
      ; x + CrossAttn(LN(x), encoder states) ; x + MLP(LN(x)) ] ─ LN ─ @ embed^T ─▶ logits (B, T, V)

Attention as HF ``WhisperAttention``: ``q_proj``/``v_proj``/``out_proj`` with bias, ``k_proj``
without, scores ``q k^T / sqrt(head_dim)``. The S3 tokenizer's encoder (:mod:`..tokenizer.modeling`)
is Whisper-shaped too, but its blocks use RoPE and an FSMN memory and it has no final LayerNorm,
so only the exact GELU (:func:`..layers.activations.gelu`) is shared; the softmax-attend is the project's
:func:`..layers.attention._masked_softmax_attend`.

Decoding (:class:`.runtime.WhisperASR`) runs the decoder one position at a time on a
:class:`SelfCache` of capacity ``max_target_positions``; the cross-attention keys/values are
computed once per utterance (:meth:`Whisper.cross_kv`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..layers.attention import _masked_softmax_attend
from ..layers.activations import gelu


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """The sizes of a Whisper checkpoint (the fields of HF ``config.json`` that shape the network)."""

    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    max_target_positions: int = 448
    eos_token_id: int = 50257
    decoder_start_token_id: int = 50258

    @classmethod
    def from_hf(cls, d: dict) -> "WhisperConfig":
        """HF ``config.json`` dict -> config (unknown keys ignored; GELU is the only activation)."""
        act = d.get("activation_function", "gelu")
        if act != "gelu":
            raise ConfigError(f"Whisper config: activation_function={act!r}; only 'gelu' (every released "
                              "Whisper) is supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_hf(self) -> dict:
        return {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
                "activation_function": "gelu", **dataclasses.asdict(self)}

    @property
    def n_frames(self) -> int:
        """Mel frames of one encoder input (30 s for the released models)."""
        return 2 * self.max_source_positions


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's encoder position table ``(length, channels)``: ``[sin | cos]`` halves, timescales
    log-spaced from 1 to 10000 (HF stores it as ``encoder.embed_positions.weight``)."""
    inc = np.log(10000.0) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class SelfCache(NamedTuple):
    """Decoder self-attention keys/values: ``(layers, B, capacity, H, d)`` each."""

    k: jax.Array
    v: jax.Array


class Attention(nn.Module):
    """HF ``WhisperAttention``. ``__call__(x (B,T,D), kv (B,S,D) or None, mask (B|1,T,S) bool)``."""

    d_model: int
    heads: int

    def setup(self):
        d = self.d_model
        self.q_proj, self.v_proj, self.out_proj = nn.Dense(d), nn.Dense(d), nn.Dense(d)
        self.k_proj = nn.Dense(d, use_bias=False)

    def split(self, x):
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1)

    def keys_values(self, src):
        """``src (B, S, D)`` -> keys, values ``(B, S, H, d)``."""
        return self.split(self.k_proj(src)), self.split(self.v_proj(src))

    def attend(self, x, k, v, mask):
        q = self.split(self.q_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5)
        out = _masked_softmax_attend(scores, jnp.transpose(v, (0, 2, 1, 3)), mask)
        return self.out_proj(out)

    def __call__(self, x, src=None, mask=None):
        k, v = self.keys_values(x if src is None else src)
        return self.attend(x, k, v, mask)


class EncoderLayer(nn.Module):
    d_model: int
    heads: int
    ffn: int

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.d_model, self.heads, name="self_attn")(
            nn.LayerNorm(1e-5, name="self_attn_layer_norm")(x))
        y = nn.LayerNorm(1e-5, name="final_layer_norm")(x)
        return x + nn.Dense(self.d_model, name="fc2")(gelu(nn.Dense(self.ffn, name="fc1")(y)))


class DecoderLayer(nn.Module):
    d_model: int
    heads: int
    ffn: int

    def setup(self):
        self.self_attn = Attention(self.d_model, self.heads)
        self.encoder_attn = Attention(self.d_model, self.heads)
        self.self_attn_layer_norm = nn.LayerNorm(1e-5)
        self.encoder_attn_layer_norm = nn.LayerNorm(1e-5)
        self.final_layer_norm = nn.LayerNorm(1e-5)
        self.fc1 = nn.Dense(self.ffn)
        self.fc2 = nn.Dense(self.d_model)

    def cross_kv(self, enc):
        return self.encoder_attn.keys_values(enc)

    def __call__(self, x, self_kv, self_mask, cross_kv):
        """``self_kv``: the self-attention keys/values to attend (this call's own, or the cache
        already holding them); returns ``(x, (k, v) of this call's positions)``."""
        y = self.self_attn_layer_norm(x)
        k, v = self.self_attn.keys_values(y)
        if self_kv is None:
            kk, vv = k, v
        else:
            kk, vv = self_kv(k, v)
        x = x + self.self_attn.attend(y, kk, vv, self_mask)
        x = x + self.encoder_attn.attend(self.encoder_attn_layer_norm(x), cross_kv[0], cross_kv[1], None)
        y = self.final_layer_norm(x)
        return x + self.fc2(gelu(self.fc1(y))), (k, v)


class Whisper(nn.Module):
    """``WhisperForConditionalGeneration`` without generation logic.

    Methods: ``encode(mel (B, F, n_mels)) -> (B, S, D)``; ``cross_kv(enc)`` -> per-layer keys and
    values ``(layers, 2, B, S, H, d)``; ``decode(tokens (B, T), cross, offset, cache)`` -> ``(logits
    (B, T, V) float32, cache)`` with ``cache=None`` for a causal pass over the whole sequence (no
    cache kept) or a :class:`SelfCache` written at ``offset`` (int32 scalar); ``__call__(mel,
    tokens)`` = logits of a teacher-forced pass (what the parity test compares).
    """

    config: WhisperConfig

    def setup(self):
        c = self.config
        self.conv1 = nn.Conv(c.d_model, (3,), padding=[(1, 1)])
        self.conv2 = nn.Conv(c.d_model, (3,), strides=(2,), padding=[(1, 1)])
        self.encoder_positions = self.param("encoder_positions",
                                            lambda _k: jnp.asarray(sinusoids(c.max_source_positions, c.d_model)))
        self.encoder_layers = [EncoderLayer(c.d_model, c.encoder_attention_heads, c.encoder_ffn_dim)
                               for _ in range(c.encoder_layers)]
        self.encoder_norm = nn.LayerNorm(1e-5)
        self.embed_tokens = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(0.02))
        self.decoder_positions = self.param("decoder_positions", nn.initializers.normal(0.02),
                                            (c.max_target_positions, c.d_model))
        self.decoder_layers = [DecoderLayer(c.d_model, c.decoder_attention_heads, c.decoder_ffn_dim)
                               for _ in range(c.decoder_layers)]
        self.decoder_norm = nn.LayerNorm(1e-5)

    def encode(self, mel_bfc):
        c = self.config
        if mel_bfc.shape[1] != c.n_frames or mel_bfc.shape[2] != c.num_mel_bins:
            raise ConfigError(f"Whisper encoder input must be (B, {c.n_frames}, {c.num_mel_bins}) log-mel frames "
                              f"(pad/trim the audio to {c.n_frames // 100} s), got {tuple(mel_bfc.shape)}")
        x = gelu(self.conv1(mel_bfc))
        x = gelu(self.conv2(x))
        x = x + self.encoder_positions[None].astype(x.dtype)
        for layer in self.encoder_layers:
            x = layer(x)
        return self.encoder_norm(x)

    def cross_kv(self, enc):
        return jnp.stack([jnp.stack(layer.cross_kv(enc)) for layer in self.decoder_layers])

    def decode(self, tokens_bt, cross, offset=0, cache: SelfCache | None = None):
        b, t = tokens_bt.shape
        pos = jax.lax.dynamic_slice_in_dim(self.decoder_positions, offset, t, axis=0)
        x = self.embed_tokens(tokens_bt) + pos[None]
        qpos = offset + jnp.arange(t)
        new_k, new_v = [], []
        for i, layer in enumerate(self.decoder_layers):
            if cache is None:
                mask = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]
                x, _ = layer(x, None, mask, cross[i])
                continue
            kpos = jnp.arange(cache.k.shape[2])
            mask = (kpos[None, :] <= qpos[:, None])[None]

            def with_cache(k, v, i=i):
                ck = jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k.dtype), (0, offset, 0, 0))
                cv = jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v.dtype), (0, offset, 0, 0))
                new_k.append(ck)
                new_v.append(cv)
                return ck, cv

            x, _ = layer(x, with_cache, mask, cross[i])
        x = self.decoder_norm(x)
        logits = self.embed_tokens.attend(x).astype(jnp.float32)
        return logits, (None if cache is None else SelfCache(jnp.stack(new_k), jnp.stack(new_v)))

    def __call__(self, mel_bfc, tokens_bt):
        enc = self.encode(mel_bfc)
        return self.decode(tokens_bt, self.cross_kv(enc))[0]


def new_cache(cfg: WhisperConfig, batch: int, dtype: Any = jnp.float32) -> SelfCache:
    h = cfg.decoder_attention_heads
    z = jnp.zeros((cfg.decoder_layers, batch, cfg.max_target_positions, h, cfg.d_model // h), dtype)
    return SelfCache(z, z)
