import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from lmx.icl.retrieval import l2_normalize, pool_mesh, topk_cosine


def _ref(q, p, k):
    s = l2_normalize(q) @ l2_normalize(p).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("n_pool,k,chunk", [(1003, 7, 50), (64, 64, 8), (5, 3, 16)])
def test_matches_numpy_argsort_on_random_vectors(n_pool, k, chunk):
    rng = np.random.default_rng(n_pool)
    pool = rng.normal(size=(n_pool, 24)).astype(np.float32)
    q = rng.normal(size=(13, 24)).astype(np.float32)
    s, i = topk_cosine(q, pool, k, chunk_size=chunk, query_block=5)
    rs, ri = _ref(q, pool, k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, atol=1e-5)
    assert s.dtype == np.float32 and i.dtype == np.int32


def test_finds_planted_neighbours_and_is_sharded():
    assert len(jax.devices()) == 8  # tests/conftest.py forces 8 host devices
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(4000, 32)).astype(np.float32)
    planted = rng.choice(4000, 20, replace=False)
    q = pool[planted] + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
    s, i = topk_cosine(q, pool, 3, chunk_size=128)
    np.testing.assert_array_equal(i[:, 0], planted)
    assert np.all(s[:, 0] > 0.99) and np.all(s[:, 0] >= s[:, 1])
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    s1, i1 = topk_cosine(q, pool, 3, chunk_size=128, mesh=one)
    np.testing.assert_array_equal(i1, i)
    np.testing.assert_allclose(s1, s, atol=1e-6)
    assert pool_mesh().shape["data"] == 8


def test_ties_go_to_lower_index_across_chunks_and_devices():
    pool = np.ones((50, 4), np.float32)
    _, i = topk_cosine(np.ones((2, 4)), pool, 10, chunk_size=3)
    np.testing.assert_array_equal(i, np.tile(np.arange(10), (2, 1)))


def test_single_query_vector():
    pool = np.eye(6, dtype=np.float32)
    s, i = topk_cosine(np.array([0, 0, 2.0, 1, 0, 0]), pool, 2)
    assert i.tolist() == [2, 3] and s.shape == (2,)


@pytest.mark.parametrize("q,pool,k,match", [
    (np.ones((1, 4)), np.zeros((0, 4)), 1, "non-empty"),
    (np.ones((1, 4)), np.ones((3, 4)), 4, r"k must be an int in \[1, pool size=3\]"),
    (np.ones((1, 4)), np.ones((3, 4)), 0, "k must be"),
    (np.ones((1, 5)), np.ones((3, 4)), 1, "queries must be"),
])
def test_bad_input(q, pool, k, match):
    with pytest.raises(ValueError, match=match):
        topk_cosine(q, pool, k)
