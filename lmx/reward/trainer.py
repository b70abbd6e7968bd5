"""Reward-model training on the shared loop (``lmx.train.train``): pair batches, loss function,
evaluation, reward normalisation, latent export, save/load.

Batches are dicts of numpy arrays ``chosen_tokens/chosen_mask/rejected_tokens/rejected_mask
[B, T]`` (+ optional ``margin [B]``); chosen and rejected share ``T`` so they concatenate into one
``[2B, T]`` forward (chosen first, as OpenRLHF's ``concatenated_forward``). The loss function
returns ``(sum over pairs of the per-pair loss, B, metric sums)``, so the trainer's "sum / global
count" is the paper's batch mean for any micro-batching.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.reward.losses import pair_accuracy, reward_pair_losses, reward_stats
from lmx.reward.model import RewardConfig, RewardModel, make_head
from lmx.reward.pooling import check_eos

PAIR_KEYS = ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")


def collate_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], *,
                  eos_id: int, pad_id: int, max_len: int, side: str = "right",
                  margins: Sequence[float] | None = None,
                  multiple: int = 8) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Token-id pairs -> a padded pair batch, EOS appended, over-long pairs dropped.

    Each sequence (prompt + response ids) gets ``eos_id`` appended (as the official InfoRM
    dataset code does, ``datasets/reward_dataset.py``); pairs where either side then exceeds
    ``max_len`` are dropped (TRL/OpenRLHF). Both sides are padded with ``pad_id`` on ``side`` to
    one length ``T`` (a multiple of ``multiple``, at most ``max_len``).

    Returns:
        ``(batch, kept)``: batch dict of int32 tokens / bool masks ``[B', T]`` (+ float32
        ``margin``), and the int64 indices of the kept pairs.
    Raises:
        ValueError: different numbers of chosen and rejected, empty sequences, bad side, no pair
            left after the length filter, margins of the wrong length.
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"chosen and rejected must have the same number of sequences, got "
                         f"{len(chosen)} and {len(rejected)}")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if margins is not None and len(margins) != len(chosen):
        raise ValueError(f"margins must have one value per pair ({len(chosen)}), got {len(margins)}")
    for name, seqs in (("chosen", chosen), ("rejected", rejected)):
        empty = [i for i, s in enumerate(seqs) if len(s) == 0]
        if empty:
            raise ValueError(f"{name} sequences {empty[:10]} are empty: no token to score")
    kept = np.asarray([i for i in range(len(chosen))
                       if len(chosen[i]) + 1 <= max_len and len(rejected[i]) + 1 <= max_len],
                      np.int64)
    if kept.size == 0:
        raise ValueError(f"every pair is longer than max_len={max_len} once EOS is appended")
    seqs_c = [list(chosen[i]) + [eos_id] for i in kept]
    seqs_r = [list(rejected[i]) + [eos_id] for i in kept]
    t = min(max_len, -(-max(len(s) for s in seqs_c + seqs_r) // multiple) * multiple)
    batch = {}
    for name, seqs in (("chosen", seqs_c), ("rejected", seqs_r)):
        toks = np.full((len(seqs), t), pad_id, np.int32)
        mask = np.zeros((len(seqs), t), bool)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
            toks[i, sl], mask[i, sl] = s, True
        batch[f"{name}_tokens"], batch[f"{name}_mask"] = toks, mask
    if margins is not None:
        batch["margin"] = np.asarray(margins, np.float32)[kept]
    return batch, kept


def check_pair_batch(batch: dict[str, Any], eos_id: int | None = None) -> None:
    """Host-side validation of a pair batch (before any compute).

    Raises:
        ValueError: missing keys, chosen/rejected of different sizes or shapes, rows with no
            real token, or (with ``eos_id``) rows not ending in EOS.
    """
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise ValueError(f"pair batch lacks keys {missing}; needs {PAIR_KEYS}")
    c, r = np.shape(batch["chosen_tokens"]), np.shape(batch["rejected_tokens"])
    if c[0] != r[0]:
        raise ValueError(f"chosen and rejected batches must have the same size, got {c[0]} and "
                         f"{r[0]}")
    if c[1:] != r[1:]:
        raise ValueError(f"chosen {c} and rejected {r} must be padded to the same shape")
    for side in ("chosen", "rejected"):
        if np.shape(batch[f"{side}_mask"])[:2] != np.shape(batch[f"{side}_tokens"])[:2]:
            raise ValueError(f"{side}_mask {np.shape(batch[f'{side}_mask'])} does not match "
                             f"{side}_tokens {np.shape(batch[f'{side}_tokens'])}")
        empty = np.flatnonzero(~np.asarray(batch[f"{side}_mask"]).astype(bool).any(axis=1))
        if empty.size:
            raise ValueError(f"{side} rows {empty[:10].tolist()} have no non-pad token")
        if eos_id is not None:
            check_eos(batch[f"{side}_tokens"], batch[f"{side}_mask"], eos_id)


def _forward_pairs(model: RewardModel, batch: dict[str, Any], rng: jax.Array | None):
    tokens = jnp.concatenate([jnp.asarray(batch["chosen_tokens"]),
                              jnp.asarray(batch["rejected_tokens"])])
    mask = jnp.concatenate([jnp.asarray(batch["chosen_mask"]), jnp.asarray(batch["rejected_mask"])])
    return model(tokens, mask, rng=rng if model.cfg.head == "inform" else None)


def pair_losses(model: RewardModel, batch: dict[str, Any],
                rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Per-pair losses ``[B]``, loss terms and the :class:`RewardOutput` of one pair batch."""
    cfg = model.cfg
    out = _forward_pairs(model, batch, rng)
    margin = batch.get("margin") if cfg.use_margin else None
    if cfg.use_margin and margin is None:
        raise ValueError("cfg.use_margin is set but the batch has no 'margin' column")
    loss, terms = reward_pair_losses(out.reward, margin=margin, center_coef=cfg.center_coef,
                                     mu=out.mu, logvar=out.logvar, beta=cfg.beta,
                                     kl_mode=cfg.kl_mode, pair_reduction=cfg.pair_reduction)
    return loss, terms, out


