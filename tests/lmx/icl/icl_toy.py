"""Toy character-level bigram LM behind the ``ScoringLM`` interface (hand-checkable scores)."""
import numpy as np

from lmx.icl.lm import ScoringLM

V = 128


def bigram_table(seed: int = 0) -> np.ndarray:
    """log p(next | prev) as float64 [V, V]."""
    t = np.random.default_rng(seed).normal(size=(V, V)) * 2.0
    return t - np.log(np.exp(t).sum(axis=1, keepdims=True))


def encode(s: str) -> list:
    return [ord(c) % V for c in s]


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


def toy_lm(seed: int = 0, *, batch_size: int = 4, buckets=(64, 128, 256, 512), calls=None,
           prefix_ids=(), generate_fn=None, one_pass: bool = False) -> ScoringLM:
    """``one_pass`` adds ``next_logprob_fn`` (single-token answers scored in one pass)."""
    logp = bigram_table(seed)

    def logprob_fn(tokens, mask):
        if calls is not None:
            calls.append(tokens.shape)
        lp = logp[tokens[:, :-1], tokens[:, 1:]]
        return np.where(mask[:, 1:] & mask[:, :-1], lp, 0.0).astype(np.float32)

    def next_logprob_fn(tokens, mask, next_ids):
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        final = tokens[np.arange(len(tokens)), last]
        return logprob_fn(tokens, mask), logp[final[:, None], next_ids[None, :]].astype(np.float32)

    return ScoringLM(logprob_fn=logprob_fn, encode=encode, decode=decode,
                     prefix_ids=tuple(prefix_ids), batch_size=batch_size, buckets=tuple(buckets),
                     generate_fn=generate_fn, next_logprob_fn=next_logprob_fn if one_pass else None)


def hand_nll(ids, start: int, end: int, seed: int = 0) -> float:
    """sum_{i in [start, end)} -log p(ids[i] | ids[i-1]) computed directly from the table."""
    logp = bigram_table(seed)
    return float(-sum(logp[ids[i - 1], ids[i]] for i in range(start, end)))
