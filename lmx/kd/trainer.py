"""Distillation of a causal-LM teacher into a smaller student on the ``lmx.train`` step protocol.

Off- and on-policy data as in GKD (arXiv:2306.13649), ATKD (arXiv:2402.11890) losses. The teacher
runs outside the compiled training step: its final hidden states for every training row are
computed by a jitted forward (once for off-policy data, per sampling round on-policy) and travel
in the batch; its output projection rides along inside the trained module as a frozen parameter
(the optimizer sets its update to zero), so the step never embeds the teacher as a constant. The
loss is :func:`lmx.kd.fused_linear_kd_loss` with ``reduction="sum"``, so the shared loop divides by
the global number of scored tokens (gradient accumulation and data parallelism safe).
:func:`make_distill_step` gives the step for a user's own loop; :func:`distill` drives it.

Data sources:
- ``"off_policy"``: dataset text, every token after the first scored (supervised KD).
- ``"on_policy"``: the first ``prompt_len`` tokens of a dataset row are continued by the current
  student (``lmx.models.generate``, sampling temperature separate from the loss temperature);
  only the sampled tokens are scored (GKD / ImitKD style). Sampling happens every
  ``refresh_every`` steps, by a hook of the ``lmx.train.run`` driver that hands the round's
  batches to ``get_batch`` (one run; no restarts between rounds).
- ``"mixed"``: each step is on-policy with probability ``on_policy_fraction`` (GKD ``lmbda``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmx.kd.atkd import ATKDConfig
from lmx.kd.divergences import KDConfig
from lmx.kd.fused import IMPLS, fused_linear_kd_loss
from lmx.models import Transformer, generate
from lmx.parallel import single_device_mesh
from lmx.train import (Step, TrainConfig, TrainState, init_state, make_optimizer, make_schedule,
                       make_train_step, run, split_micro)

SOURCES = ("off_policy", "on_policy", "mixed")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def init_student(teacher: Transformer, *, n_layers: int, init: str = "teacher_layers",
                 seed: int = 0, **config_changes: Any) -> Transformer:
    """A smaller Llama student sharing the teacher's vocabulary (and so its tokenizer).

    ``init="teacher_layers"``: same widths as the teacher, ``n_layers`` layers copied from evenly
    spaced teacher layers (first and last included), embeddings and final norm copied.
    ``init="random"``: a fresh model with ``config_changes`` applied (e.g. a smaller ``d_model``).
    Raises ValueError for a bad ``init``/``n_layers`` or width changes with teacher layers.
    """
    tcfg = teacher.cfg
    if init not in ("teacher_layers", "random"):
        raise ValueError(f"init must be 'teacher_layers' or 'random', got {init!r}")
    if not isinstance(n_layers, int) or not 1 <= n_layers <= (tcfg.n_layers if init ==
                                                                "teacher_layers" else 10 ** 6):
        raise ValueError(f"n_layers must be an int in [1, {tcfg.n_layers}] with teacher layers, "
                         f"got {n_layers!r}")
    cfg = dataclasses.replace(tcfg, n_layers=n_layers, **config_changes)
    if cfg.vocab_size != tcfg.vocab_size:
        raise ValueError("the student must keep the teacher's vocab_size (shared tokenizer)")
    student = Transformer(cfg, rngs=nnx.Rngs(seed))
    if init == "random":
        return student
    if config_changes:
        raise ValueError(f"init='teacher_layers' keeps the teacher's widths; got changes "
                         f"{sorted(config_changes)}")
    ids = np.round(np.linspace(0, tcfg.n_layers - 1, n_layers)).astype(int)
    t_state = dict(nnx.to_flat_state(nnx.state(teacher, nnx.Param)))
    s_state = nnx.state(student, nnx.Param)
    for key, var in nnx.to_flat_state(s_state):
        src = t_state[key][...]
        stacked = src.ndim >= 1 and src.shape[0] == tcfg.n_layers and var.shape[0] == n_layers \
            and key[0] not in ("embed", "lm_head", "final_norm", "final_norm_b", "pos_embed")
        var.set_value(jnp.asarray(src[ids] if stacked else src))
    nnx.update(student, s_state)
    return student


class KDStudent(nnx.Module):
    """The trained module: the student plus the teacher's frozen output projection ``[H_t, V]``."""

    def __init__(self, student: Transformer, teacher_head: jax.Array):
        self.student = student
        self.teacher_head = nnx.Param(jnp.asarray(teacher_head, jnp.float32),
                                      logical_axes=("embed", "vocab"))


