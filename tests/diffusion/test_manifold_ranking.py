"""Diffusion by CG against dense numpy solves."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from retrieval_jax.diffusion import (conjugate_gradient, diffuse, indicator_vectors, katz_centrality,
                                     query_vectors, ranking_from_scores, top_n, truncated_diffuse)
from retrieval_jax.graph import knn, knn_graph, normalize
from conftest import unit_clusters


def _clusters(seed, n=200, d=12, c=5):
    return unit_clusters(seed, n, d, c, noise=0.4)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_cg_matches_dense_solve_batched():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(40, 40))
    a = (m @ m.T + 40 * np.eye(40)).astype(np.float32)
    b = rng.normal(size=(40, 6)).astype(np.float32)
    b[:, 3] = 0.0  # a zero right-hand side converges at once
    res = jax.jit(lambda b: conjugate_gradient(lambda x: jnp.asarray(a) @ x, b, tol=1e-7, max_iter=200))(b)
    ref = np.linalg.solve(a.astype(np.float64), b.astype(np.float64))
    assert _rel(np.asarray(res.x), ref) < 1e-4
    assert int(res.iterations[3]) == 0 and float(res.residual[3]) == 0.0
    assert (np.asarray(res.residual) < 1e-6).all()
    one = conjugate_gradient(lambda x: jnp.asarray(a) @ x, jnp.asarray(b[:, 0]), tol=1e-7, max_iter=200)
    assert _rel(np.asarray(one.x), ref[:, 0]) < 1e-4


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.5, 0.99), k=st.integers(3, 10))
def test_diffuse_equals_dense_solve(seed, alpha, k):
    x, _ = _clusters(seed, n=80)
    w = normalize(knn_graph(x, k, gamma=3.0))
    y = np.asarray(indicator_vectors(np.arange(0, 80, 9), 80))
    scores = np.asarray(diffuse(w, y, alpha=alpha, tol=1e-7, max_iter=500))
    ref = np.linalg.solve(np.eye(80) - alpha * w.to_dense().astype(np.float64), y.T.astype(np.float64)).T
    assert _rel(scores, ref) < 1e-4


def test_query_vectors_and_out_of_graph_diffusion():
    x, _ = _clusters(1)
    q = x[:5] + 0.05
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    s, i = knn(q, x, 10)
    y = np.asarray(query_vectors(s, i, x.shape[0], gamma=3.0))
    ref = np.zeros((5, 200), np.float32)
    for r in range(5):
        ref[r, np.asarray(i)[r]] = np.maximum(np.asarray(s)[r], 0) ** 3
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    w = normalize(knn_graph(x, 10))
    scores, info = diffuse(w, y, alpha=0.9, tol=1e-7, max_iter=300, return_info=True)
    dense = np.linalg.solve(np.eye(200) - 0.9 * w.to_dense().astype(np.float64), ref.T.astype(np.float64)).T
    assert _rel(np.asarray(scores), dense) < 1e-4
    assert (np.asarray(info.residual) <= 1e-6).all() and (np.asarray(info.iterations) > 0).all()


def test_truncated_equals_restricted_solve():
    x, _ = _clusters(2)
    w = normalize(knn_graph(x, 8))
    wd = w.to_dense().astype(np.float64)
    s, short = knn(x[:4], x, 60)
    y = np.asarray(indicator_vectors(np.arange(4), 200))
    out = np.asarray(truncated_diffuse(w, y, short, alpha=0.95, tol=1e-7, max_iter=300, batch_size=2))
    for r in range(4):
        sl = np.asarray(short)[r]
        sub = wd[np.ix_(sl, sl)]
        ref = np.linalg.solve(np.eye(60) - 0.95 * sub, y[r, sl])
        assert _rel(out[r], ref) < 1e-4


def test_truncated_with_full_shortlist_equals_full():
    x, _ = _clusters(3, n=60)
    w = normalize(knn_graph(x, 6))
    y = np.asarray(indicator_vectors(np.array([0, 7]), 60))
    short = np.argsort(-(x[[0, 7]] @ x.T), axis=1)
    t = np.asarray(truncated_diffuse(w, y, short, alpha=0.9, tol=1e-7, max_iter=300))
    full = np.asarray(diffuse(w, y, alpha=0.9, tol=1e-7, max_iter=300))
    np.testing.assert_allclose(t, np.take_along_axis(full, short, 1), rtol=1e-4, atol=1e-6)


def test_katz_centrality_dense():
    x, _ = _clusters(4, n=70)
    w = normalize(knn_graph(x, 5))
    g = np.asarray(katz_centrality(w, 0.8, tol=1e-7))
    ref = np.linalg.solve((np.eye(70) - 0.8 * w.to_dense()) / 0.2, np.ones(70))
    assert _rel(g, ref) < 1e-4
    # at alpha = 0.999 three steps are not enough, and the info says so
    g3, info = katz_centrality(w, 0.999, max_iter=3, return_info=True)
    assert g3.shape == (70,) and int(info.iterations[0]) == 3 and float(info.residual[0]) > 1e-6


def test_rankings():
    s = np.array([[0.1, 0.5, 0.3], [3.0, 2.0, 1.0]], np.float32)
    np.testing.assert_array_equal(ranking_from_scores(s), [[1, 2, 0], [0, 1, 2]])
    np.testing.assert_array_equal(ranking_from_scores(s, exclude=[1, 0]), [[2, 0, 1], [1, 2, 0]])
    v, i = top_n(jnp.asarray(s), n=2)
    np.testing.assert_array_equal(np.asarray(i), [[1, 2], [0, 1]])
    with pytest.raises(ValueError, match="NaN"):
        ranking_from_scores(np.array([[np.nan, 1.0]]))


def test_ranking_rtol_zeroes_the_noise_tail():
    s = np.array([[1e-9, -2e-9, 0.5, 1.0, 0.2]])
    # without rtol the noise's sign orders the tail (items 0 and 1 swap when it flips)
    np.testing.assert_array_equal(ranking_from_scores(s), [[3, 2, 4, 0, 1]])
    np.testing.assert_array_equal(ranking_from_scores(-s), [[1, 0, 4, 2, 3]])
    # with rtol the tail is ranked by index; scores above the floor keep their order
    np.testing.assert_array_equal(ranking_from_scores(-s, rtol=1e-6), [[0, 1, 4, 2, 3]])
    np.testing.assert_array_equal(ranking_from_scores(s, rtol=0.3), [[3, 2, 0, 1, 4]])
    np.testing.assert_array_equal(ranking_from_scores(np.zeros((1, 3)), rtol=1e-6), [[0, 1, 2]])
    for bad in (-1e-3, 1.0, np.nan):
        with pytest.raises(ValueError, match="rtol"):
            ranking_from_scores(s, rtol=bad)


def test_ranking_rtol_makes_a_float32_spectral_route_rank_as_the_float64_solve():
    # clusters apart: a mutual kNN graph with several components, where the exact scores
    # outside the query's component are 0; the full-rank spectral route in float32,
    # U h(L) U^T y with dense U, leaves noise there (CG keeps those zeros exact)
    x, _ = _clusters(3, n=160, c=8)
    g = normalize(knn_graph(x, 4))
    n, alpha = g.num_nodes, 0.9
    ids = np.arange(0, n, 7)
    lam, u = jnp.linalg.eigh(jnp.asarray(g.to_dense(), jnp.float32))
    spectral = np.asarray((u / (1 - alpha * lam)) @ u[ids].T).T
    exact = np.linalg.solve(np.eye(n) - alpha * np.asarray(g.to_dense(), np.float64), np.eye(n)[:, ids]).T
    exact[np.abs(exact) < 1e-12] = 0.0  # float64 elimination: the other components' scores are 0
    assert (exact == 0).mean() > 0.5 and (spectral[exact == 0] != 0).mean() > 0.5
    ref = ranking_from_scores(exact)
    assert (ranking_from_scores(spectral) != ref).any()  # the noise reorders the tail
    np.testing.assert_array_equal(ranking_from_scores(spectral, rtol=1e-5), ref)

def test_bad_input():
    x, _ = _clusters(5, n=40)
    w = normalize(knn_graph(x, 5))
    y = np.asarray(indicator_vectors(np.array([0]), 40))
    for alpha in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            diffuse(w, y, alpha=alpha)
    with pytest.raises(ValueError, match="n_queries, n"):
        diffuse(w, y[:, :30])
    bad = y.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        diffuse(w, bad)
    with pytest.raises(ValueError, match="gamma"):
        query_vectors(np.ones((1, 2)), np.zeros((1, 2), int), 40, gamma=-1)
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        query_vectors(np.ones((1, 2)), np.array([[0, 40]]), 40)
    with pytest.raises(ValueError, match="repeats"):
        truncated_diffuse(w, y, np.array([[0, 1, 1]]))


def test_diffusion_inverse_dense():
    from retrieval_jax.diffusion import diffusion_inverse
    from retrieval_jax.graph import connected_components
    x, _ = _clusters(6, n=90)
    w = normalize(knn_graph(x, 6))
    inv = diffusion_inverse(w, 0.99)
    ref = np.linalg.inv(np.eye(90) - 0.99 * w.to_dense().astype(np.float64))
    assert _rel(np.asarray(inv.todense()), ref) < 1e-4
    largest = np.bincount(connected_components(w)).max()
    with pytest.raises(ValueError, match="GiB"):
        diffusion_inverse(w, 0.9, max_nodes=int(largest) - 1)
    a = knn_graph(x, 6)  # the affinity, not W: I - alpha A is indefinite, a clear error, no NaN
    with pytest.raises(ValueError, match="normalize"):
        diffusion_inverse(a.__class__(a.indices, 3.0 * a.weights + 1.0 * (a.weights > 0)), 0.99)
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda g: diffusion_inverse(g, 0.9).blocks[0])(w)
    with pytest.raises(ValueError, match="alpha"):
        diffusion_inverse(w, 1.0)


def test_diffusion_inverse_blocks_by_component():
    """Components of very different sizes (and isolated nodes) share buckets; every row,
    and every sparse y, matches the dense inverse."""
    from retrieval_jax.diffusion import diffusion_inverse
    from retrieval_jax.graph import Graph, connected_components
    rng = np.random.default_rng(3)
    sizes = [40, 33, 21, 20, 9, 5, 2, 1, 1]
    n = sum(sizes)
    perm = rng.permutation(n)  # components interleaved in node order
    a = np.zeros((n, n))
    start = 0
    for s in sizes:
        nodes = perm[start:start + s]
        start += s
        for i in range(1, s):  # a random tree plus a few chords: connected
            j = rng.integers(0, i)
            a[nodes[i], nodes[j]] = a[nodes[j], nodes[i]] = rng.uniform(0.2, 1.0)
        for _ in range(s // 3):
            i, j = rng.integers(0, s, 2)
            if i != j:
                a[nodes[i], nodes[j]] = a[nodes[j], nodes[i]] = rng.uniform(0.2, 1.0)
    w = normalize(Graph.from_dense(a))
    assert connected_components(w).max() + 1 == len(sizes)
    inv = diffusion_inverse(w, 0.95)
    assert len(inv.blocks) > 1 and inv.nbytes < 4 * n * n
    ref = np.linalg.inv(np.eye(n) - 0.95 * w.to_dense().astype(np.float64))
    assert _rel(np.asarray(inv.todense()), ref) < 1e-4
    idx = rng.integers(0, n, size=(7, 4))
    wts = rng.uniform(0, 1, size=(7, 4)).astype(np.float32)
    y = np.zeros((7, n))
    np.add.at(y, (np.arange(7)[:, None], idx), wts)
    got = jax.jit(lambda i, ws: i.weighted_rows(ws, idx))(inv, wts)  # a pytree through jit
    assert _rel(np.asarray(got), y @ ref) < 1e-4


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.3, 0.99), k=st.integers(1, 6),
       n=st.integers(2, 70))
@pytest.mark.slow  # 30-60 s: make test-slow (make test stays under 10 minutes)
def test_inverse_per_component_is_the_inverse(seed, alpha, k, n):
    """(I - alpha W) inv = I on any mutual kNN graph, however it splits into components."""
    from retrieval_jax.diffusion import diffusion_inverse
    x, _ = _clusters(seed, n=n, c=7)
    w = normalize(knn_graph(x, min(k, n - 1), gamma=3.0, mutual=True))
    inv = np.asarray(diffusion_inverse(w, alpha).todense(), np.float64)
    m = np.eye(n) - alpha * w.to_dense().astype(np.float64)
    assert np.abs(m @ inv - np.eye(n)).max() < 1e-4 * (1 + alpha) / (1 - alpha)


def test_sparse_observation_node_first_is_the_transposed_dense_y():
    from retrieval_jax.diffusion import SparseObservation
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 30, (5, 4)).astype(np.int32)).at[0, 1].set(7).at[0, 2].set(7)  # a repeat
    y = SparseObservation(jnp.asarray(rng.random((5, 4), dtype=np.float32)), ids, 30)
    dense = np.zeros((5, 30), np.float32)
    np.add.at(dense, (np.repeat(np.arange(5), 4), np.asarray(ids).ravel()), np.asarray(y.weights).ravel())
    np.testing.assert_allclose(np.asarray(y.node_first()), dense.T, rtol=1e-6)
    perm = rng.permutation(30)                       # node perm[p] sits at row p
    pos = np.argsort(perm)
    b = y.node_first(lambda i: jnp.asarray(pos)[i])
    np.testing.assert_allclose(np.asarray(b), dense.T[perm], rtol=1e-6)
