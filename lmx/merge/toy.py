"""Offline multi-task merging pipeline on scikit-learn's digits, mirroring the CLIP protocol
of the Concrete (arXiv:2312.06173) and AdaMerging (arXiv:2310.02575) papers at toy scale.

- Data: ``sklearn.datasets.load_digits`` (1,797 8x8 images shipped in the wheel, no download).
  Per seed, images are split into a pre-training set (600, untransformed), a fine-tuning set
  (600), a held-out set (200) and a test set (397); task k sees every split through its own fixed
  transform (``TRANSFORMS``: rotations, flips, intensity inversion, a fixed pixel permutation).
- "Pre-trained model": an MLP backbone 64 -> h -> h (ReLU) plus a head, trained on untransformed
  images. Per task a linear "zero-shot" head is probed on the frozen pre-trained features and then
  frozen (CLIP's fixed text heads). Fine-tuning updates the backbone only, so task vectors live
  on the backbone (4 tensors: ``l1.w``, ``l1.b``, ``l2.w``, ``l2.b``).
- References: the pre-trained backbone, each fine-tuned backbone on its own task ("individual"),
  and a backbone fine-tuned jointly on all tasks ("multi-task", traditional MTL).
- Unlabeled inputs for the entropy objectives: the held-out images of each task, drawn by a
  shuffled, cycled loader (:meth:`ToyTasks.batches`).

Requires scikit-learn (raises ImportError with a hint otherwise).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmx.merge import methods as M
from lmx.merge.learned import entropy
from lmx.train import TrainState, scan_steps

_PERM = np.random.default_rng(12345).permutation(64)
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda im: np.rot90(im, 1, axes=(1, 2)),
    "hflip": lambda im: im[:, :, ::-1],
    "invert": lambda im: 1.0 - im,
    "permute": lambda im: im.reshape(len(im), 64)[:, _PERM].reshape(im.shape),
    "rot180": lambda im: np.rot90(im, 2, axes=(1, 2)),
    "transpose": lambda im: np.swapaxes(im, 1, 2),
    "rot270": lambda im: np.rot90(im, 3, axes=(1, 2)),
    "vflip": lambda im: im[:, ::-1, :],
}


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Sizes and schedules: an MLP 64-h-h fine-tuned for 600 Adam steps (lr 1e-3); probes by
    sklearn logistic regression (inverse regularisation ``probe_c``) and Adam on minibatches of
    ``train_batch`` instead of full batches (5x less compute at the same step counts).
    ``tasks``: names from TRANSFORMS; ``batch_per_task``: unlabeled batch of the learned merges;
    ``multitask``: also train the joint multi-task reference (``ToyTasks.multitask``, else None)."""

    tasks: tuple[str, ...] = ("rot90", "hflip", "invert", "permute", "rot180", "transpose")
    hidden: int = 64
    n_pretrain: int = 600
    n_finetune: int = 600
    n_heldout: int = 200
    pretrain_steps: int = 1500
    pretrain_lr: float = 1e-3
    probe_c: float = 1.0
    finetune_steps: int = 600
    finetune_lr: float = 1e-3
    train_batch: int = 128
    multitask: bool = True
    batch_per_task: int = 16

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TRANSFORMS]
        if bad or len(self.tasks) == 0:
            raise ValueError(f"tasks: unknown {bad} (known: {sorted(TRANSFORMS)}) or empty")


def backbone(params, x):
    """Backbone features ``[B, h]`` from flattened images ``x`` ``[B, 64]`` in [0, 1]."""
    h = jax.nn.relu(x @ params["l1"]["w"] + params["l1"]["b"])
    return jax.nn.relu(h @ params["l2"]["w"] + params["l2"]["b"])


def layer_inputs(params, x) -> dict[str, jax.Array]:
    """Inputs of the backbone's linear layers (for RegMean Grams), keyed by kernel name."""
    h = jax.nn.relu(x @ params["l1"]["w"] + params["l1"]["b"])
    return {"l1.w": x, "l2.w": h}


def _dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
            "b": jnp.zeros((n_out,))}


def _xent(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _head(h, x):
    return x @ h["w"] + h["b"]


def _adam_fit(loss, params, lr, steps, key, n, batch):
    # Adam on minibatches of ``batch`` random rows out of ``n`` (drawn from each step's key):
    # the ``lmx.train`` step protocol, scanned inside the caller's jit; ``loss(params, idx)``.
    opt = optax.adam(lr)

    def step(state, _, k):
        g = jax.grad(loss)(state.params, jax.random.randint(k, (min(batch, n),), 0, n))
        u, opt_state = opt.update(g, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, u), opt_state=opt_state), {}

    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
    state, _ = scan_steps(step, state, jax.random.split(key, steps))
    return state.params


