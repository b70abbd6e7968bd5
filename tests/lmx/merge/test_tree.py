import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.merge import tree as T
from lmx.merge import methods as M


def _tree(seed, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return {"enc": {"w": jnp.asarray(r.normal(size=(4, 3)), dtype), "b": jnp.asarray(r.normal(size=3), dtype)},
            "step": jnp.asarray(7, jnp.int32)}


def test_leaf_names_dotted_and_nnx_value_dropped():
    assert [n for n, _ in T.named_leaves(_tree(0))] == ["enc.b", "enc.w", "step"]

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)

    _, state = nnx.split(Net(nnx.Rngs(0)))
    assert [n for n, _ in T.named_leaves(state)] == ["lin.bias", "lin.kernel"]


def test_task_vector_float32_and_integer_leaves_zero():
    base, ft = _tree(0, jnp.bfloat16), _tree(1, jnp.bfloat16)
    tv = T.task_vector(base, ft)
    assert tv["enc"]["w"].dtype == jnp.float32
    np.testing.assert_array_equal(
        tv["enc"]["w"], ft["enc"]["w"].astype(jnp.float32) - base["enc"]["w"].astype(jnp.float32))
    assert tv["step"].dtype == jnp.int32 and int(tv["step"]) == 0
    merged = M.task_arithmetic(base, [tv], 1.0)
    assert int(merged["step"]) == 7 and merged["enc"]["w"].dtype == jnp.bfloat16


def test_task_vectors_of_nnx_state_merge_back_into_module():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)

    gd, s0 = nnx.split(Net(nnx.Rngs(0)))
    _, s1 = nnx.split(Net(nnx.Rngs(1)))
    tv = T.task_vector(s0, s1)
    merged = M.task_arithmetic(s0, [tv], 1.0)
    model = nnx.merge(gd, merged)
    np.testing.assert_allclose(model.lin.kernel[...], s1["lin"]["kernel"][...], atol=1e-6)


def test_structure_mismatch_names_missing_tensor():
    base = _tree(0)
    other = {"enc": {"w": base["enc"]["w"]}, "step": base["step"]}
    with pytest.raises(ValueError, match="enc.b"):
        T.task_vectors(base, [other])


def test_shape_mismatch_names_tensor_and_shapes():
    base, ft = _tree(0), _tree(1)
    ft["enc"]["w"] = jnp.zeros((4, 4))
    with pytest.raises(ValueError, match=r"'enc.w'.*\(4, 4\).*\(4, 3\)"):
        T.task_vectors(base, [ft])


def test_dtype_mismatch_names_tensor():
    base, ft = _tree(0), _tree(1)
    ft["enc"]["b"] = ft["enc"]["b"].astype(jnp.float16)
    with pytest.raises(TypeError, match="'enc.b'.*float16"):
        T.task_vectors(base, [ft])


def test_task_vectors_with_different_structures_raise():
    base = _tree(0)
    tv1 = T.task_vector(base, _tree(1))
    tv2 = {"enc": tv1["enc"], "other": tv1["step"]}
    with pytest.raises(ValueError, match="task vector 1"):
        M.task_arithmetic(base, [tv1, tv2], 0.3)


def test_task_vector_dtype_checked_against_base():
    base = _tree(0)
    tv = T.task_vector(base, _tree(1))
    tv["enc"]["w"] = tv["enc"]["w"].astype(jnp.bfloat16)
    with pytest.raises(TypeError, match="'enc.w'"):
        M.task_arithmetic(base, [tv], 0.3)


def test_lambda_of_wrong_length_raises():
    base = _tree(0)
    tvs = T.task_vectors(base, [_tree(1), _tree(2)])
    with pytest.raises(ValueError, match=r"lam: expected a scalar or 2 coefficients.*\(3,\)"):
        M.task_arithmetic(base, tvs, [0.1, 0.2, 0.3])


def test_empty_model_list_raises():
    with pytest.raises(ValueError, match="at least one"):
        T.task_vectors(_tree(0), [])
