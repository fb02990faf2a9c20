"""Object discovery in clutter: COIL-20 objects pasted into natural photographs.

Unsupervised object discovery (Simeoni, Iscen, Tolias, Avrithis & Chum, "Unsupervised
object discovery for instance recognition", WACV 2018) finds, in every image of a
collection, the regions that recur across the collection, and pools the descriptor
from them. This benchmark builds a collection where the answer is known:

1. Scenes (`make_scenes`, deterministic by ``--seed``, generated at run time, nothing
   downloaded). Each COIL-20 object (grey, on black: its mask is the pixels above a
   threshold, holes filled) is pasted ``--per-object`` times, in different poses, at a
   random position and scale (object frame side ``SCALE`` x the scene side) into a
   random crop of one of the natural photographs that scikit-image ships in its wheel
   (`BACKGROUNDS`), turned grey; ``--distractors`` more scenes are plain crops with no
   object. The box of every pasted object is known (the tight box of its mask).
2. Feature maps: EfficientNet-Lite0 and a second backbone (``--backbones``, default
   lite0 lite1; ImageNet weights from their wheels) on the ``--size`` px scenes.
3. Discovery (`retrieval_jax.discovery.discover` over all the scenes): the feature
   saliency map FS of every scene, its EGM regions, the region graph and its Katz
   centrality, the object saliency map OS; the share of each map's mass that falls
   inside the object's box (saliency precision, `discovery.saliency_precision`), with
   overlays of FS, OS and their EGM regions.
4. Retrieval: every object scene queries all the other scenes (distractors included);
   its positives are the scenes of the same object. mAP of MAC, GeM (p = 3), R-MAC (3
   levels), CroW, R-MAC PCA-w (whitening learned on the collection's R-MAC regions),
   FS.EGM and OS.EGM (regions whitened on the collection's EGM regions; both whitenings
   to ``--whiten-dim`` dimensions), each L2-normalised, ranked by plain kNN, alpha-QE
   and diffusion (`retrieval_jax.methods.METHODS`; alpha-QE's n and diffusion's k are
   set from the scenes per object, the same for every descriptor).

    python -m experiments.object_discovery                 # 20 objects x 8 scenes + 40 distractors, 512 px
    python -m experiments.object_discovery --quick         # 6 objects x 4 scenes + 6 distractors, 320 px, lite0

Writes results.csv, saliency.csv, results.md, object_discovery.png and overlays.png into
--out (default experiments/results/object_discovery); the feature maps are kept in
--out/cache.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from experiments.common import RESULTS, pyplot, save_figure, write_csv, write_text

DEFAULT_OUT = RESULTS / "object_discovery"
#: The natural photographs of ``skimage.data`` used as backgrounds (all ship in the wheel).
BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "grass", "gravel", "brick",
               "hubble_deep_field", "camera", "coins", "moon", "clock")
#: The side of the pasted object's frame (COIL-20's 128 px square) as a share of the scene side.
SCALE = (0.3, 0.6)
#: The share of a background photograph's shorter side that a crop spans.
CROP = (0.3, 0.7)
#: COIL-20's black background is 0-5 grey: object pixels are those above this, holes filled.
OBJECT_THRESHOLD = 16
POOLINGS = ("MAC", "GeM", "R-MAC", "CroW")
DESCRIPTORS = POOLINGS + ("R-MAC PCA-w", "FS.EGM", "OS.EGM")
METHOD_NAMES = ("knn", "alpha-qe", "diffusion")
FULL = dict(objects=20, per_object=8, distractors=40, size=512, backbones=("lite0", "lite1"))
QUICK = dict(objects=6, per_object=4, distractors=6, size=320, backbones=("lite0",))


# ----------------------------------------------------------------------------- scenes
@dataclasses.dataclass(frozen=True)
class Scenes:
    """A generated collection of grey scenes.

    Attributes:
      images: uint8[n, S, S] grey scenes.
      labels: int64[n], the object pasted in each scene (-1 for a distractor).
      boxes: int64[n, 4], the pasted object's tight box ``(top, left, bottom, right)`` in
        pixels, bottom and right exclusive (all -1 for a distractor).
      masks: bool[n, S, S], the pixels the object was pasted over.
      sources: int64[n], the index of the object image pasted (-1 for a distractor).
      backgrounds: the name of each scene's background photograph.
    """
    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    sources: np.ndarray
    backgrounds: tuple

    @property
    def objects(self) -> np.ndarray:
        """int64 indices of the scenes that hold an object (the queries)."""
        return np.flatnonzero(self.labels >= 0)


def background_photographs(names=BACKGROUNDS) -> dict[str, np.ndarray]:
    """{name: grey uint8[H, W]} of scikit-image's bundled photographs (``skimage.data``)."""
    import skimage.data
    from PIL import Image

    out = {}
    for name in names:
        img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        img = np.asarray(img)
        if img.ndim == 3:
            img = np.asarray(Image.fromarray(img[..., :3].astype(np.uint8)).convert("L"))
        out[name] = img.astype(np.uint8)
    return out


