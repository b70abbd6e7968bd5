"""O(n) state-space (Kalman / Rauch-Tung-Striebel) solver for 1-D Matérn GPs.

The Matérn-(q+1/2) GP is the first component of the scaled SDE state
``x = (f, f'/lam, ..., f^(q)/lam^q)`` (see :mod:`gp.kernels`); Hartikainen & Särkkä (2010);
the packets of Ding, Tuo & Zou (arXiv:2402.04022) are built from the same state-space form.
This module is the default solver of :mod:`gp.api` (exact on every input layout) and the source
of posterior variances at arbitrary test points:

* :func:`log_likelihood`: the Kalman-filter log marginal likelihood without stored states,
  differentiable to any order (hyperparameter derivatives by forward mode inside the scan).
* :func:`filter_smoother` runs the Kalman filter (log marginal likelihood) and the RTS smoother
  over sorted inputs in ``O(n q^3)``; observations may be values or derivatives
  (``order[i] = k`` observes ``f^(k)(x_i)``, ``k <= q``), duplicate inputs are allowed.
* :func:`query` returns the posterior mean and covariance of the state at any test points in
  ``O(log n + q^3)`` each: binary search for the interval ``x_i <= t < x_{i+1}``, predict the
  filtered state at ``x_i`` to ``t`` and apply one RTS step from the smoothed state at ``x_{i+1}``.
  No ``n x m`` matrix is formed.

Inputs must already be sorted (the GP API sorts); float64 throughout. References: Hartikainen &
Särkkä (2010), "Kalman filtering and smoothing solutions to temporal Gaussian process regression
models"; Särkkä & Solin (2019), *Applied Stochastic Differential Equations*, Ch. 12.
"""
from __future__ import annotations

import functools
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


def _obs_rows(q: int, lam, order):
    """Observation rows ``h_i = lam^k e_k`` for ``k = order[i]`` (shape ``[n, m]``)."""
    order = jnp.asarray(order)
    return jax.nn.one_hot(order, q + 1, dtype=lam.dtype) * lam ** order.astype(lam.dtype)[:, None]


def _sym(P):
    return 0.5 * (P + jnp.swapaxes(P, -1, -2))


# The filter's per-step algebra is written as broadcast products summed over one axis instead of
# ``@``: inside a ``lax.scan`` body XLA:CPU fuses these into a few element-wise kernels, while each
# tiny ``dot`` is a separate kernel launch per step. Measured at n = 1e5 (LML, one core of the
# 2-core EPYC, the other busy): q = 1 58 -> 3 ms, q = 2 66 -> 44 ms.
def _mv(A, v):
    return jnp.sum(A * v[..., None, :], axis=-1)


def _mm(A, B):
    return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)


def _mmt(A, B):
    """``A @ B.T`` (over the last two axes)."""
    return jnp.sum(A[..., :, None, :] * B[..., None, :, :], axis=-1)


def _cov_step(D, T, h, r, P_inf):
    """Covariance half of a Kalman step, on ``D = P - P_inf`` (fewer bytes than ``P``).

    Predicts through ``T`` and updates with an observation ``h . state + N(0, r)``; ``h=None``
    observes the first state entry (the function value) without products by ``h``. Returns the
    filtered ``D``, the innovation variance ``S``, the gain ``K`` and the predicted ``D``.
    """
    Dp = _mmt(_mm(T, D), T)
    ph = Dp[:, 0] + P_inf[:, 0] if h is None else _mv(Dp + P_inf, h)
    S = (ph[0] if h is None else jnp.sum(h * ph)) + r
    K = ph / S
    return Dp - K[:, None] * ph[None, :], S, K, Dp


def _mean_step(m, T, h, K, S, y):
    """Mean half of a Kalman step: the filtered mean and ``log S + v^2 / S`` of the innovation."""
    mp = _mv(T, m)
    v = y - (mp[0] if h is None else jnp.sum(h * mp))
    return mp + K * v, jnp.log(S) + v * v / S


