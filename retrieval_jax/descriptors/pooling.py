"""Global and regional pooling of convolutional feature maps into descriptors.

Every pooling function takes a feature map ``x`` of shape ``[B, H, W, C]``
(channels last, the Flax convention) and an optional ``mask`` of shape
``[B, H, W]`` marking valid positions, so that a batch of images of different
sizes can be padded to one static shape and pooled in one compiled call: a
padded position never contributes, and pooling a padded map with its mask
gives the same descriptor as pooling the unpadded map (R-MAC excepted: its
region boxes are laid out on the static ``H x W`` grid, see `rmac_boxes`).

All functions are pure and jittable. Shapes and dtypes are checked always (also on
tracers); values only when concrete, at the call: a concrete map (or descriptor)
holding NaN or inf at a valid position, and a parameter (GeM's ``p``, ``eps``,
CroW's ``a`` / ``b``) that is not positive and finite, whether a Python number or
a concrete array, raise a ValueError; a complex or non-numeric map a TypeError
(a cast would drop the imaginary part). Under jit / vmap / grad the values pass
unchecked. Outputs are float32 unless the input is a wider float.

References:
  MAC   - Razavian et al., "Visual instance retrieval with deep convolutional
          networks", ITE Trans. MTA 2016; Tolias et al., ICLR 2016.
  SPoC  - Babenko & Lempitsky, "Aggregating local deep features for image
          retrieval", ICCV 2015.
  GeM   - Radenovic, Tolias & Chum, "Fine-tuning CNN image retrieval with no
          human annotation", TPAMI 2018.
  R-MAC - Tolias, Sicre & Jegou, "Particular object retrieval with integral
          max-pooling of CNN activations", ICLR 2016.
  CroW  - Kalantidis, Mellina & Osindero, "Cross-dimensional weighting for
          aggregated deep convolutional features", ECCV 2016 workshops.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks

__all__ = [
    "l2_normalize", "mac", "spoc", "gem", "rmac", "rmac_regions", "rmac_boxes",
    "crow", "crow_weights", "combine_scales",
]


# ----------------------------------------------------------------------------- helpers
def _float(x, name: str = "x") -> jax.Array:
    """``x`` as a real float array (float32 unless a wider float); complex and non-numeric
    dtypes are refused (a cast would drop the imaginary part silently)."""
    _checks.check_real_dtype(x, name)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits < 32:
        x = x.astype(jnp.float32)
    return x


def _check_positive_param(value, name: str, shapes=((),), what: str = "a scalar") -> None:
    """A parameter that must be positive and finite: Python numbers and concrete arrays are
    checked by value (a traced array by shape only); its shape must be one of ``shapes``
    (``what`` says so in words)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    shape = tuple(np.shape(value))
    if shape not in shapes:
        raise ValueError(f"{name} must be {what} (shape {' or '.join(map(str, shapes))}), got shape {shape}")
    if _checks.is_traced(value):
        return
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}")
    if not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        shown = arr.item() if arr.ndim == 0 else arr
        raise ValueError(f"{name} must be positive and finite, got {shown}")


def _check_map(x, mask, name: str = "x"):
    """Validation of a feature map and its mask; returns (x, mask or None).

    Shapes and dtypes are checked always (also on tracers); a concrete map's values
    are checked for NaN / inf at its valid positions."""
    x = _float(x, name)
    if x.ndim != 4:
        raise ValueError(f"{name} must be a feature map [B, H, W, C] (channels last), got shape "
                         f"{tuple(x.shape)}")
    if min(x.shape) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if mask is not None:
        mask = _checks.check_mask(mask, x.shape[:3], f"[B, H, W] to match {name}")
    _checks.check_finite_values(x, name, mask, fix="pooling would spread them into the descriptor: check the "
                                "backbone's input and output, or mask the invalid positions")
    return x, mask