@functools.partial(jax.jit, static_argnames=("hidden", "steps", "batch"))
def _pretrain(key, x, y, hidden, steps, lr, batch):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {"bb": {"l1": _dense(k1, 64, hidden), "l2": _dense(k2, hidden, hidden)},
              "head": _dense(k3, hidden, 10)}
    return _adam_fit(lambda p, i: _xent(_head(p["head"], backbone(p["bb"], x[i])), y[i]), params,
                     lr, steps, k4, x.shape[0], batch)


def _probe(bb, x, y, c_reg):
    # Multinomial logistic regression per task on frozen pre-trained features (CLIP's fixed
    # zero-shot heads); lbfgs in sklearn avoids compiling one more JAX program per seed.
    from sklearn.linear_model import LogisticRegression

    heads = []
    for xk, yk in zip(np.asarray(x), np.asarray(y)):
        feats = np.asarray(backbone(bb, jnp.asarray(xk)), np.float64)
        # Standardised features converge in a few dozen lbfgs steps (raw ReLU features need
        # thousands); the scaling is folded back into the head so it acts on raw features.
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        clf = LogisticRegression(C=c_reg, max_iter=1000).fit((feats - mu) / sd, yk)
        w = clf.coef_.T / sd[:, None]
        heads.append({"w": jnp.asarray(w, jnp.float32),
                      "b": jnp.asarray(clf.intercept_ - mu @ w, jnp.float32)})
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *heads)


@functools.partial(jax.jit, static_argnames=("steps", "batch"))
def _finetune(key, bb, heads, x, y, steps, lr, batch):
    # One backbone per task, its head frozen.
    return jax.vmap(lambda h, xk, yk, k: _adam_fit(
        lambda p, i: _xent(_head(h, backbone(p, xk[i])), yk[i]), bb, lr, steps, k, xk.shape[0],
        batch))(heads, x, y, jax.random.split(key, x.shape[0]))


@functools.partial(jax.jit, static_argnames=("steps", "batch"))
def _multitask(key, bb, heads, x, y, steps, lr, batch):
    def loss(p, i):
        return jnp.sum(jax.vmap(lambda h, xk, yk: _xent(_head(h, backbone(p, xk[i])), yk[i]))(
            heads, x, y))
    return _adam_fit(loss, bb, lr, steps, key, x.shape[1], batch)


@jax.jit
def _accuracy(bb, heads, x, y):
    return jax.vmap(lambda h, xk, yk: jnp.mean(jnp.argmax(_head(h, backbone(bb, xk)), -1) == yk)
                    )(heads, x, y)


