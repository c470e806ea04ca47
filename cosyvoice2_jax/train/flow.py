"""Flow-matching training objective (paper section 2.4; official
``CausalMaskedDiffWithXvec.forward`` + ``CausalConditionalCFM.compute_loss``).

Each step draws, from the step key: the flow time ``t``, the noise ``z``, the CFG drop (20% of
rows lose mu, speaker and cond), the prompt prefix used as cond (<= 30% of the target for half the
rows) and the attention mask: the official static-chunk-or-full coin per batch, or the paper's
four mask types per example (``FlowConfig.cfm.train_masks = paper``). Padding rows of a
fixed-shape batch have no valid frames and add nothing to the loss.

``options`` (:class:`~cosyvoice2_jax.flow.train_options.FlowTrainOptions`, ``flow:`` in the
training YAML): time-sampling law, CFG drop rate and per-t loss weighting; the defaults are the
official objective.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..config import FlowConfig
from ..flow import cfm as cfm_lib
from ..flow import modeling as F
from ..flow import train_options as TO
from ..layers.remat import check_remat


class FlowBatch(NamedTuple):
    """A flow training batch unpacked with its random draws (:func:`unpack_batch`)."""

    feat: jax.Array  # (B, F, n_mels) target mel
    feat_len: jax.Array  # (B,) valid frames, 0 on padding rows
    tok_len: jax.Array  # (B,) valid tokens, 0 on padding rows
    draws: dict  # cfm.sample_loss_draws: t, noise, CFG drop, prompt prefix
    chunk: jax.Array  # (B,) attention chunk per row (flow.modeling.loss_masks; 0 = full)


def unpack_batch(cfg: FlowConfig, batch: dict, k_draws: jax.Array, k_mask: jax.Array) -> FlowBatch:
    """The target mel and lengths of a flow batch (padding rows, ``valid`` false, get length 0) and
    the step's draws (``k_draws``) and attention masks (``k_mask``); the flow and distillation
    objectives share it."""
    feat = batch["speech_feat"]
    B, Fr, C = feat.shape
    feat_len = jnp.where(batch["valid"], batch["speech_feat_len"], 0)
    tok_len = jnp.where(batch["valid"], batch["speech_token_len"], 0)
    draws = cfm_lib.sample_loss_draws(k_draws, B, Fr, feat_len, cfg.cfm, C)
    return FlowBatch(feat, feat_len, tok_len, draws, F.loss_masks(cfg, k_mask, B))


@dataclasses.dataclass
class FlowObjective:
    cfg: FlowConfig
    options: TO.FlowTrainOptions = TO.FlowTrainOptions()
    init_from: Any = None  # params to start from (e.g. a released flow.pt), else random
    name: str = "flow"
    remat: str = "none"  # per-U-Net-stage remat policy of the estimator (layers/remat.py; TrainConfig.remat)

    def __post_init__(self):
        check_remat(self.remat)
        self.cfg = dataclasses.replace(self.cfg, cfm=TO.apply_to_cfm(self.cfg.cfm, self.options),
                                       decoder=dataclasses.replace(self.cfg.decoder, remat=self.remat))

    def init_params(self, rng):
        return self.init_from if self.init_from is not None else F.init_params(self.cfg, rng)

    def loss_fn(self, params, batch, rng):
        cfg = self.cfg
        feat, feat_len, tok_len, draws, chunk = unpack_batch(cfg, batch, *jax.random.split(rng))
        # recorded draws (e.g. the official module's) replace the sampled ones when given
        draws = {k: batch.get(f"draw_{k}", v) for k, v in draws.items()}
        chunk = batch.get("draw_chunk", chunk)
        draws = TO.apply_to_draws(draws, self.options, cfg.cfm.t_scheduler)
        loss = F.training_loss(params, cfg, batch["speech_token"], tok_len, feat, feat_len, batch["embedding"],
                               draws, chunk)
        return loss, {"frames": jnp.sum(feat_len).astype(jnp.float32),
                      "chunked_frac": jnp.mean((chunk > 0).astype(jnp.float32))}
