"""GTSP: four-way sparsification of Graph Transformers (Liu et al. 2023, arXiv:2312.05479).

"Official code" below is the authors' PyTorch implementation, github.com/LiuChuang0059/GTSP.

Axes and policies (``mode``):

===========  ===============================================  ==============================================
axis         faithful (as the official code)                   clean (exact, physically removable)
===========  ===============================================  ==============================================
tokens       zero-input masking, batch-level k = floor(rL),   per-graph k_i = ceil(r n_i), padding excluded,
             padding eligible, Gumbel at eval, last forced     dropped tokens removed as keys, zero output;
                                                               export gathers the kept tokens (real savings)
heads        random initial active set; Q/K/V weight columns   gate on true per-head outputs before W_O;
             zeroed (biases/W_O not: bias leak); Taylor score  Taylor score |dL/dg_h|; export slices heads
             on W_O-output channel blocks; death/regrowth
layers       node-wise drop path on the attention branch       per-graph layer drop in training; export
             (identity at eval, nothing removed)               removes the layers with lowest |dL/dg_l|
weights      GraNet: global magnitude masks on every >=2-D     structured: FFN hidden units pruned by group
             tensor, cubic schedule, death + gradient regrowth magnitude (global, cubic schedule); export
                                                               slices W1 columns / W2 rows
===========  ===============================================  ==============================================

Sparsity ``s`` on an axis means: token keep ratio ``1 - s``; head density ``1 - s``; drop-path /
layer-drop probability ``s`` and (clean export) ``round(s L)`` layers removed; final weight
density ``1 - s``. The scores an event ranks are jax functions (computed by
``graphs.train.make_event_scores`` inside one jitted function over the global batch); the
decisions over them (top-k, thresholds, death/regrowth) are numpy; device-side masks are
:class:`Gates`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from graphs.models import Gates, GraphModel, GTConfig


@dataclasses.dataclass(frozen=True)
class GTSPConfig:
    """Sparsity per axis in [0, 1) and the official code's schedules (heads, weights; GraNet,
    Liu et al. 2021, arXiv:2106.10404).

    ``update_every`` = the official update_frequency / GraNet ΔT (steps); pruning events run between
    ``prune_start`` and ``prune_end`` (fractions of training; official: epochs 10 and 80 of 100);
    ``death_rate`` = GraNet's initial death/regrowth fraction (cosine-decayed to 0.005);
    ``head_death`` = the official growth_death_ratio; ``double_step`` reproduces the official code's
    second optimizer step
    (a bug; off by default).
    """

    mode: str = "clean"
    token: float = 0.0
    head: float = 0.0
    layer: float = 0.0
    weight: float = 0.0
    update_every: int = 200
    prune_start: float = 0.1
    prune_end: float = 0.8
    death_rate: float = 0.5
    head_death: float = 0.5
    double_step: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("faithful", "clean"):
            raise ValueError(f"mode must be 'faithful' or 'clean', got {self.mode!r}")
        for k in ("token", "head", "layer", "weight"):
            v = getattr(self, k)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{k} sparsity must be in [0, 1), got {v}")
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")
        if not 0.0 <= self.prune_start <= self.prune_end <= 1.0:
            raise ValueError("need 0 <= prune_start <= prune_end <= 1")


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

def cubic_density(i: int, n: int, final_density: float, init_density: float = 1.0) -> float:
    """Zhu & Gupta / GraNet density after event ``i`` of ``n``:
    ``d_i = d_f + (d_0 - d_f) (1 - i/n)^3`` (so ``d_n = d_f``)."""
    if n < 1 or not 0 <= i <= n:
        raise ValueError(f"need 0 <= i <= n and n >= 1, got i={i}, n={n}")
    return final_density + (init_density - final_density) * (1.0 - i / n) ** 3


def cosine_death_rate(step: int, total: int, start: float = 0.5, floor: float = 0.005) -> float:
    """GraNet's death rate: cosine decay from ``start`` to ``floor`` over ``total`` steps."""
    t = min(max(step, 0), total) / max(total, 1)
    return floor + 0.5 * (start - floor) * (1.0 + math.cos(math.pi * t))


