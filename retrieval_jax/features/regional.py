"""Compatibility alias of the old ``retrieval_jax.features.regional`` (kept for one release).

Its names now live in :mod:`retrieval_jax.diffusion.regional`; import them from there.
"""
from ..diffusion.regional import (gmp_weights, pool_region_scores, query_region_knn,
                                  query_region_similarity)  # noqa: F401

__all__ = ["gmp_weights", "pool_region_scores", "query_region_similarity", "query_region_knn"]
