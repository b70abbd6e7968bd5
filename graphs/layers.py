"""Building blocks: gated multi-head attention, token selection, GIN(E), FFN, dense<->flat views.

GTSP masks (Liu et al. 2023, arXiv:2312.05479) in two policies (``faithful`` to the official code
github.com/LiuChuang0059/GTSP, ``clean``: exact and removable; see :mod:`graphs.gtsp`), dense
per-graph or segment attention, masks passed as call arguments. Softmax and attention
logits are computed in float32. Padding tokens are excluded with a finite fill (``NEG``) so rows
without any valid key stay finite.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

NEG = -1e30


def to_dense(h: jax.Array, dense_index: jax.Array, dense_mask: jax.Array) -> jax.Array:
    """Flat nodes ``[N, d]`` -> per-graph ``[B, M, d]`` (zeros at padding slots)."""
    return h[dense_index] * dense_mask[..., None].astype(h.dtype)


def to_flat(x: jax.Array, node_graph: jax.Array, node_pos: jax.Array,
            node_mask: jax.Array) -> jax.Array:
    """Per-graph ``[B, M, d]`` -> flat ``[N, d]``; padding nodes (possibly beyond M) get zeros."""
    M = x.shape[1]
    return x[node_graph, jnp.clip(node_pos, 0, M - 1)] * node_mask[:, None].astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``rng`` is None (evaluation) or ``rate == 0``."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _rng(rng: jax.Array | None, *ids: int) -> jax.Array | None:
    if rng is None:
        return None
    for i in ids:
        rng = jax.random.fold_in(rng, i)
    return rng


def linear(layer: nnx.Linear, x: jax.Array, col_mask: jax.Array | None = None) -> jax.Array:
    """``x @ W + b`` with an optional multiplicative mask on W's output columns (not on b)."""
    w = layer.kernel[...]
    if col_mask is not None:
        w = w * col_mask[None, :]
    return x @ w + layer.bias[...]


class CategoricalEncoder(nnx.Module):
    """Sum of per-feature embeddings from one offset table (OGB AtomEncoder/BondEncoder style).

    Input int ``[n, F]`` with ``0 <= x[:, f] < vocab[f]`` (values are clipped into range so that
    padding rows never index out of the table); output ``[n, d]``.
    """

    def __init__(self, vocab: tuple, d: int, *, rngs: nnx.Rngs):
        self.vocab = tuple(int(v) for v in vocab)
        self.offsets = (0, *itertools.accumulate(self.vocab[:-1]))
        self.table = nnx.Embed(sum(self.vocab), d, rngs=rngs,
                               embedding_init=nnx.initializers.normal(0.02))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 2 or x.shape[1] != len(self.vocab):
            raise ValueError(f"categorical features must be [n, {len(self.vocab)}], got {x.shape}")
        hi = jnp.array(self.vocab) - 1
        idx = jnp.clip(x.astype(jnp.int32), 0, hi) + jnp.array(self.offsets)
        return self.table(idx).sum(1)


class FFN(nnx.Module):
    """``W2 act(W1 x + b1) + b2`` with an optional hidden-unit mask (structured weight pruning)."""

    def __init__(self, d: int, f: int, *, act: str = "relu", rngs: nnx.Rngs):
        self.w1 = nnx.Linear(d, f, rngs=rngs)
        self.w2 = nnx.Linear(f, d, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array, units: jax.Array | None = None) -> jax.Array:
        h = self.w1(x)
        h = jax.nn.gelu(h) if self.act == "gelu" else jax.nn.relu(h)
        if units is not None:
            h = h * units[: h.shape[-1]]
        return self.w2(h)


