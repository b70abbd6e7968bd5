"""Data-free merges: averaging, task arithmetic, TIES, DARE; plus RegMean and Fisher merging.

Every data-free method is a frozen dataclass whose ``merge_leaves`` walks the tensors of a
:class:`LeafSource` one at a time (possibly in several passes) and hands each merged tensor to a
callback. The in-memory pytree functions (:func:`task_arithmetic`, :func:`ties_merging`, ...) and
the safetensors streaming path (:mod:`lmx.merge.streaming`) drive the SAME per-tensor jitted
kernels through this one engine, which is why a streamed merge equals the in-memory merge bit for
bit. All arithmetic is float32; each output is cast to the requested dtype (default: the base
tensor's dtype), as mergekit's users asked (github.com/arcee-ai/mergekit/issues/604 and
/issues/347). Non-float tensors are copied from the base.

Conventions (Ilharco et al. 2023, arXiv:2212.04089): K task vectors tau_i = theta_i - theta_0;
output theta = theta_0 + delta.
"""
from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import zlib
from typing import Any, Callable, Literal, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmx.merge import tree as T

PyTree = Any
Emit = Callable[[str, jax.Array], None]


class LeafSource(Protocol):
    """Tensor-by-tensor access to a base model and K fine-tuned models (or their task vectors).

    ``names`` is the output order; ``shape(name)`` a tensor's shape; ``is_float(name)`` whether
    it gets merged; ``chunk_elems`` (int or None) bounds how many elements one call loads:
    tensors are then visited in chunks of whole rows along axis 0 (``sl = (r0, r1)``, None for
    the whole tensor). ``base(name, sl)`` is theta_0's (chunk of the) tensor;
    ``task_vectors(name, sl)`` the float32 stack ``[K, ...]`` of tau_i; ``finetuned(name, sl)``
    the stack ``[K, ...]`` of theta_i (for averaging). Every method's result is independent of
    the chunking, so chunked (streamed) and whole-tensor (in-memory) merges agree bit for bit.
    """

    names: list[str]
    n_tasks: int
    chunk_elems: int | None

    def shape(self, name: str) -> tuple[int, ...]: ...
    def is_float(self, name: str) -> bool: ...
    def base(self, name: str, sl: tuple[int, int] | None = None) -> jax.Array: ...
    def task_vectors(self, name: str, sl: tuple[int, int] | None = None) -> jax.Array: ...
    def finetuned(self, name: str, sl: tuple[int, int] | None = None) -> jax.Array: ...


def units(src: LeafSource) -> list[tuple[str, tuple[int, int] | None]]:
    """``[(name, sl), ...]``: every tensor in order, split into row chunks of at most
    ``src.chunk_elems`` elements (at least one row) when that is set."""
    out = []
    for name in src.names:
        shape = src.shape(name)
        if src.chunk_elems is None or len(shape) == 0 or np.prod(shape) <= src.chunk_elems:
            out.append((name, None))
            continue
        per = max(1, src.chunk_elems // max(1, int(np.prod(shape[1:]))))
        out += [(name, (r, min(r + per, shape[0]))) for r in range(0, shape[0], per)]
    return out


# --------------------------------------------------------------------------------------------
# Per-tensor kernels (jitted once per shape; shared by the in-memory and streamed paths)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _ta_kernel(base, tau, lam, out_dtype):
    # Sum in a fixed task order (no dot) so the result never depends on a BLAS blocking choice.
    delta = lam[0] * tau[0]
    for i in range(1, tau.shape[0]):
        delta = delta + lam[i] * tau[i]
    return (base.astype(jnp.float32) + delta).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _avg_kernel(ft, out_dtype):
    return jnp.mean(ft.astype(jnp.float32), axis=0).astype(out_dtype)


def _bcast(v, x):
    return v.reshape((v.shape[0],) + (1,) * (x.ndim - 1))


@jax.jit
def _trim(tau, thr):
    return jnp.where(jnp.abs(tau) >= _bcast(thr, tau), tau, 0.0)


@jax.jit
def _elected_sign_sum(tau, thr):
    # Sum over coordinates of sign(sum_i trimmed_i): the reference's "majority sign" numerator.
    return jnp.sum(jnp.sign(jnp.sum(_trim(tau, thr), axis=0))).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("merge", "out_dtype"))
