"""CAM++ speaker encoder (x-vector, 192-d): the speaker embedding CosyVoice 2 conditions the flow on.

Paper: Wang et al., "CAM++: A Fast and Efficient Network for Speaker Verification Using
Context-Aware Masking" (Interspeech 2023). Official structure: 3D-Speaker
``speakerlab/models/campplus/DTDNN.py`` (the same module tree as the ``CAMPPlus`` class that
chatterbox ships in ``models/s3gen/xvector.py``); the release runs it from ``campplus.onnx``.

Data flow (B batch, T fbank frames at 100 Hz, T2 = ceil(T / 2))::

    fbank (B, T, 80), mean-normalised per utterance
      ─▶ FCM head: 2-D convs + BN on (freq, time) with 2 residual stages, freq 80 -> 10 ─▶ (B, T, 320)
      ─▶ TDNN k5 s2 + BN + ReLU ─▶ (B, T2, 128)
      ─▶ 3 x [ D-TDNN block (12/24/16 layers, each: BN-ReLU-1x1-BN-ReLU-CAM, dense concat of
               32 channels) ; transit (BN-ReLU-1x1 halving the channels) ]
      ─▶ BN-ReLU ─▶ statistics pooling (mean ++ unbiased std over time) ─▶ 1x1 + BN(no affine) ─▶ (B, 192)

CAM (context-aware masking): ``y = conv_k3(x) * sigmoid(W2 relu(W1 (mean_t(x) + segmean_100(x)) + b1) + b2)``
where ``segmean_100`` averages each 100-frame segment (a partial last segment over its frames).

Inference-mode BatchNorm with running statistics; the statistics live in the param tree
(``mean``/``var`` next to ``scale``/``bias``), so the whole model is one plain dict.

Batching: rows are zero-padded; every time-mixing step (convs, means, segment means, stats
pooling) is masked with the row length, so a padded row gives the same embedding as the row alone.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import SpeakerConfig


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    ``affine=False`` (torch ``BatchNorm1d(affine=False)``) has only ``mean`` and ``var``.
    """

    eps: float = 1e-5
    affine: bool = True

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (c,)) + self.param("bias", nn.initializers.zeros, (c,))
        return y


def _tmask(mask_bt, x):
    """Zero the time steps past each row's length; ``x`` is (B, T, C) or (B, F, T, C)."""
    m = mask_bt.astype(x.dtype)
    return x * (m[:, None, :, None] if x.ndim == 4 else m[:, :, None])


# ------------------------------------------------------------------------------------------ FCM head
class BasicResBlock(nn.Module):
    """2-D residual block; stride along frequency only. x: (B, F, T, C)."""

    planes: int
    stride: int
    eps: float

    @nn.compact
    def __call__(self, x, mask_bt):
        xm = _tmask(mask_bt, x)
        out = nn.Conv(self.planes, (3, 3), strides=(self.stride, 1), padding=[(1, 1), (1, 1)],
                      use_bias=False, name="conv1")(xm)
        out = nn.relu(FrozenBatchNorm(self.eps, name="bn1")(out))
        out = nn.Conv(self.planes, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False,
                      name="conv2")(_tmask(mask_bt, out))
        out = FrozenBatchNorm(self.eps, name="bn2")(out)
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = nn.Conv(self.planes, (1, 1), strides=(self.stride, 1), use_bias=False, name="shortcut_0")(xm)
            x = FrozenBatchNorm(self.eps, name="shortcut_1")(x)
        return nn.relu(out + x)


class FCM(nn.Module):
    """Front-end convolution module: (B, T, F) -> (B, T, C * F / 8)."""

    channels: int = 32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, feat_btf, mask_bt):
        c = self.channels
        x = _tmask(mask_bt, jnp.swapaxes(feat_btf, 1, 2)[..., None])  # (B, F, T, 1)
        x = nn.Conv(c, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False, name="conv1")(x)
        x = nn.relu(FrozenBatchNorm(self.eps, name="bn1")(x))
        for layer in (1, 2):
            for j, stride in enumerate((2, 1)):
                x = BasicResBlock(c, stride, self.eps, name=f"layer{layer}_{j}")(x, mask_bt)
        x = nn.Conv(c, (3, 3), strides=(2, 1), padding=[(1, 1), (1, 1)], use_bias=False,
                    name="conv2")(_tmask(mask_bt, x))
        x = nn.relu(FrozenBatchNorm(self.eps, name="bn2")(x))  # (B, F/8, T, C)
        b, f, t, ch = x.shape
        # torch flattens (C, F) with C major: channel index = c * F' + f
        return jnp.transpose(x, (0, 2, 3, 1)).reshape(b, t, ch * f)


# ------------------------------------------------------------------------------------------ D-TDNN
def masked_mean(x_btc, mask_bt):
    m = mask_bt.astype(x_btc.dtype)[:, :, None]
    return jnp.sum(x_btc * m, axis=1, keepdims=True) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)


