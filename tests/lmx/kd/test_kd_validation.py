"""Bad input raises a clear error before any compute."""
import jax.numpy as jnp
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
