"""Compatibility package (kept for one release): its modules moved by job.

backbones, resnet_vgg, torch_pickle -> :mod:`retrieval_jax.backbones`; extract (now
``extraction``), pooling, whitening -> :mod:`retrieval_jax.descriptors`; losses, train
(now ``step`` and ``checkpoints``), finetune -> :mod:`retrieval_jax.training` (the
EfficientNet surgery to :mod:`retrieval_jax.backbones.surgery`, the COIL-20 maps to
:mod:`retrieval_jax.data.feature_maps`); saliency -> :mod:`retrieval_jax.explanation`;
regional -> :mod:`retrieval_jax.diffusion.regional`. Every name importable from here
before still is (``retrieval_jax.features.<old module>`` included).
"""
from . import (backbones, extract as extraction, finetune, losses, pooling, regional, resnet_vgg, saliency,
               torch_pickle, train, whitening)
from .finetune import embed_with_head, finetune_head
from .saliency import feature_saliency, save_overlay, similarity_gradient, similarity_saliency
from .backbones import Backbone, efficientnet_lite_from_state_dict, load_efficientnet_lite
from .extract import Extracted, ImageReadError, extract, load_image
from .resnet_vgg import from_state_dict as resnet_vgg_from_state_dict
from .torch_pickle import load_torch_state_dict, save_torch_zip
from .losses import contrastive_loss, mine_hard_negatives, triplet_loss
from .pooling import (combine_scales, crow, crow_weights, gem, l2_normalize, mac, rmac,
                      rmac_boxes, rmac_regions, spoc)
from .regional import gmp_weights, pool_region_scores, query_region_knn, query_region_similarity
from .train import (TrainState, contrastive_objective, load_checkpoint, make_train_step,
                    save_checkpoint, triplet_objective)
from .whitening import Whitening, apply_whitening, learn_pca_whitening

__all__ = [
    "backbones", "extraction", "finetune", "saliency", "losses", "pooling", "regional", "resnet_vgg", "torch_pickle",
    "train",
    "whitening",
    "Backbone", "efficientnet_lite_from_state_dict", "load_efficientnet_lite",
    "Extracted", "ImageReadError", "extract", "load_image",
    "resnet_vgg_from_state_dict", "load_torch_state_dict", "save_torch_zip",
    "contrastive_loss", "mine_hard_negatives", "triplet_loss",
    "combine_scales", "crow", "crow_weights", "gem", "l2_normalize", "mac", "rmac", "rmac_boxes",
    "rmac_regions", "spoc",
    "gmp_weights", "pool_region_scores", "query_region_knn", "query_region_similarity",
    "TrainState", "contrastive_objective", "load_checkpoint", "make_train_step", "save_checkpoint",
    "triplet_objective",
    "Whitening", "apply_whitening", "learn_pca_whitening",
    "embed_with_head", "finetune_head",
    "feature_saliency", "save_overlay", "similarity_gradient", "similarity_saliency",
]
