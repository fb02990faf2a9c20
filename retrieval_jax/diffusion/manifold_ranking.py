"""Diffusion on a normalised kNN graph: manifold ranking by conjugate gradient.

Zhou et al., "Ranking on Data Manifolds" (NIPS 2003); Iscen et al., "Efficient
Diffusion on Region Manifolds: Recovering Small Objects with Compact CNN
Representations" (CVPR 2017). With W = D^-1/2 A D^-1/2 and 0 < alpha < 1, the
ranking of a query with observation y is the solution of

    L_alpha x = y,   L_alpha = (I - alpha W) / (1 - alpha),

which we solve as (I - alpha W) x = y (the same ranking; x differs by the scale
1 - alpha). I - alpha W is symmetric positive definite, so conjugate gradient applies.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ..graph.core import Graph
from .cg import CGResult, conjugate_gradient
from .observation import observe_items, observe_neighbours
from .operator import check_normalized


class DiffusionInfo(NamedTuple):
    """Convergence of a batch of diffusions: CG steps and final relative residual per query."""

    iterations: jax.Array
    residual: jax.Array


def query_vectors(similarities, indices, n: int, *, gamma: float = 3.0) -> jax.Array:
    """Observation vectors y of queries that are not in the graph.

    y[q, indices[q, j]] = max(similarities[q, j], 0)^gamma, zero elsewhere: the query
    is attached to its k nearest database items (Iscen et al. 2017, Sec. 3.2).

    Args:
      similarities: float[nq, k] similarities to the query's k nearest database items.
      indices: int[nq, k] their database ids, all in [0, n).
      n: database size.
      gamma: similarity exponent (> 0).

    Returns:
      float32[nq, n].
    """
    return observe_neighbours(similarities, indices, n, gamma=gamma).todense()


def indicator_vectors(items, n: int) -> jax.Array:
    """y for queries that are database items: y[q] = e_{items[q]}, float32[nq, n] (integer ids in [0, n))."""
    return observe_items(items, n).todense()


def _check_graph_y(graph: Graph, y):
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    if y.ndim != 2 or y.shape[1] != graph.num_nodes:
        raise ValueError(f"y must be [n_queries, n] with n = {graph.num_nodes} graph nodes, got {y.shape}")
    if not _checks.is_traced(y) and not np.isfinite(np.asarray(y)).all():
        raise ValueError("y contains NaN or inf")


def _as_observations(y) -> jax.Array:
    """y as a floating array (float32 unless it is already a float type, e.g. float64)."""
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.float32)
    return y


def _check_max_iter(max_iter) -> int:
    if not _checks.is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1 (it fixes the loop bound, so it is static), "
                         f"got {max_iter!r}")
    return int(max_iter)


def diffuse(graph: Graph, y, *, alpha: float = 0.99, tol: float = 1e-6, max_iter: int = 20,
            return_info: bool = False):
    """Diffusion scores x solving (I - alpha W) x = y for a batch of queries.

    Zhou et al. (NIPS 2003), solved by batched conjugate gradient as in Iscen et al.
    (CVPR 2017). Composable: ``alpha``, ``tol``, ``y`` and the graph's weights may be
    traced (``jax.jit``, ``vmap`` over alpha, ``grad``); only ``max_iter`` is static.
    Gradients are implicit (``lax.custom_linear_solve``): the backward pass is one more
    CG solve with the same symmetric operator, d/dy = (I - alpha W)^-1 x_bar, and
    d/dalpha, d/dW follow from dM = -dalpha W - alpha dW, never by differentiating
    through the CG iterations.

    Args:
      graph: the normalised graph W (`normalize(knn_graph(...))`), n nodes. A plain
        concrete `Graph` is checked to be symmetric and normalised.
      y: float[nq, n] observations (`query_vectors` or `indicator_vectors`).
      alpha: in (0, 1); 0.99 as in Iscen et al. 2017.
      tol: relative residual at which a query's CG stops.
      max_iter: largest number of CG steps (Iscen et al. use 20; at alpha = 0.99 the
        ranking keeps improving well past 20 steps: docs/benchmarks/bench_diffusion.md).
      return_info: also return `DiffusionInfo` (iterations, residual per query).

    Returns:
      scores [nq, n] in y's float dtype (and `DiffusionInfo` when ``return_info``).
    """
    alpha = _checks.check_alpha(alpha)
    tol = _checks.check_positive(tol, "tol")
    max_iter = _check_max_iter(max_iter)
    y = _as_observations(y)
    _check_graph_y(graph, y)
    check_normalized(graph)
    res = cg_diffusion(graph, y, alpha, tol, max_iter)
    scores = res.x.T
    if return_info:
        return scores, DiffusionInfo(res.iterations, res.residual)
    return scores


def solve_spd(matvec, b, *, tol, max_iter: int) -> CGResult:
    """Solve M x = b for a symmetric positive-definite M by batched CG, differentiably.

    The derivative is implicit (``lax.custom_linear_solve`` with ``symmetric=True``):
    a cotangent x_bar is pulled back by one more CG solve M b_bar = x_bar, and the
    derivative with respect to whatever ``matvec`` closes over (alpha, W's weights)
    is -b_bar^T (dM x). ``b``: [n] or [n, B]; returns the `CGResult` of the forward solve.
    """
    def solve(mv, rhs):
        res = conjugate_gradient(mv, rhs, tol=tol, max_iter=max_iter)
        return res.x, (res.iterations, res.residual)

    x, (its, resid) = jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True, has_aux=True)
    return CGResult(x, its, resid)


@functools.partial(jax.jit, static_argnums=(4,))
def cg_diffusion(graph: Graph, y, alpha, tol, max_iter: int) -> CGResult:
    """(I - alpha W) x = y by batched CG, unchecked (see `diffuse` for the checked entry point).

    y: float[nq, n]; returns the `CGResult` with x float[n, nq] (node axis first).
    Pure and jittable; implicit gradients (`solve_spd`).
    """
    b = y.T  # node axis first: [n, nq], each gather fetches a contiguous row of nq values
    alpha = jnp.asarray(alpha, b.dtype)

    def matvec(x):
        return x - alpha * graph.matvec(x)
    return solve_spd(matvec, b, tol=tol, max_iter=max_iter)


def katz_centrality(graph: Graph, alpha: float = 0.99, *, tol: float = 1e-6, max_iter: int = 200,
                    return_info: bool = False):
    """Katz centrality g solving L_alpha g = 1, i.e. (I - alpha W) g = (1 - alpha) 1.

    Returns float32[n]; an isolated node gets g = 1 - alpha (its own mass only). With
    ``return_info=True`` also the `DiffusionInfo` of the solve (CG steps and relative
    residual, each of shape [1]), to see whether ``max_iter`` was enough at alpha near 1.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    alpha = _checks.check_alpha(alpha)
    ones = jnp.full((1, graph.num_nodes), 1.0, jnp.float32) * (1.0 - alpha)
    if return_info:
        g, info = diffuse(graph, ones, alpha=alpha, tol=tol, max_iter=max_iter, return_info=True)
        return g[0], info
    return diffuse(graph, ones, alpha=alpha, tol=tol, max_iter=max_iter)[0]


# --------------------------------------------------------------------------- truncated
def truncated_diffuse(graph: Graph, y, shortlist, *, alpha: float = 0.99, tol: float = 1e-6,
                      max_iter: int = 20, batch_size: int | None = 64, return_info: bool = False):
    """Diffusion restricted to each query's shortlist of T database items.

    Iscen et al. 2017, Sec. 4 ("truncation"): query q solves
    (I - alpha W_SS) x_S = y_S on the subgraph S = shortlist[q] only, with W_SS the
    rows and columns of W in S. Subproblems have the fixed shape [T, K] (the padded
    neighbour lists of S, remapped to local positions, edges leaving S dropped) and
    are solved by CG under ``vmap``, ``batch_size`` queries at a time (``lax.map``).

    Args:
      graph: normalised W on n nodes.
      y: float[nq, n] observations; only entries on the shortlist are used.
      shortlist: int[nq, T] distinct database ids per query.

    Returns:
      scores float32[nq, T] aligned with ``shortlist`` (and `DiffusionInfo`).
    """
    alpha = _checks.check_alpha(alpha)
    tol = _checks.check_positive(tol, "tol")
    max_iter = _check_max_iter(max_iter)
    if batch_size is not None:
        batch_size = _checks.check_positive_int(batch_size, "batch_size")
    y = _as_observations(y)
    _check_graph_y(graph, y)
    check_normalized(graph)
    shortlist = jnp.asarray(shortlist)
    if shortlist.ndim != 2 or shortlist.shape[0] != y.shape[0]:
        raise ValueError(f"shortlist must be [n_queries, T] with n_queries = {y.shape[0]}, got {shortlist.shape}")
    if shortlist.shape[1] == 0:
        raise ValueError("the shortlist is empty (T = 0); give each query at least one database id")
    if not jnp.issubdtype(shortlist.dtype, jnp.integer):
        raise TypeError(f"shortlist must hold integer database ids, got dtype {shortlist.dtype}")
    shortlist = shortlist.astype(jnp.int32)
    if not _checks.is_traced(shortlist):
        s = np.asarray(shortlist)
        if s.min() < 0 or s.max() >= graph.num_nodes:
            raise ValueError(f"shortlist ids must lie in [0, {graph.num_nodes})")
        srt = np.sort(s, axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise ValueError("a shortlist row repeats a database id; shortlist rows must be distinct ids")
    y_s = jnp.take_along_axis(y, shortlist, axis=1)
    res = cg_truncated_diffusion(graph, y_s, shortlist, alpha, tol, max_iter, batch_size)
    if return_info:
        return res.x, DiffusionInfo(res.iterations, res.residual)
    return res.x


def _local_subgraph(graph: Graph, s):
    """Neighbour lists of the nodes ``s`` [T] remapped to positions in ``s``; [T, K] each."""
    t = s.shape[0]
    pos = jnp.full((graph.num_nodes,), -1, jnp.int32).at[s].set(jnp.arange(t, dtype=jnp.int32))
    local = pos[graph.indices[s]]
    inside = local >= 0
    w = jnp.where(inside, graph.weights[s], 0.0)
    local = jnp.where(inside, local, jnp.arange(t, dtype=jnp.int32)[:, None])
    return Graph(indices=local, weights=w)


@functools.partial(jax.jit, static_argnums=(5, 6))
def cg_truncated_diffusion(graph, y_s, shortlist, alpha, tol, max_iter: int, batch_size) -> CGResult:
    """(I - alpha W_SS) x_S = y_S for every query's shortlist S, unchecked (see `truncated_diffuse`).

    y_s: float[nq, T] observations on the shortlists int32[nq, T]; returns the batched
    `CGResult` with x float[nq, T]. Pure and jittable; implicit gradients (`solve_spd`).
    """
    alpha = jnp.asarray(alpha, y_s.dtype)

    def one(args):
        ys, s = args
        sub = _local_subgraph(graph, s)
        return solve_spd(lambda x: x - alpha * sub.matvec(x), ys, tol=tol, max_iter=max_iter)
    return jax.lax.map(one, (y_s, shortlist), batch_size=batch_size)


# --------------------------------------------------------------------------- rankings
def top_n(scores, n: int):
    """The n best database items per query: (values float32[nq, n], indices int32[nq, n]).

    Concrete scores are checked for NaN (``lax.top_k`` would rank a NaN first); traced
    ones only for their shape and dtype."""
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_queries, n_database], got shape {scores.shape}")
    if not (jnp.issubdtype(scores.dtype, jnp.floating) or jnp.issubdtype(scores.dtype, jnp.integer)):
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")
    _checks.check_k(n, scores.shape[1], name="n", what="database items (columns of scores)")
    if not _checks.is_traced(scores) and bool(jnp.isnan(scores).any()):
        rows = np.flatnonzero(np.isnan(np.asarray(scores)).any(axis=1))
        raise ValueError(f"scores contain NaN in {rows.size} row(s) (first: row {rows[0]}); "
                         "check the inputs of the ranking method")
    return _top_n(scores, int(n))


@functools.partial(jax.jit, static_argnums=(1,))
def _top_n(scores, n: int):
    return jax.lax.top_k(scores, n)


def ranking_from_scores(scores, *, exclude=None, rtol: float = 0.0) -> np.ndarray:
    """Full rankings (best first) from scores [nq, n], as an int64 numpy array [nq, n].

    ``exclude``: optional int[nq] database id to move to the very end of each row
    (e.g. the query itself when queries are database items). Ties keep index order.

    ``rtol``: scores with ``|s| <= rtol * max_j |s_j|`` (per row) count as exactly 0.
    Diffusion gives exactly 0 to every item outside the query's graph component, but
    a floating-point route leaves noise there (about 1e-8 of the row maximum in
    float32, 1e-16 in float64) and the noise's signs then order that tail. On a
    mutual kNN graph the tail is most of the collection (95% of COIL-20's scores), so
    two routes that agree to 1e-7 can differ by a mAP point. With ``rtol`` above the
    routes' precision (1e-6 for float32) the tail is ranked by index, the same for
    every route. Default 0: scores are taken as they are.
    """
    s = np.asarray(scores)
    if np.iscomplexobj(s) or s.dtype.kind in "OSUmM":   # bfloat16 & co. (kind "V") convert
        raise TypeError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n_queries, n_database], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; check the inputs of the ranking method")
    rtol = float(rtol)
    if not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must lie in [0, 1), got {rtol}")
    if rtol > 0 and s.size:
        floor = rtol * np.abs(s).max(axis=1, keepdims=True)
        s = np.where(np.abs(s) <= floor, 0.0, s)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.shape != (s.shape[0],) or not np.issubdtype(ex.dtype, np.integer):
            raise ValueError(f"exclude must be {s.shape[0]} integer database ids (one per query), "
                             f"got {ex.dtype} {ex.shape}")
        if ex.size and (ex.min() < 0 or ex.max() >= s.shape[1]):
            raise ValueError(f"exclude ids must lie in [0, {s.shape[1]}), got range [{ex.min()}, {ex.max()}]")
        s = s.copy()
        s[np.arange(s.shape[0]), ex] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")
