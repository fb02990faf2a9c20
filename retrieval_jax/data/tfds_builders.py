"""TensorFlow Datasets builders for retrieval benchmarks (optional extra ``[tfds]``).

Install with ``pip install 'retrieval-jax[tfds]'`` (``tensorflow-datasets`` and
``tensorflow-cpu``). The plain numpy loaders of ``retrieval_jax.data``
(``load_gnd``, ``load_coil20``, ``load_mpeg7``) stay the default path and never
import TensorFlow; this module is imported only on demand.

Builders (``tfds.core.GeneratorBasedBuilder``; nothing is ever downloaded, every
builder reads ``dl_manager.manual_dir``):

* ``RevisitedOxfordParis`` (configs ``roxford5k``, ``rparis6k``): the Revisited
  Oxford and Paris benchmark (Radenovic, Iscen, Tolias, Avrithis & Chum,
  "Revisiting Oxford and Paris: Large-Scale Image Retrieval Benchmarking",
  CVPR 2018). Splits ``database`` and ``query``; queries are cropped to their
  ``bbx`` and carry the easy / hard / junk ground truth.
* ``LabelledImageFolder`` (configs ``subfolders``, ``coil20``, ``mpeg7``): a
  labelled image folder, either one sub-folder per class or a flat folder whose
  file names give the label through a regular expression. Presets for COIL-20
  (Nene, Nayar & Murase, "Columbia Object Image Library (COIL-20)", Technical
  Report CUCS-005-96, 1996) and MPEG-7 CE-Shape-1 part B (Latecki, Lakaemper &
  Eckhardt, "Shape descriptors for non-rigid shapes with a single closed
  contour", CVPR 2000). One split, ``train`` (``split="all"`` reads it too).

Images are decoded with Pillow and converted to uint8 RGB (``Image.convert("RGB")``:
greyscale is replicated to three channels, GIF / PNG palettes are expanded, an
alpha channel is dropped, CMYK is converted; EXIF orientation is *not* applied,
as in the revisitop reference code). They are stored PNG-encoded (lossless), so
the decoded pixels equal what Pillow decoded from the source file. Note that
this makes the full-resolution Oxford / Paris databases large on disk (several GB).

Plain-Python helpers ``load_tfds_folder``, ``load_tfds_revisited`` and
``as_numpy`` prepare a builder and return numpy arrays, ready for descriptors.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .loaders import GroundTruth, load_gnd

_EXTRA_HINT = ("retrieval_jax.data.tfds_builders needs the optional TensorFlow Datasets extra: "
               "pip install 'retrieval-jax[tfds]' (tensorflow-datasets, tensorflow-cpu, "
               "importlib_resources). The numpy loaders in retrieval_jax.data work without it.")

try:
    import tensorflow_datasets as tfds
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(_EXTRA_HINT) from exc

# tensorflow_datasets imports these lazily, so a missing one would only fail while
# preparing a dataset; check now (find_spec does not import TensorFlow).
# importlib_resources: used by tfds 4.9.x but not declared (tensorflow/datasets#11212).
_missing = [m for m in ("tensorflow", "importlib_resources") if importlib.util.find_spec(m) is None]
if _missing:  # pragma: no cover
    raise ModuleNotFoundError(f"missing {', '.join(_missing)}: {_EXTRA_HINT}",
                              name=_missing[0])

__all__ = [
    "LabelledImageFolder",
    "LabelledImageFolderConfig",
    "RevisitedOxfordParis",
    "as_numpy",
    "crop_box",
    "load_tfds_folder",
    "load_tfds_revisited",
    "prepare_builder",
    "read_rgb",
    "scan_labelled_folder",
]

_MAX_LISTED = 10  # missing files listed in error messages


# ---------------------------------------------------------------------------
# Shared helpers (pure numpy / Pillow)
# ---------------------------------------------------------------------------

def read_rgb(path) -> np.ndarray:
    """Decode an image file to uint8[h, w, 3] RGB with Pillow (first frame of a GIF)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def crop_box(bbx, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop ``(x1, y1, x2, y2)`` of a revisitop query box.

    ``bbx`` is ``[x1, y1, x2, y2]`` in pixels, as published. Coordinates are
    rounded the way ``PIL.Image.crop`` rounds them (the revisitop / cirtorch
    reference crops with ``img.crop(bbx)``), then clipped to the image; the crop
    is ``pixels[y1:y2, x1:x2]``.

    Raises:
      ValueError: the box is not 4 finite numbers or is empty inside the image.
    """
    box = np.asarray(bbx, np.float64).reshape(-1)
    if box.size != 4 or not np.isfinite(box).all():
        raise ValueError(f"bbx should be 4 finite numbers [x1, y1, x2, y2], got {bbx!r}")
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
    y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbx {box.tolist()} is empty inside a {width}x{height} image")
    return x1, y1, x2, y2


def _natural_key(text: str) -> tuple:
    """Sort key ordering digit runs numerically ('obj2' < 'obj10')."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


def _class_order(names) -> list[str]:
    """Class strings sorted numerically if all are integers, else lexicographically."""
    names = set(names)
    if all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _missing_error(root: Path, what: str, missing: list[str], total: int,
                   instructions: str) -> FileNotFoundError:
    shown = "\n  ".join(missing[:_MAX_LISTED])
    more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    return FileNotFoundError(
        f"{root}: {len(missing)} of {total} {what} missing:\n  {shown}{more}\n{instructions}")


def _manual_dir(dl_manager, instructions: str) -> Path:
    try:
        path = dl_manager.manual_dir
    except AssertionError as exc:  # tfds raises AssertionError for a missing / empty dir
        raise FileNotFoundError(f"{exc}\n{instructions}") from exc
    return Path(os.fspath(path))


def _record_source(info, root: Path) -> None:
    if info.metadata is not None:
        info.metadata["manual_dir"] = str(root.resolve())


# ---------------------------------------------------------------------------
# Revisited Oxford / Paris
# ---------------------------------------------------------------------------

_REVISITED_INSTRUCTIONS = """\
Revisited Oxford / Paris (Radenovic et al., CVPR 2018) cannot be downloaded by
this builder. Put the data in the manual directory in the revisitop layout
(http://cmp.felk.cvut.cz/revisitop/), i.e. the folder `datasets/<dataset>/` that
revisitop's download script creates:

  <manual_dir>/gnd_<dataset>.pkl       ground truth (gnd_<dataset>.mat also accepted)
  <manual_dir>/jpg/<name>.jpg          every name of imlist (database) and qimlist (queries)

where <dataset> is roxford5k or rparis6k (the builder config). A manual
directory holding `<dataset>/gnd_<dataset>.pkl` and `<dataset>/jpg/` (e.g.
revisitop's `data/datasets/`) works too. Pass it with
tfds.download.DownloadConfig(manual_dir=...).
"""


class RevisitedOxfordParis(tfds.core.GeneratorBasedBuilder):
    """Revisited Oxford5k / Paris6k images with the revisitop ground truth.

    Reads (from ``dl_manager.manual_dir``, never downloading) the revisitop layout:
    ``gnd_<dataset>.pkl`` (or its ``.mat`` twin, read with
    ``retrieval_jax.data.load_gnd``: 0-based indices) and ``jpg/<name>.jpg`` for
    every name in ``imlist`` and ``qimlist``. Configs: ``roxford5k`` (4993
    database images, 70 queries), ``rparis6k`` (6322 database images, 70 queries).

    Splits (examples in benchmark order: example ``i`` is ``imlist[i]`` /
    ``qimlist[i]``; a tfds dataset has one feature set, so both splits carry
    every feature):

    * ``database``: ``image`` the whole image, ``filename`` ``<name>.jpg``,
      ``index`` position in ``imlist``; ``bbx`` / ``crop_box`` are the full
      image ``[0, 0, w, h]`` and ``easy`` / ``hard`` / ``junk`` are empty.
    * ``query``: ``image`` cropped to ``bbx`` (see ``crop_box``), ``full_height``
      / ``full_width`` the uncropped size, ``filename``, ``bbx`` float64[4]
      ``[x1, y1, x2, y2]`` as published, ``crop_box`` int64[4] the pixels kept
      (``full[y1:y2, x1:x2]``), ``index`` the query index, and the ground truth
      ``easy`` / ``hard`` / ``junk``: variable-length int64 sequences of
      0-based ``database`` indices.

    Citation: F. Radenovic, A. Iscen, G. Tolias, Y. Avrithis, O. Chum,
    "Revisiting Oxford and Paris: Large-Scale Image Retrieval Benchmarking",
    CVPR 2018.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: database and cropped query splits."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="roxford5k",
                                description="Revisited Oxford: 4993 database images, 70 queries."),
        tfds.core.BuilderConfig(name="rparis6k",
                                description="Revisited Paris: 6322 database images, 70 queries."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = _REVISITED_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                         encoding_format="png"),
            "filename": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int64),
            "full_height": tfds.features.Scalar(dtype=np.int64),
            "full_width": tfds.features.Scalar(dtype=np.int64),
            # raw bytes: tf.train.Example float lists are float32 and would round bbx
            "bbx": tfds.features.Tensor(shape=(4,), dtype=np.float64,
                                        encoding=tfds.features.Encoding.BYTES),
            "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.int64),
            "easy": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64)),
            "hard": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64)),
            "junk": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64)),
        })
        return tfds.core.DatasetInfo(
            builder=self,
            description=("Revisited Oxford / Paris landmark retrieval benchmark: database "
                         "images and queries cropped to their bounding box, with the "
                         "easy / hard / junk ground truth."),
            features=features,
            homepage="http://cmp.felk.cvut.cz/revisitop/",
            citation="""@inproceedings{Radenovic2018,
  author = {Radenovi{\\'c}, F. and Iscen, A. and Tolias, G. and Avrithis, Y. and Chum, O.},
  title = {Revisiting {Oxford} and {Paris}: Large-Scale Image Retrieval Benchmarking},
  booktitle = {CVPR},
  year = {2018}}""",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _locate(self, manual: Path) -> tuple[Path, Path]:
        """(ground-truth file, jpg folder) for this config inside ``manual``."""
        name = self.builder_config.name
        tried = []
        for base in (manual, manual / name, manual / "datasets" / name):
            for ext in (".pkl", ".mat"):
                gnd = base / f"gnd_{name}{ext}"
                tried.append(str(gnd))
                if gnd.is_file():
                    jpg = base / "jpg"
                    if not jpg.is_dir():
                        raise FileNotFoundError(
                            f"found {gnd} but no image folder {jpg}\n{_REVISITED_INSTRUCTIONS}")
                    return gnd, jpg
        raise FileNotFoundError(
            f"no ground truth for {name} in the manual directory {manual}; looked for:\n  "
            + "\n  ".join(tried) + f"\n{_REVISITED_INSTRUCTIONS}")

    def _split_generators(self, dl_manager):
        manual = _manual_dir(dl_manager, _REVISITED_INSTRUCTIONS)
        gnd_path, jpg = self._locate(manual)
        gt = load_gnd(gnd_path)
        if gt.protocol != "revisited":
            raise ValueError(f"{gnd_path} holds {gt.protocol} ground truth (ok / junk); this "
                             "builder needs the revisited easy / hard / junk files")
        for i, entry in enumerate(gt.gnd):
            if "bbx" not in entry:
                raise KeyError(f"{gnd_path}: gnd[{i}] has no 'bbx' (query bounding box)")
        names = list(dict.fromkeys(gt.imlist + gt.qimlist))
        present = set(os.listdir(jpg))
        missing = [f"{n}.jpg" for n in names if f"{n}.jpg" not in present]
        if missing:
            raise _missing_error(jpg, "images of imlist / qimlist", missing, len(names),
                                 _REVISITED_INSTRUCTIONS)
        _record_source(self.info, manual)
        return {
            "database": self._generate_examples(gt, jpg, "database"),
            "query": self._generate_examples(gt, jpg, "query"),
        }

    def _generate_examples(self, gt: GroundTruth, jpg: Path, split: str):
        empty = np.zeros(0, np.int64)
        names = gt.imlist if split == "database" else gt.qimlist
        for i, name in enumerate(names):
            full = read_rgb(jpg / f"{name}.jpg")
            h, w = full.shape[:2]
            if split == "database":
                box = (0, 0, w, h)
                bbx = np.asarray(box, np.float64)
                image, easy, hard, junk = full, empty, empty, empty
            else:
                entry = gt.gnd[i]
                bbx = np.asarray(entry["bbx"], np.float64).reshape(-1)
                try:
                    box = crop_box(bbx, w, h)
                except ValueError as exc:
                    raise ValueError(f"query {i} ({name}.jpg): {exc}") from exc
                x1, y1, x2, y2 = box
                image = np.ascontiguousarray(full[y1:y2, x1:x2])
                easy, hard, junk = (np.asarray(entry[k], np.int64)
                                    for k in ("easy", "hard", "junk"))
            yield i, {
                "image": image,
                "filename": f"{name}.jpg",
                "index": i,
                "full_height": h,
                "full_width": w,
                "bbx": bbx,
                "crop_box": np.asarray(box, np.int64),
                "easy": easy,
                "hard": hard,
                "junk": junk,
            }


# ---------------------------------------------------------------------------
# Labelled image folder (COIL-20, MPEG-7, any class-per-folder collection)
# ---------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm",
                    ".webp")

_FOLDER_INSTRUCTIONS = """\
Put the images in the manual directory (nothing is downloaded), either
  * one sub-folder per class: <manual_dir>/<class>/<image>   (config `subfolders`), or
  * a flat folder whose file names match the config's regular expression, group 1
    being the class: COIL-20 `obj(\\d+)__(\\d+)\\.png` (config `coil20`, the
    processed 128x128 set of Nene et al. 1996) or MPEG-7 CE-Shape-1 part B
    `(.+)-(\\d+)\\.gif` (config `mpeg7`, Latecki et al. 2000).
Pass it with tfds.download.DownloadConfig(manual_dir=...).
"""


@dataclasses.dataclass(eq=False)
class LabelledImageFolderConfig(tfds.core.BuilderConfig):
    """Layout of a labelled image folder.

    Attributes:
      pattern: regular expression matched (full match, case-insensitive) against
        the file names of a flat folder; group 1 is the class, the other groups
        order the files within a class (digit groups numerically). None: one
        sub-folder per class, files inside ordered naturally.
      class_template: class name made from the label string, e.g. ``"obj{}"``.
      extensions: image file suffixes read in sub-folder mode.
      expected_count: number of images of the published set (a warning is
        issued when the folder holds a different number), or None.
    """

    pattern: str | None = None
    class_template: str = "{}"
    extensions: tuple = IMAGE_EXTENSIONS
    expected_count: int | None = None


_FOLDER_CITATIONS = {
    "coil20": """@techreport{Nene1996,
  author = {Nene, S. A. and Nayar, S. K. and Murase, H.},
  title = {Columbia Object Image Library ({COIL-20})},
  institution = {Columbia University}, number = {CUCS-005-96}, year = {1996}}""",
    "mpeg7": """@inproceedings{Latecki2000,
  author = {Latecki, L. J. and Lakamper, R. and Eckhardt, U.},
  title = {Shape Descriptors for Non-rigid Shapes with a Single Closed Contour},
  booktitle = {CVPR}, year = {2000}}""",
}


class LabelledImageFolder(tfds.core.GeneratorBasedBuilder):
    """A labelled image folder read from ``dl_manager.manual_dir``.

    Layouts (chosen by the config, see ``LabelledImageFolderConfig``):

    * ``subfolders``: ``<manual_dir>/<class>/<image>``; classes are the
      sub-folders holding images, sorted (numerically if all are integers).
    * ``coil20``: flat folder of ``obj<k>__<pose>.png`` (COIL-20 processed,
      Nene, Nayar & Murase 1996, 20 classes ``obj1..obj20`` x 72 poses),
      ordered by (k, pose), label k - 1: the same order and labels as
      ``retrieval_jax.data.load_coil20``.
    * ``mpeg7``: flat folder of ``<class>-<n>.gif`` (MPEG-7 CE-Shape-1 part B,
      Latecki et al. 2000, 70 classes x 20), ordered by (class, n), labels
      index the sorted class names, as ``retrieval_jax.data.load_mpeg7``.

    A custom flat layout: ``LabelledImageFolder(config=LabelledImageFolderConfig(
    name="mine", pattern=r"(\\w+)_(\\d+)\\.jpg"))``.

    One split, ``train`` (tfds reserves the name ``all`` for "every split", so
    ``split="all"`` reads the same examples): ``image`` uint8 RGB (greyscale and
    palettes converted), ``label`` ``ClassLabel`` (names set from the folder when preparing),
    ``filename`` relative to the manual directory. Examples are stored in the
    order above (shuffling disabled).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        LabelledImageFolderConfig(
            name="subfolders", description="One sub-folder per class."),
        LabelledImageFolderConfig(
            name="coil20", pattern=r"obj(\d+)__(\d+)\.png", class_template="obj{}",
            expected_count=1440,
            description="COIL-20 processed (Nene et al. 1996): 20 objects x 72 poses, 128x128."),
        LabelledImageFolderConfig(
            name="mpeg7", pattern=r"(.+)-(\d+)\.gif", expected_count=1400,
            description="MPEG-7 CE-Shape-1 part B (Latecki et al. 2000): 70 classes x 20."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = _FOLDER_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Labelled images read from a local folder.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                             encoding_format="png"),
                "label": tfds.features.ClassLabel(),  # names set in _split_generators
                "filename": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            citation=_FOLDER_CITATIONS.get(self.builder_config.name, ""),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = _manual_dir(dl_manager, _FOLDER_INSTRUCTIONS)
        files, class_names = scan_labelled_folder(root, self.builder_config)
        self.info.features["label"].names = class_names
        _record_source(self.info, root)
        return {"train": self._generate_examples(root, files)}

    def _generate_examples(self, root: Path, files):
        for i, (rel, label) in enumerate(files):
            yield i, {"image": read_rgb(root / rel), "label": label, "filename": rel}


def scan_labelled_folder(root, config: LabelledImageFolderConfig):
    """List a labelled folder as the builder does (no TensorFlow work).

    Returns:
      ``(files, class_names)``: ``files`` is a list of ``(relative path, label)``
      in storage order, ``class_names`` the ClassLabel names.

    Raises:
      FileNotFoundError: no matching image (the message says what was expected).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist\n{_FOLDER_INSTRUCTIONS}")
    entries = sorted(os.listdir(root))
    if config.pattern is None:
        exts = tuple(e.lower() for e in config.extensions)
        per_class = {}
        for d in entries:
            if d.startswith(".") or not (root / d).is_dir():
                continue
            imgs = [f for f in os.listdir(root / d)
                    if not f.startswith(".") and f.lower().endswith(exts)
                    and (root / d / f).is_file()]
            if imgs:
                per_class[d] = sorted(imgs, key=_natural_key)
        if not per_class:
            raise FileNotFoundError(
                f"{root} has no sub-folder holding images ({', '.join(exts)}); config "
                f"{config.name!r} expects <root>/<class>/<image>\n{_FOLDER_INSTRUCTIONS}")
        classes = sorted(per_class, key=_natural_key)
        files = [(f"{c}/{f}", k) for k, c in enumerate(classes) for f in per_class[c]]
    else:
        regex = re.compile(config.pattern, re.IGNORECASE)
        matched = []
        for f in entries:
            m = regex.fullmatch(f)
            if m and (root / f).is_file():
                if m.lastindex is None:
                    raise ValueError(f"pattern {config.pattern!r} has no group; group 1 "
                                     "must capture the class")
                matched.append((m, f))
        if not matched:
            raise FileNotFoundError(
                f"no file in {root} matches {config.pattern!r} (config {config.name!r}; "
                f"{len(entries)} entries found)\n{_FOLDER_INSTRUCTIONS}")
        classes = _class_order(m.group(1) for m, _ in matched)
        code = {c: k for k, c in enumerate(classes)}

        def key(mf):
            m, f = mf
            rest = tuple(_natural_key(g or "") for g in m.groups()[1:])
            return (code[m.group(1)], rest, _natural_key(f))

        files = [(f, code[m.group(1)]) for m, f in sorted(matched, key=key)]
    if config.expected_count is not None and len(files) != config.expected_count:
        warnings.warn(f"{root} holds {len(files)} images for config {config.name!r}, the "
                      f"published set has {config.expected_count}", stacklevel=2)
    return files, [config.class_template.format(c) for c in classes]


# ---------------------------------------------------------------------------
# Plain-Python convenience
# ---------------------------------------------------------------------------

def prepare_builder(builder_cls, manual_dir, config, *, data_dir=None):
    """Build (once) and return a tfds builder reading ``manual_dir``.

    Prepared data is cached under ``data_dir`` (tfds default
    ``~/tensorflow_datasets`` if None) per builder / config / version; it is
    reused on later calls. If that cache was built from another folder, a
    ``ValueError`` is raised instead of returning stale data.

    Args:
      builder_cls: ``RevisitedOxfordParis`` or ``LabelledImageFolder``.
      manual_dir: folder holding the source files.
      config: config name or ``BuilderConfig``.
      data_dir: where tfds writes the prepared records.
    """
    manual = Path(manual_dir).expanduser()
    if not manual.is_dir():
        raise FileNotFoundError(f"manual directory {manual} does not exist\n"
                                f"{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    builder = builder_cls(config=config, data_dir=None if data_dir is None else str(data_dir))
    if builder.is_prepared():
        source = (builder.info.metadata or {}).get("manual_dir")
        if source is not None and Path(source) != manual.resolve():
            raise ValueError(
                f"{builder.data_dir} was prepared from {source}, not {manual.resolve()}; "
                "use another data_dir (or another config name) for this folder")
        return builder
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return builder


def _stack_or_list(values):
    """Stack equal-shaped arrays, decode text; a list when shapes differ."""
    if not values:
        return np.zeros(0)
    if isinstance(values[0], (bytes, str)):
        return np.asarray([v.decode("utf-8") if isinstance(v, bytes) else v for v in values])
    arrays = [np.asarray(v) for v in values]
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    return arrays


def as_numpy(source, split: str | None = None) -> dict:
    """Read a tfds split into numpy arrays.

    Args:
      source: a prepared ``tfds.core.DatasetBuilder`` (then ``split`` is
        required unless it has one split) or a ``tf.data.Dataset`` of
        feature dicts.
      split: split name or tfds split expression (``"all"``, ``"query[:5]"``)
        when ``source`` is a builder.

    Returns:
      dict feature name -> array: images uint8[n, h, w, 3] when they all have
      the same size, else a list of uint8[h, w, 3]; text as a str array;
      variable-length sequences (``easy`` / ``hard`` / ``junk``) as lists of
      int64 arrays; scalars as [n] arrays. For a builder with a ``label``
      ClassLabel, ``class_names`` is added.
    """
    extra = {}
    if isinstance(source, tfds.core.DatasetBuilder):
        splits = list(source.info.splits.keys())
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"choose split= among {splits}")
            split = splits[0]
        features = source.info.features
        if "label" in features and isinstance(features["label"], tfds.features.ClassLabel):
            extra["class_names"] = list(features["label"].names)
        ragged = {k for k, f in features.items() if isinstance(f, tfds.features.Sequence)}
        ds = source.as_dataset(split=split, shuffle_files=False)
    else:
        ragged = set()
        ds = source
    columns: dict[str, list] = {}
    for example in tfds.as_numpy(ds):
        for k, v in example.items():
            columns.setdefault(k, []).append(v)
    out = {k: (list(v) if k in ragged else _stack_or_list(v)) for k, v in columns.items()}
    out.update(extra)
    return out


def load_tfds_folder(root, config="subfolders", *, data_dir=None) -> dict:
    """Prepare a ``LabelledImageFolder`` from ``root`` and return it as numpy.

    Args:
      root: the image folder (``subfolders`` layout, or a flat COIL-20 / MPEG-7
        folder with ``config="coil20"`` / ``"mpeg7"``).
      config: config name or ``LabelledImageFolderConfig``.
      data_dir: tfds cache directory (see ``prepare_builder``).

    Returns:
      dict with ``image`` (uint8[n, h, w, 3], or a list if sizes differ),
      ``label`` int64[n], ``filename`` str[n] and ``class_names``.
    """
    builder = prepare_builder(LabelledImageFolder, root, config, data_dir=data_dir)
    return as_numpy(builder, "train")


def load_tfds_revisited(root, dataset: str = "roxford5k", *, data_dir=None) -> dict:
    """Prepare ``RevisitedOxfordParis`` from a revisitop folder; numpy per split.

    Returns:
      ``{"database": {...}, "query": {...}}``, each as ``as_numpy`` returns it
      (images come as a list when their sizes differ, as in the real benchmark).
    """
    builder = prepare_builder(RevisitedOxfordParis, root, dataset, data_dir=data_dir)
    return {split: as_numpy(builder, split) for split in ("database", "query")}
