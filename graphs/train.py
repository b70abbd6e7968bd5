"""GTSP training as pure step factories, the loop that drives them, evaluation.

:func:`make_gtsp_steps` gives the pieces (:class:`GTSPSteps`): ``init(model) -> state``, a jitted
``step(state, batch, key) -> (state, metrics)`` and the pruning event ``prune(state, batch, key)
-> state`` that a loop calls between steps when ``is_event(step)`` (GTSP, Liu et al. 2023,
arXiv:2312.05479, Sec. 3: token, head, layer and weight sparsification). The state is the
project's ``lmx.train.TrainState`` and the step an ``lmx.train.Step``; :func:`fit` drives them
with the project's one loop, ``lmx.train.run`` (deterministic batch stream, the pruning event
as a hook, orbax checkpoint/resume); a user can write their own loop instead.

A step sees a stack of ``D`` equally-shaped padded batches whose leading axis is split over the
mesh's ``data`` x ``fsdp`` axes; parameters, optimizer state and masks are replicated (the graph
models are small). The loss is the SUM over the stack divided by the GLOBAL count of labelled
(graph, task) pairs, so D shards of one stack give the same gradient as one device holding it.
A pruning event's scores come from one jitted function over that global stack with replicated
outputs (:func:`make_event_scores`), so in a multi-process run, where each process feeds only
its block of the stack, every process ranks the same scores and reaches the same masks.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.struct
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from graphs import gtsp as G
from graphs import metrics
from graphs.data import GraphBatch, GraphDataset, bucket_budgets, make_batches, stack_batches
from graphs.models import Gates, GraphModel
from graphs.parallel import check_stack, data_mesh, data_parallel_size, replicated, shard_batch
from lmx.parallel import shard_batch as _shard_rows
from lmx.train import RunConfig, Step, TrainState, compile_step, place_state, run


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
    batches_per_step: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.batches_per_step < 0:
            raise ValueError(f"batches_per_step must be >= 0 (0 = the mesh's data-parallel size), "
                             f"got {self.batches_per_step}")


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


@flax.struct.dataclass
class GTSPMasks:
    """The GTSP part of a training state (``TrainState.extra``; a pytree).

    ``masks``: weight masks with the structure of the params (all ones except under faithful
    GraNet); ``head_mask`` ``[L, H]`` active heads; ``ffn_units`` ``[L, F]`` active FFN units
    (clean structured weights); ``token_keep`` token keep ratio ``1 - s_token`` and ``drop_path``
    layer-drop probability ``s_layer`` (scalars).
    """

    masks: Any
    head_mask: jax.Array
    ffn_units: jax.Array
    token_keep: jax.Array
    drop_path: jax.Array


def state_gates(state: TrainState) -> Gates:
    """The :class:`Gates` a step applies: the state's head / FFN-unit masks, its token keep ratio
    on every layer, layer gates on (layers are removed at export, not during training)."""
    m = state.extra
    L = m.head_mask.shape[0]
    return Gates(token_keep=jnp.full((L,), m.token_keep, jnp.float32), head=m.head_mask,
                 layer=jnp.ones((L,), jnp.float32), drop_path=m.drop_path, ffn_units=m.ffn_units)


@functools.lru_cache(maxsize=64)
def _compiled_step(graphdef, tx, task: str, mode: str, double_step: bool) -> Step:
    """The ``lmx.train`` step ``(state, batch[D], key) -> (state, metrics)``, cached per
    (structure, optimizer, task, mode) so every fit and every sparsity setting reuses one compile
    per batch shape (masks and ratios are state values, not constants). XLA's default CPU
    options (``compiler_options={}``): the programs are small and the numerics stay those of the
    committed results.

    Gradients are taken w.r.t. the effective weights ``w ⊙ m`` and masked; pruned weights are
    zeroed after the update (as the official GTSP code). ``double_step`` applies the optimizer a
    second time with the same gradients (a bug of the official GTSP code, kept for reproduction)."""

    def step(state, batch, key):
        gates = state_gates(state)
        masks = state.extra.masks
        eff = G.apply_masks(state.params, masks)
        loss, g = jax.value_and_grad(
            lambda e: _loss(graphdef, state.aux, task, mode, True, e, gates, batch, key))(eff)
        g = G.apply_masks(g, masks)
        upd, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, upd)
        if double_step:
            upd, opt_state = tx.update(g, opt_state, params)
            params = optax.apply_updates(params, upd)
        new = state.replace(params=G.apply_masks(params, masks), opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(g)}

    return compile_step(step, compiler_options={})


EVENT_SCORES = ("head", "probe", "granet", "units")


@functools.lru_cache(maxsize=64)
def make_event_scores(graphdef, task: str, mode: str, kinds: tuple, mesh: Mesh):
    """One jitted function ``scores(params, rest, masks, gates, batch, rng) -> dict`` giving what
    a GTSP pruning event ranks, computed over the GLOBAL stacked batch (``batch`` sharded over
    ``mesh``'s ``data`` x ``fsdp``; train mode, the loss of the training step) with every output
    replicated on ``mesh``. Sums over batch rows are reductions across the mesh inside the jit,
    so every device and every process of a multi-process run gets the same scores, and the
    host-side decisions over them (top-k, death/regrowth) agree everywhere.

    ``kinds`` (a subset of :data:`EVENT_SCORES`) selects the outputs:

    * ``"head"``: clean Taylor importance ``|dL/dg_h|`` ``[L, H]`` (gradient w.r.t. the head gates);
    * ``"probe"``: the official GTSP code's faithful head scores ``probe_score`` and
      ``probe_gnorm`` ``[L, H]`` (:func:`graphs.gtsp.probe_importance`, zero-effect probes on the
      attention output, averaged over the real graphs of the whole stack);
    * ``"granet"``: ``magnitude`` ``|w ⊙ m|`` and ``regrow`` ``|dL/d(w ⊙ m)|`` (pytrees like the
      params; GraNet, Liu et al. 2021, arXiv:2106.10404, Sec. 3: magnitude pruning and gradient
      regrowth);
    * ``"units"``: FFN unit group magnitudes ``[L, F]`` (:func:`graphs.gtsp.ffn_unit_scores`).
    """
    unknown = set(kinds) - set(EVENT_SCORES)
    if unknown:
        raise ValueError(f"kinds must be a subset of {EVENT_SCORES}, got {kinds!r}")

    def fn(params, rest, masks, gates, batch, rng):
        eff = G.apply_masks(params, masks)
        out = {}
        if "units" in kinds:
            out["units"] = G.ffn_unit_scores(nnx.merge(graphdef, params, rest))
        if not set(kinds) & {"head", "probe", "granet"}:
            return out
        probes = None
        if "probe" in kinds:
            # probes are shapes only: ones/zeros for one padded batch, broadcast over the stack
            one = G.make_probes(nnx.merge(graphdef, params, rest),
                                jax.tree.map(lambda x: x[0], batch), gates.head.shape[1])
            D = batch.graph_mask.shape[0]
            probes = jax.tree.map(lambda x: jnp.broadcast_to(x, (D,) + x.shape), one)
        g_eff, g_gates, g_probes = jax.grad(
            lambda e, g, p: _loss(graphdef, rest, task, mode, True, e, g, batch, rng, p),
            argnums=(0, 1, 2))(eff, gates, probes)
        if "head" in kinds:
            out["head"] = jnp.abs(g_gates.head)
        if "probe" in kinds:
            out["probe_score"], out["probe_gnorm"] = G.probe_importance(
                g_probes, batch.graph_mask, gates.head.shape[1])
        if "granet" in kinds:
            out["magnitude"] = jax.tree.map(jnp.abs, eff)
            out["regrow"] = jax.tree.map(jnp.abs, g_eff)
        return out

    return jax.jit(fn, out_shardings=replicated(mesh))


@functools.lru_cache(maxsize=64)
def make_layer_scores(graphdef, task: str, mode: str, mesh: Mesh):
    """Jitted ``scores(params, rest, gates, batch, ids) -> [L]``: ``sum_b |dL_b/dg_l|`` over the
    padded batches ``b`` of a stack sharded over ``mesh`` (eval mode, ``L_b`` the mean loss of
    batch ``b`` alone, its key ``jax.random.key(ids[b])``), summed across the mesh inside the
    jit and replicated, so every process gets the same layer importance. Label-free filler
    batches have zero loss and add nothing."""

    def one(params, rest, gates, b, i):
        stack = jax.tree.map(lambda x: x[None], b)
        g = jax.grad(lambda gt: _loss(graphdef, rest, task, mode, False, params, gt, stack,
                                      jax.random.key(i)))(gates)
        return jnp.abs(g.layer)

    def fn(params, rest, gates, batch, ids):
        return jax.vmap(one, in_axes=(None, None, None, 0, 0))(params, rest, gates, batch,
                                                                ids).sum(0)

    return jax.jit(fn, out_shardings=replicated(mesh))


@functools.lru_cache(maxsize=16)
def _optimizer(lr, weight_decay, warmup, steps, clip):
    """AdamW with linear warm-up + cosine decay and global-norm clipping (cached: the same
    object keeps the jitted train step's cache key stable)."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(min(warmup, steps - 1), 1),
                                               max(steps, 2))
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(sched, weight_decay=weight_decay))


