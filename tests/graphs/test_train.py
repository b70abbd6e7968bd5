"""GTSP training: step factories and events, fit, 1- vs 8-device equivalence, orbax resume."""
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from graph_helpers import TINY
from graphs import data, gtsp, models, train
from graphs.parallel import data_mesh, shard_batch

TRAIN_IDX = np.arange(48)
# one padding bucket: every train/event function compiles once per test
FC = dict(steps=6, batch_size=16, num_buckets=1)
CLEAN = gtsp.GTSPConfig(mode="clean", head=0.5, weight=0.5, layer=0.5, update_every=2)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def gps_cfg(mutag):
    return models.config_for(mutag, "gps", **{**TINY, "pe": "rwse"})


# the tests sharing the module fixture clean_run run on one pytest-xdist worker (under
# --dist loadgroup), so the fixture's fit runs once
CLEAN_RUN_GROUP = pytest.mark.xdist_group("graphs_clean_run")


@pytest.fixture(scope="module")
def clean_run(mutag, gps_cfg, tmp_path_factory):
    """Clean GTSP fit with checkpoints every 3 steps; shared by the export and resume tests."""
    d = tmp_path_factory.mktemp("ckpt")
    fc = train.FitConfig(**FC, ckpt_dir=str(d / "a"), ckpt_every=3)
    return d, train.fit(models.make_model(gps_cfg, seed=0), mutag, TRAIN_IDX, fc, CLEAN)


@CLEAN_RUN_GROUP
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


