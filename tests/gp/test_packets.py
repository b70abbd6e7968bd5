"""Packet construction: null vectors, compact support, band structure, queries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gp import kernels, packets


def _jittered(rng, n, h):
    return np.cumsum(rng.uniform(0.5, 1.5, n)) * h


def _dense(pk, n, q):
    w = 2 * q + 3
    A = np.zeros((n, n))
    Phi = np.zeros((n, n))
    for j in range(n):
        s = int(pk.start[j])
        A[s:s + w, j] = pk.coef[j]
        Phi[s:s + w, j] = pk.phi[j]
    return A, Phi


# one build per q serves both checks below (each build shape compiles anew)
@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda q: f"q{q}")
def built(request):
    q, n = request.param, 30
    x = _jittered(np.random.default_rng(q), n, 0.8)  # lam*h ~ 1: a benign design
    # jitted: the eager build dispatches (and compiles) each small op separately
    build = jax.jit(packets.build, static_argnums=1)
    return q, n, x, build(jnp.asarray(x), q, 1.0, 0.8)


def test_band_structure_and_phi_equals_KA(built):
    q, n, x, pk = built
    A, Phi = _dense(pk, n, q)
    i, j = np.indices((n, n))
    assert np.all(A[np.abs(i - j) > q + 1] == 0)          # bw(A) = q+1
    assert np.all(Phi[np.abs(i - j) > q] == 0)            # bw(Phi) = q (stored)
    K = np.asarray(kernels.matern_cross(x, x, q, 1.0, 0.8))
    KA = K @ A
    scale = np.abs(Phi).max()
    # the true K A vanishes off the band: the packets vanish at every other input
    assert np.abs(KA[np.abs(i - j) > q]).max() <= 1e-10 * scale
    np.testing.assert_allclose(KA, Phi, atol=1e-11 * scale)
    AtPhi = A.T @ Phi
    np.testing.assert_allclose(AtPhi, AtPhi.T, atol=1e-11 * np.abs(AtPhi).max())
    assert np.abs(AtPhi[np.abs(i - j) > 2 * q + 1]).max() <= 1e-11 * np.abs(AtPhi).max()


def test_q0_closed_form(rng):
    x = _jittered(rng, 12, 0.4)
    lam = kernels.rate(0, 1.0)
    pk = packets.build(jnp.asarray(x), 0, 1.0, 1.0)
    for j in range(1, 11):
        h1, h2 = x[j] - x[j - 1], x[j + 1] - x[j]
        want = np.array([np.sinh(lam * h2), -np.sinh(lam * (h1 + h2)), np.sinh(lam * h1)])
        got = np.asarray(pk.coef[j])
        ratio = got / want
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
        # phi(x_j) = -2 s2 sinh(lam h1) sinh(lam h2) for the coefficients above
        np.testing.assert_allclose(pk.phi[j, 1] / ratio[0],
                                   -2 * np.sinh(lam * h1) * np.sinh(lam * h2), rtol=1e-12)


def test_packets_vanish_outside_windows(built):
    q, n, x, pk = built
    A, _ = _dense(pk, n, q)
    t = np.linspace(x[0] - 3, x[-1] + 3, 1001)
    dense_phi = np.asarray(kernels.matern_cross(t, x, q, 1.0, 0.8)) @ A   # [t, j]
    w = 2 * q + 3
    for j in range(n):
        s = int(pk.start[j])
        act = np.nonzero(A[:, j])[0]
        lo, hi = x[act.min()], x[act.max()]
        outside = np.ones_like(t, bool)
        outside &= (t <= lo) | (t >= hi)
        if j <= q:       # left boundary packets live on to the left (no data there)
            outside &= t >= hi
        if j >= n - q - 1:
            outside &= t <= lo
        assert act.min() >= s and act.max() < s + w
        peak = np.abs(dense_phi[:, j]).max()
        assert np.abs(dense_phi[outside, j]).max() <= 1e-10 * peak
    # the O(log n) query reproduces the dense rows phi(t) = A^T k_t, inside and outside the data
    cols, vals = packets.evaluate(pk, jnp.asarray(t), q)
    est = np.zeros_like(dense_phi)
    np.add.at(est, (np.repeat(np.arange(len(t)), cols.shape[1]), np.asarray(cols).ravel()),
              np.asarray(vals).ravel())
    np.testing.assert_allclose(est, dense_phi, atol=1e-12 * np.abs(dense_phi).max())
    assert cols.shape[1] == 2 * q + 2


@pytest.mark.parametrize("q", [1, 2])
def test_stable_construction_beats_naive_at_small_lam_h(q):
    """At lam*h = 0.01 the naive float64 sum loses ~(lam h)^-(2q+1) digits;
    the one-sided series construction stays accurate (reference: 50-digit mpmath)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    n = 2 * q + 5
    lam = kernels.rate(q, 1.0)
    x = np.arange(n) * 0.01 / lam + np.linspace(0, 1e-4 / lam, n) ** 2
    pk = packets.build(jnp.asarray(x), q, 1.0, 1.0)
    j = q + 1  # an interior column
    s = int(pk.start[j])
    a = [mpmath.mpf(float(v)) for v in pk.coef[j]]
    c = kernels.poly_coeffs(q)

    def K(r):
        z = abs(mpmath.mpf(lam) * r)
        return mpmath.exp(-z) * sum(mpmath.mpf(ck) * z ** k for k, ck in enumerate(c))

    xm = [mpmath.mpf(float(v)) for v in x[s:s + 2 * q + 3]]
    cen = (xm[0] + xm[-1]) / 2
    u = [mpmath.mpf(lam) * (v - cen) for v in xm]
    S = mpmath.matrix(2 * q + 3, 2 * q + 3)
    for s_ in range(q + 1):
        for l in range(2 * q + 3):
            S[s_, l] = u[l] ** s_ * mpmath.exp(-u[l])
            S[q + 1 + s_, l] = u[l] ** s_ * mpmath.exp(u[l])
    for l in range(2 * q + 3):
        S[2 * q + 2, l] = (-1) ** l
    rhs = mpmath.matrix([0] * (2 * q + 2) + [1])
    a = mpmath.lu_solve(S, rhs)
    exact = np.array([float(sum(a[l] * K(xm[p] - xm[l]) for l in range(2 * q + 3)))
                      for p in range(2 * q + 3)])
    ours = np.asarray(pk.phi[j])
    np.testing.assert_allclose(ours / np.linalg.norm(ours), exact / np.linalg.norm(exact),
                               atol=1e-11)
    # the naive float64 recipe (exponential rows, direct sum) is far worse here
    uf = np.array([float(v) for v in u])
    Sf = np.array([[float(S[r, l]) for l in range(2 * q + 3)] for r in range(2 * q + 3)])
    af = np.linalg.solve(Sf, np.r_[np.zeros(2 * q + 2), 1.0])
    Kf = np.asarray(kernels.matern_unit(uf[:, None] - uf[None, :], q))
    naive = Kf @ af
    err_naive = np.abs(naive / np.linalg.norm(naive) - exact / np.linalg.norm(exact)).max()
    err_ours = np.abs(ours / np.linalg.norm(ours) - exact / np.linalg.norm(exact)).max()
    assert err_naive > 100 * max(err_ours, 1e-16)


