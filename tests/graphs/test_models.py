"""Backbones + GTSP masks: known-answer tests (masks, gates, tokens, invariances, faithful quirks),
clean export, input errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from graph_helpers import TINY, run
from graphs import data, gtsp, models
from graphs.layers import select_tokens


def _batch(ds, cfg, idx, *, n_node=None, n_edge=None, n_graph=None, max_nodes=None):
    graphs = [ds.graphs[i] for i in idx]
    ex = {k: [v[i] for i in idx] for k, v in data.precompute(ds, cfg.batch_spec()).items()}
    tn = sum(int(g.n_node[0]) for g in graphs)
    te = sum(int(g.n_edge[0]) for g in graphs)
    return data.collate(graphs, ds.labels[idx], n_node=n_node or tn + 3, n_edge=n_edge or te + 4,
                        n_graph=n_graph or len(graphs) + 1,
                        max_nodes=max_nodes or max(int(g.n_node[0]) for g in graphs),
                        spec=cfg.batch_spec(), extras=ex)


@pytest.fixture(scope="module")
def bundle(mutag):
    """One tiny model and one padded 4-graph batch per backbone, shared by every test so each
    (structure, shape, gates) combination compiles once."""
    out = {}
    for bb in models.BACKBONES:
        cfg = models.config_for(mutag, bb, **TINY)
        out[bb] = (cfg, models.make_model(cfg, seed=1), _batch(mutag, cfg, [0, 3, 7, 11]))
    return out


@pytest.fixture(params=models.BACKBONES)
def setup(request, bundle):
    return bundle[request.param]


def _real(y, batch):
    return np.asarray(y)[np.asarray(batch.graph_mask)]


def test_all_ones_masks_equal_unpruned(setup):
    cfg, model, batch = setup
    ref = run(model, batch)
    g = models.full_gates(cfg)
    for mode in ("clean", "faithful"):
        out = run(model, batch, g, mode=mode, rng=jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    if cfg.backbone != "gps":     # one backbone is enough for the train-mode check (compile cost)
        return
    # training mode: straight-through masks differ from 1 only by rounding
    a = run(model, batch, g, train=True, rng=jax.random.key(3))
    b = run(model, batch, None, train=True, rng=jax.random.key(3))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_zero_head_gate_removes_head_exactly(setup):
    cfg, model, batch = setup
    head = np.ones((cfg.n_layers, cfg.n_heads), np.float32)
    head[0, 1] = 0.0
    gated = run(model, batch, gtsp.gates_from(cfg, head=head))
    # reference 1: same model with head 1's rows of W_O zeroed in layer 0
    m2 = nnx.clone(model)
    o = m2.layers[0].block.attn.o.kernel
    o[...] = o[...].at[cfg.head_dim:2 * cfg.head_dim].set(0.0)
    np.testing.assert_array_equal(np.asarray(gated), np.asarray(run(m2, batch, models.full_gates(cfg))))
    # (the head physically sliced out is test_clean_export_equals_masked_model)
    if cfg.backbone != "graphtrans":      # the Q/K/V path is the shared MHA: one backbone suffices
        return
    # Q/K/V weights of the gated head get exactly zero gradient
    gd, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return nnx.merge(gd, p, rest)(batch, gtsp.gates_from(cfg, head=head)).sum()

    g = nnx.merge(gd, jax.jit(jax.grad(loss))(params), rest)
    cols = slice(cfg.head_dim, 2 * cfg.head_dim)
    for p in ("q", "k", "v"):
        w = getattr(g.layers[0].block.attn, p).kernel[...]
        assert float(jnp.abs(w[:, cols]).max()) == 0.0
        assert float(jnp.abs(w[:, :cfg.head_dim]).max()) > 0.0


def test_layer_gate_zero_changes_output(setup):
    cfg, model, batch = setup
    gated = run(model, batch, gtsp.gates_from(cfg, layer=[1.0, 0.0]))
    assert not np.allclose(_real(gated, batch), _real(run(model, batch), batch))
    # (gate 0 == layer deleted at export is test_clean_export_equals_masked_model)


@pytest.mark.parametrize("layer_keep", [(1.0, 1.0), (0.0, 1.0)])
def test_clean_export_equals_masked_model(setup, layer_keep):
    """Heads, FFN units and tokens sliced/gathered (and optionally layer 0 deleted) == masks."""
    cfg, model, batch = setup
    rng = np.random.default_rng(0)
    head = np.array([[1, 0], [0, 1]], np.float32)
    units = (rng.random((cfg.n_layers, cfg.d_ff)) < 0.5).astype(np.float32)
    keep = np.array(layer_keep, np.float32)
    g = gtsp.gates_from(cfg, head=head, ffn_units=units, token_keep=0.5, layer=keep)
    masked = run(model, batch, g)
    ex = gtsp.export_clean(model, head_mask=head, ffn_units=units, token_keep=0.5,
                           layer_keep=keep)
    assert ex.cfg.n_layers == int(keep.sum())
    assert ex.cfg.heads == tuple(int(h.sum()) for h, k in zip(head, keep) if k)
    assert ex.cfg.ffn == tuple(int(u.sum()) for u, k in zip(units, keep) if k)
    sd = sum(x.size for x in jax.tree.leaves(nnx.state(ex, nnx.Param)))
    assert sd < sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # physical token gather (K = ceil(r M) slots) == mask-only token pruning
    np.testing.assert_allclose(_real(run(ex, batch), batch), _real(masked, batch), atol=1e-5)


def test_padding_invariance(setup, mutag):
    cfg, model, batch = setup
    big = _batch(mutag, cfg, [0, 3, 7, 11], n_node=batch.graph.nodes.shape[0] + 17,
                 n_edge=batch.graph.senders.shape[0] + 9, n_graph=8,
                 max_nodes=batch.dense_index.shape[1] + 5)
    g = gtsp.gates_from(cfg, token_keep=0.5, head=[[1, 0], [1, 1]])
    # gated (token + head masks) path: it runs every op of the unpruned path as well
    a, b = _real(run(model, batch, g), batch), _real(run(model, big, g), big)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_node_permutation_invariance(setup, mutag):
    cfg, model, batch = setup
    rng = np.random.default_rng(5)
    perm_graphs = []
    idx = [0, 3, 7, 11]
    for i in idx:
        g = mutag.graphs[i]
        n = g.n_node[0]
        p = rng.permutation(n)
        inv = np.argsort(p)
        perm_graphs.append(data.single_graph(g.nodes[p], inv[g.senders], inv[g.receivers], g.edges))
    pds = dataclasses.replace(mutag, graphs=perm_graphs, labels=mutag.labels[idx])
    pb = _batch(pds, cfg, [0, 1, 2, 3], n_node=batch.graph.nodes.shape[0],
                n_edge=batch.graph.senders.shape[0], n_graph=batch.graph_mask.shape[0],
                max_nodes=batch.dense_index.shape[1])
    ref = _real(run(model, batch), batch)
    np.testing.assert_allclose(_real(run(model, pb), pb), ref, atol=1e-5)
    # permuting the graphs permutes the outputs
    gb = _batch(mutag, cfg, idx[::-1], n_node=batch.graph.nodes.shape[0],
                n_edge=batch.graph.senders.shape[0], n_graph=batch.graph_mask.shape[0],
                max_nodes=batch.dense_index.shape[1])
    np.testing.assert_allclose(_real(run(model, gb), gb), ref[::-1], atol=1e-5)


def test_dense_equals_segment_attention(mutag, bundle):
    cfg, m, _ = bundle["gps"]
    scfg = dataclasses.replace(cfg, attention="segment")
    ms = models.GraphModel(scfg, rngs=nnx.Rngs(0))
    nnx.update(ms, nnx.state(m, nnx.Param))
    one = data.single_graph(np.zeros((1, 1), np.int32), [], [], np.zeros((0, 1), np.int32))
    ds = dataclasses.replace(mutag, graphs=mutag.graphs[:3] + [one], labels=mutag.labels[:4])
    b = _batch(ds, scfg, [0, 1, 2, 3])
    for g in (None, gtsp.gates_from(cfg, head=[[0, 1], [1, 1]], token_keep=0.5)):
        np.testing.assert_allclose(_real(run(ms, b, g), b), _real(run(m, b, g), b), atol=1e-5)


def test_clean_token_selection_counts_and_gradients():
    B, L = 3, 8
    valid = jnp.arange(L)[None, :] < jnp.array([[8], [5], [1]])
    always = jnp.zeros((B, L), bool)
    scores = jax.random.normal(jax.random.key(0), (B, L))
    for r in (1.0, 0.75, 0.5, 0.25):
        _, hard, _ = select_tokens(scores, valid, jnp.float32(r), mode="clean", train=False,
                                   rng=None, always=always)
        assert hard.sum(1).tolist() == [int(np.ceil(r * n)) for n in (8, 5, 1)]
        assert not bool((hard & ~valid).any())
    cls = jnp.zeros((B, L), bool).at[:, 0].set(True)
    _, hard, _ = select_tokens(scores, valid, jnp.float32(0.25), mode="clean", train=False,
                               rng=None, always=cls)
    assert bool(hard[:, 0].all())
    m1, h1, _ = select_tokens(scores, valid, jnp.float32(0.5), mode="clean", train=True,
                              rng=jax.random.key(4))
    m2, h2, _ = select_tokens(scores, valid, jnp.float32(0.5), mode="clean", train=True,
                              rng=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
    np.testing.assert_allclose(np.asarray(m1), np.asarray(h1, np.float32), atol=1e-6)

    def f(s):
        m, _, _ = select_tokens(s, valid, jnp.float32(0.5), mode="clean", train=True,
                                rng=jax.random.key(4))
        return (m * jnp.arange(L)).sum()

    g = jax.grad(f)(scores)
    assert float(jnp.abs(g[valid]).sum()) > 0
    assert float(jnp.abs(g[~valid]).max()) == 0.0


def test_faithful_quirks():
    B, L = 2, 8
    valid = jnp.arange(L)[None, :] < jnp.array([[8], [2]])
    scores = jnp.zeros((B, L))
    _, hard, _ = select_tokens(scores, valid, jnp.float32(0.5), mode="faithful", train=False,
                               rng=jax.random.key(0))
    counts = np.asarray(hard.sum(1))
    assert set(counts.tolist()) <= {4, 5}              # one k = floor(r L) = 4 (+ forced last)
    assert counts[1] > int(valid[1].sum())             # the 2-node graph keeps >= 4 slots
    assert bool(hard[:, -1].all())                                     # last slot forced on
    assert bool((hard & ~valid).any())                                 # padding is eligible
    _, h2, _ = select_tokens(scores, valid, jnp.float32(0.5), mode="faithful", train=False,
                             rng=jax.random.key(1))
    assert not np.array_equal(np.asarray(hard), np.asarray(h2))       # noisy top-k at eval
    with pytest.raises(ValueError, match="rng"):
        select_tokens(scores, valid, jnp.float32(0.5), mode="faithful", train=False, rng=None)


def test_faithful_head_mask_leaks_bias(bundle):
    cfg, m, b = bundle["graphtrans"]
    m = nnx.clone(m)
    for layer in m.layers:                    # nnx initialises biases at 0; the leak needs b_V != 0
        v = layer.block.attn.v.bias
        v[...] = jnp.linspace(-1.0, 1.0, v.shape[0])
    head = [[0.0, 1.0], [1.0, 1.0]]
    clean = run(m, b, gtsp.gates_from(cfg, head=head), mode="clean")
    faithful = run(m, b, gtsp.gates_from(cfg, head=head), mode="faithful", rng=jax.random.key(0))
    # the official GTSP code leaves b_V and W_O of an inactive head in place: its output is not removed
    assert float(np.abs(_real(clean, b) - _real(faithful, b)).max()) > 1e-4
    attn = m.layers[0].block.attn
    x = jnp.ones((1, 3, cfg.d_model))
    o = attn(x, jnp.ones((1, 3), bool), head_kernel_mask=jnp.array([0.0, 1.0]))
    o0 = attn(x, jnp.ones((1, 3), bool), head_gate=jnp.array([0.0, 1.0]))
    assert float(jnp.abs(o - o0).max()) > 1e-6


def test_faithful_drop_path_is_node_wise_and_identity_at_eval(bundle):
    cfg, m, b = bundle["gps"]
    g = gtsp.gates_from(cfg, drop_path=0.5)
    ev = run(m, b, g, mode="faithful", rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(ev), np.asarray(run(m, b)))
    t1 = run(m, b, g, mode="faithful", train=True, rng=jax.random.key(1))
    t2 = run(m, b, g, mode="faithful", train=True, rng=jax.random.key(2))
    assert not np.allclose(np.asarray(t1), np.asarray(t2))


def test_graphormer_bias_encodings(mutag, bundle):
    cfg, m, _ = bundle["graphormer"]
    # path graph 0-1-2 with distinct bond types 0 then 1
    g = data.single_graph(np.zeros((3, 1), np.int32), [0, 1, 1, 2], [1, 0, 2, 1],
                          np.array([[0], [0], [1], [1]], np.int32))
    ds = dataclasses.replace(mutag, graphs=[g], labels=np.ones((1, 1)))
    b = _batch(ds, cfg, [0])
    bias = np.asarray(m.graphormer_bias(b))[0]                         # [H, 4, 4]
    emb = np.asarray(m.edge_enc.table.embedding[...])                   # rows: bond type 0..3
    w = np.asarray(m.hop_w[...])
    spatial = np.asarray(m.spatial.embedding[...])
    expect = spatial[2] + (emb[0] @ w[0] + emb[1] @ w[1]) / 2.0         # node 0 -> node 2
    np.testing.assert_allclose(bias[:, 1, 3], expect, atol=1e-6)
    vb = np.asarray(m.vnode_bias[...])
    np.testing.assert_allclose(bias[:, 0, :], vb[:, None] * np.ones((1, 4)))
    np.testing.assert_allclose(bias[:, 1:, 0], vb[:, None] * np.ones((1, 3)))


def test_bad_inputs_raise(setup):
    cfg, model, batch = setup
    with pytest.raises(ValueError, match="gates.head"):
        model(batch, models.full_gates(cfg)._replace(head=jnp.ones((3, 3))))
    with pytest.raises(ValueError, match="mode"):
        model(batch, mode="fast")
    with pytest.raises(ValueError, match="rng"):
        model(batch, train=True)
    with pytest.raises(ValueError, match="every layer"):
        gtsp.export_clean(model, layer_keep=np.zeros(cfg.n_layers))


def test_wrong_feature_width_and_raw_graphs_tuple(setup, mutag):
    cfg, model, batch = setup
    # wrong node width used to surface as JAX's internal dot_general/gather TypeError
    wide = batch._replace(graph=batch.graph._replace(
        nodes=np.concatenate([batch.graph.nodes, batch.graph.nodes], 1)))
    with pytest.raises(ValueError, match=r"batch.graph.nodes.*expects width 1"):
        model(wide)
    no_edges = batch._replace(graph=batch.graph._replace(edges=None))
    with pytest.raises(ValueError, match=r"batch.graph.edges.*\[edges, 1\]"):
        model(no_edges)
    # a raw jraph GraphsTuple used to raise AttributeError: 'pe'; now it is padded on the fly
    import jraph

    idx = [0, 3, 7, 11]
    raw = jraph.batch_np([mutag.graphs[i] for i in idx])
    np.testing.assert_allclose(np.asarray(model(raw)), _real(run(model, batch), batch),
                               rtol=2e-5, atol=2e-5)
    with pytest.raises(TypeError, match=r"batch_graphs"):
        model({"nodes": raw.nodes})


def test_float_node_features_of_the_wrong_width_name_the_expected_width():
    # float nodes go through a Linear: a wrong width used to raise JAX's dot_general TypeError
    ds = data.spd_parity(4, seed=0)
    cfg = models.config_for(ds, "graphtrans", **TINY)
    model = models.make_model(cfg)
    b = _batch(ds, cfg, [0, 1])
    wide = b._replace(graph=b.graph._replace(nodes=np.pad(b.graph.nodes, ((0, 0), (0, 1)))))
    with pytest.raises(ValueError, match=r"shape \(\d+, 3\).*expects width 2 \(GTConfig node_dim"):
        model(wide)
