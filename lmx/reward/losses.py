"""Pairwise reward-model losses: Bradley-Terry, InfoRM's variational KL term, accuracy, stats.

Conventions: ``r`` holds ``2B`` rewards, chosen first then
rejected (as in OpenRLHF's ``concatenated_forward``); per-pair arrays have length ``B``. All
losses are computed in float32 whatever the input dtype. Value checks (NaN, sizes) run only on
concrete arrays, i.e. outside ``jit``; shape checks run always.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KL_MODES = ("diag_sum", "diag_mean", "official_dimmean")
PAIR_REDUCTIONS = ("sum_pair", "mean_2B")


def _is_concrete(x: Any) -> bool:
    """True when ``x`` has host-visible values (not a tracer inside jit/grad)."""
    return not isinstance(x, jax.core.Tracer)


def _check_finite(name: str, x: Any) -> None:
    if _is_concrete(x) and not bool(np.all(np.isfinite(np.asarray(x)))):
        bad = int(np.size(x) - np.isfinite(np.asarray(x)).sum())
        raise ValueError(f"{name} must be finite; it has {bad} NaN/inf entries of {np.size(x)}")


def _check_pair(r_chosen: Any, r_rejected: Any) -> None:
    if jnp.ndim(r_chosen) != 1 or jnp.ndim(r_rejected) != 1:
        raise ValueError("r_chosen and r_rejected must be 1-D [B]; got shapes "
                         f"{jnp.shape(r_chosen)} and {jnp.shape(r_rejected)}")
    if jnp.shape(r_chosen) != jnp.shape(r_rejected):
        raise ValueError("chosen and rejected batches must have the same size; got "
                         f"r_chosen {jnp.shape(r_chosen)} vs r_rejected {jnp.shape(r_rejected)}")
    if jnp.shape(r_chosen)[0] == 0:
        raise ValueError("r_chosen/r_rejected are empty: need at least one preference pair")
    _check_finite("r_chosen", r_chosen)
    _check_finite("r_rejected", r_rejected)


def split_pairs(r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split a ``[2B, ...]`` array (chosen first, then rejected) into two ``[B, ...]`` halves.

    Raises:
        ValueError: if ``r`` is 0-d or its leading size is odd.
    """
    if jnp.ndim(r) == 0 or jnp.shape(r)[0] % 2:
        raise ValueError(f"expected a leading dim of 2B (chosen then rejected), got shape "
                         f"{jnp.shape(r)}")
    b = jnp.shape(r)[0] // 2
    return r[:b], r[b:]


def bradley_terry_loss(r_chosen: jax.Array, r_rejected: jax.Array,
                       margin: jax.Array | None = None) -> jax.Array:
    """Per-pair Bradley-Terry negative log-likelihood with an optional margin.

    ``L_b = -log sigma(r_c,b - r_r,b - m_b) = softplus(-(d_b - m_b))``. Identities: ``L(0) = ln 2``,
    ``L(d) - L(-d) = -d``, ``dL/dd = -(1 - sigma(d))`` and ``L(d; m) = L(d - m; 0)`` (Llama 2
    margin loss, Touvron et al. 2023, arXiv:2307.09288, Sec. 3.2.2; OpenRLHF ``--margin_loss``).

    Args:
        r_chosen, r_rejected: float ``[B]`` rewards.
        margin: optional float ``[B]`` (or scalar) margin ``m``.
    Returns:
        float32 ``[B]`` losses.
    Raises:
        ValueError: different batch sizes, non 1-D inputs, empty batch, NaN/inf rewards or margin.
    """
    _check_pair(r_chosen, r_rejected)
    d = jnp.asarray(r_chosen, jnp.float32) - jnp.asarray(r_rejected, jnp.float32)
    if margin is not None:
        if jnp.ndim(margin) not in (0, 1) or (jnp.ndim(margin) == 1 and
                                              jnp.shape(margin) != jnp.shape(d)):
            raise ValueError(f"margin must be a scalar or [B]={jnp.shape(d)}, got shape "
                             f"{jnp.shape(margin)}")
        _check_finite("margin", margin)
        d = d - jnp.asarray(margin, jnp.float32)
    return jax.nn.softplus(-d)


def pair_accuracy(r_chosen: jax.Array, r_rejected: jax.Array) -> dict[str, jax.Array]:
    """Strict pairwise accuracy ``mean(r_c > r_r)``; ties count as wrong and are reported apart.

    Same rule as TRL's ``RewardTrainer`` and OpenRLHF's ``rm_trainer.py``. Returns
    ``{"acc": float32 scalar, "ties": int32 scalar count}``. Raises ValueError as
    :func:`bradley_terry_loss`.
    """
    _check_pair(r_chosen, r_rejected)
    return {"acc": jnp.mean((r_chosen > r_rejected).astype(jnp.float32)),
            "ties": jnp.sum((r_chosen == r_rejected).astype(jnp.int32))}


def center_penalty(r_chosen: jax.Array, r_rejected: jax.Array) -> jax.Array:
    """Per-pair reward-centering term ``(r_c + r_r)^2`` (Eisenstein et al. 2312.09244; TRL's
    ``center_rewards_coefficient``). Zero when ``r_c = -r_r``. float32 ``[B]``."""
    _check_pair(r_chosen, r_rejected)
    return jnp.square(jnp.asarray(r_chosen, jnp.float32) + jnp.asarray(r_rejected, jnp.float32))


