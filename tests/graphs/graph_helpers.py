"""Test helpers for tests/graphs: a jitted forward cached per model structure.

Calling an NNX model eagerly compiles every primitive for every new shape (seconds per model on
CPU); one jit per (structure, mode, train) is several times cheaper and is what users run.
"""
import functools

import jax
from flax import nnx

TINY = dict(d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, gnn_layers=1, pe_dim=8,
            pe_width=4)


@functools.lru_cache(maxsize=None)
def _fwd(graphdef, mode, train):
    def f(state, batch, gates, rng):
        return nnx.merge(graphdef, state)(batch, gates, mode=mode, train=train, rng=rng)

    return jax.jit(f)


def run(model, batch, gates=None, *, mode="clean", train=False, rng=None):
    """``model(batch, gates, mode=, train=, rng=)`` through a jitted forward cached per structure."""
    gd, state = nnx.split(model)
    return _fwd(gd, mode, train)(state, batch, gates, rng)
