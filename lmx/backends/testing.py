"""Deterministic backends and a tiny tokenizer for tests and offline test beds.

* :class:`ScriptedBackend`: a ``ChatBackend``/``LabelProbBackend`` whose replies come from a
  Python function of the conversation; records every call (for call-order tests).
* :func:`byte_chat_tokenizer`: a 259-token byte-level tokenizer with a ChatML chat template,
  built locally with ``tokenizers`` (no download), for tiny random lmx models.
* :class:`ScriptedTokenModel`: token-level ``generate_fn``/``logprobs_fn`` that decode the ChatML
  prompt, ask a reply function, and emit its tokens: the full ``LocalBackend`` -> server -> HTTP
  path can then be checked on exact strings.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from lmx.backends.base import (
    Completion,
    SamplingParams,
    cut_at_stop,
    restricted_softmax,
    validate_conversations,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_CHATML_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n", re.DOTALL)


def byte_chat_tokenizer():
    """A ``PreTrainedTokenizerFast``: 256 byte-level tokens + <|endoftext|>, <|im_start|>, <|im_end|>.

    Ids 0..255 are the GPT-2 byte alphabet; 256 = <|endoftext|> (pad), 257 = <|im_start|>,
    258 = <|im_end|> (eos). Every string round-trips exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    if set(vocab) != set(alphabet):
        raise RuntimeError("tokenizers' ByteLevel alphabet differs from the GPT-2 byte map")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML_TEMPLATE)
    fast.add_special_tokens({"pad_token": "<|endoftext|>", "bos_token": "<|im_start|>",
                             "eos_token": "<|im_end|>"})
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-character map (the ByteLevel alphabet)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def parse_chatml(text: str) -> list[dict]:
    """Messages of a ChatML prompt (the open assistant turn at the end is dropped)."""
    return [{"role": r, "content": c} for r, c in _CHATML_TURN.findall(text)]


class ScriptedTokenModel:
    """Token-level functions driven by ``reply_fn(messages) -> str`` over a ChatML tokenizer.

    ``generate_fn`` emits the reply's tokens followed by the tokenizer's EOS (cut at
    ``max_new_tokens``). ``logprobs_fn`` returns log-softmax rows that put ``peak`` nats of extra
    logit on the reply's next token at each reply position (flat over the prompt).
    ``calls`` records each batch size.
    """

    def __init__(self, tokenizer, reply_fn: Callable[[list[dict]], str], peak: float = 3.0):
        self.tokenizer = tokenizer
        self.reply_fn = reply_fn
        self.peak = peak
        self.calls: list[int] = []

    def _reply_ids(self, prompt: Sequence[int]) -> list[int]:
        msgs = parse_chatml(self.tokenizer.decode(list(prompt), skip_special_tokens=False))
        return list(self.tokenizer.encode(self.reply_fn(msgs), add_special_tokens=False))

    def generate_fn(self, prompts, *, max_new_tokens, temperature, top_p, stop_tokens, seed):
        self.calls.append(len(prompts))
        return [(self._reply_ids(p) + [self.tokenizer.eos_token_id])[:max_new_tokens]
                for p in prompts]

    def logprobs_fn(self, sequences, positions):
        v = len(self.tokenizer)
        start = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        header = len(self.tokenizer.encode("assistant\n", add_special_tokens=False))
        out = []
        for s, q in zip(sequences, positions):
            s = list(s)
            opened = max(i for i, t in enumerate(s) if t == start)
            end = opened + 1 + header  # the prompt ends after "<|im_start|>assistant\n"
            reply = self._reply_ids(s[:end]) + [self.tokenizer.eos_token_id]
            rows = np.zeros((len(q), v), np.float32)
            for k, pos in enumerate(q):
                j = pos - (end - 1)
                if 0 <= j < len(reply):
                    rows[k, reply[j]] = self.peak
            out.append(rows - np.log(np.exp(rows).sum(-1, keepdims=True)))
        return out


class ScriptedBackend:
    """``ChatBackend`` answering with ``reply_fn(conversation) -> str``; records calls.

    ``max_tokens`` counts space-separated words here (a reply longer than that is cut and
    reported with finish reason ``"length"``); stop strings are applied first.

    ``probs_fn(conversation, labels) -> list[float]`` (optional) backs :meth:`label_probs`; its
    rows are renormalised. ``supports_images`` decides whether image parts are accepted.
    """

    def __init__(self, reply_fn: Callable[[list[dict]], str],
                 probs_fn: Callable[[list[dict], Sequence[str]], Sequence[float]] | None = None,
                 *, supports_images: bool = True):
        self.reply_fn = reply_fn
        self.probs_fn = probs_fn
        self.supports_images = supports_images
        self.calls: list[list[list[dict]]] = []

    def complete(self, conversations, *, max_tokens=128, temperature=0.0, top_p=1.0, stop=(),
                 seed=0) -> list[Completion]:
        SamplingParams(max_tokens, temperature, top_p, tuple(stop), seed)
        validate_conversations(conversations, allow_images=self.supports_images)
        self.calls.append([list(c) for c in conversations])
        out = []
        for c in conversations:
            text, _ = cut_at_stop(self.reply_fn(c), stop)
            words = text.split(" ")
            trunc = len(words) > max_tokens
            text = " ".join(words[:max_tokens])
            out.append(Completion(text, "length" if trunc else "stop", 0, min(len(words), max_tokens)))
        return out

    def chat(self, conversations, *, max_tokens=128, temperature=0.0, top_p=1.0, stop=(),
             seed=0) -> list[str]:
        return [c.text for c in self.complete(conversations, max_tokens=max_tokens,
                                              temperature=temperature, top_p=top_p, stop=stop,
                                              seed=seed)]

    def label_probs(self, conversations, labels) -> np.ndarray:
        if self.probs_fn is None:
            raise ValueError("this ScriptedBackend was built without probs_fn")
        validate_conversations(conversations, allow_images=self.supports_images)
        self.calls.append([list(c) for c in conversations])
        p = np.asarray([self.probs_fn(c, labels) for c in conversations], np.float64)
        if p.shape != (len(conversations), len(labels)) or (p < 0).any():
            raise ValueError(f"probs_fn must return {len(labels)} non-negative numbers per row")
        return restricted_softmax(np.log(np.maximum(p, 1e-30)))
