"""OpenAI-compatible HTTP server for a local lmx model (``/v1/chat/completions``, ``/v1/models``).

Design: ``http.server.ThreadingHTTPServer`` parses and validates each request on its own thread
(JSON, model id, messages, decoding parameters, prompt length after the chat template); valid
requests go into one queue. A single worker thread owns the model: it takes the oldest request,
adds every queued request with the same decoding parameters (up to ``max_batch``), runs one
batched ``LocalBackend.complete`` call and hands each result back. The model is therefore never
used from two threads, concurrent clients share batches, and a bad request never reaches it.

Errors follow OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed JSON, bad parameters and over-long prompts (``code = "context_length_exceeded"``), 404
for unknown models and paths, 405/411/413 for wrong method / missing length / oversized body, 500
if generation itself fails. The server keeps serving after every one of them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from lmx.backends.base import validate_conversation, validate_sampling
from lmx.backends.local import LocalBackend, PromptTooLongError


class RequestError(Exception):
    """A client error: HTTP status + OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class _Job:
    conversation: list
    key: tuple  # (max_tokens, temperature, top_p, stop, seed, top_logprobs)
    future: Future


def _bad(msg: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, msg, param=param, code=code)


def parse_chat_request(body: Any, served: str, backend: LocalBackend, default_max_tokens: int,
                       seed_counter) -> tuple[list, tuple]:
    """Validate a chat-completions body -> (messages, decoding key); raise RequestError (4xx).

    Accepted: model, messages, max_tokens | max_completion_tokens, temperature (default 1.0 as in
    OpenAI), top_p, stop (string or list of <= 4), seed, n (= 1), stream (false), logprobs,
    top_logprobs (0..20, needs logprobs), presence/frequency_penalty (0 only), user (ignored).
    """
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model")
    if model != served:
        raise RequestError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{served}' (see GET /v1/models)", param="model",
                           code="model_not_found")
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("'messages' is required", "messages")
    try:
        validate_conversation(msgs, allow_images=backend.supports_images)
    except (TypeError, ValueError) as e:
        raise _bad(str(e).replace("conversations[0]", "messages"), "messages") from None
    if body.get("stream"):
        raise _bad("stream=true is not supported by this server", "stream")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise _bad(f"only n=1 is supported, got {n!r}", "n")
    for pen in ("presence_penalty", "frequency_penalty"):
        v = body.get(pen, 0)
        if v not in (0, 0.0, None) or isinstance(v, bool):
            raise _bad(f"{pen} is not supported (must be 0), got {v!r}", pen)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    seed = body.get("seed")
    seed = next(seed_counter) if seed is None else seed
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise _bad(f"logprobs must be a boolean, got {logprobs!r}", "logprobs")
    top_lp = body.get("top_logprobs")
    if top_lp is not None:
        if not logprobs:
            raise _bad("top_logprobs requires logprobs=true", "top_logprobs")
        if not isinstance(top_lp, int) or isinstance(top_lp, bool) or not 0 <= top_lp <= 20:
            raise _bad(f"top_logprobs must be an integer in [0, 20], got {top_lp!r}", "top_logprobs")
    if logprobs and backend.logprobs_fn is None:
        raise _bad("logprobs are not available for this model", "logprobs")
    try:
        prompt_len = len(backend.render_all([msgs], 0)[0])
    except PromptTooLongError as e:
        raise _bad(str(e).replace("conversations[0]", "messages"), "messages",
                   "context_length_exceeded") from None
    except (TypeError, ValueError) as e:
        raise _bad(str(e).replace("conversations[0]", "messages"), "messages") from None
    if max_tokens is None:
        max_tokens = min(default_max_tokens, backend.max_seq_len - prompt_len)
    if not isinstance(stop, (list, tuple)):
        raise _bad(f"stop must be a string or a list of strings, got {type(stop).__name__}", "stop")
    try:
        validate_sampling(max_tokens, temperature, top_p, stop, seed)
    except (TypeError, ValueError) as e:
        param = next((p for p in ("max_tokens", "temperature", "top_p", "stop", "seed")
                      if str(e).startswith(p)), None)
        raise _bad(str(e), param) from None
    if prompt_len + max_tokens > backend.max_seq_len:
        raise _bad(f"messages render to {prompt_len} prompt tokens; with max_tokens={max_tokens} "
                   f"that exceeds the model's context of {backend.max_seq_len} tokens",
                   "messages", "context_length_exceeded")
    # greedy decoding ignores the seed: one key lets concurrent greedy requests share a batch
    seed = 0 if float(temperature) == 0.0 else int(seed)
    key = (int(max_tokens), float(temperature), float(top_p), tuple(stop), seed,
           top_lp if logprobs else None)
    if logprobs and top_lp is None:
        key = key[:5] + (0,)
    return msgs, key


