"""Nearest-neighbour search and kNN affinity graphs.

The affinity of Iscen et al., "Efficient Diffusion on Region Manifolds" (CVPR 2017):
A_ij = max(<x_i, x_j>, 0)^gamma for j among the k nearest neighbours of i, kept
only for reciprocal (mutual) pairs, and W = D^-1/2 A D^-1/2 (Zhou et al., NIPS 2003).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .._precision import HIGHEST as _HIGHEST
from .. import _checks
from .._progress import progress
from .affinity import affinity_graph, union_capacity
from .core import AffinityGraph, Graph, NormalizedGraph
from .order import LOCALITY_MIN_NODES, with_locality



def knn_traced(queries, database, k: int, *, exclude_self: bool = False, block_size: int = 256):
    """`knn` as a pure function of arrays, for use inside ``jax.jit``, ``vmap`` and ``grad``.

    The same blocked matmul + ``lax.top_k`` as `knn`, in one traced program (the query
    axis padded to a multiple of the block). The returned similarities are
    differentiable with respect to both inputs (the neighbour ids are piecewise
    constant). Only shapes are checked here: values are the caller's.
    """
    nq, d = queries.shape
    n = database.shape[0]
    if database.ndim != 2 or database.shape[1] != d:
        raise ValueError(f"queries [nq, d] and database [n, d] must share d, got {queries.shape} and {database.shape}")
    limit = n - 1 if exclude_self else n
    if not _checks.is_int(k) or not 1 <= k <= limit:
        raise ValueError(f"k must be an int in [1, {limit}], got {k!r}")
    block = int(min(_checks.check_positive_int(block_size, "block_size"), nq))
    pad = -nq % block
    q = jnp.concatenate([queries, jnp.zeros((pad, d), queries.dtype)]) if pad else queries
    dtype = jnp.result_type(queries.dtype, database.dtype, jnp.float32)
    q = q.astype(dtype)
    vals, idx = _knn_blocks(q, database.astype(dtype), jnp.int32(0), k=int(k), block=block,
                            exclude_self=exclude_self)
    return vals[:nq], idx[:nq]


def _knn_blocks(queries, database, offset, *, k: int, block: int, exclude_self: bool):
    """Top-k inner products of queries [c, d] (c a multiple of ``block``), block by block.

    offset: int32 scalar, the global index of the first query (to mask self-matches).
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


_knn_chunk = jax.jit(_knn_blocks, static_argnames=("k", "block", "exclude_self"))


