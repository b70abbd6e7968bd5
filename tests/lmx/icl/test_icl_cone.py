import numpy as np
import pytest
from icl_toy import encode, hand_nll, toy_lm

from lmx.icl.cone import cone_rerank, cone_scores, cone_sequence
from lmx.icl.lm import sequence_logprobs
from lmx.icl.templates import SST2_TEMPLATE as T

DEMOS = [("a great movie", 1), ("dull and slow", 0), ("fun", 1), ("worst plot ever made", 0)]
TEST = "quite a charming film"


def test_cone_score_equals_hand_computed_conditional_entropy():
    lm = toy_lm()
    got = cone_scores(lm, T, DEMOS, TEST)
    q = encode(T.query(TEST))
    want = []
    for x, y in DEMOS:
        c = encode(T.demo(x, y))
        ids = c + q
        # H(x | c) = sum over the query characters of -log p(char | previous char)
        want.append(hand_nll(ids, len(c), len(ids)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    sel, scores = cone_rerank(lm, T, [d[0] for d in DEMOS], [d[1] for d in DEMOS], [TEST],
                              np.array([[0, 1, 2, 3]]), 2)
    np.testing.assert_array_equal(sel[0], np.argsort(want)[:2])
    np.testing.assert_allclose(scores[0], want, rtol=1e-5)


def test_eq2_identity_nll_of_concat_minus_nll_of_context():
    lm = toy_lm(seed=3)
    for x, y in DEMOS:
        ids, a, b = cone_sequence(lm, T, x, y, TEST)
        c_ids = ids[:a]
        full = sequence_logprobs(lm, [ids, c_ids])
        diff = -full[0].sum() - (-full[1].sum())
        score = cone_scores(lm, T, [(x, y)], TEST)[0]
        assert abs(diff - score) < 1e-4


def test_faithful_mode_moves_exactly_one_scored_position():
    lm = toy_lm()
    ids_e, a_e, b_e = cone_sequence(lm, T, "a great movie", 1, TEST, mode="exact")
    ids_f, a_f, b_f = cone_sequence(lm, T, "a great movie", 1, TEST, mode="faithful")
    # char tokens: joint == segment-wise; the faithful span skips the first query token and
    # adds the first token of labels[0] (" negative" -> " ").
    assert ids_f[:len(ids_e)] == ids_e
    assert (a_f, b_f) == (a_e + 1, b_e + 1)
    assert ids_f[b_f - 1] == encode(T.answer(0))[0]
    ids_l, a_l, b_l = cone_sequence(lm, T, "a great movie", 1, TEST, score_label="first")
    assert (a_l, b_l) == (a_e, b_e + 1)


def test_padding_and_batching_invariance():
    base = cone_scores(toy_lm(batch_size=4, buckets=(64, 128)), T, DEMOS, TEST)
    for bs, buckets in [(1, (128,)), (3, (80, 512)), (8, (40,))]:
        calls = []
        got = cone_scores(toy_lm(batch_size=bs, buckets=buckets, calls=calls), T, DEMOS, TEST)
        np.testing.assert_allclose(got, base, rtol=1e-6)
        # every call has the fixed batch size and a bucket length (or a multiple of the last)
        assert calls and all(b == bs and (t in buckets or t % buckets[-1] == 0)
                             for b, t in calls)


def test_mean_reduce_and_selection_deterministic_with_ties_in_candidate_order():
    lm = toy_lm()
    s_sum = cone_scores(lm, T, DEMOS, TEST)
    s_mean = cone_scores(lm, T, DEMOS, TEST, reduce="mean")
    n_tok = len(encode(T.query(TEST)))
    np.testing.assert_allclose(s_mean, s_sum / n_tok, rtol=1e-5)
    # identical demonstrations tie: stable order keeps the candidate (similarity) order
    pool = ["same", "same", "other"]
    cand = np.array([[1, 0, 2], [0, 1, 2]])
    sel, _ = cone_rerank(lm, T, pool, [1, 1, 0], [TEST, TEST], cand, 3)
    s = cone_scores(lm, T, [("same", 1), ("other", 0)], TEST)
    tie_first = [[1, 0], [0, 1]]
    for row, first in zip(sel, tie_first):
        order = list(row)
        same_pos = [order.index(first[0]), order.index(first[1])]
        assert same_pos[0] < same_pos[1]
        assert (order.index(2) == 0) == (s[1] < s[0])


def test_bad_arguments():
    lm = toy_lm()
    with pytest.raises(ValueError, match="mode"):
        cone_scores(lm, T, DEMOS, TEST, mode="approx")
    with pytest.raises(ValueError, match="reduce"):
        cone_scores(lm, T, DEMOS, TEST, reduce="max")
    with pytest.raises(ValueError, match="at least one"):
        cone_scores(lm, T, [], TEST)
    with pytest.raises(ValueError, match=r"n must be in \[1, K=2\]"):
        cone_rerank(lm, T, ["a", "b"], [0, 1], [TEST], np.array([[0, 1]]), 3)
    with pytest.raises(ValueError, match="index the pool"):
        cone_rerank(lm, T, ["a", "b"], [0, 1], [TEST], np.array([[0, 5]]), 1)
