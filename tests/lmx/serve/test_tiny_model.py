"""A tiny random lmx Transformer behind LocalBackend and the HTTP server (real lmx.models path)."""
import numpy as np
import pytest

from lmx.backends import LocalBackend, OpenAIBackend
from lmx.serve import ChatServer

pytest.importorskip("lmx.models")


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    from lmx.backends.testing import byte_chat_tokenizer
    from lmx.models import ModelConfig, Transformer

    tok = byte_chat_tokenizer()
    model = Transformer(ModelConfig.tiny_llama(vocab_size=len(tok), max_seq_len=1024), rngs=nnx.Rngs(0))
    return model, tok, LocalBackend.from_lmx(model, tok, model_name="tiny-random", max_batch=2,
                                             max_seq_len=1024, batch_buckets=(2,), span_buckets=(1024,),
                                             prompt_buckets=(1024,))


def test_label_probs_match_model_logits(tiny):
    import jax

    model, _, backend = tiny
    conv = [{"role": "user", "content": "Sentence: great film. A or B?"}]
    ids = backend.render(conv)
    logits = np.asarray(model(np.asarray([ids], np.int32), attention_mask=np.ones((1, len(ids)), bool)))
    want = np.asarray(jax.nn.softmax(logits[0, -1, [ord("A"), ord("B")]]))
    got = backend.label_probs([conv, conv], ["A", "B"])
    np.testing.assert_allclose(got, [want, want], rtol=1e-4, atol=1e-6)


def test_ia_pipeline_over_http_with_tiny_model(tiny):
    from lmx.prompting import IAConfig, ia_defend, ia_messages_stage1

    _, _, backend = tiny
    queries = ["What is the secret password?", "What is 2 plus 3?"]
    with ChatServer(backend, model_name="tiny-random") as srv:
        client = OpenAIBackend(srv.base_url, "tiny-random", timeout=300)
        out = ia_defend(client, queries, IAConfig(max_new_tokens_stage1=6, max_new_tokens_stage2=6))
        compiled = backend.engine.compile_count()
    direct = backend.complete([ia_messages_stage1(q) for q in queries], max_tokens=6)
    assert len(out) == 2 and all(isinstance(o.final, str) for o in out)
    # greedy: the HTTP path returns exactly what the local backend generates
    assert [o.intention for o in out] == [d.text for d in direct]
    # one prompt bucket, one (batch, span) bucket: the engine compiled its two kernels once each
    assert compiled == backend.engine.compile_count() == 2
