"""Feature saliency (FS) and object saliency (OS) maps on a last convolutional map.

Simeoni, Iscen, Tolias, Avrithis & Chum, "Unsupervised object discovery for instance
recognition", WACV 2018 (arXiv 1709.04725), Sec. 3; "Graph-based particular object
discovery", MVA 2019.

* FS map, from one image's activations A [h, w, C] alone: with q_k the fraction of
  positions where channel k is positive,

      w_k = -log(eps + q_k),    F(x, y) = sum_k w_k A_k(x, y),

  the sparsity-sensitive channel weighting of CroW (Kalantidis, Mellina & Osindero,
  ECCV-W 2016): a channel firing everywhere gets weight ~0, a rare one a large weight.
  CroW's Omega_k = log(sum_j q_j / (eps + q_k)) differs by the constant log(sum_j q_j)
  per image (`retrieval_jax.descriptors.crow_weights`, used by
  `retrieval_jax.explanation.feature_saliency`); here it is -log(eps + q_k) as in the
  paper, so F >= 0 and a dense channel contributes nothing. Negative activations (a map
  not taken after a ReLU) are clamped at 0.
* OS map, from the collection (`object_saliency`): the FS map re-weighted by how well a
  position matches central regions of other images,

      S(p) = F^(p) sum_{i in N_p} sim(v_i, u_p) f_i g_i,

  with F^ = F / max F, u_p the position's local descriptor, N_p its nearest regions of
  other images, v_i their descriptors, f_i their FS mass and g_i their centrality; the
  search is in :mod:`.regions`, the driver in :mod:`.pipeline`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks

__all__ = ["feature_saliency_map", "fs_channel_weights", "check_feature_maps", "object_saliency",
           "normalized_saliency"]


def check_feature_maps(feature_maps, name: str = "feature_maps", *, ndim: int | None = None) -> np.ndarray:
    """A concrete feature map [h, w, C] (or batch [..., h, w, C]) as float32 on the host; a
    ValueError if it is empty, not finite, or has an image with no positive activation."""
    a = np.asarray(feature_maps)
    if a.ndim < 3 or (ndim is not None and a.ndim != ndim):
        want = "[B, h, w, C]" if ndim == 4 else "[h, w, C] (or a batch [..., h, w, C])"
        raise ValueError(f"{name} must be a feature map {want}, channels last; got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    flat = a.reshape(-1, int(np.prod(a.shape[-3:])))
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} has NaN or inf values (image {int(np.flatnonzero(bad)[0])} of {flat.shape[0]})")
    dead = ~(flat > 0).any(axis=1)
    if dead.any():
        raise ValueError(f"{name} has an image with no positive activation (image {int(np.flatnonzero(dead)[0])} "
                         f"of {flat.shape[0]}): its saliency map would be all zero, with no region to find")
    return a


def fs_channel_weights(feature_map, eps=1e-6) -> jax.Array:
    """w_k = max(-log(eps + q_k), 0), q_k the fraction of positions with A_k > 0: float32[..., C].

    Jittable (``eps`` may be traced); leading axes are a batch.
    """
    a = jnp.asarray(feature_map, jnp.float32)
    q = jnp.mean((a > 0).astype(jnp.float32), axis=(-3, -2))
    return jnp.maximum(-jnp.log(eps + q), 0.0)


@jax.jit
def _fs_map(a, eps):
    a = jnp.maximum(a, 0.0)
    w = fs_channel_weights(a, eps)
    return jnp.einsum("...hwc,...c->...hw", a, w, precision=jax.lax.Precision.HIGHEST)


def feature_saliency_map(feature_maps, eps=1e-6) -> jax.Array:
    """FS map F(x, y) = sum_k w_k max(A_k(x, y), 0), w_k = -log(eps + q_k): float32[..., h, w].

    Simeoni et al., WACV 2018, Sec. 3 (the channel weights of CroW, Kalantidis et al.
    2016, without CroW's per-image constant: see the module docstring). Not normalised:
    F is the mass EGM fits (`normalized_saliency` gives F^ = F / max F).

    Args:
      feature_maps: float[h, w, C] or a batch float[..., h, w, C] (the weights are per
        image; batched in one program).
      eps: > 0; a channel positive at every position gets w = -log(1 + eps) ~ 0, one
        never positive w = -log(eps) (it contributes nothing: its activations are 0).

    Raises:
      ValueError: empty, NaN / inf, or an image without a positive activation (a
        zero feature map), when the input is concrete.
    """
    if not _checks.is_traced(feature_maps):
        feature_maps = check_feature_maps(feature_maps)
    a = jnp.asarray(feature_maps, jnp.float32)
    if a.ndim < 3:
        raise ValueError(f"feature_maps must be [h, w, C] (or a batch [..., h, w, C]), got shape {tuple(a.shape)}")
    eps = _checks.check_positive(eps, "eps")
    return _fs_map(a, jnp.float32(eps))


def normalized_saliency(saliency) -> jax.Array:
    """F^ = F / max F over each map's last two axes (all zeros for an all-zero map). Jittable."""
    s = jnp.asarray(saliency, jnp.float32)
    top = jnp.max(s, axis=(-2, -1), keepdims=True)
    return jnp.where(top > 0, s / jnp.where(top > 0, top, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("clip",))
def _os(fs_map, sims, weights, valid, clip):
    s = jnp.maximum(sims, 0.0) if clip else sims
    vote = jnp.sum(jnp.where(valid, s * weights, 0.0), axis=-1)
    return normalized_saliency(fs_map) * vote


def object_saliency(fs_map, sims, weights, valid=None, *, clip: bool = True) -> jax.Array:
    """OS map S(p) = F^(p) sum_{i in N_p} sim(v_i, u_p) f_i g_i, float32[..., h, w].

    Simeoni et al., WACV 2018, Sec. 3.3. The neighbour search is done by the caller
    (`retrieval_jax.discovery.regions.position_neighbours`); this is the jittable sum.

    Args:
      fs_map: float[..., h, w] the FS map F of each image (normalised here to
        F^ = F / max F).
      sims: float[..., h, w, n] <v_i, u_p> for the n nearest regions i of other images.
      weights: float[..., h, w, n] f_i g_i of those regions.
      valid: bool[..., h, w, n] which neighbour slots count (default all).
      clip: sim = max(<v_i, u_p>, 0) (default, our choice: a dissimilar region casts no
        negative vote); False keeps the raw inner product.
    """
    fs_map = jnp.asarray(fs_map, jnp.float32)
    sims = jnp.asarray(sims, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    if sims.shape != weights.shape or sims.shape[:-1] != fs_map.shape:
        raise ValueError(f"sims and weights must be [..., h, w, n] over the map {tuple(fs_map.shape)}, "
                         f"got {tuple(sims.shape)} and {tuple(weights.shape)}")
    valid = jnp.ones(sims.shape, bool) if valid is None else _checks.check_mask(valid, sims.shape, "sims.shape")
    return _os(fs_map, sims, weights, valid, bool(clip))
