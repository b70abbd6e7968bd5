"""Benchmark ``serve``: the OpenAI-compatible server (continuous batching) under concurrent clients.

SmolLM2-135M-Instruct (GGUF asset) behind ``lmx.serve.ChatServer`` on 127.0.0.1, warmed up first
(every kernel shape compiled; the run checks that no compile happens afterwards). For each
concurrency level ``c`` in ``clients``, ``c`` client threads each send ``rounds`` streaming chat
requests one after another (greedy, ``ignore_eos`` so every reply has exactly ``max_tokens``
tokens; prompts differ per client). Measured per level, all in the same process and run:

* throughput: completion tokens / wall seconds of the level; ``speedup_vs_1`` divides it by the
  throughput of one client at a time (the ``c = 1`` level);
* TTFT: request sent -> first content chunk (p50 / p95 over requests);
* inter-token latency: gaps between consecutive content chunks of a stream (p50 / p95), and
  per request (last chunk - first chunk) / (tokens - 1) (mean);
* CPU seconds used during the level by the server process and by the clients, and completion
  tokens per CPU second: on a machine shared with other jobs the wall-clock ratios move with
  the load, the CPU time much less.

The clients run in a separate process (``client_process``, default true), as a load generator
should: in the server's process their threads would compete with the engine thread for the GIL.

Continuous batching: Yu et al. 2022 (Orca, OSDI'22), iteration-level scheduling.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import pathlib
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

TOPICS = ("the sea", "mountains", "a city at night", "bread", "rain", "old trains", "music",
          "a library", "winter", "bees", "the moon", "rivers", "chess", "gardens", "clocks", "tea")


def _one_request(base_url: str, model: str, prompt: str, max_tokens: int, client) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": prompt}]}
    t0 = time.perf_counter()
    stamps, tokens = [], None
    with client.stream("POST", base_url + "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    stamps.append(time.perf_counter())
    if tokens is None or not stamps:
        raise RuntimeError("stream ended without content or usage")
    gaps = np.diff(stamps).tolist()
    return {"ttft_s": stamps[0] - t0, "gaps_s": gaps, "tokens": tokens,
            "itl_s": (stamps[-1] - stamps[0]) / max(tokens - 1, 1), "end_s": stamps[-1] - t0}


def run_level(base_url: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """``clients`` threads x ``rounds`` sequential streaming requests -> latency, throughput."""
    import httpx

    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int):
        with httpx.Client(timeout=600) as client:
            for r in range(rounds):
                prompt = f"Write about {TOPICS[(k + r) % len(TOPICS)]} (note {k}.{r})."
                try:
                    out = _one_request(base_url, model, prompt, max_tokens, client)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    results.append(out)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0  # this process: the clients
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed at {clients} clients: {errors[:3]}")
    ttft = np.array([r["ttft_s"] for r in results])
    gaps = np.array([g for r in results for g in r["gaps_s"]])
    tokens = int(sum(r["tokens"] for r in results))
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "client_process_cpu_s": cpu,
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p95_s": float(np.percentile(ttft, 95)),
            "itl_p50_s": float(np.percentile(gaps, 50)),
            "itl_p95_s": float(np.percentile(gaps, 95)),
            "itl_mean_per_request_s": float(np.mean([r["itl_s"] for r in results]))}


def long_prompt_arrival(model, tokenizer, cfg: dict, chunk: int) -> dict:
    """Running greedy streams while a long prompt joins, on an :class:`lmx.serve.Engine` whose
    long prompts are prefilled in chunks of ``chunk`` tokens (``chunk`` = the largest prompt
    bucket: one call for the whole prompt).

    ``cfg``: ``running`` streams (short prompts, ``running_tokens`` each) start; once each has
    4 tokens, a prompt of ``prompt_tokens`` tokens arrives (``max_tokens`` 4). Reported: the
    longest and p95 gap between consecutive tokens of the running streams while the long prompt
    is prefilled (its arrival to its first token), and its time to first token.
    """
    from lmx.serve import Engine, GenRequest

    eng = Engine(model, tokenizer, n_slots=cfg["n_slots"], max_len=cfg["max_len"],
                 batch_buckets=cfg["batch_buckets"], span_buckets=cfg["span_buckets"],
                 prompt_buckets=cfg["prompt_buckets"], prefill_chunk=chunk,
                 prefill_tokens_per_step=chunk, prefix_reuse=False)
    t0 = time.perf_counter()
    eng.warmup()
    warm_s = time.perf_counter() - t0
    compiled = eng.compile_count()
    stamps: dict[int, list[float]] = {}
    lock = threading.Lock()

    def recorder(k: int):
        def on_event(ev):
            if ev.text or ev.finish_reason:
                with lock:
                    stamps.setdefault(k, []).append(time.perf_counter())
        return on_event

    enc = lambda text: list(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    streams = [eng.submit(GenRequest(enc(f"Note {k}: write about {TOPICS[k % len(TOPICS)]}."),
                                     max_tokens=cfg["running_tokens"], ignore_eos=True),
                          recorder(k)) for k in range(cfg["running"])]
    while True:
        with lock:
            if all(len(stamps.get(k, [])) >= 4 for k in range(cfg["running"])):
                break
        time.sleep(0.005)
    words = " ".join(f"Sentence {i} is about {TOPICS[i % len(TOPICS)]}." for i in range(400))
    long_ids = enc(words)[:cfg["prompt_tokens"]]
    long = eng.submit(GenRequest(long_ids, max_tokens=4, ignore_eos=True))
    long.result(timeout=600)
    for s in streams:
        s.done.wait(600)
    eng.stop()
    t_arrive, t_first = long.t_submit, long.t_first  # submitted, first reply token pushed
    gaps = [b - a for k in range(cfg["running"]) for a, b in zip(stamps[k], stamps[k][1:])
            if b > t_arrive and a < t_first]
    return {"prefill_chunk": chunk, "prompt_tokens": len(long_ids), "running": cfg["running"],
            "long_prompt_ttft_s": t_first - t_arrive,
            "running_max_gap_s": float(max(gaps)),
            "running_p95_gap_s": float(np.percentile(gaps, 95)),
            "running_tokens_during_prefill": len(gaps),
            "warmup_s": warm_s, "kernel_compiles_during_run": eng.compile_count() - compiled}


def _plot(rows: list[dict], out_dir: pathlib.Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["clients"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(c, [r["tokens_per_s"] for r in rows], "o-")
    axes[0].set(xscale="log", xlabel="concurrent streaming clients", ylabel="completion tokens / s",
                title="throughput")
    axes[1].plot(c, [r["ttft_p50_s"] for r in rows], "o-", label="p50")
    axes[1].plot(c, [r["ttft_p95_s"] for r in rows], "s--", label="p95")
    axes[1].set(xscale="log", xlabel="concurrent streaming clients", ylabel="seconds",
                title="time to first token")
    axes[1].legend()
    axes[2].plot(c, [r["itl_p50_s"] * 1e3 for r in rows], "o-", label="p50")
    axes[2].plot(c, [r["itl_p95_s"] * 1e3 for r in rows], "s--", label="p95")
    axes[2].set(xscale="log", xlabel="concurrent streaming clients", ylabel="ms",
                title="inter-token latency")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(c, [str(x) for x in c])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out_dir / "serve.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [str(path)]


def run(config: dict, out_dir: pathlib.Path) -> dict:
    from lmx.backends import LocalBackend
    from lmx.models import load
    from lmx.serve import ChatServer, backend_compiles

    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    clients = sorted(int(c) for c in config["clients"])
    if clients[0] != 1:
        raise ValueError(f"clients must include 1 (the one-at-a-time baseline), got {clients}")
    t0 = time.perf_counter()
    model, tokenizer = load(config["model"])  # the long-prompt part below reuses them
    backend = LocalBackend.from_lmx(model, tokenizer, model_name=config["model"],
                                    max_batch=config["n_slots"],
                                    max_seq_len=config["max_seq_len"], n_slots=config["n_slots"],
                                    batch_buckets=config["batch_buckets"],
                                    span_buckets=config["span_buckets"],
                                    prompt_buckets=config["prompt_buckets"],
                                    prefill_batch_buckets=config.get("prefill_batch_buckets"),
                                    prefill_tokens_per_step=config.get("prefill_tokens_per_step",
                                                                       256),
                                    prefix_reuse=bool(config.get("prefix_reuse", True)))
    load_s = time.perf_counter() - t0
    rows = []
    with ChatServer(backend, model_name=config["model"]) as srv:
        t0 = time.perf_counter()
        variants = srv.engine.warmup()
        warm_s = time.perf_counter() - t0
        compiles0, kernels0 = backend_compiles(), srv.engine.compile_count()
        in_child = bool(config.get("client_process", True))
        pool = (concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) if in_child else None)
        try:
            for c in clients:
                log.info("serve bench: %d clients", c)
                args = (srv.base_url, config["model"], c, config["rounds"], config["max_tokens"])
                c0, m = time.process_time(), srv.engine.metrics
                p0, cached0 = m.prompt_tokens, m.prompt_tokens_cached
                row = pool.submit(run_level, *args).result() if in_child else run_level(*args)
                row["server_cpu_s"] = time.process_time() - c0  # + the clients when in this process
                row["prompt_tokens"] = m.prompt_tokens - p0
                row["prompt_tokens_cached"] = m.prompt_tokens_cached - cached0
                row["load_avg_1min"] = os.getloadavg()[0]
                row["cpu_s"] = row["server_cpu_s"] + (
                    row["client_process_cpu_s"] if in_child else 0.0)
                row["tokens_per_cpu_s"] = row["completion_tokens"] / row["cpu_s"]
                rows.append(row)
                log.info("  %s", rows[-1])
        finally:
            if pool is not None:
                pool.shutdown()
        compiles_during = backend_compiles() - compiles0
        kernels_during = srv.engine.compile_count() - kernels0
    long_rows = []
    if config.get("long_prompt"):
        lp = config["long_prompt"]
        for chunk in (lp["chunk"], max(lp["prompt_buckets"])):
            log.info("serve bench: a %d-token prompt joins %d running streams, chunk %d",
                     lp["prompt_tokens"], lp["running"], chunk)
            long_rows.append(long_prompt_arrival(model, tokenizer, lp, chunk))
            log.info("  %s", long_rows[-1])
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_1"] = r["tokens_per_s"] / base
        r["cpu_efficiency_vs_1"] = r["tokens_per_cpu_s"] / rows[0]["tokens_per_cpu_s"]
    load_avg = os.getloadavg()[0]
    title = (f"{config['model']} on CPU ({os.cpu_count()} cores, load avg "
             f"{load_avg:.1f}), {config['max_tokens']} tokens/request, "
             f"{config['n_slots']} slots")
    return {"summary": rows, "long_prompt_arrival": long_rows, "load_seconds": load_s,
            "warmup_seconds": warm_s,
            "kernel_variants": variants, "clients_in_separate_process": in_child,
            "xla_compiles_during_run": compiles_during,
            "kernel_compiles_during_run": kernels_during,
            "plots": _plot(rows, out_dir, title)}
