"""Training / evaluation with GTSP schedules, data-parallel sharding and orbax checkpoints.

A step sees a stack of ``D`` equally-shaped padded batches (leading axis sharded over the mesh's
``data`` x ``fsdp`` axes, ``D = data*fsdp``; parameters replicated); the loss is the SUM over all
shards divided by the GLOBAL count of labelled (graph, task) pairs, so D shards of one batch give
the same gradient as one device. Batch order is a pure function of (seed, epoch), so resuming
from a checkpoint continues the same data stream.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from graphs import gtsp as G
from graphs import metrics
from graphs.data import GraphBatch, GraphDataset, bucket_budgets, make_batches, stack_batches
from graphs.models import Gates, GraphModel
from graphs.parallel import batch_sharding, data_mesh, data_parallel_size, replicated

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Optimiser and loop settings (official GTSP code: Adam lr 1e-3, wd 1e-5, batch 128)."""

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 32
    num_buckets: int = 2
    warmup: int = 10
    clip: float = 1.0
    seed: int = 0
    ckpt_dir: str | None = None
    ckpt_every: int = 0
    progress: bool = False


@dataclasses.dataclass
class FitResult:
    model: GraphModel
    gates: Gates
    weight_masks: object
    losses: list
    head_mask: np.ndarray
    ffn_units: np.ndarray
    layer_keep: np.ndarray
    steps_done: int


def task_loss(preds: jax.Array, batch: GraphBatch, task: str) -> tuple[jax.Array, jax.Array]:
    """(sum of per-label losses, number of labels) over real graphs and non-missing labels.

    binary: sigmoid cross-entropy per task; multiclass: softmax cross-entropy on
    ``labels[:, 0]``; regression: L1. Computed in float32.
    """
    preds = preds.astype(jnp.float32)
    gm = batch.graph_mask
    if task == "multiclass":
        y = batch.labels[:, 0].astype(jnp.int32)
        ll = optax.softmax_cross_entropy_with_integer_labels(preds, y)
        w = (gm & batch.label_mask[:, 0]).astype(jnp.float32)
        return (ll * w).sum(), w.sum()
    w = (batch.label_mask & gm[:, None]).astype(jnp.float32)
    if task == "binary":
        ll = optax.sigmoid_binary_cross_entropy(preds, batch.labels)
    elif task == "regression":
        ll = jnp.abs(preds - batch.labels)
    else:
        raise ValueError(f"task must be binary/multiclass/regression, got {task!r}")
    return (ll * w).sum(), w.sum()


def _loss(graphdef, rest, task, mode, train, eff, gates, batch, rng, probes=None):
    model = nnx.merge(graphdef, eff, rest)
    D = batch.graph_mask.shape[0]
    rngs = jax.random.split(rng, D)

    def one(b, r, pr):
        preds = model(b, gates, mode=mode, train=train, rng=r, probes=pr)
        return task_loss(preds, b, task)

    s, c = jax.vmap(one)(batch, rngs, probes)
    return s.sum() / jnp.maximum(c.sum(), 1.0)


@functools.lru_cache(maxsize=64)
def make_train_step(graphdef, tx, task: str, mode: str, double_step: bool = False):
    """Jitted ``(params, rest, opt_state, masks, gates, batch[D], rng) -> (params, opt_state,
    loss)``, cached per (graph structure, optimizer, task, mode) so repeated fits reuse the compile.

    Gradients are taken w.r.t. the effective weights ``w ⊙ m`` and masked; pruned weights are
    zeroed after the update (as the official GTSP code). ``double_step`` applies the optimizer a
    second time with the same gradients (a bug of the official GTSP code, kept for reproduction)."""

    def step(params, rest, opt_state, masks, gates, batch, rng):
        eff = G.apply_masks(params, masks)
        loss, g = jax.value_and_grad(
            lambda e: _loss(graphdef, rest, task, mode, True, e, gates, batch, rng))(eff)
        g = G.apply_masks(g, masks)
        upd, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, upd)
        if double_step:
            upd, opt_state = tx.update(g, opt_state, params)
            params = optax.apply_updates(params, upd)
        return G.apply_masks(params, masks), opt_state, loss

    return jax.jit(step)


