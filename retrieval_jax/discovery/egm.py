"""Region detection on a 2-D saliency map by expanding Gaussian mixtures (EGM).

EGM (Avrithis & Kalantidis, "Approximate Gaussian mixtures for large scale
vocabularies", ECCV 2012) fits an isotropic Gaussian mixture by EM whose M-step
over-estimates every variance, interleaved with purge steps that drop components
explained by the others, so the number of components comes from the data. Simeoni,
Iscen, Tolias, Avrithis & Chum ("Unsupervised object discovery for instance
recognition", WACV 2018, Sec. 3; "Graph-based particular object discovery", MVA 2019)
run it on a saliency map to find the salient regions of an image. Here the map
F [h, w] >= 0 is a weighted set of positions x_n = (row, col) with weights
a_n = F(x_n) / sum F:

* start: one component at every local maximum of F (3 x 3 neighbourhood, F > 0), or
  at every position with F > 0 (``init="all"``); the ``capacity`` strongest are
  kept (static), the number dropped is `Regions.overflow`; pi_k proportional to F at
  the start position, s_k = ``init_sigma``;
* E-step: r_nk = pi_k N(x_n | mu_k, sigma_k^2 I) / sum_j pi_j N(x_n | mu_j, sigma_j^2 I);
* M-step: N_k = sum_n a_n r_nk, pi_k = N_k, mu_k = sum_n a_n r_nk x_n / N_k,
  s_k^2 = max( sum_n a_n r_nk ||x_n - mu_k||^2 / (2 N_k), min_sigma^2 ),
  and the expanded variance sigma_k^2 = lambda s_k^2 (``expansion`` lambda > 1) is the
  one the next E-step and the purge use;
* purge: with <p_i, p_k> = pi_i pi_k N(mu_i | mu_k, (sigma_i^2 + sigma_k^2) I), visit the
  components in order of decreasing pi and purge i when

      rho_i = ||p_i||^2 / (||p_i||^2 + sum_{j kept, j != i} <p_i, p_j>) < tau

  (``threshold`` tau), "kept" being every component not purged so far (the later ones
  in the order included). ||p_i||^2 = <p_i, p_i> = pi_i^2 / (4 pi sigma_i^2) in 2-D.

``iterations`` rounds of (E, M, purge) run; the result is the surviving components,
their fitted (not expanded) standard deviation s_k and their mass N_k sum F. A single
isolated Gaussian blob of standard deviation s is fitted with centre its mean and
s_k = s whatever lambda: expansion only widens the reach of a component, so that
overlapping ones meet in the purge.

Everything after the public boundary is jittable and vmapped over a batch of maps:
``capacity``, ``iterations`` and ``init`` are static, the other parameters traced.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks

__all__ = ["Regions", "egm_regions", "egm_regions_traced", "region_boxes", "check_saliency_map", "overlaps", "purge"]

_INITS = ("maxima", "all")
_TINY = 1e-9


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Regions:
    """Regions of one map (or a batch: every field gets a leading batch axis), a pytree.

    Valid regions come first, in decreasing mass; invalid slots hold zeros.

    Attributes:
      centre: float32[C, 2] component means (row, col) in map coordinates (position
        (i, j) of the map is the point (i, j)).
      sigma: float32[C] fitted isotropic standard deviation s_k, in map cells.
      mass: float32[C] N_k sum F, the part of the map's mass the component explains.
      valid: bool[C] which slots hold a region.
      overflow: int32[] start components dropped because ``capacity`` was full.
    """

    centre: jax.Array
    sigma: jax.Array
    mass: jax.Array
    valid: jax.Array
    overflow: jax.Array

    @property
    def capacity(self) -> int:
        """C, the static number of slots."""
        return self.valid.shape[-1]

    def count(self) -> np.ndarray:
        """Number of valid regions (per map for a batch), on the host."""
        return np.asarray(self.valid).sum(axis=-1)


# ----------------------------------------------------------------------------- pieces
def overlaps(pi, mu, var) -> jax.Array:
    """<p_i, p_k> = pi_i pi_k N(mu_i | mu_k, (var_i + var_k) I) for 2-D isotropic components.

    Args:
      pi: float[C] weights.
      mu: float[C, 2] means.
      var: float[C] variances sigma^2 (per axis).
    Returns:
      float32[C, C]; the diagonal is ||p_i||^2 = pi_i^2 / (4 pi var_i).
    """
    pi = jnp.asarray(pi, jnp.float32)
    mu = jnp.asarray(mu, jnp.float32)
    var = jnp.asarray(var, jnp.float32)
    d2 = jnp.sum((mu[:, None, :] - mu[None, :, :]) ** 2, axis=-1)
    v = var[:, None] + var[None, :]
    return pi[:, None] * pi[None, :] * jnp.exp(-d2 / (2.0 * v)) / (2.0 * math.pi * v)


def purge(pi, mu, var, valid, threshold) -> jax.Array:
    """One EGM purge step: which components stay (bool[C]).

    Components are visited in order of decreasing ``pi``; i is purged when
    rho_i = ||p_i||^2 / (||p_i||^2 + sum_{j kept, j != i} <p_i, p_j>) < threshold, with
    "kept" the components of ``valid`` not purged so far (`overlaps`). The last
    component visited among the kept ones has rho = 1 if all others went, so with
    threshold <= 1 at least one component stays. Jittable; threshold may be traced.
    """
    ov = overlaps(pi, mu, var)
    valid = jnp.asarray(valid, bool)
    c = valid.shape[0]
    self_ov = jnp.diagonal(ov)
    order = jnp.argsort(-jnp.where(valid, pi, -jnp.inf))
    slots = jnp.arange(c)

    def body(t, kept):
        i = order[t]
        others = jnp.sum(jnp.where(kept & (slots != i), ov[i], 0.0))
        denom = self_ov[i] + others
        rho = jnp.where(denom > 0, self_ov[i] / jnp.where(denom > 0, denom, 1.0), 1.0)
        return kept.at[i].set(kept[i] & (rho >= threshold))

    return jax.lax.fori_loop(0, c, body, valid)


def _start(m, capacity, init):
    """(mu [C, 2], pi [C], valid [C], overflow) of the start components."""
    h, w = m.shape
    if init == "maxima":
        peak = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (3, 3), (1, 1), "SAME")
        candidate = (m >= peak) & (m > 0)
    else:
        candidate = m > 0
    score = jnp.where(candidate, m, -jnp.inf).reshape(-1)
    kk = min(capacity, h * w)
    vals, idx = jax.lax.top_k(score, kk)
    valid = jnp.isfinite(vals)
    mu = jnp.stack([idx // w, idx % w], axis=-1).astype(jnp.float32)
    pi = jnp.where(valid, vals, 0.0)
    if kk < capacity:
        pad = capacity - kk
        mu = jnp.pad(mu, ((0, pad), (0, 0)))
        pi = jnp.pad(pi, (0, pad))
        valid = jnp.pad(valid, (0, pad))
    overflow = jnp.maximum(jnp.sum(candidate, dtype=jnp.int32) - capacity, 0)
    pi = pi / jnp.maximum(jnp.sum(pi), _TINY)
    return mu, pi, valid, overflow


def _em_step(x, a, mu, pi, var_e, valid, min_sigma):
    """One E-step and expanding M-step. x [P, 2], a [P] (sums to 1)."""
    xr, xc = x[:, 0:1], x[:, 1:2]                                                   # [P, 1]
    d2 = (xr - mu[None, :, 0]) ** 2 + (xc - mu[None, :, 1]) ** 2                    # [P, C]
    safe_var = jnp.where(valid, var_e, 1.0)
    logp = jnp.log(jnp.where(valid, pi, 1.0)) - jnp.log(2.0 * math.pi * safe_var) - d2 / (2.0 * safe_var)
    logp = jnp.where(valid[None, :], logp, -jnp.inf)
    top = jnp.max(logp, axis=1, keepdims=True)
    e = jnp.exp(logp - jnp.where(jnp.isfinite(top), top, 0.0))
    wgt = a[:, None] * e / jnp.maximum(jnp.sum(e, axis=1, keepdims=True), _TINY)   # a_n r_nk [P, C]
    nk = jnp.sum(wgt, axis=0)
    valid = valid & (nk > _TINY)
    safe_nk = jnp.where(valid, nk, 1.0)
    mr = jnp.sum(wgt * xr, axis=0) / safe_nk
    mc = jnp.sum(wgt * xc, axis=0) / safe_nk
    var = jnp.sum(wgt * ((xr - mr) ** 2 + (xc - mc) ** 2), axis=0) / (2.0 * safe_nk)
    var = jnp.maximum(var, min_sigma ** 2)
    mu_new = jnp.where(valid[:, None], jnp.stack([mr, mc], axis=-1), mu)
    pi_new = jnp.where(valid, nk, 0.0)
    return mu_new, pi_new, var, valid


def _egm_one(m, expansion, threshold, init_sigma, min_sigma, *, capacity, iterations, init):
    m = jnp.maximum(jnp.nan_to_num(m.astype(jnp.float32)), 0.0)
    h, w = m.shape
    total = jnp.sum(m)
    a = (m / jnp.maximum(total, _TINY)).reshape(-1)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    x = jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)
    mu, pi, valid, overflow = _start(m, capacity, init)
    var = jnp.full((capacity,), init_sigma ** 2, jnp.float32)

    def round_(t, state):
        mu, pi, var, valid = state
        mu, pi, var, valid = _em_step(x, a, mu, pi, expansion * var, valid, min_sigma)
        # the last round is E/M only: the kept components' share of the data after the last purge
        valid = jnp.where(t < iterations, purge(pi, mu, expansion * var, valid, threshold), valid)
        pi = jnp.where(valid, pi, 0.0)
        return mu, pi, var, valid

    mu, pi, var, valid = jax.lax.fori_loop(0, iterations + 1, round_, (mu, pi, var, valid))
    mass = jnp.where(valid, pi * total, 0.0)
    order = jnp.argsort(-jnp.where(valid, mass, -1.0))
    valid = valid[order]
    return Regions(centre=jnp.where(valid[:, None], mu[order], 0.0),
                   sigma=jnp.where(valid, jnp.sqrt(var[order]), 0.0),
                   mass=mass[order], valid=valid, overflow=overflow.astype(jnp.int32))


def egm_regions_traced(saliency, *, capacity: int = 32, iterations: int = 20, expansion=1.5, threshold=0.5,
               init_sigma=1.0, min_sigma=0.5, init: str = "maxima") -> Regions:
    """`egm_regions` without value checks: for use inside ``jit`` / ``vmap`` (static checks only).

    ``saliency`` float[h, w] or float[..., h, w] (leading axes vmapped). NaN is read as 0
    and negative values are clamped to 0; a map with no positive value gives no region.
    """
    capacity = _checks.check_positive_int(capacity, "capacity")
    iterations = _checks.check_positive_int(iterations, "iterations")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    s = jnp.asarray(saliency)
    if s.ndim < 2:
        raise ValueError(f"a saliency map must be [h, w] (or a batch [..., h, w]), got shape {tuple(s.shape)}")
    if s.shape[-1] == 0 or s.shape[-2] == 0:
        raise ValueError(f"the saliency map is empty (shape {tuple(s.shape)})")
    params = [jnp.asarray(v, jnp.float32) for v in (expansion, threshold, init_sigma, min_sigma)]
    lead = s.shape[:-2]
    flat = s.reshape((-1,) + s.shape[-2:])
    out = _egm_many(flat, *params, capacity=capacity, iterations=iterations, init=init)
    return jax.tree_util.tree_map(lambda x: x.reshape(lead + x.shape[1:]), out)


@functools.partial(jax.jit, static_argnames=("capacity", "iterations", "init"))
def _egm_many(maps, expansion, threshold, init_sigma, min_sigma, *, capacity, iterations, init):
    fn = functools.partial(_egm_one, capacity=capacity, iterations=iterations, init=init)
    return jax.vmap(fn, in_axes=(0, None, None, None, None))(maps, expansion, threshold, init_sigma, min_sigma)


def check_saliency_map(saliency, name: str = "saliency") -> np.ndarray:
    """A concrete saliency map [h, w] or batch [..., h, w] as float32; a ValueError if it is
    empty, not finite, negative somewhere, or constant (no structure to find regions in)."""
    s = np.asarray(saliency)
    if s.ndim < 2:
        raise ValueError(f"{name} must be a map [h, w] (or a batch [..., h, w]), got shape {s.shape}")
    if s.size == 0:
        raise ValueError(f"{name} is empty (shape {s.shape})")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {s.dtype}")
    s = s.astype(np.float32, copy=False)
    flat = s.reshape(-1, s.shape[-2] * s.shape[-1])
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} has NaN or inf values (map {int(np.flatnonzero(bad)[0])} of {flat.shape[0]})")
    if (flat < 0).any():
        raise ValueError(f"{name} has negative values; a saliency map is a non-negative mass")
    const = flat.max(axis=1) == flat.min(axis=1)
    if const.any():
        i = int(np.flatnonzero(const)[0])
        raise ValueError(f"{name} is constant (map {i} of {flat.shape[0]} is all {float(flat[i, 0])}): "
                         "there is no salient region to detect")
    return s


def _check_params(expansion, threshold, init_sigma, min_sigma):
    expansion = _checks.check_positive(expansion, "expansion")
    if not _checks.is_traced(expansion) and not expansion > 1.0:
        raise ValueError(f"expansion must be > 1 (EGM over-estimates the variance), got {expansion}")
    if not _checks.is_traced(threshold):
        t = float(threshold)
        if not 0.0 < t <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    init_sigma = _checks.check_positive(init_sigma, "init_sigma")
    min_sigma = _checks.check_positive(min_sigma, "min_sigma")
    return expansion, threshold, init_sigma, min_sigma


def egm_regions(saliency, *, capacity: int = 32, iterations: int = 20, expansion=1.5, threshold=0.5,
        init_sigma=1.0, min_sigma=0.5, init: str = "maxima") -> Regions:
    """Salient regions of a non-negative 2-D map by expanding Gaussian mixtures.

    The algorithm of the module docstring (Avrithis & Kalantidis, ECCV 2012, on a map
    as in Simeoni et al., WACV 2018).

    Args:
      saliency: float[h, w], or a batch float[B, h, w] (vmapped, one compiled program).
      capacity: C, the most components (static); the strongest start positions are
        kept, the others counted in `Regions.overflow`.
      iterations: rounds of (E-step, expanding M-step, purge) (static).
      expansion: lambda > 1, the factor on the fitted variance (traced).
      threshold: tau in (0, 1], the purge threshold on rho (traced).
      init_sigma: standard deviation of the start components, in map cells (traced).
      min_sigma: floor on the fitted standard deviation (traced).
      init: "maxima" (a component at every 3 x 3 local maximum) or "all" (at every
        position with positive saliency).

    Returns:
      `Regions` (fields with a leading [B] axis for a batch).

    Raises:
      ValueError: an empty, NaN / inf, negative or constant map (checked when the map is
        concrete; under a trace only the shape is checked: see `egm_regions_traced`).
    """
    if not _checks.is_traced(saliency):
        saliency = check_saliency_map(saliency)
    expansion, threshold, init_sigma, min_sigma = _check_params(expansion, threshold, init_sigma, min_sigma)
    return egm_regions_traced(saliency, capacity=capacity, iterations=iterations, expansion=expansion,
                      threshold=threshold, init_sigma=init_sigma, min_sigma=min_sigma, init=init)


def region_boxes(regions: Regions, c=2.0, shape=None) -> jax.Array:
    """Boxes centre +- max(c s, 0.5) per axis, clipped to the map: float32[..., C, 4].

    Each row is (row_min, col_min, row_max, col_max) in map coordinates (position (i, j)
    at the point (i, j)); a box lies in [0, h - 1] x [0, w - 1] and, by the half-cell
    floor, always holds the position nearest to its centre. Invalid slots get (0, 0, 0, 0).
    Jittable; ``c`` may be traced.

    Args:
      regions: `Regions` of one map or of a batch.
      c: half-width in standard deviations (> 0).
      shape: (h, w) of the map (static).
    """
    if shape is None or len(tuple(shape)) != 2:
        raise ValueError(f"shape must be the map's (h, w), got {shape!r}")
    h, w = (int(v) for v in shape)
    if h < 1 or w < 1:
        raise ValueError(f"shape must be positive, got {shape!r}")
    c = _checks.check_positive(c, "c")
    return _boxes(regions.centre, regions.sigma, regions.valid, jnp.float32(c) if not _checks.is_traced(c) else c,
                  h=h, w=w)


@functools.partial(jax.jit, static_argnames=("h", "w"))
def _boxes(centre, sigma, valid, c, *, h, w):
    half = jnp.maximum(c * sigma, 0.5)
    r, q = centre[..., 0], centre[..., 1]
    boxes = jnp.stack([jnp.clip(r - half, 0.0, h - 1.0), jnp.clip(q - half, 0.0, w - 1.0),
                       jnp.clip(r + half, 0.0, h - 1.0), jnp.clip(q + half, 0.0, w - 1.0)], axis=-1)
    return jnp.where(valid[..., None], boxes, 0.0).astype(jnp.float32)