def _ties_kernel(base, tau, thr, majority, lam, merge, out_dtype):
    trimmed = _trim(tau, thr)
    sign = jnp.sign(jnp.sum(trimmed, axis=0))
    sign = jnp.where(sign == 0, majority, sign)
    # Reference rule (ties_merging_utils.disjoint_merge): sign > 0 keeps positive entries,
    # anything else (including a still-zero sign) keeps negative entries.
    keep = jnp.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    sel = jnp.where(keep, trimmed, 0.0)
    if merge == "sum":
        agg = jnp.sum(sel, axis=0)
    elif merge == "mean":
        agg = jnp.sum(sel, axis=0) / jnp.maximum(jnp.sum(sel != 0, axis=0), 1).astype(jnp.float32)
    else:
        agg = jnp.max(jnp.abs(sel), axis=0) * sign
    kept = jnp.sum(trimmed != 0)
    return (base.astype(jnp.float32) + lam * agg).astype(out_dtype), kept


@functools.partial(jax.jit, static_argnames=("rescale",))
def _dare_kernel(tau, keys, p, rescale):
    # keys [K, R]: one key per task and row, so the drop pattern does not depend on chunking
    def one(t, k):
        keep = jax.random.bernoulli(k, 1.0 - p, t.shape)
        kept = t / (1.0 - p) if rescale else t
        return jnp.where(keep, kept, 0.0)
    return jax.vmap(jax.vmap(one))(tau, keys)


@functools.partial(jax.jit, static_argnames=("n_tasks", "n_rows"))
def _row_keys(leaf_key, r0, n_tasks, n_rows):
    # [K, R] keys fold_in(fold_in(leaf_key, i), r0 + j)
    return jax.vmap(lambda i: jax.vmap(lambda r: jax.random.fold_in(
        jax.random.fold_in(leaf_key, i), r))(r0 + jnp.arange(n_rows)))(jnp.arange(n_tasks))


def _abs_bits(x) -> np.ndarray:
    # For non-negative float32, the uint32 bit pattern is monotone in the value.
    return np.abs(np.asarray(x, np.float32)).ravel().view(np.uint32)


class _RadixSelect:
    """Exact k-th largest |x| per task over a model streamed tensor by tensor (two passes).

    Pass 1 histograms the high 16 bits of the float32 bit pattern of |x|, which fixes the
    bucket that holds the wanted order statistic; pass 2 histograms the low 16 bits of the
    entries inside that bucket. Memory: 2 x 65536 counters per task, independent of model size.
    """

    def __init__(self, n_tasks: int):
        self.count = 0  # entries per task seen in pass 1
        self.hi = np.zeros((n_tasks, 65536), np.int64)
        self.lo = np.zeros((n_tasks, 65536), np.int64)
        self.bucket: list[int] = []
        self.rank_in_bucket: list[int] = []

    def add_pass1(self, tau) -> None:
        self.count += int(np.prod(tau.shape[1:]))
        for i in range(self.hi.shape[0]):
            self.hi[i] += np.bincount(_abs_bits(tau[i]) >> 16, minlength=65536)

    def finish_pass1(self, rank: int) -> None:
        """``rank``: 0-based ascending rank of the wanted value (the same for every task)."""
        for i in range(self.hi.shape[0]):
            cum = np.cumsum(self.hi[i])
            b = int(np.searchsorted(cum, rank, side="right"))
            self.bucket.append(b)
            self.rank_in_bucket.append(rank - (int(cum[b - 1]) if b > 0 else 0))

    def add_pass2(self, tau) -> None:
        for i, b in enumerate(self.bucket):
            bits = _abs_bits(tau[i])
            self.lo[i] += np.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=65536)

    def values(self) -> np.ndarray:
        out = []
        for i, (b, r) in enumerate(zip(self.bucket, self.rank_in_bucket)):
            c = int(np.searchsorted(np.cumsum(self.lo[i]), r, side="right"))
            out.append(np.array([(b << 16) | c], np.uint32).view(np.float32)[0])
        return np.asarray(out, np.float32)


