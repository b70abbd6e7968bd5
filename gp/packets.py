"""Kernel packets (KPs) for Matérn-(q+1/2) kernels: coefficients ``A``, values ``Phi``, queries.

Chen, Ding & Tuo, "Kernel Packet" (JMLR 23(127), 2022, arXiv:2203.03116) and Ding, Tuo & Zou,
"Beyond State Space Representation: A General Theory for Kernel Packets" (arXiv:2402.04022).
Column ``j`` of ``A`` holds the coefficients of packet ``phi_j(t) = sum_l A[l, j] K(t, x_l)`` over
the window of ``w = 2q + 3`` consecutive inputs (fewer at the two boundaries); ``Phi = K A`` and
``phi_j`` vanishes outside its window. Compact storage per column ``j``: window start
``start[j]`` and ``coef[j, p] = A[start[j] + p, j]``, ``phi[j, p] = Phi[start[j] + p, j]``,
``p = 0..w-1`` (inactive boundary slots hold zeros). ``A`` has bandwidth ``q+1``, ``Phi`` ``q``.

Stable construction. The naive recipe solves the L/R conditions
``sum_l a_l u_l^s exp(-/+u_l) = 0`` in window coordinates and sums ``a_l K(x_i - x_l)``; both
steps cancel like ``(lam h)^-(2q+1)``. Here, for windows with half-width ``rho = lam W / 2 <=
RHO_SERIES``:

1. **Conditions in a Newton-type exponential basis.** The span of the condition functions
   ``{u^s e^{-u}}_{s<n_L} U {u^s e^{u}}_{s<n_R}`` equals the span of the divided differences
   ``E_k(u) = [mu_0..mu_k] e^{mu u}`` (in ``mu``) over the node sequence
   ``(-1 x n_L, +1 x n_R)``, ``k < n_L + n_R``. Their Taylor series
   ``E_k(u) = sum_{m>=k} u^m/m! h_{m-k}(mu_0..mu_k)`` (``h`` = complete homogeneous symmetric
   polynomial) give rows ``~ v^k`` in the scaled coordinate ``v = u / rho``: a Vandermonde-like
   system whose conditioning does not degrade as ``lam h -> 0``.
2. **One-sided evaluation.** When the R-conditions are complete, ``sum_l a_l K_plus(t - x_l) = 0``
   identically, so ``phi(t) = sum_{x_l > t} a_l D(x_l - t)`` with the odd function
   ``D(r) = K_plus(r) - K_plus(-r) = O((lam r)^(2q+1))`` evaluated by its Taylor series (no
   cancellation); symmetrically ``phi(t) = sum_{x_l < t} a_l D(t - x_l)`` when the L-conditions
   are complete. This is the exponential analogue of the truncated-power B-spline formula.

Wider windows use the exponential rows scaled by ``exp(-rho)`` (no overflow) and the direct sum,
which is accurate there. The null vector comes from the bordered system ``[S; c^T] a = e_w`` with
``c_p = (-1)^p`` on the active slots: the packet coefficients alternate in sign (the condition
functions form an extended Chebyshev system), so ``c^T a = sum |a_p| > 0``; the system is
differentiable. Columns are finally scaled to ``||Phi[:, j]||_2 = 1`` (all results are invariant
to column scaling).
"""
from __future__ import annotations

import functools
import math
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gp import kernels

RHO_SERIES = 1.0
_SERIES_EXTRA = 26  # Taylor terms beyond degree 2q+1 for |v| <= 1, rho <= 1: error < 1e-19


class Packets(NamedTuple):
    """Compact banded storage of ``A`` and ``Phi`` plus what queries need (a JAX pytree)."""

    x: jax.Array        # [n] sorted distinct inputs
    start: jax.Array    # [n] int window start rows
    coef: jax.Array     # [n, w] A[start_j + p, j]
    phi: jax.Array      # [n, w] Phi[start_j + p, j]
    cfg: jax.Array      # [n] int window type (see _configs)
    series: jax.Array   # [n] bool: window evaluated with the one-sided series formula
    lam: jax.Array      # [] rate
    variance: jax.Array  # [] s^2


