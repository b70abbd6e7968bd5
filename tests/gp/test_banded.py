import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gp import banded


def _random_band(rng, n, kl, ku):
    B = np.zeros((n, n))
    for i in range(n):
        for j in range(max(0, i - kl), min(n, i + ku + 1)):
            B[i, j] = rng.normal()
    B += np.diag(np.full(n, 0.5))
    rows = np.zeros((n, kl + ku + 1))
    for i in range(n):
        for d in range(kl + ku + 1):
            j = i - kl + d
            if 0 <= j < n:
                rows[i, d] = B[i, j]
    return B, rows


@pytest.mark.parametrize("kl,ku", [(1, 1), (2, 4)])
def test_solve_and_logdet_match_dense(rng, kl, ku):
    B, rows = _random_band(rng, 60, kl, ku)
    y = rng.normal(size=60)
    x, ld = jax.jit(banded.lu_solve_logdet, static_argnums=(2, 3))(jnp.array(rows), jnp.array(y),
                                                                  kl, ku)
    np.testing.assert_allclose(x, np.linalg.solve(B, y), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ld, np.linalg.slogdet(B)[1], rtol=1e-12)
    np.testing.assert_array_equal(banded.dense_from_rows(jnp.array(rows), kl), B)


def test_pivoting_handles_zero_diagonal():
    # a permutation-like matrix: no pivot-free LU exists
    B = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    rows = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    np.testing.assert_array_equal(banded.dense_from_rows(jnp.array(rows), 1), B)
    x, ld = banded.lu_solve_logdet(jnp.array(rows), jnp.array([1.0, 2.0, 3.0]), 1, 1)
    np.testing.assert_allclose(x, np.linalg.solve(B, [1.0, 2.0, 3.0]), rtol=1e-14)
    np.testing.assert_allclose(ld, np.log(abs(np.linalg.det(B))), rtol=1e-14)


def test_gradients_match_dense(rng):
    B, rows = _random_band(rng, 20, 2, 2)
    y = jnp.array(rng.normal(size=20))

    def f_band(r):
        x, ld = banded.lu_solve_logdet(r, y, 2, 2)
        return jnp.sum(x ** 2) + ld

    def f_dense(r):
        M = banded.dense_from_rows(r, 2)
        return jnp.sum(jnp.linalg.solve(M, y) ** 2) + jnp.linalg.slogdet(M)[1]

    g1 = jax.grad(f_band)(jnp.array(rows))
    g2 = jax.grad(f_dense)(jnp.array(rows))
    np.testing.assert_allclose(g1, g2, rtol=1e-8, atol=1e-10)


def test_cols_to_rows_and_matvecs(rng):
    n, w = 12, 5
    start = np.clip(np.arange(n) - 2, 0, n - w)
    vals = jnp.array(rng.normal(size=(n, w)))
    rows = banded.cols_to_rows(vals, start, n, 4, 4)
    M = np.asarray(banded.dense_from_rows(rows, 4))
    for j in range(n):
        np.testing.assert_array_equal(M[start[j]:start[j] + w, j], vals[j])
    v = jnp.array(rng.normal(size=n))
    np.testing.assert_allclose(banded.band_matvec_cols(vals, start, v), M.T @ v, rtol=1e-13)
    np.testing.assert_allclose(banded.band_rmatvec_cols(vals, start, v), M @ v, rtol=1e-13)
    with pytest.raises(ValueError, match="exceeds the band"):
        banded.cols_to_rows(vals, start, n, 1, 1)
    with pytest.raises(ValueError, match="rhs must have shape"):
        banded.lu_solve_logdet(rows, v[:3], 4, 4)
