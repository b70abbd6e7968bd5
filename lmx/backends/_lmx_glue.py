"""Scoring for :class:`lmx.backends.local.LocalBackend` over an lmx Transformer.

Generation runs on the continuous-batching engine (:mod:`lmx.serve.engine`); this module gives
the ``logprobs_fn`` for label probabilities. It gathers the final hidden
states at the requested positions and projects only those rows onto the vocabulary, so that
scoring a 49k-vocabulary model costs [B, P, V] rather than [B, T, V] memory. Shapes are padded to
buckets (batch: multiple of 8; length and positions: powers of two) so the jitted function
compiles a few times only.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.backends.local import bucket


@nnx.jit
def _gather_logprobs(model, tokens, mask, positions):
    # float32 projection and log-softmax: bf16 logits lose the small label-probability gaps
    h = model.hidden_states(tokens, attention_mask=mask)
    rows = jnp.take_along_axis(h, positions[..., None], axis=1).astype(jnp.float32)
    logits = rows @ model.output_embedding().astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


def make_logprobs_fn(model: Any, *, pad_id: int):
    """-> ``logprobs_fn(sequences, positions)`` for ``LocalBackend`` (see its module docstring)."""

    def logprobs_fn(sequences, positions):
        if len(sequences) != len(positions):
            raise ValueError(f"sequences ({len(sequences)}) and positions ({len(positions)}) "
                             "must have the same length")
        n = len(sequences)
        b = -(-n // 8) * 8  # batch rounded up to 8: little waste, few distinct shapes
        t = bucket(max(len(s) for s in sequences), 16)
        p = bucket(max(len(q) for q in positions), 1)
        tokens = np.full((b, t), pad_id, np.int32)
        mask = np.zeros((b, t), bool)
        pos = np.zeros((b, p), np.int32)
        mask[n:, 0] = True  # filler rows keep one real token so attention never sees an empty row
        for i, (s, q) in enumerate(zip(sequences, positions)):
            if any(not 0 <= k < len(s) for k in q):
                raise ValueError(f"positions[{i}] must lie in [0, {len(s)}), got {list(q)}")
            tokens[i, :len(s)] = s
            mask[i, :len(s)] = True
            pos[i, :len(q)] = q
        out = np.asarray(_gather_logprobs(model, jnp.asarray(tokens), jnp.asarray(mask),
                                          jnp.asarray(pos)))
        return [out[i, :len(q)] for i, q in enumerate(positions)]

    return logprobs_fn
