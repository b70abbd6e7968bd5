"""Training loop: GTSP schedules inside fit, data-parallel equivalence, orbax resume."""
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from graph_helpers import TINY
from graphs import data, gtsp, models, train
from graphs.parallel import data_mesh

TRAIN_IDX = np.arange(48)
# one padding bucket: every train/event function compiles once per test
FC = dict(steps=6, batch_size=16, num_buckets=1)
CLEAN = gtsp.GTSPConfig(mode="clean", head=0.5, weight=0.5, layer=0.5, update_every=2)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def gps_cfg(mutag):
    return models.config_for(mutag, "gps", **{**TINY, "pe": "rwse"})


@pytest.fixture(scope="module")
def clean_run(mutag, gps_cfg, tmp_path_factory):
    """Clean GTSP fit with checkpoints every 3 steps; shared by the export and resume tests."""
    d = tmp_path_factory.mktemp("ckpt")
    fc = train.FitConfig(**FC, ckpt_dir=str(d / "a"), ckpt_every=3)
    return d, train.fit(models.make_model(gps_cfg, seed=0), mutag, TRAIN_IDX, fc, CLEAN)


def test_fit_faithful_granet_and_heads(mutag):
    cfg = models.config_for(mutag, "graphtrans", **TINY)
    m = models.make_model(cfg)
    g = gtsp.GTSPConfig(mode="faithful", head=0.5, weight=0.5, token=0.25, layer=0.25,
                        update_every=2, prune_start=0.2, prune_end=0.8)
    r = train.fit(m, mutag, TRAIN_IDX, train.FitConfig(**FC), g)
    assert len(r.losses) == 6 and np.isfinite(r.losses).all()
    # after the last GraNet event the global density is the target (+- 1 element)
    params = nnx.state(r.model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params) if x.ndim >= 2)
    assert abs(gtsp.density(r.weight_masks, params) * total - 0.5 * total) <= 1
    # pruned weights are physically zero; active head count constant (death/regrowth)
    for p, mk in zip(jax.tree.leaves(params), jax.tree.leaves(r.weight_masks)):
        assert float(np.abs(np.asarray(p)[np.asarray(mk) == 0]).sum()) == 0.0
    assert r.head_mask.sum(1).tolist() == [1, 1]
    ev = train.evaluate(r.model, mutag, np.arange(100, 140), gates=r.gates, mode="faithful",
                        num_buckets=1)
    assert 0.0 <= ev["rocauc"] <= 1.0


def test_fit_clean_then_export_matches(mutag, gps_cfg, clean_run):
    _, r = clean_run
    assert len(r.losses) == 6 and np.isfinite(r.losses).all()
    assert r.head_mask.sum(1).tolist() == [1, 1] and r.layer_keep.sum() == 1
    assert r.ffn_units.sum() == pytest.approx(0.5 * r.ffn_units.size, abs=1)
    keep = r.layer_keep
    gates = gtsp.gates_from(gps_cfg, head=r.head_mask, ffn_units=r.ffn_units, layer=keep)
    ex = gtsp.export_clean(r.model, head_mask=r.head_mask, ffn_units=r.ffn_units, layer_keep=keep)
    a = train.evaluate(r.model, mutag, np.arange(100, 140), gates=gates, num_buckets=1)
    b = train.evaluate(ex, mutag, np.arange(100, 140), num_buckets=1)
    assert a["rocauc"] == pytest.approx(b["rocauc"], abs=1e-6)


def test_checkpoint_resume_reproduces_run(mutag, gps_cfg, clean_run):
    d, full = clean_run
    assert sorted(p.name for p in (d / "a").iterdir() if p.name.isdigit()) == ["3", "6"]
    shutil.copytree(d / "a", d / "b")
    shutil.rmtree(d / "b" / "6")
    fc_b = train.FitConfig(**FC, ckpt_dir=str(d / "b"), ckpt_every=3)
    # different init seed: everything after step 3 must come from the checkpoint (params,
    # optimizer, GTSP head/unit masks) and the step-indexed data stream
    resumed = train.fit(models.make_model(gps_cfg, seed=7), mutag, TRAIN_IDX, fc_b, CLEAN)
    assert len(resumed.losses) == 3
    np.testing.assert_allclose(resumed.losses, full.losses[3:], atol=1e-6)
    np.testing.assert_array_equal(resumed.head_mask, full.head_mask)
    np.testing.assert_array_equal(resumed.ffn_units, full.ffn_units)
    for a, b in zip(_params(full.model), _params(resumed.model)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_data_parallel_step_equals_single_device(mutag, gps_cfg):
    # 16 graphs as one batch on one device vs two 8-graph batches on two devices (same padding
    # budget). The 1-device call has the clean fit's model, optimizer, bucket and placement, so it
    # reuses that compile when ``clean_run`` ran first; only the 2-device step compiles here.
    fc = train.FitConfig(**FC)
    budget = data.bucket_budgets(mutag.subset(TRAIN_IDX), fc.batch_size, fc.num_buckets)
    idx = TRAIN_IDX[:16]
    one = data.make_batches(mutag, idx, 16, spec=gps_cfg.batch_spec(), buckets=budget)
    two = [data.make_batches(mutag, half, 8, spec=gps_cfg.batch_spec(), buckets=budget)[0]
           for half in (idx[:8], idx[8:])]
    assert (len(one), len(two)) == (1, 2)
    gd, params, rest = nnx.split(models.make_model(gps_cfg, seed=0), nnx.Param, ...)
    tx = train._optimizer(fc.lr, fc.weight_decay, fc.warmup, fc.steps, fc.clip)
    step = train.make_train_step(gd, tx, "binary", CLEAN.mode, CLEAN.double_step)
    results = []
    for D, bs in ((1, one), (2, two)):
        mesh = data_mesh(D)
        assert mesh.axis_names == ("data", "fsdp", "tensor")
        rep = train.replicated(mesh)
        stacked = jax.device_put(data.stack_batches(bs), train.batch_sharding(mesh))
        p, _, loss = step(jax.device_put(params, rep), rest, jax.device_put(tx.init(params), rep),
                          jax.device_put(gtsp.ones_masks(params), rep), models.full_gates(gps_cfg),
                          stacked, jax.random.key(0))
        results.append((float(loss), jax.tree.leaves(p)))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # the sharded batch really is split over two devices
    assert len(stacked.graph.nodes.sharding.device_set) == 2
    with pytest.raises(ValueError, match="n_devices"):
        data_mesh(0)


def test_jit_stability_one_compile_per_bucket(mutag):
    cfg = models.config_for(mutag, "graphtrans", **TINY)
    m = models.make_model(cfg)
    gd, state = nnx.split(m)
    traces = []

    @jax.jit
    def fwd(state, b, gates):
        traces.append(1)
        return nnx.merge(gd, state)(b, gates)

    buckets = data.bucket_budgets(mutag, 16, num_buckets=2)
    bs = data.make_batches(mutag, np.arange(len(mutag)), 16, spec=cfg.batch_spec(),
                           buckets=buckets)
    for i, b in enumerate(bs):
        g = gtsp.gates_from(cfg, token_keep=1.0 - 0.1 * (i % 3), head=[[1, i % 2], [1, 1]])
        fwd(state, b, g)
    assert len(traces) == len(buckets)
