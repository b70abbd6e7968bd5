"""Molecule tables (``{smiles: string, label: number}``, as MoleculeNet / OGB ``mol.csv`` files
ship) for the graph transformers in ``graphs``.

:func:`load_molecule_table` checks the table and returns SMILES and float32 labels; the graphs are
built by ``graphs.smiles_to_graph`` (OGB featurisation: 9 atom and 3 bond categorical features,
Hu et al. 2020, arXiv:2005.00687), called by :func:`to_graph_dataset`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from lmx.data._load import Column, check_schema, open_split

TASKS = ("binary", "multiclass", "regression")


@dataclasses.dataclass(frozen=True)
class MoleculeTable:
    """``smiles`` (list of str), ``labels`` float32 ``[G, T]`` (NaN = missing), ``task``."""

    name: str
    smiles: list
    labels: np.ndarray
    task: str

    def __len__(self) -> int:
        return len(self.smiles)


def load_molecule_table(source: Any = None, *, split: str = "train", data_files: Any = None,
                        smiles_column: str = "smiles",
                        label_columns: Sequence[str] = ("label",), task: str = "binary",
                        name: str = "molecules", **kw) -> MoleculeTable:
    """A SMILES + label table, checked (map-style).

    Raises:
      ValueError: unknown task, missing columns, empty SMILES (the row is named), binary labels
        other than 0/1/NaN. TypeError: SMILES not strings or labels not numbers.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    ds = open_split(source, split=split, data_files=data_files, streaming=False, **kw)
    schema = [Column(smiles_column, "string")] + [Column(c, "number") for c in label_columns]
    check_schema(ds, schema, "molecule")
    smiles = list(ds[smiles_column])
    empty = next((i for i, s in enumerate(smiles) if s is None or not s.strip()), None)
    if empty is not None:
        raise ValueError(f"row {empty}: empty {smiles_column!r}")
    labels = np.stack([np.asarray([np.nan if v is None else v for v in ds[c]], np.float32)
                       for c in label_columns], axis=1)
    if task == "binary":
        bad = np.flatnonzero(~(np.isnan(labels) | (labels == 0) | (labels == 1)).all(axis=1))
        if bad.size:
            raise ValueError(f"row {int(bad[0])}: binary labels must be 0, 1 or missing, got "
                             f"{labels[bad[0]].tolist()}")
    return MoleculeTable(name, smiles, labels, task)


def to_graph_dataset(table: MoleculeTable, *, skip_invalid: bool = False):
    """``graphs.GraphDataset`` of the table via ``graphs.smiles_to_graph``.

    ``skip_invalid``: drop SMILES RDKit cannot parse (as ``graphs``' bundled loaders do) instead
    of raising ValueError naming the row.
    """
    from graphs.data import OGB_ATOM_VOCAB, OGB_BOND_VOCAB, GraphDataset, smiles_to_graph

    graphs, keep = [], []
    for i, s in enumerate(table.smiles):
        try:
            g = smiles_to_graph(s)
        except ValueError as e:
            if skip_invalid:
                continue
            raise ValueError(f"row {i}: {e}") from None
        if int(g.n_node[0]) == 0:
            if skip_invalid:
                continue
            raise ValueError(f"row {i}: smiles {s!r} has no atoms")
        graphs.append(g)
        keep.append(i)
    if not graphs:
        raise ValueError("no molecule of the table could be featurised")
    labels = table.labels[np.asarray(keep)]
    num_classes = int(np.nanmax(labels)) + 1 if table.task == "multiclass" else 0
    return GraphDataset(table.name, graphs, labels, table.task, node_vocab=OGB_ATOM_VOCAB,
                        edge_vocab=OGB_BOND_VOCAB, num_classes=num_classes)