def _out_dtype(dtype, base) -> Any:
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(base)


def _progress(progress, n):
    return progress(n) if progress is not None else None


def _tick(bar, name):
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(name[-40:], refresh=False)


def _leaf_key(key: jax.Array, name: str) -> jax.Array:
    # crc32 of the tensor name: the same random stream in memory and when streamed from disk.
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


# --------------------------------------------------------------------------------------------
# Methods as configs with a tensor-by-tensor engine


@dataclasses.dataclass(frozen=True)
class Average:
    """Simple weight averaging theta = (1/K) sum_i theta_i (FusionBench
    ``simple_average``). Computed from the fine-tuned tensors, not the task vectors."""

    dtype: Any = None

    def merge_leaves(self, src: LeafSource, emit: Emit, progress=None) -> dict:
        us = units(src)
        bar = _progress(progress, len(us))
        for name, sl in us:
            b = src.base(name, sl)
            emit(name, _avg_kernel(src.finetuned(name, sl), _out_dtype(self.dtype, b))
                 if src.is_float(name) else b)
            _tick(bar, name)
        return {"passes": 1}


@dataclasses.dataclass(frozen=True)
class TaskArithmetic:
    """Task arithmetic theta = theta_0 + sum_i lam_i tau_i (Ilharco et al. 2023, arXiv:2212.04089).

    ``lam``: scalar (default 0.3, the AdaMerging/Concrete/FusionBench value) or K values.
    """

    lam: float | Sequence[float] = 0.3
    dtype: Any = None

    def merge_leaves(self, src: LeafSource, emit: Emit, progress=None) -> dict:
        return _ta_leaves(src, emit, progress, T.coefficients(self.lam, src.n_tasks),
                          src.task_vectors, self.dtype)


def _ta_leaves(src, emit, progress, lam, tau_of, dtype) -> dict:
    us = units(src)
    bar = _progress(progress, len(us))
    for name, sl in us:
        b = src.base(name, sl)
        emit(name, _ta_kernel(b, tau_of(name, sl), lam, _out_dtype(dtype, b))
             if src.is_float(name) else b)
        _tick(bar, name)
    return {"passes": 1}


def _keep_fraction(k: float) -> float:
    frac = k / 100.0 if k > 1 else k
    if not 0.0 <= frac <= 1.0 or k > 100:
        raise ValueError(f"k: keep fraction must be in [0, 1] (or a percent in (1, 100]), got {k}")
    return frac


def exact_keep_count(d: int, k: float) -> int:
    """floor(k d) for a keep fraction ``k`` (or percent ``k`` > 1) computed exactly.

    ``k`` is read as the decimal it was written as (its shortest ``repr``: 0.29 is 29/100, not
    the binary double just below it), so floor(0.29 * 100) = 29 where the float product
    ``0.29 * 100 = 28.999999999999996`` truncates to 28. Raises ValueError for ``k`` outside
    [0, 1] (or (1, 100] as percent) and TypeError for a non-numeric ``k``.
    """
    if not isinstance(k, (int, float, np.integer, np.floating)) or isinstance(k, bool):
        raise TypeError(f"k: expected a number, got {type(k).__name__}")
    _keep_fraction(float(k))
    frac = fractions.Fraction(repr(float(k)))
    if frac > 1:
        frac /= 100
    return int(math.floor(frac * int(d)))


