"""Known-answer tests for the ATKD decomposition, split and loss (Zhong et al. 2024,
arXiv:2402.11890; split rule of the official code, github.com/WHU-ZQH/ATKD)."""
import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

import kd_reference as ref
from lmx.kd import atkd_loss, atkd_threshold, kd_loss, target_decomposition


def _logits(seed, shape, scale=3.0, dtype=jnp.float32):
    return (scale * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)


def _labels(seed, b, t, v, n_ignored=2):
    y = np.array(jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, v))
    y[0, 1:1 + n_ignored] = -100
    return jnp.asarray(y)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_decomposition_identity_float64_with_extreme_logits(direction):
    with jax.enable_x64(True):
        zs, zt = _logits(0, (3, 4, 9), dtype=jnp.float64), _logits(1, (3, 4, 9), dtype=jnp.float64)
        g = jax.random.randint(jax.random.PRNGKey(2), (3, 4), 0, 9)
        # Margins of 30-60 nats on the target, where 1 - p_g underflows in probability space.
        zt = zt.at[0].set(zt[0] + 60.0 * jax.nn.one_hot(g[0], 9))
        zs = zs.at[1].set(zs[1] + 30.0 * jax.nn.one_hot(g[1], 9))
        lq, lp = jax.nn.log_softmax(zs), jax.nn.log_softmax(zt)
        tckd, nckd, lu_t, lu_s = jax.jit(target_decomposition, static_argnums=3)(lq, lp, g,
                                                                                 direction)
        if direction == "forward":
            full, weight = kd_loss(zs, zt, shift=False, reduction="sum", kind="fkl"), lu_t
            full_tok = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
        else:
            full_tok, weight = jnp.sum(jnp.exp(lq) * (lq - lp), -1), lu_s
        np.testing.assert_allclose(tckd + jnp.exp(weight) * nckd, full_tok, rtol=1e-12,
                                   atol=1e-14)
        assert bool(jnp.all(jnp.isfinite(nckd))) and float(nckd[0].max()) > 0.1
        r = ref.decomposition(np.exp(np.asarray(lq))[2], np.exp(np.asarray(lp))[2],
                              np.asarray(g)[2], direction)
        np.testing.assert_allclose(tckd[2], r[0], rtol=1e-10)
        np.testing.assert_allclose(nckd[2], r[1], rtol=1e-10)
        if direction == "forward":
            np.testing.assert_allclose(jnp.sum(full_tok), full, rtol=1e-12)


def test_decomposition_identity_float32():
    zs, zt = _logits(3, (8, 31)), _logits(4, (8, 31))
    g = jax.random.randint(jax.random.PRNGKey(5), (8,), 0, 31)
    lq, lp = jax.nn.log_softmax(zs), jax.nn.log_softmax(zt)
    tckd, nckd, lu_t, _ = jax.jit(target_decomposition)(lq, lp, g)
    np.testing.assert_allclose(tckd + jnp.exp(lu_t) * nckd, jnp.sum(jnp.exp(lp) * (lp - lq), -1),
                               rtol=1e-5)


def test_nckd_ignores_student_target_logit_and_tckd_only_sees_q_g():
    zs, zt = _logits(6, (5, 13)), _logits(7, (5, 13))
    g = jnp.array([0, 3, 5, 12, 7])
    onehot = jax.nn.one_hot(g, 13)

    @jax.jit
    def parts(s):
        return target_decomposition(jax.nn.log_softmax(s), jax.nn.log_softmax(zt), g)[:2]

    grad_g = jax.grad(lambda s: parts(s)[1].sum())(zs)
    # Zero up to float32 cancellation of the shared log-normaliser (other entries are O(1)).
    assert float(jnp.abs(grad_g * onehot).max()) <= 1e-6 < float(jnp.abs(grad_g).max())
    np.testing.assert_allclose(parts(zs + 4.0 * onehot)[1], parts(zs)[1], rtol=1e-5)
    # Shift non-target logits by a constant: q_g changes unless the target logit moves too.
    np.testing.assert_allclose(parts(zs + 2.0 * (1 - onehot) + 2.0 * onehot)[0], parts(zs)[0],
                               rtol=1e-5)
    zs_perm = jnp.where(onehot > 0, zs, jnp.roll(zs, 1, axis=-1))
    # A permutation of non-target logits keeps q_g (their LSE) fixed only if the target is kept.
    same_lse = jnp.isclose(jax.nn.logsumexp(jnp.where(onehot > 0, -jnp.inf, zs), -1),
                           jax.nn.logsumexp(jnp.where(onehot > 0, -jnp.inf, zs_perm), -1))
    t0, t1 = parts(zs)[0], parts(zs_perm)[0]
    np.testing.assert_allclose(t1[same_lse], t0[same_lse], rtol=1e-5)


