"""Pooling against independent numpy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from retrieval_jax.descriptors import whitening
from retrieval_jax.descriptors.pooling import (combine_scales, crow, crow_weights, gem, l2_normalize,
                                               mac, rmac, rmac_boxes, rmac_regions, spoc)


def _map(seed=0, shape=(2, 7, 9, 5), relu=True):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.maximum(x, 0) if relu else x


# ----------------------------------------------------------------------------- numpy references
def np_mac(x):
    B, H, W, C = x.shape
    out = np.full((B, C), -np.inf)
    for b in range(B):
        for h in range(H):
            for w in range(W):
                out[b] = np.maximum(out[b], x[b, h, w])
    return out


def np_spoc(x):
    B, H, W, C = x.shape
    out = np.zeros((B, C))
    for b in range(B):
        for h in range(H):
            for w in range(W):
                out[b] += x[b, h, w]
    return out / (H * W)


def np_gem(x, p, eps=1e-6):
    x = np.maximum(x.astype(np.float64), eps)
    B, H, W, C = x.shape
    out = np.zeros((B, C))
    for b in range(B):
        for c in range(C):
            out[b, c] = np.mean(x[b, :, :, c] ** p) ** (1.0 / p)
    return out


def np_crow(x, a=2.0, b=2.0, eps=1e-12):
    """Loop version of Kalantidis et al.'s reference (channels-last, one image at a time)."""
    x = x.astype(np.float64)
    B, H, W, C = x.shape
    out = np.zeros((B, C))
    for i in range(B):
        Z = x[i].sum(axis=-1)
        z = (Z ** a).sum() ** (1.0 / a)
        S = (Z / z) ** (1.0 / b)
        Q = np.array([np.count_nonzero(x[i, :, :, k]) / float(H * W) for k in range(C)])
        omega = np.array([math.log(Q.sum() / (eps + q)) if q > 0 else 0.0 for q in Q])
        for k in range(C):
            out[i, k] = omega[k] * np.sum(S * x[i, :, :, k])
    return out


def np_rmac(x, boxes, proj=None):
    B, _, _, C = x.shape
    out = []
    for b in range(B):
        acc = 0.0
        for top, left, h, w in boxes:
            v = x[b, top:top + h, left:left + w].reshape(-1, C).max(axis=0).astype(np.float64)
            v = v / np.linalg.norm(v)
            if proj is not None:
                v = (v - proj[0]) @ proj[1]
                v = v / np.linalg.norm(v)
            acc = acc + v
        out.append(acc / np.linalg.norm(acc))
    return np.array(out)


# ----------------------------------------------------------------------------- global pooling
def test_mac_spoc_against_loops():
    x = _map(relu=False)
    np.testing.assert_allclose(mac(x), np_mac(x), rtol=1e-6)
    np.testing.assert_allclose(spoc(x), np_spoc(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 7.5])
def test_gem_against_loop(p):
    x = _map(1)
    np.testing.assert_allclose(gem(x, p=p), np_gem(x, p), rtol=2e-5, atol=1e-7)


def test_gem_limits():
    x = _map(2) + 0.1  # positive map
    np.testing.assert_allclose(gem(x, p=1.0), spoc(x), rtol=1e-5)
    # p -> inf approaches MAC; no overflow even for a huge p on large activations
    big = x * 1e3
    np.testing.assert_allclose(gem(big, p=500.0), mac(big), rtol=2e-2)
    assert np.all(np.isfinite(gem(big, p=5000.0)))
    err = [float(jnp.max(jnp.abs(gem(x, p=p) - mac(x)))) for p in (3.0, 10.0, 50.0)]
    assert err[0] > err[1] > err[2]


def test_gem_learnable_p_gradient():
    x = jnp.asarray(_map(3) + 0.05)

    def f(p):
        return jnp.sum(gem(x, p=p))

    g = jax.grad(f)(jnp.float32(3.0))
    h = 1e-2
    fd = (np_gem(np.asarray(x), 3.0 + h).sum() - np_gem(np.asarray(x), 3.0 - h).sum()) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-2)
    # per-channel p
    pc = jnp.linspace(1.0, 4.0, x.shape[-1])
    out = gem(x, p=pc)
    ref = np.stack([np_gem(np.asarray(x)[..., c:c + 1], float(pc[c]))[:, 0] for c in range(x.shape[-1])], 1)
    np.testing.assert_allclose(out, ref, rtol=1e-4)
    assert np.all(np.isfinite(jax.grad(lambda p: jnp.sum(gem(x, p=p)))(pc)))


def test_pooling_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        mac(np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="mask must have shape"):
        spoc(np.zeros((1, 4, 5, 2)), mask=np.ones((1, 5, 4), bool))
    with pytest.raises(ValueError, match="positive"):
        gem(np.ones((1, 2, 2, 2)), p=0.0)


