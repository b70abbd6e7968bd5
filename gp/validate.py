"""Input checks shared by the GP API (raised before any compute).

Policy (documented in ``docs/gp.md``):
* ``jax_enable_x64`` off -> ``TypeError`` (float32 cannot reach the stated accuracy and JAX
  would silently downcast float64 inputs).
* float32 / integer inputs with x64 on -> ``UserWarning`` and upcast to float64.
* shape mismatch, NaN/inf, non-positive lengthscale/variance, negative noise -> ``ValueError``
  naming the argument. Value checks are skipped for traced values (inside ``jit``/``vmap``);
  shape and dtype checks always run.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np


def require_x64() -> None:
    """Raise ``TypeError`` unless ``jax_enable_x64`` is on."""
    if not jax.config.read("jax_enable_x64"):
        raise TypeError(
            "gp needs float64: call jax.config.update('jax_enable_x64', True) before using gp "
            "(or run inside `with jax.enable_x64(True):`)")


def _concrete(v) -> bool:
    """True for values that can be inspected now (not traced by jit/vmap/grad)."""
    return not isinstance(v, jax.core.Tracer)


def as_f64(name: str, v):
    """Return ``v`` as a float64 JAX array (a Python number as a numpy ``float64`` scalar);
    warn when a non-float64 array had to be upcast.

    Python numbers stay on the host: ``jit`` takes a numpy scalar directly, while making a
    device scalar costs about 50 us each (measured on the 2-core CPU VM), a sizeable part of a
    small likelihood call."""
    require_x64()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return np.float64(v)
    dt = np.dtype(v.dtype) if hasattr(v, "dtype") else np.asarray(v).dtype
    if not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)):
        raise TypeError(f"{name} must be a real float array, got dtype {dt}")
    if dt != np.float64:
        warnings.warn(f"{name} has dtype {dt}; upcasting to float64 (gp computes in float64)",
                      UserWarning, stacklevel=3)
    return jnp.asarray(v, dtype=jnp.float64)


def check_data(x, y):
    """Validate 1-D ``x``/``y`` of equal length, finite; returns float64 arrays."""
    x = as_f64("x", x)
    y = as_f64("y", y)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D [n], got shape {x.shape}")
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
    if x.shape[0] < 1:
        raise ValueError("x must hold at least one input")
    for name, v in (("x", x), ("y", y)):
        if _concrete(v) and not np.all(np.isfinite(np.asarray(v))):
            raise ValueError(f"{name} contains NaN or inf")
    return x, y


def check_points(name: str, t):
    """Validate 1-D finite test points; returns float64."""
    t = as_f64(name, t)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [m], got shape {t.shape}")
    if _concrete(t) and not np.all(np.isfinite(np.asarray(t))):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def check_hyper(lengthscale, variance, noise):
    """Validate hyperparameters (scalars; ``noise`` scalar or per-point); returns float64."""
    out = []
    for name, v, strict in (("lengthscale", lengthscale, True), ("variance", variance, True),
                            ("noise", noise, False)):
        v = as_f64(name, v)
        if name != "noise" and v.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
        if _concrete(v):
            vn = np.asarray(v)
            bad = (vn <= 0) if strict else (vn < 0)
            if np.any(bad | ~np.isfinite(vn)):
                need = "> 0" if strict else ">= 0"
                raise ValueError(f"{name} must be finite and {need}, got {np.asarray(v)}")
        out.append(v)
    return tuple(out)
