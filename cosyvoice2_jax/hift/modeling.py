"""HiFT vocoder: mel (50 Hz) -> 24 kHz waveform (HiFTNet = neural source filter + iSTFTNet).

Paper: Li et al., "HiFTNet" (arXiv 2309.09493); CosyVoice 2 (arXiv 2412.10117) uses it unchanged.
Official modules: ``cosyvoice/hifigan/generator.py`` (``HiFTGenerator``, ``SourceModuleHnNSF2``,
``SineGen2``, ``ResBlock``), ``cosyvoice/hifigan/f0_predictor.py`` (``ConvRNNF0Predictor``),
``cosyvoice/transformer/activation.py`` (``Snake``). Submodule names follow the torch names
(``ups_0`` <-> ``ups.0``) so ``params.py`` stays a short table.

Pipeline (all arrays channel-last; F mel frames, W = 480 F samples, N = 120 F + 1 STFT frames):

1. ``f0 = |Linear(ELU(conv)^5(mel))|``                                    (B, F)
2. NSF source: harmonics h = 1..9 of f0, phase accumulated at frame rate and linearly
   upsampled x480, ``sin`` x 0.1 on voiced samples (f0 > 10 Hz) + Gaussian noise, merged
   by ``tanh(l_linear(.))``                                                (B, W)
3. decode: conv_pre -> 3 x [leaky_relu(0.1), transposed conv x8/x5/x3, + source branch
   (STFT of the source, strided conv, ResBlock), mean of 3 Snake ResBlocks]
   -> leaky_relu(0.01) -> conv_post -> (log-magnitude, phase) -> iSTFT (n_fft 16, hop 4)
   -> clip to +-0.99                                                       (B, W)

Batching: every function takes optional per-row ``lengths`` (mel frames). Padded positions
are zeroed before every convolution and the STFT reflection, interpolation clamp and iSTFT
window envelope use each row's own length, so a padded batch equals the rows run one by one.

Dtype (``HiFTConfig.dtype``): the convolutions run in the compute dtype (bf16 with
``"bfloat16"``; params stay fp32); Snake, the residual sums, the F0 classifier, the whole NSF
source (phase prefix sum included), the STFT/iSTFT and the output stay float32.

Randomness: the only random draw that reaches the waveform is the source noise
``(B, W, 9)`` standard normal (pass ``key`` or ``noise``). The official ``SineGen2`` also
draws a random initial phase per harmonic, but adds it to sample 0 only, and the following
linear x1/480 resampling reads samples ``480 d + 239`` and ``480 d + 240`` only, so the draw
never reaches the output (tests check this against the official module); we omit it.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import aot
from ..config import F0PredictorConfig, HiFTConfig
from ..errors import AudioError, ConfigError
from ..layers.conv import Conv1d, ConvTranspose1d

Array = jax.Array


# ----------------------------------------------------------------------------------- helpers
def compute_dtype(cfg: HiFTConfig):
    """The generator's conv compute dtype (``HiFTConfig.dtype``: ``"float32"`` or ``"bfloat16"``)."""
    try:
        return jnp.dtype(cfg.dtype)
    except TypeError:
        raise ConfigError(f"hift.dtype={cfg.dtype!r} is not a dtype; use float32 or bfloat16") from None


def time_mask(lengths: Optional[Array], t: int) -> Optional[Array]:
    """``(B,)`` valid lengths -> ``(B, t, 1)`` float mask, or ``None`` when lengths is None."""
    if lengths is None:
        return None
    return (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]


def _masked(x: Array, mask: Optional[Array]) -> Array:
    return x if mask is None else x * mask


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _sin2_poly(y: Array) -> Array:
    """``sin(y)**2`` via range reduction to ``r = y - k*pi`` (|r| <= pi/2) and an odd polynomial.

    Measured max abs error 2.6e-7 for |y| <= 3000 (``jnp.sin(y)**2``: 9e-8; Cody-Waite split of
    pi keeps the reduction exact enough); cheaper than ``jnp.sin`` on XLA:CPU. In the full
    generator it moves the waveform by < 5e-6 (tests/test_hift.py).
    """
    k = jnp.round(y * (1.0 / math.pi))
    r = y - k * 3.140625                     # pi = 3.140625 + 9.67502593994140625e-04 + ...
    r = r - k * 9.67502593994140625e-04
    r = r - k * 1.509957990978376432e-07
    r2 = r * r
    # odd degree-11 polynomial for sin on [-pi/2, pi/2] (near-Taylor coefficients)
    p = -2.3889859e-08
    p = p * r2 + 2.7525562e-06
    p = p * r2 - 1.9840874e-04
    p = p * r2 + 8.3333310e-03
    p = p * r2 - 1.6666667e-01
    s = r + r * r2 * p
    return s * s


