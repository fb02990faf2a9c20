"""Why do two images match? Saliency maps for global CNN descriptors.

Two explanations of a retrieval score s = <f(I), g>, with f(I) the L2-normalised
pooled descriptor of image I and g the descriptor of the other image:

* gradient saliency (Simonyan, Vedaldi & Zisserman, "Deep inside convolutional
  networks: visualising image classification models and saliency maps", ICLR-W
  2014), with the class score replaced by the similarity:

      M(x, y) = max_c | d s / d I(x, y, c) |,

  one backward pass through backbone + pooling (`similarity_gradient`,
  `similarity_saliency`);
* feature saliency, the channel-weighted activation map of the last conv layer
  (the spatial map of CroW, Kalantidis, Mellina & Osindero, ECCV-W 2016, with its
  channel weights Omega_k as default):

      M'(x', y') = sum_k w_k A_k(x', y'),

  upsampled from the H' x W' map to the image size (`feature_saliency`). With
  w_k = g_k (the other image's descriptor) the per-position sum is that position's
  contribution to a sum-pooled similarity.

Both maps are normalised to [0, 1] by (M - min M) / (max M - min M) (a constant
map gives 0). `save_overlay` renders them over the image as a PNG, written
atomically.
"""
from __future__ import annotations

import functools
import io
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..files import atomic_write
from ..backbones.base import Backbone
from ..descriptors.pooling import crow_weights, l2_normalize

__all__ = ["similarity_gradient", "similarity_saliency", "feature_saliency", "save_overlay",
           "unit_range"]


def unit_range(s, eps: float = 1e-12) -> jax.Array:
    """(s - min s) / (max s - min s) over the whole array; all zeros if s is constant."""
    s = jnp.asarray(s, jnp.float32)
    lo, hi = jnp.min(s), jnp.max(s)
    span = hi - lo
    return jnp.where(span > eps, (s - lo) / jnp.where(span > eps, span, 1.0), 0.0)


def _split_backbone(backbone):
    """(pytree model or None, static features callable or None)."""
    if isinstance(backbone, Backbone):
        return backbone, None
    if callable(backbone):
        return None, backbone
    raise TypeError("backbone must be a Backbone or a callable images [B, H, W, 3] -> "
                    f"feature maps [B, H', W', C], got {type(backbone).__name__}")


@functools.partial(jax.jit, static_argnames=("features_fn", "pooling"))
def _similarity_grad(model, image, other, *, features_fn, pooling):
    def score(img):
        x = img[None]
        maps = model.features(x) if model is not None else features_fn(x)
        desc = l2_normalize(pooling(maps.astype(jnp.float32)))[0]
        return jnp.dot(desc, other, precision=jax.lax.Precision.HIGHEST)

    return jax.value_and_grad(score)(image)


def _check_inputs(image, other):
    image = jnp.asarray(image)
    if image.dtype == jnp.uint8:
        image = image.astype(jnp.float32) / jnp.float32(255.0)
    image = image.astype(jnp.float32)
    if image.ndim == 2:
        image = jnp.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] (or grey [H, W]), got shape {tuple(image.shape)}")
    other = jnp.asarray(other, jnp.float32)
    if other.ndim != 1:
        raise ValueError(f"other_descriptor must be a vector [D], got shape {tuple(other.shape)}")
    return image, other


def similarity_gradient(backbone, pooling: Callable, image, other_descriptor):
    """Similarity s = <l2(pooling(features(I))), g> and its gradient d s / d I.

    Args:
      backbone: a `Backbone` (its ``features`` is used) or any differentiable
        callable images float[B, H, W, 3] -> feature maps float[B, H', W', C].
      pooling: feature maps [B, H', W', C] -> descriptors [B, D], e.g. `pooling.gem`
        or ``functools.partial(gem, p=...)`` (hashable: it is a static argument, so
        pass the same object to avoid recompiling). The result is L2-normalised.
      image: float[H, W, 3] in [0, 1] (or uint8, or grey [H, W]).
      other_descriptor: float[D], the descriptor g of the other image.
    Returns:
      (s float32[], grad float32[H, W, 3]). Jitted: one forward and one backward pass.
    """
    image, other = _check_inputs(image, other_descriptor)
    model, fn = _split_backbone(backbone)
    return _similarity_grad(model, image, other, features_fn=fn, pooling=pooling)


def similarity_saliency(backbone, pooling: Callable, image, other_descriptor, *,
                        percentile: float | None = None) -> jax.Array:
    """Gradient saliency of the similarity (Simonyan et al., 2014), float32[H, W] in [0, 1].

    M(x, y) = max_c |d s / d I(x, y, c)| with s = <l2(pooling(features(I))), g>,
    normalised by `unit_range`. Arguments as in `similarity_gradient`.
    ``percentile`` (e.g. 99): clip M at that percentile first, so a few extreme
    pixels do not wash out the rest of the map (for display).
    """
    if percentile is not None and not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    _, grad = similarity_gradient(backbone, pooling, image, other_descriptor)
    return _abs_max_unit(grad, None if percentile is None else jnp.float32(percentile))


