"""LM, DPO and differentiable-ASR-reward training objectives (paper sections 2.3 and 2.7; official
``Qwen2LM.forward`` / ``forward_dpo`` and ``DPOLoss``; the ASR reward has no official code).

Batches come from :mod:`cosyvoice2_jax.train.data` (fixed shapes; padding rows have
``valid=False`` and contribute nothing). The unistream/bistream choice per example is drawn from
the step's PRNG key with the official rule (50%, only when speech/text > 15/5).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ..config import LLMConfig, TokenASRConfig
from ..llm.modeling import Qwen2LM, init_params
from ..llm.objectives import (asr_reward_loss, bistream_from_uniforms, ce_loss, choose_bistream, dpo_logps, dpo_losses,
                              lm_forward)
from ..llm.params import param_axes


def _bistream(rng, batch, text_len, speech_len, cfg: LLMConfig, prob: float):
    """Per-row sequence type: from ``batch["bistream_u"]`` uniforms when given (to replay a
    recorded choice, e.g. the official one), else drawn from ``rng``."""
    if "bistream_u" in batch:
        return bistream_from_uniforms(batch["bistream_u"], text_len, speech_len, cfg.mix_ratio, prob)
    return choose_bistream(rng, text_len, speech_len, cfg.mix_ratio, prob)


@dataclasses.dataclass
class LMObjective:
    """Next-speech-token CE on unified uni/bistream sequences."""

    cfg: LLMConfig
    bistream_prob: float = 0.5
    init_from: Any = None  # params to start from (e.g. a released llm.pt), else random
    name: str = "lm"
    remat: str = "none"  # per-decoder-layer remat policy (layers/remat.py; TrainConfig.remat)

    def __post_init__(self):
        self.model = Qwen2LM(self.cfg, remat=self.remat)

    def init_params(self, rng):
        if self.init_from is not None:
            return self.init_from
        return init_params(self.cfg, rng)

    def param_axes(self):
        return param_axes(self.cfg)

    def loss_fn(self, params, batch, rng):
        bistream = _bistream(rng, batch, batch["text_token_len"], batch["speech_token_len"], self.cfg,
                             self.bistream_prob)
        t_out = batch["text_token"].shape[1] + batch["speech_token"].shape[1] + 2
        out = lm_forward(self.model, params, batch, bistream, t_out, batch["valid"])
        return out["loss"], {"acc": out["acc"], "bistream_frac": jnp.mean(bistream & batch["valid"])}


@dataclasses.dataclass
class DPOObjective:
    """DPO with a frozen reference (the starting SFT model): ``loss = dpo + sft CE``.

    Params are ``{"policy": ..., "ref": ...}``; :meth:`trainable` marks only the policy, so the
    optimizer keeps no state for the reference and never moves it. Log-probs are the mean over
    each row's valid targets; ``official_mask=True`` reproduces the official averaging instead
    (mean over *ignored* positions of the padded row, see ``llm.objectives.target_logps``), which
    depends on the padded length and so is only meaningful for parity tests.
    """

    cfg: LLMConfig
    beta: float = 0.01
    label_smoothing: float = 0.0
    ipo: bool = False
    official_mask: bool = False
    bistream_prob: float = 0.5
    init_from: Any = None  # policy params to start from (and copy into the reference)
    name: str = "dpo"
    remat: str = "none"  # per-decoder-layer remat policy (layers/remat.py; TrainConfig.remat)

    def __post_init__(self):
        self.model = Qwen2LM(self.cfg, remat=self.remat)

    def init_params(self, rng):
        p = self.init_from if self.init_from is not None else init_params(self.cfg, rng)
        return {"policy": p, "ref": p}

    def param_axes(self):
        axes = param_axes(self.cfg)
        return {"policy": axes, "ref": axes}

    @staticmethod
    def trainable(params):
        return {"policy": jax.tree.map(lambda _: True, params["policy"]),
                "ref": jax.tree.map(lambda _: False, params["ref"])}

    def logps(self, params, batch, bistream2):
        """Mean target log-probs of the chosen and rejected rows, and the chosen rows' forward."""
        return dpo_logps(self.model, params, batch, bistream2, official_mask=self.official_mask,
                         valid_b=batch["valid"])

    def loss_fn(self, params, batch, rng):
        bistream = _bistream(rng, batch, jnp.concatenate([batch["text_token_len"]] * 2),
                             jnp.concatenate([batch["speech_token_len"], batch["reject_speech_token_len"]]),
                             self.cfg, self.bistream_prob)
        chosen, rejected, out = self.logps(params["policy"], batch, bistream)
        ref = jax.lax.stop_gradient(params["ref"])
        ref_chosen, ref_rejected, _ = self.logps(ref, batch, bistream)
        sft, acc = ce_loss(out["logits"], out["lm_target"], self.cfg.lsm_weight, self.cfg.length_normalized_loss)
        valid = batch["valid"].astype(jnp.float32)
        n = jnp.maximum(valid.sum(), 1.0)
        losses, cr, rr = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing,
                                    self.ipo)
        pref = jnp.sum(losses * valid) / n  # padding rows excluded (the official batches have none)
        return pref + sft, {"sft_loss": sft, "dpo_loss": pref, "acc": acc,
                            "dpo_acc": jnp.sum((cr > rr) * valid) / n,
                            "chosen_reward": jnp.sum(cr * valid) / n, "reject_reward": jnp.sum(rr * valid) / n}


