import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.reward.pooling import check_eos, last_token_index, pool_last

EOS = PAD = 2  # pad == eos, the SmolLM2 / GPT-2 situation


def _pad(seqs, t, side):
    toks = np.full((len(seqs), t), PAD, np.int32)
    mask = np.zeros((len(seqs), t), bool)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        toks[i, sl] = s
        mask[i, sl] = True
    return toks, mask


SEQS = [[5, 6, 7, EOS], [9, EOS], [3, 4, 5, 6, 7, EOS], [EOS]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("t", [6, 9])
def test_index_is_the_appended_eos(side, t):
    toks, mask = _pad(SEQS, t, side)
    idx = np.asarray(last_token_index(mask))
    for i, s in enumerate(SEQS):
        expect = len(s) - 1 if side == "right" else t - 1
        assert idx[i] == expect
    # The pooled token is the EOS of each row, and the id-based HF rule would miss it
    # (pad == eos: "rightmost token != pad" lands before the EOS).
    assert np.all(toks[np.arange(len(SEQS)), idx] == EOS)
    hf_rule = np.array([np.flatnonzero(r != PAD).max() if np.any(r != PAD) else -1 for r in toks])
    assert np.all(hf_rule[:3] != idx[:3])
    check_eos(toks, mask, EOS)


def test_pool_left_equals_right_and_unpadded():
    d = 3
    table = np.random.default_rng(0).normal(size=(16, d)).astype(np.float32)
    outs = []
    for side, t in [("left", 6), ("right", 6), ("right", 10), ("left", 8)]:
        toks, mask = _pad(SEQS, t, side)
        # A position-independent stand-in for hidden states: embedding of the token id plus
        # the count of real tokens before it, so any off-by-one or pad read shows up.
        h = table[toks] + np.cumsum(mask, 1)[..., None]
        outs.append(np.asarray(pool_last(jnp.asarray(h), jnp.asarray(mask))))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    for i, s in enumerate(SEQS):
        np.testing.assert_array_equal(outs[0][i], table[EOS] + len(s))


def test_no_padding_and_jit():
    mask = np.ones((2, 5), bool)
    assert np.asarray(last_token_index(mask)).tolist() == [4, 4]
    idx = jax.jit(last_token_index)(jnp.asarray(mask))
    assert np.asarray(idx).tolist() == [4, 4]


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"rows \[1\] have no non-pad token"):
        last_token_index(np.array([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        last_token_index(np.ones(4))
    with pytest.raises(ValueError, match="matching"):
        pool_last(jnp.ones((2, 3, 4)), jnp.ones((2, 4), bool))
    toks, mask = _pad([[5, 6, 7], [9, EOS]], 5, "right")  # first row lost its EOS
    with pytest.raises(ValueError, match=r"rows \[0\] do not end in eos_id"):
        check_eos(toks, mask, EOS)
