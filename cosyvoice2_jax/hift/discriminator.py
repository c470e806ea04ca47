"""HiFT GAN training: the discriminators and the losses (the only definitions; ``train/hift.py``
drives them), as the official CosyVoice 2 recipe configures them.

Official recipe (``examples/libritts/cosyvoice2/conf/cosyvoice2.yaml``, ``hifigan`` section):
``MultipleDiscriminator(mpd=matcha MultiPeriodDiscriminator, mrd=MultiResSpecDiscriminator)``
and ``HiFiGan`` (``cosyvoice/hifigan/hifigan.py``) with weights mel 45, feature matching 2,
TPR 1 (tau 0.04) and the F0 L1 loss; the GAN mel is ``matcha.utils.audio.mel_spectrogram``
with n_fft 1920, hop 480, 80 mels and **fmax None** (sr / 2).

* Multi-period discriminator (HiFi-GAN, Kong et al. 2020, ``matcha/hifigan/models.py``):
  periods 2, 3, 5, 7, 11; the waveform is reflect-padded to a multiple of p, folded to
  ``(T/p, p)`` and run through weight-normed (5, 1) convs 1-32-128-512-1024-1024 and a (3, 1) post conv.
* Multi-resolution spectrogram discriminator (``cosyvoice/hifigan/discriminator.py``,
  ``SpecDiscriminator``): |STFT| at (n_fft, hop, win) = (1024, 120, 600), (2048, 240, 1200),
  (512, 50, 240), then weight-normed (3, 9) convs over (frames, bins).

Layouts: waveforms ``(B, T)``; feature maps are NHWC ``(B, H, W, C)`` (torch: ``(B, C, H, W)``);
discriminator scores are flattened ``(B, H * W)`` in the same order as torch's ``flatten(1, -1)``.
Param names follow torch (``mpd/discriminators_0/convs_3``, ``mrd/discriminators_1/out``).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..layers.conv import Conv2d

Array = jax.Array
LRELU_SLOPE = 0.1


# ----------------------------------------------------------------------------------- discriminators
class DiscriminatorP(nn.Module):
    """One period discriminator: ``(B, T)`` -> ``(score (B, H*p), fmaps [5 convs + post])``."""

    period: int
    kernel_size: int = 5
    stride: int = 3

    @nn.compact
    def __call__(self, y: Array) -> tuple[Array, list[Array]]:
        B, T = y.shape
        p = self.period
        if T % p:
            y = jnp.pad(y, ((0, 0), (0, p - T % p)), mode="reflect")
        x = y.reshape(B, -1, p, 1)
        fmap = []
        chans = (32, 128, 512, 1024)
        pad = (self.kernel_size - 1) // 2
        for j, c in enumerate(chans):
            x = Conv2d(c, (self.kernel_size, 1), (self.stride, 1), (pad, 0), weight_norm=True, name=f"convs_{j}")(x)
            x = nn.leaky_relu(x, LRELU_SLOPE)
            fmap.append(x)
        x = Conv2d(1024, (self.kernel_size, 1), (1, 1), (2, 0), weight_norm=True, name=f"convs_{len(chans)}")(x)
        x = nn.leaky_relu(x, LRELU_SLOPE)
        fmap.append(x)
        x = Conv2d(1, (3, 1), (1, 1), (1, 0), weight_norm=True, name="conv_post")(x)
        fmap.append(x)
        return x.reshape(B, -1), fmap


class MultiPeriodDiscriminator(nn.Module):
    periods: Sequence[int] = (2, 3, 5, 7, 11)

    @nn.compact
    def __call__(self, y: Array) -> tuple[list[Array], list[list[Array]]]:
        outs = [DiscriminatorP(p, name=f"discriminators_{i}")(y) for i, p in enumerate(self.periods)]
        return [o[0] for o in outs], [o[1] for o in outs]


def _window(kind: str, win_length: int, n_fft: int) -> np.ndarray:
    """torch's periodic window of ``win_length``, zero-padded to ``n_fft`` centred (as torch.stft)."""
    n = np.arange(win_length)
    if kind == "hann":
        w = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)
    else:
        raise ValueError(f"window {kind!r} not supported (official recipe: hann)")
    left = (n_fft - win_length) // 2
    return np.pad(w, (left, n_fft - win_length - left)).astype(np.float32)


