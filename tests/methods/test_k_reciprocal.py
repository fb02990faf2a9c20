"""k-reciprocal re-ranking: the sets by hand, the whole re-ranking against a dense numpy reference
written from the paper's definition, lambda = 1 is kNN, jit / vmap, bad input."""
import dataclasses

import jax
import numpy as np
import pytest

from conftest import require_data, unit_clusters
from retrieval_jax.methods import KNN_SEARCH, KnnConfig
from retrieval_jax.methods.k_reciprocal import (K_RECIPROCAL, KReciprocalConfig, expanded_sets, half_k,
                                                reciprocal_sets)


# ----------------------------------------------------------------------------- dense reference
def _ranks(dist):
    """Each row's items by increasing distance (the item itself first: its distance is 0)."""
    return np.argsort(dist, axis=1, kind="stable")


def _recip(rank, p, k):
    """R(p, k) = {g in N(p, k) : p in N(g, k)}, N(p, k) = the first k + 1 of p's ranking."""
    return [g for g in rank[p, :k + 1] if p in rank[g, :k + 1]]


def _expanded(rank_p, rank_db, p, k1):
    """R*(p) of the paper: ``rank_p`` ranks for p's own set, ``rank_db`` for the members' R(c, k1/2)."""
    base = _recip(rank_p, p, k1)
    out = set(base)
    h = int(np.around(k1 / 2))
    for c in base:
        if c >= rank_db.shape[0]:
            continue  # the query itself: its R(q, h) lies inside R(q, k1)
        rc = _recip(rank_db, c, h)
        if len(set(rc) & set(base)) > 2 / 3 * len(rc):
            out |= set(rc)
    return sorted(out)


def _encoding(dist_row, members, width):
    v = np.zeros(width)
    w = np.exp(-dist_row[members])
    v[members] = w / w.sum()
    return v


def _jaccard(a, b):
    return 1 - np.minimum(a, b).sum() / np.maximum(a, b).sum()


def dense_reference(x, q, k1, k2, lam):
    """d* [nq, n] of the paper with distances d = 2 - 2 <x_p, x_g>, everything [N, N].

    The database items' sets and encodings are those of the database alone; a query's own
    R(q, k1) is taken with q added to the database (g's ranking then includes q), its
    expansion uses the database sets. ``q=None``: the database items as queries."""
    n = x.shape[0]
    d = np.maximum(2 - 2 * x.astype(np.float64) @ x.T.astype(np.float64), 0)
    np.fill_diagonal(d, 0)
    rank = _ranks(d)
    v = np.stack([_encoding(d[p], _expanded(rank, rank, p, k1), n) for p in range(n)])
    vqe = np.stack([v[rank[p, :k2]].mean(axis=0) for p in range(n)])
    if q is None:
        return np.array([[(1 - lam) * _jaccard(vqe[p], vqe[g]) + lam * d[p, g] for g in range(n)]
                         for p in range(n)])
    out = []
    for qi in q.astype(np.float64):
        dq = np.maximum(2 - 2 * x.astype(np.float64) @ qi, 0)
        ext = np.zeros((n + 1, n + 1))          # the database and q (index n)
        ext[:n, :n] = d
        ext[n, :n] = ext[:n, n] = dq
        rank_ext = _ranks(ext)
        vq = _encoding(ext[n], _expanded(rank_ext, rank, n, k1), n + 1)
        v_ext = np.concatenate([v, np.zeros((n, 1))], axis=1)   # no database set holds q
        rows = [vq if j == n else v_ext[j] for j in rank_ext[n, :k2]]
        vq_qe = np.mean(rows, axis=0)
        vqe_ext = np.concatenate([vqe, np.zeros((n, 1))], axis=1)
        out.append([(1 - lam) * _jaccard(vq_qe, vqe_ext[g]) + lam * dq[g] for g in range(n)])
    return np.array(out)


