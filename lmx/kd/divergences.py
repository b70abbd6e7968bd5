"""Token-level distillation divergences over ``[..., V]`` log-probabilities and the KD loss.

Divergences as in ATKD (Zhong et al. 2024, arXiv:2402.11890), DistiLLM (arXiv:2402.03898) and GKD
(arXiv:2306.13649). ``p`` is the teacher, ``q`` the student.
Every divergence is a true divergence (zero at ``p == q``), computed from log-probabilities in
float32 with the convention ``0 log 0 = 0`` so that ``-inf`` logits (padded vocabulary) neither
contribute to the value nor produce NaN gradients.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("fkl", "rkl", "mixed_kl", "sym_kl", "gjsd", "js_distance", "skl", "srkl", "tvd")

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Validation (raised before any compute)
# --------------------------------------------------------------------------------------------

def _check_float(name: str, x: Any) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}")


def _check_int(name: str, x: Any) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {dtype}")


def _check_unit(name: str, value: float, *, lo_open: bool, hi_open: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise TypeError(f"{name} must be a Python float, got {value!r}")
    lo_ok = value > 0 if lo_open else value >= 0
    hi_ok = value < 1 if hi_open else value <= 1
    if not (lo_ok and hi_ok):
        interval = ("(" if lo_open else "[") + "0, 1" + (")" if hi_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a Python float, got {temperature!r}")
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """Hyper-parameters of :func:`kd_loss` (also the ``loss`` argument of the fused path).

    Attributes:
      kind: one of :data:`KINDS` (see :func:`token_divergence`).
      temperature: loss temperature ``tau`` (logits are divided by it); sampling temperature is a
        separate parameter of the data source (a TRL path that used the sampling temperature in
        the loss was fixed in github.com/huggingface/trl/pull/5731).
      beta: generalized JSD mixing weight (``gjsd``), in [0, 1].
      skew: skew weight ``alpha`` of ``skl`` / ``srkl``, in [0, 1).
      mix: FKL weight of ``mixed_kl`` (ATKD repo: 0.9), RKL weight of ``sym_kl`` and ``1 - beta``
        of ``js_distance`` (DistiLLM lambda: 0.9), in [0, 1].
      hard_weight, soft_weight: ``L = hard_weight * CE(q, y) + soft_weight * KD``; default pure KD.
        The hard cross-entropy is taken at temperature 1.
      scale_by_temperature_squared: multiply the soft term by ``tau**2`` (Hinton); off by default
        because none of the official ATKD code, TRL and Liger-Kernel does it.
      ignore_index: label value that marks unscored positions.
      valid_vocab_size: if set, both logit tensors are sliced to ``[..., :valid_vocab_size]``
        (padded embedding tables); otherwise their vocab sizes must match.
    """

    kind: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    mix: float = 0.9
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    scale_by_temperature_squared: bool = False
    ignore_index: int = -100
    valid_vocab_size: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        _check_temperature(self.temperature)
        _check_unit("beta", self.beta, lo_open=False, hi_open=False)
        _check_unit("skew", self.skew, lo_open=False, hi_open=True)
        _check_unit("mix", self.mix, lo_open=False, hi_open=False)
        for name in ("hard_weight", "soft_weight"):
            w = getattr(self, name)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {w!r}")
        _check_vocab_size(self.valid_vocab_size)

    @property
    def needs_targets(self) -> bool:
        return self.hard_weight > 0


def _check_vocab_size(valid_vocab_size: int | None) -> None:
    if valid_vocab_size is not None and (not isinstance(valid_vocab_size, int)
                                         or isinstance(valid_vocab_size, bool)
                                         or valid_vocab_size < 2):
        raise ValueError(f"valid_vocab_size must be None or an int >= 2, got {valid_vocab_size!r}")


def check_pair(student_logits, teacher_logits, labels, mask, *, valid_vocab_size: int | None,
               needs_labels: bool, shift: bool, name_s: str = "student_logits",
               name_t: str = "teacher_logits") -> None:
    """Validate a student/teacher logits pair with labels and mask (shapes, dtypes, vocab).

    Raises:
      TypeError: non-floating logits, non-integer labels, non-boolean/non-numeric mask.
      ValueError: mismatched leading shapes, vocab sizes that differ without
        ``valid_vocab_size`` (or are smaller than it), labels or mask of the wrong shape, a
        sequence of length < 2 with ``shift=True``.
    """
    _check_float(name_s, student_logits)
    _check_float(name_t, teacher_logits)
    s, t = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if len(s) < 2:
        raise ValueError(f"{name_s} must have shape [..., V] with at least 2 dims, got {s}")
    if s[:-1] != t[:-1]:
        raise ValueError(f"{name_s} {s} and {name_t} {t} must share the leading shape [..., V]")
    if valid_vocab_size is None:
        if s[-1] != t[-1]:
            raise ValueError(f"vocab sizes differ: {name_s} has {s[-1]}, {name_t} has {t[-1]}; "
                             "pass valid_vocab_size to slice both to the real vocabulary")
    elif min(s[-1], t[-1]) < valid_vocab_size:
        raise ValueError(f"valid_vocab_size={valid_vocab_size} exceeds a vocab size "
                         f"({name_s}: {s[-1]}, {name_t}: {t[-1]})")
    if shift:
        if len(s) < 3:
            raise ValueError(f"shift=True needs {name_s} of shape [B, T, V], got {s}; pass "
                             "shift=False for already aligned [N, V] rows")
        if s[-2] < 2:
            raise ValueError(f"shift=True needs a sequence length >= 2, got {name_s} {s}")
    lead = s[:-1]
    if labels is None:
        if needs_labels:
            raise ValueError(f"labels of shape {lead} (int) are required for this loss")
    else:
        _check_int("labels", labels)
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead} (the logits without V), "
                             f"got {tuple(labels.shape)}")
    if mask is not None:
        if not hasattr(mask, "shape") or not (mask.dtype == jnp.bool_
                                              or jnp.issubdtype(mask.dtype, jnp.number)):
            raise TypeError(f"mask must be a boolean array of shape {lead}, got {mask!r}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have shape {lead} (the logits without V), "
                             f"got {tuple(mask.shape)}")


def check_label_ids(labels, vocab: int, ignore_index: int | None, name: str = "labels") -> None:
    """Raise ValueError if a concrete ``labels`` array holds an id outside ``[0, vocab)`` that is
    not ``ignore_index`` (``None``: no exemption), naming ``name``, the first bad value and its
    position.

    Every position is checked (also ones masked out by ``mask`` or dropped by the shift): an id
    outside the vocabulary is a data bug wherever it sits. Traced labels (inside ``jit``) cannot
    be inspected here; the losses then return NaN instead (see :func:`label_id_poison`).
    """
    if labels is None or isinstance(labels, jax.core.Tracer):
        return
    ids = np.asarray(labels)
    bad = (ids < 0) | (ids >= vocab)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
        raise ValueError(f"{name}: id {int(ids[pos])} at position {pos} is outside the vocabulary "
                         f"[0, {vocab}){allowed} ({int(bad.sum())} such ids)")


def label_id_poison(labels, vocab: int, ignore_index: int, dtype=jnp.float32) -> Array:
    """Scalar 0, or NaN when ``labels`` holds an id outside ``[0, vocab)`` other than
    ``ignore_index``. Added to a loss so that out-of-range ids under ``jit`` (where
    :func:`check_label_ids` cannot see the values) give NaN rather than a finite wrong value;
    one comparison and reduction over the ``[B, T]`` labels."""
    if labels is None:
        return jnp.zeros((), dtype)
    ids = jnp.asarray(labels)
    bad = (ids != ignore_index) & ((ids < 0) | (ids >= vocab))
    return jnp.where(jnp.any(bad), jnp.asarray(jnp.nan, dtype), jnp.zeros((), dtype))


# --------------------------------------------------------------------------------------------
# Alignment and log-probabilities
# --------------------------------------------------------------------------------------------

def align(labels, mask, lead_shape, *, shift: bool, ignore_index: int):
    """Shifted targets and token mask.

    Returns ``(targets, m)``: ``targets`` int32 with ignored positions replaced by 0 (a legal
    gather index), ``m`` bool; both of shape ``lead_shape`` with the time axis shortened by one
    when ``shift`` (logits at ``t`` predict the token at ``t + 1``).
    """
    m = jnp.ones(lead_shape, bool)
    targets = jnp.zeros(lead_shape, jnp.int32)
    if labels is not None:
        labels = jnp.asarray(labels)
        m = labels != ignore_index
        targets = jnp.where(m, labels, 0).astype(jnp.int32)
    if mask is not None:
        m = m & jnp.asarray(mask).astype(bool)
    if shift:
        targets, m = targets[..., 1:], m[..., 1:]
    return targets, m


def compute_dtype(*arrays) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs, float64 when any input is float64 (tests)."""
    dt = jnp.float32
    for a in arrays:
        dt = jnp.promote_types(dt, a.dtype)
    return dt


