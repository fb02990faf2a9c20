"""Per-component spectra: each component's eigenpairs against numpy's eigh of its block,
per-component FSR against the exact diffusion solve, the dense / sparse / jit / grad laws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from retrieval_jax.graph import Graph, blocks_from_labels, component_blocks, connected_components, normalize
from retrieval_jax.spectral import (ComponentSpectralEmbedding, component_eigenpairs, fast_spectral_ranking,
                                    fast_spectral_ranking_sparse, filter_embedding, graph_eigenpairs,
                                    regularized_laplacian_filter, spectral_embedding)

ALPHA = 0.99


def _components_graph(sizes, seed=0, density=0.3):
    """A normalised graph made of random connected blocks of the given sizes, nodes shuffled."""
    rng = np.random.default_rng(seed)
    blocks = []
    for s in sizes:
        a = sp.random(s, s, density=density, random_state=np.random.RandomState(rng.integers(1 << 30))).toarray()
        a = a + a.T + np.diag(np.ones(s - 1), 1) + np.diag(np.ones(s - 1), -1)   # a path keeps it connected
        np.fill_diagonal(a, 0)
        blocks.append(a)
    dense = sp.block_diag(blocks).toarray()
    perm = rng.permutation(dense.shape[0])
    dense = dense[np.ix_(perm, perm)]
    return normalize(Graph.from_dense(dense)), dense


def _normalised_dense(graph):
    return np.asarray(graph.to_dense(), np.float64)


@pytest.fixture(scope="module")
def graph():
    return _components_graph([60, 45, 30, 12, 5, 3, 1])


def _assert_component_pairs(pairs, w, r):
    labels = connected_components(Graph.from_dense(w))
    u_all = {}
    for b, (vec, val) in enumerate(zip(pairs.vectors, pairs.values)):
        vec, val = np.asarray(vec, np.float64), np.asarray(val, np.float64)
        nodes = np.full(vec.shape[:2], -1)
        mask = np.asarray(pairs.layout.bucket) == b
        nodes[np.asarray(pairs.layout.member)[mask], np.asarray(pairs.layout.position)[mask]] = np.flatnonzero(mask)
        for c in range(vec.shape[0]):
            ids = nodes[c][nodes[c] >= 0]
            ref_vals, ref_vecs = np.linalg.eigh(w[np.ix_(ids, ids)])
            r_c = min(r, ids.size)
            np.testing.assert_allclose(val[c, :r_c], ref_vals[::-1][:r_c], atol=2e-5)
            u = vec[c, :ids.size, :r_c]
            np.testing.assert_allclose(u.T @ u, np.eye(r_c), atol=2e-4)
            np.testing.assert_allclose(u @ np.diag(val[c, :r_c]) @ u.T,
                                       ref_vecs[:, ::-1][:, :r_c] @ np.diag(ref_vals[::-1][:r_c])
                                       @ ref_vecs[:, ::-1][:, :r_c].T, atol=2e-4)
            assert np.all(vec[c, ids.size:] == 0) and np.all(vec[c, :, r_c:] == 0)
            u_all[int(labels[ids[0]])] = ids
    assert len(u_all) == labels.max() + 1          # every component once


# 40: the bucket of the 60- and 45-node components (45 padded to 60) goes through Lanczos, the
# others through the dense eigh, in one call (each Lanczos size is one compilation)
@pytest.mark.parametrize("dense_size", [2048, 40])
@pytest.mark.slow  # 30-60 s: make test-slow (make test stays under 10 minutes)
def test_each_component_matches_eigh_of_its_block(graph, dense_size):
    w = _normalised_dense(graph[0])
    r = 6
    pairs = component_eigenpairs(graph[0], r, dense_size=dense_size)
    _assert_component_pairs(pairs, w, r)


def test_global_top_r_are_all_one_but_per_component_is_exact(graph):
    """7 components and r = 7: the global top 7 eigenvalues are the 7 ones (FSR then sees only
    the components' constant vectors); per component at r >= the largest component, FSR rank-r is
    the exact (1 - alpha)(I - alpha W)^-1 y."""
    g, _ = graph
    w = _normalised_dense(g)
    n = w.shape[0]
    glob = graph_eigenpairs(g, 7)
    np.testing.assert_allclose(np.asarray(glob.values)[:6], 1.0, atol=1e-4)
    h = regularized_laplacian_filter(ALPHA)
    emb = spectral_embedding(g, 60, h, per_component=True)
    assert isinstance(emb, ComponentSpectralEmbedding)
    y = np.random.default_rng(3).random((4, n)).astype(np.float32)
    exact = (1 - ALPHA) * np.linalg.solve(np.eye(n) - ALPHA * w, y.T).T
    np.testing.assert_allclose(np.asarray(fast_spectral_ranking(emb, y)), exact, rtol=2e-3, atol=2e-4)
    approx = spectral_embedding(g, 60, h, mode="approx", per_component=True)
    np.testing.assert_allclose(np.asarray(fast_spectral_ranking(approx, y)), exact, rtol=2e-3, atol=2e-4)


def test_sparse_queries_equal_dense_and_low_rank_matches_reference(graph):
    g, _ = graph
    w = _normalised_dense(g)
    n = w.shape[0]
    h = regularized_laplacian_filter(ALPHA)
    r = 5
    emb = spectral_embedding(g, r, h, mode="approx", per_component=True)
    rng = np.random.default_rng(4)
    idx = rng.integers(0, n, (3, 4)).astype(np.int32)
    sims = rng.uniform(0.2, 1.0, (3, 4)).astype(np.float32)
    y = np.zeros((3, n), np.float32)
    np.add.at(y, (np.repeat(np.arange(3), 4), idx.ravel()), sims.ravel() ** 3)
    dense = np.asarray(fast_spectral_ranking(emb, y))
    sparse = np.asarray(fast_spectral_ranking_sparse(emb, sims, idx, gamma=3.0))
    np.testing.assert_allclose(sparse, dense, rtol=1e-4, atol=1e-6)
    # reference: per component, its own top-r eigenpairs by numpy, the approx formula
    labels = connected_components(g)
    ref = (1 - ALPHA) * y.astype(np.float64)
    for c in range(labels.max() + 1):
        ids = np.flatnonzero(labels == c)
        vals, vecs = np.linalg.eigh(w[np.ix_(ids, ids)])
        vals, vecs = vals[::-1][:r], vecs[:, ::-1][:, :r]
        f = (1 - ALPHA) / (1 - ALPHA * vals) - (1 - ALPHA)
        ref[:, ids] += (y[:, ids] @ vecs * f) @ vecs.T
    np.testing.assert_allclose(dense, ref, rtol=2e-3, atol=1e-5)


def test_one_component_equals_global_embedding():
    g, _ = _components_graph([80], seed=2)
    h = regularized_laplacian_filter(ALPHA)
    y = np.random.default_rng(5).random((2, 80)).astype(np.float32)
    glob = spectral_embedding(g, 10, h, mode="approx", num_iter=60)
    comp = spectral_embedding(g, 10, h, mode="approx", per_component=True)
    np.testing.assert_allclose(np.asarray(fast_spectral_ranking(comp, y)), np.asarray(fast_spectral_ranking(glob, y)),
                               rtol=1e-3, atol=1e-5)


def test_jit_vmap_and_grad_over_alpha(graph):
    g, _ = graph
    n = g.num_nodes
    emb = spectral_embedding(g, 8, regularized_laplacian_filter(ALPHA), per_component=True)
    y = jnp.asarray(np.random.default_rng(6).random((2, n)), jnp.float32)

    def score(alpha):
        e = filter_embedding(emb, regularized_laplacian_filter(alpha), mode="approx")
        return jnp.sum(fast_spectral_ranking(e, y) ** 2)
    alphas = jnp.asarray([0.5, 0.9, 0.99])
    batched = jax.jit(jax.vmap(score))(alphas)
    np.testing.assert_allclose(np.asarray(batched), [float(score(a)) for a in alphas], rtol=1e-5)
    a0, eps = 0.9, 1e-3
    fd = (float(score(a0 + eps)) - float(score(a0 - eps))) / (2 * eps)
    np.testing.assert_allclose(float(jax.grad(score)(a0)), fd, rtol=2e-2)


def test_blocks_layout_round_trip():
    labels = np.array([3, 3, 0, 1, 1, 1, 7, 3])
    blocks = blocks_from_labels(labels)
    assert [g.shape for g in blocks.groups] == [(2, 3), (2, 1)]   # {3: 3 nodes, 1: 3}, then {0, 7}
    flat = np.concatenate([g.ravel() for g in blocks.groups])
    np.testing.assert_array_equal(flat[blocks.slot], np.arange(8))
    assert blocks.num_components == 4 and blocks.largest == 3
    g, _ = _components_graph([4, 2], seed=1)
    assert component_blocks(g).num_components == 2


def test_device_layout_moves_between_node_and_block_order():
    """to_blocks puts y[i] at (bucket, member, position) of node i with zeros on padding;
    to_nodes inverts it; locate finds a sparse y's entries in each bucket, under jit."""
    labels = np.array([3, 3, 0, 1, 1, 1, 7, 3, 5])
    blocks = blocks_from_labels(labels)
    layout = blocks.layout()
    assert layout.shapes == tuple(g.shape for g in blocks.groups) and layout.num_nodes == 9
    y = np.random.default_rng(0).normal(size=(2, 9)).astype(np.float32)
    parts = jax.jit(lambda lay, y: lay.to_blocks(y))(layout, jnp.asarray(y))
    for b, (nodes, part) in enumerate(zip(blocks.groups, parts)):
        want = np.where(nodes >= 0, y[:, np.maximum(nodes, 0)], 0.0)     # [2, C_b, P_b]
        np.testing.assert_array_equal(np.asarray(part), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda lay, p: lay.to_nodes(p))(layout, parts)), y)
    ids = jnp.asarray([[2, 4, 8]])
    w = jnp.asarray([[1.0, 2.0, 3.0]])
    for b, nodes in enumerate(blocks.groups):
        m, p, wb = jax.jit(lambda lay, i, w, b=b: lay.locate(i, w, b))(layout, ids, w)
        for j, node in enumerate(np.asarray(ids[0])):
            if blocks.bucket[node] == b:
                assert nodes[int(m[0, j]), int(p[0, j])] == node and float(wb[0, j]) == float(w[0, j])
            else:
                assert float(wb[0, j]) == 0.0


def test_bad_inputs(graph):
    g, _ = graph
    h = regularized_laplacian_filter(ALPHA)
    with pytest.raises(ValueError, match="sparsify"):
        spectral_embedding(g, 4, h, per_component=True, sparsify=2)
    with pytest.raises(ValueError, match="r"):
        component_eigenpairs(g, 0)
    with pytest.raises(TypeError, match="Graph"):
        component_eigenpairs(np.eye(3), 2)
    with pytest.raises(ValueError, match="symmetric"):
        component_eigenpairs(Graph.from_dense(np.triu(np.ones((4, 4)), 1)), 2)
    with pytest.raises(ValueError, match="labels"):
        blocks_from_labels(np.array([-1, 0]))
    pairs = component_eigenpairs(g, 4)
    with pytest.raises(ValueError, match="rank"):
        spectral_embedding(pairs, 3, h)
