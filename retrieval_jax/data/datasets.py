"""Small real data sets as numpy arrays: sklearn digits, COIL-20, MPEG-7 CE-Shape-1.

Every loader returns an ``ImageDataset`` whose ``X`` rows are flattened pixels
scaled to [0, 1] and L2-normalised (so inner products are cosine similarities),
with integer labels 0..C-1. Images are read with Pillow and resized with its
bilinear filter (antialiased when shrinking), which is deterministic.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .. import _checks

__all__ = ["ImageDataset", "default_data_dir", "load_coil20", "load_digits", "load_mpeg7"]

ENV_VAR = "RETRIEVAL_JAX_DATA"


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image collection.

    Attributes:
      X: float32[n, d] flattened pixels in [0, 1], each row L2-normalised.
      labels: int64[n] class index in 0..C-1, ``class_names[labels[i]]`` is the class.
      class_names: C class names.
      paths: n source files (None for bundled data such as digits).
      images: uint8[n, h, w] the images X was made of (0 = black), if requested.
    """

    X: np.ndarray
    labels: np.ndarray
    class_names: tuple
    paths: tuple | None = None
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return self.X.shape[0]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def default_data_dir() -> Path:
    """The shared data directory.

    ``$RETRIEVAL_JAX_DATA`` if set, else ``../shared/data`` beside the repository
    root (the read-only copy kept next to the project).

    Raises:
      FileNotFoundError: the directory does not exist.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={env} is not a directory")
        return path
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"no data directory: {path} does not exist; set {ENV_VAR} to the folder holding "
            "coil20/, mpeg7/, revisitop/ ... or pass root= explicitly")
    return path


def _resolve_root(root, name: str) -> Path:
    path = default_data_dir() / name if root is None else Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name} directory not found: {path}")
    return path


def _check_size(size) -> int:
    if not _checks.is_int(size) or size <= 0:
        raise ValueError(f"size must be a positive int (pixels per side), got {size!r}")
    return int(size)


def _l2_rows(pixels: np.ndarray, names) -> np.ndarray:
    X = pixels.reshape(pixels.shape[0], -1).astype(np.float32) / np.float32(255.0)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{zero.size} image(s) are entirely black and cannot be L2-normalised "
                         f"(first: {names[zero[0]]})")
    return X / norms


def _dataset(pixels, labels, class_names, paths, images: bool) -> ImageDataset:
    return ImageDataset(X=_l2_rows(pixels, paths or range(len(pixels))),
                        labels=np.asarray(labels, np.int64), class_names=tuple(class_names),
                        paths=None if paths is None else tuple(paths),
                        images=pixels if images else None)


def _scan(root: Path, pattern: re.Pattern, expected: int, name: str):
    matches = []
    for entry in os.listdir(root):
        m = pattern.match(entry)
        if m:
            matches.append((m, root / entry))
    if not matches:
        raise FileNotFoundError(f"no {name} images found in {root} "
                                f"(expected file names like {pattern.pattern})")
    if len(matches) != expected:
        warnings.warn(f"{root} holds {len(matches)} {name} images, the benchmark has {expected}; "
                      "published scores will not be comparable", stacklevel=4)
    return matches


def _resize(img, size: int):
    from PIL import Image

    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR)


def load_digits(*, images: bool = False) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download).

    X holds the raw 0..16 pixel values, L2-normalised (no centering): float32[1797, 64].
    ``images`` are uint8[1797, 8, 8] rescaled to 0..255 for display.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover
        raise ImportError("load_digits needs scikit-learn (its digits ship inside the wheel)") \
            from exc
    bunch = _sk_load_digits()
    raw = np.asarray(bunch.images, np.float64)  # [n, 8, 8] in 0..16
    X = raw.reshape(raw.shape[0], -1).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    imgs = np.round(raw * (255.0 / 16.0)).astype(np.uint8) if images else None
    return ImageDataset(X=X, labels=np.asarray(bunch.target, np.int64),
                        class_names=tuple(str(c) for c in bunch.target_names), paths=None,
                        images=imgs)


_COIL = re.compile(r"^obj(\d+)__(\d+)\.png$", re.IGNORECASE)


def _load_folder(root, default: str, size, images: bool, *, pattern, expected: int, title: str,
                 label_of, number_of, class_name, pixels_of) -> ImageDataset:
    """A labelled image folder: the files matching ``pattern`` sorted by (class, number),
    labels indexing the sorted classes, ``pixels_of(image, size)`` -> uint8[size, size]."""
    from PIL import Image

    root = _resolve_root(root, default)
    size = _check_size(size)
    files = sorted(_scan(root, pattern, expected, title),
                   key=lambda mp: (label_of(mp[0]), number_of(mp[0])))
    classes = sorted({label_of(m) for m, _ in files})
    code = {c: i for i, c in enumerate(classes)}
    pixels = np.empty((len(files), size, size), np.uint8)
    for i, (_, path) in enumerate(files):
        with Image.open(path) as img:
            pixels[i] = pixels_of(img, size)
    labels = [code[label_of(m)] for m, _ in files]
    return _dataset(pixels, labels, [class_name(c) for c in classes], [str(p) for _, p in files], images)


def load_coil20(root=None, size: int = 32, *, images: bool = False) -> ImageDataset:
    """COIL-20 (Nene, Nayar & Murase, 1996): 20 objects x 72 poses, 128x128 grey.

    Files ``obj<k>__<pose>.png`` are sorted by (k, pose); label = index of k among
    the objects present (k - 1 for the full set). Images are resized to
    ``size`` x ``size`` (bilinear), flattened and L2-normalised.

    Args:
      root: folder holding the PNGs; default ``default_data_dir() / "coil20"``.
      size: output side in pixels (128 keeps the originals).
      images: also return the resized uint8[n, size, size] images.

    Returns:
      ``ImageDataset`` with X float32[1440, size*size], labels 0..19, paths.
    """
    def pixels_of(img, size):
        return np.asarray(_resize(img.convert("L"), size))

    return _load_folder(root, "coil20", size, images, pattern=_COIL, expected=1440, title="COIL-20",
                        label_of=lambda m: int(m.group(1)), number_of=lambda m: int(m.group(2)),
                        class_name=lambda k: f"obj{k}", pixels_of=pixels_of)


_MPEG7 = re.compile(r"^(.+)-(\d+)\.gif$", re.IGNORECASE)


def load_mpeg7(root=None, size: int = 32, *, images: bool = False) -> ImageDataset:
    """MPEG-7 CE-Shape-1 part B (Latecki et al., CVPR 2000): 70 classes x 20 silhouettes.

    Files ``<class>-<n>.gif`` (white shape on black, sizes from 38 to 1116 pixels)
    are sorted by (class, n); labels index the sorted class names. Each
    silhouette is padded with black to a centred square (keeping its aspect
    ratio), resized to ``size`` x ``size`` (bilinear), flattened, L2-normalised.

    Args:
      root: folder holding the GIFs; default ``default_data_dir() / "mpeg7"``.
      size: output side in pixels.
      images: also return the resized uint8[n, size, size] images.

    Returns:
      ``ImageDataset`` with X float32[1400, size*size], labels 0..69, paths.
    """
    from PIL import Image

    def pixels_of(img, size):  # pad with black to a centred square, then resize
        grey = img.convert("L")
        w, h = grey.size
        side = max(w, h)
        square = Image.new("L", (side, side), 0)
        square.paste(grey, ((side - w) // 2, (side - h) // 2))
        return np.asarray(_resize(square, size))

    return _load_folder(root, "mpeg7", size, images, pattern=_MPEG7, expected=1400, title="MPEG-7",
                        label_of=lambda m: m.group(1), number_of=lambda m: int(m.group(2)),
                        class_name=str, pixels_of=pixels_of)
