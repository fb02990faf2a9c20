"""EfficientNet-Lite surgery: frozen feature maps computed once, the maps entering
the last conv block, and that block with batch norm folded into the conv.

For EfficientNet-Lite the last conv block is a 1x1 conv 320 -> 1280 + batch norm +
ReLU6, i.e. a per-position affine map. With the block's *input* ``B [N, H', W', 320]``
(``backbone_feature_maps(..., pre_head=True)``) and batch norm folded into the conv
(inference statistics),

    A = relu6( B K + c ),   K = K_conv diag(gamma / sqrt(var + eps)),
                            c = beta - mu gamma / sqrt(var + eps),

reproduces ``backbone.features`` exactly (`conv_head_params`); the fine-tuning of
:mod:`retrieval_jax.training.finetune` trains ``K`` and ``c``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .efficientnet_lite import relu6

__all__ = ["backbone_feature_maps", "check_lite", "conv_head_params", "grey_to_rgb", "pre_head_maps"]


def grey_to_rgb(images) -> np.ndarray:
    """Grey ``[N, H, W]`` (or ``[N, H, W, 1]``) -> RGB ``[N, H, W, 3]`` by replication."""
    a = np.asarray(images)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 4 and a.shape[-1] == 3:
        return a
    if a.ndim != 3:
        raise ValueError(f"images must be grey [N, H, W] or RGB [N, H, W, 3], got shape {a.shape}")
    return np.repeat(a[..., None], 3, axis=-1)


def backbone_feature_maps(backbone, images, *, size: int | None = None,
                          batch_size: int = 64, pre_head: bool = False) -> np.ndarray:
    """Frozen last-conv feature maps of a batch of images, computed once.

    Args:
      backbone: a :class:`~retrieval_jax.backbones.base.Backbone`.
      images: uint8 or float ``[N, H, W]`` (grey, replicated to RGB) or ``[N, H, W, 3]``
        in ``[0, 1]`` (floats) / ``[0, 255]`` (uint8).
      size: optional square side to resize to first (bilinear, ``jax.image.resize``).
      batch_size: images per ``backbone.features`` call; the last batch is padded to
        this size so only one shape is ever compiled.
      pre_head: return the input of the last conv block instead (EfficientNet-Lite:
        ``[N, H', W', 320]``), for fine-tuning that block with `conv_head_params`.
    Returns:
      float32 ``[N, H', W', C]`` (host array).
    """
    if pre_head:
        check_lite(backbone)
    rgb = grey_to_rgb(images)
    n = rgb.shape[0]
    if n == 0:
        raise ValueError("no images")
    batch_size = int(min(batch_size, n))
    out = []
    for start in range(0, n, batch_size):
        chunk = rgb[start:start + batch_size]
        m = chunk.shape[0]
        if m < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - m, axis=0)])
        x = _prepare(jnp.asarray(chunk), size=size)
        if pre_head:
            f = pre_head_maps(backbone.graphdef, backbone.state, x, mean=backbone.mean,
                              std=backbone.std)
        else:
            f = backbone.features(x)
        out.append(np.asarray(f, dtype=np.float32)[:m])
    return np.concatenate(out, axis=0)


def check_lite(backbone):
    """The Flax module of an EfficientNet-Lite backbone (ValueError for any other backbone)."""
    module = backbone.module()
    if not all(hasattr(module, a) for a in ("conv_stem", "blocks", "conv_head", "bn1")):
        raise ValueError(f"pre-head maps / conv-head fine-tuning need an EfficientNet-Lite "
                         f"backbone, got {backbone!r}")
    return module


@functools.partial(jax.jit, static_argnames=("graphdef", "mean", "std"))
def pre_head_maps(graphdef, state, x, *, mean, std):
    """EfficientNet-Lite up to (not including) the last 1x1 conv block (jitted; ``x`` in [0, 1])."""
    model = nnx.merge(graphdef, state)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    x = relu6(model.bn0(model.conv_stem(x.astype(model.dtype))))
    for block in model.blocks:
        x = block(x)
    return x


def conv_head_params(backbone) -> dict:
    """The last conv block of an EfficientNet-Lite with batch norm folded in.

    relu6(BN(conv_1x1(x))) = relu6(x K + c) with K = K_conv * s, c = beta - mu * s,
    s = gamma / sqrt(var + eps) (inference statistics).

    Returns {"conv_kernel": float32[C_in, C], "conv_bias": float32[C]}.
    """
    module = check_lite(backbone)
    kernel = jnp.asarray(module.conv_head.kernel[...], jnp.float32)[0, 0]   # [C_in, C]
    bn = module.bn1
    s = jnp.asarray(bn.scale[...], jnp.float32) * jax.lax.rsqrt(
        jnp.asarray(bn.var[...], jnp.float32) + jnp.float32(bn.epsilon))
    c = jnp.asarray(bn.bias[...], jnp.float32) - jnp.asarray(bn.mean[...], jnp.float32) * s
    return {"conv_kernel": kernel * s, "conv_bias": c}


@functools.partial(jax.jit, static_argnames=("size",))
def _prepare(x, *, size):
    x = x.astype(jnp.float32) / (jnp.float32(255.0) if x.dtype == jnp.uint8 else jnp.float32(1.0))
    if size is not None and (x.shape[1], x.shape[2]) != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=True)
    return jnp.clip(x, 0.0, 1.0)
