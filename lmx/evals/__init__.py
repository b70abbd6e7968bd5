"""Code-generation evaluation: pass@k / pass@o, an isolating sandbox, OOP and HumanEval runners.

OOP benchmark: Wang et al. 2024, arXiv:2401.06628; HumanEval and pass@k: Chen et al. 2021,
arXiv:2107.03374.

* :mod:`lmx.evals.metrics`: unbiased pass@k (stable for large n), the OOP keyword matcher, tables.
* :mod:`lmx.evals.sandbox`: fresh isolated process per sample, rlimits, timeouts, resumable JSONL.
* :mod:`lmx.evals.data`: OOP and HumanEval loaders, completion sanitizer.
* :mod:`lmx.evals.runner`: backend -> samples -> execution -> pass@k / pass@o tables.
"""
from lmx.evals.data import (LEVELS, OOPProblem, default_oop_dir, extract_code, load_humaneval,
                            load_oop, parse_keywords)
from lmx.evals.metrics import keyword_match, pass_at_k, summarize
from lmx.evals.runner import (EvalReport, chat_generator, evaluate, format_table, generate_samples,
                              humaneval_job, humaneval_prompt, oop_job, oop_prompt, read_samples,
                              run)
from lmx.evals.sandbox import (ExecResult, Job, Sandbox, SandboxConfig, SandboxError,
                               read_jsonl_records, run_jobs, truncate_torn_tail)

__all__ = ["EvalReport", "ExecResult", "Job", "LEVELS", "OOPProblem", "Sandbox", "SandboxConfig",
           "SandboxError", "chat_generator", "default_oop_dir", "evaluate", "extract_code",
           "format_table", "generate_samples", "humaneval_job", "humaneval_prompt", "keyword_match",
           "load_humaneval", "load_oop", "oop_job", "oop_prompt", "parse_keywords", "pass_at_k",
           "read_jsonl_records", "read_samples", "run", "run_jobs", "summarize",
           "truncate_torn_tail"]
