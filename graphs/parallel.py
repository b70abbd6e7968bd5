"""Mesh for data-parallel training. One function so that it can later call ``lmx.parallel``."""
from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def data_mesh(n_devices: int | None = None) -> jax.sharding.Mesh:
    """1-D ``('data',)`` mesh over the first ``n_devices`` devices (default: all), Auto axes."""
    devs = jax.devices()
    n = len(devs) if n_devices is None else n_devices
    if not 1 <= n <= len(devs):
        raise ValueError(f"n_devices must be in [1, {len(devs)}], got {n}")
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devs[:n])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (stacked-batch) axis split over ``data``."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
