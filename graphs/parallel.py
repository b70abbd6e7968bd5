"""Meshes and batch placement for data-parallel graph training, on the shared ``lmx.parallel`` mesh.

A mesh is ``lmx.parallel.make_mesh``'s ``('data', 'fsdp', 'tensor')`` mesh with Auto axes (any
``make_mesh`` / ``mesh_from_spec`` mesh works). A training step sees a stack of equally-shaped
padded batches whose leading axis is split over ``lmx.parallel.BATCH_AXES`` (``data`` x
``fsdp``). Parameters, optimizer state and GTSP masks are **replicated**: the graph transformers
here have 10^4-10^6 parameters, far below what sharding them would pay for, so ``fsdp`` and
``tensor`` only act as extra batch shards or replicas.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmx.parallel import BATCH_AXES, make_mesh, replicated
from lmx.parallel import shard_batch as _shard_rows

__all__ = ["data_mesh", "data_parallel_size", "batch_sharding", "check_stack", "shard_batch",
           "replicated"]


def data_mesh(n_devices: int | None = None) -> Mesh:
    """``make_mesh(data=n, fsdp=1, tensor=1)`` over the first ``n_devices`` devices (default: all).

    Raises ``ValueError`` unless ``1 <= n_devices <= len(jax.devices())``.
    """
    devs = jax.devices()
    n = len(devs) if n_devices is None else n_devices
    if not isinstance(n, int) or not 1 <= n <= len(devs):
        raise ValueError(f"n_devices must be an int in [1, {len(devs)}], got {n!r}")
    return make_mesh(data=n, fsdp=1, tensor=1, devices=devs[:n])


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: the product of ``mesh``'s ``BATCH_AXES`` sizes (``data*fsdp``)."""
    missing = [a for a in BATCH_AXES if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh axes {tuple(mesh.shape)} lack batch axes {missing}; "
                         f"build it with lmx.parallel.make_mesh or graphs.parallel.data_mesh")
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (stacked-batch) axis split over ``data`` x ``fsdp``; other axes replicated."""
    data_parallel_size(mesh)
    return NamedSharding(mesh, P(BATCH_AXES))


def check_stack(batch, mesh: Mesh) -> None:
    """Check that a stacked ``GraphBatch`` (this process's part) splits over this process's
    share of ``mesh``'s ``data`` x ``fsdp`` shards.

    Raises:
      ValueError: ``batch`` is not stacked (``graph_mask`` not ``[D, B]``), or ``D`` does not
        divide by this process's data-parallel shards.
    """
    n_shards = data_parallel_size(mesh)
    pc = jax.process_count()
    local = n_shards // pc if n_shards % pc == 0 else n_shards
    if np.ndim(batch.graph_mask) != 2:
        raise ValueError(f"batch must be a stacked GraphBatch (graph_mask [D, B]), got graph_mask of "
                         f"shape {np.shape(batch.graph_mask)}; stack batches with "
                         f"graphs.data.stack_batches")
    n = int(np.shape(batch.graph_mask)[0])
    if n % local:
        raise ValueError(f"a stack of {n} padded batches does not split over the {local} "
                         f"data-parallel shards of this process (mesh axes {dict(mesh.shape)}, "
                         f"batch axes {BATCH_AXES}); stack a multiple of {local} batches "
                         f"(graphs.train.fit fills a short stack with label-free copies)")


def shard_batch(batch, mesh: Mesh):
    """Place a stacked ``GraphBatch`` (leading axis = padded batches, from
    ``graphs.data.stack_batches``) with that axis split over ``data`` x ``fsdp``.

    In a multi-process run each process passes only its own stacked batches, and the global
    stack is their concatenation in process order (``lmx.parallel.shard_batch``).

    Raises:
      ValueError: as :func:`check_stack`, before anything is placed.
    """
    check_stack(batch, mesh)
    return _shard_rows(batch, mesh)
