"""Slot-wise KV-cache kernels for continuous batching: batched prefill / extend and one decode step.

A serving engine keeps one KV cache of ``n_slots`` rows (``[L, n_slots, S_max, Hkv, hd]``); each
running request owns one row (a *slot*) and its tokens sit at columns ``0 .. len-1`` of it, so a
row's position id equals its column. Requests join (``extend_slots`` writes prompts into free
rows, optionally after a prefix copied from another row) and leave (the row is simply reused)
between decode steps; ``decode_slots`` advances every row of the first ``batch`` slots by one
token, attending to the first ``span`` columns only. Only
``batch``, ``span`` and the chunk shape ``[P, T]`` are shapes (static); everything that varies
per request -- temperature, top-k, top-p, PRNG key, token index -- is an array, so a warmed-up
engine never recompiles whatever the request mix (continuous batching as in Yu et al. 2022, Orca,
OSDI'22, "iteration-level scheduling"; slot-wise KV memory as in Kwon et al. 2023, vLLM,
arXiv:2309.06180, Sec. 4, here with one contiguous block per request).

Sampling (:func:`sample_rows`) is row-independent: row ``b`` draws with the key
``fold_in(fold_in(key_b, stream_b), counter_b)`` -- ``key_b`` from the request's seed, ``stream_b``
its choice index (``n > 1``), ``counter_b`` the index of the token within the reply -- so a
seeded request yields the same tokens whatever else shares the batch. Top-k / nucleus filtering
(Holtzman et al. 2020, arXiv:1904.09751, Sec. 3.1) keeps, per row, the smallest prefix of the
sorted distribution whose mass reaches ``top_p`` (the first token always stays) among the ``top_k``
most likely ones; the sort runs only when some row asks for it (``lax.cond``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lmx.models import transformer as tr
from lmx.models.transformer import Transformer

#: number of alternatives :func:`token_logprobs` returns per row (OpenAI's top_logprobs maximum)
MAX_TOP_LOGPROBS = 20


def seed_to_key(seed: int) -> np.ndarray:
    """uint32[2] threefry key of an integer seed in ``[-2**63, 2**64)`` (negatives wrap mod 2**64).

    The same words ``jax.random.PRNGKey`` builds from a 64-bit seed: (high 32 bits, low 32 bits).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {seed}")
    seed %= 1 << 64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def _filter_top_k_top_p(x, top_k, top_p):
    """Set to -inf every logit outside the row's top-k and outside its top-p nucleus. x [B, V]."""
    V = x.shape[-1]
    srt = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    probs = jax.nn.softmax(jnp.where(jnp.arange(V)[None] < k[:, None], srt, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < top_p[:, None], axis=-1)
    # top_p = 1 keeps all k: the running sum may round to 1 before the last tokens
    n_keep = jnp.where(top_p >= 1.0, k, jnp.clip(n_keep, 1, k))
    thr = jnp.take_along_axis(srt, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(x >= thr, x, -jnp.inf)


def sample_rows(logits, temperature, top_k, top_p, keys, streams, counters):
    """One token per row of f32 ``logits`` [B, V] with per-row settings (all arrays of length B).

    temperature f32 (0 = greedy), top_k int32 (0 = off), top_p f32 in (0, 1], keys uint32 [B, 2],
    streams/counters int32. Gumbel-max draw: ``argmax(logits / T + g)``, ``g ~ Gumbel(0, 1)`` from
    the row's own key, so no row's draw depends on another row.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = temperature > 0

    def draw(_):
        x = logits / jnp.where(hot, temperature, 1.0)[:, None]
        need = jnp.any(hot & ((top_k > 0) | (top_p < 1.0)))
        x = jax.lax.cond(need, lambda y: _filter_top_k_top_p(y, top_k, top_p), lambda y: y, x)
        row_keys = jax.vmap(lambda k, s, c: jax.random.fold_in(jax.random.fold_in(k, s), c))(
            keys, streams, counters)
        g = jax.vmap(lambda k: jax.random.gumbel(k, (x.shape[-1],), jnp.float32))(row_keys)
        return jnp.where(hot, jnp.argmax(x + g, axis=-1).astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(hot), draw, lambda _: greedy, None)


def token_logprobs(logits, tokens, want):
    """Log-probs of the model's raw next-token distribution (before temperature / filtering).

    Returns (logprob of ``tokens`` [B], ids [B, 20], log-probs [B, 20] of the 20 most likely
    tokens); computed only when ``want`` (a bool scalar) is true, zeros otherwise.
    """
    B = logits.shape[0]

    def compute(_):
        lp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_id = jax.lax.top_k(lp, MAX_TOP_LOGPROBS)
        return (jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], top_id.astype(jnp.int32),
                top_lp)

    def skip(_):
        return (jnp.zeros((B,), jnp.float32), jnp.zeros((B, MAX_TOP_LOGPROBS), jnp.int32),
                jnp.zeros((B, MAX_TOP_LOGPROBS), jnp.float32))

    return jax.lax.cond(want, compute, skip, None)


def init_slot_cache(model: Transformer, n_slots: int, max_len: int):
    """Zero K and V caches ``[L, n_slots, max_len, Hkv, hd]`` in the model's compute dtype."""
    cfg = model.cfg
    shape = (cfg.n_layers, n_slots, max_len, cfg.n_kv_heads, cfg.hd)
    dt = cfg.dtype_of_compute()
    return jnp.zeros(shape, dt), jnp.zeros(shape, dt)


def extend_slots(model: Transformer, cache_k, cache_v, tokens, starts, lengths, slots, sources,
                 sampling, want_lp, *, span: int):
    """Append ``P`` right-padded token chunks to cache rows and sample each row's next token.

    Row ``i`` takes the K/V of columns ``0 .. starts[i]-1`` from cache row ``sources[i]`` (a prefix
    computed earlier: prefix caching as in Kwon et al. 2023, vLLM, arXiv:2309.06180, Sec. 4.4, here
    copied row to row), then runs ``tokens[i, :lengths[i]]`` at positions ``starts[i] + j``: each
    attends to those prefix columns and causally to the chunk, and its K/V go to columns
    ``starts[i] + j`` of row ``slots[i]``. With ``starts = 0`` this is a plain batched prefill (one
    ``[P, T]`` forward instead of ``P`` calls that each stream every weight matrix for ``T`` rows).

    tokens int32 [P, T]; starts, lengths, slots, sources int32 [P] (``slots`` distinct,
    ``starts[i] <= span``); ``span`` (static) the prefix columns read; ``sampling`` =
    (temperature, top_k, top_p, keys, streams, counters), each with a leading axis of P.
    Padded chunk columns (``j >= lengths[i]``) are written too, past the row's valid columns
    (dropped beyond the row's end). Returns (cache_k, cache_v, tokens [P], logprob [P], top ids
    [P, 20], top log-probs [P, 20]).
    """
    cfg = model.cfg
    cdt = cfg.dtype_of_compute()
    P, T = tokens.shape
    cols = starts[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    # the prefix blocks [L, P, span, Hkv, hd] (read before any write: ``sources`` may be rows that
    # this call overwrites) go to the new rows first
    pk, pv = cache_k[:, sources, :span], cache_v[:, sources, :span]
    cache_k = cache_k.at[:, slots, :span].set(pk)
    cache_v = cache_v.at[:, slots, :span].set(pv)
    in_prefix = jnp.arange(span, dtype=jnp.int32)[None, None] < starts[:, None, None]
    causal = jnp.tril(jnp.ones((T, T), bool))[None] & (
        jnp.arange(T, dtype=jnp.int32)[None, None] < lengths[:, None, None])
    allowed = jnp.concatenate([jnp.broadcast_to(in_prefix, (P, T, span)), causal], axis=-1)
    x = model.embed_tokens(tokens, cols, cdt)
    cos, sin = tr.rope_tables(cols, cfg.hd, cfg.rope_theta)

    def layer(x, xs):
        p, ck, cv = xs
        h = tr._norm(cfg, x, p, "attn_norm")
        q, k, v = tr._qkv(cfg, h, p, cos, sin)
        o = tr._attend(cfg, q, jnp.concatenate([ck.astype(cdt), k], axis=1),
                       jnp.concatenate([cv.astype(cdt), v], axis=1), allowed)
        x = x + tr._attn_out(cfg, o, p)
        x = x + tr._mlp(cfg, tr._norm(cfg, x, p, "mlp_norm"), p)
        return x, (k, v)

    x, (k, v) = jax.lax.scan(layer, x, (model.layer_params(cdt), pk, pv))
    # k, v [L, P, T, Hkv, hd] -> columns starts[i] + j of rows ``slots`` (a scatter, in place: the
    # caches are donated)
    rows = jnp.broadcast_to(slots[:, None], (P, T))
    cache_k = cache_k.at[:, rows, cols].set(k.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[:, rows, cols].set(v.astype(cache_v.dtype), mode="drop")
    last = model.final_hidden(x)[jnp.arange(P), lengths - 1]
    logits = model.logits_from_hidden(last)
    tok = sample_rows(logits, *sampling)
    return (cache_k, cache_v, tok) + token_logprobs(logits, tok, want_lp)


def _decode_layers(model: Transformer, tokens, positions, cache_k, cache_v, batch: int, span: int):
    """One token per row through every layer, reading the cache in place.

    The arithmetic of ``Transformer.decode_step`` (the new token attends to the masked cache plus
    itself as one extra logit column), but each layer reads its ``[batch, span]`` block straight
    out of the full ``[L, n_slots, S_max, ...]`` cache with one ``dynamic_slice``: slicing the
    cache first (or scanning over it) copies whole cache rows every step, which measured 1.3-1.4x
    slower for 16 of 32 slots on XLA:CPU. Returns (f32 logits [batch, V], new k, v [L, batch,
    Hkv, hd]).
    """
    cfg = model.cfg
    cdt = cfg.dtype_of_compute()
    K, hd = cfg.n_kv_heads, cfg.hd
    G, scale = cfg.n_heads // K, 1.0 / math.sqrt(hd)
    x = model.embed_tokens(tokens[:, None], positions[:, None], cdt)
    cos, sin = tr.rope_tables(positions[:, None], hd, cfg.rope_theta)
    valid = jnp.arange(span, dtype=jnp.int32)[None] < positions[:, None]
    z = jnp.zeros((), jnp.int32)

    def layer(x, xs):
        p, li = xs
        block = (1, batch, span, K, hd)
        ck = jax.lax.dynamic_slice(cache_k, (li, z, z, z, z), block)[0].astype(cdt)
        cv = jax.lax.dynamic_slice(cache_v, (li, z, z, z, z), block)[0].astype(cdt)
        h = tr._norm(cfg, x, p, "attn_norm")
        q, k, v = tr._qkv(cfg, h, p, cos, sin)
        qg = q.reshape(batch, K, G, hd)
        s_cache = jnp.einsum("bkgd,bskd->bkgs", qg, ck, preferred_element_type=jnp.float32)
        s_self = jnp.einsum("bkgd,bkd->bkg", qg, k[:, 0], preferred_element_type=jnp.float32)
        s_cache = jnp.where(valid[:, None, None, :], s_cache * scale, tr._MASK_VALUE)
        s = jnp.concatenate([s_cache, (s_self * scale)[..., None]], axis=-1)
        w = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bkgs,bskd->bkgd", w[..., :-1].astype(cdt), cv)
        o = o + w[..., -1:].astype(cdt) * v[:, 0][:, :, None, :]
        x = x + tr._attn_out(cfg, o.reshape(batch, 1, cfg.q_dim), p)
        x = x + tr._mlp(cfg, tr._norm(cfg, x, p, "mlp_norm"), p)
        return x, (k[:, 0], v[:, 0])

    layers = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    x, (nk, nv) = jax.lax.scan(layer, x, (model.layer_params(cdt), layers))
    return model.logits_from_hidden(model.final_hidden(x))[:, 0], nk, nv


def decode_slots(model: Transformer, cache_k, cache_v, tokens, positions, sampling, want_lp, *,
                 batch: int, span: int):
    """Advance cache rows ``0 .. batch-1`` by one token each.

    tokens/positions int32 [batch]: the last sampled token of each row and its position (= the
    number of tokens already cached for that row); rows attend to cache columns ``< position``
    within the first ``span`` columns, and the new K/V go to column ``position``. Idle rows write
    column ``position`` of their own free row (the engine gives them the first column past the
    row's valid K/V, so a freed row keeps its prefix for reuse). Returns like
    :func:`extend_slots`.
    """
    logits, nk, nv = _decode_layers(model, tokens, positions, cache_k, cache_v, batch, span)
    rows = jnp.arange(batch, dtype=jnp.int32)
    cache_k = cache_k.at[:, rows, positions].set(nk.astype(cache_k.dtype))
    cache_v = cache_v.at[:, rows, positions].set(nv.astype(cache_v.dtype))
    tok = sample_rows(logits, *sampling)
    return (cache_k, cache_v, tok) + token_logprobs(logits, tok, want_lp)
