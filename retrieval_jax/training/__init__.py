"""Descriptor learning: losses, the train step, checkpoints, fine-tuning a head.

- :mod:`.losses`: contrastive and triplet losses, hard-negative mining;
- :mod:`.step`: :class:`TrainState` and the jitted optax :func:`make_train_step`;
- :mod:`.checkpoints`: atomic ``.npz`` checkpoints of any pytree;
- :mod:`.finetune`: a GeM + whitening head (and the last conv block) on frozen maps;
- :mod:`.learned_diffusion`: alpha, gamma and a projection learned through the kNN graph
  and the diffusion (listwise loss);
- :mod:`.mining`: training tuples mined on the kNN-graph manifold without labels
  (Iscen et al., CVPR 2018) and fine-tuning the head on them.
"""
from . import checkpoints, finetune, learned_diffusion, losses, mining, step
from .checkpoints import load_checkpoint, save_checkpoint
from .finetune import (apply_conv_head, embed_with_head, finetune_head, head_model, init_head,
                       load_head)
from .learned_diffusion import (ALPHA_MAX, LearnedDiffusionParams, learned_diffusion_scores,
                                learned_diffusion_step, listwise_loss, listwise_objective, project)
from .losses import contrastive_loss, mine_hard_negatives, triplet_loss
from .mining import (MinedTuples, finetune_mined, mine_on_manifold, random_walk_anchors,
                     stationary_distribution, weighted_contrastive_loss, weighted_triplet_loss)
from .step import TrainState, contrastive_objective, make_train_step, triplet_objective

__all__ = [
    "checkpoints", "finetune", "learned_diffusion", "losses", "mining", "step",
    "load_checkpoint", "save_checkpoint",
    "apply_conv_head", "embed_with_head", "finetune_head", "head_model", "init_head", "load_head",
    "ALPHA_MAX", "LearnedDiffusionParams", "learned_diffusion_scores", "learned_diffusion_step",
    "listwise_loss", "listwise_objective", "project",
    "contrastive_loss", "mine_hard_negatives", "triplet_loss",
    "MinedTuples", "finetune_mined", "mine_on_manifold", "random_walk_anchors", "stationary_distribution",
    "weighted_contrastive_loss", "weighted_triplet_loss",
    "TrainState", "contrastive_objective", "make_train_step", "triplet_objective",
]
