import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lmx.merge import methods as M
from lmx.merge import tree as T

TAUS = [(5, -1, 2, 0.5, -3), (-6, 4, 1, -0.2, -2), (3, 0.1, -4, 1, 0.3)]


def _models(k=3, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    shapes = {"a": (6, 4), "b": (4,), "c": (3, 2, 2)}
    make = lambda: {n: jnp.asarray(r.normal(size=s), dtype) for n, s in shapes.items()}
    return make(), [make() for _ in range(k)]


def _hand():
    base = {"w": jnp.zeros(5)}
    return base, [{"w": jnp.asarray(t, jnp.float32)} for t in TAUS]


def test_lambda_zero_returns_base_bit_exactly():
    base, fts = _models()
    out = M.task_arithmetic(base, T.task_vectors(base, fts), 0.0)
    for n in base:
        np.testing.assert_array_equal(np.asarray(out[n]).view(np.uint32), np.asarray(base[n]).view(np.uint32))


def test_one_task_lambda_one_returns_finetuned():
    base, fts = _models(k=1)
    out = M.task_arithmetic(base, T.task_vectors(base, fts), 1.0)
    for n in base:
        np.testing.assert_allclose(out[n], fts[0][n], rtol=0, atol=1e-6)


def test_lambda_one_over_k_equals_average():
    base, fts = _models(k=4)
    ta = M.task_arithmetic(base, T.task_vectors(base, fts), 0.25)
    avg = M.average(fts)
    for n in base:
        np.testing.assert_allclose(ta[n], avg[n], rtol=0, atol=1e-6)


def test_ties_hand_example_exact_topk():
    base, tvs = _hand()
    out = M.ties_merging(base, tvs, k=0.4, lam=1.0, merge="sum", topk="exact")
    np.testing.assert_allclose(out["w"], [8, 4, -4, 0, -3])
    out = M.ties_merging(base, tvs, k=0.4, lam=1.0, merge="mean", topk="exact")
    np.testing.assert_allclose(out["w"], [4, 4, -4, 0, -3])
    np.testing.assert_allclose(M.task_arithmetic(base, tvs, 1.0)["w"], [2, 3.1, -1, 1.3, -4.7], atol=1e-6)


def test_ties_hand_example_reference_topk_keeps_floor_kd_plus_one():
    base, tvs = _hand()
    out, stats = M.merge_tree(M.Ties(k=40, lam=1.0, merge="sum"), base, tvs, return_stats=True)
    np.testing.assert_allclose(out["w"], [8, 4, -4, 1, -5])
    assert stats["kept_fraction"] == pytest.approx(9 / 15)
    out = M.ties_merging(base, tvs, k=0.4, lam=1.0, merge="mean")
    np.testing.assert_allclose(out["w"], [4, 4, -4, 1, -2.5])


def test_ties_keep_all_with_agreeing_signs_is_plain_sum_and_mean():
    base = {"w": jnp.zeros(4)}
    tvs = [{"w": jnp.asarray([1.0, -2, 3, 0.5])}, {"w": jnp.asarray([2.0, -1, 1, 0.5])}]
    np.testing.assert_allclose(M.ties_merging(base, tvs, k=1.0, lam=1.0)["w"], [3, -3, 4, 1])
    np.testing.assert_allclose(M.ties_merging(base, tvs, k=1.0, lam=1.0, merge="mean")["w"],
                               [1.5, -1.5, 2, 0.5])


def test_ties_zero_sum_takes_majority_sign():
    # column 2 sums to 0: the majority sign over the model (+) selects the positive entry
    base = {"w": jnp.zeros(3)}
    tvs = [{"w": jnp.asarray([1.0, 1.0, 2.0])}, {"w": jnp.asarray([1.0, 1.0, -2.0])}]
    np.testing.assert_allclose(M.ties_merging(base, tvs, k=1.0, lam=1.0)["w"], [2, 2, 2])
    neg = [{"w": -t["w"]} for t in tvs]
    np.testing.assert_allclose(M.ties_merging(base, neg, k=1.0, lam=1.0)["w"], [-2, -2, -2])


def test_ties_global_and_per_leaf_trimming_differ():
    base = {"big": jnp.zeros(4), "small": jnp.zeros(4)}
    tvs = [{"big": jnp.asarray([10.0, 20, 30, 40]), "small": jnp.asarray([0.1, 0.2, 0.3, 0.4])}]
    g = M.ties_merging(base, tvs, k=0.5, lam=1.0, topk="exact", scope="global")
    p = M.ties_merging(base, tvs, k=0.5, lam=1.0, topk="exact", scope="per_leaf")
    np.testing.assert_allclose(g["big"], [10, 20, 30, 40])  # global top 4 of 8 are all "big"
    np.testing.assert_allclose(g["small"], [0, 0, 0, 0])
    np.testing.assert_allclose(p["big"], [0, 0, 30, 40])
    np.testing.assert_allclose(p["small"], [0, 0, 0.3, 0.4])


def test_ties_bad_arguments_raise():
    with pytest.raises(ValueError, match="k: keep fraction"):
        M.Ties(k=150)
    with pytest.raises(ValueError, match="merge"):
        M.Ties(merge="median")


def test_dare_p_zero_is_identity_and_mean_over_seeds_recovers_tau():
    base, fts = _models(k=2)
    tvs = T.task_vectors(base, fts)
    ta = M.task_arithmetic(base, tvs, 0.3)
    d0 = M.dare(base, tvs, p=0.0, lam=0.3)
    for n in base:
        np.testing.assert_array_equal(d0[n], ta[n])
    outs = np.stack([M.dare(base, tvs, p=0.5, lam=0.3, seed=s)["a"] for s in range(25)])
    assert not np.allclose(outs[0], ta["a"])
    # unbiased: the mean over seeds is within 5 standard errors of task arithmetic
    se = outs.std(0) / np.sqrt(len(outs))
    assert np.all(np.abs(outs.mean(0) - ta["a"]) <= 5 * se + 1e-6)
    with pytest.raises(ValueError, match="p: drop probability"):
        M.Dare(p=1.0)


def test_regmean_alpha_one_is_least_squares():
    r = np.random.default_rng(0)
    xs = [r.normal(size=(20, 5)).astype(np.float32) for _ in range(3)]
    ws = [r.normal(size=(5, 3)).astype(np.float32) for _ in range(3)]
    models = [{"lin": jnp.asarray(w), "bias": jnp.asarray(r.normal(size=3), jnp.float32)} for w in ws]
    grams = [{"lin": M.input_gram(x)} for x in xs]
    out = M.regmean(models, grams, alpha=1.0)
    X = np.concatenate(xs)
    Y = np.concatenate([x @ w for x, w in zip(xs, ws)])
    np.testing.assert_allclose(out["lin"], np.linalg.lstsq(X, Y, rcond=None)[0], atol=2e-4)
    np.testing.assert_allclose(out["bias"], np.mean([m["bias"] for m in models], 0), atol=1e-6)
    same = M.regmean(models, [grams[0]] * 3, alpha=0.5)
    np.testing.assert_allclose(same["lin"], np.mean(ws, 0), atol=2e-4)
    with pytest.raises(ValueError, match=r"grams\[1\]\['lin'\]: expected shape \(5, 5\)"):
        M.regmean(models, [grams[0], {"lin": jnp.eye(4)}, grams[2]])


def test_fisher_equal_fishers_average_and_one_hot_selects_model():
    base, fts = _models(k=3)
    ones = [jax.tree_util.tree_map(jnp.ones_like, m) for m in fts]
    out = M.fisher_merging(fts, ones)
    for n in base:
        np.testing.assert_allclose(out[n], np.mean([m[n] for m in fts], 0), atol=1e-6)
    zero = [jax.tree_util.tree_map(jnp.zeros_like, m) for m in fts]
    zero[1]["b"] = zero[1]["b"].at[2].set(1.0)
    sel = M.fisher_merging(fts, zero, normalize=False, floor=1e-12)
    np.testing.assert_allclose(sel["b"][2], fts[1]["b"][2], rtol=1e-5)


def test_task_order_permutation_invariance():
    base, fts = _models(k=3)
    tvs = T.task_vectors(base, fts)
    perm = [2, 0, 1]
    for fn in (lambda t: M.task_arithmetic(base, t, 0.3), lambda t: M.ties_merging(base, t)):
        a, b = fn(tvs), fn([tvs[i] for i in perm])
        for n in base:
            np.testing.assert_allclose(a[n], b[n], atol=1e-6)
    a, b = M.average(fts), M.average([fts[i] for i in perm])
    np.testing.assert_allclose(a["a"], b["a"], atol=1e-6)


def test_bf16_inputs_merge_in_float32_and_cast_back():
    base, fts = _models(k=2, dtype=jnp.bfloat16)
    tvs = T.task_vectors(base, fts)
    out = M.task_arithmetic(base, tvs, 0.3)
    assert out["a"].dtype == jnp.bfloat16
    want = (base["a"].astype(jnp.float32) + 0.3 * tvs[0]["a"] + 0.3 * tvs[1]["a"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out["a"], np.float32), np.asarray(want, np.float32))
    assert M.task_arithmetic(base, tvs, 0.3, dtype=jnp.float32)["a"].dtype == jnp.float32


_shapes = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=3)


