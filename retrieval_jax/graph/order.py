"""Node orders for memory locality, and graphs renumbered by them.

A product W X with X [n, B] (many queries at once) gathers, for every node i, the
rows X[j] of its neighbours. When the database order is arbitrary, neighbouring rows
lie anywhere in memory and nearly every gathered row comes from RAM; when similar
items are numbered close together, consecutive nodes share most neighbours and the
rows are re-read from cache. The product costs O(n k B) in any order; the order
decides how much of it is served from cache (measured by ``experiments/bench_converged.py``:
docs/benchmarks/bench_converged.md). The solution of the
renumbered system is the same vector, renumbered: x = P^T solve(P W P^T, P y).
"""
from __future__ import annotations

from collections import deque

import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .. import _checks
from .aggregation import coarsen, without_diagonal
from .core import Graph


ORDER_METHODS = ("aggregation", "blocks")


def locality_order(graph: Graph, *, method: str = "aggregation", block_size: int = 1024,
                   coarsest: int = 64) -> np.ndarray:
    """A node order that numbers graph neighbours close together (host, concrete graph).

    ``method="aggregation"`` (default): nested aggregates, each numbered contiguously.
    Standard aggregation (`graph.aggregation.coarsen`) groups the nodes, then the
    groups, ... until at most ``coarsest`` remain or a pass stops shrinking the graph;
    the nodes are sorted by their top-level aggregate, then by the aggregate one level
    down, ... then by themselves, each level ranked in breadth-first order over that
    level's graph (restarting at the lowest unranked id), so that sibling aggregates
    that share edges sit side by side. Aggregates never cross connected components,
    so every component is one run of the order. Host cost O(nnz) per level.

    ``method="blocks"``: blocks of ``block_size`` nodes grown breadth-first from the
    lowest-numbered node not yet placed (its neighbours, theirs, ... in edge order);
    each block is one run of the order (one breadth-first pass, O(nnz)).

    What the order saves in W @ X and in converged CG at 100,000 and 1,000,000 nodes:
    docs/benchmarks/bench_converged.md and docs/benchmarks/bench_million.md.

    Args:
      graph: a `Graph` (its non-zero edges are followed).
      method: "aggregation" or "blocks".
      block_size: nodes per breadth-first block (``method="blocks"``).
      coarsest: aggregates at the top level (``method="aggregation"``).

    Returns:
      int64[n] ``order``: the node placed at position p is ``order[p]`` (a permutation).
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    if _checks.is_traced(graph.indices, graph.weights):
        raise TypeError("locality_order runs on the host: call it on a concrete graph, outside jax.jit")
    if method not in ORDER_METHODS:
        raise ValueError(f"method must be one of {ORDER_METHODS}, got {method!r}")
    size = _checks.check_positive_int(block_size, "block_size")
    top = _checks.check_positive_int(coarsest, "coarsest")
    if method == "blocks":
        return _block_order(graph, size)
    return _aggregation_order(graph, top)


def _breadth_first_rank(adjacency: sp.csr_matrix) -> np.ndarray:
    """int64[n]: each node's position in a breadth-first order over ``adjacency``
    (neighbours in CSR order), restarted at the lowest-numbered node not yet reached."""
    n = adjacency.shape[0]
    indptr, indices = adjacency.indptr.tolist(), adjacency.indices.tolist()
    rank = [-1] * n
    r = 0
    for start in range(n):
        if rank[start] >= 0:
            continue
        rank[start] = r
        r += 1
        queue = deque([start])
        while queue:
            u = queue.popleft()
            for v in indices[indptr[u]:indptr[u + 1]]:
                if rank[v] < 0:
                    rank[v] = r
                    r += 1
                    queue.append(v)
    return np.asarray(rank, np.int64)


def _aggregation_order(graph: Graph, coarsest: int) -> np.ndarray:
    level = without_diagonal(graph.to_scipy())
    n = level.shape[0]
    ids = np.arange(n)
    keys = []   # finest first: np.lexsort sorts by the last key first
    while True:
        keys.append(_breadth_first_rank(level)[ids])
        if level.shape[0] <= coarsest:
            break
        sub, coarse = coarsen(level)
        if coarse.shape[0] >= level.shape[0]:
            break
        ids, level = sub[ids], coarse
    return np.lexsort(keys).astype(np.int64)


def _block_order(graph: Graph, size: int) -> np.ndarray:
    idx, w = np.asarray(graph.indices), np.asarray(graph.weights)
    n = idx.shape[0]
    neighbours = [row[(ww != 0) & (row != i)].tolist() for i, (row, ww) in enumerate(zip(idx, w))]
    placed = np.zeros(n, bool)
    order = []
    for start in range(n):
        if placed[start]:
            continue
        queue, seen, count = deque([start]), {start}, 0
        while queue and count < size:
            u = queue.popleft()
            if placed[u]:
                continue
            placed[u] = True
            order.append(u)
            count += 1
            for v in neighbours[u]:
                if not placed[v] and v not in seen:
                    seen.add(v)
                    queue.append(v)
    return np.asarray(order, np.int64)


def permute_graph(graph: Graph, order) -> Graph:
    """The graph renumbered by ``order``: node ``order[p]`` becomes node p.

    W'[p, q] = W[order[p], order[q]], i.e. W' = P W P^T with P the permutation matrix
    of ``order``; vectors follow as y' = y[..., order] and x = x'[..., inverse], with
    ``inverse = np.argsort(order)``. The graph's type (e.g. `NormalizedGraph`) is kept:
    renumbering changes neither symmetry nor normalisation.

    Args:
      graph: a concrete `Graph` on n nodes.
      order: int[n], a permutation of 0..n-1.

    Returns:
      A graph of the same type, rows in the new order, neighbour ids renumbered.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    n = graph.num_nodes
    order = np.asarray(order)
    _checks.check_node_ids(order, n, "order")
    if order.shape != (n,) or np.bincount(order, minlength=n).max(initial=0) != 1:
        raise ValueError(f"order must be a permutation of the graph's {n} nodes (each id once), "
                         f"got shape {order.shape}")
    inverse = np.argsort(order)
    indices = inverse[np.asarray(graph.indices)[order]].astype(np.int32)
    return type(graph)(indices=jnp.asarray(indices), weights=jnp.asarray(np.asarray(graph.weights)[order]),
                       overflow=graph.overflow)
