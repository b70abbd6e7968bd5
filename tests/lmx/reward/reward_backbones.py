"""A tiny NNX stand-in backbone for reward-model tests: ``(tokens, attention_mask) -> [B, T, D]``.

``h_t = tanh(W @ mean_{s <= t, mask_s} E[tokens_s])``: causal, independent of padding side and of
extra pads, so left/right padding must give identical pooled states.
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx


class MeanPoolBackbone(nnx.Module):
    def __init__(self, vocab: int = 32, d: int = 16, *, rngs: nnx.Rngs):
        self.emb = nnx.Embed(vocab, d, rngs=rngs)
        self.proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, tokens, attention_mask):
        m = jnp.asarray(attention_mask, jnp.float32)[..., None]
        e = self.emb(tokens) * m
        csum = jnp.cumsum(e, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
        return jnp.tanh(self.proj(csum))


EOS = PAD = 1


def synthetic_pairs(n, seed=0, max_len=10):
    """Chosen sequences hold more 'good' tokens (ids 20..31) than rejected ones."""
    rng = np.random.default_rng(seed)
    chosen, rejected = [], []
    for _ in range(n):
        lc, lr = rng.integers(3, max_len, size=2)
        chosen.append(list(rng.integers(20, 32, size=lc // 2)) + list(rng.integers(2, 20, size=lc - lc // 2)))
        rejected.append(list(rng.integers(2, 20, size=lr)))
    return chosen, rejected