def test_split_fixture_hand_worked():
    unc = jnp.array([0.1, 0.4, 0.2, 0.3, 0.05])
    valid = jnp.array([True, True, True, True, False])
    theta = atkd_threshold(jnp.log(unc), valid)
    np.testing.assert_allclose(jnp.exp(theta), 0.2, rtol=1e-6)
    hard = valid & (jnp.log(unc) >= theta)
    assert hard.tolist() == [False, True, True, True, False]
    five = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4, 0.5]))
    theta5 = atkd_threshold(five, jnp.ones(5, bool))
    np.testing.assert_allclose(jnp.exp(theta5), 0.3, rtol=1e-6)
    assert int(jnp.sum(five >= theta5)) == 3
    assert float(atkd_threshold(five, jnp.zeros(5, bool))) == float("inf")
    # k = 1 makes every valid token hard; k = 0.3 of 11 tokens -> u[7].
    assert float(atkd_threshold(five, jnp.ones(5, bool), 1.0)) == float(five[0])
    eleven = jnp.log(jnp.arange(1, 12) / 20.0)
    np.testing.assert_allclose(atkd_threshold(eleven, jnp.ones(11, bool), 0.3), eleven[7])


COMBOS = [(d, n) for d in ("forward", "reverse") for n in ("per_group", "global")]


@pytest.mark.parametrize("t", [6, 7])  # odd and even numbers of valid tokens (median rule)
def test_matches_float64_reference(t):
    with jax.enable_x64(True):
        zs, zt = _logits(8, (2, t, 11), dtype=jnp.float64), _logits(9, (2, t, 11), 4.0,
                                                                    jnp.float64)
        labels = _labels(10, 2, t, 11, n_ignored=1 + t % 2)
        got = jax.jit(lambda zs, zt: [atkd_loss(zs, zt, labels, direction=d, normalize=n,
                                                hard_fraction=0.5, easy_weight=0.3,
                                                temperature=1.3) for d, n in COMBOS])(zs, zt)
        for (direction, normalize), g in zip(COMBOS, got):
            want = ref.atkd(np.asarray(zs), np.asarray(zt), np.asarray(labels), k=0.5, lam=0.3,
                            direction=direction, tau=1.3, normalize=normalize)
            np.testing.assert_allclose(float(g), want, rtol=1e-10,
                                       err_msg=f"{direction} {normalize}")


def test_group_normalisation_by_hand():
    zs, zt = _logits(11, (1, 6, 7)), _logits(12, (1, 6, 7))
    labels = _labels(13, 1, 6, 7, n_ignored=0)
    tckd, nckd, lu, _ = jax.jit(lambda zs, zt: target_decomposition(
        jax.nn.log_softmax(zs[0, :-1]), jax.nn.log_softmax(zt[0, :-1]), labels[0, 1:]))(zs, zt)
    order = np.argsort(np.asarray(lu))
    hard = np.zeros(5, bool)
    hard[order[2:]] = True  # lower median of 5 = 3rd smallest: 3 hard, 2 easy
    tckd, nckd = np.asarray(tckd), np.asarray(nckd)
    lam = 0.2
    per_group = lam * nckd[~hard].mean() + (1 - lam) * (tckd[hard] + nckd[hard]).mean()
    glob = (lam * nckd[~hard].sum() + (1 - lam) * (tckd[hard] + nckd[hard]).sum()) / 5
    (loss, aux), loss_glob = jax.jit(lambda zs, zt: (
        atkd_loss(zs, zt, labels, return_aux=True),
        atkd_loss(zs, zt, labels, normalize="global")))(zs, zt)
    np.testing.assert_allclose(loss, per_group, rtol=1e-5)
    np.testing.assert_allclose(loss_glob, glob, rtol=1e-5)
    assert int(aux["n_hard"]) == 3 and int(aux["n_easy"]) == 2
    np.testing.assert_allclose(aux["mean_nckd_easy"], nckd[~hard].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["mean_tckd_hard"], tckd[hard].mean(), rtol=1e-5)


def test_zero_loss_and_grad_at_identity():
    z = _logits(14, (2, 6, 13))
    labels = _labels(15, 2, 6, 13)
    out = jax.jit(lambda z: [jax.value_and_grad(lambda s, d=d: atkd_loss(
        s, z, labels, direction=d))(z) for d in ("forward", "reverse")])(z)
    for v, g in out:
        assert abs(float(v)) <= 1e-6 and float(jnp.abs(g).max()) <= 1e-6


