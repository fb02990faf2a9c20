"""Why two images match: saliency maps of descriptor similarity (:mod:`.saliency`)."""
from . import saliency
from .saliency import (feature_saliency, save_overlay, similarity_gradient, similarity_saliency,
                       unit_range)

__all__ = ["saliency", "feature_saliency", "save_overlay", "similarity_gradient",
           "similarity_saliency", "unit_range"]
