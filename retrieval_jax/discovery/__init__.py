"""Unsupervised object discovery: salient regions shared across a collection.

Simeoni, Iscen, Tolias, Avrithis & Chum, "Unsupervised object discovery for instance
recognition", WACV 2018 (arXiv 1709.04725); journal version "Graph-based particular
object discovery", MVA 2019.

- :mod:`.egm`: region detection on a 2-D map by expanding Gaussian mixtures
  (:func:`egm_regions`, :class:`Regions`, :func:`region_boxes`);
- :mod:`.saliency_maps`: the feature saliency (FS) and object saliency (OS) maps;
- :mod:`.descriptor`: regional descriptors, the OS.EGM / FS.EGM global descriptor,
  saliency precision;
- :mod:`.regions`: the region graph of a collection and Katz centrality;
- :mod:`.pipeline`: :func:`discover`, both passes over a collection;
- :mod:`.synthetic`: feature maps with a recurring object among clutter.
"""
from . import descriptor, egm, pipeline, regions, saliency_maps, synthetic
from .descriptor import egm_descriptor, pool_regions, regional_descriptors, saliency_precision, sum_regions
from .egm import Regions, check_saliency_map, egm_regions, egm_regions_traced, overlaps, purge, region_boxes
from .pipeline import CollectedRegions, Discovery, collect_regions, discover, feature_map_batches, whitening_dim
from .regions import GRAPH_METHODS, NNDESCENT_MIN_REGIONS, other_image_neighbours, region_centrality, region_graph
from .saliency_maps import (check_feature_maps, feature_saliency_map, fs_channel_weights, normalized_saliency,
                            object_saliency)
from .synthetic import synthetic_batch, synthetic_batches

__all__ = [
    "descriptor", "egm", "pipeline", "regions", "saliency_maps", "synthetic",
    "Regions", "check_saliency_map", "egm_regions", "egm_regions_traced", "overlaps", "purge", "region_boxes",
    "check_feature_maps", "feature_saliency_map", "fs_channel_weights", "normalized_saliency", "object_saliency",
    "egm_descriptor", "pool_regions", "regional_descriptors", "saliency_precision", "sum_regions",
    "GRAPH_METHODS", "NNDESCENT_MIN_REGIONS", "other_image_neighbours", "region_centrality", "region_graph",
    "CollectedRegions", "Discovery", "collect_regions", "discover", "feature_map_batches", "whitening_dim",
    "synthetic_batch", "synthetic_batches",
]
