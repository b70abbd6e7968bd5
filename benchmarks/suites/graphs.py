"""Benchmark ``graphs``: GraphTrans / Graphormer / GraphGPS, unpruned vs GTSP per axis.

Protocol (per dataset x backbone x seed): train the dense model ``dense_steps``; then, from that
checkpoint, fine-tune ``finetune_steps`` under each GTSP setting (one axis at a time at each
sparsity, plus the ``combined`` settings: all four axes, or a listed subset); the "dense" row
gets the same extra steps without pruning. With ``folds`` (MUTAG) each seed runs a k-fold
cross-validation and its metric is scored on the pooled test predictions of all folds.
Clean-mode models are exported (physically smaller) and evaluated as exported; faithful-mode
models are evaluated with their masks (the official GTSP code's semantics). FLOPs are the
analytic core FLOPs per test graph (unpadded): executed for clean exports, theoretical
(:func:`graphs.flops.faithful_flops`) for faithful masks. Inference time (first seed only): a
jitted forward (:func:`graphs.train.eval_forward`) over all graphs of the dataset in padded batches; the dense and all pruned models of one backbone are timed in the same
process, interleaved (one pass of each per round, after a warm-up pass each), and each row
reports the median over rounds, so machine-load drift hits all rows alike.

Training runs on the run's mesh (:func:`benchmarks.common.bench_mesh`, ``--mesh``): each step
takes one padded batch of ``batch_size`` graphs per ``data*fsdp`` shard, GT parameters
replicated; on a one-device mesh this is the protocol of the committed results. A ``datasets``
entry may be a SMILES + label table (hub id or local file, read through ``lmx.data``; see
:func:`load_table_dataset`), e.g. the ``bbbp`` preset.

``fast_compile_training`` compiles the training steps with ``jax_disable_most_optimizations``
(XLA backend level 0: same maths, far less compile CPU for these short runs); it is switched off
again before any evaluated or timed forward is compiled, so timings use fully optimised code.
"""
from __future__ import annotations

import contextlib
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.common import bench_mesh, block, timeit
from graphs import data, flops, gtsp, models, train


TABLE_METRIC = {"binary": "rocauc", "multiclass": "accuracy", "regression": "mae"}


def dataset_label(spec) -> str:
    """The name a dataset entry of the config is reported under."""
    return spec if isinstance(spec, str) else spec["name"]


def load_table_dataset(spec: dict) -> data.GraphDataset:
    """A molecule study on a SMILES + label table, read through ``lmx.data``.

    ``spec``: ``{"name", "path"}`` (a hub id or a local csv/json/parquet file) and optionally
    ``split`` ("train"), ``smiles_column`` ("smiles"), ``label_columns`` (["label"]), ``task``
    ("binary"); SMILES RDKit cannot parse are skipped. Columns and types are checked before any
    featurisation (``lmx.data.load_molecule_table``).
    """
    from lmx.data import load_molecule_table, to_graph_dataset

    allowed = {"name", "path", "split", "smiles_column", "label_columns", "task"}
    if not isinstance(spec, dict) or not {"name", "path"} <= set(spec) or set(spec) - allowed:
        raise ValueError(f"dataset entry {spec!r}: expected a dict with 'name' and 'path' and "
                         f"optionally {sorted(allowed - {'name', 'path'})}")
    table = load_molecule_table(spec["path"], split=spec.get("split", "train"),
                                smiles_column=spec.get("smiles_column", "smiles"),
                                label_columns=spec.get("label_columns", ["label"]),
                                task=spec.get("task", "binary"), name=spec["name"])
    return to_graph_dataset(table, skip_invalid=True)


