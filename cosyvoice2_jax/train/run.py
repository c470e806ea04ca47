"""``cosyvoice2-jax train --config configs/train/<lm|flow|dpo|hift|distill_*|token_asr|asr_reward|msft>.yaml
[--set key=value ...]``.

A training YAML maps onto :class:`TrainFile`: which objective, the model config (preset name or
model YAML), the tokenizer directory, optional initial weights (a release directory or an
``llm.pt``/``flow.pt``/``hift.pt``), the data pipeline (:class:`DataConfig`) and the loop
(:class:`TrainConfig`: steps, mesh, optimizer, checkpointing). Re-running the same command
resumes from the latest checkpoint in ``train.workdir`` with the exact data position.

Multi-process (pod) runs execute the same command in every process (``cosyvoice2-jax train ...
--coordinator HOST:PORT --num-processes N --process-id I``, or nothing extra on TPU pods / SLURM);
:func:`run` checks that all processes resolved the same config, and each one loads only its rows
of every batch (see :mod:`cosyvoice2_jax.train.distributed`).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Sequence

from ..config import PRESETS, ModelConfig, TokenASRConfig, apply_overrides, load_yaml, to_dict
from ..errors import ConfigError
from ..flow.distill import DistillOptions
from ..flow.train_options import FlowTrainOptions
from ..layers.remat import check_remat
from . import data as D
from . import distributed as DIST
from .. import sharding as M
from . import trainer as TR
from .hift import GANConfig
from .lm import ASRRewardOptions

OBJECTIVES = ("lm", "flow", "dpo", "hift", "distill", "token_asr", "asr_reward")
_WEIGHTS = {"lm": "llm.pt", "dpo": "llm.pt", "asr_reward": "llm.pt", "flow": "flow.pt", "hift": "hift.pt",
            "distill": "flow.pt", "token_asr": "token_asr.npz"}
_COMPONENT = {"lm": "llm", "dpo": "llm", "asr_reward": "llm", "flow": "flow", "hift": "hift", "distill": "flow",
              "token_asr": "token_asr"}


@dataclasses.dataclass(frozen=True)
class TrainFile:
    objective: str = "lm"
    model: str = "cosyvoice2"  # preset name or a model YAML path
    tokenizer_dir: str = ""
    init_from: str = ""  # release directory, llm.pt or flow.pt ('' = random init)
    data: D.DataConfig = D.DataConfig()
    eval_data_list: str = ""
    train: TR.TrainConfig = TR.TrainConfig()
    gan: GANConfig = GANConfig()  # HiFT GAN only: discriminators and loss weights
    flow: FlowTrainOptions = FlowTrainOptions()  # flow only: time law, CFG drop, per-t loss weighting
    distill: DistillOptions = DistillOptions()  # distill only: few-step student of the init_from flow (teacher)
    token_asr: TokenASRConfig = TokenASRConfig()  # token_asr / asr_reward: the token-level ASR's shape
    asr_reward: ASRRewardOptions = ASRRewardOptions()  # asr_reward only: frozen ASR, Gumbel temperature, weights


def load_train_file(path: str | Path, overrides: Sequence[str] = ()) -> TrainFile:
    tf = load_yaml(TrainFile, path, overrides)
    if tf.objective not in OBJECTIVES:
        raise ConfigError(f"objective {tf.objective!r} is not one of {', '.join(OBJECTIVES)}")
    return tf


def model_config(tf: TrainFile) -> ModelConfig:
    if tf.model in PRESETS:
        return PRESETS[tf.model]()
    p = Path(tf.model)
    if not p.is_file():
        raise ConfigError(f"model {tf.model!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    return ModelConfig.from_yaml(p)


def _init_params(tf: TrainFile, cfg: ModelConfig):
    if not tf.init_from:
        return None
    p = Path(tf.init_from)
    name = _WEIGHTS[tf.objective]
    if tf.objective == "token_asr":  # token_asr.npz or a token-ASR training work directory
        from ..token_asr import from_release

        return from_release(p, token_asr_config(tf, cfg))
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise ConfigError(f"init_from: {p} does not exist (give a release directory or the {name} file)")
    component = _COMPONENT[tf.objective]
    params = importlib.import_module(f"cosyvoice2_jax.{component}").from_release(p, getattr(cfg, component))
    # HiFT: the released generator; the discriminator starts from scratch
    return {"generator": params} if tf.objective == "hift" else params


def token_asr_config(tf: TrainFile, cfg: ModelConfig) -> TokenASRConfig:
    """``tf.token_asr`` with ``text_vocab_size`` 0 replaced by the LM's text vocabulary."""
    if tf.token_asr.text_vocab_size > 0:
        return tf.token_asr
    return dataclasses.replace(tf.token_asr, text_vocab_size=cfg.llm.qwen.vocab_size)