@dataclasses.dataclass(frozen=True)
class Ties:
    """TIES-Merging (Yadav et al. 2023, arXiv:2306.01708, Sec. 3) with the reference's rules.

    1. Trim: per task keep entries with |tau_i| >= t_i where t_i is the n-th largest |tau_i|,
       n = floor(k d) + 1 (``topk="reference"``: ``ties_merging_utils.topk_values_mask`` takes
       the (d - floor(k d))-th smallest via ``kthvalue``) or n = floor(k d) (``topk="exact"``);
       ``k`` > 1 is read as percent; n >= d keeps everything. ``scope="global"`` ranks over the
       whole model per task (reference), ``"per_leaf"`` within each tensor.
    2. Elect: gamma = sign(sum_i trimmed_i); where that is 0, the majority sign
       sign(sum over coordinates of gamma) of the same scope; a coordinate whose sign is still 0
       keeps negative entries (reference ``disjoint_merge``).
    3. Disjoint merge of entries agreeing with gamma: ``"sum"`` (dis-sum; AdaMerging/Concrete/
       FusionBench, lam 0.3), ``"mean"`` (over the agreeing non-zero entries; original TIES with
       lam ~1) or ``"max"`` (largest agreeing magnitude times gamma).
    theta = theta_0 + lam * merged. Global scope streams in 4 passes (2 for the exact radix
    selection of the thresholds, 1 for the majority sign, 1 to merge); per-leaf scope in 1.
    """

    k: float = 0.2
    lam: float = 0.3
    merge: Literal["sum", "mean", "max"] = "sum"
    scope: Literal["global", "per_leaf"] = "global"
    topk: Literal["reference", "exact"] = "reference"
    dtype: Any = None

    def __post_init__(self):
        _keep_fraction(self.k)
        for field, value, allowed in (("merge", self.merge, ("sum", "mean", "max")),
                                      ("scope", self.scope, ("global", "per_leaf")),
                                      ("topk", self.topk, ("reference", "exact"))):
            if value not in allowed:
                raise ValueError(f"{field}: expected one of {allowed}, got {value!r}")

    def _n_keep(self, d: int) -> int:
        if self.topk == "reference":
            # The reference's own count, float rounding included (``int(d * K)`` on a float K),
            # so that this mode selects exactly the reference's entries.
            return min(int(d * _keep_fraction(self.k)) + 1, d)
        return min(exact_keep_count(d, self.k), d)

    def thresholds(self, src: LeafSource, names: Sequence[str], tau_of=None) -> jax.Array:
        """Per-task trim thresholds over ``names`` (exact order statistic, at most two passes).

        -inf keeps everything, +inf keeps nothing."""
        tau_of = tau_of or src.task_vectors
        wanted = set(names)
        us = [u for u in units(src) if u[0] in wanted]
        sel = _RadixSelect(src.n_tasks)
        for n, sl in us:
            sel.add_pass1(tau_of(n, sl))
        n_keep = self._n_keep(sel.count)
        if n_keep == sel.count:
            return jnp.full((src.n_tasks,), -jnp.inf, jnp.float32)
        if n_keep == 0:
            return jnp.full((src.n_tasks,), jnp.inf, jnp.float32)
        sel.finish_pass1(sel.count - n_keep)
        for n, sl in us:
            sel.add_pass2(tau_of(n, sl))
        return jnp.asarray(sel.values())

    def merge_leaves(self, src: LeafSource, emit: Emit, progress=None, tau_of=None) -> dict:
        tau_of = tau_of or src.task_vectors
        float_names = [n for n in src.names if src.is_float(n)]
        us = units(src)
        thr = majority = None
        if self.scope == "global":
            thr = self.thresholds(src, float_names, tau_of)
            total = sum(int(_elected_sign_sum(tau_of(n, sl), thr)) for n, sl in us
                        if src.is_float(n))
            majority = jnp.float32(np.sign(total))
        bar = _progress(progress, len(us))
        kept = total_entries = 0
        leaf_stats: dict[str, tuple] = {}
        for name, sl in us:
            b = src.base(name, sl)
            if not src.is_float(name):
                emit(name, b)
                _tick(bar, name)
                continue
            if self.scope == "per_leaf":
                if name not in leaf_stats:
                    t = self.thresholds(src, [name], tau_of)
                    signs = sum(int(_elected_sign_sum(tau_of(n, c), t)) for n, c in us if n == name)
                    leaf_stats = {name: (t, jnp.float32(np.sign(signs)))}
                t, m = leaf_stats[name]
            else:
                t, m = thr, majority
            tau = tau_of(name, sl)
            merged, n_kept = _ties_kernel(b, tau, t, m, jnp.float32(self.lam), self.merge,
                                          _out_dtype(self.dtype, b))
            kept += int(n_kept)
            total_entries += int(np.prod(tau.shape))
            emit(name, merged)
            _tick(bar, name)
        return {"passes": 4 if self.scope == "global" else 1,
                "thresholds": None if thr is None else np.asarray(thr).tolist(),
                "majority_sign": None if majority is None else float(majority),
                "kept_fraction": kept / max(1, total_entries)}


