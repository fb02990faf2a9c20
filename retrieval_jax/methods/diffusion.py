"""Diffusion on a mutual kNN graph as a ranking method (Iscen et al., CVPR 2017)."""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import warnings
from typing import Any

from .. import _checks, defaults
from ..diffusion import CG, DiffusionOperator, SparseObservation
from ..diffusion.manifold_ranking import cg_truncated_diffusion
from ..diffusion.operator import check_normalized
from ..diffusion.solvers import SOLVERS, Auto, AutoState, resolve_solver, solve_unchecked
from ..graph.core import Graph, NormalizedGraph
from ..graph.affinity import similarity_power
from ..graph.neighbours import SEARCH_METHODS, normalize
from ..graph.order import LOCALITY_MIN_NODES, with_locality
from .base import (GRAPH_OPTIONS, check_database_graph, checked_database, config_graph, make_method,
                   with_graph_k)
from .options import finite_float, option, positive_int
from .base import similarities as _similarities

from ..diffusion.solvers import AUTO_INVERSE_MAX_BYTES, AUTO_INVERSE_MAX_NODES  # solver="auto" thresholds


def _chosen_truncate(n: int, values) -> int | None:
    """Truncate for n items: the full solve (None) up to 100,000, else T = 2000 (>= query_k); CG only."""
    t = defaults.default_truncate(n) if values["solver"] == "cg" else None
    return None if t is None else max(t, values["query_k"])


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion on a mutual kNN graph (Iscen et al., CVPR 2017 defaults).

    Attributes:
      k: graph neighbours per node.
      query_k: database neighbours that form an out-of-graph query's y.
      alpha: diffusion weight in (0, 1).
      gamma: similarity exponent for graph edges and y.
      tol, max_iter: CG stopping rule (relative residual, steps).
      mutual: reciprocal kNN graph.
      graph_method: the neighbour search (`graph.SEARCH_METHODS`): "auto" (the fastest
        installed exact route, `graph.search_route`), "exact", "faiss" or "nndescent".
      truncate: None for the full solve, else T: each query solves on its T
        nearest database items only; the other items follow, in similarity order.
      batch_size: queries per vmapped batch in truncated mode.
      solver: "cg" (conjugate gradient online, any n), "inverse" (the exact
        (I - alpha W)^-1 computed offline by Cholesky, one dense block per connected
        component of up to ~20,000 nodes; a query then costs query_k rows of it), or
        "auto": "inverse" when every component has at most ``AUTO_INVERSE_MAX_NODES``
        nodes and the blocks fit in ``AUTO_INVERSE_MAX_BYTES`` (mutual kNN graphs
        often split into many small components; the inverse costs sum_c n_c^3 once and
        query_k rows per query: docs/benchmarks/bench_diffusion.md), else "cg". The built state's
        config says which was chosen. Any name of the registry
        `retrieval_jax.diffusion.SOLVERS` ("pcg": the two-level CG, "spectral": rank-400
        FSR with the resolvent filter) or a solver object (e.g. ``Spectral(rank=...)``,
        used as given: its own tol / max_iter) is taken; every route runs through
        `retrieval_jax.diffusion.solve`.

    A database of `LOCALITY_MIN_NODES` items or more gets its graph's `LocalityLayout`
    at build (host, once): CG iterates in it, the scores come back in the database's
    order. A query whose ``query_k`` neighbours all have similarity <= 0 has y = 0 and
    all-zero scores: ``search`` warns (`UnreachedQueryWarning`) and returns them.
    """

    k: int = option(50, GRAPH_OPTIONS["k"])
    query_k: int = option(10, GRAPH_OPTIONS["query_k"])
    alpha: float = option(0.99, GRAPH_OPTIONS["alpha"])
    gamma: float = option(3.0, GRAPH_OPTIONS["gamma"])
    tol: float = option(1e-6, "CG relative residual", parse=finite_float)
    max_iter: int = option(20, "CG steps at most", parse=positive_int)
    mutual: bool = option(True, GRAPH_OPTIONS["mutual"])
    graph_method: str = option("auto", GRAPH_OPTIONS["graph_method"])
    truncate: int | None = option(None, "truncated diffusion on each query's top-T shortlist (default: the "
                                  "full solve up to 100,000 items, else T = 2000)", parse=positive_int,
                                  choose=_chosen_truncate, rule="n > 100,000")
    batch_size: int = 64
    solver: str = option("cg", "cg: conjugate gradient per batch; pcg: two-level (aggregation) "
                         "preconditioned CG; inverse: the exact (I - alpha W)^-1, computed once, one "
                         "dense block per connected component (components up to ~20,000 nodes); "
                         "spectral: FSR's low-rank resolvent; auto: inverse when the components are "
                         "small, else cg", choices=tuple(SOLVERS))

    def __post_init__(self):
        _checks.check_alpha(self.alpha)
        _checks.check_gamma(self.gamma)
        _checks.check_tolerance(self.tol, "tol")
        for name in ("k", "query_k", "max_iter", "batch_size"):
            _checks.check_positive_int(getattr(self, name), f"DiffusionConfig.{name}")
        if self.truncate is not None and (not isinstance(self.truncate, (int, np.integer)) or self.truncate < 1):
            raise ValueError(f"DiffusionConfig.truncate must be None or a positive int, got {self.truncate!r}")
        if self.graph_method not in SEARCH_METHODS:
            raise ValueError(f"graph_method must be one of {SEARCH_METHODS}, got {self.graph_method!r}")
        solver = resolve_solver(self.solver).validate()
        if self.truncate is not None and not isinstance(solver, CG):
            raise ValueError(f"truncation only applies to solver='cg' (conjugate gradient on each "
                             f"shortlist), got solver={self.solver!r}")


class DiffusionStatic(NamedTuple):
    """The fields of a `DiffusionConfig` that decide shapes and loop bounds (static under jit)."""

    k: int
    query_k: int
    max_iter: int
    mutual: bool
    graph_method: str
    truncate: int | None
    batch_size: int
    solver: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiffusionParams:
    """The values of a `DiffusionConfig` (traced leaves: one compiled search serves them all)."""

    alpha: jax.Array
    gamma: jax.Array
    tol: jax.Array


_VALUES = ("alpha", "gamma", "tol")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["database", "graph", "solver_state", "params"], meta_fields=["static"])
@dataclasses.dataclass(frozen=True)
class DiffusionState:
    """Database descriptors float32[n, d], the normalised graph W, the solver's offline
    state (``solver.init``: (I - alpha W)^-1 for "inverse", the coarse space for "pcg",
    the eigenpairs for "spectral", None for "cg"), the traced values (alpha, gamma, tol)
    and the static fields of the config.

    W of a database of `LOCALITY_MIN_NODES` items or more carries its `LocalityLayout`
    (computed once by ``build``): the CG routes iterate in it and return the scores in
    the database's order.

    Two states built with different alpha, gamma or tol share one compiled ``search``;
    ``jax.vmap`` over ``dataclasses.replace(state, params=...)`` runs a grid in one
    program (the "inverse" route's blocks hold one alpha: rebuild them for another).
    ``state.config`` gives the whole `DiffusionConfig` back (concrete values only).
    """

    database: jax.Array
    graph: Graph
    solver_state: Any
    params: DiffusionParams
    static: DiffusionStatic

    @property
    def inverse(self):
        """The `DiffusionInverse` of the "inverse" route, else None."""
        return self.solver_state if self.static.solver == "inverse" else None

    @property
    def config(self) -> DiffusionConfig:
        if _checks.is_traced(*jax.tree_util.tree_leaves(self.params)):
            raise TypeError("state.config needs concrete values; under a trace read state.static and state.params")
        values = {name: float(getattr(self.params, name)) for name in _VALUES}
        return DiffusionConfig(**self.static._asdict(), **values)

    @staticmethod
    def split(config: DiffusionConfig) -> tuple[DiffusionParams, DiffusionStatic]:
        """A config as (traced values, static fields)."""
        params = DiffusionParams(*(jnp.asarray(getattr(config, name), jnp.float32) for name in _VALUES))
        static = DiffusionStatic(**{f: getattr(config, f) for f in DiffusionStatic._fields})
        return params, static


def _diffusion_build(database, config: DiffusionConfig = DiffusionConfig(), *,
                     show_progress: bool | None = None) -> DiffusionState:
    """`DIFFUSION.build`: config, database and sizes checked once here; the graph search and
    the state then trust them."""
    db = checked_database(database, config, DiffusionConfig, "diffusion")
    with_graph_k(_check_query_sizes)(config, db.shape[0])
    graph = config_graph(db, config, show_progress=show_progress)
    return _state(db, normalize(graph), config)


def _check_query_sizes(config: DiffusionConfig, n: int) -> None:
    """query_k and truncate fit a database of n items (truncate >= query_k)."""
    _checks.check_k(config.query_k, n, name="query_k")
    if config.truncate is not None:
        _checks.check_k(config.truncate, n, name="truncate")
        if config.truncate < config.query_k:
            raise ValueError(f"truncate = {config.truncate} must be at least query_k = {config.query_k}")


def diffusion_state_from_graph(database, graph: Graph, config: DiffusionConfig = DiffusionConfig(),
                               *, normalized: bool = False) -> DiffusionState:
    """A `DiffusionState` on a graph built elsewhere (a saved graph, a region graph...).

    ``graph`` is the affinity A (symmetric, normalised here) or, with ``normalized=True``,
    W itself (a `NormalizedGraph`, or a concrete `Graph` checked to be symmetric and
    normalised). ``config.k`` and the graph options are then informative only.

    Raises:
      TypeError: ``config`` is not a `DiffusionConfig`; ``graph`` is not a `Graph`.
      ValueError: sizes that do not fit; an asymmetric A (conjugate gradient and the
        inverse need an undirected graph); with ``normalized=True``, a W that is not
        normalised (its largest eigenvalue exceeds 1: pass A and ``normalized=False``).
    """
    db = checked_database(database, config, DiffusionConfig, "diffusion")
    db, graph = check_database_graph(db, graph)
    _check_query_sizes(config, db.shape[0])
    if normalized:
        w = check_normalized(graph)
        if not isinstance(w, NormalizedGraph):
            w = NormalizedGraph(indices=w.indices, weights=w.weights, overflow=w.overflow)
    else:
        w = normalize(graph)    # checks a concrete A: finite, non-negative, symmetric
    return _state(db, w, config)


def _solver(static: DiffusionStatic, params: DiffusionParams):
    """The solver object of a state's config: a name resolved in `SOLVERS` (with the
    config's tol and max_iter; `Auto` with this module's thresholds) or the object given."""
    solver = resolve_solver(static.solver, tol=params.tol, max_iter=static.max_iter)
    if isinstance(solver, Auto) and isinstance(static.solver, str):
        solver = dataclasses.replace(solver, max_nodes=AUTO_INVERSE_MAX_NODES, max_bytes=AUTO_INVERSE_MAX_BYTES)
    return solver


def _state(db, w: NormalizedGraph, config: DiffusionConfig) -> DiffusionState:
    """The state on checked inputs: W (with its locality layout when large), the solver's
    offline state (`Auto` resolved to the route it picked, recorded in the config)."""
    if w.layout is None and w.num_nodes >= LOCALITY_MIN_NODES and not _checks.is_traced(w.indices, w.weights):
        w = with_locality(w)
    params, static = DiffusionState.split(config)
    solver = _solver(static, params)
    state = solver.init(DiffusionOperator(graph=w, alpha=params.alpha))
    if isinstance(state, AutoState):
        static, state = static._replace(solver=state.route), state.inner
    return DiffusionState(database=jnp.asarray(db), graph=w, solver_state=state, params=params, static=static)


def _operator(state: DiffusionState) -> DiffusionOperator:
    return DiffusionOperator(graph=state.graph, alpha=state.params.alpha)


def _solve(state: DiffusionState, y: SparseObservation) -> jax.Array:
    """x = (I - alpha W)^-1 y by the state's solver: `solve`'s core, one path for every route."""
    solver = _solver(state.static, state.params)
    return solve_unchecked(_operator(state), y, solver, state.solver_state).scores


def _solve_truncated(state: DiffusionState, sims, y_local_fn):
    """Truncated diffusion on each query's top-T shortlist; full scores [nq, n]."""
    st, p = state.static, state.params
    short_s, short_i = jax.lax.top_k(sims, st.truncate)
    y_s = y_local_fn(short_s, short_i)
    x_s = cg_truncated_diffusion(state.graph, y_s, short_i, p.alpha, p.tol, st.max_iter, st.batch_size).x
    # items outside the shortlist keep their similarity order, below every shortlisted item
    base = sims - 3.0
    rows = jnp.arange(sims.shape[0])[:, None]
    return base.at[rows, short_i].set(x_s)


