"""Multi-process (multi-controller) training: what each process reads, and how the pieces meet.

A pod runs one JAX process per host, each executing the same program (``jax.distributed``). Here:

* :func:`initialize` joins the processes (explicit coordinator, or auto-detected on TPU pods and
  SLURM / Open MPI clusters) and selects gloo for CPU collectives, so a multi-process run works on
  plain CPUs too (the local 2-process test and the README recipe);
* :func:`process_batch_block` says which slice of every global batch this process's devices
  hold; the data pipeline loads only those rows (:class:`~cosyvoice2_jax.train.data.TrainData`
  ``process_block``), so no row is read by two processes of a data/fsdp-parallel run;
* :func:`global_batch` turns the local rows into global ``jax.Array`` s with
  ``jax.make_array_from_process_local_data``. Per-batch padded lengths (token/text buckets) are
  agreed first: every process pads its arrays to the maximum over processes, which is exactly the
  bucket a single process would pick for the whole batch, so a run gives the same numbers on any
  number of processes;
* :func:`allgather_json` (tiny host collectives) backs the config check
  (:func:`check_same_config`) and the per-process data-iterator states saved with checkpoints.

In a single-process run every function here reduces to the single-process behaviour
(``process_batch_block`` = the whole batch, ``global_batch`` = :func:`mesh.shard_batch`).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import jax
import numpy as np

from ..errors import ConfigError
from .. import sharding as M


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
    """Join a multi-process run (call before anything touches the devices).

    Explicit: all three arguments (``--coordinator HOST:PORT --num-processes N --process-id I``).
    ``auto`` (``--distributed``): ``jax.distributed.initialize()`` discovers them (TPU pod slices,
    SLURM, Open MPI). Neither: a single-process run (even inside a SLURM allocation, so that a
    command typed in an ``salloc`` shell does not wait for processes that were never started).
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("a multi-process launch needs all of --coordinator HOST:PORT, --num-processes N "
                          "and --process-id I (or none of them on TPU pods / SLURM, where they are detected)")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} is outside 0..{num_processes - 1} (--num-processes "
                              f"{num_processes})")
        if num_processes == 1:
            return
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    else:
        if not auto:
            return
        kwargs = {}
    # CPU devices exchange data through gloo (no-op for TPU/GPU computations)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    M.initialize_distributed(**kwargs)


def is_main() -> bool:
    """True on the process that writes logs, metrics and progress (process 0)."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------- host collectives
def allgather_json(obj: Any) -> list[Any]:
    """``[obj of process 0, obj of process 1, ...]`` (JSON-serialisable values); ``[obj]`` alone."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(obj))]
    from jax.experimental import multihost_utils as mh

    raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode("utf-8"), np.uint8)
    lens = np.asarray(mh.process_allgather(np.asarray(len(raw), np.int32))).reshape(-1)
    buf = np.zeros((int(lens.max()),), np.uint8)
    buf[: len(raw)] = raw
    allb = np.asarray(mh.process_allgather(buf)).reshape(len(lens), -1)
    return [json.loads(bytes(allb[i, : int(lens[i])]).decode("utf-8")) for i in range(len(lens))]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def check_same_config(cfg: dict, gathered: list[dict] | None = None) -> None:
    """Raise :class:`ConfigError` when the processes resolved different training configs.

    ``cfg``: this process's resolved config (a JSON-able dict). ``gathered``: every process's
    config (tests pass it; default: gathered here). The message names the processes and keys.
    """
    if gathered is None:
        if jax.process_count() == 1:
            return
        gathered = allgather_json({"digest": config_digest(cfg), "cfg": cfg})
    else:
        gathered = [{"digest": config_digest(c), "cfg": c} for c in gathered]
    ref = gathered[0]
    bad = [i for i, g in enumerate(gathered) if g["digest"] != ref["digest"]]
    if not bad:
        return
    f0 = _flatten(ref["cfg"])
    lines = []
    for i in bad:
        fi = _flatten(gathered[i]["cfg"])
        keys = sorted(k for k in set(f0) | set(fi) if f0.get(k) != fi.get(k))
        diff = ", ".join(f"{k}: {f0.get(k)!r} vs {fi.get(k)!r}" for k in keys[:5])
        lines.append(f"process {i} differs from process 0 in {diff}")
    raise ConfigError("the processes of this run resolved different training configs (" + "; ".join(lines)
                      + "); launch every process with the same --config file and --set values")