def log_probs(logits: Array, m: Array, temperature: float, dtype=None) -> Array:
    """``log_softmax(logits / tau)`` over the last axis in float32 (float64 for float64 input);
    masked rows are replaced by zeros first so that arbitrary (even non-finite) values there touch
    neither value nor gradient."""
    dtype = compute_dtype(logits) if dtype is None else dtype
    z = jnp.where(m[..., None], logits.astype(dtype), 0.0)
    return jax.nn.log_softmax(z / temperature, axis=-1)


# --------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------

def kl_from_logs(log_a: Array, log_b: Array) -> Array:
    """``KL(a || b) = sum_v a_v (log a_v - log b_v)`` over the last axis with ``0 log 0 = 0``.

    The double ``where`` keeps gradients finite where ``log a = log b = -inf`` (padded vocab).
    """
    pos = log_a > -jnp.inf
    la = jnp.where(pos, log_a, 0.0)
    lb = jnp.where(pos, log_b, 0.0)
    return jnp.sum(jnp.where(pos, jnp.exp(la) * (la - lb), 0.0), axis=-1)


def _log_mix(w_a: float, log_a: Array, log_b: Array) -> Array:
    """``log(w_a * a + (1 - w_a) * b)`` in log space, for ``0 < w_a < 1``.

    Entries where both inputs are ``-inf`` (padded vocab) are routed around ``logaddexp``, whose
    gradient is NaN there, and set to ``-inf``."""
    both = (log_a == -jnp.inf) & (log_b == -jnp.inf)
    mixed = jnp.logaddexp(math.log(w_a) + jnp.where(both, 0.0, log_a),
                          math.log1p(-w_a) + jnp.where(both, 0.0, log_b))
    return jnp.where(both, -jnp.inf, mixed)


