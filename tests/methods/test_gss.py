"""GSS against a dense numpy reference written from the paper / reference code; loss, gradient, jit, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import unit_clusters
from retrieval_jax.methods import METHODS
from retrieval_jax.methods.gss import (GSS, GssConfig, GssState, embed_queries, graph_convolution, gss_embeddings,
                                       gss_graph, gss_loss, gss_objective, init_gss, initial_beta,
                                       make_gss_train_step, train_gss)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- numpy reference
def _np_normalised(adj):
    """D^-1/2 (A + I) D^-1/2 with D the row sums of A + I (the reference's preprocess_graph)."""
    a = adj + np.eye(adj.shape[0])
    d = a.sum(axis=1)
    return a / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]


def _np_database_adjacency(x, k):
    """Top-k of each similarity row (the item itself included), both ways, self-edge dropped."""
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    a = np.zeros_like(s)
    for i in range(len(x)):
        top = np.argsort(-s[i], kind="stable")[:k]
        a[i, top] = s[i, top]
        a[top, i] = s[i, top]
        a[i, i] = 0.0
    return np.maximum(a, 0.0)


def _np_elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _np_network(a_hat, x, layers, decay):
    """Two (or L) residual graph convolutions by hand, then rows L2-normalised."""
    h, residual = x.astype(np.float64), None
    for w, b in layers:
        pre = a_hat @ h @ w + b
        out = _np_elu(pre)
        h = out if residual is None else residual + decay * out
        residual = pre
    return h / np.linalg.norm(h, axis=1, keepdims=True)


def _np_gss_scores(x, q, k, kq, layers, decay):
    """Database embeddings and query scores on the reference's combined [queries; database] graph."""
    n, nq = len(x), len(q)
    a_x = _np_database_adjacency(x, k)
    e_x = _np_network(_np_normalised(a_x), x, layers, decay)
    sq = q.astype(np.float64) @ x.T
    big = np.zeros((nq + n, nq + n))
    for r in range(nq):
        top = np.argsort(-sq[r], kind="stable")[:kq]
        big[r, nq + top] = np.maximum(sq[r, top], 0.0)
    big[nq:, nq:] = a_x
    e_all = _np_network(_np_normalised(big), np.concatenate([q, x]), layers, decay)
    return e_x, e_all[:nq] @ e_x.T, e_all[nq:]


def _layers(state):
    return [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in state.model.weights()]


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def trained():
    """A toy clustered set, GSS trained 2 epochs on it (k = 4, query_k = 3), snapshots at 0, 1, 2."""
    x, _ = unit_clusters(3, 32, 6, 3, noise=0.6)
    q = _unit(np.random.default_rng(0), 5, 6)
    state, snaps = train_gss(x, GssConfig(epochs=2, lr=1e-2, k=4, query_k=3, init_std=0.05), snapshots=(0, 1, 2))
    return x, q, state, snaps


def test_untrained_gss_is_two_graph_convolutions_by_hand(trained):
    x, q, _, snaps = trained
    state = snaps[0]
    assert state.config.epochs == 0 and state.losses.shape == (0,)
    layers = _layers(state)
    assert len(layers) == 2
    for w, b in layers:                  # diagonal 1, off-diagonal noise of scale init_std, bias 0
        np.testing.assert_array_equal(np.diag(w), 1.0)
        assert 0.02 < np.std(w[~np.eye(6, dtype=bool)]) < 0.1
        np.testing.assert_array_equal(b, 0.0)
    for w, b in init_gss(6, 2, init_std=0.0).weights():
        np.testing.assert_array_equal(np.asarray(w), np.eye(6))
    e_x, scores, e_x_combined = _np_gss_scores(x, q, 4, 3, layers, 0.3)
    np.testing.assert_allclose(np.asarray(state.embeddings), e_x, atol=2e-6)
    np.testing.assert_allclose(e_x_combined, e_x, atol=1e-12)   # queries change no database row
    np.testing.assert_allclose(np.asarray(GSS.search(state, q)), scores, atol=3e-6)
    ids = np.array([0, 7, 31])
    np.testing.assert_allclose(np.asarray(GSS.search_items(state, ids)), e_x[ids] @ e_x.T, atol=3e-6)
    # the normalised graph itself, densified
    n, width = state.graph.num_nodes, state.graph.max_degree
    dense = np.zeros((n, n))
    np.add.at(dense, (np.repeat(np.arange(n), width), np.asarray(state.graph.indices).ravel()),
              np.asarray(state.graph.weights).ravel())
    np.testing.assert_allclose(dense, _np_normalised(_np_database_adjacency(x, 4)), atol=1e-6)


