"""Similarity and feature saliency maps against finite differences and hand-built maps."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from retrieval_jax.descriptors import gem, l2_normalize
from retrieval_jax.explanation.saliency import (feature_saliency, save_overlay, similarity_gradient,
                                                similarity_saliency)


def _toy_backbone():
    """A conv-only network: 3x3 conv (3 -> 4), ReLU, stride-2 3x3 conv (4 -> 6), softplus."""
    k1 = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4), jnp.float32) * 0.5
    k2 = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4, 6), jnp.float32) * 0.5

    def features(x):
        dn = ("NHWC", "HWIO", "NHWC")
        hp = jax.lax.Precision.HIGHEST
        y = jax.nn.relu(jax.lax.conv_general_dilated(x, k1.astype(x.dtype), (1, 1), "SAME",
                                                     dimension_numbers=dn, precision=hp))
        y = jax.lax.conv_general_dilated(y, k2.astype(y.dtype), (2, 2), "SAME", dimension_numbers=dn,
                                         precision=hp)
        return jax.nn.softplus(y)

    return features


def test_gradient_saliency_matches_finite_differences():
    features = _toy_backbone()
    pooling = functools.partial(gem, p=3.0)
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.9, (12, 10, 3))
    other = rng.normal(size=6)
    other /= np.linalg.norm(other)

    def score(img):  # float64 host reference
        with jax.enable_x64(True):
            x = jnp.asarray(img, jnp.float64)[None]
            d = l2_normalize(pooling(features(x).astype(jnp.float64)))[0]
            return float(jnp.dot(d, other))

    s, grad = similarity_gradient(features, pooling, image.astype(np.float32), other)
    assert grad.shape == (12, 10, 3)
    assert float(s) == pytest.approx(score(image), abs=1e-5)
    h = 1e-4
    for (i, j) in [(0, 0), (5, 4), (11, 9), (7, 2)]:
        for c in range(3):
            up, down = image.copy(), image.copy()
            up[i, j, c] += h
            down[i, j, c] -= h
            fd = (score(up) - score(down)) / (2 * h)
            assert float(grad[i, j, c]) == pytest.approx(fd, rel=2e-2, abs=2e-5), (i, j, c)

    sal = np.asarray(similarity_saliency(features, pooling, image.astype(np.float32), other))
    expected = np.abs(np.asarray(grad)).max(axis=-1)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert sal.shape == (12, 10) and sal.min() == 0.0 and sal.max() == pytest.approx(1.0)
    np.testing.assert_allclose(sal, expected, atol=1e-6)


def test_feature_saliency_peaks_at_hot_region():
    rng = np.random.default_rng(1)
    fmap = rng.uniform(0.0, 0.1, (4, 4, 16)).astype(np.float32)
    fmap[2, 1, :] += 3.0                                   # one hot cell: rows 64-95, cols 32-63
    sal = np.asarray(feature_saliency(fmap, image_size=(128, 128)))
    assert sal.shape == (128, 128)
    assert sal.min() == pytest.approx(0.0) and sal.max() == pytest.approx(1.0)
    y, x = np.unravel_index(np.argmax(sal), sal.shape)
    assert 64 <= y < 96 and 32 <= x < 64
    assert sal[:32].max() < 0.2 and sal[:, 96:].max() < 0.2   # far from the hot cell
    # explicit weights that select only cold channels: the hot cell still dominates there
    w = np.zeros(16, np.float32)
    w[3] = 1.0
    raw = np.asarray(feature_saliency(fmap, w))
    assert raw.shape == (4, 4) and np.unravel_index(np.argmax(raw), raw.shape) == (2, 1)
    with pytest.raises(ValueError, match="channel_weights"):
        feature_saliency(fmap, np.ones(3))


def test_save_overlay_writes_png_atomically(tmp_path, monkeypatch):
    image = np.linspace(0, 1, 64 * 48).reshape(64, 48)
    sal = np.zeros((2, 2))
    sal[0, 1] = 1.0
    path = tmp_path / "overlay.png"
    assert save_overlay(path, image, sal, title="query") == path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 50
    # a query/result pair in one figure, replacing the file
    save_overlay(path, [image, np.zeros((64, 48, 3), np.uint8)], [sal, None], title=["q", "r"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]
    assert sorted(os.listdir(tmp_path)) == ["overlay.png"]        # no temporary left over
    # bad input, or a crash before the final rename: the previous file is intact and no
    # temporary file is left behind
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_overlay(path, image, np.zeros((2, 2, 2)))
    import retrieval_jax.files as io_module

    def crash(*args):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(io_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_overlay(path, image, 1.0 - sal)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["overlay.png"]
