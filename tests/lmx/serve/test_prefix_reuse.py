"""Prefix reuse: a joining request copies the K/V of a prompt prefix another cache row holds and
prefills only the rest; the text must equal a full prefill's (greedy and seeded)."""
import numpy as np
import pytest

pytest.importorskip("lmx.models")
import jax.numpy as jnp  # noqa: E402

from lmx.serve.engine import Engine, GenRequest  # noqa: E402

# 3 kernel variants per engine: decode (4 rows, 64 columns), prefill chunks of 1 and 4 x 32 tokens
KW = dict(n_slots=4, max_len=64, batch_buckets=(4,), span_buckets=(64,), prompt_buckets=(32,),
          prefill_tokens_per_step=128)


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx

    from lmx.backends.testing import byte_chat_tokenizer
    from lmx.models import ModelConfig, Transformer

    tok = byte_chat_tokenizer()
    model = Transformer(ModelConfig.tiny_llama(vocab_size=len(tok), max_seq_len=128),
                        rngs=nnx.Rngs(1))
    prompts = [list(tok.encode("You are terse. Answer: " + q, add_special_tokens=False))
               for q in ("ab", "abab ab?", "c")]
    return model, tok, prompts


@pytest.fixture(scope="module")
def ref(tiny):
    """Greedy replies of ``lmx.models.generate`` (full prompts, no engine)."""
    from lmx.models import generate

    model, tok, prompts = tiny
    return [tok.decode(r) for r in generate(model, prompts, max_new_tokens=8)]


@pytest.fixture(scope="module")
def engines(tiny):
    model, tok, _ = tiny
    eng, plain = Engine(model, tok, **KW), Engine(model, tok, prefix_reuse=False, **KW)
    yield eng, plain
    eng.stop()
    plain.stop()


def _text(engine, req):
    return engine.submit(req).result(timeout=300)[0]


@pytest.mark.slow  # two engines' kernels and a reference: 40-55 s on the loaded 2-core VM
def test_reused_prefix_gives_the_text_of_a_full_prefill(tiny, engines, ref):
    prompts = tiny[2]
    eng, plain = engines
    # one after another: each later prompt finds the shared prefix in a freed row
    assert [_text(eng, GenRequest(p, max_tokens=8, ignore_eos=True)) for p in prompts] == ref
    shared = 23  # "You are terse. Answer: "
    # the 2nd prompt shares "...Answer: ab" (25 tokens) with the 1st, the 3rd the 23 shared
    assert eng.metrics.prompt_tokens_cached == (shared + 2) + shared
    # while a long request runs in slot 0, the next joins slot 1 and copies slot 0's prefix
    long = eng.submit(GenRequest(prompts[0], max_tokens=30, ignore_eos=True))
    while eng.metrics.running == 0:
        pass
    before = eng.metrics.prompt_tokens_cached
    assert _text(eng, GenRequest(prompts[2], max_tokens=8, ignore_eos=True)) == ref[2]
    assert eng.metrics.prompt_tokens_cached - before == shared
    long.result(timeout=300)
    # seeded sampling: the same text with a reused prefix, alone or among joins
    req = GenRequest(prompts[1], max_tokens=8, temperature=0.9, top_p=0.9, seed=5)
    alone = _text(plain, req)
    with eng._cv_lock:  # every request joins in the same iteration
        streams = [eng.submit(r) for r in
                   (req, GenRequest(prompts[0], max_tokens=8, ignore_eos=True), req)]
    assert [s.result(timeout=300)[0] for s in streams] == [alone, ref[0], alone]
    assert plain.metrics.prompt_tokens_cached == 0


@pytest.mark.slow  # a third engine's kernels: ~15 s more
def test_a_freed_row_keeps_its_prefix_while_idle_in_decode_steps(tiny, ref):
    """Idle rows of a decode batch write past their valid K/V (column 0 would corrupt a cached
    prefix that the next request in that slot reuses)."""
    model, tok, prompts = tiny
    eng = Engine(model, tok, **KW)  # fresh rows: slot 0's is the only copy of the prefix
    try:
        with eng._cv_lock:  # both join in one iteration: slots 0 and 1
            a = eng.submit(GenRequest(prompts[0], max_tokens=2, ignore_eos=True))
            b = eng.submit(GenRequest(prompts[2], max_tokens=20, ignore_eos=True))
        a.result(timeout=300)
        b.result(timeout=300)  # slot 0 sat idle in 18 decode steps of slot 1
        # slot 0 still holds the K of a's prompt (the engine is idle: reading its cache is safe)
        _, (k, _) = model.forward(jnp.asarray([prompts[0]]), collect_kv=True)
        n = len(prompts[0])
        np.testing.assert_allclose(np.asarray(eng._ck[:, 0, :n]), np.asarray(k[:, 0]), atol=1e-5)
        out = _text(eng, GenRequest(prompts[1], max_tokens=8, ignore_eos=True))
        assert eng.metrics.prompt_tokens_cached == 25  # slot 0's "...Answer: ab"
        assert out == ref[1]
    finally:
        eng.stop()


def test_prefix_reuse_flag_is_checked(tiny):
    model, tok, _ = tiny
    with pytest.raises(TypeError, match="prefix_reuse must be a bool"):
        Engine(model, tok, prefix_reuse="yes", **KW)


def test_prefix_sources_skip_rows_overwritten_in_the_same_iteration(tiny):
    """A joining request never copies from a row that another join of the same iteration
    overwrites (prefill calls run in an order the grouping decides); its own row is fine."""
    model, tok, _ = tiny
    eng = Engine(model, tok, **KW)  # never started: host-side bookkeeping only
    x = list(range(10, 40))
    eng._row_ids[1, :30], eng._row_len[1] = x, 30  # a freed row holding x
    eng._row_ids[0, :12], eng._row_len[0] = x[:12], 12  # a running row sharing 12 tokens
    prompt = x[:25] + [5, 6]
    assert eng._cached_prefix(prompt, 2, {1, 2}) == (12, 0)  # row 1 is another join's target
    assert eng._cached_prefix(prompt, 2, {2}) == (25, 1)
    assert eng._cached_prefix(prompt, 1, {1, 2}) == (25, 1)  # its own row: nothing to copy
    assert eng._cached_prefix(x, 3, {3}) == (29, 1)  # one prompt token is always computed
    off = Engine(model, tok, prefix_reuse=False, **KW)
    off._row_ids[1, :30], off._row_len[1] = x, 30
    assert off._cached_prefix(prompt, 2, {2}) == (0, 2)
    # at most the smallest span bucket (the prefill kernel reads that many prefix columns)
    short = Engine(model, tok, **dict(KW, span_buckets=(16, 64)))
    short._row_ids[1, :30], short._row_len[1] = x, 30
    assert short.prefix_span == 16 and short._cached_prefix(prompt, 2, {2}) == (16, 1)
