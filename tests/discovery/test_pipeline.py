"""discover on a tiny synthetic collection: the recurring object takes the OS mass, clutter does not."""
import numpy as np
import pytest

from retrieval_jax.discovery import Discovery, discover, saliency_precision, synthetic_batch

OPTIONS = dict(batch_size=8, k=3, os_neighbours=3, shrinkage=0.5, egm_options=dict(capacity=8))


@pytest.fixture(scope="module")
def collection():
    maps, boxes, has = synthetic_batch(8, shape=(16, 16), channels=24, clutter=2, seed=1)
    return maps, boxes, discover(maps, keep_maps=True, **OPTIONS)


def test_the_recurring_object_takes_most_of_the_os_mass(collection):
    _, boxes, d = collection
    fs = np.asarray(saliency_precision(np.stack(d.fs_maps), boxes))
    os_ = np.asarray(saliency_precision(np.stack(d.os_maps), boxes))
    # FS cannot tell the object from the two clutter blobs of the same strength (about a third each)
    assert fs.mean() < 0.5
    assert os_.mean() > 0.6 and os_.mean() > fs.mean() + 0.2
    assert np.all(os_ > fs)
    # the OS.EGM descriptors of images sharing the object are closer than the FS.EGM ones
    def mean_sim(x):
        s = x @ x.T
        return (s.sum() - np.trace(s)) / (len(x) * (len(x) - 1))
    assert mean_sim(d.descriptors) > mean_sim(d.fs_descriptors)


def test_the_discovery_is_consistent(collection):
    maps, _, d = collection
    assert isinstance(d, Discovery) and d.num_images == 8 and d.empty_os == 0
    np.testing.assert_allclose(np.linalg.norm(d.descriptors, axis=1), 1.0, rtol=1e-5)
    valid = np.asarray(d.regions.valid)
    assert d.num_regions == valid.sum()
    assert np.all(valid[d.region_image, d.region_slot])
    np.testing.assert_array_equal(np.bincount(d.region_image, minlength=8), valid.sum(axis=1))
    np.testing.assert_allclose(np.linalg.norm(d.region_descriptors, axis=1), 1.0, rtol=1e-5)
    assert np.all((d.region_mass > 0) & (d.region_mass <= 1))
    assert d.centrality.shape == (d.num_regions,) and d.graph.num_nodes == d.num_regions
    # no edge between two regions of one image
    idx, w = np.asarray(d.graph.indices), np.asarray(d.graph.weights)
    same = d.region_image[idx] == d.region_image[:, None]
    assert not np.any(w[same] > 0)
    # a list of batches gives the same result as the array
    again = discover([maps], **OPTIONS)
    np.testing.assert_allclose(again.descriptors, d.descriptors, atol=1e-5)


def test_bad_collections_get_clear_errors(collection):
    maps, _, _ = collection
    with pytest.raises(ValueError, match="at least 2"):
        discover(maps[:1], **OPTIONS)
    zero = maps.copy()
    zero[3] = 0.0
    with pytest.raises(ValueError, match="no positive activation"):
        discover(zero, **OPTIONS)
    with pytest.raises(TypeError, match="fresh iterable"):
        discover(iter([maps]), **OPTIONS)
    with pytest.raises(ValueError, match="empty"):
        discover([], **OPTIONS)


def test_whitening_dim_keeps_eight_regions_per_dimension_and_lowers_what_pca_cannot_learn():
    from retrieval_jax.discovery import whitening_dim
    assert whitening_dim(1280, 555) == 69            # R // 8 on a few hundred regions
    assert whitening_dim(1280, 100_000) == 1280      # every channel on a large collection
    assert whitening_dim(1280, 100) == 32            # at least 32 where the regions span them
    assert whitening_dim(24, 24) == 23 and whitening_dim(64, 5) == 4
    assert whitening_dim(1280, 555, 64) == 64
    with pytest.warns(RuntimeWarning, match="exceeds the 554 directions"):
        assert whitening_dim(1280, 555, 600) == 554
    with pytest.raises(ValueError):
        whitening_dim(1280, 555, 0)
    with pytest.raises(ValueError, match="exceeds the 8 channels"):
        whitening_dim(8, 555, 9)