@dataclasses.dataclass(frozen=True)
class GTSPSteps:
    """GTSP training of one model structure as pure pieces a loop calls (built by
    :func:`make_gtsp_steps`).

    * ``init(model) -> state``: an ``lmx.train.TrainState`` (``params``, ``opt_state``, GTSP
      masks in ``extra`` (:class:`GTSPMasks`), the model's non-``Param`` state in ``aux``),
      placed on the mesh (replicated).
    * ``step(state, batch, key) -> (state, metrics)``: one compiled AdamW step (an
      ``lmx.train.Step``: the state is donated, ``state.step`` advances) on a stacked batch
      placed by ``shard(batch)``; ``metrics`` = ``{"loss", "grad_norm"}`` (device scalars).
    * ``is_event(step) -> bool`` and ``prune(state, batch, key) -> state``: the GTSP pruning
      event due at ``state.step`` (head and weight axes; between steps, on the batch of that
      step: scores by :func:`make_event_scores` over the global batch, top-k decisions on the
      host from those replicated scores); ``event_scores(state, batch, key)`` returns the scores
      alone. Tokens (keep ratio, learned scorer) and layers (drop path / layer drop) act
      inside every step; clean layer removal is chosen once at the end (``result``).
    * ``result(state, model, ds, train_idx) -> FitResult``: writes the trained (masked) weights
      into ``model`` and picks the layers to remove (clean mode, Taylor importance).

    Loss per step = SUM over all stacked batches / GLOBAL count of labelled (graph, task) pairs,
    so D shards of one stack give the gradient of one device holding the whole stack.
    """

    graphdef: Any
    rest: Any
    task: str
    cfg: FitConfig
    gcfg: G.GTSPConfig
    mesh: Mesh
    tx: Any
    events: tuple

    def init(self, model: GraphModel) -> TrainState:
        graphdef, params, _ = nnx.split(model, nnx.Param, ...)
        if graphdef != self.graphdef:
            raise ValueError("init(model): model has another structure than the model these steps "
                             "were made for")
        g, mcfg = self.gcfg, model.cfg
        L, H, F = mcfg.n_layers, mcfg.n_heads, mcfg.d_ff
        # faithful: the official random initial active set; clean: start dense, prune progressively
        head_mask = (G.initial_heads(L, H, 1.0 - g.head, np.random.default_rng(g.seed), g.mode)
                     if g.head > 0 and g.mode == "faithful" else np.ones((L, H), np.float32))
        extra = GTSPMasks(masks=G.ones_masks(params), head_mask=jnp.asarray(head_mask),
                          ffn_units=jnp.ones((L, F), jnp.float32),
                          token_keep=jnp.asarray(1.0 - g.token, jnp.float32),
                          drop_path=jnp.asarray(g.layer, jnp.float32))
        state = TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                           opt_state=self.tx.init(params), extra=extra, aux=self.rest)
        return self._place(state)

    def _place(self, state: TrainState) -> TrainState:
        # every leaf replicated on the mesh (so the step compiles once per batch shape), as
        # fresh buffers: the step donates its state, never the model's own arrays
        return place_state(state, replicated(self.mesh))

    def shard(self, batch: GraphBatch) -> GraphBatch:
        """The stacked batch placed over the mesh's batch axes (:func:`graphs.parallel.shard_batch`)."""
        return shard_batch(batch, self.mesh)

    def step(self, state: TrainState, batch: GraphBatch, key: jax.Array):
        fn = _compiled_step(self.graphdef, self.tx, self.task, self.gcfg.mode,
                            self.gcfg.double_step)
        return fn(state, batch, key)

    def is_event(self, step: int) -> bool:
        return step in self.events

    def gates(self, state: TrainState) -> Gates:
        return state_gates(state)

    def event_scores(self, state: TrainState, batch: GraphBatch, key: jax.Array) -> dict:
        """What the event ranks (:func:`make_event_scores`; ``"head"`` or ``"probe"`` for heads,
        ``"granet"`` or ``"units"`` for weights), on the global ``batch`` with ``key``, every
        value replicated on the mesh."""
        g = self.gcfg
        attention = nnx.merge(self.graphdef, state.params, state.aux).cfg.attention
        kinds = []
        if g.head > 0:
            # the official probes sit on the dense attention output; segment attention ranks
            # heads by their gate gradient instead
            kinds.append("probe" if g.mode == "faithful" and attention == "dense" else "head")
        if g.weight > 0:
            kinds.append("granet" if g.mode == "faithful" else "units")
        fn = make_event_scores(self.graphdef, self.task, g.mode, tuple(kinds), self.mesh)
        return fn(state.params, state.aux, state.extra.masks, state_gates(state), batch, key)

    def prune(self, state: TrainState, batch: GraphBatch, key: jax.Array) -> TrainState:
        """The GTSP event at ``state.step`` (k-th of ``len(events)``): heads (faithful:
        death/regrowth by the official probe scores; clean: keep the top ``cubic_density(k)``
        by ``|dL/dg_h|``) and weights (faithful: GraNet magnitude pruning + death/gradient
        regrowth, pruned and regrown weights zeroed; clean: structured FFN units by group
        magnitude, cubic schedule). Scores come from :meth:`event_scores` on the global ``batch``
        with ``key`` (train mode), the same on every process.

        Raises ValueError when no event is due at ``state.step``.
        """
        g, step = self.gcfg, int(state.step)
        if step not in self.events:
            raise ValueError(f"no GTSP event at step {step}; events are at steps {self.events}")
        k = self.events.index(step) + 1
        head_mask = np.asarray(state.extra.head_mask)
        units = np.asarray(state.extra.ffn_units)
        params, masks = state.params, state.extra.masks
        # every score comes from one jitted function over the global batch, replicated on the
        # mesh: the numpy decisions below see the same values on every process
        sc = self.event_scores(state, batch, key)
        if g.head > 0:
            if g.mode == "faithful":
                if "probe_score" in sc:
                    score, gnorm = np.asarray(sc["probe_score"]), np.asarray(sc["probe_gnorm"])
                else:
                    score = gnorm = np.asarray(sc["head"])
                head_mask = G.head_death_regrowth(head_mask, score, gnorm, g.head_death)
            else:
                dens = G.cubic_density(k, len(self.events), 1.0 - g.head)
                head_mask = G.progressive_heads(head_mask, np.asarray(sc["head"]), dens)
        if g.weight > 0:
            dens = G.cubic_density(k, len(self.events), 1.0 - g.weight)
            if g.mode == "faithful":
                mag = jax.device_get(sc["magnitude"])
                masks = G.global_magnitude_masks(mag, masks, dens)
                rate = G.cosine_death_rate(step, self.cfg.steps, g.death_rate)
                masks, grown = G.death_regrowth(mag, masks, jax.device_get(sc["regrow"]), rate)
                # pruned and regrown weights start at zero (the official code zeroes them too);
                # m and r are 0/1, so the host product is exact
                params = jax.tree.map(lambda p, m, r: np.asarray(p) * np.asarray(m)
                                      * (1 - np.asarray(r)), params, masks, grown)
            else:
                units = G.structured_unit_masks(np.asarray(sc["units"]), units, dens)
        extra = state.extra.replace(masks=masks, head_mask=jnp.asarray(head_mask, jnp.float32),
                                    ffn_units=jnp.asarray(units, jnp.float32))
        return self._place(state.replace(params=params, extra=extra))

    def result(self, state: TrainState, model: GraphModel, ds: GraphDataset, train_idx,
               losses: list | None = None) -> FitResult:
        nnx.update(model, G.apply_masks(state.params, state.extra.masks))
        gates = state_gates(state)
        L = model.cfg.n_layers
        layer_keep = np.ones(L, np.float32)
        if self.gcfg.mode == "clean" and self.gcfg.layer > 0:
            imp = layer_importance(model, ds, train_idx, self.cfg, gates, self.gcfg.mode,
                                   mesh=self.mesh)
            layer_keep = G.layers_to_remove(imp, self.gcfg.layer)
        return FitResult(model, gates, state.extra.masks, list(losses or []),
                         np.asarray(state.extra.head_mask), np.asarray(state.extra.ffn_units),
                         layer_keep, int(state.step))


