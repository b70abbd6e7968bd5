"""Metrics with the OGB evaluator's definitions (github.com/snap-stanford/ogb,
``ogb/graphproppred/evaluate.py``), numpy only.

``roc_auc_ogb`` / ``average_precision_ogb``: inputs ``[num_graphs, num_tasks]``; per task, only
non-NaN labels count and a task is skipped unless both classes occur among them; the result is
the mean over the remaining tasks (``ValueError`` if none remains, as OGB raises).
"""
from __future__ import annotations

import numpy as np


def _check(y_true, y_pred):
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred.reshape(-1, 1)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must both be "
                         "[num_graphs, num_tasks]")
    if np.isnan(y_pred).any():
        raise ValueError("y_pred contains NaN")
    return y_true, y_pred


def _rank_avg(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties replaced by their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, np.float64)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def binary_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC-AUC = Mann-Whitney U / (n_pos n_neg) with average ranks for ties (= sklearn)."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    r = _rank_avg(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_ap(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision sum_n (R_n - R_{n-1}) P_n over distinct thresholds (= sklearn)."""
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(ss)), ys.size - 1]
    tps = np.cumsum(ys)[distinct]
    fps = 1 + distinct - tps
    prec = tps / (tps + fps)
    rec = tps / ys.sum()
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def _per_task(fn, y_true, y_pred, name):
    y_true, y_pred = _check(y_true, y_pred)
    vals = []
    for t in range(y_true.shape[1]):
        lab = ~np.isnan(y_true[:, t])
        yt = y_true[lab, t]
        if (yt == 1).any() and (yt == 0).any():
            vals.append(fn(yt, y_pred[lab, t]))
    if not vals:
        raise ValueError(f"no task has both positive and negative labels: cannot compute {name}")
    return float(np.mean(vals))


def roc_auc_ogb(y_true, y_pred) -> float:
    """OGB ``rocauc``: mean ROC-AUC over tasks with both classes among non-NaN labels."""
    return _per_task(binary_auc, y_true, y_pred, "ROC-AUC")


def average_precision_ogb(y_true, y_pred) -> float:
    """OGB ``ap`` (molpcba): mean average precision over tasks with both classes."""
    return _per_task(binary_ap, y_true, y_pred, "AP")


def accuracy(y_true, y_pred) -> float:
    """Accuracy. ``y_pred`` ``[G]`` hard labels, ``[G, C>1]`` class logits, or ``[G, 1]`` binary
    logits (threshold 0); ``y_true`` ``[G]`` or ``[G, 1]`` integer labels."""
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred)
    if y_pred.ndim == 2 and y_pred.shape[1] > 1:
        hard = y_pred.argmax(1)
    elif y_pred.ndim == 2:
        hard = (y_pred[:, 0] > 0).astype(np.int64)
    else:
        hard = y_pred
    if hard.shape[0] != y_true.shape[0]:
        raise ValueError(f"y_true has {y_true.shape[0]} rows, y_pred {hard.shape[0]}")
    return float((hard == y_true).mean())


def mae(y_true, y_pred) -> float:
    """Mean absolute error over non-NaN labels."""
    y_true, y_pred = _check(y_true, y_pred)
    lab = ~np.isnan(y_true)
    return float(np.abs(y_true[lab] - y_pred[lab]).mean())


def rmse(y_true, y_pred) -> float:
    """Root mean squared error over non-NaN labels (OGB ``rmse`` per task, then mean)."""
    y_true, y_pred = _check(y_true, y_pred)
    out = []
    for t in range(y_true.shape[1]):
        lab = ~np.isnan(y_true[:, t])
        out.append(np.sqrt(((y_true[lab, t] - y_pred[lab, t]) ** 2).mean()))
    return float(np.mean(out))
