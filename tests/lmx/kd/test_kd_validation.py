"""Bad input raises a clear error before any compute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.kd import (ATKDConfig, KDConfig, atkd_loss, atkd_threshold, fused_linear_kd_loss,
                    kd_loss, target_decomposition, token_divergence)

Z = jnp.zeros((2, 4, 6))
Y = jnp.zeros((2, 4), jnp.int32)


@pytest.mark.parametrize("fn", [kd_loss, atkd_loss])
@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((Z, jnp.zeros((2, 5, 6)), Y), {}, ValueError, "leading shape"),
    ((Z, jnp.zeros((2, 4, 7)), Y), {}, ValueError, "vocab sizes differ"),
    ((Z, jnp.zeros((2, 4, 7)), Y), {"valid_vocab_size": 7}, ValueError, "exceeds"),
    ((Z.astype(jnp.int32), Z, Y), {}, TypeError, "student_logits must be a floating"),
    ((Z, Z.astype(jnp.int8), Y), {}, TypeError, "teacher_logits must be a floating"),
    ((Z, Z, Y.astype(jnp.float32)), {}, TypeError, "labels must be an integer"),
    ((Z, Z, jnp.zeros((2, 5), jnp.int32)), {}, ValueError, r"labels must have shape \(2, 4\)"),
    ((Z, Z, Y), {"mask": jnp.ones((2, 3), bool)}, ValueError, r"mask must have shape \(2, 4\)"),
    ((Z, Z, Y), {"temperature": 0.0}, ValueError, "temperature"),
    ((Z[:, :1], Z[:, :1], Y[:, :1]), {}, ValueError, "sequence length >= 2"),
    ((Z[0], Z[0], Y[0]), {}, ValueError, "shift=True needs"),
    ((Z, Z, Y), {"reduction": "avg"}, ValueError, "reduction"),
])
def test_bad_inputs(fn, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5])
def test_hard_fraction_outside_range(k):
    with pytest.raises(ValueError, match="hard_fraction"):
        atkd_loss(Z, Z, Y, hard_fraction=k)
    with pytest.raises(ValueError, match="hard_fraction"):
        atkd_threshold(Y.astype(jnp.float32), Y > 0, k)


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="kind"):
        kd_loss(Z, Z, kind="jsd")
    with pytest.raises(ValueError, match="beta"):
        KDConfig(kind="gjsd", beta=1.2)
    with pytest.raises(ValueError, match="skew"):
        token_divergence(Z, Z, "skl", skew=1.0)
    with pytest.raises(ValueError, match="easy_weight"):
        ATKDConfig(easy_weight=-0.5)
    with pytest.raises(ValueError, match="direction"):
        target_decomposition(Z, Z, Y, "sideways")
    with pytest.raises(ValueError, match="split_scope"):
        atkd_loss(Z, Z, Y, split_scope="device")
    with pytest.raises(ValueError, match="threshold"):
        atkd_loss(Z, Z, Y, split_scope="global")
    with pytest.raises(ValueError, match="split_groups"):
        atkd_loss(Z, Z, Y, split_groups=3)
    with pytest.raises(ValueError, match="denominator"):
        atkd_loss(Z, Z, Y, denominator=10)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(Z, Z, hard_weight=1.0)
    with pytest.raises(TypeError, match="targets must be an integer"):
        target_decomposition(Z, Z, Y.astype(jnp.float32))


def test_fused_bad_inputs():
    h, w = jnp.zeros((2, 4, 3)), jnp.zeros((3, 6))
    with pytest.raises(ValueError, match="student_head must be"):
        fused_linear_kd_loss(h, jnp.zeros((5, 6)), h, w, Y)
    with pytest.raises(ValueError, match="vocab sizes differ"):
        fused_linear_kd_loss(h, w, h, jnp.zeros((3, 7)), Y)
    with pytest.raises(ValueError, match="leading shape"):
        fused_linear_kd_loss(h, w, jnp.zeros((2, 5, 3)), w, Y)
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_linear_kd_loss(h, w, h, w, Y[:, :3])
    with pytest.raises(ValueError, match="mask must have shape"):
        fused_linear_kd_loss(h, w, h, w, Y, mask=jnp.ones((2, 3), bool))
    with pytest.raises(TypeError, match="student_hidden must be a floating"):
        fused_linear_kd_loss(h.astype(jnp.int32), w, h, w, Y)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_kd_loss(h, w, h, w, Y, chunk_size=0)
    with pytest.raises(ValueError, match="impl"):
        fused_linear_kd_loss(h, w, h, w, Y, impl="triton")
    with pytest.raises(TypeError, match="loss must be"):
        fused_linear_kd_loss(h, w, h, w, Y, loss="fkl")
    with pytest.raises(ValueError, match="student_bias"):
        fused_linear_kd_loss(h, w, h, w, Y, student_bias=jnp.zeros(5))


def _labels_with(value, pos=(1, 2)):
    y = jnp.asarray([[0, 1, 2, 3], [3, 2, 1, 0]], jnp.int32)
    return y.at[pos].set(value)


_LOSSES = {
    "kd_loss": lambda zs, zt, y, **kw: kd_loss(zs, zt, y, hard_weight=0.5, **kw),
    "atkd_loss": lambda zs, zt, y, **kw: atkd_loss(zs, zt, y, **kw),
    "fused_kd": lambda zs, zt, y, **kw: fused_linear_kd_loss(
        zs, jnp.eye(4), zt, jnp.eye(4), y, loss=KDConfig(hard_weight=0.5, **kw)),
    "fused_atkd": lambda zs, zt, y, **kw: fused_linear_kd_loss(
        zs, jnp.eye(4), zt, jnp.eye(4), y, loss=ATKDConfig(**kw)),
}
# one jitted function per loss: bad and good labels share the compile (the ids are traced)
_JITTED = {name: jax.jit(fn) for name, fn in _LOSSES.items()}


def _logits():
    zs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4)), jnp.float32)
    return zs, zs[:, ::-1]


@pytest.mark.parametrize("name", list(_LOSSES))
@pytest.mark.parametrize("bad", [4, -1, 1000])
def test_out_of_range_label_ids_raise_naming_value_and_position(name, bad):
    # V = 4: id 4 used to give a finite atkd_loss and a NaN hard CE; -1 was read as a real id.
    zs, zt = _logits()
    with pytest.raises(ValueError, match=rf"labels: id {bad} at position \(1, 2\).*\[0, 4\)"):
        _LOSSES[name](zs, zt, _labels_with(bad))
    # under jit the ids cannot be inspected: the loss is NaN, never a finite wrong value
    assert np.isnan(float(_JITTED[name](zs, zt, _labels_with(bad))))


@pytest.mark.parametrize("name", list(_LOSSES))
def test_ignore_index_and_legal_ids_pass_the_label_check(name):
    zs, zt = _logits()
    assert np.isfinite(float(_JITTED[name](zs, zt, _labels_with(1))))
    assert np.isfinite(float(_JITTED[name](zs, zt, _labels_with(-100))))
    # ignore_index is exempt whatever its value (checked outside jit)
    assert np.isfinite(float(_LOSSES[name](zs, zt, _labels_with(7), ignore_index=7)))


def test_valid_vocab_size_bounds_the_ids_and_targets_are_checked():
    zs = jnp.zeros((2, 4, 6))
    with pytest.raises(ValueError, match=r"id 4 at position \(1, 2\).*\[0, 4\)"):
        kd_loss(zs, zs, _labels_with(4), valid_vocab_size=4)
    lq = jnp.log(jnp.full((2, 4), 0.25))
    with pytest.raises(ValueError, match=r"targets: id -1 at position \(1,\)"):
        target_decomposition(lq, lq, jnp.asarray([0, -1], jnp.int32))