def make_gtsp_steps(model: GraphModel, task: str, cfg: FitConfig = FitConfig(),
                    gcfg: G.GTSPConfig | None = None, *, mesh: Mesh | None = None) -> GTSPSteps:
    """GTSP training pieces (:class:`GTSPSteps`) for ``model``'s structure and ``task``.

    ``cfg`` gives the optimizer (AdamW, warm-up + cosine over ``cfg.steps``, clipping) and the
    event schedule's length; ``gcfg`` the sparsities (``None``: unpruned); ``mesh`` an
    ``lmx.parallel`` mesh (default: one device) whose ``data`` x ``fsdp`` axes split the stacked
    batch, with parameters, optimizer state and masks replicated (the models are small).

    A user's own loop (what :func:`fit` does, minus checkpoints)::

        gt = make_gtsp_steps(model, ds.task, cfg, gcfg, mesh=mesh)
        state = gt.init(model)
        for t in range(cfg.steps):
            batch = gt.shard(stacked_batch(t))          # graphs.data.stack_batches([...])
            key = jax.random.fold_in(jax.random.key(cfg.seed), t)
            if gt.is_event(t):
                state = gt.prune(state, batch, key)
            state, metrics = gt.step(state, batch, key)
    """
    if task not in ("binary", "multiclass", "regression"):
        raise ValueError(f"task must be binary/multiclass/regression, got {task!r}")
    gcfg = gcfg or G.GTSPConfig()
    mesh = mesh or data_mesh(1)
    data_parallel_size(mesh)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    tx = _optimizer(cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps, cfg.clip)
    events = tuple(G.event_steps(cfg.steps, gcfg)) if (gcfg.head or gcfg.weight) else ()
    return GTSPSteps(graphdef, jax.device_put(rest, replicated(mesh)), task, cfg, gcfg, mesh, tx,
                     events)


