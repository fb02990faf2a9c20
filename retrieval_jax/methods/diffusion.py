"""Diffusion on a mutual kNN graph as a ranking method (Iscen et al., CVPR 2017)."""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks, defaults
from ..diffusion.inverse import DiffusionInverse, diffusion_inverse, plan_inverse
from ..diffusion import CG, DiffusionOperator, ExactInverse, SparseObservation, cg_truncated_diffusion
from ..graph.core import Graph
from ..graph.affinity import similarity_power
from ..graph.neighbours import SEARCH_METHODS, normalize
from .base import GRAPH_OPTIONS, check_database_graph, database_and_graph, make_method, with_graph_k
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
      graph_method: "exact" or "nndescent".
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
        config says which was chosen.
    """

    k: int = option(50, GRAPH_OPTIONS["k"])
    query_k: int = option(10, GRAPH_OPTIONS["query_k"])
    alpha: float = option(0.99, GRAPH_OPTIONS["alpha"])
    gamma: float = option(3.0, GRAPH_OPTIONS["gamma"])
    tol: float = option(1e-6, "CG relative residual", parse=finite_float)
    max_iter: int = option(20, "CG steps at most", parse=positive_int)
    mutual: bool = option(True, GRAPH_OPTIONS["mutual"])
    graph_method: str = option("exact", GRAPH_OPTIONS["graph_method"])
    truncate: int | None = option(None, "truncated diffusion on each query's top-T shortlist (default: the "
                                  "full solve up to 100,000 items, else T = 2000)", parse=positive_int,
                                  choose=_chosen_truncate, rule="n > 100,000")
    batch_size: int = 64
    solver: str = option("cg", "cg: conjugate gradient per batch; inverse: the exact (I - alpha W)^-1, "
                         "computed once, one dense block per connected component (components up to "
                         "~20,000 nodes); auto: inverse when the components are small, else cg",
                         choices=("cg", "inverse", "auto"))

    def __post_init__(self):
        _checks.check_alpha(self.alpha)
        _checks.check_gamma(self.gamma)
        _checks.check_positive(self.tol, "tol")
        for name in ("k", "query_k", "max_iter", "batch_size"):
            _checks.check_positive_int(getattr(self, name), f"DiffusionConfig.{name}")
        if self.truncate is not None and (not isinstance(self.truncate, (int, np.integer)) or self.truncate < 1):
            raise ValueError(f"DiffusionConfig.truncate must be None or a positive int, got {self.truncate!r}")
        if self.graph_method not in SEARCH_METHODS:
            raise ValueError(f"graph_method must be one of {SEARCH_METHODS}, got {self.graph_method!r}")
        if self.solver not in ("cg", "inverse", "auto"):
            raise ValueError(f"solver must be 'cg', 'inverse' or 'auto', got {self.solver!r}")
        if self.solver in ("inverse", "auto") and self.truncate is not None:
            raise ValueError("truncation only applies to solver='cg'; the inverse is already exact")


class DiffusionStatic(NamedTuple):
    """The fields of a `DiffusionConfig` that decide shapes and loop bounds (static under jit)."""

    k: int
    query_k: int
    max_iter: int
    mutual: bool
    graph_method: str
    truncate: int | None
    batch_size: int
    solver: str


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiffusionParams:
    """The values of a `DiffusionConfig` (traced leaves: one compiled search serves them all)."""

    alpha: jax.Array
    gamma: jax.Array
    tol: jax.Array


_VALUES = ("alpha", "gamma", "tol")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["database", "graph", "inverse", "params"],
                   meta_fields=["static"])
@dataclasses.dataclass(frozen=True)
class DiffusionState:
    """Database descriptors float32[n, d], the normalised graph W, (I - alpha W)^-1 when
    the solver is "inverse" (else None), the traced values (alpha, gamma, tol) and the
    static fields of the config.

    Two states built with different alpha, gamma or tol share one compiled ``search``;
    ``jax.vmap`` over ``dataclasses.replace(state, params=...)`` runs a grid in one
    program (the "inverse" route's blocks hold one alpha: rebuild them for another).
    ``state.config`` gives the whole `DiffusionConfig` back (concrete values only).
    """

    database: jax.Array
    graph: Graph
    inverse: DiffusionInverse | None
    params: DiffusionParams
    static: DiffusionStatic

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
    db, graph = database_and_graph(database, config, DiffusionConfig, "diffusion", _check_query_sizes,
                                   show_progress=show_progress)
    return diffusion_state_from_graph(db, graph, config)


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

    ``graph`` is the affinity A (normalised here) or, with ``normalized=True``, W itself.
    ``config.k`` and the graph options are then informative only.
    """
    db, graph = check_database_graph(database, graph)
    _check_query_sizes(config, db.shape[0])
    w = graph if normalized else normalize(graph)
    plan = plan_inverse(w) if config.solver in ("inverse", "auto") else None
    if config.solver == "auto":
        cheap = plan.largest <= AUTO_INVERSE_MAX_NODES and plan.nbytes <= AUTO_INVERSE_MAX_BYTES
        config = dataclasses.replace(config, solver="inverse" if cheap else "cg")
    inverse = diffusion_inverse(w, config.alpha, plan=plan) if config.solver == "inverse" else None
    params, static = DiffusionState.split(config)
    return DiffusionState(database=jnp.asarray(db), graph=w, inverse=inverse, params=params, static=static)


def _operator(state: DiffusionState) -> DiffusionOperator:
    return DiffusionOperator(graph=state.graph, alpha=state.params.alpha)


def _solve(state: DiffusionState, y: SparseObservation) -> jax.Array:
    """x = (I - alpha W)^-1 y by the state's solver (the solver layer's routes)."""
    if state.static.solver == "inverse":
        return ExactInverse().run(_operator(state), state.inverse, y)[0]
    return CG(state.params.tol, state.static.max_iter).run(_operator(state), None, y)[0]


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
