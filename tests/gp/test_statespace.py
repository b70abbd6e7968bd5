"""Kalman-filter log-likelihood and RTS smoother (gp.statespace) vs the dense Cholesky reference.

The filter's log-likelihood has a custom JVP (forward mode in the scalar hyperparameters); these
tests check it against plain autodiff of the dense GP to first and second order, in every
argument, under vmap, and with derivative observations.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gp import dense, kernels, statespace

N = 60


def _data(rng, q):
    x = jnp.asarray(np.sort(rng.uniform(0.0, 30.0, N)))
    y = jnp.sin(x) + 0.1 * jnp.asarray(rng.normal(size=N))
    return x, y


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / np.abs(b).max()


# numpy, not jnp: a jnp array made at import time would be float32 (x64 is switched on per test)
P0 = np.log([1.7, 1.3, 0.05])


def _lml_of_log_hyper(rng, q):
    """(ours, dense): log-likelihood as a function of (log ell, log s2, log noise)."""
    x, y = _data(rng, q)
    return (lambda p: statespace.log_likelihood(x, y, q, *jnp.exp(p)),
            lambda p: dense.log_marginal_likelihood(x, y, q, *jnp.exp(p)))


@pytest.mark.parametrize("q", [0, 1, 2, 3])
def test_lml_value_and_gradients_in_hyperparameters_equal_dense(rng, q):
    """q <= 1 runs one filter scan, q >= 2 two; reverse and forward mode both go through the
    custom JVP."""
    ours, ref = _lml_of_log_hyper(rng, q)
    assert _rel(ours(P0), ref(P0)) < 1e-12
    assert _rel(jax.grad(ours)(P0), jax.grad(ref)(P0)) < 1e-10
    assert _rel(jax.jacfwd(ours)(P0), jax.grad(ref)(P0)) < 1e-10


def test_lml_hessian_in_hyperparameters_equals_dense(rng):
    ours, ref = _lml_of_log_hyper(rng, 2)
    assert _rel(jax.hessian(ours)(P0), jax.hessian(ref)(P0)) < 1e-9


def test_lml_gradients_in_data_and_per_point_noise_equal_dense(rng):
    q = 2
    x, y = _data(rng, q)
    noise = 0.02 + 0.05 * jnp.asarray(rng.uniform(size=N))

    def ours(x, y, noise, ell):
        return statespace.log_likelihood(x, y, q, ell, 1.1, noise)

    def ref(x, y, noise, ell):
        return dense.log_marginal_likelihood(x, y, q, ell, 1.1, noise)

    g = jax.grad(ours, argnums=(0, 1, 2, 3))(x, y, noise, 1.5)
    g_ref = jax.grad(ref, argnums=(0, 1, 2, 3))(x, y, noise, 1.5)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 1e-10


def test_matern32_scalar_filter_equals_generic_step_and_dense(rng):
    """The Matérn-3/2 value path (``_filter_lml_matern32``, scalars) against the generic
    one-scan filter and the dense GP: scalar and per-point noise, duplicate inputs (zero lag),
    under ``jit`` and ``vmap`` over the lengthscale."""
    x, y = _data(rng, 1)
    x = x.at[7].set(x[6])                                   # a duplicate input
    noise = 0.02 + 0.05 * jnp.asarray(rng.uniform(size=N))
    lam = jnp.asarray(kernels.rate(1, 1.7))
    for nz in (jnp.asarray(0.05), noise):
        fast = jax.jit(statespace._filter_lml_matern32)(x, y, lam, jnp.asarray(1.3), nz)
        generic = statespace._filter_lml_one_scan(1, x, y, lam, jnp.asarray(1.3), nz, None)
        assert _rel(fast, generic) < 1e-13
        assert _rel(statespace.log_likelihood(x, y, 1, 1.7, 1.3, nz),
                    dense.log_marginal_likelihood(x, y, 1, 1.7, 1.3, nz)) < 1e-12
    ells = jnp.array([0.5, 1.7, 4.0])
    got = jax.vmap(lambda e: statespace.log_likelihood(x, y, 1, e, 1.3, noise))(ells)
    for e, g in zip(ells, got):
        assert _rel(g, dense.log_marginal_likelihood(x, y, 1, e, 1.3, noise)) < 1e-12


def test_matern32_split_forward_pass_equals_autodiff_of_the_scalar_filter(rng):
    """The Matérn-3/2 hyperparameter gradient (``_filter_lml_matern32_jvp``: short primal and
    tangent loops) against plain forward-mode autodiff through the scalar value filter, for
    every subset of hyperparameters, a duplicate input included; and the public gradient
    (through the custom JVP, with ``y`` perturbed too) against the dense GP."""
    x, y = _data(rng, 1)
    x = x.at[7].set(x[6])
    theta = jnp.array([kernels.rate(1, 1.7), 1.3, 0.05])
    names = ("lam", "variance", "noise")
    val = statespace._filter_lml_matern32(x, y, *theta)
    ref = jax.jacfwd(lambda t: statespace._filter_lml_matern32(x, y, *t))(theta)
    for hyper in (names, ("lam",), ("variance",), ("noise",), ("lam", "noise")):
        v, g = jax.jit(statespace._filter_lml_matern32_jvp, static_argnums=5)(
            x, y, *theta, hyper)
        assert _rel(v, val) < 1e-13
        assert _rel(g, ref[jnp.array([names.index(h) for h in hyper])]) < 1e-10

    def ours(y, p):
        return statespace.log_likelihood(x, y, 1, *jnp.exp(p))

    def dense_ref(y, p):
        return dense.log_marginal_likelihood(x, y, 1, *jnp.exp(p))

    got, want = jax.grad(ours, argnums=(0, 1))(y, P0), jax.grad(dense_ref, argnums=(0, 1))(y, P0)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-10


def test_lml_vmaps_over_hyperparameters_with_gradients(rng):
    ours, ref = _lml_of_log_hyper(rng, 1)
    ps = jnp.log(jnp.array([[1.0, 1.0, 0.1], [2.0, 0.5, 0.02], [0.5, 3.0, 0.3]]))

    v, g = jax.vmap(jax.value_and_grad(ours))(ps)
    for i in range(len(ps)):
        assert _rel(v[i], ref(ps[i])) < 1e-12
        assert _rel(g[i], jax.grad(ref)(ps[i])) < 1e-10


def test_lml_with_derivative_observations_equals_dense(rng):
    q = 2
    x, y = _data(rng, q)
    order = jnp.asarray(rng.integers(0, q + 1, N))

    def ours(p):
        return statespace.log_likelihood(x, y, q, *jnp.exp(p), order=order)

    def ref(p):
        return dense.log_marginal_likelihood(x, y, q, *jnp.exp(p), order=order)

    p = jnp.log(jnp.array([1.5, 1.2, 0.05]))
    assert _rel(ours(p), ref(p)) < 1e-12
    assert _rel(jax.grad(ours)(p), jax.grad(ref)(p)) < 1e-10


def test_filter_smoother_lml_equals_log_likelihood_and_smoothed_mean_equals_dense(rng):
    q = 3
    x, y = _data(rng, q)
    lml, st = statespace.filter_smoother(x, y, q, 2.0, 1.0, 0.05)
    assert _rel(lml, statespace.log_likelihood(x, y, q, 2.0, 1.0, 0.05)) < 1e-13
    m_ref, v_ref = dense.posterior(x, y, x, q, 2.0, 1.0, 0.05)
    assert _rel(st.ms[:, 0], m_ref) < 1e-9
    assert _rel(st.ps[:, 0, 0], v_ref) < 1e-9


def test_spd_solve_matches_numpy_unbatched_and_batch_last(rng):
    for m in (1, 2, 3, 4):
        a = rng.normal(size=(5, m, m))
        A = a @ np.swapaxes(a, 1, 2) + m * np.eye(m)
        B = rng.normal(size=(5, m, 3))
        want = np.linalg.solve(A, B)
        assert _rel(statespace._spd_solve(jnp.asarray(A[0]), jnp.asarray(B[0])), want[0]) < 1e-13
        got = statespace._spd_solve(jnp.moveaxis(jnp.asarray(A), 0, -1),
                                    jnp.moveaxis(jnp.asarray(B), 0, -1))
        assert _rel(jnp.moveaxis(got, -1, 0), want) < 1e-13


@pytest.mark.parametrize("q", [0, 3])
def test_kernel_matvec_equals_dense_product(rng, q):
    """``K v`` by the two O(n) recursions (used for the packet residual) vs the dense product."""
    x, _ = _data(rng, q)
    v = jnp.asarray(rng.normal(size=N))
    K = kernels.matern_cross(x, x, q, 1.7, 1.3)
    np.testing.assert_allclose(statespace.kernel_matvec(x, v, q, 1.7, 1.3), K @ v,
                               rtol=1e-12, atol=1e-12 * float(jnp.abs(K @ v).max()))