def stft(y: Array, n_fft: int, hop: int, win_length: int, *, center: bool = True) -> Array:
    """torch ``stft(..., window=hann_window(win_length), center, pad_mode='reflect', onesided)``:
    ``(B, T)`` -> complex ``(B, frames, n_fft // 2 + 1)``."""
    if center:
        y = jnp.pad(y, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    n_frames = 1 + (y.shape[1] - n_fft) // hop
    idx = jnp.arange(n_frames)[:, None] * hop + jnp.arange(n_fft)[None, :]
    frames = y[:, idx] * jnp.asarray(_window("hann", win_length, n_fft))
    return jnp.fft.rfft(frames, axis=-1)


class SpecDiscriminator(nn.Module):
    """|STFT| discriminator: ``(B, T)`` -> ``(score (B, frames * bins'), fmaps [5 convs + out])``."""

    fft_size: int = 1024
    shift_size: int = 120
    win_length: int = 600

    @nn.compact
    def __call__(self, y: Array) -> tuple[Array, list[Array]]:
        # the STFT runs in fp32; the convs follow the input's (compute) dtype
        x = jnp.abs(stft(y, self.fft_size, self.shift_size, self.win_length)).astype(y.dtype)[..., None]
        fmap = []
        layers = [((3, 9), (1, 1), (1, 4)), ((3, 9), (1, 2), (1, 4)), ((3, 9), (1, 2), (1, 4)),
                  ((3, 9), (1, 2), (1, 4)), ((3, 3), (1, 1), (1, 1))]
        for j, (k, s, p) in enumerate(layers):
            x = Conv2d(32, k, s, p, weight_norm=True, name=f"discriminators_{j}")(x)
            x = nn.leaky_relu(x, LRELU_SLOPE)
            fmap.append(x)
        x = Conv2d(1, (3, 3), (1, 1), (1, 1), weight_norm=True, name="out")(x)
        fmap.append(x)
        return x.reshape(x.shape[0], -1), fmap


class MultiResSpecDiscriminator(nn.Module):
    fft_sizes: Sequence[int] = (1024, 2048, 512)
    hop_sizes: Sequence[int] = (120, 240, 50)
    win_lengths: Sequence[int] = (600, 1200, 240)

    @nn.compact
    def __call__(self, y: Array) -> tuple[list[Array], list[list[Array]]]:
        outs = [SpecDiscriminator(f, h, w, name=f"discriminators_{i}")(y)
                for i, (f, h, w) in enumerate(zip(self.fft_sizes, self.hop_sizes, self.win_lengths))]
        return [o[0] for o in outs], [o[1] for o in outs]


class DiscriminatorR(nn.Module):
    """Band-split complex-spectrogram discriminator (official ``DiscriminatorR``, after DAC):
    ``(B, T)`` -> ``(score (B, frames, bins', 1), fmaps)``. The DC offset is removed and the
    peak normalised to 0.8; |STFT| is not taken: real and imaginary parts are the 2 channels."""

    window_length: int
    channels: int = 32
    hop_factor: float = 0.25
    bands: Sequence[tuple[float, float]] = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))

    @nn.compact
    def __call__(self, y: Array) -> tuple[Array, list[Array]]:
        y = y - jnp.mean(y, axis=-1, keepdims=True)
        y = 0.8 * y / (jnp.max(jnp.abs(y), axis=-1, keepdims=True) + 1e-9)
        spec = stft(y, self.window_length, int(self.window_length * self.hop_factor), self.window_length)
        x = jnp.stack([spec.real, spec.imag], axis=-1).astype(y.dtype)       # (B, frames, bins, 2)
        n_bins = self.window_length // 2 + 1
        layers = [((3, 9), (1, 1), (1, 4)), ((3, 9), (1, 2), (1, 4)), ((3, 9), (1, 2), (1, 4)),
                  ((3, 9), (1, 2), (1, 4)), ((3, 3), (1, 1), (1, 1))]
        fmap, outs = [], []
        for b, (lo, hi) in enumerate(self.bands):
            h = x[:, :, int(lo * n_bins):int(hi * n_bins)]
            for j, (k, st, pd) in enumerate(layers):
                h = Conv2d(self.channels, k, st, pd, weight_norm=True, name=f"band_convs_{b}_{j}")(h)
                h = nn.leaky_relu(h, LRELU_SLOPE)
                if j > 0:
                    fmap.append(h)
            outs.append(h)
        x = Conv2d(1, (3, 3), (1, 1), (1, 1), weight_norm=True, name="conv_post")(jnp.concatenate(outs, axis=2))
        fmap.append(x)
        return x, fmap


