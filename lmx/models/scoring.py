"""Per-token log-probabilities of given sequences (used by ConE, reward models, KD, evals)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.models.transformer import Transformer, check_tokens


def next_token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log softmax(logits[:, t])[tokens[:, t+1]]`` in f32: [B, T, V] logits -> [B, T-1]."""
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _scoring_inputs(model: Transformer, tokens, attention_mask):
    """Validated ``(tokens, mask)`` of at least 2 positions; an all-True mask when none is given."""
    tokens, mask = check_tokens(tokens, attention_mask, model.cfg.vocab_size)
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens needs at least 2 positions to score a next token, got shape {tokens.shape}")
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    return tokens, mask


@nnx.jit
def _token_logprobs(model: Transformer, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    lp = next_token_logprobs(model(tokens, attention_mask=mask), tokens)
    return jnp.where(mask[:, 1:] & mask[:, :-1], lp, 0.0)


@nnx.jit
def _token_and_next_logprobs(model: Transformer, tokens, mask, next_ids):
    logits = model(tokens, attention_mask=mask)
    lp = jnp.where(mask[:, 1:] & mask[:, :-1], next_token_logprobs(logits, tokens), 0.0)
    last = tokens.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    final = logits[jnp.arange(tokens.shape[0]), last].astype(jnp.float32)
    return lp, final[:, next_ids] - jax.nn.logsumexp(final, axis=-1, keepdims=True)


def token_logprobs_with_next(model: Transformer, tokens, attention_mask, next_ids):
    r""":func:`token_logprobs` plus the log-probs of candidate next tokens, in one forward pass.

    Returns ``(lp [B, T-1], next_lp [B, C])`` with ``next_lp[b, c] = log p(next_ids[c] | row b's
    real tokens)`` (the distribution after each row's last unmasked token; left or right padding).
    Scoring ``C`` single-token continuations of a shared prefix this way costs one forward pass
    instead of ``C`` (label-word classification, MDL). Raises like :func:`token_logprobs`, and
    for ``next_ids`` that are not a non-empty 1-D array of in-vocabulary ints.
    """
    tokens, mask = _scoring_inputs(model, tokens, attention_mask)
    next_ids = np.asarray(next_ids)
    if next_ids.ndim != 1 or next_ids.size == 0 or not np.issubdtype(next_ids.dtype, np.integer):
        raise ValueError(f"next_ids must be a non-empty 1-D int array, got {next_ids.dtype} {next_ids.shape}")
    if int(next_ids.min()) < 0 or int(next_ids.max()) >= model.cfg.vocab_size:
        raise ValueError(f"next_ids must lie in [0, vocab_size={model.cfg.vocab_size})")
    return _token_and_next_logprobs(model, tokens, mask, jnp.asarray(next_ids, jnp.int32))


def token_logprobs(model: Transformer, tokens, attention_mask=None) -> jax.Array:
    r"""``lp[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1])`` in float32, shape ``[B, T-1]``.

    Positions whose target or context token is padding (``attention_mask`` False) are 0, so
    ``lp.sum(-1)`` is the log-likelihood of each row's real continuation. Softmax in f32.
    Raises ``ValueError``/``TypeError`` for bad shapes, dtypes, or out-of-vocabulary ids.
    """
    tokens, mask = _scoring_inputs(model, tokens, attention_mask)
    return _token_logprobs(model, tokens, mask)


def mean_token_nll(model: Transformer, tokens, attention_mask=None) -> jax.Array:
    """Mean negative log-likelihood per scored token over the whole batch (nats)."""
    tokens, mask = _scoring_inputs(model, tokens, attention_mask)
    lp = _token_logprobs(model, tokens, mask)
    n = jnp.sum(mask[:, 1:] & mask[:, :-1])
    return -lp.sum() / jnp.maximum(n, 1)
