"""Unsupervised object discovery: salient regions shared across a collection.

Simeoni, Iscen, Tolias, Avrithis & Chum, "Unsupervised object discovery for instance
recognition", WACV 2018 (arXiv 1709.04725); journal version "Graph-based particular
object discovery", MVA 2019.

- :mod:`.egm`: region detection on a 2-D map by expanding Gaussian mixtures
  (:func:`egm_regions`, :class:`Regions`, :func:`region_boxes`).
"""
from . import egm
from .egm import Regions, check_saliency_map, egm_regions, egm_regions_traced, overlaps, purge, region_boxes

__all__ = ["egm", "Regions", "check_saliency_map", "egm_regions", "egm_regions_traced", "overlaps", "purge",
           "region_boxes"]
