"""Merge runner: base + fine-tuned checkpoints + a method config -> merged checkpoint.

Config (JSON, see ``configs/merge/*.json``)::

    {"base": "ckpt/base", "models": ["ckpt/math", "ckpt/code"],
     "method": {"name": "ties", "k": 0.2, "lam": 0.3, "merge": "sum", "scope": "global"},
     "output": {"path": "ckpt/merged", "format": "safetensors", "dtype": null,
                "max_shard_bytes": null}}

``method.name``: ``average`` | ``task_arithmetic`` | ``ties`` | ``dare`` (fields = the method
dataclass's fields in :mod:`lmx.merge.methods`; ``dare`` takes an optional nested ``ties``
block). Inputs are safetensors files or HF directories; ``format`` ``"safetensors"`` streams
tensor by tensor into an HF-layout directory; ``"orbax"`` assembles the merged dict in memory
and saves it with ``orbax.checkpoint.StandardCheckpointer``. Relative paths resolve against the
current directory. Learned methods need a model and data and are library calls instead
(:mod:`lmx.merge.learned`).

CLI: ``python -m lmx.merge.runner CONFIG [--base P] [--models P ...] [--output P] [--no-progress]``
prints a one-row summary table and writes ``<output>/merge_summary.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import tempfile
from typing import Any

from lmx.cli import configure_logging
from lmx.merge import methods as M
from lmx.merge import streaming as S

METHODS = {"average": M.Average, "task_arithmetic": M.TaskArithmetic, "ties": M.Ties,
           "dare": M.Dare}
FORMATS = ("safetensors", "orbax")


def build_method(method_cfg: dict) -> Any:
    """Method dataclass from ``{"name": ..., **fields}``.

    Raises ValueError for an unknown name or field (listing the allowed ones).
    """
    if "name" not in method_cfg:
        raise ValueError(f"method: needs a 'name' (one of {sorted(METHODS)}), got {method_cfg}")
    name = method_cfg["name"]
    if name not in METHODS:
        raise ValueError(f"method.name: unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {k: v for k, v in method_cfg.items() if k != "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"method {name!r}: unknown fields {unknown}; allowed: {sorted(fields)}")
    if name == "dare" and kwargs.get("ties") is not None:
        kwargs["ties"] = build_method({"name": "ties", **kwargs["ties"]})
    if isinstance(kwargs.get("lam"), list):
        kwargs["lam"] = tuple(kwargs["lam"])
    return cls(**kwargs)


def validate_config(cfg: dict) -> dict:
    """Fill defaults and check a runner config; raises ValueError naming the bad key."""
    for key in ("base", "models", "method", "output"):
        if key not in cfg:
            raise ValueError(f"merge config: missing key {key!r}")
    if not isinstance(cfg["models"], list) or not cfg["models"]:
        raise ValueError(f"merge config: 'models' must be a non-empty list, got {cfg['models']!r}")
    out = cfg["output"] if isinstance(cfg["output"], dict) else {"path": cfg["output"]}
    out = {"format": "safetensors", "dtype": None, "max_shard_bytes": None, **out}
    if out["format"] not in FORMATS:
        raise ValueError(f"output.format: expected one of {FORMATS}, got {out['format']!r}")
    build_method(cfg["method"])
    return {**cfg, "output": out}


def _save_orbax(method, cfg, progress) -> dict:
    import numpy as np
    import orbax.checkpoint as ocp

    # Stream-merge into a scratch directory, then hand the tensors to orbax in one save.
    with tempfile.TemporaryDirectory() as tmp:
        summary = S.stream_merge(method, cfg["base"], cfg["models"], tmp,
                                 dtype=cfg["output"]["dtype"], progress=progress,
                                 copy_files=False)
        tensors = {n: np.asarray(x) for n, x in S.load_safetensors(tmp).items()}
    path = pathlib.Path(cfg["output"]["path"]).resolve()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tensors, force=True)
    ckptr.wait_until_finished()
    return {**summary, "output": str(path), "files": ["<orbax>"]}


def run_merge(config: dict | str | pathlib.Path, *, progress: bool = True) -> dict:
    """Run one merge described by ``config`` (dict or JSON path); returns the summary dict
    (:func:`lmx.merge.streaming.stream_merge`) and writes it next to the output."""
    cfg = json.loads(pathlib.Path(config).read_text()) if not isinstance(config, dict) else config
    cfg = validate_config(cfg)
    method = build_method(cfg["method"])
    out = cfg["output"]
    if out["format"] == "orbax":
        summary = _save_orbax(method, cfg, progress)
        summary_path = pathlib.Path(str(summary["output"]) + ".merge_summary.json")
    else:
        summary = S.stream_merge(method, cfg["base"], cfg["models"], out["path"],
                                 dtype=out["dtype"], max_shard_bytes=out["max_shard_bytes"],
                                 progress=progress)
        summary_path = pathlib.Path(out["path"]) / "merge_summary.json"
    summary["config"] = cfg
    summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    """One-row markdown table of the headline numbers of a merge summary."""
    row = {"method": summary["method"], "models": summary["n_models"],
           "tensors": summary["n_tensors"], "GB in": f"{summary['bytes_in'] / 1e9:.3f}",
           "GB out": f"{summary['bytes_out'] / 1e9:.3f}", "passes": summary["passes"],
           "seconds": f"{summary['seconds']:.2f}", "GB/s": f"{summary['gb_per_s']:.3f}"}
    for k in ("kept_fraction", "majority_sign"):
        if summary["stats"].get(k) is not None:
            row[k] = f"{summary['stats'][k]:.4g}"
    return ("| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| "
            + " | ".join(str(v) for v in row.values()) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmx.merge.runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=pathlib.Path)
    ap.add_argument("--base")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--output")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = json.loads(args.config.read_text())
    if args.base:
        cfg["base"] = args.base
    if args.models:
        cfg["models"] = args.models
    if args.output:
        out = cfg.get("output", {})
        cfg["output"] = {**(out if isinstance(out, dict) else {}), "path": args.output}
    configure_logging()
    logging.getLogger(__name__).info("merge as configured in %s", args.config)
    summary = run_merge(cfg, progress=not args.no_progress)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