@jax.jit
def _diffusion_search(state: DiffusionState, queries):
    st = state.static
    sims = _similarities(state, queries)
    n = state.database.shape[0]
    if st.truncate is None:
        s, i = jax.lax.top_k(sims, st.query_k)
        return _solve(state, SparseObservation(similarity_power(s, state.params.gamma), i, n))

    def y_local(short_s, short_i):
        keep = jnp.arange(st.truncate) < st.query_k
        return jnp.where(keep, similarity_power(short_s, state.params.gamma), 0.0)

    return _solve_truncated(state, sims, y_local)


@jax.jit
def _diffusion_search_items(state: DiffusionState, ids):
    st = state.static
    n = state.database.shape[0]
    if st.truncate is None:
        return _solve(state, SparseObservation(jnp.ones(ids.shape + (1,), jnp.float32), ids[:, None], n))
    sims = _similarities(state, state.database[ids])
    # the item itself heads its own shortlist
    sims = sims.at[jnp.arange(ids.shape[0]), ids].set(jnp.inf)

    def y_local(short_s, short_i):
        return (short_i == ids[:, None]).astype(jnp.float32)

    return _solve_truncated(state, sims, y_local)


DIFFUSION = make_method(
    "diffusion", _diffusion_build, _diffusion_search, _diffusion_search_items, DiffusionConfig,
    check_sizes=with_graph_k(_check_query_sizes), from_graph=diffusion_state_from_graph, unreached=0.0,
    summary="manifold ranking on the kNN graph, (I - alpha W) x = y by CG (full or truncated) or by the "
            "exact inverse per connected component")