def gaussian_kl(mu: jax.Array, logvar: jax.Array, mode: str = "diag_sum") -> jax.Array:
    """KL of the diagonal-Gaussian posterior ``N(mu, diag(exp(logvar)))`` from the prior ``N(0, I)``.

    * ``"diag_sum"`` (the paper's KL to the N(0, I) prior, default):
      ``1/2 sum_k (exp(l_k) + mu_k^2 - 1 - l_k)``.
    * ``"diag_mean"``: the same divided by ``K``.
    * ``"official_dimmean"`` (parity with the official InfoRM code,
      ``openrlhf/models/model_inform.py``): average ``mu`` and
      ``logvar`` over the K dims first, then the 1-D KL of those means:
      ``-1/2 (1 + l_bar - mu_bar^2 - exp(l_bar))``. Not a KL of the posterior (zero for
      ``mu = [1, -1]``).

    Args:
        mu, logvar: float ``[N, K]``.
    Returns:
        float32 ``[N]`` per-sample KL.
    Raises:
        ValueError: unknown mode, shape mismatch or rank != 2.
    """
    if mode not in KL_MODES:
        raise ValueError(f"kl mode must be one of {KL_MODES}, got {mode!r}")
    if jnp.ndim(mu) != 2 or jnp.shape(mu) != jnp.shape(logvar):
        raise ValueError(f"mu and logvar must both be [N, K]; got {jnp.shape(mu)} and "
                         f"{jnp.shape(logvar)}")
    mu = jnp.asarray(mu, jnp.float32)
    logvar = jnp.asarray(logvar, jnp.float32)
    if mode == "official_dimmean":
        m, lv = jnp.mean(mu, -1), jnp.mean(logvar, -1)
        return -0.5 * (1.0 + lv - jnp.square(m) - jnp.exp(lv))
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mu) - 1.0 - logvar, axis=-1)
    return kl / mu.shape[-1] if mode == "diag_mean" else kl


def reward_pair_losses(r: jax.Array, *, margin: jax.Array | None = None,
                       center_coef: float = 0.0, mu: jax.Array | None = None,
                       logvar: jax.Array | None = None, beta: float = 0.0,
                       kl_mode: str = "diag_sum",
                       pair_reduction: str = "sum_pair") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair training loss of a standard RM (``mu=None``) or of InfoRM, plus per-pair terms.

    Standard RM: ``L_b = BT_b + c * (r_c,b + r_r,b)^2``. InfoRM (the paper's variational bound) adds
    ``beta * (KL_c,b + KL_r,b)`` (``pair_reduction="sum_pair"``, paper) or
    ``beta * (KL_c,b + KL_r,b) / 2`` (``"mean_2B"``: the official code averages the KL over all
    2B samples). Averaging ``L_b`` over pairs gives the paper's batch loss; returning per-pair
    values lets a trainer sum over micro-batches and divide by the global pair count.

    Args:
        r: float ``[2B]`` rewards, chosen first.
        margin: optional ``[B]`` margins. center_coef: centering weight ``c``.
        mu, logvar: optional ``[2B, K]`` posterior parameters (InfoRM). beta: KL weight.
    Returns:
        ``(loss [B] float32, terms)`` with ``terms`` = ``{"pref": [B], "kl": [B] (0 for a
        standard RM), "r_chosen": [B], "r_rejected": [B]}``.
    Raises:
        ValueError: odd leading size, only one of mu/logvar, unknown reduction, bad shapes, NaN.
    """
    if pair_reduction not in PAIR_REDUCTIONS:
        raise ValueError(f"pair_reduction must be one of {PAIR_REDUCTIONS}, got {pair_reduction!r}")
    if jnp.ndim(r) != 1:
        raise ValueError(f"r must be [2B] rewards (chosen first), got shape {jnp.shape(r)}")
    r_c, r_r = split_pairs(r)
    pref = bradley_terry_loss(r_c, r_r, margin)
    loss = pref
    if center_coef:
        loss = loss + center_coef * center_penalty(r_c, r_r)
    if (mu is None) != (logvar is None):
        raise ValueError("pass both mu and logvar (InfoRM) or neither (standard RM)")
    if mu is None:
        kl = jnp.zeros_like(pref)
    else:
        if jnp.shape(mu)[0] != jnp.shape(r)[0]:
            raise ValueError(f"mu must be [2B, K] with 2B={jnp.shape(r)[0]}, got {jnp.shape(mu)}")
        kl_c, kl_r = split_pairs(gaussian_kl(mu, logvar, kl_mode))
        kl = kl_c + kl_r
        if pair_reduction == "mean_2B":
            kl = 0.5 * kl
        loss = loss + beta * kl
    return loss, {"pref": pref, "kl": kl, "r_chosen": r_c, "r_rejected": r_r}


def reward_stats(rewards: Any) -> dict[str, float]:
    """Mean and std of eval-set rewards for post-hoc normalisation (OpenRLHF and the
    official InfoRM ``rm_trainer.evaluate``: computed over chosen+rejected rewards, stored with the
    model).

    Args:
        rewards: float array of any shape (flattened), at least 2 values, finite.
    Returns:
        ``{"mean": float, "std": float}`` (population std, float64 on host).
    Raises:
        ValueError: fewer than 2 values, NaN/inf, or zero std.
    """
    x = np.asarray(rewards, np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"rewards needs at least 2 values for a std, got {x.size}")
    _check_finite("rewards", x)
    std = float(x.std())
    if std == 0.0:
        raise ValueError("rewards are all equal (std 0): cannot normalise")
    return {"mean": float(x.mean()), "std": std}


def normalize_rewards(r: jax.Array, mean: float, std: float) -> jax.Array:
    """``(r - mean) / std`` in float32. Raises ValueError if ``std <= 0`` or not finite."""
    if not np.isfinite(std) or std <= 0 or not np.isfinite(mean):
        raise ValueError(f"need finite mean and std > 0, got mean={mean}, std={std}")
    return (jnp.asarray(r, jnp.float32) - mean) / std
