"""Device meshes, logical-axis sharding rules and sharded placement (pjit semantics via ``jax.jit``).

Parameters carry logical axis names in their ``logical_axes`` metadata (e.g. ``("layers",
"embed", "qkv")``); :data:`DEFAULT_RULES` maps those names to mesh axes ``data``/``fsdp``/
``tensor`` (MaxText style). A dimension whose size does not divide by its mesh axes is left
replicated, so any model runs on any mesh (GSPMD keeps results identical; only speed changes).

Multi-host: call :func:`initialize_distributed` once per process (one process per host) before
building the mesh; :func:`make_mesh` then spans every process's devices and the same code runs.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "qkv": "tensor",
    "mlp": "tensor",
    "layers": None,
}


def initialize_distributed(**kwargs: Any) -> None:
    """``jax.distributed.initialize`` when launched multi-host (coordinator env vars set).

    On a single process this is a no-op, so scripts can call it unconditionally.
    """
    if kwargs or os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
        jax.distributed.initialize(**kwargs)


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axes (GSPMD). ``data=None`` takes all remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    for name, v in (("fsdp", fsdp), ("tensor", tensor)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if data is None:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices do not divide by fsdp*tensor = {fsdp * tensor}")
        data = len(devices) // (fsdp * tensor)
    n = data * fsdp * tensor
    if n > len(devices) or n < 1:
        raise ValueError(f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {n} needs {n} devices, "
                         f"have {len(devices)}")
    grid = np.asarray(devices[:n], dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _axis_size(mesh: Mesh, axes: tuple[str, ...] | str | None) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> P:
    """PartitionSpec for an array with logical axis ``names``; indivisible dims stay replicated,
    and a mesh axis is used at most once per array."""
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match array rank {len(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = rules.get(name) if name is not None else None
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        flat = tuple(a for a in flat if a in mesh.shape and a not in used)
        if not flat or dim % _axis_size(mesh, flat):
            spec.append(None)
            continue
        used.update(flat)
        spec.append(flat[0] if len(flat) == 1 else flat)
    return P(*spec)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf of an NNX state (or a pytree of arrays), from ``logical_axes``."""
    def one(x):
        if _is_var(x):
            names = x.get_metadata().get("logical_axes")
            return x.replace(NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> nnx.Module:
    """Place a model's state on ``mesh`` per its logical axes (in place; returns the model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Shard dimension ``batch_axis`` over the data-parallel axes (``data`` x ``fsdp``)."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def shard_batch(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """``device_put`` every array of ``batch`` sharded on ``batch_axis``; sizes must divide."""
    n = _axis_size(mesh, BATCH_AXES)

    def put(x):
        x = np.asarray(x)
        if x.ndim <= batch_axis or x.shape[batch_axis] % n:
            raise ValueError(f"batch array of shape {x.shape} cannot be split {n} ways along axis "
                             f"{batch_axis} (data*fsdp = {n})")
        return jax.device_put(x, batch_sharding(mesh, x.ndim, batch_axis))
    return jax.tree.map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


__all__ = ["MESH_AXES", "BATCH_AXES", "DEFAULT_RULES", "initialize_distributed", "make_mesh",
           "single_device_mesh", "logical_to_spec", "state_shardings", "shard_model", "batch_sharding",
           "shard_batch", "replicated"]
