"""Text and chat corpora for LM / KD training: load, tokenize (``map(batched=True)``), pack.

Schemas (one of):

* ``{text: string}`` -- plain documents (FineWeb, OpenWebText, the movie-review CSV);
* ``{messages: list of {role: string, content: string}}`` -- chat transcripts (the format of
  SmolTalk, UltraChat, OpenHermes), rendered to text with the tokenizer's chat template.

Packing follows the usual causal-LM recipe (GPT-2, Radford et al. 2019; Hugging Face
``run_clm``'s ``group_texts``): each document's ids, then EOS, are appended to one stream that is
cut into rows of ``seq_len`` tokens, so no position is padding and a row may hold the end of one
document and the start of the next. Unlike ``group_texts`` the stream is contiguous across
``map`` batches (no tokens are dropped at batch edges), so the rows do not depend on the batch
size or on whether the corpus is streamed.

Map-style datasets tokenize through ``Dataset.map(batched=True)``, whose result is cached as Arrow
next to the source files (a second run with the same tokenizer reads the cache); streamed
datasets (``streaming=True``) tokenize lazily and :func:`packed_batches` holds at most one
``map`` batch of ids plus one output batch, whatever the corpus size.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from lmx.data._load import Column, check_schema, is_stream, open_split, pick_column

TEXT_SCHEMAS = ("{text: string}", "{messages: list of {role: string, content: string}}")


def load_text_corpus(source: Any = None, *, split: str = "train", data_files: Any = None,
                     name: str | None = None, streaming: bool = False,
                     column: str | None = None, **kw):
    """A text or chat corpus, checked and cut to this process's part (see
    :func:`lmx.data.open_split` for ``source`` / ``data_files`` / sharding).

    ``column``: the text column when it is not ``text`` (e.g. ``"content"``); otherwise ``text``
    or ``messages`` is used, whichever the dataset has (``text`` first).

    Raises:
      ValueError: neither column is present (the message lists the dataset's columns and the two
        schemas). TypeError: the column has the wrong type.
    """
    ds = open_split(source, split=split, data_files=data_files, name=name, streaming=streaming,
                    **kw)
    _text_column(ds, column)
    return ds


def _text_column(ds, column: str | None) -> str:
    col = column or pick_column(ds, ("text", "messages"), "text corpus", TEXT_SCHEMAS)
    check_schema(ds, [Column(col, "messages" if col == "messages" else "string")], "text corpus")
    return col


def render_chat(tokenizer: Any, messages: list, **template_kw) -> str:
    """One transcript as text through ``tokenizer.apply_chat_template`` (no generation prompt).

    Raises:
      ValueError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat_template: cannot render a "
                         "'messages' column (set tokenizer.chat_template, or give a 'text' column)")
    return tokenizer.apply_chat_template(messages, tokenize=False, **template_kw)


def _encoder(ds, tokenizer: Any, column: str | None,
             eos_id: int | None) -> Callable[[dict], dict]:
    """Check ``ds`` and the tokenizer, then ``batch -> {"input_ids": ids + [eos] per document}``
    (chats rendered first). Nothing is tokenized here.

    Raises:
      ValueError: no EOS id (tokenizer without ``eos_token_id`` and none given), a ``messages``
        column with a tokenizer lacking a chat template; see :func:`load_text_corpus`.
    """
    col = _text_column(ds, column)
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_id to separate documents")
    if col == "messages":
        render_chat(tokenizer, [{"role": "user", "content": ""}])  # fails early without a template

    def tok(batch):
        texts = batch[col] if col != "messages" else [render_chat(tokenizer, m) for m in batch[col]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [list(x) + [eos] for x in ids]}

    return tok


def tokenize_corpus(ds, tokenizer: Any, *, column: str | None = None, eos_id: int | None = None,
                    batch_size: int = 1000, num_proc: int | None = None):
    """``ds`` -> a dataset with one column ``input_ids`` (each document's ids followed by EOS).

    Map-style input goes through the cached ``Dataset.map(batched=True)``; a stream is mapped
    lazily. The schema is checked first, so a wrong column fails before any tokenization.

    Raises:
      ValueError: no EOS id (tokenizer without ``eos_token_id`` and none given), a ``messages``
        column with a tokenizer lacking a chat template; see :func:`load_text_corpus`.
    """
    tok = _encoder(ds, tokenizer, column, eos_id)
    names = list(ds.features) if ds.features is not None else None
    kw = {} if names is None else {"remove_columns": names}
    if is_stream(ds):  # IterableDataset: lazy, no cache, no workers
        if names is None:
            return ds.map(tok, batched=True, batch_size=batch_size).select_columns(["input_ids"])
        return ds.map(tok, batched=True, batch_size=batch_size, **kw)
    return ds.map(tok, batched=True, batch_size=batch_size, num_proc=num_proc,
                  desc="tokenize", **kw)


class _Packer:
    """Contiguous id stream -> rows of ``seq_len``, holding less than one output batch."""

    def __init__(self, seq_len: int, rows: int):
        self.need = seq_len * rows
        self.seq_len = seq_len
        self.parts: list[np.ndarray] = []
        self.n = 0

    def add(self, flat: np.ndarray) -> Iterator[np.ndarray]:
        self.parts.append(flat.astype(np.int32, copy=False))
        self.n += flat.size
        if self.n < self.need:
            return
        buf = np.concatenate(self.parts)
        k = buf.size // self.need
        for i in range(k):
            yield buf[i * self.need:(i + 1) * self.need].reshape(-1, self.seq_len)
        rest = buf[k * self.need:].copy()
        self.parts, self.n = [rest], rest.size

    def rest(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int32)