@lru_cache(maxsize=None)
def _configs(q: int) -> dict:
    """Static tables for the ``2q+3`` window types.

    cfg ``j`` (``j <= q``): left boundary (``n_L = j, n_R = q+1``, active slots ``0..j+q+1``);
    cfg ``q+1``: interior; cfg ``q+2+r``: right boundary (``n_L = q+1, n_R = q-r``, active slots
    ``r+1..2q+2``).
    """
    w = 2 * q + 3
    nconds = 2 * q + 2
    nt = nconds + _SERIES_EXTRA
    ncfg = 2 * q + 3
    nl = np.zeros(ncfg, int)
    nr = np.zeros(ncfg, int)
    lo = np.zeros(ncfg, int)
    hi = np.zeros(ncfg, int)
    for c in range(ncfg):
        if c <= q:
            nl[c], nr[c], lo[c], hi[c] = c, q + 1, 0, c + q + 1
        elif c == q + 1:
            nl[c], nr[c], lo[c], hi[c] = q + 1, q + 1, 0, w - 1
        else:
            r = c - q - 2
            nl[c], nr[c], lo[c], hi[c] = q + 1, q - r, r + 1, w - 1
    active = np.zeros((ncfg, w), bool)
    for c in range(ncfg):
        active[c, lo[c]:hi[c] + 1] = True
    # series coefficients: row k of cfg c is E~_k(v) = sum_m coef[c,k,m] rho^(m-k) v^m
    ser = np.zeros((ncfg, nconds, nt))
    unit = np.full((ncfg, nconds), -1, int)  # slot forced to zero by row k (k >= n_L + n_R)
    for c in range(ncfg):
        nodes = [-1] * nl[c] + [1] * nr[c]
        ncond = nl[c] + nr[c]
        for k in range(ncond):
            a = sum(1 for v in nodes[:k + 1] if v < 0)
            b = k + 1 - a
            for m in range(k, nt):
                mm = m - k
                h = 0
                for i in range(mm + 1):
                    ha = (-1) ** i * (math.comb(i + a - 1, i) if a else (1 if i == 0 else 0))
                    hb = math.comb(mm - i + b - 1, mm - i) if b else (1 if mm - i == 0 else 0)
                    h += ha * hb
                ser[c, k, m] = math.factorial(k) / math.factorial(m) * h
        inactive = [p for p in range(w) if not active[c, p]]
        for k, p in enumerate(inactive):
            unit[c, ncond + k] = p
    sign = np.where(active, (-1.0) ** np.arange(w)[None, :], 0.0)
    return dict(w=w, nl=nl, nr=nr, lo=lo, hi=hi, active=active, ser=ser, unit=unit, sign=sign)


