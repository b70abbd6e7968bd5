"""Batched prefill: several joining prompts in one call give the same tokens as one at a time."""
import pytest

pytest.importorskip("lmx.models")

from lmx.serve.engine import Engine, GenRequest  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    from lmx.backends.testing import byte_chat_tokenizer
    from lmx.models import ModelConfig, Transformer

    tok = byte_chat_tokenizer()
    model = Transformer(ModelConfig.tiny_llama(vocab_size=len(tok), max_seq_len=128),
                        rngs=nnx.Rngs(1))
    return model, tok


def _run_together(engine, reqs):
    # hold the queue lock while submitting, so the loop sees every request in one iteration
    with engine._cv_lock:
        streams = [engine.submit(r) for r in reqs]
    out = [s.result(timeout=300) for s in streams]
    engine.stop()
    return out


@pytest.mark.slow  # compiles two engines' kernels: ~50 s on the loaded 2-core VM
def test_batched_prefill_matches_one_prompt_per_call_and_generate(tiny):
    from lmx.models import generate

    model, tok = tiny
    prompts = [list(tok.encode("ab " * k + "?", add_special_tokens=False)) for k in (1, 3, 5, 2, 7)]
    reqs = [GenRequest(p, max_tokens=10, ignore_eos=True) for p in prompts]
    reqs += [GenRequest(prompts[1], max_tokens=10, temperature=0.9, top_p=0.8, seed=7),
             GenRequest(prompts[3], max_tokens=10, temperature=1.3, top_k=5, seed=-3)]
    kw = dict(n_slots=8, max_len=64, batch_buckets=(8,), span_buckets=(64,),
              prompt_buckets=(32,), prefill_tokens_per_step=256)
    single = Engine(model, tok, prefill_batch_buckets=(1,), **kw)
    batched = Engine(model, tok, prefill_batch_buckets=(1, 2, 4), **kw)
    assert batched.prefill_shapes == {32: (1, 2, 4)}
    a = _run_together(single, reqs)
    b = _run_together(batched, reqs)
    assert single.metrics.prefills == 7
    assert batched.metrics.prefills == 3  # 7 joining prompts -> calls of 4, 2 and 1
    assert [x[0] for x in b] == [x[0] for x in a]
    assert all(x[2].completion_tokens == 10 for x in b)
    ref = generate(model, prompts, max_new_tokens=10)
    assert [x[0] for x in b[:5]] == [tok.decode(r) for r in ref]


def test_prefill_batch_shapes_follow_the_token_budget(tiny):
    model, tok = tiny
    eng = Engine(model, tok, n_slots=16, max_len=128, batch_buckets=(16,), span_buckets=(128,),
                 prompt_buckets=(32, 128), prefill_tokens_per_step=256)
    # default batch sizes 1, 4, 16; P * T within the 256-token budget, and always 1
    assert eng.prefill_shapes == {32: (1, 4), 128: (1,)}
    with pytest.raises(ValueError, match="prefill_batch_buckets must hold 1"):
        Engine(model, tok, n_slots=4, max_len=128, prefill_batch_buckets=(2, 4))
    with pytest.raises(ValueError, match="prefill_tokens_per_step"):
        Engine(model, tok, n_slots=4, max_len=128, prefill_tokens_per_step=0)
