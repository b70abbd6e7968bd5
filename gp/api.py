"""Exact 1-D Matérn GP regression: log-likelihood, conditioning, prediction, fitting.

Methods (``method=``):

* ``"auto"`` (default): the state-space solver (below) for everything. It is exact on every
  input layout tested (uniform, random, pairs, tight clusters, near-duplicates down to 1e-6
  lengthscales, huge gaps; ``tests/gp/test_exactness.py``) and measured faster than the packet
  path for the likelihood, conditioning and prediction (``docs/gp.md``). The choice is made in
  Python before tracing, so ``auto`` costs exactly what ``"ss"`` costs.
* ``"ss"``: Kalman filter / RTS smoother (:mod:`gp.statespace`; Hartikainen & Särkkä 2010),
  ``O(n q^3)``; any inputs incl. duplicates and derivative observations. Posterior mean,
  variance and mean derivatives (orders ``<= 2q``) from ``O(log n + q^3)`` interval queries.
* ``"kp"``: kernel packets (Chen, Ding & Tuo, JMLR 2022, arXiv:2203.03116; Ding, Tuo & Zou,
  arXiv:2402.04022): ``K + s I = B A^-1`` with ``B = Phi + s A`` banded, so ``beta = B^-1 y``
  (banded LU, :mod:`gp.banded`), ``y^T (K + s I)^-1 y = (A^T y) . beta`` and
  ``log det(K + s I) = log|det B| - log|det A|``; the posterior mean at ``t`` is
  ``sum_{j in J(t)} phi_j(t) beta_j`` over the ``<= 2q+2`` packets alive at ``t``. Needs
  distinct inputs and value observations. The packet construction loses digits when points of
  a window nearly coincide (clustered inputs); every packet solve therefore measures its
  relative residual ``||y - (K + s I) A beta|| / ||y||`` (``K v`` by two ``O(n)`` recursions,
  :func:`gp.statespace.kernel_matvec`). The residual bounds the error of the posterior mean at
  the data points (``||K (K + sI)^-1|| <= 1``); when it exceeds :data:`KP_RESIDUAL_TOL` a
  ``RuntimeWarning`` reports it (concrete calls; under ``jit`` read ``Posterior.kp_residual``).
* ``"dense"``: Cholesky reference (:mod:`gp.dense`), ``O(n^3)``.

Posterior variances always come from the state-space interval query: after one ``O(n)`` RTS
pass, ``O(log n + q^3)`` per test point and no ``n x m`` matrix. (The packet variance formula
``s2 - phi(t)^T M^-1 phi(t)`` cancels catastrophically for ``q >= 1`` and is not offered.)

Sorting: inputs may come in any order. Concrete inputs are checked on the host (``O(n)``) and
sorted there only when needed (:func:`argsort`: a radix bucket pass finished by numpy's merge
sort); inside ``jit`` the check is traced and a ``lax.cond`` sorts only unsorted input (the same
:func:`argsort` through ``jax.pure_callback``).

Invalid values: concrete calls raise ``ValueError`` (:mod:`gp.validate`). Traced values cannot
be inspected, so inside ``jit``/``vmap``/``grad`` every entry point returns NaN (value and
derivatives) when ``lengthscale <= 0``, ``variance <= 0``, ``noise < 0`` or any of them, ``x``
or ``y`` is not finite, on every method.

Everything is float64: enable ``jax_enable_x64`` first (see :mod:`gp.validate`).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gp import banded, dense, kernels, packets, statespace, validate

METHODS = ("auto", "kp", "ss", "dense")

# Warn when a packet solve's measured relative residual exceeds this. Measured on the layouts of
# tests/gp/test_exactness.py: residuals <= 2e-9 went with posterior-mean errors <= 1e-8
# (random and jittered designs); clustered and near-duplicate inputs gave 1e-7 .. 1e3.
KP_RESIDUAL_TOL = 1e-9


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["noise", "variance", "pk", "beta", "kp_residual", "ss",
                                "dense_data"],
                   meta_fields=["q", "method"])
@dataclasses.dataclass(frozen=True)
class Posterior:
    """Conditioned GP (a pytree with static ``q`` and resolved ``method`` in
    ``{"kp", "ss", "dense"}``; it passes through ``jit``)."""

    q: int
    method: str
    noise: jax.Array
    variance: jax.Array
    pk: packets.Packets | None            # packet data ("kp" only)
    beta: jax.Array | None                # [n] packet weights B^-1 y ("kp" only)
    kp_residual: jax.Array | None         # [] ||y - (K + s I) A beta|| / ||y|| ("kp" only)
    ss: statespace.SmootherState | None   # smoother data (None for "dense", mean-only "kp")
    dense_data: tuple | None              # (x, y, lengthscale, order) for "dense"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _resolve(method: str) -> str:
    """``auto`` is the state-space path (module docstring); decided before any tracing."""
    return "ss" if method == "auto" else method


def _concrete(*vs) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in vs)


def _poison(ell, s2, noise, x=None, y=None):
    """``1.0``, or NaN when a (traced) value is invalid: multiplying the (scalar)
    hyperparameters by it makes the value and every derivative NaN on every path. NaN in ``x``
    or ``y`` already propagates into the log-likelihood, so only conditioning passes them (a
    NaN ``y`` would leave the variances finite)."""
    bad = ~(ell > 0) | ~(s2 > 0) | ~jnp.all(noise >= 0) | ~jnp.isfinite(ell * s2)
    bad = bad | ~jnp.all(jnp.isfinite(noise))
    if x is not None:
        bad = bad | ~jnp.all(jnp.isfinite(x)) | ~jnp.all(jnp.isfinite(y))
    return jnp.where(bad, jnp.nan, 1.0)


# Bucket pass of :func:`argsort`: inputs at least this long (below, numpy's sort measured as fast),
# and the most points one bucket may hold before the pass is abandoned for numpy's sort.
BUCKET_SORT_MIN_N = 2048
BUCKET_SORT_MAX_LOAD = 64


def argsort(x: np.ndarray) -> np.ndarray:
    """``argsort`` of a 1-D float64 numpy array (``x[argsort(x)]`` is sorted; NaN-free input).

    One bucket pass, then a merge sort that finishes the nearly sorted result: the keys
    ``floor(B (x - min) / (max - min))``, ``B = min(2^16, n rounded up to a power of 2)``, are
    ``uint16``, which numpy sorts stably by radix (``O(n)``); within a bucket the points stay in
    input order, so ``x[idx]`` is sorted except inside buckets, and ``argsort(x[idx], kind="stable")`` (timsort, which merges the long
    sorted runs this leaves in ``O(n)`` comparisons plus the few within buckets) completes it.
    Measured on the shared 2-core CPU VM (``gp`` benchmark, ``argsort`` rows, uniform ``x``, two
    runs): 0.05-0.51x (n = 1e5) and 0.34-0.42x (n = 1e6) the time of ``numpy.argsort`` in the
    same rounds (whose default sort is faster than its merge sort on random input). When one bucket would hold more
    than :data:`BUCKET_SORT_MAX_LOAD` points (strongly clustered or heavy-tailed ``x``), the
    pass would gain nothing and ``numpy.argsort`` sorts directly; likewise below
    :data:`BUCKET_SORT_MIN_N` points.
    """
    return _sort(x)[0]


def _sort(x: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(idx, x[idx], *(v[idx] for v in others))`` with ``idx`` of :func:`argsort`.

    The sorted ``x`` comes from the merge pass's nearly sequential gather instead of a second
    random gather (a gather of the others on a worker thread during the merge pass measured no
    faster at n = 1e6 on the loaded 2-core CPU VM, so there is none)."""
    n = x.shape[0]
    if n < BUCKET_SORT_MIN_N:
        return _numpy_sort(x, others)
    lo, hi = x.min(), x.max()
    nb = min(1 << 16, 1 << (n - 1).bit_length())      # about one point per bucket, at most 2^16
    with np.errstate(over="ignore"):
        scale = nb / (hi - lo) if hi > lo else np.inf
    if not np.isfinite(scale) or scale == 0:          # all equal, or a span beyond float64
        return _numpy_sort(x, others)
    key = x - lo
    key *= scale
    np.minimum(key, nb - 1, out=key)
    key = key.astype(np.uint16)
    if np.bincount(key, minlength=nb).max() > BUCKET_SORT_MAX_LOAD:
        return _numpy_sort(x, others)
    idx = np.argsort(key, kind="stable")
    xb = x[idx]
    fin = np.argsort(xb, kind="stable")
    final = idx[fin]
    return (final, xb[fin], *(v[final] for v in others))


