"""GNN re-ranking (Zhang et al., arXiv:2012.07620) against a dense numpy reference of the authors' algorithm."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import unit_clusters
from retrieval_jax.methods import METHODS, KnnConfig
from retrieval_jax.methods.gnn_reranking import GNN, GnnConfig, gnn_scores


def _data(seed, n=40, d=6, c=4):
    return unit_clusters(seed, n, d, c, noise=0.6)[0].astype(np.float64)


# one configuration for most tests (the compiled programs are shared between them)
_MAIN = GnnConfig(k1=8, k2=4, block_size=16)


def _lists(sims_others, k):
    """The k - 1 best database ids of each row (best first)."""
    return np.argsort(-sims_others, axis=1, kind="stable")[:, :k - 1]


def dense_database(x, k1, k2, layers):
    """The authors' algorithm on the database, dense [N, N] numpy (float64): the list of
    B_0..B_{L-1} and A_L. N(i, k) = i followed by its k - 1 nearest others."""
    n = x.shape[0]
    s = x @ x.T
    others = s.copy()
    np.fill_diagonal(others, -np.inf)
    nbr = np.concatenate([np.arange(n)[:, None], _lists(others, k1)], axis=1)
    a = np.zeros((n, n))
    for i in range(n):
        a[i, nbr[i]] = 1.0
    bs = []
    for _ in range(layers):
        b = a + a.T
        bs.append(b)
        h = np.zeros((n, n))
        for i in range(n):
            for j in nbr[i, :k2]:
                h[i] += s[i, j] ** 2 * b[j]
        a = h / np.linalg.norm(h, axis=1, keepdims=True)
    return bs, a


def dense_queries(x, q, k1, k2, layers):
    """Scores [nq, N] of out-of-database queries by the module's definition, dense numpy."""
    bs, a = dense_database(x, k1, k2, layers)
    s = q @ x.T
    out = []
    for row in range(q.shape[0]):
        top = np.argsort(-s[row], kind="stable")
        u = np.zeros(x.shape[0])
        u[top[:k1 - 1]] = 1.0
        for b in bs:
            h = (q[row] @ q[row]) ** 2 * u
            for j in top[:k2 - 1]:
                h = h + s[row, j] ** 2 * b[j]
            u = h / np.linalg.norm(h)
        out.append(a @ u)
    return np.array(out)


@pytest.mark.parametrize("k1,k2,layers,queries", [(8, 4, 2, True), (5, 2, 3, False)])
def test_items_and_queries_match_the_dense_algorithm(k1, k2, layers, queries):
    x, q = _data(0, n=40), _data(2, n=7)
    state = GNN.build(x.astype(np.float32), GnnConfig(k1=k1, k2=k2, layers=layers, block_size=16))
    # database items: the authors' algorithm run on the database itself
    ids = np.arange(x.shape[0], dtype=np.int32)
    got = np.asarray(GNN.search_items(state, ids))
    _, a = dense_database(x, k1, k2, layers)
    np.testing.assert_allclose(got, a @ a.T, rtol=2e-4, atol=2e-6)
    if not queries:
        return
    # out-of-database queries
    got = np.asarray(GNN.search(state, q.astype(np.float32)))
    np.testing.assert_allclose(got, dense_queries(x, q, k1, k2, layers), rtol=2e-4, atol=2e-6)


def test_zero_layers_count_shared_top_k1_neighbours():
    # hand-checked case: no message passing, <A_0[q], A_0[g]> = |N_db(q, k1 - 1) & N(g, k1)|
    x, q = _data(3), _data(4, n=3)
    k1 = 5
    state = GNN.build(x.astype(np.float32), GnnConfig(k1=k1, k2=2, layers=0))
    got = np.asarray(GNN.search(state, q.astype(np.float32)))
    others = x @ x.T
    np.fill_diagonal(others, -np.inf)
    lists = [set([g]) | set(_lists(others, k1)[g]) for g in range(40)]
    for row in range(3):
        mine = set(np.argsort(-(q[row] @ x.T))[:k1 - 1])
        np.testing.assert_array_equal(got[row], [len(mine & lists[g]) for g in range(40)])


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_item_scores_are_symmetric_and_self_is_best(seed):
    # law: <A_L[i], A_L[g]> is a Gram matrix of unit rows (symmetric, diagonal 1, entries <= 1)
    x = unit_clusters(seed, 40, 6, 3, noise=0.5)[0]
    state = GNN.build(x, _MAIN)
    s = np.asarray(GNN.search_items(state, np.arange(40, dtype=np.int32)))
    np.testing.assert_allclose(s, s.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-5)
    assert s.max() <= 1.0 + 1e-5