@CLEAN_RUN_GROUP
def test_checkpoint_resume_reproduces_run(mutag, gps_cfg, clean_run):
    d, full = clean_run
    assert sorted(p.name for p in (d / "a").iterdir() if p.name.isdigit()) == ["3", "6"]
    shutil.copytree(d / "a", d / "b")
    shutil.rmtree(d / "b" / "6")
    fc_b = train.FitConfig(**FC, ckpt_dir=str(d / "b"), ckpt_every=3)
    # different init seed: everything after step 3 must come from the checkpoint (params,
    # optimizer, GTSP head/unit masks) and the step-indexed data stream
    resumed = train.fit(models.make_model(gps_cfg, seed=7), mutag, TRAIN_IDX, fc_b, CLEAN)
    # losses of steps 1-3 come from the checkpoint's history, 4-6 are recomputed
    assert len(resumed.losses) == 6
    np.testing.assert_allclose(resumed.losses, full.losses, atol=1e-6)
    np.testing.assert_array_equal(resumed.head_mask, full.head_mask)
    np.testing.assert_array_equal(resumed.ffn_units, full.ffn_units)
    for a, b in zip(_params(full.model), _params(resumed.model)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _assert_same_run(one, eight):
    """Two GTSP runs made the same pruning decisions and reached the same parameters (f32
    round-off)."""
    np.testing.assert_allclose(one.losses, eight.losses, rtol=1e-5)
    np.testing.assert_array_equal(one.head_mask, eight.head_mask)
    np.testing.assert_array_equal(one.ffn_units, eight.ffn_units)
    np.testing.assert_array_equal(one.layer_keep, eight.layer_keep)
    for a, b in zip(jax.tree.leaves(one.weight_masks), jax.tree.leaves(eight.weight_masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    flat = [nnx.to_flat_state(nnx.state(r.model, nnx.Param)) for r in (one, eight)]
    for (path, a), (_, b) in zip(*flat):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        if path[-2:] in (("k", "bias"), ("scorer", "bias")):
            # softmax and the token scorer's softmax are shift-invariant, so these biases'
            # gradients are 0 up to round-off, which Adam's g / sqrt(v) turns into moves that
            # differ between reduction orders
            assert np.abs(a).max() < 1e-3 and np.abs(b).max() < 1e-3
            continue
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(path))


@pytest.mark.slow  # ~27 s CPU: step, event and (clean) layer-score compiles per mesh
def test_gtsp_one_device_equals_eight_devices_with_pruning_events(mutag):
    """Clean GTSP fine-tuning with token, head, weight and layer pruning: a user's own loop over
    the step factories on one device equals ``fit`` on an 8-device ``data`` mesh fed the same
    stacks of 8 padded batches (losses, event decisions, end-of-run layer importance and the
    layer it removes, params)."""
    assert jax.device_count() == 8  # tests/conftest.py forces 8 host devices
    cfg = models.config_for(mutag, "graphtrans", **{**TINY, "n_layers": 1})  # fewer compile s
    idx = TRAIN_IDX[:32]
    g = gtsp.GTSPConfig(mode="clean", token=0.25, head=0.5, weight=0.5, layer=0.5,
                        update_every=1, prune_start=0.0, prune_end=0.75)
    fc = train.FitConfig(steps=4, batch_size=4, num_buckets=1, batches_per_step=8)
    eight = train.fit(models.make_model(cfg, seed=0), mutag, idx, fc, g, mesh=data_mesh(8))

    model = models.make_model(cfg, seed=0)
    gt = train.make_gtsp_steps(model, mutag.task, fc, g, mesh=data_mesh(1))
    assert gt.events == (1, 2, 3)
    budget = data.bucket_budgets(mutag.subset(idx), fc.batch_size, fc.num_buckets)
    state, losses = gt.init(model), []
    for t in range(fc.steps):
        # fit's stream: epoch e shuffled with seed*100003 + e; 8 batches of 4 = one stack an epoch
        bs = data.make_batches(mutag, idx, fc.batch_size, spec=cfg.batch_spec(),
                               buckets=budget, shuffle_seed=fc.seed * 100003 + t)
        batch = gt.shard(data.stack_batches(bs))
        key = jax.random.fold_in(jax.random.key(fc.seed), t)
        if gt.is_event(t):
            state = gt.prune(state, batch, key)
        state, metrics = gt.step(state, batch, key)
        losses.append(float(metrics["loss"]))
    one = gt.result(state, model, mutag, idx, losses)

    _assert_same_run(one, eight)
    assert one.head_mask.sum() == 1 and one.ffn_units.sum() == 16  # the events did prune
    # the layer importance behind that choice: one stack of 8 batches summed across the mesh
    # == 8 one-batch calls on one device
    imp = [train.layer_importance(r.model, mutag, idx, fc, r.gates, "clean", mesh=data_mesh(n))
           for r, n in ((one, 1), (eight, 8))]
    assert imp[0].min() > 0
    np.testing.assert_allclose(imp[0], imp[1], rtol=1e-5)


@pytest.mark.slow  # ~27 s CPU: step, event and (clean) layer-score compiles per mesh
def test_gtsp_faithful_fit_and_one_device_equals_eight_devices(mutag):
    """Faithful GTSP (tokens, the official probe head scores with death/regrowth, GraNet weight
    masks with gradient regrowth, node-wise drop path).

    On one device with events at steps 1-3: the GraNet density reaches its target, pruned
    weights are zero, the active head count stays, the masked model evaluates.

    ``fit`` on one device with stacks of 8 batches equals ``fit`` on an 8-device ``data`` mesh
    (losses, masks, params) with one event (step 2): GraNet restarts regrown weights at zero and
    one Adam step moves each by about the learning rate, so at a following event they tie in
    magnitude to within an ulp and round-off alone decides which of them the threshold keeps
    (seen with events at steps 1-3: one swapped pair of a 16x16 kernel); the first event ranks
    trained weights, without ties. All three fits share one model structure and optimizer, so
    the one-device fits share their compiles."""
    cfg = models.config_for(mutag, "graphtrans", **{**TINY, "n_layers": 1, "dropout": 0.1})
    fc = train.FitConfig(steps=4, batch_size=4, num_buckets=1, batches_per_step=8)
    common = dict(mode="faithful", token=0.25, head=0.5, weight=0.5, layer=0.25, update_every=1)

    g3 = gtsp.GTSPConfig(**common, prune_start=0.0, prune_end=0.75)
    r = train.fit(models.make_model(cfg, seed=0), mutag, TRAIN_IDX[:32], fc, g3)
    assert len(r.losses) == 4 and np.isfinite(r.losses).all()
    # after the last GraNet event the global density is the target (+- 1 element)
    params = nnx.state(r.model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params) if x.ndim >= 2)
    assert abs(gtsp.density(r.weight_masks, params) * total - 0.5 * total) <= 1
    # pruned weights are physically zero; active head count constant (death/regrowth)
    for p, mk in zip(jax.tree.leaves(params), jax.tree.leaves(r.weight_masks)):
        assert float(np.abs(np.asarray(p)[np.asarray(mk) == 0]).sum()) == 0.0
    assert r.head_mask.sum(1).tolist() == [1]
    ev = train.evaluate(r.model, mutag, np.arange(100, 140), gates=r.gates, mode="faithful",
                        num_buckets=1)
    assert 0.0 <= ev["rocauc"] <= 1.0

    g1 = gtsp.GTSPConfig(**common, prune_start=0.5, prune_end=0.5)
    assert train.make_gtsp_steps(models.make_model(cfg), mutag.task, fc, g1).events == (2,)
    one, eight = (train.fit(models.make_model(cfg, seed=0), mutag, TRAIN_IDX[:32], fc, g1,
                            mesh=data_mesh(n)) for n in (1, 8))
    _assert_same_run(one, eight)
    params = nnx.state(one.model, nnx.Param)
    assert abs(gtsp.density(one.weight_masks, params) * total - 0.5 * total) <= 1


def test_shard_batch_needs_a_stack_that_divides(mutag, gps_cfg):
    mesh = data_mesh(8)
    b = data.make_batches(mutag, TRAIN_IDX[:8], 4, spec=gps_cfg.batch_spec())[0]
    placed = shard_batch(data.stack_batches([b] * 8), mesh)
    assert len(placed.graph.nodes.sharding.device_set) == 8
    with pytest.raises(ValueError, match="stack of 3 padded batches does not split over the 8"):
        shard_batch(data.stack_batches([b] * 3), mesh)
    with pytest.raises(ValueError, match="stacked GraphBatch"):
        shard_batch(b, mesh)
    with pytest.raises(ValueError, match="n_devices"):
        data_mesh(0)
    with pytest.raises(ValueError, match="no GTSP event at step 0"):
        gt = train.make_gtsp_steps(models.make_model(gps_cfg), "binary", train.FitConfig(**FC),
                                   CLEAN)
        gt.prune(gt.init(models.make_model(gps_cfg)), placed, jax.random.key(0))


def test_event_scores_name_unknown_kinds(gps_cfg):
    graphdef = nnx.split(models.make_model(gps_cfg), nnx.Param, ...)[0]
    with pytest.raises(ValueError, match=r"kinds must be a subset of .*'heads'"):
        train.make_event_scores(graphdef, "binary", "clean", ("heads",), data_mesh(1))


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


def test_each_process_feeds_its_block_of_the_stack(mutag, gps_cfg, monkeypatch):
    b = data.make_batches(mutag, TRAIN_IDX[:8], 4, spec=gps_cfg.batch_spec())[0]
    stack = data.stack_batches([b._replace(labels=np.full_like(b.labels, i)) for i in range(4)])
    assert train._process_block(stack) is stack                    # one process: all of it
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    mine = train._process_block(stack)
    assert mine.graph_mask.shape[0] == 2 and np.unique(mine.labels).tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="3 padded batches does not split over 2 processes"):
        train._process_block(data.stack_batches([b] * 3))
