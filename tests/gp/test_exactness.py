"""The default method is exact on every 1-D input layout: posterior mean, its derivatives up to
order 2q and the posterior variance against a dense float64 Matérn GP written independently
here (numpy/scipy; the kernel and its derivatives from the closed form
``K(r) = s2 exp(-z) P_q(z)``, ``z = lam |r|``, ``lam = sqrt(2q+1) / ell``).

Tolerances: mean and derivatives <= 1e-8 relative to the largest reference value, variance
<= 1e-8 of the prior variance. Layouts (lengthscale units): uniform grid, random, pairs 1e-3
apart, tight clusters (points 5e-5 apart, 12-19 between clusters), near-duplicates 1e-6 apart,
a cloud with spacing ~5e-6, and two groups 1e4 apart. The packet path is not exact on several
of them; forcing it there must warn with the measured residual.
"""
import math
import warnings

import jax
import numpy as np
import pytest
import scipy.linalg as sl

from gp import api

N, M = 240, 60
ELL, S2, NOISE = 1.0, 1.0, 1e-2
LAYOUTS = ("uniform", "random", "pairs", "clusters", "near_duplicates", "spacing_5e-6",
           "huge_gaps")


def _layout(kind, rng):
    if kind == "uniform":
        x = np.arange(N) * 0.5
    elif kind == "random":
        x = rng.uniform(0, N / 2, N)
    elif kind == "pairs":
        b = rng.uniform(0, N, N // 2)
        x = np.concatenate([b, b + 1e-3])
    elif kind == "clusters":
        sizes = np.resize([2, 3, 4, 5, 6], 48)                      # 48 clusters, 192 points
        sizes[-1] += N - sizes.sum()
        centres = np.cumsum(rng.uniform(12, 19, sizes.size))
        x = np.concatenate([c + 5e-5 * np.arange(k) for c, k in zip(centres, sizes)])
    elif kind == "near_duplicates":
        b = rng.uniform(0, N, N // 2)
        x = np.concatenate([b, b + 1e-6])
    elif kind == "spacing_5e-6":
        x = np.cumsum(rng.uniform(0.5, 1.5, N)) * 5e-6
    else:  # huge_gaps
        x = rng.uniform(0, 30, N)
        x[N // 2:] += 1e4
    return rng.permutation(x * ELL)                                  # unsorted on purpose


def _poly(q):
    """Coefficients (ascending) of P_q."""
    return np.array([math.factorial(q) / math.factorial(2 * q) * math.factorial(2 * q - k)
                     / (math.factorial(k) * math.factorial(q - k)) * 2 ** k for k in range(q + 1)])


def _kern_deriv(r, q, m):
    """d^m/dr^m of K(r) for m <= 2q: for r > 0, d/dr [exp(-z) p(z)] = lam exp(-z) (p' - p)(z);
    K is even, so K^(m)(r) = (-1)^m K^(m)(|r|)."""
    lam = math.sqrt(2 * q + 1) / ELL
    p = np.polynomial.Polynomial(_poly(q))
    for _ in range(m):
        p = p.deriv() - p
    z = lam * np.abs(r)
    sign = np.sign(r) if m % 2 else 1.0   # odd derivatives vanish at r = 0 (m <= 2q)
    return S2 * lam ** m * sign * np.exp(-z) * p(z)


def _dense(x, y, t, q, orders):
    K = _kern_deriv(x[:, None] - x[None, :], q, 0) + NOISE * np.eye(x.size)
    c = sl.cho_factor(K, lower=True)
    alpha = sl.cho_solve(c, y)
    means = {k: _kern_deriv(t[:, None] - x[None, :], q, k) @ alpha for k in orders}
    V = sl.solve_triangular(c[0], _kern_deriv(x[:, None] - t[None, :], q, 0), lower=True)
    return means, S2 - (V * V).sum(axis=0)


def _problem(kind, seed=0):
    rng = np.random.default_rng(seed)
    x = _layout(kind, rng)
    y = np.sin(1.3 * x / ELL) + 0.5 * np.cos(0.21 * x / ELL) + 0.1 * rng.normal(size=N)
    xs = np.sort(x)
    t = np.concatenate([rng.uniform(xs[0] - 2 * ELL, xs[-1] + 2 * ELL, M - 30),
                        xs[::16] + 2e-5 * ELL, xs[5::16]])           # inside clusters, at data
    return x, y, t


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("q", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_default_is_exact_on_every_layout(kind, q):
    x, y, t = _problem(kind)
    orders = range(2 * q + 1)
    want, v_want = _dense(x, y, t, q, orders)
    post = api.condition(x, y, q, ELL, S2, NOISE)
    m, v = api.predict(post, t, return_var=True)
    assert _rel(m, want[0]) <= 1e-8
    assert np.abs(np.asarray(v) - v_want).max() / S2 <= 1e-8
    for k in orders[1:]:
        assert _rel(api.mean_derivative(post, t, k), want[k]) <= 1e-8, k


@pytest.mark.parametrize("kind,q", [("clusters", 3), ("clusters", 2), ("spacing_5e-6", 1),
                                    ("near_duplicates", 3)])
def test_forced_packets_warn_with_measured_residual(kind, q):
    x, y, t = _problem(kind)
    value = r"measured relative residual .* = (nan|[0-9.]+e[-+]\d+)"
    with pytest.warns(RuntimeWarning, match=value):
        post = api.condition(x, y, q, ELL, S2, NOISE, method="kp")
    assert not float(post.kp_residual) <= api.KP_RESIDUAL_TOL
    if q == 3 and kind == "clusters":   # the likelihood warns too (one case: a compile per q)
        with pytest.warns(RuntimeWarning, match="measured relative residual"):
            api.log_marginal_likelihood(x, y, q, ELL, S2, NOISE, method="kp")


@pytest.mark.parametrize("q", [1, 3])
def test_forced_packets_accurate_layout_does_not_warn(q):
    x, y, t = _problem("uniform")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post = api.condition(x, y, q, ELL, S2, NOISE, method="kp")
    assert float(post.kp_residual) <= api.KP_RESIDUAL_TOL
    assert _rel(api.predict(post, t), _dense(x, y, t, q, [0])[0][0]) <= 1e-8


def test_traced_unsorted_input_is_sorted_in_the_program():
    """Inside jit (x traced) unsorted input is sorted by a host callback: same value, and the
    gradient in x and y flows through the gather."""
    x, y, _ = _problem("random")
    x, y = x[:40], y[:40]

    def lml(x, y, method):
        return api.log_marginal_likelihood(x, y, 1, ELL, S2, NOISE, method=method)

    f = jax.jit(jax.value_and_grad(lambda x, y: lml(x, y, "auto"), argnums=(0, 1)))
    v, g = f(x, y)
    v_d, g_d = jax.value_and_grad(lambda x, y: lml(x, y, "dense"), argnums=(0, 1))(x, y)
    o = np.argsort(x)
    assert abs(float(v) - float(v_d)) <= 1e-10 * abs(float(v_d))
    assert abs(float(f(x[o], y[o])[0]) - float(v_d)) <= 1e-10 * abs(float(v_d))
    for a, b in zip(g, g_d):
        assert _rel(a, b) <= 1e-8


def test_argsort_sorts_every_layout(rng):
    """``api.argsort`` (bucket pass + merge sort, or numpy's sort as fallback) returns a
    permutation that sorts: spread-out inputs (the bucket pass), duplicates, a dense cluster
    (fallback on the bucket load), all-equal values, a span beyond float64, a short array."""
    n = 20_000
    cases = {"uniform": rng.uniform(0.0, 2e3, n), "normal": rng.normal(size=n),
             "duplicates": np.round(rng.uniform(0.0, 50.0, n), 1),
             "cluster": np.concatenate([rng.normal(0.0, 1e-6, n // 2), rng.uniform(0, 1, n // 2)]),
             "all equal": np.full(n, 3.0), "huge span": rng.uniform(-1.0, 1.0, n) * 1e308,
             "short": rng.uniform(size=100)}
    for name, x in cases.items():
        idx = api.argsort(x)
        assert np.array_equal(np.sort(idx), np.arange(x.size)), name
        assert np.all(np.diff(x[idx]) >= 0), name
        # the host sort's companions: x and the arrays sorted along with it, gathered by idx
        y, k = rng.normal(size=x.size), np.arange(x.size)[::-1].copy()
        got = api._sort(x, y, k)
        assert all(np.array_equal(g, w) for g, w in zip(got, (idx, x[idx], y[idx], k[idx]))), name


def test_traced_unsorted_long_input_matches_sorted_value(rng):
    """The traced sort (host callback) on an input long enough for the bucket pass."""
    n = 5000
    x = rng.uniform(0.0, n / 10.0, n)
    y = np.sin(x) + 0.1 * rng.normal(size=n)
    o = np.argsort(x)
    want = api.log_marginal_likelihood(x[o], y[o], 1, ELL, S2, NOISE)
    got = jax.jit(lambda x, y: api.log_marginal_likelihood(x, y, 1, ELL, S2, NOISE))(x, y)
    assert abs(float(got) - float(want)) <= 1e-10 * abs(float(want))


def test_sorted_input_is_not_resorted(monkeypatch):
    """Already-sorted concrete input skips the sort (an O(n) check on the host)."""
    x, y, _ = _problem("random")
    want = api.log_marginal_likelihood(x, y, 1, ELL, S2, NOISE)
    order = np.argsort(x)

    def no_sort(*a, **k):
        raise AssertionError("sorted input was sorted again")

    monkeypatch.setattr(api, "_sort", no_sort)          # behind argsort and the host sort
    got = api.log_marginal_likelihood(x[order], y[order], 1, ELL, S2, NOISE)
    assert abs(float(got) - float(want)) <= 1e-10 * abs(float(want))
    with pytest.raises(AssertionError, match="sorted again"):
        api.log_marginal_likelihood(x, y, 1, ELL, S2, NOISE)


@pytest.mark.parametrize("method", ["auto", "kp", "dense"])
def test_invalid_values_inside_jit_give_nan(method):
    """Traced values cannot be checked: value, gradient, mean and variance are all NaN."""
    x, y, t = _problem("uniform")
    x, y = np.sort(x)[:40], y[:40]

    @jax.jit
    def run(y, ell, s2, noise):
        lml = api.log_marginal_likelihood(x, y, 1, ell, s2, noise, method=method)
        g = jax.grad(lambda e: api.log_marginal_likelihood(x, y, 1, e, s2, noise,
                                                           method=method))(ell)
        m, v = api.predict(api.condition(x, y, 1, ell, s2, noise, method=method), t[:8],
                           return_var=True)
        return lml, g, m, v

    y_nan = np.where(np.arange(40) == 7, np.nan, y)
    cases = {"negative lengthscale": (y, -ELL, S2, NOISE), "zero variance": (y, ELL, 0.0, NOISE),
             "negative noise": (y, ELL, S2, -NOISE), "NaN in y": (y_nan, ELL, S2, NOISE),
             "NaN lengthscale": (y, np.nan, S2, NOISE)}
    for case, args in cases.items():
        for out in run(*args):
            assert np.all(np.isnan(np.asarray(out))), (method, case)
    assert all(np.all(np.isfinite(np.asarray(o))) for o in run(y, ELL, S2, NOISE))