# ----------------------------------------------------------------------------- laws and cases
def test_reciprocal_set_by_hand_on_ten_points():
    # Ten points on a line, distance |x_i - x_j|, k = 3 (N(p, 3) = p and its 3 nearest others):
    #   item  0    1    2    3    4    5    6     7    8     9
    #   pos   0    1.5  3.2  4.0  5.1  9.0  10.3  15   16.6  30
    # item 3: others by distance 2 (0.8), 4 (1.1), 1 (2.5), 0 (4.0)   -> N(3) = {3, 2, 4, 1}
    #   N(2) = {2, 3 (0.8), 1 (1.7), 4 (1.9)}, N(4) = {4, 3 (1.1), 2 (1.9), 1 (3.6)},
    #   N(1) = {1, 0 (1.5), 2 (1.7), 3 (2.5)}: all hold 3, so R(3, 3) = {1, 2, 3, 4}.
    # item 5: 6 (1.3), 4 (3.9), 3 (5.0), 2 (5.8)                     -> N(5) = {5, 6, 4, 3}
    #   N(6) = {6, 5 (1.3), 7 (4.7), 4 (5.2)} holds 5; N(4) and N(3) above do not: R(5, 3) = {5, 6}.
    # item 9: 8 (13.4), 7 (15), 6 (19.7)                              -> N(9) = {9, 8, 7, 6}
    #   N(8) = {8, 7 (1.6), 6 (6.3), 5 (7.6)}, N(7) = {7, 8 (1.6), 6 (4.7), 5 (6.0)}, N(6) above:
    #   none holds 9, so R(9, 3) = {9}.
    pos = np.array([0, 1.5, 3.2, 4, 5.1, 9, 10.3, 15, 16.6, 30])
    dist = np.abs(pos[:, None] - pos[None, :])
    neighbours = np.argsort(dist, axis=1, kind="stable")[:, 1:]     # other items, nearest first
    sets = reciprocal_sets(neighbours, 3)
    assert sorted(sets[3][sets[3] >= 0]) == [1, 2, 3, 4]
    assert sorted(sets[5][sets[5] >= 0]) == [5, 6]
    assert sorted(sets[9][sets[9] >= 0]) == [9]
    assert sets[3, 0] == 3 and sets.shape == (10, 4)
    # the same sets from the reference's definition, every item
    rank = np.argsort(dist, axis=1, kind="stable")
    for p in range(10):
        assert sorted(sets[p][sets[p] >= 0]) == sorted(_recip(rank, p, 3)), p
    # expansion (k1 = 3, h = round(1.5) = 2) against the reference's R*
    for p, got in enumerate(expanded_sets(neighbours, 3)):
        assert got.tolist() == _expanded(rank, rank, p, 3), p


X = unit_clusters(2, 48, 6, 3, noise=0.7)[0]
Q = unit_clusters(3, 4, 6, 3, noise=0.7)[0]
CFG = KReciprocalConfig(k1=7, k2=4, lam=0.3, shortlist=48, capacity=200, qe_capacity=400)


@pytest.fixture(scope="module")
def state():
    return K_RECIPROCAL.build(X, CFG)


def _with(state, **changes):
    return dataclasses.replace(state, **changes)


def test_lambda_one_is_knn_ranking(state):
    one = _with(state, lam=np.float32(1.0))    # lambda is a leaf: the same compiled search
    built = K_RECIPROCAL.build(X, dataclasses.replace(CFG, lam=1.0))
    np.testing.assert_allclose(K_RECIPROCAL.search(built, Q), K_RECIPROCAL.search(one, Q), atol=1e-6)
    knn = KNN_SEARCH.build(X, KnnConfig())
    for ours, base in ((K_RECIPROCAL.search(one, Q), KNN_SEARCH.search(knn, Q)),
                       (K_RECIPROCAL.search_items(one, np.arange(3)), KNN_SEARCH.search_items(knn, np.arange(3)))):
        np.testing.assert_array_equal(np.argsort(-np.asarray(ours), axis=1, kind="stable"),
                                      np.argsort(-np.asarray(base), axis=1, kind="stable"))


def test_full_shortlist_matches_dense_reference(state):
    assert np.asarray(state.overflow).tolist() == [0, 0] and state.shortlist == 48
    ids = np.array([0, 7, 30])
    ref_items = dense_reference(X, None, 7, 4, 0.3)[ids]
    np.testing.assert_allclose(-np.asarray(K_RECIPROCAL.search_items(state, ids)), ref_items, atol=2e-5)
    ref_q = dense_reference(X, Q, 7, 4, 0.3)
    np.testing.assert_allclose(-np.asarray(K_RECIPROCAL.search(state, Q)), ref_q, atol=2e-5)
    # without local query expansion (k2 = 1), lambda = 0: the Jaccard distance alone
    plain = K_RECIPROCAL.build(X, dataclasses.replace(CFG, k2=1, lam=0.0))
    np.testing.assert_allclose(-np.asarray(K_RECIPROCAL.search(plain, Q)), dense_reference(X, Q, 7, 1, 0.0),
                               atol=2e-5)