def _unstack(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def entropy_objective(heads) -> Callable:
    """AdaMerging entropy surrogate ``objective(params, batch)`` for :meth:`ToyTasks.batches`
    batches, with the frozen per-task ``heads`` (stacked ``[K, ...]``) as constants of the program
    (they are 10-way heads: a few KB)."""
    def objective(params, batch) -> jax.Array:
        return sum(jnp.mean(entropy(_head(_unstack(heads, k), backbone(params, x))))
                   for k, x in enumerate(batch["x"]))
    return objective


def cross_entropy_objective(heads) -> Callable:
    """Supervised surrogate (labelled held-out data instead of the papers' test-input entropy):
    sum_k mean CE on a labelled :meth:`ToyTasks.batches` batch, with the frozen ``heads``."""
    def objective(params, batch) -> jax.Array:
        return sum(_xent(_head(_unstack(heads, k), backbone(params, x)), y)
                   for k, (x, y) in enumerate(zip(batch["x"], batch["y"])))
    return objective


class ToyTasks:
    """One seed of the digits multi-task setup: data, pre-trained/fine-tuned/multi-task backbones
    and frozen heads. Everything is computed at construction (JIT-compiled; seconds on CPU)."""

    def __init__(self, config: ToyConfig = ToyConfig(), seed: int = 0):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("lmx.merge.toy needs scikit-learn (pip install scikit-learn)") from e
        self.config, self.seed = config, seed
        d = load_digits()
        images = (d.images / 16.0).astype(np.float32)
        labels = d.target.astype(np.int32)
        c = config
        need = c.n_pretrain + c.n_finetune + c.n_heldout
        if need >= len(images):
            raise ValueError(f"config: split sizes need {need} + test images, have {len(images)}")
        perm = np.random.default_rng(seed).permutation(len(images))
        cuts = np.cumsum([c.n_pretrain, c.n_finetune, c.n_heldout])
        idx = dict(zip(("pretrain", "finetune", "heldout", "test"), np.split(perm, cuts)))
        self.tasks = list(c.tasks)
        self.x: dict[str, jax.Array] = {}
        self.y: dict[str, jax.Array] = {}
        for split, ii in idx.items():
            if split == "pretrain":
                continue
            self.x[split] = jnp.asarray(np.stack(
                [TRANSFORMS[t](images[ii]).reshape(len(ii), 64) for t in self.tasks]))
            self.y[split] = jnp.asarray(np.broadcast_to(labels[ii], (len(self.tasks), len(ii))))
        k_pre, k_ft, k_mtl = jax.random.split(jax.random.PRNGKey(seed), 3)
        pre = _pretrain(k_pre, jnp.asarray(images[idx["pretrain"]].reshape(-1, 64)),
                        jnp.asarray(labels[idx["pretrain"]]), c.hidden, c.pretrain_steps,
                        c.pretrain_lr, c.train_batch)
        self.base = pre["bb"]
        self.heads = _probe(self.base, self.x["finetune"], self.y["finetune"], c.probe_c)
        ft = _finetune(k_ft, self.base, self.heads, self.x["finetune"], self.y["finetune"],
                       c.finetune_steps, c.finetune_lr, c.train_batch)
        self.finetuned = [_unstack(ft, i) for i in range(len(self.tasks))]
        self.multitask = _multitask(k_mtl, self.base, self.heads, self.x["finetune"],
                                    self.y["finetune"], c.finetune_steps, c.finetune_lr,
                                    c.train_batch) if c.multitask else None

    @functools.cached_property
    def entropy_objective(self) -> Callable:
        """:func:`entropy_objective` with this seed's heads (one object per instance, so the
        learned merges' compiled steps are reused across methods)."""
        return entropy_objective(self.heads)

    @functools.cached_property
    def cross_entropy_objective(self) -> Callable:
        """:func:`cross_entropy_objective` with this seed's heads."""
        return cross_entropy_objective(self.heads)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def apply(self, params, k: int, x: jax.Array) -> jax.Array:
        """Logits ``[B, 10]`` of backbone ``params`` with task ``k``'s frozen head."""
        return _head(_unstack(self.heads, k), backbone(params, x))

    def accuracy(self, params, split: str = "test") -> np.ndarray:
        """Per-task accuracy ``[K]`` of one backbone on ``split``."""
        return np.asarray(_accuracy(params, self.heads, self.x[split], self.y[split]))

    def individual_accuracy(self, split: str = "test") -> np.ndarray:
        """Accuracy of fine-tuned model k on task k, ``[K]``."""
        return np.array([self.accuracy(p, split)[k] for k, p in enumerate(self.finetuned)])

    def batches(self, split: str = "heldout", *, labels: bool = False, seed: int = 0
                ) -> Callable[[int], dict]:
        """``get_batch(step)`` -> ``{"x": [K x [b, 64]], ("y")}``: per task
        ``batch_per_task`` inputs (labels when ``labels``) from a shuffled, cycled pass over
        ``split``; deterministic in ``step``. For :attr:`entropy_objective` (unlabeled) and
        :attr:`cross_entropy_objective` (labelled)."""
        x, y = np.asarray(self.x[split]), np.asarray(self.y[split])
        n, b = x.shape[1], self.config.batch_per_task
        per_epoch = n // b

        def get_batch(step: int) -> dict:
            epoch, pos = divmod(step, per_epoch)
            idx = [np.random.default_rng((seed, k, epoch)).permutation(n)[pos * b:(pos + 1) * b]
                   for k in range(x.shape[0])]
            out = {"x": [x[k, i] for k, i in enumerate(idx)]}
            if labels:
                out["y"] = [y[k, i] for k, i in enumerate(idx)]
            return out

        return get_batch

    def regmean_grams(self, n_examples: int = 256) -> list[dict[str, jax.Array]]:
        """Per fine-tuned model: X^T X of its linear layers' inputs on its own task's
        fine-tuning images (first ``n_examples``)."""
        return [{n: M.input_gram(v) for n, v in layer_inputs(
            p, self.x["finetune"][k, :n_examples]).items()} for k, p in enumerate(self.finetuned)]

    def fishers(self, n_examples: int = 256, seed: int = 0) -> list:
        """Diagonal Fisher per fine-tuned backbone on its own task: mean over examples of
        (grad log p(y|x))^2 with y sampled from the model (Matena & Raffel 2022, eq. 2)."""
        out = []
        for k, p in enumerate(self.finetuned):
            x = self.x["finetune"][k, :n_examples]
            ys = jax.random.categorical(jax.random.PRNGKey(seed + k), self.apply(p, k, x))

            def logp(params, xi, yi, k=k):
                return jax.nn.log_softmax(self.apply(params, k, xi[None]))[0, yi]

            g = jax.vmap(jax.grad(logp), in_axes=(None, 0, 0))(p, x, ys)
            out.append(jax.tree_util.tree_map(lambda a: jnp.mean(a * a, 0), g))
        return out
