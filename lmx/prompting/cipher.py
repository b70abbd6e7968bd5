"""Synthetic cipher languages: an offline test bed for POMP (our design, not from the paper).

English sentences are turned into "languages" by seeded, reversible word-substitution ciphers:

* each language enciphers a word *type* with probability ``cipher_rate`` (decided by a hash of
  word and language, so the same word always maps the same way) into a pronounceable pseudo-word;
* token noise: with probability ``noise`` a token is replaced by a random English word from the
  lexicon (a mistranslation).

The low-resource source is fully enciphered; each auxiliary language is a lighter cipher whose
noise level sets its true usefulness; the NMT English hypothesis e0 is English with noise.
:func:`toy_refine` is a deterministic stand-in for the LLM: it reads the query block of a POMP
prompt and, position by position, votes among the English-looking words of the auxiliary lines
and e0 (ties go to the auxiliary lines, in order). Useful auxiliary lines (little noise) thus
repair e0 and noisy ones damage it, so POMP's learned probabilities can be checked against the
planted usefulness without any LLM.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Sequence

import numpy as np

from lmx.prompting.pomp import MTExample

_CONS = "bdfgklmnprstvz"
_VOWS = "aeiou"


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def pseudo_word(word: str, salt: str) -> str:
    """A pronounceable pseudo-word for ``word`` in language ``salt`` (deterministic)."""
    h = _h(word, salt)
    n = max(1, (len(word) + 1) // 2)
    out = []
    for _ in range(n):
        out.append(_CONS[h % len(_CONS)] + _VOWS[(h // 16) % len(_VOWS)])
        h //= 97
    return "".join(out) + ("q" if h % 3 == 0 else "")


@dataclasses.dataclass(frozen=True)
class CipherLanguage:
    """A synthetic language: ``cipher_rate`` share of word types enciphered, ``noise`` token noise."""

    code: str
    name: str
    cipher_rate: float
    noise: float

    def __post_init__(self):
        for f in ("cipher_rate", "noise"):
            v = getattr(self, f)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{f} must be in [0, 1], got {v}")

    def enciphered(self, word: str) -> bool:
        return (_h(word, self.code, "type") % 10_000) / 10_000 < self.cipher_rate

    def encode(self, words: Sequence[str], lexicon: Sequence[str], rng: np.random.Generator) -> str:
        out = []
        for w in words:
            if rng.random() < self.noise:
                w = lexicon[int(rng.integers(len(lexicon)))]
            out.append(pseudo_word(w, self.code) if self.enciphered(w) else w)
        return " ".join(out)


def tokenize(sentence: str) -> list[str]:
    return sentence.lower().split()


@dataclasses.dataclass(frozen=True)
class CipherTask:
    """Examples (with references), the planted similarity, language names and the lexicon."""

    lrl: str
    examples: tuple[MTExample, ...]
    similarity: dict
    names: dict
    lexicon: frozenset
    usefulness: dict  # 1 - noise of each auxiliary language (the planted ground truth)


DEFAULT_AUX = (  # (code, name, cipher_rate, noise, similarity): the most similar is a noisy one
    ("a1", "Auxish One", 0.3, 0.50, 0.8),
    ("a2", "Auxish Two", 0.5, 0.03, 0.7),
    ("a3", "Auxish Three", 0.2, 0.50, 0.6),
    ("a4", "Auxish Four", 0.9, 0.00, 0.5),
    ("a5", "Auxish Five", 0.3, 0.06, 0.4),
    ("a6", "Auxish Six", 1.0, 0.00, 0.3),
)


def make_task(sentences: Sequence[str], *, aux=DEFAULT_AUX, nmt_noise: float = 0.25,
              lrl: tuple[str, str] = ("xx", "Xenolect"), seed: int = 0) -> CipherTask:
    """Build the cipher task over ``sentences`` (any English text, e.g. MR snippets).

    ``aux`` rows are ``(code, name, cipher_rate, noise, similarity)``. The source language
    enciphers every word type; e0 = the reference with ``nmt_noise`` token noise.
    """
    sentences = [s for s in sentences if s.strip()]
    if len(sentences) < 2:
        raise ValueError(f"need at least 2 non-empty sentences, got {len(sentences)}")
    if not 0.0 <= nmt_noise <= 1.0:
        raise ValueError(f"nmt_noise must be in [0, 1], got {nmt_noise}")
    rng = np.random.default_rng(seed)
    toks = [tokenize(s) for s in sentences]
    lexicon = sorted({w for t in toks for w in t})
    src_lang = CipherLanguage(lrl[0], lrl[1], 1.0, 0.0)
    langs = [CipherLanguage(c, n, r, z) for c, n, r, z, _ in aux]
    nmt = CipherLanguage("en", "English", 0.0, nmt_noise)
    examples = tuple(
        MTExample(source=src_lang.encode(t, lexicon, rng), nmt=nmt.encode(t, lexicon, rng),
                  aux={lg.code: lg.encode(t, lexicon, rng) for lg in langs}, reference=" ".join(t))
        for t in toks)
    names = {lrl[0]: lrl[1], **{c: n for c, n, *_ in aux}}
    return CipherTask(lrl[0], examples, {c: s for c, _, _, _, s in aux}, names,
                      frozenset(lexicon), {c: 1.0 - z for c, _, _, z, _ in aux})


_LINE = re.compile(r"^<(.+?)>: ?(.*)$")


def toy_refine(prompt: str, lexicon: frozenset) -> str:
    """Deterministic "LLM" for cipher prompts: per-position vote over the query block (see module)."""
    block = prompt.rsplit("\n\n", 1)[-1]
    aux_lines, english = [], None
    for line in block.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        tag, text = m.groups()
        if tag == "English translation":
            english = text.split()
        elif tag.endswith(" translation") and tag != "Refined translation":
            aux_lines.append(text.split())
    if english is None:
        return ""
    out = []
    for i, e in enumerate(english):
        votes: collections.Counter = collections.Counter()
        order = []
        for words in aux_lines:
            if i < len(words) and words[i] in lexicon:
                votes[words[i]] += 1
                order.append(words[i])
        votes[e] += 1
        order.append(e)
        top = max(votes.values())
        out.append(next(w for w in order if votes[w] == top))
    return " ".join(out)