class GINE(nnx.Module):
    """GIN(E) layer on flat nodes: ``MLP(h_i + sum_j relu(h_j + e_ij))`` (eps = 0, PyG default).

    Padding edges are excluded with ``edge_mask``. Reference: Xu et al. 2019; Hu et al. 2020 (GINE).
    """

    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.lin1 = nnx.Linear(d, d, rngs=rngs)
        self.lin2 = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, h, senders, receivers, edge_mask, e=None):
        m = h[senders]
        if e is not None:
            m = jax.nn.relu(m + e)
        m = m * edge_mask[:, None].astype(m.dtype)
        agg = jax.ops.segment_sum(m, receivers, num_segments=h.shape[0])
        return self.lin2(jax.nn.relu(self.lin1(h + agg)))


def _ranks(x: jax.Array) -> jax.Array:
    """Rank of every entry along the last axis in descending order (0 = largest; ties by index)."""
    order = jnp.argsort(-x, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True), order


def select_tokens(scores: jax.Array, valid: jax.Array, keep: jax.Array, *, mode: str,
                  train: bool, rng: jax.Array | None, always: jax.Array | None = None):
    """GTSP node-token mask (``faithful``: the official code's; ``clean``: exact per graph).

    Args:
      scores: float ``[B, L]`` token scores (a learned linear map of the layer input).
      valid: bool ``[B, L]`` real-token mask (padding False).
      keep: float scalar keep ratio r in (0, 1] (traced; no recompile per ratio).
      mode: ``"faithful"``: log-softmax over all L positions (padding included), Gumbel noise also
        at eval, one ``k = floor(r L)`` for the whole batch, last position forced on;
        ``"clean"``: per-graph ``k_i = ceil(r n_i)`` among real non-``always`` tokens, padding
        never selected, Gumbel noise only in training.
      train: use the straight-through estimator ``hard - stopgrad(soft) + soft``; at eval the hard
        mask itself is returned (so all-ones masks are bitwise neutral).
      rng: Gumbel key (required in faithful mode and when training in clean mode).
      always: bool ``[B, L]`` tokens kept regardless (CLS / VNode).

    Returns ``(mask, hard, order)``: mask float32 ``[B, L]`` (forward value = hard), hard bool
    ``[B, L]``, and the descending score order int ``[B, L]`` (clean mode; used for gathering).
    """
    B, L = scores.shape
    scores = scores.astype(jnp.float32)
    always = jnp.zeros_like(valid) if always is None else always
    if mode == "faithful":
        if rng is None:
            raise ValueError("faithful token pruning samples Gumbel noise at train and eval: pass rng")
        logits = jax.nn.log_softmax(scores, axis=-1)
        z = logits + jax.random.gumbel(rng, logits.shape)
        soft = jax.nn.softmax(z, axis=-1)
        k = jnp.floor(keep * L + 1e-6).astype(jnp.int32)
        rank, order = _ranks(soft)
        hard = (rank < k) | always
        hard = hard.at[:, -1].set(True)
    elif mode == "clean":
        eligible = valid & ~always
        n = eligible.sum(-1)
        k = jnp.ceil(keep * n - 1e-6).astype(jnp.int32)
        noisy = scores
        if train:
            if rng is None:
                raise ValueError("clean token pruning in training samples Gumbel noise: pass rng")
            noisy = scores + jax.random.gumbel(rng, scores.shape)
        # always-kept tokens rank first, ineligible ones last; k counts eligible tokens only
        eff = jnp.where(always, 1e9, jnp.where(eligible, noisy, -1e9))
        rank, order = _ranks(eff)
        n_always = always.sum(-1)
        hard = (rank < (k + n_always)[:, None]) & (eligible | always)
        soft = jax.nn.softmax(jnp.where(eligible, noisy, NEG), axis=-1)
    else:
        raise ValueError(f"mode must be 'faithful' or 'clean', got {mode!r}")
    hardf = hard.astype(jnp.float32)
    mask = hardf - jax.lax.stop_gradient(soft) + soft if train else hardf
    return mask, hard, order


