"""Diffusion (manifold ranking) by conjugate gradient, full and truncated."""
from .cg import CGResult, conjugate_gradient
from .solve import (DiffusionInfo, diffuse, diffusion_inverse, indicator_vectors, katz_centrality,
                    query_vectors,
                    ranking_from_scores, top_n, truncated_diffuse)

__all__ = ["CGResult", "DiffusionInfo", "conjugate_gradient", "diffuse", "diffusion_inverse", "indicator_vectors",
           "katz_centrality", "query_vectors", "ranking_from_scores", "top_n", "truncated_diffuse"]