def test_trained_gss_search_matches_numpy_on_the_trained_weights(trained):
    x, q, state, _ = trained
    layers = _layers(state)
    assert np.abs(layers[0][0] - np.eye(6)).max() > 1e-3     # training moved the weights
    e_x, scores, _ = _np_gss_scores(x, q, 4, 3, layers, 0.3)
    np.testing.assert_allclose(np.asarray(state.embeddings), e_x, atol=3e-6)
    np.testing.assert_allclose(np.asarray(GSS.search(state, q)), scores, atol=5e-6)


def test_three_layers_by_hand():
    rng = np.random.default_rng(1)
    x, q = _unit(rng, 20, 4), _unit(rng, 3, 4)
    state = GSS.build(x, GssConfig(epochs=0, k=3, query_k=4, num_layers=3, layer_decay=0.5, init_std=0.1))
    layers = _layers(state)
    assert len(layers) == 3
    e_x, scores, _ = _np_gss_scores(x, q, 3, 4, layers, 0.5)
    np.testing.assert_allclose(np.asarray(state.embeddings), e_x, atol=3e-6)
    np.testing.assert_allclose(np.asarray(GSS.search(state, q)), scores, atol=5e-6)


@pytest.mark.parametrize("block_size", [None, 7, 64])
def test_loss_matches_numpy(block_size):
    rng = np.random.default_rng(2)
    e, beta = _unit(rng, 23, 4), 0.6
    s = np.maximum(e.astype(np.float64) @ e.T, 0.0)
    want = -0.5 * np.mean((s - beta) ** 2)
    got = float(gss_loss(jnp.asarray(e), jnp.float32(beta), block_size=block_size))
    assert got == pytest.approx(want, rel=1e-5)
    # the percentile of beta over the n^2 similarities, and its row-sampled estimate
    assert initial_beta(e, 98.0) == pytest.approx(np.percentile(e.astype(np.float64) @ e.T, 98.0), abs=1e-6)
    sampled = initial_beta(e, 50.0, max_entries=5 * 23)
    rows = np.unique(np.linspace(0, 22, 5).round().astype(int))
    assert sampled == pytest.approx(np.percentile(e[rows].astype(np.float64) @ e.T, 50.0), abs=1e-6)


