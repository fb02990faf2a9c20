"""Regional pooling, the EGM descriptor and saliency precision against numpy and hand counts."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_jax.descriptors import learn_pca_whitening
from retrieval_jax.discovery import (egm_descriptor, egm_regions, pool_regions, region_boxes, saliency_precision,
                                     synthetic_batch)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), r0=st.integers(0, 5), c0=st.integers(0, 6), dr=st.integers(0, 5),
       dc=st.integers(0, 6), cut=st.integers(0, 5))
def test_precision_is_a_share_and_adds_over_disjoint_boxes(seed, r0, c0, dr, dc, cut):
    """Law: in [0, 1], 1 on the whole map, and additive over a box split into two along a row."""
    s = np.random.default_rng(seed).random((6, 7)).astype(np.float32)
    r1, c1 = min(r0 + dr, 5), min(c0 + dc, 6)
    box = np.array([r0, c0, r1, c1], np.float32)
    whole = float(saliency_precision(s, box))
    assert 0.0 <= whole <= 1.0
    assert float(saliency_precision(s, np.array([0, 0, 5, 6.0]))) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(whole, s[r0:r1 + 1, c0:c1 + 1].sum() / s.sum(), rtol=1e-5)
    m = r0 + cut
    if m < r1:
        top = float(saliency_precision(s, np.array([r0, c0, m, c1], np.float32)))
        bottom = float(saliency_precision(s, np.array([m + 1, c0, r1, c1], np.float32)))
        assert top + bottom == pytest.approx(whole, rel=1e-5, abs=1e-7)


def _ref_pool(a, box, p=None):
    r0, c0, r1, c1 = box
    rows = [i for i in range(a.shape[0]) if r0 <= i <= r1]
    cols = [j for j in range(a.shape[1]) if c0 <= j <= c1]
    block = np.maximum(a[np.ix_(rows, cols)], 0).reshape(-1, a.shape[-1])
    v = block.max(axis=0) if p is None else np.mean(np.maximum(block, 1e-6) ** p, axis=0) ** (1 / p)
    return v / np.linalg.norm(v)


def _ref_whiten(w, v):
    y = (v - np.asarray(w.mean)) @ np.asarray(w.projection)
    return y / np.linalg.norm(y)


def test_pooling_inside_boxes_matches_numpy():
    rng = np.random.default_rng(0)
    a = np.maximum(rng.standard_normal((2, 6, 7, 5)), 0).astype(np.float32) + 0.01
    boxes = np.array([[[0, 0, 2.5, 3.2], [1.5, 2, 5, 6]], [[3, 3, 3, 3], [0, 0, 5, 6]]], np.float32)
    valid = np.array([[True, True], [True, False]])
    for p in (None, 3.0):
        got = np.asarray(pool_regions(a, boxes, valid, p=p))
        for b in range(2):
            for r in range(2):
                want = _ref_pool(a[b], boxes[b, r], p) if valid[b, r] else np.zeros(5)
                np.testing.assert_allclose(got[b, r], want, rtol=1e-4, atol=1e-6)
    w = learn_pca_whitening(rng.random((40, 5)), dim=4)
    got = np.asarray(pool_regions(a, boxes, valid, whitening=w))
    want = [_ref_whiten(w, v) for v in np.asarray(pool_regions(a, boxes, valid))[valid]]
    np.testing.assert_allclose(got[valid], want, rtol=1e-4, atol=1e-5)
    assert np.all(got[~valid] == 0)


def test_egm_descriptor_sums_the_whitened_regional_vectors():
    # the shapes of test_pipeline's collection: one compiled EGM for both when they share a process
    maps, _, _ = synthetic_batch(8, shape=(16, 16), channels=24, clutter=2, seed=3)
    fs = maps.sum(axis=-1)
    w = learn_pca_whitening(np.random.default_rng(1).random((50, 24)), dim=8)
    got, regions = egm_descriptor(maps, fs, w, c=2.0, capacity=8, return_regions=True)
    ref_regions = egm_regions(fs, capacity=8)
    np.testing.assert_array_equal(np.asarray(regions.valid), np.asarray(ref_regions.valid))
    boxes = np.asarray(region_boxes(ref_regions, 2.0, (16, 16)))
    for b in range(8):
        vs = [_ref_whiten(w, _ref_pool(maps[b], boxes[b, r])) for r in range(8) if ref_regions.valid[b, r]]
        want = np.sum(vs, axis=0)
        np.testing.assert_allclose(np.asarray(got[b]), want / np.linalg.norm(want), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="constant"):
        egm_descriptor(maps, np.zeros((8, 16, 16)), w)
    with pytest.raises(ValueError, match="matching"):
        egm_descriptor(maps, fs[:, :8], w)


def test_saliency_precision_by_hand():
    s = np.zeros((4, 4), np.float32)
    s[1:3, 1:3] = 1.0
    s[0, 0] = 4.0                                   # total mass 8
    assert float(saliency_precision(s, np.array([1, 1, 2, 2.0]))) == pytest.approx(0.5)
    # a box covers its positions' cells in full: rows 0..2 x cols 0..1 here
    assert float(saliency_precision(s, np.array([0, 0, 2, 1.0]))) == pytest.approx(6 / 8)
    # an edge through a cell counts its share: col_min 1.25 puts the left edge at 0.75, a quarter into col 1
    assert float(saliency_precision(s, np.array([1.0, 1.25, 2, 2]))) == pytest.approx(3.5 / 8)
    # in image pixels: a 40 x 40 image, cells of 10 pixels; the box [10, 30] x [10, 30] is cells 1..2
    assert float(saliency_precision(s, np.array([10, 10, 30, 30.0]), image_size=(40, 40))) == pytest.approx(0.5)
    assert float(saliency_precision(s, np.array([0, 0, 40, 40.0]), image_size=(40, 40))) == pytest.approx(1.0)
    batch = np.asarray(saliency_precision(np.stack([s, s]), np.array([[1, 1, 2, 2.0], [0, 0, 0, 0.0]])))
    np.testing.assert_allclose(batch, [0.5, 0.5])
    with pytest.raises(ValueError, match="no positive mass"):
        saliency_precision(np.zeros((4, 4)), np.array([0, 0, 1, 1.0]))
    with pytest.raises(ValueError, match="row_min <= row_max"):
        saliency_precision(s, np.array([2, 0, 1, 1.0]))