def test_short_shortlist_reranks_its_top_m_and_keeps_the_rest(state):
    short = _with(state, shortlist=12)
    scores = np.asarray(K_RECIPROCAL.search(short, Q))
    ref = -dense_reference(X, Q, 7, 4, 0.3)
    sims = Q @ X.T
    for row in range(len(Q)):
        first = np.argsort(-sims[row], kind="stable")
        order = np.argsort(-scores[row], kind="stable")
        assert set(order[:12]) == set(first[:12])
        np.testing.assert_allclose(scores[row, first[:12]], ref[row, first[:12]], atol=2e-5)
        np.testing.assert_array_equal(order[12:], first[12:])


def test_overflow_is_counted_and_keeps_the_largest_entries(state):
    with pytest.warns(UserWarning, match="over capacity"):
        small = K_RECIPROCAL.build(X, dataclasses.replace(CFG, capacity=4))
    sizes = (np.asarray(state.v_w) > 0).sum(axis=1)
    assert int(small.overflow[0]) == np.maximum(sizes - 4, 0).sum() > 0
    top = -np.sort(-np.asarray(state.v_w), axis=1)[:, :4]
    np.testing.assert_allclose(-np.sort(-np.asarray(small.v_w), axis=1), top, rtol=1e-6)


def test_jit_vmap_and_traced_lambda(state):
    direct = np.asarray(K_RECIPROCAL.search(state, Q))
    # a grid over lambda is one jitted, vmapped program
    grid = jax.jit(jax.vmap(lambda lam: K_RECIPROCAL.search(_with(state, lam=lam), Q)))(
        np.array([0.3, 1.0], np.float32))
    np.testing.assert_allclose(grid[0], direct, atol=1e-6)
    np.testing.assert_allclose(grid[1], K_RECIPROCAL.search(_with(state, lam=np.float32(1.0)), Q), atol=1e-6)


def test_bad_input(state):
    x = X[:20]
    with pytest.raises(ValueError, match="lam must lie in"):
        KReciprocalConfig(lam=1.5)
    with pytest.raises(ValueError, match="k1 must be a positive int"):
        KReciprocalConfig(k1=0)
    with pytest.raises(ValueError, match="k1 = 20 exceeds the 19 other"):
        K_RECIPROCAL.build(x, KReciprocalConfig())
    with pytest.raises(ValueError, match="shortlist = 3 must hold"):
        K_RECIPROCAL.build(x, KReciprocalConfig(k1=5, shortlist=3))
    with pytest.raises(TypeError, match="KReciprocalConfig"):
        K_RECIPROCAL.build(x, KnnConfig())
    with pytest.raises(ValueError, match="dimension mismatch"):
        K_RECIPROCAL.search(state, x[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        K_RECIPROCAL.search(state, np.full((1, 6), np.nan))
    with pytest.raises(ValueError, match=r"\[0, 48\)"):
        K_RECIPROCAL.search_items(state, np.array([48]))
    with pytest.raises(ValueError, match="other items only"):
        reciprocal_sets(np.array([[0, 1], [0, 2], [0, 1]]), 1)
    with pytest.raises(ValueError, match="needs at least"):
        reciprocal_sets(np.array([[1], [0]]), 2)
    assert half_k(20) == 10 and half_k(5) == 2 and half_k(7) == 4


@pytest.mark.slow
def test_beats_knn_on_coil20():
    from retrieval_jax.data import load_coil20
    from retrieval_jax.diffusion import ranking_from_scores
    from retrieval_jax.evaluation import label_map
    data = load_coil20(require_data("coil20"), size=32)
    ids = np.arange(len(data), dtype=np.int32)
    knn = KNN_SEARCH.search_items(KNN_SEARCH.build(data.X, KnnConfig()), ids)
    ours = K_RECIPROCAL.search_items(K_RECIPROCAL.build(data.X, KReciprocalConfig()), ids)
    map_knn = label_map(ranking_from_scores(knn, exclude=ids), data.labels)
    map_kr = label_map(ranking_from_scores(ours, exclude=ids), data.labels)
    assert map_kr > map_knn + 0.03
