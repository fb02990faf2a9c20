"""Diffusion (manifold ranking): conjugate gradient, full and truncated, and the exact inverse."""
from .cg import CGResult, conjugate_gradient
from .inverse import DiffusionInverse, InversePlan, diffusion_inverse, plan_inverse
from .solve import (DiffusionInfo, diffuse, indicator_vectors, katz_centrality, query_vectors,
                    ranking_from_scores, top_n, truncated_diffuse)

__all__ = ["CGResult", "DiffusionInfo", "DiffusionInverse", "InversePlan", "conjugate_gradient", "diffuse",
           "diffusion_inverse", "indicator_vectors", "katz_centrality", "plan_inverse", "query_vectors",
           "ranking_from_scores", "top_n", "truncated_diffuse"]