def object_mask(image, threshold: int = OBJECT_THRESHOLD) -> np.ndarray:
    """bool[H, W]: the pixels of a grey object on black (``image > threshold``, holes filled)."""
    from scipy import ndimage
    return ndimage.binary_fill_holes(np.asarray(image) > threshold)


def _resize(image, height: int, width: int) -> np.ndarray:
    from PIL import Image
    return np.array(Image.fromarray(np.asarray(image, np.uint8)).resize((width, height), Image.BILINEAR))


def _crop(photo: np.ndarray, size: int, rng) -> np.ndarray:
    """A random square crop of ``photo`` (CROP of its shorter side), turned by one of the 8
    symmetries of the square (so that two crops of one photograph rarely look alike), resized
    to ``size``."""
    h, w = photo.shape
    side = max(8, int(round(rng.uniform(*CROP) * min(h, w))))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    patch = photo[top:top + side, left:left + side]
    patch = np.rot90(patch[:, ::-1] if rng.random() < 0.5 else patch, int(rng.integers(4)))
    return _resize(patch, size, size)


def make_scenes(objects, labels, *, per_object: int, distractors: int, size: int, seed: int,
                backgrounds: Mapping[str, np.ndarray] | None = None, scale=SCALE,
                threshold: int = OBJECT_THRESHOLD) -> Scenes:
    """Paste every labelled object ``per_object`` times into random background crops.

    For each label, ``per_object`` of its images (poses) are drawn without replacement;
    each is resized to a square of side ``s = round(u size)``, u ~ U(scale), its mask
    `object_mask` taken on the resized image, and its masked pixels copied at a uniform
    random position (the whole square inside the scene) over a random crop of a random
    background. ``distractors`` more scenes are crops alone. The same arguments and
    ``seed`` give the same scenes.

    Args:
      objects: uint8[m, h, w] grey object images on black (e.g. COIL-20).
      labels: int[m], the object of each image.
      per_object: scenes per label.
      distractors: scenes without an object (appended after the object scenes).
      size: scene side in pixels.
      seed: the seed of every random choice.
      backgrounds: {name: grey uint8[H, W]} (default: `background_photographs`).
      scale: (low, high) of the pasted square's side as a share of ``size``.
      threshold: grey level above which an object pixel is pasted (holes filled).

    Returns:
      `Scenes`, the object scenes grouped by label (labels in increasing order), then
      the distractors.
    """
    objects, labels = np.asarray(objects), np.asarray(labels)
    if objects.ndim != 3 or objects.shape[0] != labels.shape[0]:
        raise ValueError(f"objects must be [m, h, w] with one label each, got {objects.shape} and "
                         f"{labels.shape}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    backgrounds = background_photographs() if backgrounds is None else dict(backgrounds)
    names = sorted(backgrounds)
    rng = np.random.default_rng(seed)
    images, out_labels, boxes, masks, sources, bg = [], [], [], [], [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if per_object > len(members):
            raise ValueError(f"label {label} has {len(members)} images, fewer than per_object = {per_object}")
        for src in np.sort(rng.choice(members, per_object, replace=False)):
            name = names[rng.integers(len(names))]
            scene = _crop(backgrounds[name], size, rng)
            side = max(2, int(round(rng.uniform(*scale) * size)))
            obj = _resize(objects[src], side, side)
            mask = object_mask(obj, threshold)
            top, left = rng.integers(0, size - side + 1), rng.integers(0, size - side + 1)
            window = scene[top:top + side, left:left + side]
            window[mask] = obj[mask]
            full = np.zeros((size, size), bool)
            full[top:top + side, left:left + side] = mask
            rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
            boxes.append((rows[0], cols[0], rows[-1] + 1, cols[-1] + 1) if rows.size else (-1,) * 4)
            images.append(scene)
            out_labels.append(label)
            masks.append(full)
            sources.append(src)
            bg.append(name)
    for _ in range(distractors):
        name = names[rng.integers(len(names))]
        images.append(_crop(backgrounds[name], size, rng))
        out_labels.append(-1)
        boxes.append((-1,) * 4)
        masks.append(np.zeros((size, size), bool))
        sources.append(-1)
        bg.append(name)
    return Scenes(images=np.stack(images).astype(np.uint8), labels=np.asarray(out_labels, np.int64),
                  boxes=np.asarray(boxes, np.int64).reshape(-1, 4), masks=np.stack(masks),
                  sources=np.asarray(sources, np.int64), backgrounds=tuple(bg))


def coil_scenes(objects: int, per_object: int, distractors: int, size: int, seed: int,
                data_dir=None) -> Scenes:
    """`make_scenes` of the first ``objects`` COIL-20 objects (128 px originals)."""
    from retrieval_jax.data import load_coil20

    ds = load_coil20(None if data_dir is None else Path(data_dir) / "coil20", size=128, images=True)
    keep = np.asarray(ds.labels) < objects
    return make_scenes(ds.images[keep], np.asarray(ds.labels)[keep], per_object=per_object,
                       distractors=distractors, size=size, seed=seed)


# ----------------------------------------------------------------------------- descriptors
def feature_maps(backbone, scenes: Scenes, batch_size: int = 8, cache: Path | None = None) -> np.ndarray:
    """float32[n, h, w, C] last-conv maps of the scenes (grey replicated to RGB), read from /
    written to the ``.npy`` file ``cache`` when given (kept only if it holds as many maps)."""
    from retrieval_jax.backbones import backbone_feature_maps
    from retrieval_jax.files import atomic_write

    if cache is not None and cache.is_file():
        maps = np.load(cache)
        if maps.shape[0] == len(scenes.labels):
            return maps
    maps = backbone_feature_maps(backbone, scenes.images, batch_size=batch_size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda f: np.save(f, maps))
    return maps


def global_descriptors(maps, chunk: int = 32) -> dict[str, np.ndarray]:
    """{pooling: float32[n, C]} of MAC, GeM (p = 3), R-MAC (3 levels) and CroW, L2-normalised."""
    from retrieval_jax.descriptors import crow, gem, l2_normalize, mac, rmac

    fns = {"MAC": mac, "GeM": gem, "R-MAC": rmac, "CroW": crow}
    out = {name: [] for name in fns}
    for start in range(0, maps.shape[0], chunk):
        part = maps[start:start + chunk]
        for name, fn in fns.items():
            out[name].append(np.asarray(l2_normalize(fn(part))))
    return {name: np.concatenate(parts).astype(np.float32) for name, parts in out.items()}


def rmac_whitened(maps, dim: int, chunk: int = 32) -> np.ndarray:
    """float32[n, dim] R-MAC with PCA whitening to ``dim`` dimensions learned on the
    collection's own R-MAC regions (unsupervised, as the discovery stage learns its
    whitening on its regions)."""
    from retrieval_jax.descriptors import learn_pca_whitening, rmac, rmac_regions

    parts = [rmac_regions(maps[s:s + chunk]) for s in range(0, maps.shape[0], chunk)]
    flat = np.concatenate([np.asarray(r)[np.asarray(v)] for r, v in parts])
    w = learn_pca_whitening(flat, dim=min(dim, flat.shape[1], flat.shape[0] - 1))
    return np.concatenate([np.asarray(rmac(maps[s:s + chunk], whitening=w))
                           for s in range(0, maps.shape[0], chunk)]).astype(np.float32)


def discovery(maps, *, k: int = 10, whiten_dim: int = 64):
    """The discovery stage over the collection's maps (`retrieval_jax.discovery.discover`,
    FS and OS maps kept), its regions PCA-whitened to ``whiten_dim`` dimensions."""
    from retrieval_jax.discovery import discover
    try:
        return discover(maps, k=k, whiten_dim=whiten_dim, keep_maps=True)
    except ValueError as exc:   # fewer regions than whiten_dim + 1: the most the regions allow
        if "samples" not in str(exc):
            raise
        print(f"discovery: {exc}; whitening to the most dimensions the regions allow", flush=True)
        return discover(maps, k=k, keep_maps=True)


def saliency_rows(found, scenes: Scenes, backbone: str) -> tuple[list[dict], dict]:
    """Saliency precision of the FS and OS maps on the object scenes: a summary row per map
    and {map: float[n_objects]} per scene."""
    from retrieval_jax.discovery import saliency_precision

    obj = scenes.objects
    size = scenes.images.shape[1:]
    boxes = scenes.boxes[obj].astype(np.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / float(size[0] * size[1])
    per = {}
    for name, maps in (("FS", found.fs_maps), ("OS", found.os_maps)):
        m = np.stack([maps[i] for i in obj])
        per[name] = np.asarray(saliency_precision(m, boxes, image_size=size), np.float64)
    rows = []
    for name, v in per.items():
        rows.append(dict(backbone=backbone, map=name, mean=round(float(v.mean()), 4),
                         median=round(float(np.median(v)), 4), box_share=round(float(area.mean()), 4),
                         above_box_share=round(float((v > area).mean()), 4),
                         os_above_fs=round(float((per["OS"] > per["FS"]).mean()), 4)))
    return rows, per


def overlays(scenes: Scenes, found, path: Path, count: int = 4) -> None:
    """A PNG: for ``count`` object scenes, the scene with its box, the FS map with its EGM
    regions and the OS map with its EGM regions (boxes centre +- 2 sigma)."""
    from retrieval_jax.discovery import region_boxes

    plt = pyplot()
    obj = scenes.objects
    pick = obj[np.linspace(0, len(obj) - 1, count).round().astype(int)]
    size = scenes.images.shape[1]
    fig, axes = plt.subplots(count, 3, figsize=(9, 3 * count), squeeze=False)
    for row, i in zip(axes, pick):
        img = scenes.images[i]
        for ax, title, maps, regions in ((row[0], "scene, object box", None, None),
                                         (row[1], "FS map, EGM regions", found.fs_maps, found.regions),
                                         (row[2], "OS map, EGM regions", found.os_maps, found.os_regions)):
            ax.imshow(img, cmap="gray", extent=(0, size, size, 0))
            if maps is not None:
                m = np.asarray(maps[i])
                h, w = m.shape
                ax.imshow(m / max(float(m.max()), 1e-12), cmap="jet", alpha=0.45, extent=(0, size, size, 0),
                          interpolation="bilinear")
                one = type(regions)(**{f.name: np.asarray(getattr(regions, f.name))[i]
                                       for f in dataclasses.fields(regions)})
                cell = size / h
                for (r0, c0, r1, c1), ok in zip(np.asarray(region_boxes(one, 2.0, (h, w))), np.asarray(one.valid)):
                    if ok:
                        ax.add_patch(plt.Rectangle(((c0 + 0.5) * cell, (r0 + 0.5) * cell), (c1 - c0) * cell,
                                                   (r1 - r0) * cell, fill=False, color="white", lw=1.5))
            t, l, b, r = scenes.boxes[i]
            ax.add_patch(plt.Rectangle((l, t), r - l, b - t, fill=False, color="lime", lw=1.5, ls="--"))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- retrieval
def method_configs(per_object: int, n: int, qe_n: int, k: int) -> dict:
    """The config of each of `METHOD_NAMES` for a collection of n scenes."""
    from retrieval_jax.methods import AlphaQEConfig, DiffusionConfig, KnnConfig
    return {"knn": KnnConfig(),
            "alpha-qe": AlphaQEConfig(n=min(qe_n, n - 1), alpha=3.0),
            "diffusion": DiffusionConfig(k=min(k, n - 1), query_k=min(k, n - 1), alpha=0.99, gamma=3.0,
                                         tol=1e-6, max_iter=500)}


def retrieval_map(X, labels, queries, method: str, config) -> float:
    """mAP of the ``queries`` (collection items) ranking the rest of the collection by
    ``METHODS[method]``; positives are the other items of the query's label."""
    from retrieval_jax.diffusion import ranking_from_scores
    from retrieval_jax.evaluation import label_map
    from retrieval_jax.methods import METHODS

    m = METHODS[method]
    state = m.build(np.asarray(X, np.float32), config)
    scores = np.asarray(m.search_items(state, np.asarray(queries, np.int32)))
    ranking = ranking_from_scores(scores, exclude=queries)
    return float(label_map(ranking, labels, exclude_self=True, query_ids=queries))


# ----------------------------------------------------------------------------- report
def markdown(rows: list[dict], sal: list[dict], args, scenes: Scenes) -> str:
    nobj = int(scenes.objects.size)
    lines = [f"# Object discovery in clutter ({'quick' if args.quick else 'full'})", "",
             f"{nobj} object scenes ({args.objects} COIL-20 objects x {args.per_object}) + "
             f"{args.distractors} distractors, {args.size} px, seed {args.seed}; "
             f"every object scene queries the other {len(scenes.labels) - 1}.", ""]
    if sal:
        lines += ["## Saliency precision (share of the map's mass inside the object's box)", "",
                  "| backbone | map | mean | median | box area share | scenes above the box share |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in sal:
            lines.append(f"| {r['backbone']} | {r['map']} | {r['mean']:.3f} | {r['median']:.3f} | "
                         f"{r['box_share']:.3f} | {100 * r['above_box_share']:.0f}% |")
        lines.append("")
    lines += claims(rows, sal)
    lines += ["## mAP (%)", ""]
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    descs = list(dict.fromkeys(r["descriptor"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["backbone"], r["descriptor"], r["method"]): r["map"] for r in rows}
    for b in backbones:
        lines += [f"### {b}", "", "| descriptor | " + " | ".join(methods) + " |",
                  "| --- |" + " --- |" * len(methods)]
        for d in descs:
            if (b, d, methods[0]) in table:
                lines.append(f"| {d} | " + " | ".join(f"{100 * table[(b, d, m)]:.2f}" for m in methods) + " |")
        lines.append("")
    return "\n".join(lines)


def claims(rows: list[dict], sal: list[dict]) -> list[str]:
    """The paper's two claims, checked on this run: OS puts more of its mass inside the
    boxes than FS; OS.EGM ranks at least as well as R-MAC, with the larger gain under
    query expansion."""
    lines = ["## The paper's claims on this run", ""]
    by = {(r["backbone"], r["map"]): r for r in sal}
    for b in dict.fromkeys(r["backbone"] for r in sal):
        fs, os_ = by.get((b, "FS")), by.get((b, "OS"))
        if fs and os_:
            verdict = "holds" if os_["mean"] > fs["mean"] else "does not hold"
            lines.append(f"- {b}: OS puts {100 * os_['mean']:.1f}% of its mass inside the box, FS "
                         f"{100 * fs['mean']:.1f}% (the box covers {100 * fs['box_share']:.1f}% of the scene); OS "
                         f"above FS in {100 * os_['os_above_fs']:.0f}% of the scenes: **{verdict}**.")
    table = {(r["backbone"], r["descriptor"], r["method"]): r["map"] for r in rows}
    for b in dict.fromkeys(r["backbone"] for r in rows):
        gains = {m: table[(b, "OS.EGM", m)] - table[(b, "R-MAC", m)] for m in METHOD_NAMES
                 if (b, "OS.EGM", m) in table and (b, "R-MAC", m) in table}
        if not gains:
            continue
        text = ", ".join(f"{m} {100 * g:+.2f}" for m, g in gains.items())
        ranks = all(g >= 0 for g in gains.values())
        qe = gains.get("alpha-qe", 0.0) > gains.get("knn", 0.0)
        lines.append(f"- {b}: OS.EGM - R-MAC mAP points: {text}; OS.EGM at least as good as R-MAC: "
                     f"**{'holds' if ranks else 'does not hold'}**; a larger gain under alpha-QE than "
                     f"under kNN: **{'holds' if qe else 'does not hold'}**.")
        white = {m: table[(b, "OS.EGM", m)] - table[(b, "R-MAC PCA-w", m)] for m in METHOD_NAMES
                 if (b, "R-MAC PCA-w", m) in table and (b, "OS.EGM", m) in table}
        if white:
            lines.append(f"- {b}: against R-MAC whitened as OS.EGM is (R-MAC PCA-w): "
                         + ", ".join(f"{m} {100 * g:+.2f}" for m, g in white.items())
                         + f": **{'holds' if all(g >= 0 for g in white.values()) else 'does not hold'}**.")
    return lines + [""]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    descs = list(dict.fromkeys(r["descriptor"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4), squeeze=False)
    width = 0.8 / len(methods)
    for ax, b in zip(axes[0], backbones):
        for j, m in enumerate(methods):
            vals = [100 * next((r["map"] for r in rows if (r["backbone"], r["descriptor"], r["method"]) == (b, d, m)),
                               np.nan) for d in descs]
            ax.bar(np.arange(len(descs)) + (j - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.set_xticks(np.arange(len(descs)))
        ax.set_xticklabels(descs, rotation=20)
        ax.set_ylabel("mAP (%)")
        ax.set_title(f"{b}: object scenes among clutter")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['objects']} objects x {QUICK['per_object']} scenes + {QUICK['distractors']} "
                        f"distractors at {QUICK['size']} px, {' '.join(QUICK['backbones'])} only (for tests)")
    p.add_argument("--objects", type=int, default=None, help="COIL-20 objects (default 20)")
    p.add_argument("--per-object", type=int, default=None, help="scenes per object (default 8)")
    p.add_argument("--distractors", type=int, default=None, help="scenes without an object (default 40)")
    p.add_argument("--size", type=int, default=None, help="scene side in px (default 512)")
    p.add_argument("--backbones", nargs="+", choices=("lite0", "lite1", "lite2"), default=None,
                   help="default lite0 lite1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qe-n", type=int, default=None, help="alpha-QE neighbours (default: half the scenes per object)")
    p.add_argument("--k", type=int, default=None, help="diffusion graph neighbours (default: the scenes per object)")
    p.add_argument("--region-k", type=int, default=10, help="neighbours per region in the region graph")
    p.add_argument("--whiten-dim", type=int, default=64,
                   help="PCA-whitened dimension of the regions (FS.EGM, OS.EGM, R-MAC PCA-w)")
    p.add_argument("--data-dir", default=None, help="folder holding coil20/")
    p.add_argument("--no-cache", action="store_true", help="do not keep the feature maps in --out/cache")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("objects", "per_object", "distractors", "size", "backbones"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.qe_n = args.qe_n or max(1, args.per_object // 2)
    args.k = args.k or args.per_object
    return args


def main(argv=None) -> int:
    from retrieval_jax.backbones import load_efficientnet_lite

    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scenes = coil_scenes(args.objects, args.per_object, args.distractors, args.size, args.seed, args.data_dir)
    print(f"{len(scenes.labels)} scenes of {args.size} px ({scenes.objects.size} with an object) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    queries = scenes.objects
    n = len(scenes.labels)
    configs = method_configs(args.per_object, n, args.qe_n, args.k)
    rows, sal = [], []
    for name in args.backbones:
        t0 = time.perf_counter()
        cache = None if args.no_cache else (
            out / "cache" / f"{name}_{args.size}px_{args.objects}x{args.per_object}+{args.distractors}"
                            f"_seed{args.seed}.npy")
        maps = feature_maps(load_efficientnet_lite(name), scenes, cache=cache)
        descs = global_descriptors(maps)
        descs["R-MAC PCA-w"] = rmac_whitened(maps, args.whiten_dim)
        print(f"{name}: maps {maps.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        found = discovery(maps, k=args.region_k, whiten_dim=min(args.whiten_dim, maps.shape[-1]))
        descs["FS.EGM"], descs["OS.EGM"] = found.fs_descriptors, found.descriptors
        print(f"{name}: discovery over {found.num_regions} regions in {time.perf_counter() - t0:.1f} s "
              f"({found.empty_os} empty OS maps)", flush=True)
        rows_s, _ = saliency_rows(found, scenes, name)
        sal += rows_s
        for r in rows_s:
            print(f"{name} {r['map']} saliency precision: mean {r['mean']:.3f}, median {r['median']:.3f} "
                  f"(box area share {r['box_share']:.3f})", flush=True)
        if name == args.backbones[0]:
            overlays(scenes, found, out / "overlays.png")
        for dname, X in descs.items():
            for method, cfg in configs.items():
                score = retrieval_map(X, scenes.labels, queries, method, cfg)
                rows.append(dict(backbone=name, descriptor=dname, method=method, map=round(score, 5)))
            print(f"{name} {dname:8s} " + "  ".join(f"{r['method']} {100 * r['map']:6.2f}"
                                                  for r in rows[-len(configs):]), flush=True)
    write_csv(out / "results.csv", rows)
    write_csv(out / "saliency.csv", sal)
    write_text(out / "results.md", markdown(rows, sal, args, scenes))
    plot(rows, out / "object_discovery.png")
    print(f"wrote {out}/results.csv, saliency.csv, results.md, object_discovery.png, overlays.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
