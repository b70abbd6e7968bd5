import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl

from gp import kernels


@pytest.mark.parametrize("q", [0, 1, 2, 3])
def test_state_space_reproduces_kernel(q):
    N, P = kernels._ss_constants(q)
    F = N - np.eye(q + 1)
    # stationary covariance solves the Lyapunov equation up to the white-noise input on the last
    # state
    R = F @ P + P @ F.T
    R[-1, -1] = 0.0
    np.testing.assert_allclose(R, 0.0, atol=1e-12)
    for z in (1e-3, 0.4, 2.5, 9.0):
        T = np.asarray(kernels.ss_transition(q, jnp.asarray(z)))
        np.testing.assert_allclose(T, sl.expm(F * z), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose((T @ P)[0, 0], float(kernels.matern_unit(z, q)), rtol=1e-13)


def test_closed_forms():
    z = jnp.linspace(0.0, 5.0, 11)
    np.testing.assert_allclose(kernels.matern_unit(z, 0), jnp.exp(-z), rtol=1e-15)
    np.testing.assert_allclose(kernels.matern_unit(z, 1), (1 + z) * jnp.exp(-z), rtol=1e-15)
    np.testing.assert_allclose(kernels.matern_unit(z, 2), (1 + z + z ** 2 / 3) * jnp.exp(-z),
                               rtol=1e-15)


@pytest.mark.parametrize("q", [0, 1, 2, 3])
def test_odd_part_is_accurate_where_the_direct_difference_cancels(q):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 90  # D(1e-6) ~ 1e-45 cancels ~45 digits of the reference
    # exact rational coefficients: float-rounded ones would spoil the cancellation of the
    # even Taylor terms in the reference itself
    f = math.factorial
    c = [mpmath.mpf(f(q) * f(2 * q - k) * 2 ** k) / (f(2 * q) * f(k) * f(q - k))
         for k in range(q + 1)]

    def d_exact(z):
        z = mpmath.mpf(z)
        p = lambda s: sum(ck * s ** k for k, ck in enumerate(c))
        return float(mpmath.exp(-z) * p(z) - mpmath.exp(z) * p(-z))

    z = np.array([1e-6, 1e-3, 0.05, 0.4, 0.99, 1.0, 1.01, 2.5, 8.0])
    got = np.asarray(kernels.odd_part_unit(jnp.asarray(z), q))
    want = np.array([d_exact(v) for v in z])
    np.testing.assert_allclose(got, want, rtol=1e-13)


@pytest.mark.parametrize("q", [1, 2])
def test_kernel_derivatives_match_autodiff(q):
    r = jnp.array([-1.3, -0.2, 0.35, 2.0])
    k = lambda s: kernels.matern(s, q, 0.7, 1.4)
    g = k
    for m in range(1, 2 * q + 1):
        g = jax.grad(g)
        np.testing.assert_allclose(jax.vmap(g)(r), kernels.matern_deriv(r, q, 0.7, 1.4, m),
                                   rtol=1e-11)
    with pytest.raises(ValueError, match="derivative order"):
        kernels.matern_deriv(r, q, 0.7, 1.4, 2 * q + 1)


def test_bad_q():
    with pytest.raises(ValueError, match="q must be"):
        kernels.check_q(4)
    with pytest.raises(ValueError, match="q must be"):
        kernels.check_q(1.0)
