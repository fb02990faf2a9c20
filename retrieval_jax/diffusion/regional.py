"""Regional search: pooling region scores into image scores.

Iscen, Tolias, Avrithis, Furon & Chum, "Efficient diffusion on region manifolds:
recovering small objects with compact CNN representations", CVPR 2017: every
image is a set of regional descriptors (e.g. `pooling.rmac_regions`), the kNN
graph and the diffusion run over regions, and the regional scores of each
database image are pooled into one image score, best by generalised max pooling
(GMP, Murray & Perronnin, CVPR 2014).

Images have different numbers of regions, so everything works on padded arrays
regions [N, R, d] + mask [N, R]; database regions are flattened as row-major
index ``i * R + r`` (image i, region r), giving static shapes for jit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._precision import HIGHEST as _HIGHEST
from .. import _checks
from ..graph import knn

__all__ = ["gmp_weights", "pool_region_scores", "query_region_similarity", "query_region_knn"]



def _check_regions(regions, mask):
    regions = jnp.asarray(regions)
    if not jnp.issubdtype(regions.dtype, jnp.floating):
        regions = regions.astype(jnp.float32)
    if regions.ndim != 3:
        raise ValueError(f"regions must be [N, R, d], got shape {tuple(regions.shape)}")
    if mask is None:
        mask = jnp.ones(regions.shape[:2], dtype=bool)
    else:
        mask = _checks.check_mask(mask, regions.shape[:2], "[N, R]")
    return regions, mask


@jax.jit
def _gmp_solve(regions, mask, lam):
    m = mask.astype(regions.dtype)
    gram = jnp.einsum("nrd,nsd->nrs", regions, regions, precision=_HIGHEST)
    gram = gram * m[:, :, None] * m[:, None, :]  # padded rows/cols -> 0
    eye = jnp.eye(regions.shape[1], dtype=regions.dtype)
    system = gram + lam * eye  # padded block = lam I: never singular, decoupled from valid slots
    rhs = m  # 1 on valid regions, 0 on padding -> b = 0 there
    b = jnp.linalg.solve(system, rhs[..., None])[..., 0]
    return b * m


def gmp_weights(regions, mask=None, lam: float = 1.0) -> jax.Array:
    """Generalised max pooling weights of each image's regions.

    For image i with valid region descriptors as rows of V_i [R_i, d], GMP
    (Murray & Perronnin 2014) pools them into xi_i = argmin_xi ||V_i xi - 1||^2 +
    lam ||xi||^2, whose closed form is xi_i = V_i^T b_i with

      (V_i V_i^T + lam I) b_i = 1_{R_i}      (the R_i x R_i Gram system),

    so that every region has about the same similarity to xi_i. Since
    <q, xi_i> = sum_r b_ir <q, v_ir>, Iscen et al. (2017, Sec. 3.3) pool regional
    (diffusion) scores y_ir of image i as sum_r b_ir y_ir (`pool_region_scores`).

    Padded slots are handled with a masked Gram matrix (their rows and columns set
    to 0) plus lam I, and a right-hand side of 0 there, so the system is always
    positive definite, the valid block is exactly the per-image system, and padded
    weights are exactly 0.

    Args:
      regions: float[N, R, d]; mask: bool[N, R] (default all valid); lam > 0.
    Returns:
      float[N, R] weights b, 0 on padded slots.
    """
    regions, mask = _check_regions(regions, mask)
    lam = _checks.check_positive(lam, "lam")
    return _gmp_solve(regions, mask, jnp.asarray(lam, regions.dtype))


@functools.partial(jax.jit, static_argnames=("mode",))
def _pool(scores, weights, mask, mode):
    if mode == "gmp":
        return jnp.einsum("qnr,nr->qn", scores, weights, precision=_HIGHEST)
    if mode == "sum":
        return jnp.sum(jnp.where(mask[None], scores, 0.0), axis=-1)
    out = jnp.max(jnp.where(mask[None], scores, -jnp.inf), axis=-1)
    return jnp.where(jnp.any(mask, axis=-1)[None], out, 0.0)


def pool_region_scores(scores, weights=None, mode: str = "gmp", mask=None) -> jax.Array:
    """Image scores from region scores.

      gmp: s_qi = sum_r b_ir y_q,(i,r)   (b from `gmp_weights`; padding has b = 0)
      max: s_qi = max_{r valid} y_q,(i,r)  (0 for an image without a valid region)
      sum: s_qi = sum_{r valid} y_q,(i,r)

    Args:
      scores: float[nq, N * R] (flattened region index i * R + r) or float[nq, N, R].
      weights: float[N, R]; required for "gmp", gives N and R for flat scores.
      mode: "gmp", "max" or "sum".
      mask: bool[N, R] valid regions for "max"/"sum" (default all valid).
    Returns:
      float[nq, N].
    """
    if mode not in ("gmp", "max", "sum"):
        raise ValueError(f"mode must be 'gmp', 'max' or 'sum', got {mode!r}")
    scores = jnp.asarray(scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    if weights is not None:
        weights = jnp.asarray(weights, dtype=scores.dtype)
        if weights.ndim != 2:
            raise ValueError(f"weights must be [N, R], got shape {tuple(weights.shape)}")
        shape = tuple(weights.shape)
    elif mask is not None:
        shape = tuple(jnp.shape(mask))
    elif scores.ndim == 3:
        shape = tuple(scores.shape[1:])
    else:
        raise ValueError("flat scores [nq, N*R] need weights or mask to know N and R")
    if mode == "gmp" and weights is None:
        raise ValueError("mode='gmp' needs the weights from gmp_weights")
    n, r = shape
    if scores.ndim == 2:
        if scores.shape[1] != n * r:
            raise ValueError(f"flat scores have {scores.shape[1]} columns, expected N * R = {n} * {r}")
        scores = scores.reshape(scores.shape[0], n, r)
    elif scores.ndim != 3 or tuple(scores.shape[1:]) != (n, r):
        raise ValueError(f"scores must be [nq, N*R] or [nq, N, R] with (N, R) = {(n, r)}, "
                         f"got {tuple(scores.shape)}")
    if mask is None:
        mask = jnp.ones((n, r), dtype=bool)
    else:
        mask = jnp.asarray(mask)
        if tuple(mask.shape) != (n, r):
            raise ValueError(f"mask must be [N, R] = {(n, r)}, got {tuple(mask.shape)}")
        mask = mask if mask.dtype == jnp.bool_ else mask != 0
    if weights is None:
        weights = jnp.zeros((n, r), scores.dtype)
    return _pool(scores, weights, mask, mode)


@functools.partial(jax.jit, static_argnames=("num_queries", "num_db_regions"))
def _qrs(sims, idx, qmask, gamma, *, num_queries, num_db_regions):
    nq_rq, k = sims.shape
    rq = nq_rq // num_queries
    vals = jnp.maximum(sims, 0.0) ** gamma
    vals = jnp.where(jnp.isfinite(vals), vals, 0.0) * qmask.reshape(nq_rq, 1).astype(sims.dtype)
    rows = jnp.broadcast_to((jnp.arange(nq_rq, dtype=jnp.int32) // rq)[:, None], (nq_rq, k))
    y = jnp.zeros((num_queries, num_db_regions), sims.dtype)
    return y.at[rows, idx].add(vals)


def query_region_similarity(sims, idx, *, num_queries: int, num_db_regions: int,
                            gamma: float = 3.0, query_mask=None) -> jax.Array:
    """Initial diffusion vector y of multi-region queries over database regions.

      y_q,j = sum_{r in regions(q)} [ j in NN_k(q_r) ] max(<q_r, x_j>, 0)^gamma

    (Iscen et al. 2017, Sec. 3.3: each query region contributes its k nearest
    database regions; contributions of several query regions add up.)

    Args:
      sims: [nq * Rq, k] from ``graph.knn`` of the flattened query regions
        (row q * Rq + r) against the flattened database regions.
      idx: [nq * Rq, k] their indices.
      num_queries: nq (static); num_db_regions: total database regions (static).
      gamma: similarity exponent (> 0), as for the graph affinities.
      query_mask: optional bool[nq, Rq]; padded query regions contribute nothing.
        Entries with sim = -inf (missing neighbours) are ignored.
    Returns:
      float32[nq, num_db_regions].
    """
    sims = jnp.asarray(sims, dtype=jnp.float32)
    idx = jnp.asarray(idx)
    if sims.ndim != 2 or idx.shape != sims.shape:
        raise ValueError(f"sims and idx must be [nq*Rq, k] of the same shape, got {sims.shape}, {idx.shape}")
    num_queries = _checks.check_k(num_queries, sims.shape[0], name="num_queries", what="query regions")
    if sims.shape[0] % num_queries:
        raise ValueError(f"{sims.shape[0]} rows are not num_queries * Rq for num_queries = {num_queries}")
    _checks.check_positive_int(num_db_regions, "num_db_regions")
    gamma = _checks.check_gamma(gamma)
    rq = sims.shape[0] // num_queries
    if query_mask is None:
        query_mask = jnp.ones((num_queries, rq), dtype=bool)
    else:
        query_mask = jnp.asarray(query_mask)
        if tuple(query_mask.shape) != (num_queries, rq):
            raise ValueError(f"query_mask must be [nq, Rq] = {(num_queries, rq)}, got {query_mask.shape}")
    return _qrs(sims, idx.astype(jnp.int32), query_mask, jnp.float32(gamma),
                num_queries=num_queries, num_db_regions=int(num_db_regions))


def query_region_knn(query_regions, db_regions, k: int, *, query_mask=None, db_mask=None):
    """kNN of every valid query region among the valid database regions (host driver).

    Wraps ``graph.knn`` (which rejects zero rows) for padded region arrays: padded
    query rows get a placeholder and sim -inf, padded database regions are left out,
    and indices refer to the flattened padded database (i * R + r).

    Args:
      query_regions: float[nq, Rq, d]; db_regions: float[N, R, d];
      k: neighbours per query region (<= number of valid database regions);
      query_mask: bool[nq, Rq]; db_mask: bool[N, R] (defaults: all valid).
    Returns:
      (sims float32[nq * Rq, k], idx int32[nq * Rq, k]) for `query_region_similarity`.
    """

    q = np.asarray(query_regions, dtype=np.float32)
    db = np.asarray(db_regions, dtype=np.float32)
    if q.ndim != 3 or db.ndim != 3 or q.shape[2] != db.shape[2]:
        raise ValueError(f"query_regions [nq, Rq, d] and db_regions [N, R, d] must share d, "
                         f"got {q.shape} and {db.shape}")
    qm = np.ones(q.shape[:2], bool) if query_mask is None else np.asarray(query_mask, bool)
    dm = np.ones(db.shape[:2], bool) if db_mask is None else np.asarray(db_mask, bool)
    if qm.shape != q.shape[:2] or dm.shape != db.shape[:2]:
        raise ValueError("query_mask / db_mask shapes must match the region arrays' first two axes")
    flat_db = db.reshape(-1, db.shape[2])
    keep = np.flatnonzero(dm.ravel())
    if keep.size == 0:
        raise ValueError("db_mask marks no valid database region")
    flat_q = q.reshape(-1, q.shape[2]).copy()
    qvalid = qm.ravel()
    flat_q[~qvalid] = 1.0 / np.sqrt(q.shape[2])  # placeholder, masked below
    sims, idx = knn(flat_q, flat_db[keep], k)
    idx = jnp.asarray(keep.astype(np.int32))[idx]
    sims = jnp.where(jnp.asarray(qvalid)[:, None], sims, -jnp.inf)
    return sims, idx
