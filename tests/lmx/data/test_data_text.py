"""Text / chat corpora: local files -> checked dataset -> cached batched tokenization -> packed
rows, equal to a plain reference packing; per-process shards; one LM training step on the rows."""
import json

import datasets
import numpy as np
import pytest
from flax import nnx

from lmx.data import (load_text_corpus, open_split, pack_corpus, packed_batches, stream_get_batch,
                      tokenize_corpus)
from lmx.models import ModelConfig, Transformer
from lmx.train import TrainConfig, causal_lm_loss, train

DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3)
        for i in range(40)]


def pack_texts(tok, texts, seq_len, n_rows):
    """Reference packing: each text's ids, then EOS, one list cut into ``n_rows`` rows."""
    ids = [t for x in texts for t in tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(ids) >= seq_len * n_rows
    return np.asarray(ids[:seq_len * n_rows], np.int32).reshape(n_rows, seq_len)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_jsonl_packs_like_pack_texts_and_caches(tmp_path, tok, cache):
    f = _jsonl(tmp_path / "corpus.jsonl", [{"text": t, "id": i} for i, t in enumerate(DOCS)])
    ds = load_text_corpus(data_files=str(f), cache_dir=cache)
    rows = pack_corpus(ds, tok, 32, n_rows=20)
    np.testing.assert_array_equal(rows["tokens"], pack_texts(tok, DOCS, 32, 20))
    assert rows["tokens"].dtype == np.int32 and rows["mask"].all()
    # the tokenized split is an Arrow cache file; a second map with the same tokenizer reuses it
    t1 = tokenize_corpus(ds, tok)
    t2 = tokenize_corpus(ds, tok)
    assert t1.cache_files and t1.cache_files == t2.cache_files
    assert t1.column_names == ["input_ids"]
    # the partial last row is kept, padded and masked out on request
    full = pack_corpus(ds, tok, 32, drop_remainder=False, pad_id=0)
    n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in DOCS)
    assert full["mask"].sum() == n_tok and full["tokens"].shape[0] == -(-n_tok // 32)
    with pytest.raises(ValueError, match="need n_rows=10000"):
        pack_corpus(ds, tok, 32, n_rows=10000)


def test_messages_parquet_rendered_with_chat_template(tmp_path, tok, cache):
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
             for i in range(30)]
    f = tmp_path / "chat.parquet"
    datasets.Dataset.from_dict({"messages": convs}).to_parquet(str(f))
    ds = load_text_corpus(str(f), cache_dir=cache)
    rows = pack_corpus(ds, tok, 24)
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    np.testing.assert_array_equal(rows["tokens"], pack_texts(tok, rendered, 24,
                                                             rows["tokens"].shape[0]))
    assert tok.decode(rows["tokens"][0]).startswith("<|im_start|>user\nq0<|im_end|>")
    # the same file streamed packs to the same rows, batch by batch
    stream = load_text_corpus(str(f), streaming=True)
    got = np.concatenate([b["tokens"] for b in packed_batches(stream, tok, 24, 2,
                                                              map_batch_size=4)])
    np.testing.assert_array_equal(got, rows["tokens"][:len(got)])
    assert len(got) >= rows["tokens"].shape[0] - 1


def test_each_process_reads_its_own_part(tmp_path, cache):
    f = _jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])
    parts = [open_split(data_files=str(f), cache_dir=cache, process_index=i, process_count=2)
             for i in range(2)]
    assert list(parts[0]["text"]) + list(parts[1]["text"]) == DOCS  # contiguous halves
    files = [_jsonl(tmp_path / f"s{k}.jsonl", [{"text": t} for t in DOCS[k::2]]) for k in range(2)]
    streams = [open_split(data_files=[str(x) for x in files], streaming=True, process_index=i,
                          process_count=2) for i in range(2)]
    got = [[ex["text"] for ex in s] for s in streams]
    assert got[0] == DOCS[0::2] and got[1] == DOCS[1::2]  # one whole file per host
    with pytest.raises(ValueError, match="process_index=2"):
        open_split(data_files=str(f), cache_dir=cache, process_index=2, process_count=2)


def test_stream_packs_lazily_and_trains_one_step(tmp_path, tok):
    f = _jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])
    stream = load_text_corpus(data_files=str(f), streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    batches = packed_batches(stream, tok, 32, 4, map_batch_size=7)
    first = next(batches)
    np.testing.assert_array_equal(first["tokens"], pack_texts(tok, DOCS, 32, 4))
    model = Transformer(ModelConfig.tiny_llama(vocab_size=len(tok), d_model=32, n_layers=1,
                                               n_heads=2, n_kv_heads=1, d_ff=64),
                        rngs=nnx.Rngs(0))
    get_batch = stream_get_batch(packed_batches(stream, tok, 32, 4))
    res = train(model, causal_lm_loss, get_batch, TrainConfig(steps=1, progress=False))
    # a random model over 259 ids starts near log(259) nats per token
    assert len(res.losses) == 1 and abs(res.losses[0] - np.log(len(tok))) < 0.5
    with pytest.raises(ValueError, match="cannot go back"):
        get_batch(0)
