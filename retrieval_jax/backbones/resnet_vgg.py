"""ResNet-50/101/152 and VGG16 in Flax NNX, loaded from torchvision-layout state dicts.

* ResNet: He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016 -- torchvision's Bottleneck (stride on the 3x3 conv, "ResNet v1.5").
* VGG16: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
  Image Recognition", ICLR 2015 -- torchvision's ``features.N`` layout.

No weights are downloaded: pass the state dict (or a ``.pth`` path) the user
already has, e.g. torchvision's ``resnet50-*.pth`` or a cirtorch / revisitop
retrieval checkpoint. The classifier (``fc`` / ``classifier.N``) is optional;
without it only ``features`` is available.

``features(images)`` returns the last conv map (NHWC): ResNet ``[B, H/32, W/32,
2048]`` after ``layer4``; VGG16 ``[B, H/16, W/16, 512]`` after conv5_3 + ReLU,
without the final max-pool (as in cirtorch's retrieval networks).
Inputs are ``[0, 1]`` RGB, normalised with the ImageNet mean/std of torchvision.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import Backbone, check_dtype, load_state_into, torch_leaf
from .torch_pickle import load_torch_state_dict

__all__ = ["ResNet", "VGG16", "from_state_dict", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3),
                  "resnet152": (3, 8, 36, 3)}
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M")
def _vgg_conv_indices() -> tuple[int, ...]:
    """torchvision index of every conv in ``vgg16.features``."""
    idx, out = 0, []
    for c in _VGG16_CFG:
        if c == "M":
            idx += 1
        else:
            out.append(idx)
            idx += 2  # conv, relu
    return tuple(out)


_VGG16_CONV_INDEX = _vgg_conv_indices()  # (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _conv(cin, cout, k, stride=1, pad=0, *, bias=False, dtype, rngs):
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                    use_bias=bias, dtype=dtype, rngs=rngs)


def _bn(c, dtype, rngs):
    return nnx.BatchNorm(c, use_running_average=True, momentum=0.9, epsilon=1e-5,
                         dtype=dtype, rngs=rngs)


class Bottleneck(nnx.Module):
    """torchvision Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), projection shortcut."""

    def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
        cout = planes * 4
        self.conv1 = _conv(cin, planes, 1, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(planes, dtype, rngs)
        self.conv2 = _conv(planes, planes, 3, stride, 1, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(planes, dtype, rngs)
        self.conv3 = _conv(planes, cout, 1, dtype=dtype, rngs=rngs)
        self.bn3 = _bn(cout, dtype, rngs)
        if stride != 1 or cin != cout:
            self.downsample = nnx.List([_conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs),
                                        _bn(cout, dtype, rngs)])
        else:
            self.downsample = None

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.downsample is not None:
            x = self.downsample[1](self.downsample[0](x))
        return nnx.relu(y + x)


class ResNet(nnx.Module):
    """ResNet-50/101/152 (He et al., CVPR 2016), torchvision layout, NHWC."""

    def __init__(self, layers=(3, 4, 6, 3), *, num_classes: int = 1000, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        self.conv1 = _conv(3, 64, 7, 2, 3, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(64, dtype, rngs)
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for b in range(n):
                stride = 2 if (b == 0 and i > 0) else 1
                blocks.append(Bottleneck(cin, planes, stride, dtype=dtype, rngs=rngs))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.fc = nnx.Linear(2048, num_classes, dtype=dtype, rngs=rngs) if num_classes else None

    def stem(self, x):
        """conv1 (7x7/2) + bn1 + relu + maxpool (3x3/2, pad 1).

        Normalised ``[B, H, W, 3]`` -> ``[B, ceil(H/4), ceil(W/4), 64]``.
        """
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    def features(self, x):
        """Normalised ``[B, H, W, 3]`` -> ``[B, ceil(H/32), ceil(W/32), 2048]``."""
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
        return x

    def logits(self, x):
        f = jnp.mean(self.features(x).astype(jnp.float32), axis=(1, 2))
        return self.fc(f.astype(self.dtype))


def _adaptive_avg_pool(x, out: int):
    """PyTorch ``AdaptiveAvgPool2d(out)`` for NHWC with static shapes."""
    h, w = x.shape[1], x.shape[2]
    if h == out and w == out:
        return x
    rows = []
    for i in range(out):
        h0, h1 = (i * h) // out, -(-((i + 1) * h) // out)
        cols = []
        for j in range(out):
            w0, w1 = (j * w) // out, -(-((j + 1) * w) // out)
            cols.append(jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


class VGG16(nnx.Module):
    """VGG16 (Simonyan & Zisserman, ICLR 2015) without batch norm, torchvision layout, NHWC."""

    def __init__(self, *, num_classes: int = 1000, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        convs, cin = [], 3
        for c in _VGG16_CFG:
            if c != "M":
                convs.append(_conv(cin, c, 3, 1, 1, bias=True, dtype=dtype, rngs=rngs))
                cin = c
        self.convs = nnx.List(convs)
        if num_classes:
            self.classifier = nnx.List([nnx.Linear(512 * 7 * 7, 4096, dtype=dtype, rngs=rngs),
                                        nnx.Linear(4096, 4096, dtype=dtype, rngs=rngs),
                                        nnx.Linear(4096, num_classes, dtype=dtype, rngs=rngs)])
        else:
            self.classifier = None

    def features(self, x):
        """Normalised ``[B, H, W, 3]`` -> conv5_3 + ReLU ``[B, H/16, W/16, 512]`` (floor)."""
        x = x.astype(self.dtype)
        i = 0
        for c in _VGG16_CFG[:-1]:  # drop the last max-pool
            if c == "M":
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = nnx.relu(self.convs[i](x))
                i += 1
        return x

    def logits(self, x):
        f = nnx.max_pool(self.features(x), (2, 2), strides=(2, 2))
        f = _adaptive_avg_pool(f.astype(jnp.float32), 7)
        # torchvision flattens NCHW: channel-major order.
        f = jnp.transpose(f, (0, 3, 1, 2)).reshape(f.shape[0], -1).astype(self.dtype)
        f = nnx.relu(self.classifier[0](f))
        f = nnx.relu(self.classifier[1](f))
        return self.classifier[2](f)


def _resnet_key(path) -> str:
    """('layer1', 0, 'downsample', 1, 'scale') -> 'layer1.0.downsample.1.weight'."""
    *mods, leaf = path
    parent = mods[-1]
    is_bn = (isinstance(parent, str) and parent.startswith("bn")) or (
        len(mods) >= 2 and mods[-2] == "downsample" and parent == 1)
    return ".".join([str(m) for m in mods] + [torch_leaf(leaf, is_bn)])


def _vgg_key(path) -> str:
    """('convs', 3, 'kernel') -> 'features.7.weight'; ('classifier', 1, 'bias') ->
    'classifier.3.bias'."""
    group, idx, leaf = path
    name = "weight" if leaf == "kernel" else "bias"
    if group == "convs":
        return f"features.{_VGG16_CONV_INDEX[idx]}.{name}"
    return f"classifier.{(0, 3, 6)[idx]}.{name}"


def _detect_arch(sd: Mapping) -> str:
    if "conv1.weight" in sd and any(k.startswith("layer4.") for k in sd):
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith("layer3.")}
        n = max(blocks) + 1
        for arch, layers in _RESNET_LAYERS.items():
            if layers[2] == n:
                return arch
        raise ValueError(f"ResNet state dict with {n} blocks in layer3 matches none of "
                         f"{sorted(_RESNET_LAYERS)} (expected 6, 23 or 36)")
    if "features.0.weight" in sd:
        convs = [k for k in sd if k.startswith("features.") and k.endswith(".weight")]
        if len(convs) == 13:
            return "vgg16"
        raise ValueError(f"VGG state dict with {len(convs)} conv layers; only VGG16 (13) "
                         "is supported")
    sample = ", ".join(list(sd)[:5])
    raise ValueError("cannot recognise the architecture: expected torchvision ResNet keys "
                     f"(conv1.weight, layer1.0.conv1.weight, ...) or VGG keys "
                     f"(features.0.weight, ...); got keys like {sample}")


def _strip_prefix(sd: Mapping) -> dict:
    """Drop a common wrapper prefix (``module.``, ``features.`` of cirtorch ResNets ...)."""
    sd = dict(sd)
    for prefix in ("module.", "model.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def from_state_dict(state_dict, *, arch: str | None = None, dtype=jnp.float32) -> Backbone:
    """Build a ResNet-50/101/152 or VGG16 :class:`Backbone` from torchvision weights.

    Args:
      state_dict: ``{name: array}`` with torchvision key names (``conv1.weight``,
        ``layer1.0.downsample.0.weight``, ``features.28.bias`` ...), or a path to a
        ``.pth`` file (zip or legacy format; read without torch).
      arch: ``"resnet50"``, ``"resnet101"``, ``"resnet152"`` or ``"vgg16"``; inferred
        from the keys when ``None``.
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).

    Raises ``KeyError`` naming missing keys and ``ValueError`` on shape mismatches
    or unused keys. The classifier is loaded when its keys are present.
    """
    dtype = check_dtype(dtype)
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_torch_state_dict(state_dict)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping or a path, got {type(state_dict).__name__}")
    sd = _strip_prefix(state_dict)
    detected = _detect_arch(sd)
    if arch is None:
        arch = detected
    arch = arch.lower()
    if arch != detected:
        raise ValueError(f"arch={arch!r} but the state dict looks like {detected!r}")
    if arch.startswith("resnet"):
        num_classes = int(np.shape(sd["fc.weight"])[0]) if "fc.weight" in sd else 0
        layers = _RESNET_LAYERS[arch]
        abstract = nnx.eval_shape(lambda: ResNet(layers, num_classes=num_classes, dtype=dtype,
                                                 rngs=nnx.Rngs(0)))
        graphdef, state = load_state_into(abstract, sd, _resnet_key, what=arch)
        return Backbone(name=arch, graphdef=graphdef, state=state, image_size=224,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, out_channels=2048,
                        strides=(2, 2, 2, 2, 2), round_mode="ceil", num_classes=num_classes)
    num_classes = int(np.shape(sd["classifier.6.weight"])[0]) if "classifier.6.weight" in sd \
        else 0
    abstract = nnx.eval_shape(
        lambda: VGG16(num_classes=num_classes, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = load_state_into(abstract, sd, _vgg_key, what=arch)
    return Backbone(name=arch, graphdef=graphdef, state=state, image_size=224,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, out_channels=512,
                    strides=(2, 2, 2, 2), round_mode="floor", num_classes=num_classes)
