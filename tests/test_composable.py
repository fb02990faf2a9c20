"""jit, vmap and grad through graph construction and every diffusion route.

References are independent: the host (scipy) graph build, Python loops over parameter
values, dense solves, and central finite differences in float64.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from retrieval_jax.diffusion import (CG, Auto, ExactInverse, Spectral, diffuse, diffusion_operator,
                                     indicator_vectors, observe_items, observe_neighbours, plan_inverse, solve)
from retrieval_jax.graph import Graph, affinity_matrix, knn, knn_graph, normalize
from retrieval_jax.spectral import (fast_spectral_ranking, filter_embedding, regularized_laplacian_filter,
                                    spectral_embedding)

from conftest import require_data


def _unit(rng, n, d, dtype=np.float32):
    x = rng.normal(size=(n, d)).astype(dtype)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _coil20():
    from retrieval_jax.data import load_coil20
    return np.asarray(load_coil20(require_data("coil20"), size=32).X, np.float32)  # L2-normalised


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ----------------------------------------------------------------------------- graph on device
@pytest.mark.parametrize("mutual", [True, False])
def test_jitted_graph_has_the_host_edges(mutual):
    x = _unit(np.random.default_rng(0), 200, 12)
    s, i = knn(x, x, 8, exclude_self=True)
    ref = affinity_matrix(s, i, 200, gamma=3.0, mutual=mutual).toarray()   # scipy reference
    host = knn_graph(x, 8, gamma=3.0, mutual=mutual)
    dev = jax.jit(lambda X: knn_graph(X, 8, gamma=3.0, mutual=mutual, max_degree=None if mutual else 40))(x)
    np.testing.assert_allclose(host.to_dense(), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dev.to_dense(), ref, rtol=1e-5, atol=1e-7)
    assert int(dev.overflow) == 0
    assert dev.max_degree == (8 if mutual else 40)          # fixed capacity


def test_jitted_graph_on_coil20_matches_host():
    x = _coil20()
    host = knn_graph(x, 10, gamma=3.0, mutual=True)
    dev = jax.jit(lambda X: normalize(knn_graph(X, 10, gamma=3.0, mutual=True)))(x)
    a, b = host.to_scipy(), Graph(indices=dev.indices, weights=dev.weights).to_scipy()
    assert (a != 0).sum() == (b != 0).sum()
    assert abs((a != 0).astype(int) - (b != 0).astype(int)).sum() == 0        # same edges
    np.testing.assert_allclose(normalize(host).to_dense(), b.toarray(), rtol=1e-4, atol=1e-6)


def test_union_capacity_overflow_is_reported_never_silent():
    x = _unit(np.random.default_rng(1), 150, 6)
    g = jax.jit(lambda X: knn_graph(X, 8, mutual=False, max_degree=9))(x)
    lost = int(g.overflow)
    full = knn_graph(x, 8, mutual=False)
    assert lost > 0
    assert lost == int((full.to_scipy() != 0).sum() - (Graph(g.indices, g.weights).to_scipy() != 0).sum())
    with pytest.raises(ValueError, match="did not fit"):
        diffuse(normalize(g), indicator_vectors([0], 150))
    with pytest.raises(ValueError, match="max_degree"):
        knn_graph(x, 8, mutual=False, max_degree=9)


# ----------------------------------------------------------------------------- vmap
def test_vmap_over_alpha_equals_the_loop():
    x = _unit(np.random.default_rng(2), 300, 10)
    w = normalize(knn_graph(x, 10))
    y = indicator_vectors(np.array([0, 7, 99]), 300)
    alphas = jnp.array([0.8, 0.9, 0.99])
    batched = jax.vmap(lambda a: diffuse(w, y, alpha=a, tol=1e-7, max_iter=1000))(alphas)
    for b, a in zip(batched, [0.8, 0.9, 0.99]):
        assert _rel(b, diffuse(w, y, alpha=a, tol=1e-7, max_iter=1000)) < 1e-5


def test_vmap_over_gamma_equals_the_loop():
    x = _unit(np.random.default_rng(3), 250, 10)
    y = indicator_vectors(np.array([3, 50]), 250)
    batched = jax.vmap(lambda g: diffuse(normalize(knn_graph(x, 10, gamma=g)), y, tol=1e-7, max_iter=500))(
        jnp.array([1.0, 3.0]))
    for b, g in zip(batched, [1.0, 3.0]):
        assert _rel(b, diffuse(normalize(knn_graph(x, 10, gamma=g)), y, tol=1e-7, max_iter=500)) < 1e-5


# ----------------------------------------------------------------------------- gradients, float64
def _fd(f, x0, eps=1e-5):
    return (f(x0 + eps) - f(x0 - eps)) / (2 * eps)


def test_cg_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        x = _unit(np.random.default_rng(4), 40, 6, np.float64)
        w = normalize(jax.jit(lambda X: knn_graph(X, 5, gamma=3.0))(jnp.asarray(x)))
        assert w.weights.dtype == jnp.float64
        y = jnp.asarray(np.eye(40)[[0, 9]])

        def f_alpha(a):
            return diffuse(w, y, alpha=a, tol=1e-12, max_iter=400)[0, 7]
        assert abs(jax.grad(f_alpha)(0.9) - _fd(f_alpha, 0.9)) < 1e-3 * abs(_fd(f_alpha, 0.9))
        check_grads(lambda a: diffuse(w, y, alpha=a, tol=1e-12, max_iter=400), (0.9,), order=1,
                    modes=["rev", "fwd"], atol=1e-5, rtol=1e-3)
        c = jnp.asarray(np.random.default_rng(5).normal(size=(2, 40)))
        check_grads(lambda yy: jnp.sum(c * diffuse(w, yy, tol=1e-12, max_iter=400)), (y,), order=1,
                    modes=["rev"], atol=1e-5, rtol=1e-3)

        @jax.jit  # the traced route throughout (a concrete X would take the float32 host search)
        def f_x(X):
            return diffuse(normalize(knn_graph(X, 5, gamma=3.0)), y, tol=1e-12, max_iter=400)[0, 7]
        gx = jax.grad(f_x)(jnp.asarray(x))
        v = np.random.default_rng(6).normal(size=x.shape)
        fd = _fd(lambda t: f_x(jnp.asarray(x + t * v)), 0.0, 1e-6)
        assert abs(float(jnp.sum(gx * v)) - fd) < 1e-3 * abs(fd)

        @jax.jit
        def f_gamma(g):
            return diffuse(normalize(knn_graph(jnp.asarray(x), 5, gamma=g)), y, tol=1e-12, max_iter=400)[0, 7]
        assert abs(jax.grad(f_gamma)(3.0) - _fd(f_gamma, 3.0)) < 1e-3 * abs(_fd(f_gamma, 3.0))


def test_exact_inverse_and_spectral_gradients_in_float64():
    with jax.enable_x64(True):
        x = _unit(np.random.default_rng(7), 60, 6, np.float64)
        w = normalize(jax.jit(lambda X: knn_graph(X, 6))(jnp.asarray(x)))
        plan = plan_inverse(w)
        obs = observe_items(jnp.array([0, 11]), 60)

        def f_inv(a):
            op = diffusion_operator(w, a)
            return solve(op, obs, ExactInverse(), ExactInverse().init(op, plan=plan)).scores[0, 3]
        ref = lambda a: np.linalg.solve(np.eye(60) - a * np.asarray(Graph(w.indices, w.weights).to_dense()),  # noqa: E731
                                        np.eye(60)[0])[3]
        assert abs(f_inv(0.9) - ref(0.9)) < 1e-10
        assert abs(jax.grad(f_inv)(0.9) - _fd(ref, 0.9)) < 1e-3 * abs(_fd(ref, 0.9))
        # with respect to the neighbour weights of the query's observation
        def f_obs(v):
            op = diffusion_operator(w, 0.9)
            o = observe_neighbours(v[None, :], jnp.array([[0, 5, 9]]), 60, gamma=2.0)
            return solve(op, o, ExactInverse(), ExactInverse().init(op, plan=plan)).scores[0, 4]
        check_grads(f_obs, (jnp.array([0.9, 0.7, 0.5]),), order=1, modes=["rev"], atol=1e-6, rtol=1e-3)

        emb = spectral_embedding(w, 20, regularized_laplacian_filter(0.9), mode="approx")   # float32 eigenpairs
        emb = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), emb)
        emb = filter_embedding(emb, regularized_laplacian_filter(0.9), mode="approx")
        y = jnp.asarray(np.eye(60)[[2]])

        def f_fsr(a):
            return fast_spectral_ranking(filter_embedding(emb, regularized_laplacian_filter(a), mode="approx"), y)[0, 8]
        assert abs(jax.grad(f_fsr)(0.9) - _fd(f_fsr, 0.9)) < 1e-3 * abs(_fd(f_fsr, 0.9))
        check_grads(lambda yy: fast_spectral_ranking(emb, yy), (y,), order=1, modes=["rev"], atol=1e-6, rtol=1e-3)


def test_gradients_on_coil20_in_float32():
    x = _coil20()
    w = normalize(knn_graph(x, 10))
    y = indicator_vectors(np.array([0, 100]), x.shape[0])

    def f_alpha(a):
        return diffuse(w, y, alpha=a, tol=1e-7, max_iter=1000)[0, 7]
    fd = _fd(f_alpha, 0.9, 1e-3)
    assert abs(jax.grad(f_alpha)(0.9) - fd) < 2e-2 * abs(fd)

    def f_x(X):
        return diffuse(normalize(knn_graph(X, 10)), y, tol=1e-7, max_iter=1000)[0, 7]
    gx = jax.grad(f_x)(jnp.asarray(x))
    v = np.zeros_like(x)
    v[np.asarray(w.indices[7, :3])] = np.random.default_rng(8).normal(size=(3, x.shape[1]))
    v[7] = np.random.default_rng(9).normal(size=x.shape[1])
    fd = _fd(lambda t: f_x(jnp.asarray(x + t * v)), 0.0, 1e-3)
    assert abs(float(jnp.sum(gx * v)) - fd) < 2e-2 * abs(fd)


# ----------------------------------------------------------------------------- the solver layer
def test_every_solver_route_equals_a_dense_solve():
    x = _unit(np.random.default_rng(10), 120, 8)
    w = normalize(knn_graph(x, 6))
    dense_w = w.to_dense()
    op = diffusion_operator(w, 0.95)
    obs = observe_neighbours(np.array([[0.9, 0.8]], np.float32), np.array([[3, 40]]), 120, gamma=3.0)
    ref = np.linalg.solve(np.eye(120) - 0.95 * dense_w, np.asarray(obs.todense())[0])
    for solver, tol in [(CG(1e-7, 1000), 1e-5), (ExactInverse(), 1e-5), (Spectral(rank=120, mode="rank_r"), 1e-4),
                        (Auto(), 1e-5)]:
        sol = solve(op, obs, solver)
        assert _rel(sol.scores[0], ref) < tol, solver
    assert solve(op, obs, Auto()).route == "inverse"
    assert solve(op, obs, Auto(max_nodes=2)).route == "cg"
    sol = solve(op, obs, CG(1e-7, 1000))
    assert sol.route == "cg" and int(sol.iterations[0]) > 0 and float(sol.residual[0]) <= 1e-7
    with pytest.raises(TypeError, match="DiffusionOperator"):
        solve(w, obs)
    with pytest.raises(ValueError, match="max_iter"):
        solve(op, obs, CG(1e-6, 0))


def test_solve_jits_and_vmaps_over_alpha_with_a_static_solver():
    x = _unit(np.random.default_rng(11), 100, 8)
    w = normalize(knn_graph(x, 6))
    obs = observe_items(jnp.array([1, 2]), 100)
    run = jax.jit(jax.vmap(lambda a: solve(diffusion_operator(w, a), obs, CG(1e-7, 800)).scores))
    out = run(jnp.array([0.5, 0.99]))
    for o, a in zip(out, [0.5, 0.99]):
        assert _rel(o, diffuse(w, obs.todense(), alpha=a, tol=1e-7, max_iter=800)) < 1e-5


# ----------------------------------------------------------------------------- checks under a trace
def test_checks_at_the_boundary_concrete_and_traced():
    x = _unit(np.random.default_rng(12), 50, 5)
    w = normalize(knn_graph(x, 4))
    y = np.zeros((1, 50), np.float32)
    y[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        diffuse(w, y)
    with pytest.raises(ValueError, match="alpha"):
        diffuse(w, np.eye(50, dtype=np.float32)[:1], alpha=1.5)
    # under jit the values are not checked, the shapes are
    with pytest.raises(ValueError, match=r"y must be \[n_queries, n\]"):
        jax.jit(lambda a: diffuse(w, jnp.ones((1, 49)), alpha=a))(0.9)
    with pytest.raises(ValueError, match="scalar"):
        jax.jit(lambda a: diffuse(w, jnp.ones((1, 50)), alpha=a))(jnp.ones(2))
    with pytest.raises(ValueError, match="not normalised"):
        diffuse(Graph.from_dense(np.ones((5, 5)) - np.eye(5)), np.eye(5, dtype=np.float32)[:1])
    asym = np.zeros((4, 4), np.float32)
    asym[0, 1], asym[1, 0], asym[2, 3] = 0.5, 0.2, 0.3
    with pytest.raises(ValueError, match="symmetric"):
        diffuse(Graph.from_dense(asym), np.eye(4, dtype=np.float32)[:1])
    with pytest.raises(TypeError, match="Graph"):
        normalize(np.eye(3))


# ----------------------------------------------------------------------------- methods
def test_method_values_are_traced_one_program_serves_a_grid():
    import dataclasses

    from retrieval_jax.methods import DIFFUSION, METHODS, DiffusionConfig, KnnConfig
    x = _unit(np.random.default_rng(13), 120, 8)
    q = _unit(np.random.default_rng(14), 5, 8)
    states = [DIFFUSION.build(x, DiffusionConfig(k=6, query_k=4, alpha=a, tol=1e-7, max_iter=500))
              for a in (0.8, 0.95)]
    assert jax.tree_util.tree_structure(states[0]) == jax.tree_util.tree_structure(states[1])  # one program
    assert states[1].config.alpha == pytest.approx(0.95)
    base = states[0]
    grid = jax.vmap(lambda a: DIFFUSION.search(
        dataclasses.replace(base, params=dataclasses.replace(base.params, alpha=a)), q))(jnp.array([0.8, 0.95]))
    for g, st in zip(grid, states):
        assert _rel(g, DIFFUSION.search(st, q)) < 1e-5
    with pytest.raises(TypeError, match="DiffusionConfig"):
        DIFFUSION.build(x, KnnConfig())
    assert {"knn", "diffusion", "fsr", "alpha-qe", "dba-qe", "offline-diffusion"} <= set(METHODS)
