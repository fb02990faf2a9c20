"""faiss IndexFlatIP backend: same neighbours and similarities as a numpy brute force."""
import sys

import numpy as np
import pytest

import jax.numpy as jnp

from retrieval_jax.graph import affinity_graph, faiss_backend
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


# ----------------------------------------------------------------------------- the default route
def test_search_route_resolves_auto(monkeypatch):
    import jax
    import jax.numpy as jnp
    from retrieval_jax.graph.neighbours import SEARCH_METHODS, search_route
    x = unit_rows(20, 4, 8)
    for method in ("exact", "faiss", "nndescent"):
        assert search_route(method, x) == method        # asked for: run as asked
    assert search_route("auto", x) == ("faiss" if faiss_available() else "exact")
    assert jax.jit(lambda v: jnp.zeros(()) if search_route("auto", v) == "exact" else jnp.ones(()))(x) == 0
    assert "auto" in SEARCH_METHODS
    with pytest.raises(ValueError, match="method"):
        search_route("hnsw", x)
    monkeypatch.setitem(sys.modules, "faiss", None)   # not installed: the JAX search
    assert search_route("auto", x) == "exact"


@needs_faiss
def test_knn_default_is_faiss_and_equals_the_jax_search():
    from retrieval_jax.graph import knn
    x = unit_rows(300, 16, 9)
    q = unit_rows(23, 16, 10)
    for args, kw in (((q, x, 9), {}), ((x, x, 9), {"exclude_self": True})):
        ds, di = knn(*args, **kw)                                   # auto: faiss on this CPU host
        fs, fi = faiss_knn(*args, **kw)
        es, ei = knn(*args, method="exact", block_size=8, chunk_size=16, **kw)   # chunks, padded last
        np.testing.assert_array_equal(np.asarray(di), fi)
        np.testing.assert_array_equal(np.asarray(ds), fs)
        np.testing.assert_array_equal(np.asarray(di), np.asarray(ei))           # random data: no ties
        np.testing.assert_allclose(np.asarray(ds), np.asarray(es), atol=1e-5)
        assert_matches(args[0], args[1], 9, es, ei, **kw)
    with pytest.raises(ValueError, match="method"):
        knn(q, x, 3, method="nndescent")


def test_knn_faiss_is_refused_under_a_trace():
    import jax
    from retrieval_jax.graph import knn, knn_graph
    x = unit_rows(40, 4, 11)
    with pytest.raises(ValueError, match="only method='exact'"):
        jax.jit(lambda v: knn(v, v, 3, method="faiss"))(x)
    with pytest.raises(ValueError, match="only method='exact'"):
        jax.jit(lambda v: knn_graph(v, 3, method="faiss"))(x)
    s, i = jax.jit(lambda v: knn(v, v, 3, exclude_self=True))(x)          # auto: the JAX search
    ref_s, ref_i = brute_force(x, x, 3, exclude_self=True)
    np.testing.assert_array_equal(np.asarray(i), ref_i)


@pytest.mark.parametrize("mutual", [True, False])
def test_knn_graph_default_equals_the_exact_route(mutual, caplog):
    import logging

    import jax
    from retrieval_jax.graph import affinity_matrix, knn_graph
    from retrieval_jax.graph.neighbours import search_route
    x = unit_rows(400, 12, 12)
    with caplog.at_level(logging.INFO, logger="retrieval_jax.graph.neighbours"):
        default = knn_graph(x, 8, mutual=mutual)
    assert f"{search_route('auto', x)} neighbour search (method='auto')" in caplog.text
    exact = knn_graph(x, 8, mutual=mutual, method="exact")
    s, i = brute_force(x, x, 8, exclude_self=True)
    ref = affinity_matrix(s, i, 400, gamma=3.0, mutual=mutual).toarray()   # scipy, float64 products
    for g in (default, exact):
        assert g.indices.dtype == np.int32 and g.weights.dtype == np.float32
        np.testing.assert_allclose(g.to_dense(), ref, rtol=1e-5, atol=1e-7)
    # random data, no ties: the same neighbours, so the same slots
    np.testing.assert_array_equal(np.asarray(default.indices), np.asarray(exact.indices))
    # the traced route (affinity_graph on device, k or 2 k slots): the same matrix
    dev = jax.jit(lambda v: knn_graph(v, 8, mutual=mutual, max_degree=None if mutual else 40))(x)
    np.testing.assert_allclose(dev.to_dense(), ref, rtol=1e-5, atol=1e-7)