class MultiResolutionDiscriminator(nn.Module):
    """Official ``MultiResolutionDiscriminator`` (window lengths 2048, 1024, 512), unconditional."""

    fft_sizes: Sequence[int] = (2048, 1024, 512)

    @nn.compact
    def __call__(self, y: Array) -> tuple[list[Array], list[list[Array]]]:
        outs = [DiscriminatorR(w, name=f"discriminators_{i}")(y) for i, w in enumerate(self.fft_sizes)]
        return [o[0] for o in outs], [o[1] for o in outs]


class MultipleDiscriminator(nn.Module):
    """``mpd`` + ``mrd`` on real and generated audio (official ``MultipleDiscriminator``).

    ``(y (B, T), y_hat (B, T))`` -> ``(y_d_rs, y_d_gs, fmap_rs, fmap_gs)``: one score and one list
    of feature maps per sub-discriminator (the period discriminators, then the spectrogram ones).
    Real and generated audio run as one batch of 2B.

    ``mrd``: ``"spec"`` = ``MultiResSpecDiscriminator`` (the current cosyvoice2.yaml) or
    ``"resolution"`` = ``MultiResolutionDiscriminator`` (earlier versions of the same yaml).
    The sub-discriminator lists default to the official ones (``fft_sizes=None``: the variant's
    own default); training may shorten them (``train.hift.GANConfig``).
    """

    mrd: str = "spec"
    periods: Sequence[int] = (2, 3, 5, 7, 11)
    fft_sizes: Sequence[int] | None = None
    hop_sizes: Sequence[int] = (120, 240, 50)       # spec only
    win_lengths: Sequence[int] = (600, 1200, 240)   # spec only

    @nn.compact
    def __call__(self, y: Array, y_hat: Array):
        B = y.shape[0]
        both = jnp.concatenate([y, y_hat], axis=0)
        s1, f1 = MultiPeriodDiscriminator(tuple(self.periods), name="mpd")(both)
        if self.mrd == "spec":
            ffts = tuple(self.fft_sizes) if self.fft_sizes is not None else MultiResSpecDiscriminator.fft_sizes
            s2, f2 = MultiResSpecDiscriminator(ffts, tuple(self.hop_sizes), tuple(self.win_lengths), name="mrd")(both)
        elif self.mrd == "resolution":
            ffts = tuple(self.fft_sizes) if self.fft_sizes is not None else MultiResolutionDiscriminator.fft_sizes
            s2, f2 = MultiResolutionDiscriminator(ffts, name="mrd")(both)
        else:
            raise ConfigError(f"mrd must be 'spec' or 'resolution', got {self.mrd!r}")
        scores, fmaps = s1 + s2, f1 + f2
        y_d_rs = [s[:B] for s in scores]
        y_d_gs = [s[B:] for s in scores]
        fmap_rs = [[f[:B] for f in fl] for fl in fmaps]
        fmap_gs = [[f[B:] for f in fl] for fl in fmaps]
        return y_d_rs, y_d_gs, fmap_rs, fmap_gs


