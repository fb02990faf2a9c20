"""A method's search called inside the caller's jax.jit: its query shape and dtype are
checked at trace time, and its values (NaN or inf query rows, item ids out of range) when
the computation runs, as the concrete path checks them at once. A good traced search
equals the eager one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.methods import DIFFUSION, KNN_SEARCH, DiffusionConfig, KnnConfig


def _unit(seed, n, d=8):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module", params=["diffusion", "knn"])
def method_state(request):
    x = _unit(0, 90)
    if request.param == "diffusion":
        return DIFFUSION, DIFFUSION.build(x, DiffusionConfig(k=6, query_k=4))
    return KNN_SEARCH, KNN_SEARCH.build(x, KnnConfig())


def test_a_traced_search_equals_the_eager_one(method_state):
    method, state = method_state
    q = _unit(1, 5)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda q: method.search(state, q))(q)),
                               np.asarray(method.search(state, q)), rtol=1e-5, atol=1e-6)
    ids = np.array([3, 7])
    np.testing.assert_allclose(np.asarray(jax.jit(lambda i: method.search_items(state, i))(ids)),
                               np.asarray(method.search_items(state, ids)), rtol=1e-5, atol=1e-6)


def test_traced_query_values_fail_when_the_computation_runs(method_state):
    method, state = method_state
    q = _unit(1, 4)
    q[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):        # concrete: at once
        method.search(state, q)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"queries contain NaN or inf in 1 row\(s\) \(first: row 2\)"):
        jax.block_until_ready(jax.jit(lambda q: method.search(state, q))(q))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"ids must lie in \[0, 90\): 1 do not \(first: position 1\)"):
        jax.block_until_ready(jax.jit(lambda i: method.search_items(state, i))(np.array([3, 90])))


def test_traced_query_shapes_and_dtypes_are_checked_at_trace_time(method_state):
    method, state = method_state
    run = jax.jit(lambda q: method.search(state, q))
    with pytest.raises(ValueError, match="dimension mismatch: queries have d = 7"):
        run(jnp.ones((3, 7)))
    with pytest.raises(ValueError, match="2-D"):
        run(jnp.ones(8))
    with pytest.raises(TypeError, match="complex"):
        run(jnp.ones((3, 8), jnp.complex64))
    with pytest.raises(ValueError, match="integer"):
        jax.jit(lambda i: method.search_items(state, i))(jnp.ones(2))