class UnreachedQueryWarning(RuntimeWarning):
    """A query's ``query_k`` nearest database items all have similarity <= 0, so its
    observation y = max(s, 0)^gamma is zero and so are all its diffusion scores."""


@jax.jit
def _zero_rows(scores):
    """bool[nq]: rows of ``scores`` that are all zero (one fused program, not two eager ops).

    max |x| == 0 rather than all(x == 0): the same rows (NaN rows are not zero either
    way), and a float max reduction compiles several times faster than a boolean one."""
    return jnp.max(jnp.abs(scores), axis=1) == 0


def _search_warning_unreached(search):
    """``search`` that warns (`UnreachedQueryWarning`) about queries whose scores are all
    zero: y = 0 exactly when every one of its ``query_k`` neighbours has similarity <= 0
    (M is invertible, so x = 0 iff y = 0), and such a query's ranking would be the
    database's index order. Checked on concrete results of the full solve only."""
    def run(state, queries):
        scores = search(state, queries)
        if state.static.truncate is None and not _checks.is_traced(scores):
            dead = np.flatnonzero(np.asarray(_zero_rows(scores)))
            if dead.size:
                warnings.warn(f"{dead.size} query(ies) (first: row {dead[0]}) have no database neighbour with "
                              f"positive similarity among their query_k = {state.static.query_k} nearest items: "
                              "their diffusion scores are all zero and their ranking is the index order; "
                              "check the descriptors (same pipeline, L2-normalised) or raise query_k",
                              UnreachedQueryWarning, stacklevel=2)
        return scores
    return run


DIFFUSION = DIFFUSION._replace(search=_search_warning_unreached(DIFFUSION.search))