def _spd_solve(A, B):
    """``A^-1 B`` for small symmetric positive definite ``A`` (``[m, m, ...]``, ``B``
    ``[m, k, ...]``; batch axes last): unrolled Cholesky and substitutions on static indices.
    With the batch axes last every matrix entry is a contiguous vector, so each step is one
    streaming element-wise op (a batched LAPACK solve is one call per matrix)."""
    m = A.shape[0]
    L = [[None] * m for _ in range(m)]
    for j in range(m):
        L[j][j] = jnp.sqrt(A[j, j] - sum(L[j][k] * L[j][k] for k in range(j)))
        for i in range(j + 1, m):
            L[i][j] = (A[i, j] - sum(L[i][k] * L[j][k] for k in range(j))) / L[j][j]
    z = []
    for i in range(m):
        z.append((B[i] - sum(L[i][k] * z[k] for k in range(i))) / L[i][i])
    out = [None] * m
    for i in reversed(range(m)):
        out[i] = (z[i] - sum(L[k][i] * out[k] for k in range(i + 1, m))) / L[i][i]
    return jnp.stack(out)


def _inputs(x, q, lam, variance, noise, order):
    n = x.shape[0]
    P_inf = kernels.ss_stationary_cov(q, variance).astype(x.dtype)
    T = kernels.ss_transition(q, lam * jnp.diff(x, prepend=x[:1]))
    H = None if order is None else _obs_rows(q, lam, order)
    R = jnp.broadcast_to(jnp.asarray(noise, dtype=x.dtype), (n,))
    return P_inf, T, H, R


def _filter_passes(T, H, y, R, P_inf, store: bool):
    """Kalman filter as two scans: the covariance recursion (which does not depend on ``y``)
    yields the innovation variances ``S_i`` and gains ``K_i``, then the mean recursion sums
    ``log S_i + v_i^2 / S_i`` over the innovations ``v_i``.

    Why two scans: XLA:CPU compiles a ``while`` loop whose body touches under ~1 kB into a single
    kernel (its small-while-loop hoisting) instead of launching each fused op of the body per
    step. One combined step is over that size for q >= 2; each half of the likelihood pass is
    under it for q <= 2. Measured at n = 1e6, q = 2 (2-core EPYC, one core): 450 -> 37 ms.

    Returns ``(lml, mf, Pf, Pp)`` (filtered means and covariances, one-step predicted
    covariances; ``None`` unless ``store``).

    Storing for q >= 2, the covariance scan emits only the filtered ``D_i`` and the predicted
    ``D^-_i = T_i D_{i-1} T_i^T``, ``S_i`` and ``K_i`` are recomputed from them for all steps
    at once (element-wise over the step axis): a scan that also writes those three per step
    measured 1.6x slower at n = 1e6, q = 2 (2-core CPU VM under load, same run; for q = 1 the
    recomputation measured slower and is not used).
    """
    split = store and P_inf.shape[0] >= 3

    def cov_scan(D, inp):
        Df, S, K, Dp = _cov_step(D, *inp, P_inf)
        if split:
            return Df, Df
        return Df, ((S, K, Df, Dp) if store else (S, K))

    def mean_scan(carry, inp):
        m, acc = carry
        mf, term = _mean_step(m, *inp)
        return (mf, acc + term), (mf if store else None)

    _, cov = jax.lax.scan(cov_scan, jnp.zeros_like(P_inf), (T, H, R))
    if split:
        Df = cov
        Dp = _mmt(_mm(T, jnp.concatenate([jnp.zeros_like(Df[:1]), Df[:-1]])), T)
        ph = Dp[..., :, 0] + P_inf[:, 0] if H is None else _mv(Dp + P_inf, H)
        S = (ph[..., 0] if H is None else jnp.sum(H * ph, axis=-1)) + R
        cov = (S, ph / S[:, None], Df, Dp)
    init = (jnp.zeros_like(P_inf[:, 0]), jnp.zeros((), P_inf.dtype))
    (_, acc), mf = jax.lax.scan(mean_scan, init, (T, H, cov[1], cov[0], y))
    lml = _lml_from_sum(acc, y.shape[0])
    if not store:
        return lml, None, None, None
    return lml, mf, _sym(cov[2] + P_inf), _sym(cov[3] + P_inf)


