"""Regularized diffusion process (RDP; Bai, Bai, Tian & Latecki, AAAI 2017) as a ranking method.

RDP diffuses the similarities A [N, N] on the tensor product of the kNN affinity graph
with itself. With W the affinity, D = diag(W 1) and S = D^-1/2 W D^-1/2, the paper
defines A* three equivalent ways (our reading of its regularisation, iterative and limit
frameworks):

    A* = argmin_A  1/2 sum_{i,j,k,l} W_ki W_lj (A_kl / sqrt(D_kk D_ll) - A_ij / sqrt(D_ii D_jj))^2
                   + mu ||A - I||_F^2
       vec(A*) = (1 - alpha) (I - alpha S (x) S)^-1 vec(I),          alpha = 1 / (1 + mu)
       A^(t+1) = alpha S A^(t) S^T + (1 - alpha) I  ->  A*           (any A^(0))

(the smoothness term is vec(A)^T (I - S (x) S) vec(A); setting the gradient to zero gives
the linear system, whose Jacobi iteration is the third line). S is symmetric, so
(S (x) S) vec(I) = vec(S^2) and every power stays a polynomial in S: the fixed point is

    A* = (1 - alpha) sum_t alpha^t S^2t = (1 - alpha) (I - alpha S^2)^-1,

manifold ranking (Zhou et al., NIPS 2003) on the two-step graph S^2. A database item i
ranked as a query gets the column A*[:, i] = (1 - alpha) (I - alpha S^2)^-1 e_i, the
paper's similarities on the database. An out-of-database query q is a node attached to
its ``query_k`` nearest database items with weights w_qj = max(s_qj, 0)^gamma (the
library's graph affinity) that the database graph does not list: its first step into
the graph is S'e_q ~ D^-1/2 w_q, every later step is S, and (leaving out the paths that
return through q)

    f_q = (1 - alpha) (I - alpha S^2)^-1 S D^-1/2 w_q.

Solvers, both on the library's graph and solver layers (``N x N`` is never formed past
the exact inverse's 20,000-node components):

* "cg": the batched conjugate gradient of `retrieval_jax.diffusion.solvers.solve_spd` on
  M = I - alpha S^2, applied as two products with S (O(N k) each; nothing of S^2 is
  stored). M is SPD with spectrum in [1 - alpha, 1], condition number <= 1 + mu;
  gradients by implicit differentiation;
* "inverse": S^2 built once as a `NormalizedGraph` (its rows have up to k^2 entries;
  symmetric, non-negative, spectrum in [0, 1]) and (I - alpha S^2)^-1 by the exact
  per-component inverse of `retrieval_jax.diffusion.ExactInverse` (`diffusion.solve`'s
  route), components of at most 20,000 nodes.

The graph is the library's (`graph.knn_graph`: mutual kNN, max(s, 0)^gamma), not the
paper's Gaussian kernel on shape and object distances, and the defaults are not the
paper's settings: the library's diffusion graph (k = 50, query_k = 10, gamma = 3) and
mu = 0.02 (alpha = 1 / 1.02 ~ 0.98 ~ 0.99^2, the weight of a two-step move under Iscen
et al.'s alpha = 0.99). Since (I - alpha S^2)^-1 = ((I - a S)^-1 + (I + a S)^-1) / 2 with
a = sqrt(alpha), RDP at alpha = a^2 is the mean of Iscen et al.'s diffusion at a and of
(I + a S)^-1, which cancels its odd powers of S (the paths of odd length).

Public API:
  * ``RDP`` / ``RdpConfig`` / ``RdpState``: the `Method` (registered as "rdp").
  * ``rdp_scores(state, queries)``, ``rdp_item_scores(state, ids)``: pure, jittable
    scores float32[nq, N] (``RDP.search`` checks and pads).
  * ``rdp_state_from_graph(database, graph, config)``: a state on a graph built elsewhere.
  * ``squared_graph(w)``: S^2 of a normalised graph, as a `NormalizedGraph` (host).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ..diffusion import DiffusionOperator, ExactInverse, SparseObservation
from ..diffusion.operator import node_first
from ..diffusion.solvers import solve_spd, solve_unchecked
from ..graph.affinity import similarity_power
from ..graph.core import Graph, NormalizedGraph
from ..graph.neighbours import check_symmetric, normalize
from .base import GRAPH_OPTIONS, check_database_graph, checked_database, config_graph, make_method, with_graph_k
from .base import similarities as _similarities
from .options import finite_float, option, positive_int

__all__ = ["RDP", "RdpConfig", "RdpState", "rdp_item_scores", "rdp_scores", "rdp_state_from_graph",
           "squared_graph"]

RDP_SOLVERS = ("cg", "inverse")


def _check_mu(mu, name="RdpConfig.mu") -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number > 0, got {mu!r}")
    if not (np.isfinite(mu) and mu > 0):
        raise ValueError(f"{name} must be a finite number > 0 (alpha = 1 / (1 + mu) in (0, 1)), got {mu}")
    return float(mu)


@dataclasses.dataclass(frozen=True)
class RdpConfig:
    """Regularized diffusion process (Bai et al., AAAI 2017) on the library's kNN graph.

    Attributes:
      k, gamma, mutual, graph_method: the graph, as in `DiffusionConfig` (k = 50,
        gamma = 3, mutual kNN).
      query_k: database neighbours that attach an out-of-database query (10).
      mu: the fitting weight of the regularisation, alpha = 1 / (1 + mu) (0.02, alpha ~
        0.98; see the module docstring). A traced value of the "cg" route.
      tol, max_iter: the CG stopping rule (relative residual 1e-6, 100 steps: M's
        condition number is at most 1 / (1 - alpha) = (1 + mu) / mu, 51 at mu = 0.02).
      solver: "cg" (any n) or "inverse" (the exact inverse of I - alpha S^2 per
        connected component, components of at most 20,000 nodes).
    """

    k: int = option(50, GRAPH_OPTIONS["k"])
    query_k: int = option(10, GRAPH_OPTIONS["query_k"])
    mu: float = option(0.02, "RDP: the regulariser's fitting weight mu > 0, alpha = 1 / (1 + mu)",
                       flag="--rdp-mu", parse=finite_float)
    gamma: float = option(3.0, GRAPH_OPTIONS["gamma"])
    tol: float = option(1e-6, "CG relative residual", parse=finite_float)
    max_iter: int = option(100, "RDP: CG steps at most", flag="--rdp-max-iter", parse=positive_int)
    mutual: bool = option(True, GRAPH_OPTIONS["mutual"])
    graph_method: str = option("auto", GRAPH_OPTIONS["graph_method"])
    solver: str = option("cg", "RDP: cg (conjugate gradient on I - alpha S^2, two products with S) or inverse "
                         "(the exact inverse per connected component of S^2, up to 20,000 nodes)",
                         flag="--rdp-solver", choices=RDP_SOLVERS)

    def __post_init__(self):
        _check_mu(self.mu)
        _checks.check_gamma(self.gamma)
        _checks.check_tolerance(self.tol, "RdpConfig.tol")
        for name in ("k", "query_k", "max_iter"):
            _checks.check_positive_int(getattr(self, name), f"RdpConfig.{name}")
        if self.solver not in RDP_SOLVERS:
            raise ValueError(f"RdpConfig.solver must be one of {RDP_SOLVERS}, got {self.solver!r}")

    @property
    def alpha(self) -> float:
        """alpha = 1 / (1 + mu)."""
        return 1.0 / (1.0 + self.mu)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["database", "graph", "inv_sqrt_degree", "squared", "inverse", "mu", "gamma", "tol"],
                   meta_fields=["static"])
@dataclasses.dataclass(frozen=True)
class RdpState:
    """The database, its normalised graph S and what the solver needs (a pytree).

    Attributes:
      database: float32[N, d].
      graph: S = D^-1/2 W D^-1/2 (a `NormalizedGraph`).
      inv_sqrt_degree: float32[N], D^-1/2 (0 for an isolated item).
      squared: S^2 as a `NormalizedGraph` for the "inverse" route, else None.
      inverse: the route's `DiffusionInverse` of I - alpha S^2, else None.
      mu, gamma, tol: traced values (the "inverse" route's blocks hold the build's mu).
      static: the config (its mu, gamma, tol replaced by the leaves when read back).
    """

    database: jax.Array
    graph: NormalizedGraph
    inv_sqrt_degree: jax.Array
    squared: Any
    inverse: Any
    mu: jax.Array
    gamma: jax.Array
    tol: jax.Array
    static: RdpConfig = RdpConfig()

    @property
    def config(self) -> RdpConfig:
        """The `RdpConfig` of the state (host side; values read from the leaves)."""
        return dataclasses.replace(self.static, mu=float(self.mu), gamma=float(self.gamma), tol=float(self.tol))


def squared_graph(w: Graph) -> NormalizedGraph:
    """S^2 of a normalised graph S (host, scipy): a `NormalizedGraph` whose rows hold the
    two-step neighbours (up to K^2 of them). S symmetric with spectrum in [-1, 1] makes S^2
    symmetric, non-negative and its spectrum lie in [0, 1]."""
    s = w.to_scipy().astype(np.float64)
    s2 = (s @ s).tocsr()
    g = Graph.from_scipy(s2)
    return NormalizedGraph(indices=g.indices, weights=g.weights)


# ----------------------------------------------------------------------------- scores
def _alpha(state: RdpState):
    return 1.0 / (1.0 + state.mu.astype(jnp.float32))


def _solve(state: RdpState, y: SparseObservation) -> jax.Array:
    """(1 - alpha) (I - alpha S^2)^-1 y, float32[nq, N], by the state's route."""
    alpha = _alpha(state)
    if state.static.solver == "inverse":
        op = DiffusionOperator(graph=state.squared, alpha=alpha)
        x = solve_unchecked(op, y, ExactInverse(), state.inverse).scores
    else:
        s = state.graph

        def mv(v):
            return v - alpha * s.matvec(s.matvec(v))

        x = solve_spd(mv, node_first(y), tol=state.tol, max_iter=state.static.max_iter).x.T
    return (1.0 - alpha) * x