class Snake(nn.Module):
    """Snake activation ``x + sin(alpha x)^2 / (alpha + 1e-9)`` (Ziyin et al. 2020), ``alpha (C,)``.

    ``fast=True`` evaluates ``sin^2`` with :func:`_sin2_poly` (inference speed on CPU).
    """

    fast: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        alpha = self.param("alpha", nn.initializers.ones, (x.shape[-1],), jnp.float32).astype(jnp.float32)
        x = x.astype(jnp.float32)  # sin of a large argument needs fp32 whatever the compute dtype
        ax = x * alpha
        s2 = _sin2_poly(ax) if self.fast else jnp.square(jnp.sin(ax))
        return x + (1.0 / (alpha + 1e-9)) * s2


class ResBlock(nn.Module):
    """HiFi-GAN/BigVGAN residual block: per dilation d, ``x += conv(snake(conv_d(snake(x))))``.

    ``(B, T, C) -> (B, T, C)``; official ``generator.ResBlock`` (weight-normed convs).
    """

    channels: int
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 3, 5)
    fast_snake: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
        k = self.kernel_size
        x = x.astype(jnp.float32)  # the residual sum stays fp32; the convs run in the compute dtype
        for j, d in enumerate(self.dilations):
            xt = Snake(self.fast_snake, name=f"activations1_{j}")(x)
            xt = Conv1d(self.channels, k, dilation=d, padding=get_padding(k, d), weight_norm=True,
                        name=f"convs1_{j}", dtype=self.dtype)(_masked(xt, mask))
            xt = Snake(self.fast_snake, name=f"activations2_{j}")(xt)
            xt = Conv1d(self.channels, k, padding=get_padding(k, 1), weight_norm=True,
                        name=f"convs2_{j}", dtype=self.dtype)(_masked(xt, mask))
            x = xt + x
        return x


# ----------------------------------------------------------------------------------- F0 predictor
class ConvRNNF0Predictor(nn.Module):
    """``mel (B, F, n_mels) -> f0 (B, F)`` in Hz: 5 x (weight-normed conv k3 + ELU), Linear, abs.

    Official ``f0_predictor.ConvRNNF0Predictor``; convs are ``condnet_{0,2,4,6,8}`` as in torch.
    """

    cfg: F0PredictorConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, mel: Array, mask: Optional[Array] = None) -> Array:
        x = mel
        for i in range(self.cfg.num_layers):
            x = Conv1d(self.cfg.cond_channels, 3, padding=1, weight_norm=True,
                       name=f"condnet_{2 * i}", dtype=self.dtype)(_masked(x, mask))
            x = nn.elu(x)
        y = nn.Dense(self.cfg.num_class, name="classifier", dtype=jnp.float32)(x)
        return jnp.abs(y[..., 0] if self.cfg.num_class == 1 else y)


# ----------------------------------------------------------------------------------- NSF source
def _cumsum_f64_like(x: Array, axis: int) -> Array:
    """Prefix sum with ~48-bit accumulation (float32 double-float), rounded to float32.

    torch's CPU ``cumsum`` accumulates float32 in double; the phase is later multiplied by
    2 pi * 480, so a last-bit difference moves the sine by ~0.1 rad. Plain float32 prefix sums
    drift; a (hi, lo) pair with error-free TwoSum matches torch.
    """

    def two_sum(a, b):
        s = a + b
        bb = s - a
        e = (a - (s - bb)) + (b - bb)
        return s, e

    def combine(u, v):
        s, e = two_sum(u[0], v[0])
        e = e + u[1] + v[1]
        return two_sum(s, e)

    hi, lo = jax.lax.associative_scan(combine, (x, jnp.zeros_like(x)), axis=axis)
    return hi + lo