@functools.lru_cache(maxsize=64)
def make_event_grads(graphdef, task: str, mode: str):
    """Jitted gradients used at GTSP events: w.r.t. effective weights (dense; GraNet regrowth),
    gates (clean Taylor importance) and probes (the official GTSP code's faithful head
    importance)."""

    def fn(params, rest, masks, gates, batch, rng, probes, train):
        eff = G.apply_masks(params, masks)
        return jax.grad(lambda e, g, p: _loss(graphdef, rest, task, mode, train, e, g, batch,
                                              rng, p), argnums=(0, 1, 2))(eff, gates, probes)

    return jax.jit(fn, static_argnames=("train",))


@functools.lru_cache(maxsize=16)
def _optimizer(lr, weight_decay, warmup, steps, clip):
    """AdamW with linear warm-up + cosine decay and global-norm clipping (cached: the same
    object keeps the jitted train step's cache key stable)."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(min(warmup, steps - 1), 1),
                                               max(steps, 2))
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(sched, weight_decay=weight_decay))


def _stacks(batches: list, D: int) -> list:
    """Group equally-shaped batches into stacks of D; a short group is filled with label-free
    copies (zero loss, zero gradient)."""
    by_shape: dict = {}
    for b in batches:
        key = (b.graph.nodes.shape, b.graph.senders.shape, b.dense_index.shape)
        by_shape.setdefault(key, []).append(b)
    out = []
    for group in by_shape.values():
        for i in range(0, len(group), D):
            chunk = group[i:i + D]
            while len(chunk) < D:
                chunk.append(chunk[0]._replace(label_mask=np.zeros_like(chunk[0].label_mask),
                                               graph_mask=np.zeros_like(chunk[0].graph_mask)))
            out.append(stack_batches(chunk))
    return out


class _Stream:
    """Deterministic stream of stacked batches: epoch e is shuffled with seed (seed, e)."""

    def __init__(self, ds, idx, cfg: FitConfig, spec, D, buckets):
        self.ds, self.idx, self.cfg, self.spec, self.D, self.buckets = ds, idx, cfg, spec, D, buckets
        self.epoch, self.items = -1, []
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, e):
        bs = make_batches(self.ds, self.idx, self.cfg.batch_size, spec=self.spec,
                          buckets=self.buckets, shuffle_seed=self.cfg.seed * 100003 + e)
        return _stacks(bs, self.D)

    def get(self, step: int):
        e, i = divmod(step, self.per_epoch)
        if e != self.epoch:
            self.epoch, self.items = e, self._epoch(e)
        return self.items[i]


def _ckpt_manager(path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(pathlib.Path(path).absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def fit(model: GraphModel, ds: GraphDataset, train_idx, cfg: FitConfig = FitConfig(),
        gcfg: G.GTSPConfig | None = None, *, mesh: jax.sharding.Mesh | None = None,
        callback: Callable[[int, float], None] | None = None) -> FitResult:
    """Train ``model`` on ``ds[train_idx]`` with GTSP ``gcfg`` (``None`` = unpruned).

    Data-parallel over ``mesh`` (an ``lmx.parallel.make_mesh`` mesh; default: one device), one
    stacked batch per ``data*fsdp`` shard. With ``cfg.ckpt_dir`` the state (params, optimizer,
    masks, GTSP state, step) is saved every ``ckpt_every`` steps and training resumes from the
    latest checkpoint. Returns the trained (masked) model, its gates and masks.
    """
    gcfg = gcfg or G.GTSPConfig()
    mcfg = model.cfg
    L, H, F = mcfg.n_layers, mcfg.n_heads, mcfg.d_ff
    mesh = mesh or data_mesh(1)
    D = data_parallel_size(mesh)
    rng_np = np.random.default_rng(gcfg.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = _optimizer(cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps, cfg.clip)
    rep, bsh = replicated(mesh), batch_sharding(mesh)
    params = jax.device_put(params, rep)
    opt_state = jax.device_put(tx.init(params), rep)
    # placed like the masks GTSP events write back, so the train step compiles once per shape
    masks = jax.device_put(G.ones_masks(params), rep)
    # faithful: the official random initial active set; clean: start dense, prune progressively
    head_mask = G.initial_heads(L, H, 1.0 - gcfg.head, rng_np, gcfg.mode) \
        if gcfg.head > 0 and gcfg.mode == "faithful" else np.ones((L, H), np.float32)
    units = np.ones((L, F), np.float32)
    drop = gcfg.layer
    start = 0
    mgr = _ckpt_manager(cfg.ckpt_dir) if cfg.ckpt_dir else None
    if mgr is not None and mgr.latest_step() is not None:
        import orbax.checkpoint as ocp

        target = {"params": params, "opt_state": opt_state, "masks": masks,
                  "head_mask": head_mask, "units": units, "step": np.asarray(0, np.int64)}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        st = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(abstract))
        params, opt_state, masks = st["params"], st["opt_state"], st["masks"]
        head_mask, units = np.asarray(st["head_mask"]), np.asarray(st["units"])
        start = int(st["step"])
        logger.info("resumed from the checkpoint of step %d in %s", start, cfg.ckpt_dir)
    step_fn = make_train_step(graphdef, tx, ds.task, gcfg.mode, gcfg.double_step)
    grad_fn = make_event_grads(graphdef, ds.task, gcfg.mode)
    buckets = bucket_budgets(ds.subset(train_idx), cfg.batch_size, cfg.num_buckets)
    stream = _Stream(ds, np.asarray(train_idx), cfg, mcfg.batch_spec(), D, buckets)
    events = set(G.event_steps(cfg.steps, gcfg)) if (gcfg.head or gcfg.weight) else set()
    ev_list = sorted(events)
    losses = []
    base_key = jax.random.key(cfg.seed)

    def gates_now():
        return G.gates_from(mcfg, token_keep=1.0 - gcfg.token, head=head_mask, drop_path=drop,
                            ffn_units=units)

    it = range(start, cfg.steps)
    if cfg.progress:
        from tqdm import tqdm

        it = tqdm(it, desc="fit", initial=start, total=cfg.steps)
    for step in it:
        batch = jax.device_put(stream.get(step), bsh)
        key = jax.random.fold_in(base_key, step)
        if step in events:
            probes = None
            if gcfg.mode == "faithful" and gcfg.head > 0 and mcfg.attention == "dense":
                one = G.make_probes(model, jax.tree.map(lambda x: x[0], batch), H)
                probes = jax.tree.map(lambda x: jnp.broadcast_to(x, (D,) + x.shape), one)
            g_eff, g_gates, g_probes = grad_fn(params, rest, masks, gates_now(), batch, key,
                                               probes, True)
            k = ev_list.index(step) + 1
            if gcfg.head > 0:
                if gcfg.mode == "faithful":
                    if probes is not None:
                        gm = np.asarray(batch.graph_mask).reshape(-1)
                        flat = [(np.asarray(a).reshape(-1, a.shape[-1]),
                                 np.asarray(b).reshape((-1,) + b.shape[2:])) for a, b in g_probes]
                        score, gnorm = G.probe_importance(flat, gm, H)
                    else:
                        score = gnorm = np.abs(np.asarray(g_gates.head))
                    head_mask = G.head_death_regrowth(head_mask, score, gnorm, gcfg.head_death)
                else:
                    score = np.abs(np.asarray(g_gates.head))
                    dens = G.cubic_density(k, len(ev_list), 1.0 - gcfg.head)
                    head_mask = G.progressive_heads(head_mask, score, dens)
            if gcfg.weight > 0:
                dens = G.cubic_density(k, len(ev_list), 1.0 - gcfg.weight)
                if gcfg.mode == "faithful":
                    cur = jax.device_get(G.apply_masks(params, masks))
                    masks = G.global_magnitude_masks(cur, masks, dens)
                    rate = G.cosine_death_rate(step, cfg.steps, gcfg.death_rate)
                    masks, grown = G.death_regrowth(cur, masks, jax.device_get(g_eff), rate)
                    # pruned and regrown weights start at zero (the official code zeroes them too)
                    params = jax.tree.map(lambda p, m, r: p * m * (1 - r), params, masks, grown)
                    masks = jax.device_put(masks, rep)
                    params = jax.device_put(params, rep)
                else:
                    nnx.update(model, params)
                    units = G.structured_unit_masks(G.ffn_unit_scores(model), units, dens)
        params, opt_state, loss = step_fn(params, rest, opt_state, masks, gates_now(), batch, key)
        losses.append(float(loss))
        if callback is not None:
            callback(step, float(loss))
        if mgr is not None and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            import orbax.checkpoint as ocp

            state = {"params": params, "opt_state": opt_state, "masks": masks,
                     "head_mask": head_mask, "units": units,
                     "step": np.asarray(step + 1, np.int64)}
            mgr.save(step + 1, args=ocp.args.StandardSave(state))
            logger.info("checkpoint of step %d written to %s", step + 1, cfg.ckpt_dir)
    if mgr is not None:
        mgr.wait_until_finished()
    nnx.update(model, G.apply_masks(params, masks))
    final_gates = gates_now()
    layer_keep = np.ones(L, np.float32)
    if gcfg.mode == "clean" and gcfg.layer > 0:
        imp = layer_importance(model, ds, train_idx, cfg, final_gates, gcfg.mode)
        layer_keep = G.layers_to_remove(imp, gcfg.layer)
    return FitResult(model, final_gates, masks, losses, head_mask, units, layer_keep,
                     cfg.steps)


def layer_importance(model: GraphModel, ds: GraphDataset, idx, cfg: FitConfig, gates: Gates,
                     mode: str, max_batches: int = 8) -> np.ndarray:
    """Taylor importance of each layer gate, ``sum_batches |dL/dg_l|`` at g = 1 (eval mode)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad_fn = make_event_grads(graphdef, ds.task, mode)
    masks = G.ones_masks(params)
    # the training buckets: the gradient function compiles once per bucket shape
    bs = make_batches(ds, idx, cfg.batch_size, spec=model.cfg.batch_spec(),
                      buckets=bucket_budgets(ds.subset(idx), cfg.batch_size,
                                             cfg.num_buckets))[:max_batches]
    imp = np.zeros(model.cfg.n_layers)
    for i, b in enumerate(bs):
        stacked = stack_batches([b])
        _, gg, _ = grad_fn(params, rest, masks, gates, stacked, jax.random.key(i), None, False)
        imp += np.abs(np.asarray(gg.layer))
    return imp