def _dataset(name, seed: int, max_graphs: int | None, fold: int = 0, folds: int = 0):
    """(dataset, train_idx, test_idx, primary metric).

    ``name``: "mutag", "solubility", "key_retrieval", or a SMILES-table entry (a dict, see
    :func:`load_table_dataset`; a random 80/20 split per seed, metric by task: ROC-AUC, accuracy
    or MAE). MUTAG: a random 80/20 split per seed, or with ``folds`` > 1 fold ``fold`` of a
    ``folds``-way cross-validation over the seed's permutation (every graph is tested once per
    seed: 188 test predictions instead of 38, so one graph moves the accuracy by 0.5 points, not
    2.6).
    """
    if folds > 1 and name != "mutag":
        raise ValueError(f"folds (cross-validation) is supported for mutag only, got dataset {name!r}")
    if isinstance(name, dict):
        ds = load_table_dataset(name)
        if max_graphs:
            ds = ds.subset(np.sort(np.random.default_rng(0).permutation(len(ds))[:max_graphs]))
        perm = np.random.default_rng(seed).permutation(len(ds))
        cut = int(0.8 * len(ds))
        return ds, perm[:cut], perm[cut:], TABLE_METRIC[ds.task]
    if name == "mutag":
        ds = data.load_mutag()
        perm = np.random.default_rng(seed).permutation(len(ds))
        if folds > 1:
            parts = np.array_split(perm, folds)
            return ds, np.concatenate(parts[:fold] + parts[fold + 1:]), parts[fold], "accuracy"
        cut = int(0.8 * len(ds))
        return ds, perm[:cut], perm[cut:], "accuracy"
    if name == "solubility":
        tr, te = data.load_solubility("train"), data.load_solubility("test")
        if max_graphs:
            keep = np.random.default_rng(0).permutation(len(tr))[:max_graphs]
            tr = tr.subset(np.sort(keep))
        ds = data.GraphDataset("solubility", tr.graphs + te.graphs,
                               np.concatenate([tr.labels, te.labels]), "binary",
                               tr.node_vocab, tr.edge_vocab)
        return ds, np.arange(len(tr)), np.arange(len(tr), len(ds)), "rocauc"
    if name == "key_retrieval":
        ds = data.key_retrieval(max_graphs or 400, seed=0, n_range=(24, 40))
        cut = int(0.8 * len(ds))
        return ds, np.arange(cut), np.arange(cut, len(ds)), "accuracy"
    raise ValueError(f"unknown dataset {name!r}")


def _settings(cfg: dict, first_seed: bool) -> list[tuple[str, str, float, gtsp.GTSPConfig]]:
    """GTSP settings of one seed; with ``sweep_first_seed_only`` only the first entry of
    ``sparsities`` runs on every seed (the others on the first seed)."""
    out = []
    modes = ["clean"] + (["faithful"] if cfg.get("faithful") else [])
    sps = cfg["sparsities"] if first_seed or not cfg.get("sweep_first_seed_only") \
        else cfg["sparsities"][:1]
    for mode in modes:
        for axis in cfg["axes"]:
            for s in sps:
                out.append((mode, axis, s, gtsp.GTSPConfig(mode=mode, **{axis: s})))
    all_axes = ("token", "head", "layer", "weight")
    for c in cfg.get("combined", []):
        # a number: all four axes at that sparsity; {"axes": [...], "s": x}: those axes only
        if isinstance(c, dict) and (set(c) != {"axes", "s"} or not set(c["axes"]) <= set(all_axes)):
            raise ValueError(f"combined setting {c!r}: expected a number or "
                             f"{{'axes': subset of {list(all_axes)}, 's': sparsity}}")
        names, s = (all_axes, c) if not isinstance(c, dict) else (tuple(c["axes"]), c["s"])
        label = "all4" if len(names) == 4 else "+".join(names)
        out.append(("clean", label, s, gtsp.GTSPConfig(mode="clean", **{a: s for a in names})))
    return out