def abstract_discriminator_params(module: MultipleDiscriminator | None = None) -> dict:
    """Shapes of the param tree of ``module`` (default: the official discriminator)."""
    module = module if module is not None else MultipleDiscriminator()
    y = jnp.zeros((1, 4800))
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), y, y)["params"])


# ----------------------------------------------------------------------------------- losses
# Every loss takes optional row weights ``w (B,)`` (1 = real row, 0 = padding row of a fixed-shape
# training batch): means are then per row first, then over the weighted rows. With ``w=None`` they
# are the official batch means; with all weights 1 the same value.
def _mean(x: Array, w: Array | None) -> Array:
    if w is None:
        return jnp.mean(x)
    per_row = jnp.mean(x.reshape(x.shape[0], -1), axis=1)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def generator_loss(disc_outputs: Sequence[Array], w: Array | None = None) -> Array:
    """LSGAN generator loss ``sum_k mean((1 - D_k(G))^2)`` (matcha ``generator_loss``)."""
    return sum(_mean(jnp.square(1.0 - dg), w) for dg in disc_outputs)


def discriminator_loss(disc_real: Sequence[Array], disc_generated: Sequence[Array], w: Array | None = None) -> Array:
    """LSGAN discriminator loss ``sum_k mean((1 - D_k(y))^2) + mean(D_k(G)^2)``."""
    return sum(_mean(jnp.square(1.0 - dr), w) + _mean(jnp.square(dg), w)
               for dr, dg in zip(disc_real, disc_generated))


def feature_loss(fmap_r: Sequence[Sequence[Array]], fmap_g: Sequence[Sequence[Array]],
                 w: Array | None = None) -> Array:
    """Feature matching ``2 * sum_{k, l} mean|F_kl(y) - F_kl(G)|`` (matcha ``feature_loss``)."""
    return 2.0 * sum(_mean(jnp.abs(rl - gl), w) for dr, dg in zip(fmap_r, fmap_g) for rl, gl in zip(dr, dg))