class MHA(nnx.Module):
    """Multi-head attention over dense per-graph tokens ``[B, T, d]`` with GTSP hooks.

    ``out = W_O concat_h(g_h * softmax(q_h k_h^T / sqrt(d_h) + bias_h) v_h) + b_O`` with
    key-padding mask. Hooks: ``head_gate`` [H] (clean: scales true per-head outputs before W_O, so
    g_h = 0 removes head h exactly), ``head_kernel_mask`` [H] (faithful, as the official code:
    zeroes the Q/K/V weight columns of a head but not biases or W_O, so an inactive head still
    leaks b_V), ``probe`` (mul [B, H], add [B, T, d]) on the output-projection output split into
    H channel blocks (where the official code takes its Taylor score).
    """

    def __init__(self, d: int, n_heads: int, head_dim: int, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q = nnx.Linear(d, n_heads * head_dim, rngs=rngs)
        self.k = nnx.Linear(d, n_heads * head_dim, rngs=rngs)
        self.v = nnx.Linear(d, n_heads * head_dim, rngs=rngs)
        self.o = nnx.Linear(n_heads * head_dim, d, rngs=rngs)

    def _proj(self, x, head_kernel_mask):
        col = None if head_kernel_mask is None else jnp.repeat(head_kernel_mask, self.head_dim)
        shp = x.shape[:-1] + (self.n_heads, self.head_dim)
        return tuple(linear(p, x, col).reshape(shp) for p in (self.q, self.k, self.v))

    def _finish(self, o, head_gate, probe):
        if head_gate is not None:
            o = o * head_gate[:, None].astype(o.dtype)
        out = linear(self.o, o.reshape(o.shape[:-2] + (-1,)))
        if probe is not None:
            mul, add = probe
            B, T, d = out.shape
            blk = out.reshape(B, T, self.n_heads, d // self.n_heads) * mul[:, None, :, None]
            out = blk.reshape(B, T, d) + add
        return out

    def __call__(self, x: jax.Array, key_mask: jax.Array, *, bias: jax.Array | None = None,
                 head_gate=None, head_kernel_mask=None, probe=None) -> jax.Array:
        q, k, v = self._proj(x, head_kernel_mask)
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        logits = jnp.where(key_mask[:, None, None, :], logits, NEG)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhc->bqhc", p, v)
        return self._finish(o, head_gate, probe)

    def segment(self, h: jax.Array, senders: jax.Array, receivers: jax.Array,
                key_mask: jax.Array, *, head_gate=None, head_kernel_mask=None) -> jax.Array:
        """Segment attention on flat nodes ``[N, d]`` over the (query=receiver, key=sender) pairs
        (all intra-graph pairs), with ``jraph.segment_softmax`` over receivers."""
        q, k, v = self._proj(h, head_kernel_mask)
        logits = (q[receivers] * k[senders]).sum(-1).astype(jnp.float32) / math.sqrt(self.head_dim)
        logits = jnp.where(key_mask[senders][:, None], logits, NEG)
        w = jraph.segment_softmax(logits, receivers, num_segments=h.shape[0])
        o = jax.ops.segment_sum(w[..., None].astype(v.dtype) * v[senders], receivers,
                                num_segments=h.shape[0])
        return self._finish(o, head_gate, None)


def gather_tokens(x: jax.Array, order: jax.Array, K: int) -> tuple[jax.Array, jax.Array]:
    """Take the first ``K`` tokens of each graph in ``order``: ``[B, L, d] -> [B, K, d]``."""
    idx = order[:, :K]
    return jnp.take_along_axis(x, idx[..., None], axis=1), idx


def scatter_tokens(y: jax.Array, idx: jax.Array, L: int) -> jax.Array:
    """Inverse of :func:`gather_tokens`: ``[B, K, d] -> [B, L, d]`` with zeros elsewhere."""
    B, K, d = y.shape
    out = jnp.zeros((B, L, d), y.dtype)
    return out.at[jnp.arange(B)[:, None], idx].set(y)
