"""Continuous-batching generation engine over a fixed set of KV-cache slots.

One thread owns the model. Each loop iteration it

1. drops cancelled requests (their slot is free for the next join),
2. admits queued requests into free slots (at most ``prefill_tokens_per_step`` prompt tokens per
   iteration, at least one request, so joins never stall running streams for long): prompts are
   right-padded to a prompt bucket ``T`` and prefilled together, ``P`` prompts per call for ``P``
   in the prefill batch buckets (``P * T`` within the same token budget), and each one's first
   token is sampled; a prompt longer than ``prefill_chunk`` is prefilled one chunk per iteration
   (chunked prefill, as in Agrawal et al. 2024, Sarathi-Serve, arXiv:2403.02310, Sec. 4.1), so a
   long prompt delays running streams by one chunk's compute per decode step, not by its whole
   prefill,
3. runs one decode step over the first ``batch`` slots (``batch`` = the smallest bucket holding
   every running slot; new requests get the lowest free slot) attending to ``span`` cache
   columns (the smallest bucket holding every running row),
4. hands each new token to its request: incremental detokenisation, stop tokens, stop strings
   (text that could be the start of a stop string is held back), ``max_tokens``; a finished
   request leaves its slot at once.

Shapes depend only on (prefill batch, prompt bucket), (chunk, span bucket) and (batch bucket,
span bucket), and every
per-request setting (temperature, top-k, top-p, seed, token index, max_tokens, stop) is data, so
after :meth:`Engine.warmup` no request mix compiles anything; :meth:`Engine.compile_count` and
:func:`backend_compiles` let tests check that. Kernels: :mod:`lmx.models.slot_decode`.

:class:`FunctionEngine` gives the same request/stream interface over a token-level
``generate_fn`` (no slots, one call per request group): the server and ``LocalBackend`` use it
for scripted test models.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_COMPILES = [0]
_LISTENING = [False]
_LISTEN_LOCK = threading.Lock()


def _on_event(name: str, *args, **kw) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


def backend_compiles() -> int:
    """XLA compilations in this process since the first engine was built (any jitted function)."""
    return _COMPILES[0]


def _listen_for_compiles() -> None:
    import jax

    with _LISTEN_LOCK:
        if not _LISTENING[0]:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _LISTENING[0] = True


# ----------------------------------------------------------------------------- requests

@dataclasses.dataclass
class TokenLogprob:
    """One generated token: its text, log-prob and the most likely alternatives [(text, lp)]."""

    token: str
    logprob: float
    top: list


@dataclasses.dataclass
class Event:
    """What a request's stream delivers: new text (``finish_reason`` None) or the end.

    ``finish_reason``: "stop" (stop token or string), "length" (max_tokens), "cancelled",
    "error" (``error`` holds the message). The final event carries the token counts.
    """

    text: str = ""
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass
class GenRequest:
    """A token-level generation request.

    ``seed`` None draws a fresh random seed. ``stream`` (the choice index for ``n > 1``) is
    folded into the PRNG key. ``top_logprobs`` None = no log-probs, else 0..20 alternatives.
    ``ignore_eos``: do not stop at the model's stop tokens (fixed-length benchmarks).
    """

    prompt: Sequence[int]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: int = 0
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    ignore_eos: bool = False


def validate_request(req: GenRequest, *, vocab_size: int, max_len: int) -> None:
    """Raise ValueError/TypeError naming the field of ``req`` that is out of range."""
    from lmx.models.slot_decode import MAX_TOP_LOGPROBS, seed_to_key

    p = np.asarray(req.prompt)
    if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"prompt must be a non-empty list of token ids, got shape {p.shape} "
                         f"dtype {p.dtype}")
    if p.min() < 0 or p.max() >= vocab_size:
        raise ValueError(f"prompt holds token ids outside [0, {vocab_size})")
    if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, (int, np.integer)) \
            or req.max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {req.max_tokens!r}")
    if p.size + req.max_tokens > max_len:
        raise ValueError(f"prompt of {p.size} tokens + max_tokens {req.max_tokens} exceeds the "
                         f"engine's context of {max_len} tokens")
    if not (0.0 <= float(req.temperature) <= 2.0):
        raise ValueError(f"temperature must be in [0, 2], got {req.temperature}")
    if not (0.0 < float(req.top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {req.top_p}")
    if isinstance(req.top_k, bool) or not isinstance(req.top_k, (int, np.integer)) or req.top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {req.top_k!r}")
    if req.seed is not None:
        seed_to_key(req.seed)
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}")
    if not all(isinstance(s, str) and s for s in req.stop):
        raise ValueError(f"stop must hold non-empty strings, got {req.stop!r}")


class Stream:
    """Handle of a submitted request: iterate events, or ``result()``; ``cancel()`` frees its slot.

    ``on_event`` (set before submitting) is called from the engine thread for every event, e.g.
    to forward into an asyncio queue; otherwise events are kept in a thread-safe queue.
    """

    def __init__(self, req: GenRequest, on_event: Callable[[Event], None] | None = None):
        self.request = req
        self.on_event = on_event
        self.cancelled = False
        self.done = threading.Event()
        self.final: Event | None = None
        self._q: queue.Queue[Event] = queue.Queue()
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, ev: Event) -> None:
        if ev.finish_reason is not None:
            self.final = ev
        (self.on_event or self._q.put)(ev)
        if ev.finish_reason is not None:
            self.done.set()

    def __iter__(self):
        while True:
            ev = self._q.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> tuple[str, list, Event]:
        """Block until finished -> (text, token log-probs, final event)."""
        text, lps = [], []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ev = self._q.get(timeout=left)
            except queue.Empty:
                raise TimeoutError("generation did not finish in time") from None
            text.append(ev.text)
            lps += ev.logprobs
            if ev.finish_reason is not None:
                return "".join(text), lps, ev


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Detok:
    """Per-request token -> text bookkeeping (stop tokens, stop strings, held-back text).

    Detokenisation is incremental (the scheme of HF text-generation-inference and vLLM): only the
    tokens since ``prefix`` are decoded, and the text they add beyond the decoding of
    ``tokens[prefix:read]`` is appended once it no longer ends in an incomplete UTF-8 sequence,
    so a long reply costs O(tokens), not O(tokens^2), and word-initial spaces keep their context.
    """

    def __init__(self, stream: Stream, decode: Callable[[list[int]], str],
                 stop_ids: frozenset[int]):
        self.stream = stream
        self.req = stream.request
        self.decode = decode
        self.stop_ids = frozenset() if self.req.ignore_eos else stop_ids
        self.tokens: list[int] = []
        self.text = ""  # decoded text of the tokens up to ``read``
        self.prefix = self.read = 0
        self.n_generated = 0
        self.sent = 0  # characters of ``text`` already emitted
        self.pending_lp: list[TokenLogprob] = []

    def _advance(self, final: bool) -> None:
        before = self.decode(self.tokens[self.prefix:self.read]) if self.read > self.prefix else ""
        now = self.decode(self.tokens[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)

    def push(self, tok: int, lp: TokenLogprob | None) -> str | None:
        """Take one sampled token; emit text; return a finish reason when the request ends."""
        self.n_generated += 1
        if self.stream.t_first is None:
            self.stream.t_first = time.perf_counter()
        if tok in self.stop_ids:
            return self._finish("stop")
        self.tokens.append(tok)
        if lp is not None:
            self.pending_lp.append(lp)
        self._advance(final=False)
        text, stops = self.text, self.req.stop
        if stops:
            start = max(0, self.sent - max(len(s) for s in stops))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                return self._finish("stop", text[:min(hits)])
        if self.n_generated >= self.req.max_tokens:
            return self._finish("length")
        safe = len(text) - _stop_prefix_len(text, stops) if stops else len(text)
        if safe > self.sent:
            self.stream._emit(Event(text[self.sent:safe], self._take_lp()))
            self.sent = safe
        return None

    def _take_lp(self) -> list:
        out, self.pending_lp = self.pending_lp, []
        return out

    def _finish(self, reason: str, text: str | None = None) -> str:
        if text is None:
            self._advance(final=True)
            text = self.text
        tail = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        self.stream._emit(Event(tail, self._take_lp(), reason, len(self.req.prompt),
                                self.n_generated))
        return reason


# ----------------------------------------------------------------------------- metrics

class Metrics:
    """Counters the server exports as Prometheus text (one writer thread; readers see ints)."""

    TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.queue_length = 0
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: collections.Counter = collections.Counter()
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.decode_steps = 0
        self.prefills = 0
        self.prompt_tokens_cached = 0  # prompt tokens whose K/V were copied from a cached row
        self._recent: collections.deque = collections.deque()  # (time, tokens) of the last 10 s

    def add_tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generation_tokens += n
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10.0:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if t >= now - 10.0]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1.0)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        n = len(self.TTFT_BUCKETS)
        i = next((i for i, b in enumerate(self.TTFT_BUCKETS) if seconds <= b), n)
        self.ttft_counts[i] += 1


# ----------------------------------------------------------------------------- engine

def _geometric_buckets(lo: int, hi: int, factor: int = 4) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= factor
    return tuple(out) + (hi,)


class Engine:
    """Continuous batching of an ``lmx.models.Transformer`` over ``n_slots`` KV-cache rows.

    Args:
      model: the Transformer; tokenizer: decodes ids (``decode(ids, skip_special_tokens=True)``).
      n_slots: concurrent requests (the decode batch at most); max_len: prompt + reply tokens per
        request (cache columns per slot), at most the model's ``max_seq_len``.
      batch_buckets / span_buckets / prompt_buckets: the compiled shapes (defaults: powers of
        four from 1 / 128 / 32 up to ``n_slots`` / ``max_len`` / ``max_len``: at most 4x padding,
        few variants to compile).
      prefill_tokens_per_step: prompt tokens prefilled per loop iteration (at least one call).
      prefill_chunk: a prompt whose uncached part is longer than this (one of the prompt buckets;
        default the largest one within ``prefill_tokens_per_step``, else the smallest) is
        prefilled in chunks of this many tokens, one call per chunk, interleaved with decode
        steps; prompts may then be as long as ``max_len`` allows.
      prefill_batch_buckets: how many prompts one prefill call takes (default 1, 4, 16, ... up to
        ``n_slots``; must hold 1); a prompt bucket ``T`` is compiled with the batch sizes ``P``
        for which ``P * T <= prefill_tokens_per_step`` (always with 1). Joining requests are
        split greedily into the largest such batches, never padded with empty rows.
      stop_token_ids: ids that end a reply (EOS, end-of-turn).
      decode: ``ids -> text`` (default ``tokenizer.decode(ids, skip_special_tokens=True)``).
    """

    def __init__(self, model: Any, tokenizer: Any, *, n_slots: int = 16, max_len: int = 1024,
                 batch_buckets: Sequence[int] | None = None,
                 span_buckets: Sequence[int] | None = None,
                 prompt_buckets: Sequence[int] | None = None,
                 prefill_tokens_per_step: int = 256,
                 prefill_batch_buckets: Sequence[int] | None = None,
                 prefill_chunk: int | None = None,
                 prefix_reuse: bool = True,
                 stop_token_ids: Sequence[int] = (),
                 decode: Callable[[list[int]], str] | None = None):
        import jax
        from flax import nnx

        from lmx.models import slot_decode

        if not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be an int >= 1, got {n_slots!r}")
        cfg_len = int(model.cfg.max_seq_len)
        if not isinstance(max_len, int) or not 2 <= max_len <= cfg_len:
            raise ValueError(f"max_len must be an int in [2, model max_seq_len={cfg_len}], "
                             f"got {max_len!r}")
        self.n_slots, self.max_len = n_slots, max_len
        self.batch_buckets = self._buckets("batch_buckets", batch_buckets,
                                           _geometric_buckets(1, n_slots), n_slots)
        self.span_buckets = self._buckets("span_buckets", span_buckets,
                                          _geometric_buckets(min(128, max_len), max_len), max_len)
        self.prompt_buckets = self._buckets("prompt_buckets", prompt_buckets,
                                            _geometric_buckets(min(32, max_len), max_len), max_len,
                                            exact_top=False)
        if isinstance(prefill_tokens_per_step, bool) or \
                not isinstance(prefill_tokens_per_step, (int, np.integer)) or \
                prefill_tokens_per_step < 1:
            raise ValueError(f"prefill_tokens_per_step must be an int >= 1, got "
                             f"{prefill_tokens_per_step!r}")
        self.prefill_tokens_per_step = int(prefill_tokens_per_step)
        pb = self._buckets("prefill_batch_buckets", prefill_batch_buckets,
                           _geometric_buckets(1, n_slots), n_slots, exact_top=False)
        if pb[0] != 1:
            raise ValueError(f"prefill_batch_buckets must hold 1, got {prefill_batch_buckets!r}")
        #: prompt bucket T -> the prefill batch sizes compiled for it (ascending, starting at 1)
        self.prefill_shapes = {
            T: tuple(P for P in pb if P == 1 or P * T <= self.prefill_tokens_per_step)
            for T in self.prompt_buckets}
        fitting = [T for T in self.prompt_buckets if T <= self.prefill_tokens_per_step]
        chunk = (fitting[-1] if fitting else self.prompt_buckets[0]) if prefill_chunk is None \
            else prefill_chunk
        if isinstance(chunk, bool) or chunk not in self.prompt_buckets:
            raise ValueError(f"prefill_chunk must be one of the prompt buckets "
                             f"{self.prompt_buckets}, got {prefill_chunk!r}")
        #: chunk length of a long prompt's prefill (each chunk is a [1, prefill_chunk] call)
        self.prefill_chunk = int(chunk)
        self.vocab_size = int(model.cfg.vocab_size)
        self.stop_ids = frozenset(int(i) for i in stop_token_ids)
        self.tokenizer = tokenizer
        self._decode = decode or (lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True))
        self._tok_text: dict[int, str] = {}
        _listen_for_compiles()

        graphdef, state = nnx.split(model)
        self._state = state

        def prefill(state, ck, cv, tokens, starts, lengths, slots, sources, sampling, want, *,
                    span):
            return slot_decode.extend_slots(nnx.merge(graphdef, state), ck, cv, tokens, starts,
                                            lengths, slots, sources, sampling, want, span=span)

        def decode(state, ck, cv, tokens, positions, sampling, want, *, batch, span):
            return slot_decode.decode_slots(nnx.merge(graphdef, state), ck, cv, tokens, positions,
                                            sampling, want, batch=batch, span=span)

        # the caches are donated: XLA updates them in place instead of copying S_max columns
        self._prefill = jax.jit(prefill, donate_argnums=(1, 2), static_argnames=("span",))
        self._decode_step = jax.jit(decode, donate_argnums=(1, 2),
                                    static_argnames=("batch", "span"))
        self._new_cache = lambda: slot_decode.init_slot_cache(model, n_slots, max_len)
        self._ck, self._cv = self._new_cache()
        self._model_lock = threading.Lock()  # the loop's steps vs. warmup() from another thread

        self.metrics = Metrics()
        self._waiting: collections.deque[Stream] = collections.deque()
        self._cv_lock = threading.Condition()
        self._slots: list[tuple[Stream, _Detok] | None] = [None] * n_slots
        self._free = list(range(n_slots))
        heapq.heapify(self._free)
        #: slot -> [stream, prompt tokens in the row so far, row to copy them from] of requests
        #: whose prompt is being prefilled chunk by chunk (they hold the slot, not yet decoding)
        self._partial: dict[int, list] = {}
        self._tok = np.zeros(n_slots, np.int32)
        self._pos = np.zeros(n_slots, np.int32)
        # the tokens whose K/V each cache row holds: running rows and freed ones (a freed row
        # keeps its K/V until reused, idle rows of a decode step write past it), so joining
        # requests can copy a shared prefix instead of recomputing it
        if not isinstance(prefix_reuse, bool):
            raise TypeError(f"prefix_reuse must be a bool, got {prefix_reuse!r}")
        self.prefix_reuse = prefix_reuse
        #: at most this many leading prompt tokens are taken from a cached row (the smallest span
        #: bucket: the prefill kernel reads that many prefix columns, one shape per chunk shape)
        self.prefix_span = self.span_buckets[0]
        self._row_ids = np.zeros((n_slots, max_len), np.int32)
        self._row_len = np.zeros(n_slots, np.int32)
        self._thread: threading.Thread | None = None
        self._running = False
        self.warm = False

    @staticmethod
    def _buckets(name, given, default, top, exact_top: bool = True) -> tuple[int, ...]:
        b = tuple(sorted(set(int(x) for x in (given if given is not None else default))))
        if not b or b[0] < 1 or b[-1] > top or (exact_top and b[-1] != top):
            want = f"whose largest is {top}" if exact_top else f"at most {top}"
            raise ValueError(f"{name} must be positive ints {want}, got {given!r}")
        return b

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="lmx-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv_lock:
            self._running = False
            self._cv_lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def compile_count(self) -> int:
        """Compiled variants of the engine's two jitted kernels (grows only on a new shape)."""
        return int(self._prefill._cache_size() + self._decode_step._cache_size())

    def warmup(self) -> int:
        """Compile every prefill (batch, prompt bucket), long-prompt chunk (span bucket) and
        decode (batch bucket, span bucket) variant; returns the count.

        Runs on the caller's thread, between the loop's steps, and only while no request runs
        (it writes cache rows of idle slots); RuntimeError otherwise.
        """
        with self._model_lock:
            return self._warmup()

    def _warmup(self) -> int:
        if self.metrics.running:
            raise RuntimeError("warmup() needs an idle engine: requests are running")
        t0 = time.perf_counter()
        # log-probs and sampling are lax.cond branches of the same programs: one call per shape
        for T, sizes in self.prefill_shapes.items():
            for P in sizes:
                rows = np.arange(P, dtype=np.int32)
                self._run_prefill(np.zeros((P, T), np.int32), np.zeros(P, np.int32),
                                  np.ones(P, np.int32), rows, rows,
                                  self._sampling_rows([None] * P), False)
        row = np.zeros(1, np.int32)
        for S in self.span_buckets[1:]:  # later chunks of a long prompt read more prefix columns
            self._run_prefill(np.zeros((1, self.prefill_chunk), np.int32), row, row + 1, row, row,
                              self._sampling_rows([None]), False, span=S)
        for B in self.batch_buckets:
            for S in self.span_buckets:
                self._run_decode(B, S, self._sampling_rows([None] * B), False)
        self._forget_rows()  # the warm-up calls wrote junk K/V
        self.warm = True
        log.info("engine warm-up: %d variants compiled in %.1f s", self.compile_count(),
                 time.perf_counter() - t0)
        return self.compile_count()

    # ------------------------------------------------------------------ requests
    def submit(self, req: GenRequest, on_event: Callable[[Event], None] | None = None) -> Stream:
        """Queue ``req`` (validated first; ValueError/TypeError on a bad field) -> its Stream."""
        validate_request(req, vocab_size=self.vocab_size, max_len=self.max_len)
        if req.seed is None:
            req = dataclasses.replace(req, seed=int.from_bytes(os.urandom(8), "little"))
        s = Stream(req, on_event)
        with self._cv_lock:
            self._waiting.append(s)
            self.metrics.queue_length = len(self._waiting)
            self._cv_lock.notify()
        self.start()
        return s

    def generate(self, reqs: Sequence[GenRequest]) -> list[tuple[str, list, Event]]:
        """Submit all, wait for all -> [(text, token log-probs, final event)] in order."""
        streams = [self.submit(r) for r in reqs]
        return [s.result() for s in streams]

    # ------------------------------------------------------------------ kernels
    def _sampling_rows(self, reqs: Sequence[tuple[GenRequest, int] | None]):
        from lmx.models.slot_decode import seed_to_key

        n = len(reqs)
        temp = np.zeros(n, np.float32)
        top_k = np.zeros(n, np.int32)
        top_p = np.ones(n, np.float32)
        keys = np.zeros((n, 2), np.uint32)
        streams = np.zeros(n, np.int32)
        counters = np.zeros(n, np.int32)
        for i, rc in enumerate(reqs):
            if rc is None:
                continue
            r, counter = rc
            temp[i], top_k[i], top_p[i] = r.temperature, r.top_k, r.top_p
            keys[i] = seed_to_key(r.seed)
            streams[i], counters[i] = r.stream, counter
        return temp, top_k, top_p, keys, streams, counters

    def _run_prefill(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                     slots: np.ndarray, sources: np.ndarray, sampling, want: bool,
                     span: int | None = None):
        out = self._prefill(self._state, self._ck, self._cv, tokens, starts, lengths, slots,
                            sources, sampling, np.bool_(want), span=span or self.prefix_span)
        self._ck, self._cv = out[0], out[1]
        return [np.asarray(x) for x in out[2:]]

    def _run_decode(self, B: int, S: int, sampling, want: bool):
        out = self._decode_step(self._state, self._ck, self._cv, self._tok[:B], self._pos[:B],
                                sampling, np.bool_(want), batch=B, span=S)
        self._ck, self._cv = out[0], out[1]
        return [np.asarray(x) for x in out[2:]]

    def _token_text(self, t: int) -> str:
        s = self._tok_text.get(t)
        if s is None:
            s = self._tok_text[t] = self._decode([t])
        return s

    def _lp_entry(self, req: GenRequest, tok: int, lp, ids, lps) -> TokenLogprob | None:
        if req.top_logprobs is None:
            return None
        k = req.top_logprobs
        return TokenLogprob(self._token_text(tok), float(lp),
                            [(self._token_text(int(i)), float(v))
                             for i, v in zip(ids[:k], lps[:k])])

    # ------------------------------------------------------------------ scheduling loop
    def _loop(self) -> None:
        while True:
            with self._cv_lock:
                while self._running and not self._waiting and self.metrics.running == 0:
                    self._cv_lock.wait()
                if not self._running:
                    break
            try:
                with self._model_lock:
                    self._step()
            except Exception as e:  # noqa: BLE001 - every waiting client must get an answer
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
                # a failed call may have consumed the donated cache buffers: start from fresh ones
                self._ck, self._cv = self._new_cache()
                self._forget_rows()
        self._fail_all("engine stopped")

    def _fail_all(self, msg: str) -> None:
        with self._cv_lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for i, entry in enumerate(self._slots):
            if entry is not None:
                self._release(i)
                entry[0]._emit(Event(finish_reason="error", error=msg))
        partial, self._partial = self._partial, {}
        for slot, (s, *_) in partial.items():
            self._release(slot)
            s._emit(Event(finish_reason="error", error=msg))
        for s in waiting:
            s._emit(Event(finish_reason="error", error=msg))
        self.metrics.queue_length = 0
        # slots taken by requests that never reached their prefill are free again too
        self._free = [i for i, e in enumerate(self._slots) if e is None]
        heapq.heapify(self._free)

    def _forget_rows(self) -> None:
        self._row_len[:] = 0
        self._pos[:] = 0

    def _release(self, slot: int) -> None:
        self._slots[slot] = None
        self._tok[slot] = 0
        # the idle row's decode writes go to the first column past its valid K/V
        n = min(int(self._row_len[slot]), self.max_len - 1)
        self._row_len[slot] = self._pos[slot] = n
        heapq.heappush(self._free, slot)
        self.metrics.running -= 1

    def _finish(self, slot: int, reason: str) -> None:
        self._release(slot)
        self.metrics.finished[reason] += 1

    def _step(self) -> None:
        m = self.metrics
        for i, entry in enumerate(self._slots):
            if entry is not None and entry[0].cancelled:
                det = entry[1]
                self._finish(i, "cancelled")
                entry[0]._emit(Event(finish_reason="cancelled", prompt_tokens=len(det.req.prompt),
                                     completion_tokens=det.n_generated))
        for slot, (s, *_) in list(self._partial.items()):
            if s.cancelled:
                del self._partial[slot]
                self._finish(slot, "cancelled")  # its row keeps the chunks done, for reuse
                s._emit(Event(finish_reason="cancelled", prompt_tokens=len(s.request.prompt)))
        budget = self.prefill_tokens_per_step
        n_calls = 0  # prefill calls so far: long prompts' next chunks first, oldest first
        for slot in list(self._partial):
            if n_calls and budget < self.prefill_chunk:
                break
            budget -= self.prefill_chunk
            n_calls += 1
            self._prefill_next_chunk(slot)
        joins: list[tuple[Stream, int]] = []  # (stream, its slot), in arrival order
        while self._free:
            with self._cv_lock:
                if not self._waiting:
                    break
                n = min(len(self._waiting[0].request.prompt), self.prefill_chunk)
                # at least one prefill call per iteration, more while the token budget lasts
                if n_calls and budget < n:
                    break
                s = self._waiting.popleft()
                m.queue_length = len(self._waiting)
            if s.cancelled:
                m.finished["cancelled"] += 1
                s._emit(Event(finish_reason="cancelled", prompt_tokens=n))
                continue
            budget -= n
            n_calls += 1
            joins.append((s, heapq.heappop(self._free)))
        # chunk bucket -> [(stream, slot, prefix length, source row)], in arrival order
        joining: dict[int, list[tuple[Stream, int, int, int]]] = {}
        targets = {slot for _, slot in joins}
        for s, slot in joins:
            start, src = self._cached_prefix(s.request.prompt, slot, targets)
            n = len(s.request.prompt) - start
            if n > self.prefill_chunk:
                self._partial[slot] = [s, start, src]
                m.running += 1
                m.prompt_tokens_cached += start
                self._prefill_next_chunk(slot)
                continue
            joining.setdefault(next(b for b in self.prompt_buckets if b >= n), []).append(
                (s, slot, start, src))
        for T, group in joining.items():
            sizes = self.prefill_shapes[T]
            while group:
                P = max(p for p in sizes if p <= len(group))
                self._admit(T, group[:P])
                group = group[P:]
        if any(e is not None for e in self._slots):
            self._decode_running()

    def _cached_prefix(self, prompt: Sequence[int], slot: int, targets: set[int]) -> tuple[int, int]:
        """(length, source row) of the longest cached prefix of ``prompt`` to reuse in ``slot``.

        Sources: any row whose K/V stay unchanged during this iteration's prefill calls (rows
        joining now are overwritten, in an order the grouping decides), and ``slot`` itself. At
        least one prompt token is left to compute (its logits give the first reply token), and
        at most :attr:`prefix_span` are reused.
        """
        m = min(len(prompt) - 1, self.prefix_span)
        if not self.prefix_reuse or m < 1:
            return 0, slot
        rows = np.array([r for r in range(self.n_slots) if r == slot or r not in targets])
        head = np.asarray(prompt[:m], np.int32)
        same = (self._row_ids[rows, :m] == head) & (np.arange(m) < self._row_len[rows, None])
        lcp = np.cumprod(same, axis=1).sum(axis=1)
        best = int(lcp.max())
        if best == 0:
            return 0, slot
        own = np.flatnonzero(rows == slot)[0]  # on a tie, the row itself: nothing to copy
        return best, int(slot if lcp[own] == best else rows[int(np.argmax(lcp))])

    def _prefill_next_chunk(self, slot: int) -> None:
        """Prefill the next ``prefill_chunk`` prompt tokens of the long prompt in ``slot``; after
        the last chunk the request starts decoding with the token sampled from its logits."""
        entry = self._partial[slot]
        s, start, src = entry
        prompt = s.request.prompt
        n = min(self.prefill_chunk, len(prompt) - start)
        tokens = np.zeros((1, self.prefill_chunk), np.int32)
        tokens[0, :n] = prompt[start:start + n]
        want = s.request.top_logprobs is not None
        tok, lp, ids, lps = self._run_prefill(
            tokens, np.array([start], np.int32), np.array([n], np.int32),
            np.array([slot], np.int32), np.array([src], np.int32),
            self._sampling_rows([(s.request, 0)]), want,
            span=next(b for b in self.span_buckets if b >= start))
        self.metrics.prefills += 1
        done = start + n
        if done == len(prompt):
            del self._partial[slot]
            self._start_decoding(s, slot, int(tok[0]), lp[0], ids[0], lps[0])
            return
        # the row's valid K/V so far (a decode step's idle write lands on column ``done``, which
        # the next chunk overwrites)
        self._row_ids[slot, :done] = prompt[:done]
        self._row_len[slot] = self._pos[slot] = done
        entry[1], entry[2] = done, slot

    def _admit(self, T: int, group: list[tuple[Stream, int, int, int]]) -> None:
        """Prefill ``group`` ((stream, slot, cached prefix length, its source row); prompt
        suffixes of bucket ``T``) in one call."""
        P = len(group)
        slots = np.array([g[1] for g in group], np.int32)
        starts = np.array([g[2] for g in group], np.int32)
        sources = np.array([g[3] for g in group], np.int32)
        tokens = np.zeros((P, T), np.int32)
        lengths = np.zeros(P, np.int32)
        for i, (s, _, start, _) in enumerate(group):
            lengths[i] = len(s.request.prompt) - start
            tokens[i, :lengths[i]] = s.request.prompt[start:]
        want = any(s.request.top_logprobs is not None for s, *_ in group)
        tok, lp, ids, lps = self._run_prefill(
            tokens, starts, lengths, slots, sources,
            self._sampling_rows([(s.request, 0) for s, *_ in group]), want)
        self.metrics.prefills += 1
        for i, (s, slot, start, _) in enumerate(group):
            self.metrics.prompt_tokens_cached += start
            self.metrics.running += 1
            self._start_decoding(s, slot, int(tok[i]), lp[i], ids[i], lps[i])

    def _start_decoding(self, s: Stream, slot: int, t: int, lp, ids, lps) -> None:
        """``s``'s prompt is in ``slot``'s row (the slot counted as running); ``t`` is its first
        reply token."""
        n = len(s.request.prompt)
        self.metrics.prompt_tokens += n
        self._slots[slot] = (s, _Detok(s, self._decode, self.stop_ids))
        self._row_ids[slot, :n] = s.request.prompt
        self._row_len[slot] = n
        self._tok[slot], self._pos[slot] = t, n
        self._push(slot, t, self._lp_entry(s.request, t, lp, ids, lps))
        if s.t_first is not None:
            self.metrics.observe_ttft(s.t_first - s.t_submit)

    def _push(self, slot: int, tok: int, lp: TokenLogprob | None) -> None:
        det = self._slots[slot][1]
        self.metrics.add_tokens(1)
        reason = det.push(tok, lp)
        if reason is not None:
            self._finish(slot, reason)

    def _decode_running(self) -> None:
        active = [i for i, e in enumerate(self._slots) if e is not None]
        B = next(b for b in self.batch_buckets if b > active[-1])
        S = next(b for b in self.span_buckets if b > int(self._pos[active].max()))
        rows: list[tuple[GenRequest, int] | None] = [None] * B
        want = False
        for i in active:
            det = self._slots[i][1]
            rows[i] = (det.req, det.n_generated)
            want |= det.req.top_logprobs is not None
        toks, lp, ids, lps = self._run_decode(B, S, self._sampling_rows(rows), want)
        self.metrics.decode_steps += 1
        self._row_ids[active, self._pos[active]] = self._tok[active]  # the K/V just written
        self._row_len[active] += 1
        for i in active:
            det = self._slots[i][1]
            t = int(toks[i])
            self._pos[i] += 1
            self._tok[i] = t
            self._push(i, t, self._lp_entry(det.req, t, lp[i], ids[i], lps[i]))


