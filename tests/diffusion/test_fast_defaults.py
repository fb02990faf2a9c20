"""The default routes take the locality layout without the caller knowing, and stay exact.

`normalize` attaches a `LocalityLayout` to a concrete graph of `LOCALITY_MIN_NODES` nodes
or more; the CG solvers iterate in it and answer in the graph's node order. Here the
threshold is lowered (monkeypatch) so that small graphs take the route, and every result
is compared with a dense solve of (I - alpha W) x = y.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import unit_clusters
from retrieval_jax.diffusion import (CG, PreconditionedCG, diffuse, diffusion_operator, katz_centrality,
                                     observe_neighbours, solve, truncated_diffuse)
from retrieval_jax.graph import Graph, NormalizedGraph, knn, knn_graph, normalize, with_locality
import retrieval_jax.graph.neighbours as neighbours
import retrieval_jax.graph.order as order_module
from retrieval_jax.graph.order import LocalityLayout
import retrieval_jax.methods.diffusion as method_module
from retrieval_jax.methods import DIFFUSION, DiffusionConfig, diffusion_state_from_graph

ALPHA = 0.9


def _data(seed, n=240, d=12, c=5):
    x = unit_clusters(seed, n, d, c, noise=0.5)[0]
    # shuffled: the database's order carries no locality, so the layout is a real permutation
    return x[np.random.default_rng(seed).permutation(n)]


def _dense(w: Graph, y, alpha=ALPHA):
    m = np.eye(w.num_nodes) - alpha * w.to_dense()
    return np.linalg.solve(m, np.asarray(y, np.float64).T).T


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(neighbours, "LOCALITY_MIN_NODES", 100)
    monkeypatch.setattr(method_module, "LOCALITY_MIN_NODES", 100)
    # the scores leave the layout in blocks of rows, the last one padded (240 = 34 x 7 + 2)
    monkeypatch.setattr(order_module, "UNPERMUTE_BLOCK", 7)


def test_blocked_unpermutation_equals_gather_then_transpose():
    n, b = 3001, 5                                  # 6 blocks of 512 rows, the last one padded
    rng = np.random.default_rng(7)
    order = rng.permutation(n)
    inverse = np.argsort(order)
    layout = LocalityLayout(order=jnp.asarray(order, jnp.int32), inverse=jnp.asarray(inverse, jnp.int32),
                            indices=jnp.zeros((n, 1), jnp.int32))
    assert n >= 4 * order_module.UNPERMUTE_BLOCK    # the blocked route, not the small-array one
    x = rng.standard_normal((n, b)).astype(np.float32)
    ref = x[inverse].T
    np.testing.assert_array_equal(np.asarray(layout.from_layout_transposed(jnp.asarray(x))), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(layout.from_layout_transposed)(x)), ref)
    xs = rng.standard_normal((3, n, b)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.vmap(layout.from_layout_transposed)(xs)),
                                  xs[:, inverse].transpose(0, 2, 1))
    # a permutation and a transpose: the gradient of <c, P(x)> is c moved back
    c = rng.standard_normal((b, n)).astype(np.float32)
    g = jax.grad(lambda v: jnp.sum(jnp.asarray(c) * layout.from_layout_transposed(v)))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), c.T[order])


def test_normalize_attaches_the_layout_from_the_threshold_on(small_threshold):
    a = knn_graph(_data(0), 6)
    w = normalize(a)
    assert w.layout is not None
    order = np.asarray(w.layout.order)
    assert sorted(order.tolist()) == list(range(a.num_nodes)) and (order != np.arange(a.num_nodes)).any()
    np.testing.assert_array_equal(np.asarray(w.layout.inverse)[order], np.arange(a.num_nodes))
    # the layout is W renumbered: P W P^T
    pw = w.layout.graph(w).to_dense()
    np.testing.assert_allclose(pw, w.to_dense()[np.ix_(order, order)], atol=0)
    # small graphs, and any trace, skip it
    small = normalize(knn_graph(_data(1, n=60), 5))
    assert small.layout is None and with_locality(small).layout is not None   # any size, on request
    assert normalize(knn_graph(_data(1, n=60), 5), locality=True).layout is not None
    assert normalize(a, locality=False).layout is None
    assert jax.jit(normalize)(a).layout is None


def test_diffuse_in_the_layout_equals_the_dense_solve(small_threshold):
    w = normalize(knn_graph(_data(2), 6))
    plain = NormalizedGraph(indices=w.indices, weights=w.weights)
    y = np.random.default_rng(0).random((5, w.num_nodes)).astype(np.float32)
    ref = _dense(w, y)
    for g in (w, plain):
        x, info = diffuse(g, y, alpha=ALPHA, tol=1e-7, max_iter=500, return_info=True)
        np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        assert float(info.residual.max()) <= 1e-7
    # the same route under jit (layout leaves traced, no host work) and in the sparse form
    jitted = jax.jit(lambda g, y: diffuse(g, y, alpha=ALPHA, tol=1e-7, max_iter=500))(w, y)
    np.testing.assert_allclose(np.asarray(jitted), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    s, i = knn(_data(3, n=4), _data(2), 5)
    obs = observe_neighbours(s, i, w.num_nodes)
    ref_obs = _dense(w, obs.todense())
    for solver in (CG(1e-7, 500), PreconditionedCG(1e-7, 500, max_coarse=16)):
        sol = solve(diffusion_operator(w, ALPHA), obs, solver)
        np.testing.assert_allclose(np.asarray(sol.scores), ref_obs, rtol=1e-4, atol=1e-5 * np.abs(ref_obs).max())


def test_gradients_through_the_layout_reach_the_graph_weights(small_threshold):
    w = normalize(knn_graph(_data(4), 6))
    plain = NormalizedGraph(indices=w.indices, weights=w.weights)
    y = jnp.asarray(np.random.default_rng(1).random((3, w.num_nodes)), jnp.float32)

    def loss(weights, g):
        g = type(g)(indices=g.indices, weights=weights, layout=g.layout)
        return jnp.sum(diffuse(g, y, alpha=ALPHA, tol=1e-7, max_iter=500) ** 2)
    g_layout = jax.grad(loss)(w.weights, w)
    g_plain = jax.grad(loss)(plain.weights, plain)
    np.testing.assert_allclose(np.asarray(g_layout), np.asarray(g_plain), rtol=1e-3,
                               atol=1e-4 * float(jnp.abs(g_plain).max()))


def test_katz_and_truncated_on_a_graph_with_its_layout(small_threshold):
    w = normalize(knn_graph(_data(5), 6))
    assert w.layout is not None
    g = katz_centrality(w, ALPHA, tol=1e-7, max_iter=500)
    ref = _dense(w, np.full((1, w.num_nodes), 1 - ALPHA))[0]
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4)
    short = np.argsort(-np.asarray(w.to_dense())[:3], axis=1)[:, :20].astype(np.int32)
    y = np.zeros((3, w.num_nodes), np.float32)
    y[np.arange(3), short[:, 0]] = 1.0
    x = truncated_diffuse(w, y, short, alpha=ALPHA, tol=1e-7, max_iter=500)
    for q in range(3):
        sub = short[q]
        m = np.eye(20) - ALPHA * w.to_dense()[np.ix_(sub, sub)]
        np.testing.assert_allclose(np.asarray(x[q]), np.linalg.solve(m, y[q, sub]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("solver", ["cg", "pcg", "auto"])
def test_the_method_keeps_the_layout_and_answers_in_the_database_order(small_threshold, solver):
    x, q = _data(6), _data(7, n=6)
    cfg = DiffusionConfig(k=6, query_k=5, alpha=ALPHA, tol=1e-7, max_iter=500, solver=solver)
    state = DIFFUSION.build(x, cfg)
    assert state.graph.layout is not None
    s, i = knn(q, x, 5)
    ref = _dense(state.graph, observe_neighbours(s, i, x.shape[0]).todense())
    got = np.asarray(DIFFUSION.search(state, q))
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())
    # from a given graph, W given (a plain Graph, checked) or A given: the same state
    a = knn_graph(x, 6)
    for st in (diffusion_state_from_graph(x, a, cfg),
               diffusion_state_from_graph(x, Graph(indices=state.graph.indices, weights=state.graph.weights), cfg,
                                          normalized=True)):
        assert st.graph.layout is not None
        np.testing.assert_allclose(np.asarray(DIFFUSION.search(st, q)), ref, rtol=1e-3,
                                   atol=1e-5 * np.abs(ref).max())


# ----------------------------------------------------------------------------- silent cases
def test_a_graph_state_refuses_an_asymmetric_affinity():
    x = _data(8, n=60)
    a = knn_graph(x, 5).to_dense()
    a[0, 1], a[1, 0] = 0.9, 0.0           # one directed edge
    with pytest.raises(ValueError, match="not symmetric"):
        diffusion_state_from_graph(x, Graph.from_dense(a), DiffusionConfig(k=5, query_k=4))


def test_a_graph_state_refuses_an_unnormalised_w():
    x = _data(9, n=60)
    a = knn_graph(x, 5)
    with pytest.raises(ValueError, match="not normalised"):
        diffusion_state_from_graph(x, a, DiffusionConfig(k=5, query_k=4), normalized=True)


def test_a_query_with_no_positive_neighbour_is_warned_about():
    x = np.abs(_data(10, n=80))           # every descriptor in the positive orthant
    state = DIFFUSION.build(x, DiffusionConfig(k=5, query_k=4, alpha=ALPHA))
    q = np.concatenate([x[:2], -x[2:3]])  # the last query has similarity <= 0 to all items
    with pytest.warns(method_module.UnreachedQueryWarning, match="first: row 2"):
        scores = np.asarray(DIFFUSION.search(state, q))
    assert (scores[2] == 0).all() and (scores[:2] != 0).any(axis=1).all()


def test_complex_observations_are_refused():
    w = normalize(knn_graph(_data(11, n=60), 5))
    y = np.zeros((1, w.num_nodes), np.complex64)
    y[0, 3] = 1 + 1j
    with pytest.raises(TypeError, match="real"):
        diffuse(w, y)
    with pytest.raises(TypeError, match="real"):
        solve(diffusion_operator(w, ALPHA), y)


# ----------------------------------------------------------------------------- one way to solve
def test_configs_take_every_registered_solver_name_or_a_solver_object():
    from retrieval_jax.diffusion import SOLVERS, Spectral
    x, q = _data(12, n=90), _data(13, n=3)
    base = dict(k=6, query_k=5, alpha=ALPHA, tol=1e-7, max_iter=500)
    for name in SOLVERS:
        DiffusionConfig(**base, solver=name)
    with pytest.raises(ValueError, match="'pcg'"):       # the message lists the registry
        DiffusionConfig(**base, solver="splu")
    ref_state = DIFFUSION.build(x, DiffusionConfig(**base, solver="inverse"))
    ref = np.asarray(DIFFUSION.search(ref_state, q))
    # full-rank spectral with the resolvent filter is the exact inverse: a solver object in the config
    state = DIFFUSION.build(x, DiffusionConfig(**base, solver=Spectral(rank=90, mode="rank_r")))
    np.testing.assert_allclose(np.asarray(DIFFUSION.search(state, q)), ref, rtol=1e-3,
                               atol=1e-4 * np.abs(ref).max())


def test_a_loaded_normalised_graph_carries_its_layout(small_threshold, monkeypatch, tmp_path):
    """load_graph of a W saved normalised gives it the layout normalize would, and diffuse
    on it equals the dense solve (the caller's node order)."""
    import retrieval_jax.graph.io as graph_io
    from retrieval_jax.graph import load_graph, save_graph

    monkeypatch.setattr(graph_io, "LOCALITY_MIN_NODES", 100)
    w = normalize(knn_graph(_data(7), 6), locality=False)
    save_graph(tmp_path / "w.npz", w, k=6, gamma=3.0)
    for mmap in (False, True):
        loaded, _ = load_graph(tmp_path / "w.npz", mmap=mmap)
        assert isinstance(loaded, NormalizedGraph) and loaded.layout is not None
        y = np.zeros((2, w.num_nodes), np.float32)
        y[0, 3] = y[1, 50] = 1.0
        np.testing.assert_allclose(np.asarray(diffuse(loaded, y, alpha=ALPHA, tol=1e-7, max_iter=500)),
                                   _dense(w, y), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(graph_io, "LOCALITY_MIN_NODES", 10 ** 9)
    assert load_graph(tmp_path / "w.npz")[0].layout is None


def test_cg_program_does_not_grow_a_kernel_per_neighbour_slot():
    """The product's neighbour-slot columns stay inside the CG loop's fused product.

    Hoisted out of the loop as loop invariants they were 2 K separate kernels to compile
    (71 fusions instead of 33 for the default search at K = 20); `DiffusionOperator.mv`
    prevents it. The program for K = 12 may not have many more kernels than for K = 4."""
    import re

    def kernels(k):
        w = normalize(knn_graph(_data(7, n=200), k), locality=False)
        y = jnp.zeros((3, w.num_nodes)).at[:, :3].set(1.0)
        run = jax.jit(lambda op, y: solve(op, y, CG(1e-6, 10)).scores)
        return len(re.findall(r"\sfusion\(", run.lower(diffusion_operator(w, ALPHA), y).compile().as_text()))

    assert kernels(12) - kernels(4) < 4
