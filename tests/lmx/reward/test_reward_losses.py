import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.reward.losses import (bradley_terry_loss, center_penalty, gaussian_kl, normalize_rewards,
                               pair_accuracy, reward_pair_losses, reward_stats, split_pairs)


def test_kl_closed_form_matches_monte_carlo():
    # K=8, E_q[log q - log p] from 2e5 samples within 0.5% of the closed form.
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    mu = jax.random.normal(k1, (1, 8))
    logvar = 0.5 * jax.random.normal(k2, (1, 8))
    closed = float(gaussian_kl(mu, logvar)[0])
    sd = jnp.exp(0.5 * logvar)
    z = mu + sd * jax.random.normal(k3, (200_000, 8))
    log_q = jnp.sum(-0.5 * ((z - mu) / sd) ** 2 - jnp.log(sd), axis=1)
    log_p = jnp.sum(-0.5 * z ** 2, axis=1)  # the 2*pi constants cancel
    mc = float(jnp.mean(log_q - log_p))
    assert abs(mc - closed) / closed < 5e-3


def test_kl_zero_at_prior_positive_elsewhere_additive():
    mu0 = jnp.zeros((1, 4))
    assert float(gaussian_kl(mu0, mu0)[0]) == 0.0
    g = jax.grad(lambda m, l: gaussian_kl(m, l)[0], argnums=(0, 1))(mu0, mu0)
    assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[1]).max()) == 0.0
    mu = jnp.array([[0.3, -1.0, 2.0, 0.1]])
    lv = jnp.array([[0.5, -0.2, 0.0, 1.0]])
    assert float(gaussian_kl(mu, lv)[0]) > 0
    per_dim = sum(float(gaussian_kl(mu[:, i:i + 1], lv[:, i:i + 1])[0]) for i in range(4))
    np.testing.assert_allclose(float(gaussian_kl(mu, lv)[0]), per_dim, rtol=1e-6)
    np.testing.assert_allclose(float(gaussian_kl(mu, lv, "diag_mean")[0]), per_dim / 4, rtol=1e-6)


def test_kl_official_parity_mode():
    # mu = [1, -1], logvar = 0 -> diag_sum 1.0, official_dimmean 0.0 exactly.
    mu, lv = jnp.array([[1.0, -1.0]]), jnp.zeros((1, 2))
    assert float(gaussian_kl(mu, lv, "diag_sum")[0]) == 1.0
    assert float(gaussian_kl(mu, lv, "official_dimmean")[0]) == 0.0


def test_kl_gradient_is_beta_mu():
    # d/dmu of beta*KL (diag_sum) = beta*mu.
    mu = jnp.array([[0.5, -2.0, 1.5]])
    lv = jnp.array([[0.1, 0.2, -0.3]])
    beta = 0.1
    g = jax.grad(lambda m: beta * gaussian_kl(m, lv)[0])(mu)
    np.testing.assert_allclose(np.asarray(g), beta * np.asarray(mu), rtol=1e-6)


def test_bt_identities():
    d = jnp.linspace(-6.0, 6.0, 25)
    zero = jnp.zeros_like(d)
    np.testing.assert_allclose(float(bradley_terry_loss(zero[:1], zero[:1])[0]), np.log(2.0),
                               rtol=1e-7)
    np.testing.assert_allclose(np.asarray(bradley_terry_loss(d, zero) - bradley_terry_loss(-d, zero)),
                               -np.asarray(d), atol=2e-6)
    grad = jax.vmap(jax.grad(lambda x: bradley_terry_loss(x[None], jnp.zeros(1))[0]))(d)
    np.testing.assert_allclose(np.asarray(grad), -(1 - np.asarray(jax.nn.sigmoid(d))), atol=1e-6)


def test_bt_margin_and_centering():
    rc, rr = jnp.array([1.0, 0.2, -0.5]), jnp.array([0.0, 0.7, -2.0])
    m = jnp.array([0.5, 1.0, 0.0])
    np.testing.assert_allclose(np.asarray(bradley_terry_loss(rc, rr, m)),
                               np.asarray(bradley_terry_loss(rc - m, rr)), atol=1e-7)
    assert float(jnp.max(center_penalty(rc, -rc))) == 0.0
    loss, _ = reward_pair_losses(jnp.concatenate([rc, rr]), center_coef=0.01)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(bradley_terry_loss(rc, rr)
                                                              + 0.01 * (rc + rr) ** 2), rtol=1e-6)


def test_accuracy_strict_and_swap():
    rc = jnp.array([1.0, 0.0, 2.0, -1.0])
    rr = jnp.array([0.0, 0.0, 3.0, -2.0])
    a = pair_accuracy(rc, rr)
    assert float(a["acc"]) == 0.5 and int(a["ties"]) == 1
    s = pair_accuracy(rr, rc)
    assert float(s["acc"]) == pytest.approx(1 - 0.5 - 1 / 4)


def test_inform_pair_loss_reductions():
    k1, k2 = jax.random.split(jax.random.key(1))
    r = jax.random.normal(k1, (6,))
    mu, lv = jax.random.normal(k2, (6, 4)), jnp.zeros((6, 4))
    kl = gaussian_kl(mu, lv)
    loss, terms = reward_pair_losses(r, mu=mu, logvar=lv, beta=0.1)
    np.testing.assert_allclose(np.asarray(loss - terms["pref"]), 0.1 * np.asarray(kl[:3] + kl[3:]),
                               rtol=1e-6)
    loss2, _ = reward_pair_losses(r, mu=mu, logvar=lv, beta=0.1, pair_reduction="mean_2B")
    # mean over pairs of the per-pair loss equals the official pref + beta*mean_{2B} KL
    np.testing.assert_allclose(float(loss2.mean()), float(terms["pref"].mean() + 0.1 * kl.mean()),
                               rtol=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same size"):
        bradley_terry_loss(jnp.ones(3), jnp.ones(4))
    with pytest.raises(ValueError, match="r_chosen must be finite"):
        bradley_terry_loss(jnp.array([1.0, jnp.nan]), jnp.ones(2))
    with pytest.raises(ValueError, match="r_rejected must be finite"):
        pair_accuracy(jnp.ones(2), jnp.array([jnp.inf, 0.0]))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(jnp.ones(3), jnp.ones(3), jnp.ones(2))
    with pytest.raises(ValueError, match="2B"):
        split_pairs(jnp.ones(5))
    with pytest.raises(ValueError, match="kl mode"):
        gaussian_kl(jnp.ones((1, 2)), jnp.ones((1, 2)), "full")
    with pytest.raises(ValueError, match="both mu and logvar"):
        reward_pair_losses(jnp.ones(4), mu=jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="std"):
        reward_stats([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        reward_stats([1.0, np.nan])
    with pytest.raises(ValueError, match="std > 0"):
        normalize_rewards(jnp.ones(2), 0.0, 0.0)


def test_reward_stats_normalize():
    r = np.array([1.0, 2.0, 3.0, 4.0])
    st = reward_stats(r)
    z = np.asarray(normalize_rewards(jnp.asarray(r), st["mean"], st["std"]))
    np.testing.assert_allclose([z.mean(), z.std()], [0.0, 1.0], atol=1e-6)


def test_losses_jit_without_value_checks():
    # Inside jit the value checks are skipped (tracers); the function must still trace.
    f = jax.jit(lambda a, b: bradley_terry_loss(a, b).mean())
    np.testing.assert_allclose(float(f(jnp.zeros(4), jnp.zeros(4))), np.log(2.0), rtol=1e-6)