def test_affinity_lists_hand_built():
    from retrieval_jax.graph import affinity_matrix
    from retrieval_jax.graph.neighbours import affinity_lists
    # 0 <-> 1, 1 <-> 3 and 2 <-> 3 mutual; 2 -> 1 and 4 -> 2 one-way; 4 <-> 0 mutual with a
    # negative similarity (an edge of weight 0, kept in its slot as affinity_graph keeps it)
    sims = np.array([[0.9, -0.2], [0.9, 0.5], [0.8, 0.1], [0.7, 0.6], [-0.3, 0.4]], np.float32)
    idx = np.array([[1, 4], [0, 3], [1, 3], [2, 1], [0, 2]])
    ids, w = affinity_lists(sims, idx, 2.0)
    assert ids.shape == w.shape == (5, 2) and ids.dtype == np.int32 and w.dtype == np.float32
    np.testing.assert_array_equal(ids, [[1, 4], [0, 3], [3, 2], [2, 1], [0, 4]])   # neighbour order
    np.testing.assert_allclose(w, [[0.81, 0], [0.81, 0.25], [0.01, 0], [0.01, 0.25], [0, 0]], rtol=1e-6)
    # the union: max over both directions; a row's own neighbours, then who lists it one-way
    ids, w = affinity_lists(sims, idx, 2.0, mutual=False)
    np.testing.assert_array_equal(ids, [[1, 4, 0], [0, 3, 2], [1, 3, 4], [2, 1, 3], [0, 2, 4]])
    np.testing.assert_allclose(w, [[0.81, 0, 0], [0.81, 0.36, 0.64], [0.64, 0.49, 0.16],
                                   [0.49, 0.36, 0], [0, 0.16, 0]], rtol=1e-6)
    # the device construction (under a trace), cut as knn_graph cuts it: the same lists
    for mutual in (True, False):
        ids, w = affinity_lists(sims, idx, 2.0, mutual=mutual)
        g = affinity_graph(jnp.asarray(sims), jnp.asarray(idx), 2.0, mutual=mutual, capacity=None if mutual else 3)
        dev_ids, dev_w = np.asarray(g.indices), np.asarray(g.weights)
        if mutual:
            kept = dev_ids != np.arange(5)[:, None]
            order = np.argsort(~kept, axis=1, kind="stable")[:, :2]
            dev_ids, dev_w = np.take_along_axis(dev_ids, order, 1), np.take_along_axis(dev_w, order, 1)
        np.testing.assert_array_equal(ids, dev_ids)
        np.testing.assert_allclose(w, dev_w, rtol=1e-6)
    for mutual in (True, False):
        ids, w = affinity_lists(sims, idx, 2.0, mutual=mutual)
        dense = np.zeros((5, 5), np.float32)
        np.add.at(dense, (np.repeat(np.arange(5), ids.shape[1]), ids.ravel()), w.ravel())
        np.testing.assert_allclose(dense, affinity_matrix(sims, idx, 5, gamma=2.0, mutual=mutual).toarray(),
                                   atol=1e-7)
    # no mutual pair at all: one padding slot per row
    ids, w = affinity_lists(np.ones((3, 1), np.float32), np.array([[1], [2], [0]]), 3.0)
    np.testing.assert_array_equal(ids, [[0], [1], [2]])
    assert not w.any()
    with pytest.raises(ValueError, match="one shape"):
        affinity_lists(sims, idx[:, :1])
