"""Device meshes and shardings for training *and* inference: one logical-axis table for all models.

Mesh axes are ``('data', 'fsdp', 'tensor')`` (inference meshes may hold only ``data``):

* ``data``: pure data parallelism (batch split, params replicated);
* ``fsdp``: batch split *and* parameters/optimizer state sharded along their largest
  "embed"-like dimension (ZeRO-3 style), gathered by XLA where used;
* ``tensor``: Megatron-style model parallelism of MLP/attention/vocab dimensions.

Every component names the logical axes of its parameters (``param_axes(cfg)`` of ``llm``,
``flow``, ``hift``, ``tokenizer``, ``speaker``: the LM from its ``nn.with_logical_partitioning``
annotations, the convolutional models by :func:`axes_by_rule`); the single table
:data:`LOGICAL_RULES` maps logical names to mesh axes, and :func:`param_shardings` drops a mesh
axis that does not divide a dimension. Leaves given no logical axes are sharded over ``fsdp`` on
their largest divisible dimension.

Batches (training steps, batched synthesis) split their leading dimension over the mesh's batch
axes (:func:`batch_sharding`, :func:`pad_rows`).

Multi-host: every host runs the same ``cosyvoice2-jax train`` command; the CLI joins the processes
first (:func:`cosyvoice2_jax.train.distributed.initialize`: ``--coordinator HOST:PORT --num-processes N
--process-id I``, or ``--distributed`` where jax discovers them: TPU pod slices, SLURM, Open MPI), then
builds the same mesh everywhere from ``train.mesh``::

    # SLURM, 2 nodes x 4 GPUs (one task per node):
    srun cosyvoice2-jax train --config configs/train/lm.yaml --distributed --no-progress \\
        --set data.batch_multiple=8 --set train.mesh.data=-1 --set train.mesh.fsdp=2 ...
    # TPU pod slice (v4-16, 2 hosts x 4 chips): the same command on every worker
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cosyvoice2-jax train ... --distributed ..."

The README's "Multi-process (pod) training" has the full recipes (tests/test_train_pod.py runs them).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes (None = replicated). One table for every model.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),  # model width: sharded for FSDP
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),  # k/v projections: 2 kv heads, too few to split
    ("head_dim", None),
    ("vocab", "tensor"),
    ("length", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_kernel", None),  # kernel taps of a conv
    ("norm", None),         # norm scales, biases, batch-norm statistics
)
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


def initialize_distributed(**kwargs) -> None:
    """Multi-host setup (``jax.distributed.initialize``); a no-op in a single-process run.

    With no kwargs it initialises only when the environment shows a multi-process launch
    (SLURM, Open MPI, TPU pod workers, or JAX_COORDINATOR_ADDRESS), where jax auto-detects the
    coordinator; pass ``coordinator_address=, num_processes=, process_id=`` otherwise.
    """
    if kwargs or _looks_multihost():
        jax.distributed.initialize(**kwargs)


def _looks_multihost() -> bool:
    import os

    if "JAX_COORDINATOR_ADDRESS" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        return True
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(k, "1") or "1") > 1:
            return True
    return False


def make_mesh(cfg: MeshConfig | Sequence[int] = MeshConfig(), devices=None) -> Mesh:
    """Build a ``('data', 'fsdp', 'tensor')`` mesh (Auto axis types: XLA propagates the shardings)."""
    if not isinstance(cfg, MeshConfig):
        cfg = MeshConfig(*cfg)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ValueError("only one mesh axis may be -1")
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into fsdp={cfg.fsdp} x tensor={cfg.tensor}")
        sizes[sizes.index(-1)] = n // known
    if -1 not in (cfg.data, cfg.fsdp, cfg.tensor) and math.prod(sizes) < n:
        devices, n = devices[: math.prod(sizes)], math.prod(sizes)  # an explicit smaller mesh
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {n}")
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, AXES)


def logical_to_spec(logical: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    table = dict(rules)
    out, used = [], set()
    for name in logical:
        ax = table.get(name) if name is not None else None
        axes = (ax,) if isinstance(ax, str) else tuple(ax or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def _fsdp_spec(shape: Sequence[int], mesh: Mesh) -> P:
    """Shard the largest dimension divisible by the fsdp size; replicate the rest."""
    f = mesh.shape.get("fsdp", 1)
    if f == 1 or not shape:
        return P()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for d in dims:
        if shape[d] % f == 0 and shape[d] >= f:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(params: Any, mesh: Mesh, logical_specs: Any = None, rules=LOGICAL_RULES) -> Any:
    """NamedSharding for every leaf of ``params``.

    ``logical_specs``: a matching tree of logical-axis tuples (``nn.get_partition_spec`` of boxed
    params) or None; leaves without a logical spec get the FSDP default.
    """
    def one(x, logical=None):
        shape = getattr(x, "shape", ())
        if logical is not None and len(tuple(logical)) == len(shape):
            spec = logical_to_spec(tuple(logical), rules)
            # drop axes that do not divide the dimension
            fixed = []
            for dim, ax in zip(shape, spec):
                axes = tuple(a for a in ((ax,) if isinstance(ax, str) else tuple(ax or ())) if a in mesh.shape)
                size = math.prod(mesh.shape[a] for a in axes) if axes else 1
                fixed.append((axes[0] if len(axes) == 1 else axes) if axes and dim % size == 0 else None)
            return NamedSharding(mesh, P(*fixed))
        return NamedSharding(mesh, _fsdp_spec(shape, mesh))

    if logical_specs is None:
        return jax.tree.map(one, params)
    return jax.tree.map(one, params, logical_specs, is_leaf=lambda v: isinstance(v, (tuple, P)) or v is None)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch dimension is split over (those of :data:`BATCH_AXES` the mesh has)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_multiple(mesh: Mesh | None) -> int:
    """Rows of a batch must be a multiple of this (1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes(mesh))