def _stacks(batches: list, D: int) -> list:
    """Group equally-shaped batches into stacks of D; a short group is filled with label-free
    copies (zero loss, zero gradient). Returns ``(stack, ids)`` pairs, ``ids[d]`` the position
    in ``batches`` of the stack's d-th batch (a filler repeats its group's first)."""
    by_shape: dict = {}
    for i, b in enumerate(batches):
        key = (b.graph.nodes.shape, b.graph.senders.shape, b.dense_index.shape)
        by_shape.setdefault(key, []).append(i)
    out = []
    for group in by_shape.values():
        for s in range(0, len(group), D):
            ids = group[s:s + D]
            chunk = [batches[i] for i in ids]
            first = chunk[0]
            chunk += [first._replace(label_mask=np.zeros_like(first.label_mask),
                                     graph_mask=np.zeros_like(first.graph_mask))] * (D - len(ids))
            out.append((stack_batches(chunk), np.asarray(ids + ids[:1] * (D - len(ids)), np.int32)))
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
        return [stack for stack, _ in _stacks(bs, self.D)]

    def get(self, step: int):
        e, i = divmod(step, self.per_epoch)
        if e != self.epoch:
            self.epoch, self.items = e, self._epoch(e)
        return self.items[i]


def _process_block(stack):
    """This process's contiguous block of a stacked batch, or of any pytree of arrays with the
    stack's leading axis (all of it on one process): in a multi-process run every process builds
    the same stack and feeds only its own rows."""
    pc, pi = jax.process_count(), jax.process_index()
    if pc == 1:
        return stack
    n = jax.tree.leaves(stack)[0].shape[0]
    if n % pc:
        raise ValueError(f"a stack of {n} padded batches does not split over {pc} processes")
    k = n // pc
    return jax.tree.map(lambda x: x[pi * k:(pi + 1) * k], stack)