def build_objective(tf: TrainFile, cfg: ModelConfig, init=None):
    cfg = TR.precision_model_config(cfg, tf.train.precision)
    check_remat(tf.train.remat)
    if tf.train.remat != "none" and tf.objective not in ("lm", "dpo", "asr_reward", "flow"):
        raise ConfigError(f"train.remat={tf.train.remat!r} is implemented for the LM, DPO, ASR-reward and flow "
                          "objectives only; "
                          f"use remat: none for {tf.objective}")
    if tf.objective == "token_asr":
        from .asr import TokenASRObjective

        return TokenASRObjective(token_asr_config(tf, cfg), init_from=init)
    if tf.objective == "asr_reward":
        from ..token_asr import from_release
        from .lm import ASRRewardObjective

        if not tf.asr_reward.asr_from:
            raise ConfigError("asr_reward.asr_from is required: the token_asr.npz or training work directory of "
                              "configs/train/token_asr.yaml")
        acfg = token_asr_config(tf, cfg)
        return ASRRewardObjective(cfg.llm, acfg, from_release(tf.asr_reward.asr_from, acfg), tf.asr_reward,
                                  init_from=init, remat=tf.train.remat)
    if tf.objective == "hift":
        from .hift import HiFTGANObjective

        return HiFTGANObjective(cfg.hift, tf.gan, init_from=init)
    if tf.objective == "lm":
        from .lm import LMObjective

        return LMObjective(cfg.llm, init_from=init, remat=tf.train.remat)
    if tf.objective == "dpo":
        from .lm import DPOObjective

        return DPOObjective(cfg.llm, init_from=init, remat=tf.train.remat)
    if tf.objective == "distill":
        from .distill import DistillObjective

        return DistillObjective(cfg.flow, tf.distill, init_from=init)
    from .flow import FlowObjective

    return FlowObjective(cfg.flow, tf.flow, init_from=init, remat=tf.train.remat)


def run(config: str | Path, overrides: Sequence[str] = (), progress: bool = True) -> dict:
    tf = load_train_file(config, overrides)
    cfg = model_config(tf)
    if tf.tokenizer_dir:
        from ..frontend.text import QwenTextTokenizer

        tokenize = QwenTextTokenizer.from_dir(tf.tokenizer_dir).encode
    elif tf.objective in ("flow", "hift", "distill"):
        tokenize = lambda t: [0]  # noqa: E731  (the flow and the vocoder do not read text)
    else:
        raise ConfigError("tokenizer_dir is required for LM, DPO and token-ASR training (the release's CosyVoice-BlankEN folder)")
    data_cfg = dataclasses.replace(tf.data, need_mel=tf.objective in ("flow", "distill"))
    if tf.objective == "hift":
        if tf.data.truncate_length <= 0:
            raise ConfigError("HiFT GAN training needs data.truncate_length > 0 (fixed-length crops; official "
                              "24480 with data.align_samples 960)")
        feats = tuple(tf.data.features) + (() if "pitch" in tf.data.features else ("pitch",))
        data_cfg = dataclasses.replace(tf.data, need_mel=False, features=feats)
    resolved = json.loads(json.dumps(to_dict(tf), ensure_ascii=False))
    DIST.check_same_config(resolved)  # multi-process: every process must run the same config
    DIST.check_mesh(tf.train.mesh)
    block = DIST.process_batch_block(M.make_mesh(tf.train.mesh))  # this process's rows of each batch
    workdir = Path(tf.train.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if DIST.is_main():
        (workdir / "train_config.json").write_text(json.dumps(resolved, indent=2, ensure_ascii=False))
    data = D.TrainData(data_cfg, tokenize, state=TR.resume_data_state(workdir), process_block=block)
    eval_fn = None
    if tf.eval_data_list:
        ecfg = dataclasses.replace(data_cfg, data_list=tf.eval_data_list, shuffle=False)

        def eval_fn():
            ev = D.TrainData(ecfg, tokenize, process_block=block)
            return (next(ev) for _ in range(ev.batches_per_epoch()))
    obj = build_objective(tf, cfg, _init_params(tf, cfg))
    return TR.train(obj, data, tf.train, eval_data=eval_fn, progress=progress)


__all__ = ["TrainFile", "load_train_file", "run", "apply_overrides"]
