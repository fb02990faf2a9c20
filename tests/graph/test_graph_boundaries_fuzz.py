"""Input boundaries of `Graph`, `Graph.from_dense` / `from_scipy` and `save_graph` (fuzz findings).

Bad input gets a clear library-written error at construction or save time, not a silent wrong
result or a JAX / numpy / scipy traceback later; the pytree machinery (jit, vmap, grad,
tree_map, unflattening with placeholder leaves, dataclasses.replace) keeps working.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

import retrieval_jax as rj
from retrieval_jax.graph import Graph, NormalizedGraph, load_graph, neighbour_product, normalize, save_graph


def _ring(n=6):
    """A symmetric ring: node i linked to i - 1 and i + 1, weight 1."""
    i = np.arange(n)
    idx = np.stack([(i - 1) % n, (i + 1) % n], axis=1).astype(np.int32)
    return idx, np.ones((n, 2), np.float32)


# ----------------------------------------------------------------------------- finding 6: weights dtype
@pytest.mark.parametrize("kind", ["int32", "bool", "uint8"])
@pytest.mark.parametrize("as_jax", [False, True])
def test_int_and_bool_weights_become_float32_and_diffuse(kind, as_jax):
    idx, w = _ring()
    w = w.astype(kind)
    g = Graph(jnp.asarray(idx) if as_jax else idx, jnp.asarray(w) if as_jax else w)
    assert jnp.issubdtype(g.weights.dtype, jnp.floating) and g.weights.dtype == np.float32
    assert isinstance(g.weights, jax.Array if as_jax else np.ndarray)
    W = normalize(g)
    np.testing.assert_allclose(np.asarray(W.weights), 0.5)   # a ring's W = A / 2, not truncated to 0
    scores = np.asarray(rj.diffuse(W, rj.indicator_vectors(np.arange(1), 6)))
    assert scores[0, 1] > 0 and scores[0, 3] > 0              # mass spreads beyond the query


@pytest.mark.parametrize("dtype", [np.complex64, object, "U2"])
def test_non_real_weights_are_refused(dtype):
    idx, w = _ring()
    with pytest.raises(TypeError, match="real floating-point"):
        Graph(idx, w.astype(dtype))


def test_int_weights_under_jit_become_float32():
    idx, w = _ring()
    out = jax.jit(lambda i, v: Graph(i, v).weights)(idx, w.astype(np.int32))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [np.int32, bool, np.complex64, "not-a-dtype"])
def test_from_dense_refuses_a_non_float_dtype(dtype):
    a = np.ones((4, 4), np.float32) - np.eye(4, dtype=np.float32)
    with pytest.raises(TypeError, match="floating-point dtype"):
        Graph.from_dense(a, dtype=dtype)
    with pytest.raises(TypeError, match="floating-point dtype"):
        Graph.from_scipy(sp.csr_matrix(a), dtype=dtype)


@pytest.mark.parametrize("matrix_dtype", [bool, np.int64, np.float16, jnp.bfloat16, np.float64])
def test_from_dense_reads_any_real_matrix(matrix_dtype):
    a = (np.ones((4, 4)) - np.eye(4)).astype(matrix_dtype)
    g = Graph.from_dense(a)
    assert g.weights.dtype == jnp.float32
    np.testing.assert_array_equal(g.to_dense(), np.ones((4, 4)) - np.eye(4))


# ----------------------------------------------------------------------------- finding 11: save_graph
def test_save_graph_refuses_an_overflowed_graph(tmp_path):
    idx, w = _ring()
    full = Graph(idx, w, overflow=jnp.int32(3))
    with pytest.raises(ValueError, match="3 edge.*larger max_degree"):
        save_graph(tmp_path / "g.npz", full)
    assert not (tmp_path / "g.npz").exists()
    ok = Graph(idx, w, overflow=jnp.int32(0))   # a fixed capacity that sufficed
    back, _ = load_graph(save_graph(tmp_path / "ok.npz", ok))
    np.testing.assert_array_equal(back.to_dense(), ok.to_dense())


def test_save_graph_refuses_a_graph_that_overflowed_under_jit(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    g = jax.jit(lambda v: rj.knn_graph(v, k=3, mutual=False, method="exact", max_degree=3))(x)
    assert int(g.overflow) > 0
    with pytest.raises(ValueError, match="larger max_degree"):
        save_graph(tmp_path / "g.npz", g)


@pytest.mark.parametrize("value", [object(), None, {"a": 1}, [1, [2, 3]]])
def test_save_graph_refuses_object_metadata(tmp_path, value):
    idx, w = _ring()
    with pytest.raises(TypeError, match="metadata 'extra'.*number, string or array"):
        save_graph(tmp_path / "g.npz", Graph(idx, w), extra=value)
    assert not (tmp_path / "g.npz").exists()


def test_save_graph_keeps_plain_metadata(tmp_path):
    idx, w = _ring()
    _, meta = load_graph(save_graph(tmp_path / "g.npz", Graph(idx, w), k=2, gamma=3.0, name="ring",
                                    ids=np.arange(3)))
    assert meta["k"] == 2 and meta["gamma"] == 3.0 and meta["name"] == "ring"
    np.testing.assert_array_equal(meta["ids"], np.arange(3))


def test_save_graph_refuses_a_traced_graph(tmp_path):
    idx, w = _ring()
    with pytest.raises(TypeError, match="concrete graph"):
        jax.jit(lambda v: save_graph(tmp_path / "g.npz", Graph(idx, v)) and v)(w)


# ----------------------------------------------------------------------------- finding 15: Graph(...)
@pytest.mark.parametrize("make", [
    lambda i, w: Graph(i[:, 0], w[:, 0]),                  # 1-D
    lambda i, w: Graph(i[None], w[None]),                  # 3-D
    lambda i, w: Graph(np.int32(0), np.float32(1.0)),      # 0-d
    lambda i, w: Graph(jnp.asarray(i[:, 0]), jnp.asarray(w[:, 0])),
])
def test_graph_refuses_arrays_that_are_not_2d(make):
    idx, w = _ring()
    with pytest.raises(ValueError, match="2-D arrays"):
        make(idx, w)


def test_graph_refuses_a_missing_field():
    idx, w = _ring()
    with pytest.raises(TypeError, match="weights must be an \\[n, K\\] array, got NoneType"):
        Graph(idx, None)
    with pytest.raises(TypeError, match="indices must be an \\[n, K\\] array, got NoneType"):
        Graph(None, w)


def test_graph_refuses_zero_neighbour_slots():
    with pytest.raises(ValueError, match="at least one neighbour slot"):
        Graph(np.zeros((5, 0), np.int32), np.zeros((5, 0), np.float32))
    with pytest.raises(ValueError, match="at least one neighbour slot"):
        jax.jit(lambda i, v: Graph(i, v).matvec(jnp.ones(5)))(np.zeros((5, 0), np.int32),
                                                             np.zeros((5, 0), np.float32))


def test_neighbour_product_of_zero_slots_is_zero():
    x = jnp.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(neighbour_product(np.zeros((5, 0), np.int32), np.zeros((5, 0)), x), 0)
    np.testing.assert_array_equal(neighbour_product(np.zeros((5, 0), np.int32), np.zeros((5, 0)), x[:, 0]), 0)


def test_graph_converts_lists():
    idx, w = _ring()
    g = Graph(idx.tolist(), w.astype(int).tolist())
    assert isinstance(g.indices, jax.Array) and g.indices.dtype == jnp.int32
    assert g.weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(normalize(g).weights), 0.5)
    with pytest.raises(TypeError, match="rectangular"):
        Graph([[1, 0], [0]], w[:2])


def test_graph_refuses_float_indices_and_mismatched_shapes():
    idx, w = _ring()
    with pytest.raises(TypeError, match="integer neighbour ids"):
        Graph(idx.astype(np.float32), w)
    with pytest.raises(TypeError, match="integer neighbour ids"):
        Graph(idx.astype(bool), w)
    with pytest.raises(ValueError, match="same shape"):
        Graph(idx, w[:, :1])


def test_graph_shape_checks_run_under_jit_and_vmap():
    idx, w = _ring()
    with pytest.raises(ValueError, match="2-D arrays"):
        jax.jit(lambda i, v: Graph(i, v).degree())(idx[:, 0], w[:, 0])
    with pytest.raises(ValueError, match="2-D arrays"):   # vmap strips the leading axis: per example 1-D
        jax.vmap(lambda i, v: Graph(i, v).degree())(idx, w)


# ----------------------------------------------------------------------------- pytree machinery
def test_graph_under_jit_vmap_and_grad():
    idx, w = _ring()
    x = jnp.arange(6.0)

    def score(v, xs):
        return jnp.sum(Graph(jnp.asarray(idx), v).matvec(xs) ** 2)

    ref = score(jnp.asarray(w), x)
    assert float(jax.jit(score)(w, x)) == pytest.approx(float(ref))
    batched = jax.vmap(score, in_axes=(0, None))(jnp.stack([w, 2 * w]), x)
    np.testing.assert_allclose(batched, [ref, 4 * ref], rtol=1e-6)
    grad = jax.grad(score)(jnp.asarray(w), x)
    assert grad.shape == w.shape and np.isfinite(np.asarray(grad)).all()


def test_graph_as_a_jit_and_vmap_argument():
    idx, w = _ring()
    g = Graph(jnp.asarray(idx), jnp.asarray(w))
    x = jnp.arange(6.0)
    np.testing.assert_allclose(jax.jit(lambda h, v: h.matvec(v))(g, x), g.matvec(x))
    # a batch of graphs ([2, n, K] leaves) is a tree op, not a construction (Graph(3-D) is refused)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), g, dataclasses.replace(g, weights=3 * g.weights))
    out = jax.vmap(lambda h: h.matvec(x), in_axes=(Graph(0, 0),))(stacked)
    np.testing.assert_allclose(out[1], 3 * g.matvec(x), rtol=1e-6)
    grads = jax.grad(lambda h: jnp.sum(h.matvec(x)), allow_int=True)(g)   # float0 index leaves
    assert isinstance(grads, Graph) and grads.weights.shape == w.shape


def test_graph_tree_operations_keep_working():
    idx, w = _ring()
    g = Graph(jnp.asarray(idx), jnp.asarray(w), overflow=jnp.int32(0))
    leaves, treedef = jax.tree_util.tree_flatten(g)
    # placeholders of any kind unflatten without a check
    for fill in (object(), None, 0, 1.5):
        h = jax.tree_util.tree_unflatten(treedef, [fill] * len(leaves))
        assert h.indices is fill
    sums = jax.tree_util.tree_map(lambda a: jnp.sum(a), g)   # 0-d leaves: a tree op, not a construction
    assert sums.indices.shape == ()
    shapes = jax.eval_shape(lambda h: h, g)
    assert isinstance(shapes, Graph) and shapes.indices.shape == idx.shape
    doubled = dataclasses.replace(g, weights=2 * g.weights)
    np.testing.assert_allclose(np.asarray(doubled.weights), 2.0)
    with pytest.raises(ValueError, match="same shape"):
        dataclasses.replace(g, weights=g.weights[:, :1])
    # vmap axis specs and shape specs are Graphs of non-array leaves
    assert Graph(0, None).weights is None and Graph(None, None).indices is None
    spec = Graph(jax.ShapeDtypeStruct(idx.shape, jnp.int32), jax.ShapeDtypeStruct(w.shape, jnp.float32))
    assert spec.num_nodes == 6
    wn = normalize(g)
    assert isinstance(dataclasses.replace(wn, layout=None), NormalizedGraph)
    assert isinstance(jax.tree_util.tree_map(lambda a: a, wn), NormalizedGraph)


# ----------------------------------------------------------------------------- finding 18: from_dense / from_scipy
@pytest.mark.parametrize("matrix", [
    np.zeros((2, 3, 3)), np.zeros((3, 3), object), None, np.zeros(4), np.zeros((3, 3), np.complex64),
    "abc", [[0, 1], [1]], sp.csr_matrix(np.ones((3, 3), np.complex64)),
])
def test_from_dense_and_from_scipy_refuse_non_matrices(matrix):
    with pytest.raises(ValueError, match="2-D square real matrix"):
        Graph.from_dense(matrix)
    with pytest.raises(ValueError, match="2-D square real matrix"):
        Graph.from_scipy(matrix)


def test_from_dense_refuses_a_non_square_matrix():
    with pytest.raises(ValueError, match="square matrix, got shape \\(3, 4\\)"):
        Graph.from_dense(np.ones((3, 4)))


@pytest.mark.parametrize("max_degree", [25.5, 0, -2, True, "5", np.float64(5.0)])
def test_max_degree_must_be_a_positive_int(max_degree):
    a = np.ones((4, 4)) - np.eye(4)
    with pytest.raises(ValueError, match="max_degree must be a positive int"):
        Graph.from_dense(a, max_degree=max_degree)


def test_max_degree_accepts_numpy_ints_and_still_checks_the_widest_row():
    a = np.ones((4, 4)) - np.eye(4)
    assert Graph.from_dense(a, max_degree=np.int64(5)).max_degree == 5
    with pytest.raises(ValueError, match="smaller than the largest row"):
        Graph.from_dense(a, max_degree=2)


def test_a_graph_built_inside_jit_from_concrete_ids_and_traced_weights():
    # the ids are closed over (concrete) while the weights are traced: the range check still
    # reads them as values, and a bad id is still refused
    idx = jnp.array([[1], [0]], jnp.int32)
    out = jax.jit(lambda v: Graph(idx, v).matvec(jnp.array([1.0, 2.0])))(jnp.array([[0.5], [0.25]]))
    np.testing.assert_allclose(np.asarray(out), [1.0, 0.25])
    bad = jnp.array([[2], [0]], jnp.int32)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        jax.jit(lambda v: Graph(bad, v).matvec(jnp.ones(2)))(jnp.array([[0.5], [0.25]]))