@settings(max_examples=4, deadline=None)
@given(shapes=_shapes, seed=st.integers(0, 10_000), lam1=st.floats(-1, 1), lam2=st.floats(-1, 1))
def test_property_ta_linear_in_lambda_and_preserves_structure(shapes, seed, lam1, lam2):
    r = np.random.default_rng(seed)
    base = {f"t{i}": jnp.asarray(r.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}
    tvs = [{n: jnp.asarray(r.normal(size=x.shape), jnp.float32) for n, x in base.items()} for _ in range(2)]
    a = M.task_arithmetic(base, tvs, lam1)
    b = M.task_arithmetic(base, tvs, lam2)
    c = M.task_arithmetic(base, tvs, (lam1 + lam2) / 2)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(base)
    for n in base:
        assert a[n].shape == base[n].shape and a[n].dtype == base[n].dtype
        np.testing.assert_allclose(c[n], (a[n] + b[n]) / 2, atol=1e-5)


@settings(max_examples=4, deadline=None)
@given(shapes=_shapes, seed=st.integers(0, 10_000), k=st.floats(0.05, 1.0), merge=st.sampled_from(["sum", "mean"]))
def test_property_ties_support_and_signs(shapes, seed, k, merge):
    r = np.random.default_rng(seed)
    base = {f"t{i}": jnp.zeros(s, jnp.float32) for i, s in enumerate(shapes)}
    tvs = [{n: jnp.asarray(r.normal(size=x.shape), jnp.float32) for n, x in base.items()} for _ in range(3)]
    src = M.TreeSource(base, tvs)
    ties = M.Ties(k=k, lam=1.0, merge=merge)
    thr = np.asarray(ties.thresholds(src, src.names))
    out = M.ties_merging(base, tvs, k=k, lam=1.0, merge=merge)
    for n in base:
        trimmed = np.stack([np.where(np.abs(t[n]) >= thr[i], t[n], 0) for i, t in enumerate(tvs)])
        union = np.any(trimmed != 0, 0)
        o = np.asarray(out[n])
        assert np.all(o[~union] == 0)  # support within the union of trimmed supports
        s = np.sign(trimmed.sum(0))
        assert np.all((o * s)[s != 0] >= 0)  # every kept entry has the elected sign


@pytest.mark.parametrize("d", [7, 10, 100, 1000, 4096])
def test_exact_topk_keeps_exactly_floor_k_d(d):
    # int(0.29 * 100) = 28 in floating point; the exact count must be floor(29/100 * 100) = 29.
    from fractions import Fraction

    tau = np.random.default_rng(d).permutation(np.arange(1, d + 1)).astype(np.float32)
    base = {"w": jnp.zeros(d)}
    for i in range(1, 100):
        k = i / 100
        want = (Fraction(i, 100) * d).numerator // (Fraction(i, 100) * d).denominator
        assert M.exact_keep_count(d, k) == want, (d, k)
        if i > 1:
            assert M.exact_keep_count(d, i) == want, (d, i)  # the same k given in percent
        out = M.ties_merging(base, [{"w": jnp.asarray(tau)}], k=k, lam=1.0, topk="exact",
                             scope="per_leaf")
        assert int(np.count_nonzero(np.asarray(out["w"]))) == want, (d, k)


def test_exact_keep_count_percent_and_bad_input():
    assert M.exact_keep_count(100, 0.29) == 29 and M.exact_keep_count(100, 57) == 57
    assert M.exact_keep_count(100, 0.57) == 57 and M.exact_keep_count(3, 1.0) == 3
    with pytest.raises(ValueError, match="k"):
        M.exact_keep_count(10, 101)
    with pytest.raises(TypeError, match="k"):
        M.exact_keep_count(10, "0.2")