def _numpy_sort(x, others):
    idx = np.argsort(x)
    return (idx, x[idx], *(v[idx] for v in others))


def _host_argsort(x):
    """:func:`argsort` of a traced ``x`` through ``jax.pure_callback`` (the permutation carries
    no derivative, so ``x`` enters through ``stop_gradient``); XLA's own sort measured 2.3-5.8x
    slower than numpy's on this CPU at n = 1e6. int32 indices: the callback runs on another thread,
    where a ``jax.enable_x64`` context of the caller (it is thread-local) does not hold and int64
    results would be rejected."""
    def host(v):
        v = np.asarray(v, dtype=np.float64)
        rows = v.reshape(-1, v.shape[-1])
        return np.stack([argsort(r) for r in rows]).reshape(v.shape).astype(np.int32)

    out = jax.ShapeDtypeStruct(x.shape, jnp.int32)
    return jax.pure_callback(host, out, jax.lax.stop_gradient(x), vmap_method="expand_dims")


def _sort_inputs(x, y, noise, order):
    """Sort by ``x``, skipping the sort when ``x`` is already non-decreasing (an ``O(n)``
    check): on the host for concrete ``x`` (:func:`argsort`), else in the traced program (a
    ``lax.cond`` on the check, so a sorted input never pays for the sort; under ``vmap`` both
    branches run)."""
    per_point = jnp.ndim(noise) == 1
    if _concrete(x):
        xn = np.asarray(x)
        if xn.shape[0] < 2 or bool(np.all(xn[1:] >= xn[:-1])):
            return x, y, noise, order
        host = [np.asarray(v) for v in (y, noise if per_point else None, order)
                if v is not None and _concrete(v)]
        idx, xs, *sorted_host = _sort(xn, *host)
        sorted_host = iter(sorted_host)
        take = lambda v: jnp.asarray(next(sorted_host)) if _concrete(v) else v[idx]
        return (jnp.asarray(xs), take(y), take(noise) if per_point else noise,
                None if order is None else take(order))
    arrays = (x, y) + ((noise,) if per_point else ()) + (() if order is None else (order,))

    def sort(a):
        idx = _host_argsort(a[0])
        return tuple(v[idx] for v in a)

    out = jax.lax.cond(jnp.all(x[1:] >= x[:-1]), lambda a: a, sort, arrays)
    xs, ys, rest = out[0], out[1], list(out[2:])
    ns = rest.pop(0) if per_point else noise
    return xs, ys, ns, (None if order is None else rest.pop(0))


