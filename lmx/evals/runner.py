"""Runner: n samples per problem from any generation backend -> sandboxed execution -> tables.

The programs follow the released harnesses: OOP-eval (arXiv:2401.06628) and human-eval
(Chen et al. 2021, arXiv:2107.03374).

Backends are duck-typed, nothing here imports a model:

* a callable ``generate(prompts: list[str], n: int, **kw) -> list[list[str]]`` (n texts each);
* an object with ``chat(conversations, **kw) -> list[str]`` (``lmx.backends`` chat backends),
  adapted by :func:`chat_generator`;
* a samples JSONL file (human-eval format: ``task_id``, ``completion``; optional ``sample_idx``
  and ``raw``).

Programs (fidelity with the upstream harnesses):

* OOP: ``completion + "\\n" + test_function``, then each ``test_list`` assert inside
  ``def check(candidate)`` called as ``check(test_run)``. The prompt is NOT prepended (the
  completion must be a full program). The keyword check runs in the evaluator as pure string logic
  (:func:`lmx.evals.metrics.keyword_match`) on the sanitized completion (``keywords_ok``, used for
  pass@o) and on the raw model text (``keywords_ok_raw``, recorded).
* HumanEval: ``prompt + completion + "\\n" + test``, then ``check(entry_point)``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import textwrap
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

from lmx.evals.data import OOPProblem, extract_code
from lmx.evals.jsonl import iter_json_objects
from lmx.evals.metrics import keyword_match, summarize
from lmx.evals.sandbox import Job, Sandbox, read_jsonl_records, run_jobs, truncate_torn_tail

GenerateFn = Callable[..., list[list[str]]]

OOP_INSTRUCTION = ("Write a complete, self-contained Python program that solves the task. "
                   "Define every class and method exactly as named. Return only the code in one "
                   "```python code block.")


def oop_prompt(problem: OOPProblem) -> str:
    """Zero-shot user turn: the question plus the request for a complete program (zero-shot,
    as the paper evaluates, arXiv:2401.06628)."""
    return f"{problem.question}\n\n{OOP_INSTRUCTION}"


def humaneval_prompt(problem: Mapping) -> str:
    """Completion-style prompt: the function signature and docstring as shipped."""
    return problem["prompt"]


def oop_job(problem: OOPProblem, completion: str) -> Job:
    """The OOP-eval functional program as a :class:`Job` (one test per assert)."""
    tests = tuple(f"def check(candidate):\n{textwrap.indent(t, '    ')}\n"
                  f"check({problem.entry_point})" for t in problem.test_list)
    return Job(completion + "\n" + problem.test_function, tests)


def humaneval_job(problem: Mapping, completion: str) -> Job:
    """human-eval's check program as a :class:`Job` (one test: ``check(entry_point)``)."""
    return Job(problem["prompt"] + completion + "\n" + problem["test"],
               (f"check({problem['entry_point']})",))


def chat_generator(backend: Any, *, system: str | None = None) -> GenerateFn:
    """Adapt a chat backend (``backend.chat(conversations, **kw) -> list[str]``) to a generator.

    Each prompt becomes the user turn (after an optional system turn), repeated n times in one
    batch so sampling backends draw n independent replies.

    Raises:
      TypeError: ``backend`` has no callable ``chat``.
    """
    if not callable(getattr(backend, "chat", None)):
        raise TypeError(f"backend must have a chat(conversations, **kw) method, got "
                        f"{type(backend).__name__}")

    def generate(prompts: list[str], n: int, **kw) -> list[list[str]]:
        head = [{"role": "system", "content": system}] if system else []
        convs = [head + [{"role": "user", "content": p}] for p in prompts for _ in range(n)]
        texts = backend.chat(convs, **kw)
        return [list(texts[i * n:(i + 1) * n]) for i in range(len(prompts))]

    return generate


def _task_id(problem: Any) -> str:
    return problem.task_id if isinstance(problem, OOPProblem) else problem["task_id"]