@dataclasses.dataclass(frozen=True)
class Dare:
    """DARE (Yu et al. 2024, arXiv:2311.03099, Sec. 3.2): drop each task-vector entry with
    probability ``p`` and rescale survivors by 1/(1-p), then combine with task arithmetic
    (``lam``, default 0.3) or with ``ties`` (a :class:`Ties`; FusionBench uses lam 0.5 there).

    Randomness: row r (index along axis 0) of tensor ``name`` of task i uses
    ``fold_in(fold_in(fold_in(PRNGKey(seed), crc32(name)), i), r)``, so the drop pattern is the
    same in memory and streamed, whole or in row chunks. Raises ValueError for p
    outside [0, 1).
    """

    p: float = 0.5
    lam: float | Sequence[float] = 0.3
    rescale: bool = True
    seed: int = 0
    ties: Ties | None = None
    dtype: Any = None

    def __post_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p: drop probability must be in [0, 1), got {self.p}")

    def dropped(self, src: LeafSource, name: str, sl: tuple[int, int] | None = None
                ) -> jax.Array:
        """Dropped and rescaled task vectors ``[K, ...]`` of (a row chunk of) tensor ``name``."""
        tau = src.task_vectors(name, sl)
        leaf = _leaf_key(jax.random.PRNGKey(self.seed), name)
        if tau.ndim == 1:  # scalar tensor: one key per task
            keys = _row_keys(leaf, 0, tau.shape[0], 1)
            return _dare_kernel(tau[:, None], keys, jnp.float32(self.p), self.rescale)[:, 0]
        r0 = 0 if sl is None else sl[0]
        keys = _row_keys(leaf, r0, tau.shape[0], tau.shape[1])
        return _dare_kernel(tau, keys, jnp.float32(self.p), self.rescale)

    def merge_leaves(self, src: LeafSource, emit: Emit, progress=None) -> dict:
        tau_of = functools.partial(self.dropped, src)
        if self.ties is not None:
            ties = dataclasses.replace(self.ties, dtype=self.dtype or self.ties.dtype)
            return {**ties.merge_leaves(src, emit, progress, tau_of=tau_of), "combine": "ties"}
        return {**_ta_leaves(src, emit, progress, T.coefficients(self.lam, src.n_tasks),
                             tau_of, self.dtype), "combine": "ta"}


# --------------------------------------------------------------------------------------------
# In-memory pytree front-ends


class TreeSource:
    """:class:`LeafSource` over in-memory pytrees (base + task vectors and/or fine-tuned)."""

    def __init__(self, base: PyTree, tvs: Sequence[PyTree] | None = None,
                 finetuned: Sequence[PyTree] | None = None, *, chunk_elems: int | None = None):
        self._base = dict(T.named_leaves(base))
        self.names = list(self._base)
        self.chunk_elems = chunk_elems
        self._tau = self._ft = None
        if tvs is not None:
            T.check_task_vectors(base, tvs)
            self._tau = [dict(T.named_leaves(t)) for t in tvs]
        if finetuned is not None:
            if len(finetuned) == 0:
                raise ValueError("models: need at least one model, got 0")
            T.check_compatible(base, finetuned, label="model")
            self._ft = [dict(T.named_leaves(m)) for m in finetuned]
        self.n_tasks = len(self._tau if self._tau is not None else self._ft)

    def shape(self, name):
        return tuple(np.shape(self._base[name]))

    def is_float(self, name):
        return T.is_float(self._base[name])

    @staticmethod
    def _cut(x, sl):
        return x if sl is None else x[sl[0]:sl[1]]

    def base(self, name, sl=None):
        return self._cut(self._base[name], sl)

    def task_vectors(self, name, sl=None):
        return jnp.stack([jnp.asarray(self._cut(t[name], sl)) for t in self._tau])

    def finetuned(self, name, sl=None):
        return jnp.stack([jnp.asarray(self._cut(m[name], sl)) for m in self._ft])


