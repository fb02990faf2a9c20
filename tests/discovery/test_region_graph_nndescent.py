"""The region graph's NN-descent route: against an exact brute-force build (numpy), with the real
pynndescent (slow: its numba code compiles on the first call of a process, minutes on 2 cores) and
with its search replaced by a brute-force one (fast: the route's width, same-image filter and
empty slots). Bad methods raise."""
import numpy as np
import pytest

from retrieval_jax.discovery import discover, other_image_neighbours, region_graph
from retrieval_jax.discovery import regions as regions_module


def _collection(images=400, per_image=7, d=16, objects=60, seed=0):
    """Regions of ``images`` images: per image one region near one of ``objects`` centres, the
    rest clutter of its own; unit rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((objects, d))
    ids = np.repeat(np.arange(images), per_image)
    v = rng.standard_normal((ids.size, d))
    first = np.arange(0, ids.size, per_image)
    v[first] = centres[rng.integers(0, objects, images)] + 0.3 * rng.standard_normal((images, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32), ids


def _brute_lists(x, k):
    """Exact self-search by numpy: (sims, idx) [n, k], self excluded, decreasing."""
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1).astype(np.float32), idx.astype(np.int32)


def _ref_graph(v, ids, k, gamma=3.0):
    s = v.astype(np.float64) @ v.T.astype(np.float64)
    s[ids[:, None] == ids[None, :]] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    a = np.zeros_like(s)
    rows = np.arange(len(v))[:, None]
    a[rows, top] = np.maximum(s[rows, top], 0) ** gamma
    return np.minimum(a, a.T)


def _edges(dense):
    i, j = np.nonzero(np.triu(dense))
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.slow  # pynndescent's first call compiles its numba code: minutes in a fresh process
def test_nndescent_region_graph_agrees_with_exact():
    pytest.importorskip("pynndescent")
    v, ids = _collection()
    got = region_graph(v, ids, 10, method="nndescent").to_dense()
    ref = _ref_graph(v, ids, 10)
    assert not np.any(got[ids[:, None] == ids[None, :]])
    e_got, e_ref = _edges(got), _edges(ref)
    assert len(e_got & e_ref) / len(e_ref) >= 0.95
    both = tuple(np.array(sorted(e_got & e_ref)).T)
    np.testing.assert_allclose(got[both], ref[both], rtol=1e-4, atol=1e-7)


def test_nndescent_route_searches_wide_and_drops_same_image_neighbours(monkeypatch):
    """With NN-descent replaced by an exact self-search, the route gives the exact graph: the
    lists are wide enough (k + the most regions of one image) and the filter is right."""
    v, ids = _collection(images=80, per_image=6)
    widths = []

    def exact_self_search(x, k, seed=0):
        widths.append(k)
        return _brute_lists(x, k)

    monkeypatch.setattr(regions_module, "nndescent_knn", exact_self_search)
    got = region_graph(v, ids, 5, method="nndescent").to_dense()
    assert widths and widths[0] >= 5 + 6 - 1
    assert not np.any(got[ids[:, None] == ids[None, :]])
    np.testing.assert_allclose(got, _ref_graph(v, ids, 5), rtol=1e-4, atol=1e-7)


def test_nndescent_route_marks_empty_and_same_image_slots_invalid(monkeypatch):
    v, ids = _collection(images=50, per_image=4)

    widths = []

    def partial_search(x, k, seed=0):
        widths.append(k)
        sims, idx = _brute_lists(x, k)
        sims[:, -3:], idx[:, -3:] = -np.inf, -1       # slots NN-descent could not fill
        return sims, idx

    monkeypatch.setattr(regions_module, "nndescent_knn", partial_search)
    k = 4
    sims, idx, valid = other_image_neighbours(v, ids, v, ids, k, method="nndescent")
    assert sims.shape == idx.shape == valid.shape == (len(v), k)
    assert np.all(idx[valid] >= 0) and np.all(ids[idx[valid]] != ids[np.nonzero(valid)[0]])
    assert np.all(sims[~valid] == 0)
    _, ref_i = _brute_lists(v, widths[0] - 3)
    for r in range(len(v)):                           # the valid slots: the other-image part of the filled ones
        other = ref_i[r][ids[ref_i[r]] != ids[r]][:k]
        np.testing.assert_array_equal(idx[r][valid[r]], other)


def test_bad_methods_raise():
    v, ids = _collection(images=20, per_image=3)
    with pytest.raises(ValueError, match="method must be one of"):
        region_graph(v, ids, 3, method="annoy")
    with pytest.raises(ValueError, match="method must be one of"):
        other_image_neighbours(v, ids, v, ids, 3, method="hnsw")
    with pytest.raises(ValueError, match="self-search"):      # queries that are not the database
        other_image_neighbours(v[:5], ids[:5], v, ids, 3, method="nndescent")
    maps = np.ones((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="graph_method='nndescent'"):
        discover(maps, method="nndescent")
    with pytest.raises(ValueError, match="must be one of"):
        discover(maps, graph_method="kdtree")
