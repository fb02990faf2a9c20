"""Synthetic feature maps with a recurring object among clutter, for tests and scale runs.

Each image's map A [h, w, C] >= 0 is a sum of Gaussian blobs, each blob a spatial
Gaussian (standard deviation ``sigma`` cells, cut to 0 beyond 2 sigma) times a sparse non-negative channel
signature, plus sparse weak background activations:

* the object: one of ``objects`` signatures shared by the collection (up to a small
  per-image jitter), present in a fraction ``object_rate`` of the images at a random
  position (with several objects, each image draws one at random: an object then recurs
  in about N / ``objects`` images);
* clutter: ``clutter`` blobs per image, each with its own random signature (nothing
  recurs), of the same size and strength as the object.

So the FS map cannot tell the object from the clutter (same sparsity, same energy),
while the collection can: only the object recurs.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from .. import _checks

__all__ = ["synthetic_batch", "synthetic_batches"]


def _signature(rng, channels: int, active: int) -> np.ndarray:
    sig = np.zeros(channels, np.float32)
    on = rng.choice(channels, size=active, replace=False)
    sig[on] = rng.uniform(0.5, 1.0, size=active)
    return sig


def synthetic_batch(n_images: int, *, shape=(16, 16), channels: int = 32, clutter: int = 2,
                    objects: int = 1, object_rate: float = 1.0, sigma: float = 1.5, active: int = 6,
                    jitter: float = 0.05,
                    background: float = 0.02, seed: int = 0, object_seed: int = 12345):
    """One batch of synthetic feature maps.

    Args:
      n_images: images in the batch.
      shape: (h, w) of the maps.
      channels: C.
      clutter: clutter blobs per image, each with a signature of its own.
      objects: distinct recurring objects (signatures drawn with ``object_seed``).
      object_rate: probability that an image holds the object.
      sigma: blob standard deviation in cells.
      active: channels on in a signature.
      jitter: relative noise on the object's signature per image.
      background: density of weak (0.05-0.15) random background activations.
      seed: seed of this batch (positions, clutter, background).
      object_seed: seed of the objects' signatures (the same across batches).

    Returns:
      (maps float32[n, h, w, C], boxes float32[n, 4] the object's box
      centre +- 2 sigma in map coordinates (row_min, col_min, row_max, col_max), clipped,
      has_object bool[n]).
    """
    n_images = _checks.check_positive_int(n_images, "n_images")
    h, w = (int(v) for v in shape)
    rng = np.random.default_rng(seed)
    objects = _checks.check_positive_int(objects, "objects")
    obj_rng = np.random.default_rng(object_seed)
    signatures = [_signature(obj_rng, channels, active) for _ in range(objects)]
    rows, cols = np.mgrid[:h, :w].astype(np.float32)
    maps = np.zeros((n_images, h, w, channels), np.float32)
    boxes = np.zeros((n_images, 4), np.float32)
    has = rng.random(n_images) < object_rate
    margin = min(2.0 * sigma, (min(h, w) - 1) / 2.0)
    for i in range(n_images):
        placed = []

        def position():
            for _ in range(50):
                y, x = rng.uniform(margin, h - 1 - margin), rng.uniform(margin, w - 1 - margin)
                if all((y - py) ** 2 + (x - px) ** 2 > (4 * sigma) ** 2 for py, px in placed):
                    break
            placed.append((y, x))
            return y, x

        blobs = []
        if has[i]:
            y, x = position()
            obj = signatures[int(rng.integers(objects))] if objects > 1 else signatures[0]
            sig = np.maximum(obj * (1.0 + jitter * rng.standard_normal(channels).astype(np.float32)), 0.0)
            blobs.append((y, x, sig))
            boxes[i] = [max(y - 2 * sigma, 0), max(x - 2 * sigma, 0), min(y + 2 * sigma, h - 1),
                        min(x + 2 * sigma, w - 1)]
        for _ in range(clutter):
            y, x = position()
            blobs.append((y, x, _signature(rng, channels, active)))
        for y, x, sig in blobs:
            d2 = ((rows - y) ** 2 + (cols - x) ** 2) / (sigma * sigma)
            g = np.where(d2 <= 4.0, np.exp(-d2 / 2), 0.0)      # cut at 2 sigma: sparse, as after a ReLU
            maps[i] += g[:, :, None] * sig[None, None, :]
        noise = rng.random((h, w, channels)) < background
        maps[i] += noise * rng.uniform(0.05, 0.15, (h, w, channels)).astype(np.float32)
    return maps, boxes, has


def synthetic_batches(n_images: int, batch_size: int = 256, **kwargs) -> Callable[[], Iterable[np.ndarray]]:
    """A re-iterable source of feature map batches for `discover`: each call yields the same
    batches (batch j generated with seed ``seed + j``), one at a time. ``kwargs`` go to
    `synthetic_batch`. The callable has ``num_batches``."""
    n_images = _checks.check_positive_int(n_images, "n_images")
    batch_size = _checks.check_positive_int(batch_size, "batch_size")
    seed = int(kwargs.pop("seed", 0))

    def batches():
        for j, start in enumerate(range(0, n_images, batch_size)):
            yield synthetic_batch(min(batch_size, n_images - start), seed=seed + j, **kwargs)[0]

    batches.num_batches = -(-n_images // batch_size)
    return batches
