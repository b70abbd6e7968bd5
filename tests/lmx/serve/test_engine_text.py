"""Host-side text handling of the engines (no JAX): incremental detokenisation, UTF-8 and stop
strings held back while streaming, cancellation of queued requests, request validation."""
import pytest

from lmx.backends.testing import ScriptedTokenModel, byte_chat_tokenizer
from lmx.serve.engine import FunctionEngine, GenRequest


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def _engine(tok, reply):
    tm = ScriptedTokenModel(tok, lambda msgs: reply)
    return FunctionEngine(tm.generate_fn, tok, max_len=400, vocab_size=len(tok),
                          stop_token_ids=[tok.eos_token_id], logprobs_fn=tm.logprobs_fn)


def _prompt(tok, text="q"):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=False)


def test_streamed_pieces_never_split_utf8_or_leak_a_stop_prefix(tok):
    reply = "héllo wörld 🙂 STOP tail"
    eng = _engine(tok, reply)
    ids = tok.encode(_prompt(tok), add_special_tokens=False)
    events = list(eng.submit(GenRequest(ids, max_tokens=100, stop=("STOP",), top_logprobs=1)))
    pieces = [e.text for e in events]
    assert "".join(pieces) == "héllo wörld 🙂 "
    assert all("\ufffd" not in p and "S" not in p for p in pieces)
    assert len(pieces) > 5  # streamed piece by piece, not in one lump
    final = events[-1]
    assert final.finish_reason == "stop"
    # every generated token (bytes of the reply up to the stop) has a log-prob entry
    assert sum(len(e.logprobs) for e in events) == len("héllo wörld 🙂 STOP".encode())
    eng.stop()


def test_max_tokens_cut_and_counts(tok):
    eng = _engine(tok, "abcdef")
    ids = tok.encode(_prompt(tok), add_special_tokens=False)
    text, _, final = eng.submit(GenRequest(ids, max_tokens=4)).result(timeout=30)
    assert (text, final.finish_reason, final.completion_tokens) == ("abcd", "length", 4)
    text, _, final = eng.submit(GenRequest(ids, max_tokens=50)).result(timeout=30)
    assert (text, final.finish_reason, final.completion_tokens) == ("abcdef", "stop", 7)  # + EOS
    eng.stop()


@pytest.mark.parametrize("field, value, match", [
    ("prompt", [], "prompt must be a non-empty"),
    ("prompt", [10 ** 6], "outside"),
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", 399, "exceeds"),
    ("temperature", 2.5, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_k", -1, "top_k"),
    ("seed", 2 ** 64, "seed"),
    ("top_logprobs", 21, "top_logprobs"),
    ("stop", ("",), "stop"),
])
def test_bad_requests_raise_naming_the_field(tok, field, value, match):
    eng = _engine(tok, "x")
    kw = {"prompt": [1, 2, 3], field: value}
    with pytest.raises(ValueError, match=match):
        eng.submit(GenRequest(**kw))