def _check_duplicates(xs, method: str, noise) -> None:
    """Duplicate inputs matter only to the packets and with a zero noise variance; the ``O(n)``
    scan is skipped otherwise."""
    exact = _concrete(noise) and bool(np.any(np.asarray(noise) == 0))
    if not _concrete(xs) or not (method == "kp" or exact):
        return
    dup = bool(np.any(np.diff(np.asarray(xs)) <= 0))
    if dup and method == "kp":
        raise ValueError("x has duplicate values: the kernel-packet method needs distinct inputs "
                         "(use method='ss' or 'auto', which handle duplicates with noise > 0)")
    if dup and exact:
        raise ValueError("x has duplicate values and noise == 0: K is singular")


def _kp_solve(xs, ys, q, lengthscale, variance, noise):
    """Packets, ``beta = B^-1 y``, the log-likelihood and the measured relative residual
    ``||y - (K + s I) A beta||_2 / ||y||_2`` (sorted distinct inputs, scalar noise)."""
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
    alpha = jax.lax.stop_gradient(banded.band_rmatvec_cols(pk.coef, pk.start, beta))
    r = ys - statespace.kernel_matvec(xs, alpha, q, lengthscale, variance) - noise * alpha
    resid = jax.lax.stop_gradient(jnp.linalg.norm(r) / jnp.linalg.norm(ys))
    return lml, pk, beta, resid


def _warn_kp(resid) -> None:
    if resid is None or not _concrete(resid):
        return
    r = float(resid)
    if not r <= KP_RESIDUAL_TOL:
        warnings.warn(
            f"method='kp': the packet solve's measured relative residual "
            f"||y - (K + noise I) A beta|| / ||y|| = {r:.2e} exceeds {KP_RESIDUAL_TOL:.0e} (nan: "
            "the packet construction produced non-finite values), so the posterior mean and "
            "log-likelihood may be inaccurate (the packets lose digits when inputs nearly "
            "coincide or cluster); method='auto' (state space) is exact here",
            RuntimeWarning, stacklevel=3)


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
        if _concrete(order) and np.any((np.asarray(order) < 0) | (np.asarray(order) > q)):
            raise ValueError(f"order entries must be in [0, q={q}]")
    if method == "kp":
        packets.layout(x.shape[0], q)  # raises for n < 2q+3
        if noise.ndim != 0:
            raise ValueError("method 'kp' takes a scalar noise variance")
    xs, ys, ns, os_ = _sort_inputs(x, y, noise, order)
    _check_duplicates(xs, method, ns)
    return q, xs, ys, lengthscale, variance, ns, os_


