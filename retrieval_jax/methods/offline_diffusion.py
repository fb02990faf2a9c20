"""Offline diffusion (Yang, Hinami, Matsui, Ly & Satoh, AAAI 2019) as a ranking method.

``build`` runs one truncated diffusion per database item (its T nearest items, on
the whole database's mutual kNN graph) and keeps the rows sparse (top L entries);
``search`` then needs no solve (see `retrieval_jax.diffusion.offline`):

* ``score="direct"``: a query's scores are sum_j max(s_j, 0)^gamma x_{nn_j} over its
  ``query_k`` nearest database items nn_j (the paper);
* ``score="cosine"``: the cosine between the query's row and each database row
  (the published code's ``search``). A database item used as a query
  (``search_items``) has its own offline row; an out-of-database query's row is its
  direct combination.

Items outside every contributing row score 0 (ties among them keep index order
under `retrieval_jax.diffusion.ranking_from_scores`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .. import _checks
from ..diffusion.offline import OfflineRows, cosine_scores, direct_scores, offline_rows, unit_rows
from ..graph import normalize
from ..graph.core import Graph
from ..graph.neighbours import SEARCH_METHODS
from .base import (GRAPH_OPTIONS, check_database_graph, checked_database, config_graph, make_method,
                   with_graph_k)
from .options import finite_float, option, positive_int
from .base import similarities as _similarities

SCORES = ("direct", "cosine")


@dataclasses.dataclass(frozen=True)
class OfflineDiffusionConfig:
    """Offline truncated diffusion rows, scored online without a solve.

    Attributes:
      k: graph neighbours per node (mutual kNN; the published code's kd counts the
        item itself: its kd = 6 is k = 5 here).
      truncate: T, each item's shortlist (itself and its T - 1 most similar items).
      score: "direct" or "cosine" (see the module docstring).
      alpha: diffusion weight in (0, 1).
      gamma: similarity exponent for graph edges and the direct weights.
      query_k: database neighbours whose rows a query combines (direct, and cosine for
        out-of-database queries).
      top_l: entries kept per offline row (None: all T).
      tol, max_iter: CG stopping rule per offline solve (the published code: rtol
        1e-6, 20 steps; raise max_iter for the converged truncated rows).
      mutual, graph_method: graph options as in `DiffusionConfig`.
      chunk_size: items per jitted offline call; batch_size: solves vmapped at once.
    """

    k: int = option(50, GRAPH_OPTIONS["k"])
    truncate: int = option(1000, "each item's shortlist T (default min(1000, n))",
                           parse=positive_int, rule="min(1000, n)",
                           choose=lambda n, values: max(min(1000, n), values["query_k"]))
    score: str = option("cosine", "direct (the query's neighbours' offline rows, weighted) "
                        "or cosine (between the query's row and the database rows)", choices=SCORES)
    alpha: float = option(0.99, GRAPH_OPTIONS["alpha"])
    gamma: float = option(3.0, GRAPH_OPTIONS["gamma"])
    query_k: int = option(10, GRAPH_OPTIONS["query_k"])
    top_l: int | None = option(None, "entries kept per offline row (default: all T)",
                               parse=positive_int)
    tol: float = option(1e-6, "CG relative residual", parse=finite_float)
    max_iter: int = option(20, "CG steps at most", parse=positive_int)
    mutual: bool = option(True, GRAPH_OPTIONS["mutual"])
    graph_method: str = option("auto", GRAPH_OPTIONS["graph_method"])
    chunk_size: int = 1024
    batch_size: int = 64

    def __post_init__(self):
        _checks.check_alpha(self.alpha)
        _checks.check_gamma(self.gamma)
        _checks.check_tolerance(self.tol, "OfflineDiffusionConfig.tol")
        for name in ("k", "truncate", "query_k", "max_iter", "chunk_size", "batch_size"):
            _checks.check_positive_int(getattr(self, name), f"OfflineDiffusionConfig.{name}")
        if self.top_l is not None:
            _checks.check_positive_int(self.top_l, "OfflineDiffusionConfig.top_l")
            if self.top_l > self.truncate:
                raise ValueError(f"OfflineDiffusionConfig.top_l = {self.top_l} exceeds truncate = "
                                 f"{self.truncate}: a row has at most T non-zeros")
        if self.score not in SCORES:
            raise ValueError(f"OfflineDiffusionConfig.score must be 'direct' or 'cosine', got {self.score!r}")
        if self.graph_method not in SEARCH_METHODS:
            raise ValueError(f"graph_method must be one of {SEARCH_METHODS}, got {self.graph_method!r}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["database", "rows", "unit"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class OfflineDiffusionState:
    """Database descriptors float32[n, d], the offline rows [n, L], the same rows
    L2-normalised (``unit``, None for ``score="direct"``) and the (static) config."""

    database: jax.Array
    rows: OfflineRows
    unit: OfflineRows | None = None
    config: OfflineDiffusionConfig = OfflineDiffusionConfig()

    @property
    def nbytes(self) -> int:
        """Bytes of the offline index (rows, and their unit copy for cosine scoring)."""
        return self.rows.nbytes * (1 if self.unit is None else 2)


def _check_sizes(config: OfflineDiffusionConfig, n: int) -> None:
    _checks.check_k(config.truncate, n, name="truncate", what="database items (truncate must be <= n)")
    _checks.check_k(config.query_k, n, name="query_k")


def _build(database, config: OfflineDiffusionConfig = OfflineDiffusionConfig(), *,
           show_progress: bool | None = None) -> OfflineDiffusionState:
    """`OFFLINE_DIFFUSION.build`: config, database and sizes checked once here; the rest trusts them."""
    db = checked_database(database, config, OfflineDiffusionConfig, "offline-diffusion")
    with_graph_k(_check_sizes)(config, db.shape[0])
    graph = config_graph(db, config, show_progress=show_progress)
    return _state(db, normalize(graph), config, show_progress)


def offline_diffusion_state_from_graph(database, graph: Graph,
                                       config: OfflineDiffusionConfig = OfflineDiffusionConfig(),
                                       *, normalized: bool = False,
                                       show_progress: bool | None = None) -> OfflineDiffusionState:
    """An `OfflineDiffusionState` on a graph built elsewhere (``normalized``: it is W already)."""
    db = checked_database(database, config, OfflineDiffusionConfig, "offline-diffusion")
    db, graph = check_database_graph(db, graph)
    _check_sizes(config, db.shape[0])
    return _state(db, graph if normalized else normalize(graph), config, show_progress)


def _state(db, w, config: OfflineDiffusionConfig, show_progress) -> OfflineDiffusionState:
    """The state on checked inputs: the offline rows (one truncated `solve` per item), unit rows."""
    rows = offline_rows(w, db, config.truncate, alpha=config.alpha, tol=config.tol, max_iter=config.max_iter,
                        top_l=config.top_l, chunk_size=config.chunk_size, batch_size=config.batch_size,
                        show_progress=show_progress)
    unit = unit_rows(rows) if config.score == "cosine" else None
    return OfflineDiffusionState(database=jnp.asarray(db), rows=rows, unit=unit, config=config)


def offline_diffusion_state_from_rows(database, rows: OfflineRows,
                                      config: OfflineDiffusionConfig = OfflineDiffusionConfig()
                                      ) -> OfflineDiffusionState:
    """An `OfflineDiffusionState` from saved rows (`retrieval_jax.diffusion.offline.load_offline`)."""
    db = checked_database(database, config, OfflineDiffusionConfig, "offline-diffusion")
    if not isinstance(rows, OfflineRows):
        raise TypeError(f"rows must be OfflineRows, got {type(rows).__name__}")
    if rows.num_rows != db.shape[0]:
        raise ValueError(f"the offline rows cover {rows.num_rows} items but the database has {db.shape[0]}")
    _checks.check_k(config.query_k, db.shape[0], name="query_k")
    unit = unit_rows(rows) if config.score == "cosine" else None
    return OfflineDiffusionState(database=jnp.asarray(db), rows=rows, unit=unit, config=config)


def _combine(state: OfflineDiffusionState, sims):
    """Direct rows from similarities [nq, n]: the query_k best items weighted by max(s, 0)^gamma."""
    cfg = state.config
    s, i = jax.lax.top_k(sims, cfg.query_k)
    return direct_scores(state.rows, jnp.maximum(s, 0.0) ** cfg.gamma, i)


@jax.jit
def _search(state: OfflineDiffusionState, queries):
    direct = _combine(state, _similarities(state, queries))
    if state.config.score == "direct":
        return direct
    return cosine_scores(state.unit, direct)


@jax.jit
def _search_items(state: OfflineDiffusionState, ids):
    cfg = state.config
    if cfg.score == "cosine":
        own = state.unit
        q = jnp.zeros((ids.shape[0], own.num_rows), jnp.float32)
        q = q.at[jnp.arange(ids.shape[0])[:, None], own.indices[ids]].set(own.values[ids])
        return cosine_scores(own, q)
    # direct: the item's own descriptor queries, the item itself always among its neighbours
    sims = _similarities(state, state.database[ids])
    rows = jnp.arange(ids.shape[0])
    pick = sims.at[rows, ids].set(jnp.inf)
    _, i = jax.lax.top_k(pick, cfg.query_k)
    s = jnp.take_along_axis(sims, i, axis=1)
    return direct_scores(state.rows, jnp.maximum(s, 0.0) ** cfg.gamma, i)


OFFLINE_DIFFUSION = make_method(
    "offline-diffusion", _build, _search, _search_items, OfflineDiffusionConfig,
    check_sizes=with_graph_k(_check_sizes), from_graph=offline_diffusion_state_from_graph, unreached=0.0,
    summary="offline diffusion (Yang et al., AAAI 2019): one truncated diffusion per database item "
            "offline, queries scored without a solve")

__all__ = ["OFFLINE_DIFFUSION", "OfflineDiffusionConfig", "OfflineDiffusionState",
           "offline_diffusion_state_from_graph", "offline_diffusion_state_from_rows"]
