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


def _dense_region_reference(D, dmask, Q, qmask, k_graph, k_query, gamma, alpha, lam):
    """numpy: the mutual kNN graph of the valid regions, y, a dense solve, GMP and max by hand."""
    N, R, d = D.shape
    flat = D.reshape(-1, d).astype(np.float64)
    nodes = np.flatnonzero(dmask.ravel())
    X = flat[nodes]
    m = len(nodes)
    sim = X @ X.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.zeros((m, m), bool)
    for u in range(m):
        nn[u, np.argsort(-sim[u])[:k_graph]] = True
    A = np.where(nn & nn.T, np.maximum(np.where(np.isfinite(sim), sim, 0), 0) ** gamma, 0.0)
    deg = A.sum(1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0)
    W = inv[:, None] * A * inv[None]
    nq = Q.shape[0]
    y = np.zeros((nq, m))
    for q in range(nq):
        for r in range(Q.shape[1]):
            if qmask[q, r]:
                s = X @ Q[q, r].astype(np.float64)
                for u in np.argsort(-s)[:k_query]:
                    y[q, u] += max(s[u], 0.0) ** gamma
    f = np.linalg.solve(np.eye(m) - alpha * W, y.T).T          # [nq, m]
    full = np.zeros((nq, N * R))
    full[:, nodes] = f
    full = full.reshape(nq, N, R)
    gmp = np.zeros((nq, N))
    mx = np.zeros((nq, N))
    for i in range(N):
        Vi = D[i][dmask[i]].astype(np.float64)
        b = np.linalg.solve(Vi @ Vi.T + lam * np.eye(len(Vi)), np.ones(len(Vi)))
        gmp[:, i] = full[:, i][:, dmask[i]] @ b
        mx[:, i] = full[:, i][:, dmask[i]].max(axis=1)
    return gmp, mx


def test_regional_pipeline_against_a_dense_solve():
    D, dmask = _regions(8, N=6, R=4, d=5)
    dmask[3, 2:] = False
    alpha, gamma, lam = 0.9, 3.0, 0.5
    W, nodes = regional.region_graph(D, dmask, k=4, gamma=gamma)
    np.testing.assert_array_equal(nodes, np.flatnonzero(dmask.ravel()))
    # the collection against itself, in chunks of 4 queries
    out, its = regional.regional_diffusion_scores(
        W, nodes, D, dmask, query_k=3, gamma=gamma, alpha=alpha, tol=1e-8, max_iter=500, lam=lam,
        poolings=("gmp", "max", "sum"), chunk=4, return_iterations=True)
    gmp, mx = _dense_region_reference(D, dmask, D, dmask, 4, 3, gamma, alpha, lam)
    np.testing.assert_allclose(out["gmp"], gmp, rtol=1e-4, atol=1e-5 * np.abs(gmp).max())
    np.testing.assert_allclose(out["max"], mx, rtol=1e-4, atol=1e-5 * np.abs(mx).max())
    assert out["sum"].shape == (6, 6) and its.shape == (6,) and (its > 0).all()
    # separate query images with their own padding
    Q, qmask = _regions(9, N=3, R=2, d=5)
    qmask[1, 1] = False
    out_q = regional.regional_diffusion_scores(W, nodes, D, dmask, Q, qmask, query_k=3, gamma=gamma,
                                               alpha=alpha, tol=1e-8, max_iter=500, lam=lam)
    gmp_q, _ = _dense_region_reference(D, dmask, Q, qmask, 4, 3, gamma, alpha, lam)
    assert list(out_q) == ["gmp"]
    np.testing.assert_allclose(out_q["gmp"], gmp_q, rtol=1e-4, atol=1e-5 * np.abs(gmp_q).max())


def test_regional_pipeline_checks():
    D, dmask = _regions(10, N=5, R=4, d=5)
    W, nodes = regional.region_graph(D, dmask, k=3)
    other = dmask.copy()
    other[0, 0] = False
    with pytest.raises(ValueError, match="nodes"):
        regional.regional_diffusion_scores(W, nodes, D, other, query_k=2)
    with pytest.raises(ValueError, match="poolings"):
        regional.regional_diffusion_scores(W, nodes, D, dmask, query_k=2, poolings=("mean",))
    with pytest.raises(ValueError, match="query_regions"):
        regional.regional_diffusion_scores(W, nodes, D, dmask, query_mask=dmask, query_k=2)
    with pytest.raises(ValueError, match="at least 2"):
        regional.region_graph(D, np.zeros_like(dmask), k=1)
