"""Benchmark ``merge``: offline multi-task merging accuracy + streamed-merge memory/throughput.

Part 1: the sklearn-digits multi-task setup of :mod:`lmx.merge.toy` (K transformed
digit tasks, a shared pre-trained MLP backbone, frozen per-task heads), for each seed: per-task
test accuracy of the pre-trained model, each fine-tuned model on its own task ("individual"),
joint multi-task fine-tuning, and every merge method. Learned methods use the entropy objective
on unlabeled held-out inputs (the papers' setting); two rows repeat them with a supervised
cross-entropy surrogate on the labelled held-out set. Concrete TA is evaluated over
``concrete_draws`` final mask draws (mean; the std over draws is reported too).

Part 2: ``n_models`` synthetic fine-tuned checkpoints of ``mb_per_ckpt`` MB (float32 tensors of
``tensor_mb`` MB) plus a base are written to a temporary directory, merged by
the merge runner in a fresh subprocess whose peak RSS (``VmHWM``) is recorded, and
deleted. The same is measured for loading every checkpoint whole (safetensors ``load_file``) and
merging in memory, and for a subprocess that only imports the runner (the interpreter floor).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from benchmarks.common import bench_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------
# Part 1: accuracy table


def _accuracy_rows(cfg: dict) -> tuple[list[dict], dict]:
    import jax

    import lmx.merge as LM
    from lmx.merge import toy

    tcfg = toy.ToyConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in cfg.get("toy", {}).items()})
    steps = cfg["steps"]
    draws = int(cfg.get("concrete_draws", 5))
    per_method: dict[str, list[np.ndarray]] = {}
    extra: dict[str, list] = {"concrete_draw_std": [], "entropy_history": {}, "timings_s": {}}

    def add(name, acc):
        per_method.setdefault(name, []).append(np.asarray(acc, np.float64) * 100)

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        extra["timings_s"].setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for seed in cfg["seeds"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn lbfgs convergence chatter on the probes
            tt = timed("setup (pretrain, probes, fine-tunes, MTL)", lambda: toy.ToyTasks(tcfg, seed))
        acc = tt.accuracy
        tvs = LM.task_vectors(tt.base, tt.finetuned)
        add("Pre-trained", acc(tt.base))
        add("Individual", tt.individual_accuracy())
        add("Multi-task (joint fine-tune)", acc(tt.multitask))
        add("Weight averaging", acc(LM.average(tt.finetuned)))
        add("Fisher merging", acc(LM.fisher_merging(tt.finetuned, tt.fishers())))
        add("RegMean (alpha 0.95)", acc(LM.regmean(tt.finetuned, tt.regmean_grams(), alpha=0.95)))
        add("Task arithmetic (lam 0.3)", acc(LM.task_arithmetic(tt.base, tvs, 0.3)))
        grid = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
        held = [tt.accuracy(LM.task_arithmetic(tt.base, tvs, g), "heldout").mean() for g in grid]
        best = grid[int(np.argmax(held))]
        add("Task arithmetic (lam by held-out acc)", acc(LM.task_arithmetic(tt.base, tvs, best)))
        add("Task arithmetic (lam 1.0)", acc(LM.task_arithmetic(tt.base, tvs, 1.0)))
        add("TIES (dis-sum, lam 0.3)", acc(LM.ties_merging(tt.base, tvs)))
        add("TIES (dis-mean, lam 1.0)", acc(LM.ties_merging(tt.base, tvs, merge="mean", lam=1.0)))
        add("DARE + TA (p 0.5, lam 0.3)", acc(LM.dare(tt.base, tvs, p=0.5, seed=seed)))
        ent, gb = tt.entropy_objective, tt.batches(seed=seed)
        progress = bool(cfg.get("progress", False))
        mesh = bench_mesh()
        for gran, label in (("task", "TW"), ("layer", "LW")):
            r = timed(f"{label} AdaMerging", lambda: LM.adamerging(
                tt.base, tvs, ent, gb, LM.AdaMergingConfig(
                    granularity=gran, steps=steps["adamerging"], progress=progress), mesh=mesh))
            add(f"{label} AdaMerging", acc(r.params))
            extra["entropy_history"].setdefault(f"{label} AdaMerging", []).append(
                [float(r.history["adamerging"][:20].mean()), float(r.history["adamerging"][-20:].mean())])
            ccfg = LM.ConcreteConfig(granularity=gran, meta_steps=steps["meta"],
                                     tta_steps=steps["tta"], seed=seed, progress=progress)
            r = timed(f"{label} Concrete AM", lambda: LM.concrete_adamerging(
                tt.base, tvs, ent, gb, ccfg, mesh=mesh))
            add(f"{label} Concrete AM", acc(r.params))
            extra["entropy_history"].setdefault(f"{label} Concrete AM (meta)", []).append(
                [float(r.history["meta"][:20].mean()), float(r.history["meta"][-20:].mean())])
        ccfg = LM.ConcreteConfig(steps=steps["concrete_ta"], seed=seed, progress=progress)
        r = timed("Concrete TA", lambda: LM.concrete_task_arithmetic(tt.base, tvs, ent, gb, ccfg,
                                                                          mesh=mesh))
        extra["entropy_history"].setdefault("Concrete TA", []).append(
            [float(r.history["concrete_ta"][:20].mean()), float(r.history["concrete_ta"][-20:].mean())])
        draw_acc = np.stack([acc(LM.concrete_merge(tt.base, tvs, r.logits, 0.3,
                                                   jax.random.PRNGKey(1000 + d)))
                             for d in range(draws)])
        add("Concrete TA", draw_acc.mean(0))
        extra["concrete_draw_std"].append(float(draw_acc.mean(1).std() * 100))
        extra.setdefault("concrete_keep_rate", []).append(float(np.mean(np.concatenate(
            [np.asarray(jax.nn.sigmoid(x)).ravel() for x in r.logits.values()]))))
        if cfg.get("supervised", True):
            sup = tt.batches(labels=True, seed=seed)
            r = timed("LW AdaMerging (CE)", lambda: LM.adamerging(
                tt.base, tvs, tt.cross_entropy_objective, sup, LM.AdaMergingConfig(
                    steps=steps["adamerging"], progress=progress), mesh=mesh))
            add("LW AdaMerging (CE surrogate)", acc(r.params))
            r = timed("Concrete TA (CE)", lambda: LM.concrete_task_arithmetic(
                tt.base, tvs, tt.cross_entropy_objective, sup, LM.ConcreteConfig(
                    steps=steps["concrete_ta"], seed=seed, progress=progress), mesh=mesh))
            add("Concrete TA (CE surrogate)", np.mean([acc(LM.concrete_merge(
                tt.base, tvs, r.logits, 0.3, jax.random.PRNGKey(1000 + d)))
                for d in range(draws)], 0))

    rows = []
    for name, accs in per_method.items():
        a = np.stack(accs)  # [seeds, K]
        row = {"method": name}
        for k, t in enumerate(tcfg.tasks):
            row[t] = round(float(a[:, k].mean()), 1)
        row["avg"] = round(float(a.mean(1).mean()), 2)
        row["avg_std"] = round(float(a.mean(1).std()), 2)
        rows.append(row)
    avg = {r["method"]: r["avg"] for r in rows}
    extra["per_seed_avg"] = {n: [float(x.mean()) for x in accs] for n, accs in per_method.items()}
    extra["orderings"] = _orderings(avg)
    extra["timings_s"] = {k: float(np.mean(v)) for k, v in extra["timings_s"].items()}
    return rows, extra


def _orderings(avg: dict) -> list[dict]:
    """The papers' CLIP ViT-B/32 orderings (Tang et al. 2023, arXiv:2312.06173; Yang et al. 2024,
    arXiv:2310.02575) checked on this toy: does ``a`` beat ``b``?"""
    pairs = [
        ("Individual", "Weight averaging"), ("Multi-task (joint fine-tune)", "Task arithmetic (lam 0.3)"),
        ("Task arithmetic (lam 0.3)", "Weight averaging"),
        ("TIES (dis-sum, lam 0.3)", "Task arithmetic (lam 0.3)"),
        ("TIES (dis-mean, lam 1.0)", "Task arithmetic (lam 1.0)"),
        ("RegMean (alpha 0.95)", "Task arithmetic (lam 0.3)"),
        ("Fisher merging", "Weight averaging"),
        ("Concrete TA", "Task arithmetic (lam 0.3)"),
        ("TW AdaMerging", "Task arithmetic (lam 0.3)"),
        ("LW AdaMerging", "TW AdaMerging"),
        ("TW Concrete AM", "TW AdaMerging"), ("LW Concrete AM", "LW AdaMerging"),
        ("LW Concrete AM", "Concrete TA"),
        ("Concrete TA (CE surrogate)", "Task arithmetic (lam 0.3)"),
        ("LW AdaMerging (CE surrogate)", "Task arithmetic (lam 0.3)"),
    ]
    out = []
    for a, b in pairs:
        if a in avg and b in avg:
            out.append({"claim": f"{a} > {b}", "a": avg[a], "b": avg[b], "holds": avg[a] > avg[b]})
    return out


# ------------------------------------------------------------------------------------------
# Part 2: streamed merge memory / throughput


def _write_checkpoints(tmp: pathlib.Path, n_models: int, mb: float, tensor_mb: float) -> list:
    from lmx.merge.streaming import SafetensorsWriter

    n_elem = int(tensor_mb * 1e6 / 4)
    n_tensors = max(1, int(round(mb / tensor_mb)))
    entries = [(f"model.layers.{i}.weight", np.float32, (n_elem,)) for i in range(n_tensors)]
    paths = []
    for m in range(n_models + 1):
        d = tmp / ("base" if m == 0 else f"ft{m}")
        d.mkdir()
        w = SafetensorsWriter(d / "model.safetensors", entries)
        for i, (name, _, shape) in enumerate(entries):
            base = np.random.default_rng((0, i)).random(shape, dtype=np.float32)
            if m:
                # fine-tuned = base + a small task-specific delta
                base += 0.01 * np.random.default_rng((m, i)).random(shape, dtype=np.float32) - 0.005
            w.write(name, base)
        w.close()
        paths.append(d)
    return paths


_HWM = ("\nimport re as _re\n"
        "print('VmHWM_kB', _re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")


def _child_rss(code: str, env: dict) -> tuple[float, float, str]:
    """Run ``python -c code`` in a fresh process; return (its peak RSS in MiB, wall s, stdout).

    The peak is the child's own ``VmHWM`` (high-water RSS of its address space), printed by the
    child as it finishes. ``wait4``'s ``ru_maxrss`` is not usable here: Linux carries the
    parent's high-water mark across ``vfork``+``exec``, so every child would report the
    benchmark process's own RSS.
    """
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code + _HWM], capture_output=True, text=True,
                       env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"child failed: {p.stderr[-2000:]}")
    hwm = [ln for ln in p.stdout.splitlines() if ln.startswith("VmHWM_kB ")]
    return int(hwm[-1].split()[1]) / 1024.0, wall, p.stdout


def _stream_rows(cfg: dict) -> tuple[list[dict], dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="lmx_merge_bench_") as tmp_s:
        tmp = pathlib.Path(tmp_s)
        t0 = time.perf_counter()
        paths = _write_checkpoints(tmp, cfg["n_models"], cfg["mb_per_ckpt"], cfg["tensor_mb"])
        extra["write_s"] = time.perf_counter() - t0
        ckpt_mib = (paths[1] / "model.safetensors").stat().st_size / 2**20
        floor, _, _ = _child_rss("import lmx.merge.runner, jax.numpy as jnp; jnp.zeros(1)", env)
        for method in cfg["methods"]:
            conf = {"base": str(paths[0]), "models": [str(p) for p in paths[1:]],
                    "method": method, "output": {"path": str(tmp / "out")}}
            (tmp / "cfg.json").write_text(json.dumps(conf))
            rss, wall, _ = _child_rss(
                "from lmx.merge import runner; "
                f"runner.main([{str(tmp / 'cfg.json')!r}, '--no-progress'])", env)
            summary = json.loads((tmp / "out" / "merge_summary.json").read_text())
            rows.append({"mode": f"streamed {method['name']}", "ckpt_MiB": round(ckpt_mib, 1),
                         "n_models": cfg["n_models"], "peak_rss_MiB": round(rss, 1),
                         "rss_over_ckpt": round(rss / ckpt_mib, 3),
                         "rss_minus_floor_MiB": round(rss - floor, 1),
                         "merge_s": round(summary["seconds"], 2),
                         "GB_per_s": round(summary["gb_per_s"], 3), "passes": summary["passes"]})
            for f in (tmp / "out").iterdir():
                f.unlink()
        if cfg.get("naive_baseline", True):
            code = ("import time, numpy as np; from safetensors.numpy import load_file; "
                    "import lmx.merge as LM; t=time.perf_counter(); "
                    f"ps={[str(p / 'model.safetensors') for p in paths]!r}; "
                    "sd=[load_file(p) for p in ps]; "
                    "tv=LM.task_vectors(sd[0], sd[1:]); out=LM.task_arithmetic(sd[0], tv, 0.3); "
                    "[np.asarray(v) for v in out.values()]; print('secs', time.perf_counter()-t)")
            rss, _, out = _child_rss(code, env)
            secs = float([ln for ln in out.splitlines() if ln.startswith("secs ")][-1].split()[1])
            nbytes = sum((p / "model.safetensors").stat().st_size for p in paths)
            rows.append({"mode": "load all + in-memory task_arithmetic", "ckpt_MiB": round(ckpt_mib, 1),
                         "n_models": cfg["n_models"], "peak_rss_MiB": round(rss, 1),
                         "rss_over_ckpt": round(rss / ckpt_mib, 3),
                         "rss_minus_floor_MiB": round(rss - floor, 1), "merge_s": round(secs, 2),
                         "GB_per_s": round(nbytes / secs / 1e9, 3), "passes": 1})
        extra["interpreter_floor_MiB"] = floor
    extra["temp_deleted"] = not pathlib.Path(tmp_s).exists()
    return rows, extra


def _plot(rows: list[dict], out_dir: pathlib.Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1))
    names = [r["method"] for r in rows]
    ax.barh(names, [r["avg"] for r in rows], xerr=[r["avg_std"] for r in rows], color="tab:blue")
    ax.set_xlabel("average test accuracy over tasks (%)")
    ax.set_xlim(min(r["avg"] for r in rows) - 5, 100)
    ax.invert_yaxis()
    fig.tight_layout()
    path = out_dir / "merge_accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [str(path)]


def run(config: dict, out_dir: pathlib.Path) -> dict:
    result: dict = {"summary": [], "plots": []}
    if "accuracy" in config:
        rows, extra = _accuracy_rows(config["accuracy"])
        result["summary"] += rows
        result["accuracy_extra"] = extra
        result["plots"] += _plot(rows, out_dir)
    if "stream" in config:
        rows, extra = _stream_rows(config["stream"])
        result["summary"] += rows
        result["stream_extra"] = extra
    return result
