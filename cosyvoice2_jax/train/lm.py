"""LM and DPO training objectives (paper sections 2.3 and 2.7; official ``Qwen2LM.forward`` /
``forward_dpo`` and ``DPOLoss``).

Batches come from :mod:`cosyvoice2_jax.train.data` (fixed shapes; padding rows have
``valid=False`` and contribute nothing). The unistream/bistream choice per example is drawn from
the step's PRNG key with the official rule (50%, only when speech/text > 15/5).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..config import LMConfig
from ..llm.modeling import (IGNORE_ID, Qwen2LM, bistream_from_uniforms, ce_loss, choose_bistream,
                            prepare_lm_input_target)


def _bistream(rng, batch, text_len, speech_len, cfg: LMConfig, prob: float):
    """Per-row sequence type: from ``batch["bistream_u"]`` uniforms when given (to replay a
    recorded choice, e.g. the official one), else drawn from ``rng``."""
    if "bistream_u" in batch:
        return bistream_from_uniforms(batch["bistream_u"], text_len, speech_len, cfg.mix_ratio, prob)
    return choose_bistream(rng, text_len, speech_len, cfg.mix_ratio, prob)


def _lm_outputs(model: Qwen2LM, params, text, text_len, speech, speech_len, valid, bistream):
    cfg = model.cfg
    v = {"params": params}
    t_out = text.shape[1] + speech.shape[1] + 2
    text_len = jnp.where(valid, text_len, 0)
    speech_len = jnp.where(valid, speech_len, 0)
    text_emb = model.apply(v, text, method=Qwen2LM.embed_text)
    speech_emb = model.apply(v, speech, method=Qwen2LM.embed_speech)
    special = model.apply(v, jnp.arange(2), method=Qwen2LM.embed_special)
    lm_input, target, lengths = prepare_lm_input_target(
        text_emb, speech_emb, special, text_len, speech, speech_len, bistream, t_out,
        cfg.speech_token_size, cfg.mix_ratio)
    target = jnp.where(valid[:, None], target, IGNORE_ID)  # padding rows predict nothing
    logits = model.apply(v, lm_input, jnp.maximum(lengths, 1))
    return logits, target


@dataclasses.dataclass
class LMObjective:
    """Next-speech-token CE on unified uni/bistream sequences."""

    cfg: LMConfig
    bistream_prob: float = 0.5
    name: str = "lm"
    remat: str = "none"  # per-decoder-layer remat policy (layers/remat.py; TrainConfig.remat)

    def __post_init__(self):
        self.model = Qwen2LM(self.cfg, remat=self.remat)

    def init_params(self, rng):
        x = jnp.zeros((1, 4, self.cfg.qwen.hidden_size), jnp.float32)
        return self.model.init(rng, x, jnp.array([4], jnp.int32))["params"]

    def loss_fn(self, params, batch, rng):
        bistream = _bistream(rng, batch, batch["text_token_len"], batch["speech_token_len"], self.cfg,
                             self.bistream_prob)
        logits, target = _lm_outputs(self.model, params, batch["text_token"], batch["text_token_len"],
                                     batch["speech_token"], batch["speech_token_len"], batch["valid"], bistream)
        loss, acc = ce_loss(logits, target, self.cfg.lsm_weight, self.cfg.length_normalized_loss)
        return loss, {"acc": acc, "bistream_frac": jnp.mean(bistream & batch["valid"])}


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.01, label_smoothing: float = 0.0,
               ipo: bool = False):
    """Official ``DPOLoss`` per example: (losses (B,), chosen_rewards, rejected_rewards); the
    official loss is ``losses.mean()``."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
                  - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    return losses, jax.lax.stop_gradient(beta * (chosen - ref_chosen)), \
        jax.lax.stop_gradient(beta * (rejected - ref_rejected))


