import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.models import ModelConfig, Transformer, generate, mean_token_nll, token_logprobs


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    cfg = (ModelConfig.tiny_llama(vocab_size=97) if request.param == "llama"
           else ModelConfig.tiny_gpt2(vocab_size=97))
    return Transformer(cfg, rngs=nnx.Rngs(0))


def test_logits_shape_dtype_and_hidden_consistency(model):
    toks = np.random.RandomState(0).randint(0, 97, (2, 9))
    logits = model(toks)
    assert logits.shape == (2, 9, 97) and logits.dtype == jnp.float32
    h = model.hidden_states(toks)
    np.testing.assert_allclose(h @ model.output_embedding(), logits, atol=1e-5)


def test_left_padding_matches_unpadded_rows(model):
    r = np.random.RandomState(1)
    a, b = r.randint(1, 97, 7), r.randint(1, 97, 4)
    toks = np.zeros((2, 7), np.int32)
    mask = np.zeros((2, 7), bool)
    toks[0], mask[0] = a, True
    toks[1, 3:], mask[1, 3:] = b, True
    batched = np.asarray(model(toks, attention_mask=mask))
    np.testing.assert_allclose(batched[0], np.asarray(model(a[None]))[0], atol=2e-5)
    np.testing.assert_allclose(batched[1, 3:], np.asarray(model(b[None]))[0], atol=2e-5)


def test_right_padding_matches_unpadded_rows(model):
    b = np.random.RandomState(2).randint(1, 97, 4)
    toks = np.zeros((1, 7), np.int32)
    toks[0, :4] = b
    mask = toks > 0
    np.testing.assert_allclose(np.asarray(model(toks, attention_mask=mask))[0, :4],
                               np.asarray(model(b[None]))[0], atol=2e-5)


def test_token_logprobs_match_log_softmax(model):
    toks = np.random.RandomState(3).randint(0, 97, (2, 6))
    mask = np.ones_like(toks, bool)
    mask[1, :2] = False
    lp = np.asarray(token_logprobs(model, toks, mask))
    ref = np.asarray(jax.nn.log_softmax(model(toks, attention_mask=mask), -1))
    expect = np.take_along_axis(ref[:, :-1], toks[:, 1:, None], -1)[..., 0]
    expect[1, :2] = 0.0
    np.testing.assert_allclose(lp, expect, atol=1e-5)
    assert float(mean_token_nll(model, toks, mask)) == pytest.approx(-lp.sum() / 8, rel=1e-5)


def test_scan_unroll_and_remat_do_not_change_logits(model):
    toks = np.random.RandomState(4).randint(0, 97, (2, 8))
    ref = np.asarray(model(toks))
    for change in (dict(scan_unroll=1), dict(scan_unroll=True, remat="full"), dict(remat="dots")):
        from lmx.models import with_config
        other = with_config(model, **change)
        np.testing.assert_allclose(np.asarray(other(toks)), ref, atol=1e-5)


def test_causal_block_skipping_equals_the_full_masked_attention(model):
    """Query blocks of 4 that skip the keys above the diagonal: same logits and gradients as one
    block over every key, with a left-padding mask and a length (13) that 4 does not divide
    (padded query positions see no key at all; their outputs are arbitrary either way and not
    compared)."""
    from lmx.models import with_config
    r = np.random.RandomState(5)
    toks = jnp.asarray(r.randint(0, 97, (2, 13)))
    mask = np.ones((2, 13), bool)
    mask[1, :4] = False
    mask = jnp.asarray(mask)

    @nnx.jit
    def logits_and_grads(m):
        def loss(m):
            lse = jax.nn.logsumexp(m(toks, attention_mask=mask), -1)
            return jnp.sum(jnp.where(mask, lse, 0.0))
        return m(toks, attention_mask=mask), nnx.grad(loss)(m)

    (l_whole, g_whole), (l_blocked, g_blocked) = (
        logits_and_grads(with_config(model, attn_q_block=b)) for b in (13, 4))
    np.testing.assert_allclose(np.asarray(l_blocked)[np.asarray(mask)],
                               np.asarray(l_whole)[np.asarray(mask)], atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_blocked)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_block_skipping_with_a_cached_prefix():
    """Queries after a prefix of cached keys (chunked prefill): blocks read the prefix and the
    chunk up to their last query; a prefix mask that differs per row still applies."""
    from lmx.models.transformer import _attend
    cfg = ModelConfig.tiny_llama(vocab_size=97)
    r = np.random.RandomState(6)
    P, T = 7, 10
    q = jnp.asarray(r.randn(2, T, cfg.n_heads, cfg.hd), jnp.float32)
    k, v = (jnp.asarray(r.randn(2, P + T, cfg.n_kv_heads, cfg.hd), jnp.float32) for _ in range(2))
    prefix = np.arange(P)[None, None] < np.array([7, 3])[:, None, None]
    allowed = jnp.asarray(np.concatenate([np.broadcast_to(prefix, (2, T, P)),
                                          np.broadcast_to(np.tril(np.ones((T, T), bool)), (2, T, T))], -1))
    attend = jax.jit(_attend, static_argnums=0)
    ref = attend(dataclasses.replace(cfg, attn_q_block=T), q, k, v, allowed)
    for block in (3, 4):
        out = attend(dataclasses.replace(cfg, attn_q_block=block), q, k, v, allowed)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@nnx.jit
