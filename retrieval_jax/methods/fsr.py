"""Fast Spectral Ranking (Iscen et al., CVPR 2018) as a ranking method."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from .. import _checks, defaults
from ..diffusion import DiffusionOperator, SparseObservation, Spectral
from ..diffusion.solvers import solve_unchecked
from ..graph.core import Graph
from ..graph.neighbours import normalize
from ..spectral import heat_kernel_filter, regularized_laplacian_filter
from ..spectral.fsr import FSR_MODES
from ..graph.affinity import similarity_power
from .base import (GRAPH_OPTIONS, check_database_graph, checked_database, config_graph, make_method,
                   with_graph_k)
from .options import option, positive_int
from .base import similarities as _similarities
from .diffusion import DiffusionConfig


FSR_FILTERS = ("diffusion", "heat")
"""FsrConfig.filter: h(l) = (1 - alpha) / (1 - alpha l), or h(l) = exp(-t (1 - l))."""


@dataclasses.dataclass(frozen=True)
class FsrConfig:
    """Fast Spectral Ranking (Iscen et al., CVPR 2018) on the diffusion graph.

    Attributes:
      k, query_k, alpha, gamma, mutual, graph_method: as in `DiffusionConfig`.
      rank: r, the number of eigenpairs of W kept.
      mode: "rank_r" (x = U h(L) U^T y) or "approx" (adds h(0) (y - U U^T y)).
      filter: "diffusion" (h(l) = (1 - alpha)/(1 - alpha l), the same ranking as the
        regularised Laplacian solve) or "heat" (h(l) = exp(-t (1 - l))).
      t: heat-kernel time.
    """

    k: int = option(50, GRAPH_OPTIONS["k"])
    query_k: int = option(10, GRAPH_OPTIONS["query_k"])
    alpha: float = option(0.99, GRAPH_OPTIONS["alpha"])
    gamma: float = option(3.0, GRAPH_OPTIONS["gamma"])
    mutual: bool = option(True, GRAPH_OPTIONS["mutual"])
    graph_method: str = option("auto", GRAPH_OPTIONS["graph_method"])
    rank: int = option(400, "eigenpairs kept, r (default min(400, n): exact when n <= 400)", parse=positive_int,
                       choose=lambda n, values: defaults.default_rank(n), rule="min(400, n)")
    mode: str = option("approx", "FSR.rank-r or FSR.approx", flag="--fsr-mode", choices=FSR_MODES)
    filter: str = "diffusion"
    t: float = 10.0

    def __post_init__(self):
        DiffusionConfig(k=self.k, query_k=self.query_k, alpha=self.alpha, gamma=self.gamma,
                        mutual=self.mutual, graph_method=self.graph_method)
        _checks.check_positive_int(self.rank, "FsrConfig.rank")
        if self.mode not in FSR_MODES:
            raise ValueError(f"FsrConfig.mode must be one of {FSR_MODES}, got {self.mode!r}")
        if self.filter not in FSR_FILTERS:
            raise ValueError(f"FsrConfig.filter must be one of {FSR_FILTERS}, got {self.filter!r}")
        _checks.check_positive(self.t, "t")

    def transfer_function(self):
        if self.filter == "diffusion":
            return regularized_laplacian_filter(self.alpha)
        return heat_kernel_filter(self.t)

    def solver(self) -> Spectral:
        """The `Spectral` solver this config runs (rank, filter, mode)."""
        return Spectral(rank=self.rank, transfer=self.transfer_function(), mode=self.mode)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["database", "embedding", "graph"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class FsrState:
    """Database descriptors float32[n, d], the `SpectralEmbedding` (the `Spectral`
    solver's state), the (static) config and W (the operator the solver runs on)."""

    database: jax.Array
    embedding: Any
    config: FsrConfig = FsrConfig()
    graph: Graph | None = None


def _fsr_build(database, config: FsrConfig = FsrConfig(), *, show_progress: bool | None = None) -> FsrState:
    """`FSR.build`: config, database and sizes checked once here; the rest trusts them."""
    db = checked_database(database, config, FsrConfig, "fsr")
    with_graph_k(_check_sizes)(config, db.shape[0])
    return _state(db, normalize(config_graph(db, config, show_progress=show_progress)), config)


def _check_sizes(config: FsrConfig, n: int) -> None:
    _checks.check_k(config.query_k, n, name="query_k")
    _checks.check_k(config.rank, n, name="rank", what="database items (rank must be <= n)")


def fsr_state_from_graph(database, graph: Graph, config: FsrConfig = FsrConfig(), *,
                         normalized: bool = False) -> FsrState:
    """An `FsrState` on a graph built elsewhere (a saved graph, a region graph...).

    ``graph`` is the affinity A (normalised here) or, with ``normalized=True``, W itself;
    ``config.k`` and the graph options are then informative only.
    """
    db = checked_database(database, config, FsrConfig, "fsr")
    db, graph = check_database_graph(db, graph)
    _check_sizes(config, db.shape[0])
    return _state(db, graph if normalized else normalize(graph), config)


def _operator(w, config: FsrConfig) -> DiffusionOperator:
    return DiffusionOperator(graph=w, alpha=jnp.asarray(config.alpha, jnp.float32))


def _state(db, w, config: FsrConfig) -> FsrState:
    emb = config.solver().init(_operator(w, config))
    return FsrState(database=jnp.asarray(db), embedding=emb, config=config, graph=w)


def _scores(state: FsrState, y: SparseObservation):
    """The `Spectral` route of `solve` (its core: inputs checked at the entry)."""
    cfg = state.config
    return solve_unchecked(_operator(state.graph, cfg), y, cfg.solver(), state.embedding).scores


@jax.jit
def _fsr_search(state: FsrState, queries):
    cfg = state.config
    s, i = jax.lax.top_k(_similarities(state, queries), cfg.query_k)
    return _scores(state, SparseObservation(similarity_power(s, cfg.gamma), i, state.database.shape[0]))


@jax.jit
def _fsr_search_items(state: FsrState, ids):
    ones = jnp.ones((ids.shape[0], 1), jnp.float32)
    return _scores(state, SparseObservation(ones, ids[:, None], state.database.shape[0]))


FSR = make_method("fsr", _fsr_build, _fsr_search, _fsr_search_items, FsrConfig,
                  check_sizes=with_graph_k(_check_sizes), from_graph=fsr_state_from_graph, unreached=1e-4,
                  summary="fast spectral ranking (Iscen et al., CVPR 2018): diffusion through the "
                          "graph's top r eigenpairs")
