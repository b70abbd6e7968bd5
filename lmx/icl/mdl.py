"""TopK+MDL demonstration selection as OpenICL's ``MDLRetriever`` runs it (Wu et al. 2023b,
"Self-adaptive In-context Learning", ACL 2023, arXiv:2212.10375; the TopK+MDL baseline of
Peng et al. 2024, arXiv:2401.12087, Sec. 4).

For each test input x with K TopK candidates (most similar first):

1. Form ``select_time`` candidate sets of N demonstrations: set 0 is the top N in similarity
   order; every other set is a uniform random N-subset of the K candidates, in random order.
2. For each set c and each label y, build ``demos(c) + query(x) + answer(y)`` and take the mean
   token NLL over the tokens after the demonstration block (query + answer): l_{c,y}.
3. p_c(y) = softmax_y(-l_{c,y}); H(c) = -sum_y p_c(y) log p_c(y) (the code length of the label
   under the "minimum description length" view).
4. Choose the set with the lowest H (ties -> lower set index, i.e. set 0 first).

Deviation (ours): the demonstration block is counted with the inference LM's tokenizer (the
tokens are segments of the same sequence), whereas OpenICL counts it with the retriever's
tokenizer; see docs/icl.md.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmx.icl.lm import ScoringLM, choice_mean_nll
from lmx.icl.templates import PromptTemplate

__all__ = ["label_entropy", "mdl_candidate_sets", "mdl_rerank"]


def label_entropy(mean_nll) -> np.ndarray:
    """H = -sum_y p_y log p_y with p = softmax(-mean_nll) over the last axis (float32, nats).

    mean_nll float [..., L] -> float32 [...]. A uniform label distribution gives log L.
    """
    x = -jnp.asarray(mean_nll, jnp.float32)
    logp = jax.nn.log_softmax(x, axis=-1)
    return np.asarray(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def mdl_candidate_sets(key: jax.Array, k: int, n: int, select_time: int) -> np.ndarray:
    """int32 [select_time, n] positions into the K candidates: row 0 = 0..n-1, rows r >= 1 the
    first n entries of an independent random permutation of K (key ``fold_in(key, r)``).

    Raises ValueError unless 1 <= n <= k and select_time >= 1.
    """
    if not 1 <= n <= k:
        raise ValueError(f"n must be in [1, k={k}], got {n}")
    if select_time < 1:
        raise ValueError(f"select_time must be >= 1, got {select_time}")
    rows = [np.arange(n)]
    for r in range(1, select_time):
        rows.append(np.asarray(jax.random.permutation(jax.random.fold_in(key, r), k))[:n])
    return np.stack(rows).astype(np.int32)


def mdl_rerank(lm: ScoringLM, template: PromptTemplate, pool_examples: Sequence,
               pool_labels: Sequence[int], tests: Sequence, candidates: np.ndarray, n: int, *,
               select_time: int = 10, seed: int = 0,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pick one N-set per test by minimum label entropy.

    Args:
      candidates: int [Q, K] pool indices per test, most similar first.
      n: demonstrations per prompt; select_time: sets tried per test; seed: for the random sets
        (test i uses ``fold_in(PRNGKey(seed), i)``, so a test's sets do not depend on the others).

    Returns (selected int32 [Q, n] pool indices in prompt order, entropies float32 [Q, S]).
    Raises ValueError for mismatched shapes or n/select_time out of range.
    """
    cand = np.asarray(candidates)
    if cand.ndim != 2 or cand.shape[0] != len(tests):
        raise ValueError(f"candidates must be int [Q={len(tests)}, K], got shape {cand.shape}")
    if cand.size and (cand.min() < 0 or cand.max() >= len(pool_examples)):
        raise ValueError(f"candidates must index the pool [0, {len(pool_examples)})")
    q, k = cand.shape
    n_labels = len(template.labels)
    base = jax.random.PRNGKey(seed)
    sets = np.stack([cand[i][mdl_candidate_sets(jax.random.fold_in(base, i), k, n, select_time)]
                     for i in range(q)]) if q else np.zeros((0, select_time, n), np.int32)
    answers = [lm.encode(template.answer(y)) for y in range(n_labels)]
    prefixes, starts = [], []
    for i in range(q):
        query = template.query(tests[i])
        for s in range(select_time):
            block = template.instruction + "".join(
                template.demo(pool_examples[j], int(pool_labels[j])) for j in sets[i, s])
            ids, b = lm.ids(block, query)
            prefixes.append(ids)
            starts.append(max(b[1], 1))
    nll = choice_mean_nll(lm, prefixes, starts, answers, progress=progress, desc="MDL scoring")
    ent = label_entropy(nll.reshape(q, select_time, n_labels)).reshape(q, select_time)
    best = np.argmin(ent, axis=1) if q else np.zeros(0, int)
    return sets[np.arange(q), best].astype(np.int32), ent.astype(np.float32)
