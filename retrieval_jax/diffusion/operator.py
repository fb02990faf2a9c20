"""The diffusion operator I - alpha W, and the checks a normalised graph W must pass.

Zhou et al., "Ranking on Data Manifolds" (NIPS 2003): with W = D^-1/2 A D^-1/2 symmetric,
its spectrum lies in [-1, 1], so for 0 < alpha < 1 the operator

    M = I - alpha W

is symmetric positive definite with condition number at most (1 + alpha) / (1 - alpha).
That is what every solver of this package relies on: conjugate gradient needs M SPD,
the per-component inverse needs a Cholesky factor, spectral filtering needs W's
eigenvectors orthonormal, and the implicit derivative of M x = y is one more solve with
M itself (M^T = M).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ..graph.core import AffinityGraph, Graph, NormalizedGraph
from .observation import SparseObservation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiffusionOperator:
    """M = I - alpha W on the normalised graph W; ``alpha`` is a traced leaf.

    Attributes:
      graph: W, n nodes (a `NormalizedGraph`, or a `Graph` that passed `check_normalized`).
      alpha: scalar in (0, 1), a JAX value (so ``vmap`` / ``grad`` over it work).

    ``mv(x)`` applies M to x [n] or [n, B] (node axis first). M is symmetric positive
    definite (``symmetric`` and ``positive_definite`` say so to the solvers).
    """

    graph: Graph
    alpha: jax.Array

    symmetric = True
    positive_definite = True

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes

    def mv(self, x: jax.Array) -> jax.Array:
        """M x = x - alpha W x.

        Under a trace W's leaves pass one ``lax.optimization_barrier`` together with x
        (a no-op at run time). Inside a solver's while loop x changes every step, so XLA
        no longer sees W's neighbour-slot columns as loop invariants: it fuses each slot's
        column into the product instead of hoisting 2 K column slices out of the loop as
        2 K separate kernels, which roughly halved the kernels of the default search (its
        compile time: docs/benchmarks/bench_defaults.md, "Compilation").
        """
        graph = self.graph
        if _checks.is_traced(x):
            leaves, tree = jax.tree_util.tree_flatten(graph)
            leaves, x_in = jax.lax.optimization_barrier((leaves, x))
            graph = jax.tree_util.tree_unflatten(tree, leaves)
        else:
            x_in = x
        return x - self.alpha.astype(x.dtype) * graph.matvec(x_in)

    def in_layout(self):
        """(P M P^T, layout) when W carries a `LocalityLayout` (`normalize` of a large
        concrete graph), else (self, None): the operator the CG solvers iterate with."""
        layout = getattr(self.graph, "layout", None)
        if layout is None:
            return self, None
        return DiffusionOperator(graph=layout.graph(self.graph), alpha=self.alpha), layout


def node_first(y, layout=None) -> jax.Array:
    """The right-hand sides b = y^T [n, nq] (node axis first) of y [nq, n] or a
    `SparseObservation`, renumbered into ``layout`` (a `LocalityLayout`) when given."""
    if isinstance(y, SparseObservation):
        return y.node_first(None if layout is None else layout.positions)
    b = y.T
    return b if layout is None else layout.to_layout(b)


def query_first(x: jax.Array, layout=None) -> jax.Array:
    """The scores [nq, n] of node-first solutions x [n, nq], back in the graph's node order
    from ``layout`` (a `LocalityLayout`) when given: the inverse of `node_first`."""
    return x.T if layout is None else layout.from_layout_transposed(x)


def expect_state(state, cls, solver: str, n: int | None) -> None:
    """Raise unless ``state`` is a ``cls`` (of ``n`` nodes when given): the offline state
    ``solver``.init(operator) returns for this operator (each solver's ``check_state``)."""
    if not isinstance(state, cls):
        raise TypeError(f"{solver} needs the state {solver}(...).init(operator) returns (a {cls.__name__}), "
                        f"got {type(state).__name__}")
    if n is not None and state.num_nodes != n:
        raise ValueError(f"the {solver} state is for {state.num_nodes} nodes, the operator has {n}: "
                         "a state from another graph")


def diffusion_operator(graph: Graph, alpha=0.99) -> DiffusionOperator:
    """M = I - alpha W, after the boundary checks of W (`check_normalized`) and alpha.

    Under a trace (alpha or the graph traced) only shapes and dtypes are checked.
    """
    graph = check_normalized(graph)
    alpha = _checks.check_alpha(alpha)
    return DiffusionOperator(graph=graph, alpha=jnp.asarray(alpha, graph.weights.dtype
                                                             if jnp.issubdtype(graph.weights.dtype, jnp.floating)
                                                             else jnp.float32))


def check_normalized(graph: Graph) -> Graph:
    """``graph`` if it can be W of a diffusion: symmetric, finite, non-negative, spectrum in [-1, 1].

    A `NormalizedGraph` (the output of `normalize`, or of `load_graph` for a W that
    `save_graph` wrote from one, checked once at load) carries that fact in its type and
    passes at once; an `AffinityGraph` (`knn_graph`'s A) is refused at once, traced or
    not; any other traced graph is checked for its type and shapes only. Any other
    concrete `Graph` is checked here, at every call, O(nnz) on the host: finite
    non-negative weights, neighbour ids in range, W = W^T, and a largest eigenvalue at
    most 1 (a few power-iteration steps from the all-ones vector: an unnormalised
    affinity A has lambda_max = its average degree or more, far above 1).

    Raises:
      TypeError: not a `Graph`.
      ValueError: overflowed capacity, NaN/inf or negative weights, ids out of range, an
        asymmetric W, or a W that is not normalised.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    graph.check_overflow()
    if isinstance(graph, AffinityGraph):
        raise ValueError("this is the affinity A that knn_graph returns, not normalised: diffusion needs "
                         "W = D^-1/2 A D^-1/2, pass normalize(A)")
    if isinstance(graph, NormalizedGraph) or _checks.is_traced(graph.indices, graph.weights):
        return graph
    w = np.asarray(graph.weights)
    idx = np.asarray(graph.indices)
    n = graph.num_nodes
    if not np.isfinite(w).all():
        raise ValueError("the graph has NaN or inf weights; rebuild it from finite descriptors")
    if (w < 0).any():
        raise ValueError("the graph has negative weights; diffusion needs a non-negative affinity")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"the graph's neighbour ids must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    mat = graph.to_scipy()
    asym = abs(mat - mat.T)
    scale = max(float(np.abs(mat.data).max(initial=0.0)), 1e-30)
    if asym.nnz and float(asym.max()) > 1e-5 * scale:
        raise ValueError("W is not symmetric (W != W^T): conjugate gradient and the exact inverse need a "
                         "symmetric graph; build it with knn_graph (mutual or union) and normalize it")
    if _largest_eigenvalue_bound(mat) > 1.0 + 1e-3:
        raise ValueError("W is not normalised (its largest eigenvalue exceeds 1, so I - alpha W is not positive "
                         "definite and diffusion diverges): pass normalize(A), W = D^-1/2 A D^-1/2")
    return graph


def _largest_eigenvalue_bound(mat, steps: int = 30) -> float:
    """A lower estimate of the largest eigenvalue of a symmetric non-negative matrix (power
    iteration from the all-ones vector; Rayleigh quotients increase toward lambda_max)."""
    n = mat.shape[0]
    v = np.ones(n) / np.sqrt(max(n, 1))
    est = 0.0
    for _ in range(steps):
        u = mat @ v
        est = max(est, float(v @ u))
        norm = float(np.linalg.norm(u))
        if norm == 0:
            break
        v = u / norm
    return est
