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

The whole pipeline is `region_graph` (the kNN graph over the valid regions) then
`regional_diffusion_scores` (query regions -> y -> diffusion -> pooled image scores);
the pieces (`gmp_weights`, `pool_region_scores`, `query_region_knn`,
`query_region_similarity`) are public for other compositions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._precision import HIGHEST as _HIGHEST
from .._progress import progress
from .. import _checks
from ..graph import knn, knn_graph, normalize
from .manifold_ranking import diffuse

__all__ = ["gmp_weights", "pool_region_scores", "query_region_similarity", "query_region_knn",
           "region_graph", "regional_diffusion_scores"]



def _check_regions(regions, mask):
    """Real regions [N, R, d] (float), a bool mask [N, R]; concrete valid regions finite."""
    _checks.check_real_dtype(regions, "regions")
    regions = jnp.asarray(regions)
    if not jnp.issubdtype(regions.dtype, jnp.floating):
        regions = regions.astype(jnp.float32)
    if regions.ndim != 3:
        raise ValueError(f"regions must be [N, R, d], got shape {tuple(regions.shape)}")
    if mask is None:
        mask = jnp.ones(regions.shape[:2], dtype=bool)
    else:
        mask = _checks.check_mask(mask, regions.shape[:2], "[N, R]")
    _checks.check_finite_values(regions, "regions", mask,
                                fix="a NaN region makes its image's pooling weights NaN; drop or mask it")
    return regions, mask


@jax.jit
def _gmp_solve(regions, mask, lam):
    regions = jnp.where(mask[..., None], regions, 0)   # padding never enters the Gram matrix, NaN or not
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


def _host_regions(regions, mask, what):
    regions = np.asarray(regions, dtype=np.float32)
    if regions.ndim != 3:
        raise ValueError(f"{what} must be [N, R, d], got shape {regions.shape}")
    mask = np.ones(regions.shape[:2], bool) if mask is None else np.asarray(mask)
    if mask.shape != regions.shape[:2]:
        raise ValueError(f"the mask of {what} must be [N, R] = {regions.shape[:2]}, got {mask.shape}")
    return regions, mask.astype(bool)


def region_graph(regions, mask=None, *, k: int, gamma: float = 3.0, mutual: bool = True):
    """The normalised kNN graph over the valid regions of a collection (host driver).

    The nodes are the valid regions, in flattened order; node j is the padded region
    ``nodes[j] = i * R + r`` (image i, region r). Affinities as in `graph.knn_graph`,
    A_uv = max(<x_u, x_v>, 0)^gamma on the (mutual) kNN pairs, normalised
    W = D^-1/2 A D^-1/2 (Iscen et al., CVPR 2017, Sec. 3.1 and 3.3). k should exceed
    the regions per image, or each region's neighbours are mostly its own image's.

    Args:
      regions: float[N, R, d] (L2-normalised rows); mask: bool[N, R] valid regions
        (default all); k: neighbours per region (< number of valid regions);
      gamma: similarity exponent (> 0); mutual: reciprocal pairs only.
    Returns:
      (W, nodes): the `NormalizedGraph` of the M valid regions and int32[M] their
      flattened padded indices. Cost: the kNN search over M regions, O(M^2 d) exact.
    """
    regions, mask = _host_regions(regions, mask, "regions")
    nodes = np.flatnonzero(mask.ravel()).astype(np.int32)
    if nodes.size < 2:
        raise ValueError(f"the mask leaves {nodes.size} valid region(s); a region graph needs at least 2")
    flat = regions.reshape(-1, regions.shape[2])[nodes]
    return normalize(knn_graph(flat, k, gamma=gamma, mutual=mutual)), nodes


