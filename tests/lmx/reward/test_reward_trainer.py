import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmx.reward.model import RewardConfig, RewardModel, make_head
from lmx.reward.trainer import (check_pair_batch, collate_pairs, encode_latents, evaluate,
                                fit_reward_normalization, load_reward_model, reward_loss_fn,
                                save_reward_model)
from lmx.train import TrainConfig, train
from reward_backbones import EOS, PAD, MeanPoolBackbone, synthetic_pairs

VOCAB = 32


def _model(head="inform", seed=0, **kw):
    cfg = RewardConfig(head=head, latent_dim=8, **kw)
    rngs = nnx.Rngs(seed)
    return RewardModel(MeanPoolBackbone(VOCAB, 16, rngs=rngs), make_head(cfg, 16, rngs=rngs), cfg)


def test_collate_appends_eos_pads_and_drops():
    chosen, rejected = [[5, 6], [7, 8, 9, 10, 11, 12]], [[3], [4, 4]]
    batch, kept = collate_pairs(chosen, rejected, eos_id=EOS, pad_id=PAD, max_len=6, side="left",
                                margins=[0.5, 1.0])
    assert kept.tolist() == [0]  # the 6-token chosen + EOS exceeds max_len
    assert batch["chosen_tokens"].shape == (1, 6)
    assert batch["chosen_tokens"][0, -3:].tolist() == [5, 6, EOS]
    assert batch["rejected_mask"][0].tolist() == [False] * 4 + [True] * 2
    assert batch["margin"].tolist() == [0.5]
    check_pair_batch(batch, eos_id=EOS)


def test_initial_loss_is_ln2_and_metrics():
    chosen, rejected = synthetic_pairs(8)
    batch, _ = collate_pairs(chosen, rejected, eos_id=EOS, pad_id=PAD, max_len=16)
    m = _model("scalar")
    loss_sum, n, metrics = reward_loss_fn(m, batch, jax.random.key(0))
    assert float(n) == 8
    np.testing.assert_allclose(float(loss_sum) / 8, np.log(2.0), atol=0.02)
    assert 0 <= float(metrics["acc"]) + float(metrics["tie_rate"]) <= 1
    np.testing.assert_allclose(float(metrics["pref_loss"]), float(loss_sum) / 8, rtol=1e-6)


def _train(model, batch, steps=60, lr=3e-2):
    cfg = TrainConfig(steps=steps, lr=lr, progress=False)
    return train(model, reward_loss_fn, lambda step: batch, cfg, tx=optax.adam(lr)).losses


@pytest.mark.parametrize("head", ["scalar", "inform"])
def test_training_learns_and_evaluates(head):
    chosen, rejected = synthetic_pairs(64)
    batch, _ = collate_pairs(chosen, rejected, eos_id=EOS, pad_id=PAD, max_len=16)
    m = _model(head)
    losses = _train(m, batch)
    assert losses[-1] < 0.5 * losses[0]
    c2, r2 = synthetic_pairs(32, seed=9)
    test, _ = collate_pairs(c2, r2, eos_id=EOS, pad_id=PAD, max_len=16, side="left")
    ev = evaluate(m, [test])
    assert ev["acc"] > 0.8 and ev["n_pairs"] == 32 and ev["rewards"].shape == (64,)
    stats = fit_reward_normalization(m, [test])
    toks = np.concatenate([test["chosen_tokens"], test["rejected_tokens"]])
    mask = np.concatenate([test["chosen_mask"], test["rejected_mask"]])
    z = np.asarray(m.score(jnp.asarray(toks), jnp.asarray(mask)))
    np.testing.assert_allclose([z.mean(), z.std()], [0.0, 1.0], atol=1e-4)
    assert stats["std"] > 0


def test_save_load_roundtrip(tmp_path):
    m = _model("inform", decoder="swiglu")
    chosen, rejected = synthetic_pairs(16)
    batch, _ = collate_pairs(chosen, rejected, eos_id=EOS, pad_id=PAD, max_len=16)
    _train(m, batch, steps=3)
    fit_reward_normalization(m, [batch])
    save_reward_model(m, tmp_path / "rm")
    fresh = MeanPoolBackbone(VOCAB, 16, rngs=nnx.Rngs(123))
    m2 = load_reward_model(tmp_path / "rm", backbone=fresh)
    toks, mask = jnp.asarray(batch["chosen_tokens"]), jnp.asarray(batch["chosen_mask"])
    np.testing.assert_allclose(np.asarray(m2.score(toks, mask)), np.asarray(m.score(toks, mask)),
                               atol=1e-6)
    lat = encode_latents(m2, toks, mask, batch_size=5)
    np.testing.assert_allclose(lat["mu"], np.asarray(m(toks, mask).mu), atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        load_reward_model(tmp_path / "rm", backbone=MeanPoolBackbone(VOCAB, 16, rngs=nnx.Rngs(0)).emb)


def test_bad_batches_raise():
    with pytest.raises(ValueError, match="same number"):
        collate_pairs([[2]], [[2], [3]], eos_id=EOS, pad_id=PAD, max_len=8)
    with pytest.raises(ValueError, match="empty"):
        collate_pairs([[2], []], [[2], [3]], eos_id=EOS, pad_id=PAD, max_len=8)
    with pytest.raises(ValueError, match="longer than max_len"):
        collate_pairs([[2, 3, 4]], [[2]], eos_id=EOS, pad_id=PAD, max_len=3)
    batch, _ = collate_pairs([[2, 3], [4]], [[5], [6, 7]], eos_id=EOS, pad_id=PAD, max_len=8)
    bad = dict(batch, rejected_tokens=batch["rejected_tokens"][:1],
               rejected_mask=batch["rejected_mask"][:1])
    with pytest.raises(ValueError, match="same size"):
        check_pair_batch(bad)
    nomask = dict(batch, chosen_mask=np.zeros_like(batch["chosen_mask"]))
    with pytest.raises(ValueError, match="no non-pad token"):
        check_pair_batch(nomask)
    with pytest.raises(ValueError, match="no non-pad token"):
        evaluate(_model(), [nomask])
    with pytest.raises(ValueError, match="margin"):
        reward_loss_fn(_model(use_margin=True), batch, jax.random.key(0))
    with pytest.raises(ValueError, match="InfoRM"):
        encode_latents(_model("scalar"), batch["chosen_tokens"], batch["chosen_mask"])
