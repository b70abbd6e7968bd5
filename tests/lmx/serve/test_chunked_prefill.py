"""Chunked prefill: a prompt longer than ``prefill_chunk`` is prefilled one chunk per engine
iteration, decode steps of running requests in between. Its text must equal a whole-prompt
prefill's, running streams must keep getting tokens meanwhile, and a cancel between chunks must
free the slot."""
import numpy as np
import pytest

pytest.importorskip("lmx.models")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lmx.serve.engine import Engine, GenRequest  # noqa: E402

# one worker builds the module's warmed-up engine, not both
pytestmark = pytest.mark.xdist_group("serve_chunked_engine")

# chunks of 16 tokens, one prefill call per iteration; spans 32/64/128 for the chunks' prefixes
KW = dict(n_slots=4, max_len=128, batch_buckets=(4,), span_buckets=(32, 64, 128),
          prompt_buckets=(16,), prefill_tokens_per_step=16)


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    from lmx.backends.testing import byte_chat_tokenizer
    from lmx.models import ModelConfig, Transformer

    tok = byte_chat_tokenizer()
    model = Transformer(ModelConfig.tiny_llama(vocab_size=len(tok), max_seq_len=128),
                        rngs=nnx.Rngs(3))
    enc = lambda s: list(tok.encode(s, add_special_tokens=False))  # noqa: E731
    long = [enc("Context: the river runs past the mill and the old bridge. Q: " + q)
            for q in ("where?", "what runs past the mill?")]  # 67 and 85 tokens: 5 and 6 chunks
    return model, tok, long, enc("Hi")


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok, *_ = tiny
    eng = Engine(model, tok, **KW)
    eng.warmup()
    yield eng
    eng.stop()


def test_chunk_defaults_and_bad_chunk(tiny):
    model, tok, *_ = tiny
    eng = Engine(model, tok, max_len=128, prompt_buckets=(16, 64, 128), prefill_tokens_per_step=100)
    assert eng.prefill_chunk == 64  # the largest prompt bucket within the per-step budget
    with pytest.raises(ValueError, match="prefill_chunk must be one of the prompt buckets"):
        Engine(model, tok, max_len=128, prompt_buckets=(16, 64), prefill_chunk=32)


@pytest.mark.slow  # the engine's warm-up and a reference generation: ~20 s on the 2-core VM
def test_long_prompts_match_a_whole_prefill_without_compiling(tiny, engine):
    from lmx.models import generate

    model, tok, long, _ = tiny
    assert all(len(p) > 3 * engine.prefill_chunk for p in long)  # longer than any prompt bucket
    ref = generate(model, long, max_new_tokens=6)
    compiled = engine.compile_count()
    got = [engine.submit(GenRequest(p, max_tokens=6, ignore_eos=True, top_logprobs=2))
           .result(timeout=300) for p in long]
    assert [text for text, _, _ in got] == [tok.decode(r) for r in ref]
    # the first reply token's log-prob equals the full-prompt forward's
    for p, (_, lps, _) in zip(long, got):
        logits = model(jnp.asarray([p], jnp.int32))[0, -1]
        want = jax.nn.log_softmax(logits)[int(np.argmax(logits))]
        assert abs(lps[0].logprob - float(want)) < 1e-4
    assert engine.compile_count() == compiled
    # a prompt that cannot fit the context with its max_tokens is still refused up front
    with pytest.raises(ValueError, match="exceeds the engine's context"):
        engine.submit(GenRequest(long[1], max_tokens=128 - len(long[1]) + 1))


@pytest.mark.slow
def test_running_streams_advance_between_chunks(tiny, engine):
    _, _, long, short = tiny
    finals = {}  # request -> decode steps the engine had run when it finished

    def rec(name):
        def on_event(ev):
            if ev.finish_reason is not None:
                finals[name] = engine.metrics.decode_steps
        return on_event

    steps0, cached0 = engine.metrics.decode_steps, engine.metrics.prompt_tokens_cached
    with engine._cv_lock:  # both queued before the loop's next iteration
        s_short = engine.submit(GenRequest(short, max_tokens=20, ignore_eos=True), rec("short"))
        s_long = engine.submit(GenRequest(long[0], max_tokens=2, ignore_eos=True), rec("long"))
    # with on_event the events go to the callback, not to result()'s queue
    assert s_long.done.wait(300) and s_short.done.wait(300)
    assert s_long.final.finish_reason == s_short.final.finish_reason == "length"
    cached = engine.metrics.prompt_tokens_cached - cached0  # a prefix reused from an older row
    n_chunks = -(-(len(long[0]) - cached) // engine.prefill_chunk)
    assert n_chunks >= 3
    # iteration 1 prefills the short prompt (it uses up the token budget) and decodes it; each
    # of the next n_chunks iterations prefills one chunk of the long prompt and decodes the
    # short one; the long reply's 2nd token comes from the decode step after its last chunk (a
    # whole-prompt prefill would have finished it at the 2nd decode step)
    assert finals["long"] - steps0 == n_chunks + 1
    assert finals["short"] - steps0 == 19 and s_short.final.completion_tokens == 20


@pytest.mark.slow
def test_cancel_between_chunks_frees_the_slot(tiny, engine):
    _, _, long, _ = tiny
    with engine._model_lock:  # the loop thread waits; this thread runs the iterations
        s = engine.submit(GenRequest(long[1], max_tokens=4, ignore_eos=True))
        engine._step()  # the first chunk
        (slot,) = engine._partial
        assert engine.metrics.running == 1 and slot not in engine._free
        # one chunk done (after a reused prefix of earlier tests' prompts), more to go
        done = engine._partial[slot][1]
        assert engine._row_len[slot] == done
        assert 0 < done < len(long[1]) - engine.prefill_chunk
        s.cancel()
        engine._step()
        assert not engine._partial and engine.metrics.running == 0
        assert sorted(engine._free) == list(range(engine.n_slots))
    assert s.result(timeout=60)[2].finish_reason == "cancelled"
