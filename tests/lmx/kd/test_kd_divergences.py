"""Known-answer tests for the KD divergences and kd_loss."""
import math

import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kd_reference as ref
from lmx.kd import KINDS, kd_loss, token_divergence
from lmx.kd.divergences import log_probs


def _logits(seed, shape, scale=3.0, dtype=jnp.float32):
    return (scale * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)


def _labels(seed, b, t, v, n_ignored=2):
    y = np.array(jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, v))
    y[0, 1:1 + n_ignored] = -100
    return jnp.asarray(y)


def test_matches_float64_reference():
    with jax.enable_x64(True):
        zs, zt = _logits(0, (3, 5, 11), dtype=jnp.float64), _logits(1, (3, 5, 11), 4.0, jnp.float64)
        m = jnp.ones((3, 5), bool)

        @jax.jit
        def all_kinds(zs, zt):
            lq, lp = log_probs(zs, m, 1.5), log_probs(zt, m, 1.5)
            return {k: token_divergence(lq, lp, k, beta=0.3, skew=0.2, mix=0.7) for k in KINDS}

        got = all_kinds(zs, zt)
        for kind in KINDS:
            want = ref.divergence(ref.softmax(zs, 1.5), ref.softmax(zt, 1.5), kind, beta=0.3,
                                  skew=0.2, mix=0.7)
            np.testing.assert_allclose(np.asarray(got[kind]), want, rtol=1e-10, atol=1e-12,
                                       err_msg=kind)


def test_fkl_rkl_match_optax():
    zs, zt = _logits(2, (4, 13)), _logits(3, (4, 13))
    lq, lp = jax.nn.log_softmax(zs), jax.nn.log_softmax(zt)
    np.testing.assert_allclose(token_divergence(lq, lp, "fkl"),
                               optax.losses.kl_divergence_with_log_targets(lq, lp), rtol=1e-5)
    np.testing.assert_allclose(token_divergence(lq, lp, "rkl"),
                               optax.losses.kl_divergence_with_log_targets(lp, lq), rtol=1e-5)


def test_zero_loss_and_zero_grad_at_identity():
    z = _logits(4, (2, 6, 17))
    labels = _labels(5, 2, 6, 17)
    out = jax.jit(lambda z: {k: jax.value_and_grad(
        lambda s, k=k: kd_loss(s, z, labels, kind=k))(z) for k in KINDS})(z)
    for kind, (val, grad) in out.items():
        assert abs(float(val)) <= 1e-6, kind
        assert float(jnp.max(jnp.abs(grad))) <= 1e-6, kind


def test_nonnegative_and_bounds():
    zs, zt = _logits(6, (64, 23), 5.0), _logits(7, (64, 23), 5.0)
    out = jax.jit(lambda lq, lp: {k: token_divergence(lq, lp, k) for k in KINDS})(
        jax.nn.log_softmax(zs), jax.nn.log_softmax(zt))
    for kind in KINDS:
        _check_bounds(kind, np.asarray(out[kind]))


def _check_bounds(kind, d):
    assert d.min() >= -1e-6
    assert d.max() > 1e-3
    if kind == "gjsd":
        assert d.max() <= math.log(2) + 1e-6
    if kind == "skl":
        assert d.max() <= -math.log(0.1) + 1e-5
    if kind == "tvd":
        assert d.max() <= 1 + 1e-6


def test_tvd_disjoint_supports_is_one():
    lp = jnp.log(jnp.array([[0.5, 0.5, 0.0, 0.0]]))
    lq = jnp.log(jnp.array([[0.0, 0.0, 0.3, 0.7]]))
    np.testing.assert_allclose(token_divergence(lq, lp, "tvd"), [1.0], atol=1e-7)


