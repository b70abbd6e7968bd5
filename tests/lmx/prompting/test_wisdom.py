"""WisdoM: fusion rule on the demo vector and invariants, prompts byte for byte, image messages."""
import numpy as np
import pytest

from lmx.backends.testing import ScriptedBackend
from lmx.prompting import (
    classification_prompt,
    context_messages,
    contextual_fusion,
    tune_fusion,
    wisdom_context_prompt,
    wisdom_predict,
)


def test_demo_vector():
    p = np.array([0.363, 0.592, 0.045])
    q = np.array([0.712, 0.258, 0.030])
    fused, hard = contextual_fusion(p, q, 0.3, 0.4)
    np.testing.assert_allclose(fused, [0.5026, 0.4584, 0.039], atol=1e-3)
    assert bool(hard) and int(np.argmax(p)) == 1 and int(np.argmax(fused)) == 0


def test_fusion_invariants():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=200).astype(np.float32)
    q = rng.dirichlet(np.ones(3), size=200).astype(np.float32)
    srt = np.sort(p, axis=1)
    # the demo's 2*max + min - 1 equals top1 - top2 for 3 classes on the simplex
    np.testing.assert_allclose(2 * p.max(1) + p.min(1) - 1, srt[:, 2] - srt[:, 1], atol=1e-6)
    # the rule keeps p only when margin > tau, and margins lie in [0, 1]: tau < 0 always keeps p,
    # tau >= 1 always fuses (the official code's strict '>' rule)
    np.testing.assert_allclose(contextual_fusion(p, q, -0.1, 0.7)[0], p)
    np.testing.assert_allclose(contextual_fusion(p, q, 1.0, 1.0)[0], q, atol=1e-6)
    np.testing.assert_allclose(contextual_fusion(p, q, 0.5, 0.0)[0], p)          # lam 0: identity
    fused, hard = contextual_fusion(p, q, 0.3, 0.6)
    np.testing.assert_allclose(np.asarray(fused).sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(hard, (srt[:, 2] - srt[:, 1]) <= 0.3)
    # a margin exactly at tau fuses (strict ">" keeps p); 4 classes use top1 - top2
    tie = np.array([[0.5, 0.25, 0.25, 0.0]], np.float32)
    assert bool(contextual_fusion(tie, np.full((1, 4), 0.25, np.float32), 0.25, 0.5)[1][0])
    with pytest.raises(ValueError, match="share a shape"):
        contextual_fusion(p, q[:, :2], 0.3, 0.4)
    best = tune_fusion(p, q, q.argmax(1), [-0.1, 1.0], [0.0, 1.0])
    assert best == {"tau": 1.0, "lam": 1.0, "accuracy": 1.0}


def test_prompts_byte_for_byte():
    assert wisdom_context_prompt("Boston strong!") == (
        'Give you an image and sentence, you can provide historical context, important events, and '
        'relevant background information related to the image and sentence. Sentence: "Boston strong!"')
    assert classification_prompt("fun film", ("positive", "negative")) == (
        'Sentence: "fun film". Question: according to the sentence, what is the sentiment polarity? '
        'Choose from the following options:\nA).positive\nB).negative\n\nAnswer: ')
    assert classification_prompt("fun film", ("positive", "negative"), "CTX", with_image=True) == (
        'Sentence: "fun film". Context: "CTX". Using the context as a textual aids to help you answer '
        'the question. Use the image as a visual aids to help you answer the question. Question: '
        'according to the image and sentence, what is the sentiment polarity? Choose from the '
        'following options:\nA).positive\nB).negative\n\nAnswer: ')
    assert classification_prompt("Go Boston", aspect="Boston", with_image=True, context="C") == (
        'Sentence: "Go Boston". Context: "C".\nUse the image as a visual aids to help you answer the '
        'question.\nWhat is the sentiment polarity of the aspect "Boston" in the sentence?\n'
        'A). positive\nB). neutral\nC). negative\n'
        "Answer with the option's letter from the given choices directly.")
    img = context_messages("s", "data:image/png;base64,AAA")
    assert img == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
        {"type": "text", "text": wisdom_context_prompt("s")}]}]
    assert context_messages("s")[0]["content"].startswith("Give you a sentence, you can provide")
    with pytest.raises(ValueError, match="unknown template_id"):
        wisdom_context_prompt("s", "nope")


def test_wisdom_predict_with_images_on_a_vision_backend():
    def probs(conv, labels):
        text = conv[0]["content"][-1]["text"]
        assert conv[0]["content"][0]["type"] == "image_url"
        return [0.45, 0.55] if "Context" not in text else [0.9, 0.1]

    sb = ScriptedBackend(lambda conv: "Background: a sunny day.", probs)
    out = wisdom_predict(sb, ["a", "b"], options=("positive", "negative"),
                         images=["http://127.0.0.1/x.png", "data:image/png;base64,AA"], tau=0.3, lam=0.5)
    np.testing.assert_allclose(out.fused, [[0.675, 0.325]] * 2, atol=1e-6)
    assert out.pred.tolist() == [0, 0] and out.hard.tolist() == [True, True]
    assert out.contexts == ("Background: a sunny day.",) * 2
    ctx_call = sb.calls[0]
    assert ctx_call[0][0]["content"][1]["text"].startswith("Give you an image and sentence")
