"""The training loop every LM method shares: optax, accumulation, sharding, checkpoints, resume.

Contract::

    loss_fn(model, micro_batch, rng) -> (loss_sum, n_scored, metrics)

``loss_sum`` is the SUM of per-token (or per-example) losses in the micro-batch and
``n_scored`` how many were scored. The step sums both over the ``accum_steps`` micro-batches and
divides by the global count, so gradient accumulation and data parallelism give exactly the
gradient of the global token mean (the mean of micro-batch means would weight short
micro-batches up). ``metrics`` is a dict of scalars, averaged over micro-batches.

``get_batch(step) -> dict of arrays [batch, ...]`` must be deterministic in ``step``:
the step number is the data position stored in the checkpoint, so a resumed run sees the same
data. The per-step PRNG key is ``fold_in(PRNGKey(seed), step)`` for the same reason. In a
multi-process run (``lmx.parallel.initialize_distributed``) each process's ``get_batch`` returns
only its own rows, and the global batch is their concatenation in process order
(``lmx.parallel.shard_batch``); a checkpoint written by N processes resumes on any mesh.

Checkpoints (orbax ``CheckpointManager``) hold params, optimizer state and
``{"step", "losses"}``; ``train`` resumes from the latest one in ``ckpt_dir``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from lmx.models import fused_next_token_nll
from lmx.parallel import DEFAULT_RULES, TunedJit, shard_batch, single_device_mesh, state_shardings

logger = logging.getLogger(__name__)

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and bookkeeping of a run (AdamW with warmup + cosine/linear/constant)."""

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


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    param_shardings=None, opt_shardings=None, rest_shardings=None, donate: bool = True,
                    compiler_options: dict | None = None):
    """``step(params, opt_state, rest, batch[accum, micro, ...], rng) -> (params, opt_state, metrics)``,
    compiled with ``jax.jit`` in/out shardings (pjit semantics) and donated params/opt_state.

    Compiled through :class:`lmx.parallel.TunedJit`: ``compiler_options=None`` takes
    :func:`lmx.parallel.cpu_compiler_options` (oneDNN matmuls on CPU where the program allows it,
    nothing elsewhere), ``{}`` XLA's defaults. ``step.compile(*args)`` gives the compiled program.

    ``rest`` is the model's non-``Param`` state (frozen buffers, a teacher's arrays, ...). It is
    an argument rather than a closure so it is never baked into the program as a constant.
    """
    def step(params, opt_state, rest, batch, rng):
        loss, grads, n, metrics = accumulate_grads(graphdef, rest, loss_fn, params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        out = {"loss": loss, "n_scored": n, "grad_norm": optax.tree.norm(grads), **metrics}
        return params, opt_state, out

    kwargs = {}
    if param_shardings is not None:
        kwargs = dict(in_shardings=(param_shardings, opt_shardings, rest_shardings, None, None),
                      out_shardings=(param_shardings, opt_shardings, None))
    return TunedJit(step, compiler_options=compiler_options, donate_argnums=(0, 1) if donate else (), **kwargs)


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
class TrainResult:
    model: nnx.Module
    losses: list[float]
    step: int
    history: list[dict]


def _split_micro(batch: Any, accum: int) -> Any:
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


def _checkpoint_manager(cfg: TrainConfig):
    path = pathlib.Path(cfg.ckpt_dir).resolve()
    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    return ocp.CheckpointManager(path, options=opts)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def train(model: nnx.Module, loss_fn: LossFn, get_batch: Callable[[int], Any], cfg: TrainConfig,
          mesh: Mesh | None = None, rules=DEFAULT_RULES,
          tx: optax.GradientTransformation | None = None) -> TrainResult:
    """Train ``model``'s ``nnx.Param`` state for ``cfg.steps`` steps; see the module docstring.

    ``mesh``: where params (by logical axes) and batches (over ``data`` x ``fsdp``) live; defaults
    to a one-device mesh. ``tx`` overrides the AdamW built from ``cfg``. The run resumes from the
    latest checkpoint in ``cfg.ckpt_dir`` if there is one; ``cfg.halt_after`` stops this process
    after that many steps (as a preemption would) after checkpointing.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    mesh = mesh or single_device_mesh()
    tx = tx or make_optimizer(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_sh = state_shardings(params, mesh, rules)
    # copy: the step donates its inputs, and the caller's model must stay valid if training fails
    params = jax.tree.map(jnp.copy, jax.device_put(params, param_sh))
    rest_sh = state_shardings(rest, mesh, rules)
    rest = jax.device_put(rest, rest_sh)
    opt_state = jax.jit(tx.init)(params)
    # moments follow their params' sharding; scalars (step counts) are created on one device
    opt_sh = jax.tree.map(lambda x: x.sharding if len(x.sharding.device_set) == mesh.size
                          else NamedSharding(mesh, P()), opt_state)
    opt_state = jax.device_put(opt_state, opt_sh)

    start, losses, history = 0, [], []
    manager = _checkpoint_manager(cfg) if cfg.ckpt_dir else None
    if manager is not None and manager.latest_step() is not None:
        latest = manager.latest_step()
        restored = manager.restore(latest, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            meta=ocp.args.JsonRestore()))
        params, opt_state = restored["params"], restored["opt_state"]
        start, losses = int(restored["meta"]["step"]), list(restored["meta"]["losses"])
        logger.info("resumed from the checkpoint of step %d in %s", start, cfg.ckpt_dir)

    step_fn = make_train_step(graphdef, loss_fn, tx, param_shardings=param_sh, opt_shardings=opt_sh,
                              rest_shardings=rest_sh, donate=cfg.donate)
    log_file = open(cfg.log_path, "a") if cfg.log_path else None
    end = cfg.steps if cfg.halt_after is None else min(cfg.steps, start + cfg.halt_after)
    schedule = make_schedule(cfg)
    base_key = jax.random.PRNGKey(cfg.seed)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not cfg.progress,
               desc="train", dynamic_ncols=True)
    pending: list[tuple[int, dict, float]] = []

    def flush():
        for s, m, t in pending:
            row = {"step": s + 1, **{k: float(v) for k, v in jax.device_get(m).items()},
                   "lr": float(schedule(s)), "time": t}
            losses.append(row["loss"])
            history.append(row)
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite loss {row['loss']} at step {s + 1}")
            if log_file:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
        if pending:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            logger.debug("step %d: loss %.4f", history[-1]["step"], losses[-1])
        pending.clear()

    try:
        for step in bar:
            batch = shard_batch(_split_micro(get_batch(step), cfg.accum_steps), mesh, batch_axis=1)
            params, opt_state, metrics = step_fn(params, opt_state, rest, batch, jax.random.fold_in(base_key, step))
            pending.append((step, metrics, time.time()))
            last = step + 1 == end
            if last or len(pending) >= cfg.log_every:
                flush()
            if manager is not None and (last or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
                flush()
                manager.save(step + 1, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave({"step": step + 1, "losses": losses})))
                logger.info("checkpoint of step %d written to %s", step + 1, cfg.ckpt_dir)
        flush()
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    nnx.update(model, params)
    return TrainResult(model=model, losses=losses, step=end, history=history)


__all__ = ["TrainConfig", "TrainResult", "LossFn", "train", "causal_lm_loss", "make_optimizer", "make_schedule",
           "make_train_step", "accumulate_grads"]
