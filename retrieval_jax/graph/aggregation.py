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
    agg = np.full(n, -1, np.int64)
    count = 0
    for i in range(n):  # phase 1
        if agg[i] >= 0:
            continue
        nbr = indices[indptr[i]:indptr[i + 1]]
        if (agg[nbr] < 0).all():
            agg[i] = count
            agg[nbr] = count
            count += 1
    phase1 = agg.copy()
    for i in np.flatnonzero(agg < 0):  # phase 2: strongest neighbour from phase 1
        lo, hi = indptr[i], indptr[i + 1]
        nbr, w = indices[lo:hi], data[lo:hi]
        ok = phase1[nbr] >= 0
        if ok.any():
            agg[i] = phase1[nbr[ok][np.argmax(w[ok])]]
    for i in np.flatnonzero(agg < 0):  # phase 3
        if agg[i] >= 0:
            continue
        nbr = indices[indptr[i]:indptr[i + 1]]
        free = nbr[agg[nbr] < 0]
        agg[i] = count
        agg[free] = count
        count += 1
    return agg


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
