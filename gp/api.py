"""Exact 1-D Matérn GP regression: log-likelihood, conditioning, prediction, fitting.

Methods (``method=``):

* ``"kp"``: kernel packets (spec §4-§5): ``K + s I = B A^-1`` with ``B = Phi + s A`` banded, so
  ``beta = B^-1 y`` (banded LU, :mod:`gp.banded`), ``y^T (K + s I)^-1 y = (A^T y) . beta`` and
  ``log det(K + s I) = log|det B| - log|det A|``; the posterior mean at ``t`` is
  ``sum_{j in J(t)} phi_j(t) beta_j`` over the ``<= 2q+2`` packets alive at ``t``
  (binary search + ``O(q^2)``). Needs sorted distinct inputs (sorted here) and value observations.
* ``"ss"``: Kalman filter / RTS smoother (:mod:`gp.statespace`), any inputs incl. duplicates and
  derivative observations.
* ``"dense"``: Cholesky reference (:mod:`gp.dense`), ``O(n^3)``.
* ``"auto"`` (default): the log-likelihood (and its derivatives) by ``"ss"``, which measured
  faster than the packet solve at every n from 1e3 to 1e6 (docs/gp.md); conditioning and the
  posterior mean by ``"kp"`` when :func:`kp_is_accurate` holds for the data and hyperparameters,
  else ``"ss"`` (a ``lax.cond``, so it works under ``jit``/``vmap``).

Posterior variances always come from the state-space interval query (spec §5 V-SS): after one
``O(n)`` RTS pass, ``O(log n + q^3)`` per test point and no ``n x m`` matrix. The packet
variance formula ``s2 - phi(t)^T M^-1 phi(t)`` (V-M) loses up to all digits for ``q >= 1``
(spec §8(4)) and is not offered.

Everything is float64: enable ``jax_enable_x64`` first (see :mod:`gp.validate`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gp import banded, dense, kernels, packets, statespace, validate

METHODS = ("auto", "kp", "ss", "dense")

# Accuracy region of the packet path, calibrated in docs/gp.md ("Stability"): with every window
# half-width rho_j = lam (x_{j+2q+2} - x_j) / 2 inside [KP_RHO_MIN[q], KP_RHO_MAX[q]] the packet
# mean and log-likelihood stayed within 1e-8 relative (mostly <= 1e-10) of the state-space /
# dense answers on random-uniform and jittered-grid designs. Small rho: the banded systems get
# ill-conditioned like (lam h)^-(2q+2) (clustered inputs make it worse); large rho: packets
# decouple into near-duplicate local deltas and A becomes numerically singular.
KP_RHO_MIN = {0: 0.0, 1: 1e-3, 2: 0.25, 3: 1.0}
KP_RHO_MAX = {0: 50.0, 1: 50.0, 2: 40.0, 3: 30.0}


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["noise", "variance", "use_kp", "pk", "beta", "ss", "dense_data"],
                   meta_fields=["q", "method"])
@dataclasses.dataclass(frozen=True)
class Posterior:
    """Conditioned GP (a pytree with static ``q``/``method``; it passes through ``jit``)."""

    q: int
    method: str
    noise: jax.Array
    variance: jax.Array
    use_kp: jax.Array                     # [] bool: mean from packets
    pk: packets.Packets | None            # packet data (None for "ss"/"dense")
    beta: jax.Array | None                # [n] packet weights B^-1 y
    ss: statespace.SmootherState | None   # smoother data (None when variances not requested)
    dense_data: tuple | None              # (x, y, lengthscale, order) for "dense"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _sort(x, y, noise):
    idx = jnp.argsort(x)
    noise = jnp.asarray(noise)
    return x[idx], y[idx], (noise[idx] if noise.ndim == 1 else noise)


def _check_duplicates(xs, method: str, noise) -> None:
    if isinstance(xs, jax.core.Tracer):
        return
    dup = bool(np.any(np.diff(np.asarray(xs)) <= 0))
    if dup and method == "kp":
        raise ValueError("x has duplicate values: the kernel-packet method needs distinct inputs "
                         "(use method='ss' or 'auto', which handle duplicates with noise > 0)")
    if dup and not isinstance(noise, jax.core.Tracer) and np.any(np.asarray(noise) == 0):
        raise ValueError("x has duplicate values and noise == 0: K is singular")


def kp_is_accurate(xs, q: int, lengthscale, noise=None):
    """Traceable guard: is the packet path inside its calibrated accuracy region?

    True iff ``n >= 2q+3``, the inputs are strictly increasing and every window half-width
    ``rho_j = lam (x_{j+2q+2} - x_j) / 2`` lies in ``[KP_RHO_MIN[q], KP_RHO_MAX[q]]``.
    """
    n = xs.shape[0]
    w = 2 * q + 3
    if n < w:
        return jnp.asarray(False)
    lam = kernels.rate(q, lengthscale)
    rho = 0.5 * lam * (xs[w - 1:] - xs[: n - w + 1])
    ok = jnp.all(jnp.diff(xs) > 0)
    ok = ok & (jnp.min(rho) >= KP_RHO_MIN[q]) & (jnp.max(rho) <= KP_RHO_MAX[q])
    if noise is not None:
        ok = ok & (jnp.asarray(noise).ndim == 0)
    return ok


def _kp_solve(xs, ys, q, lengthscale, variance, noise):
    """Packets, ``beta = B^-1 y`` and the log-likelihood (sorted distinct inputs)."""
    n = xs.shape[0]
    kl = q + 1
    pk = packets.build(xs, q, lengthscale, variance)
    B = banded.cols_to_rows(pk.phi + noise * pk.coef, pk.start, n, kl, kl)
    A = banded.cols_to_rows(pk.coef, pk.start, n, kl, kl)
    sol, logdets = jax.vmap(lambda r, b: banded.lu_solve_logdet(r, b, kl, kl))(
        jnp.stack([B, A]), jnp.stack([ys, jnp.zeros_like(ys)]))
    beta = sol[0]
    quad = jnp.dot(banded.band_matvec_cols(pk.coef, pk.start, ys), beta)
    lml = -0.5 * quad - 0.5 * (logdets[0] - logdets[1]) - 0.5 * n * jnp.log(2 * jnp.pi)
    return lml, pk, beta


def _prepare(x, y, q, lengthscale, variance, noise, method, order):
    q = kernels.check_q(q)
    _check_method(method)
    x, y = validate.check_data(x, y)
    lengthscale, variance, noise = validate.check_hyper(lengthscale, variance, noise)
    if noise.ndim not in (0, 1) or (noise.ndim == 1 and noise.shape != x.shape):
        raise ValueError(f"noise must be a scalar or have shape {x.shape}, got {noise.shape}")
    if order is not None:
        order = jnp.asarray(order)
        if order.shape != x.shape or not jnp.issubdtype(order.dtype, jnp.integer):
            raise ValueError(f"order must be an int array of shape {x.shape}")
        if method == "kp":
            raise ValueError("derivative observations (order=...) need method 'ss', 'dense' or "
                             "'auto'; the packet path takes value observations only")
        if not isinstance(order, jax.core.Tracer) and np.any((np.asarray(order) < 0)
                                                             | (np.asarray(order) > q)):
            raise ValueError(f"order entries must be in [0, q={q}]")
    if method == "kp":
        packets.layout(x.shape[0], q)  # raises for n < 2q+3
        if noise.ndim != 0:
            raise ValueError("method 'kp' takes a scalar noise variance")
    idx = jnp.argsort(x)
    xs, ys = x[idx], y[idx]
    ns = noise[idx] if noise.ndim == 1 else noise
    os_ = None if order is None else order[idx]
    _check_duplicates(xs, method, ns)
    return q, xs, ys, lengthscale, variance, ns, os_


def log_marginal_likelihood(x, y, q: int, lengthscale, variance, noise, *, method: str = "auto",
                            order=None):
    """``log N(y | 0, K + noise I)`` for a zero-mean Matérn-(q+1/2) GP.

    Args:
      x, y: ``[n]`` inputs (any order) and observations; float64 (float32 warns and upcasts).
      q: smoothness order (``nu = q + 1/2``, 0..3). lengthscale, variance: scalars > 0.
      noise: observation noise variance, scalar (or ``[n]`` for 'ss'/'dense') >= 0.
      method: 'auto' | 'kp' | 'ss' | 'dense' (module docstring). order: optional ``[n]`` ints,
        derivative order observed at each input ('ss'/'dense'/'auto' only).
    Returns: scalar float64; differentiable in the hyperparameters (and ``y``).
    Raises: ``ValueError``/``TypeError`` on bad input (see :mod:`gp.validate`).
    """
    q, xs, ys, ell, s2, ns, os_ = _prepare(x, y, q, lengthscale, variance, noise, method, order)
    return _lml_jit(xs, ys, q, ell, s2, ns, os_, method)


def _lml(xs, ys, q, ell, s2, ns, os_, method):
    if method == "dense":
        return dense.log_marginal_likelihood(xs, ys, q, ell, s2, ns, os_)
    if method == "kp" and os_ is None and xs.shape[0] >= 2 * q + 3 and jnp.ndim(ns) == 0:
        return _kp_solve(xs, ys, q, ell, s2, ns)[0]
    return statespace.log_likelihood(xs, ys, q, ell, s2, ns, os_)


_lml_jit = jax.jit(_lml, static_argnames=("q", "method"))


def condition(x, y, q: int, lengthscale, variance, noise, *, method: str = "auto",
              order=None, with_variance: bool = True) -> Posterior:
    """Condition the GP on data; returns a :class:`Posterior` for :func:`predict`.

    ``O(n q^3)``. ``with_variance=False`` skips the RTS pass (mean-only predictions, 'kp' only).
    Same arguments and errors as :func:`log_marginal_likelihood`.
    """
    q, xs, ys, ell, s2, ns, os_ = _prepare(x, y, q, lengthscale, variance, noise, method, order)
    kp_possible = (method in ("kp", "auto") and os_ is None and xs.shape[0] >= 2 * q + 3
                   and jnp.ndim(ns) == 0)
    if not with_variance and not (method == "kp" and kp_possible):
        raise ValueError("with_variance=False needs method='kp' with value observations (the "
                         "other paths need the smoother pass)")
    return _condition_jit(xs, ys, ell, s2, ns, os_, q=q, method=method,
                          with_variance=with_variance, kp_possible=kp_possible)


def _condition_core(xs, ys, ell, s2, ns, os_, *, q, method, with_variance, kp_possible):
    if method == "dense":
        return Posterior(q, method, ns, s2, jnp.asarray(False), None, None, None,
                         (xs, ys, ell, os_))
    if method == "kp" or not kp_possible:
        use_kp = jnp.asarray(method == "kp")
    else:
        use_kp = kp_is_accurate(xs, q, ell)
    pk = beta = None
    if kp_possible:
        _, pk, beta = _kp_solve(xs, ys, q, ell, s2, ns)
    st = None
    if with_variance:
        st = statespace.filter_smoother(xs, ys, q, ell, s2, ns, os_)[1]
    return Posterior(q, method, ns, s2, use_kp, pk, beta, st, None)


_condition_jit = jax.jit(_condition_core,
                         static_argnames=("q", "method", "with_variance", "kp_possible"))


def _kp_mean(post: Posterior, t):
    cols, vals = packets.evaluate(post.pk, t, post.q)
    return jnp.sum(vals * post.beta[cols], axis=1)


def predict(post: Posterior, t, *, return_var: bool = False, include_noise: bool = False):
    """Posterior mean (and variance) of ``f`` at test points ``t`` (``[m]``, any order).

    Mean: packets ``O(log n + q^2)`` per point (or the state-space query when the packet path is
    outside its accuracy region); variance: state-space interval query, ``O(log n + q^3)``.
    ``include_noise`` adds the (scalar) noise variance. Raises ``ValueError`` for bad ``t`` or
    when variances were not computed (``with_variance=False``).
    """
    t = validate.check_points("t", t)
    if post.ss is None and return_var and post.method != "dense":
        raise ValueError("variances need condition(..., with_variance=True)")
    if include_noise and return_var and jnp.ndim(post.noise) != 0:
        raise ValueError("include_noise needs a scalar noise variance")
    return _predict_jit(post, t, return_var=return_var, include_noise=include_noise)


def _predict_core(post: Posterior, t, *, return_var: bool, include_noise: bool):
    if post.method == "dense":
        xs, ys, ell, os_ = post.dense_data
        m, v = dense.posterior(xs, ys, t, post.q, ell, post.variance, post.noise, os_)
    elif post.pk is None:
        m, v = statespace.state_moments(post.ss, t)
    elif post.ss is None:
        m, v = _kp_mean(post, t), None
    else:
        m_ss, v = statespace.state_moments(post.ss, t)
        m = jnp.where(post.use_kp, _kp_mean(post, t), m_ss)
    if not return_var:
        return m
    if include_noise:
        v = v + post.noise
    return m, v


_predict_jit = jax.jit(_predict_core, static_argnames=("return_var", "include_noise"))


def mean_derivative(post: Posterior, t, order: int = 1):
    """``d^order/dt^order`` of the posterior mean at ``t`` (``[m]``).

    Packet path: forward-mode autodiff of ``sum_j phi_j(t) beta_j`` (the mean is ``C^{2q}``,
    ``order <= 2q``; exact at data points only for the one-sided series windows). State-space
    path: state entry ``order`` (``order <= q``). Dense: exact kernel derivatives.
    """
    t = validate.check_points("t", t)
    q = post.q
    if post.method != "dense" and (post.pk is None or order > 2 * q) and not 0 <= order <= q:
        raise ValueError(f"order must be in [0, q={q}] on the state-space path, got {order}")
    if not 0 <= order <= 2 * q:
        raise ValueError(f"order must be in [0, 2q={2 * q}], got {order}")
    return _mean_derivative_jit(post, t, order=order)


def _mean_derivative_core(post: Posterior, t, *, order: int):
    q = post.q
    if post.method == "dense":
        xs, ys, ell, os_ = post.dense_data
        return dense.posterior(xs, ys, t, q, ell, post.variance, post.noise, os_, t_order=order)[0]
    if post.pk is None:
        return statespace.state_moments(post.ss, t, order)[0]

    def f(ti):
        return _kp_mean(post, ti[None])[0]

    g = f
    for _ in range(order):
        g = jax.grad(g)
    kp_d = jax.vmap(g)(t)
    if post.ss is None or order > q:
        return kp_d
    return jnp.where(post.use_kp, kp_d, statespace.state_moments(post.ss, t, order)[0])


_mean_derivative_jit = jax.jit(_mean_derivative_core, static_argnames=("order",))


class FitResult(NamedTuple):
    lengthscale: jax.Array
    variance: jax.Array
    noise: jax.Array
    losses: np.ndarray    # negative log-likelihood per step


def fit(x, y, q: int, *, lengthscale=1.0, variance=1.0, noise=0.1, steps: int = 200,
        learning_rate: float = 0.05, method: str = "auto", optimizer=None) -> FitResult:
    """Maximise the log marginal likelihood over ``log`` hyperparameters with optax.

    Args: data as in :func:`log_marginal_likelihood`; initial hyperparameters; ``steps`` of
    ``optimizer`` (default ``optax.adam(learning_rate)``) on ``(log ell, log s2, log noise)``.
    Returns: :class:`FitResult` with the final hyperparameters and the loss curve.
    """
    q, xs, ys, ell, s2, ns, _ = _prepare(x, y, q, lengthscale, variance, noise, method, None)
    if jnp.ndim(ns) != 0:
        raise ValueError("fit learns a scalar noise variance")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opt = optimizer if optimizer is not None else optax.adam(learning_rate)
    params = jnp.log(jnp.stack([ell, s2, ns]))

    def loss(p):
        e = jnp.exp(p)
        return -_lml(xs, ys, q, e[0], e[1], e[2], None, method)

    @jax.jit
    def step(p, state):
        val, g = jax.value_and_grad(loss)(p)
        upd, state = opt.update(g, state, p)
        return optax.apply_updates(p, upd), state, val

    state = opt.init(params)
    losses = []
    for _ in range(steps):
        params, state, val = step(params, state)
        losses.append(val)
    e = jnp.exp(params)
    return FitResult(e[0], e[1], e[2], np.asarray(jnp.stack(losses)))
