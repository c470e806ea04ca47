"""The HiFT vocoder at inference: frame-bucketed shapes, per-row source noise, optional mesh."""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding
from ..config import HiFTConfig
from ..errors import ConfigError
from ..layers.conv import fold_weight_norm
from .modeling import make_inference_fn

NoiseFn = Callable[[int, int], np.ndarray]  # (batch, samples) -> (batch, samples, harmonics + 1)


class Vocoder:
    """HiFT with frame-bucketed shapes (one compile per bucket and cache size) and the noise source.

    ``params``: HiFT params, weight norm kept (``from_release``) or already folded; they are folded
    here. Rows are zero-padded to a multiple of ``frame_bucket`` frames (default 50 = 1 s). Source
    noise is drawn per row in blocks of ``NOISE_BLOCK`` frames (block ``i`` from
    ``fold_in(key_row, i)``) and cut to the padded length, so a row's audio does not depend on the
    batch it runs in, on its padding or on ``frame_bucket``. ``noise_fn(batch, samples)`` overrides
    it (tests inject the official draws). With a ``mesh`` the params are replicated and the rows
    split over its batch axes.
    """

    NOISE_BLOCK = 100  # frames per noise draw (fixed: a seeded row's audio stays the same)

    def __init__(self, cfg: HiFTConfig, params, *, frame_bucket: int = 50, noise_fn: Optional[NoiseFn] = None,
                 mesh=None):
        self.cfg, self.frame_bucket, self.noise_fn, self.mesh = cfg, frame_bucket, noise_fn, mesh
        self.params = sharding.place_replicated(fold_weight_norm(params), mesh)
        self._run = make_inference_fn(cfg)
        block = (self.NOISE_BLOCK * cfg.hop_size, cfg.nb_harmonics + 1)

        def draw(key, n_blocks: int):
            ks = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n_blocks))
            return jax.vmap(lambda k: jax.random.normal(k, block, jnp.float32))(ks).reshape(-1, block[1])

        self._draw = jax.jit(jax.vmap(draw, in_axes=(0, None)), static_argnums=1)

    def noise(self, keys, frames_padded: int) -> np.ndarray:
        if self.noise_fn is not None:
            return np.asarray(self.noise_fn(len(keys), frames_padded * self.cfg.hop_size), np.float32)
        n_blocks = -(-frames_padded // self.NOISE_BLOCK)
        return self._draw(jnp.stack(list(keys)), n_blocks)[:, : frames_padded * self.cfg.hop_size]

    def __call__(self, mels: list[np.ndarray], keys, cache_source: Optional[np.ndarray] = None
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``mels``: list of (F_b, mel bins), ``keys``: one PRNG key per row ->
        (audio list (F_b*hop,), source list (F_b*hop,))."""
        hop = self.cfg.hop_size
        n = len(mels)
        keys = list(keys)
        lens = np.array([m.shape[0] for m in mels], np.int32)
        if np.any(lens <= 0):
            raise ConfigError("vocoder: a mel has no frames")
        rows = sharding.pad_rows(n, self.mesh)
        if rows > n:  # dummy rows (copies of row 0) so the batch splits evenly over the mesh
            mels, keys = list(mels) + [mels[0]] * (rows - n), keys + [keys[0]] * (rows - n)
            lens = np.concatenate([lens, np.repeat(lens[:1], rows - n)])
        fpad = -(-int(lens.max()) // self.frame_bucket) * self.frame_bucket
        x = np.zeros((rows, fpad, mels[0].shape[1]), np.float32)
        for b, m in enumerate(mels):
            x[b, : m.shape[0]] = m
        noise = self.noise(keys, fpad)
        x, lens_d, noise = (sharding.place_rows(a, self.mesh) for a in (x, lens, noise))
        audio, source = self._run(self.params, x, None, lens_d, cache_source, noise)
        audio, source = np.asarray(audio), np.asarray(source)
        return ([audio[b, : lens[b] * hop] for b in range(n)], [source[b, : lens[b] * hop] for b in range(n)])

    def compiled_programs(self) -> int:
        return self._run._cache_size()