def rdp_scores(state: RdpState, queries) -> jax.Array:
    """Scores float32[nq, N] of out-of-database queries: (1 - alpha) (I - alpha S^2)^-1 S D^-1/2 w_q.

    Pure and jittable (no checks; ``RDP.search`` checks and pads).

    Args:
      state: an `RdpState` from ``RDP.build``.
      queries: float[nq, d] descriptors.

    Returns:
      float32[nq, N], higher is better (all zero for a query whose ``query_k`` nearest
      items all have similarity <= 0).
    """
    n = state.database.shape[0]
    sims = _similarities(state, queries)
    s, i = jax.lax.top_k(sims, state.static.query_k)
    v = similarity_power(s, state.gamma) * state.inv_sqrt_degree[i]                 # D^-1/2 w_q  [nq, kq]
    g = state.graph
    # S v = sum_j v_j S[:, j] = sum_j v_j S[j, :] (S symmetric): the neighbours' rows, weighted
    idx = g.indices[i].reshape(i.shape[0], -1)
    w = (v[:, :, None] * g.weights[i]).reshape(i.shape[0], -1)
    return _solve(state, SparseObservation(w, idx, n))


def rdp_item_scores(state: RdpState, ids) -> jax.Array:
    """Scores float32[nq, N] of database items as queries: the columns (1 - alpha) (I - alpha S^2)^-1 e_i
    of the paper's A* (pure, jittable; ids int[nq] in [0, N) unchecked)."""
    n = state.database.shape[0]
    ids = jnp.asarray(ids, jnp.int32)
    return _solve(state, SparseObservation(jnp.ones(ids.shape + (1,), jnp.float32), ids[:, None], n))


