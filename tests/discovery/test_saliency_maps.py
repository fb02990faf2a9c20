"""FS and OS maps against numpy written from the paper's definitions."""
import numpy as np
import pytest

from retrieval_jax.discovery import feature_saliency_map, fs_channel_weights, normalized_saliency, object_saliency


def _relu_maps(rng, shape):
    a = rng.standard_normal(shape).astype(np.float32)
    return np.maximum(a, 0.0)


def test_fs_map_is_the_sparsity_weighted_channel_sum():
    rng = np.random.default_rng(0)
    a = _relu_maps(rng, (2, 5, 6, 7))
    a[..., 0] = 1.0                                    # dense channel: q = 1, weight 0
    a[..., 1] = 0.0
    a[0, 2, 3, 1] = 4.0                                # rare channel: one position in 30
    eps = 1e-6
    ref = np.zeros((2, 5, 6))
    for b in range(2):
        q = (a[b] > 0).reshape(-1, 7).mean(axis=0)
        w = np.maximum(-np.log(eps + q), 0.0)
        ref[b] = np.tensordot(a[b], w, axes=([2], [0]))
    np.testing.assert_allclose(np.asarray(feature_saliency_map(a, eps)), ref, rtol=1e-5, atol=1e-5)
    w = np.asarray(fs_channel_weights(a, eps))
    assert w[0, 0] == 0.0 and abs(w[0, 1] - np.log(30.0)) < 1e-4
    # one image alone gives the same map as inside the batch (the weights are per image)
    np.testing.assert_allclose(np.asarray(feature_saliency_map(a[1], eps)), ref[1], rtol=1e-5, atol=1e-5)


def test_negative_activations_are_clamped():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(feature_saliency_map(a)), np.asarray(feature_saliency_map(np.maximum(a, 0))))


def test_os_map_is_the_fs_weighted_vote_of_the_neighbours():
    rng = np.random.default_rng(2)
    fs = rng.random((2, 3, 4)).astype(np.float32)
    sims = rng.uniform(-0.5, 1.0, (2, 3, 4, 5)).astype(np.float32)
    weights = rng.random((2, 3, 4, 5)).astype(np.float32)
    valid = rng.random((2, 3, 4, 5)) < 0.8
    ref = (fs / fs.max(axis=(1, 2), keepdims=True)) * np.sum(np.maximum(sims, 0) * weights * valid, axis=-1)
    np.testing.assert_allclose(np.asarray(object_saliency(fs, sims, weights, valid)), ref, rtol=1e-5)
    raw = (fs / fs.max(axis=(1, 2), keepdims=True)) * np.sum(sims * weights, axis=-1)
    np.testing.assert_allclose(np.asarray(object_saliency(fs, sims, weights, clip=False)), raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(normalized_saliency(np.zeros((2, 2)))), 0.0)
    with pytest.raises(ValueError, match="sims and weights"):
        object_saliency(fs, sims, weights[..., :4])


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 3), np.float32), "no positive activation"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.zeros((0, 4, 3), np.float32), "empty"),
    (np.ones((4, 3), np.float32), "feature map"),
])
def test_bad_feature_maps_get_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        feature_saliency_map(bad)
