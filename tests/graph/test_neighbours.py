"""Graph construction against brute-force numpy / scipy references."""
import jax
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from hypothesis import given, settings, strategies as st

from retrieval_jax.graph import Graph, affinity_matrix, isolated_nodes, knn, knn_graph, normalize
from retrieval_jax.graph import locality_order, permute_graph
from retrieval_jax.graph.core import matvec_unroll


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_matches_bruteforce():
    rng = np.random.default_rng(0)
    db, q = _unit(rng, 300, 16), _unit(rng, 37, 16)
    sims, idx = knn(q, db, 7, block_size=8, chunk_size=16)  # several chunks, padded last chunk
    ref = q @ db.T
    ref_idx = np.argsort(-ref, axis=1)[:, :7]
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_allclose(np.asarray(sims), np.take_along_axis(ref, ref_idx, 1), atol=1e-5)


def test_knn_exclude_self():
    rng = np.random.default_rng(1)
    x = _unit(rng, 50, 8)
    sims, idx = knn(x, x, 5, exclude_self=True, block_size=16)
    assert not (np.asarray(idx) == np.arange(50)[:, None]).any()
    ref = x @ x.T
    np.fill_diagonal(ref, -np.inf)
    np.testing.assert_array_equal(np.asarray(idx), np.argsort(-ref, axis=1)[:, :5])


def test_mutual_filter_hand_built():
    # 4 points on a line of similarities: 0-1 mutual, 2's best is 1, 1's best is 0, 3's best is 2
    sims = np.array([[0.9], [0.9], [0.8], [0.7]], np.float32)
    idx = np.array([[1], [0], [1], [2]])
    a = affinity_matrix(sims, idx, 4, gamma=1.0, mutual=True).toarray()
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 0.9
    np.testing.assert_allclose(a, expected, atol=1e-6)
    u = affinity_matrix(sims, idx, 4, gamma=2.0, mutual=False).toarray()
    expected_u = np.zeros((4, 4))
    for (i, j, s) in [(0, 1, .9), (2, 1, .8), (3, 2, .7)]:
        expected_u[i, j] = expected_u[j, i] = s ** 2
    np.testing.assert_allclose(u, expected_u, atol=1e-6)


def test_knn_graph_against_numpy():
    rng = np.random.default_rng(2)
    x = _unit(rng, 120, 6)
    k, gamma = 6, 3.0
    g = knn_graph(x, k, gamma=gamma, mutual=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1)[:, :k]
    isnn = np.zeros((120, 120), bool)
    isnn[np.arange(120)[:, None], nn] = True
    mutual = isnn & isnn.T
    ref = np.where(mutual, np.maximum(np.where(np.isfinite(s), s, 0), 0) ** gamma, 0)
    np.testing.assert_allclose(g.to_dense(), ref, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(8, 60), k=st.integers(1, 7), mutual=st.booleans(), seed=st.integers(0, 1000))
def test_normalized_graph_symmetric_spectrum_in_unit_interval(n, k, mutual, seed):
    x = _unit(np.random.default_rng(seed), n, 5)
    k = min(k, n - 1)
    w = normalize(knn_graph(x, k, gamma=3.0, mutual=mutual)).to_dense()
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, w.T, atol=1e-6)
    ev = np.linalg.eigvalsh(w.astype(np.float64))
    assert ev.min() >= -1 - 1e-5 and ev.max() <= 1 + 1e-5


def test_isolated_node_no_nan():
    a = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32))
    g = Graph.from_scipy(a)
    assert list(isolated_nodes(g)) == [2]
    w = normalize(g).to_dense()
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, a.toarray())