def _count(mask, x) -> jax.Array:
    """Number of valid positions per image, [B, 1] (H*W without a mask)."""
    if mask is None:
        return jnp.full((x.shape[0], 1), x.shape[1] * x.shape[2], dtype=x.dtype)
    return jnp.sum(mask, axis=(1, 2), dtype=x.dtype)[:, None]


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) along ``axis``.

    A zero row stays zero (no NaN), and the gradient is finite everywhere: the
    norm is computed as sqrt(max(sum x^2, eps^2)), which is constant near 0.

    Raises:
      TypeError: complex or non-numeric ``x``; ``axis`` not an int.
      ValueError: ``axis`` out of range; ``eps`` not positive and finite (a concrete
        value; eps = 0 would turn a zero row into NaN); a concrete ``x`` holding NaN or
        inf. Traced values (jit, vmap, grad) are checked for shape and dtype only.
    """
    x = _float(x)
    if x.ndim == 0:
        raise ValueError("x must have at least one axis to normalise along, got a scalar")
    if not _checks.is_int(axis):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -max(x.ndim, 1) <= axis < max(x.ndim, 1):
        raise ValueError(f"axis = {axis} is out of range for an array of shape {tuple(x.shape)}")
    _check_positive_param(eps, "eps")
    _checks.check_finite_values(x, "x")
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps, x.dtype) ** 2))


def combine_scales(descriptors: Sequence) -> jax.Array:
    """Multi-scale combination: l2_normalize(sum_s f_s) over descriptors [..., C] of each scale.

    Raises:
      ValueError: no descriptors, shapes that differ, or a concrete scale holding NaN / inf.
      TypeError: a complex or non-numeric scale.
    """
    descriptors = list(descriptors)
    if not descriptors:
        raise ValueError("combine_scales needs at least one descriptor array")
    shapes = {tuple(jnp.shape(d)) for d in descriptors}
    if len(shapes) != 1:
        raise ValueError(f"all scales must give descriptors of the same shape, got {sorted(shapes)}")
    floats = [_float(d, f"descriptors[{i}]") for i, d in enumerate(descriptors)]
    for i, d in enumerate(floats):
        _checks.check_finite_values(d, f"descriptors[{i}]")
    return l2_normalize(functools.reduce(jnp.add, floats))


# ----------------------------------------------------------------------------- global pooling
def mac(x, mask=None) -> jax.Array:
    """Maximum activations of convolutions: f_c = max_{h,w} x[h, w, c].

    Args:
      x: float[B, H, W, C]; mask: optional bool[B, H, W] of valid positions.
    Returns:
      float[B, C] (not normalised). An image with no valid position gives 0.

    Raises:
      ValueError / TypeError: see the module docstring (map shape, mask shape, NaN / inf
        in a concrete map, complex or non-numeric dtype).
    """
    return _mac(*_check_map(x, mask))


@jax.jit
def _mac(x, mask):
    if mask is None:
        return jnp.max(x, axis=(1, 2))
    out = jnp.max(jnp.where(mask[..., None], x, -jnp.inf), axis=(1, 2))
    return jnp.where(jnp.any(mask, axis=(1, 2))[:, None], out, 0.0).astype(x.dtype)


def spoc(x, mask=None) -> jax.Array:
    """Sum-pooled convolutional features (Babenko & Lempitsky, ICCV 2015), as a mean.

    f_c = (1 / |P|) sum_{(h,w) in P} x[h, w, c] with P the valid positions (the
    1/|P| scale does not change the L2-normalised descriptor, but makes GeM with
    p = 1 equal to SPoC). The paper's centre prior is not applied.

    Returns float[B, C].

    Raises:
      ValueError / TypeError: see the module docstring (map shape, mask shape, NaN / inf
        in a concrete map, complex or non-numeric dtype).
    """
    return _spoc(*_check_map(x, mask))


@jax.jit
def _spoc(x, mask):
    if mask is None:
        return jnp.mean(x, axis=(1, 2))
    total = jnp.sum(jnp.where(mask[..., None], x, 0.0), axis=(1, 2))
    return total / jnp.maximum(_count(mask, x), 1.0)


def gem(x, p=3.0, eps: float = 1e-6, mask=None) -> jax.Array:
    """Generalised mean pooling (Radenovic et al., TPAMI 2018).

    f_c = ( (1 / |P|) sum_{(h,w) in P} max(x[h, w, c], eps)^p )^(1/p)

    p = 1 is SPoC (on non-negative maps) and p -> inf tends to MAC. ``p`` may be a
    Python float or a learnable array broadcastable to [C] (scalar or per channel);
    gradients flow to it. For numerical range the map is divided by its
    per-channel maximum m before the power (f = m * GeM(x / m) holds exactly, and
    m is treated as a constant), so a large p neither overflows nor underflows.

    Returns float[B, C].

    Raises:
      ValueError: a map that is not [B, H, W, C], a mask of another shape, a concrete map
        holding NaN / inf at a valid position, ``p`` or ``eps`` not positive and finite
        (Python numbers and concrete arrays are checked by value, traced ones by shape),
        or ``p`` of a shape other than () / [1] / [C].
      TypeError: a complex or non-numeric map, or ``p`` / ``eps`` that is not a number.
    """
    x, mask = _check_map(x, mask)
    c = x.shape[-1]
    _check_positive_param(p, "GeM power p", shapes=((), (1,), (c,)),
                          what=f"a scalar or one power per channel (C = {c})")
    _check_positive_param(eps, "eps")
    return _gem(x, jnp.asarray(p, dtype=x.dtype), jnp.asarray(eps, x.dtype), mask)


@jax.jit
def _gem(x, p, eps, mask):
    xc = jnp.maximum(x, eps)
    valid = None if mask is None else mask[..., None]
    if valid is None:
        m = jax.lax.stop_gradient(jnp.max(xc, axis=(1, 2), keepdims=True))
    else:
        m = jax.lax.stop_gradient(jnp.max(jnp.where(valid, xc, eps), axis=(1, 2), keepdims=True))
    u = (xc / m) ** p
    if valid is not None:
        u = jnp.where(valid, u, 0.0)
    mean = jnp.sum(u, axis=(1, 2)) / jnp.maximum(_count(mask, x), 1.0)
    return mean ** (1.0 / p) * m[:, 0, 0, :]


# ----------------------------------------------------------------------------- R-MAC
@functools.lru_cache(maxsize=256)
def _rmac_boxes_cached(height: int, width: int, levels: int) -> tuple:
    ovr = 0.4  # desired overlap of neighbouring regions
    steps = np.array([2, 3, 4, 5, 6, 7], dtype=np.float64)  # candidate regions on the long side
    w = min(width, height)
    b = (max(height, width) - w) / (steps - 1)
    idx = int(np.argmin(np.abs((w * w - w * b) / (w * w) - ovr))) + 1  # extra regions, long side
    wd = idx if height < width else 0
    hd = idx if height > width else 0
    boxes = []
    for level in range(1, levels + 1):
        wl = int(math.floor(2 * w / (level + 1)))
        if wl == 0:
            continue
        wl2 = int(math.floor(wl / 2 - 1))
        bw = 0.0 if level + wd - 1 == 0 else (width - wl) / (level + wd - 1)
        bh = 0.0 if level + hd - 1 == 0 else (height - wl) / (level + hd - 1)
        cen_w = [int(math.floor(wl2 + i * bw)) - wl2 for i in range(level + wd)]
        cen_h = [int(math.floor(wl2 + i * bh)) - wl2 for i in range(level + hd)]
        for top in cen_h:
            for left in cen_w:
                boxes.append((top, left, wl, wl))
    return tuple(boxes)


def rmac_boxes(height: int, width: int, levels: int = 3) -> np.ndarray:
    """Static R-MAC region boxes of Tolias et al. (ICLR 2016) on an H x W map.

    At scale l = 1..levels the regions are squares of side
    wl = floor(2 min(H, W) / (l + 1)); scale 1 is the largest square that fits.
    Along the short side there are l regions, along the long side l + m, where the
    extra count m in {1..6} (0 for a square map) is chosen, as in the authors'
    reference code, so that consecutive regions of scale 1 overlap as close to 40%
    as possible: m + 1 = argmin_{s in 2..7} | (w^2 - w b_s) / w^2 - 0.4 |,
    b_s = (max(H, W) - w) / (s - 1). Regions are uniformly spaced with the first
    touching the top/left and the last the bottom/right border (start offsets
    floor(wl2 + i b) - wl2, wl2 = floor(wl / 2 - 1), b = (side - wl) / (count - 1)).

    Returns:
      int64[R, 4] rows (top, left, height, width) in the order scale, row, column.
      A square map gives 1 + 4 + 9 = 14 regions for 3 scales.
    """
    for name, v in (("height", height), ("width", width), ("levels", levels)):
        _checks.check_positive_int(v, name)
    return np.array(_rmac_boxes_cached(int(height), int(width), int(levels)), dtype=np.int64)


def whitening_arrays(whitening, c: int | None = None, what: str = "channels") -> tuple:
    """(mean [d], projection [d, dim]) of a `Whitening` (or any object with ``mean`` and
    ``projection``) as real float arrays, d = ``c`` when given; concrete values must be
    finite. A TypeError for something else (e.g. the arguments of `apply_whitening` swapped)."""
    if not (hasattr(whitening, "mean") and hasattr(whitening, "projection")):
        raise TypeError(f"whitening must be a Whitening (from learn_pca_whitening) or an object with "
                        f"mean [d] and projection [d, dim], got {type(whitening).__name__}")
    mean = _float(whitening.mean, "whitening.mean")
    proj = _float(whitening.projection, "whitening.projection")
    if proj.ndim != 2 or mean.shape != proj.shape[:1] or (c is not None and proj.shape[0] != c):
        need = "" if c is None else f" with d = C = {c} {what}"
        raise ValueError(f"whitening expects mean [d] and projection [d, dim]{need}, got mean "
                         f"{tuple(mean.shape)} and projection {tuple(proj.shape)}")
    _checks.check_finite_values(mean, "whitening.mean")
    _checks.check_finite_values(proj, "whitening.projection")
    return mean, proj


def _project(v, whitening):
    """(v - mean) @ P then L2, with whitening = (mean [d], projection [d, dim])."""
    mean, proj = whitening[0].astype(v.dtype), whitening[1].astype(v.dtype)
    return l2_normalize(jnp.matmul(v - mean, proj, precision=jax.lax.Precision.HIGHEST))


def rmac_regions(x, levels: int = 3, whitening=None, mask=None, eps: float = 1e-12):
    """Per-region R-MAC vectors (Tolias et al., ICLR 2016), e.g. for region graphs.

    For each static box R of `rmac_boxes(H, W, levels)`:
      v_R = l2( max_{(h,w) in R} x[h, w, :] ), then optionally
      v_R = l2( (v_R - mu) P ) with learned PCA whitening (``whitening``, a
          `Whitening` or any object with ``mean`` [C] and ``projection`` [C, D]).

    Args:
      x: float[B, H, W, C]; mask: optional bool[B, H, W] valid positions (the MAC of
        a region ignores invalid positions; a region with none is invalid).
    Returns:
      (regions float[B, R, C or D], valid bool[B, R]); invalid regions are zero.

    Raises:
      ValueError / TypeError: see the module docstring (map shape, mask shape, NaN / inf
        in a concrete map, complex or non-numeric dtype; eps not positive; a whitening that
        is not one, of the wrong d, or not finite).
    """
    x, mask = _check_map(x, mask)
    rmac_boxes(x.shape[1], x.shape[2], levels)  # validates levels
    _check_positive_param(eps, "eps")
    if whitening is not None:
        whitening = whitening_arrays(whitening, x.shape[-1])
    return _rmac_regions(x, mask, whitening, levels=int(levels), eps=float(eps))


@functools.partial(jax.jit, static_argnames=("levels", "eps"))
def _rmac_regions(x, mask, whitening, *, levels, eps):
    boxes = rmac_boxes(x.shape[1], x.shape[2], levels)
    outs, valids = [], []
    for top, left, h, w in boxes.tolist():
        patch = x[:, top:top + h, left:left + w, :]
        if mask is None:
            outs.append(jnp.max(patch, axis=(1, 2)))
            valids.append(jnp.ones((x.shape[0],), dtype=bool))
        else:
            pm = mask[:, top:top + h, left:left + w]
            ok = jnp.any(pm, axis=(1, 2))
            v = jnp.max(jnp.where(pm[..., None], patch, -jnp.inf), axis=(1, 2))
            outs.append(jnp.where(ok[:, None], v, 0.0))
            valids.append(ok)
    regions = l2_normalize(jnp.stack(outs, axis=1), eps=eps)  # [B, R, C]
    valid = jnp.stack(valids, axis=1)
    if whitening is not None:
        regions = _project(regions, whitening)
    regions = jnp.where(valid[..., None], regions, 0.0)
    return regions, valid


def rmac(x, levels: int = 3, whitening=None, mask=None, eps: float = 1e-12) -> jax.Array:
    """Regional MAC (Tolias et al., ICLR 2016).

    f = l2( sum_R v_R ), v_R the L2-normalised (optionally PCA-whitened and
    re-normalised) MAC of region R, over the regions of `rmac_boxes` (static for the
    static H, W). No extra full-image region is added (cirtorch's ``rmac`` adds one).

    Returns float[B, C] (or [B, D] with whitening), L2-normalised.

    Raises:
      ValueError / TypeError: see the module docstring (map shape, mask shape, NaN / inf
        in a concrete map, complex or non-numeric dtype; eps not positive; a whitening that
        is not one, of the wrong d, or not finite).
    """
    regions, valid = rmac_regions(x, levels=levels, whitening=whitening, mask=mask, eps=eps)
    return _rmac_sum(regions, valid, eps)


@jax.jit
def _rmac_sum(regions, valid, eps):
    return l2_normalize(jnp.sum(jnp.where(valid[..., None], regions, 0.0), axis=1), eps=eps)


# ----------------------------------------------------------------------------- CroW
def _safe_pow(z, e):
    """z^e for z >= 0 with a finite gradient at 0 (0 there)."""
    pos = z > 0
    return jnp.where(pos, jnp.where(pos, z, 1.0) ** e, 0.0)


def _check_crow_args(a, b, eps) -> None:
    for name, v in (("a", a), ("b", b), ("eps", eps)):
        _check_positive_param(v, f"CroW {name}")


def crow_weights(x, a: float = 2.0, b: float = 2.0, mask=None, eps: float = 1e-12):
    """CroW spatial and channel weights (Kalantidis et al., ECCV-W 2016).

    Spatial: Z_hw = sum_c x[h, w, c] (clamped at 0),
             S_hw = ( Z_hw / ||Z||_a )^(1/b),  ||Z||_a = (sum_hw Z_hw^a)^(1/a).
    Channel: Q_c = fraction of valid positions with x[h, w, c] != 0,
             Omega_c = log( sum_k Q_k / (eps + Q_c) ), and 0 for a channel with Q_c = 0
             (as in the authors' code; such a channel pools to 0 on a ReLU map anyway).
    Omega depends on x only through counts, so no gradient flows through it.

    Returns:
      (spatial float[B, H, W] (0 on invalid positions), channel float[B, C]).

    Raises:
      ValueError / TypeError: see the module docstring (map shape, mask shape, NaN / inf
        in a concrete map, complex or non-numeric dtype; a, b or eps not positive and
        finite).
    """
    x, mask = _check_map(x, mask)
    _check_crow_args(a, b, eps)
    return _crow_weights(x, mask, a, b, eps)


@jax.jit
def _crow_weights(x, mask, a, b, eps):
    z = jnp.maximum(jnp.sum(x, axis=-1), 0.0)  # [B, H, W]
    if mask is not None:
        z = jnp.where(mask, z, 0.0)
    norm = _safe_pow(jnp.sum(_safe_pow(z, a), axis=(1, 2), keepdims=True), 1.0 / a)
    spatial = _safe_pow(z / jnp.maximum(norm, eps), 1.0 / b)

    nz = x != 0
    if mask is not None:
        nz = nz & mask[..., None]
    q = jnp.sum(nz, axis=(1, 2), dtype=x.dtype) / jnp.maximum(_count(mask, x), 1.0)  # [B, C]
    total = jnp.sum(q, axis=-1, keepdims=True)
    ratio = jnp.where(q > 0, total / (eps + q), 1.0)
    channel = jnp.where(q > 0, jnp.log(ratio), 0.0)
    return spatial, jax.lax.stop_gradient(channel)


def crow(x, a: float = 2.0, b: float = 2.0, mask=None, eps: float = 1e-12) -> jax.Array:
    """CroW descriptor (Kalantidis et al., ECCV-W 2016).

    f_c = Omega_c * sum_{h,w} S_hw x[h, w, c], with (S, Omega) from `crow_weights`.
    Not normalised: the paper follows with L2, PCA whitening and L2 again.

    Returns float[B, C].

    Raises:
      ValueError / TypeError: see the module docstring (map shape, mask shape, NaN / inf
        in a concrete map, complex or non-numeric dtype; a, b or eps not positive and
        finite).
    """
    x, mask = _check_map(x, mask)
    _check_crow_args(a, b, eps)
    return _crow(x, mask, a, b, eps)


@jax.jit
def _crow(x, mask, a, b, eps):
    spatial, channel = _crow_weights(x, mask, a, b, eps)
    if mask is not None:
        x = jnp.where(mask[..., None], x, 0.0)
    pooled = jnp.einsum("bhw,bhwc->bc", spatial, x, precision=jax.lax.Precision.HIGHEST)
    return pooled * channel