def segment_mean(x_btc, mask_bt, seg: int = 100):
    """Mean of each ``seg``-frame segment over its valid frames, broadcast back to (B, T, C)."""
    b, t, c = x_btc.shape
    n = -(-t // seg)
    pad = n * seg - t
    m = mask_bt.astype(x_btc.dtype)
    xs = jnp.pad(x_btc * m[:, :, None], ((0, 0), (0, pad), (0, 0))).reshape(b, n, seg, c)
    cnt = jnp.pad(m, ((0, 0), (0, pad))).reshape(b, n, seg).sum(-1)[..., None]
    means = xs.sum(2) / jnp.maximum(cnt, 1.0)  # (B, n, C)
    return jnp.repeat(means, seg, axis=1)[:, :t]


class CAMLayer(nn.Module):
    out_channels: int
    kernel_size: int
    dilation: int
    reduction: int = 2

    @nn.compact
    def __call__(self, x_btc, mask_bt):
        c = x_btc.shape[-1]
        pad = (self.kernel_size - 1) // 2 * self.dilation
        y = nn.Conv(self.out_channels, (self.kernel_size,), kernel_dilation=(self.dilation,),
                    padding=[(pad, pad)], use_bias=False, name="linear_local")(_tmask(mask_bt, x_btc))
        context = masked_mean(x_btc, mask_bt) + segment_mean(x_btc, mask_bt)
        context = nn.relu(nn.Conv(c // self.reduction, (1,), name="linear1")(context))
        m = jax.nn.sigmoid(nn.Conv(self.out_channels, (1,), name="linear2")(context))
        return y * m


class CAMDenseTDNNLayer(nn.Module):
    out_channels: int
    bn_channels: int
    kernel_size: int
    dilation: int
    eps: float

    @nn.compact
    def __call__(self, x_btc, mask_bt):
        x = nn.relu(FrozenBatchNorm(self.eps, name="nonlinear1_batchnorm")(x_btc))
        x = nn.Conv(self.bn_channels, (1,), use_bias=False, name="linear1")(x)
        x = nn.relu(FrozenBatchNorm(self.eps, name="nonlinear2_batchnorm")(x))
        return CAMLayer(self.out_channels, self.kernel_size, self.dilation, name="cam_layer")(x, mask_bt)


class CAMDenseTDNNBlock(nn.Module):
    num_layers: int
    out_channels: int
    bn_channels: int
    kernel_size: int
    dilation: int
    eps: float

    @nn.compact
    def __call__(self, x_btc, mask_bt):
        for i in range(self.num_layers):
            y = CAMDenseTDNNLayer(self.out_channels, self.bn_channels, self.kernel_size, self.dilation,
                                  self.eps, name=f"tdnnd{i + 1}")(x_btc, mask_bt)
            x_btc = jnp.concatenate([x_btc, y], axis=-1)
        return x_btc


class TDNNLayer(nn.Module):
    out_channels: int
    kernel_size: int
    stride: int
    eps: float

    @nn.compact
    def __call__(self, x_btc, mask_bt):
        pad = (self.kernel_size - 1) // 2
        x = nn.Conv(self.out_channels, (self.kernel_size,), strides=(self.stride,), padding=[(pad, pad)],
                    use_bias=False, name="linear")(_tmask(mask_bt, x_btc))
        return nn.relu(FrozenBatchNorm(self.eps, name="nonlinear_batchnorm")(x))


class TransitLayer(nn.Module):
    out_channels: int
    eps: float

    @nn.compact
    def __call__(self, x_btc):
        x = nn.relu(FrozenBatchNorm(self.eps, name="nonlinear_batchnorm")(x_btc))
        return nn.Conv(self.out_channels, (1,), use_bias=False, name="linear")(x)


def stats_pool(x_btc, mask_bt):
    """Mean ++ unbiased std over the valid frames: (B, T, C) -> (B, 2C)."""
    m = mask_bt.astype(x_btc.dtype)[:, :, None]
    n = jnp.sum(m, axis=1)
    mean = jnp.sum(x_btc * m, axis=1) / jnp.maximum(n, 1.0)
    var = jnp.sum(((x_btc - mean[:, None]) * m) ** 2, axis=1) / jnp.maximum(n - 1.0, 1.0)
    return jnp.concatenate([mean, jnp.sqrt(var)], axis=-1)


class XVector(nn.Module):
    config: SpeakerConfig

    @nn.compact
    def __call__(self, x_btc, mask_bt):
        c = self.config
        eps = c.bn_eps
        x = TDNNLayer(c.init_channels, 5, 2, eps, name="tdnn")(x_btc, mask_bt)
        mask_bt = mask_bt[:, ::2]  # stride 2, padding 2, kernel 5: ceil(T / 2) valid frames
        ch = c.init_channels
        for k, (layers, ks, dil) in enumerate(zip(c.block_layers, c.block_kernel_sizes, c.block_dilations)):
            x = CAMDenseTDNNBlock(layers, c.growth_rate, c.bn_size * c.growth_rate, ks, dil, eps,
                                  name=f"block{k + 1}")(x, mask_bt)
            ch = (ch + layers * c.growth_rate) // 2
            x = TransitLayer(ch, eps, name=f"transit{k + 1}")(x)
        x = nn.relu(FrozenBatchNorm(eps, name="out_nonlinear_batchnorm")(x))
        stats = stats_pool(x, mask_bt)
        emb = nn.Conv(c.embedding_size, (1,), use_bias=False, name="dense_linear")(stats[:, None, :])[:, 0]
        return FrozenBatchNorm(eps, affine=False, name="dense_nonlinear_batchnorm")(emb)


class CAMPPlus(nn.Module):
    """``__call__(feat_btf (B, T, 80), lengths_b (B,)) -> embedding (B, 192)`` (not normalised;
    CosyVoice 2 L2-normalises it in the flow)."""

    config: SpeakerConfig = SpeakerConfig()

    @nn.compact
    def __call__(self, feat_btf, lengths_b):
        mask = jnp.arange(feat_btf.shape[1])[None, :] < lengths_b[:, None]
        x = FCM(self.config.head_channels, self.config.bn_eps, name="head")(feat_btf, mask)
        return XVector(self.config, name="xvector")(x, mask)
