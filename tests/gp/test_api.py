"""GP API vs the dense Cholesky reference."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl

from gp import api, dense, kernels

# (lengthscale for a unit-spacing design) inside the calibrated packet region for each q
BENIGN_ELL = {0: 3.0, 1: 3.0, 2: 1.5, 3: 1.0}
# XLA compiles once per (q, method, shape): every test uses N inputs and M test points unless the
# point being checked needs another size, so the compiled functions are shared across tests.
N, M = 200, 64


def _data(rng, n, kind, ell):
    if kind == "jittered":
        x = np.cumsum(rng.uniform(0.5, 1.5, n))
        x = x[rng.permutation(n)]  # unsorted on purpose
    elif kind == "sorted":
        x = np.sort(rng.uniform(0, n, n))
    else:
        x = rng.uniform(0, n, n)
    y = np.sin(x / ell) + 0.3 * np.cos(0.37 * x / ell) + 0.1 * rng.normal(size=n)
    return x, y


def _rel(a, b, scale=None):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / (np.abs(b).max() if scale is None else scale)


def _dense_np(x, y, t, q, ell, s2, noise):
    """Dense float64 Cholesky reference in numpy/scipy (LML, mean, variance): the same algebra as
    ``gp.dense`` without an XLA compile per (q, shape)."""
    K = np.asarray(kernels.matern_cross(x, x, q, ell, s2)) + noise * np.eye(len(x))
    Kxt = np.asarray(kernels.matern_cross(x, t, q, ell, s2))
    c = sl.cho_factor(K, lower=True)
    alpha = sl.cho_solve(c, y)
    V = sl.solve_triangular(c[0], Kxt, lower=True)
    lml = -0.5 * y @ alpha - np.log(np.diag(c[0])).sum() - 0.5 * len(x) * np.log(2 * np.pi)
    return lml, Kxt.T @ alpha, s2 - (V * V).sum(axis=0)


def _check_against_dense(rng, q, kind, n):
    ell, s2, noise = BENIGN_ELL[q], 1.3, 0.05
    x, y = _data(rng, n, kind, ell)
    t = np.concatenate([rng.uniform(-5, x.max() + 5, M - 20), x[:20]])
    l_d, m_d, v_d = _dense_np(x, y, t, q, ell, s2, noise)
    post = api.condition(x, y, q, ell, s2, noise)                       # auto
    m, v = api.predict(post, t, return_var=True)
    assert _rel(api.log_marginal_likelihood(x, y, q, ell, s2, noise), l_d) <= 1e-8
    assert _rel(m, m_d) <= 1e-8
    assert _rel(v, v_d, scale=s2) <= 1e-8
    if kind == "jittered":
        # the packet path itself on the design where it is accurate: no warning, same answer
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            post_kp = api.condition(x, y, q, ell, s2, noise, method="kp")
        assert float(post_kp.kp_residual) <= api.KP_RESIDUAL_TOL
        assert _rel(api.predict(post_kp, t), m_d) <= 1e-8


@pytest.mark.slow
def test_matches_dense_n2000_unsorted(rng):
    _check_against_dense(rng, 2, "jittered", 2000)


# each nu once; sorted and unsorted random designs, and the unsorted jittered grid on which the
# packet path itself is accurate (checked against dense there as well)
@pytest.mark.parametrize("q,kind", [(0, "unsorted"), (1, "sorted"), (2, "jittered"),
                                    (3, "jittered"), (2, "sorted")])
def test_matches_dense_random_inputs(rng, q, kind):
    _check_against_dense(rng, q, kind, N)


@pytest.mark.slow
@pytest.mark.parametrize("q", [0, 1, 2])
def test_auto_mean_within_1e8_over_lengthscale_range(rng, q):
    """nu <= 5/2, lengthscale/spacing in [0.1, 100]: the default is exact throughout."""
    x = np.cumsum(rng.uniform(0.5, 1.5, N))
    t = rng.uniform(x[0] - 1, x[-1] + 1, M)
    for ratio in (0.1, 1.0, 10.0, 100.0):
        y = np.sin(x / ratio) + 0.1 * rng.normal(size=N)
        post = api.condition(x, y, q, ratio, 1.0, 0.01)
        m = api.predict(post, t)
        _, m_d, _ = _dense_np(x, y, t, q, ratio, 1.0, 0.01)
        assert _rel(m, m_d) <= 1e-8, ratio


@pytest.mark.slow
@pytest.mark.parametrize("q", [2])
def test_gradients_match_dense(rng, q):
    x, y = _data(rng, N, "jittered", BENIGN_ELL[q])
    p0 = jnp.log(jnp.array([BENIGN_ELL[q], 1.3, 0.05]))

    def lml(p, method):
        e = jnp.exp(p)
        return api.log_marginal_likelihood(x, y, q, e[0], e[1], e[2], method=method)

    g_d = jax.grad(lml)(p0, "dense")
    for method in ("kp", "ss"):
        g = jax.grad(lml)(p0, method)
        np.testing.assert_allclose(g, g_d, rtol=1e-8, atol=1e-8 * np.abs(g_d).max())


def test_auto_likelihood_supports_hessian(rng):
    """'auto' runs the state-space likelihood (custom JVP), so second derivatives work."""
    x, y = _data(rng, 40, "jittered", 3.0)
    p0 = jnp.log(jnp.array([3.0, 1.3, 0.05]))

    def lml(p, method):
        return api.log_marginal_likelihood(x, y, 1, *jnp.exp(p), method=method)

    H = jax.hessian(lml)(p0, "auto")
    np.testing.assert_allclose(H, jax.hessian(lml)(p0, "dense"), rtol=1e-8,
                               atol=1e-9 * np.abs(H).max())


def test_jit_and_vmap_over_hyperparameters(rng):
    x, y = _data(rng, N, "jittered", 3.0)
    ells = jnp.array([2.0, 3.0, 4.0])

    @jax.jit
    def batch(ells):
        return jax.vmap(lambda e: api.log_marginal_likelihood(x, y, 1, e, 1.0, 0.05))(ells)

    got = batch(ells)
    want = [_dense_np(x, y, x[:1], 1, float(e), 1.0, 0.05)[0] for e in ells]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    t = jnp.linspace(0, 100, M)
    means = jax.jit(jax.vmap(lambda e: api.predict(api.condition(x, y, 1, e, 1.0, 0.05), t)))(ells)
    assert means.shape == (3, M)
    np.testing.assert_allclose(means[1], api.predict(api.condition(x, y, 1, 3.0, 1.0, 0.05), t),
                               rtol=1e-10)


@pytest.mark.parametrize("q,method", [(0, "ss"), (1, "kp"), (2, "kp")])
def test_noise_free_interpolates(rng, q, method):
    x = np.cumsum(rng.uniform(0.5, 1.5, N))
    y = np.sin(x)
    ell = 1.0 / kernels.rate(q, 1.0)  # lam * h ~ 1: well-conditioned K
    post = api.condition(x, y, q, ell, 1.0, 0.0, method=method)
    m, v = api.predict(post, x[-M:], return_var=True)
    np.testing.assert_allclose(m, y[-M:], atol=1e-8)
    np.testing.assert_allclose(v, 0.0, atol=1e-8)
    t = x[:M] + 0.3
    l_d, m_d, v_d = _dense_np(x, y, t, q, ell, 1.0, 0.0)
    mt, vt = api.predict(post, t, return_var=True)
    assert _rel(mt, m_d) <= 1e-8 and _rel(vt, v_d, 1.0) <= 1e-8
    l = api.log_marginal_likelihood(x, y, q, ell, 1.0, 0.0, method=method)
    assert _rel(l, l_d) <= 1e-8


def test_include_noise_and_mean_only(rng):
    x, y = _data(rng, N, "jittered", 3.0)
    post = api.condition(x, y, 1, 3.0, 1.0, 0.05)
    _, v = api.predict(post, x[:M], return_var=True)
    _, vn = api.predict(post, x[:M], return_var=True, include_noise=True)
    np.testing.assert_allclose(vn - v, 0.05, rtol=1e-12)
    mean_only = api.condition(x, y, 1, 3.0, 1.0, 0.05, method="kp", with_variance=False)
    np.testing.assert_allclose(api.predict(mean_only, x[:M]), api.predict(post, x[:M]),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="with_variance=True"):
        api.predict(mean_only, x[:M], return_var=True)


@pytest.mark.parametrize("q", [2])
def test_mean_derivatives_match_dense(rng, q):
    x, y = _data(rng, N, "jittered", BENIGN_ELL[q])
    t = rng.uniform(x.min(), x.max(), M)
    # the state-space path's derivatives are checked on every layout in test_exactness.py
    for method in ("kp",):
        post = api.condition(x, y, q, BENIGN_ELL[q], 1.0, 0.05, method=method)
        for k in range(1, 2 * q + 1):
            got = api.mean_derivative(post, t, k)
            want, _ = dense.posterior(jnp.asarray(x), jnp.asarray(y), jnp.asarray(t), q,
                                      BENIGN_ELL[q], 1.0, 0.05, t_order=k)
            assert _rel(got, want) <= 1e-7, (method, k)
    with pytest.raises(ValueError, match="order must be"):
        api.mean_derivative(post, t, 2 * q + 1)


@pytest.mark.parametrize("q", [1])
def test_derivative_observations_state_space(rng, q):
    n = N
    x = np.sort(rng.uniform(0, 40, n))
    order = rng.integers(0, 2, n)
    x[1::7] = x[0::7][: len(x[1::7])]  # value and derivative at the same input
    y = np.where(order == 0, np.sin(x), np.cos(x)) + 0.05 * rng.normal(size=n)
    args = (x, y, q, 1.2, 1.0, 0.01)
    l_ss = api.log_marginal_likelihood(*args, order=order)
    l_d = api.log_marginal_likelihood(*args, method="dense", order=order)
    assert _rel(l_ss, l_d) <= 1e-8
    t = rng.uniform(0, 40, M)
    m, v = api.predict(api.condition(*args, order=order), t, return_var=True)
    m_d, v_d = dense.posterior(jnp.asarray(x), jnp.asarray(y), jnp.asarray(t), q, 1.2, 1.0, 0.01,
                               order=jnp.asarray(order))
    assert _rel(m, m_d) <= 1e-8 and _rel(v, v_d, 1.0) <= 1e-8
    with pytest.raises(ValueError, match="derivative observations"):
        api.log_marginal_likelihood(*args, method="kp", order=order)


def test_fit_with_optax_increases_likelihood(rng):
    x = np.sort(rng.uniform(0, 40, 200))
    f = np.sin(x / 2.0)
    y = f + 0.1 * rng.normal(size=200)
    res = api.fit(x, y, 1, lengthscale=0.5, variance=0.3, noise=0.5, steps=150,
                  learning_rate=0.1)
    assert res.losses[-1] < res.losses[0] - 30
    assert 0.003 < float(res.noise) < 0.03  # true noise variance 0.01
    assert 1.0 < float(res.lengthscale) < 10.0


def test_duplicates(rng):
    x = np.repeat(np.arange(20.0), 2)
    y = np.sin(x) + 0.1 * rng.normal(size=40)
    with pytest.raises(ValueError, match="duplicate"):
        api.log_marginal_likelihood(x, y, 1, 2.0, 1.0, 0.1, method="kp")
    with pytest.raises(ValueError, match="noise == 0"):
        api.log_marginal_likelihood(x, y, 1, 2.0, 1.0, 0.0)
    l = api.log_marginal_likelihood(x, y, 1, 2.0, 1.0, 0.1)      # auto -> state space
    assert _rel(l, api.log_marginal_likelihood(x, y, 1, 2.0, 1.0, 0.1, method="dense")) <= 1e-10


def test_bad_inputs():
    x = np.linspace(0, 60, N)
    y = np.sin(x)
    with pytest.raises(ValueError, match="y must have the shape of x"):
        api.log_marginal_likelihood(x, y[:-1], 1, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="x contains NaN"):
        api.log_marginal_likelihood(np.where(x > 5, np.nan, x), y, 1, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="y contains NaN"):
        api.condition(x, np.where(x > 5, np.inf, y), 1, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="lengthscale must be finite and > 0"):
        api.log_marginal_likelihood(x, y, 1, 0.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="variance must be finite and > 0"):
        api.log_marginal_likelihood(x, y, 1, 1.0, -1.0, 0.1)
    with pytest.raises(ValueError, match="noise must be finite and >= 0"):
        api.log_marginal_likelihood(x, y, 1, 1.0, 1.0, -0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        api.log_marginal_likelihood(x, y, 1, 1.0, 1.0, 0.1, method="cg")
    with pytest.raises(ValueError, match="q must be"):
        api.log_marginal_likelihood(x, y, 5, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="x must be 1-D"):
        api.log_marginal_likelihood(x[:, None], y[:, None], 1, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="n >= 2q\\+3"):
        api.log_marginal_likelihood(x[:4], y[:4], 1, 1.0, 1.0, 0.1, method="kp")
    post = api.condition(x, y, 1, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="t contains NaN"):
        api.predict(post, np.array([1.0, np.nan]))


def test_float32_warns_and_upcasts():
    x = np.linspace(0, 60, N)
    y = np.sin(x)
    want = api.log_marginal_likelihood(x, y, 1, 1.0, 1.0, 0.1)
    with pytest.warns(UserWarning, match="upcasting to float64"):
        got = api.log_marginal_likelihood(x.astype(np.float32), y, 1, 1.0, 1.0, 0.1)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, api.log_marginal_likelihood(
        x.astype(np.float32).astype(np.float64), y, 1, 1.0, 1.0, 0.1), rtol=1e-14)
    assert abs(float(got) - float(want)) < 1e-3


def test_x64_disabled_is_a_clear_error():
    x = np.linspace(0, 60, N)
    jax.config.update("jax_enable_x64", False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(TypeError, match="jax_enable_x64"):
                api.log_marginal_likelihood(x, np.sin(x), 1, 1.0, 1.0, 0.1)
    finally:
        jax.config.update("jax_enable_x64", True)
