"""IAPrompt harness, POMP and WisdoM end to end over real HTTP against lmx.serve on 127.0.0.1.

The server runs a LocalBackend over a scripted token model (exact replies through the chat
template, tokenizer, batching worker and JSON layer); the random-weights lmx model path is covered
in tests/lmx/serve/test_tiny_model.py.
"""
import numpy as np
import pytest
from prompting_helpers import gullible, sentences

from lmx.backends import BackendError, LocalBackend, OpenAIBackend
from lmx.backends.testing import (
    ScriptedBackend,
    ScriptedTokenModel,
    byte_chat_tokenizer,
)
from lmx.prompting import POMPConfig, POMPState, ReferenceScorer, pomp, wisdom_predict
from lmx.prompting import secret_task as st
from lmx.prompting.cipher import make_task, toy_refine
from lmx.serve import ChatServer

TASK = make_task(sentences(14), seed=3)


def _reply(msgs):
    user = msgs[-1]["content"]
    if "<Refined translation>:" in user:
        return toy_refine(user, TASK.lexicon) + "\nextra line"
    if user.startswith("Give you a sentence"):
        return "It is a review of a film."
    if user.startswith("Sentence:"):
        return "B" if "Context" in user else "A"
    return gullible(msgs)


@pytest.fixture(scope="module")
def client():
    tok = byte_chat_tokenizer()
    tm = ScriptedTokenModel(tok, _reply, peak=1.0)
    backend = LocalBackend(tok, tm.generate_fn, tm.logprobs_fn, max_seq_len=8192, model_name="scripted")
    with ChatServer(backend, max_batch=16) as srv:
        yield OpenAIBackend(srv.base_url, "scripted", timeout=30, max_workers=8)


def test_secret_harness_over_http(client):
    cases = st.make_cases(st.make_secrets(2), ["direct", "dan", "spell"])
    none = st.evaluate(client, cases, defense="none", benign=st.BENIGN[:1])
    ia = st.evaluate(client, cases, defense="ia_two_stage", benign=st.BENIGN[:1])
    assert (none["leak_rate"], ia["leak_rate"]) == (1.0, 0.0)
    assert none["helpfulness"] == ia["helpfulness"] == 1.0
    assert ia["outputs"][0]["intention"].startswith("The essential intention")
    assert ia["outputs"][0]["final"] == "I'm sorry, I cannot share that."


def test_pomp_over_http_matches_in_process(client):
    cfg = POMPConfig(lrl=TASK.lrl, names=TASK.names, demos=TASK.examples[:2], max_tokens=200)
    local = ScriptedBackend(lambda c: toy_refine(c[-1]["content"], TASK.lexicon))
    runs = []
    for backend in (client, local):
        state = pomp.pomp_train(backend, TASK.examples[2:8], POMPState.from_similarity(TASK.similarity),
                                cfg, ReferenceScorer(), batch_size=3, seed=1)
        out = pomp.pomp_infer(backend, TASK.examples[8:], state.last_graph, cfg, pomp.ConsensusScorer())
        runs.append((state.probs(), [o.output for o in out]))
    assert runs[0][1] == runs[1][1] and len(runs[0][1]) == 6
    assert runs[0][0] == pytest.approx(runs[1][0])
    assert all(o.split() and "extra line" not in o for o in runs[0][1])  # first line parsed


def test_wisdom_over_http_text_only_and_image_rejected(client):
    out = wisdom_predict(client, ["a fine film", "dull"], options=("positive", "negative"), tau=1.0,
                         lam=0.9, context_kwargs={"max_tokens": 32})
    assert out.contexts == ("It is a review of a film.",) * 2
    # first-token probs over HTTP: the scripted letter is the top token and the other letter is
    # outside the top-20 logprobs (flat distribution), so p = onehot(A), q = onehot(B)
    np.testing.assert_allclose(out.p, [[1.0, 0.0]] * 2)
    np.testing.assert_allclose(out.q, [[0.0, 1.0]] * 2)
    # margin 1.0 is not > tau = 1.0: fuse with lam = 0.9
    np.testing.assert_allclose(out.fused, [[0.1, 0.9]] * 2, atol=1e-6)
    assert out.hard.tolist() == [True, True] and out.pred.tolist() == [1, 1]
    with pytest.raises(BackendError, match="400.*text-only"):
        wisdom_predict(client, ["x"], options=("positive", "negative"), images=["data:image/png;base64,AA"])
