"""The small LM interface the ICL code scores and generates through.

Everything in ``lmx.icl`` that needs a language model goes through :class:`ScoringLM`:

* ``logprob_fn(tokens int32 [B,T], mask bool [B,T]) -> float32 [B,T-1]`` with
  ``lp[b,t] = log p(tokens[b,t+1] | tokens[b,:t+1])`` and 0 where the target is padding
  (the contract of ``lmx.models.token_logprobs``, so any JAX causal LM plugs in). Rows are
  right-padded.
* ``encode(text) -> list[int]``: tokenisation *without* special tokens; ``prefix_ids`` are the
  special tokens the tokenizer puts in front of a sequence (Llama's BOS; none for SmolLM2).
* optional ``next_logprob_fn(tokens, mask, next_ids int32 [C]) -> (lp [B,T-1], next_lp [B,C])``:
  ``logprob_fn``'s output plus ``log p(next_ids[c] | row b)`` after each row's last real token
  (``lmx.models.token_logprobs_with_next``). With it, :func:`choice_logprobs` scores all
  single-token answers of a prompt (label words) in one forward pass instead of one per answer.

:func:`from_lmx` wraps an ``lmx.models`` Transformer + tokenizer; tests plug in a toy callable.
:func:`sequence_logprobs` batches variable-length sequences: it sorts them by length, pads each
batch to a bucket length and a fixed batch size (so the jitted LM compiles once per bucket) and
returns per-sequence arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

__all__ = ["ScoringLM", "from_lmx", "sequence_logprobs", "choice_logprobs", "choice_mean_nll",
           "span_nll"]

LogprobFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
NextLogprobFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple]
GenerateFn = Callable[[list], list]


@dataclasses.dataclass
class ScoringLM:
    """An LM behind plain callables.

    Attributes:
      logprob_fn: see module docstring.
      encode: text -> token ids, no special tokens.
      decode: token ids -> text (needed for generation only).
      prefix_ids: ids placed before every sequence (e.g. ``[bos]``); may be empty.
      pad_id: id used for padding (masked out; any valid id).
      generate_fn: ``list[list[int]] -> list[list[int]]`` new tokens per prompt (greedy), or None.
      batch_size: rows per ``logprob_fn`` call (the last batch is padded up to it).
      buckets: padded sequence lengths; a longer sequence is padded to a multiple of the largest.
      next_logprob_fn: optional one-pass scorer of single-token continuations (module docstring).
    """

    logprob_fn: LogprobFn
    encode: Callable[[str], list]
    decode: Callable[[Sequence[int]], str] | None = None
    prefix_ids: tuple = ()
    pad_id: int = 0
    generate_fn: GenerateFn | None = None
    batch_size: int = 8
    buckets: tuple = (32, 64, 96, 128, 192, 256, 384, 512)
    next_logprob_fn: NextLogprobFn | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.buckets or sorted(self.buckets) != list(self.buckets) or self.buckets[0] < 2:
            raise ValueError(f"buckets must be increasing lengths >= 2, got {self.buckets}")
        self.prefix_ids = tuple(int(i) for i in self.prefix_ids)

    def ids(self, *segments: str) -> tuple[list[int], list[int]]:
        """Segment-wise tokenisation: ``prefix + enc(s_1) + ... + enc(s_n)`` and the boundaries
        ``[b_0, b_1, ..., b_n]`` (b_0 = len(prefix); segment i spans [b_{i-1}, b_i))."""
        out, bounds = list(self.prefix_ids), [len(self.prefix_ids)]
        for s in segments:
            out += list(self.encode(s)) if s else []
            bounds.append(len(out))
        return out, bounds


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def _check_seqs(seqs, min_len: int) -> list[np.ndarray]:
    seqs = [np.asarray(s, np.int32) for s in seqs]
    for i, s in enumerate(seqs):
        if s.ndim != 1 or s.size < min_len:
            raise ValueError(f"seqs[{i}] must be a 1-D token list of length >= {min_len}, got "
                             f"shape {s.shape}")
    return seqs


def _padded_batches(lm: ScoringLM, seqs: list[np.ndarray], progress: bool, desc: str):
    """Length-sorted batches of exactly ``lm.batch_size`` rows, right-padded to a bucket:
    yields ``(indices into seqs, tokens [bs, t], mask [bs, t])``."""
    order = np.argsort([len(s) for s in seqs], kind="stable")
    bs = lm.batch_size
    starts = range(0, len(order), bs)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for start in starts:
        idx = order[start:start + bs]
        t = _bucket(max(len(seqs[i]) for i in idx), lm.buckets)
        tok = np.full((bs, t), lm.pad_id, np.int32)
        msk = np.zeros((bs, t), bool)
        for r, i in enumerate(idx):
            tok[r, :len(seqs[i])] = seqs[i]
            msk[r, :len(seqs[i])] = True
        msk[len(idx):, :2] = True  # filler rows: two real tokens keep every row well-defined
        yield idx, tok, msk


def _check_lp(lp, bs: int, t: int) -> np.ndarray:
    lp = np.asarray(lp, np.float32)
    if lp.shape != (bs, t - 1):
        raise ValueError(f"logprob_fn returned shape {lp.shape}, expected {(bs, t - 1)}")
    return lp


def sequence_logprobs(lm: ScoringLM, seqs: Sequence[Sequence[int]], *, progress: bool = False,
                      desc: str = "scoring") -> list[np.ndarray]:
    """Per-sequence next-token log-probs: ``out[i][t] = log p(seqs[i][t+1] | seqs[i][:t+1])``,
    float32 of length ``len(seqs[i]) - 1``.

    Raises ValueError for a sequence shorter than 2 tokens or a logprob_fn returning a wrong shape.
    """
    seqs = _check_seqs(seqs, 2)
    out: list = [None] * len(seqs)
    for idx, tok, msk in _padded_batches(lm, seqs, progress, desc):
        lp = _check_lp(lm.logprob_fn(tok, msk), *tok.shape)
        for r, i in enumerate(idx):
            out[i] = lp[r, :len(seqs[i]) - 1]
    return out


def choice_logprobs(lm: ScoringLM, prefixes: Sequence[Sequence[int]],
                    choices: Sequence[Sequence[int]], *, progress: bool = False,
                    desc: str = "scoring") -> list[list[np.ndarray]]:
    """``out[i][c]`` = :func:`sequence_logprobs` of ``prefixes[i] + choices[c]``.

    When every choice is a single token and ``lm.next_logprob_fn`` is set, each prefix takes one
    forward pass for all choices (the sequences differ only in their last token, so they share
    every earlier log-prob); otherwise every concatenation is scored. Same result either way, up
    to float rounding of the batched forward.
    """
    choices = [list(c) for c in choices]
    if not choices or any(len(c) == 0 for c in choices):
        raise ValueError("choices must be a non-empty list of non-empty token lists")
    if lm.next_logprob_fn is None or any(len(c) != 1 for c in choices):
        flat = sequence_logprobs(lm, [list(p) + c for p in prefixes for c in choices],
                                 progress=progress, desc=desc)
        k = len(choices)
        return [flat[i * k:(i + 1) * k] for i in range(len(prefixes))]
    prefixes = _check_seqs(prefixes, 1)
    next_ids = np.asarray([c[0] for c in choices], np.int32)
    out: list = [None] * len(prefixes)
    for idx, tok, msk in _padded_batches(lm, prefixes, progress, desc):
        lp, nxt = lm.next_logprob_fn(tok, msk, next_ids)
        lp, nxt = _check_lp(lp, *tok.shape), np.asarray(nxt, np.float32)
        if nxt.shape != (tok.shape[0], len(next_ids)):
            raise ValueError(f"next_logprob_fn returned next log-probs of shape {nxt.shape}, "
                             f"expected {(tok.shape[0], len(next_ids))}")
        for r, i in enumerate(idx):
            head = lp[r, :len(prefixes[i]) - 1]
            out[i] = [np.append(head, nxt[r, c]) for c in range(len(next_ids))]
    return out


def choice_mean_nll(lm: ScoringLM, prefixes: Sequence[Sequence[int]], starts: Sequence[int],
                    choices: Sequence[Sequence[int]], *, progress: bool = False,
                    desc: str = "scoring") -> np.ndarray:
    """float32 ``[len(prefixes), len(choices)]``: mean NLL of the tokens from ``starts[i]`` to the
    end of ``prefixes[i] + choices[c]`` (label-word scores; one pass per prefix when possible,
    see :func:`choice_logprobs`)."""
    lps = choice_logprobs(lm, prefixes, choices, progress=progress, desc=desc)
    nll = np.empty((len(prefixes), len(choices)), np.float32)
    for i, (prefix, a, per_choice) in enumerate(zip(prefixes, starts, lps)):
        for c, lp in enumerate(per_choice):
            total, count = span_nll(lp, a, len(prefix) + len(choices[c]))
            nll[i, c] = total / count
    return nll


def span_nll(lp: np.ndarray, start: int, end: int) -> tuple[float, int]:
    """(sum of NLL, count) of the target tokens at positions [start, end) of a sequence whose
    shifted log-probs are ``lp`` (token i is predicted by ``lp[i-1]``). Requires 1 <= start <= end.
    """
    if not 1 <= start <= end <= len(lp) + 1:
        raise ValueError(f"span [{start}, {end}) must satisfy 1 <= start <= end <= {len(lp) + 1}")
    return float(-np.sum(lp[start - 1:end - 1], dtype=np.float64)), end - start


def _hf_prefix(tokenizer) -> tuple:
    with_sp = list(tokenizer.encode("a"))
    without = list(tokenizer.encode("a", add_special_tokens=False))
    n = len(with_sp) - len(without)
    if n > 0 and with_sp[n:] == without:
        return tuple(with_sp[:n])
    return ()


def from_lmx(model, tokenizer, *, batch_size: int = 8, buckets: Sequence[int] | None = None,
             max_new_tokens: int = 8) -> ScoringLM:
    """Wrap an ``lmx.models.Transformer`` and its (HF fast) tokenizer as a :class:`ScoringLM`.

    Scoring uses ``lmx.models.token_logprobs`` (and ``token_logprobs_with_next`` for one-pass
    label words); generation uses ``lmx.models.generate`` (greedy, stopping at EOS,
    ``max_new_tokens`` new tokens).
    """
    from lmx.models import generate, token_logprobs, token_logprobs_with_next

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    stops = () if eos is None else (int(eos),)

    def logprob_fn(tokens, mask):
        return token_logprobs(model, tokens, attention_mask=mask)

    def next_logprob_fn(tokens, mask, next_ids):
        return token_logprobs_with_next(model, tokens, mask, next_ids)

    def generate_fn(prompts):
        return generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                        stop_tokens=stops, pad_id=int(pad))

    kw = {} if buckets is None else {"buckets": tuple(buckets)}
    return ScoringLM(logprob_fn=logprob_fn,
                     encode=lambda s: tokenizer.encode(s, add_special_tokens=False),
                     decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
                     prefix_ids=_hf_prefix(tokenizer), pad_id=int(pad), generate_fn=generate_fn,
                     batch_size=batch_size, next_logprob_fn=next_logprob_fn, **kw)
