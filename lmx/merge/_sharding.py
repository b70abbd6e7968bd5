"""The one place where merging touches device meshes (switch point to ``lmx.parallel``).

Learned merges (AdaMerging, Concrete) run a jitted step whose state (coefficients, mask logits,
Adam moments, base weights, task vectors) is replicated and whose per-task unlabeled batches are
split along their leading batch axis over the mesh's ``"data"`` axis. ``lmx.parallel.make_mesh``
(Auto axes ``('data', 'fsdp', 'tensor')``, all devices on ``data`` by default) is used when the
package provides it; until then an equivalent one-axis Auto mesh is built here.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_merge_mesh() -> Mesh:
    """All local devices on a ``"data"`` axis with Auto axis types."""
    try:
        from lmx.parallel import make_mesh
    except ImportError:
        return jax.make_mesh((jax.device_count(),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    return make_mesh()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` fully replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split each leaf along axis 0 over ``"data"`` when divisible, else replicate it."""
    n = mesh.shape["data"]

    def put(x):
        spec = P("data") if x.ndim >= 1 and x.shape[0] % n == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(put, batch)


def sharded_step(step: Callable, mesh: Mesh, *, donate_state: bool = True) -> Callable:
    """``step(state, const, batch, key) -> (state, metrics)`` jitted with replicated outputs.

    ``state`` is donated (updated in place); inputs keep the shardings given by
    :func:`replicate` / :func:`shard_batch`; the partitioner propagates the rest.
    """
    return jax.jit(step, out_shardings=NamedSharding(mesh, P()),
                   donate_argnums=(0,) if donate_state else ())