def _lml_from_sum(acc, n: int):
    """``-1/2 (sum_i log S_i + v_i^2 / S_i + n log 2 pi)``."""
    return -0.5 * (acc + n * jnp.log(2 * jnp.pi))


def _filter_lml(q: int, x, y, lam, variance, noise, order):
    """Kalman-filter log marginal likelihood, nothing stored: one scan for q <= 1 (its body
    already compiles into one kernel), else the two scans of :func:`_filter_passes`. Measured at
    n = 1e6 on one core, one scan / two scans: q = 0 14 / 25 ms, q = 1 24 / 61, q = 2 480 / 86,
    q = 3 1130 / 198. Matérn-3/2 value observations: :func:`_filter_lml_matern32`."""
    if q == 1 and order is None:
        return _filter_lml_matern32(x, y, lam, variance, noise)
    if q <= 1:
        return _filter_lml_one_scan(q, x, y, lam, variance, noise, order)
    P_inf, T, H, R = _inputs(x, q, lam, variance, noise, order)
    return _filter_passes(T, H, y, R, P_inf, store=False)[0]


def _filter_lml_one_scan(q: int, x, y, lam, variance, noise, order):
    """The same log-likelihood in one scan. Also used for all derivatives: forward mode through
    the two scans stores the tangents of every ``S_i, K_i`` and measured 1.6-1.7x slower for
    q = 2, 3 at n = 1e6."""
    P_inf, T, H, R = _inputs(x, q, lam, variance, noise, order)

    def step(carry, inp):
        D, m, acc = carry
        Ti, hi, yi, ri = inp
        D, S, K, _ = _cov_step(D, Ti, hi, ri, P_inf)
        m, term = _mean_step(m, Ti, hi, K, S, yi)
        return (D, m, acc + term), None

    init = (jnp.zeros_like(P_inf), jnp.zeros((q + 1,), x.dtype), jnp.zeros((), x.dtype))
    (_, _, acc), _ = jax.lax.scan(step, init, (T, H, y, R))
    return _lml_from_sum(acc, x.shape[0])


def _m32_inputs(x, lam):
    """Transition entries of the Matérn-3/2 filter, ``a = e^{-z}(1 + z)``, ``b = e^{-z} z``,
    ``d = e^{-z}(1 - z)`` with ``z_i = lam (x_i - x_{i-1})`` (vectorised, outside the loop)."""
    z = lam * jnp.diff(x, prepend=x[:1])
    e = jnp.exp(-z)
    b = e * z
    return e + b, b, e - b


def _m32_update(carry, a, b, d, yi, variance, r):
    """One Matérn-3/2 Kalman step on scalars (see :func:`_filter_lml_matern32`)."""
    m0, m1, d00, d01, d11, acc = carry
    mp0 = a * m0 + b * m1
    mp1 = d * m1 - b * m0
    t00, t01 = a * d00 + b * d01, a * d01 + b * d11
    t10, t11 = d * d01 - b * d00, d * d11 - b * d01
    p00 = a * t00 + b * t01
    p01 = d * t01 - b * t00
    p11 = d * t11 - b * t10
    ph0 = p00 + variance
    S = ph0 + r
    k0, k1 = ph0 / S, p01 / S
    v = yi - mp0
    return (mp0 + k0 * v, mp1 + k1 * v, p00 - k0 * ph0, p01 - k0 * p01, p11 - k1 * p01,
            acc + jnp.log(S) + v * v / S)


