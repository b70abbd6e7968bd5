"""Dense O(n^3) Cholesky GP: the float64 reference the fast solvers are tested against.

Supports value and derivative observations (``order[i] = k`` observes ``f^(k)(x_i)``) through
``cov(f^(a)(s), f^(b)(t)) = (-1)^b K^(a+b)(s - t)`` (:func:`gp.kernels.matern_deriv`).
"""
from __future__ import annotations

import jax.numpy as jnp
import jax.scipy.linalg as jsl

from gp import kernels


def _cov(xa, oa, xb, ob, q, lengthscale, variance):
    """Dense covariance between observations ``(xa, oa)`` and ``(xb, ob)`` of orders ``oa, ob``."""
    r = xa[:, None] - xb[None, :]
    m = oa[:, None] + ob[None, :]
    out = jnp.zeros(r.shape, dtype=r.dtype)
    for mm in range(2 * q + 1):
        out = jnp.where(m == mm, kernels.matern_deriv(r, q, lengthscale, variance, mm), out)
    return out * jnp.where(ob[None, :] % 2 == 1, -1.0, 1.0)


def _orders(order, n):
    return jnp.zeros((n,), dtype=jnp.int32) if order is None else jnp.asarray(order, jnp.int32)


def log_marginal_likelihood(x, y, q: int, lengthscale, variance, noise, order=None):
    """``log N(y | 0, K + diag(noise))`` by Cholesky (``O(n^3)``); x need not be sorted."""
    n = x.shape[0]
    o = _orders(order, n)
    K = _cov(x, o, x, o, q, lengthscale, variance) + jnp.diag(jnp.broadcast_to(noise, (n,)))
    L = jnp.linalg.cholesky(K)
    a = jsl.cho_solve((L, True), y)
    return -0.5 * y @ a - jnp.sum(jnp.log(jnp.diag(L))) - 0.5 * n * jnp.log(2 * jnp.pi)


def posterior(x, y, t, q: int, lengthscale, variance, noise, order=None, t_order: int = 0):
    """Posterior mean and variance of ``f^(t_order)`` at ``t`` (dense ``n x m`` cross-covariance).

    ``t_order <= 2q`` for the mean; the variance is ``inf`` for ``t_order > q``.
    """
    n = x.shape[0]
    o = _orders(order, n)
    K = _cov(x, o, x, o, q, lengthscale, variance) + jnp.diag(jnp.broadcast_to(noise, (n,)))
    L = jnp.linalg.cholesky(K)
    ot = jnp.full(t.shape, t_order, dtype=jnp.int32)
    Kxt = _cov(x, o, t, ot, q, lengthscale, variance)
    mean = Kxt.T @ jsl.cho_solve((L, True), y)
    V = jsl.solve_triangular(L, Kxt, lower=True)
    if t_order > q:  # f^(k) has infinite variance for k > q (the mean is still defined, k <= 2q)
        return mean, jnp.full(t.shape, jnp.inf, dtype=mean.dtype)
    prior = (-1.0) ** t_order * kernels.matern_deriv(jnp.zeros(()), q, lengthscale, variance,
                                                     2 * t_order)
    return mean, prior - jnp.sum(V * V, axis=0)
