"""``python -m benchmarks <suite>|quick|list [--preset quick|full] [--mesh data=2,fsdp=4]``.

``quick`` runs every suite's quick preset and prints one summary table per suite. ``--mesh`` sets
the device mesh the training suites shard over (``lmx.parallel.mesh_from_spec``; default: every
device on ``data``); each result JSON records it and the process count. Under a multi-process
launch every process runs the suite and process 0 writes the result.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pathlib
import sys
import time

import jax

from benchmarks import common
from lmx.cli import configure_logging
from lmx.parallel import initialize_distributed

SUITES_DIR = pathlib.Path(__file__).resolve().parent / "suites"
log = logging.getLogger("benchmarks")


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.py") if not p.stem.startswith("_"))


def run_suite(name: str, preset: str, out_dir: pathlib.Path) -> dict:
    if name not in available_suites():
        raise SystemExit(f"unknown suite {name!r}; available: {', '.join(available_suites())}")
    config = common.load_config(name, preset)
    module = importlib.import_module(f"benchmarks.suites.{name}")
    # the suite writes plots and caches into its own work folder, so a preset's run never
    # overwrites another preset's plots; the plots are then moved next to the JSON, tagged
    work = out_dir / f".work-{name}-{preset}"
    log.info("suite %s, preset %s: running", name, preset)
    t0 = time.perf_counter()
    result = module.run(config, work)
    wall = time.perf_counter() - t0
    if "summary" not in result:
        raise RuntimeError(f"suite {name!r} returned no 'summary' rows")
    if jax.process_index() != 0:
        log.info("suite %s, preset %s: done in %.1f s (process %d writes no result)", name, preset,
                 wall, jax.process_index())
        return result
    result["plots"] = [common.tag_with_preset(p, name, preset, out_dir)
                       for p in result.get("plots", [])]
    path = common.write_result(name, preset, config, result, wall, out_dir)
    log.info("suite %s, preset %s: done in %.1f s, result in %s", name, preset, wall, path)
    print(common.format_table(result["summary"], f"{name} ({preset}, {wall:.1f} s) -> {path}"),
          flush=True)
    return result


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _reexec_with_caching_allocator() -> None:
    """Restart under jemalloc when it is installed (Debian/Ubuntu: ``apt-get install libjemalloc2``).

    glibc's malloc hands large freed buffers back to the OS, so XLA:CPU pays fresh page faults for
    every step's buffers; jemalloc with decay off keeps them mapped (on the 2-core CPU VM this was
    about a fifth of an LM train step). Both sides of every comparison run under the same
    allocator, and each result JSON records which one ran (``machine.allocator``).
    LMX_NO_JEMALLOC=1 opts out."""
    if os.environ.get("LD_PRELOAD") or os.environ.get("LMX_NO_JEMALLOC"):
        return
    if not os.path.exists(JEMALLOC):
        log.warning("jemalloc not found at %s: running with the system malloc (CPU timings are "
                    "slower; apt-get install libjemalloc2 to match the published runs)", JEMALLOC)
        return
    env = {**os.environ, "LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("suite", help="a suite name, 'quick' (all suites, quick preset) or 'list'")
    ap.add_argument("--preset", default="quick", help="a preset of configs/bench/<suite>.json (quick, full, gpu, ...)")
    ap.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR)
    ap.add_argument("--mesh", default=None,
                    help="device mesh for the training suites, e.g. 'data=2,fsdp=4,tensor=1' "
                         "(default: every device on data)")
    args = ap.parse_args(argv)
    # joins a multi-process launch (SLURM, Open MPI, multi-host TPU, or a named coordinator);
    # a no-op on one process
    if initialize_distributed():
        log.info("process %d of %d", jax.process_index(), jax.process_count())
    try:
        common.set_mesh_spec(args.mesh)
    except ValueError as e:
        ap.error(f"--mesh: {e}")
    if args.suite == "list":
        print("\n".join(available_suites()))
        return 0
    if args.suite != "quick":
        run_suite(args.suite, args.preset, args.out)
        return 0
    failed = []
    for name in available_suites():
        try:
            run_suite(name, "quick", args.out)
        except Exception:  # noqa: BLE001 - one broken suite must not hide the others' tables
            log.exception("suite %s failed", name)
            failed.append(name)
    if failed:
        log.error("FAILED suites: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    configure_logging()
    _reexec_with_caching_allocator()
    sys.exit(main())
