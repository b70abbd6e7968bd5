"""Chat backend over a local token-level model: chat template -> generation engine -> text.

Generation runs on an engine with one request/stream interface (:mod:`lmx.serve.engine`):

* :meth:`LocalBackend.from_lmx` / :meth:`LocalBackend.load` wire an ``lmx.models.Transformer``
  onto the continuous-batching :class:`~lmx.serve.engine.Engine` (a fixed set of KV-cache
  slots; requests join and leave between decode steps) -- the same engine ``python -m
  lmx.serve`` serves over HTTP -- plus a jitted hidden-state gather for scoring;
* a plain constructor call takes token-level functions instead (scripted test models):

  - ``generate_fn(prompts, *, max_new_tokens, temperature, top_p, stop_tokens, seed)
    -> list[list[int]]``: new tokens only (a trailing stop token may be included or not),
    run by a :class:`~lmx.serve.engine.FunctionEngine`, and
  - ``logprobs_fn(sequences, positions) -> list[float32 [len(positions[i]), V]]``: row ``k`` is
    ``log p(. | sequences[i][:positions[i][k] + 1])``, the next-token distribution after that
    position (needed only for :meth:`LocalBackend.label_probs` and, with ``generate_fn``,
    token log-probs).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmx.backends.base import (
    Completion,
    SamplingParams,
    has_images,
    restricted_softmax,
    text_of,
    validate_conversations,
)

GenerateFn = Callable[..., list]
LogprobsFn = Callable[[list, list], list]


class PromptTooLongError(ValueError):
    """The rendered prompt plus ``max_tokens`` does not fit the model's context."""

    def __init__(self, index: int, prompt_tokens: int, max_tokens: int, max_seq_len: int):
        super().__init__(
            f"conversations[{index}] renders to {prompt_tokens} prompt tokens; with max_tokens="
            f"{max_tokens} that exceeds the model's context of {max_seq_len} tokens")
        self.prompt_tokens = prompt_tokens


