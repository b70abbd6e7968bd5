"""Reward-model modules: a scalar head (standard RM) and InfoRM's variational bottleneck head,
wrapped around any backbone that maps ``(tokens, attention_mask) -> hidden [B, T, D]``.

References: InfoRM (Miao et al., arXiv:2402.09345) Fig. 1 (the encoder replaces the standard RM's
final layer; an MLP decoder maps the latent to the reward) and the official code
(github ``miaoyuchun/InfoRM``, ``openrlhf/models/model_inform.py``). Heads act on the pooled
last-token state ``h_last [N, D]``: the official code projects every position and gathers
afterwards; the head is per-token linear, so gather-then-project is equal and cheaper (tested).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.reward.losses import KL_MODES, PAIR_REDUCTIONS
from lmx.reward.pooling import pool_last

HEADS = ("scalar", "inform")
DECODERS = ("linear", "swiglu", "mlp")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Head and loss settings of a reward model. Defaults K = 128, beta = 0.1 are the official
    CLI defaults (``--latent_dim``, ``--kl_loss_coef``), inside the paper's ablation grid.

    head: ``"scalar"`` (standard BT RM, bias-free ``Linear(D, 1)``) or ``"inform"``.
    latent_dim: IB dimensionality K. beta: KL weight. decoder: ``"linear"`` (official default,
    bias-free K->1), ``"swiglu"`` (K->mult*K gate/up, SiLU, ->1) or ``"mlp"`` (two GELU layers of
    width mult*K, ->1). kl_mode / pair_reduction: see :func:`lmx.reward.losses.gaussian_kl` and
    :func:`lmx.reward.losses.reward_pair_losses`. logvar_clip: clamp of ``log sigma^2`` before
    ``exp`` (ours, stability). center_coef: reward-centering weight. use_margin: read a
    ``"margin"`` column from batches.
    """

    head: str = "inform"
    latent_dim: int = 128
    beta: float = 0.1
    decoder: str = "linear"
    decoder_mult: int = 4
    kl_mode: str = "diag_sum"
    pair_reduction: str = "sum_pair"
    logvar_clip: float = 20.0
    center_coef: float = 0.0
    use_margin: bool = False

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
        if self.pair_reduction not in PAIR_REDUCTIONS:
            raise ValueError(f"pair_reduction must be one of {PAIR_REDUCTIONS}, "
                             f"got {self.pair_reduction!r}")
        if self.latent_dim < 1 or self.decoder_mult < 1:
            raise ValueError(f"latent_dim and decoder_mult must be >= 1, got "
                             f"{self.latent_dim}, {self.decoder_mult}")
        if self.beta < 0 or self.center_coef < 0 or self.logvar_clip <= 0:
            raise ValueError(f"need beta >= 0, center_coef >= 0, logvar_clip > 0; got "
                             f"{self.beta}, {self.center_coef}, {self.logvar_clip}")


class RewardOutput(NamedTuple):
    """Reward-model output. ``reward`` float32 ``[N]``; for InfoRM also ``mu``, ``logvar``
    (``[N, K]``, the exported IB representation is ``mu``) and ``z`` (the decoded latent: a
    sample in training, ``mu`` at evaluation); ``None`` for the scalar head."""

    reward: jax.Array
    mu: jax.Array | None = None
    logvar: jax.Array | None = None
    z: jax.Array | None = None


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


def _check_h(h_last: jax.Array, d_in: int) -> None:
    if jnp.ndim(h_last) != 2 or jnp.shape(h_last)[1] != d_in:
        raise ValueError(f"h_last must be [N, {d_in}], got shape {jnp.shape(h_last)}")


class ScalarHead(nnx.Module):
    """Standard RM head ``r = h_last @ w``, bias-free, ``w ~ N(0, 1/(D+1))`` so initial rewards
    are ~0 (OpenRLHF's value-head init). ``rng`` is accepted and ignored."""

    def __init__(self, d_in: int, *, rngs: nnx.Rngs):
        self.d_in = d_in
        self.w = _normal(rngs, (d_in, 1), 1.0 / (d_in + 1))

    def __call__(self, h_last: jax.Array, *, rng: jax.Array | None = None) -> RewardOutput:
        _check_h(h_last, self.d_in)
        return RewardOutput(reward=(jnp.asarray(h_last, jnp.float32) @ self.w[...])[:, 0])


