"""Adaptive Teaching KD (ATKD, arXiv:2402.11890, ACL 2024): target / non-target decomposition of
forward and reverse KL and the uncertainty-based token split.

The decomposition follows Decoupled KD (Zhao et al. 2022, arXiv:2203.08679); the split and the
weighting follow the ATKD paper and its official code (github.com/WHU-ZQH/ATKD). Everything is
evaluated in log space, so ``1 - p_g`` never rounds to zero (the official code forms it from
probabilities, which gives NaN) and empty groups give a zero term instead of NaN.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmx.kd.divergences import (Array, _check_temperature, _check_unit, _check_vocab_size, align,
                                check_label_ids, check_pair, check_reduction, compute_dtype,
                                kl_from_logs, label_id_poison, log_probs)

DIRECTIONS = ("forward", "reverse")
SPLIT_SCOPES = ("sequence", "local_batch", "global")
NORMALIZATIONS = ("per_group", "global")


@dataclasses.dataclass(frozen=True)
class ATKDConfig:
    """Hyper-parameters of :func:`atkd_loss` (also the ``loss`` argument of the fused path).

    Attributes:
      hard_fraction: ``k`` in (0, 1], fraction of valid tokens put in the hard (uncertain) group;
        the threshold is ``u[floor((1 - k)(n - 1))]`` of the ascending teacher uncertainties
        (official lower-median rule at k = 0.5; ties go to the hard group). Default 0.5.
      easy_weight: ``lambda`` in [0, 1], weight of the easy-group loss. Default 0.2.
      direction: ``"forward"`` (KL(p||q) pieces) or ``"reverse"`` (KL(q||p) pieces; the split
        still uses the teacher's uncertainty).
      temperature: loss temperature.
      split_scope: ``"local_batch"`` (default, official: all valid tokens of the arrays passed
        in, i.e. of a device's micro-batch), ``"sequence"`` (one split per sequence) or
        ``"global"`` (a caller-supplied threshold computed by :func:`atkd_threshold` over the
        whole optimizer step).
      split_groups: with ``"local_batch"``, split the batch rows into this many contiguous groups
        that are thresholded separately (= number of data-parallel devices reproduces the
        official per-device split inside one jitted global batch).
      normalize: ``"per_group"`` (official: ``lambda L_E / |E| + (1 - lambda) L_H / |H|``) or
        ``"global"`` (sums of both groups divided by the number of scored tokens, as S4).
      unc_weighted_nckd: multiply NCKD by the uncertainty (teacher ``1 - p_g`` forward, student
        ``1 - q_g`` reverse); with ``hard_fraction=1, easy_weight=0`` this recovers FKL / RKL.
      ignore_index, valid_vocab_size: as :class:`lmx.kd.KDConfig`.
    """

    hard_fraction: float = 0.5
    easy_weight: float = 0.2
    direction: str = "forward"
    temperature: float = 1.0
    split_scope: str = "local_batch"
    split_groups: int = 1
    normalize: str = "per_group"
    unc_weighted_nckd: bool = False
    ignore_index: int = -100
    valid_vocab_size: int | None = None

    def __post_init__(self):
        _check_unit("hard_fraction", self.hard_fraction, lo_open=True, hi_open=False)
        _check_unit("easy_weight", self.easy_weight, lo_open=False, hi_open=False)
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        _check_temperature(self.temperature)
        if self.split_scope not in SPLIT_SCOPES:
            raise ValueError(f"split_scope must be one of {SPLIT_SCOPES}, got {self.split_scope!r}")
        if not isinstance(self.split_groups, int) or self.split_groups < 1:
            raise ValueError(f"split_groups must be an int >= 1, got {self.split_groups!r}")
        if self.split_groups > 1 and self.split_scope != "local_batch":
            raise ValueError("split_groups > 1 is only meaningful with split_scope='local_batch'")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        _check_vocab_size(self.valid_vocab_size)

    needs_targets = True


def _target_split(log_x: Array, targets: Array):
    """``(l_g, l_rest, log_hat)``: log prob of the target, log of the non-target mass
    ``log(1 - x_g)`` (an LSE over the non-target entries, never ``log(1 - x_g)`` from a
    probability), and the renormalised non-target log-distribution (``-inf`` at the target)."""
    onehot = jnp.arange(log_x.shape[-1]) == targets[..., None]
    l_g = jnp.take_along_axis(log_x, targets[..., None], axis=-1)[..., 0]
    l_nt = jnp.where(onehot, -jnp.inf, log_x)
    l_rest = jax.nn.logsumexp(l_nt, axis=-1)
    # A row whose only finite entry is the target has no non-target distribution.
    safe_rest = jnp.where(jnp.isfinite(l_rest), l_rest, 0.0)
    return l_g, l_rest, l_nt - safe_rest[..., None]


def target_decomposition(log_q: Array, log_p: Array, targets: Array, direction: str = "forward"):
    """Target-oriented (TCKD) and diversity-oriented (NCKD) parts of KL (Zhao et al.
    2022, arXiv:2203.08679; Zhong et al. 2024, arXiv:2402.11890).

    Forward: ``KL(p||q) = KL(bp||bq) + (1 - p_g) KL(p_hat||q_hat)``; reverse:
    ``KL(q||p) = KL(bq||bp) + (1 - q_g) KL(q_hat||p_hat)`` with binary ``b = (x_g, 1 - x_g)`` and
    non-target renormalised ``x_hat_v = x_v / (1 - x_g)``, ``v != g``.

    Args:
      log_q, log_p: student / teacher log-probabilities ``[..., V]``.
      targets: int ``[...]`` target token per row (a legal index).
      direction: ``"forward"`` or ``"reverse"``.
    Returns:
      ``(tckd, nckd, log_unc_teacher, log_unc_student)``, each ``[...]``;
      ``log_unc = log(1 - x_g)``.
      NCKD does not depend on the student's target logit; TCKD depends on the student only
      through ``q_g``.
    Raises:
      ValueError: bad ``direction``, mismatched shapes, or (concrete ``targets``) a target
      outside ``[0, V)``, naming its value and position. TypeError: non-integer targets.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if tuple(log_q.shape) != tuple(log_p.shape):
        raise ValueError(f"log_q {tuple(log_q.shape)} and log_p {tuple(log_p.shape)} must match")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be an integer array, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(log_q.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(log_q.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    check_label_ids(targets, log_q.shape[-1], None, name="targets")
    dt = compute_dtype(log_q, log_p)
    sg, srest, shat = _target_split(log_q.astype(dt), targets)
    tg, trest, that = _target_split(log_p.astype(dt), targets)
    bin_q = jnp.stack([sg, srest], axis=-1)
    bin_p = jnp.stack([tg, trest], axis=-1)
    if direction == "forward":
        tckd, nckd = kl_from_logs(bin_p, bin_q), kl_from_logs(that, shat)
    else:
        tckd, nckd = kl_from_logs(bin_q, bin_p), kl_from_logs(shat, that)
    return tckd, nckd, trest, srest


def atkd_threshold(log_unc: Array, mask: Array, hard_fraction: float = 0.5) -> Array:
    """Split threshold over the valid entries of ``log_unc`` (any shape), as the official ATKD code.

    With ``u`` the ascending valid values and ``n`` their count:
    ``theta = u[floor((1 - k)(n - 1))]``
    (k = 0.5: the lower median, as the official code). A token is hard iff valid and
    ``log_unc >= theta`` (ties go to hard). Returns ``+inf`` when ``n = 0`` (no hard token).
    Works under ``jit`` (the index is traced). Raises ValueError for ``k`` outside (0, 1] or
    shapes that differ.
    """
    _check_unit("hard_fraction", hard_fraction, lo_open=True, hi_open=False)
    if tuple(log_unc.shape) != tuple(mask.shape):
        raise ValueError(f"log_unc {tuple(log_unc.shape)} and mask {tuple(mask.shape)} must match")
    flat = jnp.ravel(jax.lax.stop_gradient(log_unc))
    valid = jnp.ravel(mask).astype(bool)
    u = jnp.sort(jnp.where(valid, flat, jnp.inf))
    n = jnp.sum(valid)
    # The small offset keeps exact products like 0.3 * 10 from flooring to 2.999... -> 2.
    pos = jnp.floor((1.0 - hard_fraction) * (n - 1).astype(jnp.float32) + 1e-3)
    idx = jnp.clip(pos.astype(jnp.int32), 0, u.shape[0] - 1)
    return jnp.where(n > 0, u[idx], jnp.inf)


def atkd_token_terms(zs: Array, zt: Array, targets: Array, m: Array, cfg: ATKDConfig):
    """Per-token ``[TCKD, NCKD]`` (``[..., 2]``) and the teacher's ``log UnC`` (``[...]``) from raw
    logits rows; shared by :func:`atkd_loss` and the fused path. Teacher under stop-gradient."""
    zt = jax.lax.stop_gradient(zt)
    dt = compute_dtype(zs, zt)
    lq = log_probs(zs, m, cfg.temperature, dt)
    lp = log_probs(zt, m, cfg.temperature, dt)
    tckd, nckd, lu_t, lu_s = target_decomposition(lq, lp, targets, cfg.direction)
    if cfg.unc_weighted_nckd:
        nckd = jnp.exp(lu_t if cfg.direction == "forward" else lu_s) * nckd
    return jnp.stack([tckd, nckd], axis=-1), jax.lax.stop_gradient(lu_t)


def atkd_term_weights(log_unc: Array, m: Array, cfg: ATKDConfig, *, n_groups: int,
                      threshold=None, group_counts=None, denominator=None,
                      reduction: str = "mean"):
    """Per-token weights ``[N, 2]`` (on TCKD, NCKD) such that the loss is ``sum(w * terms)``.

    ``log_unc`` and ``m`` are flat ``[N]`` with ``N`` divisible by ``n_groups``; contiguous blocks
    are thresholded separately. Per-group normalisation: each group's
    ``lambda * sum_E NCKD / max(1, |E|) + (1 - lambda) * sum_H (TCKD + NCKD) / max(1, |H|)``,
    averaged over the groups that hold a scored token. Returns ``(weights, hard [N] bool, aux)``
    with ``aux = {"n_easy", "n_hard", "threshold" (first group), "n_scored"}``.
    """
    lam = cfg.easy_weight
    ft = log_unc.dtype  # float32, or float64 in float64 tests
    lu = jax.lax.stop_gradient(log_unc).reshape(n_groups, -1)
    mg = m.reshape(n_groups, -1)
    if threshold is None:
        theta = jax.vmap(lambda a, b: atkd_threshold(a, b, cfg.hard_fraction))(lu, mg)
    else:
        theta = jnp.broadcast_to(jnp.asarray(threshold, lu.dtype), (n_groups,))
    hard = mg & (lu >= theta[:, None])
    easy = mg & ~hard
    hf, ef = hard.astype(ft), easy.astype(ft)
    n_hard, n_easy = jnp.sum(hf, axis=1), jnp.sum(ef, axis=1)
    n_scored = jnp.sum(mg, dtype=ft)
    if cfg.normalize == "per_group":
        if group_counts is not None:
            n_easy = jnp.broadcast_to(jnp.asarray(group_counts[0], ft), (n_groups,))
            n_hard = jnp.broadcast_to(jnp.asarray(group_counts[1], ft), (n_groups,))
        c_h = ((1.0 - lam) / jnp.maximum(n_hard, 1.0))[:, None]
        c_e = (lam / jnp.maximum(n_easy, 1.0))[:, None]
        active = jnp.maximum(jnp.sum((n_hard + n_easy) > 0), 1).astype(ft)
        w_t = hf * c_h / active
        w_n = (hf * c_h + ef * c_e) / active
        if reduction == "sum":
            # Sum form for a trainer that divides by the (global) scored count afterwards.
            ref = n_scored if group_counts is None else (
                jnp.asarray(group_counts[0], ft) + jnp.asarray(group_counts[1], ft))
            w_t, w_n = w_t * ref, w_n * ref
    else:
        w_t = hf * (1.0 - lam)
        w_n = hf * (1.0 - lam) + ef * lam
        if reduction == "mean":
            d = n_scored if denominator is None else jnp.asarray(denominator, ft)
            w_t, w_n = w_t / jnp.maximum(d, 1.0), w_n / jnp.maximum(d, 1.0)
    weights = jnp.stack([w_t.reshape(-1), w_n.reshape(-1)], axis=-1)
    aux = {"n_easy": jnp.sum(ef), "n_hard": jnp.sum(hf), "threshold": theta[0],
           "n_scored": n_scored}
    return weights, hard.reshape(-1), aux


def check_atkd_extras(cfg: ATKDConfig, lead_shape, *, threshold, group_counts,
                      denominator, reduction: str) -> int:
    """Validate scope-dependent arguments; return the number of split groups."""
    check_reduction(reduction, denominator)
    if cfg.split_scope == "global":
        if threshold is None:
            raise ValueError("split_scope='global' needs threshold= (atkd_threshold over the "
                             "whole optimizer step's teacher log-uncertainties)")
    elif threshold is not None or group_counts is not None:
        raise ValueError("threshold / group_counts are only used with split_scope='global'")
    if denominator is not None and cfg.normalize != "global":
        raise ValueError("denominator is only used with normalize='global'; per-group means "
                         "take global counts through group_counts")
    if group_counts is not None and len(group_counts) != 2:
        raise ValueError(f"group_counts must be (n_easy, n_hard), got {group_counts!r}")
    if cfg.split_scope == "sequence":
        if len(lead_shape) != 2:
            raise ValueError(f"split_scope='sequence' needs [B, T, V] logits, got lead shape "
                             f"{tuple(lead_shape)}")
        return int(lead_shape[0])
    if cfg.split_scope == "local_batch" and cfg.split_groups > 1:
        if len(lead_shape) < 2 or lead_shape[0] % cfg.split_groups:
            raise ValueError(f"split_groups={cfg.split_groups} must divide the batch size, "
                             f"got lead shape {tuple(lead_shape)}")
        return cfg.split_groups
    return 1


def atkd_loss(student_logits: Array, teacher_logits: Array, labels: Array, *,
              mask: Array | None = None, hard_fraction: float = 0.5, easy_weight: float = 0.2,
              direction: str = "forward", temperature: float = 1.0,
              split_scope: str = "local_batch", split_groups: int = 1,
              normalize: str = "per_group", unc_weighted_nckd: bool = False,
              ignore_index: int = -100, shift: bool = True, valid_vocab_size: int | None = None,
              threshold=None, group_counts=None, denominator=None, reduction: str = "mean",
              return_aux: bool = False):
    """ATKD loss (Zhong et al. 2024, arXiv:2402.11890): ``lambda * L_E + (1 - lambda) * L_H`` with
    ``L_E = sum_E NCKD / |E|`` and ``L_H = sum_H (TCKD + NCKD) / |H|``; E/H split the scored tokens
    by the teacher's uncertainty ``1 - p_g`` (hard = the ``k`` most uncertain, ties hard).

    Args:
      student_logits, teacher_logits: float ``[B, T, V]`` (``[N, V]`` with ``shift=False``).
      labels: int ``[B, T]``; the target token of each position (ground truth off-policy, the
        sampled token on-policy); ``ignore_index`` marks unscored positions.
      mask: optional bool ``[B, T]`` combined with the labels' mask.
      threshold: scalar ``log UnC`` threshold for ``split_scope="global"``.
      group_counts: optional global ``(n_easy, n_hard)`` for ``normalize="per_group"`` under
        accumulation with a global split (sum over micro-batches then equals the global loss).
      denominator: global scored count for ``normalize="global"``.
      reduction: ``"mean"`` (the ATKD loss) or ``"sum"`` (the loss times the scored count, so a
        trainer that divides the sum over micro-batches by the global count gets a token-weighted
        mean of micro-batch losses; for ``normalize="global"`` the plain weighted sum).
      Other arguments: see :class:`ATKDConfig`.
    Returns:
      float32 scalar, or ``(loss, aux)`` with ``n_easy, n_hard, n_scored, threshold, mean_unc,
      mean_tckd_hard, mean_nckd_easy, mean_nckd_hard``.
    Raises:
      TypeError / ValueError: bad shapes or dtypes (see :func:`lmx.kd.divergences.check_pair`),
      hyper-parameters outside their ranges, scope arguments that do not fit the scope.
      ValueError: a label id outside ``[0, V)`` that is not ``ignore_index`` (value and
      position named); under ``jit`` such an id makes the loss NaN instead.
    """
    cfg = ATKDConfig(hard_fraction=hard_fraction, easy_weight=easy_weight, direction=direction,
                     temperature=temperature, split_scope=split_scope, split_groups=split_groups,
                     normalize=normalize, unc_weighted_nckd=unc_weighted_nckd,
                     ignore_index=ignore_index, valid_vocab_size=valid_vocab_size)
    check_pair(student_logits, teacher_logits, labels, mask, valid_vocab_size=valid_vocab_size,
               needs_labels=True, shift=shift)
    lead = student_logits.shape[:-1]
    lead_shifted = (*lead[:-1], lead[-1] - 1) if shift else lead
    n_groups = check_atkd_extras(cfg, lead_shifted, threshold=threshold,
                                 group_counts=group_counts, denominator=denominator,
                                 reduction=reduction)
    vocab = student_logits.shape[-1] if valid_vocab_size is None else valid_vocab_size
    check_label_ids(labels, vocab, ignore_index)
    zs, zt = student_logits, teacher_logits
    if valid_vocab_size is not None:
        zs, zt = zs[..., :valid_vocab_size], zt[..., :valid_vocab_size]
    if shift:
        zs, zt = zs[..., :-1, :], zt[..., :-1, :]
    targets, m = align(labels, mask, lead, shift=shift, ignore_index=ignore_index)
    terms, lu = atkd_token_terms(zs, zt, targets, m, cfg)
    terms, lu, mf = terms.reshape(-1, 2), lu.reshape(-1), m.reshape(-1)
    w, hard, aux = atkd_term_weights(lu, mf, cfg, n_groups=n_groups, threshold=threshold,
                                     group_counts=group_counts, denominator=denominator,
                                     reduction=reduction)
    loss = jnp.sum(w * terms) + label_id_poison(labels, vocab, ignore_index, terms.dtype)
    if not return_aux:
        return loss
    return loss, {**aux, **atkd_stats(terms, lu, mf, hard)}


def atkd_stats(terms: Array, log_unc: Array, m: Array, hard: Array) -> dict:
    """Diagnostics from flat per-token terms ``[N, 2]`` and the hard-group mask ``[N]``: mean
    teacher UnC over scored tokens and group means of TCKD (hard) and NCKD (easy / hard)."""
    terms = jax.lax.stop_gradient(terms)
    mf = m.astype(terms.dtype)
    hard = hard.astype(terms.dtype)
    easy = mf - hard

    def mean(x, w):
        return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)

    return {"mean_unc": mean(jnp.exp(log_unc), mf), "mean_tckd_hard": mean(terms[:, 0], hard),
            "mean_nckd_easy": mean(terms[:, 1], easy), "mean_nckd_hard": mean(terms[:, 1], hard)}