def _lower_median(x: Array, w: Array | None) -> Array:
    """torch.median (the lower of the two middle values for an even count) over the elements of
    ``x (B, N)``, of the rows with ``w > 0`` only when ``w`` is given."""
    if w is None:
        flat = jnp.sort(x.reshape(-1))
        return flat[(flat.shape[0] - 1) // 2]
    flat = jnp.sort(jnp.where(w[:, None] > 0, x, jnp.inf).reshape(-1))
    count = jnp.sum(w > 0) * x.shape[1]
    return flat[jnp.maximum(count - 1, 0) // 2]


def tpr_loss(disc_real: Sequence[Array], disc_generated: Sequence[Array], tau: float = 0.04,
             w: Array | None = None) -> Array:
    """Truncated pointwise relativistic loss (``cosyvoice/utils/losses.py`` ``tpr_loss``; Li et al.,
    HiFTNet): per discriminator, ``m = median(dr - dg)``,
    ``L = mean over {dr < dg + m} of ((dr - dg) - m)^2``, add ``tau - relu(tau - L)``. With row
    weights an empty selection gives 0 (the official mean of nothing is NaN)."""
    loss = 0.0
    for dr, dg in zip(disc_real, disc_generated):
        dr, dg = dr.reshape(dr.shape[0], -1), dg.reshape(dg.shape[0], -1)
        d = dr - dg
        m = _lower_median(d, w)
        sel = dr < dg + m
        if w is None:
            sel = sel.astype(d.dtype)
            l_rel = jnp.sum(jnp.square(d - m) * sel) / jnp.sum(sel)
        else:
            sel = (sel & (w[:, None] > 0)).astype(d.dtype)
            l_rel = jnp.sum(jnp.square(d - m) * sel) / jnp.maximum(jnp.sum(sel), 1.0)
        loss = loss + (tau - jax.nn.relu(tau - l_rel))
    return loss


@functools.lru_cache(maxsize=4)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float32)


def gan_mel(y: Array, *, sr: int = 24000, n_fft: int = 1920, hop: int = 480, win: int = 1920, n_mels: int = 80,
            fmin: float = 0.0, fmax: float | None = None) -> Array:
    """matcha ``mel_spectrogram(center=False)``: reflect pad (n_fft - hop)/2, |STFT| with +1e-9
    inside the sqrt, slaney mel, ``log(clamp(., 1e-5))``: ``(B, T)`` -> ``(B, frames, n_mels)``.
    The GAN loss uses ``fmax=None`` (= sr/2), unlike the flow features (8000)."""
    pad = (n_fft - hop) // 2
    y = jnp.pad(y, ((0, 0), (pad, pad)), mode="reflect")
    spec = stft(y, n_fft, hop, win, center=False)
    mag = jnp.sqrt(jnp.square(spec.real) + jnp.square(spec.imag) + 1e-9)
    mel = jnp.einsum("btf,mf->btm", mag, jnp.asarray(_mel_basis(sr, n_fft, n_mels, fmin, fmax)))
    return jnp.log(jnp.maximum(mel, 1e-5))


def mel_loss(real: Array, generated: Array, w: Array | None = None, **mel_kwargs) -> Array:
    """L1 between GAN mels (``cosyvoice/utils/losses.py`` ``mel_loss`` with one transform)."""
    return _mean(jnp.abs(gan_mel(generated, **mel_kwargs) - gan_mel(real, **mel_kwargs)), w)


def f0_loss(generated_f0: Array, pitch_feat: Array, w: Array | None = None) -> Array:
    """``F.l1_loss(generated_f0, pitch_feat)``."""
    return _mean(jnp.abs(generated_f0 - pitch_feat), w)


def generator_losses(y_d_rs, y_d_gs, fmap_rs, fmap_gs, real, generated, generated_f0, pitch_feat,
                     w: Array | None = None, *, mel_weight: float = 45.0, fm_weight: float = 2.0,
                     tpr_weight: float = 1.0, tpr_tau: float = 0.04) -> dict[str, Array]:
    """``HiFiGan.forward_generator`` losses given the discriminator outputs (row weights ``w``)."""
    out = {
        "loss_gen": generator_loss(y_d_gs, w),
        "loss_fm": feature_loss(fmap_rs, fmap_gs, w),
        "loss_mel": mel_loss(real, generated, w),
        "loss_tpr": tpr_loss(y_d_gs, y_d_rs, tpr_tau, w) if tpr_weight != 0 else jnp.zeros(()),
        "loss_f0": f0_loss(generated_f0, pitch_feat, w),
    }
    out["loss"] = (out["loss_gen"] + fm_weight * out["loss_fm"] + mel_weight * out["loss_mel"]
                   + tpr_weight * out["loss_tpr"] + out["loss_f0"])
    return out


def discriminator_losses(y_d_rs, y_d_gs, w: Array | None = None, *, tpr_weight: float = 1.0,
                         tpr_tau: float = 0.04) -> dict[str, Array]:
    """``HiFiGan.forward_discriminator`` losses given the discriminator outputs (row weights ``w``)."""
    out = {"loss_disc": discriminator_loss(y_d_rs, y_d_gs, w),
           "loss_tpr": tpr_loss(y_d_rs, y_d_gs, tpr_tau, w) if tpr_weight != 0 else jnp.zeros(())}
    out["loss"] = out["loss_disc"] + tpr_weight * out["loss_tpr"]
    return out
