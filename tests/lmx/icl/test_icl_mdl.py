import jax
import numpy as np
import pytest
from icl_toy import encode, hand_nll, toy_lm

from lmx.icl.mdl import label_entropy, mdl_candidate_sets, mdl_rerank
from lmx.icl.templates import SST2_TEMPLATE as T
from lmx.icl.templates import PromptTemplate

# one character per answer: the toy LM's one-pass path applies
T1 = PromptTemplate(template="Review: {input}\nSentiment:{label}", labels=("-", "+"))

POOL = ["a great movie", "dull and slow", "fun", "worst plot ever", "moving", "a bore"]
LABELS = [1, 0, 1, 0, 1, 0]


def test_entropy_uniform_is_log_labels_and_peaked_is_small():
    np.testing.assert_allclose(label_entropy(np.zeros((2, 3))), np.log(3.0), rtol=1e-6)
    np.testing.assert_allclose(label_entropy([[0.0, 50.0]]), 0.0, atol=1e-6)
    p = np.array([0.2, 0.8])
    np.testing.assert_allclose(label_entropy(-np.log(p)), -(p * np.log(p)).sum(), rtol=1e-6)


def test_candidate_sets_shape_first_row_and_determinism():
    key = jax.random.PRNGKey(7)
    s = mdl_candidate_sets(key, 10, 4, 5)
    assert s.shape == (5, 4) and s.dtype == np.int32
    np.testing.assert_array_equal(s[0], np.arange(4))
    assert all(len(set(r)) == 4 and r.min() >= 0 and r.max() < 10 for r in s)
    np.testing.assert_array_equal(s, mdl_candidate_sets(key, 10, 4, 5))
    assert not np.array_equal(s, mdl_candidate_sets(jax.random.PRNGKey(8), 10, 4, 5))
    with pytest.raises(ValueError, match="n must be"):
        mdl_candidate_sets(key, 3, 4, 2)
    with pytest.raises(ValueError, match="select_time"):
        mdl_candidate_sets(key, 5, 2, 0)


@pytest.mark.parametrize("one_pass", [False, True])
def test_mdl_picks_the_min_entropy_set_computed_by_hand(one_pass):
    lm = toy_lm(seed=1, one_pass=one_pass)
    tpl = T1 if one_pass else T
    tests = ["charming film", "tedious"]
    cand = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    sel, ent = mdl_rerank(lm, tpl, POOL, LABELS, tests, cand, 2, select_time=4, seed=3)
    assert sel.shape == (2, 2) and ent.shape == (2, 4)
    base = jax.random.PRNGKey(3)
    for i, test in enumerate(tests):
        sets = cand[i][mdl_candidate_sets(jax.random.fold_in(base, i), 6, 2, 4)]
        hand = []
        for row in sets:
            block = encode("".join(tpl.demo(POOL[j], LABELS[j]) for j in row))
            q = encode(tpl.query(test))
            nll = []
            for y in range(2):
                ids = block + q + encode(tpl.answer(y))
                nll.append(hand_nll(ids, len(block), len(ids), seed=1) / (len(ids) - len(block)))
            hand.append(float(label_entropy(np.array(nll))))
        np.testing.assert_allclose(ent[i], hand, rtol=1e-4)
        np.testing.assert_array_equal(sel[i], sets[int(np.argmin(hand))])
    sel2, _ = mdl_rerank(lm, tpl, POOL, LABELS, tests, cand, 2, select_time=4, seed=3)
    np.testing.assert_array_equal(sel, sel2)


def test_mdl_bad_shapes():
    lm = toy_lm()
    with pytest.raises(ValueError, match="candidates"):
        mdl_rerank(lm, T, POOL, LABELS, ["x"], np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="index the pool"):
        mdl_rerank(lm, T, POOL, LABELS, ["x"], np.array([[0, 9]]), 1)
