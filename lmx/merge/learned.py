"""Learned merges: AdaMerging (task-/layer-wise) and Concrete subspace merging (TA and AM).

Merged weights for one float tensor l (Concrete subspace merging, Tang et al. 2023,
arXiv:2312.06173; official code github.com/tanganke/subspace_fusion, ``_apply_mask``):

    theta^l = theta_0^l + m~^l * sum_i c_i^l tau_i^l,     m~^l = m^l / mean(m^l)

with c_i^l = lam_i (task-wise, ``[K]``) or lam_i^l (layer-wise, ``[K, L]``, L = number of float
tensors, in :func:`lmx.merge.tree.float_leaf_names` order: a "layer" is one parameter tensor as in
the AdaMerging/Concrete code) and m a shared mask (all ones without Concrete). Because
the mask is shared by all K tasks it factors out of the sum, so the K masked copies of the
official code are never materialised. Coefficients are clamped to [0, 1] where
they are used when ``clamp`` is set (official wrappers; FusionBench: off).

The learning objective is any ``objective(params, batch) -> scalar`` on the merged pytree; the
papers use :func:`entropy_objective` on unlabeled test inputs (AdaMerging, Yang et al. 2024,
arXiv:2310.02575). Each method is a step of the ``lmx.train`` protocol
(``step(state, batch, key) -> (state, metrics)``: :func:`make_adamerging_step`,
:func:`make_concrete_ta_step`, :func:`make_concrete_am_step`, for a user's own loop) driven by
``lmx.train.run``; batches come from ``get_batch(step)``, which must be deterministic in ``step``.
Sharding (:mod:`lmx.merge._sharding`): mask logits, their Adam moments, base weights and task
vectors split over the ``fsdp`` mesh axis, batch rows over ``data`` x ``fsdp``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lmx.merge import _sharding
from lmx.merge import tree as T
from lmx.parallel import replicated
from lmx.train import RunConfig, Step, TrainState, compile_step, follow_params, place_state, run

PyTree = Any
Objective = Callable[[PyTree, Any], jax.Array]


# --------------------------------------------------------------------------------------------
# Objective


def entropy(logits: jax.Array) -> jax.Array:
    """Shannon entropy H(softmax(z)) = -sum_c p_c log p_c over the last axis, in float32.

    ``logits`` ``[..., C]`` -> ``[...]``. Computed from log-softmax (no eps needed, unlike
    FusionBench's ``log(p + 1e-8)``); uniform logits give log C.
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy_objective(apply_fn: Callable[[PyTree, int, jax.Array], jax.Array]) -> Objective:
    """AdaMerging's surrogate (Yang et al. 2024, arXiv:2310.02575, eq. 5):
    L(theta) = sum_k mean_{x in batch_k} H(softmax(f_k(x; theta))).

    ``apply_fn(params, k, x) -> logits [B, C_k]`` runs the merged model with task k's head;
    the batch is a sequence of K input arrays (unlabeled).
    """

    def objective(params, batch):
        return sum(jnp.mean(entropy(apply_fn(params, k, x))) for k, x in enumerate(batch))

    return objective


# --------------------------------------------------------------------------------------------
# Concrete (relaxed Bernoulli) masks


def relaxed_bernoulli(key: jax.Array, logits: jax.Array, temperature: float = 0.5
                      ) -> jax.Array:
    """Binary-Concrete sample m = sigmoid((x + log u - log(1 - u)) / t), u ~ U(0, 1)
    (Maddison et al. 2017, arXiv:1611.00712; torch ``RelaxedBernoulli.rsample``; the Concrete
relaxation of Tang et al. 2023, arXiv:2312.06173).

    Reparameterised: differentiable in ``logits``. For every t > 0, P(m > 0.5) = sigmoid(x).
    Shape/dtype of ``logits`` (float). Raises ValueError for t <= 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    x = jnp.asarray(logits)
    u = jax.random.uniform(key, x.shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
    noise = jnp.log(u) - jnp.log1p(-u)
    return jax.nn.sigmoid((x.astype(jnp.float32) + noise) / temperature).astype(x.dtype)


def sample_mask(key: jax.Array, logits: Sequence[jax.Array] | dict[str, jax.Array],
                temperature: float = 0.5, kind: Literal["continuous", "discrete"] = "continuous"):
    """One draw per tensor (independent keys): ``"continuous"`` relaxed draw at ``temperature``
    (the official Concrete code reports a relaxed draw at t = 0.5) or ``"discrete"``
    Bernoulli(sigmoid(x)) 0/1 draw.
    Same container type as ``logits``."""
    if kind not in ("continuous", "discrete"):
        raise ValueError(f"kind: expected 'continuous' or 'discrete', got {kind!r}")
    items = list(logits.items()) if isinstance(logits, dict) else list(enumerate(logits))
    keys = jax.random.split(key, max(1, len(items)))
    out = []
    for (_, x), k in zip(items, keys):
        if kind == "continuous":
            out.append(relaxed_bernoulli(k, x, temperature))
        else:
            out.append(jax.random.bernoulli(k, jax.nn.sigmoid(x)).astype(jnp.float32))
    return {n: m for (n, _), m in zip(items, out)} if isinstance(logits, dict) else out


def rescale_mask(mask):
    """Per tensor m~ = m / mean(m) (official ``_apply_mask``), so any constant mask
    reproduces task arithmetic. A tensor whose mask is all zero stays zero (no 0/0)."""

    def one(m):
        mean = jnp.mean(m.astype(jnp.float32))
        return jnp.where(mean > 0, m / jnp.where(mean > 0, mean, 1.0), 0.0)

    if isinstance(mask, dict):
        return {n: one(m) for n, m in mask.items()}
    return [one(m) for m in mask]


# --------------------------------------------------------------------------------------------
# Merging with coefficients (+ mask)


class MergeProblem:
    """Base weights and stacked task vectors, split into float tensors (merged) and the rest.

    ``float_names`` fixes the layer order of layer-wise coefficients and of mask logits.
    Raises (via :func:`lmx.merge.tree.check_task_vectors`) when task vectors do not match.
    """

    def __init__(self, base: PyTree, task_vectors: Sequence[PyTree]):
        T.check_task_vectors(base, task_vectors)
        self.treedef = jax.tree_util.tree_structure(base)
        named = T.named_leaves(base)
        self.names = [n for n, _ in named]
        self.float_idx = [i for i, (_, x) in enumerate(named) if T.is_float(x)]
        self.float_names = [self.names[i] for i in self.float_idx]
        self.leaves = [jnp.asarray(x) for _, x in named]
        self.base = [self.leaves[i].astype(jnp.float32) for i in self.float_idx]
        tv_leaves = [jax.tree_util.tree_leaves(t) for t in task_vectors]
        self.tau = [jnp.stack([tl[i] for tl in tv_leaves]) for i in self.float_idx]
        self.n_tasks = len(task_vectors)
        self.others = [x for i, x in enumerate(self.leaves) if i not in set(self.float_idx)]
        # Hashable description of the tree: jitted steps are cached on it (with the objective),
        # so repeated merges of same-shaped models reuse one compiled step.
        self.layout = (self.treedef, tuple(self.float_idx), len(self.leaves))

    @property
    def n_layers(self) -> int:
        return len(self.float_idx)

    def coeff_shape(self, granularity: str) -> tuple[int, ...]:
        if granularity == "task":
            return (self.n_tasks,)
        if granularity == "layer":
            return (self.n_tasks, self.n_layers)
        raise ValueError(f"granularity: expected 'task' or 'layer', got {granularity!r}")

    def init_logits(self, value: float = 0.0) -> list[jax.Array]:
        return [jnp.full(b.shape, value, jnp.float32) for b in self.base]

    def assemble(self, float_leaves: Sequence[jax.Array], *, cast: bool = False) -> PyTree:
        if cast:
            float_leaves = [x.astype(self.leaves[i].dtype)
                            for x, i in zip(float_leaves, self.float_idx)]
        return _assemble(self.layout, self.others, float_leaves)

    def to_dict(self, float_leaves: Sequence[jax.Array]) -> dict[str, jax.Array]:
        return dict(zip(self.float_names, float_leaves))

    def from_dict(self, d: dict[str, jax.Array], *, name: str) -> list[jax.Array]:
        missing = [n for n in self.float_names if n not in d]
        if missing:
            raise ValueError(f"{name}: missing tensors {missing[:5]}")
        out = []
        for n, b in zip(self.float_names, self.base):
            if tuple(jnp.shape(d[n])) != b.shape:
                raise ValueError(f"{name}[{n!r}]: expected shape {b.shape}, got "
                                 f"{tuple(jnp.shape(d[n]))}")
            out.append(jnp.asarray(d[n], jnp.float32))
        return out


def _assemble(layout, others, float_leaves) -> PyTree:
    treedef, float_idx, n = layout
    fl, ot = iter(float_leaves), iter(others)
    fset = set(float_idx)
    return jax.tree_util.tree_unflatten(treedef, [next(fl) if i in fset else next(ot)
                                                  for i in range(n)])


def merge_float(base: Sequence[jax.Array], tau: Sequence[jax.Array], coeffs: jax.Array,
                mask: Sequence[jax.Array] | None = None, *, clamp: bool = False
                ) -> list[jax.Array]:
    """theta^l = theta_0^l + m~^l * sum_i c_i^l tau_i^l for each float tensor l (float32).

    ``coeffs``: ``[K]`` (task-wise) or ``[K, L]`` (layer-wise); ``mask``: already rescaled
    per tensor (see :func:`rescale_mask`) or None. ``clamp`` clips coefficients to [0, 1].
    """
    c = jnp.clip(coeffs, 0.0, 1.0) if clamp else coeffs
    out = []
    for j, (b, t) in enumerate(zip(base, tau)):
        cj = c if c.ndim == 1 else c[:, j]
        delta = jnp.tensordot(cj, t, axes=1)
        out.append(b + (delta if mask is None else mask[j] * delta))
    return out


def merge_with_coefficients(base: PyTree, task_vectors: Sequence[PyTree], coeffs,
                            mask: dict[str, jax.Array] | None = None, *, clamp: bool = False
                            ) -> PyTree:
    """Merged pytree (base dtypes) for task-wise ``[K]`` or layer-wise ``[K, L]`` coefficients
    and an optional per-tensor mask (dict name -> array, rescaled here by its mean).

    Raises ValueError for coefficients of the wrong shape or a mask missing a tensor.
    """
    prob = MergeProblem(base, task_vectors)
    c = jnp.asarray(coeffs, jnp.float32)
    if c.shape not in (prob.coeff_shape("task"), prob.coeff_shape("layer")):
        raise ValueError(f"coeffs: expected shape {prob.coeff_shape('task')} (task-wise) or "
                         f"{prob.coeff_shape('layer')} (layer-wise), got {c.shape}")
    m = None if mask is None else rescale_mask(prob.from_dict(mask, name="mask"))
    return prob.assemble(merge_float(prob.base, prob.tau, c, m, clamp=clamp), cast=True)


# --------------------------------------------------------------------------------------------
# Configs and results


@dataclasses.dataclass(frozen=True)
class AdaMergingConfig:
    """AdaMerging (Yang et al., ICLR 2024, arXiv:2310.02575) with the official CLIP defaults:
    lam init 0.3, Adam lr 1e-3, 1000 steps, clamp to [0, 1] (FusionBench: ``clamp=False``)."""

    granularity: Literal["task", "layer"] = "layer"
    init: float = 0.3
    lr: float = 1e-3
    steps: int = 1000
    clamp: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.granularity not in ("task", "layer"):
            raise ValueError(f"granularity: expected 'task' or 'layer', got {self.granularity!r}")
        if self.steps < 0 or not self.lr > 0:
            raise ValueError(f"steps must be >= 0 and lr > 0, got {self.steps=}, {self.lr=}")


@dataclasses.dataclass(frozen=True)
class ConcreteConfig:
    """Concrete subspace merging (Tang et al. 2023, arXiv:2312.06173) with the
    official CLIP defaults.

    Mask: logits init ``init_logit`` 0, temperature 0.5 (fixed), Adam lr ``mask_lr`` 1e-3.
    Concrete TA: ``steps`` 2000 with fixed ``lam`` 0.3. Concrete AM phase A: ``meta_steps``
    2000 (FusionBench 1000), each resetting lam to ``lam`` and taking ONE inner Adam step of lr
    ``inner_lr`` 1.0 on it (inner Adam moments persist); phase B: ``tta_steps`` 1000 of
    AdaMerging at ``tta_lr`` 1e-3 inside one frozen mask draw. ``variant="official"`` draws a
    new mask for the outer step; ``"fusionbench"`` reuses the inner draw. ``clamp`` clips lam to
    [0, 1] at use (official; FusionBench off). ``eval_mask``: final draw type.
    """

    temperature: float = 0.5
    init_logit: float = 0.0
    lam: float = 0.3
    mask_lr: float = 1e-3
    steps: int = 2000
    meta_steps: int = 2000
    inner_lr: float = 1.0
    tta_steps: int = 1000
    tta_lr: float = 1e-3
    granularity: Literal["task", "layer"] = "layer"
    clamp: bool = True
    variant: Literal["official", "fusionbench"] = "official"
    eval_mask: Literal["continuous", "discrete"] = "continuous"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.variant not in ("official", "fusionbench"):
            raise ValueError(f"variant: expected 'official' or 'fusionbench', got {self.variant!r}")
        if self.granularity not in ("task", "layer"):
            raise ValueError(f"granularity: expected 'task' or 'layer', got {self.granularity!r}")
        if self.eval_mask not in ("continuous", "discrete"):
            raise ValueError(f"eval_mask: expected 'continuous' or 'discrete', "
                             f"got {self.eval_mask!r}")
        for f in ("steps", "meta_steps", "tta_steps"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f}: must be >= 0, got {getattr(self, f)}")


@dataclasses.dataclass
class MergeResult:
    """``params``: merged pytree (base dtypes); ``coeffs``: final lam (``[K]``/``[K, L]``,
    unclamped); ``logits``/``mask``: Concrete mask logits and the final rescaled mask draw (dict
    tensor-name -> array) or None; ``history``: per-phase float32 objective per step."""

    params: PyTree
    coeffs: jax.Array
    logits: dict[str, jax.Array] | None
    mask: dict[str, jax.Array] | None
    history: dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Steps (the ``lmx.train`` protocol: ``step(state, batch, key) -> (state, metrics)``) and drivers


def _merge_state(prob: MergeProblem, params, opt_state, aux: dict, mesh: Mesh, *,
                 sharded_params: bool, extra=None) -> tuple[TrainState, TrainState]:
    """A placed :class:`lmx.train.TrainState` and its shardings: per-tensor ``params`` (mask
    logits) split over ``fsdp`` when ``sharded_params``, else replicated (coefficients); Adam
    moments follow their params; base weights and task vectors split over ``fsdp``."""
    if sharded_params:
        p_sh = [_sharding.tensor_sharding(b.shape, mesh) for b in prob.base]
    else:
        p_sh = replicated(mesh)
    tensors = {"base": [_sharding.tensor_sharding(b.shape, mesh) for b in prob.base],
               "tau": [_sharding.tensor_sharding(t.shape, mesh, stacked=True) for t in prob.tau]}
    if aux.get("mask") is not None:
        tensors["mask"] = [_sharding.tensor_sharding(m.shape, mesh) for m in aux["mask"]]
    aux_sh = {k: tensors.get(k, _sharding.replicate_all(v, mesh)) for k, v in aux.items()}
    params = jax.device_put(params, p_sh)
    shardings = TrainState(step=replicated(mesh), params=p_sh,
                           opt_state=follow_params(opt_state, params),
                           extra=_sharding.replicate_all(extra, mesh),
                           aux=aux_sh)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                       extra=extra, aux=aux)
    return place_state(state, shardings), shardings


# The step functions are cached on the objective, the tree layout and the hyperparameters, and
# their compiled steps on (function, state shardings): repeated merges of same-shaped models
# reuse one compiled step.
@functools.lru_cache(maxsize=32)
def _adamerging_fn(objective, layout, lr, clamp):
    opt = optax.adam(lr)

    def fn(state, batch, rng):
        del rng
        a = state.aux

        def loss_fn(c):
            merged = merge_float(a["base"], a["tau"], c, a["mask"], clamp=clamp)
            return objective(_assemble(layout, a["others"], merged), batch)

        loss, g = jax.value_and_grad(loss_fn)(state.params)
        upd, opt_state = opt.update(g, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, upd), opt_state=opt_state), {"loss": loss}

    return opt, fn


def _adamerging_setup(prob: MergeProblem, objective: Objective, *, granularity, init, lr, clamp,
                      mask, mesh) -> tuple[TrainState, Step]:
    opt, fn = _adamerging_fn(objective, prob.layout, lr, clamp)
    coeffs = jnp.full(prob.coeff_shape(granularity), init, jnp.float32)
    aux = {"base": prob.base, "tau": prob.tau, "mask": mask, "others": prob.others}
    state, shardings = _merge_state(prob, coeffs, opt.init(coeffs), aux, mesh, sharded_params=False)
    return state, _compiled(fn, shardings)


_STEPS: dict = {}


def _compiled(fn, shardings: TrainState) -> Step:
    """One compiled :class:`lmx.train.Step` per (step function, state shardings)."""
    key = (fn, jax.tree_util.tree_structure(shardings), tuple(jax.tree.leaves(shardings)))
    if key not in _STEPS:
        if len(_STEPS) >= 64:
            _STEPS.pop(next(iter(_STEPS)))
        _STEPS[key] = compile_step(fn, shardings=shardings, compiler_options={})
    return _STEPS[key]


def make_adamerging_step(base: PyTree, task_vectors: Sequence[PyTree], objective: Objective,
                         config: AdaMergingConfig = AdaMergingConfig(), *,
                         mask: dict[str, jax.Array] | None = None, mesh: Mesh | None = None
                         ) -> tuple[TrainState, Step]:
    """``(state, step)`` of AdaMerging for a user's own loop (:func:`adamerging` drives it).

    ``state.params``: the coefficients (``[K]`` / ``[K, L]``, replicated), ``state.aux``: base
    weights, task vectors (split over ``fsdp``), the rescaled ``mask`` (or None) and the non-float
    leaves. ``step(state, batch, key) -> (state, {"loss"})`` takes one Adam step on
    ``objective(merged, batch)``; ``batch`` must be placed with
    ``lmx.parallel.shard_batch(batch, mesh)`` (rows over ``data`` x ``fsdp``)::

        state, step = make_adamerging_step(base, tvs, objective, AdaMergingConfig(lr=1e-3))
        for s in range(100):
            state, metrics = step(state, shard_batch(get_batch(s), mesh), key)
        merged = merge_with_coefficients(base, tvs, state.params, clamp=True)
    """
    prob = MergeProblem(base, task_vectors)
    m = None if mask is None else rescale_mask(prob.from_dict(mask, name="mask"))
    return _adamerging_setup(prob, objective, granularity=config.granularity, init=config.init,
                             lr=config.lr, clamp=config.clamp, mask=m,
                             mesh=mesh or _sharding.make_merge_mesh())


def _drive(state: TrainState, step: Step, get_batch, n_steps: int, *, key, mesh, desc, progress):
    result = run(state, step, get_batch, RunConfig(steps=n_steps, progress=progress, desc=desc,
                                                   log_every=50), mesh=mesh, key=key)
    return result.state, np.asarray(result.losses, np.float32)


def _check_mesh(mesh):
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    return mesh or _sharding.make_merge_mesh()


def adamerging(base: PyTree, task_vectors: Sequence[PyTree], objective: Objective,
               get_batch: Callable[[int], Any], config: AdaMergingConfig = AdaMergingConfig(),
               *, mask: dict[str, jax.Array] | None = None, mesh: Mesh | None = None) -> MergeResult:
    """AdaMerging: minimise ``objective`` over task-wise or layer-wise coefficients with Adam.

    One step = one ``get_batch(step)`` (one batch per task for the entropy objective), rows split
    over the ``data`` x ``fsdp`` axes of ``mesh`` (default: all devices on ``data``; a batch
    that does not divide raises ValueError). With ``mask`` (dict of per-tensor masks, rescaled
    here) it runs inside that subspace (Concrete AM phase B). Runs
    :func:`make_adamerging_step` on the ``lmx.train.run`` driver. Returns a
    :class:`MergeResult` (``history["adamerging"]``: loss before each step).
    """
    mesh = _check_mesh(mesh)
    prob = MergeProblem(base, task_vectors)
    m = None if mask is None else rescale_mask(prob.from_dict(mask, name="mask"))
    state, step = _adamerging_setup(prob, objective, granularity=config.granularity,
                                    init=config.init, lr=config.lr, clamp=config.clamp, mask=m,
                                    mesh=mesh)
    state, hist = _drive(state, step, get_batch, config.steps, key=jax.random.PRNGKey(0), mesh=mesh,
                         desc=f"adamerging-{config.granularity}", progress=config.progress)
    coeffs = state.params
    params = prob.assemble(merge_float(prob.base, prob.tau, coeffs, m, clamp=config.clamp),
                           cast=True)
    return MergeResult(params, coeffs, None, None if m is None else prob.to_dict(m),
                       {"adamerging": hist})


def _final_mask(logits, config: ConcreteConfig, key):
    return rescale_mask(sample_mask(key, logits, config.temperature, config.eval_mask))


@functools.lru_cache(maxsize=32)
def _concrete_ta_fn(objective, layout, lr, temperature, clamp):
    opt = optax.adam(lr)

    def fn(state, batch, rng):
        a = state.aux

        def loss_fn(x):
            m = rescale_mask(sample_mask(rng, x, temperature))
            merged = merge_float(a["base"], a["tau"], a["lam"], m, clamp=clamp)
            return objective(_assemble(layout, a["others"], merged), batch)

        loss, g = jax.value_and_grad(loss_fn)(state.params)
        upd, opt_state = opt.update(g, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, upd), opt_state=opt_state), {"loss": loss}

    return opt, fn


@functools.lru_cache(maxsize=32)
def _concrete_meta_fn(objective, layout, inner_lr, outer_lr, temperature, clamp, variant):
    inner, outer = optax.adam(inner_lr), optax.adam(outer_lr)

    def fn(state, batch, rng):
        a = state.aux
        base, tau, lam0, others = a["base"], a["tau"], a["lam0"], a["others"]
        k1, k2 = jax.random.split(rng)
        m1 = sample_mask(k1, state.params, temperature)

        def inner_loss(c):
            m = rescale_mask(jax.lax.stop_gradient(m1))
            merged = merge_float(base, tau, c, m, clamp=clamp)
            return objective(_assemble(layout, others, merged), batch[0])

        g_lam = jax.grad(inner_loss)(lam0)
        upd, inner_state = inner.update(g_lam, state.extra, lam0)
        lam1 = jax.lax.stop_gradient(optax.apply_updates(lam0, upd))

        def outer_loss(x):
            # official: a new draw for the outer step; FusionBench: the inner draw, with grad
            m = sample_mask(k2 if variant == "official" else k1, x, temperature)
            merged = merge_float(base, tau, lam1, rescale_mask(m), clamp=clamp)
            return objective(_assemble(layout, others, merged), batch[1])

        loss, g = jax.value_and_grad(outer_loss)(state.params)
        upd, outer_state = outer.update(g, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, upd), opt_state=outer_state,
                             extra=inner_state), {"loss": loss}

    return inner, outer, fn


def _concrete_ta_setup(prob: MergeProblem, objective: Objective, config: ConcreteConfig, mesh
                       ) -> tuple[TrainState, Step]:
    opt, fn = _concrete_ta_fn(objective, prob.layout, config.mask_lr, config.temperature,
                              config.clamp)
    logits = prob.init_logits(config.init_logit)
    lam = jnp.full((prob.n_tasks,), config.lam, jnp.float32)
    aux = {"base": prob.base, "tau": prob.tau, "lam": lam, "others": prob.others}
    state, shardings = _merge_state(prob, logits, opt.init(logits), aux, mesh, sharded_params=True)
    return state, _compiled(fn, shardings)


def _concrete_meta_setup(prob: MergeProblem, objective: Objective, config: ConcreteConfig, mesh
                         ) -> tuple[TrainState, Step]:
    inner, outer, fn = _concrete_meta_fn(objective, prob.layout, config.inner_lr,
                                         config.mask_lr, config.temperature, config.clamp,
                                         config.variant)
    logits = prob.init_logits(config.init_logit)
    lam0 = jnp.full(prob.coeff_shape(config.granularity), config.lam, jnp.float32)
    aux = {"base": prob.base, "tau": prob.tau, "lam0": lam0, "others": prob.others}
    state, shardings = _merge_state(prob, logits, outer.init(logits), aux, mesh, sharded_params=True,
                                    extra=inner.init(lam0))
    return state, _compiled(fn, shardings)


def make_concrete_ta_step(base: PyTree, task_vectors: Sequence[PyTree], objective: Objective,
                          config: ConcreteConfig = ConcreteConfig(), *, mesh: Mesh | None = None
                          ) -> tuple[TrainState, Step]:
    """``(state, step)`` of Concrete TA for a user's own loop (:func:`concrete_task_arithmetic`
    drives it).

    ``state.params``: the mask logits (list, :func:`lmx.merge.tree.float_leaf_names` order),
    split over ``fsdp`` like their Adam moments, the base weights and the task vectors
    (``state.aux``). ``step(state, batch, key)``: draw m ~ RelaxedBernoulli(x, t) from ``key``,
    one Adam step on ``objective(theta_0 + lam m~ * sum_i tau_i, batch)``; ``batch`` placed by
    ``lmx.parallel.shard_batch(batch, mesh)``.
    """
    return _concrete_ta_setup(MergeProblem(base, task_vectors), objective, config, _check_mesh(mesh))


def make_concrete_am_step(base: PyTree, task_vectors: Sequence[PyTree], objective: Objective,
                          config: ConcreteConfig = ConcreteConfig(), *, mesh: Mesh | None = None
                          ) -> tuple[TrainState, Step]:
    """``(state, step)`` of the Concrete AdaMerging bi-level (phase A) step for a user's own loop
    (:func:`concrete_adamerging` drives it, then runs phase B).

    ``state.params``: mask logits (sharded as in :func:`make_concrete_ta_step`); ``state.extra``:
    the inner Adam state of lam (persists across steps); ``state.aux["lam0"]``: lam's reset value.
    ``batch`` = ``(inner_batch, outer_batch)``, each placed by ``lmx.parallel.shard_batch``.
    """
    return _concrete_meta_setup(MergeProblem(base, task_vectors), objective, config,
                                _check_mesh(mesh))


def concrete_task_arithmetic(base: PyTree, task_vectors: Sequence[PyTree],
                             objective: Objective, get_batch: Callable[[int], Any],
                             config: ConcreteConfig = ConcreteConfig(), *,
                             mesh: Mesh | None = None) -> MergeResult:
    """Concrete TA (Tang et al. 2023, arXiv:2312.06173): learn shared mask logits x with lam
    fixed at ``config.lam``.

    Each step: m ~ RelaxedBernoulli(x, t) (fresh draw), m~ = m / mean(m) per tensor,
    theta = theta_0 + lam m~ * sum_i tau_i, loss = objective(theta, get_batch(step)), Adam on x.
    Output: merged with one fresh seeded draw of kind ``config.eval_mask`` from the final logits
    (FusionBench's evaluation; the official code keeps its last training draw). ``mesh``: as
    :func:`adamerging`; the logits, their moments and the task vectors are split over ``fsdp``.
    """
    mesh = _check_mesh(mesh)
    prob = MergeProblem(base, task_vectors)
    state, step = _concrete_ta_setup(prob, objective, config, mesh)
    key = jax.random.PRNGKey(config.seed)
    state, hist = _drive(state, step, get_batch, config.steps, key=jax.random.fold_in(key, 0),
                         mesh=mesh, desc="concrete-ta", progress=config.progress)
    logits, lam = state.params, state.aux["lam"]
    mask = _final_mask(logits, config, jax.random.fold_in(key, 1))
    params = prob.assemble(merge_float(prob.base, prob.tau, lam, mask, clamp=config.clamp),
                           cast=True)
    return MergeResult(params, lam, prob.to_dict(logits), prob.to_dict(mask),
                       {"concrete_ta": hist})


def concrete_adamerging(base: PyTree, task_vectors: Sequence[PyTree], objective: Objective,
                        get_batch: Callable[[int], Any],
                        config: ConcreteConfig = ConcreteConfig(), *,
                        mesh: Mesh | None = None) -> MergeResult:
    """Concrete AdaMerging (Tang et al. 2023, arXiv:2312.06173), task- or layer-wise
    (``config.granularity``).

    Phase A (``meta_steps``), first-order bi-level: lam <- lam_0 = ``config.lam``; draw m1;
    inner: one Adam step (lr ``inner_lr``, moments persist across outer steps) on lam for
    objective(theta(lam, m1), batch 2s); outer: draw m2 (official; FusionBench reuses m1 with
    gradient) and take an Adam step (lr ``mask_lr``) on the logits for
    objective(theta(stop_grad(lam'), m2), batch 2s+1), no differentiation through the inner step.
    Phase B (``tta_steps``): freeze the logits, draw ONE relaxed mask (t = ``temperature``),
    reset lam to lam_0 and run AdaMerging (lr ``tta_lr``) inside it. The output is merged with
    that phase-B mask and the learned lam (what the official code reports). ``history``:
    ``"meta"`` (outer loss) and ``"tta"``. ``mesh``: as :func:`concrete_task_arithmetic`.
    """
    mesh = _check_mesh(mesh)
    prob = MergeProblem(base, task_vectors)
    state, step = _concrete_meta_setup(prob, objective, config, mesh)
    key = jax.random.PRNGKey(config.seed)
    meta_batch = lambda s: (get_batch(2 * s), get_batch(2 * s + 1))  # noqa: E731
    state, meta_hist = _drive(state, step, meta_batch, config.meta_steps,
                              key=jax.random.fold_in(key, 0), mesh=mesh,
                              desc=f"concrete-am-{config.granularity} meta",
                              progress=config.progress)
    logits = state.params
    mask = rescale_mask(sample_mask(jax.random.fold_in(key, 1), logits, config.temperature))
    tta_state, tta_step = _adamerging_setup(
        prob, objective, granularity=config.granularity, init=config.lam, lr=config.tta_lr,
        clamp=config.clamp, mask=mask, mesh=mesh)
    offset = 2 * config.meta_steps
    tta_state, tta_hist = _drive(tta_state, tta_step, lambda s: get_batch(offset + s),
                                 config.tta_steps, key=jax.random.PRNGKey(0), mesh=mesh,
                                 desc=f"concrete-am-{config.granularity} tta",
                                 progress=config.progress)
    coeffs = tta_state.params
    params = prob.assemble(merge_float(prob.base, prob.tau, coeffs, mask, clamp=config.clamp),
                           cast=True)
    return MergeResult(params, coeffs, prob.to_dict(logits), prob.to_dict(mask),
                       {"meta": meta_hist, "tta": tta_hist})


def concrete_merge(base: PyTree, task_vectors: Sequence[PyTree], logits: dict[str, jax.Array],
                   coeffs, key: jax.Array, *, temperature: float = 0.5,
                   kind: Literal["continuous", "discrete"] = "continuous", clamp: bool = True
                   ) -> PyTree:
    """Merge with one seeded mask draw from trained ``logits`` (evaluate over several keys and
    report mean +- std: the final mask is random). ``coeffs``: scalar, ``[K]`` or
    ``[K, L]``; raises ValueError for other shapes or logits missing a tensor."""
    prob = MergeProblem(base, task_vectors)
    x = prob.from_dict(logits, name="logits")
    m = rescale_mask(sample_mask(key, x, temperature, kind))
    c = jnp.asarray(coeffs, jnp.float32)
    c = T.coefficients(c, prob.n_tasks, name="coeffs") if c.ndim == 0 else c
    if c.shape not in (prob.coeff_shape("task"), prob.coeff_shape("layer")):
        raise ValueError(f"coeffs: expected a scalar, shape {prob.coeff_shape('task')} or "
                         f"{prob.coeff_shape('layer')}, got {c.shape}")
    return prob.assemble(merge_float(prob.base, prob.tau, c, m, clamp=clamp), cast=True)
