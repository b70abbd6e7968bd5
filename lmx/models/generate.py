"""Batched generation: jitted prefill + KV-cache decode inside one ``lax.while_loop``.

Prompts are left-padded into a bucket of ``T_p`` columns (multiple of 16); the cache holds
``S`` columns (multiple of 64), one compile per (bucket, sampling settings). Each row's RoPE
positions count only its real tokens. Sampling: greedy (``temperature == 0``) or temperature
with optional top-k and top-p (nucleus) filtering; rows stop at any of ``stop_tokens``.
The decode step scans the layers rolled, with each layer's cache slice as a scanned input, so no
slice is copied (see :meth:`lmx.models.Transformer.decode_step`); timings: ``docs/lm_core.md``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.models.transformer import Transformer, positions_from_mask


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float):
    """Draw one token id per row of f32 ``logits`` [B, V]; greedy when ``temperature == 0``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new", "cache_len", "temperature", "top_k", "top_p",
                                             "stop_ids", "pad_id"))
def _generate(model: Transformer, tokens, mask, key, *, max_new, cache_len, temperature, top_k, top_p,
              stop_ids, pad_id):
    cfg = model.cfg
    B, Tp = tokens.shape
    positions = positions_from_mask(mask)
    h, (k, v) = model.forward(tokens, mask, positions, collect_kv=True)
    cdt = k.dtype
    cache_shape = (cfg.n_layers, B, cache_len, cfg.n_kv_heads, cfg.hd)
    ck = jax.lax.dynamic_update_slice(jnp.zeros(cache_shape, cdt), k, (0, 0, 0, 0, 0))
    cv = jax.lax.dynamic_update_slice(jnp.zeros(cache_shape, cdt), v, (0, 0, 0, 0, 0))
    valid = jnp.zeros((B, cache_len), bool).at[:, :Tp].set(mask)
    key, sub = jax.random.split(key)
    tok = sample_logits(model.logits_from_hidden(h[:, -1]), sub, temperature, top_k, top_p)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    out = jnp.full((B, max_new), pad_id, jnp.int32)
    done = jnp.zeros((B,), bool)

    def cond(c):
        i, _, _, _, _, _, _, done, _ = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, tok, ck, cv, valid, pos, out, done, key = c
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, stops)
        logits, nk, nv = model.decode_step(tok, pos, ck, cv, valid)
        col = Tp + i
        # explicit int32 zeros: with jax_enable_x64 on, literal 0s would become int64 and
        # dynamic_update_slice refuses mixed index dtypes
        z = jnp.zeros((), col.dtype)
        ck = jax.lax.dynamic_update_slice(ck, nk[:, :, None].astype(cdt), (z, z, col, z, z))
        cv = jax.lax.dynamic_update_slice(cv, nv[:, :, None].astype(cdt), (z, z, col, z, z))
        valid = jax.lax.dynamic_update_slice(valid, jnp.ones((B, 1), bool), (z, col))
        key, sub = jax.random.split(key)
        tok = sample_logits(logits, sub, temperature, top_k, top_p)
        return i + 1, tok, ck, cv, valid, pos + 1, out, done, key

    carry = (jnp.int32(0), tok, ck, cv, valid, positions[:, -1] + 1, out, done, key)
    return jax.lax.while_loop(cond, body, carry)[6]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, seed: int = 0) -> list[list[int]]:
    """Continue each prompt; returns the new token ids per row, cut before the first stop token.

    Args:
      prompts: non-empty list of non-empty token-id lists (different lengths allowed).
      max_new_tokens: >= 1; prompt length + max_new_tokens must fit ``cfg.max_seq_len``.
      temperature: 0 for greedy; > 0 samples. top_k: 0 = off. top_p: in (0, 1], 1 = off.
      stop_tokens: ids that end a row (not included in its output).
    Raises ``ValueError``/``TypeError`` on any bad argument before compiling anything.
    """
    cfg = model.cfg
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D list of token ids, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"prompts[{i}] must hold integer token ids, got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}] holds ids outside [0, {cfg.vocab_size})")
        rows.append(arr.astype(np.int32))
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or top_k > cfg.vocab_size:
        raise ValueError(f"top_k must be in [0, vocab_size={cfg.vocab_size}], got {top_k}")
    if not 0 <= pad_id < cfg.vocab_size:
        raise ValueError(f"pad_id must be a valid token id, got {pad_id}")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len {cfg.max_seq_len}")
    tp = min(_round_up(longest, 16), cfg.max_seq_len - max_new_tokens)
    cache_len = _round_up(tp + max_new_tokens, 64)
    tokens = np.full((len(rows), tp), pad_id, np.int32)
    mask = np.zeros((len(rows), tp), bool)
    for i, r in enumerate(rows):
        tokens[i, tp - len(r):], mask[i, tp - len(r):] = r, True
    out = _generate(model, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(seed),
                    max_new=int(max_new_tokens), cache_len=cache_len, temperature=float(temperature),
                    top_k=int(top_k), top_p=float(top_p),
                    stop_ids=tuple(sorted({int(s) for s in stop_tokens})), pad_id=int(pad_id))
    out = np.asarray(out)
    stops = set(int(s) for s in stop_tokens)
    result = []
    for row in out:
        cut = next((j for j, t in enumerate(row) if int(t) in stops), len(row))
        result.append([int(t) for t in row[:cut]])
    return result
