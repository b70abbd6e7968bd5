"""Prompt templates for in-context classification (OpenICL ``PromptTemplate``; Peng et al.
2024, arXiv:2401.12087, App. B, Table 7).

A template is one format string with an ``{input}`` slot (the test/demo text), a ``{label}`` slot
(the verbaliser) and optionally other named column slots (e.g. ``{premise}``):

    PromptTemplate("Review: {input}\\nSentiment: {label}", labels=("negative", "positive"))

renders a demonstration as ``Review: <x>\\nSentiment: positive`` followed by ``ice_separator``
("\\n", OpenICL's ICE end token), and a query as ``Review: <x>\\nSentiment:``. Whitespace right
before ``{label}`` belongs to the answer (`` positive``), so BPE tokenisers see the usual
space-prefixed label token. The "key word" of the official ConE code (``icl_cone_retriever.py``
ends the scored span after its last occurrence) is the first whitespace-separated token between
``{input}`` and ``{label}`` ("Sentiment:", "Type:", "?").
"""
from __future__ import annotations

import dataclasses
import string
from typing import Mapping, Sequence

__all__ = ["PromptTemplate", "SST2_TEMPLATE"]


def _fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"template is not a valid format string: {e}") from None


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Format string + verbalisers.

    Attributes:
      template: format string with exactly one ``{label}``, at least one ``{input}`` and any other
        named slots (filled from a mapping example). Positional ``{}`` slots are not allowed.
      labels: verbaliser per class id (``labels[0]`` is the label the official ConE code scores).
      ice_separator: appended after every demonstration.
      instruction: optional text placed before the demonstrations.

    Raises:
      ValueError: no ``{input}`` slot, not exactly one ``{label}`` slot, ``{label}`` before the
        last ``{input}``, positional slots, empty or duplicate ``labels``.
    """

    template: str
    labels: tuple[str, ...]
    ice_separator: str = "\n"
    instruction: str = ""

    def __post_init__(self):
        if not isinstance(self.template, str):
            raise TypeError(f"template must be str, got {type(self.template).__name__}")
        fields = _fields(self.template)
        if "input" not in fields:
            raise ValueError(f"template must contain an '{{input}}' slot for the test input, got "
                             f"{self.template!r}")
        if fields.count("label") != 1:
            raise ValueError(f"template must contain exactly one '{{label}}' slot, got "
                             f"{fields.count('label')} in {self.template!r}")
        if any(f == "" or f.isdigit() for f in fields):
            raise ValueError(f"template slots must be named, got {self.template!r}")
        if self.template.rindex("{input}") > self.template.index("{label}"):
            raise ValueError(f"template's '{{label}}' slot must come after '{{input}}', got "
                             f"{self.template!r}")
        labels = tuple(self.labels) if not isinstance(self.labels, str) else None
        if not labels or not all(isinstance(x, str) and x.strip() for x in labels):
            raise ValueError(f"labels must be a non-empty sequence of non-blank strings, got "
                             f"{self.labels!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct, got {labels!r}")
        object.__setattr__(self, "labels", labels)

    @property
    def slots(self) -> tuple[str, ...]:
        """Named input slots other than ``label`` in first-seen order."""
        out = []
        for f in _fields(self.template):
            if f != "label" and f not in out:
                out.append(f)
        return tuple(out)

    def _values(self, example) -> dict:
        if isinstance(example, str):
            if self.slots != ("input",):
                raise ValueError(f"template has slots {self.slots}; pass a mapping, got a str")
            return {"input": example}
        if isinstance(example, Mapping):
            missing = [s for s in self.slots if s not in example]
            if missing:
                raise ValueError(f"example lacks template slots {missing}; has {sorted(example)}")
            return {s: example[s] for s in self.slots}
        raise TypeError(f"example must be str or Mapping[str, str], got {type(example).__name__}")

    def retrieval_text(self, example) -> str:
        """The input columns joined by a space (OpenICL ``generate_input_field_corpus``)."""
        return " ".join(str(v) for v in self._values(example).values())

    def _split(self) -> tuple[str, str, str]:
        """(query format, whitespace before label, suffix after label)."""
        head, tail = self.template.split("{label}", 1)
        stripped = head.rstrip()
        return stripped, head[len(stripped):], tail

    def query(self, example) -> str:
        """The test prompt up to (not including) the answer: ``Review: <x>\\nSentiment:``."""
        return self._split()[0].format(**self._values(example))

    def answer(self, label: int) -> str:
        """The answer continuation for class ``label``: whitespace + verbaliser + suffix."""
        if not 0 <= int(label) < len(self.labels):
            raise ValueError(f"label must be in [0, {len(self.labels)}), got {label!r}")
        _, ws, tail = self._split()
        return ws + self.labels[int(label)] + tail.format(**{s: "" for s in self.slots})

    def demo(self, example, label: int) -> str:
        """A rendered demonstration followed by ``ice_separator``."""
        return self.query(example) + self.answer(label) + self.ice_separator

    def prompt(self, demos: Sequence[tuple], example, label: int | None = None) -> str:
        """instruction + demos (in the given order) + query [+ answer(label)]."""
        body = self.instruction + "".join(self.demo(x, y) for x, y in demos) + self.query(example)
        return body if label is None else body + self.answer(label)

    def key_word(self) -> str | None:
        """First whitespace token between the last ``{input}`` and ``{label}`` (ConE code's
        "key word"); None when only whitespace separates them."""
        between = self.template[self.template.rindex("{input}") + len("{input}"):
                                self.template.index("{label}")]
        parts = between.split()
        return parts[0] if parts else None


SST2_TEMPLATE = PromptTemplate("Review: {input}\nSentiment: {label}",
                               labels=("negative", "positive"))