def pad_rows(n: int, mesh: Mesh | None) -> int:
    """``n`` rounded up so the rows split evenly over the mesh's batch axes."""
    m = batch_size_multiple(mesh)
    return -(-n // m) * m


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays: leading dim split over the batch axes (data x fsdp), the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place_replicated(tree: Any, mesh: Mesh | None) -> Any:
    """Device copy of ``tree``: replicated over ``mesh``, or on the default device without one."""
    return jax.device_put(tree) if mesh is None else jax.device_put(tree, replicated(mesh))


def place_rows(x: Any, mesh: Mesh | None) -> Any:
    """Place one batch array with its rows split over the mesh's batch axes (as is without a mesh)."""
    return x if mesh is None else jax.device_put(x, batch_sharding(mesh, np.ndim(x)))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch (dict of numpy arrays, leading dim = batch) on the mesh."""
    n = batch_size_multiple(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, replicated(mesh))
        if x.shape[0] % n:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by data x fsdp = {n}; "
                             "choose a batch size that is a multiple of it")
        return jax.device_put(x, batch_sharding(mesh, x.ndim))

    return jax.tree.map(put, batch)


# ----------------------------------------------------------------------------------- logical axes of params
def axes_by_rule(abstract_params: Any) -> Any:
    """Logical axes of every leaf of a Flax param tree from its name and rank (the flow, HiFT,
    tokenizer and speaker modules use torch-like layers without annotations):

    * ``embedding`` ``(V, D)`` -> ``(vocab, embed)``;
    * dense ``kernel`` ``(in, out)`` -> ``(embed, mlp)``;
    * conv ``kernel`` / ``weight_v`` ``(k..., in, out)`` -> ``(conv_kernel..., conv_in, conv_out)``,
      weight-norm gains ``weight_g`` likewise (their size-1 dims unsharded);
    * everything else (biases, norm scales, batch-norm statistics, Snake alphas) -> ``norm``.
    """
    def one(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        nd = len(x.shape)
        if name == "embedding" and nd == 2:
            return ("vocab", "embed")
        if name in ("kernel", "weight_v", "weight_g") and nd == 2:
            return ("embed", "mlp")
        if name in ("kernel", "weight_v", "weight_g") and nd >= 3:
            return ("conv_kernel",) * (nd - 2) + ("conv_in", "conv_out")
        return ("norm",) * nd

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def axes_from_boxed(boxed_abstract: Any) -> Any:
    """Logical axes of an ``nn.with_logical_partitioning``-annotated (boxed) param tree."""
    import flax.linen as nn

    specs = nn.get_partition_spec(boxed_abstract)
    return jax.tree.map(lambda s: tuple(s) if isinstance(s, P) else None, specs,
                        is_leaf=lambda s: isinstance(s, P) or s is None)


def is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def place_params(params: Any, mesh: Mesh | None, axes: Any = None) -> Any:
    """Put a component's params on ``mesh``: sharded by their logical ``axes`` (a matching tree of
    tuples, e.g. ``llm.param_axes(cfg)``), replicated when ``axes`` is None."""
    if mesh is None or axes is None:
        return place_replicated(params, mesh)
    return jax.device_put(params, param_shardings(params, mesh, axes))
