"""ICDS / CSI: a reward-overoptimization detector in InfoRM's latent space, and an online monitor.

InfoRM (Miao et al., arXiv:2402.09345) calls it "Integrated Cluster Deviation Score" in v1 and
"Cluster Separation Index" in v4/v5. Only the CSI formula below is written out in what we could
read, and both names describe the same measurement (how far clusters of policy latents sit from
the SFT latents), so we treat them as one score; that is not confirmed against the v1 text. Given
latents ``R [N_r, K]`` of policy (RLHF) responses and ``S [N_s, K]`` of reference (SFT) responses:

1. DBSCAN on ``R`` only (scikit-learn) -> clusters ``C_1..C_n`` (+ noise).
2. ``c_i = mean(C_i)``; ``d_i = min_{s in S} ||c_i - s||_2`` (nearest single SFT sample).
3. ``CSI = sum_i |C_i| * d_i`` (not normalised; ``per_sample = CSI / N_r`` is also reported).

Host-side numpy/scikit-learn in float64: a few thousand K-dim points need no accelerator.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

NOISE_MODES = ("singleton", "drop", "as_cluster")


def _as_points(name: str, x: Any, dim: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be [N, K] latents, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has K={a.shape[1]} but the other set has K={dim}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite; it has NaN/inf entries")
    return a


def _min_dist(points: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``min_j ||points_i - ref_j||`` for each row, chunked to bound memory."""
    out = np.empty(points.shape[0])
    ref_sq = np.einsum("ij,ij->i", ref, ref)
    for i in range(0, points.shape[0], 1024):
        p = points[i:i + 1024]
        d2 = np.einsum("ij,ij->i", p, p)[:, None] + ref_sq[None] - 2.0 * p @ ref.T
        # Exact copies give tiny negative d2 from cancellation; recompute the winners exactly.
        j = np.argmin(d2, axis=1)
        out[i:i + 1024] = np.linalg.norm(p - ref[j], axis=1)
    return out


def default_eps(reference: Any, min_samples: int = 5) -> float:
    """Scale-free DBSCAN radius: the median distance of each reference point to its
    ``min_samples``-th nearest other reference point. The paper gives no DBSCAN ``eps``; ours
    makes the score independent of the latent scale.

    Raises:
        ValueError: fewer than ``min_samples + 1`` reference points, or bad shape/values.
    """
    s = _as_points("reference", reference)
    if min_samples < 1 or s.shape[0] <= min_samples:
        raise ValueError(f"need min_samples >= 1 and more than min_samples={min_samples} "
                         f"reference points for default_eps, got {s.shape[0]}")
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=min_samples + 1).fit(s).kneighbors(s)
    return float(np.median(dist[:, min_samples]))


