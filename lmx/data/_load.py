"""Open a Hugging Face ``datasets`` split from a hub id, a local path or ``data_files``; check its
columns and types before anything is tokenized; give each process its own part.

Every loader in :mod:`lmx.data` goes through :func:`open_split`. Schemas are checked on the
dataset's ``features`` (Arrow types, known before any row is read) and, when a streamed dataset
has none (e.g. ``IterableDataset.from_generator``), on its first example.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping, Sequence

# file suffix -> ``datasets`` packaged builder
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
            ".arrow": "arrow", ".txt": "text"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _datasets():
    try:
        import datasets
    except ImportError as e:  # an optional extra
        raise ImportError("lmx.data needs Hugging Face datasets: pip install -e '.[data]'") from e
    return datasets


def is_stream(ds) -> bool:
    """Whether ``ds`` is a ``datasets.IterableDataset`` (read lazily, no cache)."""
    return isinstance(ds, _datasets().IterableDataset)


def builder_for(path: str | os.PathLike) -> str:
    """The packaged builder for a local file from its suffix (compression suffixes skipped)."""
    p = pathlib.Path(path)
    suffixes = [s for s in p.suffixes if s.lower() not in _COMPRESSION]
    suffix = suffixes[-1].lower() if suffixes else ""
    if suffix not in BUILDERS:
        raise ValueError(f"cannot tell the format of {str(p)!r} from its suffix {suffix!r}; "
                         f"expected one of {sorted(BUILDERS)} (optionally compressed)")
    return BUILDERS[suffix]


def _file_list(data_files: Any) -> list[str]:
    if isinstance(data_files, (str, os.PathLike)):
        return [str(data_files)]
    if isinstance(data_files, Mapping):
        return [str(f) for v in data_files.values() for f in _file_list(v)]
    return [str(f) for f in data_files]


def _pinpoint(builder: str, files: list[str], split: str, err: Exception, streaming: bool,
              **kw) -> Exception:
    """A ValueError naming the first file that fails to load on its own (the ``datasets`` error
    only names the file in a log line). For a stream only each file's first example is read."""
    ds = _datasets()
    cause = err.__cause__ or err
    for f in files:
        try:
            one = ds.load_dataset(builder, data_files=f, split="train", streaming=streaming, **kw)
            if streaming:
                next(iter(one.take(1)), None)
        except Exception as e:  # noqa: BLE001 - any reader failure is what we report
            c = e.__cause__ or e
            return ValueError(f"could not read {f!r} as {builder}: {type(c).__name__}: {c}")
    return ValueError(f"could not read {files} as {builder} (split {split!r}): "
                      f"{type(cause).__name__}: {cause}")


def open_split(source: str | os.PathLike | None = None, *, split: str = "train",
               data_files: Any = None, name: str | None = None, streaming: bool = False,
               cache_dir: str | None = None, process_index: int | None = None,
               process_count: int | None = None, **load_kw):
    """One split as a ``datasets.Dataset`` (``streaming=False``) or ``IterableDataset``.

    ``source``: a hub id (``"HuggingFaceFW/fineweb-edu"``), a local file (json/jsonl/csv/parquet/
    arrow, optionally compressed), a local directory (a ``save_to_disk`` dataset or a folder of data
    files), a packaged builder name (``"json"``) with ``data_files``, or None with ``data_files``
    alone (the builder is read from the first file's suffix). A ready ``Dataset`` /
    ``IterableDataset`` passes through (so tests and callers may build one in memory).

    Each process keeps only its part: with ``process_count > 1`` (default ``jax.process_count()``)
    a map-style split is ``shard(num_shards=process_count, index=process_index, contiguous=True)``
    and a stream is ``datasets.distributed.split_dataset_by_node`` (whole files per node when the
    file count divides, else every ``world_size``-th example).

    Raises:
      FileNotFoundError: a named local file does not exist.
      ValueError: an unreadable or corrupt file (named), an unknown suffix.
    """
    ds_mod = _datasets()
    if isinstance(source, (ds_mod.Dataset, ds_mod.IterableDataset)):
        ds = source
    else:
        kw = dict(load_kw, cache_dir=cache_dir) if cache_dir else dict(load_kw)
        builder, files = None, None
        if data_files is not None:
            files = _file_list(data_files)
            missing = [f for f in files if "*" not in f and not pathlib.Path(f).exists()]
            if missing:
                raise FileNotFoundError(f"data_files not found: {missing}")
            builder = str(source) if source is not None else builder_for(files[0])
        elif source is not None and pathlib.Path(source).is_file():
            files = [str(source)]
            builder, data_files = builder_for(source), str(source)
        elif source is not None and pathlib.Path(source).is_dir():
            d = pathlib.Path(source)
            if (d / "dataset_info.json").exists() or (d / "dataset_dict.json").exists():
                saved = ds_mod.load_from_disk(str(d))
                ds = saved[split] if isinstance(saved, ds_mod.DatasetDict) else saved
                return _for_process(ds.to_iterable_dataset() if streaming else ds,
                                    process_index, process_count)
        elif source is None:
            raise ValueError("give a hub id or local path as source, or data_files")
        try:
            if builder is not None:
                ds = ds_mod.load_dataset(builder, data_files=data_files, split=split,
                                         streaming=streaming, **kw)
                if streaming and ds.features is None:
                    # a stream reads lazily: read the first example now, so an unreadable first
                    # file fails here, named, and not in the middle of training
                    first_example(ds)
            else:
                ds = ds_mod.load_dataset(str(source), name, split=split, streaming=streaming, **kw)
        except (ds_mod.exceptions.DatasetGenerationError, ValueError) as e:
            if files is None:
                raise
            raise _pinpoint(builder, files, split, e, streaming, **kw) from e
    return _for_process(ds, process_index, process_count)


