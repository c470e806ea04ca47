"""Sharded train steps and the resumable training loop.

An :class:`Objective` knows its model: how to initialise params (optionally the given starting
weights, ``init_from``), the logical axes of its params (``param_axes()``, from the component's
contract; else taken from ``nn.with_logical_partitioning`` boxes, else FSDP by shape:
:mod:`cosyvoice2_jax.sharding`), and its loss ``loss_fn(params, batch, rng) -> (loss, metrics)``. The trainer owns everything
else: the mesh, the jitted step with NamedSharding in/out (state donated), the optimizer, the data
iterator, Orbax checkpoints that carry the data state, metrics (stdout + TensorBoard events).

Mixed precision (``TrainConfig.precision``): ``fp32`` (default) or ``bf16``: params and optimizer
state stay fp32; the step casts the floating params to bf16 at its boundary and the model computes
in bf16 through its ``dtype`` config field (:func:`precision_model_config` sets ``LLMConfig.dtype``,
``FlowConfig.dtype`` and ``HiFTConfig.dtype``; the models keep norms, softmax and their other
precision-critical parts in fp32); gradients arrive as fp32 (the cotangents of the casts), the loss and metrics
are returned in fp32 and the optimizer (clip, Adam) runs in fp32.

Objectives with several optimizers (the HiFT GAN) provide ``init_train(cfg, mesh) -> (state,
shardings, step_fn)`` and the loop uses theirs (see :mod:`cosyvoice2_jax.train.hift`).

Multi-process (pod) runs: every process runs this same loop on its share of the data (see
:mod:`cosyvoice2_jax.train.distributed`); batches become global arrays through
``jax.make_array_from_process_local_data``, every process writes its own shards of each Orbax
checkpoint, the data-iterator states of all processes are saved together (one entry per process
index), and metrics, TensorBoard events and the progress bar come from process 0 only. Held-out
metrics are computed on global batches, so they are reduced over all processes.

Determinism: the step's PRNG key is ``fold_in(seed_key, step)``, and the data order is a function
of (seed, epoch, position), so a run resumed from a checkpoint reproduces the uninterrupted run
exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from .. import sharding as M
from . import distributed as DIST
from .checkpoint import Checkpointer
from .optim import OptimConfig, make_optimizer


class Objective(Protocol):
    name: str

    def init_params(self, rng: jax.Array) -> Any:
        """Params, optionally boxed with ``nn.with_logical_partitioning`` metadata."""

    def loss_fn(self, params: Any, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar loss and a dict of scalar metrics."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0
    keep: int = 3
    async_save: bool = True
    workdir: str = "runs/exp"
    mesh: M.MeshConfig = M.MeshConfig()
    optim: OptimConfig = OptimConfig()
    optim_d: OptimConfig = OptimConfig()  # the discriminator's optimizer (HiFT GAN only)
    precision: str = "fp32"  # fp32 | bf16 (compute dtype; params and optimizer state stay fp32)
    remat: str = "none"  # none|full|dots|dots_no_batch (layers/remat.py): LM/DPO per decoder layer, flow per U-Net stage


PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def _check_precision(precision: str):
    if precision not in PRECISIONS:
        from ..errors import ConfigError

        raise ConfigError(f"train.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def precision_model_config(model_cfg, precision: str):
    """``model_cfg`` (an LLMConfig, FlowConfig, HiFTConfig or ModelConfig) with its compute ``dtype`` fields set
    for ``precision`` (``bf16`` -> ``"bfloat16"``); fp32 returns it unchanged."""
    _check_precision(precision)
    if precision == "fp32":
        return model_cfg
    if hasattr(model_cfg, "llm") and hasattr(model_cfg, "flow"):
        return dataclasses.replace(model_cfg, llm=precision_model_config(model_cfg.llm, precision),
                                   flow=precision_model_config(model_cfg.flow, precision),
                                   hift=precision_model_config(model_cfg.hift, precision))
    if hasattr(model_cfg, "dtype"):
        return dataclasses.replace(model_cfg, dtype="bfloat16")
    return model_cfg


def cast_floating(tree: Any, dtype) -> Any:
    """Cast the fp32 leaves of ``tree`` to ``dtype`` (ints, bools, keys unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if getattr(x, "dtype", None) == jnp.float32 else x, tree)


def mixed_precision_loss(loss_fn: Callable, precision: str) -> Callable:
    """``loss_fn`` wrapped for ``precision``: params cast to the compute dtype on entry, loss and
    metrics cast to fp32 on exit. ``fp32`` returns ``loss_fn`` itself."""
    dtype = _check_precision(precision)
    if precision == "fp32":
        return loss_fn

    def lf(params, batch, rng):
        loss, metrics = loss_fn(cast_floating(params, dtype), batch, rng)
        return loss.astype(jnp.float32), jax.tree.map(lambda v: jnp.asarray(v).astype(jnp.float32), metrics)

    return lf