def reward_loss_fn(model: RewardModel, batch: dict[str, Any],
                   rng: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``loss_fn`` for ``lmx.train.train``: ``(sum_b L_b, B, metrics)``.

    ``L_b`` = BT (+ margin, + centering) (+ ``beta`` KL for InfoRM; see
    :func:`lmx.reward.losses.reward_pair_losses`); the trainer divides the summed loss by the global
    pair count. Metrics are micro-batch means (the trainer averages them over micro-batches):
    ``pref_loss``, ``kl``, ``acc`` (strict ``r_c > r_r``), ``tie_rate``, ``r_chosen``,
    ``r_rejected``.

    Usage::

        from lmx.train import TrainConfig, train
        result = train(rm, reward_loss_fn, get_batch, TrainConfig(steps=1000, lr=9e-6), mesh=mesh)
    """
    loss, terms, _ = pair_losses(model, batch, rng)
    rc, rr = terms["r_chosen"], terms["r_rejected"]
    metrics = {"pref_loss": jnp.mean(terms["pref"]), "kl": jnp.mean(terms["kl"]),
               "acc": jnp.mean((rc > rr).astype(jnp.float32)),
               "tie_rate": jnp.mean((rc == rr).astype(jnp.float32)),
               "r_chosen": jnp.mean(rc), "r_rejected": jnp.mean(rr)}
    return jnp.sum(loss), jnp.asarray(loss.shape[0], jnp.float32), metrics


@nnx.jit
def _eval_rewards(model: RewardModel, batch: dict[str, Any]):
    out = _forward_pairs(model, batch, None)
    return out.reward, out.mu


def evaluate(model: RewardModel, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Eval-mode (``z = mu``) pair metrics over ``batches``.

    Returns ``{"acc", "ties", "loss" (mean BT), "n_pairs", "rewards" (all chosen+rejected
    rewards, float64 [2N]), "margin_mean"}``. Raises ValueError for malformed batches or NaN
    rewards.
    """
    rc_all, rr_all = [], []
    for batch in batches:
        check_pair_batch(batch)
        r, _ = _eval_rewards(model, {k: batch[k] for k in PAIR_KEYS})
        b = np.shape(batch["chosen_tokens"])[0]
        rc_all.append(np.asarray(r[:b], np.float64))
        rr_all.append(np.asarray(r[b:], np.float64))
    if not rc_all:
        raise ValueError("evaluate needs at least one batch")
    rc, rr = np.concatenate(rc_all), np.concatenate(rr_all)
    acc = pair_accuracy(jnp.asarray(rc), jnp.asarray(rr))
    return {"acc": float(acc["acc"]), "ties": int(acc["ties"]),
            "loss": float(np.mean(np.logaddexp(0.0, -(rc - rr)))), "n_pairs": int(rc.size),
            "rewards": np.concatenate([rc, rr]), "margin_mean": float(np.mean(rc - rr))}


def fit_reward_normalization(model: RewardModel, batches: Iterable[dict[str, Any]]) -> dict:
    """Set ``model.norm_mean/std`` from eval-set chosen+rejected rewards (as OpenRLHF and the
    official InfoRM ``rm_trainer.evaluate`` do; they store them in the config at the end of
    evaluation). Returns the stats."""
    stats = reward_stats(evaluate(model, batches)["rewards"])
    model.norm_mean, model.norm_std = stats["mean"], stats["std"]
    return stats


def encode_latents(model: RewardModel, tokens: Any, attention_mask: Any,
                   batch_size: int = 64) -> dict[str, np.ndarray]:
    """Eval-mode InfoRM outputs for ICDS/CSI (``mu`` at the EOS is the latent):
    ``{"mu" [N, K], "logvar" [N, K], "reward" [N]}`` as float32 numpy. Raises ValueError for a
    scalar-head model or empty rows."""
    if model.cfg.head != "inform":
        raise ValueError("encode_latents needs an InfoRM model (cfg.head == 'inform')")
    tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask)
    if tokens.shape[:2] != attention_mask.shape or tokens.shape[0] == 0:
        raise ValueError(f"tokens {tokens.shape} and attention_mask {attention_mask.shape} must be "
                         "matching non-empty [N, T]")
    fn = nnx.jit(lambda m, t, k: m(t, k))
    outs = [fn(model, jnp.asarray(tokens[i:i + batch_size]),
               jnp.asarray(attention_mask[i:i + batch_size]))
            for i in range(0, tokens.shape[0], batch_size)]
    return {k: np.concatenate([np.asarray(getattr(o, k), np.float32) for o in outs])
            for k in ("mu", "logvar", "reward")}


