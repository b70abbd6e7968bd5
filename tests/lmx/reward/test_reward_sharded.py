"""RM training on the shared loop: a sharded step (8 fake CPU devices, data x fsdp x tensor) equals
the 1-device step (heads replicated, backbone sharded), and training through ``lmx.train.train`` learns."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from lmx.models import ModelConfig, Transformer
from lmx.parallel import make_mesh
from lmx.reward.model import RewardConfig, RewardModel, make_head
from lmx.reward.trainer import collate_pairs, evaluate, reward_loss_fn
from lmx.train import TrainConfig, train
from reward_backbones import EOS, PAD, MeanPoolBackbone, synthetic_pairs

TINY = ModelConfig.tiny_llama(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                              d_ff=64, max_seq_len=32)


def _rm(head):
    cfg = RewardConfig(head=head, latent_dim=8)
    rngs = nnx.Rngs(0)
    return RewardModel(Transformer(TINY, rngs=rngs), make_head(cfg, TINY.d_model, rngs=rngs), cfg)


def test_sharded_train_step_equals_single_device():
    # InfoRM head: covers the scalar path plus the reparameterisation noise, drawn from one
    # global key so sharding cannot change it.
    head = "inform"
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    chosen, rejected = synthetic_pairs(8, seed=3)
    batch, _ = collate_pairs(chosen, rejected, eos_id=EOS, pad_id=PAD, max_len=16, side="left")
    cfg = TrainConfig(steps=2, lr=1e-2, progress=False, seed=5)
    single = train(_rm(head), reward_loss_fn, lambda step: batch, cfg)
    sharded = train(_rm(head), reward_loss_fn, lambda step: batch, cfg,
                    mesh=make_mesh(data=2, fsdp=2, tensor=2))
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-5)
    # the backbone and its Adam moments stay FSDP-sharded through the steps; the head is replicated
    params, adam = sharded.state.params, sharded.state.opt_state[1][0]
    assert params["backbone"]["wqkv"][...].sharding.spec[1] == "fsdp"
    assert adam.mu["backbone"]["wqkv"][...].sharding == params["backbone"]["wqkv"][...].sharding
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params["head"]))
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(single.model, nnx.Param)),
                              nnx.to_flat_state(nnx.state(sharded.model, nnx.Param))):
        # Adam divides each coordinate by its gradient's RMS, so near-zero gradients whose last
        # bits differ (another reduction order across shards) move by a small fraction of lr.
        np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), rtol=1e-4,
                                   atol=5e-3 * cfg.lr, err_msg=str(p))


def test_shared_loop_trains_inform_rm(tmp_path):
    chosen, rejected = synthetic_pairs(64)
    batch, _ = collate_pairs(chosen, rejected, eos_id=EOS, pad_id=PAD, max_len=16)
    cfg = RewardConfig(head="inform", latent_dim=8, beta=0.01)
    rngs = nnx.Rngs(0)
    rm = RewardModel(MeanPoolBackbone(32, 16, rngs=rngs), make_head(cfg, 16, rngs=rngs), cfg)

    def get_batch(step):
        sel = np.random.default_rng(step).choice(64, 32, replace=False)
        return {k: v[sel] for k, v in batch.items()}

    tcfg = TrainConfig(steps=40, lr=3e-2, progress=False, accum_steps=2,
                       ckpt_dir=str(tmp_path / "ckpt"), ckpt_every=20)
    result = train(rm, reward_loss_fn, get_batch, tcfg)
    assert np.mean(result.losses[-5:]) < 0.6 * np.mean(result.losses[:3])
    assert {"pref_loss", "kl", "acc"} <= set(result.history[-1])
    c2, r2 = synthetic_pairs(32, seed=9)
    test, _ = collate_pairs(c2, r2, eos_id=EOS, pad_id=PAD, max_len=16, side="left")
    assert evaluate(result.model, [test])["acc"] > 0.8
    # resuming from the finished run's checkpoint trains no further steps
    again = train(rm, reward_loss_fn, get_batch, dataclasses.replace(tcfg))
    assert again.step == 40 and len(again.losses) == 40


def test_save_load_rebuilds_transformer_backbone(tmp_path):
    from lmx.reward.trainer import load_reward_model, save_reward_model

    rm = _rm("inform")
    save_reward_model(rm, tmp_path / "rm", backbone_config=dataclasses.asdict(TINY))
    rm2 = load_reward_model(tmp_path / "rm")
    toks = np.array([[3, 4, 5, EOS], [PAD, PAD, 7, EOS]], np.int32)
    mask = toks != PAD
    mask[:, -1] = True
    np.testing.assert_array_equal(np.asarray(rm2(toks, mask).mu), np.asarray(rm(toks, mask).mu))
