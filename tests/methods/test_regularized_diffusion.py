"""Regularized diffusion process (Bai et al., AAAI 2017) against dense numpy solves of the paper's equations."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import unit_clusters
from retrieval_jax.diffusion import diffuse
from retrieval_jax.graph import knn_graph
from retrieval_jax.graph.core import Graph, NormalizedGraph
from retrieval_jax.methods import KnnConfig
from retrieval_jax.methods.regularized_diffusion import RDP, RdpConfig, rdp_item_scores

# one configuration for most tests (their compiled programs are shared)
_MAIN = RdpConfig(k=5, query_k=4, mu=0.25, tol=1e-7, max_iter=200, graph_method="exact")


def _data(seed, n=24, d=5, c=3):
    return unit_clusters(seed, n, d, c, noise=0.5)[0]


def _dense_s(x, cfg):
    """W (the library's kNN affinity, dense) -> D^-1/2 W D^-1/2 and D^-1/2, in float64 numpy."""
    w = knn_graph(x, cfg.k, gamma=cfg.gamma, mutual=cfg.mutual, method="exact").to_dense().astype(np.float64)
    deg = w.sum(axis=1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0.0)
    return inv[:, None] * w * inv[None, :], inv


def paper_solution(s, mu):
    """vec(A*) = (1 - alpha) (I - alpha S (x) S)^-1 vec(I), alpha = 1 / (1 + mu): the regularisation
    framework's minimiser, solved densely on the tensor product graph (N^2 unknowns)."""
    n = s.shape[0]
    alpha = 1 / (1 + mu)
    vec = np.linalg.solve(np.eye(n * n) - alpha * np.kron(s, s), (1 - alpha) * np.eye(n).ravel())
    return vec.reshape(n, n)


def test_items_are_the_columns_of_the_papers_tensor_product_solution():
    x = _data(0)
    state = RDP.build(x, _MAIN)
    got = np.asarray(RDP.search_items(state, np.arange(24, dtype=np.int32)))
    s, _ = _dense_s(x, _MAIN)
    a = paper_solution(s, _MAIN.mu)
    np.testing.assert_allclose(got, a.T, rtol=1e-4, atol=1e-6)   # row i of the scores = column i of A*
    # a state on the same graph built elsewhere ranks the same (one compiled program)
    graph = knn_graph(x, _MAIN.k, gamma=_MAIN.gamma, mutual=_MAIN.mutual, method="exact")
    again = RDP.from_graph(x, graph, _MAIN)
    np.testing.assert_allclose(np.asarray(RDP.search_items(again, np.arange(24, dtype=np.int32))), got,
                               rtol=1e-5, atol=1e-7)
    # the iterative framework converges to the same fixed point, from any start
    alpha = 1 / (1 + _MAIN.mu)
    it = np.random.default_rng(0).random((24, 24))
    for _ in range(400):
        it = alpha * s @ it @ s.T + (1 - alpha) * np.eye(24)
    np.testing.assert_allclose(it, a, atol=1e-8)


def test_queries_match_the_dense_definition_and_the_inverse_route():
    x, q = _data(1), _data(2, n=5)
    s, inv = _dense_s(x, _MAIN)
    alpha = 1 / (1 + _MAIN.mu)
    sims = q @ x.T
    w = np.zeros_like(sims, dtype=np.float64)
    for row in range(5):
        top = np.argsort(-sims[row])[:_MAIN.query_k]
        w[row, top] = np.maximum(sims[row, top], 0) ** _MAIN.gamma
    ref = (1 - alpha) * np.linalg.solve(np.eye(24) - alpha * s @ s, s @ (inv[:, None] * w.T)).T
    cg = RDP.build(x, _MAIN)
    np.testing.assert_allclose(np.asarray(RDP.search(cg, q)), ref, rtol=1e-4, atol=1e-7)
    exact = RDP.build(x, dataclasses.replace(_MAIN, solver="inverse"))
    np.testing.assert_allclose(np.asarray(RDP.search(exact, q)), ref, rtol=1e-4, atol=1e-7)
    ids = np.array([0, 3, 7], np.int32)
    np.testing.assert_allclose(np.asarray(RDP.search_items(exact, ids)), np.asarray(RDP.search_items(cg, ids)),
                               rtol=1e-4, atol=1e-7)


def test_law_rdp_is_manifold_ranking_on_the_two_step_graph():
    # (I - alpha S (x) S)^-1 vec(I) = vec((I - alpha S^2)^-1): the library's diffusion with W = S^2
    x = _data(3)
    state = RDP.build(x, _MAIN)
    s, _ = _dense_s(x, _MAIN)
    g = Graph.from_dense(s @ s)
    w2 = NormalizedGraph(indices=g.indices, weights=g.weights)
    alpha = 1 / (1 + _MAIN.mu)
    ref = (1 - alpha) * np.asarray(diffuse(w2, np.eye(24, dtype=np.float32)[:6], alpha=alpha, tol=1e-8,
                                           max_iter=300))
    got = np.asarray(RDP.search_items(state, np.arange(6, dtype=np.int32)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_jit_and_vmap_over_mu():
    x, q = _data(4), _data(5, n=3)
    state = RDP.build(x, _MAIN)
    direct = np.asarray(RDP.search(state, q))
    jitted = jax.jit(lambda st, v: RDP.search(st, v))(state, jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(jitted), direct, rtol=1e-5, atol=1e-7)
    ids = jnp.arange(4, dtype=jnp.int32)
    mus = jnp.array([0.25, 1.0], jnp.float32)
    grid = jax.jit(jax.vmap(lambda m: rdp_item_scores(dataclasses.replace(state, mu=m), ids)))(mus)
    s, _ = _dense_s(x, _MAIN)
    for g, mu in zip(np.asarray(grid), (0.25, 1.0)):
        np.testing.assert_allclose(g, paper_solution(s, mu)[:, :4].T, rtol=1e-4, atol=1e-6)
    other = RDP.build(x, dataclasses.replace(_MAIN, mu=1.0))
    assert jax.tree_util.tree_structure(other) == jax.tree_util.tree_structure(state)  # one compiled program
    assert other.config.mu == 1.0 and other.config.alpha == pytest.approx(0.5)


def test_bad_input_is_refused_clearly():
    x = _data(6)
    with pytest.raises(ValueError, match="mu must be a finite number > 0"):
        RdpConfig(mu=0.0)
    with pytest.raises(TypeError, match="mu"):
        RdpConfig(mu="big")
    with pytest.raises(ValueError, match="solver"):
        RdpConfig(solver="spectral")
    with pytest.raises(ValueError, match="gamma"):
        RdpConfig(gamma=-1.0)
    with pytest.raises(ValueError, match="k = 24 exceeds"):
        RDP.build(x, dataclasses.replace(_MAIN, k=24))
    with pytest.raises(ValueError, match="query_k = 25 exceeds"):
        RDP.build(x, dataclasses.replace(_MAIN, query_k=25))
    with pytest.raises(TypeError, match="RdpConfig"):
        RDP.build(x, KnnConfig())
    with pytest.raises(ValueError, match="NaN"):
        RDP.build(np.full((24, 5), np.nan, np.float32), _MAIN)
    asym = Graph.from_dense(np.triu(np.ones((24, 24)), 1))
    with pytest.raises(ValueError, match="not symmetric"):
        RDP.from_graph(x, asym, _MAIN)
    with pytest.raises(ValueError, match="24 nodes but the database has 20 items"):
        RDP.from_graph(x[:20], knn_graph(x, 3, method="exact"), _MAIN)
    state = RDP.build(x, _MAIN)
    with pytest.raises(ValueError, match="dimension mismatch"):
        RDP.search(state, x[:, :3])
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        RDP.search_items(state, np.array([-1]))