def _frozen_optimizer(tcfg: TrainConfig, model: KDStudent) -> optax.GradientTransformation:
    labels = jax.tree.map(lambda _: "train", nnx.state(model, nnx.Param))
    labels["teacher_head"] = jax.tree.map(lambda _: "frozen", labels["teacher_head"])
    return optax.multi_transform({"train": make_optimizer(tcfg), "frozen": optax.set_to_zero()},
                                 labels)


@nnx.jit
def _hidden_f32(model: Transformer, tokens, mask):
    return model.hidden_states(tokens, attention_mask=mask).astype(jnp.float32)


def teacher_hidden_states(teacher: Transformer, tokens: np.ndarray, mask: np.ndarray | None = None,
                          *, batch_size: int = 8) -> np.ndarray:
    """The teacher's final hidden states ``[N, T, H_t]`` (float32) for ``tokens [N, T]``."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
    fn = _hidden_f32
    out = []
    for i in range(0, len(tokens), batch_size):
        x, a = tokens[i:i + batch_size], mask[i:i + batch_size]
        n = len(x)
        if n < batch_size:  # keep one compiled shape
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, 0)])
            a = np.concatenate([a, np.repeat(a[-1:], batch_size - n, 0)])
        out.append(np.asarray(fn(teacher, jnp.asarray(x), jnp.asarray(a)))[:n])
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What to distil and how.

    Attributes:
      loss: :class:`KDConfig` or :class:`ATKDConfig`.
      train: the optimizer and driver settings, :class:`lmx.train.TrainConfig` (``ckpt_dir``
        optional: with one, a run resumes from its latest checkpoint; an on-policy round resumed
        in the middle is sampled from the resumed student).
      batch_size: rows per optimizer step (split into ``train.accum_steps`` micro-batches).
      source: ``"off_policy"``, ``"on_policy"`` or ``"mixed"``.
      on_policy_fraction: probability that a step is on-policy with ``"mixed"``.
      prompt_len: dataset tokens kept as the prompt of an on-policy row.
      sample_temperature: student sampling temperature (0 = greedy).
      refresh_every: steps between on-policy sampling rounds.
      chunk_size, impl: passed to :func:`lmx.kd.fused_linear_kd_loss`.
    """

    loss: KDConfig | ATKDConfig = KDConfig()
    train: TrainConfig = TrainConfig(steps=100)
    batch_size: int = 8
    source: str = "off_policy"
    on_policy_fraction: float = 0.5
    prompt_len: int = 16
    sample_temperature: float = 1.0
    refresh_every: int = 10
    chunk_size: int | None = None
    impl: str = "custom_vjp"

    def __post_init__(self):
        if not isinstance(self.loss, (KDConfig, ATKDConfig)):
            raise TypeError("loss must be a KDConfig or ATKDConfig, got "
                            f"{type(self.loss).__name__}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.batch_size < 1 or self.batch_size % self.train.accum_steps:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 and divisible by "
                             f"accum_steps={self.train.accum_steps}")
        if self.prompt_len < 1 or self.refresh_every < 1:
            raise ValueError("prompt_len and refresh_every must be >= 1")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")


def make_loss_fn(cfg: DistillConfig):
    """``loss_fn(model: KDStudent, batch, rng) -> (loss_sum, n_scored, metrics)`` for
    :func:`lmx.train.train`; batch = ``tokens, mask, labels [B, T]`` and ``teacher_hidden``."""

    def loss_fn(model: KDStudent, batch: dict, rng):
        del rng
        hs = model.student.hidden_states(batch["tokens"], attention_mask=batch["mask"])
        ws = model.student.output_embedding()
        wt = jax.lax.stop_gradient(model.teacher_head[...])
        loss_sum, aux = fused_linear_kd_loss(hs, ws, batch["teacher_hidden"], wt, batch["labels"],
                                             loss=cfg.loss, chunk_size=cfg.chunk_size,
                                             impl=cfg.impl, reduction="sum", return_aux=True)
        metrics = {k: aux[k] for k in ("n_easy", "n_hard", "mean_unc") if k in aux}
        return loss_sum, aux["n_scored"], metrics

    return loss_fn


def _distill_parts(student: Transformer, teacher: Transformer, cfg: DistillConfig, mesh):
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise ValueError(f"student vocab {student.cfg.vocab_size} != teacher vocab "
                         f"{teacher.cfg.vocab_size}: they must share the tokenizer")
    model = KDStudent(student, teacher.output_embedding())
    tx = _frozen_optimizer(cfg.train, model)
    graphdef, state, shardings = init_state(model, tx, mesh=mesh)
    step = make_train_step(graphdef, make_loss_fn(cfg), tx, shardings=shardings,
                           donate=cfg.train.donate, schedule=make_schedule(cfg.train))
    return model, graphdef, state, step


