"""S3Tokenizer v2: the CosyVoice 2 supervised semantic speech tokenizer (25 tokens/s, 6561 codes).

CosyVoice 2 paper, section 2.1; official module ``s3tokenizer.model_v2.S3TokenizerV2``
(torch names ``encoder.*`` and ``quantizer._codebook.*``, which the param tree mirrors).

Data flow (B batch, F mel frames at 100 Hz, S tokens at 25 Hz, D = 1280, N = 20 heads, H = 64)::

    log-mel (B, F, 128) ─ mask ─ conv1 k3 s2 ─ GELU ─ mask ─ conv2 k3 s2 ─ GELU ─▶ (B, S, D)
      ─▶ 6 x [ x + Attn(LN(x)) ; x + MLP(LN(x)) ] ─▶ FSQ (project_down 8, tanh, round) ─▶ ids

Attention block (``FSMNMultiHeadAttention``): q = Wq x + b, k = Wk x (no bias), v = Wv x + b;
RoPE (theta 1e4, half-split rotation, positions from 0) on q and k; q and k are each scaled by
H**-0.25; keys past the row length are masked; the FSMN memory ``m = (dwconv31(v*mask) + v*mask)
* mask`` (depthwise kernel 31, zero padding 15/15) is added to ``out(attn)``. MLP: 4x, exact GELU.

Long audio: the network is applied to windows of at most 30 s (3000 frames). Longer rows are cut
into 30 s windows every 26 s (4 s overlap) and the window outputs are merged by dropping
2 s (50 tokens) on each side of every inner boundary: exactly what s3tokenizer 0.3.0 does
(``S3TokenizerV2._quantize_mixed_batch`` + ``merge_tokenized_segments``), so tokens of long
files agree with the official extraction. :class:`SpeechTokenizer` implements this.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import SpeechTokenizerConfig
from ..errors import AudioError
from ..layers.rope import apply_rope, rope_cos_sin
from .fsq import FSQCodebook

_gelu = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731  torch.nn.GELU() default (erf)


def conv_out_len(lengths, kernel: int = 3, stride: int = 2, pad: int = 1):
    """Valid length after a strided conv: ``(L + 2p - k) // s + 1`` (0 stays 0)."""
    return jnp.maximum((lengths + 2 * pad - kernel) // stride + 1, 0) * (lengths > 0)


def length_mask(lengths, max_len: int):
    """(B,) lengths -> (B, max_len) bool validity."""
    return jnp.arange(max_len)[None, :] < lengths[:, None]


class FSMNMultiHeadAttention(nn.Module):
    """Self-attention with RoPE and an FSMN memory on v (``model_v2.FSMNMultiHeadAttention``)."""

    n_state: int
    n_head: int
    kernel_size: int = 31
    rope_theta: float = 10000.0

    @nn.compact
    def __call__(self, x_bsd, mask_bs):
        b, s, d = x_bsd.shape
        n, h = self.n_head, d // self.n_head
        q = nn.Dense(d, name="query")(x_bsd).reshape(b, s, n, h)
        k = nn.Dense(d, use_bias=False, name="key")(x_bsd).reshape(b, s, n, h)
        v = nn.Dense(d, name="value")(x_bsd)

        cos, sin = rope_cos_sin(jnp.arange(s), h, self.rope_theta)
        scale = h**-0.25
        q = apply_rope(q, cos, sin) * scale
        k = apply_rope(k, cos, sin) * scale

        # FSMN memory block: depthwise conv over time on the masked values, plus a residual.
        m = mask_bs[:, :, None].astype(v.dtype)
        vm = v * m
        left = (self.kernel_size - 1) // 2
        mem = nn.Conv(d, (self.kernel_size,), padding=[(left, self.kernel_size - 1 - left)],
                      feature_group_count=d, use_bias=False, name="fsmn_block")(vm)
        mem = (mem + vm) * m

        logits = jnp.einsum("bqnh,bknh->bnqk", q, k)
        logits = jnp.where(mask_bs[:, None, None, :], logits, -1e10)
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        att = jnp.einsum("bnqk,bknh->bqnh", w, v.reshape(b, s, n, h)).reshape(b, s, d)
        return nn.Dense(d, name="out")(att) + mem


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: attention (with FSMN memory) then a 4x GELU MLP (``model_v2.ResidualAttentionBlock``)."""

    n_state: int
    n_head: int
    kernel_size: int = 31
    rope_theta: float = 10000.0

    @nn.compact
    def __call__(self, x_bsd, mask_bs):
        d = self.n_state
        y = nn.LayerNorm(epsilon=1e-5, name="attn_ln")(x_bsd)
        x_bsd = x_bsd + FSMNMultiHeadAttention(d, self.n_head, self.kernel_size, self.rope_theta,
                                               name="attn")(y, mask_bs)
        y = nn.LayerNorm(epsilon=1e-5, name="mlp_ln")(x_bsd)
        y = nn.Dense(4 * d, name="mlp_0")(y)
        y = nn.Dense(d, name="mlp_2")(_gelu(y))
        return x_bsd + y


class AudioEncoderV2(nn.Module):
    """Log-mel (B, F, n_mels) + lengths (B,) -> hidden (B, S, D), token lengths (B,).

    ``S = ceil(F / 4)`` (two stride-2 convs, padding 1). Rows are independent: values past a
    row's length never reach its valid positions.
    """

    config: SpeechTokenizerConfig

    @nn.compact
    def __call__(self, mel_bfc, lengths_b):
        c = self.config
        d = c.n_audio_state
        x = mel_bfc * length_mask(lengths_b, mel_bfc.shape[1])[..., None]
        x = _gelu(nn.Conv(d, (3,), strides=(2,), padding=[(1, 1)], name="conv1")(x))
        lengths_b = conv_out_len(lengths_b)
        x = x * length_mask(lengths_b, x.shape[1])[..., None]
        x = _gelu(nn.Conv(d, (3,), strides=(2,), padding=[(1, 1)], name="conv2")(x))
        lengths_b = conv_out_len(lengths_b)
        mask = length_mask(lengths_b, x.shape[1])
        for i in range(c.n_audio_layer):
            x = ResidualAttentionBlock(d, c.n_audio_head, c.fsmn_kernel_size, c.rope_theta,
                                       name=f"blocks_{i}")(x, mask)
        return x, lengths_b


class S3TokenizerV2(nn.Module):
    """Encoder + FSQ. ``__call__(mel_bfc, lengths_b) -> (ids (B, S) int32, lengths (B,))``.

    Ids past a row's token length are set to 0. ``features`` returns the encoder hidden states
    and the pre-quantization projection (before tanh) as well.
    """

    config: SpeechTokenizerConfig = SpeechTokenizerConfig()

    def setup(self):
        self.encoder = AudioEncoderV2(self.config, name="encoder")
        self.quantizer = FSQCodebook(self.config.fsq_dim, self.config.fsq_levels, name="quantizer")

    def features(self, mel_bfc, lengths_b):
        """-> dict(hidden (B,S,D), z (B,S,8), ids (B,S), lengths (B,))."""
        h, lengths = self.encoder(mel_bfc, lengths_b)
        ids, z = self.quantizer(h)
        ids = jnp.where(length_mask(lengths, ids.shape[1]), ids, 0)
        return {"hidden": h, "z": z, "ids": ids, "lengths": lengths}

    def __call__(self, mel_bfc, lengths_b):
        out = self.features(mel_bfc, lengths_b)
        return out["ids"], out["lengths"]


# ----------------------------------------------------------------------------------- batched API
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def split_pow2(n: int, max_batch: int) -> list[int]:
    """Batch sizes covering ``n`` rows without padding: powers of two (at most ``max_batch``),
    largest first (13, 16 -> [8, 4, 1]); so at most log2(max_batch) + 1 shapes per length bucket."""
    sizes = []
    while n > 0:
        b = min(max_batch, 1 << (n.bit_length() - 1))
        sizes.append(b)
        n -= b
    return sizes


class SpeechTokenizer:
    """Batched, bucketed, jitted speech tokenization with long-audio windowing.

    ``tokenize(mels)`` takes a list of (F_i, 128) whisper log-mels (one per utterance, see
    ``cosyvoice2_jax.frontend.audio.whisper_log_mel``) and returns a list of int32 token arrays.

    Shapes given to the jitted network: utterances are grouped by frames rounded up to
    ``frame_bucket`` (at most the 3000-frame window), each group is cut into batches whose sizes
    are powers of two up to ``max_batch`` (:func:`split_pow2`: no padded rows); so a stream of
    requests compiles a handful of programs and short rows are not padded to the longest one. Rows longer than 30 s are windowed (module docstring).
    """

    WINDOW = 3000  # frames = 30 s at 100 Hz
    OVERLAP = 400  # frames = 4 s
    TOKEN_RATE = 25

    def __init__(self, params, config: SpeechTokenizerConfig = SpeechTokenizerConfig(), *,
                 frame_bucket: int = 500, max_batch: int = 16):
        self.params = params
        self.config = config
        self.frame_bucket = frame_bucket
        self.max_batch = max_batch
        self.model = S3TokenizerV2(config)
        self._fn = jax.jit(lambda p, m, l: self.model.apply({"params": p}, m, l, method="features"))

    # windows ------------------------------------------------------------------------------
    def _windows(self, n_frames: int) -> list[tuple[int, int]]:
        if n_frames <= self.WINDOW:
            return [(0, n_frames)]
        stride = self.WINDOW - self.OVERLAP
        out, start = [], 0
        while start < n_frames:
            out.append((start, min(start + self.WINDOW, n_frames)))
            start += stride
        return out

    def _merge(self, pieces: list[np.ndarray]) -> np.ndarray:
        if len(pieces) == 1:
            return pieces[0]
        drop = (self.OVERLAP // 100 // 2) * self.TOKEN_RATE  # 2 s = 50 tokens
        kept = []
        for i, p in enumerate(pieces):
            lo = 0 if i == 0 else drop
            hi = len(p) if i == len(pieces) - 1 else len(p) - drop
            kept.append(p[lo:hi])
        return np.concatenate(kept).astype(np.int32)

    # running ------------------------------------------------------------------------------
    def _batches(self, segs: list[np.ndarray]):
        """Group segments by frame bucket (little padding), then chunk each group by max_batch.
        Yields (indices, mel (B_pad, F_pad, n_mels), lengths (B_pad,))."""
        groups: dict[int, list[int]] = {}
        for i, seg in enumerate(segs):
            f_pad = min(_round_up(max(len(seg), 1), self.frame_bucket), self.WINDOW)
            groups.setdefault(f_pad, []).append(i)
        for f_pad in sorted(groups, reverse=True):
            members = groups[f_pad]
            start = 0
            for size in split_pow2(len(members), self.max_batch):
                idx = members[start:start + size]
                start += size
                mel = np.zeros((size, f_pad, self.config.n_mels), np.float32)
                lens = np.zeros((mel.shape[0],), np.int32)
                for r, i in enumerate(idx):
                    mel[r, :len(segs[i])] = segs[i]
                    lens[r] = len(segs[i])
                yield idx, mel, lens

    def _run(self, segs: list[np.ndarray], features: bool = False) -> list:
        """Segments of <= WINDOW frames -> token arrays (or feature dicts), in bucketed batches."""
        out: list = [None] * len(segs)
        for idx, mel, lens in self._batches(segs):
            res = self._fn(self.params, mel, lens)
            keys = ("ids", "lengths", "hidden", "z") if features else ("ids", "lengths")
            res = jax.device_get({k: res[k] for k in keys})
            for r, i in enumerate(idx):
                n = int(res["lengths"][r])
                if features:
                    out[i] = {k: np.asarray(res[k][r, :n]) for k in ("ids", "hidden", "z")}
                else:
                    out[i] = np.asarray(res["ids"][r, :n], np.int32)
        return out

    def _check(self, mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for u, mel in enumerate(mels):
            mel = np.asarray(mel, np.float32)
            if mel.ndim != 2 or mel.shape[1] != self.config.n_mels:
                raise AudioError(f"utterance {u}: expected a (frames, {self.config.n_mels}) whisper log-mel, "
                                 f"got shape {mel.shape}; compute it with frontend.audio.whisper_log_mel(wav_16k)")
            out.append(mel)
        return out

    def features(self, mels: Sequence[np.ndarray]) -> list[dict]:
        """Per utterance (<= 30 s each): dict(ids (S,), hidden (S, D), z (S, 8) before tanh)."""
        mels = self._check(mels)
        for u, mel in enumerate(mels):
            if mel.shape[0] > self.WINDOW:
                raise AudioError(f"utterance {u}: features() takes <= 30 s ({self.WINDOW} frames), got "
                                 f"{mel.shape[0]}; use tokenize() for long audio (windowed)")
        return self._run(mels, features=True)

    def tokenize(self, mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """List of (F_i, n_mels) log-mels -> list of (S_i,) int32 ids, S_i = ceil(F_i / 4)
        (long rows: merged windows, see the module docstring)."""
        segs, owner = [], []
        for u, mel in enumerate(self._check(mels)):
            for lo, hi in self._windows(mel.shape[0]):
                segs.append(mel[lo:hi])
                owner.append(u)
        toks = self._run(segs)
        result = []
        for u in range(len(mels)):
            result.append(self._merge([t for t, o in zip(toks, owner) if o == u]))
        return result

    def tokenize_wavs(self, wavs_16k: Sequence[np.ndarray]) -> list[np.ndarray]:
        """16 kHz mono float waveforms -> token arrays (features by the project front end)."""
        from ..frontend.audio import whisper_log_mel

        return self.tokenize([whisper_log_mel(w, self.config.n_mels) for w in wavs_16k])

    def compiled_programs(self) -> int:
        """Number of programs the jitted network has compiled so far."""
        return self._fn._cache_size()