def project(policy: Any, reference: Any, space: str = "latent",
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Map both latent sets into the clustering space, fitting projections on ``S u R`` jointly.

    ``"latent"``: identity. ``"pca:d"``: joint PCA to ``d`` dims. ``"tsne2d"``: joint 2-D t-SNE
    (init=pca, random_state=seed), min-max scaled to [0, 1] as in the official
    plots (``openrlhf/eval/rlhf_dataset_tsne.py``).
    Raises ValueError for an unknown space.
    """
    r, s = _as_points("policy", policy), _as_points("reference", reference)
    if space == "latent":
        return r, s
    both = np.concatenate([r, s])
    if space.startswith("pca:"):
        d = int(space.split(":", 1)[1])
        if not 1 <= d <= both.shape[1]:
            raise ValueError(f"pca dims must be in [1, {both.shape[1]}], got {d}")
        centred = both - both.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        emb = centred @ vt[:d].T
    elif space == "tsne2d":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max(2.0, (both.shape[0] - 1) / 3))
        emb = TSNE(2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(both)
        emb = (emb - emb.min(0)) / np.maximum(emb.max(0) - emb.min(0), 1e-12)
    else:
        raise ValueError(f"space must be 'latent', 'pca:<d>' or 'tsne2d', got {space!r}")
    return emb[:r.shape[0]], emb[r.shape[0]:]


def cluster_deviation_score(policy: Any, reference: Any, *, eps: float | None = None,
                            min_samples: int = 5, noise_mode: str = "singleton",
                            space: str = "latent", seed: int = 0) -> dict[str, Any]:
    """ICDS/CSI of policy latents ``R`` against reference latents ``S`` (module docstring).

    Args:
        policy: ``[N_r, K]`` latents ``mu`` of policy responses (``N_r = 0`` gives 0).
        reference: ``[N_s, K]`` latents of reference (SFT) responses, ``N_s >= 1``.
        eps: DBSCAN radius in the clustering space; default :func:`default_eps` of ``S``.
        min_samples: DBSCAN core-point count (sklearn counts the point itself).
        noise_mode: DBSCAN noise points (label -1) become one cluster each (``"singleton"``,
            default, so isolated hacked samples count), are dropped (``"drop"``), or form one
            pooled cluster (``"as_cluster"``, the naive reimplementation).
        space: see :func:`project`.
    Returns:
        ``{"score", "per_sample", "n_clusters", "n_noise", "labels" [N_r], "sizes" [n],
        "distances" [n], "eps"}``.
    Raises:
        ValueError: empty ``reference``, K mismatch, NaN/inf, unknown noise_mode, eps <= 0.
    """
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    s = _as_points("reference", reference)
    if s.shape[0] == 0:
        raise ValueError("reference (SFT) latents are empty: the score needs N_s >= 1")
    r = _as_points("policy", policy, s.shape[1])
    r, s = project(r, s, space, seed)
    if eps is None:
        eps = default_eps(s, min_samples) if s.shape[0] > min_samples else 0.0
        if eps <= 0.0:
            raise ValueError("could not derive a positive eps from the reference set (too few or "
                             "duplicate points); pass eps explicitly")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    empty = {"score": 0.0, "per_sample": 0.0, "n_clusters": 0, "n_noise": 0,
             "labels": np.zeros(0, np.int64), "sizes": np.zeros(0, np.int64),
             "distances": np.zeros(0), "eps": float(eps)}
    if r.shape[0] == 0:
        return empty
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(r).labels_
    cluster_ids = np.unique(labels[labels >= 0])
    centroids = [r[labels == c].mean(0) for c in cluster_ids]
    sizes = [int((labels == c).sum()) for c in cluster_ids]
    noise = labels < 0
    if noise.any() and noise_mode == "singleton":
        centroids += list(r[noise])
        sizes += [1] * int(noise.sum())
    elif noise.any() and noise_mode == "as_cluster":
        centroids.append(r[noise].mean(0))
        sizes.append(int(noise.sum()))
    if not centroids:
        warnings.warn("DBSCAN found no clusters and noise_mode='drop': score is 0", stacklevel=2)
        return {**empty, "labels": labels, "n_noise": int(noise.sum())}
    sizes_a = np.asarray(sizes, np.int64)
    dists = _min_dist(np.stack(centroids), s)
    score = float(np.sum(sizes_a * dists))
    return {"score": score, "per_sample": score / r.shape[0], "n_clusters": len(cluster_ids),
            "n_noise": int(noise.sum()), "labels": labels, "sizes": sizes_a, "distances": dists,
            "eps": float(eps)}


csi = cluster_deviation_score


@dataclasses.dataclass
class OveroptimizationMonitor:
    """Online flag for a sudden rise of ICDS/CSI over a run (the paper reports an abrupt
    rise once hacking starts but gives no threshold; the rule and thresholds are ours).

    At each observation ``t`` (after ``window`` earlier ones) the monitor flags when
    ``CSI_t > tau_rel * median(CSI_{t-w..t-1})`` and ``CSI_t - CSI_{t-1} > tau_abs``. With latents,
    :meth:`observe_latents` fixes ``eps`` from the first call so the scores stay comparable.

    Usage::

        mon = OveroptimizationMonitor()
        for step in range(0, steps, every_k):
            if mon.observe_latents(step, policy_mu, sft_mu):
                ...  # early-stop or roll back to mon.last_good_step
    """

    tau_rel: float = 2.0
    tau_abs: float = 0.0
    window: int = 3
    min_samples: int = 5
    noise_mode: str = "singleton"
    eps: float | None = None
    steps: list = dataclasses.field(default_factory=list)
    scores: list = dataclasses.field(default_factory=list)
    flags: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.tau_rel < 1 or self.tau_abs < 0 or self.window < 1:
            raise ValueError(f"need tau_rel >= 1, tau_abs >= 0, window >= 1; got "
                             f"{self.tau_rel}, {self.tau_abs}, {self.window}")

    def observe(self, step: int, score: float) -> bool:
        """Record ``score`` at ``step``; return True when this observation is flagged.

        Raises:
            ValueError: non-finite score or a step not after the previous one.
        """
        if not np.isfinite(score):
            raise ValueError(f"score must be finite, got {score}")
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"steps must increase: got {step} after {self.steps[-1]}")
        flag = False
        if len(self.scores) >= self.window:
            base = float(np.median(self.scores[-self.window:]))
            flag = score > self.tau_rel * base and score - self.scores[-1] > self.tau_abs
        self.steps.append(step)
        self.scores.append(float(score))
        self.flags.append(flag)
        return flag

    def observe_latents(self, step: int, policy: Any, reference: Any) -> bool:
        """Compute CSI of ``policy`` vs ``reference`` latents and :meth:`observe` it."""
        if self.eps is None:
            self.eps = default_eps(reference, self.min_samples)
        res = cluster_deviation_score(policy, reference, eps=self.eps,
                                      min_samples=self.min_samples, noise_mode=self.noise_mode)
        return self.observe(step, res["score"])

    @property
    def first_flag_step(self) -> int | None:
        """Step of the first flagged observation, or None."""
        return next((s for s, f in zip(self.steps, self.flags) if f), None)

    @property
    def last_good_step(self) -> int | None:
        """Last step observed before the first flag (the roll-back target), or None."""
        first = self.first_flag_step
        if first is None:
            return self.steps[-1] if self.steps else None
        good = [s for s in self.steps if s < first]
        return good[-1] if good else None