def layout(n: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Static ``(start, cfg)`` arrays for ``n`` inputs (requires ``n >= 2q + 3``)."""
    w = 2 * q + 3
    if n < w:
        raise ValueError(f"kernel packets need n >= 2q+3 = {w} inputs, got n={n}")
    j = np.arange(n)
    start = np.clip(j - q - 1, 0, n - w)
    cfg = np.where(j <= q, j, np.where(j >= n - q - 1, q + 2 + (j - (n - q - 1)), q + 1))
    return start, cfg


def _tables(q: int, cfgs: np.ndarray) -> dict:
    """Per-column static tables for the window types ``cfgs`` (numpy, leading axis = columns)."""
    C = _configs(q)
    w = C["w"]
    K = 2 * q + 2
    M = C["ser"].shape[-1]
    shifted = np.zeros((len(cfgs), K, M))
    for i, c in enumerate(cfgs):
        for k in range(K):
            shifted[i, k, :M - k] = C["ser"][c, k, k:]
    unit_rows = np.zeros((len(cfgs), K, w))
    for i, c in enumerate(cfgs):
        for k in range(K):
            if C["unit"][c, k] >= 0:
                unit_rows[i, k, C["unit"][c, k]] = 1.0
    return dict(nl=C["nl"][cfgs], nr=C["nr"][cfgs], lo=C["lo"][cfgs], hi=C["hi"][cfgs],
                active=C["active"][cfgs], shifted=shifted, unit_rows=unit_rows,
                sign=C["sign"][cfgs])


def _condition_matrix(v, rho, T: dict, q: int):
    """Bordered ``[nb, w, w]`` systems: condition rows, unit rows, sign border row.

    ``T`` holds static per-column tables with leading size ``nb`` or 1 (broadcast).
    """
    K = 2 * q + 2
    act = T["active"][:, None, :]                              # [b, 1, w]
    series = rho <= RHO_SERIES
    rho_s = jnp.where(series, rho, RHO_SERIES)[:, None, None]
    rho_e = jnp.where(series, 2.0 * RHO_SERIES, rho)[:, None, None]
    vs = jnp.where(T["active"], v, 0.0)[:, None, :]            # [b, 1, w]
    us = rho_s * vs
    # series rows v^k sum_j ser[k, k+j] u^j (Horner in u = rho v)
    sh = T["shifted"]
    acc = jnp.zeros((v.shape[0], K, v.shape[1]), dtype=v.dtype)
    for j in reversed(range(sh.shape[-1])):
        acc = acc * us + sh[:, :, j, None]
    # integer powers v^0..v^(K-1) by products: a float `**` costs more than the Horner loop
    powers = [jnp.ones_like(vs)]
    for _ in range(K - 1):
        powers.append(powers[-1] * vs)
    powers = jnp.concatenate(powers, axis=1)                   # [b, K, w]
    rows_s = powers * acc
    # exponential rows scaled by exp(-rho): L_s = v^s e^{-rho(v+1)}, R_s = v^s e^{rho(v-1)}
    kk = np.arange(K)[None, :, None]
    nl = T["nl"][:, None, None]
    is_l = kk < nl
    spow = np.where(is_l, kk, kk - nl)[:, :, 0]                # [b or 1, K] static
    if spow.shape[0] == 1:
        powers_e = powers[:, spow[0], :]
    else:
        powers_e = jnp.take_along_axis(powers, jnp.asarray(spow)[:, :, None], axis=1)
    rows_e = powers_e * jnp.where(is_l, jnp.exp(-rho_e * (vs + 1.0)), jnp.exp(rho_e * (vs - 1.0)))
    is_cond = kk < (T["nl"] + T["nr"])[:, None, None]
    rows = jnp.where(series[:, None, None], rows_s, rows_e) * (is_cond & act) + T["unit_rows"]
    border = jnp.broadcast_to(jnp.asarray(T["sign"])[:, None, :], (v.shape[0], 1, v.shape[1]))
    return jnp.concatenate([rows, border], axis=1), series


def _knot_values(a, u, T: dict, series, q: int):
    """``phi`` (unit variance, unnormalised) at the window knots: ``[nb, w]``.

    One-sided series route: only the pairs ``(p, l)`` on the chosen side enter ``D`` (static
    pair lists when the whole block shares one window type); direct route: all pairs in ``K``.
    """
    w = 2 * q + 3
    act = T["active"]                                          # [b or 1, w]
    r_complete = T["nr"] == q + 1
    l_complete = T["nl"] == q + 1
    p_idx = np.arange(w)
    use_r = r_complete[:, None] & (~l_complete[:, None] | (p_idx[None, :] > q + 1))  # [b, w]

    def one_sided():
        if act.shape[0] == 1:
            P, L = [], []
            for p in range(w):
                if not act[0, p]:
                    continue
                for l in range(w):
                    if act[0, l] and ((l > p) if use_r[0, p] else (l < p)):
                        P.append(p)
                        L.append(l)
            P, L = np.array(P), np.array(L)
            S = np.zeros((len(P), w))
            S[np.arange(len(P)), P] = 1.0
            dz = jnp.where(series[:, None], jnp.abs(u[:, L] - u[:, P]), 0.0)
            return (a[:, L] * kernels.odd_part_unit(dz, q)) @ S
        diff = jnp.abs(u[:, None, :] - u[:, :, None])        # [b, p, l]
        side = np.where(use_r[:, :, None], p_idx[None, None, :] > p_idx[None, :, None],
                        p_idx[None, None, :] < p_idx[None, :, None]) & act[:, None, :]
        dz = jnp.where(series[:, None, None] & side, diff, 0.0)
        return jnp.sum(jnp.where(side, kernels.odd_part_unit(dz, q), 0.0) * a[:, None, :], axis=-1)

    def direct():
        diff = u[:, None, :] - u[:, :, None]
        Kv = kernels.matern_unit(jnp.where(series[:, None, None], 0.0, diff), q)
        return jnp.sum(Kv * (a * act)[:, None, :], axis=-1)

    def mixed():
        return jnp.where(series[:, None], one_sided(), direct())

    # a block whose windows all take one route skips the other (w^2 exponentials per column);
    # under vmap the switch becomes a select and computes all three, as a plain where would
    route = jnp.where(jnp.all(series), 0, jnp.where(jnp.any(series), 2, 1))
    return jax.lax.switch(route, [one_sided, direct, mixed]) * act


def _build_block(xi, lam, T: dict, q: int):
    """Coefficients and knot values for a block of columns (``xi [nb, w]``)."""
    w = 2 * q + 3
    lo = jnp.asarray(T["lo"])[:, None]
    hi = jnp.asarray(T["hi"])[:, None]
    x_lo = jnp.take_along_axis(xi, jnp.broadcast_to(lo, (xi.shape[0], 1)), axis=1)[:, 0]
    x_hi = jnp.take_along_axis(xi, jnp.broadcast_to(hi, (xi.shape[0], 1)), axis=1)[:, 0]
    centre = 0.5 * (x_lo + x_hi)
    half = 0.5 * (x_hi - x_lo)
    rho = lam * half
    u = lam * (xi - centre[:, None])
    v = (xi - centre[:, None]) / half[:, None]
    Msys, series = _condition_matrix(v, rho, T, q)
    rhs = jnp.zeros((xi.shape[0], w, 1), dtype=xi.dtype).at[:, -1, 0].set(1.0)
    a = jnp.linalg.solve(Msys, rhs)[..., 0] * T["active"]
    return a, _knot_values(a, u, T, series, q), series


BUILD_CHUNK = 32768


def _build_interior(xi, lam, q: int):
    """``_build_block`` over the interior windows, in rematerialised chunks of ``BUILD_CHUNK``.

    Each column's series rows and small solve hold ~``w^2 M`` floats of intermediates (7 KB per
    column for q = 1 under reverse mode): 7 GB of temporaries at n = 1e6 in one block. A
    ``lax.map`` over chunks keeps one chunk's intermediates alive (~0.25 GB) in the forward and
    JVP passes; checkpointing makes reverse mode (used for derivatives in ``x``) store only the
    chunk inputs. The result is the same computation.
    """
    block = functools.partial(_build_block, T=_tables(q, np.array([q + 1])), q=q)
    n_int, w = xi.shape
    if n_int <= BUILD_CHUNK:
        return block(xi, lam)
    n_chunks = -(-n_int // BUILD_CHUNK)
    # padding rows repeat a real window, so they stay well-conditioned; they are dropped below
    xi = jnp.concatenate([xi, jnp.broadcast_to(xi[-1:], (n_chunks * BUILD_CHUNK - n_int, w))])
    out = jax.lax.map(jax.checkpoint(lambda c: block(c, lam)), xi.reshape(n_chunks, BUILD_CHUNK, w))
    return tuple(o.reshape(n_chunks * BUILD_CHUNK, *o.shape[2:])[:n_int] for o in out)


def _reverse_by_forward_in_lam(block):
    """``block(xi, lam) -> (a, phi, series)`` whose reverse-mode derivative in ``lam`` is computed
    by one forward-mode pass.

    The packets depend on the hyperparameters only through the scalar rate ``lam``; reverse mode
    through the Horner rows, the small solves and the knot sums stores every intermediate and cost
    ~8x the construction (measured), while a JVP with a unit tangent costs ~3x and keeps only
    the output tangents, from which any cotangent's ``lam`` component is one dot product. The
    inputs ``xi`` keep exact reverse-mode derivatives (recomputed in the backward pass; dead code
    under ``jit`` when ``x`` is not differentiated). Being a custom VJP, the construction supports
    first-order reverse mode only: ``jax.jacfwd``/``jax.hessian`` through it raise JAX's
    ``TypeError`` (use ``method="ss"`` for those). A custom JVP returning ``t_out * lam_dot`` would
    keep forward mode, but its reverse-mode program hung at run time on XLA:CPU at n = 2e4 (jax
    0.10.2; fine at n = 6e3), so it is not used.
    """

    @jax.custom_vjp
    def wrapped(xi, lam):
        return block(xi, lam)

    def fwd(xi, lam):
        out, (ta, tphi, _) = jax.jvp(lambda l: block(xi, l), (lam,), (jnp.ones_like(lam),))
        return out, (xi, lam, ta, tphi)

    def bwd(res, ct):
        xi, lam, ta, tphi = res
        ca, cphi, _ = ct
        _, vjp_xi = jax.vjp(lambda z: block(z, lam)[:2], xi)
        return vjp_xi((ca, cphi))[0], jnp.sum(ca * ta) + jnp.sum(cphi * tphi)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def build(x, q: int, lengthscale, variance) -> Packets:
    """Construct the packets for sorted, distinct ``x`` (``[n]`` float64, ``n >= 2q+3``).

    Cost ``O(n q^3)``, vectorised over columns in ``2q+3`` static blocks (left boundary columns,
    interior, right boundary; no per-column table gathers). Hyperparameters may be traced
    (jit/vmap/grad). Raises ``ValueError`` for ``n < 2q+3``. Distinctness and sorting are
    checked by the GP API (:mod:`gp.api`), not here.
    """
    q = kernels.check_q(q)
    n = x.shape[0]
    start_np, cfg_np = layout(n, q)
    w = 2 * q + 3
    lam = jnp.asarray(kernels.rate(q, lengthscale), dtype=x.dtype)
    n_int = n - 2 * q - 2
    # interior columns share one window type: consecutive windows are static slices of x
    s0 = int(start_np[q + 1])
    xi_int = jnp.stack([x[s0 + p: s0 + p + n_int] for p in range(w)], axis=1)
    a_int, ph_int, se_int = _reverse_by_forward_in_lam(
        functools.partial(_build_interior, q=q))(xi_int, lam)
    # the 2q+2 boundary columns: one small block with per-column tables
    bcols = np.r_[np.arange(q + 1), np.arange(n - q - 1, n)]
    xi_b = x[start_np[bcols][:, None] + np.arange(w)[None, :]]
    a_b, ph_b, se_b = _reverse_by_forward_in_lam(
        functools.partial(_build_block, T=_tables(q, cfg_np[bcols]), q=q))(xi_b, lam)
    h = q + 1
    a_parts = [a_b[:h], a_int, a_b[h:]]
    phi_parts = [ph_b[:h], ph_int, ph_b[h:]]
    ser_parts = [se_b[:h], se_int, se_b[h:]]
    a = jnp.concatenate(a_parts)
    phi_unit = jnp.concatenate(phi_parts)
    series = jnp.concatenate(ser_parts)
    # keep only the band |i - j| <= q (the window's end knots are exact zeros of the packet)
    band = np.abs(start_np[:, None] + np.arange(w)[None, :] - np.arange(n)[:, None]) <= q
    phi_unit = jnp.where(band, phi_unit, 0.0)
    scale = jnp.sqrt(jnp.sum(phi_unit ** 2, axis=1))
    variance = jnp.asarray(variance, dtype=x.dtype)
    coef = a / (variance * scale)[:, None]
    phi = phi_unit / scale[:, None]
    return Packets(x, jnp.asarray(start_np), coef, phi, jnp.asarray(cfg_np), series, lam,
                   variance)


def active_index(x, t, q: int):
    """Interval index ``i`` (``x_i <= t < x_{i+1}``, -1 left of ``x_0``) and the ``2q+2`` candidate
    packet columns ``i-q .. i+q+1`` (clipped; ``valid`` marks the real ones). ``O(log n)`` each."""
    n = x.shape[0]
    i = jnp.searchsorted(x, t, side="right") - 1
    cols = i[..., None] + jnp.arange(-q, q + 2)
    valid = (cols >= 0) & (cols < n)
    return i, jnp.clip(cols, 0, n - 1), valid


def evaluate(pk: Packets, t, q: int):
    """Values ``phi_j(t)`` of the active packets at test points ``t`` (``[k]``).

    Returns ``(cols [k, 2q+2], vals [k, 2q+2])``; ``O(log n + q^2)`` per point. Inside the data
    range the one-sided series formula is used for series windows, else the direct sum
    ``sum_l A[l, j] K(t - x_l)`` (also outside ``[x_0, x_{n-1}]`` where only boundary packets
    are alive).
    """
    C = _configs(q)
    w = C["w"]
    x = pk.x
    n = x.shape[0]
    _, cols, valid = active_index(x, t, q)
    st = pk.start[cols]                                        # [k, J]
    knots = x[st[..., None] + jnp.arange(w)]                   # [k, J, w]
    coef = pk.coef[cols]                                       # [k, J, w]
    cfg = pk.cfg[cols]
    act = jnp.asarray(C["active"])[cfg]
    lo = jnp.asarray(C["lo"])[cfg]
    hi = jnp.asarray(C["hi"])[cfg]
    x_lo = jnp.take_along_axis(knots, lo[..., None], axis=-1)[..., 0]
    x_hi = jnp.take_along_axis(knots, hi[..., None], axis=-1)[..., 0]
    tt = t[:, None, None]
    r = pk.lam * (knots - tt)                                  # lam (x_l - t)
    inside = (t >= x[0]) & (t <= x[n - 1])
    series = pk.series[cols] & inside[:, None]
    r_ok = jnp.where(series[..., None] & act, jnp.abs(r), 0.0)
    Dv = kernels.odd_part_unit(r_ok, q)
    right = (knots > tt) & act
    left = (knots < tt) & act
    r_sum = jnp.sum(jnp.where(right, Dv, 0.0) * coef, axis=-1)
    l_sum = jnp.sum(jnp.where(left, Dv, 0.0) * coef, axis=-1)
    r_complete = jnp.asarray(C["nr"])[cfg] == q + 1
    l_complete = jnp.asarray(C["nl"])[cfg] == q + 1
    centre = 0.5 * (x_lo + x_hi)
    use_r = r_complete & (~l_complete | (t[:, None] >= centre))
    one_sided = jnp.where(use_r, r_sum, l_sum)
    Kv = kernels.matern_unit(jnp.where(series[..., None], 0.0, r), q)
    direct = jnp.sum(jnp.where(act, Kv, 0.0) * coef, axis=-1)
    # a packet is non-zero strictly inside its window; left (right) boundary packets also at and
    # beyond x_0 (x_{n-1}), where there is no data to vanish on
    is_left = cfg <= q
    is_right = cfg >= q + 2
    alive = ((t[:, None] > x_lo) | is_left) & ((t[:, None] < x_hi) | is_right)
    vals = pk.variance * jnp.where(series, one_sided, direct)
    return cols, jnp.where(valid & alive, vals, 0.0)