def _with_schedule(g: gtsp.GTSPConfig, steps: int) -> gtsp.GTSPConfig:
    import dataclasses

    return dataclasses.replace(g, update_every=max(1, steps // 8), prune_start=0.0,
                               prune_end=0.75)


@contextlib.contextmanager
def _fast_compile(on: bool):
    """``jax_disable_most_optimizations`` inside the block when ``on``; restored after."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", bool(on) or old)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


def _forward_pass(model, batches, gates=None, mode="clean"):
    """A zero-argument callable running the jitted eval forward over ``batches`` (blocking)."""
    gd, state = nnx.split(model)
    fwd = train.eval_forward(gd, mode)
    key = jax.random.key(0)
    return lambda: block([fwd(state, b, gates, key) for b in batches])


def _time_interleaved(passes: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall seconds per entry of ``passes`` (name -> callable). Every callable gets
    ``warmup`` untimed calls (compile included), then ``repeats`` rounds each time every callable
    once, in turn; ``timeit`` with one repeat times each call."""
    for fn in passes.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in passes}
    for _ in range(repeats):
        for k, fn in passes.items():
            times[k].append(timeit(fn, repeats=1, warmup=0)["median_s"])
    return {k: {"median_s": statistics.median(v), "all_s": v} for k, v in times.items()}


