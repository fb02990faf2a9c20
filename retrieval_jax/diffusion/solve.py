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
    _checks.check_gamma(gamma)
    similarities = jnp.asarray(similarities)
    indices = jnp.asarray(indices)
    if similarities.ndim != 2 or similarities.shape != indices.shape:
        raise ValueError("similarities and indices must both be [n_queries, k], got "
                         f"{similarities.shape} and {indices.shape}")
    if not isinstance(indices, jax.core.Tracer):
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
        if not np.isfinite(np.asarray(similarities)).all():
            raise ValueError("similarities contain NaN or inf")
    return _query_vectors(similarities.astype(jnp.float32), indices.astype(jnp.int32), n, gamma)


@functools.partial(jax.jit, static_argnums=(2,))
def _query_vectors(sims, idx, n, gamma):
    vals = jnp.maximum(sims, 0.0) ** gamma
    rows = jnp.arange(sims.shape[0])[:, None]
    return jnp.zeros((sims.shape[0], n), jnp.float32).at[rows, idx].add(vals)


def indicator_vectors(items, n: int) -> jax.Array:
    """y for queries that are database items: y[q] = e_{items[q]}, float32[nq, n]."""
    items = jnp.asarray(items, jnp.int32)
    if items.ndim != 1:
        raise ValueError(f"items must be a 1-D array of database ids, got shape {items.shape}")
    if not isinstance(items, jax.core.Tracer):
        it = np.asarray(items)
        if it.size and (it.min() < 0 or it.max() >= n):
            raise ValueError(f"item ids must lie in [0, {n}), got range [{it.min()}, {it.max()}]")
    return jax.nn.one_hot(items, n, dtype=jnp.float32)


def _check_graph_y(graph: Graph, y):
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    if y.ndim != 2 or y.shape[1] != graph.num_nodes:
        raise ValueError(f"y must be [n_queries, n] with n = {graph.num_nodes} graph nodes, got {y.shape}")
    if not isinstance(y, jax.core.Tracer) and not bool(jnp.isfinite(y).all()):
        raise ValueError("y contains NaN or inf")


def diffuse(graph: Graph, y, *, alpha: float = 0.99, tol: float = 1e-6, max_iter: int = 20,
            return_info: bool = False):
    """Diffusion scores x solving (I - alpha W) x = y for a batch of queries.

    Args:
      graph: the normalised graph W (`normalize(knn_graph(...))`), n nodes.
      y: float[nq, n] observations (`query_vectors` or `indicator_vectors`).
      alpha: in (0, 1); 0.99 as in Iscen et al. 2017.
      tol: relative residual at which a query's CG stops.
      max_iter: largest number of CG steps (Iscen et al. use 20; at alpha = 0.99 the
        ranking keeps improving well past 20 steps, see the README).
      return_info: also return `DiffusionInfo` (iterations, residual per query).

    Returns:
      scores float32[nq, n] (and `DiffusionInfo` when ``return_info``).
    """
    alpha = _checks.check_alpha(alpha)
    _checks.check_positive(tol, "tol")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    y = jnp.asarray(y, jnp.float32)
    _check_graph_y(graph, y)
    res = _diffuse(graph, y, alpha, tol, int(max_iter))
    scores = res.x.T
    if return_info:
        return scores, DiffusionInfo(res.iterations, res.residual)
    return scores


@functools.partial(jax.jit, static_argnums=(4,))
def _diffuse(graph: Graph, y, alpha, tol, max_iter) -> CGResult:
    b = y.T  # node axis first: [n, nq], each gather fetches a contiguous row of nq values
    def matvec(x):
        return x - alpha * graph.matvec(x)
    return conjugate_gradient(matvec, b, tol=tol, max_iter=max_iter)


def katz_centrality(graph: Graph, alpha: float = 0.99, *, tol: float = 1e-6, max_iter: int = 200,
                    return_info: bool = False):
    """Katz centrality g solving L_alpha g = 1, i.e. (I - alpha W) g = (1 - alpha) 1.

    Returns float32[n]; an isolated node gets g = 1 - alpha (its own mass only). With
    ``return_info=True`` also the `DiffusionInfo` of the solve (CG steps and relative
    residual, each of shape [1]), to see whether ``max_iter`` was enough at alpha near 1.
    """
    alpha = _checks.check_alpha(alpha)
    ones = jnp.full((1, graph.num_nodes), 1.0 - alpha, jnp.float32)
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
    _checks.check_positive(tol, "tol")
    y = jnp.asarray(y, jnp.float32)
    _check_graph_y(graph, y)
    shortlist = jnp.asarray(shortlist, jnp.int32)
    if shortlist.ndim != 2 or shortlist.shape[0] != y.shape[0]:
        raise ValueError(f"shortlist must be [n_queries, T] with n_queries = {y.shape[0]}, got {shortlist.shape}")
    s = np.asarray(shortlist)
    if s.min() < 0 or s.max() >= graph.num_nodes:
        raise ValueError(f"shortlist ids must lie in [0, {graph.num_nodes})")
    srt = np.sort(s, axis=1)
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise ValueError("a shortlist row repeats a database id; shortlist rows must be distinct ids")
    y_s = jnp.take_along_axis(y, shortlist, axis=1)
    res = _truncated(graph, y_s, shortlist, alpha, tol, int(max_iter), batch_size)
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
def _truncated(graph, y_s, shortlist, alpha, tol, max_iter, batch_size) -> CGResult:
    def one(args):
        ys, s = args
        sub = _local_subgraph(graph, s)
        return conjugate_gradient(lambda x: x - alpha * sub.matvec(x), ys, tol=tol, max_iter=max_iter)
    return jax.lax.map(one, (y_s, shortlist), batch_size=batch_size)


# --------------------------------------------------------------------------- rankings
@functools.partial(jax.jit, static_argnames=("n",))
def top_n(scores, n: int):
    """The n best database items per query: (values float32[nq, n], indices int32[nq, n])."""
    return jax.lax.top_k(scores, n)


def ranking_from_scores(scores, *, exclude=None) -> np.ndarray:
    """Full rankings (best first) from scores [nq, n], as an int64 numpy array [nq, n].

    ``exclude``: optional int[nq] database id to move to the very end of each row
    (e.g. the query itself when queries are database items). Ties keep index order.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n_queries, n_database], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; check the inputs of the ranking method")
    if exclude is not None:
        ex = np.asarray(exclude)
        s = s.copy()
        s[np.arange(s.shape[0]), ex] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")
