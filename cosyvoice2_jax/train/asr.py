"""Token-ASR training objective: CTC of the text tokens given the utterance's speech tokens
(``configs/train/token_asr.yaml``; the ASR read frozen by the differentiable ASR reward,
:class:`cosyvoice2_jax.train.lm.ASRRewardObjective`).

Batches are the LM's (``speech_token``, ``text_token`` and their lengths from the same parquet
shards); padding rows (``valid`` False) add nothing. The loss is the CTC negative log-likelihood
per text token (:func:`cosyvoice2_jax.token_asr.ctc_mean_loss`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ..config import TokenASRConfig
from ..token_asr.modeling import TokenASR, ctc_mean_loss, spoken_text
from ..token_asr.params import init_params, param_axes


@dataclasses.dataclass
class TokenASRObjective:
    cfg: TokenASRConfig
    init_from: Any = None
    name: str = "token_asr"

    def __post_init__(self):
        self.model = TokenASR(self.cfg)

    def init_params(self, rng):
        return self.init_from if self.init_from is not None else init_params(self.cfg, rng)

    def param_axes(self):
        return param_axes(self.cfg)

    def loss_fn(self, params, batch, rng):
        valid = batch["valid"]
        speech_len = jnp.where(valid, batch["speech_token_len"], 0)
        text_len = jnp.where(valid, batch["text_token_len"], 0)
        logits = self.model.apply({"params": params}, batch["speech_token"], speech_len)
        labels, label_len = spoken_text(batch["text_token"], text_len, batch.get("text_prompt_len"))
        loss, _ = ctc_mean_loss(logits, speech_len, labels, label_len, self.cfg.blank_id, valid)
        # frame accuracy proxy: share of valid frames whose best class is blank (CTC's usual early state)
        mask = jnp.arange(logits.shape[1])[None, :] < speech_len[:, None]
        blank = jnp.sum((jnp.argmax(logits, -1) == self.cfg.blank_id) & mask) / jnp.maximum(jnp.sum(mask), 1)
        return loss, {"ctc_loss": loss, "blank_frac": blank}
