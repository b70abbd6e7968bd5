"""Task vectors over arbitrary pytrees (dicts of arrays, Flax NNX ``State``), with validation.

A task vector is tau_i = theta_i - theta_0 (Ilharco et al. 2023, "Editing models with task
arithmetic", arXiv:2212.04089, Sec. 2), computed in float32 for every floating-point leaf.
Integer/bool leaves (step counters, token ids, buffers) carry no task vector: their task-vector
leaf is a zero of the leaf's own dtype and every merge returns the base model's value for them
(the official Concrete code, github.com/tanganke/subspace_fusion ``src/task_vectors.py``, skips
them the same way).

Leaves are named by their tree path joined with ``"."`` (``{"a": {"b": x}}`` -> ``"a.b"``; an NNX
``Variable``'s trailing ``.value`` is dropped), so a flat safetensors dict and the same tree in
memory share names: errors, per-leaf random keys (DARE) and layer-wise coefficients use them.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _key_part(k: Any) -> str | None:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name == "value" else k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def leaf_name(path: Sequence[Any]) -> str:
    """Dotted name of a tree path (``jax.tree_util`` key path); NNX ``.value`` dropped."""
    parts = [p for p in (_key_part(k) for k in path) if p is not None]
    return ".".join(parts) if parts else "<root>"


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(name, leaf), ...]`` in ``jax.tree_util`` flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(leaf_name(p), x) for p, x in flat]


def is_float(x: Any) -> bool:
    """True for floating-point array leaves (the only leaves that get task vectors)."""
    return jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                          jnp.floating)


def float_leaf_names(tree: PyTree) -> list[str]:
    """Names of the floating-point leaves, in order: the "layers" of layer-wise merging."""
    return [n for n, x in named_leaves(tree) if is_float(x)]


def check_compatible(reference: PyTree, others: Sequence[PyTree], *,
                     ref_label: str = "base", label: str = "model", start: int = 0) -> None:
    """Raise unless every tree in ``others`` has the structure, shapes and dtypes of ``reference``.

    Messages call the trees ``f"{label} {start + i}"`` and ``ref_label``.

    Raises:
      ValueError: different tree structure (names the missing/extra leaves), or a leaf whose
        shape differs (names the tensor and both shapes).
      TypeError: a leaf whose dtype differs (names the tensor and both dtypes).
    """
    ref_leaves = named_leaves(reference)
    ref_def = jax.tree_util.tree_structure(reference)
    for i, other in enumerate(others, start):
        if jax.tree_util.tree_structure(other) != ref_def:
            ref_names = {n for n, _ in ref_leaves}
            names = {n for n, _ in named_leaves(other)}
            missing, extra = sorted(ref_names - names), sorted(names - ref_names)
            raise ValueError(
                f"{label} {i} has a different tree structure from {ref_label}: "
                f"missing tensors {missing[:5]}, extra tensors {extra[:5]}"
                + ("" if missing or extra else f"; structures {ref_def} vs "
                   f"{jax.tree_util.tree_structure(other)}"))
        for (name, a), (_, b) in zip(ref_leaves, named_leaves(other)):
            if tuple(np.shape(a)) != tuple(np.shape(b)):
                raise ValueError(f"tensor {name!r}: {label} {i} has shape {tuple(np.shape(b))}, "
                                 f"{ref_label} has shape {tuple(np.shape(a))}")
            if jnp.result_type(a) != jnp.result_type(b):
                raise TypeError(f"tensor {name!r}: {label} {i} has dtype {jnp.result_type(b)}, "
                                f"{ref_label} has dtype {jnp.result_type(a)}")


def leaf_task_vectors(base: jax.Array, finetuned: jax.Array) -> jax.Array:
    """tau = float32(finetuned) - float32(base) for one leaf; ``finetuned`` may carry a leading
    task axis ``[K, *base.shape]``. Non-float leaves give zeros of their own dtype."""
    if not is_float(base):
        return jnp.zeros(jnp.shape(finetuned), jnp.result_type(base))
    return jnp.asarray(finetuned, jnp.float32) - jnp.asarray(base, jnp.float32)


def task_vector(base: PyTree, finetuned: PyTree) -> PyTree:
    """tau = theta_ft - theta_0 leaf by leaf (float32 for float leaves; see module doc).

    Raises: ValueError/TypeError from :func:`check_compatible`, naming the tensor.
    """
    check_compatible(base, [finetuned], label="finetuned model")
    return jax.tree_util.tree_map(leaf_task_vectors, base, finetuned)


def task_vectors(base: PyTree, finetuned: Sequence[PyTree]) -> list[PyTree]:
    """``[task_vector(base, m) for m in finetuned]`` with one up-front compatibility check."""
    if len(finetuned) == 0:
        raise ValueError("finetuned: need at least one fine-tuned model, got 0")
    check_compatible(base, finetuned, label="finetuned model")
    return [jax.tree_util.tree_map(leaf_task_vectors, base, m) for m in finetuned]


def check_task_vectors(base: PyTree, tvs: Sequence[PyTree]) -> None:
    """Validate task vectors against ``base``: same structure and shapes; float leaves float32
    (as :func:`task_vector` makes them), other leaves of the base's dtype.

    Raises: ValueError (count, structure, shape) or TypeError (dtype), naming the tensor.
    """
    if len(tvs) == 0:
        raise ValueError("task_vectors: need at least one task vector, got 0")
    check_compatible(tvs[0], tvs[1:], ref_label="task vector 0", label="task vector", start=1)
    base_leaves = named_leaves(base)
    if jax.tree_util.tree_structure(base) != jax.tree_util.tree_structure(tvs[0]):
        check_compatible(base, [tvs[0]], label="task vector")
    for (name, b), (_, t) in zip(base_leaves, named_leaves(tvs[0])):
        if tuple(np.shape(b)) != tuple(np.shape(t)):
            raise ValueError(f"tensor {name!r}: task vectors have shape {tuple(np.shape(t))}, "
                             f"base has shape {tuple(np.shape(b))}")
        want = jnp.float32 if is_float(b) else jnp.result_type(b)
        if jnp.result_type(t) != want:
            raise TypeError(f"tensor {name!r}: task vector dtype {jnp.result_type(t)}, expected "
                            f"{jnp.dtype(want)} (base dtype {jnp.result_type(b)})")


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack K same-structure trees leaf-wise into one tree with leaves ``[K, ...]``."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def coefficients(lam: float | Sequence[float] | jax.Array, k: int, *, name: str = "lam"
                 ) -> jax.Array:
    """Broadcast a scalar or length-K sequence of merge coefficients to float32 ``[K]``.

    Raises: ValueError if a sequence does not have length K (the number of task vectors).
    """
    arr = jnp.asarray(lam, jnp.float32)
    if arr.ndim == 0:
        return jnp.full((k,), arr, jnp.float32)
    if arr.shape != (k,):
        raise ValueError(f"{name}: expected a scalar or {k} coefficients (one per task vector), "
                         f"got shape {tuple(arr.shape)}")
    return arr