def knn(queries, database, k: int, *, exclude_self: bool = False, method: str = "auto",
        block_size: int = 256, chunk_size: int = 8192, show_progress: bool | None = None):
    """Exact k nearest neighbours by inner product.

    sims[q, j] = <queries[q], database[idx[q, j]]>, sorted in decreasing order.

    Two exact searches, chosen by ``method`` (`search_route` tells what "auto" runs):

    * "exact", the JAX search: the similarity matrix is never materialised; queries
      are processed in jitted chunks of ``chunk_size`` rows (one compiled shape; the
      last chunk is padded), each split into blocks of ``block_size`` rows whose
      [block, n] similarities are reduced by ``lax.top_k``. Peak memory is
      O(block_size * n + n * d), so n = 100,000 at d = 2048 fits in about 1 GB. Called
      on traced arrays (inside ``jax.jit`` / ``vmap`` / ``grad``) it runs as
      `knn_traced`, in one program;
    * "faiss": faiss ``IndexFlatIP`` on the host (`faiss_backend.faiss_knn`), the same
      neighbours up to the order of tied similarities and float32 rounding.

    "auto" (the default) is "faiss" on the CPU backend when faiss is importable and the
    inputs are concrete, else "exact" (accelerators, traced inputs, no faiss).

    Args:
      queries: float[nq, d].
      database: float[n, d].
      k: neighbours per query, 1 <= k <= n (k <= n - 1 with ``exclude_self``).
      exclude_self: queries are the database itself (row q is item q); item q is
        never returned as its own neighbour.
      method: "auto", "exact" or "faiss".
      block_size: rows per top-k block of the JAX search (positive int).
      chunk_size: rows per compiled chunk of the JAX search (positive int).

    Returns:
      (similarities float32[nq, k], indices int32[nq, k]) as JAX arrays.
    """
    if method not in ("auto", "exact", "faiss"):
        raise ValueError(f"knn's method must be 'auto', 'exact' or 'faiss', got {method!r}")
    if _checks.is_traced(queries, database):
        if method == "faiss":
            raise ValueError("method='faiss' searches on the host; under jax.jit, vmap or grad "
                             "only method='exact' applies")
        return knn_traced(jnp.asarray(queries), jnp.asarray(database), k, exclude_self=exclude_self,
                          block_size=block_size)
    block_size = _checks.check_positive_int(block_size, "block_size")
    chunk_size = _checks.check_positive_int(chunk_size, "chunk_size")
    q, db, k = _checks.check_knn_args(queries, database, k, exclude_self)
    if search_route(method, database) == "faiss":
        from .faiss_backend import faiss_knn
        sims, idx = faiss_knn(q, db, k, exclude_self=exclude_self, show_progress=show_progress)
        return jnp.asarray(sims), jnp.asarray(idx)
    return _jax_knn(q, db, k, exclude_self, block_size, chunk_size, show_progress)


