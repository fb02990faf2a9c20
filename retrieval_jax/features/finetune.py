"""Compatibility alias of the old ``retrieval_jax.features.finetune`` (kept for one release).

Its names now live in :mod:`retrieval_jax.backbones.surgery`,
:mod:`retrieval_jax.data.feature_maps`, :mod:`retrieval_jax.training.finetune`; import
them from there.
"""
from ..backbones.surgery import backbone_feature_maps, conv_head_params, grey_to_rgb  # noqa: F401
from ..data.feature_maps import coil20_feature_maps  # noqa: F401
from ..training.finetune import (apply_conv_head, embed_with_head, finetune_head, head_model,
                                 init_head, load_head)  # noqa: F401

__all__ = [
    "init_head", "conv_head_params", "embed_with_head", "finetune_head", "load_head",
    "head_model", "apply_conv_head", "backbone_feature_maps", "coil20_feature_maps",
    "grey_to_rgb",
]
