"""HiFT-GAN training objective (official ``cosyvoice/hifigan/hifigan.py`` ``HiFiGan`` +
``utils/executor.py`` ``train_one_epoc_gan`` + ``utils/train_utils.py``; HiFTNet, Li et al. 2023).

Each batch makes two optimizer steps, in the official order:

1. **discriminator turn**: ``G`` runs without gradient, ``L_D = sum_k [mean (1 - D_k(y))^2 +
   mean D_k(G(x))^2] + w_tpr * TPR(D(y), D(G(x)))``; the discriminator's Adam steps.
2. **generator turn** (against the *updated* discriminator): ``L_G = sum_k mean (1 - D_k(G(x)))^2
   + 2 * FM + 45 * |mel(G(x)) - mel(y)|_1 + w_tpr * TPR(D(G(x)), D(y)) + |f0_hat - f0|_1``;
   the generator's Adam steps.

Inputs (:mod:`cosyvoice2_jax.train.data` in GAN mode): ``speech (B, W)`` real 24 kHz crops,
``speech_feat (B, F, 80)`` their mels (W = 480 F), ``pitch_feat (B, F)`` the WORLD F0 target and
``valid (B,)``. Every loss is a mean over the *valid rows* (a padding row adds nothing: the row
weights of the losses in :mod:`cosyvoice2_jax.hift.discriminator`); with all rows valid this is the
official batch mean. The generator's source noise is drawn from the step key per turn (the official draws ``randn_like`` in each forward); ``batch["noise_d"]`` /
``batch["noise_g"]`` ``(B, W, 9)`` replay recorded draws (parity tests).

Optimizers (official ``train_conf_gan``): two Adams with their own schedules (generator
``TrainConfig.optim``, discriminator ``TrainConfig.optim_d``, both lr 2e-4 constant), gradient
clipping at 5 as torch ``clip_grad_norm_(model.parameters())`` does it: in the generator turn the
norm also counts the discriminator's gradients of the generator loss (the official clips over all
parameters of the wrapper); a step with a non-finite norm is skipped. ``accum_grad`` must be 1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ..config import HiFTConfig
from ..errors import ConfigError
from ..hift import discriminator as D
from ..hift.modeling import HiFTGenerator, compute_dtype, source_noise
from .. import sharding as M
from .optim import OptimConfig, make_optimizer

TURNS = ("discriminator", "generator")


@dataclasses.dataclass(frozen=True)
class GANConfig:
    """The GAN wrapper's settings (official defaults: cosyvoice2.yaml ``hifigan``). The
    sub-discriminator lists may be shortened for fast tests (each period discriminator has
    ~8M params with 1024-channel convs)."""

    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    mrd: str = "spec"  # spec: MultiResSpecDiscriminator (current yaml) | resolution: MultiResolutionDiscriminator
    mrd_fft_sizes: tuple[int, ...] = (1024, 2048, 512)
    mrd_hop_sizes: tuple[int, ...] = (120, 240, 50)  # spec only
    mrd_win_lengths: tuple[int, ...] = (600, 1200, 240)  # spec only
    mel_weight: float = 45.0
    fm_weight: float = 2.0
    tpr_weight: float = 1.0
    tpr_tau: float = 0.04


def make_discriminator(gan: GANConfig = GANConfig()) -> D.MultipleDiscriminator:
    """The official ``MultipleDiscriminator`` with ``gan``'s sub-discriminator lists."""
    return D.MultipleDiscriminator(gan.mrd, gan.mpd_periods, gan.mrd_fft_sizes, gan.mrd_hop_sizes, gan.mrd_win_lengths)


