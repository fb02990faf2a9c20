"""Compatibility alias of the old ``retrieval_jax.features.resnet_vgg`` (kept for one release).

Its names now live in :mod:`retrieval_jax.backbones.resnet_vgg`; import them from there.
"""
from ..backbones.resnet_vgg import (Bottleneck, from_state_dict, IMAGENET_MEAN, IMAGENET_STD,
                                    ResNet, VGG16)  # noqa: F401

__all__ = ["ResNet", "VGG16", "from_state_dict", "IMAGENET_MEAN", "IMAGENET_STD"]
