"""Additive back-fitting vs the dense additive GP posterior mean."""
import jax.numpy as jnp
import numpy as np
import pytest

from gp import additive, kernels


def test_backfitting_converges_to_dense_additive_posterior(rng):
    n, D = 150, 2
    x = rng.uniform(0, 10, (n, D))
    x[:10, 1] = x[10:20, 1]  # repeated coordinate values, as in gridded additive data
    y = np.sin(x[:, 0]) + 0.5 * np.cos(1.3 * x[:, 1]) + 0.1 * rng.normal(size=n)
    qs, ells, s2s, noise = (1, 2), (1.5, 2.0), (1.0, 0.5), 0.01
    fit = additive.backfit(x, y, qs, ells, s2s, noise, sweeps=40)
    Ks = [np.asarray(kernels.matern_cross(x[:, d], x[:, d], qs[d], ells[d], s2s[d]))
          for d in range(D)]
    alpha = np.linalg.solve(sum(Ks) + noise * np.eye(n), y)
    want = np.stack([K @ alpha for K in Ks], axis=1)
    np.testing.assert_allclose(fit.components, want, atol=1e-7 * np.abs(want).max())
    assert float(fit.residual_change[-1]) < 1e-8
    t = rng.uniform(0, 10, (30, D))
    kt = [np.asarray(kernels.matern_cross(t[:, d], x[:, d], qs[d], ells[d], s2s[d]))
          for d in range(D)]
    got = additive.predict(fit, t, qs, ells, s2s, noise, components=True)
    want_t = np.stack([k @ alpha for k in kt], axis=1)
    np.testing.assert_allclose(got, want_t, atol=1e-7 * np.abs(want_t).max())
    np.testing.assert_allclose(additive.predict(fit, t, qs, ells, s2s, noise),
                               want_t.sum(axis=1), atol=1e-7 * np.abs(want_t).max())


def test_additive_bad_input(rng):
    x = rng.uniform(0, 1, (20, 2))
    y = rng.normal(size=20)
    with pytest.raises(ValueError, match="x must be \\[n, D\\]"):
        additive.backfit(x[:, 0], y, (1,), (1.0,), (1.0,), 0.1)
    with pytest.raises(ValueError, match="one entry per input dimension"):
        additive.backfit(x, y, (1,), (1.0,), (1.0,), 0.1)
    with pytest.raises(ValueError, match="noise must be > 0"):
        additive.backfit(x, y, (1, 1), (1.0, 1.0), (1.0, 1.0), 0.0)
    fit = additive.backfit(x, y, (1, 1), (1.0, 1.0), (1.0, 1.0), 0.1, sweeps=2)
    plain = additive.backfit(x, y, (1, 1), (1.0, 1.0), (1.0, 1.0), 0.1, sweeps=2, n_coarse=0)
    assert plain.components.shape == fit.components.shape
    with pytest.raises(ValueError, match="t must be"):
        additive.predict(fit, jnp.zeros((3, 3)), (1, 1), (1.0, 1.0), (1.0, 1.0), 0.1)
