"""Best-of-n sampling against a proxy reward (Gao et al. 2022, arXiv:2210.10760, Sec. 2;
Nakano et al. 2021, WebGPT, arXiv:2112.09332).

The best-of-n policy draws ``n`` samples from the base policy and keeps the one with the highest
proxy reward. Its KL from the base policy is ``log n - (n - 1) / n`` (Stiennon et al. 2020,
appendix; Gao et al. eq. 2). Expectations under it are estimated without bias from a pool of
``N >= n`` samples per prompt: sorting by proxy, the ``i``-th smallest (1-based) is the best of a
uniformly random n-subset with probability ``C(i-1, n-1) / C(N, n)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import gammaln


def best_of_n_kl(n: Any) -> np.ndarray:
    """``KL(best-of-n || base) = log n - (n - 1) / n`` (nats). Raises ValueError for n < 1."""
    n = np.asarray(n, np.float64)
    if np.any(n < 1):
        raise ValueError(f"n must be >= 1, got {n}")
    return np.log(n) - (n - 1.0) / n


def best_of_n_weights(pool: int, n: int) -> np.ndarray:
    """Probability that the ``i``-th lowest-proxy sample of a pool of ``pool`` is the best of a
    random n-subset: ``C(i-1, n-1) / C(pool, n)`` for ``i = 1..pool`` (float64 ``[pool]``, sums
    to 1). Raises ValueError unless ``1 <= n <= pool``."""
    if not 1 <= n <= pool:
        raise ValueError(f"need 1 <= n <= pool, got n={n}, pool={pool}")
    i = np.arange(1, pool + 1, dtype=np.float64)
    logc = np.full(pool, -np.inf)
    ok = i >= n
    logc[ok] = (gammaln(i[ok]) - gammaln(n) - gammaln(i[ok] - n + 1)
                - (gammaln(pool + 1) - gammaln(n + 1) - gammaln(pool - n + 1)))
    return np.exp(logc)


def best_of_n_expectation(proxy: Any, values: Any, n: int) -> np.ndarray:
    """Unbiased per-prompt estimate of ``E[values of the best-of-n choice by proxy]``.

    Args:
        proxy: ``[P, N]`` proxy rewards of ``N`` base-policy samples for each of ``P`` prompts.
        values: ``[P, N]`` or ``[P, N, ...]`` quantities to average (gold reward, proxy, ...).
        n: best-of-n, ``1 <= n <= N``.
    Returns:
        float64 ``[P, ...]``.
    Raises:
        ValueError: shape mismatch, NaN proxy, or n out of range.
    """
    proxy = np.asarray(proxy, np.float64)
    values = np.asarray(values, np.float64)
    if proxy.ndim != 2 or values.shape[:2] != proxy.shape:
        raise ValueError(f"proxy must be [P, N] and values [P, N, ...]; got {proxy.shape}, "
                         f"{values.shape}")
    if not np.all(np.isfinite(proxy)):
        raise ValueError("proxy rewards must be finite")
    w = best_of_n_weights(proxy.shape[1], n)
    order = np.argsort(proxy, axis=1, kind="stable")
    sorted_vals = np.take_along_axis(values, order.reshape(order.shape + (1,) * (values.ndim - 2)),
                                     axis=1)
    return np.einsum("pn...,n->p...", sorted_vals, w)


def best_of_n_draws(proxy: Any, n: int, draws: int, seed: int = 0) -> np.ndarray:
    """Indices of best-of-n choices: for each prompt, ``draws`` random n-subsets (without
    replacement) of its pool and the argmax of ``proxy`` in each. int64 ``[P, draws]``.

    Used to form the policy sample set whose latents ICDS scores. Raises ValueError unless
    ``1 <= n <= N`` and ``draws >= 1``."""
    proxy = np.asarray(proxy, np.float64)
    if proxy.ndim != 2 or not 1 <= n <= proxy.shape[1] or draws < 1:
        raise ValueError(f"need proxy [P, N] with 1 <= n <= N and draws >= 1; got shape "
                         f"{proxy.shape}, n={n}, draws={draws}")
    rng = np.random.default_rng(seed)
    p, pool = proxy.shape
    keys = rng.random((p, draws, pool))
    subsets = np.argsort(keys, axis=2)[:, :, :n]
    vals = np.take_along_axis(np.broadcast_to(proxy[:, None], (p, draws, pool)), subsets, axis=2)
    return np.take_along_axis(subsets, np.argmax(vals, axis=2)[..., None], axis=2)[..., 0]