def _seed_fold(config: dict, ds_name: str | dict, bb: str, seed: int, fold: int, folds: int,
               preds: dict, passes: dict, flop: dict, t_start: float) -> tuple[str, str]:
    """Train the dense model and every GTSP setting on one (seed, fold) split; append each
    setting's test predictions to ``preds`` and its FLOPs (total, n graphs) to ``flop``; the
    first (seed, fold) also records the timed forward passes. Returns (metric, task)."""
    mc = config["model"]
    ds, tr, te, metric = _dataset(ds_name, seed, config.get("max_graphs"), fold, folds)
    cfg = models.config_for(ds, bb, **mc)
    fit_dense = train.FitConfig(steps=config["dense_steps"], lr=config["lr"],
                                batch_size=config["batch_size"], seed=seed)
    fit_ft = train.FitConfig(steps=config["finetune_steps"], lr=config["lr"] / 2,
                             batch_size=config["batch_size"], seed=seed + 1000, warmup=1)
    fast = config.get("fast_compile_training", False)
    # the training steps are sharded over the run's mesh (stacked batches on data x fsdp, GT
    # parameters replicated); evaluation and timing run the exported models on one device
    mesh = bench_mesh()
    with _fast_compile(fast):
        dense = train.fit(models.make_model(cfg, seed=seed), ds, tr, fit_dense,
                          mesh=mesh).model
    test_graphs = [ds.graphs[i] for i in te]
    # one padding budget for the test and timing batches: one compile per model
    budget = data.bucket_budgets(ds, config["time_batch"], num_buckets=1)
    spec = cfg.batch_spec()
    tbatches = data.make_batches(ds, te, config["time_batch"], spec=spec, buckets=budget)
    first = seed == config["seeds"][0] and fold == 0
    # the timed passes run over the whole dataset, on the first (seed, fold) only
    abatches = data.make_batches(ds, np.arange(len(ds)), config["time_batch"], spec=spec,
                                 buckets=budget) if first else None

    def measure(key, model, flops_per_graph, gates=None, mode="clean"):
        p, y = train.predict(model, tbatches, gates, mode=mode)
        ps, ys = preds.setdefault(key, ([], []))
        ps.append(p)
        ys.append(y)
        tot = flop.setdefault(key, [0.0, 0])
        tot[0] += flops_per_graph * len(test_graphs)
        tot[1] += len(test_graphs)
        if first:
            passes[key] = _forward_pass(model, abatches, gates, mode)

    with _fast_compile(fast):
        base = train.fit(nnx.clone(dense), ds, tr, fit_ft, mesh=mesh).model
    measure(("dense", "-", 0.0), base, flops.dataset_flops(cfg, test_graphs))
    for mode, axis, s, g in _settings(config, first):
        g = _with_schedule(g, config["finetune_steps"])
        with _fast_compile(fast):
            r = train.fit(nnx.clone(dense), ds, tr, fit_ft, g, mesh=mesh)
        key = (mode, axis, s)
        if mode == "clean":
            tok = 1.0 - g.token if g.token > 0 else None
            ex = gtsp.export_clean(r.model, head_mask=r.head_mask, layer_keep=r.layer_keep,
                                   ffn_units=r.ffn_units, token_keep=tok)
            measure(key, ex, flops.dataset_flops(ex.cfg, test_graphs))
        else:
            measure(key, r.model, float(np.mean([flops.faithful_flops(
                cfg, int(gr.n_node[0]), int(gr.n_edge[0]), token_keep=1 - g.token,
                head_density=1 - g.head, weight_density=1 - g.weight)["core"]
                for gr in test_graphs])), r.gates, "faithful")
        print(f"[graphs] {dataset_label(ds_name)} {bb} seed={seed} fold={fold} {mode}:{axis}:{s} "
              f"done ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr, flush=True)
    return metric, ds.task


def run(config: dict, out_dir: pathlib.Path) -> dict:
    t_start = time.perf_counter()
    rows, raw = [], []
    for ds_spec in config["datasets"]:
        ds_name = dataset_label(ds_spec)
        for bb in config["backbones"]:
            per_setting: dict = {}
            passes: dict = {}
            flop: dict = {}
            folds = config.get("folds", 0)
            for seed in config["seeds"]:
                preds: dict = {}  # setting -> (predictions, labels) of every fold of this seed
                for fold in range(max(folds, 1)):
                    metric, task = _seed_fold(config, ds_spec, bb, seed, fold, folds, preds,
                                              passes, flop, t_start)
                for key, (ps, ys) in preds.items():
                    ev = train.score(task, np.concatenate(ps), np.concatenate(ys))
                    per_setting.setdefault(key, []).append(ev[metric])
                    mode, axis, sp = key
                    print(f"[graphs] {ds_name} {bb} seed={seed} {mode}:{axis}:{sp} "
                          f"{metric}={ev[metric]:.4f} ({time.perf_counter() - t_start:.0f}s)",
                          file=sys.stderr, flush=True)
                    raw.append({"dataset": ds_name, "backbone": bb, "seed": seed, "mode": mode,
                                "axis": axis, "sparsity": sp, "folds": folds, **ev})
            timed = _time_interleaved(passes, config["repeats"], config.get("warmup", 1))
            timing = {k: v["median_s"] for k, v in timed.items()}
            raw.append({"dataset": ds_name, "backbone": bb, "timing_all_s":
                        {":".join(map(str, k)): v["all_s"] for k, v in timed.items()}})
            mean_flops = {k: tot / max(n, 1) for k, (tot, n) in flop.items()}
            d_metric = float(np.mean(per_setting[("dense", "-", 0.0)]))
            d_flops = mean_flops[("dense", "-", 0.0)]
            d_time = timing[("dense", "-", 0.0)]
            for key, vals in per_setting.items():
                mode, axis, s = key
                rows.append({
                    "dataset": ds_name, "backbone": bb, "mode": mode, "axis": axis,
                    "sparsity": s, "metric": metric, "mean": float(np.mean(vals)),
                    "std": float(np.std(vals)), "n_seeds": len(vals), "folds": folds,
                    "delta_pts": 100 * (float(np.mean(vals)) - d_metric),
                    "MFLOPs/graph": mean_flops[key] / 1e6,
                    "flops_cut_%": 100 * (1 - mean_flops[key] / d_flops),
                    "infer_ms": 1e3 * timing[key], "speedup": d_time / timing[key]})
    plots = _plot(rows, out_dir)
    return {"summary": rows, "raw": raw, "plots": plots,
            "elapsed_s": time.perf_counter() - t_start}


def _plot(rows: list, out_dir: pathlib.Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    groups = sorted({(r["dataset"], r["backbone"]) for r in rows})
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for ax, (ds, bb) in zip(axes[0], groups):
        for r in rows:
            if (r["dataset"], r["backbone"]) != (ds, bb):
                continue
            ax.scatter(r["flops_cut_%"], r["delta_pts"],
                       marker="o" if r["mode"] == "clean" else "x",
                       label=f"{r['mode']}:{r['axis']}:{r['sparsity']}")
        ax.axhline(-1.0, ls="--", lw=0.8)
        ax.axvline(30.0, ls="--", lw=0.8)
        ax.set_title(f"{bb} / {ds}")
        ax.set_xlabel("FLOPs cut %")
        ax.set_ylabel("metric delta (points)")
    fig.tight_layout()
    p = out_dir / "graphs_tradeoff.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(str(p))
    return paths
