"""Molecule tables -> ``graphs`` featurisation and one forward; corrupt files and wrong schemas
fail with a clear error (naming the file / column / expected schema) before any compute."""
import json

import datasets
import jax
import numpy as np
import pytest
from flax import nnx

from lmx.data import (load_classification_pool, load_molecule_table, load_text_corpus,
                      open_split, pack_corpus, to_graph_dataset)
from graphs import config_for, make_batches, make_model, smiles_to_graph

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN(CC)CC", "O=C=O", "C1CCCCC1"]


def test_smiles_csv_featurised_and_one_forward(tmp_path, cache):
    f = tmp_path / "mols.csv"
    f.write_text("smiles,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SMILES)))
    table = load_molecule_table(str(f), cache_dir=cache)
    assert table.smiles == SMILES and table.labels[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    ds = to_graph_dataset(table)
    assert len(ds) == 6 and ds.task == "binary"
    np.testing.assert_array_equal(ds.graphs[1].nodes, smiles_to_graph("c1ccccc1").nodes)
    cfg = config_for(ds, "graphtrans", d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0,
                     gnn_layers=1)
    model = make_model(cfg, seed=0)
    batch = make_batches(ds, np.arange(6), 6, spec=cfg.batch_spec())[0]
    # one jitted forward: eager NNX calls compile every primitive separately (slow on CPU)
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda st, b: nnx.merge(graphdef, st)(b, None, mode="clean"))(state, batch)
    assert out.shape[1] == 1 and bool(jax.numpy.isfinite(out).all())

    bad = tmp_path / "bad.csv"
    bad.write_text("smiles,label\nCCO,1\nnot_a_smiles,0\n")
    with pytest.raises(ValueError, match="row 1: RDKit could not parse"):
        to_graph_dataset(load_molecule_table(str(bad), cache_dir=cache))
    assert len(to_graph_dataset(load_molecule_table(str(bad), cache_dir=cache),
                                skip_invalid=True)) == 1
    three = tmp_path / "three.csv"
    three.write_text("smiles,label\nCCO,2\n")
    with pytest.raises(ValueError, match="row 0: binary labels must be 0, 1 or missing"):
        load_molecule_table(str(three), cache_dir=cache)


class _NoCompute:
    """A tokenizer that fails the test if anything is tokenized."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, *a, **k):
        raise AssertionError("tokenized before the schema check")


def test_corrupt_files_are_named(tmp_path, cache):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "fine"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": "cut off\n')
    with pytest.raises(ValueError, match="could not read '.*broken.jsonl' as json"):
        load_text_corpus(data_files=[str(good), str(broken)], cache_dir=cache)
    with pytest.raises(ValueError, match="could not read '.*broken.jsonl' as json"):
        load_text_corpus(data_files=[str(broken)], streaming=True)
    pq = tmp_path / "trunc.parquet"
    datasets.Dataset.from_dict({"text": ["a"] * 100}).to_parquet(str(pq))
    pq.write_bytes(pq.read_bytes()[:-40])
    with pytest.raises(ValueError, match="could not read '.*trunc.parquet' as parquet"):
        load_text_corpus(str(pq), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        open_split(data_files=str(tmp_path / "missing.jsonl"))
    odd = tmp_path / "data.xyz"
    odd.write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format of .*data.xyz"):
        open_split(str(odd))


def test_wrong_schema_fails_before_compute(tmp_path, cache):
    f = tmp_path / "ints.jsonl"
    f.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(3)))
    with pytest.raises(TypeError, match="column 'text' has type Value\\('int64'\\); expected "
                                        "string"):
        load_text_corpus(data_files=str(f), cache_dir=cache)
    ds = datasets.load_dataset("json", data_files=str(f), split="train", cache_dir=cache)
    with pytest.raises(TypeError, match="column 'text'"):
        pack_corpus(ds, _NoCompute(), 8)
    g = tmp_path / "body.jsonl"
    g.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"has columns \['body'\]; expected one of the schemas "
                                         r"\{text: string\} or \{messages: list of"):
        load_text_corpus(data_files=str(g), cache_dir=cache)
    m = tmp_path / "msgs.jsonl"
    m.write_text(json.dumps({"messages": [{"role": "user", "text": "hi"}]}) + "\n")
    with pytest.raises(TypeError, match="column 'messages' .*expected list of \\{role: string, "
                                        "content: string\\}"):
        load_text_corpus(data_files=str(m), cache_dir=cache)
    ok = tmp_path / "msgs_ok.jsonl"
    ok.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="has no chat_template"):
        pack_corpus(load_text_corpus(data_files=str(ok), cache_dir=cache), _NoCompute(), 8)
    # a stream without features is checked on its first example
    stream = datasets.IterableDataset.from_generator(lambda: iter([{"text": ["a", "b"]}]))
    with pytest.raises(TypeError, match="column 'text' holds list"):
        load_text_corpus(stream)
    c = tmp_path / "cls.csv"
    c.write_text("text,label\nhello,0.5\n")
    with pytest.raises(TypeError, match="column 'label' has type Value\\('float64'\\); expected "
                                        "integer"):
        load_classification_pool(str(c), cache_dir=cache, label_names=["a", "b"])
    s = tmp_path / "mols.csv"
    s.write_text("smiles,y\nCCO,1\n")
    with pytest.raises(ValueError,
                       match="lacks column\\(s\\) \\['label'\\]; has \\['smiles', 'y'\\]"):
        load_molecule_table(str(s), cache_dir=cache)
