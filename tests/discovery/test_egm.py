"""EGM region detection against synthetic blob maps, a hand-computed purge and numerical overlaps."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from retrieval_jax.discovery import Regions, egm_regions, overlaps, purge, region_boxes


def _blobs(centres, sigmas, shape=(32, 32), amps=None):
    r, c = np.mgrid[:shape[0], :shape[1]]
    m = np.zeros(shape)
    for i, ((y, x), s) in enumerate(zip(centres, sigmas)):
        m += (1.0 if amps is None else amps[i]) * np.exp(-((r - y) ** 2 + (c - x) ** 2) / (2 * s * s))
    m[m < 1e-12] = 0.0     # no float32 subnormals (XLA flushes them to zero)
    return m.astype(np.float32)


CENTRES = [(8.3, 9.6), (22.2, 24.5), (7.0, 25.0)]
SIGMAS = [1.5, 2.0, 1.2]


def _match(found, expected):
    """For each expected centre, the distance to the nearest found one."""
    d = np.linalg.norm(np.asarray(found)[:, None] - np.asarray(expected)[None], axis=-1)
    return d.min(axis=0)


CLOSE = [(15.0, 14.0), (15.0, 15.5)]   # 1.5 apart, sigma 2
FAR = [(15.0, 8.0), (15.0, 22.0)]


# 25 blobs on a grid, more than the 16 slots: 16 strong ones and 9 faint ones
GRID = [(3.3 + 6 * i, 3.2 + 6 * j) for i in range(5) for j in range(5)]
GRID_AMPS = np.where(np.isin(np.arange(25), [1, 4, 7, 10, 13, 16, 19, 22, 24]), 0.02, np.linspace(0.6, 1.0, 25))
STRONG = [c for c, a in zip(GRID, GRID_AMPS) if a > 0.5]


@pytest.fixture(scope="module")
def maps():
    """One blob, two, three, two closer than their sigma, two far apart, a crowded grid: one batch, one program."""
    return np.stack([_blobs(CENTRES[:1], SIGMAS[:1]), _blobs(CENTRES[:2], SIGMAS[:2]), _blobs(CENTRES, SIGMAS),
                     _blobs(CLOSE, [2.0, 2.0]), _blobs(FAR, [2.0, 2.0]), _blobs(GRID, [1.0] * 25, amps=GRID_AMPS)])


@pytest.fixture(scope="module")
def found(maps):
    """Both starts; "maxima" under jit and vmap over a traced threshold (0.5 and 1): one program."""
    @jax.jit
    def by_threshold(m, thresholds):
        return jax.vmap(lambda t: egm_regions(m, capacity=16, threshold=t))(thresholds)

    both = by_threshold(maps, jnp.array([0.5, 1.0]))
    at = [jax.tree_util.tree_map(lambda x, i=i: x[i], both) for i in range(2)]
    return {"maxima": at[0], "all": egm_regions(maps, init="all", capacity=64), "maxima at 1": at[1]}


def test_m_blobs_give_m_regions_centred_within_a_pixel(maps, found):
    for init in ("maxima", "all"):
        r = found[init]
        for m in (1, 2, 3):
            valid = np.asarray(r.valid[m - 1])
            assert valid.sum() == m, init
            centre = np.asarray(r.centre[m - 1])[valid]
            assert _match(centre, CENTRES[:m]).max() < 1.0
            # an isolated blob is fitted with its own standard deviation, whatever the expansion
            order = np.argmin(np.linalg.norm(centre[:, None] - np.asarray(CENTRES[:m])[None], axis=-1), axis=1)
            np.testing.assert_allclose(np.asarray(r.sigma[m - 1])[valid], np.asarray(SIGMAS)[order], rtol=0.05)
    np.testing.assert_array_equal(np.asarray(found["maxima"].overflow[:5]), 0)     # map 5 overflows: see below
    # init="all": every position with positive saliency starts a component (more than the 64 slots)
    np.testing.assert_array_equal(np.asarray(found["all"].overflow), np.sum(maps > 0, axis=(1, 2)) - 64)


def test_masses_are_the_blob_masses(found):
    r = found["all"]
    valid = np.asarray(r.valid[2])
    np.testing.assert_allclose(np.sort(np.asarray(r.mass[2])[valid]),
                               np.sort([2 * math.pi * s * s for s in SIGMAS]), rtol=0.05)


def test_two_blobs_closer_than_their_sigma_merge(found):
    for init in ("maxima", "all"):
        r = found[init]
        assert int(r.valid[3].sum()) == 1, init
        np.testing.assert_allclose(np.asarray(r.centre[3, 0]), [15.0, 14.75], atol=0.5)
        assert int(r.valid[4].sum()) == 2, init
        assert _match(np.asarray(r.centre[4])[np.asarray(r.valid[4])], FAR).max() < 1.0


def test_purge_rule_by_hand_two_components():
    purge_ = jax.jit(purge)
    pi = np.array([0.7, 0.3])
    mu = np.array([[0.0, 0.0], [1.0, 1.0]])
    var = np.array([1.0, 2.0])
    # by hand: ||p_i||^2 = pi_i^2 / (4 pi var_i);
    # <p_1, p_2> = pi_1 pi_2 exp(-d^2 / (2 (v_1 + v_2))) / (2 pi (v_1 + v_2)), d^2 = 2
    n11 = 0.49 / (4 * math.pi * 1.0)
    n22 = 0.09 / (4 * math.pi * 2.0)
    n12 = 0.21 * math.exp(-2.0 / 6.0) / (2 * math.pi * 3.0)
    ov = np.asarray(overlaps(pi, mu, var))
    np.testing.assert_allclose(ov, [[n11, n12], [n12, n22]], rtol=1e-5)
    rho1 = n11 / (n11 + n12)                    # visited first (larger weight), the other still kept
    rho2_if_1_kept = n22 / (n22 + n12)
    assert rho2_if_1_kept < rho1
    t = 0.5 * (rho1 + rho2_if_1_kept)           # between: the light one goes
    np.testing.assert_array_equal(np.asarray(purge_(pi, mu, var, np.array([True, True]), t)), [True, False])
    t = 0.5 * (rho1 + 1.0)                      # above rho1: the heavy one goes first, then the light one
    np.testing.assert_array_equal(np.asarray(purge_(pi, mu, var, np.array([True, True]), t)), [False, True])
    t = 0.5 * rho2_if_1_kept                    # below both: both stay
    np.testing.assert_array_equal(np.asarray(purge_(pi, mu, var, np.array([True, True]), t)), [True, True])
    # an invalid component is neither visited nor counted
    np.testing.assert_array_equal(np.asarray(purge_(pi, mu, var, np.array([False, True]), 0.99)), [False, True])


def test_overlap_is_the_integral_of_the_product_of_the_two_components():
    pi = np.array([0.6, 0.4])
    mu = np.array([[0.3, -0.5], [1.1, 0.7]])
    var = np.array([0.8, 1.7])
    g = np.linspace(-12, 12, 1201)
    y, x = np.meshgrid(g, g, indexing="ij")

    def density(k):
        d2 = (y - mu[k, 0]) ** 2 + (x - mu[k, 1]) ** 2
        return pi[k] * np.exp(-d2 / (2 * var[k])) / (2 * math.pi * var[k])

    cell = (g[1] - g[0]) ** 2
    ref = np.array([[np.sum(density(i) * density(j)) * cell for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(np.asarray(overlaps(pi, mu, var)), ref, rtol=1e-4)


def test_batch_is_vmapped_and_parameters_are_traced(found):
    batch = found["maxima"]
    assert isinstance(batch, Regions) and batch.centre.shape == (6, 16, 2) and batch.overflow.shape == (6,)
    # threshold 1: every component overlapping another goes, the last one visited stays; the two blobs
    # of map 1 are 20 cells apart, their overlap ratio (~1e-10) rounds rho to 1 in float32: both stay
    np.testing.assert_array_equal(np.asarray(found["maxima at 1"].valid.sum(axis=1))[:5], [1, 2, 1, 1, 1])


def test_capacity_keeps_the_strongest_and_counts_the_rest(maps, found):
    m = maps[5]
    r = found["maxima"]
    maxima = np.sum((m == ndimage.maximum_filter(m, size=3, mode="constant", cval=-np.inf)) & (m > 0))
    assert len(STRONG) == 16 and maxima >= 25
    assert int(r.overflow[5]) == maxima - 16 and int(r.valid[5].sum()) == 16
    assert _match(np.asarray(r.centre[5]), STRONG).max() < 1.0


def test_region_boxes_by_hand():
    r = Regions(centre=jnp.array([[5.0, 6.0], [0.5, 9.0], [0.0, 0.0]]), sigma=jnp.array([1.0, 2.0, 0.0]),
                mass=jnp.array([2.0, 1.0, 0.0]), valid=jnp.array([True, True, False]), overflow=jnp.int32(0))
    boxes = np.asarray(region_boxes(r, 2.0, (10, 10)))
    np.testing.assert_allclose(boxes, [[3, 4, 7, 8], [0, 5, 4.5, 9], [0, 0, 0, 0]])
    tiny = Regions(centre=jnp.array([[4.2, 4.2]]), sigma=jnp.array([0.1]), mass=jnp.array([1.0]),
                   valid=jnp.array([True]), overflow=jnp.int32(0))
    np.testing.assert_allclose(np.asarray(region_boxes(tiny, 1.0, (10, 10))), [[3.7, 3.7, 4.7, 4.7]], atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 5), np.float32), "empty"),
    (np.ones((6, 6), np.float32), "constant"),
    (np.zeros((6, 6), np.float32), "constant"),
    (np.where(np.eye(6) > 0, np.nan, 1.0).astype(np.float32), "NaN"),
    (-np.eye(6, dtype=np.float32), "negative"),
    (np.ones(6, np.float32), r"\[h, w\]"),
])
def test_bad_maps_get_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        egm_regions(bad)


def test_bad_parameters_get_clear_errors():
    m = _blobs(CENTRES[:1], SIGMAS[:1])
    with pytest.raises(ValueError, match="expansion"):
        egm_regions(m, expansion=1.0)
    with pytest.raises(ValueError, match="threshold"):
        egm_regions(m, threshold=1.5)
    with pytest.raises(ValueError, match="capacity"):
        egm_regions(m, capacity=0)
    with pytest.raises(ValueError, match="init"):
        egm_regions(m, init="grid")
    r = Regions(centre=jnp.zeros((1, 2)), sigma=jnp.ones(1), mass=jnp.ones(1), valid=jnp.ones(1, bool),
                overflow=jnp.int32(0))
    with pytest.raises(ValueError, match="shape"):
        region_boxes(r, 2.0, (10,))
