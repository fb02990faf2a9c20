"""The backbone wrapper shared by every architecture, and torch-layout weight loading.

Every model is wrapped in :class:`Backbone`, a frozen dataclass registered as a
JAX pytree (weights are the leaves; architecture and preprocessing are static),
so it can be passed straight into ``jax.jit``. ``Backbone.features`` and
``Backbone.logits`` are jit-compiled (once per input shape and dtype).
:func:`load_state_into` fills a Flax NNX module with a PyTorch-layout state dict.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Backbone", "check_dtype", "load_state_into", "torch_leaf"]


# ---------------------------------------------------------------------------
# Generic wrapper
# ---------------------------------------------------------------------------

def _check_images(images, name: str = "images") -> jax.Array:
    """Shape/dtype checks that also work on tracers (shapes are static)."""
    shape = getattr(images, "shape", None)
    if shape is None:
        images = np.asarray(images)
        shape = images.shape
    if len(shape) != 4:
        raise ValueError(f"{name} must be a 4-D batch [B, H, W, 3] (NHWC), got shape "
                         f"{tuple(shape)}; add a batch axis with x[None] for one image")
    if shape[-1] != 3:
        hint = " (channels-first input? transpose to [B, H, W, 3])" if shape[1] == 3 else ""
        raise ValueError(f"{name} must have 3 RGB channels in the last axis, got shape "
                         f"{tuple(shape)}{hint}")
    if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"{name} has an empty spatial size: {tuple(shape)}")
    dtype = jnp.dtype(images.dtype)
    if not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.uint8):
        raise TypeError(f"{name} must be float in [0, 1] or uint8, got dtype {dtype}")
    return images


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "mean", "std"))
def _apply(graphdef, state, images, *, method: str, mean, std):
    model = nnx.merge(graphdef, state)
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / jnp.float32(255.0)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return getattr(model, method)(x)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A pretrained CNN ready for inference; a JAX pytree.

    Fields
    ------
    name: architecture name, e.g. ``"efficientnet-lite0"``.
    graphdef, state: the ``nnx.split`` of the Flax module (``state`` are the leaves).
    image_size: training resolution (square side), e.g. 224.
    mean, std: per-channel normalisation applied to ``[0, 1]`` RGB inputs.
    out_channels: channels ``C`` of the last conv feature map.
    strides: the spatial reductions of the network, e.g. ``(2, 2, 2, 2, 2)``.
    round_mode: ``"ceil"`` if every reduction maps ``n -> ceil(n / s)``
        (SAME / symmetric padding), ``"floor"`` for unpadded pooling (VGG).
    num_classes: size of the classifier output, 0 when there is no classifier.
    """
    name: str
    graphdef: Any
    state: Any
    image_size: int
    mean: tuple
    std: tuple
    out_channels: int
    strides: tuple
    round_mode: str = "ceil"
    num_classes: int = 1000

    @property
    def dtype(self):
        """Compute dtype of the network."""
        return self.module().dtype

    @property
    def stride(self) -> int:
        """Total downsampling factor of the feature map."""
        return int(np.prod(self.strides))

    def module(self) -> nnx.Module:
        """The Flax NNX module (a fresh object sharing this backbone's arrays)."""
        return nnx.merge(self.graphdef, self.state)

    def normalize(self, images) -> jax.Array:
        """``[B, H, W, 3]`` in ``[0, 1]`` -> network input (float32)."""
        images = _check_images(images)
        x = jnp.asarray(images).astype(jnp.float32)
        if jnp.dtype(images.dtype) == jnp.uint8:
            x = x / 255.0
        return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

    def features(self, images) -> jax.Array:
        """Last conv feature map ``[B, H', W', out_channels]`` in the compute dtype."""
        images = _check_images(images)
        return _apply(self.graphdef, self.state, images, method="features",
                      mean=self.mean, std=self.std)

    def logits(self, images) -> jax.Array:
        """ImageNet class scores ``[B, num_classes]`` (float32)."""
        if not self.num_classes:
            raise ValueError(f"{self.name} was loaded without classifier weights; "
                             "only features() is available")
        images = _check_images(images)
        return _apply(self.graphdef, self.state, images, method="logits",
                      mean=self.mean, std=self.std).astype(jnp.float32)

    def feature_shape(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size ``(H', W')`` of ``features`` for an ``H x W`` input."""
        h, w = int(height), int(width)
        for s in self.strides:
            if self.round_mode == "ceil":
                h, w = -(-h // s), -(-w // s)
            else:
                h, w = h // s, w // s
        return h, w

    def __repr__(self) -> str:
        return (f"Backbone({self.name}, image_size={self.image_size}, C={self.out_channels}, "
                f"stride={self.stride})")


jax.tree_util.register_dataclass(
    Backbone, data_fields=["state"],
    meta_fields=["name", "graphdef", "image_size", "mean", "std", "out_channels", "strides",
                 "round_mode", "num_classes"])


# ---------------------------------------------------------------------------
# State-dict loading shared by every architecture
# ---------------------------------------------------------------------------

_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _torch_value(leaf: str, array: np.ndarray) -> np.ndarray:
    """PyTorch tensor layout -> Flax layout."""
    if leaf == "kernel" and array.ndim == 4:   # conv [out, in/g, kh, kw] -> [kh, kw, in/g, out]
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:   # linear [out, in] -> [in, out]
        return array.T
    return array


def load_state_into(abstract: nnx.Module, state_dict: dict, path_to_key: Callable,
                    *, what: str) -> tuple[Any, Any]:
    """Fill an abstract (``nnx.eval_shape``) module with a torch-layout state dict.

    ``path_to_key(path) -> str`` maps a Flax state path, e.g.
    ``("blocks", 3, "expand_conv", "kernel")``, to the PyTorch key, e.g.
    ``"_blocks.3._expand_conv.weight"``. Raises ``KeyError`` listing every missing
    key, and ``ValueError`` listing unexpected keys or shape mismatches.
    Returns ``(graphdef, state)``.
    """
    graphdef, abstract_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abstract_state)
    used, missing, mismatched, new = set(), [], [], []
    for path, var in flat:
        key = path_to_key(path)
        expected = var.get_value().shape
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        arr = np.asarray(state_dict[key])
        value = _torch_value(path[-1], arr)
        if value.shape != tuple(expected):
            mismatched.append(f"{key}: file has {arr.shape}, {what} needs "
                              f"{_torch_shape(path[-1], expected)}")
            continue
        dtype = var.get_value().dtype
        new.append((path, var.replace(jnp.asarray(value, dtype=dtype))))
    if missing:
        raise KeyError(f"state dict is missing {len(missing)} key(s) needed by {what}: "
                       + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if mismatched:
        raise ValueError(f"shape mismatch loading {what}: " + "; ".join(mismatched[:10]))
    unexpected = sorted(k for k in state_dict if k not in used
                        and not k.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"state dict has {len(unexpected)} key(s) {what} does not use: "
                         + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    return graphdef, nnx.from_flat_state(new)


def _torch_shape(leaf: str, flax_shape) -> tuple:
    s = tuple(flax_shape)
    if leaf == "kernel" and len(s) == 4:
        return (s[3], s[2], s[0], s[1])
    if leaf == "kernel" and len(s) == 2:
        return (s[1], s[0])
    return s


def torch_leaf(leaf: str, is_bn: bool) -> str:
    """Flax leaf name -> PyTorch parameter name."""
    if is_bn:
        return _BN_LEAVES[leaf]
    return {"kernel": "weight", "bias": "bias"}[leaf]


def check_dtype(dtype):
    """The compute dtype of a backbone: float32, bfloat16 or float16 (else ValueError)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype
