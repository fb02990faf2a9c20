"""Fast Spectral Ranking: Lanczos eigenpairs vs scipy/numpy, FSR vs exact diffusion solves."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from conftest import require_data
from retrieval_jax.graph import Graph, knn_graph, normalize
from retrieval_jax.data import load_coil20, load_mpeg7
from retrieval_jax.spectral import (Eigenpairs, SpectralEmbedding, fast_spectral_ranking,
                                    fast_spectral_ranking_sparse, graph_eigenpairs,
                                    heat_kernel_filter, lanczos, regularized_laplacian_filter,
                                    sparsify_embedding, spectral_embedding)

ALPHA = 0.99


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def coil_graph():
    X = load_coil20(require_data("coil20"), size=32).X
    assert X.shape == (1440, 1024)
    return normalize(knn_graph(X, 5, gamma=3.0, mutual=True))


@pytest.fixture(scope="module")
def mpeg_graph():
    X = load_mpeg7(require_data("mpeg7"), size=32).X
    assert X.shape == (1400, 1024)
    return normalize(knn_graph(X, 10, gamma=3.0, mutual=True))


def _random_graph(rng, n, density=0.08, disconnect=()):
    """Normalised random symmetric graph; ``disconnect`` = list of node-id ranges to cut off."""
    a = sp.random(n, n, density=density, random_state=np.random.RandomState(rng.integers(1 << 30)))
    a = (a + a.T).tocsr()
    a.setdiag(0)
    for block in disconnect:
        mask = np.zeros(n, bool)
        mask[block] = True
        a = a.tolil()
        for i in np.flatnonzero(mask):
            row = a.rows[i]
            for j in list(row):
                if not mask[j]:
                    a[i, j] = 0
                    a[j, i] = 0
        a = a.tocsr()
    a.eliminate_zeros()
    return normalize(Graph.from_scipy(a))


def _check_pairs(pairs: Eigenpairs, W: sp.spmatrix, ref_values, *, rtol=1e-4):
    values = np.asarray(pairs.values, np.float64)
    U = np.asarray(pairs.vectors, np.float64)
    r = len(ref_values)
    assert values.shape == (r,) and U.shape == (W.shape[0], r)
    assert np.isfinite(values).all() and np.isfinite(U).all()
    assert np.all(np.diff(values) <= 1e-7), "values must be in descending order"
    rel = np.abs(values - ref_values) / np.maximum(np.abs(ref_values), 1e-12)
    assert rel.max() < rtol, f"eigenvalue relative error {rel.max():.2e}"
    np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-4)
    residual = np.linalg.norm(W @ U - U * values, axis=0)
    assert residual.max() < 1e-4, f"residual ||W u - l u|| = {residual.max():.2e}"


def _exact_diffusion(W_dense, y, alpha=ALPHA):
    n = W_dense.shape[0]
    return (1 - alpha) * np.linalg.solve(np.eye(n) - alpha * W_dense, y.T).T


# ----------------------------------------------------------------------------- eigenpairs
@pytest.mark.slow
def test_coil20_eigenpairs_match_eigsh(coil_graph):
    W = coil_graph.to_scipy().astype(np.float64)
    r = 30  # COIL-20, k = 5 mutual: 21 components with edges -> eigenvalue 1 repeated 21 times
    ref = np.sort(sla.eigsh(W, k=r, which="LA", v0=np.ones(W.shape[0]))[0])[::-1]
    assert np.sum(ref > 1 - 1e-6) == 21
    _check_pairs(graph_eigenpairs(coil_graph, r), W, ref)
    # Why graph_eigenpairs runs one Lanczos process per connected component: a single
    # Krylov sequence holds one vector per eigenvalue, so it misses the repeated 1s.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        whole = graph_eigenpairs(coil_graph, r, split_components=False, max_restarts=3)
    assert np.abs(np.asarray(whole.values) - ref).max() > 1e-3


@pytest.mark.slow
def test_mpeg7_eigenpairs_match_dense_eigh(mpeg_graph):
    # MPEG-7, k = 10 mutual: many components and isolated nodes, eigenvalue 1 repeated once
    # per non-trivial component (about 70). ARPACK's eigsh is not a reliable reference here:
    # it misses copies of 1 and returns wrong values (error 2e-3) at r = 80, so compare with
    # dense eigh.
    from scipy.sparse.csgraph import connected_components
    W = mpeg_graph.to_scipy().astype(np.float64)
    r = 80
    ref = np.linalg.eigvalsh(W.toarray())[::-1][:r]
    _, comp = connected_components(W, directed=False)
    nontrivial = int((np.bincount(comp) > 1).sum())
    assert 60 < nontrivial < r and np.sum(ref > 1 - 1e-6) == nontrivial
    _check_pairs(graph_eigenpairs(mpeg_graph, r), W, ref)


@pytest.mark.slow  # 30-60 s: make test-slow (make test stays under 10 minutes)
def test_lanczos_random_matvec_vs_eigsh():
    rng = np.random.default_rng(0)
    n, r = 400, 25
    g = _random_graph(rng, n, density=0.03)
    W = g.to_scipy().astype(np.float64)
    ref = np.sort(sla.eigsh(W, k=r, which="LA")[0])[::-1]
    pairs = lanczos(g.matvec, n, r, key=jax.random.key(1))
    _check_pairs(pairs, W, ref)
    # a shifted dense operator with well-separated top eigenvalues, small Krylov space + restarts
    M = rng.normal(size=(n, n))
    A = (M + M.T) / 2
    A_j = jnp.asarray(A, jnp.float32)
    pairs = lanczos(lambda x: A_j @ x, n, 5, num_iter=20, max_restarts=200)
    ref = np.linalg.eigvalsh(A)[::-1][:5]
    np.testing.assert_allclose(np.asarray(pairs.values), ref, rtol=1e-4)


@pytest.mark.slow  # 30-60 s: make test-slow (make test stays under 10 minutes)
def test_disconnected_graph_with_isolated_node_multiplicities():
    rng = np.random.default_rng(1)
    comp = _random_graph(rng, 30, density=0.2).to_scipy()  # one component twice: all eigenvalues doubled
    pair = sp.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))
    W = sp.block_diag([comp, pair, comp, sp.csr_matrix((1, 1))]).tocsr()  # + an isolated node
    g = Graph.from_scipy(W)
    n = W.shape[0]
    assert np.asarray(g.degree())[-1] == 0
    dense = np.linalg.eigvalsh(W.toarray().astype(np.float64))[::-1]
    assert int(np.sum(dense > 1 - 1e-6)) == 3
    assert int(np.sum(np.abs(dense) < 1e-9)) >= 1
    # small components solved densely (default) / every component by its own Lanczos process
    for r, kwargs in ((8, {}), (8, {"small_component": 0}), (n - 1, {"small_component": 0})):
        pairs = graph_eigenpairs(g, r, **kwargs)
        values = np.asarray(pairs.values)
        U = np.asarray(pairs.vectors, np.float64)
        assert np.isfinite(values).all() and np.isfinite(U).all()
        assert int(np.sum(values > 1 - 1e-4)) == 3
        np.testing.assert_allclose(values, dense[:r], atol=1e-4)
        np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-4)
        assert np.linalg.norm(W @ U - U * values, axis=0).max() < 1e-4
    # the generic matvec entry point with the blocks given explicitly
    from scipy.sparse.csgraph import connected_components

    labels = connected_components(W, directed=False)[1]
    pairs = lanczos(g.matvec, n, 8, blocks=labels)
    np.testing.assert_allclose(np.asarray(pairs.values), dense[:8], atol=1e-4)


# ----------------------------------------------------------------------------- FSR
@pytest.fixture(scope="module")
def small_graph():
    rng = np.random.default_rng(7)
    return _random_graph(rng, 60, density=0.1)


def test_rank_r_full_rank_equals_exact_solve(small_graph):
    W = small_graph.to_dense().astype(np.float64)
    n = W.shape[0]
    rng = np.random.default_rng(0)
    y = np.zeros((5, n))
    y[np.arange(5), rng.integers(0, n, 5)] = 1.0
    y[:, :3] += rng.random((5, 3))
    exact = _exact_diffusion(W, y)
    h = regularized_laplacian_filter(ALPHA)
    emb = spectral_embedding(small_graph, n, h)
    scores = np.asarray(fast_spectral_ranking(emb, jnp.asarray(y, jnp.float32)))
    assert np.abs(scores - exact).max() < 1e-4 * np.abs(exact).max()
    emb_approx = spectral_embedding(small_graph, n, h, mode="approx")
    approx = np.asarray(fast_spectral_ranking(emb_approx, jnp.asarray(y, jnp.float32)))
    assert np.abs(approx - scores).max() < 1e-4 * np.abs(exact).max()
    # one query as a vector
    one = np.asarray(fast_spectral_ranking(emb, jnp.asarray(y[0], jnp.float32)))
    np.testing.assert_allclose(one, scores[0], rtol=1e-5, atol=1e-7)


def test_approx_beats_rank_r_at_small_r(small_graph):
    W = small_graph.to_dense().astype(np.float64)
    n, r = W.shape[0], 10
    h = regularized_laplacian_filter(ALPHA)
    exact = (1 - ALPHA) * np.linalg.inv(np.eye(n) - ALPHA * W)  # h(W)
    eye = jnp.eye(n, dtype=jnp.float32)
    pairs = graph_eigenpairs(small_graph, r)
    rank_r = np.asarray(fast_spectral_ranking(spectral_embedding(pairs, r, h), eye))
    approx = np.asarray(fast_spectral_ranking(spectral_embedding(pairs, r, h, mode="approx"), eye))
    # the formula: U (h(L) - h(0)) U^T + h(0) I
    U, lam = np.asarray(pairs.vectors, np.float64), np.asarray(pairs.values, np.float64)
    h0 = 1 - ALPHA
    formula = U @ np.diag((1 - ALPHA) / (1 - ALPHA * lam) - h0) @ U.T + h0 * np.eye(n)
    np.testing.assert_allclose(approx, formula, atol=1e-5)
    err_rank = np.linalg.norm(rank_r - exact)
    err_approx = np.linalg.norm(approx - exact)
    assert err_approx < 0.9 * err_rank, (err_approx, err_rank)
    # and per query: the self-score (diagonal), which rank-r underestimates most
    assert np.abs(np.diag(approx) - np.diag(exact)).mean() < np.abs(np.diag(rank_r) - np.diag(exact)).mean()


def test_heat_kernel_full_rank_equals_expm(small_graph):
    W = small_graph.to_dense().astype(np.float64)
    n, t = W.shape[0], 2.5
    emb = spectral_embedding(small_graph, n, heat_kernel_filter(t))
    got = np.asarray(fast_spectral_ranking(emb, jnp.eye(n, dtype=jnp.float32)))
    np.testing.assert_allclose(got, scipy.linalg.expm(-t * (np.eye(n) - W)), atol=1e-5)


@pytest.mark.slow  # 30-60 s: make test-slow (make test stays under 10 minutes)
def test_sparse_queries_and_sparsified_embedding(coil_graph):
    n, r = coil_graph.num_nodes, 30
    pairs = graph_eigenpairs(coil_graph, r)
    h = regularized_laplacian_filter(ALPHA)
    rng = np.random.default_rng(0)
    nq, k = 7, 5
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(nq)]).astype(np.int32)
    sims = rng.uniform(-0.2, 1.0, (nq, k)).astype(np.float32)
    y = np.zeros((nq, n), np.float32)
    y[np.arange(nq)[:, None], idx] = np.maximum(sims, 0) ** 3
    for mode in ("rank_r", "approx"):
        emb = spectral_embedding(pairs, r, h, mode=mode)
        dense = np.asarray(fast_spectral_ranking(emb, y))
        sparse = np.asarray(fast_spectral_ranking_sparse(emb, sims, idx, gamma=3.0))
        np.testing.assert_allclose(sparse, dense, atol=1e-6)
        U = np.asarray(pairs.vectors, np.float64)
        f = np.asarray(emb.filtered, np.float64)
        ref = (y @ U * f) @ U.T + float(emb.h0) * y
        np.testing.assert_allclose(dense, ref, atol=1e-6)
    # sparsification: keeping all r entries changes nothing; keeping 5 saves memory
    emb = spectral_embedding(pairs, r, h)
    same, saved_all = sparsify_embedding(emb, r)
    np.testing.assert_allclose(np.asarray(fast_spectral_ranking(same, y)),
                               np.asarray(fast_spectral_ranking(emb, y)), atol=1e-6)
    assert saved_all == n * r * 4 - n * r * 8
    small, saved = sparsify_embedding(emb, 5)
    assert small.is_sparse and saved == n * r * 4 - n * 5 * 8 > 0
    assert small.nbytes == emb.nbytes - saved
    kept = np.asarray(small.dense_vectors())
    assert np.all(np.count_nonzero(kept, axis=1) <= 5)
    full = np.abs(np.asarray(emb.vectors))
    np.testing.assert_allclose(np.sort(np.abs(kept), axis=1)[:, -5:], np.sort(full, axis=1)[:, -5:])
    assert spectral_embedding(pairs, r, h, sparsify=5).is_sparse
    np.testing.assert_allclose(np.asarray(fast_spectral_ranking_sparse(small, sims, idx)),
                               np.asarray(fast_spectral_ranking(small, y)), atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs(small_graph):
    g = small_graph
    n = g.num_nodes
    h = regularized_laplacian_filter(0.9)
    with pytest.raises(ValueError, match="must be < n"):
        lanczos(g.matvec, n, n)
    with pytest.raises(ValueError, match="must be < n"):
        graph_eigenpairs(g, n, method="lanczos")
    with pytest.raises(ValueError, match="exceeds the operator size"):
        graph_eigenpairs(g, n + 1)
    with pytest.raises(ValueError, match="must be positive"):
        graph_eigenpairs(g, 0)
    with pytest.raises(ValueError, match="must be positive"):
        lanczos(g.matvec, n, -2)
    with pytest.raises(TypeError, match="r must be an int"):
        graph_eigenpairs(g, 2.5)
    with pytest.raises(ValueError, match="num_iter"):
        lanczos(g.matvec, n, 10, num_iter=5)
    asym = np.asarray(g.to_dense()).copy()
    asym[0, 1] += 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        graph_eigenpairs(Graph.from_dense(asym), 5)
    asym_j = jnp.asarray(asym, jnp.float32)
    with pytest.raises(ValueError, match="does not look symmetric"):
        lanczos(lambda x: asym_j @ x, n, 5)
    exact_one = Eigenpairs(values=jnp.array([1.0, 0.5]), vectors=jnp.eye(n)[:, :2])
    with pytest.raises(ValueError, match="not finite on the eigenvalues"):
        spectral_embedding(exact_one, 2, lambda lam: 1.0 / (1.0 - lam))  # pole at eigenvalue 1
    with pytest.raises(ValueError, match="not finite on 0"):
        spectral_embedding(g, 5, lambda lam: 1.0 / lam, mode="approx")
    with pytest.raises(ValueError, match="mode must be"):
        spectral_embedding(g, 5, h, mode="exact")
    with pytest.raises(ValueError, match="alpha must lie strictly between 0 and 1"):
        regularized_laplacian_filter(1.0)
    with pytest.raises(ValueError, match="t must be positive"):
        heat_kernel_filter(0.0)
    with pytest.raises(TypeError, match="Graph"):
        graph_eigenpairs(np.eye(4), 2)
    emb = spectral_embedding(g, 5, h)
    assert isinstance(emb, SpectralEmbedding)
    with pytest.raises(ValueError, match="one entry per database item"):
        fast_spectral_ranking(emb, np.zeros((2, n + 1), np.float32))
    with pytest.raises(ValueError, match="indices must lie in"):
        fast_spectral_ranking_sparse(emb, np.ones((1, 2), np.float32), np.array([[0, n]]))
    with pytest.raises(ValueError, match="sparsify"):
        sparsify_embedding(emb, 6)
    with pytest.raises(ValueError, match="available pairs"):
        spectral_embedding(graph_eigenpairs(g, 5), 6, h)
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            lanczos(g.matvec, n, 5, dtype=jnp.float64)
