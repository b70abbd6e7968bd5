import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.reward.model import InfoHead, RewardConfig, RewardModel, ScalarHead, make_head
from reward_backbones import MeanPoolBackbone

EOS = 1


def _batch(seqs, t, side):
    toks = np.full((len(seqs), t), EOS, np.int32)
    mask = np.zeros((len(seqs), t), bool)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        toks[i, sl], mask[i, sl] = s, True
    return jnp.asarray(toks), jnp.asarray(mask)


SEQS = [[4, 5, 6, EOS], [7, EOS], [3, 9, 9, 2, 8, EOS]]


def _model(head="inform", **kw):
    cfg = RewardConfig(head=head, latent_dim=8, **kw)
    rngs = nnx.Rngs(0)
    return RewardModel(MeanPoolBackbone(rngs=rngs), make_head(cfg, 16, rngs=rngs), cfg)


@pytest.mark.parametrize("head", ["scalar", "inform"])
def test_padding_layouts_give_identical_outputs(head):
    m = _model(head)
    outs = [m(*_batch(SEQS, t, side)) for side, t in [("left", 6), ("right", 6), ("right", 11),
                                                      ("left", 9)]]
    for o in outs[1:]:
        np.testing.assert_allclose(np.asarray(o.reward), np.asarray(outs[0].reward), atol=1e-6)
        if head == "inform":
            np.testing.assert_allclose(np.asarray(o.mu), np.asarray(outs[0].mu), atol=1e-6)


def test_gather_then_project_equals_project_then_gather():
    # The per-token encoder applied to every position, then gathered at the EOS.
    m = _model()
    toks, mask = _batch(SEQS, 7, "left")
    h = m.backbone(toks, mask)
    all_pos = h @ m.head.w_enc[...]
    idx = 7 - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    gathered = all_pos[jnp.arange(3), idx]
    mu = m(toks, mask).mu
    np.testing.assert_allclose(np.asarray(mu), np.asarray(gathered[:, :8]), atol=1e-6)


def test_reparameterisation_train_vs_eval():
    # Eval mode (no rng) gives z = mu; a fixed key makes train mode reproducible and different
    # from eval; with logvar -> -inf the train-mode sample collapses onto mu.
    head = InfoHead(16, 8, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(0), (5, 16))
    ev = head(h)
    np.testing.assert_array_equal(np.asarray(ev.z), np.asarray(ev.mu))
    k = jax.random.key(3)
    t1, t2 = head(h, rng=k), head(h, rng=k)
    np.testing.assert_array_equal(np.asarray(t1.reward), np.asarray(t2.reward))
    assert not np.allclose(np.asarray(t1.reward), np.asarray(ev.reward))
    # logvar -> -60 (clip larger than 60): the sample collapses onto mu
    head_c = InfoHead(16, 8, logvar_clip=100.0, rngs=nnx.Rngs(0))
    head_c.w_enc[...] = head_c.w_enc[...].at[:, 8:].set(0.0)
    h1 = jnp.concatenate([h, jnp.ones((5, 1))], axis=1)[:, :16]
    mu, _ = head_c.encode(h1)
    lv = jnp.full_like(mu, -60.0)
    z = mu + jnp.exp(0.5 * lv) * jax.random.normal(k, mu.shape)
    np.testing.assert_allclose(np.asarray(head_c.decode(z)), np.asarray(head_c(h1).reward),
                               atol=1e-7)


def test_init_gives_small_rewards_and_zero_logvar():
    head = InfoHead(64, 128, rngs=nnx.Rngs(1))
    out = head(jax.random.normal(jax.random.key(1), (32, 64)))
    assert out.mu.shape == (32, 128) and out.logvar.shape == (32, 128)
    assert float(jnp.abs(out.reward).max()) < 0.1
    assert float(jnp.abs(out.logvar).mean()) < 0.2
    r = ScalarHead(64, rngs=nnx.Rngs(1))(jax.random.normal(jax.random.key(1), (32, 64))).reward
    assert r.shape == (32,) and float(jnp.abs(r).max()) < 0.5


@pytest.mark.parametrize("decoder", ["swiglu", "mlp"])
def test_decoders(decoder):
    head = InfoHead(16, 8, decoder=decoder, rngs=nnx.Rngs(0))
    out = head(jax.random.normal(jax.random.key(0), (4, 16)), rng=jax.random.key(1))
    assert out.reward.shape == (4,) and bool(jnp.all(jnp.isfinite(out.reward)))


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="head"):
        RewardConfig(head="ensemble")
    with pytest.raises(ValueError, match="kl_mode"):
        RewardConfig(kl_mode="mc")
    with pytest.raises(ValueError, match="decoder"):
        RewardConfig(decoder="deep")
    with pytest.raises(ValueError, match=r"h_last must be \[N, 16\]"):
        InfoHead(16, 8, rngs=nnx.Rngs(0))(jnp.ones((2, 8)))
    m = _model()
    toks, mask = _batch(SEQS, 6, "right")
    with pytest.raises(ValueError, match="no non-pad token"):
        m(toks, mask.at[1].set(False))