def _split(a: Array) -> tuple[Array, Array]:
    """Veltkamp split of a float32 into two 12-bit halves (``a == hi + lo`` exactly)."""
    c = a * 4097.0
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a: Array, b: Array) -> tuple[Array, Array]:
    """Dekker: ``a * b == p + e`` exactly, without an FMA instruction."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _fma(a: Array, b: Array, c: Array) -> Array:
    """``round(a * b + c)`` (one rounding, like a hardware FMA) from float32 ops."""
    p, e = _two_prod(a, b)
    s = p + c
    bb = s - p
    t = (p - (s - bb)) + (c - bb)
    return s + (t + e)


def _div_const(a: Array, b: float) -> Array:
    """Correctly rounded ``a / b`` for a constant ``b``. XLA rewrites division by a constant
    into multiplication by its reciprocal (not correctly rounded); one exact-residual step fixes it."""
    inv = np.float32(1.0 / b)
    q = a * inv
    p, e = _two_prod(q, jnp.float32(b))
    return q + ((a - p) - e) * inv


def _linear_upsample_table(n_in: int, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices/weights of torch ``interpolate(mode='linear', scale_factor=scale)`` (align_corners
    False) as torch's CPU kernel computes them: ``src = float(float(1/scale) * (n + 0.5) - 0.5)``
    (evaluated in double), ``lambda1 = src - floor(src)``, ``lambda0 = 1 - lambda1``."""
    n = np.arange(n_in * scale, dtype=np.float64)
    src = (np.float64(np.float32(1.0 / scale)) * (n + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    return i0, lam0, lam1


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise NSF source: ``f0 (B, F)`` (frame rate) -> ``source (B, W)``, W = F * hop.

    Official ``SourceModuleHnNSF2`` + ``SineGen2`` (used for 24 kHz). With the frame-rate f0
    upsampled by repetition, the official per-sample computation equals:

    * ``rad[d, h] = ((f0[d] * h) / sr) mod 1`` for harmonics ``h = 1..H+1``;
    * ``phase = 2 pi * cumsum_d(rad) * hop``, linearly upsampled x hop (torch ``interpolate``);
    * ``sine = 0.1 sin(phase) * uv + noise_amp * n``, ``uv = f0 > threshold``,
      ``noise_amp = 0.003 uv + (0.1 / 3)(1 - uv)``, ``n ~ N(0, 1)`` of shape ``(B, W, H+1)``;
    * ``source = tanh(l_linear(sine))``.
    """

    cfg: HiFTConfig

    @nn.compact
    def __call__(self, f0: Array, noise: Array, lengths: Optional[Array] = None) -> Array:
        cfg = self.cfg
        hop = cfg.hop_size
        B, F = f0.shape
        H = cfg.nb_harmonics + 1
        harm = jnp.arange(1, H + 1, dtype=jnp.float32)
        fn = f0[..., None] * harm                                    # (B, F, H)
        rad = jnp.mod(_div_const(fn, float(cfg.sampling_rate)), 1.0)
        phase = _cumsum_f64_like(rad, axis=1) * 2.0 * np.float32(np.pi)
        # the barrier stops XLA from folding the two constant products into one (torch rounds twice)
        phase = jax.lax.optimization_barrier(phase) * float(hop)
        i0, lam0, lam1 = _linear_upsample_table(F, hop)             # (W,)
        i0 = jnp.broadcast_to(jnp.asarray(i0)[None], (B, F * hop))
        if lengths is None:
            i1 = jnp.minimum(i0 + 1, F - 1)
        else:
            last = (lengths - 1)[:, None]
            i0 = jnp.minimum(i0, last)
            i1 = jnp.minimum(i0 + 1, last)
        x0 = jnp.take_along_axis(phase, i0[..., None], axis=1)       # (B, W, H)
        x1 = jnp.take_along_axis(phase, i1[..., None], axis=1)
        # torch's kernel computes x0 * l0 + x1 * l1 with an FMA: round(x0 * l0 + round(x1 * l1))
        phase_w = _fma(x0, jnp.asarray(lam0)[:, None], x1 * jnp.asarray(lam1)[:, None])
        sines = jnp.sin(phase_w) * cfg.nsf_alpha
        uv = (jnp.repeat(f0, hop, axis=1) > cfg.nsf_voiced_threshold).astype(jnp.float32)[..., None]
        noise_amp = uv * cfg.nsf_sigma + (1.0 - uv) * (cfg.nsf_alpha / 3.0)
        # the official sine generator runs under torch.no_grad: no gradient reaches f0 through it
        sine_waves = jax.lax.stop_gradient(sines * uv + noise_amp * noise)
        merged = jnp.tanh(nn.Dense(1, name="l_linear", dtype=jnp.float32)(sine_waves))[..., 0]
        mask = time_mask(None if lengths is None else lengths * hop, F * hop)
        return merged if mask is None else merged * mask[..., 0]


# ----------------------------------------------------------------------------------- STFT / iSTFT
def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window (``scipy.signal.get_window('hann', n, fftbins=True)``)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


def _dft_bases(n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    """Real DFT as matmuls. Forward (n_fft, 2K): windowed frame -> [Re X_k, Im X_k], K = n_fft/2+1.
    Inverse (2K, n_fft): [Re, Im] -> windowed irfft frame (torch/pocketfft c2r: Im of DC and
    Nyquist ignored)."""
    K = n_fft // 2 + 1
    n = np.arange(n_fft)[:, None]
    k = np.arange(K)[None, :]
    ang = 2.0 * np.pi * n * k / n_fft
    win = hann_window(n_fft).astype(np.float64)[:, None]
    fwd = np.concatenate([np.cos(ang), -np.sin(ang)], axis=1) * win            # (n_fft, 2K)
    c = np.full((K,), 2.0)
    c[0] = 1.0
    c[-1] = 1.0 if n_fft % 2 == 0 else 2.0
    s = c.copy()
    s[0] = 0.0
    if n_fft % 2 == 0:
        s[-1] = 0.0
    inv = np.concatenate([(c[:, None] * np.cos(ang.T)), -(s[:, None] * np.sin(ang.T))], axis=0) / n_fft
    inv = inv * win.T                                                          # (2K, n_fft)
    return fwd.astype(np.float32), inv.astype(np.float32)


def _frames(x_bp: Array, n_fft: int, hop: int) -> Array:
    """``(B, P)`` -> ``(B, N, n_fft)`` frames at hop ``hop`` (needs n_fft % hop == 0, P % hop == 0)."""
    B, P = x_bp.shape
    r = n_fft // hop
    chunks = x_bp.reshape(B, P // hop, hop)
    n = P // hop - r + 1
    return jnp.concatenate([chunks[:, j:j + n] for j in range(r)], axis=-1)


def _reflect_pad(x_bw: Array, pad: int, lengths_w: Optional[Array]) -> Array:
    """Reflect-pad ``pad`` samples on both sides; with lengths, the right side reflects at each
    row's own end."""
    if lengths_w is None:
        return jnp.pad(x_bw, ((0, 0), (pad, pad)), mode="reflect")
    W = x_bw.shape[1]
    j = jnp.arange(W + 2 * pad)[None, :] - pad                      # (1, W + 2 pad)
    last = (lengths_w - 1)[:, None]
    idx = jnp.abs(j)
    idx = jnp.where(idx > last, 2 * last - idx, idx)
    idx = jnp.clip(idx, 0, W - 1)
    return jnp.take_along_axis(x_bw, idx, axis=1)


def stft_source(s_bw: Array, n_fft: int, hop: int, lengths_w: Optional[Array] = None) -> Array:
    """torch ``stft(center=True, reflect, hann, onesided)`` -> ``(B, N, [Re(K), Im(K)])``, N = W/hop + 1."""
    fwd, _ = _dft_bases(n_fft)
    frames = _frames(_reflect_pad(s_bw, n_fft // 2, lengths_w), n_fft, hop)
    return jnp.einsum("bnf,fk->bnk", frames, jnp.asarray(fwd))


def istft(re_im: Array, n_fft: int, hop: int, frame_mask: Optional[Array] = None) -> Array:
    """torch ``istft(center=True, hann)``: ``(B, N, 2K)`` [Re, Im] -> ``(B, hop * (N - 1))``.

    Overlap-add of windowed irfft frames divided by the overlap-added squared window; with
    ``frame_mask (B, N, 1)`` the padded frames are dropped from both sums.
    """
    _, inv = _dft_bases(n_fft)
    frames = jnp.einsum("bnk,kf->bnf", re_im, jnp.asarray(inv))      # (B, N, n_fft), windowed
    win2 = jnp.asarray(hann_window(n_fft) ** 2)
    env_frames = jnp.broadcast_to(win2, frames.shape[:2] + (n_fft,)) if frame_mask is None else frame_mask * win2
    if frame_mask is not None:
        frames = frames * frame_mask
    B, N, _ = frames.shape
    r = n_fft // hop

    def overlap_add(fr):
        parts = fr.reshape(B, N, r, hop)
        out = 0.0
        for j in range(r):
            out = out + jnp.pad(parts[:, :, j], ((0, 0), (j, r - 1 - j), (0, 0)))
        return out.reshape(B, (N + r - 1) * hop)

    y = overlap_add(frames)
    env = overlap_add(env_frames)
    start = n_fft // 2
    end = start + hop * (N - 1)
    return y[:, start:end] / env[:, start:end]


# ----------------------------------------------------------------------------------- generator
class HiFTGenerator(nn.Module):
    """HiFT generator (official ``generator.HiFTGenerator``), channel-last.

    Methods (use with ``model.apply(params, ..., method=...)``):
      ``f0(mel, lengths)``: ``(B, F, n_mels) -> (B, F)``.
      ``source(f0, noise, lengths)``: ``(B, F), (B, W, 9) -> (B, W)``.
      ``decode(mel, source, lengths)``: ``(B, F, n_mels), (B, W) -> (B, W)`` waveform.
      ``forward(mel, noise, lengths)``: official training ``forward``: ``(audio, f0)``.
      ``__call__(mel, noise, lengths, cache_source)``: official ``inference``: ``(audio, source)``.

    ``fast_snake``: polynomial ``sin^2`` in Snake (inference on CPU); parity tests use False.
    """

    cfg: HiFTConfig
    fast_snake: bool = False

    def setup(self):
        cfg = self.cfg
        C = cfg.base_channels
        dt = compute_dtype(cfg)
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_predictor, dt)
        self.m_source = SourceModuleHnNSF(cfg)
        self.conv_pre = Conv1d(C, 7, padding=3, weight_norm=True, dtype=dt)
        self.ups = [ConvTranspose1d(C // 2 ** (i + 1), k, u, padding=(k - u) // 2, weight_norm=True, dtype=dt)
                    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))]
        down_rates = np.cumprod([1] + list(cfg.upsample_rates[::-1][:-1]))[::-1]
        downs, sres = [], []
        for i, (u, k, d) in enumerate(zip(down_rates, cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes)):
            u = int(u)
            ch = C // 2 ** (i + 1)
            downs.append(Conv1d(ch, 1, dtype=dt) if u == 1 else Conv1d(ch, 2 * u, stride=u, padding=u // 2, dtype=dt))
            sres.append(ResBlock(ch, k, tuple(d), self.fast_snake, dt))
        self.source_downs = downs
        self.source_resblocks = sres
        self.resblocks = [ResBlock(C // 2 ** (i + 1), k, tuple(d), self.fast_snake, dt)
                          for i in range(len(cfg.upsample_rates))
                          for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)]
        self.conv_post = Conv1d(cfg.istft_n_fft + 2, 7, padding=3, weight_norm=True, dtype=dt)

    # -- stages
    def f0(self, mel: Array, lengths: Optional[Array] = None) -> Array:
        return self.f0_predictor(mel, time_mask(lengths, mel.shape[1])).astype(jnp.float32)

    def source(self, f0: Array, noise: Array, lengths: Optional[Array] = None) -> Array:
        return self.m_source(f0, noise, lengths)

    def decode(self, mel: Array, source: Array, lengths: Optional[Array] = None) -> Array:
        cfg = self.cfg
        n_fft, hop = cfg.istft_n_fft, cfg.istft_hop_len
        B, F, _ = mel.shape
        if source.shape != (B, F * cfg.hop_size):
            raise AudioError(f"source must have shape (B, F*{cfg.hop_size}) = {(B, F * cfg.hop_size)} for mel "
                             f"{mel.shape}; got {source.shape}. Pass the source returned by `source`/inference "
                             "for the same mel frames")
        lw = None if lengths is None else lengths * cfg.hop_size
        s_stft = stft_source(source, n_fft, hop, lw)                     # (B, N, 18)
        n_frames = s_stft.shape[1]
        lf = None if lengths is None else lengths * (cfg.hop_size // hop) + 1
        fmask = time_mask(lf, n_frames)
        s_stft = _masked(s_stft, fmask)

        x = self.conv_pre(_masked(mel, time_mask(lengths, F)))
        length, rate = lengths, 1
        nk = len(cfg.resblock_kernel_sizes)
        for i, u in enumerate(cfg.upsample_rates):
            x = nn.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](_masked(x, time_mask(length, x.shape[1])))
            rate *= u
            length = None if lengths is None else lengths * rate
            if i == len(cfg.upsample_rates) - 1:
                x = jnp.concatenate([x[:, 1:2], x], axis=1)              # ReflectionPad1d((1, 0))
                length = None if lengths is None else length + 1
            mask = time_mask(length, x.shape[1])
            si = self.source_downs[i](s_stft)
            si = self.source_resblocks[i](si, mask)
            x = _masked(x + si, mask)
            xs = self.resblocks[i * nk](x, mask)
            for j in range(1, nk):
                xs = xs + self.resblocks[i * nk + j](x, mask)
            x = xs / nk
        x = nn.leaky_relu(x, 0.01)
        x = self.conv_post(_masked(x, fmask)).astype(jnp.float32)
        K = n_fft // 2 + 1
        mag = jnp.minimum(jnp.exp(x[..., :K]), 1e2)
        phase = jnp.sin(x[..., K:])
        re_im = jnp.concatenate([mag * jnp.cos(phase), mag * jnp.sin(phase)], axis=-1)
        audio = istft(re_im, n_fft, hop, fmask)
        audio = jnp.clip(audio, -cfg.audio_limit, cfg.audio_limit)
        return _masked(audio[..., None], time_mask(lw, audio.shape[1]))[..., 0]

    def forward(self, mel: Array, noise: Array, lengths: Optional[Array] = None) -> tuple[Array, Array]:
        """Official training ``forward``: ``mel (B, F, n_mels)`` -> ``(audio (B, W), f0 (B, F))``
        (the HiFiGan wrapper adds the F0 L1 loss on ``f0``)."""
        f0 = self.f0(mel, lengths)
        return self.decode(mel, self.source(f0, noise, lengths), lengths), f0

    def __call__(self, mel: Array, noise: Array, lengths: Optional[Array] = None,
                 cache_source: Optional[Array] = None) -> tuple[Array, Array]:
        """Official ``inference``: ``mel (B, F, n_mels)``, ``noise (B, W, 9)`` -> ``(audio (B, W), source (B, W))``.

        ``cache_source (B, Wc)`` overwrites the first Wc source samples (streaming: avoids glitches).
        """
        f0 = self.f0(mel, lengths)
        s = self.source(f0, noise, lengths)
        if cache_source is not None and cache_source.shape[1] > 0:
            s = s.at[:, :cache_source.shape[1]].set(cache_source.astype(s.dtype))
        return self.decode(mel, s, lengths), s


def source_noise(key: Array, batch: int, frames: int, cfg: HiFTConfig) -> Array:
    """Standard-normal source noise ``(B, F * hop, nb_harmonics + 1)`` (the official ``randn_like``)."""
    return jax.random.normal(key, (batch, frames * cfg.hop_size, cfg.nb_harmonics + 1), jnp.float32)


def make_inference_fn(cfg: HiFTConfig, *, fast_snake: bool = True):
    """Jitted ``(params, mel (B,F,n_mels), key, lengths (B,) | None, cache_source (B,Wc) | None,
    noise (B,W,9) | None) -> (audio (B, W), source (B, W))``.

    Compiles once per (B, F, Wc) shape: bucket F. ``params`` may be folded
    (:func:`cosyvoice2_jax.layers.conv.fold_weight_norm`, faster) or not. ``noise`` overrides the
    draw from ``key`` (parity with recorded official draws).
    """
    model = HiFTGenerator(cfg, fast_snake=fast_snake)

    @aot.jit(name="hift_run", context=(cfg, fast_snake))
    def run(params, mel, key, lengths=None, cache_source=None, noise=None):
        if noise is None:
            noise = source_noise(key, mel.shape[0], mel.shape[1], cfg)
        return model.apply({"params": params}, mel, noise, lengths, cache_source)

    return run
