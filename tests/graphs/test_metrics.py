"""Metric parity with the OGB evaluator's definitions and sklearn."""
import importlib.util

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from graphs import metrics


def test_rocauc_and_ap_match_sklearn_with_nans_and_ties():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    s = np.round(rng.normal(size=(200, 3)) + y, 1)          # rounding creates ties
    y[rng.random((200, 3)) < 0.2] = np.nan
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)       # task 2 has one class: skipped
    auc = np.mean([roc_auc_score(y[~np.isnan(y[:, t]), t], s[~np.isnan(y[:, t]), t])
                   for t in range(2)])
    ap = np.mean([average_precision_score(y[~np.isnan(y[:, t]), t], s[~np.isnan(y[:, t]), t])
                  for t in range(2)])
    assert metrics.roc_auc_ogb(y, s) == pytest.approx(auc, abs=1e-12)
    assert metrics.average_precision_ogb(y, s) == pytest.approx(ap, abs=1e-12)


def test_rocauc_errors():
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_auc_ogb(np.ones((4, 1)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="must both be"):
        metrics.roc_auc_ogb(np.ones((4, 1)), np.zeros((3, 1)))


@pytest.mark.skipif(importlib.util.find_spec("ogb") is None, reason="ogb not installed")
def test_matches_ogb_evaluator_file():
    import pathlib

    path = pathlib.Path(importlib.util.find_spec("ogb").origin).parent / "graphproppred" / "evaluate.py"
    found = importlib.util.spec_from_file_location("ogb_eval", path)
    mod = importlib.util.module_from_spec(found)
    found.loader.exec_module(mod)
    rng = np.random.default_rng(1)
    y = (rng.random((100, 1)) < 0.4).astype(float)
    s = rng.normal(size=(100, 1))
    ref = mod.Evaluator("ogbg-molhiv").eval({"y_true": y, "y_pred": s})["rocauc"]
    assert metrics.roc_auc_ogb(y, s) == pytest.approx(ref, abs=1e-12)


def test_accuracy_mae_rmse():
    assert metrics.accuracy([0, 1, 1], np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])) == 2 / 3
    assert metrics.accuracy([0, 1], np.array([[-1.0], [0.5]])) == 1.0
    assert metrics.mae([[1.0], [np.nan], [3.0]], [[2.0], [9.0], [1.0]]) == 1.5
    assert metrics.rmse([[1.0], [3.0]], [[2.0], [1.0]]) == pytest.approx(np.sqrt(2.5))
