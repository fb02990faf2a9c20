"""`neighbour_product`: the product of bare neighbour lists, as `Graph.matvec` and a loop compute it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.graph import Graph, neighbour_product


def _loop_product(idx, w, x):
    y = np.zeros((idx.shape[0],) + x.shape[1:])
    for i in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            y[i] += w[i, k] * x[idx[i, k]]
    return y


@pytest.mark.parametrize("unroll", [None, 1, 3, 6])
def test_neighbour_product_is_the_sum_over_slots(unroll):
    rng = np.random.default_rng(0)
    n, k = 40, 6
    idx = rng.integers(0, n, (n, k)).astype(np.int32)
    w = rng.random((n, k)).astype(np.float32)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    ref = _loop_product(idx, w, x)
    np.testing.assert_allclose(neighbour_product(idx, w, x, unroll=unroll), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(neighbour_product(idx, w, x[:, 0]), ref[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(Graph(idx, w).matvec(x), neighbour_product(idx, w, x))


def test_neighbour_product_accumulates_low_precision_in_float32():
    rng = np.random.default_rng(1)
    n, k = 30, 8
    idx = rng.integers(0, n, (n, k)).astype(np.int32)
    w = rng.random((n, k)).astype(np.float32)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = jax.jit(lambda v: neighbour_product(idx, w, v, accumulate=jnp.float32))(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), _loop_product(idx, w, x), rtol=0.05, atol=0.05)
