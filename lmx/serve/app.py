"""OpenAI-compatible HTTP server (FastAPI/Starlette on uvicorn) over a continuous-batching engine.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with SSE streaming),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Each request is parsed and validated on the event loop (JSON, model id, messages, every
decoding field, prompt length after the chat template); a bad one gets an OpenAI-style JSON
error ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status -- also for unknown
routes (404), wrong methods (405) and oversized bodies (413) -- and never reaches the model. A
field this server does not implement is a 400 naming it, never silently ignored. Valid requests
become one engine request per choice (``n``); the engine thread streams tokens back through
``loop.call_soon_threadsafe``. When the client goes away (a closed stream, or a dropped
connection while a non-streaming request waits) every choice is cancelled at once and its
KV-cache slot is free at the next decode step.
"""
# no ``from __future__ import annotations``: FastAPI must see the real ``Request`` class of the
# handlers defined inside create_app
import asyncio
import json
import socket
import threading
import time
import uuid
from typing import Any, Self

from lmx.backends.base import MAX_STOP_STRINGS
from lmx.serve.engine import Event, GenRequest

_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1
MAX_N = 64


class RequestError(Exception):
    """A client error: HTTP status + OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.kind = code, kind

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _bad(msg: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, msg, param=param, code=code)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# fields each endpoint implements; anything else is a 400 naming the field
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
           "stream_options", "presence_penalty", "frequency_penalty", "user", "logit_bias",
           "ignore_eos"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                         "response_format", "tools", "tool_choice", "parallel_tool_calls", "store",
                         "metadata"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
_MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}


def _check_fields(body: dict, allowed: set, where: str) -> None:
    for k in body:
        if k not in allowed:
            raise _bad(f"unsupported field {k!r} in {where}: this server implements "
                       f"{sorted(allowed)}", k, "unsupported_parameter")


def _only(body: dict, name: str, ok) -> None:
    """``body[name]`` must be absent/None or satisfy ``ok``; else a 400 naming it."""
    v = body.get(name)
    if v is not None and not ok(v):
        raise _bad(f"{name}={v!r} is not supported by this server", name, "unsupported_parameter")


def _text(content: Any, where: str, role: str) -> str:
    if content is None:
        if role == "assistant":
            return ""
        raise _bad(f"{where}['content'] must not be null for role {role!r}", "messages")
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}['content'] must be a string or a non-empty list of parts", "messages")
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in ("image_url", "input_audio", "file"):
            raise _bad(f"{where}['content'][{k}] is a {kind} part but this model is text-only",
                       "messages")
        else:
            raise _bad(f"{where}['content'][{k}] must be a text part {{'type': 'text', 'text': "
                       f"str}}, got {part!r}"[:300], "messages")
    return "\n".join(parts)


def normalize_messages(msgs: Any) -> list[dict]:
    """OpenAI chat messages -> [{"role", "content": str}] for the chat template.

    Roles: system, developer (rendered as system, as OpenAI does for non-reasoning models),
    user, assistant (``content`` may be null; ``tool_calls`` are rendered as their JSON), tool.
    """
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of messages", "messages")
    out = []
    for j, m in enumerate(msgs):
        where = f"messages[{j}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", "messages")
        for k in m:
            if k not in _MESSAGE_FIELDS:
                raise _bad(f"unsupported field {k!r} in {where}", "messages",
                           "unsupported_parameter")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad(f"{where}['role'] must be one of system, developer, user, assistant, tool; "
                       f"got {role!r}", "messages")
        if "content" not in m and not (role == "assistant" and m.get("tool_calls")):
            raise _bad(f"{where} has no 'content'", "messages")
        text = _text(m.get("content"), where, role)
        if role == "assistant" and m.get("tool_calls"):
            text = (text + "\n" if text else "") + json.dumps(m["tool_calls"])
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _sampling(body: dict) -> dict:
    """Shared decoding fields -> GenRequest keyword arguments (seed/stream set per choice)."""
    for pen in ("presence_penalty", "frequency_penalty"):
        _only(body, pen, lambda v: _is_num(v) and v == 0)
    _only(body, "logit_bias", lambda v: v == {})
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_num(temperature) or not 0.0 <= temperature <= 2.0:
        raise _bad(f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_num(top_p) or not 0.0 < top_p <= 1.0:
        raise _bad(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None or top_k == -1 else top_k
    if not _is_int(top_k) or top_k < 0:
        raise _bad(f"top_k must be an int >= 0 (or -1 = off), got {top_k!r}", "top_k")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                   f"non-empty strings, got {body.get('stop')!r}", "stop")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not _SEED_MIN <= seed <= _SEED_MAX):
        raise _bad(f"seed must be an integer in [-2**63, 2**64 - 1], got {seed!r}", "seed")
    n = body.get("n")
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _bad(f"n must be an integer in [1, {MAX_N}], got {n!r}", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be a boolean, got {stream!r}", "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise _bad("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(so, dict) or any(k != "include_usage" for k in so) or \
                not isinstance(so.get("include_usage", False), bool):
            raise _bad(f"stream_options supports only {{'include_usage': bool}}, got {so!r}",
                       "stream_options")
        include_usage = bool(so.get("include_usage", False))
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad(f"ignore_eos must be a boolean, got {ignore_eos!r}", "ignore_eos")
    return {"temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k),
            "stop": tuple(stop), "seed": seed, "n": n, "stream": bool(stream),
            "include_usage": include_usage, "ignore_eos": ignore_eos}


class ServeApp:
    """Request parsing and response building around a backend's engine (see module docstring)."""

    def __init__(self, backend: Any, model_name: str, default_max_tokens: int = 256,
                 max_body_bytes: int = 1 << 20):
        self.backend = backend
        self.engine = backend.engine
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    def _model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("'model' is required and must be a string", "model")
        if model != self.model_name:
            raise RequestError(404, f"The model '{model}' does not exist; this server serves "
                               f"'{self.model_name}' (see GET /v1/models)", param="model",
                               code="model_not_found")

    def _max_tokens(self, body: dict, names: tuple[str, ...], prompt_len: int, default: int) -> int:
        max_len = self.engine.max_len
        if prompt_len >= max_len:
            raise _bad(f"the prompt has {prompt_len} tokens; the context is {max_len} tokens",
                       "messages" if "max_completion_tokens" in names else "prompt",
                       "context_length_exceeded")
        name = next((k for k in names if body.get(k) is not None), None)
        if name is None:
            return min(default, max_len - prompt_len)
        v = body[name]
        if not _is_int(v) or v < 1:
            raise _bad(f"{name} must be an integer >= 1, got {v!r}", name)
        if prompt_len + v > max_len:
            raise _bad(f"the prompt has {prompt_len} tokens; with {name}={v} that exceeds the "
                       f"context of {max_len} tokens",
                       "messages" if "max_completion_tokens" in names else "prompt",
                       "context_length_exceeded")
        return v

    def parse_chat(self, body: Any) -> tuple[list[GenRequest], dict]:
        """Validate a chat-completions body -> (one GenRequest per choice, options)."""
        if not isinstance(body, dict):
            raise _bad(f"request body must be a JSON object, got {type(body).__name__}")
        self._model(body)
        _check_fields(body, CHAT_FIELDS, "chat completions")
        if body.get("messages") is None:
            raise _bad("'messages' is required", "messages")
        msgs = normalize_messages(body["messages"])
        _only(body, "response_format", lambda v: v == {"type": "text"})
        _only(body, "tools", lambda v: v == [])
        _only(body, "tool_choice", lambda v: v == "none")
        _only(body, "parallel_tool_calls", lambda v: isinstance(v, bool))
        _only(body, "store", lambda v: v is False)
        _only(body, "metadata", lambda v: isinstance(v, dict))
        opts = _sampling(body)
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _bad(f"logprobs must be a boolean, got {logprobs!r}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            if not logprobs:
                raise _bad("top_logprobs requires logprobs=true", "top_logprobs")
            if not _is_int(top) or not 0 <= top <= 20:
                raise _bad(f"top_logprobs must be an integer in [0, 20], got {top!r}",
                           "top_logprobs")
        try:
            prompt = self.backend.render(msgs)
        except Exception as e:  # noqa: BLE001 - a template error is the client's message list
            raise _bad(f"messages could not be rendered by the chat template: {e}",
                       "messages") from None
        max_tokens = self._max_tokens(body, ("max_completion_tokens", "max_tokens"), len(prompt),
                                      self.default_max_tokens)
        opts["logprobs"] = bool(logprobs)
        return self._requests(prompt, max_tokens, opts, (top or 0) if logprobs else None), opts

    def parse_completion(self, body: Any) -> tuple[list[GenRequest], dict]:
        """Validate a (legacy) completions body -> (one GenRequest per prompt x choice, options)."""
        if not isinstance(body, dict):
            raise _bad(f"request body must be a JSON object, got {type(body).__name__}")
        self._model(body)
        _check_fields(body, COMPLETION_FIELDS, "completions")
        _only(body, "echo", lambda v: v is False)
        _only(body, "suffix", lambda v: False)
        opts = _sampling(body)
        _only(body, "best_of", lambda v: v == opts["n"])
        prompts = body.get("prompt")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and all(_is_int(t) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a "
                       "list of token-id lists", "prompt")
        ids = []
        vocab = self.engine.vocab_size
        for i, p in enumerate(prompts):
            if isinstance(p, str) and p:
                ids.append(self.backend.encode(p))
            elif isinstance(p, list) and p and all(_is_int(t) and 0 <= t < vocab for t in p):
                ids.append(list(p))
            else:
                raise _bad(f"prompt[{i}] must be a non-empty string or a list of token ids in "
                           f"[0, {vocab})", "prompt")
        lp = body.get("logprobs")
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= 20):
            raise _bad(f"logprobs must be an integer in [0, 20], got {lp!r}", "logprobs")
        opts["logprobs"] = lp is not None
        reqs = []
        for p in ids:
            max_tokens = self._max_tokens(body, ("max_tokens",), len(p), 16)
            reqs += self._requests(p, max_tokens, opts, lp)
        return reqs, opts

    def _requests(self, prompt: list[int], max_tokens: int, opts: dict, top: int | None):
        seed = opts["seed"]
        return [GenRequest(prompt, max_tokens=max_tokens, temperature=opts["temperature"],
                           top_p=opts["top_p"], top_k=opts["top_k"], seed=seed, stream=i,
                           stop=opts["stop"], top_logprobs=top, ignore_eos=opts["ignore_eos"])
                for i in range(opts["n"])]

    # ------------------------------------------------------------------ responses
    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "lmx", "max_model_len": self.engine.max_len}

    def chat_logprobs(self, lps: list) -> dict:
        return {"content": [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
             "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())}
                              for a, v in t.top]} for t in lps]}

    @staticmethod
    def completion_logprobs(lps: list, offset: int) -> dict:
        offsets, pos = [], offset
        for t in lps:
            offsets.append(pos)
            pos += len(t.token)
        return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": [dict(t.top) for t in lps], "text_offset": offsets}

    def metrics_text(self) -> str:
        m = self.engine.metrics
        lines = []

        def metric(name, kind, help_, value, labels=""):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}",
                          f"{name}{labels} {value}"])

        metric("lmx_queue_length", "gauge", "Requests waiting for a KV-cache slot.", m.queue_length)
        metric("lmx_running_slots", "gauge", "KV-cache slots held by running requests.", m.running)
        metric("lmx_slots_total", "gauge", "KV-cache slots of the engine.", self.engine.n_slots)
        metric("lmx_generation_tokens_per_second", "gauge",
               "Generated tokens per second over the last 10 s.", round(m.tokens_per_second(), 3))
        metric("lmx_generation_tokens_total", "counter", "Generated tokens.", m.generation_tokens)
        metric("lmx_prompt_tokens_total", "counter", "Prefilled prompt tokens.", m.prompt_tokens)
        metric("lmx_prompt_tokens_cached_total", "counter",
               "Prompt tokens whose K/V were copied from a cached prefix instead of computed.",
               m.prompt_tokens_cached)
        metric("lmx_engine_compiles_total", "counter", "Compiled kernel variants.",
               self.engine.compile_count())
        lines += ["# HELP lmx_requests_finished_total Finished requests by finish reason.",
                  "# TYPE lmx_requests_finished_total counter"]
        for reason in ("stop", "length", "cancelled", "error"):
            lines.append(f'lmx_requests_finished_total{{finish_reason="{reason}"}} '
                         f'{m.finished.get(reason, 0)}')
        lines += ["# HELP lmx_time_to_first_token_seconds Time from submission to first token.",
                  "# TYPE lmx_time_to_first_token_seconds histogram"]
        acc = 0
        for b, c in zip(m.TTFT_BUCKETS + (float("inf"),), m.ttft_counts):
            acc += c
            le = "+Inf" if b == float("inf") else repr(b)
            lines.append(f'lmx_time_to_first_token_seconds_bucket{{le="{le}"}} {acc}')
        lines.append(f"lmx_time_to_first_token_seconds_sum {m.ttft_sum:.6f}")
        lines.append(f"lmx_time_to_first_token_seconds_count {acc}")
        return "\n".join(lines) + "\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def create_app(backend: Any, *, model_name: str, default_max_tokens: int = 256,
               max_body_bytes: int = 1 << 20):
    """The FastAPI application serving ``backend.engine`` under ``model_name``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    sv = ServeApp(backend, model_name, default_max_tokens, max_body_bytes)
    app = FastAPI(title="lmx.serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = sv

    def err(e: RequestError) -> JSONResponse:
        return JSONResponse(e.payload(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = (f"no route for {request.method} {request.url.path}" if exc.status_code == 404 else
               f"method {request.method} is not allowed for {request.url.path}"
               if exc.status_code == 405 else str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return err(RequestError(exc.status_code, msg, code=code, kind=kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return err(RequestError(500, f"internal error: {type(exc).__name__}: {exc}",
                                kind="server_error"))

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise _bad(f"bad Content-Length {length!r}") from None
            if n > max_body_bytes:
                raise RequestError(413, f"request body of {n} bytes exceeds the limit of "
                                   f"{max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise RequestError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(f"request body is not valid JSON: {e}", code="invalid_json") from None

    def submit_all(reqs: list[GenRequest]):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        streams = []
        try:
            for i, r in enumerate(reqs):
                streams.append(sv.engine.submit(
                    r, lambda ev, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, ev))))
        except (TypeError, ValueError) as e:
            for s in streams:
                s.cancel()
            raise _bad(str(e)) from None
        return streams, q

    async def disconnected(request: Request) -> None:
        # the body has been read: the next ASGI message is the client going away
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def gather(request: Request, reqs: list[GenRequest]):
        """Wait for every choice; cancel all as soon as the client disconnects."""
        streams, q = submit_all(reqs)
        texts = [[] for _ in reqs]
        lps = [[] for _ in reqs]
        finals: list[Event | None] = [None] * len(reqs)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while any(f is None for f in finals):
                nxt = asyncio.ensure_future(q.get())
                await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    raise RequestError(499, "client closed the request")
                i, ev = nxt.result()
                texts[i].append(ev.text)
                lps[i] += ev.logprobs
                if ev.finish_reason is not None:
                    finals[i] = ev
        finally:
            gone.cancel()
            for s in streams:
                if not s.done.is_set():
                    s.cancel()
        for f in finals:
            if f.finish_reason == "error":
                raise RequestError(500, f"generation failed: {f.error}", kind="server_error")
        return ["".join(t) for t in texts], lps, finals

    def usage(finals: list[Event], prompt_lens: list[int]) -> dict:
        p = sum(prompt_lens)
        c = sum(f.completion_tokens for f in finals)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def stream_response(reqs, opts, chat: bool):
        rid = (f"chatcmpl-{uuid.uuid4().hex[:24]}" if chat else f"cmpl-{uuid.uuid4().hex[:24]}")
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        streams, q = submit_all(reqs)
        include_usage = opts["include_usage"]

        def chunk(i, delta=None, text=None, lp=None, finish=None, lp_offset=0):
            c = {"index": i, "finish_reason": finish}
            if chat:
                c["delta"] = delta
                want = opts["logprobs"] and lp is not None
                c["logprobs"] = sv.chat_logprobs(lp) if want else None
            else:
                c["text"] = text
                c["logprobs"] = (sv.completion_logprobs(lp, lp_offset)
                                 if (opts["logprobs"] and lp is not None) else None)
            out = {"id": rid, "object": obj, "created": created, "model": model_name,
                   "choices": [c]}
            if include_usage:
                out["usage"] = None
            return _sse(out)

        async def gen():
            finals: list[Event | None] = [None] * len(reqs)
            offsets = [0] * len(reqs)
            try:
                if chat:
                    for i in range(len(reqs)):
                        yield chunk(i, delta={"role": "assistant", "content": ""})
                while any(f is None for f in finals):
                    i, ev = await q.get()
                    if ev.finish_reason == "error":
                        yield _sse(RequestError(500, f"generation failed: {ev.error}",
                                                kind="server_error").payload())
                        return
                    if ev.text or ev.logprobs:
                        yield chunk(i, delta={"content": ev.text}, text=ev.text, lp=ev.logprobs,
                                    lp_offset=offsets[i])
                        offsets[i] += len(ev.text)
                    if ev.finish_reason is not None:
                        finals[i] = ev
                        yield chunk(i, delta={}, text="", finish=ev.finish_reason)
                if include_usage:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": model_name,
                                "choices": [],
                                "usage": usage(finals, [len(r.prompt) for r in reqs[::opts["n"]]])})
                yield b"data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free every unfinished slot
                for s in streams:
                    if not s.done.is_set():
                        s.cancel()

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            reqs, opts = sv.parse_chat(await read_json(request))
            if opts["stream"]:
                return stream_response(reqs, opts, chat=True)
            texts, lps, finals = await gather(request, reqs)
        except RequestError as e:
            return err(e)
        choices = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                    "logprobs": sv.chat_logprobs(lp) if opts["logprobs"] else None,
                    "finish_reason": f.finish_reason}
                   for i, (t, lp, f) in enumerate(zip(texts, lps, finals))]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": usage(finals, [len(reqs[0].prompt)])}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            reqs, opts = sv.parse_completion(await read_json(request))
            if opts["stream"]:
                return stream_response(reqs, opts, chat=False)
            texts, lps, finals = await gather(request, reqs)
        except RequestError as e:
            return err(e)
        choices = [{"index": i, "text": t,
                    "logprobs": sv.completion_logprobs(lp, 0) if opts["logprobs"] else None,
                    "finish_reason": f.finish_reason}
                   for i, (t, lp, f) in enumerate(zip(texts, lps, finals))]
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": usage(finals, [len(r.prompt) for r in reqs[::opts["n"]]])}

    @app.get("/v1/models")
    async def models():
        return sv.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return err(RequestError(404, f"The model '{model_id}' does not exist",
                                    param="model", code="model_not_found"))
        return sv.model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "warm": bool(sv.engine.warm)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(sv.metrics_text(), media_type="text/plain; version=0.0.4")

    return app


class ChatServer:
    """Serve ``backend`` (a :class:`~lmx.backends.LocalBackend`) on ``host:port`` (0 = a free port).

    Use as a context manager (``with ChatServer(b) as srv: srv.base_url``) or call
    :meth:`start` / :meth:`stop`; :meth:`serve_forever` blocks (the CLI). ``warmup=True``
    compiles every engine shape before the port opens. ``max_batch`` sets the requests per
    ``generate_fn`` call of a backend without a slot engine (the slot engine's own ``n_slots``
    bounds its batch).
    """

    def __init__(self, backend: Any, *, model_name: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, max_batch: int | None = None, default_max_tokens: int = 256,
                 max_body_bytes: int = 1 << 20, warmup: bool = False, verbose: bool = False):
        import uvicorn

        if max_batch is not None:
            if not isinstance(max_batch, int) or max_batch < 1:
                raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
            if hasattr(backend.engine, "max_batch"):
                backend.engine.max_batch = max_batch
        self.backend = backend
        self.engine = backend.engine
        self.model_name = model_name or backend.model_name
        self.warmup = warmup
        self.app = create_app(backend, model_name=self.model_name,
                              default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        config = uvicorn.Config(self.app, log_level="info" if verbose else "warning",
                                lifespan="off", timeout_keep_alive=30, access_log=verbose)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        if self.warmup:
            self.engine.warmup()
        self.engine.start()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="lmx-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        if self.warmup:
            self.engine.warmup()
        self.engine.start()
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self.engine.stop()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()
        self.engine.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