def check_mesh(cfg: M.MeshConfig, n_devices: int | None = None, n_processes: int | None = None) -> None:
    """A multi-process mesh must use every device of every process (a smaller explicit mesh would
    leave processes without work); raise :class:`ConfigError` naming the sizes otherwise."""
    n = jax.device_count() if n_devices is None else n_devices
    p = jax.process_count() if n_processes is None else n_processes
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    where = f"{p} processes x {n // max(p, 1)} local devices = {n} devices" if p > 1 else f"{n} devices"
    if sizes.count(-1) > 1:
        raise ConfigError("only one of train.mesh.data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"train.mesh sizes must be positive (or -1 for 'the rest'), got {dict(zip(M.AXES, sizes))}")
    if -1 in sizes:
        ok = n % known == 0
    else:
        ok = known == n or (p == 1 and known < n)
    if not ok:
        need = "a divisor of" if -1 in sizes else "exactly" if p > 1 else "at most"
        raise ConfigError(f"train.mesh {dict(zip(M.AXES, sizes))} does not fit {where}: the product of the "
                          f"fixed axes must be {need} {n}; change train.mesh.* (e.g. train.mesh.data=-1)")


# ----------------------------------------------------------------------------------- batches
def process_batch_block(mesh: M.Mesh) -> tuple[int, int, int]:
    """``(start, stop, n)``: this process's devices hold batch shards ``start..stop-1`` of the
    ``n = data x fsdp`` shards of every global batch (rows ``[start*B/n, stop*B/n)``)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    sharding = M.batch_sharding(mesh, 1)
    idx = sharding.devices_indices_map((n,))
    mine = sorted({idx[d][0].start or 0 for d in mesh.devices.flat if d.process_index == jax.process_index()})
    if not mine:
        raise ConfigError(f"process {jax.process_index()} has no device in the mesh; use all devices")
    start, stop = mine[0], mine[-1] + 1
    if mine != list(range(start, stop)):
        raise ConfigError(f"process {jax.process_index()} holds non-adjacent batch shards {mine} of this mesh; "
                          "order the mesh so that each process's devices are adjacent along data x fsdp")
    return start, stop, n


def _agree_shapes(local: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    specs = allgather_json({k: [list(np.shape(v)), np.asarray(v).dtype.str] for k, v in local.items()})
    out = {}
    for k in sorted(set().union(*specs)):
        shapes = [s[k][0] for s in specs if k in s]
        if len({len(s) for s in shapes}) != 1:
            raise ValueError(f"batch array {k!r} has different ranks on different processes: {shapes}")
        out[k] = (tuple(max(s[i] for s in shapes) for i in range(len(shapes[0]))),
                  next(s[k][1] for s in specs if k in s))
    return out


def global_batch(local: dict, mesh: M.Mesh, block: tuple[int, int, int] | None = None) -> dict:
    """Global ``jax.Array`` batch (leading dim over ``data x fsdp``) from this process's rows.

    Single process: :func:`mesh.shard_batch` of the whole batch. Several processes: ``local`` holds
    the rows of :func:`process_batch_block`; arrays are zero-padded (the pipeline's own padding
    value) to the per-dimension maximum over processes, and keys that only some processes have
    (a process whose rows were all dropped) are created as zeros.
    """
    if jax.process_count() == 1:
        return M.shard_batch(local, mesh)
    start, stop, n = block or process_batch_block(mesh)
    agreed = _agree_shapes(local)
    local_rows = {int(np.shape(v)[0]) for v in local.values() if np.ndim(v)}
    if len(local_rows) != 1:
        raise ValueError(f"local batch arrays disagree on the row count: {sorted(local_rows)}")
    rows = local_rows.pop()
    if rows % (stop - start):
        raise ValueError(f"this process holds {stop - start} batch shards but {rows} rows; "
                         "set data.batch_multiple to a multiple of data x fsdp")
    global_rows = rows // (stop - start) * n
    out = {}
    for k, (shape, dtype) in agreed.items():
        x = np.asarray(local[k]) if k in local else np.zeros((rows,) + shape[1:], np.dtype(dtype))
        if x.ndim == 0:
            out[k] = jax.device_put(x, M.replicated(mesh))
            continue
        pad = [(0, 0)] + [(0, t - s) for s, t in zip(x.shape[1:], shape[1:])]
        if any(p[1] for p in pad):
            x = np.pad(x, pad)
        out[k] = jax.make_array_from_process_local_data(M.batch_sharding(mesh, x.ndim), x,
                                                        (global_rows,) + x.shape[1:])
    return out