def _filter_lml_matern32(x, y, lam, variance, noise):
    """Matérn-3/2 (q = 1) log-likelihood of value observations, the filter written on scalars.

    With ``z_i = lam (x_i - x_{i-1})`` the transition is ``T = e^{-z} [[1 + z, z], [-z, 1 - z]]``
    and ``P_inf = variance I`` (:func:`gp.kernels.ss_transition`), so on ``D = P - P_inf`` a step
    is ``D^- = T D T^T``, ``S = D^-_00 + variance + r``, ``k = (D^-_00 + variance, D^-_10) / S``,
    ``D = D^- - k k^T S``; the mean ``m^- = T m``, ``v = y - m^-_0``, ``m = m^- + k v``
    (Hartikainen & Särkkä 2010). The carry is five state scalars and the running sum; the
    transition entries come in as three precomputed ``[n]`` arrays (``exp`` vectorised outside
    the loop), where the generic step carries ``[2, 2]`` arrays and an ``[n, 2, 2]``
    transition: measured 1.5-2.0x faster at n = 1e5 and 1e6 (2-core CPU VM under load, same
    run). Derivatives in the scalar hyperparameters: :func:`_filter_lml_matern32_jvp`.
    """
    per_point = jnp.ndim(noise) == 1

    def step(carry, inp):
        (a, b, d, yi), r = inp[:4], (inp[4] if per_point else noise)
        return _m32_update(carry, a, b, d, yi, variance, r), None

    zero = jnp.zeros((), x.dtype)
    xs = _m32_inputs(x, lam) + (y,) + ((noise,) if per_point else ())
    (*_, acc), _ = jax.lax.scan(step, (zero,) * 6, xs)
    return _lml_from_sum(acc, x.shape[0])


def _jvp_some(f, primals, tangents):
    """``jax.jvp`` of ``f`` in the primals whose tangent is not ``None``, the others held fixed
    (so no zero tangents enter the loop bodies)."""
    idx = [i for i, t in enumerate(tangents) if t is not None]

    def g(*moved):
        full = list(primals)
        for i, v in zip(idx, moved):
            full[i] = v
        return f(*full)

    return jax.jvp(g, tuple(primals[i] for i in idx), tuple(tangents[i] for i in idx))