def _for_process(ds, process_index: int | None, process_count: int | None):
    if process_count is None or process_index is None:
        import jax

        process_count = jax.process_count() if process_count is None else process_count
        process_index = jax.process_index() if process_index is None else process_index
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count="
                         f"{process_count})")
    if process_count == 1:
        return ds
    if is_stream(ds):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    return ds.shard(num_shards=process_count, index=process_index, contiguous=True)


# ----------------------------------------------------------------------------------------------
# Schema checks
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Column:
    """One expected column: ``kind`` in {"string", "int", "number", "strings", "messages"}."""

    name: str
    kind: str


_KIND_TEXT = {"string": "string", "int": "integer (or ClassLabel)", "number": "number",
              "strings": "list of strings", "messages": "list of {role: string, content: string}"}


def _is_string(f) -> bool:
    ds = _datasets()
    return isinstance(f, ds.Value) and f.dtype in ("string", "large_string")


def _is_list(f):
    ds = _datasets()
    inner = getattr(f, "feature", None)
    return inner if isinstance(f, (ds.List, ds.LargeList, ds.Sequence)) else None


def feature_matches(f, kind: str) -> bool:
    """Whether a ``datasets`` feature has the expected kind."""
    ds = _datasets()
    if kind == "string":
        return _is_string(f)
    if kind == "int":
        return isinstance(f, ds.ClassLabel) or (isinstance(f, ds.Value) and "int" in f.dtype)
    if kind == "number":
        return isinstance(f, ds.Value) and ("int" in f.dtype or "float" in f.dtype
                                            or f.dtype == "bool")
    inner = _is_list(f)
    if kind == "strings":
        return inner is not None and _is_string(inner)
    if kind == "messages":
        return (inner is not None and isinstance(inner, dict) and _is_string(inner.get("role"))
                and _is_string(inner.get("content")))
    raise ValueError(f"unknown column kind {kind!r}")


def value_matches(v: Any, kind: str) -> bool:
    """Whether one Python value (a streamed example's field) has the expected kind."""
    if kind == "string":
        return isinstance(v, str)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "number":
        return isinstance(v, (int, float))
    if kind == "strings":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind == "messages":
        return isinstance(v, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in v)
    raise ValueError(f"unknown column kind {kind!r}")


def describe(schema: Sequence[Column]) -> str:
    return "{" + ", ".join(f"{c.name}: {_KIND_TEXT[c.kind]}" for c in schema) + "}"


def first_example(ds) -> dict:
    """The first example (reads only the start of the first shard of a stream)."""
    for ex in ds.take(1) if hasattr(ds, "take") else ds:
        return ex
    raise ValueError("the dataset is empty")


def check_schema(ds, schema: Sequence[Column], what: str) -> None:
    """Raise naming the column and the expected ``schema`` when ``ds`` does not fit it.

    Raises:
      ValueError: a column is missing. TypeError: a column has the wrong type.
    """
    names = list(ds.features) if ds.features is not None else list(first_example(ds))
    missing = [c.name for c in schema if c.name not in names]
    if missing:
        raise ValueError(f"{what} dataset lacks column(s) {missing}; has {names}; expected schema "
                         f"{describe(schema)}")
    if ds.features is not None:
        for c in schema:
            if not feature_matches(ds.features[c.name], c.kind):
                raise TypeError(f"{what} column {c.name!r} has type {ds.features[c.name]}; "
                                f"expected {_KIND_TEXT[c.kind]} (schema {describe(schema)})")
        return
    ex = first_example(ds)
    for c in schema:
        if not value_matches(ex[c.name], c.kind):
            raise TypeError(f"{what} column {c.name!r} holds {type(ex[c.name]).__name__} "
                            f"{str(ex[c.name])[:80]!r} in the first example; expected "
                            f"{_KIND_TEXT[c.kind]} (schema {describe(schema)})")


def pick_column(ds, candidates: Sequence[str], what: str, schemas: Sequence[str]) -> str:
    """The first of ``candidates`` present in ``ds`` (for "text or messages" style schemas)."""
    names = list(ds.features) if ds.features is not None else list(first_example(ds))
    for c in candidates:
        if c in names:
            return c
    raise ValueError(f"{what} dataset has columns {names}; expected one of the schemas "
                     f"{' or '.join(schemas)}")

