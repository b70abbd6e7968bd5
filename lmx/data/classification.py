"""Labelled classification pools for in-context learning (SST-2, MR, SUBJ, ...).

Schema: ``{text | sentence: string, label: ClassLabel | int | string}``. Label names come from the
``ClassLabel`` feature (as GLUE SST-2 and ``rotten_tomatoes`` ship), else from ``label_names``;
string labels are mapped to ids through ``label_names`` (their order fixes the ids). The label
words used in prompts default to the names and may be replaced (``label_words``), as OpenICL's
templates do (Wu et al. 2023, arXiv:2303.02913).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from lmx.data._load import Column, check_schema, open_split, pick_column


@dataclasses.dataclass(frozen=True)
class ClassificationPool:
    """``texts`` (list of str), ``labels`` int64 ``[N]`` in ``[0, len(label_names))``,
    ``label_names`` (from the data) and ``label_words`` (what a prompt says for each class)."""

    texts: list
    labels: np.ndarray
    label_names: tuple
    label_words: tuple

    def __len__(self) -> int:
        return len(self.texts)


def load_classification_pool(source: Any = None, *, split: str = "train", data_files: Any = None,
                             name: str | None = None, text_column: str | None = None,
                             label_column: str = "label",
                             label_names: Sequence[str] | None = None,
                             label_words: Sequence[str] | Mapping[str, str] | None = None,
                             limit: int | None = None, **kw) -> ClassificationPool:
    """Load a labelled pool (map-style; ICL pools are small) and check it.

    Args:
      text_column: default ``text``, else ``sentence``.
      label_names: class names by id; required when the label column is not a ``ClassLabel``.
      label_words: replacements of the names in prompts, by id (sequence) or by name (mapping).
      limit: keep the first ``limit`` rows.

    Raises:
      ValueError: missing columns; no label names; a label outside ``[0, n_classes)`` or a
        string label not among ``label_names`` (the row is named); label words of the wrong
        number. TypeError: text not a string or label not an int/string.
    """
    ds = open_split(source, split=split, data_files=data_files, name=name, streaming=False, **kw)
    col = text_column or pick_column(ds, ("text", "sentence"), "classification",
                                     ("{text: string, label}", "{sentence: string, label}"))
    import datasets

    if label_column not in ds.features:
        raise ValueError(f"classification dataset lacks column {label_column!r}; has "
                         f"{list(ds.features)}; expected {{{col}: string, {label_column}: "
                         "ClassLabel | int | string}")
    feat = ds.features[label_column]
    str_labels = isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")
    schema = [Column(col, "string")] + ([] if str_labels else [Column(label_column, "int")])
    check_schema(ds, schema, "classification")
    if isinstance(feat, datasets.ClassLabel):
        names = tuple(feat.names) if label_names is None else tuple(label_names)
        if len(names) != feat.num_classes:
            raise ValueError(f"label_names has {len(names)} names but the ClassLabel feature has "
                             f"{feat.num_classes} classes")
    elif label_names is None:
        raise ValueError(f"column {label_column!r} is {feat}, not a ClassLabel: pass label_names "
                         "(class names in id order)")
    else:
        names = tuple(label_names)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    texts = list(ds[col])
    raw = list(ds[label_column])
    if str_labels:
        index = {n: i for i, n in enumerate(names)}
        bad = next((i for i, y in enumerate(raw) if y not in index), None)
        if bad is not None:
            raise ValueError(f"row {bad}: label {raw[bad]!r} is not one of label_names {names}")
        labels = np.asarray([index[y] for y in raw], np.int64)
    else:
        labels = np.asarray(raw, np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
        if bad.size:
            raise ValueError(f"row {int(bad[0])}: label {int(labels[bad[0]])} is outside "
                             f"[0, {len(names)}) (label names {names}); unlabelled test splits "
                             "(label -1, as GLUE ships) cannot be demonstration pools")
    if label_words is None:
        words = names
    elif isinstance(label_words, Mapping):
        words = tuple(label_words.get(n, n) for n in names)
    else:
        words = tuple(label_words)
        if len(words) != len(names):
            raise ValueError(f"label_words has {len(words)} entries, need one per class "
                             f"({len(names)}: {names})")
    return ClassificationPool(texts, labels, names, words)