def _filter_lml_matern32_jvp(x, y, lam, variance, noise, hyper):
    """Value and gradient of :func:`_filter_lml_matern32` in the scalar hyperparameters named in
    ``hyper`` (a subset of ``("lam", "variance", "noise")``; scalar ``noise``).

    Forward mode on scalars, split into short loops: (1) the covariance recursion, emitting the
    incoming ``D_{i-1}`` of every step; (2) the mean recursion and the likelihood sum, emitting
    ``m_{i-1}``; then per hyperparameter ``theta`` (3) the tangent ``dD_i`` of the covariance
    recursion and (4) the tangents of the mean and of the sum, each step the ``jax.jvp`` of the
    value's own scalar step (:func:`_m32_update`) at the stored primal state, with only
    ``theta``'s inputs perturbed (for ``lam`` the transition entries, whose derivatives
    ``d(a, b, d)/d lam`` are vectorised outside the loops). The tangents are therefore exactly
    the derivatives of the value's arithmetic.

    Why split: XLA:CPU runs a ``while`` loop as one compiled kernel only when one iteration
    accesses under ~1 kB (its small-while-loop hoisting); otherwise every fused op of the body
    is launched per step. A loop carrying the primal state and three tangent copies is far over
    that size (measured 700+ ms at n = 1e5); each of these loops is under it. At n = 1e5 and 1e6
    this pass measured 4-7x faster than the vmapped generic step (2-core CPU VM under heavy
    load, same run). Returns ``(lml, [len(hyper)] gradient)``.
    """
    (a, b, d), (da, db, dd) = jax.jvp(lambda l: _m32_inputs(x, l), (lam,), (jnp.ones_like(lam),))
    zero = jnp.zeros((), x.dtype)

    def cov_step(D, a, b, d, s2, r):
        return _m32_update((zero, zero) + D + (zero,), a, b, d, zero, s2, r)[2:5]

    def mean_step(m, D, a, b, d, yi, s2, r):
        out = _m32_update(m[:2] + D + (m[2],), a, b, d, yi, s2, r)
        return out[0], out[1], out[5]

    def cov(D, inp):
        return cov_step(D, *inp, variance, noise), D

    def mean(m, inp):
        return mean_step(m, inp[4:], *inp[:4], variance, noise), m[:2]

    _, d_prev = jax.lax.scan(cov, (zero,) * 3, (a, b, d))
    (_, _, acc), m_prev = jax.lax.scan(mean, (zero,) * 3, (a, b, d, y) + d_prev)

    grads = []
    for name in hyper:
        lam_in = (da, db, dd) if name == "lam" else ()

        def hyper_tangents(inp):
            if name == "lam":
                return inp[:3] + (None, None)
            return (None,) * 3 + ((jnp.ones_like(variance), None) if name == "variance"
                                  else (None, jnp.ones_like(noise)))

        def cov_tan(t, inp):
            k = len(lam_in)
            (a, b, d), D = inp[:3], inp[3 + k:6 + k]
            _, t_new = _jvp_some(cov_step, (D, a, b, d, variance, noise),
                                 (t,) + hyper_tangents(inp[3:3 + k]))
            return t_new, t

        def mean_tan(t, inp):
            k = len(lam_in)
            (a, b, d), rest = inp[:3], inp[3 + k:]
            yi, m, D, dD = rest[0], rest[1:3], rest[3:6], rest[6:9]
            _, t_new = _jvp_some(lambda m, D, a, b, d, s2, r: mean_step(m, D, a, b, d, yi, s2, r),
                                 (m + (zero,), D, a, b, d, variance, noise),
                                 (t, dD) + hyper_tangents(inp[3:3 + k]))
            return t_new, None

        _, dd_prev = jax.lax.scan(cov_tan, (zero,) * 3, (a, b, d) + lam_in + d_prev)
        (_, _, dacc), _ = jax.lax.scan(mean_tan, (zero,) * 3,
                                       (a, b, d) + lam_in + (y,) + m_prev + d_prev + dd_prev)
        grads.append(-0.5 * dacc)
    return _lml_from_sum(acc, x.shape[0]), jnp.stack(grads)


def _perturbed(tangent) -> bool:
    return not isinstance(tangent, jax.custom_derivatives.SymbolicZero)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _lml(q, x, y, lam, variance, noise, order):
    return _filter_lml(q, x, y, lam, variance, noise, order)


def _lml_jvp(q, primals, tangents):
    """Scalar hyperparameters (``lam``, ``variance``, scalar ``noise``) get their derivatives
    from one forward-mode pass with a basis tangent each (vmapped; Matérn-3/2 value observations
    with a scalar noise: :func:`_filter_lml_matern32_jvp`, on scalars): the scan carries ``k``
    tangent copies of the small state and stores nothing per step. Reverse mode through the scan
    would store every step's intermediates and run a second, backward scan (2-3x slower,
    measured). The rule is linear in the tangents (``J . dtheta``), so reverse mode transposes
    it and forward mode (``jacfwd``, ``hessian``) differentiates it again. Data arguments
    (``x``, ``y``, per-point ``noise``) use ordinary autodiff through the scan.
    """
    x, order = primals[0], primals[5]
    names = ("x", "y", "lam", "variance", "noise")
    args = dict(zip(names, primals[:5]))
    tans = dict(zip(names, tangents[:5]))
    hyper = [k for k in ("lam", "variance", "noise")
             if _perturbed(tans[k]) and jnp.ndim(args[k]) == 0]
    data = [k for k in names if _perturbed(tans[k]) and k not in hyper]

    def f(**kw):
        return _filter_lml_one_scan(q, **{**args, **kw}, order=order)

    out, t_out = None, jnp.zeros((), x.dtype)
    if data:
        out, t_out = jax.jvp(lambda *d: f(**dict(zip(data, d))),
                             tuple(args[k] for k in data), tuple(tans[k] for k in data))
    if hyper and q == 1 and order is None and jnp.ndim(args["noise"]) == 0:
        val, jac = _filter_lml_matern32_jvp(args["x"], args["y"], args["lam"], args["variance"],
                                            args["noise"], tuple(hyper))
        out = val if out is None else out
        t_out = t_out + sum(jac[i] * tans[k] for i, k in enumerate(hyper))
    elif hyper:
        theta = jnp.stack([jnp.asarray(args[k], x.dtype) for k in hyper])
        g = lambda th: f(**{k: th[i] for i, k in enumerate(hyper)})
        val, jac = jax.vmap(lambda t: jax.jvp(g, (theta,), (t,)), out_axes=(None, 0))(
            jnp.eye(len(hyper), dtype=x.dtype))
        out = val if out is None else out
        t_out = t_out + sum(jac[i] * tans[k] for i, k in enumerate(hyper))
    if out is None:
        out = _filter_lml(q, *primals)
    return out, t_out


