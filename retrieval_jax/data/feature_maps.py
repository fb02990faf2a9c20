"""Frozen backbone feature maps of a data set (computed once, for fine-tuning a head)."""
from __future__ import annotations

from ..backbones.efficientnet_lite import load_efficientnet_lite
from ..backbones.surgery import backbone_feature_maps
from .datasets import load_coil20

__all__ = ["coil20_feature_maps"]


def coil20_feature_maps(root=None, *, size: int = 128, backbone=None, batch_size: int = 64,
                        pre_head: bool = False):
    """COIL-20 (grey 128 x 128) -> RGB (resized to ``size``) -> frozen EfficientNet-Lite0 maps.

    Returns ``(feature_maps float32[1440, H', W', C], dataset)``, ``dataset`` being
    the :func:`~retrieval_jax.data.load_coil20` result at native resolution (with
    ``images``). ``H' = ceil(size / 32)``; C = 1280, or 320 with ``pre_head``.
    """
    data = load_coil20(root, size=128, images=True)
    backbone = load_efficientnet_lite("lite0") if backbone is None else backbone
    maps = backbone_feature_maps(backbone, data.images, size=None if size == 128 else size,
                                 batch_size=batch_size, pre_head=pre_head)
    return maps, data