def test_gjsd_endpoints_and_limits():
    zs, zt = _logits(8, (16, 29)), _logits(9, (16, 29))
    lq, lp = jax.nn.log_softmax(zs), jax.nn.log_softmax(zt)
    fkl, rkl = token_divergence(lq, lp, "fkl"), token_divergence(lq, lp, "rkl")
    np.testing.assert_array_equal(token_divergence(lq, lp, "gjsd", beta=0.0), fkl)
    np.testing.assert_array_equal(token_divergence(lq, lp, "gjsd", beta=1.0), rkl)
    with jax.enable_x64(True):
        # The small-beta limit is uniform only where q is not tiny next to beta * p: mild logits.
        lq64 = jax.nn.log_softmax(zs.astype(jnp.float64) / 3)
        lp64 = jax.nn.log_softmax(zt.astype(jnp.float64) / 3)
        b = 1e-5
        np.testing.assert_allclose(token_divergence(lq64, lp64, "gjsd", beta=b) / b,
                                   token_divergence(lq64, lp64, "fkl"), rtol=1e-3)
        np.testing.assert_allclose(token_divergence(lq64, lp64, "gjsd", beta=1 - b) / b,
                                   token_divergence(lq64, lp64, "rkl"), rtol=1e-3)
    np.testing.assert_allclose(token_divergence(lq, lp, "gjsd", beta=0.5),
                               token_divergence(lp, lq, "gjsd", beta=0.5), rtol=1e-5)
    np.testing.assert_array_equal(token_divergence(lq, lp, "skl", skew=0.0), fkl)
    np.testing.assert_array_equal(token_divergence(lq, lp, "srkl", skew=0.0), rkl)
    np.testing.assert_allclose(token_divergence(lq, lp, "js_distance", mix=0.9),
                               token_divergence(lq, lp, "gjsd", beta=0.1), rtol=1e-6)


def test_gradient_closed_forms():
    tau = 2.0
    zs, zt = _logits(10, (1, 5, 19)), _logits(11, (1, 5, 19))
    n = 4.0  # tokens scored after the shift
    gf = jax.grad(lambda s: kd_loss(s, zt, kind="fkl", temperature=tau))(zs)[0, :-1]
    gr = jax.grad(lambda s: kd_loss(s, zt, kind="rkl", temperature=tau))(zs)[0, :-1]
    q, p = jax.nn.softmax(zs[0, :-1] / tau), jax.nn.softmax(zt[0, :-1] / tau)
    lq, lp = jnp.log(q), jnp.log(p)
    rkl = jnp.sum(q * (lq - lp), -1, keepdims=True)
    np.testing.assert_allclose(gf * n, (q - p) / tau, atol=1e-6)
    np.testing.assert_allclose(gr * n, q * (lq - lp - rkl) / tau, atol=1e-6)


