"""Last-token pooling for reward models (as OpenRLHF and the official InfoRM code pool).

The reward is read at the last *real* token (the appended EOS), found from the attention mask,
never from token ids: with ``pad_token_id == eos_token_id`` the HF id-based rule ("rightmost token
!= pad") would skip the appended EOS and read the token before it. The mask rule
``idx = T - 1 - argmax(flip(mask))`` (OpenRLHF) is right for left padding, right padding and
no padding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmx.reward.losses import _is_concrete


def _check_mask(attention_mask: jax.Array) -> None:
    if jnp.ndim(attention_mask) != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {jnp.shape(attention_mask)}")
    if jnp.shape(attention_mask)[1] == 0:
        raise ValueError("attention_mask has T=0: sequences must have at least one token")
    if _is_concrete(attention_mask):
        has_token = np.asarray(attention_mask).astype(bool).any(axis=1)
        if not has_token.all():
            rows = np.flatnonzero(~has_token).tolist()
            raise ValueError(f"attention_mask rows {rows[:10]} have no non-pad token; every "
                             "sequence needs at least one real token to pool")


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Position of the last real token per row: ``T - 1 - argmax(flip(mask, 1))``.

    Args:
        attention_mask: bool/int ``[B, T]``, True/1 = real token (any padding side).
    Returns:
        int32 ``[B]``.
    Raises:
        ValueError: rank != 2, T == 0, or (concrete masks) a row with no real token.
    """
    _check_mask(attention_mask)
    m = jnp.asarray(attention_mask).astype(bool)
    t = m.shape[1]
    return (t - 1 - jnp.argmax(m[:, ::-1], axis=1)).astype(jnp.int32)


def pool_last(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Gather ``hidden[b, last_token_index(mask)[b]]``.

    Args:
        hidden: ``[B, T, D]`` (any float dtype; kept). attention_mask: ``[B, T]``.
    Returns:
        ``[B, D]``.
    Raises:
        ValueError: shape mismatch between hidden and mask, or as :func:`last_token_index`.
    """
    if jnp.ndim(hidden) != 3 or jnp.shape(hidden)[:2] != jnp.shape(attention_mask):
        raise ValueError(f"hidden must be [B, T, D] matching attention_mask [B, T]; got "
                         f"{jnp.shape(hidden)} and {jnp.shape(attention_mask)}")
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def check_eos(tokens: np.ndarray, attention_mask: np.ndarray, eos_id: int) -> None:
    """Host-side guard that every sequence ends in EOS at its last real position.

    The reward is trained and read at the appended EOS; a sequence whose EOS was cut by
    truncation would be scored at an arbitrary token (the official code asserts the same,
    ``datasets/reward_dataset.py``).

    Raises:
        ValueError: shape mismatch, a row without real tokens, or a row whose last real token is
            not ``eos_id`` (names the rows).
    """
    tokens = np.asarray(tokens)
    attention_mask = np.asarray(attention_mask)
    if tokens.shape != attention_mask.shape or tokens.ndim != 2:
        raise ValueError(f"tokens {tokens.shape} and attention_mask {attention_mask.shape} must "
                         "be the same [B, T] shape")
    idx = np.asarray(last_token_index(attention_mask))
    last = tokens[np.arange(tokens.shape[0]), idx]
    bad = np.flatnonzero(last != eos_id)
    if bad.size:
        raise ValueError(f"rows {bad[:10].tolist()} do not end in eos_id={eos_id} at their last "
                         "real token (truncated EOS?): the reward would be read at a wrong token")
