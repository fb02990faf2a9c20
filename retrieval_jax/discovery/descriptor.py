"""Regional descriptors of EGM regions, the OS.EGM / FS.EGM global descriptor, saliency precision.

Simeoni, Iscen, Tolias, Avrithis & Chum, "Unsupervised object discovery for instance
recognition", WACV 2018 (arXiv 1709.04725), Sec. 3-4:

* a region is described by pooling the feature map A [h, w, C] inside its box
  centre +- c s (`region_boxes`): max-pooling (MAC, Tolias et al., ICLR 2016) by
  default, or GeM with exponent p (Radenovic et al., TPAMI 2018); then L2-normalised
  and, once the collection's whitening is learned, PCA-whitened and L2-normalised again
  (`pool_regions`). The box, not a Gaussian window: each region is a rectangle, as
  the R-MAC regions the descriptor replaces;
* the global descriptor sums the whitened, L2-normalised regional vectors of the EGM
  regions of a saliency map and L2-normalises the sum, as R-MAC does with its fixed
  grid (`egm_descriptor`): on the OS map it is OS.EGM, the paper's descriptor; on the
  FS map, FS.EGM, its ablation without the collection;
* `saliency_precision`: the share of a map's mass inside a ground-truth box.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ..descriptors.pooling import l2_normalize
from ..descriptors.whitening import Whitening, apply_whitening
from .egm import Regions, check_saliency_map, egm_regions_traced, region_boxes

__all__ = ["pool_regions", "regional_descriptors", "egm_descriptor", "sum_regions", "saliency_precision"]


@functools.partial(jax.jit, static_argnames=("gem",))
def _pool(a, boxes, valid, p, *, gem):
    h, w = a.shape[-3:-1]
    rows = jnp.arange(h, dtype=jnp.float32)
    cols = jnp.arange(w, dtype=jnp.float32)
    a = jnp.maximum(a, 0.0)

    def one(a, boxes, valid):                     # a [h, w, C], boxes [R, 4], valid [R]
        in_r = (rows[None, :] >= boxes[:, 0:1]) & (rows[None, :] <= boxes[:, 2:3])      # [R, h]
        in_c = (cols[None, :] >= boxes[:, 1:2]) & (cols[None, :] <= boxes[:, 3:4])      # [R, w]
        inside = (in_r[:, :, None] & in_c[:, None, :]).astype(a.dtype)                  # [R, h, w]
        if gem:
            count = jnp.maximum(jnp.sum(inside, axis=(1, 2)), 1.0)[:, None]
            power = jnp.einsum("rhw,hwc->rc", inside, jnp.maximum(a, 1e-6) ** p,
                               precision=jax.lax.Precision.HIGHEST)
            v = (power / count) ** (1.0 / p)
        else:
            v = jax.lax.map(lambda m: jnp.max(m[:, :, None] * a, axis=(0, 1)), inside)
        return jnp.where(valid[:, None], l2_normalize(v), 0.0)

    fn = one
    for _ in range(a.ndim - 3):
        fn = jax.vmap(fn)
    return fn(a, boxes, valid)


def pool_regions(feature_maps, boxes, valid=None, *, p=None, whitening: Whitening | None = None) -> jax.Array:
    """Descriptors of boxes on feature maps: float32[..., R, D].

    v_r = l2( max_{(i, j) in box r} max(A(i, j), 0) ) (MAC), or with ``p``
    v_r = l2( ( mean_{(i, j) in box r} max(A(i, j), 1e-6)^p )^(1/p) ) (GeM); then, with a
    ``whitening``, l2( (v_r - mean) P ). A position (i, j) is in a box
    (row_min, col_min, row_max, col_max) when row_min <= i <= row_max and
    col_min <= j <= col_max (`region_boxes`' convention). Invalid slots are zero.
    Jittable; ``p`` may be traced.

    Args:
      feature_maps: float[..., h, w, C].
      boxes: float[..., R, 4] boxes per map.
      valid: bool[..., R] (default all).
      p: None for max-pooling, else the GeM exponent (> 0).
      whitening: a learned `Whitening` on C-dimensional vectors (D = its dim), or None (D = C).
    """
    a = jnp.asarray(feature_maps, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    if a.ndim < 3 or boxes.ndim != a.ndim - 1 or boxes.shape[-1] != 4 or boxes.shape[:-2] != a.shape[:-3]:
        raise ValueError(f"boxes must be [..., R, 4] over feature maps [..., h, w, C]; got {tuple(boxes.shape)} "
                         f"and {tuple(a.shape)}")
    valid = (jnp.ones(boxes.shape[:-1], bool) if valid is None
             else _checks.check_mask(valid, boxes.shape[:-1], "boxes.shape[:-1]"))
    gem = p is not None
    if gem:
        p = _checks.check_positive(p, "p")
    v = _pool(a, boxes, valid, jnp.float32(1.0) if p is None else jnp.float32(p), gem=gem)
    if whitening is None:
        return v
    return jnp.where(valid[..., None], apply_whitening(whitening, v), 0.0)


def regional_descriptors(feature_maps, regions: Regions, *, c=2.0, p=None,
                         whitening: Whitening | None = None) -> jax.Array:
    """`pool_regions` of the boxes centre +- c s of ``regions`` (`region_boxes`): float32[..., C_slots, D]."""
    a = jnp.asarray(feature_maps)
    boxes = region_boxes(regions, c, a.shape[-3:-1])
    return pool_regions(a, boxes, regions.valid, p=p, whitening=whitening)


@jax.jit
def sum_regions(vectors, valid) -> jax.Array:
    """l2( sum_r valid_r v_r ) over the region axis: [..., R, D] -> [..., D] (zeros if none). Jittable."""
    return l2_normalize(jnp.sum(jnp.where(valid[..., None], vectors, 0.0), axis=-2))


def egm_descriptor(feature_maps, saliency, whitening: Whitening | None = None, *, c=2.0, p=None,
                   return_regions: bool = False, **egm_options):
    """The EGM global descriptor of each image: l2( sum_r l2(whiten(l2(pool_r(A)))) ), float32[..., D].

    Regions are detected by `egm_regions` on ``saliency``: the OS map gives OS.EGM, the
    FS map (`feature_saliency_map`) FS.EGM (Simeoni et al., WACV 2018, Sec. 4). An image
    whose map yields no region gets a zero descriptor.

    Args:
      feature_maps: float[..., h, w, C] (the same [..., h, w] as ``saliency``).
      saliency: float[..., h, w] non-negative maps.
      whitening: a `Whitening` learned on regional descriptors (None: no whitening).
      c: box half-width in fitted standard deviations.
      p: None (max-pooling) or the GeM exponent.
      return_regions: also return the `Regions`.
      **egm_options: `egm_regions` keywords (capacity, iterations, expansion, threshold,
        init_sigma, min_sigma, init).

    Raises:
      ValueError: mismatched shapes, or (concrete maps) a bad saliency map (`egm_regions`).
    """
    a = jnp.asarray(feature_maps, jnp.float32)
    if not _checks.is_traced(saliency):
        saliency = check_saliency_map(saliency)
    s = jnp.asarray(saliency, jnp.float32)
    if a.ndim < 3 or s.shape != a.shape[:-1]:
        raise ValueError(f"saliency must be [..., h, w] matching feature_maps [..., h, w, C]; got "
                         f"{tuple(s.shape)} and {tuple(a.shape)}")
    regions = egm_regions_traced(s, **egm_options)
    vectors = regional_descriptors(a, regions, c=c, p=p, whitening=whitening)
    out = sum_regions(vectors, regions.valid)
    return (out, regions) if return_regions else out


def saliency_precision(saliency, box, image_size=None) -> jax.Array:
    """Share of a map's mass inside a box: sum_{p in box} S(p) / sum_p S(p), float32[...].

    Simeoni et al., WACV 2018, Sec. 5 (the ground-truth box of the object). Each map
    position (i, j) is the cell [i - 0.5, i + 0.5] x [j - 0.5, j + 0.5] and counts by the
    fraction of its area inside the box, so a box edge through a cell counts part of it.
    Jittable over a batch (``saliency`` [..., h, w] with ``box`` [..., 4]).

    Args:
      saliency: float[..., h, w] non-negative maps.
      box: float[..., 4] (row_min, col_min, row_max, col_max). In map coordinates (the
        default) a box covers the positions from row_min to row_max and col_min to
        col_max, i.e. the cells of those positions in full (`region_boxes` and
        `pool_regions`' convention): its edges are row_min - 0.5, ..., col_max + 0.5.
        With ``image_size``, it is in image pixels.
      image_size: (H, W) of the image the map covers: the box edges are then pixel
        coordinates, the image spanning [0, H] x [0, W], tiled by the map's h x w cells.

    Raises:
      ValueError: a map with no positive mass or a negative value, an empty box
        (row_max < row_min), when concrete.
    """
    s = jnp.asarray(saliency, jnp.float32)
    b = jnp.asarray(box, jnp.float32)
    if s.ndim < 2 or b.shape != s.shape[:-2] + (4,):
        raise ValueError(f"box must be [..., 4] over maps [..., h, w]; got {tuple(b.shape)} and {tuple(s.shape)}")
    h, w = s.shape[-2:]
    if not _checks.is_traced(s, b):
        sn, bn = np.asarray(s), np.asarray(b)
        if not np.isfinite(sn).all() or (sn < 0).any():
            raise ValueError("saliency must be finite and non-negative")
        if (sn.reshape(-1, h * w).sum(axis=1) <= 0).any():
            raise ValueError("a saliency map has no positive mass: its precision is undefined")
        if not np.isfinite(bn).all() or (bn[..., 2] < bn[..., 0]).any() or (bn[..., 3] < bn[..., 1]).any():
            raise ValueError(f"box must be finite with row_min <= row_max and col_min <= col_max, got {bn}")
    if image_size is not None:
        if len(tuple(image_size)) != 2 or min(float(v) for v in image_size) <= 0:
            raise ValueError(f"image_size must be (H, W) > 0, got {image_size!r}")
        sy, sx = h / float(image_size[0]), w / float(image_size[1])
        b = jnp.stack([b[..., 0] * sy - 0.5, b[..., 1] * sx - 0.5, b[..., 2] * sy - 0.5, b[..., 3] * sx - 0.5],
                      axis=-1)
    else:
        b = b + jnp.array([-0.5, -0.5, 0.5, 0.5], jnp.float32)
    return _precision(s, b)


@jax.jit
def _precision(s, b):
    h, w = s.shape[-2:]
    i = jnp.arange(h, dtype=jnp.float32)
    j = jnp.arange(w, dtype=jnp.float32)
    ov_r = jnp.clip(jnp.minimum(b[..., 2:3], i + 0.5) - jnp.maximum(b[..., 0:1], i - 0.5), 0.0, 1.0)   # [..., h]
    ov_c = jnp.clip(jnp.minimum(b[..., 3:4], j + 0.5) - jnp.maximum(b[..., 1:2], j - 0.5), 0.0, 1.0)   # [..., w]
    inside = jnp.sum(s * ov_r[..., :, None] * ov_c[..., None, :], axis=(-2, -1))
    total = jnp.sum(s, axis=(-2, -1))
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0)
