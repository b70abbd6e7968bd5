"""Half-integer Matérn kernels, their Taylor data and their state-space form.

Convention (as in Chen, Ding & Tuo, arXiv:2203.03116): smoothness ``nu = q + 1/2``, rate
``lam = sqrt(2q + 1) / lengthscale`` and

    K(r) = s2 * exp(-z) * P_q(z),   z = lam * |r|,
    P_q(z) = sum_{k<=q} c_{q,k} z^k,  c_{q,k} = q!/(2q)! * (2q-k)! / (k! (q-k)!) * 2^k.

``K_plus(r) = s2 * exp(-z) P_q(z)`` with ``z = lam * r`` (no absolute value) is entire; the packet
construction uses the odd function ``D(r) = K_plus(r) - K_plus(-r)`` which is ``O(z^(2q+1))``
because ``K`` is ``2q`` times differentiable at 0 (its odd Taylor terms below ``2q+1`` vanish).

All functions are pure JAX and expect float64 inputs (see ``docs/gp.md``).
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import jax.numpy as jnp
import numpy as np

MAX_Q = 3

# Series for D(z) is used for |z| <= _D_SERIES_MAX; with 14 odd terms its truncation error is
# below 1e-18 relative there, and the direct difference loses at most a factor ~5 beyond it.
_D_SERIES_MAX = 1.0
_D_SERIES_TERMS = 14


def check_q(q: int) -> int:
    """Validate the Matérn order ``q`` (``nu = q + 1/2``); raises ``ValueError``."""
    if not isinstance(q, (int, np.integer)) or isinstance(q, bool) or not 0 <= q <= MAX_Q:
        raise ValueError(f"q must be an int in [0, {MAX_Q}] (nu = q + 1/2), got {q!r}")
    return int(q)


def rate(q: int, lengthscale):
    """``lam = sqrt(2q+1) / lengthscale`` (same parameterisation as tinygp's Matern32/52)."""
    return math.sqrt(2 * q + 1) / lengthscale


@lru_cache(maxsize=None)
def poly_coeffs(q: int) -> tuple[float, ...]:
    """``c_{q,k}``, k = 0..q, of ``P_q`` (exact rationals rounded once)."""
    q = check_q(q)
    out = []
    for k in range(q + 1):
        c = Fraction(math.factorial(q), math.factorial(2 * q)) * Fraction(
            math.factorial(2 * q - k), math.factorial(k) * math.factorial(q - k)) * 2 ** k
        out.append(float(c))
    return tuple(out)


@lru_cache(maxsize=None)
def taylor_coeffs(q: int, n_terms: int) -> tuple[float, ...]:
    """Taylor coefficients ``f_n`` of ``f(z) = exp(-z) P_q(z)``, n = 0..n_terms-1 (exact rationals).

    ``f_n = sum_{k<=min(n,q)} c_{q,k} (-1)^(n-k) / (n-k)!``; odd ``f_n`` vanish for ``n < 2q+1``.
    """
    q = check_q(q)
    cs = []
    for k in range(q + 1):
        cs.append(Fraction(math.factorial(q), math.factorial(2 * q)) * Fraction(
            math.factorial(2 * q - k), math.factorial(k) * math.factorial(q - k)) * 2 ** k)
    out = []
    for n in range(n_terms):
        s = Fraction(0)
        for k in range(min(n, q) + 1):
            s += cs[k] * Fraction((-1) ** (n - k), math.factorial(n - k))
        out.append(float(s))
    return tuple(out)


def matern_unit(z, q: int):
    """``exp(-|z|) P_q(|z|)``: the unit-variance Matérn correlation at scaled distance ``z``."""
    q = check_q(q)
    az = jnp.abs(z)
    p = jnp.zeros_like(az)
    for c in reversed(poly_coeffs(q)):
        p = p * az + c
    return jnp.exp(-az) * p


def matern(r, q: int, lengthscale, variance):
    """Matérn-(q+1/2) covariance ``K(r)`` for lag ``r`` (any shape, float64)."""
    return variance * matern_unit(rate(q, lengthscale) * r, q)


def matern_cross(x1, x2, q: int, lengthscale, variance):
    """Dense cross-covariance ``K(x1[:, None] - x2[None, :])``, shape ``(len(x1), len(x2))``."""
    return matern(x1[:, None] - x2[None, :], q, lengthscale, variance)


def odd_part_unit(z, q: int):
    """``D(z) = f(z) - f(-z)`` for ``z >= 0`` with ``f(z) = exp(-z) P_q(z)`` (unit variance).

    ``D(z) = 2 sum_{n odd >= 2q+1} f_n z^n``: evaluated by that series (Horner in ``z^2``) for
    ``z <= 1`` where the direct difference would cancel, and directly beyond. Overflows only for
    ``z > ~700``; callers use it on window-local distances.
    """
    q = check_q(q)
    coeffs = taylor_coeffs(q, 2 * q + 1 + 2 * _D_SERIES_TERMS)
    odd = [coeffs[n] for n in range(2 * q + 1, len(coeffs), 2)]
    small = z <= _D_SERIES_MAX
    zs = jnp.where(small, z, 0.0)
    z2 = zs * zs
    s = jnp.zeros_like(zs)
    for c in reversed(odd):
        s = s * z2 + c
    series = 2.0 * s * zs ** (2 * q + 1)
    zb = jnp.where(small, 1.0, z)
    pp = jnp.zeros_like(zb)
    pm = jnp.zeros_like(zb)
    for c in reversed(poly_coeffs(q)):
        pp = pp * zb + c
        pm = pm * (-zb) + c
    direct = jnp.exp(-zb) * pp - jnp.exp(zb) * pm
    return jnp.where(small, series, direct)


# ----------------------------------------------------------------------------- state space


@lru_cache(maxsize=None)
def _ss_constants(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Nilpotent ``N`` and unit stationary covariance of the scaled Matérn SDE state.

    State ``x = (f, f'/lam, ..., f^(q)/lam^q)``; in scaled time ``tau = lam t`` the drift is the
    companion matrix of ``(s + 1)^(q+1)`` so ``F = N - I`` with ``N`` nilpotent and the transition
    is exactly ``exp(-z) sum_{k<=q} (N z)^k / k!``. ``P_inf[i, j] = (-1)^j (i+j)! f_{i+j}``
    (zero for odd ``i + j``) from ``cov(f^(i)(t), f^(j)(s)) = (-1)^j K^(i+j)(t - s)``.
    """
    m = q + 1
    binom = [math.comb(m, k) for k in range(m + 1)]
    F = np.zeros((m, m))
    F[:-1, 1:] = np.eye(m - 1)
    # (s+1)^m = sum_k binom(m,k) s^k -> last row holds -binom(m,k), k < m
    F[-1, :] = [-binom[k] for k in range(m)]
    N = F + np.eye(m)
    f = taylor_coeffs(q, 2 * q + 2)
    P = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            if (i + j) % 2 == 0:
                P[i, j] = (-1) ** j * math.factorial(i + j) * f[i + j]
    return N, P


def ss_stationary_cov(q: int, variance):
    """Stationary covariance ``P_inf`` (shape ``(q+1, q+1)``) of the scaled state."""
    _, P = _ss_constants(check_q(q))
    return variance * jnp.asarray(P)


def ss_transition(q: int, z):
    """Transition ``T(z) = exp(-z) sum_{k<=q} (N z)^k / k!`` for scaled lags ``z`` (shape
    ``z.shape + (m, m)``)."""
    N, _ = _ss_constants(check_q(q))
    m = q + 1
    z = jnp.asarray(z)
    out = jnp.zeros(z.shape + (m, m), dtype=z.dtype)
    Nk = np.eye(m)
    for k in range(m):
        out = out + (z[..., None, None] ** k / math.factorial(k)) * jnp.asarray(Nk)
        Nk = Nk @ N
    return jnp.exp(-z)[..., None, None] * out


@lru_cache(maxsize=None)
def _deriv_polys(q: int, m: int) -> tuple[float, ...]:
    """Coefficients (ascending) of ``p_m`` with ``f^(m)(z) = exp(-z) p_m(z)``, ``p_0 = P_q``."""
    p = np.array(poly_coeffs(q))
    for _ in range(m):
        dp = np.array([k * p[k] for k in range(1, len(p))] + [0.0])
        p = dp - p
    return tuple(float(c) for c in p)


def matern_deriv(r, q: int, lengthscale, variance, m: int):
    """``K^(m)(r)``, the m-th derivative of the Matérn covariance in the lag (``m <= 2q``).

    For ``r != 0``: ``s2 lam^m sign(r)^m exp(-lam|r|) p_m(lam|r|)`` with
    ``p_{m+1} = p_m' - p_m``; at ``r = 0`` odd derivatives vanish (K is C^{2q}).
    ``cov(f^(a)(s), f^(b)(t)) = (-1)^b K^(a+b)(s - t)``. Raises ``ValueError`` for ``m > 2q``.
    """
    q = check_q(q)
    if not 0 <= m <= 2 * q:
        raise ValueError(f"derivative order m must be in [0, 2q={2 * q}], got {m}")
    lam = rate(q, lengthscale)
    z = lam * jnp.abs(r)
    p = jnp.zeros_like(z)
    for c in reversed(_deriv_polys(q, m)):
        p = p * z + c
    sgn = jnp.sign(r) ** m if m % 2 else 1.0
    return variance * lam ** m * sgn * jnp.exp(-z) * p
