"""In-context inference: classification by label-word scoring, and free generation.

``ppl_classify`` is OpenICL's ``PPLInferencer`` (Wu et al. 2023a, arXiv:2303.02913; Peng et al. 2024
build their code on OpenICL, arXiv:2401.12087, Sec. 4): for each label y build
``demos + query(x) + answer(y)`` and score it by the mean token NLL over the whole sequence
(``span="all"``, demonstrations included, code-faithful) or over the answer tokens only
(``span="label"``); predict argmin_y. ``generate_classify`` greedily continues
``demos + query(x)`` and maps the first word of the continuation to a verbaliser
(case-insensitive), -1 when none matches. ``build_prompt_ids`` drops demonstrations from the end
until the prompt fits ``max_tokens`` (OpenICL's ``max_model_token_num``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lmx.icl.lm import ScoringLM, choice_mean_nll
from lmx.icl.templates import PromptTemplate

__all__ = ["build_prompt_ids", "ppl_classify", "generate", "generate_classify",
           "parse_label"]


def _demos(pool_examples, pool_labels, idx):
    return [(pool_examples[j], int(pool_labels[j])) for j in idx]


def build_prompt_ids(lm: ScoringLM, template: PromptTemplate, demos: Sequence[tuple], test,
                     label: int | None = None, *, max_tokens: int | None = None
                     ) -> tuple[list[int], list[int]]:
    """Segment-wise ids of ``instruction+demos | query | answer(label)`` and segment bounds.

    With ``max_tokens``, demonstrations are dropped from the end until the ids fit; raises
    ValueError when even the zero-shot prompt does not fit.
    """
    demos = list(demos)
    while True:
        block = template.instruction + "".join(template.demo(x, y) for x, y in demos)
        segs = [block, template.query(test)] + ([] if label is None else [template.answer(label)])
        ids, bounds = lm.ids(*segs)
        if max_tokens is None or len(ids) <= max_tokens:
            return ids, bounds
        if not demos:
            raise ValueError(f"the zero-shot prompt has {len(ids)} tokens > max_tokens="
                             f"{max_tokens}")
        demos.pop()


def _check_idx(demo_idx, tests, pool_examples):
    if len(demo_idx) != len(tests):
        raise ValueError(f"demo_idx must have one row per test ({len(tests)}), got "
                         f"{len(demo_idx)}")
    for row in demo_idx:
        for j in row:
            if not 0 <= int(j) < len(pool_examples):
                raise ValueError(f"demo index {j} outside the pool [0, {len(pool_examples)})")


def ppl_classify(lm: ScoringLM, template: PromptTemplate, pool_examples: Sequence,
                 pool_labels: Sequence[int], tests: Sequence, demo_idx, *, span: str = "all",
                 max_tokens: int | None = None, progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Label-word scoring. ``demo_idx``: per test, pool indices in prompt order ([Q, n] or
    ragged). Returns (pred int32 [Q], mean NLL float32 [Q, L]).

    Raises ValueError for a bad ``span`` or mismatched lengths.
    """
    if span not in ("all", "label"):
        raise ValueError(f"span must be 'all' or 'label', got {span!r}")
    _check_idx(demo_idx, tests, pool_examples)
    n_labels = len(template.labels)
    answers = [lm.encode(template.answer(y)) for y in range(n_labels)]
    # one prompt per test for every label (demos dropped for the longest answer), so the labels
    # are compared on the same context and can share one forward pass
    budget = None if max_tokens is None else max_tokens - max(len(a) for a in answers)
    prefixes = [build_prompt_ids(lm, template, _demos(pool_examples, pool_labels, demo_idx[i]),
                                 test, max_tokens=budget)[0] for i, test in enumerate(tests)]
    starts = [1 if span == "all" else len(p) for p in prefixes]
    nll = choice_mean_nll(lm, prefixes, starts, answers, progress=progress, desc="PPL inference")
    return np.argmin(nll, axis=1).astype(np.int32) if len(tests) else np.zeros(0, np.int32), nll


def generate(lm: ScoringLM, template: PromptTemplate, pool_examples: Sequence,
             pool_labels: Sequence[int], tests: Sequence, demo_idx, *,
             max_tokens: int | None = None) -> list[str]:
    """Greedy continuation of ``demos + query(x)`` per test (decoded text, special tokens
    dropped). Raises ValueError when ``lm`` has no ``generate_fn``/``decode``."""
    if lm.generate_fn is None or lm.decode is None:
        raise ValueError("lm must have generate_fn and decode for generation")
    _check_idx(demo_idx, tests, pool_examples)
    prompts = [build_prompt_ids(lm, template, _demos(pool_examples, pool_labels, demo_idx[i]),
                                test, max_tokens=max_tokens)[0] for i, test in enumerate(tests)]
    if not prompts:
        return []
    return [lm.decode(out) for out in lm.generate_fn(prompts)]


def parse_label(text: str, labels: Sequence[str]) -> int:
    """Index of the verbaliser that ``text`` (stripped, whitespace-collapsed) starts with (case-insensitive,
    longest verbaliser first); -1 when none matches."""
    joined = " ".join(text.lower().split())
    for i in sorted(range(len(labels)), key=lambda i: -len(labels[i])):
        if joined and joined.startswith(" ".join(labels[i].lower().split())):
            return i
    return -1


def generate_classify(lm: ScoringLM, template: PromptTemplate, pool_examples: Sequence,
                      pool_labels: Sequence[int], tests: Sequence, demo_idx, *,
                      max_tokens: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Classification by free generation: (pred int32 [Q] with -1 = unparseable, texts)."""
    texts = generate(lm, template, pool_examples, pool_labels, tests, demo_idx,
                     max_tokens=max_tokens)
    return np.asarray([parse_label(t, template.labels) for t in texts], np.int32), texts
