"""Global-descriptor extraction: images -> CNN feature maps -> pooled descriptors.

The host loop reads and resizes images (PIL), groups them into fixed-shape
buckets and runs one jit-compiled ``pooling(model.features(x), mask=...)`` per
full bucket, so XLA compiles once per bucket shape instead of once per image size:

* every image is resized so that its longer side equals ``max_size`` (if given);
* its height and width are rounded up to a multiple of ``multiple`` (default
  32, and always a multiple of the model's stride) and it is padded at the bottom
  and right with the model's mean colour (zero after normalisation, like the
  network's own zero padding);
* a bucket is run when it holds ``batch_size`` images (the last, partial bucket is
  filled with dummy images whose outputs are discarded);
* a validity mask ``bool[B, H', W']`` (True = feature cell inside the image) is
  passed to the pooling so padded cells are ignored.

Bucketing is exact for the pooling (masked cells never count) but not for the
network: valid cells near the bottom/right border see the padding through their
receptive field. For EfficientNet-Lite0 at ``max_size=200`` the padded GeM
descriptor has cosine ~0.9 with the unpadded one (less impact at larger sizes);
pass ``multiple=1`` to run every distinct image size unpadded (exact, but one
compilation per size).

Multi-scale extraction (``scales=(1, 1/sqrt(2), 1/2)``, as in Radenovic et al.,
"Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2018) sums the
descriptors of all scales and L2-normalises the sum.

The result can be cached in an ``.npz`` file, written atomically.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import warnings
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._progress import progress as _progress
from ..files import atomic_write
from .pooling import gem

__all__ = ["extract", "Extracted", "ImageReadError", "load_image", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
_CACHE_VERSION = 1


class ImageReadError(ValueError):
    """An image file could not be opened or decoded."""


class Extracted(NamedTuple):
    """Result of :func:`extract`.

    descriptors: ``[N, D]`` float32, one row per kept image, in input order.
    names: the ``N`` kept image names (file paths, or ``"#<index>"`` for arrays).
    skipped: names of unreadable files skipped with ``skip_bad=True``.
    """
    descriptors: np.ndarray
    names: tuple
    skipped: tuple


# ---------------------------------------------------------------------------
# Image reading and resizing (host side)
# ---------------------------------------------------------------------------

def load_image(path) -> np.ndarray:
    """Read an image file as float32 RGB ``[H, W, 3]`` in ``[0, 1]``.

    Raises :class:`ImageReadError` (naming the file) if it cannot be decoded.
    """
    from PIL import Image
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
        arr = np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"cannot read image {path}: decoded to shape {arr.shape}")
    return arr.astype(np.float32) / np.float32(255.0)


def _as_image(arr, name: str) -> np.ndarray:
    """Validate an in-memory image; grey ``[H, W]`` / ``[H, W, 1]`` is replicated to RGB."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"image {name} must be [H, W, 3] (or grey [H, W]), got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[-1] != 3:
        hint = " (channels-first? transpose to [H, W, 3])" if a.shape[0] in (1, 3) else ""
        raise ValueError(f"image {name} must have 3 channels in the last axis, got shape "
                         f"{a.shape}{hint}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image {name} is empty: shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"image {name} must be uint8 or float in [0, 1], got dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"image {name} contains NaN or inf")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"image {name} has values in [{lo:g}, {hi:g}]; float images must lie "
                         "in [0, 1] (divide 0-255 data by 255)")
    return np.clip(a, 0.0, 1.0)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of ``[H, W, 3]`` float32."""
    if img.shape[0] == height and img.shape[1] == width:
        return img
    from PIL import Image
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32))
                        .resize((width, height), Image.BILINEAR)) for c in range(img.shape[2])]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)


def _target_size(h: int, w: int, max_size: int | None, scale: float) -> tuple[int, int]:
    s = scale * (max_size / max(h, w) if max_size else 1.0)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------

def _list_folder(folder: str) -> list[str]:
    names = sorted(f for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not names:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}")
    return [os.path.join(folder, f) for f in names]


def _sources(images) -> tuple[Iterable, int | None, list[str] | None]:
    """-> (iterable of (name, path-or-array), total or None, list of names if known)."""
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if os.path.isdir(path):
            paths = _list_folder(path)
        elif os.path.isfile(path):
            paths = [path]
        else:
            raise FileNotFoundError(f"no such image folder or file: {path}")
        return [(p, p) for p in paths], len(paths), paths
    if isinstance(images, np.ndarray) or isinstance(images, jax.Array):
        arr = np.asarray(images)
        if arr.ndim != 4:
            raise ValueError("an array of images must be a batch [N, H, W, 3], got shape "
                             f"{arr.shape}; pass a list for images of different sizes")
        names = [f"#{i}" for i in range(arr.shape[0])]
        return list(zip(names, arr)), arr.shape[0], names
    if isinstance(images, (list, tuple)):
        items, names = [], []
        for i, x in enumerate(images):
            if isinstance(x, (str, os.PathLike)):
                names.append(os.fspath(x))
                items.append((os.fspath(x), os.fspath(x)))
            else:
                names.append(f"#{i}")
                items.append((f"#{i}", x))
        if not items:
            raise ValueError("images is an empty list")
        return items, len(items), names
    if isinstance(images, Iterable):
        total = len(images) if hasattr(images, "__len__") else None
        return ((f"#{i}", x) for i, x in enumerate(images)), total, None
    raise TypeError("images must be a folder path, a list of paths or arrays, an [N, H, W, 3] "
                    f"array or an iterable of [H, W, 3] arrays; got {type(images).__name__}")


# ---------------------------------------------------------------------------
# The jitted batch step
# ---------------------------------------------------------------------------

def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _partition(tree):
    """Split a pytree into (hashable static part, array leaves)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic = [leaf if _is_array(leaf) else None for leaf in leaves]
    static = (treedef, tuple(None if _is_array(leaf) else leaf for leaf in leaves))
    try:
        hash(static)
    except TypeError as exc:
        raise TypeError(f"{type(tree).__name__} must be a JAX pytree whose non-array parts are "
                        f"hashable (e.g. a frozen dataclass or a plain function): {exc}") from None
    return static, dynamic


