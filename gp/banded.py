"""Banded LU with partial pivoting, solves and log-determinants as ``lax.scan`` loops (float64).

Storage: "row band" ``rows[i, d] = B[i, i - kl + d]`` for ``d = 0..kl+ku`` (``n x (kl+ku+1)``);
entries that fall outside the matrix must be zero. Gaussian elimination with partial pivoting
(LAPACK ``gbtrf`` semantics: the pivot is chosen among the ``kl + 1`` rows that can be non-zero
in the current column, so U gains ``kl`` extra super-diagonals) runs as one scan over the
columns whose carry is the ``kl`` not-yet-pivoted rows aligned at the current column; the right
hand side is eliminated in the same pass and a second (reverse) scan back-substitutes.
Cost ``O(n kl (kl + ku))`` time, ``O(n (kl + ku))`` memory; reverse-mode autodiff goes through
both scans (pivot choices are piecewise constant). The pivoting is required because the
packet systems are not diagonally dominant.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cols_to_rows(values, start, n: int, kl: int, ku: int):
    """Scatter column windows into row-band storage.

    Args:
      values: ``[n, w]`` entries ``B[start[j] + p, j] = values[j, p]``.
      start: ``[n]`` int window start rows (static numpy or jax ints).
      n, kl, ku: matrix size and bandwidths; every entry must satisfy ``-ku <= i - j <= kl``
        (raises ``ValueError`` when a window is wider than the band, checked statically on ``w``).
    Returns: ``[n, kl+ku+1]`` row-band array.
    """
    w = values.shape[1]
    if w > kl + ku + 1:
        raise ValueError(f"window width {w} exceeds the band kl+ku+1 = {kl + ku + 1}")
    j = jnp.arange(n)[:, None]
    i = jnp.asarray(start)[:, None] + jnp.arange(w)[None, :]
    d = j - i + kl
    rows = jnp.zeros((n, kl + ku + 1), dtype=values.dtype)
    return rows.at[i, d].add(values)


def band_matvec_cols(values, start, v):
    """``(B^T v)_j = sum_p values[j, p] v[start_j + p]`` for column-window storage (``[n]``)."""
    w = values.shape[1]
    idx = jnp.asarray(start)[:, None] + jnp.arange(w)[None, :]
    return jnp.sum(values * v[idx], axis=1)


def band_rmatvec_cols(values, start, u):
    """``(B u)_i = sum_j B[i, j] u_j`` for column-window storage (``[n]``)."""
    n, w = values.shape
    idx = jnp.asarray(start)[:, None] + jnp.arange(w)[None, :]
    return jnp.zeros((n,), dtype=values.dtype).at[idx].add(values * u[:, None])


def lu_solve_logdet(rows, rhs, kl: int, ku: int):
    """Solve ``B x = rhs`` and return ``(x, log|det B|)`` for a row-band ``B`` (``[n, kl+ku+1]``).

    ``rhs`` is ``[n]``. A singular ``B`` gives inf/nan (no check inside jit). Vmap over a leading
    axis to factor several matrices in one loop.
    """
    n, width = rows.shape
    if width != kl + ku + 1:
        raise ValueError(f"rows must have kl+ku+1 = {kl + ku + 1} columns, got shape {rows.shape}")
    if rhs.shape != (n,):
        raise ValueError(f"rhs must have shape ({n},), got {rhs.shape}")
    dt = rows.dtype
    # kl identity rows below the matrix keep the carry full at the end; they have a zero in every
    # real column so they are never chosen as pivots of a non-singular B.
    pad = jnp.zeros((kl, width), dtype=dt).at[:, kl].set(1.0)
    rows_p = jnp.concatenate([rows, pad], axis=0)
    rhs_p = jnp.concatenate([rhs, jnp.zeros((kl,), dtype=dt)])
    # initial carry: rows 0..kl-1 aligned at column 0 (row i sits kl-i places left in band storage)
    init = []
    for i in range(kl):
        r = rows_p[i, kl - i:]
        init.append(jnp.concatenate([r, jnp.zeros((kl - i,), dtype=dt)]))
    carry0 = (jnp.stack(init) if kl else jnp.zeros((0, width), dtype=dt), rhs_p[:kl])

    def step(carry, inp):
        W, r = carry
        new_row, new_rhs = inp
        W = jnp.concatenate([W, new_row[None, :]], axis=0)
        r = jnp.concatenate([r, new_rhs[None]])
        p = jnp.argmax(jnp.abs(W[:, 0]))
        piv, piv_r = W[p], r[p]
        # move the previous top row into the pivot's slot; the order of the rest is irrelevant
        W = W.at[p].set(W[0])
        r = r.at[p].set(r[0])
        rest, rest_r = W[1:], r[1:]
        mult = rest[:, 0] / piv[0]
        rest = rest - mult[:, None] * piv[None, :]
        rest_r = rest_r - mult * piv_r
        rest = jnp.concatenate([rest[:, 1:], jnp.zeros((kl, 1), dtype=dt)], axis=1)
        return (rest, rest_r), (piv, piv_r)

    _, (U, c) = jax.lax.scan(step, carry0, (rows_p[kl:], rhs_p[kl:]))
    logdet = jnp.sum(jnp.log(jnp.abs(U[:, 0])))

    def back(xs_next, inp):
        u, ci = inp
        xi = (ci - u[1:] @ xs_next) / u[0]
        return jnp.concatenate([xi[None], xs_next[:-1]]), xi

    _, x = jax.lax.scan(back, jnp.zeros((width - 1,), dtype=dt), (U, c), reverse=True)
    return x, logdet


def dense_from_rows(rows, kl: int):
    """Dense ``[n, n]`` matrix from row-band storage (tests and debugging only)."""
    n, width = rows.shape
    i = jnp.arange(n)[:, None]
    j = i - kl + jnp.arange(width)[None, :]
    ok = (j >= 0) & (j < n)
    out = jnp.zeros((n, n), dtype=rows.dtype)
    return out.at[jnp.broadcast_to(i, j.shape)[ok], j[ok]].set(rows[ok])
