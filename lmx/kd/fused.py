"""Fused, chunked KD / ATKD loss over hidden states and output projections.

After Liger-Kernel's chunked distillation (arXiv:2410.10989) and torchtune's chunked forward KL.
The ``[N, V]`` logits of the two models are never held at once: tokens are processed in chunks of
``B x chunk_size`` (chunking runs along the time axis so that a batch-sharded input keeps its
sharding inside every chunk), and only ``O(N)`` per-token quantities leave a chunk.

Two implementations with identical value and gradient:

- ``"custom_vjp"`` (default): per chunk, the student logits' cotangent is computed in the forward
  pass and turned into ``d hidden`` and ``d head`` right away (``d head`` accumulated in float32);
  the backward pass only rescales. Four ``[C, H] x [H, V]`` products per chunk, like the unfused
  loss, so it is about as fast. The per-token weights must be known before this pass, so ATKD runs
  a first, teacher-only pass for the uncertainties (the batch-level split) -- two passes.
- ``"scan_remat"``: ``lax.scan`` over a ``jax.checkpoint``-ed chunk body that returns the per-token
  terms; the split and the weighting happen on those ``[N]`` vectors after the scan, so ATKD needs
  one pass. The backward recomputes each chunk's logits (six products per chunk); supports
  higher-order differentiation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lmx.kd.atkd import (ATKDConfig, atkd_stats, atkd_term_weights, atkd_token_terms,
                         check_atkd_extras)
from lmx.kd.divergences import (Array, KDConfig, _check_float, _check_int, align,
                                check_label_ids, check_reduction, compute_dtype, kd_term_weights,
                                kd_token_terms, label_id_poison)
from lmx.models import from_time_chunks, to_time_chunks

IMPLS = ("custom_vjp", "scan_remat")


def auto_chunk_tokens(n_tokens: int, vocab: int, hidden: int) -> int:
    """Liger-Kernel's chunk-size heuristic: ``next_pow2(ceil(N / ceil(V / H)))`` tokens, so one
    logits chunk is about the size of the hidden states; clipped to [512, 1024] because chunks of
    128-256 tokens ran measurably slower on CPU (thin matmuls) and larger ones cost memory."""
    inc = max(1, math.ceil(vocab / hidden))
    c = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n_tokens / inc)))))
    return int(min(max(c, 512), 1024))


def _check_inputs(hs, ws, ht, wt, labels, mask, bs, bt, cfg, shift):
    _check_float("student_hidden", hs)
    _check_float("teacher_hidden", ht)
    _check_float("student_head", ws)
    _check_float("teacher_head", wt)
    if hs.ndim not in (2, 3):
        raise ValueError(f"student_hidden must be [B, T, H] or [N, H], got {tuple(hs.shape)}")
    if tuple(hs.shape[:-1]) != tuple(ht.shape[:-1]):
        raise ValueError(f"student_hidden {tuple(hs.shape)} and teacher_hidden "
                         f"{tuple(ht.shape)} must share the leading shape")
    for name, h, w in (("student", hs, ws), ("teacher", ht, wt)):
        if w.ndim != 2 or w.shape[0] != h.shape[-1]:
            raise ValueError(f"{name}_head must be [H, V] with H = {h.shape[-1]} (the "
                             f"{name}_hidden size), got {tuple(w.shape)}")
    vs, vt = ws.shape[1], wt.shape[1]
    vv = cfg.valid_vocab_size
    if vv is None and vs != vt:
        raise ValueError(f"vocab sizes differ: student_head has {vs}, teacher_head has {vt}; "
                         "pass valid_vocab_size in the loss config")
    if vv is not None and min(vs, vt) < vv:
        raise ValueError(f"valid_vocab_size={vv} exceeds a head's vocab size ({vs}, {vt})")
    for name, b, v in (("student_bias", bs, vs), ("teacher_bias", bt, vt)):
        if b is not None:
            _check_float(name, b)
            if tuple(b.shape) != (v,):
                raise ValueError(f"{name} must have shape ({v},), got {tuple(b.shape)}")
    lead = tuple(hs.shape[:-1])
    if shift and hs.ndim != 3:
        raise ValueError(f"shift=True needs [B, T, H] hidden states, got {tuple(hs.shape)}")
    if shift and lead[-1] < 2:
        raise ValueError(f"shift=True needs a sequence length >= 2, got {lead}")
    if labels is None:
        if cfg.needs_targets:
            raise ValueError(f"labels of shape {lead} (int) are required for this loss")
    else:
        _check_int("labels", labels)
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead}, got {tuple(labels.shape)}")
    if mask is not None and tuple(mask.shape) != lead:
        raise ValueError(f"mask must have shape {lead}, got {tuple(mask.shape)}")
    check_label_ids(labels, vv if vv is not None else vs, cfg.ignore_index)


def _logits(h, w, b, dtype):
    z = jnp.dot(h, w, preferred_element_type=dtype)
    return z if b is None else z + b.astype(dtype)


def fused_linear_kd_loss(student_hidden: Array, student_head: Array, teacher_hidden: Array,
                         teacher_head: Array, labels: Array | None = None, *,
                         mask: Array | None = None, loss: KDConfig | ATKDConfig | None = None,
                         student_bias: Array | None = None, teacher_bias: Array | None = None,
                         shift: bool = True, chunk_size: int | None = None,
                         impl: str = "custom_vjp", threshold=None, group_counts=None,
                         denominator=None, reduction: str = "mean", return_aux: bool = False):
    """KD or ATKD loss from hidden states and output projections without full logits.

    Same semantics as :func:`lmx.kd.kd_loss` / :func:`lmx.kd.atkd_loss` applied to
    ``student_hidden @ student_head (+ student_bias)`` and the teacher's logits (under
    stop-gradient); logits are formed chunk by chunk in float32 (``preferred_element_type``, no
    low-precision copy) and discarded.

    Args:
      student_hidden: float ``[B, T, H_s]`` (``[N, H_s]`` with ``shift=False``), after the final
        norm.
      student_head: float ``[H_s, V]``; teacher_hidden ``[B, T, H_t]``; teacher_head ``[H_t, V_t]``.
      labels: int ``[B, T]`` targets with ``loss.ignore_index`` for unscored positions.
      mask: optional bool ``[B, T]``.
      loss: :class:`KDConfig` (default forward KL) or :class:`ATKDConfig`.
      chunk_size: time positions per chunk (a chunk holds ``B * chunk_size`` tokens); ``None`` =
        :func:`auto_chunk_tokens` divided by ``B``. Need not divide the length (padded, masked).
      impl: ``"custom_vjp"`` or ``"scan_remat"`` (see module docstring).
      threshold, group_counts, denominator, reduction, return_aux: as in the unfused functions.
    Returns:
      float32 scalar, or ``(loss, aux)``.
    Raises:
      TypeError / ValueError: dtypes, shapes, vocab sizes, ``impl``, ``chunk_size`` < 1.
      ValueError: a label id outside ``[0, V)`` (``V`` = ``valid_vocab_size`` or the student
      head's vocab) that is not ``loss.ignore_index``, naming value and position; under ``jit``
      such an id makes the loss NaN instead.
    """
    cfg = KDConfig() if loss is None else loss
    if not isinstance(cfg, (KDConfig, ATKDConfig)):
        raise TypeError(f"loss must be a KDConfig or ATKDConfig, got {type(cfg).__name__}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    _check_inputs(student_hidden, student_head, teacher_hidden, teacher_head, labels, mask,
                  student_bias, teacher_bias, cfg, shift)
    is_atkd = isinstance(cfg, ATKDConfig)
    hs, ht = student_hidden, teacher_hidden
    lead = tuple(hs.shape[:-1])
    if hs.ndim == 2:
        hs, ht = hs[None], ht[None]
        labels = None if labels is None else labels[None]
        mask = None if mask is None else mask[None]
    targets, m = align(labels, mask, hs.shape[:-1], shift=shift, ignore_index=cfg.ignore_index)
    if shift:
        hs, ht = hs[:, :-1], ht[:, :-1]
    lead_shifted = (*lead[:-1], lead[-1] - 1) if shift else lead
    if is_atkd:
        n_groups = check_atkd_extras(cfg, lead_shifted, threshold=threshold,
                                     group_counts=group_counts, denominator=denominator,
                                     reduction=reduction)
    else:
        check_reduction(reduction, denominator)
    ws, wt, bs, bt = student_head, teacher_head, student_bias, teacher_bias
    vv = cfg.valid_vocab_size
    if vv is not None:
        ws, wt = ws[:, :vv], wt[:, :vv]
        bs = None if bs is None else bs[:vv]
        bt = None if bt is None else bt[:vv]
    nb, length = hs.shape[0], hs.shape[1]
    if chunk_size is None:
        ct = max(1, auto_chunk_tokens(nb * length, ws.shape[1], ws.shape[0]) // nb)
    else:
        ct = chunk_size
    ct = min(ct, length)
    nc = -(-length // ct)
    pad = nc * ct - length
    if pad:
        hs = jnp.pad(hs, ((0, 0), (0, pad), (0, 0)))
        ht = jnp.pad(ht, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        m = jnp.pad(m, ((0, 0), (0, pad)))
    dtype = compute_dtype(hs, ws)
    xs = (to_time_chunks(hs, nc, ct), to_time_chunks(ht, nc, ct), to_time_chunks(targets, nc, ct),
          to_time_chunks(m, nc, ct))
    term_fn = atkd_token_terms if is_atkd else kd_token_terms
    m_flat = m[:, :length].reshape(-1)
    n_scored = jnp.sum(m_flat, dtype=jnp.float32)

    def weights_from(lu_flat):
        if is_atkd:
            return atkd_term_weights(lu_flat, m_flat, cfg, n_groups=n_groups, threshold=threshold,
                                     group_counts=group_counts, denominator=denominator,
                                     reduction=reduction)
        den = None if reduction == "sum" else (n_scored if denominator is None else denominator)
        return kd_term_weights(m_flat, cfg, den, dtype), None, {"n_scored": n_scored}

    def to_flat(x):
        return from_time_chunks(x, length).reshape(nb * length, *x.shape[3:])

    def to_chunks(x):
        x = x.reshape(nb, length, *x.shape[1:])
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return to_time_chunks(x, nc, ct)

    if impl == "scan_remat":
        @jax.checkpoint
        def body(carry, x):
            hs_c, ht_c, tg_c, m_c = x
            zs = _logits(hs_c, ws, bs, dtype)
            zt = _logits(jax.lax.stop_gradient(ht_c), jax.lax.stop_gradient(wt),
                         None if bt is None else jax.lax.stop_gradient(bt), dtype)
            if is_atkd:
                terms_c, lu_c = term_fn(zs, zt, tg_c, m_c, cfg)
            else:
                terms_c, lu_c = term_fn(zs, zt, tg_c, m_c, cfg), jnp.zeros(m_c.shape, dtype)
            return carry, (terms_c, lu_c)

        _, (terms, lu) = jax.lax.scan(body, None, xs)
        terms, lu = to_flat(terms), to_flat(lu)
        w, hard, aux = weights_from(lu)
        value = jnp.sum(w * terms)
    else:
        if is_atkd:
            lu = to_flat(_teacher_log_unc(xs[1], wt, bt, xs[2], xs[3], cfg, dtype))
        else:
            lu = jnp.zeros(m_flat.shape, dtype)
        w, hard, aux = weights_from(lu)
        w = jax.lax.stop_gradient(w)
        value, terms = _fused_vjp(term_fn, cfg, dtype, hs, ws, bs, ht, wt, bt, xs[2], xs[3],
                                  to_chunks(w), nc, ct)
        terms = to_flat(jax.lax.stop_gradient(terms))
    value = value + label_id_poison(labels, ws.shape[1], cfg.ignore_index, value.dtype)
    if not return_aux:
        return value
    if is_atkd:
        return value, {**aux, **atkd_stats(terms, lu, m_flat, hard)}
    mf = m_flat.astype(terms.dtype)
    return value, {**aux, "soft_sum": jnp.sum(mf * terms[:, 0]),
                   "hard_sum": jnp.sum(mf * terms[:, 1])}


def _teacher_log_unc(ht_chunks, wt, bt, tg_chunks, m_chunks, cfg: ATKDConfig, dtype):
    """Pass A of the two-pass ATKD: the teacher's ``log(1 - p_g)`` per token, chunk by chunk
    (teacher logits only, no gradient)."""
    wt = jax.lax.stop_gradient(wt)
    bt = None if bt is None else jax.lax.stop_gradient(bt)

    def body(carry, x):
        ht_c, tg_c, m_c = x
        zt = _logits(jax.lax.stop_gradient(ht_c), wt, bt, dtype)
        z = jnp.where(m_c[..., None], zt, 0.0) / cfg.temperature
        lse = jax.nn.logsumexp(z, axis=-1)
        onehot = jnp.arange(z.shape[-1]) == tg_c[..., None]
        return carry, jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, z), axis=-1) - lse

    _, lu = jax.lax.scan(body, None, (ht_chunks, tg_chunks, m_chunks))
    return lu


def _fused_vjp(term_fn, cfg, dtype, hs, ws, bs, ht, wt, bt, tg_chunks, m_chunks, w_chunks, nc,
               ct):
    nb = hs.shape[0]

    def chunk_value(zs, zt, tg_c, m_c, w_c):
        out = term_fn(zs, zt, tg_c, m_c, cfg)
        terms_c = out[0] if isinstance(out, tuple) else out
        return jnp.sum(w_c * terms_c), terms_c

    @jax.custom_vjp
    def fused(hs, ws, bs, ht, wt, bt, tg_chunks, m_chunks, w_chunks):
        return _forward(hs, ws, bs, ht, wt, bt, tg_chunks, m_chunks, w_chunks)[0]

    def _forward(hs, ws, bs, ht, wt, bt, tg_chunks, m_chunks, w_chunks):
        hs_chunks, ht_chunks = to_time_chunks(hs, nc, ct), to_time_chunks(ht, nc, ct)
        acc = dtype  # d head accumulates in float32 (float64 in tests) whatever the head dtype

        def body(carry, x):
            val, g_ws, g_bs = carry
            hs_c, ht_c, tg_c, m_c, w_c = x
            zs = _logits(hs_c, ws, bs, dtype)
            zt = _logits(ht_c, wt, bt, dtype)
            (v, terms_c), g_z = jax.value_and_grad(chunk_value, has_aux=True)(
                zs, zt, tg_c, m_c, w_c)
            g_hs_c = jnp.einsum("btv,hv->bth", g_z, ws, preferred_element_type=dtype)
            g_ws = g_ws + jnp.einsum("bth,btv->hv", hs_c, g_z, preferred_element_type=acc)
            g_bs = g_bs + jnp.sum(g_z, axis=(0, 1), dtype=acc)
            return (val + v, g_ws, g_bs), (g_hs_c.astype(hs.dtype), terms_c)

        init = (jnp.zeros((), dtype), jnp.zeros(ws.shape, acc), jnp.zeros(ws.shape[1:], acc))
        (val, g_ws, g_bs), (g_hs, terms) = jax.lax.scan(
            body, init, (hs_chunks, ht_chunks, tg_chunks, m_chunks, w_chunks))
        g_hs = from_time_chunks(g_hs, hs.shape[1])
        return (val, terms), (g_hs, g_ws, g_bs)

    def fwd(hs, ws, bs, ht, wt, bt, tg_chunks, m_chunks, w_chunks):
        out, res = _forward(hs, ws, bs, ht, wt, bt, tg_chunks, m_chunks, w_chunks)
        return out, (res, ws, bs, ht, wt, bt, w_chunks)

    def bwd(res, cotangents):
        # The per-token terms are a diagnostic output (stop-gradient by the caller): only the
        # value's cotangent is propagated.
        g = cotangents[0]
        (g_hs, g_ws, g_bs), ws, bs, ht, wt, bt, w_chunks = res
        d_bs = None if bs is None else (g * g_bs).astype(bs.dtype)
        zeros = lambda x: None if x is None else jnp.zeros_like(x)  # noqa: E731 - teacher: no grad
        return ((g * g_hs).astype(g_hs.dtype), (g * g_ws).astype(ws.dtype), d_bs, zeros(ht),
                zeros(wt), zeros(bt), None, None, jnp.zeros_like(w_chunks))

    fused.defvjp(fwd, bwd)
    value, terms = fused(hs, ws, bs, ht, wt, bt, tg_chunks, m_chunks, w_chunks)
    return value, jax.lax.stop_gradient(terms)