def test_scipy_round_trip_and_padding():
    rng = np.random.default_rng(3)
    dense = rng.random((30, 30)) * (rng.random((30, 30)) < 0.2)
    dense = dense + dense.T
    g = Graph.from_scipy(sp.csr_matrix(dense), max_degree=40)
    assert g.indices.shape == (30, 40) and g.indices.dtype == np.int32
    np.testing.assert_allclose(g.to_dense(), dense, atol=1e-6)
    x = rng.normal(size=(30, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(g.matvec(x)), dense @ x, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g.matvec(x[:, 0])), dense @ x[:, 0], atol=1e-4)
    with pytest.raises(ValueError, match="max_degree"):
        Graph.from_scipy(sp.csr_matrix(dense), max_degree=1)


def test_matvec_unroll_by_size_and_both_loops_match_scipy():
    # all K slots fused from 16,384 nodes on, or when the [n, B] accumulator is <= 1 MiB; 8 otherwise
    assert matvec_unroll(5000, 50, 1) == 50 and matvec_unroll(5000, 50, 70) == 8
    assert matvec_unroll(20000, 50, 200) == 50 and matvec_unroll(16383, 50, 70) == 8
    assert matvec_unroll(1_000_000, 20, 100) == 20 and matvec_unroll(1_000_000, 100, 100) == 64
    assert matvec_unroll(5000, 5, 70) == 5
    assert matvec_unroll(5000, 50, 70, itemsize=2) == 50 and matvec_unroll(5000, 50, 150, itemsize=2) == 8
    assert matvec_unroll(5000, 50, 52) == 50 and matvec_unroll(5000, 50, 53) == 8  # 1,040,000 / 1,060,000 B
    m = sp.random(4000, 4000, density=3e-3, random_state=0, format="csr")
    m = (m + m.T).tocsr()
    g = Graph.from_scipy(m)
    rng = np.random.default_rng(0)
    for b in (1, 40, 80):   # fused, fused (640 KB), 8 per pass (1.3 MB)
        x = rng.normal(size=(4000, b)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(jax.jit(g.matvec)(x)), m @ x, rtol=1e-5, atol=1e-5)
    assert matvec_unroll(4000, g.max_degree, 80) == min(8, g.max_degree)


@pytest.mark.parametrize("method", ["aggregation", "blocks"])
def test_locality_order_numbers_neighbours_close_and_keeps_components_whole(method):
    # 40 cliques of 25 nodes, each a chain link to the next within 4 groups (4 components),
    # the node ids shuffled: a good order brings every clique's nodes together again
    rng = np.random.default_rng(0)
    sizes, n = 25, 1000
    rows, cols = [], []
    for c in range(40):
        members = np.arange(c * sizes, (c + 1) * sizes)
        r, q = np.meshgrid(members, members)
        rows += [r.ravel()]
        cols += [q.ravel()]
        if c % 10:   # link to the previous clique of the same group
            rows += [np.array([c * sizes, c * sizes - 1])]
            cols += [np.array([c * sizes - 1, c * sizes])]
    a = sp.csr_matrix((np.ones(np.concatenate(rows).size), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n, n))
    a.setdiag(0)
    a.eliminate_zeros()
    perm = rng.permutation(n)
    shuffled = a[perm][:, perm]
    g = Graph.from_scipy(shuffled)
    order = locality_order(g, method=method, block_size=64, coarsest=2)
    assert np.array_equal(np.sort(order), np.arange(n))
    gp = permute_graph(g, order)
    np.testing.assert_allclose(gp.to_dense(), shuffled.toarray()[np.ix_(order, order)])
    idx, w = np.asarray(gp.indices), np.asarray(gp.weights)
    spread = np.abs(idx - np.arange(n)[:, None])[w != 0]
    shuffled_spread = np.abs(np.asarray(g.indices) - np.arange(n)[:, None])[np.asarray(g.weights) != 0]
    # nested aggregates keep a clique in one run; blocks of 64 cut some of them
    assert np.mean(spread < sizes) > (0.9 if method == "aggregation" else 0.75)
    assert np.mean(shuffled_spread < sizes) < 0.1
    if method == "aggregation":   # every connected component is one run of the order
        _, comp = connected_components(shuffled, directed=False)
        runs = comp[order]
        assert int(np.sum(runs[1:] != runs[:-1])) == 3
    with pytest.raises(ValueError, match="method"):
        locality_order(g, method="rcm")
    with pytest.raises(ValueError, match="coarsest"):
        locality_order(g, coarsest=0)


