"""Bad input at the public boundary gets a clear error, never a silent NaN or garbage
result nor a traceback from deep inside numpy / JAX.

Each test is one case that once went wrong: either a result came back without a word
(negative weights, ids out of range, NaN or complex inputs, an indefinite operator), or
the error came from deep inside (None labels or positives, an object dtype in a
checkpoint). Under ``jax.jit`` values cannot be checked, so there the result record
carries the verdict (`CGResult.status`) and the checks run at the concrete entry point.
"""
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import temp_files, writer_at_half
from retrieval_jax.diffusion import (conjugate_gradient, diffuse, diffusion_inverse, indicator_vectors,
                                     ranking_from_scores, top_n)
from retrieval_jax.diffusion.cg import CGStatus
from retrieval_jax.evaluation import label_map, mean_average_precision
from retrieval_jax.files import atomic_write
from retrieval_jax.graph import Graph, NormalizedGraph, affinity_matrix, knn_graph, load_graph, normalize, save_graph
from retrieval_jax.spectral import (fast_spectral_ranking, fast_spectral_ranking_sparse, graph_eigenpairs,
                                    regularized_laplacian_filter, spectral_embedding)
from retrieval_jax.training.checkpoints import load_checkpoint, save_checkpoint



@pytest.fixture(scope="module")
def small():
    """(A, W): a 60-node mutual kNN affinity and its normalisation."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = knn_graph(x, 6)
    return a, normalize(a)


# --------------------------------------------------------------------------- 1
def test_from_dense_refuses_negative_weights():
    a = np.array([[0.0, -1.0], [-1.0, 0.0]])
    with pytest.raises(ValueError, match="negative"):
        Graph.from_dense(a)
    with pytest.raises(ValueError, match="negative"):
        Graph.from_scipy(a)
    # non-negative matrices still build, equal to the input
    ok = Graph.from_dense(np.abs(a))
    np.testing.assert_array_equal(ok.to_dense(), np.abs(a))


# --------------------------------------------------------------------------- 2
def test_graph_construction_refuses_neighbour_ids_out_of_range():
    w = jnp.ones((2, 1))
    for bad in ([[5], [0]], [[1], [-1]], [[2], [0]]):
        with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
            Graph(indices=jnp.array(bad), weights=w)
        with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
            Graph(indices=np.array(bad, np.int32), weights=np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="shape"):
        Graph(indices=jnp.array([[1], [0]]), weights=jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="integer"):
        Graph(indices=jnp.array([[1.0], [0.0]]), weights=w)
    # in range (the padding slots hold the node's own id): the product is A x
    g = Graph(indices=jnp.array([[1, 0], [0, 1]]), weights=jnp.array([[2.0, 0.0], [3.0, 0.0]]))
    np.testing.assert_allclose(np.asarray(g.matvec(jnp.array([1.0, 10.0]))), [20.0, 3.0])
    # traced ids are not values: the graph is built inside jit without a check
    out = jax.jit(lambda i, v: Graph(indices=i, weights=jnp.ones((2, 1))).matvec(v))(
        jnp.array([[1], [0]]), jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(np.asarray(out), [2.0, 1.0])


# --------------------------------------------------------------------------- 3
def test_rankings_refuse_complex_and_nan_scores():
    with pytest.raises(TypeError, match="real"):
        ranking_from_scores(np.array([[1 + 1j, 2.0]]))
    with pytest.raises(ValueError, match="NaN"):
        top_n(np.array([[np.nan, 1.0, 2.0]], np.float32), 2)
    with pytest.raises(TypeError, match="real"):
        top_n(np.array([[1 + 1j, 2.0]]), 1)
    vals, idx = top_n(np.array([[0.5, 1.0, 2.0]], np.float32), 2)
    np.testing.assert_array_equal(np.asarray(idx), [[2, 1]])
    np.testing.assert_array_equal(ranking_from_scores(np.array([[0.5, 1.0, 2.0]])), [[2, 1, 0]])


# --------------------------------------------------------------------------- 4
def test_inverse_weighted_rows_refuses_nan_weights(small):
    _, w = small
    inv = diffusion_inverse(w, 0.9)
    with pytest.raises(ValueError, match="NaN"):
        inv.weighted_rows(jnp.array([[np.nan, 1.0]]), jnp.array([[0, 1]]))
    with pytest.raises(TypeError, match="real"):
        inv.weighted_rows(jnp.array([[1j, 1.0]]), jnp.array([[0, 1]]))
    ref = np.linalg.inv(np.eye(60) - 0.9 * w.to_dense().astype(np.float64))
    np.testing.assert_allclose(np.asarray(inv.weighted_rows(jnp.array([[2.0, 1.0]]), jnp.array([[0, 1]])))[0],
                               2 * ref[0] + ref[1], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- 5
def test_eigenpairs_refuse_zero_tol_and_fsr_refuses_complex_y(small):
    _, w = small   # 60 nodes: every component is solved densely, where tol was never read
    for tol in (0, 0.0, -1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol"):
            graph_eigenpairs(w, 3, tol=tol)
    emb = spectral_embedding(w, 10, regularized_laplacian_filter(0.9))
    with pytest.raises(TypeError, match="real"):
        fast_spectral_ranking(emb, np.ones((1, 60)) * (1 + 1j))
    with pytest.raises(TypeError, match="real"):
        fast_spectral_ranking_sparse(emb, np.ones((1, 2)) * (1 + 1j), np.array([[0, 1]]))


# --------------------------------------------------------------------------- 6
def test_cg_reports_nan_rhs_and_indefinite_operator():
    indefinite = jnp.array([[1.0, 0.0], [0.0, -1.0]])
    spd = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        conjugate_gradient(lambda v: v, jnp.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="positive definite"):
        conjugate_gradient(lambda v: indefinite @ v, jnp.array([1.0, 1.0]))
    # under jit the values are not known at the call: the record says what happened
    solve = jax.jit(lambda a, b: conjugate_gradient(lambda v: a @ v, b, max_iter=10))
    res = solve(indefinite, jnp.array([[1.0, 1.0], [1.0, 0.0]]))
    assert int(res.status[0]) == CGStatus.INDEFINITE
    assert not np.isfinite(np.asarray(res.x[:, 0])).any()
    assert int(res.status[1]) == CGStatus.CONVERGED        # b in the positive eigenspace: solved
    np.testing.assert_allclose(np.asarray(res.x[:, 1]), [1.0, 0.0], atol=1e-6)
    res = solve(spd, jnp.array([[np.nan, 1.0], [1.0, 1.0]]))
    assert [int(s) for s in res.status] == [CGStatus.NONFINITE, CGStatus.CONVERGED]
    np.testing.assert_allclose(np.asarray(res.x[:, 1]), np.linalg.solve(np.asarray(spd), [1.0, 1.0]), rtol=1e-5)
    res = jax.jit(lambda b: conjugate_gradient(lambda v: spd @ v, b, max_iter=1))(jnp.array([1.0, 3.0]))
    assert int(res.status) == CGStatus.MAX_ITER


# --------------------------------------------------------------------------- 7
def test_affinity_matrix_refuses_nan_similarities():
    with pytest.raises(ValueError, match="NaN"):
        affinity_matrix(np.array([[np.nan], [0.5]]), np.array([[1], [0]]), 2)
    a = affinity_matrix(np.array([[0.5], [0.5]]), np.array([[1], [0]]), 2, gamma=3.0).toarray()
    np.testing.assert_allclose(a, [[0.0, 0.125], [0.125, 0.0]])


# --------------------------------------------------------------------------- 8
def test_affinity_matrix_refuses_ids_out_of_range():
    for bad in ([[7], [0]], [[1], [-1]]):
        with pytest.raises(ValueError, match=r"idx .*\[0, 2\)"):
            affinity_matrix(np.array([[0.5], [0.5]]), np.array(bad), 2)
    with pytest.raises(ValueError, match="shape"):
        affinity_matrix(np.array([[0.5], [0.5]]), np.array([[1, 0], [0, 1]]), 2)


# --------------------------------------------------------------------------- 9
def test_label_map_refuses_none_labels():
    ranking = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    with pytest.raises(ValueError, match=r"labels has None .*1"):
        label_map(ranking, ["a", None, "a"])
    with pytest.raises(ValueError, match=r"labels has None"):
        label_map(ranking, [None, 1, 1])
    with pytest.raises(TypeError, match="labels"):
        label_map(ranking, np.array([1, "a", 1], dtype=object))
    # each query's one positive sits second after its own (junk) entry: the trapezoid AP of
    # `average_precision` is (0/1 + 1/2) / 2 = 0.25; "b" is a singleton class, left out
    assert label_map(ranking, ["a", "b", "a"]) == pytest.approx(0.25)


# --------------------------------------------------------------------------- 10
def test_mean_average_precision_refuses_none_positives():
    ranking = np.array([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(TypeError, match="positives"):
        mean_average_precision(ranking, None)
    with pytest.raises(TypeError, match=r"positives\[1\] is None"):
        mean_average_precision(ranking, [[0], None])
    with pytest.raises(TypeError, match=r"junk\[0\] is None"):
        mean_average_precision(ranking, [[0], [1]], [None, []])
    res = mean_average_precision(ranking, [[1], [1]], ks=(1,))
    assert res.map == pytest.approx(0.25)       # the positive second: (0/1 + 1/2) / 2


# --------------------------------------------------------------------------- 11
def test_checkpoint_object_dtype_is_refused_on_save_and_load(tmp_path):
    with pytest.raises(TypeError, match=r"\['x'\]"):
        save_checkpoint(tmp_path / "obj.npz", {"x": np.array([1, "a"], dtype=object)})
    assert not (tmp_path / "obj.npz").exists()
    # a file whose metadata claims an object dtype for a number array
    meta = {"version": 1, "leaves": [{"name": "x", "path": [["d", "x"]], "dtype": "object"}]}
    path = tmp_path / "meta.npz"
    np.savez(path, x=np.arange(3), __retrieval_jax_meta__=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match=r"meta\.npz.*dtype 'object'"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- 12
_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from retrieval_jax.files import atomic_write

    def write(f):
        f.write(b"half of the new content")
        f.flush()
        print("half", flush=True)
        time.sleep(120)

    atomic_write(sys.argv[1], write)
""")


