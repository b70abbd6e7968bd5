"""One training substrate for every wing: a pure step protocol and one driver.

The protocol (everything here is a pytree of arrays; nothing hides in closures)::

    state = TrainState(step, params, opt_state, extra=None, aux=None)
    state, metrics = step(state, batch, key)        # pure, jit-able; metrics: dict of scalars

``params`` is what the optimizer trains, ``opt_state`` its state, ``extra`` any other state the
step evolves (e.g. the inner Adam moments of Concrete AdaMerging) and ``aux`` what the step
reads but never changes (frozen weights, task vectors, non-``Param`` model state). ``state.step``
counts the optimizer steps taken; it is also the data position: the driver feeds
``get_batch(state.step)`` with the key ``fold_in(PRNGKey(seed), state.step)``, so a resumed run
sees the same data and noise as an uninterrupted one.

Build a step from a pure ``fn(state, batch, key) -> (state, metrics)`` with :func:`compile_step`
(``jax.jit`` through :class:`lmx.parallel.TunedJit`, in/out shardings, donated state; ``aux``
is passed as a separate, undonated argument and comes back untouched, and ``state.step`` is
advanced). A user's own loop::

    graphdef, state, shardings = init_state(model, tx, mesh=mesh)     # the LM wing
    step = make_train_step(graphdef, causal_lm_loss, tx, shardings=shardings)
    for s in range(100):
        batch = shard_batch(split_micro(get_batch(s), 1), mesh, batch_axis=1)
        state, metrics = step(state, batch, jax.random.fold_in(key, s))

Inside a compiled program, :func:`scan_steps` runs a pure step function under ``lax.scan``.
The driver :func:`run` ``(state, step, get_batch, RunConfig(...), *, mesh, hooks=())`` does
the same with: placement of ``state`` on its ``shardings``, per-process input
(:func:`lmx.parallel.shard_batch`: in a multi-process run each process's ``get_batch`` returns
only its own rows, and the global batch is their concatenation in process order), orbax
checkpoints of the whole state plus the metric history (``ckpt_every``, ``keep_checkpoints``;
automatic resume from the latest one in ``ckpt_dir``, on any mesh), ``halt_after`` (stop as a
preemption would), JSON-lines metrics (``log_path``), ``logging`` and a tqdm bar. A non-finite
``metrics["loss"]`` raises FloatingPointError.

Hooks are event handlers between steps: ``hook(s, state) -> TrainState | None`` runs before
step ``s`` (so, with ``s`` = ``state.step``, also right after a resume, and never for a step
that a checkpoint already covers); returning a state replaces the current one (pruning events,
a bi-level outer step, a schedule of frozen parts). A hook must be deterministic in
``(s, state)`` for resume to reproduce an uninterrupted run, and must return a state placed on
the mesh (:func:`place_state`).

The LM wing (:func:`train` = :func:`init_state` + :func:`make_train_step` + :func:`run`)::

    loss_fn(model, micro_batch, rng) -> (loss_sum, n_scored, metrics)

``loss_sum`` is the SUM of per-token (or per-example) losses in the micro-batch and
``n_scored`` how many were scored. The step sums both over the ``accum_steps`` micro-batches and
divides by the global count, so gradient accumulation and data parallelism give exactly the
gradient of the global token mean (the mean of micro-batch means would weight short
micro-batches up). ``metrics`` is a dict of scalars, averaged over micro-batches. Params and
Adam moments are placed by their logical axes (:data:`lmx.parallel.DEFAULT_RULES`: FSDP over
``fsdp``, tensor parallel over ``tensor``); batches are split over ``data`` x ``fsdp``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from lmx.models import fused_next_token_nll
from lmx.parallel import (DEFAULT_RULES, TunedJit, logical_sharding, shard_batch, single_device_mesh,
                          state_shardings)

logger = logging.getLogger(__name__)

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, jax.Array, dict]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """The state one training step maps to the next (a pytree; see the module docstring).

    ``step``: int32 scalar, optimizer steps taken (= the data position). ``params``: trained
    arrays. ``opt_state``: the optimizer's state. ``extra``: other state the step evolves.
    ``aux``: inputs the step reads and never changes.
    """

    step: Any
    params: Any
    opt_state: Any
    extra: Any = None
    aux: Any = None

    def replace(self, **changes: Any) -> "TrainState":
        return dataclasses.replace(self, **changes)


StepFn = Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]
Hook = Callable[[int, TrainState], "TrainState | None"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What the driver :func:`run` does besides stepping.

    ``steps``: the step count to reach (a resumed run continues from the checkpoint's).
    ``seed``: per-step keys are ``fold_in(PRNGKey(seed), step)``. ``ckpt_dir``/``ckpt_every``/
    ``keep_checkpoints``: orbax checkpoints (always one at the end when ``ckpt_dir`` is set).
    ``log_path``/``log_every``: JSON-lines metrics, fetched from the device every ``log_every``
    steps. ``halt_after``: stop after that many steps of this call (a simulated preemption).
    ``desc``: the progress bar's label.
    """

    steps: int
    seed: int = 0
    ckpt_dir: str | None = None
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    log_path: str | None = None
    log_every: int = 1
    progress: bool = True
    halt_after: int | None = None
    desc: str = "train"

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")
        if self.ckpt_every < 0 or self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"need ckpt_every >= 0, log_every >= 1, keep_checkpoints >= 1, got "
                             f"{self.ckpt_every}, {self.log_every}, {self.keep_checkpoints}")
        if self.halt_after is not None and self.halt_after < 0:
            raise ValueError(f"halt_after must be >= 0 or None, got {self.halt_after}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and bookkeeping of an LM run (AdamW with warmup + cosine/linear/constant);
    the bookkeeping fields are those of :class:`RunConfig` (:meth:`run_config`)."""

    steps: int
    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    accum_steps: int = 1
    seed: int = 0
    ckpt_dir: str | None = None
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    log_path: str | None = None
    log_every: int = 1
    progress: bool = True
    halt_after: int | None = None
    donate: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")

    def run_config(self, desc: str = "train") -> RunConfig:
        """The driver's part of this config: every :class:`RunConfig` field but ``desc`` is read
        by name from this one (the LM config keeps its flat, public field list)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)
                  if f.name != "desc"}
        return RunConfig(**shared, desc=desc)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        main = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return main
    warm = optax.linear_schedule(cfg.lr / max(cfg.warmup_steps, 1), cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def accumulate_grads(graphdef, rest, loss_fn: LossFn, params, batch, rng):
    """Sum loss and grads over the leading micro-batch axis of ``batch``; divide by the global count.

    Returns ``(loss_mean, grads_mean, n_scored, metrics)``; pure and jittable.
    """
    def total(p, mb, key):
        loss_sum, n, metrics = loss_fn(nnx.merge(graphdef, p, rest), mb, key)
        return loss_sum, (n, metrics)

    grad_fn = jax.value_and_grad(total, has_aux=True)
    n_micro = jax.tree.leaves(batch)[0].shape[0]

    def body(carry, xs):
        gsum, lsum, nsum = carry
        mb, i = xs
        (l, (n, metrics)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        gsum = jax.tree.map(jnp.add, gsum, g)
        return (gsum, lsum + l.astype(jnp.float32), nsum + n.astype(jnp.float32)), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (gsum, lsum, nsum), metrics = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)),
                                               (batch, jnp.arange(n_micro)))
    denom = jnp.maximum(nsum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, gsum)
    return lsum / denom, grads, nsum, jax.tree.map(jnp.mean, metrics)