def _last_logits(model, toks, mask, last):
    return model(toks, attention_mask=mask)[0, last]


def _greedy_by_recompute(model, prompt, n):
    """Full forward over the whole sequence at every step (one compile: fixed right-padded buffer)."""
    buf = np.zeros((1, 32), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        logits = _last_logits(model, jnp.asarray(buf), jnp.asarray(np.arange(32) < i)[None], i - 1)
        buf[0, i] = int(np.argmax(np.asarray(logits)))
    return buf[0, len(prompt):len(prompt) + n].tolist()


def test_kv_cache_greedy_equals_full_recompute(model):
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]
    out = generate(model, prompts, max_new_tokens=12)
    assert out == [_greedy_by_recompute(model, p, 12) for p in prompts]


def test_generation_and_scoring_unchanged_with_x64_enabled(model):
    # the gp package turns jax_enable_x64 on; LM code in the same process must keep working
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    toks = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    ref_out, ref_lp = generate(model, prompts, max_new_tokens=6), token_logprobs(model, toks)
    with jax.enable_x64(True):
        out, lp = generate(model, prompts, max_new_tokens=6), token_logprobs(model, toks)
    assert out == ref_out
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), rtol=1e-6, atol=1e-6)


def test_generation_stops_and_samples_reproducibly(model):
    prompts = [[5, 6, 7], [8, 9]]
    greedy = generate(model, prompts, max_new_tokens=8)
    stop = greedy[0][2]
    cut = generate(model, prompts, max_new_tokens=8, stop_tokens=[stop])
    assert cut[0] == greedy[0][:greedy[0].index(stop)]
    s1 = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    s2 = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert s1 == s2 and all(len(r) == 8 for r in s1)
    top1 = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_k=1, seed=7)
    assert top1 == greedy


def test_top_p_keeps_only_the_nucleus():
    from lmx.models import sample_logits

    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(sample_logits(logits, jax.random.PRNGKey(i), 1.0, 0, 0.8)[0]) for i in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize("bad,err", [
    (dict(tokens=np.zeros((2, 3, 1), np.int32)), ValueError),
    (dict(tokens=np.zeros((2, 3), np.float32)), TypeError),
    (dict(tokens=np.full((2, 3), 97, np.int32)), ValueError),
    (dict(tokens=np.full((2, 3), -1, np.int32)), ValueError),
    (dict(tokens=np.zeros((0, 3), np.int32)), ValueError),
    (dict(tokens=np.zeros((2, 3), np.int32), attention_mask=np.ones((2, 4), bool)), ValueError),
    (dict(tokens=np.zeros((2, 3), np.int32), attention_mask=np.ones((2, 3), np.float32)), TypeError),
    (dict(tokens=np.zeros((1, 300), np.int32)), ValueError),
])
def test_bad_inputs_raise_clear_errors(model, bad, err):
    bad = dict(bad)
    tokens = bad.pop("tokens")
    with pytest.raises(err, match="tokens|attention_mask|max_seq_len"):
        model(tokens, **bad)


@pytest.mark.parametrize("kw,err", [
    (dict(prompts=[]), ValueError), (dict(prompts=[[]]), ValueError), (dict(prompts=[[1.5]]), TypeError),
    (dict(prompts=[[1000]]), ValueError), (dict(prompts=[[1]], max_new_tokens=0), ValueError),
    (dict(prompts=[[1]], temperature=-1.0), ValueError), (dict(prompts=[[1]], top_p=0.0), ValueError),
    (dict(prompts=[[1]], max_new_tokens=1000), ValueError),
])
def test_generate_rejects_bad_arguments(model, kw, err):
    kw = dict(kw)
    kw.setdefault("max_new_tokens", 4)
    with pytest.raises(err):
        generate(model, **kw)


def test_config_validation():
    with pytest.raises(ValueError, match="attn_q_block"):
        ModelConfig.tiny_llama(attn_q_block=0)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig.tiny_llama(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="bert")
    with pytest.raises(TypeError, match="ModelConfig"):
        Transformer({"arch": "llama"}, rngs=nnx.Rngs(0))


def test_flops_accounting_for_smollm2():
    # Hand count: 30 layers x 3,538,944 matmul params + 576 x 49152 lm_head = 134,479,872; at
    # T = 2048, 6 * N_mm + 6 * L * T * H * hd (causal half of the dense attention) = 1.019 GFLOP.
    cfg = ModelConfig.smollm2_135m()
    assert cfg.matmul_params() == 134_479_872
    assert cfg.train_flops_per_token(2048) == pytest.approx(1.019e9, rel=2e-3)


def test_bf16_compute_keeps_f32_logits():
    cfg = dataclasses.replace(ModelConfig.tiny_llama(vocab_size=97), compute_dtype="bfloat16")
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = np.random.RandomState(0).randint(0, 97, (2, 8))
    logits = m(toks)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    ref = Transformer(dataclasses.replace(cfg, compute_dtype="float32"), rngs=nnx.Rngs(0))(toks)
    assert float(jnp.abs(logits - ref).max()) < 0.05
