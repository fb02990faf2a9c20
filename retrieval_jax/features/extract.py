"""Compatibility alias of the old ``retrieval_jax.features.extract`` (kept for one release).

Its names now live in :mod:`retrieval_jax.descriptors.extraction`; import them from
there.
"""
from ..descriptors.extraction import (extract, Extracted, IMAGE_EXTENSIONS, ImageReadError,
                                      load_image)  # noqa: F401

__all__ = ["extract", "Extracted", "ImageReadError", "load_image", "IMAGE_EXTENSIONS"]