def compile_step(fn: StepFn, *, shardings: TrainState | None = None, donate: bool = True,
                 compiler_options: Mapping[str, Any] | None = None) -> "Step":
    """Compile a pure ``fn(state, batch, key) -> (state, metrics)`` into a :class:`Step`.

    ``shardings``: a :class:`TrainState` of shardings (e.g. :func:`shardings_of` a placed state);
    the compiled step then keeps every field where it is (pjit in/out shardings), so FSDP-sharded
    params and moments stay sharded. ``donate``: the state's buffers (not ``aux``) are reused for
    the output. ``compiler_options``: as :class:`lmx.parallel.TunedJit` (None: oneDNN matmuls on
    CPU where safe; ``{}``: XLA's defaults).
    """
    return Step(fn, shardings=shardings, donate=donate, compiler_options=compiler_options)


class Step:
    """``step(state, batch, key) -> (state, metrics)``: a compiled, pure training step.

    ``fn`` is the traced function (``step.fn``, for a user who wants to jit it into a larger
    program); calling the step runs the compiled program, passes ``state.aux`` through
    unchanged and advances ``state.step`` by one. ``step.compile(state, batch, key)`` returns the
    compiled program (``jax.stages.Compiled``) of the donated, aux-free signature.
    """

    def __init__(self, fn: StepFn, *, shardings: TrainState | None = None, donate: bool = True,
                 compiler_options: Mapping[str, Any] | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if shardings is not None and not isinstance(shardings, TrainState):
            raise TypeError(f"shardings must be a TrainState of shardings, got {type(shardings).__name__}")
        self.fn = fn

        def body(core: TrainState, aux: Any, batch: Any, key: jax.Array):
            new, metrics = fn(core.replace(aux=aux), batch, key)
            if not isinstance(new, TrainState):
                raise TypeError(f"a step must return (TrainState, metrics), got {type(new).__name__}")
            return new.replace(step=core.step + 1, aux=None), metrics

        kwargs: dict[str, Any] = {}
        if shardings is not None:
            core_sh = shardings.replace(aux=None)
            kwargs = dict(in_shardings=(core_sh, shardings.aux, None, None), out_shardings=(core_sh, None))
        self._jit = TunedJit(body, compiler_options=compiler_options,
                             donate_argnums=(0,) if donate else (), **kwargs)

    @property
    def compiler_options(self) -> dict[str, Any]:
        return self._jit.compiler_options

    def _check(self, state: Any) -> None:
        if not isinstance(state, TrainState):
            raise TypeError(f"state must be a TrainState, got {type(state).__name__}")

    def compile(self, state: TrainState, batch: Any, key: jax.Array):
        self._check(state)
        return self._jit.compile(state.replace(aux=None), state.aux, batch, key)

    def __call__(self, state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, dict]:
        self._check(state)
        new, metrics = self._jit(state.replace(aux=None), state.aux, batch, key)
        return new.replace(aux=state.aux), metrics


def scan_steps(fn: StepFn, state: TrainState, keys: jax.Array, batches: Any = None
               ) -> tuple[TrainState, dict]:
    """Run the pure step ``fn`` once per key inside one ``lax.scan`` (traceable: call it under
    ``jax.jit`` / ``jax.vmap``); ``batches`` (optional) carries one leading entry per key.

    Returns the final state (``step`` advanced by ``len(keys)``) and the stacked metrics. This is
    :func:`run` without host round trips, checkpoints, hooks or logging, for small problems whose
    step is cheaper than a dispatch (toy fits of a few thousand steps).
    """
    def body(st, xs):
        key, batch = xs
        new, metrics = fn(st, batch, key)
        return new.replace(step=st.step + 1), metrics

    return jax.lax.scan(body, state, (keys, batches))


def shardings_of(state: Any) -> Any:
    """The sharding of every array leaf of a placed pytree (same structure)."""
    return jax.tree.map(lambda x: x.sharding, state)


def place_state(state: Any, shardings: Any) -> Any:
    """``state`` on ``shardings`` as fresh buffers (a donating step never consumes the caller's
    arrays)."""
    return jax.tree.map(jnp.copy, jax.device_put(state, shardings))


def follow_params(tree: Any, params: Any) -> Any:
    """Shardings for an optimizer-state-like ``tree``: a leaf whose key path ends with a param's
    key path and whose shape equals that param's takes the param's sharding (Adam's ``mu``/``nu``
    of an FSDP-sharded weight are FSDP-sharded the same way); every other leaf (step counts,
    scalars) is replicated on the params' mesh.

    Why not the output of ``jax.jit(tx.init)``: optimizer states are ``zeros_like(params)``,
    which depend on no input value, so the partitioner places them fully replicated.
    """
    flat = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
    if not flat:
        return jax.tree.map(lambda _: None, tree)
    mesh = flat[0][1].sharding.mesh
    by_len = sorted(flat, key=lambda kv: -len(kv[0]))

    def one(path, x):
        key = jax.tree_util.keystr(path)
        for pkey, p in by_len:
            if key.endswith(pkey) and np.shape(x) == p.shape:
                return p.sharding
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(one, tree)


def split_micro(batch: Any, accum: int) -> Any:
    """Reshape every ``[B, ...]`` array of a batch to ``[accum, B // accum, ...]`` (host side).

    Raises ValueError for an empty batch, a batch with 0 rows, or ``B`` not divisible by ``accum``.
    """
    def split(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % accum:
            raise ValueError(f"batch array of shape {x.shape} does not split into accum_steps={accum} micro-batches")
        return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("get_batch returned an empty batch")
    if any(np.asarray(x).shape[:1] == (0,) for x in leaves):
        raise ValueError("get_batch returned a batch with 0 rows")
    return jax.tree.map(split, batch)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, *, mesh: Mesh | None = None,
               rules: Mapping[str, Any] = DEFAULT_RULES) -> tuple[Any, TrainState, TrainState]:
    """``(graphdef, state, shardings)`` of an NNX model for :func:`make_train_step`.

    ``state.params`` = the model's ``nnx.Param`` state and ``state.aux`` the rest, placed on
    ``mesh`` (default: one device) by their logical axes; ``state.opt_state`` = ``tx.init``,
    whose moments follow their params' shardings (:func:`follow_params`: FSDP params give FSDP
    moments) and whose scalars are replicated. The arrays are copies: the model stays valid whatever the step donates.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    mesh = mesh or single_device_mesh()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = place_state(params, state_shardings(params, mesh, rules))
    rest = jax.device_put(rest, state_shardings(rest, mesh, rules))
    opt_state = jax.jit(tx.init)(params)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P())),
                       params=params, opt_state=jax.device_put(opt_state, follow_params(opt_state, params)),
                       aux=rest)
    return graphdef, state, shardings_of(state)


def _mesh_of(shardings: Any) -> Mesh | None:
    """The mesh of the first named sharding in ``shardings`` (None when there is none)."""
    for leaf in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        if isinstance(leaf, NamedSharding):
            return leaf.mesh
    return None


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    shardings: TrainState | None = None, donate: bool = True,
                    compiler_options: Mapping[str, Any] | None = None,
                    schedule: optax.Schedule | None = None,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> Step:
    """The LM step: ``step(state, batch[accum, micro, ...], key) -> (state, metrics)``.

    ``state`` from :func:`init_state`; the loss and gradient are those of
    :func:`accumulate_grads` over the leading micro-batch axis, then one ``tx`` update.
    ``metrics``: ``loss`` (global token mean), ``n_scored``, ``grad_norm``, ``lr`` (when a
    ``schedule`` is given, at the step's count) and the loss function's own. Compiled by
    :func:`compile_step` (``shardings``, ``donate``, ``compiler_options``). The model's
    activations are pinned by ``rules`` on the mesh of ``shardings``
    (:func:`lmx.parallel.logical_sharding`; batch over ``data`` x ``fsdp``, features whole).
    """
    mesh = _mesh_of(shardings)

    def fn(state: TrainState, batch, key):
        with logical_sharding(mesh, rules):
            loss, grads, n, metrics = accumulate_grads(graphdef, state.aux, loss_fn, state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        out = {"loss": loss, "n_scored": n, "grad_norm": optax.tree.norm(grads), **metrics}
        if schedule is not None:
            out["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), out

    return compile_step(fn, shardings=shardings, donate=donate, compiler_options=compiler_options)


def causal_lm_loss(model: nnx.Module, batch: dict, rng: jax.Array | None = None, *,
                   chunk_size: int | None = None):
    """Next-token cross-entropy: ``(sum over scored tokens, n scored, {})`` in float32.

    ``batch["tokens"]`` int [B, T]; optional ``batch["mask"]`` [B, T] (True = real token).
    A target is scored when it and its context token are real. The logits are formed chunk by
    chunk and never held whole (:func:`lmx.models.fused_next_token_nll`; ``chunk_size`` time
    positions per chunk, bind it with ``functools.partial``).
    """
    del rng
    tokens = batch["tokens"]
    mask = batch.get("mask")
    # no mask means no padding: the model may then use a fused causal kernel (cuDNN on GPU)
    hidden = model.hidden_states(tokens, attention_mask=mask)
    if mask is None:
        weights, n = None, jnp.asarray(tokens.shape[0] * (tokens.shape[1] - 1), jnp.float32)
    else:
        mask = jnp.asarray(mask).astype(bool)
        weights = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
        n = jnp.sum(weights)
    loss_sum, _ = fused_next_token_nll(hidden, model.output_embedding(), tokens, weights,
                                       chunk_size=chunk_size)
    return loss_sum, n, {}



@dataclasses.dataclass
class RunResult:
    """``state``: the final state; ``history``: one row per step taken so far (this call and,
    after a resume, the earlier ones): ``{"step": s + 1, **metrics, "time"}``."""

    state: TrainState
    history: list[dict]

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.history if "loss" in row]


def _checkpoint_manager(cfg: RunConfig):
    path = pathlib.Path(cfg.ckpt_dir).resolve()
    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    return ocp.CheckpointManager(path, options=opts)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run(state: TrainState, step: StepFn, get_batch: Callable[[int], Any], cfg: RunConfig, *,
        mesh: Mesh, shardings: TrainState | None = None, hooks: Sequence[Hook] = (),
        batch_axis: int = 0, rules: Mapping[str, Any] = DEFAULT_RULES,
        key: jax.Array | None = None) -> RunResult:
    """Drive ``step`` from ``state.step`` to ``cfg.steps``; see the module docstring.

    ``get_batch(s)``: this process's rows of step ``s``'s batch (numpy), deterministic in ``s``;
    they are split over the ``"batch"`` rule's mesh axes (``data`` x ``fsdp``) along
    ``batch_axis``, and a row count that does not divide raises ValueError. ``shardings``: where
    to place ``state`` first (default: where it already is). ``hooks``: called before every
    step. ``key``: the base of the per-step keys ``fold_in(key, s)`` (default
    ``PRNGKey(cfg.seed)``). Resumes from the latest checkpoint in ``cfg.ckpt_dir`` when there is one.

    Raises:
      TypeError: ``state`` is not a :class:`TrainState` or ``cfg`` not a :class:`RunConfig`.
      FloatingPointError: a non-finite ``loss`` metric.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a TrainState, got {type(state).__name__}")
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig, got {type(cfg).__name__}")
    if shardings is not None:
        state = place_state(state, shardings)
    history: list[dict] = []
    manager = _checkpoint_manager(cfg) if cfg.ckpt_dir else None
    if manager is not None and manager.latest_step() is not None:
        latest = manager.latest_step()
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state)), meta=ocp.args.JsonRestore()))
        state, history = restored["state"], list(restored["meta"]["history"])
        logger.info("resumed from the checkpoint of step %d in %s", latest, cfg.ckpt_dir)
    start = int(jax.device_get(state.step))
    end = cfg.steps if cfg.halt_after is None else min(cfg.steps, start + cfg.halt_after)
    base_key = jax.random.PRNGKey(cfg.seed) if key is None else key
    log_file = open(cfg.log_path, "a") if cfg.log_path else None
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not cfg.progress,
               desc=cfg.desc, dynamic_ncols=True)
    pending: list[tuple[int, dict, float]] = []

    def flush():
        for s, m, t in pending:
            row = {"step": s + 1, **{k: float(v) for k, v in jax.device_get(m).items()}, "time": t}
            history.append(row)
            if "loss" in row and not np.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite loss {row['loss']} at step {s + 1}")
            if log_file:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
        if pending and "loss" in history[-1]:
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            logger.debug("step %d: loss %.4f", history[-1]["step"], history[-1]["loss"])
        pending.clear()

    def save(s):
        flush()
        manager.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave({"step": s, "history": history})))
        logger.info("checkpoint of step %d written to %s", s, cfg.ckpt_dir)

    try:
        for s in bar:
            for hook in hooks:
                replaced = hook(s, state)
                if replaced is not None:
                    state = replaced
            batch = shard_batch(get_batch(s), mesh, batch_axis=batch_axis, rules=rules)
            state, metrics = step(state, batch, jax.random.fold_in(base_key, s))
            pending.append((s, metrics, time.time()))
            last = s + 1 == end
            if last or len(pending) >= cfg.log_every:
                flush()
            if manager is not None and (last or (cfg.ckpt_every and (s + 1) % cfg.ckpt_every == 0)):
                save(s + 1)
        flush()
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return RunResult(state=state, history=history)


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module
    losses: list[float]
    step: int
    history: list[dict]
    state: TrainState


