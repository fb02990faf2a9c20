"""CAS: the local re-ranking against a dense numpy reference written row by row from the authors'
equations (the whole database plus the query as one set), lambda = 1 is kNN, jit / vmap, bad input."""
import dataclasses

import jax
import numpy as np
import pytest

from conftest import require_data, unit_clusters
from retrieval_jax.methods import KNN_SEARCH, KnnConfig
from retrieval_jax.methods.cluster_aware import CAS, CasConfig, cas_local_distances


def _l1(x):
    return x / np.maximum(np.abs(x).sum(axis=-1, keepdims=True), 1e-12)


def _mutual_sets(rank, k):
    """Row i: the j in i's first k with i in j's first k (as a 0/1 matrix)."""
    m = rank.shape[0]
    top = np.zeros((m, m), bool)
    for i in range(m):
        top[i, rank[i, :k]] = True
    return top & top.T


def cas_reference(x, cfg):
    """The CAS distance matrix [m, m] of the set ``x`` (float64, loops over rows)."""
    x = x.astype(np.float64)
    m = x.shape[0]
    d = np.maximum(2 - 2 * x @ x.T, 0)
    np.fill_diagonal(d, 0)
    d = d / d.max(axis=1, keepdims=True)
    rank = np.argsort(d, axis=1, kind="stable")
    aff = np.exp(-d / cfg.sigma ** 2)
    conf = _mutual_sets(rank, cfg.k1)
    cand = _mutual_sets(rank, cfg.k2 + 1)
    half = _mutual_sets(rank, cfg.k2 // 2 + 1)
    grown = cand.copy()
    for r in range(m):
        for c in rank[r, :cfg.k2 + 1]:
            if cand[r, c] and (half[c] & cand[r]).sum() > 2 / 3 * half[c].sum():
                grown[r] |= half[c]
    cand = grown
    # bidirectional similarity diffusion
    w = np.zeros((m, m))
    for i in range(m):
        w[i, rank[i, 1:cfg.k1]] = aff[i, rank[i, 1:cfg.k1]]
    w = w + (cfg.confident_weight - 1) * conf * w
    w = (w + w.T) / 2
    dv = 1 / np.sqrt(w.sum(axis=1))
    s = w * np.outer(dv, dv)
    alpha = 1 / (1 + cfg.mu)
    f = w.copy()
    for _ in range(cfg.iterations):
        f = 0.5 * alpha * (f @ s + s @ f) + (1 - alpha) * np.eye(m)
    # neighbour-guided smoothing, row by row
    t = np.zeros((m, m))
    for i in range(m):
        t[i, rank[i, 1:cfg.k3]] = aff[i, rank[i, 1:cfg.k3]]
    t = _l1(t)
    t = t @ t
    feat = np.zeros((m, m))
    for i in range(m):
        ci, li = np.flatnonzero(conf[i]), np.flatnonzero(cand[i])
        si = np.flatnonzero(cand[i] & ~conf[i])
        feat[i, li] = f[i, li]
        a = np.mean(t[ci, ci])
        if len(ci) > 1 and len(si) > 1 and a ** 2 + 2 * cfg.beta > 0:
            tw = np.zeros(m)
            tw[ci] = a
            tw[si] = np.minimum(t[si][:, ci].mean(axis=1), a)
            tmp = a ** 2 * np.mean(f[i, li]) - a * np.mean(f[i, li] * tw[li])
            feat[i, li] = (f[i, li] * (a * tw[li] + 2 * cfg.beta) + tmp) / (a ** 2 + 2 * cfg.beta)
    feat = _l1(feat)
    # neighbourhood-direct diffusion, Markov step
    mixed = np.stack([feat[rank[i, :cfg.k4]].mean(axis=0) for i in range(m)])
    mixed = _l1((mixed + cfg.lv * _l1(conf.astype(float)) @ feat) / (1 + cfg.lv))
    markov = mixed @ mixed
    q = np.zeros((m, m))
    for i in range(m):
        top = np.argsort(-markov[i], kind="stable")[:cfg.k5]
        q[i, top] = markov[i, top]
    q = _l1(q)
    v = _l1(q @ q)
    # Jensen-Shannon divergence (base 2), geodesics by Floyd-Warshall
    js = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            a, b = v[i], v[j]
            ka, kb = a > 0, b > 0
            js[i, j] = 0.5 * (np.sum(a[ka] * np.log2(2 * a[ka] / (a[ka] + b[ka])))
                              + np.sum(b[kb] * np.log2(2 * b[kb] / (a[kb] + b[kb]))))
    cap = cfg.max_distance
    adj = np.full((m, m), cap)
    for i in range(m):
        adj[i, rank[i, :cfg.geodesic_k]] = js[i, rank[i, :cfg.geodesic_k]]
    np.fill_diagonal(adj, 0)
    adj = np.clip(np.minimum(adj, adj.T), 0, cap)
    for k in range(m):
        adj = np.minimum(adj, adj[:, [k]] + adj[[k], :])
    return (1 - cfg.lam) * np.clip(adj, 0, cap) + cfg.lam * d


X = unit_clusters(0, 30, 6, 3, noise=0.7)[0]
Q = unit_clusters(1, 3, 6, 3, noise=0.7)[0]
CFG = CasConfig(k1=3, k2=6, k3=7, k4=3, k5=8, geodesic_k=12, max_distance=5.0, shortlist=30)


@pytest.fixture(scope="module")
def state():
    return CAS.build(X, CFG)


def _with_params(state, **values):
    return dataclasses.replace(state, params=dataclasses.replace(state.params, **values))


def test_full_shortlist_matches_dense_reference(state):
    scores = np.asarray(CAS.search(state, Q))
    for row, q in enumerate(Q):
        ref = cas_reference(np.concatenate([q[None], X]), CFG)[0, 1:]   # the query is node 0
        np.testing.assert_allclose(-scores[row], ref, atol=2e-4)
    ids = np.array([0, 17])
    items = np.asarray(CAS.search_items(state, ids))
    ref_all = cas_reference(X, CFG)
    np.testing.assert_allclose(-items, ref_all[ids], atol=2e-4)
    assert (np.argmax(items, axis=1) == ids).all()      # the item itself first (distance 0)
    # the smoothing's beta > 0 and another lv: values of the state, the same compiled search
    other = _with_params(state, beta=np.float32(0.5), lv=np.float32(1.0))
    ref = cas_reference(np.concatenate([Q[:1], X]), dataclasses.replace(CFG, beta=0.5, lv=1.0))[0, 1:]
    np.testing.assert_allclose(-np.asarray(CAS.search(other, Q))[0], ref, atol=2e-4)


def test_lambda_one_is_knn_ranking(state):
    one = _with_params(state, lam=np.float32(1.0))    # a leaf: the same compiled search
    knn = KNN_SEARCH.build(X, KnnConfig())
    np.testing.assert_array_equal(np.argsort(-np.asarray(CAS.search(one, Q)), axis=1, kind="stable"),
                                  np.argsort(-np.asarray(KNN_SEARCH.search(knn, Q)), axis=1, kind="stable"))


def test_short_shortlist_keeps_the_rest_in_first_order(state):
    short = dataclasses.replace(state, shortlist=10)
    scores = np.asarray(CAS.search(short, Q))
    sims = Q @ X.T
    for row, q in enumerate(Q):
        first = np.argsort(-sims[row], kind="stable")
        order = np.argsort(-scores[row], kind="stable")
        assert set(order[:10]) == set(first[:10])
        np.testing.assert_array_equal(order[10:], first[10:])
        local = np.concatenate([q[None], X[first[:10]]])
        ref = cas_reference(local, dataclasses.replace(CFG, shortlist=10))[0, 1:]
        np.testing.assert_allclose(-scores[row, first[:10]], ref, atol=2e-4)


def test_jit_vmap_and_traced_values(state):
    direct = np.asarray(CAS.search(state, Q))
    # a grid over mu is one jitted, vmapped program
    grid = jax.jit(jax.vmap(lambda mu: CAS.search(_with_params(state, mu=mu), Q)))(np.array([0.23, 0.5], np.float32))
    np.testing.assert_allclose(grid[0], direct, atol=1e-5)
    other = CAS.build(X, dataclasses.replace(CFG, mu=0.5))
    np.testing.assert_allclose(grid[1], CAS.search(other, Q), atol=1e-5)


def test_bad_input(state):
    with pytest.raises(ValueError, match="k1 must be at least 2"):
        CasConfig(k1=1)
    with pytest.raises(ValueError, match="at most k2 \\+ 1"):
        CasConfig(k1=9, k2=5)
    with pytest.raises(ValueError, match="lam must lie in"):
        CasConfig(lam=-0.1)
    with pytest.raises(ValueError, match="sigma must be positive"):
        CasConfig(sigma=0.0)
    with pytest.raises(ValueError, match="k2 = 20 exceeds a local set of 15"):
        CAS.build(X[:15], CasConfig())
    with pytest.raises(ValueError, match="k3 = 25 exceeds a local set of 21"):
        cas_local_distances(X[:21], CasConfig())
    with pytest.raises(TypeError, match="CasConfig"):
        CAS.build(X, KnnConfig())
    with pytest.raises(ValueError, match="dimension mismatch"):
        CAS.search(state, Q[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        CAS.search(state, np.full((1, 6), np.nan))
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        CAS.search_items(state, np.array([-1]))


@pytest.mark.slow
def test_beats_knn_on_coil20():
    from retrieval_jax.data import load_coil20
    from retrieval_jax.diffusion import ranking_from_scores
    from retrieval_jax.evaluation import label_map
    data = load_coil20(require_data("coil20"), size=32)
    ids = np.arange(len(data), dtype=np.int32)
    knn = KNN_SEARCH.search_items(KNN_SEARCH.build(data.X, KnnConfig()), ids)
    state = CAS.build(data.X, CasConfig())
    ours = np.concatenate([np.asarray(CAS.search_items(state, ids[i:i + 512])) for i in range(0, len(ids), 512)])
    map_knn = label_map(ranking_from_scores(knn, exclude=ids), data.labels)
    map_cas = label_map(ranking_from_scores(ours, exclude=ids), data.labels)
    assert map_cas > map_knn + 0.02
