"""Analytic FLOPs counter for the three backbones (FLOPs = 2 x MACs of every matmul).

``count_flops(cfg, n, e, ...)`` counts the matmuls that :class:`graphs.models.GraphModel`
executes on a batch of ``b`` graphs padded to dense width ``m`` with ``n`` flat nodes and ``e``
flat edges (for one unpadded graph: ``b = 1, m = n``). Biases, norms, activations, softmax,
segment sums and embedding lookups are not matmuls: they are reported as ``aux`` (one FLOP per
element-op, an estimate), never mixed into ``core``.

``faithful_flops`` applies theoretical scaling rules (see its docstring) for masks that do not
change the executed computation (the official GTSP code's token zero-masking, unstructured weight
density, drop path).
"""
from __future__ import annotations

import math

import jax
import numpy as np

from graphs.models import GTConfig


def attention_core(T: int, d: int, h: int, dh: int, b: int = 1, kq: int | None = None) -> dict:
    """Matmul FLOPs of one MHA on ``b`` sequences of ``T`` tokens (``kq`` gathered tokens if set):
    Q,K,V ``6 T d h dh``, scores + weighted values ``4 T^2 h dh``, output ``2 T h dh d``.
    For N=10, d=64, h=4: 245,760 + 25,600 + 81,920 = 353,280 (a hand-computed check)."""
    t = T if kq is None else kq
    return {"qkv": b * 6 * t * d * h * dh, "scores": b * 4 * t * t * h * dh,
            "out": b * 2 * t * h * dh * d}


def _layer_tokens(cfg: GTConfig, li: int, T: int) -> int | None:
    tg = cfg.token_gather
    if tg is None or tg[li] is None or tg[li] >= 1.0:
        return None
    ns = cfg.n_special
    return min(T, math.ceil(tg[li] * (T - ns) - 1e-6) + ns)


