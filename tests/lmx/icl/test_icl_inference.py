import numpy as np
import pytest
from icl_toy import encode, hand_nll, toy_lm

from lmx.icl.inference import build_prompt_ids, generate_classify, parse_label, ppl_classify
from lmx.icl.templates import SST2_TEMPLATE as T
from lmx.icl.templates import PromptTemplate

POOL = ["a great movie", "dull and slow", "fun", "worst plot ever"]
LABELS = [1, 0, 1, 0]
TESTS = ["charming", "a tedious bore"]
IDX = [[0, 1], [3, 2]]


# one character per answer: the toy LM's one-pass path applies
T1 = PromptTemplate(template="Review: {input}\nSentiment:{label}", labels=("-", "+"))


@pytest.mark.parametrize("template,one_pass", [(T, False), (T1, False), (T1, True)])
@pytest.mark.parametrize("span", ["all", "label"])
def test_ppl_classify_matches_hand_computed_mean_nll(span, template, one_pass):
    lm = toy_lm(seed=2, one_pass=one_pass)
    pred, nll = ppl_classify(lm, template, POOL, LABELS, TESTS, IDX, span=span)
    assert pred.shape == (2,) and nll.shape == (2, 2)
    for i, test in enumerate(TESTS):
        block = "".join(template.demo(POOL[j], LABELS[j]) for j in IDX[i]) + template.query(test)
        for y in range(2):
            ids = encode(block + template.answer(y))
            a = 1 if span == "all" else len(encode(block))
            np.testing.assert_allclose(nll[i, y], hand_nll(ids, a, len(ids), seed=2) / (len(ids) - a),
                                       rtol=1e-5)
    np.testing.assert_array_equal(pred, np.argmin(nll, axis=1))


def test_max_tokens_drops_demos_from_the_end():
    lm = toy_lm()
    demos = [(POOL[0], 1), (POOL[1], 0)]
    full, _ = build_prompt_ids(lm, T, demos, "x")
    one, _ = build_prompt_ids(lm, T, demos[:1], "x")
    got, _ = build_prompt_ids(lm, T, demos, "x", max_tokens=len(full) - 1)
    assert got == one
    with pytest.raises(ValueError, match="zero-shot"):
        build_prompt_ids(lm, T, demos, "x", max_tokens=3)


def test_generate_classify_with_stub_generator():
    seen = []

    def gen(prompts):
        seen.extend(prompts)
        return [encode(" Positive\nReview: more"), encode(" meh")]

    lm = toy_lm(generate_fn=gen)
    pred, texts = generate_classify(lm, T, POOL, LABELS, TESTS, IDX)
    assert pred.tolist() == [1, -1]
    assert texts[0].startswith(" Positive")
    assert seen[0] == encode(T.prompt([(POOL[0], 1), (POOL[1], 0)], TESTS[0]))


def test_parse_label():
    labels = ("negative", "positive", "very positive")
    assert parse_label("  very   positive!", labels) == 2
    assert parse_label("Negative.", labels) == 0
    assert parse_label("", labels) == -1
    assert parse_label("neutral", labels) == -1


def test_bad_arguments():
    lm = toy_lm()
    with pytest.raises(ValueError, match="span"):
        ppl_classify(lm, T, POOL, LABELS, TESTS, IDX, span="answer")
    with pytest.raises(ValueError, match="one row per test"):
        ppl_classify(lm, T, POOL, LABELS, TESTS, IDX[:1])
    with pytest.raises(ValueError, match="outside the pool"):
        ppl_classify(lm, T, POOL, LABELS, TESTS, [[0, 9], [1, 2]])
    with pytest.raises(ValueError, match="generate_fn"):
        generate_classify(lm, T, POOL, LABELS, TESTS, IDX)