def log_marginal_likelihood(x, y, q: int, lengthscale, variance, noise, *, method: str = "auto",
                            order=None):
    """``log N(y | 0, K + noise I)`` for a zero-mean Matérn-(q+1/2) GP.

    Args:
      x, y: ``[n]`` inputs (any order; already-sorted input is detected in ``O(n)`` and not
        re-sorted) and observations; float64 (float32 warns and upcasts).
      q: smoothness order (``nu = q + 1/2``, 0..3). lengthscale, variance: scalars > 0.
      noise: observation noise variance, scalar (or ``[n]`` for 'ss'/'dense') >= 0.
      method: 'auto' | 'kp' | 'ss' | 'dense' (module docstring). order: optional ``[n]`` ints,
        derivative order observed at each input ('ss'/'dense'/'auto' only).
    Returns: scalar float64; differentiable in the hyperparameters (and ``y``). Inside
      ``jit``/``grad`` invalid values give NaN (module docstring).
    Raises: ``ValueError``/``TypeError`` on bad input (see :mod:`gp.validate`);
      ``RuntimeWarning`` from ``method='kp'`` when its measured residual is too large.
    """
    q, xs, ys, ell, s2, ns, os_ = _prepare(x, y, q, lengthscale, variance, noise, method, order)
    method = _resolve(method)
    if method == "kp":
        val, resid = _lml_kp_jit(xs, ys, q, ell, s2, ns)
        _warn_kp(resid)
        return val
    return _lml_jit(xs, ys, q, ell, s2, ns, os_, method)


def _lml(xs, ys, q, ell, s2, ns, os_, method):
    p = _poison(ell, s2, ns)
    ell, s2, ns = ell * p, s2 * p, ns * p
    if method == "dense":
        return dense.log_marginal_likelihood(xs, ys, q, ell, s2, ns, os_)
    if method == "kp":
        return _kp_solve(xs, ys, q, ell, s2, ns)[0]
    return statespace.log_likelihood(xs, ys, q, ell, s2, ns, os_)


def _lml_kp(xs, ys, q, ell, s2, ns):
    p = _poison(ell, s2, ns)
    lml, _, _, resid = _kp_solve(xs, ys, q, ell * p, s2 * p, ns * p)
    return lml, resid


_lml_jit = jax.jit(_lml, static_argnames=("q", "method"))
_lml_kp_jit = jax.jit(_lml_kp, static_argnames=("q",))


def condition(x, y, q: int, lengthscale, variance, noise, *, method: str = "auto",
              order=None, with_variance: bool = True) -> Posterior:
    """Condition the GP on data; returns a :class:`Posterior` for :func:`predict`.

    ``O(n q^3)``. ``with_variance=False`` skips the RTS pass (mean-only predictions, 'kp' only).
    Same arguments and errors as :func:`log_marginal_likelihood`; ``method='kp'`` warns when its
    measured residual exceeds :data:`KP_RESIDUAL_TOL` (the value is kept in
    ``Posterior.kp_residual``).
    """
    q, xs, ys, ell, s2, ns, os_ = _prepare(x, y, q, lengthscale, variance, noise, method, order)
    method = _resolve(method)
    if not with_variance and method != "kp":
        raise ValueError("with_variance=False needs method='kp' (the other paths need the "
                         "smoother pass, which gives the variances at no extra cost)")
    post = _condition_jit(xs, ys, ell, s2, ns, os_, q=q, method=method,
                          with_variance=with_variance)
    _warn_kp(post.kp_residual)
    return post


def _condition_core(xs, ys, ell, s2, ns, os_, *, q, method, with_variance):
    p = _poison(ell, s2, ns, xs, ys)
    ell, s2, ns = ell * p, s2 * p, ns * p
    if method == "dense":
        return Posterior(q, method, ns, s2, None, None, None, None, (xs, ys, ell, os_))
    pk = beta = resid = st = None
    if method == "kp":
        _, pk, beta, resid = _kp_solve(xs, ys, q, ell, s2, ns)
    if with_variance:
        st = statespace.filter_smoother(xs, ys, q, ell, s2, ns, os_)[1]
    return Posterior(q, method, ns, s2, pk, beta, resid, st, None)


