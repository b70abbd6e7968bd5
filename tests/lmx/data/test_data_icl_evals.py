"""Labelled pools (SST-2 / MR style) -> ICL selection and scoring through ``lmx.icl``; HumanEval
and OOP problems as ``datasets`` -> ``lmx.evals`` execution and pass@k."""
import dataclasses
import gzip
import json

import datasets
import numpy as np
import pytest
from flax import nnx

from lmx.data import (load_classification_pool, load_humaneval_dataset, load_oop_dataset,
                      shipped_oop_file)
from lmx.evals import OOPProblem, Sandbox, evaluate, load_oop, parse_keywords, pass_at_k
from lmx.icl import DemoPool, PromptTemplate, from_lmx, ppl_classify, topk_retrieve
from lmx.models import ModelConfig, Transformer

SENTS = ["a gorgeous, witty film", "dull and lifeless", "a triumph of acting", "boring plot",
         "the best movie this year", "painfully slow", "charming and moving", "a waste of time"]


def _char_embed(texts):
    v = np.zeros((len(texts), 128), np.float32)
    for i, t in enumerate(texts):
        for c in t.encode():
            v[i, c % 128] += 1
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_sst2_style_pool_classlabel_names_and_icl(tmp_path, tok, cache):
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    f = tmp_path / "sst2.parquet"
    datasets.Dataset.from_dict({"sentence": SENTS, "label": [1, 0] * 4},
                               features=feats).to_parquet(str(f))
    pool = load_classification_pool(str(f), cache_dir=cache,
                                    label_words={"negative": "terrible", "positive": "great"})
    assert pool.label_names == ("negative", "positive")
    assert pool.label_words == ("terrible", "great")
    assert pool.labels.tolist() == [1, 0] * 4 and pool.texts == SENTS
    template = PromptTemplate("Review: {input}\nSentiment: {label}", labels=pool.label_words)
    demos = DemoPool(pool.texts, pool.labels, _char_embed(pool.texts))
    tests = ["a moving triumph", "slow and dull"]
    idx = topk_retrieve(demos, _char_embed(tests), 2)
    assert idx.shape == (2, 2) and idx.dtype == np.int32
    model = Transformer(ModelConfig.tiny_llama(vocab_size=len(tok), d_model=32, n_layers=1,
                                               n_heads=2, n_kv_heads=1, d_ff=64),
                        rngs=nnx.Rngs(0))
    pred, nll = ppl_classify(from_lmx(model, tok), template, demos.examples, demos.labels,
                             tests, idx)
    assert nll.shape == (2, 2) and np.isfinite(nll).all()
    assert set(pred.tolist()) <= {0, 1}


def test_mr_style_csv_with_string_labels(tmp_path, cache):
    f = tmp_path / "mr.csv"
    f.write_text("text,label\n" + "".join(f'"{s}",{"pos" if i % 2 == 0 else "neg"}\n'
                                          for i, s in enumerate(SENTS)))
    with pytest.raises(ValueError, match="pass label_names"):
        load_classification_pool(str(f), cache_dir=cache)
    pool = load_classification_pool(str(f), cache_dir=cache, label_names=["neg", "pos"])
    assert pool.labels.tolist() == [1, 0] * 4 and pool.label_words == ("neg", "pos")
    with pytest.raises(ValueError, match="row 0: label 'pos' is not one of"):
        load_classification_pool(str(f), cache_dir=cache, label_names=["negative", "positive"])
    g = tmp_path / "test.jsonl"
    g.write_text("".join(json.dumps({"sentence": s, "label": -1}) + "\n" for s in SENTS))
    with pytest.raises(ValueError, match="row 0: label -1 is outside \\[0, 2\\)"):
        load_classification_pool(str(g), cache_dir=cache, label_names=["neg", "pos"])


HE = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
       "canonical_solution": "    return a + b\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"},
      {"task_id": "HumanEval/1", "prompt": "def neg(x):\n",
       "canonical_solution": "    return -x\n",
       "test": "def check(candidate):\n    assert candidate(4) == -4\n", "entry_point": "neg"}]


def test_humaneval_gz_jsonl_evaluated_in_the_sandbox(tmp_path, cache):
    f = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(f, "wt") as out:
        out.write("".join(json.dumps(r) + "\n" for r in HE))
    ds = load_humaneval_dataset(str(f), cache_dir=cache)
    problems = list(ds)
    assert problems == HE
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    samples.append({"task_id": "HumanEval/1", "completion": "    return x\n"})
    with Sandbox(timeout=10.0) as sb:
        report = evaluate(problems, samples, sandbox=sb, workers=2)
    assert [r["passed"] for r in report.records] == [True, True, False]
    # per problem: 1/1 and 1/2 correct
    assert report.table["overall"]["pass@1"] == pytest.approx(np.mean(pass_at_k([1, 2], [1, 1], 1)))


def test_shipped_oop_file_as_dataset_matches_lmx_evals():
    ds = load_oop_dataset()  # lmx/evals/data/oop_data_all.jsonl.gz
    ref = load_oop()
    assert len(ds) == len(ref) == 431
    assert list(ds["task_id"]) == [p.task_id for p in ref]
    row = ds[5]
    prob = OOPProblem(task_id=row["task_id"], question=row["question"],
                      test_list=tuple(row["test_list"]), test_function=row["test_function"],
                      entry_point=row["entry_point"], keywords=parse_keywords(row["test_matching"]),
                      level=None, test_matching=row["test_matching"],
                      test_match_function=row["test_match_function"])
    assert prob == dataclasses.replace(ref[5], level=None)
    assert shipped_oop_file("difficulty").name == "oop_data_difficulty.jsonl.gz"
    with pytest.raises(ValueError, match="split must be one of"):
        shipped_oop_file("hard")