def count_flops(cfg: GTConfig, n: int, e: int, *, b: int = 1, m: int | None = None,
                gated: bool = False) -> dict:
    """Per-block matmul FLOPs of one forward pass.

    Args:
      cfg: model config (exported configs give per-layer heads / FFN widths / gathered tokens).
      n, e: flat node and edge counts (padding included when counting a padded batch).
      b, m: number of graphs (padding graphs included) and dense width; ``m`` defaults to ``n``.
      gated: add the token scorers (run when gates are passed or tokens are gathered).
    Returns dict with per-block totals, ``core`` (sum of matmuls) and ``aux`` (element-op estimate).
    """
    m = n if m is None else m
    d, dh, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    out = {"embed": 0, "mpnn": 0, "qkv": 0, "scores": 0, "out": 0, "ffn": 0, "bias": 0,
           "scorer": 0, "head": 0}
    aux = 0
    if cfg.node_vocab is None:
        width = d - cfg.pe_width if (cfg.backbone == "gps" and cfg.pe != "none") else d
        out["embed"] += 2 * n * cfg.node_dim * width
    if cfg.backbone == "gps":
        T = m
        if cfg.pe != "none":
            out["embed"] += 2 * n * cfg.pe_dim * cfg.pe_width
        out["mpnn"] += L * 4 * n * d * d
        aux += L * (4 * e * d + 10 * n * d)
        tok_ffn = n
    elif cfg.backbone == "graphtrans":
        T = m + 1
        out["mpnn"] += cfg.gnn_layers * 4 * n * d * d + 2 * n * d * d
        aux += cfg.gnn_layers * (4 * e * d + 8 * n * d)
        tok_ffn = b * T
    else:
        T = m + 1
        if cfg.edge_vocab:
            out["bias"] += 2 * b * m * m * cfg.max_hops * cfg.n_heads * cfg.n_heads
        aux += b * m * m * cfg.n_heads * 3
        tok_ffn = b * T
    for li in range(L):
        h = cfg.layer_heads(li)
        f = cfg.layer_ffn(li)
        kq = _layer_tokens(cfg, li, T)
        if cfg.attention == "segment":
            P = b * m * m
            blk = {"qkv": 6 * n * d * h * dh, "scores": 4 * P * h * dh, "out": 2 * n * h * dh * d}
        else:
            blk = attention_core(T, d, h, dh, b=b, kq=kq)
        for k, v in blk.items():
            out[k] += v
        if gated or kq is not None:
            out["scorer"] += 2 * b * T * d
        out["ffn"] += 4 * tok_ffn * d * f
        t_att = kq if kq is not None else T
        aux += b * (5 * t_att * t_att * h) + 3 * b * T * d * 4 + 2 * tok_ffn * f
    out["head"] += 2 * b * d * (d // 2) + 2 * b * (d // 2) * cfg.n_out
    core = sum(out.values())
    return {**out, "core": core, "aux": aux, "total": core + aux}


def dataset_flops(cfg: GTConfig, graphs, *, gated: bool = False) -> float:
    """Mean core FLOPs per graph over unpadded graphs (each counted alone, ``b = 1``)."""
    tot = 0
    for g in graphs:
        tot += count_flops(cfg, int(g.n_node[0]), int(g.n_edge[0]), gated=gated)["core"]
    return tot / max(len(graphs), 1)


def faithful_flops(cfg: GTConfig, n: int, e: int, *, token_keep: float = 1.0,
                   head_density: float = 1.0, layers_removed: int = 0,
                   weight_density: float = 1.0) -> dict:
    """Theoretical inference FLOPs under these scaling rules (one unpadded graph):
    token keep r -> ``T`` replaced by ``ceil(rT)`` in the score terms only (tokens are zeroed, not
    gathered); head density -> projections and score terms x h'/h; removed layers subtracted;
    weight density rho -> every weight matmul x rho (unstructured, theoretical). Drop path does
    not change inference cost."""
    base = count_flops(cfg, n, e)
    L = cfg.n_layers
    T = n + cfg.n_special
    kt = math.ceil(token_keep * T - 1e-6)
    per_layer = {k: base[k] / L for k in ("qkv", "scores", "out", "ffn")}
    per_layer["scores"] *= (kt * kt) / (T * T)
    for k in ("qkv", "scores", "out"):
        per_layer[k] *= head_density
    if cfg.backbone == "gps":
        per_layer["mpnn"] = base["mpnn"] / L
        fixed = base["embed"] + base["head"]
    else:
        fixed = base["embed"] + base["mpnn"] + base["bias"] + base["head"]
    kept = L - layers_removed
    weights_part = sum(v for k, v in per_layer.items() if k != "scores") * kept + fixed
    core = weights_part * weight_density + per_layer["scores"] * kept
    return {"core": core}


def jaxpr_dot_flops(fn, *args) -> int:
    """2 x MACs of every ``dot_general`` in ``jax.make_jaxpr(fn)(*args)`` (nested jaxprs included)."""
    closed = jax.make_jaxpr(fn)(*args)

    def walk(jaxpr) -> int:
        tot = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                ls = eqn.invars[0].aval.shape
                rs = eqn.invars[1].aval.shape
                batch = int(np.prod([ls[i] for i in lb]))
                contract = int(np.prod([ls[i] for i in lc]))
                lfree = int(np.prod([s for i, s in enumerate(ls) if i not in lc and i not in lb]))
                rfree = int(np.prod([s for i, s in enumerate(rs) if i not in rc and i not in rb]))
                tot += 2 * batch * contract * lfree * rfree
            for sub in _subjaxprs(eqn.params):
                tot += walk(sub)
        return tot

    return walk(closed.jaxpr)


def _subjaxprs(params):
    for v in params.values():
        vals = v if isinstance(v, (tuple, list)) else (v,)
        for x in vals:
            if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr
            elif hasattr(x, "eqns"):
                yield x


def xla_flops(fn, *args) -> float:
    """XLA's ``cost_analysis()['flops']`` of ``jax.jit(fn)`` compiled for ``args``."""
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"])