def fit(model: GraphModel, ds: GraphDataset, train_idx, cfg: FitConfig = FitConfig(),
        gcfg: G.GTSPConfig | None = None, *, mesh: Mesh | None = None) -> FitResult:
    """Train ``model`` on ``ds[train_idx]`` with GTSP ``gcfg`` (``None`` = unpruned).

    :func:`make_gtsp_steps`' step driven by the project's one loop, ``lmx.train.run``: per step
    one stack of ``cfg.batches_per_step`` padded batches (default: the mesh's ``data*fsdp``
    size), split over ``mesh`` (an ``lmx.parallel`` mesh; default: one device; parameters
    replicated); the GTSP pruning event runs as a hook before the steps it is due at, on that
    step's batch and key. Batch order is a pure function of (seed, epoch) and the key of step t
    is ``fold_in(key(cfg.seed), t)``, so with ``cfg.ckpt_dir`` (orbax; the whole state every
    ``ckpt_every`` steps and at the end) a run resumes from the latest checkpoint exactly.
    Returns the trained (masked) model, its gates and masks; ``losses`` holds every step's loss
    (after a resume, the earlier ones come from the checkpoint).
    """
    gt = make_gtsp_steps(model, ds.task, cfg, gcfg, mesh=mesh)
    D = cfg.batches_per_step or data_parallel_size(gt.mesh)
    buckets = bucket_budgets(ds.subset(train_idx), cfg.batch_size, cfg.num_buckets)
    stream = _Stream(ds, np.asarray(train_idx), cfg, model.cfg.batch_spec(), D, buckets)
    base_key = jax.random.key(cfg.seed)

    def get_batch(step: int) -> GraphBatch:
        stack = _process_block(stream.get(step))
        check_stack(stack, gt.mesh)
        return stack

    def pruning_event(step: int, state: TrainState) -> TrainState | None:
        if not gt.is_event(step):
            return None
        return gt.prune(state, gt.shard(get_batch(step)), jax.random.fold_in(base_key, step))

    rc = RunConfig(steps=cfg.steps, seed=cfg.seed, ckpt_dir=cfg.ckpt_dir,
                   ckpt_every=cfg.ckpt_every, progress=cfg.progress, desc="gtsp")
    out = run(gt.init(model), gt.step, get_batch, rc, mesh=gt.mesh,
              hooks=[pruning_event], key=base_key)
    return gt.result(out.state, model, ds, train_idx, out.losses)


