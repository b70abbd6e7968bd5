"""The one place where merging touches device meshes (via ``lmx.parallel``).

Learned merges (AdaMerging, Concrete) keep their big arrays split over the ``fsdp`` mesh axis:
every float tensor of the merge (base weights, each task's vector, the Concrete mask logits and
their Adam moments) has its largest dimension that divides the ``fsdp`` size named ``"shard"``,
a logical axis that :data:`lmx.parallel.DEFAULT_RULES` maps to ``fsdp``; the K stacked task
vectors add an unsharded leading axis. Coefficients (``[K]`` / ``[K, L]``) and non-float leaves
stay replicated. Per-task unlabeled batches are split along their leading axis over ``data`` x
``fsdp`` by :func:`lmx.parallel.shard_batch`, which raises for a batch that does not divide.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from lmx.parallel import DEFAULT_RULES, logical_to_spec, make_mesh, replicated


def make_merge_mesh() -> Mesh:
    """All local devices on the ``"data"`` axis (``lmx.parallel.make_mesh()``)."""
    return make_mesh()


def tensor_axes(shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES
                ) -> tuple[str | None, ...]:
    """Logical axes of a merged tensor: ``"shard"`` on its largest dimension that divides the
    size of the mesh axes the ``"shard"`` rule names (the first such dimension on ties), None
    elsewhere; all None when no dimension divides or the rule names no axis of ``mesh``."""
    axes = rules.get("shard")
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    size = 1
    for a in axes:
        size *= mesh.shape.get(a, 1)
    names: list[str | None] = [None] * len(shape)
    fits = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
    if size > 1 and fits:
        names[max(fits, key=lambda i: (shape[i], -i))] = "shard"
    return tuple(names)


def tensor_sharding(shape: Sequence[int], mesh: Mesh, *, stacked: bool = False,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of one merged tensor of ``shape``; ``stacked``: ``shape`` has a leading task axis
    (task vectors ``[K, ...]``), which is never split."""
    inner = tuple(shape[1:]) if stacked else tuple(shape)
    names = ((None,) if stacked else ()) + tensor_axes(inner, mesh, rules)
    return NamedSharding(mesh, logical_to_spec(names, tuple(shape), mesh, rules))


def replicate_all(tree: Any, mesh: Mesh) -> Any:
    """A replicated sharding for every leaf of ``tree`` (same structure)."""
    return jax.tree.map(lambda _: replicated(mesh), tree)