def _combine(static, dynamic):
    treedef, static_leaves = static
    leaves = [d if s is None else s for s, d in zip(static_leaves, dynamic)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnames=("static", "use_mask"))
def _describe_batch(static, dynamic, images, mask, *, use_mask: bool):
    """``images [B, Hb, Wb, 3]``, ``mask bool[B, H', W']`` -> descriptors ``[B, D]`` float32."""
    model, pooling = _combine(static, dynamic)
    fmap = model.features(images).astype(jnp.float32)
    if use_mask and fmap.shape[1:3] != mask.shape[1:3]:
        raise ValueError(f"model.features gave a {fmap.shape[1:3]} map for a "
                         f"{images.shape[1:3]} input but model.feature_shape predicted "
                         f"{mask.shape[1:3]}")
    desc = pooling(fmap, mask=mask) if use_mask else pooling(fmap)
    if desc.ndim != 2 or desc.shape[0] != images.shape[0]:
        raise ValueError(f"pooling must return [B, D] descriptors, got shape {desc.shape}")
    return desc.astype(jnp.float32)


def _accepts_mask(pooling: Callable) -> bool:
    try:
        params = inspect.signature(pooling).parameters
    except (TypeError, ValueError):
        return False
    return "mask" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _feature_shape_fn(model) -> Callable[[int, int], tuple[int, int]]:
    fs = getattr(model, "feature_shape", None)
    if callable(fs):
        return lambda h, w: tuple(int(v) for v in fs(h, w))

    @functools.lru_cache(maxsize=None)
    def probe(h, w):  # generic fallback: trace once per size, no compute
        out = jax.eval_shape(model.features, jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
        return int(out.shape[1]), int(out.shape[2])
    return probe


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------

def _describe(obj) -> str:
    if isinstance(obj, functools.partial):
        return (f"partial({_describe(obj.func)}, args={obj.args!r}, "
                f"kwargs={sorted(obj.keywords.items())!r})")
    name = getattr(obj, "name", None)
    if isinstance(name, str):
        dtype = getattr(obj, "dtype", None)
        return f"{type(obj).__name__}:{name}" + (f":{jnp.dtype(dtype).name}" if dtype else "")
    qual = getattr(obj, "__qualname__", None)
    if qual:
        return f"{getattr(obj, '__module__', '')}.{qual}"
    return type(obj).__name__


def _write_npz_atomic(path: str, **arrays) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _read_cache(path: str, config: str, names: list[str] | None) -> Extracted | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            cached_config = str(z["config"])
            result = Extracted(np.asarray(z["descriptors"], np.float32),
                               tuple(str(n) for n in z["names"]),
                               tuple(str(n) for n in z["skipped"]))
    except Exception as exc:
        warnings.warn(f"ignoring unreadable descriptor cache {path} ({exc}); recomputing",
                      stacklevel=3)
        return None
    if cached_config != config:
        warnings.warn(f"descriptor cache {path} was built with different settings; recomputing",
                      stacklevel=3)
        return None
    if names is not None and sorted(result.names + result.skipped) != sorted(names):
        warnings.warn(f"descriptor cache {path} holds a different image list; recomputing",
                      stacklevel=3)
        return None
    return result


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------

def extract(images, model, pooling: Callable | None = None, *, batch_size: int = 16,
            max_size: int | None = None, scales=(1.0,), cache=None, skip_bad: bool = False,
            multiple: int = 32, normalize: bool = True,
            progress: bool | None = None) -> Extracted:
    """Extract one global descriptor per image.

    Args:
      images: a folder (every ``IMAGE_EXTENSIONS`` file, sorted by name), a list of
        paths and/or ``[H, W, 3]`` arrays, an ``[N, H, W, 3]`` array, or any iterable
        of ``[H, W, 3]`` arrays (uint8, or float in ``[0, 1]``; grey ``[H, W]`` is
        replicated to RGB).
      model: an object with ``features(images [B, H, W, 3]) -> [B, H', W', C]`` that is
        a JAX pytree (e.g. a :class:`~retrieval_jax.backbones.base.Backbone`);
        ``model.feature_shape(h, w)`` gives the valid map size (else it is traced),
        and ``model.mean`` (if present) is the padding colour.
      pooling: ``pooling(fmap [B, H', W', C], mask=bool[B, H', W']) -> [B, D]``; a pooling
        without a ``mask`` parameter is run on unpadded, exact-shape batches only.
        Default: masked GeM with p = 3.
      batch_size: images per jitted call (fixed, so each bucket compiles once).
      max_size: resize every image so its longer side is ``max_size`` (None: keep).
      scales: e.g. ``(1, 1/sqrt(2), 1/2)``; descriptors are summed over scales.
      cache: ``.npz`` path; reused if it was built with the same settings (model name
        and dtype, pooling, sizes, scales) and the same file list, otherwise (re)written
        atomically. Weights and in-memory pixels are not fingerprinted: delete the
        cache after changing either (arrays are only checked by count, iterators
        not at all).
      skip_bad: skip unreadable files with a warning instead of raising
        :class:`ImageReadError`.
      multiple: pad height and width up to a multiple of this (and of the model
        stride); ``1`` disables shape bucketing.
      normalize: L2-normalise the final descriptors (always on for several scales).
      progress: show a tqdm bar (``None``: for 20+ images unless
        ``RETRIEVAL_JAX_NO_PROGRESS`` is set).

    Returns :class:`Extracted` ``(descriptors [N, D] float32, names, skipped)``.
    """
    scales, pooling = _check_options(model, pooling, batch_size=batch_size, max_size=max_size,
                                     scales=scales, multiple=multiple)
    use_mask = _accepts_mask(pooling)
    stride = int(getattr(model, "stride", 1) or 1)
    bucket = math.lcm(int(multiple), stride) if (use_mask and multiple > 1) else 1
    normalize = bool(normalize) or len(scales) > 1

    sources, total, names = _sources(images)
    config = _cache_config(model, pooling, max_size=max_size, scales=scales, bucket=bucket,
                           normalize=normalize)
    if cache is not None:
        cache = _check_cache_path(cache)
        if os.path.exists(cache):
            cached = _read_cache(cache, config, names)
            if cached is not None:
                return cached

    batches = _Batches(model, pooling, batch_size=batch_size, bucket=bucket, use_mask=use_mask)
    kept_names: list[str] = []
    skipped: list[str] = []
    bar = _progress(sources, desc="extract", total=total, enable=progress)
    for name, src in bar:
        img = _read_source(name, src, skip_bad=skip_bad)
        if img is None:
            skipped.append(name)
            continue
        batches.add_image(len(kept_names), name, img, scales=scales, max_size=max_size)
        kept_names.append(name)
    batches.flush()

    result = _finish(batches.sums, kept_names, skipped, normalize=normalize)
    if cache is not None:
        _write_npz_atomic(cache, descriptors=result.descriptors,
                          names=np.asarray(result.names, dtype=str),
                          skipped=np.asarray(result.skipped, dtype=str),
                          config=np.asarray(config))
    return result


# ---------------------------------------------------------------------------
# The steps of extract
# ---------------------------------------------------------------------------

def _check_options(model, pooling, *, batch_size, max_size, scales, multiple):
    """Validate the options of `extract`; returns (scales as a float tuple, pooling)."""
    _checks.check_positive_int(batch_size, "batch_size")
    if max_size is not None and (not isinstance(max_size, (int, np.integer))
                                 or isinstance(max_size, bool) or max_size < 1):
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
    scales = tuple(float(s) for s in np.atleast_1d(np.asarray(scales, dtype=np.float64)))
    if not scales or not all(s > 0 and math.isfinite(s) for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    if not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if not callable(getattr(model, "features", None)):
        raise TypeError(f"model must have a features(images) method, got {type(model).__name__}")
    pooling = gem if pooling is None else pooling
    if not callable(pooling):
        raise TypeError(f"pooling must be callable, got {type(pooling).__name__}")
    return scales, pooling


def _cache_config(model, pooling, *, max_size, scales, bucket, normalize) -> str:
    """The settings a cache must have been built with, as a JSON string."""
    return json.dumps({"version": _CACHE_VERSION, "model": _describe(model),
                       "pooling": _describe(pooling), "max_size": max_size,
                       "scales": scales, "bucket": bucket, "normalize": normalize},
                      sort_keys=True)


def _check_cache_path(cache) -> str:
    cache = os.fspath(cache)
    if not cache.endswith(".npz"):
        raise ValueError(f"cache must be an .npz path, got {cache}")
    return cache


def _read_source(name: str, src, *, skip_bad: bool) -> np.ndarray | None:
    """One image as an array; None for an unreadable file with ``skip_bad`` (with a warning)."""
    if not isinstance(src, str):
        return _as_image(src, name)
    try:
        return load_image(src)
    except (ImageReadError, FileNotFoundError) as exc:
        if not skip_bad:
            raise
        warnings.warn(f"skipping unreadable image: {exc}", stacklevel=3)
        return None


class _Batches:
    """Resized images queued per padded shape, described ``batch_size`` at a time by one
    jitted call; ``sums[idx]`` is the sum over scales of the descriptors of image ``idx``."""

    def __init__(self, model, pooling, *, batch_size: int, bucket: int, use_mask: bool):
        self.static, self.dynamic = _partition((model, pooling))
        self.batch_size, self.bucket, self.use_mask = batch_size, bucket, use_mask
        self.feature_shape = _feature_shape_fn(model)
        pad_value = np.asarray(getattr(model, "mean", (0.0, 0.0, 0.0)), np.float32).reshape(-1)
        self.pad_value = np.broadcast_to(pad_value, (3,)).astype(np.float32)
        self.pending: dict[tuple[int, int], list] = {}
        self.sums: dict[int, np.ndarray] = {}

    def add_image(self, idx: int, name: str, img: np.ndarray, *, scales, max_size) -> None:
        """Queue image ``idx`` at every scale, running each queue that fills up."""
        bucket = self.bucket
        for s in scales:
            h, w = _target_size(img.shape[0], img.shape[1], max_size, s)
            if self.use_mask:
                vh, vw = self.feature_shape(h, w)
                if vh < 1 or vw < 1:
                    raise ValueError(f"image {name} is too small for the model at scale {s:g}: "
                                     f"{h}x{w} px gives a {vh}x{vw} feature map")
            resized = _resize(img, h, w)
            shape = (-(-h // bucket) * bucket, -(-w // bucket) * bucket)
            queue = self.pending.setdefault(shape, [])
            queue.append((idx, resized))
            if len(queue) == self.batch_size:
                self._run(shape, queue)
                del self.pending[shape]

    def flush(self) -> None:
        """Run the partly filled queues."""
        for shape, queue in list(self.pending.items()):
            self._run(shape, queue)
        self.pending.clear()

    def _run(self, shape, items) -> None:
        hb, wb = shape
        use_mask, feature_shape = self.use_mask, self.feature_shape
        fh, fw = feature_shape(hb, wb) if use_mask else (None, None)
        batch = np.empty((self.batch_size, hb, wb, 3), np.float32)
        batch[...] = self.pad_value
        mask = np.zeros((self.batch_size, fh or 1, fw or 1), np.bool_)
        for j, (_, img) in enumerate(items):
            batch[j, :img.shape[0], :img.shape[1]] = img
            if use_mask:
                vh, vw = feature_shape(img.shape[0], img.shape[1])
                mask[j, :vh, :vw] = True
        mask[len(items):] = True  # dummy rows: keep the pooling finite
        out = np.asarray(_describe_batch(self.static, self.dynamic, jnp.asarray(batch),
                                         jnp.asarray(mask), use_mask=use_mask))
        sums = self.sums
        for j, (idx, _) in enumerate(items):
            sums[idx] = out[j] if idx not in sums else sums[idx] + out[j]


def _finish(sums: dict, kept_names: list, skipped: list, *, normalize: bool) -> Extracted:
    """Stack the per-image sums (checked finite, L2-normalised if asked) into `Extracted`."""
    if not kept_names:
        raise ValueError("no readable images: every file was skipped" if skipped
                         else "no images given")
    desc = np.stack([sums[i] for i in range(len(kept_names))]).astype(np.float32)
    if not np.isfinite(desc).all():
        bad = [kept_names[i] for i in np.flatnonzero(~np.isfinite(desc).all(axis=1))[:5]]
        raise ValueError(f"non-finite descriptors for {bad}; check the pooling")
    if normalize:
        norms = np.linalg.norm(desc, axis=1, keepdims=True)
        desc = desc / np.maximum(norms, np.float32(1e-12))
    return Extracted(desc, tuple(kept_names), tuple(skipped))