class FunctionEngine:
    """The :class:`Engine` interface over a token-level ``generate_fn`` (see ``LocalBackend``).

    A worker thread takes queued requests, groups up to ``max_batch`` with equal decoding
    settings into one ``generate_fn`` call, and replays each reply's tokens through the same
    stop-token / stop-string / max_tokens logic as the slot engine (one event per reply).
    ``logprobs_fn`` (optional) supplies token log-probs by a teacher-forced pass.
    """

    def __init__(self, generate_fn: Callable[..., list], tokenizer: Any, *, max_len: int,
                 vocab_size: int, stop_token_ids: Sequence[int] = (), max_batch: int = 16,
                 logprobs_fn: Callable | None = None,
                 decode: Callable[[list[int]], str] | None = None):
        self.generate_fn, self.logprobs_fn = generate_fn, logprobs_fn
        self.max_len, self.vocab_size, self.max_batch = max_len, vocab_size, max_batch
        self.stop_ids = frozenset(int(i) for i in stop_token_ids)
        self._decode = decode or (lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True))
        self.metrics = Metrics()
        self.batches: list[int] = []
        self._q: queue.Queue[Stream | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.warm = True

    @property
    def n_slots(self) -> int:
        """Requests per ``generate_fn`` call (reported as the slot count in /metrics)."""
        return self.max_batch

    def compile_count(self) -> int:
        return 0

    def warmup(self) -> int:
        return 0

    def start(self) -> FunctionEngine:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lmx-fn-engine",
                                                daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: GenRequest, on_event: Callable[[Event], None] | None = None) -> Stream:
        validate_request(req, vocab_size=self.vocab_size, max_len=self.max_len)
        if req.seed is None:
            req = dataclasses.replace(req, seed=int.from_bytes(os.urandom(4), "little"))
        s = Stream(req, on_event)
        self.metrics.queue_length += 1
        self.start()
        self._q.put(s)
        return s

    def generate(self, reqs: Sequence[GenRequest]) -> list[tuple[str, list, Event]]:
        streams = [self.submit(r) for r in reqs]
        return [s.result() for s in streams]

    @staticmethod
    def _key(r: GenRequest):
        return (r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed if r.temperature else 0)

    def _loop(self) -> None:
        held: list[Stream] = []
        while True:
            first = held.pop(0) if held else self._q.get()
            if first is None:
                return
            group = [first]
            for other in list(held):
                same = self._key(other.request) == self._key(first.request)
                if len(group) < self.max_batch and same:
                    group.append(other)
                    held.remove(other)
            while len(group) < self.max_batch:
                try:
                    nxt = self._q.get(timeout=0.01)
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                (group if self._key(nxt.request) == self._key(first.request) else held).append(nxt)
            self._run(group)

    def _run(self, group: list[Stream]) -> None:
        self.metrics.queue_length -= len(group)
        live = [s for s in group if not s.cancelled]
        for s in group:
            if s.cancelled:
                s._emit(Event(finish_reason="cancelled", prompt_tokens=len(s.request.prompt)))
        if not live:
            return
        r0 = live[0].request
        self.batches.append(len(live))
        self.metrics.running = len(live)
        try:
            outs = self.generate_fn([list(s.request.prompt) for s in live],
                                    max_new_tokens=r0.max_tokens, temperature=float(r0.temperature),
                                    top_p=float(r0.top_p), stop_tokens=tuple(self.stop_ids),
                                    seed=int(r0.seed) % (1 << 31))
        except Exception as e:  # noqa: BLE001 - reported to each client
            for s in live:
                s._emit(Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
            self.metrics.running = 0
            return
        for s, toks in zip(live, outs):
            toks = [int(t) for t in toks][:s.request.max_tokens]
            lps = self._logprobs(s.request, toks)
            det = _Detok(s, self._decode, self.stop_ids)
            for k, t in enumerate(toks):
                self.metrics.add_tokens(1)
                if det.push(t, lps[k] if lps else None) is not None:
                    break
            else:
                det._finish("stop")  # generate_fn ended early: it met a stop token
            if s.t_first is not None:
                self.metrics.observe_ttft(s.t_first - s.t_submit)
        self.metrics.running = 0

    def _logprobs(self, req: GenRequest, toks: list[int]) -> list[TokenLogprob] | None:
        if req.top_logprobs is None or not toks or self.logprobs_fn is None:
            return None
        n = len(req.prompt)
        positions = [list(range(n - 1, n - 1 + len(toks)))]
        rows = self.logprobs_fn([list(req.prompt) + toks], positions)[0]
        out = []
        for row, t in zip(np.asarray(rows, np.float32), toks):
            alts = np.argsort(-row)[:req.top_logprobs]
            out.append(TokenLogprob(self._decode([t]), float(row[t]),
                                    [(self._decode([int(a)]), float(row[a])) for a in alts]))
        return out


__all__ = ["Engine", "Event", "FunctionEngine", "GenRequest", "Metrics", "Stream", "TokenLogprob",
           "backend_compiles", "validate_request"]