def test_gradients_against_finite_differences():
    with jax.enable_x64(True):
        zs, zt = _logits(12, (2, 4, 7), dtype=jnp.float64), _logits(13, (2, 4, 7),
                                                                     dtype=jnp.float64)
        labels = _labels(14, 2, 4, 7, n_ignored=1)

        def f(s):
            return sum(w * kd_loss(s, zt, labels, kind=k, hard_weight=0.3) for w, k in
                       ((1.0, "gjsd"), (0.5, "skl"), (0.3, "srkl"), (0.7, "tvd"),
                        (0.2, "mixed_kl")))

        check_grads(jax.jit(f), (zs,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_masked_positions_do_not_matter():
    zs, zt = _logits(15, (2, 7, 13)), _logits(16, (2, 7, 13))
    labels = _labels(17, 2, 7, 13, n_ignored=3)
    mask = jnp.ones((2, 7), bool).at[1, 4].set(False)
    f = jax.jit(jax.value_and_grad(lambda s, t: kd_loss(s, t, labels, mask=mask, kind="gjsd")))
    v0, g0 = f(zs, zt)
    # Logits at position t predict label t+1: labels 1..3 of row 0 and label 4 of row 1 are off.
    junk = 1e4 * _logits(18, (2, 7, 13))
    zs2 = zs.at[0, 0:3].set(junk[0, 0:3]).at[1, 3].set(junk[1, 3])
    zt2 = zt.at[0, 0:3].set(-junk[0, 0:3]).at[1, 3].set(jnp.nan)
    v1, g1 = f(zs2, zt2)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, atol=1e-7)
    assert float(jnp.abs(g1[0, 0:3]).max()) == 0.0


def test_all_masked_gives_zero_without_nan():
    zs, zt = _logits(19, (2, 5, 9)), _logits(20, (2, 5, 9))
    labels = jnp.full((2, 5), -100)
    out = jax.jit(lambda zs: {k: jax.value_and_grad(
        lambda s, k=k: kd_loss(s, zt, labels, kind=k, hard_weight=1.0))(zs) for k in KINDS})(zs)
    for kind, (v, g) in out.items():
        assert float(v) == 0.0 and float(jnp.abs(g).max()) == 0.0, kind


def test_shift_alignment():
    zs, zt = _logits(21, (1, 6, 9)), _logits(22, (1, 6, 9))
    per_tok = lambda t: kd_loss(zs, t, shift=True, reduction="sum")  # noqa: E731
    base = per_tok(zt)
    # The last logits predict nothing under the shift: perturbing them changes nothing.
    np.testing.assert_allclose(per_tok(zt.at[0, 5, 0].add(3.0)), base, rtol=1e-6)
    # Masking label t+1 removes exactly the effect of perturbing logits at t.
    labels = jnp.zeros((1, 6), jnp.int32).at[0, 3].set(-100)
    f = lambda t: kd_loss(zs, t, labels, reduction="sum")  # noqa: E731
    np.testing.assert_allclose(f(zt.at[0, 2, 0].add(5.0)), f(zt), rtol=1e-6)
    assert abs(float(f(zt.at[0, 3, 0].add(5.0)) - f(zt))) > 1e-3


def test_temperature_equivalence_and_tau_squared():
    zs, zt = _logits(23, (2, 4, 11)), _logits(24, (2, 4, 11))
    out = jax.jit(lambda zs, zt: [(
        kd_loss(zs, zt, kind=k, temperature=2.5), kd_loss(zs / 2.5, zt / 2.5, kind=k),
        kd_loss(zs, zt, kind=k, temperature=2.5, scale_by_temperature_squared=True))
        for k in ("fkl", "gjsd", "srkl")])(zs, zt)
    for a, b, c in out:
        np.testing.assert_allclose(a, b, rtol=1e-5)
        np.testing.assert_allclose(c, 2.5 ** 2 * a, rtol=1e-5)


def test_global_denominator_makes_accumulation_exact():
    """Micro-batches with the global count reproduce the full batch (TRL #4719 regression)."""
    zs, zt = _logits(25, (4, 6, 10)), _logits(26, (4, 6, 10))
    y = np.array(jax.random.randint(jax.random.PRNGKey(27), (4, 6), 0, 10))
    y[0, 2:] = -100  # a short response in the first micro-batch
    labels = jnp.asarray(y)
    grad = jax.jit(jax.grad(lambda s, t, y, den: kd_loss(s, t, y, denominator=den)))
    n_global = float(jnp.sum(labels[:, 1:] != -100))
    full = grad(zs, zt, labels, n_global)
    parts = [grad(zs[i:i + 2], zt[i:i + 2], labels[i:i + 2], n_global) for i in (0, 2)]
    np.testing.assert_allclose(jnp.concatenate(parts), full, atol=1e-7)
    # The local-mean ("mean of means") variant is not the same objective.
    local = [grad(zs[i:i + 2], zt[i:i + 2], labels[i:i + 2],
                  float(jnp.sum(labels[i:i + 2, 1:] != -100))) / 2 for i in (0, 2)]
    assert float(jnp.abs(jnp.concatenate(local) - full).max()) > 1e-4


def test_bf16_inputs_upcast():
    zs, zt = _logits(28, (2, 5, 33)), _logits(29, (2, 5, 33))

    @jax.jit
    def run(zs, zt):
        b_s, b_t = zs.astype(jnp.bfloat16), zt.astype(jnp.bfloat16)
        lq = jax.nn.log_softmax(b_s.astype(jnp.float32))
        return {k: (kd_loss(b_s.astype(jnp.float32), b_t.astype(jnp.float32), kind=k),
                    kd_loss(b_s, b_t, kind=k),
                    token_divergence(lq, jax.nn.log_softmax(zt), k)) for k in KINDS}

    for kind, (ref32, got, d) in run(zs, zt).items():
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref32, rtol=1e-2, err_msg=kind)
        assert float(d.min()) >= -1e-6, kind