_condition_jit = jax.jit(_condition_core, static_argnames=("q", "method", "with_variance"))


def _kp_mean(post: Posterior, t):
    cols, vals = packets.evaluate(post.pk, t, post.q)
    return jnp.sum(vals * post.beta[cols], axis=1)


def predict(post: Posterior, t, *, return_var: bool = False, include_noise: bool = False):
    """Posterior mean (and variance) of ``f`` at test points ``t`` (``[m]``, any order).

    State-space path (default): mean and variance from one interval query,
    ``O(log n + q^3)`` per point. Packet path: mean ``sum_j phi_j(t) beta_j``,
    ``O(log n + q^2)`` per point; variance from the state-space query.
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
    v = None
    if post.method == "dense":
        xs, ys, ell, os_ = post.dense_data
        m, v = dense.posterior(xs, ys, t, post.q, ell, post.variance, post.noise, os_)
    elif post.method == "kp":
        m = _kp_mean(post, t)
        if return_var:
            v = statespace.state_moments(post.ss, t)[1]
    else:
        m, v = statespace.state_moments(post.ss, t)
    if not return_var:
        return m
    if include_noise:
        v = v + post.noise
    return m, v


_predict_jit = jax.jit(_predict_core, static_argnames=("return_var", "include_noise"))


def mean_derivative(post: Posterior, t, order: int = 1):
    """``d^order/dt^order`` of the posterior mean at ``t`` (``[m]``), ``0 <= order <= 2q``
    (the posterior mean is ``C^{2q}``).

    State-space path (default): orders ``<= q`` are smoothed state entries, higher orders
    forward-mode derivatives in ``t`` of the exact interval query
    (:func:`gp.statespace.mean_derivative`). Packet path: forward-mode autodiff of
    ``sum_j phi_j(t) beta_j`` (as accurate as the packet solve: see ``kp_residual``). Dense:
    exact kernel derivatives. Raises ``ValueError`` for an order outside ``[0, 2q]``.
    """
    t = validate.check_points("t", t)
    q = post.q
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) \
            or not 0 <= order <= 2 * q:
        raise ValueError(f"order must be an int in [0, 2q={2 * q}], got {order!r}")
    return _mean_derivative_jit(post, t, order=int(order))


def _mean_derivative_core(post: Posterior, t, *, order: int):
    q = post.q
    if post.method == "dense":
        xs, ys, ell, os_ = post.dense_data
        return dense.posterior(xs, ys, t, q, ell, post.variance, post.noise, os_, t_order=order)[0]
    if post.method == "ss":
        return statespace.mean_derivative(post.ss, t, order)

    def f(ti):
        return _kp_mean(post, ti[None])[0]

    g = f
    for _ in range(order):
        g = jax.grad(g)
    return jax.vmap(g)(t)


_mean_derivative_jit = jax.jit(_mean_derivative_core, static_argnames=("order",))


class FitResult(NamedTuple):
    lengthscale: jax.Array
    variance: jax.Array
    noise: jax.Array
    losses: np.ndarray    # negative log-likelihood per step


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["step", "params", "opt_state"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class FitState:
    """The smallest state the fit step reads: ``step`` (optimizer steps taken), ``params`` (the
    ``[3]`` log hyperparameters ``(log ell, log s2, log noise)``) and ``opt_state``, with
    ``replace``. Its fields mirror ``lmx.train.TrainState``'s ``step``/``params``/``opt_state``,
    so the step of :func:`make_fit_step` runs on either (``gp`` does not import ``lmx``)."""

    step: jax.Array
    params: jax.Array
    opt_state: object

    def replace(self, **changes) -> "FitState":
        return dataclasses.replace(self, **changes)


def _fit_core(q: int, method: str, opt):
    """The pure fit step on explicit data: ``core(state, xs, ys) -> (state, {"loss": nll})``."""
    def loss(p, xs, ys):
        e = jnp.exp(p)
        return -_lml(xs, ys, q, e[0], e[1], e[2], None, method)

    def core(state, xs, ys):
        val, g = jax.value_and_grad(loss)(state.params, xs, ys)
        upd, opt_state = opt.update(g, state.opt_state, state.params)
        return (state.replace(params=optax.apply_updates(state.params, upd), opt_state=opt_state),
                {"loss": val})

    return core


def make_fit_step(x, y, q: int, *, optimizer=None, learning_rate: float = 0.05,
                  method: str = "auto"):
    """Hyperparameter fit as a pure training step: returns ``(init, step)``.

    ``init(lengthscale, variance, noise) -> (params, opt_state)``: ``params`` are the log
    hyperparameters ``theta = (log ell, log s2, log noise)`` (``[3]``), ``opt_state`` the
    optimizer's state for them. ``step(state, batch=None, key=None) -> (state, metrics)`` takes
    any state with ``.params``, ``.opt_state`` and ``.replace`` (:class:`FitState`, or
    ``lmx.train.TrainState``), does one update of ``optimizer`` (default
    ``optax.adam(learning_rate)``) on the gradient of the negative log marginal likelihood
    ``-log N(y | 0, K_theta + noise I)`` and returns ``state.replace(params=..., opt_state=...)``
    with ``{"loss": nll before the update}``. ``batch`` and ``key`` are ignored (the data are
    ``x``, ``y``, validated and sorted once here); ``state.step`` is left to the driver
    (``lmx.train.compile_step``/``run`` and :func:`fit` advance it). The step is ``jax.jit``-ed
    on the data; it can also be traced into a larger program.

    A user's own loop::

        init, step = make_fit_step(x, y, q=1)
        params, opt_state = init(1.0, 1.0, 0.1)
        state = FitState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
        for _ in range(200):
            state, metrics = step(state)
        ell, s2, noise = jnp.exp(state.params)

    Raises: as :func:`log_marginal_likelihood` for the data, ``q`` and ``method``; ``init``
    raises ``ValueError`` for invalid hyperparameters or a noise that is not a scalar > 0 (the
    fit works on ``log noise``).
    """
    init, core, xs, ys = _fit_parts(x, y, q, optimizer, learning_rate, method)

    def step(state, batch=None, key=None):
        return core(state, xs, ys)

    return init, step


def _fit_parts(x, y, q, optimizer, learning_rate, method):
    """``(init, core, xs, ys)``: :func:`make_fit_step`'s ``init``, the jitted step with the
    data explicit (``core(state, xs, ys)``), and the validated, sorted data."""
    q = kernels.check_q(q)
    _check_method(method)
    x, y = validate.check_data(x, y)
    if method == "kp":
        packets.layout(x.shape[0], q)
    xs, ys, _, _ = _sort_inputs(x, y, np.float64(1.0), None)
    _check_duplicates(xs, method, np.float64(1.0))     # noise = exp(log noise) > 0
    opt = optimizer if optimizer is not None else optax.adam(learning_rate)

    def init(lengthscale, variance, noise):
        ell, s2, ns = validate.check_hyper(lengthscale, variance, noise)
        if jnp.ndim(ns) != 0:
            raise ValueError(f"fit learns a scalar noise variance, got noise of shape {ns.shape}")
        if _concrete(ns) and not float(ns) > 0:
            raise ValueError(f"fit learns log(noise): noise must be > 0, got {float(ns)}")
        params = jnp.log(jnp.stack([jnp.asarray(v, jnp.float64) for v in (ell, s2, ns)]))
        return params, opt.init(params)

    return init, jax.jit(_fit_core(q, _resolve(method), opt)), xs, ys


def fit(x, y, q: int, *, lengthscale=1.0, variance=1.0, noise=0.1, steps: int = 200,
        learning_rate: float = 0.05, method: str = "auto", optimizer=None) -> FitResult:
    """Maximise the log marginal likelihood over ``log`` hyperparameters with optax.

    Runs the step of :func:`make_fit_step` ``steps`` times under one ``jax.lax.scan`` (one
    compiled program, no per-step dispatch), starting from :class:`FitState` at step 0.

    Args: data as in :func:`log_marginal_likelihood`; initial hyperparameters; ``steps`` of
    ``optimizer`` (default ``optax.adam(learning_rate)``) on ``(log ell, log s2, log noise)``.
    Returns: :class:`FitResult` with the final hyperparameters and the loss curve (the negative
    log-likelihood before each step).
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    init, core, xs, ys = _fit_parts(x, y, q, optimizer, learning_rate, method)
    params, opt_state = init(lengthscale, variance, noise)
    state = FitState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    state, losses = _fit_scan(core, state, xs, ys, int(steps))
    e = jnp.exp(state.params)
    return FitResult(e[0], e[1], e[2], np.asarray(losses))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _fit_scan(core, state, xs, ys, steps):
    def body(st, _):
        new, metrics = core(st, xs, ys)
        return new.replace(step=st.step + 1), metrics["loss"]

    return jax.lax.scan(body, state, None, length=steps)
