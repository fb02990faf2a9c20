"""Regional (GMP) pooling and query-region similarities against numpy references."""
import numpy as np
import pytest

from retrieval_jax.diffusion import regional


def _regions(seed=0, N=5, R=4, d=6):
    rng = np.random.default_rng(seed)
    V = rng.normal(size=(N, R, d)).astype(np.float32)
    V /= np.linalg.norm(V, axis=-1, keepdims=True)
    mask = np.ones((N, R), bool)
    if R == 4:
        mask[1, 3] = mask[2, 1:] = mask[4, 0] = False
    return V, mask


def test_gmp_weights_solve_the_system():
    V, mask = _regions()
    for lam in (1.0, 0.3):
        b = np.asarray(regional.gmp_weights(V, mask, lam=lam))
        for i in range(V.shape[0]):
            Vi = V[i][mask[i]].astype(np.float64)
            ref = np.linalg.solve(Vi @ Vi.T + lam * np.eye(len(Vi)), np.ones(len(Vi)))
            np.testing.assert_allclose(b[i][mask[i]], ref, rtol=1e-4, atol=1e-5)
            assert np.all(b[i][~mask[i]] == 0)


def test_gmp_masked_regions_do_not_matter():
    V, mask = _regions(1)
    rng = np.random.default_rng(2)
    V2 = V.copy()
    V2[~mask] = rng.normal(size=(int((~mask).sum()), V.shape[2])) * 100
    b1, b2 = regional.gmp_weights(V, mask), regional.gmp_weights(V2, mask)
    np.testing.assert_allclose(b1, b2, rtol=1e-5, atol=1e-6)
    scores = rng.normal(size=(3, V.shape[0] * V.shape[1])).astype(np.float32)
    s2 = scores.copy().reshape(3, *mask.shape)
    s2[:, ~mask] = 1e3
    for mode in ("gmp", "max", "sum"):
        p1 = regional.pool_region_scores(scores, b1, mode=mode, mask=mask)
        p2 = regional.pool_region_scores(s2, b2, mode=mode, mask=mask)
        np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-5)


def test_gmp_single_region_is_proportional():
    V, _ = _regions(3, N=4, R=1)
    b = np.asarray(regional.gmp_weights(V))
    np.testing.assert_allclose(b[:, 0], 1.0 / (np.sum(V[:, 0] ** 2, -1) + 1.0), rtol=1e-5)
    scores = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
    pooled = regional.pool_region_scores(scores, b)
    np.testing.assert_allclose(pooled, scores * b[:, 0][None], rtol=1e-5)
    # one valid region among padded slots: the same proportionality
    V3, _ = _regions(5, N=4, R=3)
    m = np.zeros((4, 3), bool)
    m[:, 1] = True
    b3 = np.asarray(regional.gmp_weights(V3, m))
    np.testing.assert_allclose(b3[:, 1], 1.0 / (np.sum(V3[:, 1] ** 2, -1) + 1.0), rtol=1e-5)


def test_pool_max_sum_against_numpy():
    _, mask = _regions()
    s = np.random.default_rng(6).normal(size=(2, 5, 4)).astype(np.float32)
    mx = regional.pool_region_scores(s, mode="max", mask=mask)
    sm = regional.pool_region_scores(s.reshape(2, 20), mode="sum", mask=mask)
    for q in range(2):
        for i in range(5):
            assert np.isclose(mx[q, i], s[q, i][mask[i]].max())
            assert np.isclose(sm[q, i], s[q, i][mask[i]].sum(), atol=1e-6)
    with pytest.raises(ValueError, match="gmp"):
        regional.pool_region_scores(s, mode="gmp")
    with pytest.raises(ValueError, match="mode"):
        regional.pool_region_scores(s, mode="avg", mask=mask)


def test_query_region_similarity_against_loop():
    rng = np.random.default_rng(7)
    nq, rq, N, R, d, k = 3, 2, 6, 3, 5, 4
    Q = rng.normal(size=(nq, rq, d)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=-1, keepdims=True)
    D = rng.normal(size=(N, R, d)).astype(np.float32)
    D /= np.linalg.norm(D, axis=-1, keepdims=True)
    qmask = np.array([[1, 1], [1, 0], [1, 1]], bool)
    dmask = np.ones((N, R), bool)
    dmask[2, 2] = False
    sims, idx = regional.query_region_knn(Q, D, k, query_mask=qmask, db_mask=dmask)
    y = np.asarray(regional.query_region_similarity(sims, idx, num_queries=nq, num_db_regions=N * R,
                                                    gamma=3.0, query_mask=qmask))
    flat = D.reshape(-1, d)
    ref = np.zeros((nq, N * R))
    for q in range(nq):
        for r in range(rq):
            if not qmask[q, r]:
                continue
            s = flat @ Q[q, r]
            s[~dmask.ravel()] = -np.inf
            for j in np.argsort(-s)[:k]:
                ref[q, j] += max(s[j], 0.0) ** 3
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-6)
    assert np.all(y[:, 2 * R + 2] == 0)
