"""Orbax checkpoints of the training state plus the data-iterator state.

One checkpoint = ``state`` (params, optimizer state, step: any pytree of arrays, sharded or not)
+ ``data`` (the input pipeline's iterator state, JSON) + ``meta`` (config, metrics, JSON).
Restoring takes the *target* shardings, so a checkpoint written on one mesh restores onto another
(e.g. saved on (8,1,1), restored on (2,2,2)).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` (async save, keep-N)."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True,
                 save_interval_steps: int = 1):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                            save_interval_steps=save_interval_steps, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, meta: dict | None = None,
             force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state),
                "data": ocp.args.JsonSave(data_state or {}),
                "meta": ocp.args.JsonSave(meta or {})}
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int | None, target: Any, shardings: Any = None) -> tuple[Any, dict, dict]:
        """Restore ``(state, data_state, meta)``; ``target`` gives structure/shapes/dtypes and
        ``shardings`` (a matching tree of ``NamedSharding``) where each leaf goes."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if shardings is None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=getattr(x, "sharding", None)), target)
        else:
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
