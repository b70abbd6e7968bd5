"""The chat-backend interface shared by every method folder, the server and the HTTP client.

A *conversation* is an OpenAI-style message list::

    [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}, ...]

``content`` is a string, or (for vision-capable backends) a list of OpenAI content parts
``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": {"url": ...}}``.

Every backend implements :class:`ChatBackend` (``chat`` -> one string per conversation). Backends
that can say more implement :class:`CompletionBackend` (``complete`` -> :class:`Completion` with
finish reason and token counts) and :class:`LabelProbBackend` (``label_probs`` -> a probability
over a closed set of label strings for the first assistant token, as WisdoM's MMICL classifier
reads them off the first generated token: Wang et al. 2024, arXiv:2401.06659).

Validation lives here so that the local backend, the HTTP client and the server reject the same
bad input with the same message.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

Message = dict
Conversation = list

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4


class BackendError(RuntimeError):
    """A backend could not produce an answer (HTTP error after retries, server-side 4xx, ...).

    ``status`` is the HTTP status when there was one (None for transport failures); ``body`` the
    decoded error payload when the server sent one; ``retry_after`` the server's Retry-After header.
    """

    def __init__(self, message: str, *, status: int | None = None, body: Any = None,
                 retry_after: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = body
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Completion:
    """One assistant reply.

    ``finish_reason`` is ``"stop"`` (a stop token or stop string ended it) or ``"length"``
    (``max_tokens`` reached). ``top_logprobs`` is filled only when requested: one entry per
    generated token, ``(token_text, logprob, [(alt_text, alt_logprob), ...])``.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    top_logprobs: tuple | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings with OpenAI's names and ranges.

    temperature 0 means greedy. ``stop`` holds up to 4 strings; the reply is cut before the first
    one. ``seed`` makes sampling reproducible on the local backend.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        validate_sampling(self.max_tokens, self.temperature, self.top_p, self.stop, self.seed)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def validate_sampling(max_tokens: Any, temperature: Any, top_p: Any, stop: Any, seed: Any) -> None:
    """Raise ValueError/TypeError naming the parameter when a decoding setting is out of range.

    Ranges (OpenAI chat completions): max_tokens int >= 1; temperature real in [0, 2];
    top_p real in (0, 1]; stop a tuple/list of at most 4 non-empty strings; seed int.
    """
    if not _is_int(max_tokens):
        raise TypeError(f"max_tokens must be an int, got {type(max_tokens).__name__}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not _is_real(temperature):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (0.0 <= float(temperature) <= 2.0) or math.isnan(float(temperature)):
        raise ValueError(f"temperature must be in [0, 2], got {temperature}")
    if not _is_real(top_p):
        raise TypeError(f"top_p must be a number, got {type(top_p).__name__}")
    if not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(stop, (tuple, list)):
        raise TypeError(f"stop must be a tuple/list of strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop holds at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop entries must be non-empty strings, got {s!r}")
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def validate_conversation(conv: Any, *, index: int = 0, allow_images: bool = True) -> None:
    """Check one OpenAI-style message list; raise ValueError/TypeError naming the bad field.

    Rules: a non-empty list of dicts; ``role`` in {system, user, assistant}; ``content`` a string
    or a non-empty list of text/image_url parts (image parts only when ``allow_images``).
    """
    where = f"conversations[{index}]"
    if not isinstance(conv, (list, tuple)):
        raise TypeError(f"{where} must be a list of messages, got {type(conv).__name__}")
    if not conv:
        raise ValueError(f"{where} is empty; it needs at least one message")
    for j, msg in enumerate(conv):
        w = f"{where}[{j}]"
        if not isinstance(msg, dict):
            raise TypeError(f"{w} must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{w}['role'] must be one of {ROLES}, got {role!r}")
        if "content" not in msg:
            raise ValueError(f"{w} has no 'content'")
        content = msg["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            raise TypeError(f"{w}['content'] must be a string or a non-empty list of parts")
        for k, part in enumerate(content):
            pw = f"{w}['content'][{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise TypeError(f"{pw}['text'] must be a string")
            elif kind == "image_url":
                if not allow_images:
                    raise ValueError(f"{pw} is an image_url part but this backend is text-only")
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else None
                if not isinstance(url, str) or not url:
                    raise ValueError(f"{pw}['image_url']['url'] must be a non-empty string")
            else:
                raise ValueError(f"{pw}['type'] must be 'text' or 'image_url', got {kind!r}")


def validate_conversations(conversations: Any, *, allow_images: bool = True) -> None:
    """Check a batch (list) of conversations; see :func:`validate_conversation`."""
    if not isinstance(conversations, (list, tuple)):
        raise TypeError(f"conversations must be a list of message lists, got "
                        f"{type(conversations).__name__}")
    for i, conv in enumerate(conversations):
        validate_conversation(conv, index=i, allow_images=allow_images)


def has_images(conv: Sequence[Message]) -> bool:
    """True when any message carries an ``image_url`` content part."""
    return any(isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
               for m in conv)


def text_of(content: str | list) -> str:
    """The text of a message's content (text parts joined by newlines; images dropped)."""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop string -> (text, was_cut)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def restricted_softmax(logprobs: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of label log-probs in float32; ``-inf`` entries get 0.

    Rows whose entries are all ``-inf`` (no label seen) come back uniform.
    """
    lp = np.asarray(logprobs, dtype=np.float32)
    m = np.max(lp, axis=-1, keepdims=True)
    finite = np.isfinite(m)
    z = np.exp(np.where(finite, lp - np.where(finite, m, 0.0), 0.0)).astype(np.float32)
    z = np.where(np.isfinite(lp) | ~finite, z, 0.0)
    return (z / np.sum(z, axis=-1, keepdims=True)).astype(np.float32)


@runtime_checkable
class ChatBackend(Protocol):
    """Anything that answers a batch of conversations with one assistant string each."""

    def chat(self, conversations: list[list[dict]], *, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
             seed: int = 0) -> list[str]: ...


@runtime_checkable
class CompletionBackend(ChatBackend, Protocol):
    """A chat backend that also reports finish reasons and token counts."""

    def complete(self, conversations: list[list[dict]], *, max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
                 seed: int = 0) -> list[Completion]: ...


@runtime_checkable
class LabelProbBackend(Protocol):
    """Probability of each label string as the first assistant token.

    ``label_probs(conversations, labels) -> float32 [B, C]``: softmax over the next-token
    log-probs restricted to the first token of each label (rows sum to 1).
    """

    def label_probs(self, conversations: list[list[dict]], labels: Sequence[str]) -> np.ndarray: ...