# ----------------------------------------------------------------------------------- objective
@dataclasses.dataclass
class HiFTGANObjective:
    """HiFT generator + ``MultipleDiscriminator`` (MPD + multi-resolution spectrogram D).

    Params are ``{"generator": ..., "discriminator": ...}`` (torch names inside, so
    :func:`cosyvoice2_jax.hift.params.to_torch` / ``discriminator_to_torch`` export them).
    """

    cfg: HiFTConfig
    gan: GANConfig = GANConfig()
    init_from: Any = None  # {"generator": ...} (e.g. a released hift.pt) and optionally "discriminator"
    name: str = "hift"
    turns = TURNS

    def __post_init__(self):
        self.generator = HiFTGenerator(self.cfg)
        self.discriminator = make_discriminator(self.gan)

    def init_params(self, rng):
        kg, kd = jax.random.split(rng)
        frames = 4
        mel = jnp.zeros((1, frames, self.cfg.in_channels))
        noise = source_noise(kg, 1, frames, self.cfg)
        g = self.generator.init(kg, mel, noise, method=HiFTGenerator.forward)["params"]
        y = jnp.zeros((1, frames * self.cfg.hop_size))
        d = self.discriminator.init(kd, y, y)["params"]
        if self.init_from is not None:
            g = self.init_from.get("generator", g)
            d = self.init_from.get("discriminator", d)
        return {"generator": g, "discriminator": d}

    def _weights(self, batch):
        if "valid" in batch:
            return batch["valid"].astype(jnp.float32)
        return jnp.ones((batch["speech"].shape[0],), jnp.float32)

    def generate(self, g_params, batch, rng, noise_key: str):
        """``G(speech_feat)`` -> ``(audio (B, W), f0 (B, F))`` with the turn's source noise."""
        mel = batch["speech_feat"]
        noise = batch.get(noise_key)
        if noise is None:
            noise = source_noise(rng, mel.shape[0], mel.shape[1], self.cfg)
        return self.generator.apply({"params": g_params}, mel, noise, method=HiFTGenerator.forward)

    def _check(self, batch):
        W, Fr = batch["speech"].shape[1], batch["speech_feat"].shape[1]
        if W != Fr * self.cfg.hop_size:
            raise ValueError(f"speech has {W} samples but speech_feat {Fr} frames; the GAN needs "
                             f"W = {self.cfg.hop_size} * F (use the data pipeline's GAN mode: truncate_length)")
        if "pitch_feat" not in batch:
            raise ValueError("batch lacks pitch_feat (the F0 target): add 'pitch' to data.features")

    def discriminate(self, d_params, real, generated):
        """The discriminator on ``(real, generated)`` in the compute dtype (``HiFTConfig.dtype``:
        its convs follow the input dtype); outputs and feature maps back in float32 for the losses."""
        dt = compute_dtype(self.cfg)
        outs = self.discriminator.apply({"params": d_params}, real.astype(dt), generated.astype(dt))
        return jax.tree.map(lambda a: a.astype(jnp.float32), outs)

    def discriminator_loss(self, params, batch, rng):
        self._check(batch)
        audio, _ = self.generate(jax.lax.stop_gradient(params["generator"]), batch, rng, "noise_d")
        audio = jax.lax.stop_gradient(audio)
        y_d_rs, y_d_gs, _, _ = self.discriminate(params["discriminator"], batch["speech"], audio)
        out = D.discriminator_losses(y_d_rs, y_d_gs, self._weights(batch), tpr_weight=self.gan.tpr_weight,
                                     tpr_tau=self.gan.tpr_tau)
        loss = out.pop("loss")
        return loss, out

    def generator_loss(self, params, batch, rng):
        self._check(batch)
        audio, f0 = self.generate(params["generator"], batch, rng, "noise_g")
        outs = self.discriminate(params["discriminator"], batch["speech"], audio)
        out = D.generator_losses(*outs, batch["speech"], audio, f0, batch["pitch_feat"], self._weights(batch),
                                 mel_weight=self.gan.mel_weight, fm_weight=self.gan.fm_weight,
                                 tpr_weight=self.gan.tpr_weight, tpr_tau=self.gan.tpr_tau)
        loss = out.pop("loss")
        return loss, out

    def turn_loss(self, turn: str, params, batch, rng):
        return self.discriminator_loss(params, batch, rng) if turn == "discriminator" else \
            self.generator_loss(params, batch, rng)

    def loss_fn(self, params, batch, rng):
        """The generator loss (what ``trainer.evaluate`` reports on held-out batches)."""
        return self.generator_loss(params, batch, rng)

    # -- trainer hook: this objective builds its own two-optimizer state and step
    def init_train(self, cfg, mesh: M.Mesh):
        """``(state, shardings, step_fn)`` for :func:`cosyvoice2_jax.train.trainer.train`."""
        optim_d = getattr(cfg, "optim_d", None) or cfg.optim
        precision = getattr(cfg, "precision", "fp32")
        txs, clips = make_gan_optimizers(cfg.optim, optim_d)
        state, shardings = init_gan_state(self, txs, mesh, cfg.seed)
        return state, shardings, make_gan_train_step(self, txs, clips, shardings, mesh, cfg.seed, precision=precision)


# ----------------------------------------------------------------------------------- state and step
def make_gan_optimizers(optim_g: OptimConfig, optim_d: OptimConfig):
    """``({"generator": tx, "discriminator": tx}, {"generator": clip, "discriminator": clip})``:
    Adam(W) with each config's schedule; clipping happens in the step (torch semantics)."""
    for name, o in (("optim", optim_g), ("optim_d", optim_d)):
        if o.accum_grad != 1:
            raise ConfigError(f"train.{name}.accum_grad={o.accum_grad}: GAN training needs accum_grad 1 "
                              "(the official recipe says so too: both turns step on every batch)")
    txs = {"generator": make_optimizer(dataclasses.replace(optim_g, grad_clip=0.0)),
           "discriminator": make_optimizer(dataclasses.replace(optim_d, grad_clip=0.0))}
    return txs, {"generator": optim_g.grad_clip, "discriminator": optim_d.grad_clip}