def test_padded_vocab_neg_inf_and_valid_vocab_size():
    zs, zt = _logits(30, (2, 5, 12)), _logits(31, (2, 5, 12))
    pad = jnp.full((2, 5, 4), -jnp.inf)
    garbage = 50 * _logits(32, (2, 5, 3))

    @jax.jit
    def run(zs, zt):
        out = {}
        for kind in KINDS:
            f = lambda s, t, kind=kind, **kw: kd_loss(s, t, kind=kind, **kw)  # noqa: E731
            out[kind] = (jax.value_and_grad(f)(zs, zt),
                         jax.value_and_grad(f)(jnp.concatenate([zs, pad], -1),
                                               jnp.concatenate([zt, pad], -1)),
                         jax.value_and_grad(lambda s, f=f: f(
                             s, jnp.concatenate([zt, garbage], -1), valid_vocab_size=12))(zs))
        return out

    for kind, ((v0, g0), (v1, g1), (v2, g2)) in run(zs, zt).items():
        np.testing.assert_allclose(v1, v0, rtol=1e-6, err_msg=kind)
        assert not bool(jnp.isnan(g1).any()), kind
        np.testing.assert_allclose(g1[..., :12], g0, atol=1e-7, err_msg=kind)
        np.testing.assert_allclose(v2, v0, rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(g2, g0, atol=1e-7, err_msg=kind)


def test_vocab_sharded_matches_unsharded():
    devices = np.array(jax.devices()[:4])
    if devices.size < 4:
        pytest.skip("needs 4 host devices (tests/conftest.py sets 8)")
    mesh = jax.sharding.Mesh(devices, ("tensor",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "tensor"))
    zs, zt = _logits(33, (2, 6, 32)), _logits(34, (2, 6, 32))
    labels = _labels(35, 2, 6, 32)
    f = jax.jit(jax.value_and_grad(lambda s, t: kd_loss(s, t, labels, kind="gjsd",
                                                        hard_weight=0.5)))
    v0, g0 = f(zs, zt)
    v1, g1 = f(jax.device_put(zs, sharding), jax.device_put(zt, sharding))
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, atol=1e-7)


def test_hard_term_and_aux():
    zs, zt = _logits(36, (2, 5, 9)), _logits(37, (2, 5, 9))
    labels = _labels(38, 2, 5, 9)
    loss, aux = kd_loss(zs, zt, labels, hard_weight=0.5, soft_weight=0.5, return_aux=True)
    n = float(jnp.sum(labels[:, 1:] != -100))
    ce = optax.softmax_cross_entropy_with_integer_labels(zs[:, :-1], jnp.maximum(labels[:, 1:], 0))
    ce_sum = float(jnp.sum(jnp.where(labels[:, 1:] != -100, ce, 0.0)))
    assert float(aux["n_scored"]) == n
    np.testing.assert_allclose(float(aux["hard_sum"]), ce_sum, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (0.5 * ce_sum + 0.5 * float(aux["soft_sum"])) / n,
                               rtol=1e-5)
    np.testing.assert_allclose(kd_loss(zs, zt, labels, reduction="sum"), aux["soft_sum"],
                               rtol=1e-6)