@functools.lru_cache(maxsize=128)
def eval_forward(graphdef, mode: str = "clean"):
    """Jitted eval-mode forward ``fwd(state, batch, gates, key) -> preds`` of the model whose
    ``nnx.split`` is ``(graphdef, state)``; cached per (structure, mode), so every caller shares
    one compile per batch shape. ``preds`` float32 ``[B, n_out]`` include padding graphs.

    Example: ``gd, state = nnx.split(model); eval_forward(gd)(state, batch, None, key)``.
    """

    def fwd(state, b, gates, key):
        return nnx.merge(graphdef, state)(b, gates, mode=mode, train=False, rng=key)

    return jax.jit(fwd)


def predict(model: GraphModel, batches: list, gates: Gates | None = None, *,
            mode: str = "clean", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels of the real graphs of ``batches`` (in batch order)."""
    graphdef, state = nnx.split(model)
    fwd = eval_forward(graphdef, mode)
    preds, labels = [], []
    for i, b in enumerate(batches):
        p = np.asarray(fwd(state, b, gates, jax.random.key(seed + i)))
        gm = np.asarray(b.graph_mask)
        lab = np.where(np.asarray(b.label_mask), np.asarray(b.labels), np.nan)
        preds.append(p[gm])
        labels.append(lab[gm])
    return np.concatenate(preds), np.concatenate(labels)


def score(task: str, preds: np.ndarray, labels: np.ndarray) -> dict:
    """Task metrics: binary -> ROC-AUC (OGB) and accuracy; multiclass -> accuracy;
    regression -> MAE and RMSE."""
    if task == "binary":
        out = {"accuracy": metrics.accuracy(np.nan_to_num(labels[:, 0]), preds[:, :1])}
        try:
            out["rocauc"] = metrics.roc_auc_ogb(labels, preds)
        except ValueError:
            out["rocauc"] = float("nan")
        return out
    if task == "multiclass":
        return {"accuracy": metrics.accuracy(labels[:, 0].astype(np.int64), preds)}
    return {"mae": metrics.mae(labels, preds), "rmse": metrics.rmse(labels, preds)}


def evaluate(model: GraphModel, ds: GraphDataset, idx, *, gates: Gates | None = None,
             mode: str = "clean", batch_size: int = 64, num_buckets: int = 2) -> dict:
    """Metrics of ``model`` on ``ds[idx]`` in padded batches of ``num_buckets`` size buckets
    (one forward compile per bucket)."""
    bs = make_batches(ds, idx, batch_size, spec=model.cfg.batch_spec(),
                      buckets=bucket_budgets(ds.subset(idx), batch_size, num_buckets))
    p, y = predict(model, bs, gates, mode=mode)
    return score(ds.task, p, y)