def test_build_jits_and_vmaps_over_lengthscale(rng):
    x = jnp.asarray(_jittered(rng, 25, 0.5))
    f = jax.jit(jax.vmap(lambda ell: packets.build(x, 2, ell, 1.0).phi))
    out = f(jnp.array([0.5, 1.0, 3.0]))
    assert out.shape == (3, 25, 7)
    np.testing.assert_allclose(out[1], packets.build(x, 2, 1.0, 1.0).phi, rtol=1e-10)


def test_too_few_points():
    with pytest.raises(ValueError, match="n >= 2q\\+3"):
        packets.build(jnp.arange(4.0), 1, 1.0, 1.0)


def test_chunked_interior_build_equals_one_block(monkeypatch):
    # large n builds the interior in rematerialised chunks (memory); same values and gradient
    q, n = 1, 60
    x = jnp.asarray(_jittered(np.random.default_rng(5), n, 0.7))

    def run():
        def total(ell):
            pk = packets.build(x, q, ell, 1.3)
            return jnp.sum(pk.phi ** 2 * jnp.arange(n)[:, None]) + jnp.sum(pk.coef)
        pk = jax.jit(packets.build, static_argnums=1)(x, q, 0.9, 1.3)
        return pk, jax.jit(jax.grad(total))(0.9)

    one_pk, one_g = run()
    monkeypatch.setattr(packets, "BUILD_CHUNK", 16)  # 55 interior columns -> 4 chunks, padded
    chunk_pk, chunk_g = run()
    np.testing.assert_allclose(chunk_pk.coef, one_pk.coef, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunk_pk.phi, one_pk.phi, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunk_g, one_g, rtol=1e-10)


def test_forward_mode_lam_derivative_equals_reverse_mode(monkeypatch):
    # build() differentiates the packets in the rate by one JVP (custom VJP); the inputs keep
    # reverse mode. Both must equal plain reverse-mode autodiff through the construction.
    q, n = 1, 30
    x = jnp.asarray(_jittered(np.random.default_rng(6), n, 0.5))

    def total(x, ell, s2):
        pk = packets.build(x, q, ell, s2)
        return jnp.sum(pk.phi ** 3 * jnp.arange(n)[:, None]) + jnp.sum(jnp.sin(pk.coef))

    grad = jax.jit(jax.grad(total, argnums=(0, 1, 2)))
    got = grad(x, 0.8, 1.3)
    monkeypatch.setattr(packets, "_reverse_by_forward_in_lam", lambda block: block)
    want = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(x, 0.8, 1.3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * np.abs(w).max())
    vm = jax.jit(jax.vmap(lambda e: jax.grad(total, argnums=1)(x, e, 1.3)))(jnp.array([0.6, 0.8]))
    np.testing.assert_allclose(vm[1], want[1], rtol=1e-12)
