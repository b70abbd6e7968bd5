"""OpenAI-compatible chat-completions client (vLLM, ``python -m lmx.serve``, hosted APIs).

Standard library only (``urllib.request``). One POST per conversation, run on a small thread
pool so a batch goes out concurrently. Transport errors, 408/409/429 and 5xx are retried with
exponential back-off (honouring ``Retry-After`` when it is a number of seconds); other 4xx are
raised at once as :class:`~lmx.backends.base.BackendError` carrying the server's message.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmx.backends.base import (
    BackendError,
    Completion,
    SamplingParams,
    restricted_softmax,
    validate_conversations,
)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class OpenAIBackend:
    """Chat backend over ``POST {base_url}/chat/completions``.

    Args:
      base_url: e.g. ``"http://127.0.0.1:8000/v1"`` (no trailing ``/chat/completions``).
      model: the ``model`` field sent with each request.
      api_key: sent as ``Authorization: Bearer``; None sends no header.
      timeout: seconds per HTTP attempt (connect + read).
      max_retries: extra attempts after the first for retryable failures.
      backoff: first back-off in seconds; doubles per retry, capped at 30 s.
      max_workers: concurrent requests per batch.
      supports_images: whether image_url parts may be sent (the server decides in the end).
      extra_body: merged into every request body (e.g. vendor-specific options).
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 0.5,
                 max_workers: int = 4, supports_images: bool = True,
                 extra_body: dict | None = None):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_workers = max_workers
        self.supports_images = supports_images
        self.extra_body = dict(extra_body or {})

    # ------------------------------------------------------------------ transport
    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One JSON request with retries; returns the decoded JSON reply or raises BackendError."""
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: BackendError | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, last))
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                payload = _read_error(e)
                msg = _error_message(payload) or e.reason
                last = BackendError(f"{method} {url} -> HTTP {e.code}: {msg}", status=e.code,
                                    body=payload,
                                    retry_after=e.headers.get("Retry-After") if e.headers else None)
                if e.code not in RETRY_STATUS:
                    raise last from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = BackendError(f"{method} {url} failed: {getattr(e, 'reason', e)!s}")
            except json.JSONDecodeError as e:
                raise BackendError(f"{method} {url} returned invalid JSON: {e}") from None
        raise BackendError(f"{last} (gave up after {self.max_retries + 1} attempts)",
                           status=last.status, body=last.body)

    def _delay(self, attempt: int, last: BackendError | None) -> float:
        ra = last.retry_after if last is not None else None
        if ra is not None:
            try:
                return min(30.0, max(0.0, float(ra)))
            except ValueError:
                pass
        return min(30.0, self.backoff * 2 ** (attempt - 1))

    def models(self) -> list[str]:
        """Ids listed by ``GET /models``."""
        return [m["id"] for m in self.request("GET", "/models")["data"]]

    # ------------------------------------------------------------------ chat
    def _body(self, conv, params: SamplingParams, **extra) -> dict:
        body = {"model": self.model, "messages": conv, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
                **self.extra_body, **extra}
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _map(self, fn, items):
        if len(items) <= 1 or self.max_workers == 1:
            return [fn(x) for x in items]
        with cf.ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as ex:
            return list(ex.map(fn, items))

    def complete(self, conversations: list[list[dict]], *, max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
                 seed: int = 0) -> list[Completion]:
        """One request per conversation; raises BackendError on HTTP failure, ValueError on bad input."""
        params = SamplingParams(max_tokens, temperature, top_p, tuple(stop), seed)
        validate_conversations(conversations, allow_images=self.supports_images)

        def one(conv):
            reply = self.request("POST", "/chat/completions", self._body(conv, params))
            try:
                choice = reply["choices"][0]
                usage = reply.get("usage") or {}
                return Completion(choice["message"]["content"] or "",
                                  choice.get("finish_reason") or "stop",
                                  int(usage.get("prompt_tokens", 0)),
                                  int(usage.get("completion_tokens", 0)))
            except (KeyError, IndexError, TypeError) as e:
                raise BackendError(f"malformed chat completion reply ({e!r}): {reply!r:.300}") from None

        return self._map(one, list(conversations))

    def chat(self, conversations: list[list[dict]], *, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
             seed: int = 0) -> list[str]:
        """Texts of :meth:`complete`."""
        return [c.text for c in self.complete(conversations, max_tokens=max_tokens,
                                              temperature=temperature, top_p=top_p, stop=stop,
                                              seed=seed)]

    def label_probs(self, conversations: list[list[dict]], labels: Sequence[str],
                    top_logprobs: int = 20) -> np.ndarray:
        """float32 [B, C] from the first generated token's ``top_logprobs`` (OpenAI logprobs API).

        Each label takes the log-prob of the listed token equal to it (surrounding whitespace
        ignored; the highest if several match). Labels outside the top-k get probability 0; a row
        with no label in the top-k comes back uniform. The restricted softmax is then the same
        as :meth:`LocalBackend.label_probs` whenever every label is within the top-k.
        """
        if not labels or any(not isinstance(x, str) or not x.strip() for x in labels):
            raise ValueError(f"labels must be non-empty strings, got {labels!r}")
        params = SamplingParams(1, 0.0, 1.0, (), 0)
        validate_conversations(conversations, allow_images=self.supports_images)
        want = [x.strip() for x in labels]

        def one(conv):
            reply = self.request("POST", "/chat/completions",
                                 self._body(conv, params, logprobs=True, top_logprobs=top_logprobs))
            try:
                first = reply["choices"][0]["logprobs"]["content"][0]
                cands = [(first["token"], first["logprob"])] + [
                    (t["token"], t["logprob"]) for t in first.get("top_logprobs", [])]
            except (KeyError, IndexError, TypeError) as e:
                raise BackendError(f"reply has no first-token logprobs ({e!r}); does the server "
                                   "support logprobs/top_logprobs?") from None
            row = np.full(len(want), -np.inf, np.float32)
            for tok, lp in cands:
                for c, lab in enumerate(want):
                    if tok.strip() == lab and lp is not None and math.isfinite(lp):
                        row[c] = max(row[c], lp)
            return row

        return restricted_softmax(np.stack(self._map(one, list(conversations))))


def _read_error(e: urllib.error.HTTPError) -> Any:
    try:
        raw = e.read().decode(errors="replace")
    except Exception:  # noqa: BLE001 - the body is optional diagnostic text
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw[:500]


def _error_message(payload: Any) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return payload["error"].get("message")
    if isinstance(payload, str):
        return payload
    return None
