"""GTSP schedules and mask updates (the official GTSP code's schedules), host-side numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphs import gtsp


def _params():
    rng = np.random.default_rng(0)
    return {"a": {"kernel": jnp.asarray(rng.normal(size=(8, 6))),
                  "bias": jnp.asarray(rng.normal(size=(6,)))},
            "b": {"kernel": jnp.asarray(rng.normal(size=(6, 5)))}}


def test_cubic_schedule_and_death_rate():
    assert gtsp.cubic_density(0, 10, 0.25) == 1.0
    assert gtsp.cubic_density(10, 10, 0.25) == pytest.approx(0.25)
    d = [gtsp.cubic_density(i, 10, 0.5) for i in range(11)]
    assert all(x >= y for x, y in zip(d, d[1:]))
    assert gtsp.cosine_death_rate(0, 100) == pytest.approx(0.5)
    assert gtsp.cosine_death_rate(100, 100) == pytest.approx(0.005)
    ev = gtsp.event_steps(1000, gtsp.GTSPConfig(update_every=200))
    assert ev == [200, 400, 600, 800]
    with pytest.raises(ValueError, match="sparsity"):
        gtsp.GTSPConfig(head=1.0)
    with pytest.raises(ValueError, match="mode"):
        gtsp.GTSPConfig(mode="exact")


def test_global_magnitude_density_and_threshold():
    p = _params()
    m = gtsp.global_magnitude_masks(p, gtsp.ones_masks(p), 0.5)
    total = 8 * 6 + 6 * 5
    kept = int(m["a"]["kernel"].sum() + m["b"]["kernel"].sum())
    assert abs(kept - round(0.5 * total)) <= 1
    assert float(m["a"]["bias"].min()) == 1.0                        # biases stay dense
    thr = min(float(jnp.abs(p[k]["kernel"])[m[k]["kernel"] > 0].min()) for k in "ab")
    dropped = max(float(jnp.abs(p[k]["kernel"])[m[k]["kernel"] == 0].max()) for k in "ab")
    assert thr >= dropped                                             # one global threshold
    assert gtsp.density(m, p) == pytest.approx(kept / total)


def test_death_regrowth_keeps_nnz_and_picks_extremes():
    p = _params()
    m = gtsp.global_magnitude_masks(p, gtsp.ones_masks(p), 0.5)
    eff = gtsp.apply_masks(p, m)
    g = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(1).normal(size=x.shape)), p)
    new, grown = gtsp.death_regrowth(eff, m, g, 0.25)
    for k in "ab":
        assert int(new[k]["kernel"].sum()) == int(m[k]["kernel"].sum())
        killed = (m[k]["kernel"] > 0) & (new[k]["kernel"] == 0)
        reg = np.asarray(grown[k]["kernel"]) > 0
        assert killed.sum() == reg.sum() == np.ceil(0.25 * float(m[k]["kernel"].sum()))
        # regrown positions were dead before and have the largest |grad| among dead ones
        dead = np.asarray(m[k]["kernel"]) == 0
        assert (dead[reg]).all()
        ga = np.abs(np.asarray(g[k]["kernel"]))
        assert ga[reg].min() >= ga[dead & ~reg].max()


def test_head_death_regrowth_and_initial_sets():
    rng = np.random.default_rng(0)
    act = gtsp.initial_heads(3, 4, 0.5, rng, "faithful")
    assert act.sum(1).tolist() == [2, 2, 2]
    assert gtsp.initial_heads(2, 4, 0.25, rng, "clean")[:, 0].tolist() == [1, 1]
    score = np.array([[0.1, 5.0, 0, 0], [3.0, 0.2, 0, 0], [1, 1, 0, 0]], np.float32)
    gnorm = np.array([[0, 0, 9.0, 1.0], [0, 0, 1.0, 9.0], [0, 0, 0, 0]], np.float32)
    act = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
    new = gtsp.head_death_regrowth(act, score, gnorm, 0.5)
    assert new.tolist() == [[0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]]


def test_structured_units_and_layer_removal():
    scores = np.array([[1.0, 5.0, 3.0], [0.1, 0.2, 0.3]])
    m = gtsp.structured_unit_masks(scores, np.ones((2, 3)), 0.5)
    assert m.tolist() == [[1, 1, 1], [0, 0, 1]]                     # global + >= 1 per layer
    m2 = gtsp.structured_unit_masks(scores * 0 + 1, m, 1.0)
    assert (m2 <= m).all()                                          # monotone
    assert gtsp.layers_to_remove(np.array([3.0, 1.0, 2.0, 5.0]), 0.5).tolist() == [1, 0, 0, 1]
    assert gtsp.layers_to_remove(np.array([1.0, 2.0]), 0.75).sum() == 1