def read_samples(path: str | os.PathLike) -> list[dict]:
    """Samples JSONL -> dicts with ``task_id``, ``completion``, ``sample_idx`` (by order per task
    when absent, like human-eval's ``completion_id``) and ``raw`` (defaults to the completion).

    Raises:
      ValueError: a line is not a JSON object, lacks a str ``task_id``, has a bad ``sample_idx``
        or repeats a (task_id, sample_idx); the message names the file and line number.
      TypeError: a completion is not a str (the message names the file, line, sample and task).
    """
    out, counter, seen = [], defaultdict(int), set()
    with open(path, encoding="utf-8") as f:
        for lineno, rec in iter_json_objects(f, path):
            if not isinstance(rec.get("task_id"), str):
                raise ValueError(f"{path}:{lineno}: a sample needs a str task_id, got "
                                 f"{rec.get('task_id')!r}")
            idx = rec.get("sample_idx", counter[rec["task_id"]])
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise ValueError(f"{path}:{lineno}: sample_idx of task {rec['task_id']!r} must be "
                                 f"an int >= 0, got {idx!r}")
            if not isinstance(rec.get("completion"), str):
                raise TypeError(f"{path}:{lineno}: completion of sample {idx} of task "
                                f"{rec['task_id']!r} must be str, got "
                                f"{type(rec.get('completion')).__name__}")
            counter[rec["task_id"]] = max(counter[rec["task_id"]], idx + 1)
            if (rec["task_id"], idx) in seen:
                raise ValueError(f"{path}:{lineno}: duplicate sample {rec['task_id']}#{idx}")
            seen.add((rec["task_id"], idx))
            out.append({"task_id": rec["task_id"], "sample_idx": idx,
                        "completion": rec["completion"], "raw": rec.get("raw", rec["completion"])})
    return out