_lml.defjvp(_lml_jvp, symbolic_zeros=True)


def log_likelihood(x, y, q: int, lengthscale, variance, noise, order=None):
    """Log marginal likelihood ``log N(y | 0, K + diag(noise))`` by the Kalman filter, O(n q^3).

    Same model and arguments as :func:`filter_smoother`, without storing per-step states (use
    this for fitting). Differentiable to any order in every argument; derivatives in the scalar
    hyperparameters run in forward mode inside one scan (see ``_lml_jvp``).
    """
    q = kernels.check_q(q)
    lam = jnp.asarray(kernels.rate(q, lengthscale), dtype=x.dtype)
    return _lml(q, x, y, lam, jnp.asarray(variance, x.dtype), jnp.asarray(noise, x.dtype), order)


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
    lam = jnp.asarray(kernels.rate(q, lengthscale), dtype=x.dtype)
    P_inf, T, H, R = _inputs(x, q, lam, variance, noise, order)
    lml, mf, Pf, Pp = _filter_passes(T, H, y, R, P_inf, store=True)
    if not smooth:
        return lml, SmootherState(x, lam, P_inf, mf, Pf, mf, Pf)

    # The smoother gains G_i = Pf_i T_{i+1}^T Pp_{i+1}^-1 depend on filtered moments only, so
    # they are computed for all i at once outside any scan (step axis last in the solve: each
    # matrix entry contiguous); the two remaining recursions (means, then covariances) have
    # small bodies. Filter + smoother at n = 1e6, one core: q = 1 1.9 -> 0.3 s, q = 2 3.2 -> 1.0 s
    # against one scan per direction with a LAPACK solve per step.
    Tn, Pp = T[1:], Pp[1:]
    Gt = _spd_solve(jnp.moveaxis(Pp, 0, -1), jnp.moveaxis(_mm(Tn, Pf[:-1]), 0, -1))
    G = jnp.moveaxis(Gt, -1, 0).swapaxes(-1, -2)
    mp = _mv(Tn, mf[:-1])

    def mean_back(ms_next, inp):
        Gi, mfi, mpi = inp
        ms = mfi + _mv(Gi, ms_next - mpi)
        return ms, ms

    def cov_back(Ps_next, inp):
        Gi, Pfi, Ppi = inp
        Ps = Pfi + _mmt(_mm(Gi, Ps_next - Ppi), Gi)
        return Ps, Ps

    _, ms_head = jax.lax.scan(mean_back, mf[-1], (G, mf[:-1], mp), reverse=True)
    _, Ps_head = jax.lax.scan(cov_back, Pf[-1], (G, Pf[:-1], Pp), reverse=True)
    ms = jnp.concatenate([ms_head, mf[-1:]], axis=0)
    Ps = jnp.concatenate([Ps_head, Pf[-1:]], axis=0)
    return lml, SmootherState(x, lam, P_inf, mf, Pf, ms, Ps)


