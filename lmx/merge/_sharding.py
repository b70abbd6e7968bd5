"""The one place where merging touches device meshes (via ``lmx.parallel``).

Learned merges (AdaMerging, Concrete) run a jitted step whose state (coefficients, mask logits,
Adam moments, base weights, task vectors) is replicated and whose per-task unlabeled batches are
split along their leading batch axis over the data-parallel mesh axes (``data`` x ``fsdp``) of
``lmx.parallel.make_mesh`` (Auto axes; all devices on ``data`` by default).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from lmx.parallel import BATCH_AXES, batch_sharding, make_mesh, replicated


def make_merge_mesh() -> Mesh:
    """All local devices on the ``"data"`` axis (``lmx.parallel.make_mesh()``)."""
    return make_mesh()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` fully replicated on ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split each leaf along axis 0 over the batch axes when divisible, else replicate it
    (unlike ``lmx.parallel.shard_batch``, which raises: per-task batches of any size work)."""
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

    def put(x):
        if x.ndim >= 1 and x.shape[0] % n == 0:
            return jax.device_put(x, batch_sharding(mesh, x.ndim))
        return jax.device_put(x, replicated(mesh))

    return jax.tree_util.tree_map(put, batch)


def sharded_step(step: Callable, mesh: Mesh) -> Callable:
    """``step(state, const, batch, key) -> (state, loss)`` jitted with replicated outputs;
    inputs keep the shardings given by :func:`replicate` / :func:`shard_batch` and the GSPMD
    partitioner propagates the rest."""
    return jax.jit(step, out_shardings=replicated(mesh))
