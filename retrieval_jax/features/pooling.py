"""Compatibility alias of the old ``retrieval_jax.features.pooling`` (kept for one release).

Its names now live in :mod:`retrieval_jax.descriptors.pooling`; import them from there.
"""
from ..descriptors.pooling import (check_mask, combine_scales, crow, crow_weights, gem,
                                   l2_normalize, mac, rmac, rmac_boxes, rmac_regions, spoc)  # noqa: F401

__all__ = [
    "l2_normalize", "mac", "spoc", "gem", "rmac", "rmac_regions", "rmac_boxes", "crow",
    "crow_weights", "combine_scales",
]
