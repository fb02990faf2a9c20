"""Compatibility alias of the old ``retrieval_jax.features.backbones`` (kept for one release).

Its names now live in :mod:`retrieval_jax.backbones.base`,
:mod:`retrieval_jax.backbones.efficientnet_lite`; import them from there.
"""
from ..backbones.base import Backbone, load_state_into, torch_leaf  # noqa: F401
from ..backbones.efficientnet_lite import (BlockConfig, DepthwiseConv, efficientnet_lite_config,
                                           efficientnet_lite_from_state_dict,
                                           efficientnet_lite_weights_path, EfficientNetLite,
                                           LITE_MEAN, LITE_STD, LiteConfig,
                                           load_efficientnet_lite, MBConv)  # noqa: F401

__all__ = [
    "Backbone", "EfficientNetLite", "LiteConfig", "efficientnet_lite_config",
    "efficientnet_lite_from_state_dict", "efficientnet_lite_weights_path",
    "load_efficientnet_lite", "load_state_into",
]