def _stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS plus the chat end-of-turn tokens the tokenizer knows (ChatML ``<|im_end|>`` etc.)."""
    ids = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        if tok in vocab:
            ids.append(int(vocab[tok]))
    return tuple(dict.fromkeys(ids))


class LocalBackend:
    """Chat over a local model (see the module docstring for the two ways to build one).

    Args:
      tokenizer: has ``apply_chat_template``, ``encode``, ``decode``, ``get_vocab``.
      generate_fn, logprobs_fn: token-level functions (either may be None when ``engine`` is
        given; ``logprobs_fn`` None disables :meth:`label_probs`).
      max_seq_len: context length; prompt tokens + max_tokens must fit, else
        :class:`PromptTooLongError` (a ValueError) is raised before any compute.
      model_name: the id reported by the server.
      max_batch: conversations per ``generate_fn`` call (function engine) / scoring batch.
      stop_token_ids: ids that end a reply; default EOS + known end-of-turn tokens.
      engine: an :class:`~lmx.serve.engine.Engine`, or a function ``backend -> Engine`` (so the
        engine can use the backend's thread-safe :meth:`decode`; ``from_lmx`` passes one).

    Thread-safe: the engine owns the model on its own thread and takes requests from any thread.
    """

    supports_images = False

    def __init__(self, tokenizer: Any, generate_fn: GenerateFn | None = None,
                 logprobs_fn: LogprobsFn | None = None, *, max_seq_len: int,
                 model_name: str = "local", max_batch: int = 16,
                 stop_token_ids: Sequence[int] | None = None, engine: Any = None):
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if generate_fn is None and engine is None:
            raise ValueError("LocalBackend needs a generate_fn or an engine")
        self.tokenizer = tokenizer
        self.generate_fn = generate_fn
        self.logprobs_fn = logprobs_fn
        self.max_seq_len = max_seq_len
        self.model_name = model_name
        self.max_batch = max_batch
        self.stop_token_ids = (tuple(int(i) for i in stop_token_ids) if stop_token_ids is not None
                               else _stop_token_ids(tokenizer))
        self._lock = threading.Lock()
        # HF fast tokenizers reset their Rust truncation/padding state on every encode; two threads
        # encoding at once can fail with "Already borrowed", so all tokenizer calls are serialised
        self._tok_lock = threading.Lock()
        if callable(engine) and not hasattr(engine, "submit"):
            engine = engine(self)
        elif engine is None:
            from lmx.serve.engine import FunctionEngine

            engine = FunctionEngine(generate_fn, tokenizer, max_len=max_seq_len,
                                    vocab_size=len(tokenizer), stop_token_ids=self.stop_token_ids,
                                    max_batch=max_batch, logprobs_fn=logprobs_fn,
                                    decode=self.decode)
        self.engine = engine

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lmx(cls, model: Any, tokenizer: Any, *, model_name: str = "local",
                 max_batch: int = 16, max_seq_len: int | None = None, n_slots: int | None = None,
                 **engine_kw: Any) -> LocalBackend:
        """Wire an ``lmx.models.Transformer`` + tokenizer onto a continuous-batching engine.

        ``n_slots`` (default ``min(max_batch, 16)``) KV-cache slots of ``max_seq_len`` columns
        (default the model's context capped at 2048: the cache holds ``n_slots * max_seq_len``
        tokens, 1.5 GB for SmolLM2-135M in f32 at the defaults);
        ``engine_kw`` go to :class:`~lmx.serve.engine.Engine` (bucket lists, prefill budget).
        """
        from lmx.backends import _lmx_glue
        from lmx.serve.engine import Engine

        cfg_len = int(model.cfg.max_seq_len)
        max_len = min(cfg_len, max_seq_len or 2048)
        lp = _lmx_glue.make_logprobs_fn(model, pad_id=_pad_id(tokenizer))

        def engine(backend: LocalBackend) -> Engine:
            return Engine(model, tokenizer, n_slots=n_slots or min(max_batch, 16), max_len=max_len,
                          stop_token_ids=backend.stop_token_ids, decode=backend.decode, **engine_kw)

        return cls(tokenizer, None, lp, max_seq_len=max_len, model_name=model_name,
                   max_batch=max_batch, engine=engine)

    @classmethod
    def load(cls, name: str, *, max_batch: int = 16, max_seq_len: int | None = None,
             **engine_kw: Any) -> LocalBackend:
        """``lmx.models.load(name)`` (offline assets, e.g. ``"smollm2-135m-instruct"``), served."""
        from lmx.models import load

        model, tokenizer = load(name)
        return cls.from_lmx(model, tokenizer, model_name=name, max_batch=max_batch,
                            max_seq_len=max_seq_len, **engine_kw)

    # ------------------------------------------------------------------ rendering
    def render(self, conversation: list[dict]) -> list[int]:
        """Token ids of the chat-template rendering with an open assistant turn."""
        msgs = [{"role": m["role"], "content": text_of(m["content"])} for m in conversation]
        with self._tok_lock:
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                      tokenize=False)
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens (thread-safe)."""
        with self._tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text`` (no special tokens added; thread-safe)."""
        with self._tok_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render_all(self, conversations: list[list[dict]], max_tokens: int = 0) -> list[list[int]]:
        """Validate and render a batch; raise :class:`PromptTooLongError` before any compute."""
        validate_conversations(conversations, allow_images=self.supports_images)
        for i, c in enumerate(conversations):
            if has_images(c):
                raise ValueError(f"conversations[{i}] holds image_url parts; "
                                 f"{self.model_name!r} is a text-only model")
        prompts = [self.render(c) for c in conversations]
        for i, p in enumerate(prompts):
            if len(p) + max_tokens > self.max_seq_len or len(p) >= self.max_seq_len:
                raise PromptTooLongError(i, len(p), max_tokens, self.max_seq_len)
        return prompts

    # ------------------------------------------------------------------ generation
    def complete(self, conversations: list[list[dict]], *, max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
                 seed: int = 0, top_logprobs: int | None = None) -> list[Completion]:
        """Generate one reply per conversation (see :class:`~lmx.backends.base.Completion`).

        Every conversation is one engine request; conversation ``i`` samples from the PRNG
        stream ``(seed, i)``, so its text does not depend on what else runs. ``top_logprobs=k``
        (0..20) also returns, per generated token, its log-prob and the k most likely
        alternatives under the model's raw next-token distribution.
        Raises ValueError/TypeError on bad messages or parameters, PromptTooLongError when a
        prompt does not fit.
        """
        from lmx.serve.engine import GenRequest

        params = SamplingParams(max_tokens, temperature, top_p, tuple(stop), seed)
        if top_logprobs is not None:
            if not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
                raise ValueError(f"top_logprobs must be an int in [0, 20], got {top_logprobs!r}")
            if self.generate_fn is not None and self.logprobs_fn is None:
                raise ValueError("top_logprobs needs a backend built with a logprobs_fn")
        prompts = self.render_all(conversations, params.max_tokens)
        outs = self.engine.generate([
            GenRequest(p, max_tokens=params.max_tokens, temperature=float(params.temperature),
                       top_p=float(params.top_p), seed=int(params.seed), stream=i,
                       stop=params.stop, top_logprobs=top_logprobs)
            for i, p in enumerate(prompts)])
        result = []
        for prompt, (text, lps, final) in zip(prompts, outs):
            if final.finish_reason == "error":
                raise RuntimeError(f"generation failed: {final.error}")
            tlp = (tuple((t.token, t.logprob, tuple(t.top)) for t in lps)
                   if top_logprobs is not None else None)
            result.append(Completion(text, final.finish_reason, len(prompt),
                                     final.completion_tokens, tlp))
        return result

    def chat(self, conversations: list[list[dict]], *, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
             seed: int = 0) -> list[str]:
        """Texts of :meth:`complete`."""
        return [c.text for c in self.complete(conversations, max_tokens=max_tokens,
                                              temperature=temperature, top_p=top_p, stop=stop,
                                              seed=seed)]

    # ------------------------------------------------------------------ scoring
    def label_token_ids(self, labels: Sequence[str]) -> list[int]:
        """First token id of each label string; ValueError if two labels share it."""
        if not labels:
            raise ValueError("labels must be a non-empty sequence of strings")
        ids = []
        for lab in labels:
            if not isinstance(lab, str) or not lab:
                raise ValueError(f"labels must be non-empty strings, got {lab!r}")
            with self._tok_lock:
                enc = self.tokenizer.encode(lab, add_special_tokens=False)
            ids.append(int(enc[0]))
        if len(set(ids)) != len(ids):
            raise ValueError(f"labels {list(labels)} do not have distinct first tokens: {ids}")
        return ids

    def label_probs(self, conversations: list[list[dict]], labels: Sequence[str]) -> np.ndarray:
        """float32 [B, C]: softmax of the next-token log-probs over the labels' first tokens.

        This is WisdoM's MMICL ``first_token`` scoring (Wang et al. 2024, arXiv:2401.06659): one
        forward pass per prompt.
        """
        if self.logprobs_fn is None:
            raise ValueError("label_probs needs a backend built with a logprobs_fn")
        ids = self.label_token_ids(labels)
        prompts = self.render_all(conversations, 0)
        rows = []
        with self._lock:
            for s in range(0, len(prompts), self.max_batch):
                chunk = prompts[s:s + self.max_batch]
                out = self.logprobs_fn(chunk, [[len(p) - 1] for p in chunk])
                rows += [np.asarray(r, np.float32)[0, ids] for r in out]
        return restricted_softmax(np.stack(rows))


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): padded shapes so jit compiles a few times only."""
    return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))