def event_steps(total_steps: int, cfg: GTSPConfig) -> list[int]:
    """Pruning-event steps: every ``update_every`` steps in [prune_start, prune_end] x total."""
    t0 = int(cfg.prune_start * total_steps)
    t1 = int(cfg.prune_end * total_steps)
    ev = [t for t in range(max(t0, 1), t1 + 1) if t % cfg.update_every == 0]
    return ev or [max(t1, 1)]


# ----------------------------------------------------------------------------------------------
# Weight masks (faithful GraNet)
# ----------------------------------------------------------------------------------------------

def is_prunable(x) -> bool:
    """The official code masks every parameter with >= 2 dims (kernels, embeddings, classifier)."""
    return getattr(x, "ndim", 0) >= 2


def ones_masks(params):
    """All-ones float32 masks with the structure of ``params`` (an ``nnx.State``)."""
    return jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), params)


def apply_masks(params, masks):
    """Effective weights ``w ⊙ m`` (×1.0 where unmasked, so all-ones masks are exact)."""
    return jax.tree.map(lambda p, m: (p * m).astype(p.dtype), params, masks)


def global_magnitude_masks(params, masks, density: float):
    """Keep the ``round(density x total)`` largest ``|w ⊙ m|`` entries over all prunable tensors
    (one global threshold, as the official code and GraNet). Non-prunable leaves keep all-ones
    masks."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    leaves, tdef = jax.tree.flatten(params)
    mleaves = jax.tree.leaves(masks)
    pr = [i for i, p in enumerate(leaves) if is_prunable(p)]
    mags = np.concatenate([np.abs(np.asarray(leaves[i]) * np.asarray(mleaves[i])).ravel()
                           for i in pr])
    total = mags.size
    keep = int(round(density * total))
    order = np.argsort(-mags, kind="stable")
    flat = np.zeros(total, np.float32)
    flat[order[:keep]] = 1.0
    out, off = [np.ones(np.shape(m), np.float32) for m in mleaves], 0
    for i in pr:
        n = int(np.size(leaves[i]))
        out[i] = flat[off:off + n].reshape(np.shape(leaves[i]))
        off += n
    return jax.tree.unflatten(tdef, [jnp.asarray(o) for o in out])


def death_regrowth(params, masks, grads, rate: float):
    """GraNet step: per prunable tensor remove ``ceil(rate x nnz)`` smallest-|w| survivors and
    regrow as many currently-zero positions with the largest ``|dL/d(w ⊙ m)|`` (``grads`` are
    w.r.t. the effective weights, so they are dense). nnz is unchanged. Returns
    ``(new_masks, regrown)`` where ``regrown`` marks positions to re-initialise at 0."""
    leaves, tdef = jax.tree.flatten(params)
    ml = jax.tree.leaves(masks)
    gl = jax.tree.leaves(grads)
    new, grown = [], []
    for p, m, g in zip(leaves, ml, gl):
        m = np.asarray(m).copy()
        reg = np.zeros_like(m)
        if is_prunable(p):
            flat_m = m.ravel()
            nnz = int(flat_m.sum())
            k = min(int(math.ceil(rate * nnz)), nnz, flat_m.size - nnz)
            if k > 0:
                w = np.abs(np.asarray(p)).ravel()
                alive = np.flatnonzero(flat_m > 0)
                kill = alive[np.argsort(w[alive], kind="stable")[:k]]
                dead = np.flatnonzero(flat_m == 0)
                gabs = np.abs(np.asarray(g)).ravel()
                grow = dead[np.argsort(-gabs[dead], kind="stable")[:k]]
                flat_m[kill] = 0.0
                flat_m[grow] = 1.0
                reg.ravel()[grow] = 1.0
            m = flat_m.reshape(m.shape)
        new.append(jnp.asarray(m))
        grown.append(jnp.asarray(reg))
    return jax.tree.unflatten(tdef, new), jax.tree.unflatten(tdef, grown)


def density(masks, params) -> float:
    """Global density of the prunable tensors."""
    tot = kept = 0
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
        if is_prunable(p):
            tot += int(np.size(m))
            kept += float(np.asarray(m).sum())
    return kept / max(tot, 1)


# ----------------------------------------------------------------------------------------------
# Structured FFN units (clean weights)
# ----------------------------------------------------------------------------------------------

def ffn_unit_scores(model: GraphModel) -> jax.Array:
    """Group magnitude of every FFN hidden unit ``u``: ``sqrt(||W1[:, u]||^2 + b1_u^2 +
    ||W2[u, :]||^2)``; float32 ``[L, F]``. jax ops, so a pruning event computes it inside its
    jitted score function (:func:`graphs.train.make_event_scores`)."""
    rows = []
    for layer in model.layers:
        w1 = layer.ffn.w1.kernel[...]
        b1 = layer.ffn.w1.bias[...]
        w2 = layer.ffn.w2.kernel[...]
        rows.append(jnp.sqrt((w1 ** 2).sum(0) + b1 ** 2 + (w2 ** 2).sum(1)))
    return jnp.stack(rows).astype(jnp.float32)


def structured_unit_masks(scores: np.ndarray, current: np.ndarray, density: float) -> np.ndarray:
    """Global threshold over FFN units: keep the ``round(density x L x F)`` highest-scoring units
    among those still alive (monotone pruning), at least one per layer."""
    L, F = scores.shape
    keep = max(int(round(density * L * F)), L)
    s = np.where(current > 0, scores, -np.inf).ravel()
    order = np.argsort(-s, kind="stable")
    m = np.zeros(L * F, np.float32)
    m[order[:keep]] = 1.0
    m = m.reshape(L, F) * (current > 0)
    for li in range(L):
        if m[li].sum() == 0:
            m[li, int(np.argmax(np.where(current[li] > 0, scores[li], -np.inf)))] = 1.0
    return m


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------

def initial_heads(L: int, H: int, density: float, rng: np.random.Generator,
                  mode: str) -> np.ndarray:
    """Active-head mask ``[L, H]`` with ``max(1, round(density H))`` heads per layer: a random
    subset in faithful mode (official code) and the first heads in clean mode (importance decides
    later)."""
    k = max(1, int(round(density * H)))
    m = np.zeros((L, H), np.float32)
    for li in range(L):
        idx = rng.permutation(H)[:k] if mode == "faithful" else np.arange(k)
        m[li, idx] = 1.0
    return m


def head_death_regrowth(active: np.ndarray, score: np.ndarray, gnorm: np.ndarray,
                        ratio: float) -> np.ndarray:
    """Official head update per layer: kill ``ceil(ratio x #active)`` active heads with the lowest
    ``score``, then enable as many heads among the now-inactive ones (just-killed included) with
    the highest ``gnorm``. The active count is unchanged (dynamic sparse training over heads)."""
    out = active.copy()
    for li in range(active.shape[0]):
        act = np.flatnonzero(active[li] > 0)
        k = int(math.ceil(ratio * act.size))
        if k == 0 or act.size == active.shape[1]:
            continue
        kill = act[np.argsort(score[li, act], kind="stable")[:k]]
        out[li, kill] = 0.0
        inact = np.flatnonzero(out[li] == 0)
        grow = inact[np.argsort(-gnorm[li, inact], kind="stable")[:k]]
        out[li, grow] = 1.0
    return out


def progressive_heads(active: np.ndarray, score: np.ndarray, density: float) -> np.ndarray:
    """Clean-mode head schedule: per layer keep the ``max(1, round(density H))`` active heads
    with the highest Taylor score ``|dL/dg_h|`` (monotone: pruned heads stay pruned)."""
    H = active.shape[1]
    k = max(1, int(round(density * H)))
    out = np.zeros_like(active)
    for li in range(active.shape[0]):
        s = np.where(active[li] > 0, score[li], -np.inf)
        out[li, np.argsort(-s, kind="stable")[:min(k, int((active[li] > 0).sum()))]] = 1.0
    return out


def make_probes(model: GraphModel, batch, n_heads: int):
    """Zero-effect probes for the official (faithful) head importance: per layer ``(mul [B, H] = 1,
    add [B, T, d] = 0)`` on the attention output after W_O (channel blocks = "heads")."""
    B = batch.dense_index.shape[0]
    T = model.tokens_per_graph(batch)
    d = model.cfg.d_model
    return [(jnp.ones((B, n_heads)), jnp.zeros((B, T, d))) for _ in range(model.cfg.n_layers)]


def probe_importance(probe_grads, graph_mask, n_heads: int) -> tuple[jax.Array, jax.Array]:
    """Official-code head scores from probe gradients, averaged over the real graphs ``b``:
    ``score_h = mean_b |sum_{n,c in h} o dL/do|`` (= the mul gradient) and
    ``gnorm_h = mean_b sum_{n,c in h} |dL/do|`` (from the add gradient); ``[L, H]`` each.

    ``probe_grads``: per layer ``(dL/dmul [..., H], dL/dadd [..., T, d])`` with the leading
    batch dims of ``graph_mask`` (e.g. ``[D, B]`` for a stack of ``D`` padded batches). jax ops:
    inside a jitted function over a sharded stack the means are reductions across the mesh, so
    every device (and process) gets the same scores."""
    gm = jnp.asarray(graph_mask, jnp.float32).reshape(-1)
    nb = jnp.maximum(gm.sum(), 1.0)
    score, gnorm = [], []
    for gmul, gadd in probe_grads:
        T, d = gadd.shape[-2:]
        blk = jnp.abs(gadd).reshape(-1, T, n_heads, d // n_heads).sum((1, 3))
        score.append((jnp.abs(gmul).reshape(-1, n_heads) * gm[:, None]).sum(0) / nb)
        gnorm.append((blk * gm[:, None]).sum(0) / nb)
    return jnp.stack(score), jnp.stack(gnorm)


# ----------------------------------------------------------------------------------------------
# Clean export: a physically smaller model
# ----------------------------------------------------------------------------------------------

def export_clean(model: GraphModel, *, head_mask: np.ndarray | None = None,
                 layer_keep: np.ndarray | None = None, ffn_units: np.ndarray | None = None,
                 token_keep: float | None = None, weight_masks=None) -> GraphModel:
    """Build the pruned model that equals the clean-gated model on the kept parts.

    Removes layers with ``layer_keep[l] == 0``, heads with ``head_mask[l, h] == 0`` (Q/K/V
    columns and W_O rows), FFN units with ``ffn_units[l, u] == 0`` (W1 columns, b1, W2 rows) and,
    with ``token_keep``, makes every kept layer gather only its top ``ceil(r n_i)`` tokens
    (static ``K = ceil(r M)`` slots per graph). ``weight_masks`` (faithful GraNet) are folded into
    the weights (unstructured: no speed-up, theoretical FLOPs only). Raises ``ValueError`` on
    shape mismatches or if every layer / every head of a kept layer would be removed.
    """
    cfg: GTConfig = model.cfg
    if cfg.heads is not None:
        raise ValueError("model is already exported")
    L, H, F = cfg.n_layers, cfg.n_heads, cfg.d_ff
    head_mask = np.ones((L, H)) if head_mask is None else np.asarray(head_mask)
    layer_keep = np.ones(L) if layer_keep is None else np.asarray(layer_keep)
    ffn_units = np.ones((L, F)) if ffn_units is None else np.asarray(ffn_units)
    if head_mask.shape != (L, H) or layer_keep.shape != (L,) or ffn_units.shape != (L, F):
        raise ValueError(f"masks must be head [L,H]={L, H}, layer [L]={L}, ffn [L,F]={L, F}; got "
                         f"{head_mask.shape}, {layer_keep.shape}, {ffn_units.shape}")
    kept = [li for li in range(L) if layer_keep[li] > 0]
    if not kept:
        raise ValueError("layer_keep removes every layer")
    heads = tuple(int((head_mask[li] > 0).sum()) for li in kept)
    if min(heads) == 0:
        raise ValueError("a kept layer has no active head; remove that layer instead")
    ffn = tuple(max(int((ffn_units[li] > 0).sum()), 1) for li in kept)
    if token_keep is not None and not 0.0 < token_keep <= 1.0:
        raise ValueError(f"token_keep must be in (0, 1], got {token_keep}")
    if token_keep is not None and cfg.attention != "dense":
        raise ValueError("physical token gather needs attention='dense'")
    head_ids = tuple(tuple(int(h) for h in np.flatnonzero(head_mask[li] > 0)) for li in kept)
    new_cfg = dataclasses.replace(cfg, n_layers=len(kept), heads=heads, head_ids=head_ids, ffn=ffn,
                                  token_gather=None if token_keep is None
                                  else tuple(float(token_keep) for _ in kept))
    state = nnx.state(model, nnx.Param)
    if weight_masks is not None:
        state = apply_masks(state, weight_masks)
    old = nnx.to_pure_dict(state)
    new_model = GraphModel(new_cfg, rngs=nnx.Rngs(0))
    new_state = nnx.state(new_model, nnx.Param)
    tgt = nnx.to_pure_dict(new_state)
    dh = cfg.head_dim
    for k in tgt:
        if k != "layers":
            tgt[k] = old[k]
    for j, li in enumerate(kept):
        src = old["layers"][li]
        hcols = np.concatenate([np.arange(h * dh, (h + 1) * dh) for h in range(H)
                                if head_mask[li, h] > 0])
        units = np.flatnonzero(ffn_units[li] > 0)
        units = units if units.size else np.array([int(np.argmax(ffn_units[li]))])
        lay = jax.tree.map(lambda x: x, src)
        att = lay["block"]["attn"]
        for p in ("q", "k", "v"):
            att[p]["kernel"] = src["block"]["attn"][p]["kernel"][:, hcols]
            att[p]["bias"] = src["block"]["attn"][p]["bias"][hcols]
        att["o"]["kernel"] = src["block"]["attn"]["o"]["kernel"][hcols, :]
        f = lay["ffn"]
        f["w1"]["kernel"] = src["ffn"]["w1"]["kernel"][:, units]
        f["w1"]["bias"] = src["ffn"]["w1"]["bias"][units]
        f["w2"]["kernel"] = src["ffn"]["w2"]["kernel"][units, :]
        tgt["layers"][j] = lay
    nnx.replace_by_pure_dict(new_state, tgt)
    nnx.update(new_model, new_state)
    return new_model


def layers_to_remove(importance: np.ndarray, sparsity: float) -> np.ndarray:
    """Layer keep mask ``[L]`` removing the ``round(sparsity L)`` least important layers (at
    least one layer stays)."""
    L = importance.size
    n_rm = min(int(round(sparsity * L)), L - 1)
    keep = np.ones(L, np.float32)
    keep[np.argsort(importance, kind="stable")[:n_rm]] = 0.0
    return keep


def gates_from(cfg: GTConfig, *, token_keep=1.0, head=None, layer=None, drop_path=0.0,
               ffn_units=None) -> Gates:
    """A :class:`Gates` pytree from host values (missing axes are all-ones / off)."""
    L, H, F = cfg.n_layers, cfg.n_heads, cfg.d_ff
    return Gates(token_keep=jnp.full((L,), token_keep, jnp.float32),
                 head=jnp.ones((L, H)) if head is None else jnp.asarray(head, jnp.float32),
                 layer=jnp.ones((L,)) if layer is None else jnp.asarray(layer, jnp.float32),
                 drop_path=jnp.asarray(drop_path, jnp.float32),
                 ffn_units=jnp.ones((L, F)) if ffn_units is None
                 else jnp.asarray(ffn_units, jnp.float32))