def test_one_training_step_decreases_the_objective_on_clusters(trained):
    _, _, state, snaps = trained
    assert set(snaps) == {0, 1, 2} and snaps[2] is state and snaps[1].config.epochs == 1
    before = float(state.losses[0])
    after = float(gss_objective(snaps[1].params, state.graphdef, state.graph, state.database, state.beta, 0.3,
                                1e-5))
    assert after < before
    assert float(state.losses[1]) == pytest.approx(after, rel=1e-5)
    # train_gss's step is optax.adam's
    step = make_gss_train_step(state.graphdef, optax.adam(1e-2))
    p0 = snaps[0].params
    adam, _, _ = step(p0, optax.adam(1e-2).init(p0), state.graph, state.database, state.beta, jnp.float32(0.3),
                      jnp.float32(1e-5))
    for a, b in zip(jax.tree_util.tree_leaves(adam), jax.tree_util.tree_leaves(snaps[1].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
    # the untrained snapshot's objective is the recorded first loss
    again = float(gss_objective(snaps[0].params, state.graphdef, state.graph, state.database, state.beta, 0.3, 1e-5))
    assert again == pytest.approx(before, rel=1e-6)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    x = _unit(rng, 16, 4)
    graph, _ = gss_graph(x, 3)
    graphdef, params = nnx.split(init_gss(4, 2, init_std=0.2, seed=1), nnx.Param)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)
        g64 = type(graph)(graph.indices, jnp.asarray(graph.weights, jnp.float64))
        x64 = jnp.asarray(x, jnp.float64)

        def f(p):
            return gss_objective(p, graphdef, g64, x64, jnp.float64(0.4), 0.3, 1e-2, block_size=5)

        grad = jax.grad(f)(p64)
        leaves, treedef = jax.tree_util.tree_flatten(p64)
        direction = [jnp.asarray(np.random.default_rng(5).normal(size=v.shape)) for v in leaves]
        shifted = lambda t: jax.tree_util.tree_unflatten(  # noqa: E731
            treedef, [v + t * u for v, u in zip(leaves, direction)])
        h = 1e-5
        fd = (f(shifted(h)) - f(shifted(-h))) / (2 * h)
        analytic = sum(jnp.vdot(g, u) for g, u in zip(jax.tree_util.tree_leaves(grad), direction))
        assert float(analytic) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
        assert abs(float(analytic)) > 1e-4


def test_the_pieces_compose_into_the_state(trained):
    _, _, state, _ = trained
    (w1, b1), _ = state.model.weights()
    h1 = jax.nn.elu(graph_convolution(state.graph, state.database, w1, b1))
    np.testing.assert_allclose(np.asarray(state.layer_inputs[1]), np.asarray(h1), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.layer_inputs[0]), np.asarray(state.database))
    e = gss_embeddings(state.model, state.graph, state.database, 0.3)
    np.testing.assert_allclose(np.asarray(e), np.asarray(state.embeddings), atol=1e-6)
    again, degrees = gss_graph(np.asarray(state.database), 4)
    np.testing.assert_array_equal(np.asarray(again.indices), np.asarray(state.graph.indices))
    np.testing.assert_allclose(np.asarray(degrees), np.asarray(state.degrees))
    np.testing.assert_allclose(1.0 / np.asarray(degrees), np.asarray(state.graph.weights[:, 0]), rtol=1e-6)


def test_jit_vmap_and_the_registry(trained):
    _, q, state, _ = trained
    assert METHODS["gss"] is GSS and isinstance(state, GssState)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.config == state.config
    direct = np.asarray(GSS.search(state, q))
    jitted = np.asarray(jax.jit(lambda s, v: GSS.search(s, v))(state, jnp.asarray(q)))
    np.testing.assert_allclose(jitted, direct, atol=1e-6)
    mapped = jax.vmap(lambda v: embed_queries(state, v[None])[0])(jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(mapped) @ np.asarray(state.embeddings).T, direct, atol=1e-6)


def test_bad_input_gets_clear_errors():
    x = _unit(np.random.default_rng(8), 12, 4)
    for kwargs, match in [(dict(epochs=-1), "epochs"), (dict(lr=0.0), "lr"), (dict(k=1), "k"),
                          (dict(query_k=0), "query_k"), (dict(beta_percentile=101.0), "beta_percentile"),
                          (dict(layer_decay=float("nan")), "layer_decay"), (dict(num_layers=0), "num_layers")]:
        with pytest.raises(ValueError, match=match):
            GssConfig(**kwargs)
    with pytest.raises(ValueError, match="k = 13 exceeds"):
        GSS.build(x, GssConfig(epochs=0, k=13))
    with pytest.raises(ValueError, match="query_k = 13 exceeds"):
        GSS.build(x, GssConfig(epochs=0, query_k=13))
    with pytest.raises(TypeError, match="GssConfig"):
        GSS.build(x, None)
    with pytest.raises(ValueError, match="NaN|finite"):
        GSS.build(np.full((12, 4), np.nan), GssConfig(epochs=0))
    with pytest.raises(ValueError, match="snapshots"):
        train_gss(x, GssConfig(epochs=1), snapshots=(2,))
    state = GSS.build(x, GssConfig(epochs=0, k=3, query_k=3))
    with pytest.raises(ValueError, match="dimension mismatch"):
        GSS.search(state, x[:, :3])
    with pytest.raises(ValueError, match="dimension mismatch"):
        embed_queries(state, x[:, :3])
    with pytest.raises(ValueError, match="NaN|finite"):
        GSS.search(state, np.full((1, 4), np.inf))
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        GSS.search_items(state, np.array([12]))
