import numpy as np
import pytest

from lmx.reward.best_of_n import (best_of_n_draws, best_of_n_expectation, best_of_n_kl,
                                  best_of_n_weights)
from lmx.reward.icds import OveroptimizationMonitor, csi, cluster_deviation_score, default_eps


def test_duplicated_reference_latents_score_zero():
    # Every one of 20 SFT points repeated 5x -> 20 clusters sitting on SFT points.
    s = np.random.default_rng(0).normal(size=(20, 16))
    r = np.repeat(s, 5, axis=0)
    out = csi(r, s, eps=1e-6, min_samples=5)
    assert out["n_clusters"] == 20 and out["n_noise"] == 0
    assert out["score"] == pytest.approx(0.0, abs=1e-9)


def test_planted_outlier_cluster_adds_size_times_distance():
    # A tight planted cluster of m points far from the SFT cloud adds exactly m times the distance
    # from its centroid to the nearest SFT point; the in-distribution base score stays small.
    rng = np.random.default_rng(1)
    s = rng.normal(scale=0.3, size=(200, 2))
    r = rng.normal(scale=0.3, size=(200, 2))
    m = 30
    outl = np.array([5.0, 0.0]) + rng.normal(scale=0.01, size=(m, 2))
    eps = default_eps(s)
    base = cluster_deviation_score(r, s, eps=eps)
    both = cluster_deviation_score(np.concatenate([r, outl]), s, eps=eps)
    expected = m * np.min(np.linalg.norm(s - outl.mean(0), axis=1))
    assert both["n_clusters"] == base["n_clusters"] + 1
    np.testing.assert_allclose(both["score"] - base["score"], expected, rtol=1e-9)
    assert base["per_sample"] < 0.1


def test_invariances_and_monotone():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(80, 3))
    r = np.concatenate([rng.normal(size=(60, 3)), 4 + 0.05 * rng.normal(size=(10, 3))])
    eps = default_eps(s)
    ref = cluster_deviation_score(r, s, eps=eps)["score"]
    perm = cluster_deviation_score(r[rng.permutation(len(r))], s[rng.permutation(len(s))], eps=eps)
    np.testing.assert_allclose(perm["score"], ref, rtol=1e-9)
    shift = np.array([3.0, -1.0, 7.0])
    np.testing.assert_allclose(cluster_deviation_score(r + shift, s + shift, eps=eps)["score"], ref,
                               rtol=1e-9)
    np.testing.assert_allclose(cluster_deviation_score(2.5 * r, 2.5 * s, eps=2.5 * eps)["score"],
                               2.5 * ref, rtol=1e-9)
    r_far = r.copy()
    r_far[60:] += 3.0
    assert cluster_deviation_score(r_far, s, eps=eps)["score"] > ref


def test_noise_mode_singleton_catches_isolated_outlier():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(100, 2))
    r = np.concatenate([s[:50] + 1e-3, [[20.0, 0.0]]])
    eps = default_eps(s)
    single = cluster_deviation_score(r, s, eps=eps, noise_mode="singleton")
    drop = cluster_deviation_score(r, s, eps=eps, noise_mode="drop")
    assert single["score"] - drop["score"] > 15.0
    assert cluster_deviation_score(r, s, eps=eps, noise_mode="as_cluster")["score"] > 0


def test_projected_spaces_run():
    rng = np.random.default_rng(4)
    s, r = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    assert cluster_deviation_score(r, s, space="pca:2")["score"] >= 0
    assert cluster_deviation_score(np.zeros((0, 8)), s)["score"] == 0.0


def test_monitor_flags_jump_exactly():
    # Flat series, then x3 at t*: flagged exactly at t*.
    series = [1.0, 1.05, 0.97, 1.02, 0.99, 1.01, 3.1, 3.2, 3.0]
    mon = OveroptimizationMonitor(tau_rel=2.0, tau_abs=0.5, window=3)
    flags = [mon.observe(10 * t, v) for t, v in enumerate(series)]
    assert flags.index(True) == 6 and mon.first_flag_step == 60 and mon.last_good_step == 50
    assert sum(flags) == 1  # later high values are not a further jump (tau_abs)


def test_monitor_on_latents():
    rng = np.random.default_rng(5)
    s = rng.normal(size=(100, 4))
    mon = OveroptimizationMonitor()
    for step in range(4):
        assert not mon.observe_latents(step, s[rng.permutation(100)[:50]] + 0.01, s)
    hacked = np.concatenate([s[:20], 6 + 0.01 * rng.normal(size=(30, 4))])
    assert mon.observe_latents(4, hacked, s)


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        csi(np.ones((3, 2)), np.zeros((0, 2)), eps=1.0)
    with pytest.raises(ValueError, match="K=3"):
        csi(np.ones((3, 3)), np.ones((4, 2)), eps=1.0)
    with pytest.raises(ValueError, match="finite"):
        csi(np.array([[np.nan, 0.0]]), np.ones((4, 2)), eps=1.0)
    with pytest.raises(ValueError, match="noise_mode"):
        csi(np.ones((3, 2)), np.ones((4, 2)), eps=1.0, noise_mode="x")
    with pytest.raises(ValueError, match="steps must increase"):
        m = OveroptimizationMonitor()
        m.observe(1, 1.0)
        m.observe(1, 1.0)


def test_best_of_n_math():
    np.testing.assert_allclose(best_of_n_kl([1, 2, 256]),
                               [0.0, np.log(2) - 0.5, np.log(256) - 255 / 256])
    w = best_of_n_weights(10, 3)
    np.testing.assert_allclose(w.sum(), 1.0)
    assert w[:2].sum() == 0 and w[-1] == pytest.approx(3 / 10)
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(5, 12))
    gold = proxy + rng.normal(size=(5, 12))
    np.testing.assert_allclose(best_of_n_expectation(proxy, gold, 1), gold.mean(1))
    np.testing.assert_allclose(best_of_n_expectation(proxy, gold, 12),
                               gold[np.arange(5), proxy.argmax(1)])
    # the estimator agrees with brute-force subset sampling
    draws = best_of_n_draws(proxy, 4, 20000, seed=1)
    mc = gold[np.arange(5)[:, None], draws].mean(1)
    np.testing.assert_allclose(mc, best_of_n_expectation(proxy, gold, 4), atol=0.03)
    with pytest.raises(ValueError, match="n <= pool"):
        best_of_n_weights(4, 5)