def _jax_knn(q: np.ndarray, db: np.ndarray, k: int, exclude_self: bool, block_size: int, chunk_size: int,
             show_progress):
    """The chunked JAX search of checked host inputs (see `knn`)."""
    nq = q.shape[0]
    block = int(min(block_size, nq))
    chunk = int(min(chunk_size, -(-nq // block) * block))
    chunk = -(-chunk // block) * block
    db_j = jnp.asarray(db)
    out_s, out_i = [], []
    starts = range(0, nq, chunk)
    for start in progress(starts, desc="knn (jax exact search)", total=len(starts), enable=show_progress,
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


def nndescent_width(k: int) -> int:
    """Neighbours per list while NN-descent searches, for k kept: k + 20, at most 2k (at
    least k + 1, the node itself being one). Wider lists find more true neighbours: at
    n = 1,000,000 (d = 64, k = 20) the graph keeps 0.993 of the exact mutual graph's
    edges (``experiments/bench_million.py``), where lists of k + 1 had kept fewer."""
    return max(k + 1, min(2 * k, k + 20))


def nndescent_knn(X, k: int, *, seed: int = 0, chunk_size: int = 65536):
    """Approximate k nearest neighbours of every row of X among the other rows (NN-descent).

    The self-search of `knn` (``exclude_self=True``) done approximately: pynndescent's
    NN-descent (Dong, Moses & Li, "Efficient k-nearest neighbor graph construction for
    generic similarity measures", WWW 2011) refines lists of `nndescent_width` (k)
    neighbours from random-projection-tree seeds by exploring neighbours of
    neighbours; the node itself is dropped and the best k kept. O(n k) memory, about
    O(n^1.14) time empirically, nothing [n, n] formed.

    pynndescent's "dot" metric searches on L2-normalised rows (cosine); the returned
    similarities are the inner products <x_i, x_j> of the rows as given, recomputed
    on the host (``chunk_size`` rows at a time), and each list is sorted by them. On
    L2-normalised rows (the descriptors of this library) the order is that of
    cosine. A row whose list NN-descent could not fill (rare: fewer reachable rows
    than slots) holds -1 with similarity -inf in its last slots.

    Args:
      X: float[n, d] descriptors (concrete; n >= 2).
      k: neighbours per row, 1 <= k <= n - 1.
      seed: the random state of the search (trees and initial lists).
      chunk_size: rows per chunk of the similarity recomputation (positive int).

    Returns:
      (sims float32[n, k], idx int32[n, k]) numpy arrays in decreasing similarity; row i
      never lists i.

    Raises:
      ValueError: X not a finite [n, d] matrix, or k outside [1, n - 1].
      ImportError: pynndescent is not installed.
    """
    X = _checks.as_matrix(X, "X")
    n = X.shape[0]
    k = _checks.check_k(k, n - 1, what="other items (k must be < n)")
    chunk_size = _checks.check_positive_int(chunk_size, "chunk_size")
    try:
        import pynndescent
    except ImportError as exc:  # pragma: no cover
        raise ImportError("method='nndescent' needs pynndescent: pip install pynndescent") from exc
    index = pynndescent.NNDescent(X, metric="dot", n_neighbors=min(nndescent_width(k), n),
                                  random_state=seed, low_memory=True)
    idx, _ = index.neighbor_graph
    idx = np.asarray(idx)
    # drop self, keep k per row (a row may lack itself when the search is approximate)
    drop = (idx == np.arange(n)[:, None]) | (idx < 0)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int32)
    missing = np.take_along_axis(drop, order, axis=1)
    idx[missing] = -1
    sims = np.empty((n, k), np.float32)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        part = np.einsum("id,ikd->ik", X[rows], X[np.maximum(idx[rows], 0)], dtype=np.float32)
        sims[rows] = np.where(missing[rows], -np.inf, part)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def affinity_matrix(sims, idx, n: int, *, gamma: float = 3.0, mutual: bool = True) -> sp.csr_matrix:
    """Symmetric sparse affinity from neighbour lists (host side, scipy).

    A_ij = max(s_ij, 0)^gamma on kNN pairs; ``mutual`` keeps a pair only if each is
    among the other's k nearest neighbours, otherwise the union is kept (max).

    Raises:
      ValueError: sims and idx not both [n, k], NaN / inf similarities, or ids outside [0, n).
      TypeError: non-integer ids.
    """
    n = _checks.check_positive_int(n, "n")
    gamma = _checks.check_gamma(gamma)
    sims, idx = np.asarray(sims), np.asarray(idx)
    if sims.ndim != 2 or idx.shape != sims.shape or sims.shape[0] != n:
        raise ValueError(f"sims and idx must both be [n, k] with n = {n}, got shapes {sims.shape} and {idx.shape}")
    if np.iscomplexobj(sims) or not np.isfinite(sims.astype(np.float64)).all():
        raise ValueError("sims must be real and finite (no NaN or inf): the affinity would hold NaN")
    _checks.check_node_ids(idx, n, "idx")
    sims = sims.astype(np.float32)
    rows = np.repeat(np.arange(sims.shape[0]), sims.shape[1])
    vals = np.maximum(sims.ravel(), 0.0) ** np.float32(gamma)
    a = sp.csr_matrix((vals, (rows, idx.ravel())), shape=(n, n))
    a.sum_duplicates()
    at = a.T.tocsr()
    a = a.minimum(at) if mutual else a.maximum(at)
    a.setdiag(0)
    a.eliminate_zeros()
    return a.tocsr()


# the neighbour searches of knn_graph: "auto" resolves to one of the others (`search_route`)
SEARCH_METHODS = ("auto", "exact", "nndescent", "faiss")

_log = logging.getLogger(__name__)


def search_route(method: str = "auto", X=None) -> str:
    """The neighbour search `knn_graph` (and `knn`) runs for ``method`` on descriptors ``X``.

    "auto" resolves to "faiss" (faiss ``IndexFlatIP``, exact, on the host's cores) when
    the JAX backend is the CPU, faiss is importable (``pip install faiss-cpu``) and ``X``
    is concrete; to "exact" (the JAX blocked matmul + top-k) on an accelerator, under
    ``jax.jit`` / ``vmap`` / ``grad`` (``X`` traced) and without faiss. Both are exact
    searches: the same neighbours up to the order of tied similarities. "nndescent"
    (approximate) runs only when asked for. Any other method is returned as given.

    Args:
      method: one of `SEARCH_METHODS`.
      X: the descriptors (or None: the route for concrete host arrays).

    Returns:
      "exact", "nndescent" or "faiss".
    """
    if method not in SEARCH_METHODS:
        raise ValueError(f"method must be one of {SEARCH_METHODS}, got {method!r}")
    if method != "auto":
        return method
    if X is not None and _checks.is_traced(X):
        return "exact"
    if jax.default_backend() != "cpu":
        return "exact"
    if isinstance(X, jax.Array) and any(dev.platform != "cpu" for dev in X.devices()):
        return "exact"
    from .faiss_backend import faiss_available
    return "faiss" if faiss_available() else "exact"


def knn_graph(X, k: int = 50, *, gamma: float = 3.0, mutual: bool = True, method: str = "auto",
              max_degree: int | None = None, seed: int = 0, show_progress: bool | None = None) -> AffinityGraph:
    """kNN affinity graph over the rows of X (not normalised; see `normalize`): an `AffinityGraph`,
    which the diffusion solvers refuse in place of W = normalize(A).

    A_ij = max(<x_i, x_j>, 0)^gamma if j in NN_k(i) [and i in NN_k(j) when mutual],
    made symmetric (min over the two directions when mutual, max for the union). Self-loops
    are excluded. Iscen et al., CVPR 2017, Sec. 3.1.

    One function, two routes:

    * on concrete arrays, the neighbour search runs where it is fastest (``method``,
      "auto" by default: see `search_route`), the affinity is built on the host
      (`affinity_lists`: sparse transposes, O(n k), small next to the search) and the
      graph is cut to the widest row;
    * on traced arrays (inside ``jax.jit``, ``vmap`` or ``grad``), the exact search runs
      in the trace (`knn_traced`) with fixed widths: k for a mutual graph, ``max_degree``
      (default 2 k) for the union, whose lost edges are counted in ``Graph.overflow``.

    The route taken is logged (logger ``retrieval_jax.graph.neighbours``, level INFO)
    and names the progress bar of the search. Under a trace, or with a traced gamma,
    the affinity is `affinity_graph`, on device: gamma may be traced (``vmap`` over gamma
    compiles one program) and the weights are differentiable with respect to X and gamma.
    Both give the same lists, in the same order (the traced ones padded to a fixed width).

    Args:
      X: float[n, d] descriptors (usually L2-normalised).
      k: neighbours per node, 1 <= k < n.
      gamma: similarity exponent (> 0).
      mutual: keep reciprocal pairs only (Iscen et al. 2017); else the union.
      method: "auto" (`search_route`: faiss on a CPU host when installed, else the JAX
        search), "exact" (the JAX blocked matmul + top_k, `knn`), "faiss" (faiss-cpu
        exact inner-product search, `faiss_backend.faiss_knn`) or "nndescent"
        (`nndescent_knn`: pynndescent, approximate; it searches with lists of
        `nndescent_width` (k) and keeps the best k). Under a trace "auto" is "exact" and only these two apply.
      max_degree: pad the neighbour lists to this width (default: the widest row); the
        capacity of a union graph built under a trace.

    Returns:
      A `Graph` of n nodes. Nodes may be isolated when ``mutual`` is set.

    Raises:
      ValueError: bad sizes or values, or (concrete route) a ``max_degree`` smaller than
        the widest row.
    """
    route = search_route(method, X)
    mutual = _checks.check_bool(mutual, "mutual")
    gamma = _checks.check_gamma(gamma)
    if max_degree is not None:
        max_degree = _checks.check_positive_int(max_degree, "max_degree")
    if _checks.is_traced(X):
        graph = _traced_knn_graph(X, k, gamma, mutual, route, max_degree)
        return AffinityGraph(indices=graph.indices, weights=graph.weights, overflow=graph.overflow)
    X = _checks.as_matrix(X, "X")
    n = X.shape[0]
    _checks.check_k(k, n - 1, what="other items (k must be < n)")
    _log.info("knn_graph: %d items, k = %d, %s neighbour search (method=%r)", n, k, route, method)
    if route == "exact":
        sims, idx = _jax_knn(X, X, k, True, 256, 8192, show_progress)
    elif route == "nndescent":
        sims, idx = nndescent_knn(X, k, seed=seed)
        if (idx < 0).any():
            raise ValueError(f"NN-descent left {int((idx < 0).sum())} neighbour slots empty; "
                             "use a smaller k or an exact search (method='exact' or 'faiss')")
    else:
        from .faiss_backend import faiss_knn
        sims, idx = faiss_knn(X, X, k, exclude_self=True, show_progress=show_progress)
    idx_np = np.asarray(idx)
    if not _checks.is_traced(gamma):   # on the host: the search's lists are there already
        ids, weights = affinity_lists(np.asarray(sims), idx_np, gamma, mutual=mutual)
        graph = Graph(indices=jnp.asarray(ids), weights=jnp.asarray(weights))
    elif mutual:
        graph = affinity_graph(jnp.asarray(sims), jnp.asarray(idx_np), gamma, mutual=True)
        # cut to the widest row: kept edges first, in each row's neighbour order (a slot
        # without a reciprocal partner holds the node's own id, never a kNN neighbour)
        kept = np.asarray(graph.indices) != np.arange(n)[:, None]
        order = np.argsort(~kept, axis=1, kind="stable")
        width = max(int(kept.sum(axis=1).max(initial=0)), 1)
        graph = _take_slots(graph, order[:, :width])
    else:
        graph = affinity_graph(jnp.asarray(sims), jnp.asarray(idx_np), gamma, mutual=False,
                               capacity=union_capacity(idx_np))
    if max_degree is not None:
        if max_degree < graph.max_degree:
            raise ValueError(f"max_degree = {max_degree} is smaller than the largest row "
                             f"({graph.max_degree} neighbours)")
        graph = _pad_slots(graph, max_degree)
    # checked here, on the host: a concrete graph carries no overflow count
    graph.check_overflow()
    return AffinityGraph(indices=graph.indices, weights=graph.weights)


def affinity_lists(sims, idx, gamma: float = 3.0, *, mutual: bool = True):
    """`affinity_graph`'s padded neighbour lists of concrete kNN lists, built on the host.

    a_ij = max(s_ij, 0)^gamma on the directed edges i -> j = idx[i, m]; a mutual graph
    keeps the reciprocal pairs with weight min(a_ij, a_ji), the union every pair with
    max(a_ij, a_ji) (Iscen et al., CVPR 2017, Sec. 3.1). The reverse edges are found by
    two sparse transposes of the [n, n] pattern of the lists (counting sorts) and an
    intersection of sorted rows (scipy): O(n k) time and memory, no sort of the n k edges.

    The layout is `affinity_graph`'s, cut to the widest row: a mutual row holds its
    reciprocal neighbours in the row's neighbour order; a union row its own k neighbours,
    then the nodes that list it without being listed, in increasing id order. Padding
    slots hold the node's own id and weight 0.

    Args:
      sims: float[n, k] similarities of node i to ``idx[i]``.
      idx: int[n, k] neighbour ids in [0, n), distinct within a row, never i itself.
      gamma: similarity exponent (> 0, concrete).
      mutual: reciprocal pairs only; else the union.

    Returns:
      (ids int32[n, K], weights float32[n, K]), K = the widest row (at least 1).
    """
    gamma = _checks.check_gamma(gamma)
    sims = np.asarray(sims, np.float32)
    idx = np.asarray(idx)
    if sims.ndim != 2 or idx.shape != sims.shape:
        raise ValueError(f"sims and idx must be [n, k] arrays of one shape, got {sims.shape} and {idx.shape}")
    n, k = idx.shape
    edges = n * k
    dtype = np.int32 if edges < np.iinfo(np.int32).max else np.int64
    # 1 + the flat position of edge i -> j at (i, j); transposed: 1 + that of j -> i at (i, j)
    forward = sp.csr_matrix((np.arange(1, edges + 1, dtype=dtype), np.array(idx.reshape(-1), dtype=dtype),
                             np.arange(0, edges + 1, k, dtype=dtype)), shape=(n, n))
    backward = forward.T.tocsr()       # rows sorted by the transpose
    forward = backward.T.tocsr()

    def pattern(m):                    # the same structure, weight 1 (int8: products keep the ids)
        return sp.csr_matrix((np.ones(m.nnz, np.int8), m.indices, m.indptr), shape=m.shape)

    edge = forward.multiply(pattern(backward)).data - 1      # reciprocal edges i -> j ...
    partner = backward.multiply(pattern(forward)).data - 1   # ... and their j -> i, same order
    a = np.power(np.maximum(sims.reshape(-1), np.float32(0)), np.float32(gamma), dtype=np.float32)
    has = np.zeros(edges, bool)
    has[edge] = True
    a_rev = np.zeros(edges, np.float32)                       # 0 for a one-way edge
    a_rev[edge] = a[partner]
    own = np.arange(n, dtype=np.int32)
    if mutual:
        counts = has.reshape(n, k).sum(axis=1)
        kept = np.flatnonzero(has)                            # row by row, in neighbour order
        rows = kept // k
        slots = np.arange(kept.size) - (np.cumsum(counts) - counts)[rows]
        width = max(int(counts.max(initial=0)), 1)
        ids = np.repeat(own, width).reshape(n, width)
        weights = np.zeros((n, width), np.float32)
        ids[rows, slots] = idx.reshape(-1)[kept]
        weights[rows, slots] = np.minimum(a, a_rev)[kept]
        return ids, weights
    # the union: row i's own k edges, then the one-way edges j -> i (j ascending: the
    # transpose's row order)
    src = backward.data - 1
    extra = ~has[src]
    rows = np.repeat(own, np.diff(backward.indptr))[extra]
    counts = np.bincount(rows, minlength=n)
    slots = k + np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]
    width = k + int(counts.max(initial=0))
    ids = np.repeat(own, width).reshape(n, width)
    weights = np.zeros((n, width), np.float32)
    ids[:, :k] = idx
    weights[:, :k] = np.maximum(a, a_rev).reshape(n, k)
    ids[rows, slots] = backward.indices[extra]
    weights[rows, slots] = a[src[extra]]
    return ids, weights


def _traced_knn_graph(X, k, gamma, mutual, method, max_degree):
    if method != "exact":
        raise ValueError(f"method={method!r} searches on the host; under jax.jit, vmap or grad "
                         "only method='exact' applies")
    X = jnp.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array [n, d], got shape {X.shape}")
    n = X.shape[0]
    if not _checks.is_int(k) or not 1 <= k < n:
        raise ValueError(f"k must be an int with 1 <= k < n = {n}, got {k!r}")
    sims, idx = knn_traced(X, X, int(k), exclude_self=True)
    if mutual:
        graph = affinity_graph(sims, idx, gamma, mutual=True)
        return graph if max_degree is None else _pad_slots(graph, max_degree)
    return affinity_graph(sims, idx, gamma, mutual=False, capacity=max_degree or 2 * int(k))


def _take_slots(graph: Graph, order: np.ndarray) -> Graph:
    order = jnp.asarray(order)
    return Graph(indices=jnp.take_along_axis(graph.indices, order, axis=1),
                 weights=jnp.take_along_axis(graph.weights, order, axis=1), overflow=graph.overflow)


def _pad_slots(graph: Graph, width: int) -> Graph:
    extra = width - graph.max_degree
    if extra < 0:
        raise ValueError(f"max_degree = {width} is smaller than the graph's {graph.max_degree} slots")
    if extra == 0:
        return graph
    n = graph.num_nodes
    own = jnp.broadcast_to(jnp.arange(n, dtype=graph.indices.dtype)[:, None], (n, extra))
    return Graph(indices=jnp.concatenate([graph.indices, own], 1),
                 weights=jnp.concatenate([graph.weights, jnp.zeros((n, extra), graph.weights.dtype)], 1),
                 overflow=graph.overflow)


def normalize(graph: Graph, *, locality: bool | None = None) -> NormalizedGraph:
    """Symmetric normalisation W = D^-1/2 A D^-1/2 with D = diag(A 1) (Zhou et al., NIPS 2003).

    An isolated node (degree 0) keeps an all-zero row instead of a NaN; its
    diffusion score is then its own query mass. The spectrum of W lies in [-1, 1].
    The result's type, `NormalizedGraph`, records that W is normalised. Jittable and
    differentiable with respect to the weights; a concrete graph is checked first
    (finite, non-negative weights, A = A^T: `check_symmetric`). A concrete graph of
    `LOCALITY_MIN_NODES` nodes or more also gets its `LocalityLayout` (host, once:
    `with_locality`), in which the CG solvers then run; under a trace nothing is added.
    ``locality``: True / False to attach the layout to a concrete graph of any size /
    never (None: by the threshold).
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"normalize takes a retrieval_jax.graph.Graph (e.g. from knn_graph or "
                        f"Graph.from_scipy), got {type(graph).__name__}")
    if _checks.is_traced(graph.indices, graph.weights):
        return _normalize(graph)
    w = np.asarray(graph.weights)
    if not np.isfinite(w).all():
        raise ValueError("the graph has NaN or inf weights; rebuild it from finite descriptors")
    if (w < 0).any():
        raise ValueError("the graph has negative weights; an affinity must be non-negative")
    check_symmetric(graph.check_overflow())   # a graph that lost edges is also asymmetric: say why
    out = _normalize(graph)
    if locality is None:
        locality = graph.num_nodes >= LOCALITY_MIN_NODES
    locality = _checks.check_bool(locality, "locality")
    return with_locality(out) if locality else out


def check_symmetric(graph: Graph, *, rtol: float = 1e-5):
    """Raise ValueError unless the graph's matrix equals its transpose (host side, O(nnz)):
    max |A - A^T| <= rtol max |A|. Returns the scipy CSR matrix (for the caller to reuse).

    Diffusion and spectral ranking need an undirected graph: on a directed one, D^-1/2 A
    D^-1/2 is not symmetric, I - alpha W is not positive definite and CG returns NaN or
    a plausible but wrong ranking."""
    mat = graph.to_scipy()
    if mat.nnz:
        diff = abs(mat - mat.T)
        worst = diff.max() if diff.nnz else 0.0
        scale = abs(mat).max()
        if worst > rtol * scale:
            raise ValueError(
                f"the graph is not symmetric (max |A - A^T| = {worst:.3g} for max |A| = {scale:.3g}); diffusion "
                "and spectral ranking need an undirected graph: build it with knn_graph (mutual or union "
                "neighbours) or symmetrise it, (A + A^T) / 2")
    return mat


@jax.jit
def _normalize(graph: Graph) -> NormalizedGraph:
    deg = graph.degree()
    inv_sqrt = jnp.where(deg > 0, jax.lax.rsqrt(jnp.where(deg > 0, deg, 1.0)), 0.0)
    w = graph.weights * inv_sqrt[:, None] * inv_sqrt[graph.indices]
    return NormalizedGraph(indices=graph.indices, weights=w.astype(graph.weights.dtype), overflow=graph.overflow)


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
