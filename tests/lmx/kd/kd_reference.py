"""Float64 NumPy reference of the KD divergences and the ATKD decomposition and loss (Zhong et al.
2024, arXiv:2402.11890), written from the formulas (probability space, loops where clearer); the
library code is checked against it."""
from __future__ import annotations

import numpy as np


def softmax(z, tau=1.0):
    z = np.asarray(z, np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def kl(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)
    return t.sum(-1)


def divergence(q, p, kind, beta=0.5, skew=0.1, mix=0.9):
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "mixed_kl":
        return mix * kl(p, q) + (1 - mix) * kl(q, p)
    if kind == "sym_kl":
        return (1 - mix) * kl(p, q) + mix * kl(q, p)
    if kind in ("gjsd", "js_distance"):
        b = beta if kind == "gjsd" else 1 - mix
        if b == 0:
            return kl(p, q)
        if b == 1:
            return kl(q, p)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if kind == "skl":
        return kl(p, skew * p + (1 - skew) * q)
    if kind == "srkl":
        return kl(q, (1 - skew) * p + skew * q)
    if kind == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    raise ValueError(kind)


def decomposition(q, p, g, direction="forward"):
    """(tckd, nckd, unc_teacher, unc_student) per row, rows [..., V], targets g [...]."""
    q2, p2 = q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1])
    gg = np.asarray(g).reshape(-1)
    out = np.zeros((4, q2.shape[0]))
    for i in range(q2.shape[0]):
        k = gg[i]
        pg, qg = p2[i, k], q2[i, k]
        bp, bq = np.array([pg, 1 - pg]), np.array([qg, 1 - qg])
        rest = np.arange(q2.shape[1]) != k
        ph, qh = p2[i, rest] / (1 - pg), q2[i, rest] / (1 - qg)
        if direction == "forward":
            out[0, i], out[1, i] = kl(bp, bq), kl(ph, qh)
        else:
            out[0, i], out[1, i] = kl(bq, bp), kl(qh, ph)
        out[2, i], out[3, i] = 1 - pg, 1 - qg
    return [o.reshape(np.shape(g)) for o in out]


def threshold(unc_valid, k=0.5):
    u = np.sort(np.asarray(unc_valid, np.float64))
    return u[int(np.floor((1 - k) * (len(u) - 1) + 1e-9))]


def atkd(zs, zt, labels, k=0.5, lam=0.2, direction="forward", tau=1.0, normalize="per_group",
         ignore_index=-100):
    """Official ATKD on one split scope (all rows), shifted, from raw logits [B, T, V]."""
    zs, zt = np.asarray(zs, np.float64)[:, :-1], np.asarray(zt, np.float64)[:, :-1]
    y = np.asarray(labels)[:, 1:]
    m = y != ignore_index
    g = np.where(m, y, 0)
    q, p = softmax(zs, tau), softmax(zt, tau)
    tckd, nckd, unc, _ = decomposition(q, p, g, direction)
    if m.sum() == 0:
        return 0.0
    theta = threshold(unc[m], k)
    hard = m & (unc >= theta)
    easy = m & ~hard
    if normalize == "per_group":
        le = nckd[easy].sum() / max(1, easy.sum())
        lh = (tckd[hard] + nckd[hard]).sum() / max(1, hard.sum())
        return lam * le + (1 - lam) * lh
    return (lam * nckd[easy].sum() + (1 - lam) * (tckd[hard] + nckd[hard]).sum()) / m.sum()
