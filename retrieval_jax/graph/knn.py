"""Nearest-neighbour search and kNN affinity graphs.

The affinity of Iscen et al., "Efficient Diffusion on Region Manifolds" (CVPR 2017):
A_ij = max(<x_i, x_j>, 0)^gamma for j among the k nearest neighbours of i, kept
only for reciprocal (mutual) pairs, and W = D^-1/2 A D^-1/2 (Zhou et al., NIPS 2003).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .. import _checks
from .._progress import progress
from .core import Graph

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("k", "block", "exclude_self"))
def _knn_chunk(queries, database, offset, *, k: int, block: int, exclude_self: bool):
    """Top-k inner products of a fixed-size chunk of queries, in blocks of ``block`` rows.

    queries: float32[c, d] with c a multiple of ``block``; offset: int32 scalar, the
    global index of the chunk's first query (used to mask self-matches).
    """
    c, d = queries.shape
    blocks = queries.reshape(c // block, block, d)
    starts = offset + jnp.arange(c // block, dtype=jnp.int32) * block

    def one_block(args):
        q, start = args
        sims = jnp.matmul(q, database.T, precision=_HIGHEST)  # [block, n]
        if exclude_self:
            rows = start + jnp.arange(block, dtype=jnp.int32)
            cols = jnp.arange(database.shape[0], dtype=jnp.int32)
            sims = jnp.where(rows[:, None] == cols[None, :], -jnp.inf, sims)
        return jax.lax.top_k(sims, k)

    vals, idx = jax.lax.map(one_block, (blocks, starts))
    return vals.reshape(c, k), idx.reshape(c, k).astype(jnp.int32)


def knn(queries, database, k: int, *, exclude_self: bool = False, block_size: int = 256,
        chunk_size: int = 8192, show_progress: bool | None = None):
    """Exact k nearest neighbours by inner product.

    sims[q, j] = <queries[q], database[idx[q, j]]>, sorted in decreasing order.

    The similarity matrix is never materialised: queries are processed in jitted
    chunks of ``chunk_size`` rows (one compiled shape; the last chunk is padded),
    each split into blocks of ``block_size`` rows whose [block, n] similarities are
    reduced by ``lax.top_k``. Peak memory is O(block_size * n + n * d), so n =
    100,000 at d = 2048 fits in about 1 GB.

    Args:
      queries: float[nq, d].
      database: float[n, d].
      k: neighbours per query, 1 <= k <= n (k <= n - 1 with ``exclude_self``).
      exclude_self: queries are the database itself (row q is item q); item q is
        never returned as its own neighbour.

    Returns:
      (similarities float32[nq, k], indices int32[nq, k]).
    """
    q = _checks.as_matrix(queries, "queries")
    db = _checks.as_matrix(database, "database")
    _checks.check_same_dim(q, db, "queries", "database")
    n = db.shape[0]
    if exclude_self:
        if q.shape[0] != n:
            raise ValueError("exclude_self=True means the queries are the database, "
                             f"but got {q.shape[0]} queries for {n} database items")
        _checks.check_k(k, n - 1, what="other database items")
    else:
        _checks.check_k(k, n)
    nq = q.shape[0]
    block = int(min(block_size, nq))
    chunk = int(min(chunk_size, -(-nq // block) * block))
    chunk = -(-chunk // block) * block
    db_j = jnp.asarray(db)
    out_s, out_i = [], []
    starts = range(0, nq, chunk)
    for start in progress(starts, desc="knn", total=len(starts), enable=show_progress,
                          auto_threshold=4):
        part = q[start:start + chunk]
        pad = chunk - part.shape[0]
        if pad:
            part = np.concatenate([part, np.zeros((pad, part.shape[1]), part.dtype)])
        s, i = _knn_chunk(jnp.asarray(part), db_j, jnp.int32(start), k=int(k), block=block,
                          exclude_self=exclude_self)
        out_s.append(s[:chunk - pad])
        out_i.append(i[:chunk - pad])
    if len(out_s) == 1:
        return out_s[0], out_i[0]
    return jnp.concatenate(out_s), jnp.concatenate(out_i)


def _nndescent_knn(X: np.ndarray, k: int, *, seed: int = 0):
    """Approximate kNN of X among itself with pynndescent (self excluded)."""
    try:
        import pynndescent
    except ImportError as exc:  # pragma: no cover
        raise ImportError("method='nndescent' needs pynndescent: pip install pynndescent") from exc
    index = pynndescent.NNDescent(X, metric="dot", n_neighbors=min(k + 1, X.shape[0]),
                                  random_state=seed, low_memory=True)
    idx, dist = index.neighbor_graph
    sims = 1.0 - dist  # pynndescent's "dot" distance is 1 - <x, y>
    n = X.shape[0]
    # drop self, keep k per row (a row may lack itself when the search is approximate)
    is_self = idx == np.arange(n)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)[:, :k]
    sims = np.take_along_axis(sims, order, axis=1)[:, :k]
    return sims.astype(np.float32), idx.astype(np.int32)


def affinity_matrix(sims, idx, n: int, *, gamma: float = 3.0, mutual: bool = True) -> sp.csr_matrix:
    """Symmetric sparse affinity from neighbour lists (host side, scipy).

    A_ij = max(s_ij, 0)^gamma on kNN pairs; ``mutual`` keeps a pair only if each is
    among the other's k nearest neighbours, otherwise the union is kept (max).
    """
    sims = np.asarray(sims, dtype=np.float32)
    idx = np.asarray(idx)
    rows = np.repeat(np.arange(sims.shape[0]), sims.shape[1])
    vals = np.maximum(sims.ravel(), 0.0) ** np.float32(gamma)
    a = sp.csr_matrix((vals, (rows, idx.ravel())), shape=(n, n))
    a.sum_duplicates()
    at = a.T.tocsr()
    a = a.minimum(at) if mutual else a.maximum(at)
    a.setdiag(0)
    a.eliminate_zeros()
    return a.tocsr()


def knn_graph(X, k: int = 50, *, gamma: float = 3.0, mutual: bool = True, method: str = "exact",
              max_degree: int | None = None, seed: int = 0, show_progress: bool | None = None) -> Graph:
    """kNN affinity graph over the rows of X (not normalised; see `normalize`).

    A_ij = max(<x_i, x_j>, 0)^gamma if j in NN_k(i) [and i in NN_k(j) when mutual],
    made symmetric. Self-loops are excluded.

    Args:
      X: float[n, d] descriptors (usually L2-normalised).
      k: neighbours per node, 1 <= k < n.
      gamma: similarity exponent (> 0).
      mutual: keep reciprocal pairs only (Iscen et al. 2017); else the union.
      method: "exact" (blocked matmul + top_k, jitted) or "nndescent" (pynndescent,
        approximate, for large n).
      max_degree: pad the neighbour lists to this width (default: the largest row).

    Returns:
      A `Graph` of n nodes. Nodes may be isolated when ``mutual`` is set.
    """
    X = _checks.as_matrix(X, "X")
    n = X.shape[0]
    _checks.check_k(k, n - 1, what="other items (k must be < n)")
    gamma = _checks.check_gamma(gamma)
    if method == "exact":
        sims, idx = knn(X, X, k, exclude_self=True, show_progress=show_progress)
    elif method == "nndescent":
        sims, idx = _nndescent_knn(X, k, seed=seed)
    else:
        raise ValueError(f"method must be 'exact' or 'nndescent', got {method!r}")
    a = affinity_matrix(sims, idx, n, gamma=gamma, mutual=mutual)
    return Graph.from_scipy(a, max_degree=max_degree)


@jax.jit
def normalize(graph: Graph) -> Graph:
    """Symmetric normalisation W = D^-1/2 A D^-1/2 with D = diag(A 1).

    An isolated node (degree 0) keeps an all-zero row instead of a NaN; its
    diffusion score is then its own query mass. The spectrum of W lies in [-1, 1].
    """
    deg = graph.degree()
    inv_sqrt = jnp.where(deg > 0, jax.lax.rsqrt(jnp.where(deg > 0, deg, 1.0)), 0.0)
    w = graph.weights * inv_sqrt[:, None] * inv_sqrt[graph.indices]
    return Graph(indices=graph.indices, weights=w.astype(graph.weights.dtype))


def isolated_nodes(graph: Graph) -> np.ndarray:
    """Indices of nodes with no edge (degree 0)."""
    return np.flatnonzero(np.asarray(graph.degree()) == 0)


def connected_components(graph: Graph) -> np.ndarray:
    """Component label of every node, int32[n] in [0, number of components).

    Host-side (``scipy.sparse.csgraph``), for offline planning: an exact solve or an
    eigendecomposition splits into one independent block per component. Edges are
    taken as undirected; an isolated node is a component of its own.
    """
    from scipy.sparse.csgraph import connected_components as _cc

    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    _, labels = _cc(graph.to_scipy(), directed=False)
    return labels.astype(np.int32)