@pytest.mark.slow  # pynndescent's first call compiles its numba code: a minute or more in a fresh venv
def test_nndescent_graph_close_to_exact():
    pytest.importorskip("pynndescent")
    rng = np.random.default_rng(4)
    x = _unit(rng, 400, 8)
    exact = knn_graph(x, 10, mutual=False).to_dense() > 0
    approx = knn_graph(x, 10, mutual=False, method="nndescent").to_dense() > 0
    recall = (exact & approx).sum() / exact.sum()
    assert recall > 0.9


@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 1.0]]), "NaN or inf"),
    (np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "zero-norm"),
    (np.ones(5), "2-D"),
])
def test_bad_descriptors(bad, match):
    with pytest.raises(ValueError, match=match):
        knn_graph(bad, 1)


def test_bad_k_and_gamma_and_dims():
    x = _unit(np.random.default_rng(5), 10, 4)
    with pytest.raises(ValueError, match="k = 10 exceeds"):
        knn_graph(x, 10)
    with pytest.raises(ValueError, match="positive"):
        knn_graph(x, 0)
    with pytest.raises(ValueError, match="gamma"):
        knn_graph(x, 3, gamma=0.0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn(x[:, :3], x, 2)
    with pytest.raises(ValueError, match="method"):
        knn_graph(x, 3, method="bogus")


def test_save_load_graph_round_trip_and_errors(tmp_path):
    from retrieval_jax.graph import load_graph, save_graph
    x = _unit(np.random.default_rng(6), 40, 5)
    g = knn_graph(x, 4)
    path = save_graph(tmp_path / "g.npz", g, k=4, gamma=3.0)
    back, meta = load_graph(path, num_nodes=40)
    np.testing.assert_array_equal(np.asarray(back.indices), np.asarray(g.indices))
    np.testing.assert_array_equal(np.asarray(back.weights), np.asarray(g.weights))
    assert int(meta["k"]) == 4 and float(meta["gamma"]) == 3.0
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="41 were expected"):
        load_graph(path, num_nodes=41)
    np.savez(tmp_path / "bad.npz", indices=np.full((3, 2), 7), weights=np.ones((3, 2)))
    with pytest.raises(ValueError, match="outside"):
        load_graph(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="readable"):
        load_graph(tmp_path / "junk.npz")


def test_load_graph_memory_mapped(tmp_path):
    """mmap=True: the arrays are read-only views of the file, equal to what was saved, the same
    product; bad contents are refused as when reading."""
    from retrieval_jax.graph import load_graph, save_graph
    x = _unit(np.random.default_rng(7), 60, 5)
    g = normalize(knn_graph(x, 5, gamma=3.0, mutual=True))
    path = save_graph(tmp_path / "g.npz", g, k=5)
    back, meta = load_graph(path, num_nodes=60, mmap=True)
    assert isinstance(back.indices, np.memmap) and isinstance(back.weights, np.memmap)
    assert not back.weights.flags.writeable and int(meta["k"]) == 5
    np.testing.assert_array_equal(back.indices, np.asarray(g.indices))
    v = np.random.default_rng(1).standard_normal((60, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda gr, v: gr.matvec(v))(back, v)),
                               np.asarray(g.matvec(v)), rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "bad.npz", indices=np.full((3, 2), 7, np.int32), weights=np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="outside"):
        load_graph(tmp_path / "bad.npz", mmap=True)
    np.savez(tmp_path / "f64.npz", indices=np.zeros((3, 2), np.int64), weights=np.ones((3, 2)))
    with pytest.raises(ValueError, match="mmap needs int32"):
        load_graph(tmp_path / "f64.npz", mmap=True)
