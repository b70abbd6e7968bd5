"""Diagnostics of a cached ICL run: accuracy, share predicted positive, how often the prediction
equals the last demonstration's label, and how often demonstration labels equal the gold label.

``python -m benchmarks.icl_demo_labels benchmarks/results/icl_cpu_predictions.json [n_test]``
(the ``icl`` suite's per-(method, seed) cache; MR split as in that suite, ``split_seed`` 0).
Wrote ``benchmarks/results/icl_cpu_analysis.json`` for the 500-test CPU run.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from benchmarks.suites.icl import load_mr


def analyse(cache: dict, pool_y: np.ndarray, test_y: np.ndarray) -> dict:
    out = {}
    for key, rec in cache.items():
        pred, idx = np.asarray(rec["pred"]), rec["idx"]
        row = {"acc": float(np.mean(pred == test_y)), "pos_share": float(np.mean(pred == 1)),
               "select_s": rec["select_s"], "infer_s": rec["infer_s"]}
        if idx and len(idx[0]):
            row["pred_eq_last_demo_label"] = float(np.mean(pred == pool_y[[r[-1] for r in idx]]))
            row["demo_label_eq_gold"] = float(np.mean(
                [np.mean(pool_y[r] == test_y[i]) for i, r in enumerate(idx)]))
        out[key] = row
    return out


def main(argv: list[str]) -> None:
    cache = json.load(open(argv[0]))
    n_test = int(argv[1]) if len(argv) > 1 else 500
    _, pool_y, _, test_y = load_mr(0, 1000)
    print(json.dumps(analyse(cache, pool_y, test_y[:n_test]), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