def save_reward_model(model: RewardModel, path: str | pathlib.Path,
                      backbone_config: dict | None = None) -> pathlib.Path:
    """Write ``path/reward_config.json`` (RewardConfig, head width, normalisation stats, optional
    backbone config) and ``path/model.safetensors`` (every ``nnx.Param`` of backbone and head,
    keys = '/'-joined module paths). The head is saved with the backbone, so nothing is lost the
    way LoRA saves lose a score head (trl #1379)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}
    save_file(flat, str(path / "model.safetensors"))
    meta = {"reward_config": dataclasses.asdict(model.cfg), "d_in": model.head.d_in,
            "norm_mean": model.norm_mean, "norm_std": model.norm_std,
            "backbone_config": backbone_config}
    (path / "reward_config.json").write_text(json.dumps(meta, indent=1))
    return path


def load_reward_model(path: str | pathlib.Path, backbone: Any | None = None,
                      backbone_factory: Callable[[dict], Any] | None = None) -> RewardModel:
    """Rebuild a :class:`RewardModel` saved by :func:`save_reward_model`.

    Pass a ``backbone`` of the saved architecture (its weights are overwritten), or a
    ``backbone_factory(backbone_config)``; with neither, an ``lmx.models.Transformer`` is built from
    the saved ``ModelConfig`` fields.

    Raises:
        FileNotFoundError: missing files. ValueError: parameter names or shapes that do not match.
    """
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    meta = json.loads((path / "reward_config.json").read_text())
    arrays = load_file(str(path / "model.safetensors"))
    cfg = RewardConfig(**meta["reward_config"])
    if backbone is None:
        bcfg = meta.get("backbone_config")
        if backbone_factory is not None:
            backbone = backbone_factory(bcfg)
        elif bcfg is not None:
            from lmx.models import ModelConfig, Transformer

            backbone = Transformer(ModelConfig(**bcfg), rngs=nnx.Rngs(0))
        else:
            raise ValueError("no backbone, backbone_factory or saved backbone_config to rebuild from")
    model = RewardModel(backbone, make_head(cfg, meta["d_in"], rngs=nnx.Rngs(0)), cfg)
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    names = {"/".join(map(str, p)) for p, _ in flat}
    if names != set(arrays):
        raise ValueError(f"saved parameters do not match the model: missing "
                         f"{sorted(names - set(arrays))[:5]}, unexpected {sorted(set(arrays) - names)[:5]}")
    for p, v in flat:
        a = arrays["/".join(map(str, p))]
        if a.shape != v[...].shape:
            raise ValueError(f"parameter {'/'.join(map(str, p))}: saved shape {a.shape} != model "
                             f"{v[...].shape}")
        v[...] = jnp.asarray(a, v[...].dtype)
    nnx.update(model, state)
    model.norm_mean, model.norm_std = meta["norm_mean"], meta["norm_std"]
    return model