def _gjsd(log_q: Array, log_p: Array, beta: float) -> Array:
    """Generalized JSD for ``0 < beta < 1`` (endpoints are handled by the caller)."""
    log_m = _log_mix(beta, log_p, log_q)
    return beta * kl_from_logs(log_p, log_m) + (1.0 - beta) * kl_from_logs(log_q, log_m)


def token_divergence(log_q: Array, log_p: Array, kind: str = "fkl", *, beta: float = 0.5,
                     skew: float = 0.1, mix: float = 0.9) -> Array:
    """Per-token divergence summed over the vocab (last axis).

    Args:
      log_q: student log-probabilities ``[..., V]`` (already normalised, float32).
      log_p: teacher log-probabilities ``[..., V]``.
      kind:
        - ``fkl``: ``KL(p||q)``; ``rkl``: ``KL(q||p)``.
        - ``mixed_kl``: ``mix * FKL + (1 - mix) * RKL`` (the ATKD repo's "jsd", mix = 0.9).
        - ``sym_kl``: ``(1 - mix) * FKL + mix * RKL`` (DistiLLM symmetric KL, lambda = mix).
        - ``gjsd``: ``M = beta p + (1 - beta) q``, ``beta KL(p||M) + (1 - beta) KL(q||M)`` mixed
          in probability space (GKD); ``beta = 0`` gives FKL and ``beta = 1`` RKL exactly
          (the continuous limits divided by ``beta`` resp. ``1 - beta``, as TRL/Liger do).
        - ``js_distance``: ``gjsd`` with ``beta = 1 - mix`` (DistiLLM).
        - ``skl``: ``KL(p || skew p + (1 - skew) q)``; ``srkl``: ``KL(q || (1 - skew) p + skew q)``.
        - ``tvd``: ``0.5 sum_v |p_v - q_v|``.
    Returns:
      array ``log_q.shape[:-1]``, float32 (float64 for float64 input).
    Raises:
      ValueError: unknown ``kind`` or a weight outside its interval; mismatched shapes.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _check_unit("beta", beta, lo_open=False, hi_open=False)
    _check_unit("skew", skew, lo_open=False, hi_open=True)
    _check_unit("mix", mix, lo_open=False, hi_open=False)
    if tuple(log_q.shape) != tuple(log_p.shape):
        raise ValueError(f"log_q {tuple(log_q.shape)} and log_p {tuple(log_p.shape)} must match")
    dt = compute_dtype(log_q, log_p)
    log_q = log_q.astype(dt)
    log_p = log_p.astype(dt)
    if kind == "fkl":
        return kl_from_logs(log_p, log_q)
    if kind == "rkl":
        return kl_from_logs(log_q, log_p)
    if kind in ("mixed_kl", "sym_kl"):
        w_f = mix if kind == "mixed_kl" else 1.0 - mix
        return w_f * kl_from_logs(log_p, log_q) + (1.0 - w_f) * kl_from_logs(log_q, log_p)
    if kind in ("gjsd", "js_distance"):
        b = beta if kind == "gjsd" else 1.0 - mix
        # Endpoints are exact special cases, never clamped (github.com/huggingface/trl/pull/3043).
        if b == 0.0:
            return kl_from_logs(log_p, log_q)
        if b == 1.0:
            return kl_from_logs(log_q, log_p)
        return _gjsd(log_q, log_p, b)
    if kind == "skl":
        if skew == 0.0:
            return kl_from_logs(log_p, log_q)
        return kl_from_logs(log_p, _log_mix(skew, log_p, log_q))
    if kind == "srkl":
        if skew == 0.0:
            return kl_from_logs(log_q, log_p)
        return kl_from_logs(log_q, _log_mix(skew, log_q, log_p))
    # tvd: exp(-inf) = 0, so padded columns contribute |0 - 0| = 0.
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def kd_token_terms(zs: Array, zt: Array, targets: Array, m: Array, cfg: KDConfig) -> Array:
    """Per-token ``[soft divergence, hard CE]`` of shape ``[..., 2]`` from raw logits rows.

    Shared by :func:`kd_loss` and the fused chunked path so both compute the same thing.
    The teacher is under stop-gradient.
    """
    zt = jax.lax.stop_gradient(zt)
    dt = compute_dtype(zs, zt)
    lq = log_probs(zs, m, cfg.temperature, dt)
    lp = log_probs(zt, m, cfg.temperature, dt)
    soft = token_divergence(lq, lp, cfg.kind, beta=cfg.beta, skew=cfg.skew, mix=cfg.mix)
    if cfg.hard_weight > 0:
        lq1 = lq if cfg.temperature == 1.0 else log_probs(zs, m, 1.0, dt)
        hard = -jnp.take_along_axis(lq1, targets[..., None], axis=-1)[..., 0]
    else:
        hard = jnp.zeros_like(soft)
    return jnp.stack([soft, hard], axis=-1)


def kd_term_weights(m: Array, cfg: KDConfig, denominator, dtype=jnp.float32) -> Array:
    """Per-token weights ``[..., 2]`` so that the loss is ``sum(weights * terms)``."""
    soft = cfg.soft_weight * (cfg.temperature ** 2 if cfg.scale_by_temperature_squared else 1.0)
    mf = m.astype(dtype)
    w = jnp.stack([soft * mf, cfg.hard_weight * mf], axis=-1)
    if denominator is None:
        return w
    return w / jnp.maximum(jnp.asarray(denominator, dtype), 1.0)


def check_reduction(reduction: str, denominator) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if denominator is not None and reduction == "sum":
        raise ValueError("denominator is only used with reduction='mean'")


def kd_loss(student_logits: Array, teacher_logits: Array, labels: Array | None = None, *,
            mask: Array | None = None, kind: str = "fkl", temperature: float = 1.0,
            beta: float = 0.5, skew: float = 0.1, mix: float = 0.9, hard_weight: float = 0.0,
            soft_weight: float = 1.0, scale_by_temperature_squared: bool = False,
            ignore_index: int = -100, shift: bool = True, valid_vocab_size: int | None = None,
            reduction: str = "mean", denominator=None, return_aux: bool = False):
    """Token-level KD loss between student and teacher logits.

    ``L = sum_t m_t * (soft_weight * s * D_t + hard_weight * CE_t) / max(1, n)`` where ``D_t`` is
    :func:`token_divergence` at temperature ``tau``, ``s = tau**2`` if
    ``scale_by_temperature_squared`` else 1, and ``n = sum_t m_t`` unless ``denominator`` is
    given (pass the GLOBAL number of scored tokens under gradient accumulation or data
    parallelism; github.com/huggingface/trl/issues/4719 shows the bias otherwise).

    Args:
      student_logits, teacher_logits: float ``[B, T, V]`` (or ``[N, V]`` with ``shift=False``);
        any float dtype, computed in float32. The teacher gets no gradient.
      labels: int ``[B, T]``; ``ignore_index`` marks unscored positions (prompt, padding); needed
        only for the hard CE term and for masking.
      mask: optional bool ``[B, T]`` (True = scored), combined with the labels' mask; indexed like
        the labels (it marks the predicted token).
      shift: logits at ``t`` predict token ``t + 1`` (drop the last logits and first label).
      reduction: ``"mean"`` (divide by the normaliser) or ``"sum"`` (masked sum; the count is
        in ``aux["n_scored"]``) for a trainer that divides by the global count itself.
      Other arguments: see :class:`KDConfig`.
    Returns:
      float32 scalar loss, or ``(loss, aux)`` with ``aux = {"n_scored", "soft_sum", "hard_sum"}``.
    Raises:
      TypeError / ValueError: see :func:`check_pair` and :class:`KDConfig`; ValueError for a
      label id outside ``[0, V)`` (``V`` = ``valid_vocab_size`` or the logits' vocab) that is not
      ``ignore_index``, naming the value and its position. Under ``jit`` the labels cannot be
      inspected and such an id makes the loss NaN instead.
    """
    cfg = KDConfig(kind=kind, temperature=temperature, beta=beta, skew=skew, mix=mix,
                   hard_weight=hard_weight, soft_weight=soft_weight,
                   scale_by_temperature_squared=scale_by_temperature_squared,
                   ignore_index=ignore_index, valid_vocab_size=valid_vocab_size)
    check_pair(student_logits, teacher_logits, labels, mask, valid_vocab_size=valid_vocab_size,
               needs_labels=cfg.needs_targets, shift=shift)
    check_reduction(reduction, denominator)
    vocab = student_logits.shape[-1] if valid_vocab_size is None else valid_vocab_size
    check_label_ids(labels, vocab, ignore_index)
    zs, zt = student_logits, teacher_logits
    if valid_vocab_size is not None:
        zs, zt = zs[..., :valid_vocab_size], zt[..., :valid_vocab_size]
    if shift:
        zs, zt = zs[..., :-1, :], zt[..., :-1, :]
    targets, m = align(labels, mask, student_logits.shape[:-1], shift=shift,
                       ignore_index=ignore_index)
    terms = kd_token_terms(zs, zt, targets, m, cfg)
    n = jnp.sum(m, dtype=terms.dtype)
    w = kd_term_weights(m, cfg, None, terms.dtype)
    total = jnp.sum(w * terms)
    if reduction == "mean":
        total = total / jnp.maximum(n if denominator is None
                                    else jnp.asarray(denominator, terms.dtype), 1.0)
    total = total + label_id_poison(labels, vocab, ignore_index, terms.dtype)
    if not return_aux:
        return total
    mf = m.astype(terms.dtype)
    aux = {"n_scored": n, "soft_sum": jnp.sum(mf * terms[..., 0]),
           "hard_sum": jnp.sum(mf * terms[..., 1])}
    return total, aux
