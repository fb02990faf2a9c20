"""Metric-learning losses and hard-negative mining for descriptor fine-tuning.

All functions are pure and jittable. Shapes are checked always; values only when
concrete (NaN / inf descriptors, contrastive targets other than 0 / 1, anchors short
of negatives): under jit / vmap / grad traced values pass unchecked.

References:
  Hadsell, Chopra & LeCun, "Dimensionality reduction by learning an invariant
  mapping", CVPR 2006 (contrastive loss; used for retrieval by Radenovic et al.,
  TPAMI 2018).
  Schroff, Kalenichenko & Philbin, "FaceNet", CVPR 2015 (triplet loss).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .._precision import HIGHEST as _HIGHEST
from .. import _checks

__all__ = ["check_triplets", "contrastive_loss", "triplet_loss", "mine_hard_negatives"]



def _f32(x) -> jax.Array:
    x = jnp.asarray(x)
    return x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)


def _masked_mean(values, mask):
    if mask is None:
        return jnp.mean(values)
    m = jnp.broadcast_to(jnp.asarray(mask, dtype=values.dtype), values.shape)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def _valid_rows(mask, p: int):
    """bool[p] of the rows a concrete ``mask`` (None, scalar or [P]) keeps; None when the
    mask is traced (its values cannot be read)."""
    if mask is None:
        return np.ones(p, bool)
    if _checks.is_traced(mask):
        return None
    m = np.asarray(mask)
    if m.shape not in ((), (1,), (p,)):
        raise ValueError(f"mask must have shape [P] = ({p},) (or be a scalar), got {m.shape}")
    return np.broadcast_to(m != 0, (p,))


def _check_finite_rows(x, name: str, what: str = "row") -> None:
    """A ValueError if a concrete ``x`` [P, ...] has NaN / inf in a row; traced ``x``
    passes unchecked."""
    if _checks.is_traced(x):
        return
    with jax.ensure_compile_time_eval():
        ok = np.asarray(jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1))
    bad = np.flatnonzero(~ok)
    if bad.size:
        raise ValueError(f"{name} has NaN or inf in {bad.size} {what}(s) (first: {what} {bad[0]}); the result "
                         "would be NaN: check the descriptors")


def _check_margin(margin):
    if isinstance(margin, (int, float)) and not margin >= 0:
        raise ValueError(f"margin must be non-negative, got {margin}")


def contrastive_loss(a, b, target, margin: float = 0.7, mask=None) -> jax.Array:
    """Contrastive (siamese) loss of Hadsell et al. (2006), mean over pairs.

      l_i = t_i ||a_i - b_i||^2 + (1 - t_i) [m - ||a_i - b_i||]_+^2

    Args:
      a: float[P, D] descriptors of one side of P pairs.
      b: float[P, D] descriptors of the other side.
      target: [P], 1 for a matching pair, 0 for a non-matching pair.
      margin: m >= 0 (0.7 for L2-normalised GeM descriptors in Radenovic et al.).
      mask: optional [P] weights/validity (padded pairs = 0); mean over valid pairs.
    Returns:
      float32 scalar. The distance uses a safe square root, so the gradient is
      finite for identical descriptors.
    Raises:
      ValueError: shapes that do not match; a negative margin; for concrete values, a
        target other than 0 / 1 in a pair the mask keeps (padded pairs with mask 0 are
        not checked), or NaN / inf descriptors in any pair (NaN * 0 is NaN: the mask
        cannot hide them). Traced values pass unchecked.
    """
    a, b = _f32(a), _f32(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be [P, D] with the same shape, got {a.shape} and {b.shape}")
    raw_target = target
    target = jnp.asarray(target).astype(a.dtype)
    if target.shape != a.shape[:1]:
        raise ValueError(f"target must have shape [P] = {a.shape[:1]}, got {target.shape}")
    _check_margin(margin)
    valid = _valid_rows(mask, a.shape[0])
    if valid is not None and not _checks.is_traced(raw_target):
        t = np.asarray(raw_target)
        bad = np.flatnonzero(valid & (t != 0) & (t != 1))
        if bad.size:
            raise ValueError(f"target must be 1 (matching pair) or 0 (non-matching pair), got {t[bad[0]].item()!r} "
                             f"for pair {bad[0]} ({bad.size} such pair(s)); for soft weights use the mask")
    _check_finite_rows(a, "a", "pair")        # every pair: NaN * mask 0 is still NaN in the mean
    _check_finite_rows(b, "b", "pair")
    sq = jnp.sum((a - b) ** 2, axis=-1)
    pos = sq > 0
    dist = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    hinge = jnp.maximum(margin - dist, 0.0)
    return _masked_mean(target * sq + (1.0 - target) * hinge ** 2, mask)


def check_triplets(anchor, positive, negative):
    """(anchor [P, D], positive [P, D], negative [P, K, D]) as float arrays, a negative
    [P, D] given one per anchor (K = 1); a ValueError naming the shapes otherwise."""
    anchor, positive, negative = _f32(anchor), _f32(positive), _f32(negative)
    if anchor.ndim != 2 or positive.shape != anchor.shape:
        raise ValueError(f"anchor and positive must both be [P, D] with the same shape, got "
                         f"{anchor.shape} and {positive.shape}")
    if negative.ndim == 2:
        negative = negative[:, None, :]
    if negative.ndim != 3 or negative.shape[0] != anchor.shape[0] or negative.shape[2] != anchor.shape[1]:
        raise ValueError(f"negative must be [P, D] or [P, K, D] with P = {anchor.shape[0]}, "
                         f"D = {anchor.shape[1]}, got {negative.shape}")
    return anchor, positive, negative


def triplet_loss(anchor, positive, negative, margin: float = 0.1, mask=None) -> jax.Array:
    """Triplet loss of Schroff et al. (2015), mean over triplets.

      l_ij = [m + ||a_i - p_i||^2 - ||a_i - n_ij||^2]_+

    Args:
      anchor: float[P, D].
      positive: float[P, D].
      negative: float[P, D] (one negative per anchor) or float[P, K, D] (K per anchor).
      margin: m >= 0.
      mask: optional [P] or [P, K] validity (e.g. ``jnp.isfinite(sims)`` from
        `mine_hard_negatives`); the mean runs over valid triplets.
    Returns:
      float32 scalar.
    """
    anchor, positive, negative = check_triplets(anchor, positive, negative)
    _check_margin(margin)
    d_pos = jnp.sum((anchor - positive) ** 2, axis=-1)  # [P]
    d_neg = jnp.sum((anchor[:, None, :] - negative) ** 2, axis=-1)  # [P, K]
    values = jnp.maximum(margin + d_pos[:, None] - d_neg, 0.0)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim == 1:
            mask = mask[:, None]
    return _masked_mean(values, mask)


@functools.partial(jax.jit, static_argnames=("num",))
def _mine(anchors, anchor_labels, pool, pool_labels, *, num: int):
    sims = jnp.matmul(anchors, pool.T, precision=_HIGHEST)  # [na, n_pool]
    same = anchor_labels[:, None] == pool_labels[None, :]
    sims = jnp.where(same, -jnp.inf, sims)
    vals, idx = jax.lax.top_k(sims, num)
    return vals, idx.astype(jnp.int32)


def mine_hard_negatives(anchors_desc, anchor_labels, pool_desc, pool_labels, num: int):
    """Hardest negatives of each anchor in a pool, from the current descriptors.

    For anchor i: the ``num`` pool items j with label_j != label_i of largest
    similarity <a_i, p_j>, in decreasing order (Radenovic et al., TPAMI 2018 mine
    negatives the same way, by nearest neighbour search with the current network).

    Args:
      anchors_desc: float[na, D]; anchor_labels: int[na].
      pool_desc: float[n_pool, D]; pool_labels: int[n_pool].
      num: static number of negatives, 1 <= num <= n_pool.
    Returns:
      (sims float32[na, num], idx int32[na, num]). If an anchor has fewer than
      ``num`` differently-labelled pool items, the missing slots have sim = -inf
      (and an arbitrary same-label index, not a negative): mask them with
      ``jnp.isfinite(sims)``, as the jitted fine-tuning loop does. With concrete
      labels this case also warns (a RuntimeWarning naming the first such anchor).
    Raises:
      ValueError: shapes that do not match, ``num`` outside [1, n_pool], or concrete
        descriptors holding NaN / inf.
    """
    a, p = _f32(anchors_desc), _f32(pool_desc)
    la, lp = jnp.asarray(anchor_labels), jnp.asarray(pool_labels)
    if a.ndim != 2 or p.ndim != 2 or a.shape[1] != p.shape[1]:
        raise ValueError(f"anchors_desc [na, D] and pool_desc [n_pool, D] must be 2-D with the same D, "
                         f"got {a.shape} and {p.shape}")
    if la.shape != a.shape[:1] or lp.shape != p.shape[:1]:
        raise ValueError(f"labels must be 1-D with one entry per descriptor: anchor_labels {la.shape} vs "
                         f"{a.shape[:1]}, pool_labels {lp.shape} vs {p.shape[:1]}")
    if not _checks.is_int(num) or not 1 <= num <= p.shape[0]:
        raise ValueError(f"num must be an int in [1, n_pool = {p.shape[0]}], got {num!r}")
    _check_finite_rows(a, "anchors_desc", "anchor")
    _check_finite_rows(p, "pool_desc", "pool item")
    if not _checks.is_traced(la, lp):
        _warn_short_of_negatives(np.asarray(la), np.asarray(lp), int(num))
    return _mine(a, la, p, lp, num=int(num))


def _warn_short_of_negatives(la: np.ndarray, lp: np.ndarray, num: int) -> None:
    """A RuntimeWarning when an anchor has fewer than ``num`` pool items of another label."""
    values, counts = np.unique(lp, return_counts=True)
    pos = np.clip(np.searchsorted(values, la), 0, values.size - 1)
    same = np.where(values[pos] == la, counts[pos], 0)
    negatives = lp.size - same
    short = np.flatnonzero(negatives < num)
    if short.size:
        i = short[0]
        warnings.warn(f"mine_hard_negatives: {short.size} anchor(s) have fewer than num = {num} negatives in the "
                      f"pool (first: anchor {i}, label {la[i].item()!r}, {negatives[i]} negative(s)); their "
                      "missing slots hold sim = -inf and a same-label index, not a negative: mask them with "
                      "jnp.isfinite(sims), or lower num", RuntimeWarning, stacklevel=3)