# ----------------------------------------------------------------------------- masks
def _pad(x, ph, pw, fill=50.0):
    B, H, W, C = x.shape
    out = np.full((B, H + ph, W + pw, C), fill, np.float32)
    out[:, :H, :W] = x
    mask = np.zeros((B, H + ph, W + pw), bool)
    mask[:, :H, :W] = True
    return out, mask


@pytest.mark.parametrize("fn", [mac, spoc, lambda x, mask=None: gem(x, p=3.0, mask=mask), crow],
                         ids=["mac", "spoc", "gem", "crow"])
def test_masked_pooling_equals_unpadded(fn):
    x = _map(4, relu=True)
    xp, m = _pad(x, 3, 2)
    np.testing.assert_allclose(fn(xp, mask=m), fn(x), rtol=1e-5, atol=1e-6)


def test_masked_batch_of_different_sizes():
    a, b = _map(5, (1, 4, 6, 3)), _map(6, (1, 7, 3, 3))
    xp = np.full((2, 7, 6, 3), -9.0, np.float32)
    m = np.zeros((2, 7, 6), bool)
    xp[0, :4, :6], m[0, :4, :6] = a[0], True
    xp[1, :7, :3], m[1, :7, :3] = b[0], True
    for fn in (mac, spoc, gem):
        out = jax.jit(lambda x, mm: fn(x, mask=mm))(xp, m)
        np.testing.assert_allclose(out[0], fn(a)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[1], fn(b)[0], rtol=1e-5, atol=1e-6)
    # a fully masked image pools to zeros, not inf/NaN
    empty = np.zeros((2, 7, 6), bool)
    for fn in (mac, spoc, gem, crow):
        assert np.all(np.isfinite(fn(xp, mask=empty)))


# ----------------------------------------------------------------------------- R-MAC
def test_rmac_boxes_square_map_hand_computed():
    # 10 x 10: scale 1 side 10, scale 2 side floor(20/3) = 6 at offsets {0, 4},
    # scale 3 side floor(20/4) = 5 at offsets {0, 2, 5}; 1 + 4 + 9 = 14 regions.
    expect = [(0, 0, 10, 10)]
    expect += [(t, l, 6, 6) for t in (0, 4) for l in (0, 4)]
    expect += [(t, l, 5, 5) for t in (0, 2, 5) for l in (0, 2, 5)]
    assert rmac_boxes(10, 10).tolist() == [list(b) for b in expect]


def test_rmac_boxes_wide_map_hand_computed():
    # 6 x 16: w = 6; candidate overlaps 1 - b_s / 6 with b_s = 10 / (s - 1), s = 2..7:
    # -0.67, 0.17, 0.44, 0.58, 0.67, 0.72 -> closest to 0.4 is s = 4, so the long side
    # has l + 3 regions at scale l. Regions: 4 x 1 + 5 x 2 + 6 x 3 = 32.
    b = rmac_boxes(6, 16)
    assert len(b) == 32
    s1 = [(0, l, 6, 6) for l in (0, 3, 6, 10)]
    s2 = [(t, l, 4, 4) for t in (0, 2) for l in (0, 3, 6, 9, 12)]
    s3 = [(t, l, 3, 3) for t in (0, 1, 3) for l in (0, 2, 5, 7, 10, 13)]
    assert b.tolist() == [list(x) for x in s1 + s2 + s3]
    # the transposed map gives the transposed boxes
    bt = rmac_boxes(16, 6)
    assert sorted(map(tuple, bt[:, [1, 0, 3, 2]].tolist())) == sorted(map(tuple, b.tolist()))


@pytest.mark.parametrize("hw", [(30, 40), (32, 32), (24, 60), (7, 5)])
def test_rmac_boxes_paper_properties(hw):
    H, W = hw
    b = rmac_boxes(H, W, levels=3)
    w = min(H, W)
    extra = None
    for level in (1, 2, 3):
        side = math.floor(2 * w / (level + 1))  # scale-l side length from the paper
        lvl = b[(b[:, 2] == side) & (b[:, 3] == side)]
        short = len(set(lvl[:, 0 if H <= W else 1].tolist()))
        long_ = len(set(lvl[:, 1 if H <= W else 0].tolist()))
        assert short == level  # l regions along the short side
        extra = long_ - level if extra is None else extra
        assert long_ - level == extra and len(lvl) == short * long_  # l + m along the long side
        assert (extra == 0) == (H == W)
        assert lvl[:, 0].min() == 0 and lvl[:, 1].min() == 0
        assert (lvl[:, 0] + side).max() == H and (lvl[:, 1] + side).max() == W  # covers the map
    assert np.all(b[:, 0] + b[:, 2] <= H) and np.all(b[:, 1] + b[:, 3] <= W)
    if (H, W) == (30, 40):
        # 1 extra region along the long side: 2 + 6 + 12; consecutive scale-1 regions
        # overlap 20/30 (the closest of the candidates to 40%)
        assert len(b) == 20
        assert b[:2].tolist() == [[0, 0, 30, 30], [0, 10, 30, 30]]


