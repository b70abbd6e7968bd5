"""Exact cosine top-K over a demonstration pool: chunked, with a running top-k merge, sharded.

This is the TopK stage of TopK+ConE (Liu et al. 2022; Peng et al. 2024, arXiv:2401.12087, Sec. 3),
which the official code runs as a FAISS ``IndexFlatIP`` search on L2-normalised embeddings, i.e.
exact cosine similarity. For queries q_i and pool rows p_j (both L2-normalised),

    s_ij = <q_i, p_j> = cos(q_i, p_j),      topk_i = the k largest s_ij, ties -> lower j.

Memory: the pool is split over the devices of a 1-D mesh (``NamedSharding``, rows on axis
``"data"``); each device scans its rows in chunks of ``chunk_size`` and keeps only a running
[Q, k] top-k, so the live score block is [Q_block, chunk_size] whatever the pool size
(1e6 x 384 float32 = 1.5 GB of pool, ~64 MB of scores at the defaults). The per-device top-k
lists are merged at the end. Ties resolve to the lower pool index because ``lax.top_k`` is
stable and every merge concatenates lower indices before higher ones.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["l2_normalize", "topk_cosine", "pool_mesh"]

_AXIS = "data"


def l2_normalize(x: np.ndarray | jax.Array, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by max(||row||_2, eps), float32 [N, D] (numpy, host side)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def pool_mesh(devices=None) -> Mesh:
    """1-D mesh with axis ``"data"`` over ``devices`` (default: all devices)."""
    devs = np.asarray(jax.devices() if devices is None else list(devices))
    return Mesh(devs.reshape(-1), (_AXIS,))


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh, k: int, chunk: int, n_chunks: int, n_valid: int):
    n_dev = mesh.shape[_AXIS]
    local = chunk * n_chunks

    def local_topk(q, pool):
        # q [Qb, D] replicated; pool [local, D] this device's rows.
        base = jax.lax.axis_index(_AXIS) * local
        chunks = pool.reshape(n_chunks, chunk, -1)
        qb = q.shape[0]
        init = (jnp.full((qb, k), -jnp.inf, jnp.float32), jnp.full((qb, k), -1, jnp.int32))

        def step(carry, xs):
            best_s, best_i = carry
            c, block = xs
            s = jnp.einsum("qd,pd->qp", q, block, precision=jax.lax.Precision.HIGHEST)
            idx = base + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
            s = jnp.where(idx[None] < n_valid, s, -jnp.inf)
            # Running entries all have lower indices than this chunk: stable top_k keeps ties
            # in index order.
            cat_s = jnp.concatenate([best_s, s], axis=1)
            cat_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, s.shape)], axis=1)
            top_s, pos = jax.lax.top_k(cat_s, k)
            return (top_s, jnp.take_along_axis(cat_i, pos, axis=1)), None

        # The first merge runs outside the scan so the carry is device-varying from the start
        # (shard_map requires scan carries to keep one varying-ness).
        first, _ = step(init, (jnp.int32(0), chunks[0]))
        (s, i), _ = jax.lax.scan(step, first, (jnp.arange(1, n_chunks, dtype=jnp.int32),
                                               chunks[1:]))
        return s[None], i[None]

    sharded = jax.shard_map(local_topk, mesh=mesh, in_specs=(P(), P(_AXIS, None)),
                            out_specs=(P(_AXIS), P(_AXIS)))

    def search(q, pool):
        s, i = sharded(q, pool)                       # [n_dev, Qb, k], device order = index order
        s = jnp.transpose(s, (1, 0, 2)).reshape(q.shape[0], n_dev * k)
        i = jnp.transpose(i, (1, 0, 2)).reshape(q.shape[0], n_dev * k)
        top_s, pos = jax.lax.top_k(s, k)
        return top_s, jnp.take_along_axis(i, pos, axis=1)

    return jax.jit(search)


def topk_cosine(queries, pool, k: int, *, chunk_size: int = 16384, query_block: int = 1024,
                mesh: Mesh | None = None, normalize: bool = True):
    """Exact top-k cosine neighbours of each query in ``pool``.

    Args:
      queries: float [Q, D] (or [D] for one query).
      pool: float [P, D], P >= 1.
      k: number of neighbours, 1 <= k <= P.
      chunk_size: pool rows scored at once per device (memory knob).
      query_block: queries per jitted call (memory knob; the last block is padded).
      mesh: 1-D mesh with axis ``"data"`` to shard the pool rows over (default: all devices).
      normalize: L2-normalise both sides first (set False if rows are already unit-norm).

    Returns:
      (scores float32 [Q, k] descending, indices int32 [Q, k] into ``pool``); ties -> lower index.

    Raises:
      ValueError: empty pool, k outside [1, P], mismatched or non-2-D shapes, bad knobs.
    """
    q = np.asarray(queries, np.float32)
    single = q.ndim == 1
    if single:
        q = q[None]
    pool = np.asarray(pool, np.float32) if not isinstance(pool, jax.Array) else pool
    if pool.ndim != 2 or pool.shape[0] == 0:
        raise ValueError(f"pool must be a non-empty [P, D] array, got shape {tuple(pool.shape)}")
    if q.ndim != 2 or q.shape[1] != pool.shape[1]:
        raise ValueError(f"queries must be [Q, {pool.shape[1]}] to match pool [P, D], got "
                         f"shape {tuple(np.shape(queries))}")
    n_pool = pool.shape[0]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n_pool:
        raise ValueError(f"k must be an int in [1, pool size={n_pool}], got {k!r}")
    if chunk_size < 1 or query_block < 1:
        raise ValueError(f"chunk_size and query_block must be >= 1, got {chunk_size=}, "
                         f"{query_block=}")
    mesh = pool_mesh() if mesh is None else mesh
    if mesh.axis_names != (_AXIS,):
        raise ValueError(f"mesh must be 1-D with axis names ('{_AXIS}',), got {mesh.axis_names}")
    n_dev = mesh.shape[_AXIS]
    per_dev = -(-n_pool // n_dev)
    chunk = min(chunk_size, per_dev)
    n_chunks = -(-per_dev // chunk)
    padded = n_dev * chunk * n_chunks
    if normalize:
        q = l2_normalize(q)
        pool = jnp.asarray(pool, jnp.float32)
        pool = pool / jnp.maximum(jnp.linalg.norm(pool, axis=-1, keepdims=True), 1e-12)
    pool = jnp.pad(jnp.asarray(pool, jnp.float32), ((0, padded - n_pool), (0, 0)))
    pool = jax.device_put(pool, NamedSharding(mesh, P(_AXIS, None)))
    fn = _search_fn(mesh, int(k), chunk, n_chunks, n_pool)
    qb = min(query_block, q.shape[0]) if q.shape[0] else 1
    out_s = np.zeros((q.shape[0], k), np.float32)
    out_i = np.zeros((q.shape[0], k), np.int32)
    replicated = NamedSharding(mesh, P())
    for s in range(0, q.shape[0], qb):
        blk = q[s:s + qb]
        n = blk.shape[0]
        blk = np.pad(blk, ((0, qb - n), (0, 0)))
        sc, ix = fn(jax.device_put(blk, replicated), pool)
        out_s[s:s + n] = np.asarray(sc)[:n]
        out_i[s:s + n] = np.asarray(ix)[:n]
    if single:
        return out_s[0], out_i[0]
    return out_s, out_i
