"""Conditional flow matching (CosyVoice 2 paper section 2.4; Lipman et al. 2023; Matcha-TTS).

Official code: ``cosyvoice.flow.flow_matching.CausalConditionalCFM`` (inference) and
``ConditionalCFM.compute_loss`` (training). Arrays are channel-last ``(B, F, C)``, ``C`` the mel
size (``FlowConfig.output_size``, 80 in the release).

Inference integrates ``dx/dt = v(x, t)`` from ``t=0`` (noise) to ``t=1`` (mel) on a time grid
(:func:`t_span`; official: cosine ``1 - cos(pi/2 * s)`` over 10 uniform ``s`` steps) with classifier-
free guidance ``v = (1 + w) v(x | mu, spk, cond) - w v(x | 0, 0, 0)`` (``w = 0.7``), the two
branches evaluated as one batch of ``2B`` like the official code. The whole solver is one
``lax.fori_loop``. Offline inference and streaming (``flow/streaming.py``) run the same
:func:`solve`: the velocity takes the index ``k`` of its evaluation and threads a ``state``
(the streaming caches), so any solver or guidance added here works in both.

Initial noise: ``noise="official"`` uses the fixed tensor the official model draws at
construction (torch CPU ``randn(1, 80, 15000)`` right after seed 0; shipped as
``cosyvoice2_jax/data/cfm_noise.npy``), sliced to the sequence length, identical for all batch
rows; a ``jax.random`` key draws fresh noise instead.

Training (:func:`cfm_loss`), as the official code computes it: ``t = sched(u)``, ``u ~ U(0, 1)``
(the official ``compute_loss`` applies its ``t_scheduler``, cosine in the release config, to the
uniform draw), ``y = (1 - (1 - sigma_min) t) z + t x1``, target ``u_t = x1 - (1 - sigma_min) z``,
CFG drop zeroes ``mu``, ``spk`` and ``cond`` together for a fraction of the rows, and the loss is
the MSE over all valid frames (or L1 as an option).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import CFMConfig, FlowLoss, TScheduler
from ..errors import ConfigError

Array = jax.Array
NOISE_FILE = Path(__file__).resolve().parent.parent / "data" / "cfm_noise.npy"


# ----------------------------------------------------------------------------- time grid
def t_span(n_steps: int, scheduler: TScheduler | str = TScheduler.COSINE) -> Array:
    """``(n_steps + 1,)`` float32 grid from 0 to 1 (official: ``linspace`` then the scheduler)."""
    s = jnp.linspace(0.0, 1.0, n_steps + 1, dtype=jnp.float32)
    return schedule(s, scheduler)


def schedule(s: Array, scheduler: TScheduler | str) -> Array:
    """Map uniform ``s`` in [0, 1] to the ODE time ``t`` (pluggable: add a branch)."""
    scheduler = TScheduler(scheduler)
    if scheduler is TScheduler.LINEAR:
        return s
    if scheduler is TScheduler.COSINE:
        return 1.0 - jnp.cos(s * 0.5 * jnp.pi)
    raise ConfigError(f"unknown t_scheduler {scheduler!r}")


def official_noise(num_frames: int) -> Array:
    """The official fixed initial noise, ``(num_frames, 80)`` (time-major slice of (1, 80, 15000))."""
    noise = _noise_table()
    if num_frames > noise.shape[0]:
        raise ConfigError(f"{num_frames} mel frames exceed the official fixed noise ({noise.shape[0]} frames "
                          "= 300 s); split the input or pass a PRNG key as noise")
    return jnp.asarray(noise[:num_frames])


@functools.lru_cache(maxsize=1)
def _noise_table() -> np.ndarray:
    if not NOISE_FILE.is_file():
        raise ConfigError(f"package data file {NOISE_FILE} is missing; reinstall cosyvoice2_jax "
                          "(it ships the official flow noise) or pass a PRNG key as noise")
    return np.ascontiguousarray(np.load(NOISE_FILE)[0].T.astype(np.float32))  # (15000, 80)


def initial_noise(noise, batch: int, num_frames: int, channels: int, temperature: float = 1.0) -> Array:
    """``(batch, num_frames, channels)`` from ``"official"``, a PRNG key, or an explicit array
    (``channels``: the mel size, ``FlowConfig.output_size``; the official noise has 80)."""
    if isinstance(noise, str):
        if noise != "official":
            raise ConfigError(f"noise={noise!r}: use 'official', a jax.random key or an array")
        if channels != _noise_table().shape[1]:
            raise ConfigError(f"the official fixed noise has {_noise_table().shape[1]} mel channels, the flow "
                              f"has {channels}; pass a jax.random key as noise")
        z = jnp.broadcast_to(official_noise(num_frames)[None], (batch, num_frames, channels))
    elif is_prng_key(noise):
        z = jax.random.normal(noise, (batch, num_frames, channels), jnp.float32)
    else:
        z = jnp.broadcast_to(jnp.asarray(noise, jnp.float32), (batch, num_frames, channels))
    return z * temperature


def is_prng_key(x) -> bool:
    if not isinstance(x, jax.Array):
        return False
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or (x.dtype == jnp.uint32 and x.shape == (2,))


# ----------------------------------------------------------------------------- solvers
# One ODE loop for offline and streaming inference: flow/sampling.py (grids, solvers, guidance).
# velocity(x (B, F, C), t () f32, k () int32, state) -> (v, state): ``k`` is the index of this
# velocity evaluation in the solve (0 .. n_evals - 1); ``state`` is any pytree threaded through the
# loop (None offline; the streaming estimator's caches, one per evaluation, in flow/streaming.py).
from .sampling import Velocity, cfg_velocity, n_evals, solve  # noqa: E402,F401  (re-exported)


# ----------------------------------------------------------------------------- training
def sample_loss_draws(key: Array, batch: int, num_frames: int, feat_len: Array, cfg: CFMConfig,
                      channels: int) -> dict[str, Array]:
    """The random draws of one official training step: ``t_u (B,)`` uniform time, ``z (B, F, C)``
    noise, ``cfg_u (B,)`` uniform for the CFG drop (drop when ``cfg_u <= training_cfg_rate``),
    ``prompt_len (B,)`` cond prefix (0 for half the rows, else ``randint(0, int(0.3 len))``).
    """
    kt, kz, kc, kp, ki = jax.random.split(key, 5)
    feat_len = jnp.asarray(feat_len)
    hi = jnp.floor(cfg.prompt_prefix_max * feat_len.astype(jnp.float32)).astype(jnp.int32)
    idx = jnp.floor(jax.random.uniform(ki, (batch,)) * (hi + 1).astype(jnp.float32)).astype(jnp.int32)
    use = jax.random.uniform(kp, (batch,)) >= 0.5
    return {"t_u": jax.random.uniform(kt, (batch,)),
            "z": jax.random.normal(kz, (batch, num_frames, channels)),
            "cfg_u": jax.random.uniform(kc, (batch,)),
            "prompt_len": jnp.where(use, jnp.minimum(idx, hi), 0)}


def cfm_loss(estimator: Callable[..., Array], x1: Array, valid: Array, mu: Array, spks: Array, cond: Array,
             draws: dict[str, Array], cfg: CFMConfig) -> tuple[Array, Array]:
    """Flow-matching loss (official ``compute_loss``), channel-last.

    Args:
      estimator: ``estimator(y, valid, mu, t, spks, cond) -> (B, F, C)``.
      x1: target mel ``(B, F, C)``; valid ``(B, F)`` bool; mu ``(B, F, C)``; spks ``(B, C_spk)``;
        cond ``(B, F, C)``; draws from :func:`sample_loss_draws` (``t_u``, ``z``, ``cfg_u``).
    Returns ``(loss, y)``.
    """
    # draws["t"]: a time already drawn by a non-official law (flow/train_options.py)
    t = (draws["t"] if "t" in draws else schedule(draws["t_u"], cfg.t_scheduler))[:, None, None]
    z = draws["z"]
    y = (1.0 - (1.0 - cfg.sigma_min) * t) * z + t * x1
    u = x1 - (1.0 - cfg.sigma_min) * z
    if cfg.training_cfg_rate > 0:
        keep = (draws["cfg_u"] > cfg.training_cfg_rate).astype(x1.dtype)
        mu, spks, cond = mu * keep[:, None, None], spks * keep[:, None], cond * keep[:, None, None]
    pred = estimator(y, valid, mu, t[:, 0, 0], spks, cond)
    keep_f = valid
    if not cfg.loss_on_prompt:  # only the frames to generate, not the prompt prefix given as cond
        keep_f = valid & (jnp.arange(x1.shape[1])[None, :] >= draws["prompt_len"][:, None])
    m = keep_f[..., None].astype(x1.dtype)
    err = (pred - u) * m
    err = err * err if FlowLoss(cfg.loss) is FlowLoss.MSE else jnp.abs(err)
    if "loss_weight" in draws:  # per-row w(t) (flow/train_options.py)
        err = err * draws["loss_weight"][:, None, None].astype(err.dtype)
    return jnp.sum(err) / (jnp.sum(m) * x1.shape[-1]), y
