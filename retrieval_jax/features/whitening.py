"""Compatibility alias of the old ``retrieval_jax.features.whitening`` (kept for one release).

Its names now live in :mod:`retrieval_jax.descriptors.whitening`; import them from
there.
"""
from ..descriptors.whitening import apply_whitening, learn_pca_whitening, Whitening  # noqa: F401

__all__ = ["Whitening", "learn_pca_whitening", "apply_whitening"]
