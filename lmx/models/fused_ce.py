"""Next-token cross-entropy from hidden states and the output projection, chunked and fused.

The ``[B, T, V]`` logits are never held at once: time positions are processed in chunks of
``B x chunk_size`` tokens (chunking runs along time so that a batch-sharded input keeps its
sharding inside every chunk). Under differentiation each chunk's logits cotangent
``w_t (softmax(z_t) - onehot(y_t))`` is formed in the forward pass, cast to the hidden states'
dtype and multiplied out at once into ``d hidden`` and ``d head`` (accumulated in float32), so
the chunk's logits die inside the chunk and the backward pass only rescales. Three
``[C, D] x [D, V]`` products per chunk, like the unfused loss.

Why it is faster as well as smaller in bf16: autodiff of ``einsum(h_bf16, W_bf16,
preferred_element_type=f32)`` feeds the float32 logits cotangent straight into the two transposed
products, which then run as mixed f32 x bf16 matmuls; here both run as bf16 x bf16 with float32
accumulation, as the forward product does (PyTorch autocast does the same). Softmax and the loss
stay in float32.

Reference: the chunked linear cross-entropy of Liger-Kernel (Hsu et al. 2024, arXiv:2410.10989),
written here as a ``jax.custom_vjp`` over a ``lax.scan``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lmx.models.transformer import BTD
from lmx.parallel import constrain

# A chunk's float32 logits stay under this many bytes by default.
_CHUNK_LOGITS_BYTES = 2 * 2**30


def to_time_chunks(x: jax.Array, n_chunks: int, chunk: int) -> jax.Array:
    """``[B, L, ...]`` with ``L = n_chunks * chunk`` -> ``[n_chunks, B, chunk, ...]``."""
    x = x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def from_time_chunks(x: jax.Array, length: int) -> jax.Array:
    """``[n_chunks, B, chunk, ...]`` -> ``[B, length, ...]`` (drops the padded tail)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def default_chunk_size(batch: int, length: int, vocab: int) -> int:
    """Time positions per chunk: the largest power of two of tokens whose float32 logits fit in
    2 GiB (4096 tokens at V = 128256), divided among the ``batch`` rows; at most ``length``.

    Each chunk reads and writes the ``[D, V]`` float32 head-gradient accumulator once, so chunks
    should not be thin; on an H200 (1.24B Llama, B = 16, T = 2048) chunks of 128, 256 and 2047
    positions trained equally fast (48.5-48.6 % MFU, ``benchmarks/results/lm_gpu_mfu_gpu.json``).
    """
    tokens = 1 << int(math.floor(math.log2(max(1, _CHUNK_LOGITS_BYTES // (4 * vocab)))))
    return int(max(1, min(length, tokens // max(batch, 1))))


def _check(hidden, head, tokens, weights, chunk_size):
    if not hasattr(hidden, "dtype") or not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise TypeError(f"hidden must be a float array, got {getattr(hidden, 'dtype', type(hidden))}")
    if not hasattr(head, "dtype") or not jnp.issubdtype(head.dtype, jnp.floating):
        raise TypeError(f"head must be a float array, got {getattr(head, 'dtype', type(head))}")
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    if B == 0 or T < 2:
        raise ValueError(f"hidden needs batch >= 1 and seq >= 2 to score next tokens, got {tuple(hidden.shape)}")
    if head.ndim != 2 or head.shape[0] != D:
        raise ValueError(f"head must be [D, V] with D = {D} (hidden's last dim), got {tuple(head.shape)}")
    if not hasattr(tokens, "dtype") or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be an integer array, got {getattr(tokens, 'dtype', type(tokens))}")
    if tuple(tokens.shape) != (B, T):
        raise ValueError(f"tokens must have shape {(B, T)} (hidden's leading dims), got {tuple(tokens.shape)}")
    if weights is not None and not hasattr(weights, "shape"):
        raise TypeError(f"weights must be an array of shape {(B, T - 1)}, got {type(weights).__name__}")
    if weights is not None and tuple(weights.shape) != (B, T - 1):
        raise ValueError(f"weights must have shape {(B, T - 1)} (one per scored next token), "
                         f"got {tuple(weights.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def fused_next_token_nll(hidden: jax.Array, head: jax.Array, tokens: jax.Array,
                         weights: jax.Array | None = None, *, chunk_size: int | None = None):
    r"""Weighted next-token NLL sum without materializing the logits.

    .. math:: \mathcal{L} = \sum_{b,t} w_{bt}\,\big(\operatorname{logsumexp}(z_{bt})
        - z_{bt,\,y_{b,t+1}}\big), \qquad z_{bt} = h_{bt} W

    computed in float32 (logits accumulate in float32 from ``hidden``'s dtype).

    Args:
      hidden: float ``[B, T, D]`` final (normed) hidden states.
      head: float ``[D, V]`` output projection (the transposed embedding when tied); cast to
        ``hidden``'s dtype like the unfused logits.
      tokens: int ``[B, T]``; position ``t``'s target is ``tokens[:, t + 1]``. Ids are not
        range-checked here (they may be traced): validate them before (``check_tokens``).
      weights: optional float ``[B, T - 1]`` per-target weights (e.g. a 0/1 scored mask, or
        ``1 / n_tokens``); all ones when ``None``. Not differentiated.
      chunk_size: time positions per chunk; ``None`` = :func:`default_chunk_size`. Need not
        divide ``T - 1`` (the tail is padded with zero weight).
    Returns:
      ``(loss_sum, nll)``: float32 scalar (differentiable in ``hidden`` and ``head``) and the
      per-target NLL ``[B, T - 1]`` float32 under stop-gradient.
    Raises:
      TypeError / ValueError: dtypes and shapes as above, ``chunk_size`` < 1.
    """
    _check(hidden, head, tokens, weights, chunk_size)
    B, T, _ = hidden.shape
    L = T - 1
    ct = min(int(chunk_size) if chunk_size is not None else
             default_chunk_size(B, L, head.shape[1]), L)
    nc = -(-L // ct)
    pad = nc * ct - L
    h = hidden[:, :-1]
    targets = tokens[:, 1:].astype(jnp.int32)
    w = (jnp.ones((B, L), jnp.float32) if weights is None
         else jax.lax.stop_gradient(weights).astype(jnp.float32))
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        w = jnp.pad(w, ((0, 0), (0, pad)))
    # batch-sharded rows against a head gathered over its feature axis (vocab may stay split):
    # the chunked products then need no activation resharding under FSDP
    h = constrain(h, BTD)
    head = constrain(head.astype(h.dtype), ("activation_embed", "activation_vocab"))
    value, nll = _fused(h, head, to_time_chunks(targets, nc, ct),
                        to_time_chunks(w, nc, ct))
    return value, jax.lax.stop_gradient(from_time_chunks(nll, L))


def _chunk_nll(h_c, head, tg_c):
    z = jnp.einsum("btd,dv->btv", h_c, head, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, tg_c[..., None], axis=-1)[..., 0]
    return z, lse, lse - picked


def _value(h, head, tg_chunks, w_chunks):
    nc, ct = tg_chunks.shape[0], tg_chunks.shape[2]

    def body(total, x):
        h_c, tg_c, w_c = x
        nll_c = _chunk_nll(h_c, head, tg_c)[2]
        return total + jnp.sum(w_c * nll_c), nll_c

    return jax.lax.scan(body, jnp.float32(0), (to_time_chunks(h, nc, ct), tg_chunks, w_chunks))


def _value_and_grads(h, head, tg_chunks, w_chunks):
    nc, ct = tg_chunks.shape[0], tg_chunks.shape[2]
    V = head.shape[1]

    def body(carry, x):
        total, g_head = carry
        h_c, tg_c, w_c = x
        z, lse, nll_c = _chunk_nll(h_c, head, tg_c)
        onehot = jnp.arange(V, dtype=jnp.int32) == tg_c[..., None]
        g_z = (w_c[..., None] * (jnp.exp(z - lse[..., None]) - onehot)).astype(h.dtype)
        g_h_c = jnp.einsum("btv,dv->btd", g_z, head, preferred_element_type=jnp.float32)
        g_head = g_head + jnp.einsum("btd,btv->dv", h_c, g_z, preferred_element_type=jnp.float32)
        return (total + jnp.sum(w_c * nll_c), g_head), (nll_c, g_h_c.astype(h.dtype))

    init = (jnp.float32(0), jnp.zeros(head.shape, jnp.float32))
    (total, g_head), (nll, g_h) = jax.lax.scan(
        body, init, (to_time_chunks(h, nc, ct), tg_chunks, w_chunks))
    return total, nll, from_time_chunks(g_h, h.shape[1]), g_head


@jax.custom_vjp
def _fused(h, head, tg_chunks, w_chunks):
    return _value(h, head, tg_chunks, w_chunks)


def _fused_fwd(h, head, tg_chunks, w_chunks):
    total, nll, g_h, g_head = _value_and_grads(h, head, tg_chunks, w_chunks)
    return (total, nll), (g_h, g_head, w_chunks)


def _fused_bwd(res, cotangents):
    # The per-token NLL is returned under stop-gradient: only the sum's cotangent flows. The head
    # arrives cast to the hidden states' dtype (see the caller), so both cotangents take it.
    g = cotangents[0]
    g_h, g_head, w_chunks = res
    return ((g * g_h).astype(g_h.dtype), (g * g_head).astype(g_h.dtype), None,
            jnp.zeros_like(w_chunks))


_fused.defvjp(_fused_fwd, _fused_bwd)
