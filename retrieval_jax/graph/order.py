"""Node orders for memory locality, and graphs renumbered by them.

A product W X with X [n, B] (many queries at once) gathers, for every node i, the
rows X[j] of its neighbours. When the database order is arbitrary, neighbouring rows
lie anywhere in memory and nearly every gathered row comes from RAM; when similar
items are numbered close together, consecutive nodes share most neighbours and the
rows are re-read from cache. The product costs O(n k B) in any order; the order
decides how much of it is served from cache (measured by ``experiments/bench_converged.py``:
docs/benchmarks/bench_converged.md). The solution of the
renumbered system is the same vector, renumbered: x = P^T solve(P W P^T, P y).

`LocalityLayout` keeps that renumbering with a normalised graph, computed once on the
host: `normalize` attaches one to a concrete graph of `LOCALITY_MIN_NODES` nodes or
more (`with_locality` to any concrete `NormalizedGraph`), and the CG solvers of
`retrieval_jax.diffusion` then run in the layout and return the scores in the graph's
own node order, so a caller of `diffuse` never renumbers anything by hand.
"""
from __future__ import annotations

import dataclasses
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from .. import _checks
from .aggregation import coarsen, without_diagonal
from .core import Graph, NormalizedGraph


ORDER_METHODS = ("aggregation", "blocks")

UNPERMUTE_BLOCK = 512
"""Rows gathered and transposed at a time by `LocalityLayout.from_layout_transposed`
(a [512, B] float32 block is 0.45 MB at B = 224: in the L2 cache of the CPUs measured)."""

