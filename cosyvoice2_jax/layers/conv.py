"""Channel-last 1-D convolutions with torch semantics, optional weight norm.

Arrays are ``(B, T, C)`` (:class:`Conv2d`: ``(B, H, W, C)``). Kernels are stored ``(K, I, O)`` for both :class:`Conv1d` and
:class:`ConvTranspose1d` (``params_util.CONV1D`` / ``CONV_TRANSPOSE1D`` convert torch weights).

Weight norm (Salimans & Kingma 2016; ``torch.nn.utils.parametrizations.weight_norm``):
``w = g * v / ||v||``. With ``weight_norm=True`` a layer creates ``weight_g`` and ``weight_v``
instead of ``kernel``; ``weight_g`` keeps the kernel's rank with size 1 on the normed axes:

* ``Conv1d``: torch norms over all dims but dim 0 (= output channels): ``weight_g`` is ``(1, 1, O)``.
* ``ConvTranspose1d``: torch dim 0 is the *input* channels: ``weight_g`` is ``(1, I, 1)``.

So the normed axes are exactly those where ``weight_g`` has size 1, and :func:`fold_weight_norm`
needs no module information. A layer whose params hold ``kernel`` uses it directly even when
built with ``weight_norm=True``: fold once at load time for inference, keep g/v for training.

Performance (see docs/performance.md): stride-1 convs run as 2-D NHWC convs with H = 1 (XLA:CPU
routes them to its fast path); transposed convs use a polyphase formulation (one stride-1 conv
with ``stride * O`` output channels, then an interleave), not ``lhs_dilation``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Padding = Union[int, tuple[int, int], str]

# torch's default conv init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pad_pair(padding: Padding, kernel_size: int, dilation: int) -> tuple[int, int]:
    if padding == "causal":
        return (dilation * (kernel_size - 1), 0)
    if padding == "same":
        total = dilation * (kernel_size - 1)
        return (total // 2, total - total // 2)
    if isinstance(padding, int):
        return (padding, padding)
    if isinstance(padding, Sequence) and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        return (int(padding[0]), int(padding[1]))
    raise ValueError(f"padding must be an int, a (left, right) pair, 'same' or 'causal'; got {padding!r}")


def weight_norm_kernel(g: Array, v: Array) -> Array:
    """``g * v / ||v||`` with the norm over the axes where ``g`` has size 1 (no epsilon, as torch).

    Computed in float32 (also for bf16 params: the norm is a long reduction), returned in ``v``'s dtype."""
    axes = tuple(a for a in range(v.ndim) if g.shape[a] == 1)
    g32, v32 = g.astype(jnp.float32), v.astype(jnp.float32)
    return (g32 * v32 * lax.rsqrt(jnp.sum(v32 * v32, axis=axes, keepdims=True))).astype(v.dtype)


def fold_weight_norm(params: Mapping[str, Any]) -> dict[str, Any]:
    """Replace every ``{weight_g, weight_v}`` pair in a param tree by the folded ``kernel``.

    For inference: the folded tree runs through the same modules (they use ``kernel`` when present).
    """
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out[k] = fold_weight_norm(v)
        elif k not in ("weight_g", "weight_v"):
            out[k] = v
    if "weight_g" in params and "weight_v" in params:
        g, v = params["weight_g"], params["weight_v"]
        on_host = not any(isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array) and not a.is_fully_addressable)
                          for a in (g, v))
        if on_host:  # concrete params (load time): numpy on the host, not one XLA program per conv shape
            g, v = np.asarray(g), np.asarray(v)
            axes = tuple(a for a in range(v.ndim) if g.shape[a] == 1)
            g32, v32 = g.astype(np.float32), v.astype(np.float32)
            out["kernel"] = (g32 * v32 / np.sqrt(np.sum(v32 * v32, axis=axes, keepdims=True))).astype(v.dtype)
        else:
            out["kernel"] = weight_norm_kernel(jnp.asarray(g), jnp.asarray(v))
    return out


