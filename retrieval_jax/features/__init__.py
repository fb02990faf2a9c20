"""Descriptors from CNN feature maps: pooling, whitening, fine-tuning, regional search.
"""
from . import losses, pooling, regional, train, whitening
from .losses import contrastive_loss, mine_hard_negatives, triplet_loss
from .pooling import (combine_scales, crow, crow_weights, gem, l2_normalize, mac, rmac,
                      rmac_boxes, rmac_regions, spoc)
from .regional import gmp_weights, pool_region_scores, query_region_knn, query_region_similarity
from .train import (TrainState, contrastive_objective, load_checkpoint, make_train_step,
                    save_checkpoint, triplet_objective)
from .whitening import Whitening, apply_whitening, learn_pca_whitening

__all__ = [
    "losses", "pooling", "regional", "train", "whitening",
    "contrastive_loss", "mine_hard_negatives", "triplet_loss",
    "combine_scales", "crow", "crow_weights", "gem", "l2_normalize", "mac", "rmac", "rmac_boxes",
    "rmac_regions", "spoc",
    "gmp_weights", "pool_region_scores", "query_region_knn", "query_region_similarity",
    "TrainState", "contrastive_objective", "load_checkpoint", "make_train_step", "save_checkpoint",
    "triplet_objective",
    "Whitening", "apply_whitening", "learn_pca_whitening",
]