class InfoHead(nnx.Module):
    """InfoRM variational information-bottleneck head (paper Fig. 1; official ``model_inform.py``).

    Encoder ``W_enc [D, 2K]`` (bias-free): ``[mu | logvar] = h_last @ W_enc``. With ``rng``
    (training) ``z = mu + exp(logvar/2) * eps``, ``eps ~ N(0, I_K)`` drawn for the whole ``[N, K]``
    batch from one key (independent for chosen and rejected); without ``rng`` (evaluation)
    ``z = mu``. Decoder ``g: R^K -> R``. ``logvar`` is clamped to ``[-clip, clip]``.
    Init: encoder std ``1/(D+1)``, decoder std ``1/(K+1)`` so first rewards ~0, ``logvar ~ 0``.
    """

    def __init__(self, d_in: int, latent_dim: int = 128, *, decoder: str = "linear",
                 decoder_mult: int = 4, logvar_clip: float = 20.0, rngs: nnx.Rngs):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        k, w = latent_dim, decoder_mult * latent_dim
        self.d_in, self.latent_dim, self.decoder, self.logvar_clip = d_in, k, decoder, logvar_clip
        self.w_enc = _normal(rngs, (d_in, 2 * k), 1.0 / (d_in + 1))
        if decoder == "linear":
            self.w_dec = _normal(rngs, (k, 1), 1.0 / (k + 1))
        elif decoder == "swiglu":
            self.w_gate = _normal(rngs, (k, w), 1.0 / (k + 1))
            self.w_up = _normal(rngs, (k, w), 1.0 / (k + 1))
            self.w_dec = _normal(rngs, (w, 1), 1.0 / (w + 1))
        else:
            self.w_1 = _normal(rngs, (k, w), (2.0 / k) ** 0.5)
            self.b_1 = nnx.Param(jnp.zeros((w,), jnp.float32))
            self.w_2 = _normal(rngs, (w, w), (2.0 / w) ** 0.5)
            self.b_2 = nnx.Param(jnp.zeros((w,), jnp.float32))
            self.w_dec = _normal(rngs, (w, 1), 1.0 / (w + 1))

    def encode(self, h_last: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mu, logvar)``, float32 ``[N, K]`` each."""
        _check_h(h_last, self.d_in)
        out = jnp.asarray(h_last, jnp.float32) @ self.w_enc[...]
        mu, logvar = jnp.split(out, 2, axis=-1)
        return mu, jnp.clip(logvar, -self.logvar_clip, self.logvar_clip)

    def decode(self, z: jax.Array) -> jax.Array:
        """``g(z)``: float32 ``[N]`` rewards from ``[N, K]`` latents."""
        if self.decoder == "linear":
            h = z
        elif self.decoder == "swiglu":
            h = jax.nn.silu(z @ self.w_gate[...]) * (z @ self.w_up[...])
        else:
            h = jax.nn.gelu(z @ self.w_1[...] + self.b_1[...])
            h = jax.nn.gelu(h @ self.w_2[...] + self.b_2[...])
        return (h @ self.w_dec[...])[:, 0]

    def __call__(self, h_last: jax.Array, *, rng: jax.Array | None = None) -> RewardOutput:
        mu, logvar = self.encode(h_last)
        if rng is None:
            z = mu
        else:
            z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape, jnp.float32)
        return RewardOutput(reward=self.decode(z), mu=mu, logvar=logvar, z=z)


def make_head(cfg: RewardConfig, d_in: int, *, rngs: nnx.Rngs) -> ScalarHead | InfoHead:
    """Build the head named by ``cfg.head`` for backbone width ``d_in``."""
    if cfg.head == "scalar":
        return ScalarHead(d_in, rngs=rngs)
    return InfoHead(d_in, cfg.latent_dim, decoder=cfg.decoder, decoder_mult=cfg.decoder_mult,
                    logvar_clip=cfg.logvar_clip, rngs=rngs)


def backbone_hidden(backbone: Any, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """``[B, T, D]`` hidden states: ``backbone.hidden_states(tokens, attention_mask=...)`` when the
    backbone has that method (``lmx.models.Transformer``), else ``backbone(tokens,
    attention_mask=...)``."""
    fn = getattr(backbone, "hidden_states", None)
    if fn is None:
        fn = backbone
    return fn(tokens, attention_mask=attention_mask)


class RewardModel(nnx.Module):
    """Backbone + last-token pooling + head.

    ``model(tokens, attention_mask, rng=None) -> RewardOutput``. Pass ``rng`` in training (InfoRM
    samples ``z``); leave it ``None`` at evaluation (``z = mu``). ``norm_mean`` / ``norm_std``
    (host floats, set by :func:`lmx.reward.trainer.fit_reward_normalization`) are applied by
    :meth:`score` only, never inside the training loss.

    Args:
        backbone: NNX module mapping ``(tokens [B,T], attention_mask=[B,T]) -> [B, T, D]``.
        head: :class:`ScalarHead` or :class:`InfoHead` (or build one with :func:`make_head`).
        cfg: the :class:`RewardConfig` the head and loss follow.
    """

    def __init__(self, backbone: Any, head: ScalarHead | InfoHead, cfg: RewardConfig):
        self.backbone = backbone
        self.head = head
        self.cfg = cfg
        self.norm_mean: float | None = None
        self.norm_std: float | None = None

    def pooled(self, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Last-real-token hidden state ``[B, D]`` (after the backbone's final norm)."""
        return pool_last(backbone_hidden(self.backbone, tokens, attention_mask), attention_mask)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array, *,
                 rng: jax.Array | None = None) -> RewardOutput:
        return self.head(self.pooled(tokens, attention_mask), rng=rng)

    def score(self, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Eval-mode reward ``g(mu)`` (float32 ``[B]``), normalised when stats are set."""
        r = self(tokens, attention_mask).reward
        if self.norm_mean is not None:
            r = (r - self.norm_mean) / self.norm_std
        return r