def generate_samples(generate: GenerateFn | Any, problems: Sequence, n: int, *,
                     prompt_fn: Callable[[Any], str] | None = None,
                     samples_path: str | os.PathLike | None = None, batch_problems: int = 8,
                     sanitize: bool = True, progress: bool = False, **gen_kw) -> list[dict]:
    """Draw n samples per problem; append them to ``samples_path`` as they arrive (resumable).

    Args:
      generate: ``generate(prompts, n, **gen_kw) -> list[list[str]]`` or a chat backend.
      problems: :class:`OOPProblem` s or HumanEval dicts.
      n: samples per problem (>= 1).
      prompt_fn: problem -> prompt text (default: :func:`oop_prompt` / :func:`humaneval_prompt`).
      samples_path: JSONL to append to; problems already holding n samples there are skipped.
      batch_problems: problems per ``generate`` call.
      sanitize: store ``extract_code(raw)`` as the completion (raw text kept under ``raw``).
      gen_kw: passed to ``generate`` (max_tokens, temperature, ...).

    Returns:
      all samples (resumed + new) as in :func:`read_samples`, in problem order.

    Raises:
      ValueError: n < 1, empty problems, or the backend returned the wrong shape.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not problems:
        raise ValueError("problems is empty")
    if not callable(generate) or callable(getattr(generate, "chat", None)):
        generate = chat_generator(generate)
    if prompt_fn is None:
        prompt_fn = oop_prompt if isinstance(problems[0], OOPProblem) else humaneval_prompt
    have: dict[str, list[dict]] = defaultdict(list)
    if samples_path is not None and pathlib.Path(samples_path).exists():
        truncate_torn_tail(samples_path)
        for s in read_samples(samples_path):
            have[s["task_id"]].append(s)
    todo = [p for p in problems if len(have[_task_id(p)]) < n]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="generate", unit="problem")
    sink = open(samples_path, "a", encoding="utf-8") if samples_path is not None else None
    try:
        for s in range(0, len(todo), batch_problems):
            batch = todo[s:s + batch_problems]
            outs = generate([prompt_fn(p) for p in batch], n, **gen_kw)
            if len(outs) != len(batch) or any(len(o) != n or not all(isinstance(t, str) for t in o)
                                               for o in outs):
                raise ValueError(f"generate must return {len(batch)} lists of {n} str each")
            for p, texts in zip(batch, outs):
                tid = _task_id(p)
                start = len(have[tid])
                # A problem sampled before with a smaller n gets only its missing samples.
                recs = [{"task_id": tid, "sample_idx": start + i,
                         "completion": extract_code(raw) if sanitize else raw, "raw": raw}
                        for i, raw in enumerate(texts[:n - start])]
                have[tid] += recs
                if sink is not None:
                    # One write per problem: a kill leaves whole problems or one torn tail.
                    sink.write("".join(json.dumps(r) + "\n" for r in recs))
                    sink.flush()
            if bar is not None:
                bar.update(len(batch))
    finally:
        if sink is not None:
            sink.close()
        if bar is not None:
            bar.close()
    return [s for p in problems for s in sorted(have[_task_id(p)], key=lambda r: r["sample_idx"])
            [:n]]


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """``table``: :func:`lmx.evals.metrics.summarize` output; ``records``: one dict per sample."""

    table: dict
    records: list[dict]


def evaluate(problems: Sequence, samples: Iterable[Mapping] | str | os.PathLike, *,
             sandbox: Sandbox | None = None, results_path: str | os.PathLike | None = None,
             workers: int | None = None, ks: Sequence[int] = (1,), progress: bool = False,
             allow_missing: bool = False) -> EvalReport:
    """Execute every sample in the sandbox and tabulate pass@k (and pass@o for OOP problems).

    Args:
      problems: :class:`OOPProblem` s or HumanEval dicts (one kind).
      samples: sample dicts (``task_id``, ``completion``, optional ``sample_idx``/``raw``) or a
        samples JSONL path.
      sandbox: default ``Sandbox()`` (3 s timeout, as both upstream harnesses).
      results_path: JSONL streamed one line per finished sample; rerunning with the same path
        skips finished samples (resume) and yields the same report.
      workers: parallel samples (default: all cores).
      ks: pass@k values to report (a k is reported where every problem has n >= k).
      allow_missing: tolerate problems without samples (upstream asserts every problem has one).

    Raises:
      ValueError: samples for unknown tasks, problems without samples, mixed problem kinds.
      TypeError: a completion is not a str (the message names the sample and task id).
    """
    if isinstance(samples, (str, os.PathLike)):
        samples = read_samples(samples)
    samples = list(samples)
    by_id = {_task_id(p): p for p in problems}
    if len(by_id) != len(problems):
        raise ValueError("problems hold duplicate task ids")
    is_oop = {isinstance(p, OOPProblem) for p in problems}
    if len(is_oop) != 1:
        raise ValueError("problems must be all OOPProblem or all HumanEval dicts")
    oop = is_oop.pop()
    unknown = sorted({s["task_id"] for s in samples} - set(by_id))
    if unknown:
        raise ValueError(f"samples reference unknown tasks: {unknown[:5]}")
    missing = sorted(set(by_id) - {s["task_id"] for s in samples})
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} problems have no samples (e.g. {missing[:5]}); "
                         "pass allow_missing=True to evaluate a subset")
    counter: dict[str, int] = defaultdict(int)
    items = []
    for s in samples:
        tid = s["task_id"]
        idx = s.get("sample_idx", counter[tid])
        counter[tid] = max(counter[tid], idx + 1)
        p = by_id[tid]
        completion = s.get("completion")
        if not isinstance(completion, str):
            raise TypeError(f"completion of sample {idx} of task {tid!r} must be str, got "
                            f"{type(completion).__name__}")
        meta: dict[str, Any] = {"task_id": tid, "sample_idx": idx}
        if oop:
            meta["level"] = p.level
            meta["keywords_ok"] = keyword_match(completion, p.keywords)
            meta["keywords_ok_raw"] = keyword_match(s.get("raw", completion), p.keywords)
            job = oop_job(p, completion)
        else:
            job = humaneval_job(p, completion)
        items.append((f"{tid}#{idx}", job, meta))
    sandbox = sandbox or Sandbox()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done = len(read_jsonl_records(results_path)) if results_path else 0
        bar = tqdm(total=len(items), initial=min(done, len(items)), desc="execute", unit="sample")
    try:
        recs = run_jobs(sandbox, items, results_path=results_path, workers=workers,
                        on_result=(lambda r: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    records = []
    for key, _, _ in items:
        r = dict(recs[key])
        if oop:
            r["passed_o"] = bool(r["passed"] and r["keywords_ok"])
        records.append(r)
    return EvalReport(summarize(records, ks), records)


def run(problems: Sequence, source: GenerateFn | Any | str | os.PathLike, *, n: int = 1,
        ks: Sequence[int] = (1,), out_dir: str | os.PathLike | None = None,
        sandbox: Sandbox | None = None, workers: int | None = None, progress: bool = False,
        **gen_kw) -> EvalReport:
    """Generate (or read) samples, execute them, tabulate: the whole pipeline, resumable.

    Args:
      source: a samples JSONL path, a ``generate(prompts, n, **kw)`` callable or a chat backend.
      n: samples per problem when generating.
      out_dir: where ``samples.jsonl`` and ``results.jsonl`` live (both resumable).
      gen_kw: forwarded to the backend (e.g. ``max_tokens``, ``temperature``, ``top_p``).

    Raises:
      ValueError: see :func:`generate_samples` and :func:`evaluate`.
    """
    out = pathlib.Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if isinstance(source, (str, os.PathLike)):
        samples = read_samples(source)
    else:
        samples = generate_samples(source, problems, n,
                                   samples_path=out / "samples.jsonl" if out else None,
                                   progress=progress, **gen_kw)
    return evaluate(problems, samples, sandbox=sandbox, workers=workers, ks=ks,
                    results_path=out / "results.jsonl" if out else None, progress=progress)


def format_table(table: Mapping[str, Mapping]) -> str:
    """Markdown table of a :func:`summarize` result (values in %)."""
    cols = sorted({k for row in table.values() for k in row if k.startswith("pass")},
                  key=lambda c: (c.startswith("pass_o"), int(c.split("@")[-1])))
    lines = ["| group | problems | samples | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for g, row in table.items():
        vals = " | ".join(f"{100 * row[c]:.2f}" if c in row else "" for c in cols)
        lines.append(f"| {g} | {row['problems']} | {row['samples']} | {vals} |")
    return "\n".join(lines) + "\n"