def _id_chunks(ds, tokenizer: Any, *, column: str | None, eos_id: int | None, tokenized: bool,
               map_batch_size: int, num_proc: int | None = None) -> Iterator[np.ndarray]:
    """Flat id arrays (documents joined, each followed by EOS) in corpus order.

    Map-style: the cached ``map`` result read back as Arrow (its list column flattened, no Python
    lists). Streams: each batch tokenized in place (a lazy ``map`` would round-trip the ids
    through Arrow for nothing).
    """
    if is_stream(ds) and not tokenized:
        enc = _encoder(ds, tokenizer, column, eos_id)
        for batch in ds.iter(batch_size=map_batch_size):
            yield np.fromiter((t for x in enc(batch)["input_ids"] for t in x), np.int32)
        return
    tok = ds if tokenized else tokenize_corpus(ds, tokenizer, column=column, eos_id=eos_id,
                                               batch_size=map_batch_size, num_proc=num_proc)
    if is_stream(tok):
        for batch in tok.iter(batch_size=map_batch_size):
            yield np.fromiter((t for x in batch["input_ids"] for t in x), np.int32)
        return
    for table in tok.with_format("arrow").iter(batch_size=map_batch_size):
        ids = table.column("input_ids").combine_chunks()
        yield ids.flatten().to_numpy(zero_copy_only=False)


def _check_lengths(seq_len: int, batch_size: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def packed_batches(ds, tokenizer: Any, seq_len: int, batch_size: int, *,
                   column: str | None = None, eos_id: int | None = None,
                   map_batch_size: int = 1000, tokenized: bool = False
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Lazily yield ``{"tokens": int32 [B, T], "mask": bool [B, T]}`` from a (streamed) corpus.

    ``mask`` is all True (packed rows hold no padding); it is there so the batches fit the
    ``tokens``/``mask`` contract of ``lmx.train.causal_lm_loss`` and the KD trainer. The last
    partial batch is dropped. ``tokenized=True``: ``ds`` already holds ``input_ids``
    (from :func:`tokenize_corpus`). Memory: one ``map_batch_size`` batch of ids and one output
    batch, independent of the corpus size.
    """
    _check_lengths(seq_len, batch_size)
    packer = _Packer(seq_len, batch_size)
    for flat in _id_chunks(ds, tokenizer, column=column, eos_id=eos_id, tokenized=tokenized,
                           map_batch_size=map_batch_size):
        for rows in packer.add(flat):
            yield {"tokens": rows, "mask": np.ones(rows.shape, bool)}


def pack_corpus(ds, tokenizer: Any, seq_len: int, *, n_rows: int | None = None,
                column: str | None = None, eos_id: int | None = None, pad_id: int = 0,
                drop_remainder: bool = True, map_batch_size: int = 1000,
                num_proc: int | None = None) -> dict[str, np.ndarray]:
    """Packed rows ``{"tokens": int32 [N, T], "mask": bool [N, T]}`` of a corpus.

    ``n_rows``: stop after that many rows (error if the corpus is shorter); a stream is read
    only as far as the rows need (without ``n_rows`` it is read to its end). With
    ``drop_remainder=False`` the final partial row is kept, padded with ``pad_id`` and masked
    out (mask False). Map-style tokenization is the cached ``map`` of :func:`tokenize_corpus`.

    Raises:
      ValueError: bad ``seq_len`` / ``n_rows``; the corpus holds fewer than ``n_rows`` rows.
    """
    _check_lengths(seq_len, 1)
    if n_rows is not None and (not isinstance(n_rows, (int, np.integer)) or n_rows < 1):
        raise ValueError(f"n_rows must be an int >= 1 or None, got {n_rows!r}")
    packer = _Packer(seq_len, 1)
    rows: list[np.ndarray] = []
    for flat in _id_chunks(ds, tokenizer, column=column, eos_id=eos_id, tokenized=False,
                           map_batch_size=map_batch_size, num_proc=num_proc):
        rows.extend(packer.add(flat))
        if n_rows is not None and len(rows) >= n_rows:
            break
    if n_rows is not None:
        if len(rows) < n_rows:
            raise ValueError(f"the corpus gives {len(rows)} rows of {seq_len} tokens, need "
                             f"n_rows={n_rows}")
        rows = rows[:n_rows]
    tokens = np.concatenate(rows) if rows else np.zeros((0, seq_len), np.int32)
    mask = np.ones(tokens.shape, bool)
    rest = packer.rest()
    if not drop_remainder and n_rows is None and rest.size:
        last = np.full((1, seq_len), pad_id, np.int32)
        last[0, :rest.size] = rest
        lmask = np.zeros((1, seq_len), bool)
        lmask[0, :rest.size] = True
        tokens, mask = np.concatenate([tokens, last]), np.concatenate([mask, lmask])
    if tokens.shape[0] == 0:
        raise ValueError(f"the corpus holds fewer than seq_len={seq_len} tokens")
    return {"tokens": tokens, "mask": mask}


def stream_get_batch(batches: Iterator[dict]) -> Callable[[int], dict]:
    """Adapt an iterator of batches to ``lmx.train.train``'s ``get_batch(step)``.

    The loop calls steps in order; a resumed run starts at its checkpoint's step ``s`` and the
    first ``s`` batches are skipped, so it sees the same data as an uninterrupted run (for a
    deterministic stream). Asking for a step out of order raises ValueError.
    """
    it = iter(batches)
    state = {"next": 0}

    def get_batch(step: int) -> dict:
        if step < state["next"]:
            raise ValueError(f"a stream cannot go back: step {step} asked after step "
                             f"{state['next'] - 1}")
        while state["next"] < step:
            next(it)
            state["next"] += 1
        state["next"] += 1
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"the stream ran out of batches at step {step}") from None

    return get_batch