LOCALITY_MIN_NODES = 20_000
"""From this many nodes on, `normalize` attaches a `LocalityLayout` to a concrete graph.

The layout costs O(nnz) host work per aggregation level, once per graph; it saves a
share of every product W @ X [n, B] that grows with n, as X outgrows the caches. At
k = 50 and B = 200 the product in the layout was already faster at 10,000 nodes, about
three times faster from 25,000 on, and the order paid for itself within a few products
(``experiments/bench_converged.py`` measures both); below the threshold the one-off
host cost is not worth it for a few single-vector solves."""


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
    (neighbours in CSR order), restarted at the lowest-numbered node not yet reached.

    That order visits the connected components one after another, in the order of their
    lowest node id, each breadth-first from that node: isolated nodes are ranked at once,
    every other component by one ``scipy.sparse.csgraph.breadth_first_order`` (compiled;
    it follows each row's neighbours in CSR order, as the rule says)."""
    a = sp.csr_matrix(adjacency)
    n = a.shape[0]
    rank = np.empty(n, np.int64)
    if n == 0:
        return rank
    _, labels = csgraph.connected_components(a, directed=False)
    comps, first = np.unique(labels, return_index=True)   # first: each component's lowest id
    sizes = np.bincount(labels)[comps]
    order = np.argsort(first, kind="stable")
    r = 0
    for start, size in zip(first[order].tolist(), sizes[order].tolist()):
        if size == 1:
            rank[start] = r
        else:
            nodes = csgraph.breadth_first_order(a, start, directed=True, return_predecessors=False)
            rank[nodes] = np.arange(r, r + size)
        r += size
    return rank


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


# ----------------------------------------------------------------------------- layouts
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LocalityLayout:
    """A graph's nodes renumbered for locality (`locality_order`), kept with the graph.

    Attributes:
      order: int32[n], the node placed at position p is ``order[p]``.
      inverse: int32[n], the position of node i (``order[inverse] = arange(n)``).
      indices: int32[n, K], the graph's neighbour lists renumbered: row p lists the
        positions of the neighbours of node ``order[p]`` (`permute_graph`'s indices).

    The layout belongs to the graph's neighbour lists, not to its weights: the
    renumbered weights are gathered from the graph's own (``weights[order]``, O(n K)
    per use), so gradients flow to them and a graph whose weights were replaced
    (``dataclasses.replace(w, weights=...)``) keeps a valid layout. A graph with other
    neighbour lists needs a new layout (`with_locality`).
    """

    order: jax.Array
    inverse: jax.Array
    indices: jax.Array

    @property
    def num_nodes(self) -> int:
        return self.order.shape[0]

    def graph(self, graph: Graph) -> NormalizedGraph:
        """P W P^T: ``graph`` renumbered into the layout (jittable, differentiable in the weights)."""
        return NormalizedGraph(indices=self.indices, weights=graph.weights[self.order])

    def to_layout(self, x: jax.Array) -> jax.Array:
        """Node-first x [n, ...] in the layout's order: x[order]."""
        return x[self.order]

    def from_layout(self, x: jax.Array) -> jax.Array:
        """Node-first x [n, ...] back in the graph's order: x[inverse]."""
        return x[self.inverse]

    def from_layout_transposed(self, x: jax.Array) -> jax.Array:
        """Node-first x [n, B] back in the graph's order and transposed: x[inverse].T, [B, n].

        The scores of a batched solve are returned query-first. Written as one gather
        and one transpose, XLA on CPU assigns the gather a column-major output, so every
        gathered row is written with a stride of n; here blocks of `UNPERMUTE_BLOCK` rows
        are gathered and transposed one at a time (each in cache) and the [B, n / T, T]
        result is flattened by moving whole runs of T values: the same array, measured on
        docs/benchmarks/bench_defaults.md.
        """
        n = x.shape[0]
        if x.ndim != 2 or n < 4 * UNPERMUTE_BLOCK:
            return x[self.inverse].T
        blocks = -(-n // UNPERMUTE_BLOCK)
        ids = jnp.pad(self.inverse, (0, blocks * UNPERMUTE_BLOCK - n)).reshape(blocks, UNPERMUTE_BLOCK)
        out = jax.lax.map(lambda rows: x[rows].T, ids)               # [blocks, B, T]
        return out.transpose(1, 0, 2).reshape(x.shape[1], blocks * UNPERMUTE_BLOCK)[:, :n]

    def positions(self, ids: jax.Array) -> jax.Array:
        """The layout positions of node ids (any shape): inverse[ids]."""
        return self.inverse[ids]


def locality_layout(graph: Graph, *, method: str = "aggregation") -> LocalityLayout:
    """The `LocalityLayout` of a concrete graph (host: `locality_order`, then the
    renumbered neighbour lists; O(nnz) per aggregation level)."""
    order = locality_order(graph, method=method)
    return _layout(graph, order)


def _layout(graph: Graph, order: np.ndarray) -> LocalityLayout:
    inverse = np.argsort(order)
    indices = inverse[np.asarray(graph.indices)[order]]
    # cast on the host and transferred: jnp.asarray(int64 array, jnp.int32) compiles an eager
    # convert (and jnp.asarray a staging program) per shape
    return LocalityLayout(order=jax.device_put(np.asarray(order, np.int32)),
                          inverse=jax.device_put(np.asarray(inverse, np.int32)),
                          indices=jax.device_put(np.asarray(indices, np.int32)))


def with_locality(graph: NormalizedGraph, *, method: str = "aggregation") -> NormalizedGraph:
    """``graph`` carrying its `LocalityLayout` (host, concrete graph; any size).

    `normalize` calls it on concrete graphs of `LOCALITY_MIN_NODES` nodes or more; call
    it yourself on a W built otherwise (loaded, or smaller). The CG routes (`diffuse`,
    `katz_centrality`, the `CG` and `PreconditionedCG` solvers, the diffusion method)
    then solve in the layout and return the scores in the graph's node order;
    `truncated_diffuse` solves on each query's own subgraph and does not use it. A graph
    that has a layout is returned as is.
    """
    if not isinstance(graph, NormalizedGraph):
        raise TypeError(f"with_locality takes a NormalizedGraph (normalize(A)), got {type(graph).__name__}")
    if _checks.is_traced(graph.indices, graph.weights):
        raise TypeError("with_locality runs on the host: call it on a concrete graph, outside jax.jit")
    if graph.layout is not None:
        return graph
    return dataclasses.replace(graph, layout=locality_layout(graph, method=method))
