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
from .cg import CGResult
from .observation import observe_items, observe_neighbours
from .operator import DiffusionOperator, diffusion_operator
from .solvers import CG, check_observations, checked_solution, raise_failed_rows, solve_unchecked


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


def _check_max_iter(max_iter) -> int:
    if not _checks.is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1 (it fixes the loop bound, so it is static), "
                         f"got {max_iter!r}")
    return int(max_iter)


def _checked_cg(tol, max_iter) -> CG:
    return CG(_checks.check_tolerance(tol, "tol"), _check_max_iter(max_iter))


def diffuse(graph: Graph, y, *, alpha: float = 0.99, tol: float = 1e-6, max_iter: int = 20,
            return_info: bool = False, throw: bool = True):
    """Diffusion scores x solving (I - alpha W) x = y for a batch of queries.

    Zhou et al. (NIPS 2003), solved by batched conjugate gradient as in Iscen et al.
    (CVPR 2017): ``solve(diffusion_operator(graph, alpha), y, CG(tol, max_iter))``,
    with each input checked once here. Composable: ``alpha``, ``tol``, ``y`` and the
    graph's weights may be traced (``jax.jit``, ``vmap`` over alpha, ``grad``); only
    ``max_iter`` is static. Gradients are implicit (``lax.custom_linear_solve``): the
    backward pass is one more CG solve with the same symmetric operator,
    d/dy = (I - alpha W)^-1 x_bar, and d/dalpha, d/dW follow from
    dM = -dalpha W - alpha dW, never by differentiating through the CG iterations.

    A graph from `normalize` of a concrete graph of `LOCALITY_MIN_NODES` nodes or more
    carries its `LocalityLayout`; CG then iterates in it (the same solution, returned
    in the graph's node order, each product served mostly from cache). Cost: O(steps
    x (nnz + n) x nq).

    Args:
      graph: the normalised graph W (`normalize(knn_graph(...))`), n nodes. A plain
        concrete `Graph` is checked to be symmetric and normalised.
      y: real float[nq, n] observations (`query_vectors` or `indicator_vectors`).
      alpha: in (0, 1); 0.99 as in Iscen et al. 2017.
      tol: relative residual at which a query's CG stops.
      max_iter: largest number of CG steps (Iscen et al. use 20; at alpha = 0.99 the
        ranking keeps improving well past 20 steps: docs/benchmarks/bench_diffusion.md).
      return_info: also return `DiffusionInfo` (iterations, residual per query).
      throw: raise when a query's CG broke down (NaN residual), under ``jax.jit`` too,
        when the computation runs; False returns the NaN scores and residual instead
        (`solve`'s ``throw``).

    Returns:
      scores [nq, n] in y's float dtype (and `DiffusionInfo` when ``return_info``).

    Raises:
      TypeError: graph is not a `Graph`; y is complex or not numeric.
      ValueError: y's shape, NaN/inf in y, a bad alpha / tol / max_iter, a concrete
        plain `Graph` that is not a symmetric normalised W, or (with ``throw``) a query
        whose CG broke down: at once on concrete values, and under a trace when the
        computation runs (a ``JaxRuntimeError`` carrying the message).
    """
    throw = _checks.check_bool(throw, "throw")
    operator = diffusion_operator(graph, alpha)
    solver = _checked_cg(tol, max_iter)
    y = check_observations(y, operator.num_nodes)
    sol = checked_solution(solve_unchecked(operator, y, solver), throw)
    if return_info:
        return sol.scores, DiffusionInfo(sol.iterations, sol.residual)
    return sol.scores


def katz_centrality(graph: Graph, alpha: float = 0.99, *, tol: float = 1e-6, max_iter: int = 200,
                    return_info: bool = False, throw: bool = True):
    """Katz centrality g solving L_alpha g = 1, i.e. (I - alpha W) g = (1 - alpha) 1.

    Returns float32[n]; an isolated node gets g = 1 - alpha (its own mass only). With
    ``return_info=True`` also the `DiffusionInfo` of the solve (CG steps and relative
    residual, each of shape [1]), to see whether ``max_iter`` was enough at alpha near 1.
    The same path as `diffuse` (`solve` with `CG`), inputs checked once; ``throw`` as
    in `diffuse`.
    """
    throw = _checks.check_bool(throw, "throw")
    operator = diffusion_operator(graph, alpha)
    solver = _checked_cg(tol, max_iter)
    ones = jnp.ones((1, operator.num_nodes), jnp.float32) * (1.0 - operator.alpha.astype(jnp.float32))
    sol = checked_solution(solve_unchecked(operator, ones, solver), throw)
    if return_info:
        return sol.scores[0], DiffusionInfo(sol.iterations, sol.residual)
    return sol.scores[0]


# --------------------------------------------------------------------------- truncated
def truncated_diffuse(graph: Graph, y, shortlist, *, alpha: float = 0.99, tol: float = 1e-6,
                      max_iter: int = 20, batch_size: int | None = 64, return_info: bool = False,
                      throw: bool = True):
    """Diffusion restricted to each query's shortlist of T database items.

    Iscen et al. 2017, Sec. 4 ("truncation"): query q solves
    (I - alpha W_SS) x_S = y_S on the subgraph S = shortlist[q] only, with W_SS the
    rows and columns of W in S. Subproblems have the fixed shape [T, K] (the padded
    neighbour lists of S, remapped to local positions, edges leaving S dropped) and
    are solved by `solve` with `CG` under ``vmap``, ``batch_size`` queries at a time
    (``lax.map``). Cost: O(steps x T K) per query.

    Args:
      graph: normalised W on n nodes.
      y: real float[nq, n] observations; only entries on the shortlist are used.
      shortlist: int[nq, T] distinct database ids per query.
      throw: raise when a query's CG broke down, as in `diffuse`.

    Returns:
      scores float32[nq, T] aligned with ``shortlist`` (and `DiffusionInfo`).
    """
    throw = _checks.check_bool(throw, "throw")
    operator = diffusion_operator(graph, alpha)
    solver = _checked_cg(tol, max_iter)
    if batch_size is not None:
        batch_size = _checks.check_positive_int(batch_size, "batch_size")
    y = check_observations(y, operator.num_nodes)
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
        if s.size and (s.min() < 0 or s.max() >= graph.num_nodes):
            raise ValueError(f"shortlist ids must lie in [0, {graph.num_nodes})")
        srt = np.sort(s, axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise ValueError("a shortlist row repeats a database id; shortlist rows must be distinct ids")
    if shortlist.shape[0] == 0:
        res = CGResult(jnp.zeros(shortlist.shape, y.dtype), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), y.dtype))
    else:
        y_s = jnp.take_along_axis(y, shortlist, axis=1)
        res = cg_truncated_diffusion(graph, y_s, shortlist, operator.alpha, solver.tol, solver.max_iter, batch_size)
    if throw:
        raise_failed_rows(res.residual)
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
    `CGResult` with x float[nq, T]. Each subproblem is one `solve` with `CG` on the
    operator of its subgraph. Pure and jittable; implicit gradients (`solve_spd`).
    """
    alpha = jnp.asarray(alpha, y_s.dtype)
    solver = CG(tol, max_iter)

    def one(args):
        ys, s = args
        sol = solve_unchecked(DiffusionOperator(graph=_local_subgraph(graph, s), alpha=alpha), ys[None], solver)
        return CGResult(sol.scores[0], sol.iterations[0], sol.residual[0])
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