def query(state: SmootherState, t):
    """Posterior mean ``[k, m]`` and covariance ``[k, m, m]`` of the scaled state at ``t``
    (``[k]``).

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


def kernel_matvec(x, v, q: int, lengthscale, variance):
    """``K v`` for the Matérn Gram matrix ``K_il = K(x_i - x_l)`` on sorted ``x``, ``O(n q^2)``.

    For ``tau >= 0`` the stationary state covariance gives ``K(tau) = [T(lam tau) P_inf]_00``
    and ``T(a + b) = T(a) T(b)``, so the two one-sided sums are linear recursions
    (Hartikainen & Särkkä 2010):
    ``c_i = T(lam (x_i - x_{i-1})) c_{i-1} + v_i P_inf e_0`` gives ``sum_{l <= i}`` and
    ``g_i = T(lam (x_{i+1} - x_i)) (g_{i+1} + v_{i+1} P_inf e_0)`` gives ``sum_{l > i}``;
    ``(K v)_i = c_i[0] + g_i[0]``. No ``n x n`` matrix is formed.
    """
    q = kernels.check_q(q)
    lam = jnp.asarray(kernels.rate(q, lengthscale), dtype=x.dtype)
    col = kernels.ss_stationary_cov(q, variance).astype(x.dtype)[:, 0]
    T = kernels.ss_transition(q, lam * jnp.diff(x))                      # [n-1, m, m]

    def left(c, inp):
        Ti, vi = inp
        c = _mv(Ti, c) + vi * col
        return c, c[0]

    def right(g, inp):
        Ti, vi = inp
        g = _mv(Ti, g + vi * col)
        return g, g[0]

    c0 = v[0] * col
    _, lsum = jax.lax.scan(left, c0, (T, v[1:]))
    _, rsum = jax.lax.scan(right, jnp.zeros_like(col), (T, v[1:]), reverse=True)
    return jnp.concatenate([c0[:1], lsum]) + jnp.concatenate([rsum, jnp.zeros((1,), x.dtype)])


def mean_derivative(state: SmootherState, t, order: int):
    """``d^order/dt^order`` of the posterior mean at ``t`` (``[k]``), ``0 <= order <= 2q``.

    Orders ``<= q`` are entries of the smoothed state (``f^(k) = lam^k x_k``). Between two
    inputs the posterior mean is a smooth function of ``t`` (a combination of ``t^k e^{+-lam t}``,
    ``k <= q``), ``C^{2q}`` across inputs, and :func:`query` evaluates it exactly on each interval;
    orders ``q+1..2q`` are therefore forward-mode derivatives in ``t`` of state entry ``q`` of
    that query (one nested JVP per extra order, ``O(log n + q^3)`` per point, no finite
    differences). At an input the derivative is taken on the interval to its right (the mean is
    ``C^{2q}``, so both sides agree).
    """
    q = state.p_inf.shape[0] - 1
    if not 0 <= order <= 2 * q:
        raise ValueError(f"order must be in [0, 2q={2 * q}], got {order}")
    if order <= q:
        return state_moments(state, t, order)[0]

    def entry_q(ti):
        return query(state, ti[None])[0][0, q] * state.lam ** q

    g = entry_q
    for _ in range(order - q):
        g = (lambda h: lambda ti: jax.jvp(h, (ti,), (jnp.ones_like(ti),))[1])(g)
    return jax.vmap(g)(t)


def state_moments(state: SmootherState, t, order: int = 0):
    """Posterior mean and variance of ``f^(order)(t)`` at test points ``t`` (``[k]`` each)."""
    q = state.p_inf.shape[0] - 1
    if not 0 <= order <= q:
        raise ValueError(f"order must be in [0, q={q}] for the state-space path, got {order}")
    m, P = query(state, t)
    s = state.lam ** order
    return s * m[:, order], s * s * P[:, order, order]
