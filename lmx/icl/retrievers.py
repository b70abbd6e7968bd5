"""Demonstration retrievers: Random, TopK, TopK+MDL, ConE (TopK+ConE default, Random+ConE).

All retrievers return, per test input, N pool indices in prompt order (as OpenICL's
retrievers return index lists that ``generate_ice`` renders in that order).

* ``random``: N distinct uniform pool indices per test (``numpy.random.default_rng(seed)``).
* ``topk``: the N most cosine-similar pool sentences, most similar first (Liu et al. 2022).
* ``mdl``: TopK candidates (K = ``candidate_num``) -> :func:`lmx.icl.mdl.mdl_rerank`.
* ``cone``: candidates (TopK, or a random K-subset with ``base="random"``) ->
  :func:`lmx.icl.cone.cone_rerank` (Peng et al. 2024, arXiv:2401.12087, Sec. 3; K = 30 by
  default, their Sec. 4).

``retrieve`` dispatches by name; every method checks its inputs before any compute.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from lmx.icl.cone import cone_rerank
from lmx.icl.lm import ScoringLM
from lmx.icl.mdl import mdl_rerank
from lmx.icl.retrieval import topk_cosine
from lmx.icl.templates import PromptTemplate

__all__ = ["DemoPool", "random_retrieve", "topk_retrieve", "mdl_retrieve", "cone_retrieve",
           "retrieve", "METHODS"]

METHODS = ("random", "topk", "mdl", "cone")


@dataclasses.dataclass
class DemoPool:
    """Demonstration pool: examples (str or column mapping), int labels, optional embeddings
    float32 [P, D] (L2-normalised sentence embeddings of the retrieval text)."""

    examples: list
    labels: np.ndarray
    embeddings: np.ndarray | None = None

    def __post_init__(self):
        self.examples = list(self.examples)
        self.labels = np.asarray(self.labels, np.int64)
        if len(self.examples) == 0:
            raise ValueError("the demonstration pool is empty")
        if self.labels.shape != (len(self.examples),):
            raise ValueError(f"labels must have shape ({len(self.examples)},), got "
                             f"{self.labels.shape}")
        if self.embeddings is not None:
            self.embeddings = np.asarray(self.embeddings, np.float32)
            if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.examples):
                raise ValueError(f"embeddings must be [{len(self.examples)}, D], got "
                                 f"{self.embeddings.shape}")

    def __len__(self) -> int:
        return len(self.examples)


def _check_n(n: int, size: int, what: str = "n"):
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= size:
        raise ValueError(f"{what} must be an int in [1, pool size={size}], got {n!r}")


def random_retrieve(pool: DemoPool, n_tests: int, n: int, *, seed: int = 0) -> np.ndarray:
    """int32 [n_tests, n]: independent uniform N-subsets without replacement, deterministic
    in ``seed`` (test i is the i-th draw of one generator)."""
    _check_n(n, len(pool))
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(len(pool), n, replace=False) for _ in range(n_tests)]
                    ).astype(np.int32) if n_tests else np.zeros((0, n), np.int32)


def _need_embeddings(pool: DemoPool, query_emb):
    if pool.embeddings is None:
        raise ValueError("this retriever needs pool.embeddings (encode the pool first)")
    q = np.asarray(query_emb, np.float32)
    if q.ndim != 2 or q.shape[1] != pool.embeddings.shape[1]:
        raise ValueError(f"query_emb must be [Q, {pool.embeddings.shape[1]}], got {q.shape}")
    return q


def topk_retrieve(pool: DemoPool, query_emb, n: int, **search_kw) -> np.ndarray:
    """int32 [Q, n]: most similar pool indices first (ties -> lower index)."""
    _check_n(n, len(pool))
    q = _need_embeddings(pool, query_emb)
    if q.shape[0] == 0:
        return np.zeros((0, n), np.int32)
    return topk_cosine(q, pool.embeddings, n, **search_kw)[1]


def mdl_retrieve(lm: ScoringLM, template: PromptTemplate, pool: DemoPool, tests: Sequence,
                 query_emb, n: int, *, candidate_num: int = 30, select_time: int = 10,
                 seed: int = 0, progress: bool = False, **search_kw) -> np.ndarray:
    """TopK+MDL: int32 [Q, n] (see :mod:`lmx.icl.mdl`)."""
    _check_n(candidate_num, len(pool), "candidate_num")
    if not 1 <= n <= candidate_num:
        raise ValueError(f"n must be in [1, candidate_num={candidate_num}], got {n}")
    cand = topk_retrieve(pool, query_emb, candidate_num, **search_kw)
    return mdl_rerank(lm, template, pool.examples, pool.labels, tests, cand, n,
                      select_time=select_time, seed=seed, progress=progress)[0]


def cone_retrieve(lm: ScoringLM, template: PromptTemplate, pool: DemoPool, tests: Sequence,
                  query_emb, n: int, *, candidate_num: int = 30, base: str = "topk",
                  mode: str = "exact", score_label: str | None = None, reduce: str = "sum",
                  seed: int = 0, progress: bool = False, **search_kw) -> np.ndarray:
    """ConE re-ranking of K candidates from ``base`` ("topk" default, or "random"):
    int32 [Q, n], lowest conditional entropy first."""
    _check_n(candidate_num, len(pool), "candidate_num")
    if not 1 <= n <= candidate_num:
        raise ValueError(f"n must be in [1, candidate_num={candidate_num}], got {n}")
    if base == "topk":
        cand = topk_retrieve(pool, query_emb, candidate_num, **search_kw)
    elif base == "random":
        cand = random_retrieve(pool, len(tests), candidate_num, seed=seed)
    else:
        raise ValueError(f"base must be 'topk' or 'random', got {base!r}")
    return cone_rerank(lm, template, pool.examples, pool.labels, tests, cand, n, mode=mode,
                       score_label=score_label, reduce=reduce, progress=progress)[0]


def retrieve(method: str, *, pool: DemoPool, tests: Sequence, n: int, query_emb=None,
             lm: ScoringLM | None = None, template: PromptTemplate | None = None,
             seed: int = 0, **kw) -> np.ndarray:
    """Dispatch: ``method`` in ``METHODS``; returns int32 [len(tests), n] pool indices.

    Raises ValueError for an unknown method or a missing ``lm``/``template``/``query_emb``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "random":
        return random_retrieve(pool, len(tests), n, seed=seed)
    if query_emb is None and not (method == "cone" and kw.get("base") == "random"):
        raise ValueError(f"method {method!r} needs query_emb")
    if method == "topk":
        return topk_retrieve(pool, query_emb, n, **kw)
    if lm is None or template is None:
        raise ValueError(f"method {method!r} needs lm and template")
    if method == "mdl":
        return mdl_retrieve(lm, template, pool, tests, query_emb, n, seed=seed, **kw)
    return cone_retrieve(lm, template, pool, tests, query_emb, n, seed=seed, **kw)