def layer_importance(model: GraphModel, ds: GraphDataset, idx, cfg: FitConfig, gates: Gates,
                     mode: str, max_batches: int = 8, *, mesh: Mesh | None = None) -> np.ndarray:
    """Taylor importance of each layer gate, ``sum_b |dL_b/dg_l|`` at g = 1 (eval mode) over the
    first ``max_batches`` training batches ``b`` (``L_b`` the mean loss of batch ``b``).

    The batches go in stacks of ``mesh``'s ``data*fsdp`` size (default mesh: one device; each
    process feeds its block of every stack) through :func:`make_layer_scores`, so the sum over a
    stack is a reduction across the mesh inside one jitted function and every process gets the
    same importance; only the few per-stack totals are added on the host (float64).
    """
    mesh = mesh or data_mesh(1)
    D = data_parallel_size(mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = make_layer_scores(graphdef, ds.task, mode, mesh)
    # the training buckets: the score function compiles once per bucket shape
    bs = make_batches(ds, idx, cfg.batch_size, spec=model.cfg.batch_spec(),
                      buckets=bucket_budgets(ds.subset(idx), cfg.batch_size,
                                             cfg.num_buckets))[:max_batches]
    imp = np.zeros(model.cfg.n_layers)
    for stack, ids in _stacks(bs, D):
        stack, ids = _process_block((stack, ids))
        imp += np.asarray(fn(params, rest, gates, shard_batch(stack, mesh),
                             _shard_rows(ids, mesh)))
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
