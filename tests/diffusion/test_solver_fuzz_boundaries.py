"""Inputs an independent fuzz of the public API found silent (NaN, zeros or a plausible
wrong ranking) or raw (an error from inside JAX): each gets the right result or a clear
error now. Reference results are dense solves (numpy) of the same system."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import retrieval_jax as rj
from retrieval_jax.diffusion import (CG, Auto, DiffusionOperator, ExactInverse, Spectral, conjugate_gradient,
                                     diffusion_operator, observe_items, offline_rows, solve, truncated_diffuse)
from retrieval_jax.graph import Graph, normalize
from retrieval_jax.methods import DiffusionConfig
from retrieval_jax.spectral import regularized_laplacian_filter, spectral_embedding

N = 80


@pytest.fixture(scope="module")
def data():
    x = np.random.default_rng(0).standard_normal((N, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = rj.knn_graph(x, k=8, mutual=False)
    return x, a, normalize(a)


def _dense_solution(w, y, alpha):
    m = np.eye(N) - alpha * w.to_scipy().toarray().astype(np.float64)
    return np.linalg.solve(m, np.asarray(y, np.float64).T).T


def test_normalize_refuses_a_directed_graph(data):
    _, a, _ = data
    dense = np.asarray(a.to_scipy().toarray())
    dense[0, 1], dense[1, 0] = 5.0, 0.0
    with pytest.raises(ValueError, match="not symmetric"):
        normalize(Graph.from_dense(dense))


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_diffuse_solves_right_hand_sides_of_any_magnitude(data, scale):
    # ||y||^2 under- or overflows float32 at these scales: the solve used to stop at x = 0 or give NaN
    _, _, w = data
    y = np.asarray(rj.indicator_vectors(np.arange(3), N))
    got = np.asarray(rj.diffuse(w, y * scale, alpha=0.9, max_iter=200))
    want = _dense_solution(w, y, 0.9)
    np.testing.assert_allclose(got / scale, want, rtol=1e-4, atol=1e-5)


def test_power_of_two_scaling_leaves_the_iterates_unchanged(data):
    _, _, w = data
    y = np.asarray(rj.indicator_vectors(np.arange(3), N)) * 3.7
    a = np.asarray(rj.diffuse(w, y, alpha=0.9, max_iter=7))
    b = np.asarray(rj.diffuse(w, y * 2.0 ** 40, alpha=0.9, max_iter=7)) / 2.0 ** 40
    np.testing.assert_array_equal(a, b)


def test_a_breakdown_inside_solve_raises(data):
    _, _, w = data
    op = DiffusionOperator(graph=w, alpha=jnp.float32(1.5))   # I - 1.5 W: indefinite (built past the checks)
    with pytest.raises(ValueError, match="solve failed on"):
        solve(op, rj.indicator_vectors(np.arange(2), N), CG(1e-6, 50))
    # under a trace the check runs with the computation (throw=True, the default) ...
    y = rj.indicator_vectors(np.arange(2), N)
    with pytest.raises(jax.errors.JaxRuntimeError, match="solve failed on 2 query"):
        jax.block_until_ready(jax.jit(lambda o, y: solve(o, y, CG(1e-6, 50)))(op, y))
    # ... and with throw=False the record says it: NaN scores and a NaN residual, no exception
    sol = jax.jit(lambda o, y: solve(o, y, CG(1e-6, 50), throw=False))(op, y)
    assert np.isnan(np.asarray(sol.residual)).all() and np.isnan(np.asarray(sol.scores)).all()
    sol = solve(op, y, CG(1e-6, 50), throw=False)
    assert np.isnan(np.asarray(sol.residual)).all()


def _nan_row(n=N):
    y = np.zeros((2, n), np.float32)
    y[0, 3] = 1.0
    y[1, 5] = np.nan
    return y


def test_values_under_jit_vmap_and_grad_fail_when_the_computation_runs(data):
    _, _, w = data
    y = _nan_row()
    bad = "solve failed on 1 query"
    with pytest.raises(jax.errors.JaxRuntimeError, match=bad):   # NaN in y, which only the solve can see
        jax.block_until_ready(jax.jit(lambda y: rj.diffuse(w, y, alpha=0.9))(y))
    with pytest.raises(jax.errors.JaxRuntimeError, match=bad):
        jax.block_until_ready(jax.jit(jax.vmap(lambda a: rj.diffuse(w, y, alpha=a)))(jnp.array([0.5, 0.9])))
    with pytest.raises(jax.errors.JaxRuntimeError, match=bad):
        jax.block_until_ready(jax.jit(jax.grad(lambda a, y: jnp.nansum(rj.diffuse(w, y, alpha=a))))(0.9, y))
    nan_weights = w.weights.at[4, 0].set(jnp.nan)
    with pytest.raises(jax.errors.JaxRuntimeError, match=bad):   # NaN in W's traced weights
        jax.block_until_ready(jax.jit(lambda v: rj.katz_centrality(dataclasses.replace(w, weights=v), 0.9))(
            nan_weights))
    shortlist = np.stack([np.arange(10), np.arange(10)])
    with pytest.raises(jax.errors.JaxRuntimeError, match=bad):
        jax.block_until_ready(jax.jit(lambda y: truncated_diffuse(w, y, shortlist, alpha=0.9))(y))
    # throw=False: the record and NaN scores, no exception; the good query is still right
    x, info = jax.jit(lambda y: rj.diffuse(w, y, alpha=0.9, max_iter=200, return_info=True, throw=False))(y)
    assert np.isnan(np.asarray(info.residual[1])) and np.isnan(np.asarray(x[1])).all()
    np.testing.assert_allclose(np.asarray(x[0]), _dense_solution(w, y[:1], 0.9)[0], rtol=1e-4, atol=1e-5)
    scores, info = truncated_diffuse(w, np.nan_to_num(y), shortlist, alpha=0.9, return_info=True, throw=False)
    assert np.isfinite(np.asarray(scores)).all()


def test_a_good_solve_under_jit_is_unchanged_by_the_runtime_check(data):
    _, _, w = data
    y = np.asarray(rj.indicator_vectors(np.arange(3), N))
    got = jax.jit(lambda y: rj.diffuse(w, y, alpha=0.9, max_iter=200))(y)
    np.testing.assert_allclose(np.asarray(got), _dense_solution(w, y, 0.9), rtol=1e-4, atol=1e-5)
    k = jax.jit(lambda a: rj.katz_centrality(w, a, max_iter=300))(0.9)
    np.testing.assert_allclose(np.asarray(k), 0.1 * _dense_solution(w, np.ones((1, N)), 0.9)[0], rtol=1e-4)


@pytest.mark.parametrize("throw", ["yes", 1, None])
def test_throw_is_a_flag(data, throw):
    _, _, w = data
    y = rj.indicator_vectors(np.arange(2), N)
    with pytest.raises((TypeError, ValueError), match="throw"):
        rj.diffuse(w, y, throw=throw)
    with pytest.raises((TypeError, ValueError), match="throw"):
        solve(diffusion_operator(w, 0.9), y, throw=throw)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_observations_solve_in_float32(data, dtype):
    x, _, w = data
    sims, ids = rj.knn(x[:3], x, 5)
    y = rj.query_vectors(jnp.asarray(sims).astype(dtype), ids, N)
    got = rj.diffuse(w, y, alpha=0.9, max_iter=200)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _dense_solution(w, np.asarray(y, np.float32), 0.9),
                               rtol=1e-4, atol=1e-5)


def test_solve_checks_a_given_state(data):
    _, _, w = data
    y = rj.indicator_vectors(np.arange(2), N)
    state = ExactInverse().init(diffusion_operator(w, 0.5))
    with pytest.raises(ValueError, match="alpha = 0.5"):
        solve(diffusion_operator(w, 0.9), y, ExactInverse(), state)
    np.testing.assert_allclose(np.asarray(solve(diffusion_operator(w, 0.5), y, ExactInverse(), state).scores),
                               _dense_solution(w, y, 0.5), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="needs the state"):
        solve(diffusion_operator(w, 0.5), y, Spectral(rank=5), state)
    with pytest.raises(TypeError, match="no offline state"):
        solve(diffusion_operator(w, 0.5), y, CG(), state)
    small = normalize(rj.knn_graph(np.eye(40, 8, dtype=np.float32) + 0.1, k=3, mutual=False))
    with pytest.raises(ValueError, match="another graph"):
        solve(diffusion_operator(w, 0.5), y, ExactInverse(), ExactInverse().init(diffusion_operator(small, 0.5)))


def test_spectral_init_under_jit_says_where_to_call_it(data):
    _, _, w = data
    op = diffusion_operator(w, 0.9)
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda y: solve(op, y, Spectral(rank=5)).scores)(rj.indicator_vectors(np.arange(2), N))


def test_spectral_embedding_refuses_an_affinity(data):
    x, _, _ = data
    a = rj.knn_graph(x, k=30, mutual=False)
    with pytest.raises(ValueError, match="outside \\[-1, 1\\]"):
        spectral_embedding(a, 5, regularized_laplacian_filter(0.99))


def test_offline_rows_refuses_an_affinity(data):
    x, _, _ = data
    with pytest.raises(ValueError, match="not normalised"):
        offline_rows(rj.knn_graph(x, k=30, mutual=False), x, 20)


def test_zero_queries_give_empty_scores_on_every_route(data):
    _, _, w = data
    op = diffusion_operator(w, 0.9)
    none = observe_items(np.array([], np.int32), N)
    for solver in (ExactInverse(), Auto(), CG()):
        assert solve(op, none, solver).scores.shape == (0, N)
    assert truncated_diffuse(w, np.zeros((0, N), np.float32), np.zeros((0, 5), np.int32)).shape == (0, 5)


@pytest.mark.parametrize("tol", [1.0, 2.0, "1e-6"])
def test_tolerances_outside_zero_one_are_refused(data, tol):
    _, _, w = data
    y = rj.indicator_vectors(np.arange(2), N)
    err = TypeError if isinstance(tol, str) else ValueError
    with pytest.raises(err, match="tol"):
        rj.diffuse(w, y, tol=tol)
    with pytest.raises(err, match="tol"):
        CG(tol).validate()
    with pytest.raises(err, match="tol"):
        DiffusionConfig(tol=tol)


def test_alpha_that_rounds_to_one_in_float32_is_refused(data):
    _, _, w = data
    with pytest.raises(ValueError, match="rounds to 1 in float32"):
        rj.diffuse(w, rj.indicator_vectors(np.arange(2), N), alpha=1 - 1e-9)


def test_conjugate_gradient_checks_its_arguments():
    a = jnp.asarray(np.diag(np.arange(1.0, 6.0)), jnp.float32)
    b = jnp.ones((5,), jnp.float32)
    mv = lambda v: a @ v  # noqa: E731
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(mv, b, tol=float("nan"))
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_iter"):
            conjugate_gradient(mv, b, max_iter=bad)
    with pytest.raises(ValueError, match="x0"):
        conjugate_gradient(mv, b, x0=jnp.ones(3))
    with pytest.raises(ValueError, match="matvec"):
        conjugate_gradient(lambda v: v[:3], b)
    np.testing.assert_allclose(np.asarray(conjugate_gradient(mv, b, max_iter=10).x), 1 / np.arange(1.0, 6.0),
                               rtol=1e-5)


def test_the_affinity_from_knn_graph_is_refused_where_w_is_needed(data):
    # small weights (k = 5): A's spectrum lies inside [-1, 1], so only its type can tell it from W
    x, _, _ = data
    a = rj.knn_graph(x, k=5)
    assert isinstance(a, rj.graph.AffinityGraph)
    y = rj.indicator_vectors(np.arange(3), N)
    with pytest.raises(ValueError, match="pass normalize\\(A\\)"):
        rj.diffuse(a, y)
    with pytest.raises(ValueError, match="pass normalize\\(A\\)"):    # under a trace as well
        jax.jit(lambda xx, yy: rj.diffuse(rj.knn_graph(xx, 5, method="exact"), yy))(x, y)
    w = normalize(a)
    assert type(w) is rj.NormalizedGraph
    np.testing.assert_allclose(np.asarray(rj.diffuse(w, y, alpha=0.9, max_iter=200)),
                               _dense_solution(w, y, 0.9), rtol=1e-4, atol=1e-5)


def test_flags_must_be_booleans(data):
    x, a, _ = data
    from retrieval_jax.descriptors import apply_whitening, learn_pca_whitening
    from retrieval_jax.evaluation import label_map
    with pytest.raises(TypeError, match="mutual must be True or False"):
        rj.knn_graph(x, k=5, mutual="no")
    with pytest.raises(TypeError, match="locality must be True or False"):
        normalize(a, locality="no")
    ranking = np.argsort(-(x @ x.T), axis=1)
    with pytest.raises(TypeError, match="exclude_self must be True or False"):
        label_map(ranking, np.arange(N) % 4, exclude_self="no")
    with pytest.raises(TypeError, match="normalize must be True or False"):
        apply_whitening(learn_pca_whitening(x), x, normalize="no")
    assert label_map(ranking, np.arange(N) % 4, exclude_self=np.bool_(True)) == label_map(ranking, np.arange(N) % 4)


def test_observations_refuse_empty_complex_and_overflowing_similarities(data):
    x, _, _ = data
    sims, ids = rj.knn(x[:3], x, 5)
    sims, ids = np.asarray(sims), np.asarray(ids)
    with pytest.raises(ValueError, match="at least one neighbour"):
        rj.query_vectors(sims[:, :0], ids[:, :0], N)
    with pytest.raises(TypeError, match="real numbers"):
        rj.query_vectors(sims.astype(np.complex64), ids, N)
    with pytest.raises(ValueError, match="overflows"):
        rj.query_vectors(sims * 1e20, ids, N)


def test_gmp_weights_refuse_a_nan_region_unless_masked():
    from retrieval_jax.diffusion import gmp_weights
    r = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    r[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="regions has 1 NaN"):
        gmp_weights(r)
    mask = np.ones((2, 3), bool)
    mask[1, 2] = False
    b = np.asarray(gmp_weights(r, mask))
    assert np.isfinite(b).all() and b[1, 2] == 0
    with pytest.raises(TypeError, match="complex"):
        gmp_weights(r.astype(np.complex64))