def test_killed_writer_temp_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"old"))
    for _ in range(2):
        with writer_at_half(_SLOW_WRITER, path):
            live = temp_files(tmp_path)
            assert len(live) == 1 and live[0].startswith(".out.bin.")
            # a writer still at work keeps its temporary file through another write
            atomic_write(path, lambda f: f.write(b"mid"))
            assert temp_files(tmp_path) == live and path.read_bytes() == b"mid"
        assert path.read_bytes() == b"mid"      # the killed writer never replaced the file
        assert temp_files(tmp_path) == live          # its orphan is there ...
        atomic_write(path, lambda f: f.write(b"new"))
        assert temp_files(tmp_path) == []            # ... until the next write of the target
        assert path.read_bytes() == b"new"


# --------------------------------------------------------------------------- 13
@pytest.mark.parametrize("mmap", [False, True])
def test_loaded_normalized_graph_is_checked_once_not_at_every_diffusion(tmp_path, small, monkeypatch, mmap):
    a, w = small
    path = save_graph(tmp_path / "w.npz", w, k=6)
    back, meta = load_graph(path, num_nodes=60, mmap=mmap)
    assert isinstance(back, NormalizedGraph) and set(meta) == {"k"}
    np.testing.assert_array_equal(np.asarray(back.weights), np.asarray(w.weights))
    calls = []
    real = Graph.to_scipy
    monkeypatch.setattr(Graph, "to_scipy", lambda self: calls.append(1) or real(self))
    y = indicator_vectors(np.array([0, 5]), 60)
    scores = diffuse(back, y, alpha=0.9, tol=1e-7, max_iter=200)
    assert calls == []                       # no scipy copy, no |W - W^T|, no power iteration
    ref = np.linalg.solve(np.eye(60) - 0.9 * real(w).toarray().astype(np.float64), np.asarray(y).T).T
    np.testing.assert_allclose(np.asarray(scores), ref, rtol=1e-4, atol=1e-5)
    # an affinity saved as plain Graph comes back plain (and is checked when diffused)
    plain, _ = load_graph(save_graph(tmp_path / "a.npz", a), mmap=mmap)
    assert type(plain) is Graph
    # a file that claims to be normalised but is not is refused at load
    fake = NormalizedGraph(indices=a.indices, weights=a.weights)
    with pytest.raises(ValueError, match="fake.npz.*not normalised"):
        load_graph(save_graph(tmp_path / "fake.npz", fake), mmap=mmap)
    asym = np.zeros((3, 3), np.float32)
    asym[0, 1], asym[1, 0], asym[1, 2], asym[2, 1] = 0.5, 0.1, 0.2, 0.2
    g = Graph.from_dense(asym)
    with pytest.raises(ValueError, match="asym.npz.*symmetric"):
        load_graph(save_graph(tmp_path / "asym.npz", NormalizedGraph(indices=g.indices, weights=g.weights)),
                   mmap=mmap)