class ChatServer:
    """Serve ``backend`` under the model id ``model_name`` on ``host:port`` (0 = a free port).

    Use as a context manager (``with ChatServer(b) as srv: srv.base_url``) or call
    :meth:`start` / :meth:`stop`; :meth:`serve_forever` blocks (the CLI).
    """

    def __init__(self, backend: LocalBackend, *, model_name: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, max_batch: int = 8,
                 batch_wait_s: float = 0.01, default_max_tokens: int = 256,
                 max_body_bytes: int = 1 << 20, request_timeout_s: float = 600.0,
                 verbose: bool = False):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.backend = backend
        self.model_name = model_name or backend.model_name
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.verbose = verbose
        self.created = int(time.time())
        self._seeds = itertools.count(int(time.time()) & 0xFFFF)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches the worker ran (for tests/monitoring)
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}/v1"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        worker = threading.Thread(target=self._worker, name="lmx-serve-worker", daemon=True)
        http = threading.Thread(target=self.httpd.serve_forever, name="lmx-serve-http", daemon=True)
        self._threads = [worker, http]
        for t in self._threads:
            t.start()
        return self

    def serve_forever(self) -> None:
        worker = threading.Thread(target=self._worker, name="lmx-serve-worker", daemon=True)
        worker.start()
        self._threads = [worker]
        try:
            self.httpd.serve_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._queue.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ model worker
    def submit(self, conversation: list, key: tuple) -> Future:
        fut: Future = Future()
        self._queue.put(_Job(conversation, key, fut))
        return fut

    def _worker(self) -> None:
        held: list[_Job] = []  # jobs taken off the queue that did not fit the current batch
        stopping = False
        while True:
            if held:
                job = held.pop(0)
            elif stopping:
                return
            else:
                job = self._queue.get()
                if job is None:
                    return
            batch = [job]
            for other in list(held):
                if other.key == job.key and len(batch) < self.max_batch:
                    batch.append(other)
                    held.remove(other)
            deadline = time.monotonic() + self.batch_wait_s
            while not stopping and len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                else:
                    (batch if nxt.key == job.key else held).append(nxt)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        max_tokens, temperature, top_p, stop, seed, top_lp = batch[0].key
        self.batches.append(len(batch))
        try:
            outs = self.backend.complete([j.conversation for j in batch], max_tokens=max_tokens,
                                         temperature=temperature, top_p=top_p, stop=stop,
                                         seed=seed, top_logprobs=top_lp)
        except Exception as e:  # noqa: BLE001 - every waiting client must get an answer
            for j in batch:
                j.future.set_exception(e)
            return
        for j, out in zip(batch, outs):
            j.future.set_result(out)

    # ------------------------------------------------------------------ responses
    def chat_response(self, out, key) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "finish_reason": out.finish_reason, "logprobs": None}
        if key[5] is not None:
            choice["logprobs"] = {"content": [
                {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                 "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode())}
                                  for a, alp in alts]}
                for tok, lp, alts in (out.top_logprobs or ())]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice],
                "usage": {"prompt_tokens": out.prompt_tokens,
                          "completion_tokens": out.completion_tokens,
                          "total_tokens": out.prompt_tokens + out.completion_tokens}}

    def models_response(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": self.created, "owned_by": "lmx"}]}


def _make_handler(app: ChatServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "lmx-serve/0.1"

        def log_message(self, fmt, *args):  # quiet unless asked: tests start many servers
            if app.verbose:
                super().log_message(fmt, *args)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: RequestError) -> None:
            self._send(err.status, err.payload())

        def do_GET(self):
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v1/models":
                self._send(200, app.models_response())
            elif path == f"/v1/models/{app.model_name}":
                self._send(200, app.models_response()["data"][0])
            elif path in ("/health", "/v1/health"):
                self._send(200, {"status": "ok", "model": app.model_name})
            elif path == "/v1/chat/completions":
                self._error(RequestError(405, "use POST for /v1/chat/completions"))
            else:
                self._error(RequestError(404, f"no route for GET {path}", code="not_found",
                                         kind="not_found_error"))

        def do_POST(self):
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                if path != "/v1/chat/completions":
                    raise RequestError(404, f"no route for POST {path}", code="not_found",
                                       kind="not_found_error")
                body = self._read_json()
                msgs, key = parse_chat_request(body, app.model_name, app.backend,
                                               app.default_max_tokens, app._seeds)
                fut = app.submit(msgs, key)
                try:
                    out = fut.result(timeout=app.request_timeout_s)
                except TimeoutError:
                    raise RequestError(503, "generation timed out", kind="server_error") from None
                except (TypeError, ValueError) as e:
                    raise _bad(str(e)) from None
                except Exception as e:  # noqa: BLE001 - reported to the client as a 500
                    raise RequestError(500, f"generation failed: {type(e).__name__}: {e}",
                                       kind="server_error") from None
                self._send(200, app.chat_response(out, key))
            except RequestError as err:
                self._error(err)

        def _read_json(self) -> Any:
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length header is required")
            try:
                n = int(length)
            except ValueError:
                raise _bad(f"bad Content-Length {length!r}") from None
            if n < 0 or n > app.max_body_bytes:
                raise RequestError(413, f"request body of {n} bytes exceeds the limit of "
                                   f"{app.max_body_bytes} bytes")
            raw = self.rfile.read(n)
            try:
                return json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _bad(f"request body is not valid JSON: {e}", code="invalid_json") from None

    return Handler
