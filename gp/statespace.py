"""O(n) state-space (Kalman / Rauch-Tung-Striebel) solver for 1-D Matérn GPs.

The Matérn-(q+1/2) GP is the first component of the scaled SDE state
``x = (f, f'/lam, ..., f^(q)/lam^q)`` (see :mod:`gp.kernels`); Hartikainen & Särkkä (2010),
spec §5 (V-SS) and §7.1. This module is the robust fallback of the kernel-packet solver and the
source of posterior variances at arbitrary test points:

* :func:`filter_smoother` runs the Kalman filter (log marginal likelihood) and the RTS smoother
  over sorted inputs in ``O(n q^3)``; observations may be values or derivatives
  (``order[i] = k`` observes ``f^(k)(x_i)``, ``k <= q``), duplicate inputs are allowed.
* :func:`query` returns the posterior mean and covariance of the state at any test points in
  ``O(log n + q^3)`` each: binary search for the interval ``x_i <= t < x_{i+1}``, predict the
  filtered state at ``x_i`` to ``t`` and apply one RTS step from the smoothed state at ``x_{i+1}``.
  No ``n x m`` matrix is formed.

Inputs must already be sorted (the GP API sorts); float64 throughout.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gp import kernels


class SmootherState(NamedTuple):
    """Per-point filtered and smoothed state moments (arrays over the sorted inputs)."""

    x: jax.Array          # [n] sorted inputs
    lam: jax.Array        # [] rate sqrt(2q+1)/lengthscale
    p_inf: jax.Array      # [m, m] stationary covariance (scaled state)
    mf: jax.Array         # [n, m] filtered means
    pf: jax.Array         # [n, m, m] filtered covariances
    ms: jax.Array         # [n, m] smoothed means
    ps: jax.Array         # [n, m, m] smoothed covariances


def _obs_rows(q: int, lam, order, n):
    """Observation rows ``h_i = lam^k e_k`` for ``k = order[i]`` (shape ``[n, m]``)."""
    m = q + 1
    if order is None:
        return jnp.zeros((n, m), dtype=lam.dtype).at[:, 0].set(1.0)
    order = jnp.asarray(order)
    return jax.nn.one_hot(order, m, dtype=lam.dtype) * lam ** order.astype(lam.dtype)[:, None]


def _sym(P):
    return 0.5 * (P + jnp.swapaxes(P, -1, -2))


def filter_smoother(x, y, q: int, lengthscale, variance, noise, order=None, *, smooth: bool = True):
    """Kalman filter (+ RTS smoother) for sorted ``x``.

    Model: ``y_i = f^(order_i)(x_i) + eps_i``, ``eps_i ~ N(0, noise_i)``, ``f ~ GP(0, Matérn)``.

    Args:
      x: ``[n]`` float64, non-decreasing. y: ``[n]``. q: Matérn order. lengthscale, variance:
        scalars > 0. noise: scalar or ``[n]`` >= 0 (0 = exact observation; two exact
        observations of the same quantity at one input make the problem singular).
      order: optional ``[n]`` int in ``[0, q]`` (derivative order observed).
      smooth: also run the RTS smoother (needed for :func:`query`).

    Returns:
      ``(lml, state)``: the log marginal likelihood ``log N(y | 0, K + diag(noise))`` and a
      :class:`SmootherState` (smoothed fields equal the filtered ones when ``smooth=False``).
    """
    q = kernels.check_q(q)
    n = x.shape[0]
    lam = jnp.asarray(kernels.rate(q, lengthscale), dtype=x.dtype)
    P_inf = kernels.ss_stationary_cov(q, variance).astype(x.dtype)
    z = lam * jnp.diff(x, prepend=x[:1])
    T = kernels.ss_transition(q, z)
    H = _obs_rows(q, lam, order, n)
    R = jnp.broadcast_to(jnp.asarray(noise, dtype=x.dtype), (n,))
    m0 = jnp.zeros((q + 1,), dtype=x.dtype)

    def fstep(carry, inp):
        m, P = carry
        Ti, hi, yi, ri = inp
        mp = Ti @ m
        Pp = _sym(Ti @ (P - P_inf) @ Ti.T + P_inf)
        ph = Pp @ hi
        S = hi @ ph + ri
        v = yi - hi @ mp
        K = ph / S
        mf = mp + K * v
        Pf = _sym(Pp - jnp.outer(K, ph))
        ll = -0.5 * (jnp.log(2 * jnp.pi * S) + v * v / S)
        return (mf, Pf), (mf, Pf, ll)

    _, (mf, Pf, lls) = jax.lax.scan(fstep, (m0, P_inf), (T, H, y, R))
    lml = jnp.sum(lls)
    if not smooth:
        return lml, SmootherState(x, lam, P_inf, mf, Pf, mf, Pf)

    def bstep(carry, inp):
        ms_next, Ps_next = carry
        T_next, mf_i, Pf_i = inp
        mp = T_next @ mf_i
        Pp = _sym(T_next @ (Pf_i - P_inf) @ T_next.T + P_inf)
        G = jnp.linalg.solve(Pp, T_next @ Pf_i).T
        ms = mf_i + G @ (ms_next - mp)
        Ps = _sym(Pf_i + G @ (Ps_next - Pp) @ G.T)
        return (ms, Ps), (ms, Ps)

    _, (ms_head, Ps_head) = jax.lax.scan(
        bstep, (mf[-1], Pf[-1]), (T[1:], mf[:-1], Pf[:-1]), reverse=True)
    ms = jnp.concatenate([ms_head, mf[-1:]], axis=0)
    Ps = jnp.concatenate([Ps_head, Pf[-1:]], axis=0)
    return lml, SmootherState(x, lam, P_inf, mf, Pf, ms, Ps)


def query(state: SmootherState, t):
    """Posterior mean ``[k, m]`` and covariance ``[k, m, m]`` of the scaled state at ``t`` (``[k]``).

    For ``x_i <= t < x_{i+1}``: predict the filtered state at ``x_i`` to ``t`` (no observation),
    then one RTS step from the smoothed state at ``x_{i+1}``. Left of ``x_0`` the "filtered" state
    is the prior; right of ``x_{n-1}`` it is the smoothed last state predicted forward.
    Entry ``k`` of the state is ``f^(k)(t) / lam^k``.
    """
    x, lam, P_inf = state.x, state.lam, state.p_inf
    n = x.shape[0]
    q = P_inf.shape[0] - 1

    def one(ti):
        i = jnp.searchsorted(x, ti, side="right") - 1
        left = i < 0
        right = i >= n - 1
        ic = jnp.clip(i, 0, n - 1)
        inext = jnp.clip(i + 1, 0, n - 1)
        # filtered (or, right of the data, smoothed) state at the left anchor
        m_a = jnp.where(left, 0.0, jnp.where(right, state.ms[ic], state.mf[ic]))
        P_a = jnp.where(left, P_inf, jnp.where(right, state.ps[ic], state.pf[ic]))
        z1 = jnp.where(left, 0.0, lam * (ti - x[ic]))
        T1 = kernels.ss_transition(q, z1)
        mt = T1 @ m_a
        Pt = _sym(T1 @ (P_a - P_inf) @ T1.T + P_inf)
        z2 = jnp.where(right, 0.0, lam * (x[inext] - ti))
        T2 = kernels.ss_transition(q, z2)
        mp = T2 @ mt
        Pp = _sym(T2 @ (Pt - P_inf) @ T2.T + P_inf)
        G = jnp.linalg.solve(Pp, T2 @ Pt).T
        ms = mt + G @ (state.ms[inext] - mp)
        Ps = _sym(Pt + G @ (state.ps[inext] - Pp) @ G.T)
        return jnp.where(right, mt, ms), jnp.where(right, Pt, Ps)

    return jax.vmap(one)(t)


def derivative_scale(lam, q: int):
    """``lam^k``, k = 0..q: multiply state entry k by it to get ``f^(k)``."""
    return lam ** jnp.arange(q + 1, dtype=jnp.result_type(lam))


def state_moments(state: SmootherState, t, order: int = 0):
    """Posterior mean and variance of ``f^(order)(t)`` at test points ``t`` (``[k]`` each)."""
    q = state.p_inf.shape[0] - 1
    if not 0 <= order <= q:
        raise ValueError(f"order must be in [0, q={q}] for the state-space path, got {order}")
    m, P = query(state, t)
    s = state.lam ** order
    return s * m[:, order], s * s * P[:, order, order]