@dataclasses.dataclass(frozen=True)
class ASRRewardOptions:
    """The ``asr_reward:`` section of a training YAML (``configs/train/asr_reward.yaml``).

    ``loss = lm_weight * CE + asr_weight * L_ASR + dpo_weight * DPO``; ``L_ASR`` is the CTC loss of
    the frozen token ASR (``asr_from``: its ``token_asr.npz`` or training work directory) on
    Gumbel-softmax samples of the LM's speech-token distribution (``temperature``;
    ``straight_through``: hard one-hot forward, relaxed gradient). ``dpo_weight > 0`` adds DPO
    against a frozen copy of the starting LM and needs ``reject_speech_token`` in the shards.
    """

    asr_from: str = ""
    temperature: float = 1.0
    straight_through: bool = True
    lm_weight: float = 1.0
    asr_weight: float = 1.0
    dpo_weight: float = 0.0
    dpo_beta: float = 0.01


@dataclasses.dataclass
class ASRRewardObjective:
    """LM fine-tuning with the differentiable ASR reward, optionally with CE and DPO.

    Params are ``{"policy": lm, "asr": token ASR[, "ref": lm]}``; :meth:`trainable` marks only the
    policy, so the ASR (and the DPO reference) never move and keep no optimizer state. The Gumbel
    noise is drawn from the step key (``fold_in(rng, 1)``; the bistream choice uses ``rng``)."""

    cfg: LLMConfig
    asr_cfg: TokenASRConfig
    asr_params: Any
    options: ASRRewardOptions = ASRRewardOptions()
    bistream_prob: float = 0.5
    init_from: Any = None
    name: str = "asr_reward"
    remat: str = "none"

    def __post_init__(self):
        from ..token_asr.modeling import TokenASR

        if self.asr_params is None:
            raise ValueError("ASRRewardObjective needs the trained token ASR (asr_reward.asr_from)")
        if self.options.temperature <= 0:
            from ..errors import ConfigError

            raise ConfigError(f"asr_reward.temperature must be > 0, got {self.options.temperature}")
        if self.asr_cfg.codebook_size != self.cfg.speech_token_size:
            from ..errors import ConfigError

            raise ConfigError(f"token ASR codebook ({self.asr_cfg.codebook_size}) != LM speech tokens "
                              f"({self.cfg.speech_token_size})")
        self.model = Qwen2LM(self.cfg, remat=self.remat)
        self.asr = TokenASR(self.asr_cfg)

    @property
    def use_dpo(self) -> bool:
        return self.options.dpo_weight > 0

    def init_params(self, rng):
        p = self.init_from if self.init_from is not None else init_params(self.cfg, rng)
        out = {"policy": p, "asr": self.asr_params}
        if self.use_dpo:
            out["ref"] = p
        return out

    def param_axes(self):
        from ..token_asr.params import param_axes as asr_axes

        axes = param_axes(self.cfg)
        out = {"policy": axes, "asr": asr_axes(self.asr_cfg)}
        if self.use_dpo:
            out["ref"] = axes
        return out

    @staticmethod
    def trainable(params):
        return {k: jax.tree.map(lambda _: k == "policy", v) for k, v in params.items()}

    def asr_logits(self, asr_params):
        asr_params = jax.lax.stop_gradient(asr_params)

        def fn(codes, lengths):
            from ..token_asr.modeling import TokenASR

            return self.asr.apply({"params": asr_params}, codes, lengths, method=TokenASR.from_codes)

        return fn

    def loss_fn(self, params, batch, rng):
        o = self.options
        valid = batch["valid"]
        metrics = {}
        total = 0.0
        if self.use_dpo:
            bistream2 = _bistream(rng, batch, jnp.concatenate([batch["text_token_len"]] * 2),
                                  jnp.concatenate([batch["speech_token_len"], batch["reject_speech_token_len"]]),
                                  self.cfg, self.bistream_prob)
            chosen, rejected, out = dpo_logps(self.model, params["policy"], batch, bistream2, valid_b=valid,
                                              official_mask=False)
            ref_c, ref_r, _ = dpo_logps(self.model, jax.lax.stop_gradient(params["ref"]), batch, bistream2,
                                        valid_b=valid, official_mask=False)
            losses, cr, rr = dpo_losses(chosen, rejected, ref_c, ref_r, o.dpo_beta)
            v = valid.astype(jnp.float32)
            pref = jnp.sum(losses * v) / jnp.maximum(v.sum(), 1.0)
            total = total + o.dpo_weight * pref
            metrics.update(dpo_loss=pref, dpo_acc=jnp.sum((cr > rr) * v) / jnp.maximum(v.sum(), 1.0))
            bistream = bistream2[: batch["text_token"].shape[0]]
        else:
            bistream = _bistream(rng, batch, batch["text_token_len"], batch["speech_token_len"], self.cfg,
                                 self.bistream_prob)
            t_out = batch["text_token"].shape[1] + batch["speech_token"].shape[1] + 2
            out = lm_forward(self.model, params["policy"], batch, bistream, t_out, valid)
        ce, acc = ce_loss(out["logits"], out["lm_target"], self.cfg.lsm_weight, self.cfg.length_normalized_loss)
        asr, _ = asr_reward_loss(jax.random.fold_in(rng, 1), out["logits"], batch, bistream,
                                 self.asr_logits(params["asr"]), speech_token_size=self.cfg.speech_token_size,
                                 mix_ratio=self.cfg.mix_ratio, temperature=o.temperature,
                                 straight_through=o.straight_through, valid_b=valid, blank_id=self.asr_cfg.blank_id,
                                 fsq_dim=self.asr_cfg.fsq_dim, fsq_levels=self.asr_cfg.fsq_levels)
        total = total + o.lm_weight * ce + o.asr_weight * asr
        metrics.update(lm_loss=ce, asr_loss=asr, acc=acc)
        return total, metrics
