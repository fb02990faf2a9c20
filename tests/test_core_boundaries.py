"""No silent failure at the numerical core's public boundary: each case once returned
something wrong without an error, or failed deep inside numpy/jax."""
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.diffusion import (diffuse, diffusion_inverse, indicator_vectors, katz_centrality, query_vectors,
                                     ranking_from_scores, top_n, truncated_diffuse)
from retrieval_jax.graph import Graph, knn, knn_graph, normalize
from retrieval_jax.spectral import (fast_spectral_ranking, fast_spectral_ranking_sparse, regularized_laplacian_filter,
                                    spectral_embedding)


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, normalize(knn_graph(x, 6))


def test_fsr_refuses_nan_input(small):
    _, w = small
    emb = spectral_embedding(w, 10, regularized_laplacian_filter(0.9), method="dense")  # any embedding
    y = np.zeros((1, 100), np.float32)
    y[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fast_spectral_ranking(emb, y)
    with pytest.raises(ValueError, match="NaN"):
        fast_spectral_ranking_sparse(emb, [[np.nan]], [[0]])


def test_diffuse_checks_the_graph():
    e = np.eye(5, dtype=np.float32)[:1]
    with pytest.raises(ValueError, match="not normalised"):
        diffuse(Graph.from_dense(np.ones((5, 5)) - np.eye(5)), e)
    bad = Graph(indices=jnp.array([[1], [0]]), weights=jnp.array([[jnp.nan], [0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        normalize(bad)
    with pytest.raises(ValueError, match="NaN"):
        diffuse(bad, np.eye(2, dtype=np.float32)[:1])
    asym = np.zeros((4, 4), np.float32)
    asym[0, 1], asym[1, 0] = 0.5, 0.1
    with pytest.raises(ValueError, match="symmetric"):
        diffuse(Graph.from_dense(asym), np.eye(4, dtype=np.float32)[:1])
    with pytest.raises(ValueError, match="symmetric"):
        diffusion_inverse(Graph.from_dense(asym), 0.9)


def test_truncated_diffuse_checks_like_diffuse(small):
    _, w = small
    y = indicator_vectors(np.array([0]), 100)
    s = np.arange(10)[None]
    with pytest.raises(ValueError, match="max_iter"):
        truncated_diffuse(w, y, s, max_iter=0)
    for b in (0, -2):
        with pytest.raises(ValueError, match="batch_size"):
            truncated_diffuse(w, y, s, batch_size=b)
    with pytest.raises(ValueError, match="empty"):
        truncated_diffuse(w, y, np.zeros((1, 0), np.int64))


def test_indices_are_never_cast_or_clamped(small):
    x, w = small
    with pytest.raises(TypeError, match="integer"):
        query_vectors(np.ones((1, 1)), [[np.nan]], 100)
    with pytest.raises(TypeError, match="integer"):
        indicator_vectors([1.7], 100)
    inv = diffusion_inverse(w, 0.9)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        inv.rows(np.array([150]))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        ranking_from_scores(np.zeros((1, 100)), exclude=[-1])


def test_tuning_arguments_get_clear_errors(small):
    x, w = small
    for kw in ({"block_size": 0}, {"chunk_size": 0}):
        with pytest.raises(ValueError, match="positive int"):
            knn(x, x, 3, **kw)
    with pytest.raises(ValueError, match="exceeds"):
        top_n(np.zeros((2, 5)), 6)
    with pytest.raises(TypeError, match="Graph"):
        normalize(np.eye(3))
    with pytest.raises(TypeError, match="Graph"):
        katz_centrality(np.eye(3))


def test_a_query_with_no_positive_similarity_warns():
    with pytest.warns(UserWarning, match="no positive similarity"):
        query_vectors(-np.ones((2, 3), np.float32), np.zeros((2, 3), np.int64) + [0, 1, 2], 10)


def test_search_pads_batches_to_bucket_sizes():
    from retrieval_jax.methods import KNN_SEARCH, KnnConfig
    from retrieval_jax.methods.base import bucket_size
    from retrieval_jax.methods.knn import _knn_search
    rng = np.random.default_rng(1)
    db = rng.normal(size=(50, 4)).astype(np.float32)
    state = KNN_SEARCH.build(db, KnnConfig())
    before = _knn_search._cache_size()
    for nq in range(1, 17):
        out = KNN_SEARCH.search(state, db[:nq])
        assert out.shape == (nq, 50)
        np.testing.assert_allclose(np.asarray(out), db[:nq] @ db.T, rtol=1e-5, atol=1e-5)
    assert _knn_search._cache_size() - before <= 2          # buckets 8 and 16, not 16 programs
    assert [bucket_size(n) for n in (1, 8, 9, 64, 65, 100, 200, 256, 257)] == [8, 8, 16, 64, 80, 112, 224, 256, 320]
    sizes = np.array([bucket_size(n) for n in range(1, 5000)])
    assert (sizes >= np.arange(1, 5000)).all() and (np.diff(sizes) >= 0).all()
    assert (sizes[64:] <= 1.25 * np.arange(65, 5000)).all()                  # at most a quarter padded
    assert len(np.unique(sizes[256:])) <= 4 * 5                               # four sizes per octave


def test_a_nan_right_hand_side_gives_nan_not_zero(small):
    import jax
    _, w = small
    y = np.zeros((2, 100), np.float32)
    y[0, 0] = 1.0
    y[1, 0] = np.nan
    from retrieval_jax.diffusion import CG, diffusion_operator
    from retrieval_jax.diffusion.solvers import solve_unchecked
    res = solve_unchecked(diffusion_operator(w, 0.9), jnp.asarray(y), CG(tol=1e-6, max_iter=50))
    assert np.isfinite(np.asarray(res.scores[0])).all() and np.isnan(np.asarray(res.scores[1])).all()
    # a NaN cotangent reaching the backward solve propagates instead of vanishing
    g = jax.grad(lambda v: jnp.sum(jnp.nan * diffuse(w, v, tol=1e-6, max_iter=50)))(jnp.asarray(y[:1]))
    assert np.isnan(np.asarray(g)).all()