def conv1d(x: Array, kernel: Array, *, stride: int = 1, dilation: int = 1,
           padding: tuple[int, int] = (0, 0)) -> Array:
    """Plain 1-D convolution, ``x (B, T, I)``, ``kernel (K, I, O)`` -> ``(B, T', O)`` (torch Conv1d math).

    Runs as a 2-D NHWC convolution with H = 1.
    """
    y = lax.conv_general_dilated(
        x[:, None], kernel[None], window_strides=(1, stride), padding=((0, 0), tuple(padding)),
        rhs_dilation=(1, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y[:, 0]


def conv_transpose1d(x: Array, kernel: Array, *, stride: int, padding: int = 0, output_padding: int = 0,
                     dilation: int = 1, polyphase: bool = True) -> Array:
    """torch ``ConvTranspose1d`` math: ``x (B, T, I)``, ``kernel (K, I, O)`` -> ``(B, T_out, O)``.

    ``T_out = (T - 1) * stride - 2 * padding + dilation * (K - 1) + output_padding + 1``.
    Polyphase (default, dilation 1 only): the full output ``z[t * s + k] += x[t] w[k]`` is, per phase
    ``r = m mod s``, a stride-1 conv of ``x`` with ``w[r::s]``; all phases run as one conv with
    ``s * O`` outputs, are interleaved and cropped by ``padding``.
    """
    K, I, O = kernel.shape
    T = x.shape[1]
    s = stride
    t_out = (T - 1) * s - 2 * padding + dilation * (K - 1) + output_padding + 1
    if t_out <= 0:
        raise ValueError(f"conv_transpose1d: input length {T} gives non-positive output length {t_out}")
    if not polyphase or dilation != 1:
        span = dilation * (K - 1)
        y = lax.conv_general_dilated(
            x[:, None], jnp.flip(kernel, 0)[None], window_strides=(1, 1),
            padding=((0, 0), (span - padding, span - padding + output_padding)),
            lhs_dilation=(1, s), rhs_dilation=(1, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y[:, 0]
    J = -(-K // s)  # taps per phase
    w = jnp.pad(kernel, ((0, J * s - K), (0, 0), (0, 0)))          # (J*s, I, O)
    w = w.reshape(J, s, I, O)[::-1]                                # [j', r] = w[r + s*(J-1-j')]
    w = jnp.transpose(w, (0, 2, 1, 3)).reshape(J, I, s * O)         # output channel = r * O + o
    z = conv1d(x, w, padding=(J - 1, J - 1))                        # (B, T + J - 1, s*O)
    z = z.reshape(z.shape[0], -1, O)                                # (B, (T + J - 1) * s, O)
    end = padding + t_out
    if end > z.shape[1]:  # output_padding beyond the full output: zeros (no kernel tap reaches there)
        z = jnp.pad(z, ((0, 0), (0, end - z.shape[1]), (0, 0)))
    return z[:, padding:end]


class _WeightNormed(nn.Module):
    """Shared kernel/bias creation for the conv modules below."""

    def _kernel(self, shape: tuple[int, ...], g_shape: tuple[int, ...]) -> Array:
        if self.has_variable("params", "kernel") or not self.weight_norm:
            return self.param("kernel", self.kernel_init, shape, self.param_dtype)
        v = self.param("weight_v", self.kernel_init, shape, self.param_dtype)
        axes = tuple(a for a in range(len(shape)) if g_shape[a] == 1)
        g = self.param("weight_g", lambda _k, _s, _d: jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True)).astype(_d),
                       g_shape, self.param_dtype)
        return weight_norm_kernel(g, v)

    def _bias(self, n: int) -> Array | None:
        return self.param("bias", self.bias_init, (n,), self.param_dtype) if self.use_bias else None


class Conv1d(_WeightNormed):
    """torch ``nn.Conv1d`` (groups 1) on ``(B, T, C)``; params ``kernel (K, I, O)``, ``bias (O,)``.

    Attributes:
      features: output channels O.
      kernel_size, stride, dilation: as torch.
      padding: int (both sides), ``(left, right)``, ``'same'`` or ``'causal'`` (left ``dilation*(K-1)``).
      weight_norm: create ``weight_g (1, 1, O)`` / ``weight_v (K, I, O)`` instead of ``kernel``.
      dtype: compute dtype (input and kernel are cast to it); ``None``: the input's dtype.

    ``__call__(x, left=None)``: ``left (B, P, I)`` (``P`` = the left padding) replaces the zero left
    padding with real frames, e.g. the tail of the previous chunk when streaming (see
    :func:`causal_conv`).
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: Padding = 0
    use_bias: bool = True
    weight_norm: bool = False
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, left: Array | None = None) -> Array:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        shape = (self.kernel_size, x.shape[-1], self.features)
        w = self._kernel(shape, (1, 1, self.features))
        pad = _pad_pair(self.padding, self.kernel_size, self.dilation)
        if left is not None:
            if left.shape[1] != pad[0]:
                raise ValueError(f"Conv1d: left context has {left.shape[1]} frames, the left padding is {pad[0]}")
            x, pad = jnp.concatenate([left.astype(x.dtype), x], axis=1), (0, pad[1])
        y = conv1d(x, w.astype(x.dtype), stride=self.stride, dilation=self.dilation, padding=pad)
        b = self._bias(self.features)
        return y if b is None else y + b.astype(y.dtype)


def causal_conv(conv: Conv1d, x: Array, tail: Array | None = None, advance: Array | None = None
                ) -> tuple[Array, Array | None]:
    """A causal ``conv`` on ``x (B, T, C)`` with an optional left-context cache.

    ``tail (B, P, C)``: the ``P`` input frames before ``x`` (zeros at the sequence start) or
    ``None`` (zero padding). Returns ``(y, new_tail)`` where ``new_tail`` is the ``P`` frames before
    position ``advance`` of ``x`` (the next chunk starts there), ``None`` without a tail.
    """
    if tail is None:
        return conv(x), None
    y = conv(x, left=tail)
    full = jnp.concatenate([tail, x.astype(tail.dtype)], axis=1)
    return y, lax.dynamic_slice_in_dim(full, advance, tail.shape[1], axis=1)


class ConvTranspose1d(_WeightNormed):
    """torch ``nn.ConvTranspose1d`` (groups 1) on ``(B, T, C)``; params ``kernel (K, I, O)``, ``bias (O,)``.

    ``padding`` crops ``padding`` samples on both sides of the full output as torch does;
    ``weight_norm`` creates ``weight_g (1, I, 1)`` (torch norms over all dims but the input dim).
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1
    use_bias: bool = True
    weight_norm: bool = False
    polyphase: bool = True
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    param_dtype: Any = jnp.float32
    dtype: Any = None  # compute dtype (None: the input's)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        shape = (self.kernel_size, x.shape[-1], self.features)
        w = self._kernel(shape, (1, x.shape[-1], 1))
        y = conv_transpose1d(x, w.astype(x.dtype), stride=self.stride, padding=self.padding,
                             output_padding=self.output_padding, dilation=self.dilation,
                             polyphase=self.polyphase)
        b = self._bias(self.features)
        return y if b is None else y + b.astype(y.dtype)


class Conv2d(_WeightNormed):
    """torch ``nn.Conv2d`` (groups 1) on NHWC ``(B, H, W, C)``; params ``kernel (KH, KW, I, O)``, ``bias``.

    ``padding``: ``(ph, pw)`` symmetric, as torch's int-pair padding. ``weight_norm`` creates
    ``weight_g (1, 1, 1, O)`` / ``weight_v``. Used by the GAN discriminators.
    """

    features: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    use_bias: bool = True
    weight_norm: bool = False
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        w = self._kernel((kh, kw, x.shape[-1], self.features), (1, 1, 1, self.features))
        ph, pw = self.padding
        y = lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=tuple(self.stride),
                                     padding=((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        b = self._bias(self.features)
        return y if b is None else y + b.astype(y.dtype)
