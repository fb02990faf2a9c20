"""The region graph against a brute-force numpy build, Katz centrality against a dense solve."""
import numpy as np
import pytest

from retrieval_jax.discovery import other_image_neighbours, region_centrality, region_graph


def _data(n=30, d=6, images=8, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = rng.integers(0, images, n)
    return v.astype(np.float32), ids


def _ref_graph(v, ids, k, gamma, same_image):
    s = v.astype(np.float64) @ v.T.astype(np.float64)
    n = len(v)
    allowed = ~np.eye(n, dtype=bool) if same_image else ids[:, None] != ids[None, :]
    a = np.zeros((n, n))
    for i in range(n):
        cand = np.flatnonzero(allowed[i])
        top = cand[np.argsort(-s[i, cand], kind="stable")[:k]]
        a[i, top] = np.maximum(s[i, top], 0) ** gamma
    return np.minimum(a, a.T)


@pytest.mark.parametrize("same_image", [False, True])
def test_region_graph_matches_a_brute_force_build(same_image):
    v, ids = _data()
    got = region_graph(v, ids, 4, gamma=3.0, same_image_edges=same_image, method="exact").to_dense()
    np.testing.assert_allclose(got, _ref_graph(v, ids, 4, 3.0, same_image), rtol=1e-4, atol=1e-6)
    if not same_image:
        assert not np.any(got[ids[:, None] == ids[None, :]])


def test_katz_centrality_on_the_region_graph_matches_a_dense_solve():
    v, ids = _data(seed=1)
    g = region_graph(v, ids, 5, method="exact")
    a = g.to_dense().astype(np.float64)
    deg = a.sum(axis=1)
    inv = np.where(deg > 0, 1 / np.sqrt(np.where(deg > 0, deg, 1)), 0)
    w = inv[:, None] * a * inv[None, :]
    alpha = 0.9
    ref = np.linalg.solve(np.eye(len(v)) - alpha * w, (1 - alpha) * np.ones(len(v)))
    np.testing.assert_allclose(region_centrality(g, alpha, tol=1e-8), ref, rtol=1e-4, atol=1e-6)


def test_other_image_neighbours_match_brute_force():
    v, ids = _data(seed=2)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((7, 6)).astype(np.float32)
    qi = rng.integers(0, 8, 7)
    sims, idx, valid = other_image_neighbours(q, qi, v, ids, 3, method="exact")
    s = q.astype(np.float64) @ v.T
    for r in range(7):
        cand = np.flatnonzero(ids != qi[r])
        top = cand[np.argsort(-s[r, cand])[:3]]
        np.testing.assert_array_equal(np.sort(idx[r]), np.sort(top))
        np.testing.assert_allclose(sims[r], np.sort(s[r, top])[::-1], rtol=1e-5)
    assert valid.all()


def test_one_image_is_not_a_collection():
    v, _ = _data(n=6)
    with pytest.raises(ValueError, match="at least 2 images"):
        region_graph(v, np.zeros(6, int), 2)
    with pytest.raises(ValueError, match="one image id per row"):
        region_graph(v, np.zeros(5, int), 2)
