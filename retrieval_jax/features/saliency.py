"""Compatibility alias of the old ``retrieval_jax.features.saliency`` (kept for one release).

Its names now live in :mod:`retrieval_jax.explanation.saliency`; import them from there.
"""
from ..explanation.saliency import (feature_saliency, save_overlay, similarity_gradient,
                                    similarity_saliency, unit_range)  # noqa: F401

__all__ = [
    "similarity_gradient", "similarity_saliency", "feature_saliency", "save_overlay",
    "unit_range",
]