def test_lambda_one_is_knn_search_and_lambda_mixes_linearly():
    x, q = _data(5).astype(np.float32), _data(6, n=4).astype(np.float32)
    knn = METHODS["knn"]
    plain = np.asarray(knn.search(knn.build(x, KnnConfig()), q))
    zero = GNN.build(x, _MAIN)
    one = GNN.build(x, dataclasses.replace(_MAIN, lam=1.0))
    assert one.config.lam == 1.0 and jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(zero)
    np.testing.assert_allclose(np.asarray(GNN.search(one, q)), plain, rtol=1e-6, atol=1e-6)
    mixed = dataclasses.replace(zero, lam=jnp.float32(0.3))  # lam is a traced leaf: the same program
    np.testing.assert_allclose(np.asarray(GNN.search(mixed, q)),
                               0.7 * np.asarray(GNN.search(zero, q)) + 0.3 * plain, rtol=1e-5, atol=1e-6)


def test_jit_and_vmap_over_queries_and_lambda():
    x, q = _data(5).astype(np.float32), _data(8, n=8).astype(np.float32)
    state = GNN.build(x, _MAIN)
    direct = np.asarray(GNN.search(state, q))
    jitted = jax.jit(lambda s, v: GNN.search(s, v))(state, jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(jitted), direct, rtol=1e-5, atol=1e-6)
    # one query and one lam per call, vmapped: the batch's rows mixed with kNN by their lam
    lams = jnp.array([0.0, 1.0, 0.5, 0.0, 1.0, 0.25, 0.0, 0.0], jnp.float32)
    one = jax.jit(jax.vmap(lambda v, lam: gnn_scores(dataclasses.replace(state, lam=lam), v[None])[0]))
    rows = one(jnp.asarray(q), lams)
    lam = np.asarray(lams)[:, None]
    np.testing.assert_allclose(np.asarray(rows), (1 - lam) * direct + lam * (q @ x.T), rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_clearly():
    x = _data(9).astype(np.float32)
    with pytest.raises(ValueError, match="k2 = 9 must be at most k1 = 8"):
        GnnConfig(k1=8, k2=9)
    with pytest.raises(ValueError, match="at least 2"):
        GnnConfig(k1=1, k2=1)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        GnnConfig(lam=1.5)
    with pytest.raises(ValueError, match="layers"):
        GnnConfig(layers=-1)
    with pytest.raises(ValueError, match="knn_method"):
        GnnConfig(knn_method="nndescent")
    with pytest.raises(ValueError, match="k1 = 41 exceeds the 40"):
        GNN.build(x, GnnConfig(k1=41, k2=3))
    with pytest.raises(TypeError, match="GnnConfig"):
        GNN.build(x, KnnConfig())
    with pytest.raises(ValueError, match="NaN"):
        GNN.build(np.full((40, 6), np.nan, np.float32), _MAIN)
    state = GNN.build(x, _MAIN)
    with pytest.raises(ValueError, match="dimension mismatch"):
        GNN.search(state, x[:, :3])
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        GNN.search_items(state, np.array([40]))


def test_command_line_sizes_follow_n():
    from retrieval_jax.methods import resolve
    values, chosen = resolve(GnnConfig, {}, 30)
    assert values["k1"] == 30 and values["k2"] == 10 and GnnConfig(**values).k1 == 30
    values, _ = resolve(GnnConfig, {}, 5000)
    assert (values["k1"], values["k2"]) == (40, 10)
    values, _ = resolve(GnnConfig, {"k1": 6}, 5000)
    assert values["k2"] == 6