# ----------------------------------------------------------------------------- build
def _check_sizes(config: RdpConfig, n: int) -> None:
    _checks.check_k(config.query_k, n, name="query_k")


def _rdp_build(database, config: RdpConfig = RdpConfig(), *, show_progress: bool | None = None) -> RdpState:
    db = checked_database(database, config, RdpConfig, "rdp")
    with_graph_k(_check_sizes)(config, db.shape[0])
    return _state(db, config_graph(db, config, show_progress=show_progress), config)


def rdp_state_from_graph(database, graph: Graph, config: RdpConfig = RdpConfig()) -> RdpState:
    """An `RdpState` on a kNN affinity graph W built elsewhere (``config.k`` and the graph
    options are then informative only; W is normalised here).

    Raises:
      TypeError: ``config`` is not an `RdpConfig`; ``graph`` is not a `Graph`.
      ValueError: a graph of another size, an asymmetric W, or a query_k that does not fit.
    """
    db = checked_database(database, config, RdpConfig, "rdp")
    db, graph = check_database_graph(db, graph)
    _check_sizes(config, db.shape[0])
    check_symmetric(graph)
    return _state(db, graph, config)


def _state(db, a: Graph, config: RdpConfig) -> RdpState:
    """The state on checked inputs: S = normalize(W), D^-1/2, and the "inverse" route's S^2 and inverse."""
    deg = np.asarray(a.degree(), np.float64)
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0).astype(np.float32)
    w = normalize(a)
    squared = inverse = None
    mu = jnp.float32(config.mu)
    if config.solver == "inverse":
        squared = squared_graph(w)
        op = DiffusionOperator(graph=squared, alpha=1.0 / (1.0 + mu))
        inverse = ExactInverse().init(op)
    # the values live in leaves; the static config holds the defaults, so that states that
    # differ only in mu, gamma or tol share one compiled search
    static = dataclasses.replace(config, mu=RdpConfig.mu, gamma=RdpConfig.gamma, tol=RdpConfig.tol)
    return RdpState(database=jnp.asarray(db), graph=w, inv_sqrt_degree=jnp.asarray(inv_sqrt), squared=squared,
                    inverse=inverse, mu=mu, gamma=jnp.float32(config.gamma), tol=jnp.float32(config.tol),
                    static=static)


@jax.jit
def _rdp_search(state: RdpState, queries):
    return rdp_scores(state, queries)


@jax.jit
def _rdp_search_items(state: RdpState, ids):
    return rdp_item_scores(state, ids)


RDP = make_method("rdp", _rdp_build, _rdp_search, _rdp_search_items, RdpConfig,
                  check_sizes=with_graph_k(_check_sizes), from_graph=rdp_state_from_graph, unreached=0.0,
                  summary="regularized diffusion process: (I - alpha S^2) x = y on the kNN graph's two-step "
                          "graph, by CG or the exact inverse per component (Bai et al. 2017)")