def with_trainable_mask(objective, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Apply ``tx`` only where ``objective.trainable(params)`` is True (e.g. DPO's frozen
    reference gets zero updates and no optimizer state)."""
    if not hasattr(objective, "trainable"):
        return tx
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda p: jax.tree.map(lambda t: "train" if t else "frozen", objective.trainable(p)))


def _state_init(objective: Objective, tx: optax.GradientTransformation, seed: int) -> Callable:
    key = jax.random.key(seed)

    def init():
        boxed = objective.init_params(key)
        params = nn.meta.unbox(boxed)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return init


def abstract_state(objective: Objective, tx: optax.GradientTransformation, mesh: M.Mesh, seed: int = 0):
    """``(abstract, shardings)``: shapes/dtypes of ``{"params", "opt_state", "step"}`` (no
    allocation) and their NamedShardings on ``mesh``; compile a step without executing it
    (``scripts/bench_train.py scale``)."""
    key = jax.random.key(seed)
    abstract = jax.eval_shape(_state_init(objective, tx, seed))
    if hasattr(objective, "param_axes"):  # the component's logical axes (llm.param_axes, ...)
        logical = objective.param_axes()
    else:  # from nn.with_logical_partitioning boxes, if the objective's init keeps them
        logical = M.axes_from_boxed(jax.eval_shape(lambda: objective.init_params(key)))
    pshard = M.param_shardings(abstract["params"], mesh, logical)
    return abstract, state_shardings(abstract, pshard, mesh)


def init_state(objective: Objective, tx: optax.GradientTransformation, mesh: M.Mesh, seed: int):
    """Initialise ``{"params", "opt_state", "step"}`` directly sharded on ``mesh``."""
    _, shardings = abstract_state(objective, tx, mesh, seed)
    state = jax.jit(_state_init(objective, tx, seed), out_shardings=shardings)()
    return state, shardings


def _key_path(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state: Any, param_shardings: Any, mesh: M.Mesh) -> Any:
    """Optimizer-state leaves follow the sharding of the parameter they belong to (matched by the
    parameter's key path, which optax states such as Adam's mu/nu repeat, and by shape);
    counts and other scalars are replicated."""
    rep = M.replicated(mesh)
    by_path = {}
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0],
                            jax.tree.leaves(param_shardings)):
        by_path[_key_path(path)] = (tuple(x.shape), s)

    def one(path, x):
        kp = _key_path(path)
        for i in range(len(kp)):
            hit = by_path.get(kp[i:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return rep

    opt = jax.tree_util.tree_map_with_path(one, abstract_state["opt_state"])
    return {"params": param_shardings, "opt_state": opt, "step": rep}


def make_train_step(objective: Objective, tx: optax.GradientTransformation, shardings: Any, mesh: M.Mesh,
                    seed: int = 0, donate: bool = True, precision: str = "fp32") -> Callable:
    """``step(state, batch) -> (state, metrics)``, jitted with shardings; batch leading dim over
    ``data x fsdp``. ``precision``: see the module docstring."""
    base = jax.random.key(seed + 1)
    loss_fn = mixed_precision_loss(objective.loss_fn, precision)

    def step(state, batch):
        rng = jax.random.fold_in(base, state["step"])

        def lf(p):
            return loss_fn(p, batch, rng)

        (loss, metrics), grads = jax.value_and_grad(lf, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def batch_shard(x):
        return M.batch_sharding(mesh, x.ndim) if x.ndim else M.replicated(mesh)

    jitted = {}

    def run(state, batch):
        batch = DIST.global_batch(batch, mesh)  # this process's rows -> global arrays
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in jitted:
            in_b = {k: batch_shard(v) for k, v in batch.items()}
            jitted[key] = jax.jit(step, in_shardings=(shardings, in_b), out_shardings=(shardings, M.replicated(mesh)),
                                  donate_argnums=(0,) if donate else ())
        return jitted[key](state, batch)

    run.compiled = jitted  # exposed for compile-count tests
    run.step = step  # the unjitted step (tests inspect its jaxpr)
    return run


class MetricsWriter:
    """Scalars to stdout and TensorBoard event files (tensorboardX)."""

    def __init__(self, logdir: str | Path | None):
        self.writer = None
        if logdir is not None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(logdir))
        self.history: list[dict] = []

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        row = {k: float(v) for k, v in metrics.items()}
        self.history.append({"step": step, "split": prefix, **row})
        if self.writer is not None:
            for k, v in row.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(objective: Objective, data: Iterator[dict], cfg: TrainConfig, *, eval_data: Callable[[], Iterator] | None = None,
          progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) training in ``cfg.workdir``; returns the final state and metric history.

    ``data`` must have ``state()`` and accept resumption by the caller via the checkpoint's data
    state (see :func:`resume_data_state`). ``stop_after``: return after this many steps of this
    call (tests use it to simulate an interruption).
    """
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    main = DIST.is_main()
    DIST.check_mesh(cfg.mesh)
    mesh = M.make_mesh(cfg.mesh)
    if hasattr(objective, "init_train"):  # several optimizers (HiFT GAN): the objective builds them
        state, shardings, step_fn = objective.init_train(cfg, mesh)
    else:
        tx = with_trainable_mask(objective, make_optimizer(cfg.optim))
        state, shardings = init_state(objective, tx, mesh, cfg.seed)
        step_fn = make_train_step(objective, tx, shardings, mesh, cfg.seed, precision=cfg.precision)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.keep, async_save=cfg.async_save)
    if ckpt.latest_step() is not None:
        state, _, _ = ckpt.restore(None, state, shardings)
    writer = MetricsWriter(workdir / "tb" if main else None)
    start = int(state["step"])
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=objective.name, dynamic_ncols=True)
    t0, done = time.time(), 0
    # metrics.jsonl is written by process 0 alone
    with open(workdir / "metrics.jsonl" if main else os.devnull, "a", encoding="utf-8") as log:
        while int(state["step"]) < cfg.steps:
            batch = next(data)
            state, metrics = step_fn(state, batch)
            step = int(state["step"])
            metrics = jax.device_get(metrics)
            log.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
            log.flush()
            if step % cfg.log_every == 0 or step == cfg.steps:
                writer.write(step, metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            if bar is not None:
                bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                ckpt.save(step, state, data_state=gather_data_state(data.state()), meta={"objective": objective.name})
            if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
                ev = evaluate(objective, state["params"], eval_data(), mesh=mesh)
                writer.write(step, ev, prefix="eval")
            done += 1
            if stop_after is not None and done >= stop_after:
                break
    ckpt.close()
    writer.close()
    if bar is not None:
        bar.close()
    return {"state": state, "history": writer.history, "steps_per_s": done / max(time.time() - t0, 1e-9)}


def gather_data_state(state: dict) -> dict:
    """This process's data state plus, in a multi-process run, every process's (``"processes"``:
    one entry per process index), as saved with a checkpoint."""
    if jax.process_count() == 1:
        return state
    return dict(state, processes=DIST.allgather_json(state))


def data_state_for_process(saved: dict, process_index: int | None = None, process_count: int | None = None) -> dict:
    """The entry of a saved data state that process ``process_index`` of ``process_count`` resumes
    from. All processes of a run advance through their (equal-length) plans in lockstep, so their
    positions agree and a checkpoint written by N processes also resumes on M != N processes."""
    from ..errors import ConfigError

    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    per = saved.get("processes")
    if not per:
        return saved
    if len(per) == n:
        return per[p]
    positions = {json.dumps(s, sort_keys=True) for s in per}
    if len(positions) != 1:
        raise ConfigError(f"the checkpoint was written by {len(per)} processes at different data positions and "
                          f"cannot resume on {n}; resume with {len(per)} processes")
    return per[0]


def resume_data_state(workdir: str | Path) -> dict | None:
    """This process's data-iterator state saved with the latest checkpoint in ``workdir`` (or None)."""
    ckdir = Path(workdir) / "checkpoints"
    if not ckdir.exists():
        return None
    ck = Checkpointer(ckdir, async_save=False)
    try:
        step = ck.latest_step()
        if step is None:
            return None
        import orbax.checkpoint as ocp

        out = ck.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return data_state_for_process(dict(out["data"] or {}))
    finally:
        ck.close()


def evaluate(objective: Objective, params: Any, batches: Iterator[dict], mesh: M.Mesh | None = None) -> dict:
    """Mean of the objective's metrics over held-out batches (no PRNG-dependent dropout).

    With ``mesh``, each batch holds this process's rows and is assembled into a global batch, so
    every process gets the metrics of the whole batch (reduced over processes)."""
    fn = jax.jit(lambda p, b: objective.loss_fn(p, b, jax.random.key(0)))
    sums: dict[str, float] = {}
    n = 0
    for b in batches:
        if mesh is not None and jax.process_count() > 1:
            b = DIST.global_batch(b, mesh)
        loss, m = fn(params, b)
        m = dict(m, loss=loss)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}