def merge_tree(method, base: PyTree, task_vectors: Sequence[PyTree] | None = None,
               finetuned: Sequence[PyTree] | None = None, *, return_stats: bool = False,
               chunk_elems: int | None = None):
    """Run a data-free ``method`` (``Average``/``TaskArithmetic``/``Ties``/``Dare``) in memory
    (whole tensors, or row chunks of at most ``chunk_elems`` elements: same result).

    Returns a pytree with ``base``'s structure (and the method's stats dict if asked).
    """
    src = TreeSource(base, task_vectors, finetuned, chunk_elems=chunk_elems)
    out: dict[str, list] = {}
    stats = method.merge_leaves(src, lambda n, x: out.setdefault(n, []).append(x))
    leaves = [v[0] if len(v) == 1 else jnp.concatenate(v) for v in (out[n] for n in src.names)]
    merged = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base), leaves)
    return (merged, stats) if return_stats else merged


def average(models: Sequence[PyTree], *, dtype=None) -> PyTree:
    """theta = (1/K) sum_i theta_i; see :class:`Average`. Raises on incompatible models."""
    if len(models) == 0:
        raise ValueError("models: need at least one model, got 0")
    return merge_tree(Average(dtype), models[0], finetuned=models)


def task_arithmetic(base: PyTree, task_vectors: Sequence[PyTree],
                    lam: float | Sequence[float] = 0.3, *, dtype=None) -> PyTree:
    """theta_0 + sum_i lam_i tau_i; see :class:`TaskArithmetic`.

    Raises: ValueError if ``lam`` has the wrong length or task vectors differ in structure or
    shape (naming the tensor); TypeError for a dtype mismatch.
    """
    return merge_tree(TaskArithmetic(lam, dtype), base, task_vectors)


def ties_merging(base: PyTree, task_vectors: Sequence[PyTree], *, k: float = 0.2,
                 lam: float = 0.3, merge: str = "sum", scope: str = "global",
                 topk: str = "reference", dtype=None) -> PyTree:
    """TIES-Merging; see :class:`Ties` for the rules and defaults."""
    return merge_tree(Ties(k, lam, merge, scope, topk, dtype), base, task_vectors)


def dare(base: PyTree, task_vectors: Sequence[PyTree], *, p: float = 0.5,
         lam: float | Sequence[float] = 0.3, rescale: bool = True, seed: int = 0,
         ties: Ties | None = None, dtype=None) -> PyTree:
    """DARE drop-and-rescale followed by TA (default) or TIES; see :class:`Dare`."""
    return merge_tree(Dare(p, lam, rescale, seed, ties, dtype), base, task_vectors)


# --------------------------------------------------------------------------------------------
# Data-dependent closed forms


def input_gram(x: jax.Array) -> jax.Array:
    """G = X^T X (float32 ``[d_in, d_in]``) of a linear layer's inputs ``x`` ``[..., d_in]``."""
    x2 = jnp.asarray(x, jnp.float32).reshape(-1, jnp.shape(x)[-1])
    return x2.T @ x2


