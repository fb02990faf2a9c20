"""Diffusion (manifold ranking) by conjugate gradient, full and truncated."""
from .cg import CGResult, conjugate_gradient
from .inverse import DiffusionInverse, diffusion_inverse
from .solve import (DiffusionInfo, diffuse, indicator_vectors, katz_centrality,
                    query_vectors,
                    ranking_from_scores, top_n, truncated_diffuse)

__all__ = ["CGResult", "DiffusionInfo", "DiffusionInverse", "conjugate_gradient", "diffuse", "diffusion_inverse", "indicator_vectors",
           "katz_centrality", "query_vectors", "ranking_from_scores", "top_n", "truncated_diffuse"]
