"""Diffusion (manifold ranking): the operator I - alpha W, its solvers, and the classic entry points.

* `diffuse`, `truncated_diffuse`, `katz_centrality`: conjugate gradient on a batch of
  queries (jit / vmap / grad compatible; implicit gradients);
* `diffusion_inverse`: the exact inverse per connected component;
* the solver layer: `diffusion_operator` (M = I - alpha W), observations
  (`observe_neighbours`, `observe_items`), solvers `CG`, `ExactInverse`, `Spectral`,
  `Auto`, and one `solve` returning a `Solution`;
* regional diffusion (`region_graph`, `regional_diffusion_scores`): the graph over the
  regions of every image, region scores pooled into image scores (GMP).
"""
from .cg import CGResult, CGStatus, conjugate_gradient
from .inverse import DiffusionInverse, InversePlan, diffusion_inverse, plan_inverse
from .offline import (OfflineRows, cosine_scores, direct_scores, load_offline, offline_rows,
                      save_offline)
from .preconditioned import AggregationPreconditioner, PreconditionedCG, aggregation_preconditioner, preconditioned_cg
from .observation import SparseObservation, observe_items, observe_neighbours
from .operator import DiffusionOperator, check_normalized, diffusion_operator
from .manifold_ranking import (DiffusionInfo, diffuse, indicator_vectors,
                               katz_centrality, query_vectors, ranking_from_scores, top_n, truncated_diffuse)
from .regional import (gmp_weights, pool_region_scores, query_region_knn, query_region_similarity,
                       region_graph, regional_diffusion_scores)
from .solvers import (AUTO_INVERSE_MAX_BYTES, AUTO_INVERSE_MAX_NODES, CG, SOLVERS, Auto, AutoState, ExactInverse,
                      Solution, Spectral, resolve_solver, solve)

__all__ = ["AggregationPreconditioner", "PreconditionedCG", "aggregation_preconditioner", "preconditioned_cg",
           "AUTO_INVERSE_MAX_BYTES", "AUTO_INVERSE_MAX_NODES", "Auto", "AutoState", "CG", "CGResult", "CGStatus",
           "DiffusionInfo", "DiffusionInverse", "DiffusionOperator", "ExactInverse", "InversePlan", "SOLVERS",
           "Solution", "SparseObservation", "Spectral", "check_normalized", "conjugate_gradient", "diffuse",
           "diffusion_inverse", "diffusion_operator", "indicator_vectors", "katz_centrality", "observe_items",
           "observe_neighbours", "OfflineRows", "cosine_scores", "direct_scores", "load_offline", "offline_rows",
           "save_offline", "plan_inverse", "query_vectors", "ranking_from_scores", "resolve_solver", "solve",
           "top_n", "truncated_diffuse",
           "gmp_weights", "pool_region_scores", "query_region_knn", "query_region_similarity",
           "region_graph", "regional_diffusion_scores"]
