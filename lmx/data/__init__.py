"""Data on Hugging Face ``datasets``: one loader per schema the project's methods read.

Every loader takes a hub id, a local file or folder, or ``data_files`` (json/jsonl/csv/parquet/
arrow), a ``split`` and (where rows are read lazily) ``streaming``; it checks the columns and their
types before any tokenization or compute, names an unreadable file, and keeps only this process's
part in a multi-process run. Guide: ``docs/data.md``.

* text / chat corpora -> packed rows (LM, KD): :func:`load_text_corpus`, :func:`pack_corpus`,
  :func:`packed_batches`, :func:`stream_get_batch`;
* preference pairs (reward models): :func:`load_preference_pairs`, :func:`tokenize_pairs`;
* labelled pools (ICL): :func:`load_classification_pool`;
* code problems (evals): :func:`load_humaneval_dataset`, :func:`load_oop_dataset`;
* molecules (graphs): :func:`load_molecule_table`, :func:`to_graph_dataset`.
"""
from lmx.data._load import BUILDERS, Column, builder_for, check_schema, is_stream, open_split
from lmx.data.classification import ClassificationPool, load_classification_pool
from lmx.data.codeeval import (HUMANEVAL_SCHEMA, OOP_SCHEMA, load_humaneval_dataset,
                               load_oop_dataset, shipped_oop_file)
from lmx.data.molecules import MoleculeTable, load_molecule_table, to_graph_dataset
from lmx.data.preference import (hh_messages, load_preference_pairs, pair_schema, split_prompt,
                                 tokenize_pairs)
from lmx.data.text import (load_text_corpus, pack_corpus, packed_batches, render_chat,
                           stream_get_batch, tokenize_corpus)

__all__ = ["BUILDERS", "Column", "builder_for", "check_schema", "is_stream", "open_split",
           "ClassificationPool", "load_classification_pool",
           "HUMANEVAL_SCHEMA", "OOP_SCHEMA", "load_humaneval_dataset", "load_oop_dataset",
           "shipped_oop_file", "MoleculeTable", "load_molecule_table", "to_graph_dataset",
           "hh_messages", "load_preference_pairs", "pair_schema", "split_prompt", "tokenize_pairs",
           "load_text_corpus", "pack_corpus", "packed_batches", "render_chat", "stream_get_batch",
           "tokenize_corpus"]