def train(model: nnx.Module, loss_fn: LossFn, get_batch: Callable[[int], Any], cfg: TrainConfig,
          mesh: Mesh | None = None, rules=DEFAULT_RULES,
          tx: optax.GradientTransformation | None = None) -> TrainResult:
    """Train ``model``'s ``nnx.Param`` state for ``cfg.steps`` steps: :func:`init_state`,
    :func:`make_train_step` and :func:`run` (see the module docstring).

    ``mesh``: where params (by logical axes) and batches (over ``data`` x ``fsdp``) live; defaults
    to a one-device mesh. ``tx`` overrides the AdamW built from ``cfg``. ``get_batch(step)``
    returns the step's ``[B, ...]`` rows (this process's, in a multi-process run), split here
    into ``cfg.accum_steps`` micro-batches. The model is updated in place at the end.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    mesh = mesh or single_device_mesh()
    tx = tx or make_optimizer(cfg)
    graphdef, state, shardings = init_state(model, tx, mesh=mesh, rules=rules)
    step = make_train_step(graphdef, loss_fn, tx, shardings=shardings, donate=cfg.donate,
                           schedule=make_schedule(cfg))
    result = run(state, step, lambda s: split_micro(get_batch(s), cfg.accum_steps), cfg.run_config(),
                 mesh=mesh, batch_axis=1, rules=rules)
    nnx.update(model, result.state.params)
    return TrainResult(model=model, losses=result.losses, step=result.step, history=result.history,
                       state=result.state)


__all__ = ["TrainState", "RunConfig", "RunResult", "Step", "StepFn", "Hook", "compile_step", "run",
           "scan_steps", "shardings_of", "place_state", "follow_params", "TrainConfig", "TrainResult", "LossFn", "train", "init_state",
           "split_micro", "causal_lm_loss", "make_optimizer", "make_schedule", "make_train_step",
           "accumulate_grads"]
