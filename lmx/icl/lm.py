"""The small LM interface the ICL code scores and generates through.

Everything in ``lmx.icl`` that needs a language model goes through :class:`ScoringLM`:

* ``logprob_fn(tokens int32 [B,T], mask bool [B,T]) -> float32 [B,T-1]`` with
  ``lp[b,t] = log p(tokens[b,t+1] | tokens[b,:t+1])`` and 0 where the target is padding
  (the contract of ``lmx.models.token_logprobs``; spec A7 "LM interface"). Rows are right-padded.
* ``encode(text) -> list[int]``: tokenisation *without* special tokens; ``prefix_ids`` are the
  special tokens the tokenizer puts in front of a sequence (Llama's BOS; none for SmolLM2).

:func:`from_lmx` wraps an ``lmx.models`` Transformer + tokenizer; tests plug in a toy callable.
:func:`sequence_logprobs` batches variable-length sequences: it sorts them by length, pads each
batch to a bucket length and a fixed batch size (so the jitted LM compiles once per bucket) and
returns per-sequence arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

__all__ = ["ScoringLM", "from_lmx", "sequence_logprobs", "span_nll"]

LogprobFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
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
    """

    logprob_fn: LogprobFn
    encode: Callable[[str], list]
    decode: Callable[[Sequence[int]], str] | None = None
    prefix_ids: tuple = ()
    pad_id: int = 0
    generate_fn: GenerateFn | None = None
    batch_size: int = 8
    buckets: tuple = (32, 64, 96, 128, 192, 256, 384, 512)

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


def sequence_logprobs(lm: ScoringLM, seqs: Sequence[Sequence[int]], *, progress: bool = False,
                      desc: str = "scoring") -> list[np.ndarray]:
    """Per-sequence next-token log-probs: ``out[i][t] = log p(seqs[i][t+1] | seqs[i][:t+1])``,
    float32 of length ``len(seqs[i]) - 1``.

    Raises ValueError for a sequence shorter than 2 tokens or a logprob_fn returning a wrong shape.
    """
    seqs = [np.asarray(s, np.int32) for s in seqs]
    for i, s in enumerate(seqs):
        if s.ndim != 1 or s.size < 2:
            raise ValueError(f"seqs[{i}] must be a 1-D token list of length >= 2, got shape "
                             f"{s.shape}")
    out: list = [None] * len(seqs)
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
        lp = np.asarray(lm.logprob_fn(tok, msk), np.float32)
        if lp.shape != (bs, t - 1):
            raise ValueError(f"logprob_fn returned shape {lp.shape}, expected {(bs, t - 1)}")
        for r, i in enumerate(idx):
            out[i] = lp[r, :len(seqs[i]) - 1]
    return out


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

    Scoring uses ``lmx.models.token_logprobs``; generation uses ``lmx.models.generate`` (greedy,
    stopping at EOS, ``max_new_tokens`` new tokens).
    """
    from lmx.models import generate, token_logprobs

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    stops = () if eos is None else (int(eos),)

    def logprob_fn(tokens, mask):
        return token_logprobs(model, tokens, attention_mask=mask)

    def generate_fn(prompts):
        return generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                        stop_tokens=stops, pad_id=int(pad))

    kw = {} if buckets is None else {"buckets": tuple(buckets)}
    return ScoringLM(logprob_fn=logprob_fn,
                     encode=lambda s: tokenizer.encode(s, add_special_tokens=False),
                     decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
                     prefix_ids=_hf_prefix(tokenizer), pad_id=int(pad), generate_fn=generate_fn,
                     batch_size=batch_size, **kw)