def make_distill_step(student: Transformer, teacher: Transformer, cfg: DistillConfig, *,
                      mesh=None) -> tuple[Any, TrainState, Step]:
    """``(graphdef, state, step)`` of distillation for a user's own loop (:func:`distill` drives
    the same step through ``lmx.train.run``).

    ``state`` holds the :class:`KDStudent` (student + the teacher's frozen head) placed on
    ``mesh`` by logical axes (FSDP params and Adam moments); ``step(state, batch[accum, micro,
    ...], key) -> (state, metrics)`` with ``batch = tokens, mask, labels [.., B, T]`` and
    ``teacher_hidden [.., B, T, H_t]`` (:func:`teacher_hidden_states`), placed by
    ``lmx.parallel.shard_batch(lmx.train.split_micro(rows, accum), mesh, batch_axis=1)``. The
    trained student is ``nnx.merge(graphdef, state.params, state.aux).student``.
    """
    _, graphdef, state, step = _distill_parts(student, teacher, cfg, mesh)
    return graphdef, state, step


@dataclasses.dataclass
class DistillResult:
    student: Transformer
    losses: list[float]
    history: list[dict]


def _row_order(n_rows: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices ``[steps, batch_size]``: epochs of seeded permutations (deterministic)."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    order = np.concatenate([rng.permutation(n_rows) for _ in range(-(-need // n_rows))])
    return order[:need].reshape(steps, batch_size)


def _process_rows(step_rows: np.ndarray) -> np.ndarray:
    """This process's contiguous block of a step's row indices: in a multi-process run each host
    loads and feeds only its own rows (``lmx.parallel.shard_batch`` joins them)."""
    per = len(step_rows) // jax.process_count()
    return step_rows[jax.process_index() * per:(jax.process_index() + 1) * per]


def distill(student: Transformer, teacher: Transformer, tokens: np.ndarray, cfg: DistillConfig, *,
            teacher_hidden: np.ndarray | None = None, mesh=None, pad_id: int = 0,
            eos_id: int | None = None, data_seed: int = 0) -> DistillResult:
    """Distil ``teacher`` into ``student`` on packed rows ``tokens [N, T]`` (e.g. the
    ``"tokens"`` of :func:`lmx.data.pack_corpus`).

    Args:
      teacher_hidden: optional cached :func:`teacher_hidden_states` of ``tokens`` (off-policy rows
        are identical across runs, so benchmarks compute them once).
      mesh: ``lmx.parallel`` mesh; batch rows are sharded over ``data`` x ``fsdp``. In a
        multi-process run (``lmx.parallel.initialize_distributed``) every process passes the same
        ``tokens`` and feeds only its own block of each step's rows (off-policy only).
      pad_id / eos_id: padding for on-policy rows cut short by ``eos_id`` (then masked).
    Returns:
      :class:`DistillResult` with the trained student (the same object, updated in place).
    Raises:
      ValueError: vocab sizes differ, ``tokens`` has the wrong shape, a prompt leaves no room.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [N, T] with T >= 2, got {tokens.shape}")
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise ValueError(f"student vocab {student.cfg.vocab_size} != teacher vocab "
                         f"{teacher.cfg.vocab_size}: they must share the tokenizer")
    if cfg.source != "off_policy" and cfg.prompt_len >= tokens.shape[1]:
        raise ValueError(f"prompt_len={cfg.prompt_len} leaves no room in rows of length "
                         f"{tokens.shape[1]}")
    if teacher_hidden is not None and teacher_hidden.shape[:2] != tokens.shape:
        raise ValueError(f"teacher_hidden {teacher_hidden.shape} does not match tokens "
                         f"{tokens.shape}")
    tc = cfg.train
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"batch_size={cfg.batch_size} does not split over "
                         f"{jax.process_count()} processes")
    if cfg.source != "off_policy" and jax.process_count() > 1:
        raise ValueError(f"source={cfg.source!r} samples from the student on one process; "
                         f"multi-process distillation supports source='off_policy'")
    rows = _row_order(len(tokens), tc.steps, cfg.batch_size, data_seed)
    coin = np.random.default_rng(data_seed + 1).random(tc.steps)
    on_policy = (np.ones(tc.steps, bool) if cfg.source == "on_policy"
                 else coin < cfg.on_policy_fraction if cfg.source == "mixed"
                 else np.zeros(tc.steps, bool))
    if cfg.source == "off_policy" or not on_policy.any():
        hidden = teacher_hidden if teacher_hidden is not None else teacher_hidden_states(
            teacher, tokens)
    else:
        hidden = teacher_hidden
    model, graphdef, state, step = _distill_parts(student, teacher, cfg, mesh)
    full = np.ones(tokens.shape[1], bool)

    def off_policy_batch(step):
        idx = _process_rows(rows[step])
        x = tokens[idx]
        h = hidden[idx] if hidden is not None else teacher_hidden_states(teacher, x)
        return {"tokens": x, "mask": np.broadcast_to(full, x.shape).copy(), "labels": x.copy(),
                "teacher_hidden": h}

    hooks, get_rows = (), off_policy_batch
    if cfg.source != "off_policy" and on_policy.any():
        rounds: dict[int, dict] = {}

        def sample_round(s, state):
            # an event every refresh_every steps (and on resume): the current student samples
            # every on-policy row of the round; seeded by step, so a rerun draws the same
            if s % cfg.refresh_every and s in rounds:
                return None
            current = nnx.merge(graphdef, state.params, state.aux).student
            rounds.clear()
            for t in range(s, min(tc.steps, s - s % cfg.refresh_every + cfg.refresh_every)):
                rounds[t] = (on_policy_batch(current, teacher, tokens[rows[t]], cfg, pad_id, eos_id,
                                             seed=tc.seed * 100003 + t)
                             if on_policy[t] else off_policy_batch(t))
            return None

        hooks, get_rows = (sample_round,), rounds.__getitem__
    result = run(state, step, lambda s: split_micro(get_rows(s), tc.accum_steps), tc.run_config("distill"),
                 mesh=mesh or single_device_mesh(), hooks=hooks, batch_axis=1)
    nnx.update(model, result.state.params)
    return DistillResult(student=model.student, losses=result.losses, history=result.history)


def on_policy_batch(student: Transformer, teacher: Transformer, rows: np.ndarray,
                    cfg: DistillConfig, pad_id: int, eos_id: int | None, seed: int) -> dict:
    """Prompts = first ``prompt_len`` tokens of ``rows``; the student samples the rest
    (``lmx.models.generate``); labels score only sampled tokens; teacher hidden states attached."""
    n, t = rows.shape
    p = cfg.prompt_len
    new = generate(student, [list(r[:p]) for r in rows], max_new_tokens=t - p,
                   temperature=cfg.sample_temperature, stop_tokens=() if eos_id is None
                   else (eos_id,), pad_id=pad_id, seed=seed)
    x = np.full((n, t), pad_id, np.int32)
    mask = np.zeros((n, t), bool)
    x[:, :p], mask[:, :p] = rows[:, :p], True
    for i, g in enumerate(new):
        x[i, p:p + len(g)], mask[i, p:p + len(g)] = g, True
    labels = np.where(mask, x, -100)
    labels[:, :p] = -100
    return {"tokens": x, "mask": mask, "labels": labels.astype(np.int32),
            "teacher_hidden": teacher_hidden_states(teacher, x, mask)}


@nnx.jit
def _eval_sums(m: Transformer, x, h, w):
    hs, ws = m.hidden_states(x), m.output_embedding()
    nll = fused_linear_kd_loss(hs, ws, h, w, x, reduction="sum",
                               loss=KDConfig(hard_weight=1.0, soft_weight=0.0))
    return nll, fused_linear_kd_loss(hs, ws, h, w, x, reduction="sum")


def evaluate(student: Transformer, teacher_head: jax.Array, tokens: np.ndarray,
             teacher_hidden: np.ndarray, *, batch_size: int = 8) -> dict:
    """Held-out student NLL (nats / token) and forward KL(teacher || student) per token."""
    fn = _eval_sums
    nll = kl = 0.0
    for i in range(0, len(tokens), batch_size):
        a, b = fn(student, jnp.asarray(tokens[i:i + batch_size]),
                  jnp.asarray(teacher_hidden[i:i + batch_size]), jnp.asarray(teacher_head))
        nll, kl = nll + float(a), kl + float(b)
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    return {"nll": nll / n, "kl": kl / n}


__all__ = ["DistillConfig", "DistillResult", "KDStudent", "SOURCES", "distill", "evaluate",
           "init_student", "make_loss_fn", "on_policy_batch", "teacher_hidden_states"]