def regional_diffusion_scores(graph, nodes, regions, mask=None, query_regions=None, query_mask=None, *,
                              query_k: int, gamma: float = 3.0, alpha: float = 0.99, tol: float = 1e-6,
                              max_iter: int = 200, lam: float = 1.0, poolings=("gmp",), chunk: int = 128,
                              return_iterations: bool = False, show_progress: bool | None = None):
    """Image scores of multi-region queries by diffusion on the region graph.

    Iscen et al. (CVPR 2017, Sec. 3.3), for each query image q with regions q_r:

      y_q,u = sum_r [u in NN_k(q_r)] max(<q_r, x_u>, 0)^gamma   (`query_region_similarity`)
      (I - alpha W) f_q = y_q                                     (`manifold_ranking.diffuse`, CG)
      s_q,i = sum_r b_ir f_q,(i,r)                                (GMP, `gmp_weights`, lam)

    or the max / sum of f over image i's valid regions (`pool_region_scores`). The
    observation and the diffusion live on the graph's nodes (the valid regions) and
    are scattered back to the padded layout [N * R] for pooling.

    Args:
      graph: the region graph, from `region_graph` over ``regions`` / ``mask``.
      nodes: its nodes (the valid regions), from the same `region_graph` call.
      regions: float[N, R, d] database regions; mask: bool[N, R] (default all valid).
      query_regions: float[nq, Rq, d] and query_mask bool[nq, Rq]; default: every
        database image is a query with its own regions (the regional search of a
        collection against itself).
      query_k: database regions per query region (<= number of valid regions).
      gamma: exponent of the query similarities (> 0; the graph's, usually).
      alpha: as in `diffuse` (0.99 in Iscen et al.).
      tol: as in `diffuse` (1e-6 in Iscen et al.).
      max_iter: as in `diffuse`.
      lam: the GMP regulariser (> 0); poolings: a tuple of "gmp", "max", "sum".
      chunk: queries per diffusion batch (memory: chunk x N x R floats).
    Returns:
      {pooling: float32[nq, N]} (and int[nq] CG steps per query when
      ``return_iterations``). Cost: the query kNN, O(nq Rq M d), plus per chunk one
      batched CG of at most ``max_iter`` steps over the M-node graph.
    """
    regions, mask = _host_regions(regions, mask, "regions")
    if query_regions is None:
        if query_mask is not None:
            raise ValueError("query_mask without query_regions; the queries default to the database")
        query_regions, query_mask = regions, mask
    else:
        query_regions, query_mask = _host_regions(query_regions, query_mask, "query_regions")
    n, r, _ = regions.shape
    nodes = np.asarray(nodes)
    if nodes.ndim != 1 or nodes.shape[0] != graph.num_nodes:
        raise ValueError(f"nodes must be the int[{graph.num_nodes}] flat indices of the graph's regions "
                         f"(from region_graph), got shape {nodes.shape}")
    if not np.array_equal(nodes, np.flatnonzero(mask.ravel())):
        raise ValueError("nodes do not match the valid regions of mask; build the graph with "
                         "region_graph(regions, mask, ...) on the same regions")
    poolings = tuple(poolings)
    if not poolings or any(p not in ("gmp", "max", "sum") for p in poolings):
        raise ValueError(f"poolings must be a non-empty tuple of 'gmp', 'max', 'sum', got {poolings!r}")
    chunk = _checks.check_positive_int(chunk, "chunk")
    weights = gmp_weights(regions, mask, lam=lam) if "gmp" in poolings else None
    sims, idx = query_region_knn(query_regions, regions, query_k, query_mask=query_mask, db_mask=mask)
    nq, rq = query_mask.shape
    out = {p: np.empty((nq, n), np.float32) for p in poolings}
    steps = []
    fv, mask_j = jnp.asarray(nodes), jnp.asarray(mask)
    starts = range(0, nq, chunk)
    for start in progress(starts, desc="regional diffusion", total=len(starts), enable=show_progress,
                          auto_threshold=4):
        q = np.arange(start, min(nq, start + chunk))
        rows = (q[:, None] * rq + np.arange(rq)[None]).ravel()
        y = query_region_similarity(sims[rows], idx[rows], num_queries=len(q), num_db_regions=n * r,
                                    gamma=gamma, query_mask=query_mask[q])
        x, info = diffuse(graph, y[:, fv], alpha=alpha, tol=tol, max_iter=max_iter, return_info=True)
        steps.append(np.asarray(info.iterations))
        full = jnp.zeros((len(q), n * r), x.dtype).at[:, fv].set(x)
        for p in poolings:
            out[p][q] = np.asarray(pool_region_scores(full, weights, mode=p, mask=mask_j))
    if return_iterations:
        return out, np.concatenate(steps)
    return out