@jax.jit
def _abs_max_unit(grad, percentile):
    m = jnp.max(jnp.abs(grad), axis=-1)
    if percentile is not None:
        m = jnp.minimum(m, jnp.percentile(m, percentile))
    return unit_range(m)


def feature_saliency(feature_map, channel_weights=None, image_size: Sequence[int] | None = None,
                     ) -> jax.Array:
    """Channel-weighted activation map, float32[H, W] (or [H', W']) in [0, 1].

      M'(x', y') = sum_k w_k A_k(x', y'),  then bilinear upsampling
      (``jax.image.resize``) to ``image_size`` and `unit_range`.

    Args:
      feature_map: float[H', W', C] (one image's last conv map A).
      channel_weights: float[C]; default the CroW channel weights Omega of this map
        (Kalantidis et al., 2016: log of the inverse channel sparsity).
      image_size: (H, W) to upsample to; None keeps H' x W'.
    """
    a = jnp.asarray(feature_map, jnp.float32)
    if a.ndim != 3:
        raise ValueError(f"feature_map must be [H', W', C], got shape {tuple(a.shape)}")
    if channel_weights is None:
        channel_weights = crow_weights(a[None])[1][0]
    w = jnp.asarray(channel_weights, jnp.float32)
    if w.shape != (a.shape[-1],):
        raise ValueError(f"channel_weights must be [C] = [{a.shape[-1]}], got {tuple(w.shape)}")
    size = tuple(a.shape[:2]) if image_size is None else tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (H, W) with positive entries, got {image_size!r}")
    return _feature_saliency(a, w, size=size)


@functools.partial(jax.jit, static_argnames=("size",))
def _feature_saliency(a, w, *, size):
    m = jnp.einsum("hwc,c->hw", a, w, precision=jax.lax.Precision.HIGHEST)
    if size != m.shape:
        m = jax.image.resize(m, size, "linear")
    return unit_range(m)


# ----------------------------------------------------------------------------- rendering
def _display_image(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"image must be [H, W] or [H, W, 3], got shape {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    a = np.clip(np.asarray(a, np.float32), 0.0, 1.0)
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def _resize_map(s: np.ndarray, shape) -> np.ndarray:
    if s.shape == tuple(shape):
        return s
    return np.asarray(jax.image.resize(jnp.asarray(s, jnp.float32), tuple(shape), "linear"))


def save_overlay(path, image, saliency, *, cmap: str = "jet", alpha: float = 0.6,
                 title: str | Sequence[str] | None = None, dpi: int = 100,
                 panel_inches: float = 2.5):
    """Write a PNG of ``saliency`` over ``image``, atomically (`atomic_write`).

    The saliency s in [0, 1] (resized to the image if needed) is coloured with
    ``cmap`` and blended with per-pixel opacity ``alpha * s``, so non-salient
    pixels show the plain image.

    Args:
      path: destination ``.png``; its directory must exist.
      image: [H, W] or [H, W, 3] (float in [0, 1] or uint8), or a list of such
        images to draw side by side (e.g. a query and its result).
      saliency: [h, w] in [0, 1], or a list (one per image; None = no overlay).
      title: a title per panel (str for a single panel).
    Returns:
      the path as a ``pathlib.Path``.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    single = not isinstance(image, (list, tuple))
    images = [image] if single else list(image)
    maps = [saliency] if single else list(saliency)
    titles = ([title] if single or isinstance(title, str) else list(title or [None] * len(images)))
    if len(maps) != len(images) or len(titles) != len(images):
        raise ValueError(f"got {len(images)} images, {len(maps)} saliency maps and "
                         f"{len(titles)} titles; give one of each per panel")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colormap = colormaps[cmap]

    fig = Figure(figsize=(panel_inches * len(images), panel_inches + (0.3 if any(titles) else 0)),
                 dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (img, sal, ttl) in enumerate(zip(images, maps, titles)):
        ax = fig.add_subplot(1, len(images), i + 1)
        rgb = _display_image(img)
        ax.imshow(rgb, interpolation="nearest")
        if sal is not None:
            s = np.asarray(sal, np.float32)
            if s.ndim != 2:
                raise ValueError(f"saliency must be [h, w], got shape {s.shape}")
            s = np.clip(np.nan_to_num(_resize_map(s, rgb.shape[:2])), 0.0, 1.0)
            rgba = colormap(s)
            rgba[..., 3] = alpha * s
            ax.imshow(rgba, interpolation="bilinear")
        if ttl:
            ax.set_title(str(ttl), fontsize=9)
        ax.set_axis_off()
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write(os.fspath(path), lambda f: f.write(buf.getvalue()))