def test_rmac_against_loop():
    x = _map(7, (2, 10, 13, 6)) + 0.01
    boxes = rmac_boxes(10, 13)
    np.testing.assert_allclose(rmac(x), np_rmac(x, boxes), rtol=1e-5, atol=1e-6)
    regs, valid = rmac_regions(x)
    assert regs.shape == (2, len(boxes), 6) and bool(valid.all())
    np.testing.assert_allclose(np.linalg.norm(regs, axis=-1), 1.0, rtol=1e-5)
    # with learned whitening applied to every region
    X = np.asarray(regs).reshape(-1, 6)
    X = np.concatenate([X, np.random.default_rng(0).random((40, 6)).astype(np.float32)])
    wt = whitening.learn_pca_whitening(X, dim=4)
    ref = np_rmac(x, boxes, (np.asarray(wt.mean, np.float64), np.asarray(wt.projection, np.float64)))
    np.testing.assert_allclose(rmac(x, whitening=wt), ref, rtol=1e-4, atol=1e-5)
    assert jax.jit(lambda a: rmac(a, whitening=wt))(x).shape == (2, 4)


def test_rmac_regions_mask_validity():
    x = _map(8, (1, 10, 10, 4)) + 0.01
    m = np.zeros((1, 10, 10), bool)
    m[0, :4, :4] = True  # only the top-left corner is valid
    regs, valid = rmac_regions(x, mask=m)
    boxes = rmac_boxes(10, 10)
    expect = (boxes[:, 0] < 4) & (boxes[:, 1] < 4)
    assert valid[0].tolist() == expect.tolist()
    assert np.all(np.asarray(regs)[0, ~expect] == 0)
    # valid regions are MAC'd over the valid positions only
    for r in np.flatnonzero(expect):
        t, l, h, w = boxes[r]
        sub = x[0, t:min(t + h, 4), l:min(l + w, 4)].reshape(-1, 4).max(0)
        np.testing.assert_allclose(regs[0, r], sub / np.linalg.norm(sub), rtol=1e-5)


# ----------------------------------------------------------------------------- CroW
def test_crow_against_loop():
    x = _map(9, (2, 6, 8, 7))
    x[0, :, :, 3] = 0.0  # an all-zero channel
    np.testing.assert_allclose(crow(x), np_crow(x), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(crow(x, a=1.0, b=1.0), np_crow(x, 1.0, 1.0), rtol=1e-4, atol=1e-6)
    s, c = crow_weights(x)
    assert s.shape == (2, 6, 8) and c.shape == (2, 7)
    assert float(c[0, 3]) == 0.0
    # the spatial weights have unit a-norm before the 1/b power: ||S^b||_a = 1
    np.testing.assert_allclose(np.sum(np.asarray(s) ** 4, axis=(1, 2)), 1.0, rtol=1e-5)
    g = jax.grad(lambda v: jnp.sum(crow(v)))(jnp.asarray(x))
    assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- normalisation
def test_l2_normalize_zero_rows_and_grad():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    y = l2_normalize(x)
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(l2_normalize(v)))(jnp.asarray(x))
    assert np.all(np.isfinite(g))
    c = combine_scales([np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])])
    np.testing.assert_allclose(c, [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        combine_scales([np.ones((1, 2)), np.ones((1, 3))])


_pos_maps = hnp.arrays(np.float32, (2, 3, 4, 3), elements=st.floats(0.015625, 10.0, width=32))


@settings(max_examples=30, deadline=None)
@given(x=_pos_maps, p=st.floats(1.0, 20.0))
def test_property_gem_between_spoc_and_mac(x, p):
    g = np.asarray(gem(x, p=jnp.float32(p)))
    tol = 1e-4 * np.asarray(mac(x))
    assert np.all(np.asarray(spoc(x)) <= g + tol)
    assert np.all(g <= np.asarray(mac(x)) + tol)


@settings(max_examples=30, deadline=None)
@given(x=hnp.arrays(np.float32, (4, 6), elements=st.floats(-1e3, 1e3, width=32)))
def test_property_l2_normalize_idempotent(x):
    # the law holds for rows with ||x|| >= eps (and zero rows); below eps the row is
    # only scaled by 1/eps (norm < 1), never blown up to inf/NaN
    y = np.asarray(l2_normalize(x, eps=1e-12))
    big = np.linalg.norm(x.astype(np.float64), axis=-1) >= 1e-10
    np.testing.assert_allclose(np.asarray(l2_normalize(y))[big], y[big], rtol=1e-5, atol=1e-6)
    n = np.linalg.norm(y, axis=-1)
    assert np.all(np.abs(n[big] - 1) < 1e-5)
    assert np.all(np.isfinite(y)) and np.all(n <= 1 + 1e-5)
