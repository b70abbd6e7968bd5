import numpy as np
import pytest
from icl_toy import toy_lm

from lmx.icl.cone import cone_scores
from lmx.icl.retrievers import DemoPool, cone_retrieve, random_retrieve, retrieve, topk_retrieve
from lmx.icl.templates import SST2_TEMPLATE as T
from lmx.icl.templates import PromptTemplate

RNG = np.random.default_rng(0)
EMB = RNG.normal(size=(12, 8)).astype(np.float32)
POOL = DemoPool([f"review number {i}" for i in range(12)], [i % 2 for i in range(12)], EMB)


def test_random_is_deterministic_distinct_and_in_range():
    a = random_retrieve(POOL, 5, 4, seed=1)
    assert a.shape == (5, 4) and a.min() >= 0 and a.max() < 12
    assert all(len(set(r)) == 4 for r in a)
    np.testing.assert_array_equal(a, random_retrieve(POOL, 5, 4, seed=1))
    assert not np.array_equal(a, random_retrieve(POOL, 5, 4, seed=2))


def test_topk_finds_planted_neighbours_most_similar_first():
    q = EMB[[3, 7]] + 0.01
    got = topk_retrieve(POOL, q, 2)
    assert got[:, 0].tolist() == [3, 7]


def test_cone_retrieve_reranks_topk_candidates_by_score():
    lm = toy_lm()
    tests = ["a fine film"]
    q = EMB[[5]]
    cand = topk_retrieve(POOL, q, 6)[0]
    scores = cone_scores(lm, T, [(POOL.examples[j], int(POOL.labels[j])) for j in cand], tests[0])
    got = cone_retrieve(lm, T, POOL, tests, q, 3, candidate_num=6)
    np.testing.assert_array_equal(got[0], cand[np.argsort(scores, kind="stable")[:3]])
    again = retrieve("cone", pool=POOL, tests=tests, n=3, query_emb=q, lm=lm, template=T,
                     candidate_num=6)
    np.testing.assert_array_equal(got, again)
    rnd = retrieve("cone", pool=POOL, tests=tests, n=2, lm=lm, template=T, candidate_num=4,
                   base="random", seed=3)
    assert set(rnd[0]) <= set(random_retrieve(POOL, 1, 4, seed=3)[0])


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        DemoPool([], [])
    with pytest.raises(ValueError, match="pool size=12"):
        random_retrieve(POOL, 2, 13)
    with pytest.raises(ValueError, match="pool size=12"):
        topk_retrieve(POOL, EMB[:1], 13)
    with pytest.raises(ValueError, match="candidate_num"):
        cone_retrieve(toy_lm(), T, POOL, ["x"], EMB[:1], 2, candidate_num=30)
    with pytest.raises(ValueError, match=r"n must be in \[1, candidate_num=4\]"):
        cone_retrieve(toy_lm(), T, POOL, ["x"], EMB[:1], 5, candidate_num=4)
    with pytest.raises(ValueError, match="input"):
        PromptTemplate("Review: {review}\nSentiment: {label}", labels=("negative", "positive"))
    with pytest.raises(ValueError, match="method"):
        retrieve("bm25", pool=POOL, tests=["x"], n=1)
    with pytest.raises(ValueError, match="needs lm"):
        retrieve("mdl", pool=POOL, tests=["x"], n=1, query_emb=EMB[:1])
    with pytest.raises(ValueError, match="embeddings"):
        topk_retrieve(DemoPool(["a"], [0]), EMB[:1], 1)
