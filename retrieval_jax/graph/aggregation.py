"""Aggregation of a graph's nodes into small connected groups, level after level (host).

One pass of standard aggregation (Vanek, Mandel & Brezina, 1996) groups every node
with neighbours of its own; the aggregated graph S^T A S (S the 0/1 membership
matrix, its diagonal dropped) can be aggregated again. Used by the two-level CG's
coarse space (`diffusion.preconditioned`) and by `locality_order` (nested aggregates
numbered contiguously). Aggregates never cross connected components.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def standard_aggregation(adjacency: sp.csr_matrix) -> np.ndarray:
    """Greedy standard aggregation of a symmetric non-negative graph: int64[n] aggregate ids.

    Vanek, Mandel & Brezina (1996), on all edges: (1) every node whose neighbours are
    all free starts an aggregate with them; (2) each remaining node joins the aggregate
    of its strongest aggregated neighbour; (3) what is left (no aggregated neighbour)
    forms aggregates of itself and its free neighbours. Isolated nodes are aggregates
    of their own.
    """
    a = sp.csr_matrix(adjacency)
    n = a.shape[0]
    indptr, indices, data = a.indptr, a.indices, a.data
    # phase 1 is sequential (a node's test depends on the aggregates made before it):
    # Python lists, whose element access is several times cheaper than numpy's per node
    ptr, nbrs = indptr.tolist(), indices.tolist()
    agg_l = [-1] * n
    count = 0
    for i in range(n):  # phase 1
        if agg_l[i] >= 0:
            continue
        row = nbrs[ptr[i]:ptr[i + 1]]
        if all(agg_l[j] < 0 for j in row):
            agg_l[i] = count
            for j in row:
                agg_l[j] = count
            count += 1
    agg = np.asarray(agg_l, np.int64)
    phase1 = agg.copy()
    # phase 2, all rows at once: each free node joins the aggregate of its strongest
    # neighbour from phase 1 (the first such edge in CSR order on ties, as np.argmax)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    edge = np.flatnonzero((phase1[rows] < 0) & (phase1[indices] >= 0))
    if edge.size:
        er, ew = rows[edge], data[edge]
        best = np.full(n, -np.inf)
        np.maximum.at(best, er, ew)
        top = edge[ew == best[er]]
        first_row, first = np.unique(rows[top], return_index=True)
        agg[first_row] = phase1[indices[top[first]]]
    left = np.flatnonzero(agg < 0).tolist()
    agg_l = agg.tolist()
    for i in left:  # phase 3
        if agg_l[i] >= 0:
            continue
        agg_l[i] = count
        for j in nbrs[ptr[i]:ptr[i + 1]]:
            if agg_l[j] < 0:
                agg_l[j] = count
        count += 1
    return np.asarray(agg_l, np.int64)


def without_diagonal(adjacency) -> sp.csr_matrix:
    """The graph as a float64 CSR matrix with its diagonal (self loops) removed."""
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    a = a - sp.diags(a.diagonal())
    a.eliminate_zeros()
    return a.tocsr()


def coarsen(adjacency: sp.csr_matrix) -> tuple[np.ndarray, sp.csr_matrix]:
    """One level: (int64[n] aggregate of each node, the aggregated graph S^T A S [m, m]
    without its diagonal). ``adjacency`` must have no diagonal (`without_diagonal`)."""
    sub = standard_aggregation(adjacency)
    n, m = adjacency.shape[0], int(sub.max()) + 1 if adjacency.shape[0] else 0
    s = sp.csr_matrix((np.ones(n), (np.arange(n), sub)), shape=(n, m))
    return sub, without_diagonal(s.T @ adjacency @ s)


def aggregate_nodes(adjacency, max_coarse: int = 2048, max_levels: int = 8) -> np.ndarray:
    """Aggregates of the nodes, at most ``max_coarse`` of them when the graph allows.

    Standard aggregation on the graph, then again on the aggregated graph S^T A S (S the
    0/1 membership matrix), until at most ``max_coarse`` aggregates remain, a pass no
    longer shrinks the graph, or ``max_levels`` passes. Components never merge.
    """
    level = without_diagonal(adjacency)
    agg = np.arange(level.shape[0])
    for _ in range(max_levels):
        if level.shape[0] <= max_coarse:
            break
        sub, coarse = coarsen(level)
        if coarse.shape[0] >= level.shape[0]:
            break
        agg = sub[agg]
        level = coarse
    return agg