@dataclasses.dataclass
class DPOObjective:
    """DPO with a frozen reference (the starting SFT model): ``loss = dpo + sft CE``.

    Params are ``{"policy": ..., "ref": ...}``; :meth:`trainable` marks only the policy, so the
    optimizer keeps no state for the reference and never moves it. Log-probs are the mean over
    each row's valid targets; ``official_mask=True`` reproduces the official averaging instead
    (mean over *ignored* positions of the padded row, see ``llm.modeling.target_logps``), which
    depends on the padded length and so is only meaningful for parity tests.
    """

    cfg: LMConfig
    beta: float = 0.01
    label_smoothing: float = 0.0
    ipo: bool = False
    official_mask: bool = False
    bistream_prob: float = 0.5
    init_from: object = None  # policy params to start from (and copy into the reference)
    name: str = "dpo"
    remat: str = "none"  # per-decoder-layer remat policy (layers/remat.py; TrainConfig.remat)

    def __post_init__(self):
        self.model = Qwen2LM(self.cfg, remat=self.remat)

    def init_params(self, rng):
        if self.init_from is not None:
            p = self.init_from
        else:
            x = jnp.zeros((1, 4, self.cfg.qwen.hidden_size), jnp.float32)
            p = self.model.init(rng, x, jnp.array([4], jnp.int32))["params"]
        return {"policy": p, "ref": p}

    @staticmethod
    def trainable(params):
        return {"policy": jax.tree.map(lambda _: True, params["policy"]),
                "ref": jax.tree.map(lambda _: False, params["ref"])}

    def _logps(self, params, batch, bistream2):
        b = batch["text_token"].shape[0]
        sp, rj = batch["speech_token"], batch["reject_speech_token"]
        s = max(sp.shape[1], rj.shape[1])
        pad = lambda x: jnp.pad(x, ((0, 0), (0, s - x.shape[1])))  # noqa: E731
        two = lambda x: jnp.concatenate([x, x])  # noqa: E731
        logits, target = _lm_outputs(
            self.model, params, two(batch["text_token"]), two(batch["text_token_len"]),
            jnp.concatenate([pad(sp), pad(rj)]),
            jnp.concatenate([batch["speech_token_len"], batch["reject_speech_token_len"]]),
            two(batch["valid"]), bistream2)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        ignore = target == IGNORE_ID
        lp = jnp.take_along_axis(logp, jnp.where(ignore, 0, target)[..., None], -1)[..., 0]
        if self.official_mask:  # the official multiplies by the *chosen* rows' ignore mask
            m = jnp.concatenate([ignore[:b], ignore[:b]]).astype(lp.dtype)
            per = jnp.mean(lp * m, -1)
        else:
            m = (~ignore).astype(lp.dtype)
            per = jnp.sum(lp * m, -1) / jnp.maximum(m.sum(-1), 1)
        return per[:b], per[b:], logits[:b], target[:b]

    def loss_fn(self, params, batch, rng):
        bistream = _bistream(rng, batch, jnp.concatenate([batch["text_token_len"]] * 2),
                             jnp.concatenate([batch["speech_token_len"], batch["reject_speech_token_len"]]),
                             self.cfg, self.bistream_prob)
        chosen, rejected, logits, target = self._logps(params["policy"], batch, bistream)
        ref = jax.lax.stop_gradient(params["ref"])
        ref_chosen, ref_rejected, _, _ = self._logps(ref, batch, bistream)
        sft, acc = ce_loss(logits, target, self.cfg.lsm_weight, self.cfg.length_normalized_loss)
        valid = batch["valid"].astype(jnp.float32)
        n = jnp.maximum(valid.sum(), 1.0)
        losses, cr, rr = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing,
                                    self.ipo)
        pref = jnp.sum(losses * valid) / n  # padding rows excluded (the official batches have none)
        return pref + sft, {"sft_loss": sft, "dpo_loss": pref, "acc": acc,
                            "dpo_acc": jnp.sum((cr > rr) * valid) / n,
                            "chosen_reward": jnp.sum(cr * valid) / n, "reject_reward": jnp.sum(rr * valid) / n}
