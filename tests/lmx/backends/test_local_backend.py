"""LocalBackend: chat template, batching, stop handling, validation, label probabilities."""
import numpy as np
import pytest

from lmx.backends import LocalBackend, PromptTooLongError, restricted_softmax
from lmx.backends.base import SamplingParams, cut_at_stop, validate_conversations
from lmx.backends.testing import (
    ScriptedBackend,
    ScriptedTokenModel,
    byte_chat_tokenizer,
    parse_chatml,
)


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def _backend(tok, reply=lambda m: "ok " + m[-1]["content"], **kw):
    tm = ScriptedTokenModel(tok, reply)
    return LocalBackend(tok, tm.generate_fn, tm.logprobs_fn, max_seq_len=kw.pop("max_seq_len", 200),
                        **kw), tm


def test_byte_tokenizer_roundtrip_and_chat_template(tok):
    s = "héllo <wörld>\n\t'''quotes''' 🙂"
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == s and max(ids) < 256
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                    "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert parse_chatml(text) == msgs
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [tok.eos_token_id]


def test_batched_complete_stop_and_length(tok):
    b, tm = _backend(tok, max_batch=2)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    outs = b.complete(convs, max_tokens=20)
    assert [o.text for o in outs] == [f"ok q{i}" for i in range(5)]
    assert tm.calls == [2, 2, 1]  # max_batch respected
    assert all(o.finish_reason == "stop" and o.completion_tokens == 6 for o in outs)  # 5 + stop
    short = b.complete(convs[:1], max_tokens=3)[0]
    assert (short.text, short.finish_reason, short.truncated) == ("ok ", "length", True)
    cut = b.complete(convs[:1], max_tokens=20, stop=[" q"])[0]
    assert (cut.text, cut.finish_reason) == ("ok", "stop")
    assert b.chat(convs[:2], max_tokens=20) == ["ok q0", "ok q1"]


def test_validation_errors_name_the_problem(tok):
    b, tm = _backend(tok, max_seq_len=60)
    with pytest.raises(ValueError, match=r"conversations\[0\]\[0\]\['role'\]"):
        b.chat([[{"role": "bot", "content": "x"}]])
    with pytest.raises(TypeError, match="conversations must be a list"):
        b.chat("hello")
    with pytest.raises(ValueError, match="temperature must be in"):
        b.chat([[{"role": "user", "content": "x"}]], temperature=3.0)
    with pytest.raises(ValueError, match="text-only"):
        b.chat([[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]])
    with pytest.raises(PromptTooLongError, match=r"conversations\[1\] renders to \d+ prompt tokens"):
        b.chat([[{"role": "user", "content": "x"}], [{"role": "user", "content": "y" * 80}]], max_tokens=4)
    assert tm.calls == []  # nothing reached the model


def test_label_probs_first_token_softmax(tok):
    b, _ = _backend(tok, reply=lambda m: "B) because")
    p = b.label_probs([[{"role": "user", "content": "x"}]] * 2, ["A", "B", "C"])
    e = np.exp(3.0)
    np.testing.assert_allclose(p, [[1 / (e + 2), e / (e + 2), 1 / (e + 2)]] * 2, rtol=1e-5)
    with pytest.raises(ValueError, match="distinct first tokens"):
        b.label_probs([[{"role": "user", "content": "x"}]], ["Apple", "Avocado"])


def test_helpers():
    assert cut_at_stop("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    p = restricted_softmax(np.array([[0.0, np.log(3.0), -np.inf], [-np.inf, -np.inf, -np.inf]]))
    np.testing.assert_allclose(p, [[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="stop holds at most 4"):
        SamplingParams(stop=("a", "b", "c", "d", "e"))
    validate_conversations([[{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]])


def test_scripted_backend_records_calls():
    sb = ScriptedBackend(lambda c: "one two three four", lambda c, labels: [1.0, 3.0])
    out = sb.complete([[{"role": "user", "content": "x"}]], max_tokens=2)[0]
    assert (out.text, out.finish_reason) == ("one two", "length")
    np.testing.assert_allclose(sb.label_probs([[{"role": "user", "content": "x"}]], ["A", "B"]), [[0.25, 0.75]])
    assert len(sb.calls) == 2
