"""Meshes and shardings for data-parallel graph training, on the shared ``lmx.parallel`` mesh.

A mesh is ``lmx.parallel.make_mesh``'s ``('data', 'fsdp', 'tensor')`` mesh with Auto axes. The
training loop stacks one padded batch per data-parallel shard and splits that leading axis over
``lmx.parallel.BATCH_AXES`` (``data`` x ``fsdp``); parameters are replicated (the graph models
are small, so ``fsdp``/``tensor`` only act as extra batch shards or replicas).
"""
from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmx.parallel import BATCH_AXES, make_mesh, replicated

__all__ = ["data_mesh", "data_parallel_size", "batch_sharding", "replicated"]


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
