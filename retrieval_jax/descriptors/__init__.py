"""Global descriptors from CNN feature maps: extraction, pooling, whitening.

- :mod:`.extraction`: :func:`extract` (images -> one descriptor each, batched and cached);
- :mod:`.pooling`: MAC, SPoC, GeM, R-MAC, CroW;
- :mod:`.whitening`: learned PCA whitening.
"""
from . import extraction, pooling, whitening
from .extraction import IMAGE_EXTENSIONS, Extracted, ImageReadError, extract, load_image
from .pooling import (combine_scales, crow, crow_weights, gem, l2_normalize, mac, rmac,
                      rmac_boxes, rmac_regions, spoc)
from .whitening import Whitening, apply_whitening, learn_pca_whitening

__all__ = [
    "extraction", "pooling", "whitening",
    "IMAGE_EXTENSIONS", "Extracted", "ImageReadError", "extract", "load_image",
    "combine_scales", "crow", "crow_weights", "gem", "l2_normalize", "mac", "rmac", "rmac_boxes",
    "rmac_regions", "spoc",
    "Whitening", "apply_whitening", "learn_pca_whitening",
]