def test_recovers_fkl_and_rkl():
    zs, zt = _logits(16, (2, 7, 10)), _logits(17, (2, 7, 10))
    labels = _labels(18, 2, 7, 10)

    @jax.jit
    def run(zs):
        out = []
        for direction, kind in (("forward", "fkl"), ("reverse", "rkl")):
            f_atkd = lambda s, d=direction: atkd_loss(s, zt, labels, hard_fraction=1.0,  # noqa
                                                      easy_weight=0.0, unc_weighted_nckd=True,
                                                      direction=d)
            f_kd = lambda s, k=kind: kd_loss(s, zt, labels, kind=k)  # noqa: E731
            out.append((jax.value_and_grad(f_atkd)(zs), jax.value_and_grad(f_kd)(zs)))
        return out

    for (va, ga), (vk, gk) in run(zs):
        np.testing.assert_allclose(va, vk, rtol=1e-5)
        np.testing.assert_allclose(ga, gk, atol=1e-6)


def test_gradients_against_finite_differences_fixed_split():
    with jax.enable_x64(True):
        zs, zt = _logits(19, (1, 6, 5), dtype=jnp.float64), _logits(20, (1, 6, 5),
                                                                    dtype=jnp.float64)
        labels = _labels(21, 1, 6, 5, n_ignored=1)
        for direction, order in (("forward", 2), ("reverse", 1)):
            check_grads(jax.jit(lambda s, d=direction: atkd_loss(s, zt, labels, direction=d,
                                                                 easy_weight=0.3)),
                        (zs,), order=order, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_empty_groups_and_no_tokens_are_finite():
    zs = _logits(22, (2, 5, 8))
    # Teacher identical at every position with the same target -> all UnC tied -> E empty.
    zt = jnp.broadcast_to(_logits(23, (1, 1, 8)), (2, 5, 8))
    labels = jnp.full((2, 5), 3)
    none = jnp.full((2, 5), -100)

    @jax.jit
    def run(zs):
        return (atkd_loss(zs, zt, labels, easy_weight=0.2, return_aux=True),
                atkd_loss(zs, zt, labels, easy_weight=0.0),
                [jax.value_and_grad(lambda s, sc=sc: atkd_loss(s, zt, none, split_scope=sc))(zs)
                 for sc in ("local_batch", "sequence")])

    (loss, aux), lh, empty = run(zs)
    assert int(aux["n_easy"]) == 0 and int(aux["n_hard"]) == 8
    np.testing.assert_allclose(loss, 0.8 * lh, rtol=1e-6)
    for v, g in empty:
        assert float(v) == 0.0 and float(jnp.abs(g).max()) == 0.0


def test_masked_positions_do_not_matter():
    zs, zt = _logits(24, (2, 6, 9)), _logits(25, (2, 6, 9))
    labels = _labels(26, 2, 6, 9, n_ignored=2)
    f = jax.jit(jax.value_and_grad(lambda s, t: atkd_loss(s, t, labels, direction="reverse")))
    v0, g0 = f(zs, zt)
    zs2 = zs.at[0, 0:2].set(1e4)
    zt2 = zt.at[0, 0:2].set(-1e4)
    v1, g1 = f(zs2, zt2)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, atol=1e-7)


def test_split_scopes():
    zs, zt = _logits(27, (4, 6, 9)), _logits(28, (4, 6, 9))
    labels = _labels(29, 4, 6, 9)

    @jax.jit
    def run(zs, zt):
        out = {"seq": atkd_loss(zs, zt, labels, split_scope="sequence"),
               "rows": [atkd_loss(zs[i:i + 1], zt[i:i + 1], labels[i:i + 1]) for i in range(4)],
               "grouped": atkd_loss(zs, zt, labels, split_groups=2),
               "halves": [atkd_loss(zs[i:i + 2], zt[i:i + 2], labels[i:i + 2]) for i in (0, 2)]}
        lp = jax.nn.log_softmax(zt[:, :-1])
        m = labels[:, 1:] != -100
        lu = target_decomposition(lp, lp, jnp.where(m, labels[:, 1:], 0))[2]
        theta = atkd_threshold(lu, m)
        out["global"] = atkd_loss(zs, zt, labels, split_scope="global", threshold=theta)
        out["local"], aux = atkd_loss(zs, zt, labels, return_aux=True)
        counts = (aux["n_easy"], aux["n_hard"])
        out["full_sum"] = atkd_loss(zs, zt, labels, reduction="sum")
        out["parts"] = sum(atkd_loss(zs[i:i + 2], zt[i:i + 2], labels[i:i + 2],
                                     split_scope="global", threshold=theta, group_counts=counts,
                                     reduction="sum") for i in (0, 2))
        return out

    o = run(zs, zt)
    np.testing.assert_allclose(o["seq"], np.mean(o["rows"]), rtol=1e-5)
    np.testing.assert_allclose(o["grouped"], np.mean(o["halves"]), rtol=1e-5)
    assert abs(float(o["grouped"]) - float(o["local"])) > 1e-6  # the scopes really differ
    # Global scope with the batch's own threshold equals the local-batch split.
    np.testing.assert_allclose(o["global"], o["local"], rtol=1e-6)
    # Accumulation with a global threshold and global group counts reproduces the full batch.
    np.testing.assert_allclose(o["parts"], o["full_sum"], rtol=1e-5)