def regmean(models: Sequence[PyTree], grams: Sequence[dict[str, jax.Array]], *,
            alpha: float = 0.95, dtype=None) -> PyTree:
    """RegMean (Jin et al. 2023, arXiv:2212.09849).

    For each linear kernel ``W_i`` ``[d_in, d_out]`` (``y = x W``) named in ``grams[i]``:
    W = (sum_i G~_i)^-1 sum_i G~_i W_i with G~ = alpha G + (1 - alpha) diag(G) (off-diagonal
    entries scaled by alpha), solved by least squares (minimum-norm where the summed Gram is
    singular; rows of inputs that are zero for every model are averaged). alpha = 1 gives the
    least-squares merge argmin_W sum_i ||X_i W - X_i W_i||^2. Every other float leaf is
    averaged. Default alpha 0.95 (FusionBench CLIP ``reduce_non_diagonal_ratio``).

    Args: models: K fine-tuned pytrees; grams: per model a dict tensor-name -> ``[d_in, d_in]``
    (every model must give the same names). Raises ValueError for a name that is not a 2-D
    leaf, a Gram of the wrong shape, different name sets, or alpha outside [0, 1].
    """
    if len(models) == 0 or len(models) != len(grams):
        raise ValueError(f"models/grams: need the same non-zero count, got {len(models)} models "
                         f"and {len(grams)} Gram dicts")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    T.check_compatible(models[0], models[1:], ref_label="model 0", label="model", start=1)
    names = set(grams[0])
    for i, g in enumerate(grams):
        if set(g) != names:
            raise ValueError(f"grams[{i}] names {sorted(set(g) ^ names)[:5]} differ from grams[0]")
    leaves = [dict(T.named_leaves(m)) for m in models]
    for n in names:
        if n not in leaves[0] or jnp.ndim(leaves[0][n]) != 2:
            raise ValueError(f"grams: tensor {n!r} is not a 2-D leaf of the models")
        d_in = jnp.shape(leaves[0][n])[0]
        for i, g in enumerate(grams):
            if jnp.shape(g[n]) != (d_in, d_in):
                raise ValueError(f"grams[{i}][{n!r}]: expected shape {(d_in, d_in)}, "
                                 f"got {tuple(jnp.shape(g[n]))}")
    out = []
    for name, x0 in T.named_leaves(models[0]):
        od = _out_dtype(dtype, x0)
        if not T.is_float(x0):
            out.append(x0)
        elif name in names:
            eye = jnp.eye(jnp.shape(x0)[0], dtype=jnp.float32)
            gt = [alpha * g[name] + (1 - alpha) * g[name] * eye for g in grams]
            lhs = sum(gt)
            ws = [jnp.asarray(m[name], jnp.float32) for m in leaves]
            rhs = sum(g @ w for g, w in zip(gt, ws))
            # Least squares (minimum norm) instead of an inverse: inputs that are zero for every
            # model (dead ReLUs, constant pixels) make the Gram singular. Their rows of W are
            # unconstrained by the data, so they get the plain average instead of 0.
            sol = jnp.linalg.lstsq(lhs, rhs)[0]
            dead = (jnp.diagonal(lhs) == 0)[:, None]
            out.append(jnp.where(dead, sum(ws) / len(ws), sol).astype(od))
        else:
            out.append(jnp.mean(jnp.stack([jnp.asarray(m[name], jnp.float32) for m in leaves]),
                                0).astype(od))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(models[0]), out)


def fisher_merging(models: Sequence[PyTree], fishers: Sequence[PyTree], *,
                   floor: float = 1e-6, normalize: bool = True, dtype=None) -> PyTree:
    """Fisher merging (Matena & Raffel 2022, arXiv:2111.09832):
    theta = sum_i F_i theta_i / sum_i F_i per coordinate, F_i the diagonal Fisher of model i.

    ``normalize`` divides each model's Fisher by its global L2 norm first and ``floor`` is added
    to every Fisher value (FusionBench defaults: on, 1e-6). Raises on incompatible trees.
    """
    if len(models) == 0 or len(models) != len(fishers):
        raise ValueError(f"models/fishers: need the same non-zero count, got {len(models)} and "
                         f"{len(fishers)}")
    T.check_compatible(models[0], models[1:], ref_label="model 0", label="model", start=1)
    fl = []
    for i, f in enumerate(fishers):
        if jax.tree_util.tree_structure(f) != jax.tree_util.tree_structure(models[0]):
            raise ValueError(f"fishers[{i}] has a different tree structure from the models")
        leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(f)]
        scale = jnp.sqrt(sum(jnp.sum(x * x) for x in leaves)) if normalize else 1.0
        fl.append([x / scale + floor for x in leaves])
    ml = [jax.tree_util.tree_leaves(m) for m in models]
    out = []
    for j, x0 in enumerate(ml[0]):
        if not T.is_float(x0):
            out.append(x0)
            continue
        num = sum(f[j] * jnp.asarray(m[j], jnp.float32) for f, m in zip(fl, ml))
        den = sum(f[j] for f in fl)
        out.append((num / den).astype(_out_dtype(dtype, x0)))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(models[0]), out)