def init_gan_state(objective: HiFTGANObjective, txs: dict, mesh: M.Mesh, seed: int):
    """``{"params": {generator, discriminator}, "opt_state": {generator, discriminator}, "step"}``
    initialised directly sharded: params FSDP-sharded by :func:`mesh.param_shardings` (HiFT
    convs carry no logical axis names), Adam moments like their params, counters replicated."""
    from .trainer import state_shardings

    key = jax.random.key(seed)

    def init():
        params = objective.init_params(key)
        return {"params": params, "opt_state": {t: txs[t].init(params[t]) for t in TURNS},
                "step": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(init)
    pshard = M.param_shardings(abstract["params"], mesh)
    opt_sh = {t: state_shardings({"params": abstract["params"][t], "opt_state": abstract["opt_state"][t]},
                                 pshard[t], mesh)["opt_state"] for t in TURNS}
    shardings = {"params": pshard, "opt_state": opt_sh, "step": M.replicated(mesh)}
    return jax.jit(init, out_shardings=shardings)(), shardings


def _clip_coef(norm: jax.Array, max_norm: float) -> jax.Array:
    """torch ``clip_grad_norm_``: ``min(max_norm / (norm + 1e-6), 1)`` (1 when clipping is off)."""
    if max_norm <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(max_norm / (norm + 1e-6), 1.0)


def _apply(tx, grads, opt_state, params, norm):
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(norm)  # the official skips optimizer.step() on a non-finite norm
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    return keep(new_params, params), keep(new_opt, opt_state)


def gan_step(objective: HiFTGANObjective, txs: dict, clips: dict, state: dict, batch: dict, rng: jax.Array,
             precision: str = "fp32"):
    """One batch: discriminator turn, then generator turn (unjitted; see :func:`make_gan_train_step`).

    ``precision``: the trainer's mixed-precision policy (:func:`trainer.mixed_precision_loss`):
    each turn's loss sees its params cast to the compute dtype (set it in ``HiFTConfig.dtype`` with
    :func:`trainer.precision_model_config`); params, gradients and optimizer states stay fp32."""
    from .trainer import mixed_precision_loss

    params, opt = dict(state["params"]), dict(state["opt_state"])
    k_d, k_g = jax.random.split(rng)
    d_turn = mixed_precision_loss(objective.discriminator_loss, precision)
    g_turn = mixed_precision_loss(objective.generator_loss, precision)

    def d_loss(d):
        return d_turn({**params, "discriminator": d}, batch, k_d)

    (ld, md), gd = jax.value_and_grad(d_loss, has_aux=True)(params["discriminator"])
    nd = optax.tree.norm(gd)
    gd = jax.tree.map(lambda g: g * _clip_coef(nd, clips["discriminator"]), gd)
    params["discriminator"], opt["discriminator"] = _apply(txs["discriminator"], gd, opt["discriminator"],
                                                           params["discriminator"], nd)

    def g_loss(g, d):
        return g_turn({"generator": g, "discriminator": d}, batch, k_g)

    # grads of the discriminator too: the official clip norm counts them (they are not applied)
    (lg, mg), (gg, gdg) = jax.value_and_grad(g_loss, argnums=(0, 1), has_aux=True)(params["generator"],
                                                                                     params["discriminator"])
    ng = optax.tree.norm((gg, gdg))
    gg = jax.tree.map(lambda g: g * _clip_coef(ng, clips["generator"]), gg)
    params["generator"], opt["generator"] = _apply(txs["generator"], gg, opt["generator"], params["generator"], ng)

    metrics = {"loss": lg, "loss_d": ld, "grad_norm": ng, "grad_norm_d": nd,
               **{f"g_{k}": v for k, v in mg.items()}, **{f"d_{k}": v for k, v in md.items()}}
    return {"params": params, "opt_state": opt, "step": state["step"] + 1}, metrics


def make_gan_train_step(objective: HiFTGANObjective, txs: dict, clips: dict, shardings: Any, mesh: M.Mesh,
                        seed: int = 0, donate: bool = True, precision: str = "fp32") -> Callable:
    """``step(state, batch) -> (state, metrics)``: both turns in one jitted function per batch
    shape (state donated, batch rows over ``data x fsdp``); the key is ``fold_in(seed, step)``
    as in :func:`cosyvoice2_jax.train.trainer.make_train_step`."""
    from .trainer import precision_model_config

    precision_model_config(objective.cfg, precision)  # a bad precision name fails here, not at the first step
    base = jax.random.key(seed + 1)

    def step(state, batch):
        return gan_step(objective, txs, clips, state, batch, jax.random.fold_in(base, state["step"]), precision)

    jitted = {}

    def run(state, batch):
        from .distributed import global_batch

        batch = global_batch(batch, mesh)  # this process's rows -> global arrays (multi-process)
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in jitted:
            in_b = {k: M.batch_sharding(mesh, v.ndim) if v.ndim else M.replicated(mesh) for k, v in batch.items()}
            jitted[key] = jax.jit(step, in_shardings=(shardings, in_b), out_shardings=(shardings, M.replicated(mesh)),
                                  donate_argnums=(0,) if donate else ())
        return jitted[key](state, batch)

    run.compiled = jitted
    return run
