"""ConE: rank demonstrations by the LM's conditional entropy of the test input (Peng et al. 2024).

Peng et al. 2024 (arXiv:2401.12087), Sec. 3, Eq. (1)-(2): for a candidate demonstration c and test
input x,

    ConE(c) = H_theta(x | c) = sum_{i in x} -log p_theta(x_i | c, x_<i)
            = NLL(c + x) - NLL(c),

and the best demonstrations are those with the lowest score. As in the official code (github
``Romainpkq/revisit_demon_selection_in_ICL``, ``openicl/icl_retriever/icl_cone_retriever.py``),
each of the K TopK candidates is scored *alone* as a one-shot context, the candidates are sorted
ascending and the first N are kept, in that order (lowest entropy first in the prompt).

Two tokenisation/span modes:

* ``mode="exact"`` (default; our choice, so that Eq. (2) holds exactly): the demonstration
  (rendered with its gold label and the ICE separator) and the test query
  (``Review: <x>\\nSentiment:``) are tokenised as separate segments and concatenated, so the
  scored span is exactly the query tokens and the identity sum_{i in x} NLL = NLL(c + x) - NLL(c)
  holds to float precision. ``score_label="first"`` also scores the first token of ``labels[0]``'s
  answer.
* ``mode="faithful"`` (reproduces the official ``icl_cone_retriever.py``): one joint string
  ``demo + query + answer(labels[0])`` is tokenised; m = #tokens of the demo string alone (with the
  tokenizer's prefix), t = #tokens of the string cut right after the last occurrence of the
  template key word; the code sums the *shifted* NLL over [m, t), i.e. targets m+1 .. t: it skips
  the first test token and scores the first token of ``labels[0]`` (the official off-by-one).

``reduce="sum"`` (paper/code) or ``"mean"`` (per scored token).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lmx.icl.lm import ScoringLM, sequence_logprobs, span_nll
from lmx.icl.templates import PromptTemplate

__all__ = ["cone_sequence", "cone_scores", "cone_rerank"]

_MODES = ("exact", "faithful")


def _check(mode: str, score_label, reduce: str):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if score_label not in (None, "first"):
        raise ValueError(f"score_label must be None or 'first', got {score_label!r}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def cone_sequence(lm: ScoringLM, template: PromptTemplate, demo, demo_label: int, test, *,
                  mode: str = "exact", score_label: str | None = None
                  ) -> tuple[list[int], int, int]:
    """Token ids of the one-shot prompt and the scored target span ``[start, end)``.

    Returns (ids, start, end): tokens ids[start:end] are the targets whose NLL makes the score.
    Raises ValueError for an unknown mode/score_label or an empty scored span.
    """
    _check(mode, score_label, "sum")
    ice = template.instruction + template.demo(demo, demo_label)
    query = template.query(test)
    if mode == "exact":
        segs = [ice, query] + ([template.answer(0)] if score_label == "first" else [])
        ids, b = lm.ids(*segs)
        start, end = b[1], b[2] + (1 if score_label == "first" and b[3] > b[2] else 0)
    else:
        full = ice + query + template.answer(0)
        ids, _ = lm.ids(full)
        m = len(lm.ids(ice)[0])
        kw = template.key_word()
        pos = full.rfind(kw) + len(kw) if kw is not None else len(ice + query)
        t = len(lm.ids(full[:pos])[0])
        start, end = m + 1, min(t + 1, len(ids))
    if not 1 <= start < end <= len(ids):
        raise ValueError(f"empty ConE span [{start}, {end}) for a prompt of {len(ids)} tokens")
    return ids, start, end


def cone_scores(lm: ScoringLM, template: PromptTemplate, demos: Sequence[tuple], test, *,
                mode: str = "exact", score_label: str | None = None,
                reduce: str = "sum") -> np.ndarray:
    """ConE score of each one-shot demonstration ``(example, label)`` for one test input.

    Returns float32 [K] (lower = better). Raises ValueError for an empty ``demos`` or bad flags.
    """
    _check(mode, score_label, reduce)
    if len(demos) == 0:
        raise ValueError("demos must hold at least one (example, label) pair")
    seqs = [cone_sequence(lm, template, x, y, test, mode=mode, score_label=score_label)
            for x, y in demos]
    lps = sequence_logprobs(lm, [s[0] for s in seqs])
    out = np.empty(len(seqs), np.float32)
    for i, ((_, a, b), lp) in enumerate(zip(seqs, lps)):
        total, count = span_nll(lp, a, b)
        out[i] = total / count if reduce == "mean" else total
    return out


def cone_rerank(lm: ScoringLM, template: PromptTemplate, pool_examples: Sequence,
                pool_labels: Sequence[int], tests: Sequence, candidates: np.ndarray, n: int, *,
                mode: str = "exact", score_label: str | None = None, reduce: str = "sum",
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each test's candidate pool indices by ConE and keep the best ``n``.

    Args:
      candidates: int [Q, K] pool indices per test (e.g. TopK order, most similar first).
      n: demonstrations to keep, 1 <= n <= K.

    Returns:
      (selected int32 [Q, n] pool indices sorted by ascending score, ties keep candidate order;
       scores float32 [Q, K] in candidate order).

    Raises ValueError for mismatched lengths, n outside [1, K], indices outside the pool.
    """
    _check(mode, score_label, reduce)
    cand = np.asarray(candidates)
    if cand.ndim != 2 or cand.shape[0] != len(tests):
        raise ValueError(f"candidates must be int [Q={len(tests)}, K], got shape {cand.shape}")
    if not 1 <= n <= cand.shape[1]:
        raise ValueError(f"n must be in [1, K={cand.shape[1]}], got {n}")
    if cand.size and (cand.min() < 0 or cand.max() >= len(pool_examples)):
        raise ValueError(f"candidates must index the pool [0, {len(pool_examples)})")
    q, k = cand.shape
    seqs = [cone_sequence(lm, template, pool_examples[j], int(pool_labels[j]), tests[i],
                          mode=mode, score_label=score_label)
            for i in range(q) for j in cand[i]]
    lps = sequence_logprobs(lm, [s[0] for s in seqs], progress=progress, desc="ConE scoring")
    scores = np.empty(q * k, np.float32)
    for r, ((_, a, b), lp) in enumerate(zip(seqs, lps)):
        total, count = span_nll(lp, a, b)
        scores[r] = total / count if reduce == "mean" else total
    scores = scores.reshape(q, k)
    order = np.argsort(scores, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(cand, order, axis=1).astype(np.int32), scores

