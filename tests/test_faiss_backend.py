"""faiss IndexFlatIP backend: same neighbours and similarities as a numpy brute force."""
import sys

import numpy as np
import pytest

from retrieval_jax.graph import faiss_backend
from retrieval_jax.graph.faiss_backend import faiss_available, faiss_knn

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")


def brute_force(q, db, k, exclude_self=False):
    """Reference: full similarity matrix, self masked, a stable sort of every row."""
    s = q.astype(np.float64) @ db.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def assert_matches(q, db, k, sims, idx, exclude_self=False):
    """Same similarities (to 1e-5) and the same neighbour sets up to ties at the k-th value."""
    ref_s, ref_i = brute_force(q, db, k, exclude_self)
    sims, idx = np.asarray(sims), np.asarray(idx)
    assert sims.shape == idx.shape == (q.shape[0], k)
    assert sims.dtype == np.float32 and idx.dtype == np.int32
    np.testing.assert_allclose(sims, ref_s, atol=1e-5, rtol=0)
    assert (np.diff(sims, axis=1) <= 1e-6).all(), "rows not sorted in decreasing order"
    # every reported similarity is the true product with the reported item
    true = np.einsum("qd,qkd->qk", q.astype(np.float64), db[idx].astype(np.float64))
    np.testing.assert_allclose(sims, true, atol=1e-5, rtol=0)
    for r in range(q.shape[0]):
        assert len(set(idx[r])) == k, f"row {r} repeats a neighbour"
        if exclude_self:
            assert r not in idx[r], f"row {r} returned itself"
        # neighbours strictly above the k-th similarity are the reference's
        kth = ref_s[r, -1]
        sure = set(ref_i[r][ref_s[r] > kth + 1e-5])
        assert sure <= set(idx[r]), f"row {r}: missing {sure - set(idx[r])}"


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@needs_faiss
@pytest.mark.parametrize("k", [1, 7, 40])
def test_queries_against_database(k):
    db = unit_rows(500, 24, 0)
    q = unit_rows(37, 24, 1)
    sims, idx = faiss_knn(q, db, k)
    assert_matches(q, db, k, sims, idx)
    # random data: no ties, the very same sets
    _, ref_i = brute_force(q, db, k)
    assert all(set(a) == set(b) for a, b in zip(idx, ref_i))


@needs_faiss
def test_exclude_self_and_chunks():
    x = unit_rows(300, 16, 2)
    sims, idx = faiss_knn(x, x, 10, exclude_self=True, chunk_size=64)
    assert_matches(x, x, 10, sims, idx, exclude_self=True)
    one_s, one_i = faiss_knn(x, x, 10, exclude_self=True)
    np.testing.assert_array_equal(idx, one_i)
    np.testing.assert_allclose(sims, one_s, atol=1e-6)


@needs_faiss
def test_exclude_self_when_self_is_not_returned():
    # five identical rows: with k = 2 faiss's 3 results may all be copies other than the query
    rng = np.random.default_rng(3)
    x = unit_rows(60, 8, 4)
    x[:5] = x[0]
    sims, idx = faiss_knn(x, x, 2, exclude_self=True, chunk_size=7)
    assert_matches(x, x, 2, sims, idx, exclude_self=True)
    for r in range(5):
        assert set(idx[r]) <= set(range(5)) - {r}
    # unnormalised rows: a longer vector outscores the query's own product
    y = x * rng.uniform(0.2, 3.0, size=(60, 1)).astype(np.float32)
    sims, idx = faiss_knn(y, y, 6, exclude_self=True)
    assert_matches(y, y, 6, sims, idx, exclude_self=True)


@needs_faiss
def test_matches_jax_knn():
    from retrieval_jax.graph import knn
    x = unit_rows(400, 32, 5)
    fs, fi = faiss_knn(x, x, 12, exclude_self=True)
    js, ji = knn(x, x, 12, exclude_self=True)
    np.testing.assert_allclose(fs, np.asarray(js), atol=1e-5)
    assert all(set(a) == set(b) for a, b in zip(fi, np.asarray(ji)))


@needs_faiss
def test_num_threads_is_restored():
    import faiss
    before = faiss.omp_get_max_threads()
    x = unit_rows(50, 8, 6)
    faiss_knn(x, x, 3, num_threads=1)
    assert faiss.omp_get_max_threads() == before


@needs_faiss
@pytest.mark.parametrize("args, kwargs, err, match", [
    ((np.ones(8, np.float32), np.ones((4, 8), np.float32), 2), {}, ValueError, "2-D"),
    ((np.ones((3, 8), np.float32), np.ones((4, 7), np.float32), 2), {}, ValueError, "dimension mismatch"),
    ((np.ones((3, 8), np.float32), np.ones((4, 8), np.float32), 5), {}, ValueError, "exceeds"),
    ((np.ones((4, 8), np.float32), np.ones((4, 8), np.float32), 4), {"exclude_self": True}, ValueError,
     "exceeds"),
    ((np.ones((3, 8), np.float32), np.ones((4, 8), np.float32), 2), {"exclude_self": True}, ValueError,
     "queries are the database"),
    ((np.full((3, 8), np.nan, np.float32), np.ones((4, 8), np.float32), 2), {}, ValueError, "NaN"),
    ((np.zeros((3, 8), np.float32), np.ones((4, 8), np.float32), 2), {}, ValueError, "zero-norm"),
    ((np.ones((3, 8), np.float32), np.ones((4, 8), np.float32), 2.0), {}, TypeError, "int"),
    ((np.ones((3, 8), np.float32), np.ones((4, 8), np.float32), 0), {}, ValueError, "positive"),
    ((np.ones((3, 8), np.float32), np.ones((4, 8), np.float32), 2), {"chunk_size": 0}, ValueError,
     "chunk_size"),
])
def test_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        faiss_knn(*args, **kwargs)


def test_missing_faiss_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    assert not faiss_backend.faiss_available()
    x = unit_rows(20, 4, 7)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        faiss_knn(x, x, 3)
