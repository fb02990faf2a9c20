"""Fine-tuning without labels by mining on manifolds (Iscen et al., CVPR 2018), against labelled fine-tuning.

    python -m experiments.mining_on_manifolds [--datasets coil20 mpeg7] [--size 48] [--epochs 10]
        [--steps-per-epoch 20] [--seed 0] [--out experiments/results/mining_on_manifolds] [--quick]
    python -m experiments.mining_on_manifolds --images DIR --labels FILE.npy --out DIR

For each data set the classes are split in two halves (sorted class ids: the first
ceil(c / 2) classes are ``train``, the others ``test``). The labels only make that
split and score the results; the mined run never sees them. EfficientNet-Lite0
(ImageNet weights, frozen) gives the maps entering its last conv block, computed once
for images resized to ``--size``; the descriptor is l2(GeM_p(relu6(B K + c)))
(`retrieval_jax.training.finetune`), and GeM p with the last conv block are trained on
the ``train`` images by

* ``mined``: `retrieval_jax.training.finetune_mined`, tuples mined without labels on
  the mutual kNN graph of the initial descriptors (k = 30, similarity^3, alpha = 0.99;
  every image an anchor, P+ = manifold but not Euclidean top-50 neighbours weighted by
  their manifold similarity, P- = Euclidean but not manifold neighbours), weighted
  triplet loss (margin 0.5);
* ``supervised``: `retrieval_jax.training.finetune_head` with the labels (triplet loss,
  margin 0.3, a random positive of the class, 5 hard negatives re-mined every 20 steps),
  for the same number of steps;
* ``off-the-shelf``: the ImageNet descriptor (step 0 of both).

Score: label mAP (%) of every image of a half querying the other images of that half by
kNN search (inner product), the query excluded. ``--images DIR --labels FILE.npy``
runs the same on any labelled folder: the image files under DIR (png, jpg, jpeg, gif,
bmp, ppm, tif, recursively) sorted by relative path, ``labels[i]`` the class of the i-th.

Writes into ``--out`` (atomically), per data set ``<name>``: ``<name>_results.csv``
(columns method, split, map), ``<name>_curves.png`` (mined loss per epoch and test
mAP per epoch, the off-the-shelf and supervised test mAP as lines) and
``<name>_history.csv`` (epoch, mined and supervised loss, test mAP); ``config.json``
(with the share of the supervised test gain the mined run recovers, and how often the
initial mined pairs agree with the labels, computed for the record only).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from retrieval_jax.backbones import backbone_feature_maps, conv_head_params, load_efficientnet_lite
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import label_map
from retrieval_jax.training import embed_with_head, finetune_head, finetune_mined, init_head, mine_on_manifold

from experiments.common import RESULTS, load_image_dataset, pyplot, save_figure, versions, write_csv, write_json

DEFAULT_OUT = RESULTS / "mining_on_manifolds"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ppm", ".tif", ".tiff")
METHODS = ("off-the-shelf", "mined", "supervised")


# ----------------------------------------------------------------------------- data
def class_halves(labels) -> tuple[np.ndarray, np.ndarray]:
    """(train mask, test mask): the first ceil(c / 2) sorted classes, and the others."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to split them in halves, got {len(classes)}")
    train = np.isin(labels, classes[:math.ceil(len(classes) / 2)])
    return train, ~train


def read_image_folder(folder, size: int) -> tuple[np.ndarray, list[str]]:
    """uint8 RGB images [n, size, size, 3] of the image files under ``folder`` (sorted by
    relative path, resized with bilinear filtering), and their relative paths."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    images = np.empty((len(files), size, size, 3), np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as img:
            images[i] = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return images, [str(p.relative_to(folder)) for p in files]


def read_labels(path, n: int) -> np.ndarray:
    """Class labels [n] from a ``.npy`` file (any values; compared for equality only)."""
    labels = np.load(path, allow_pickle=False)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{path} holds labels of shape {labels.shape}; the folder has {n} images, "
                         f"so it must be [{n}] (one label per image, in sorted path order)")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ValueError(f"{path} holds NaN or inf labels")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


# ----------------------------------------------------------------------------- scoring
def knn_map(desc, labels) -> float:
    """Label mAP (%) of every item querying the others by inner product, itself excluded."""
    d = np.asarray(desc, np.float32)
    ids = np.arange(len(d))
    return 100.0 * label_map(ranking_from_scores(d @ d.T, exclude=ids), np.asarray(labels))


def recovered(rows) -> float | None:
    """(mined - off-the-shelf) / (supervised - off-the-shelf) on the test half (None if
    supervised gains nothing)."""
    m = {r["method"]: r["map"] for r in rows if r["split"] == "test"}
    gain = m["supervised"] - m["off-the-shelf"]
    return None if gain <= 0 else (m["mined"] - m["off-the-shelf"]) / gain


def label_agreement(desc, labels, **mining) -> dict:
    """How often the mined pairs agree with the labels (scoring only): the share of positive
    pairs of the same class and of negative pairs of different classes, and their counts."""
    m = mine_on_manifold(np.asarray(desc), show_progress=False, **mining)
    a = np.asarray(labels)[np.asarray(m.anchors)][:, None]
    pm, nm = np.asarray(m.positive_mask), np.asarray(m.negative_mask)
    same = np.asarray(labels)[np.asarray(m.positives)] == a
    other = np.asarray(labels)[np.asarray(m.negatives)] != a
    return {"positive_pairs": int(pm.sum()), "positives_same_class": round(float(same[pm].mean()), 3),
            "negative_pairs": int(nm.sum()), "negatives_other_class": round(float(other[nm].mean()), 3)}


def run(name: str, pre: np.ndarray, labels: np.ndarray, conv0: dict, args) -> tuple[list[dict], dict, dict]:
    """Off-the-shelf, mined and supervised mAP on both halves of one data set, and the
    label agreement of the initial mining."""
    train, test = class_halves(labels)
    x_tr, x_te, y_tr, y_te = pre[train], pre[test], labels[train], labels[test]
    n_tr = int(train.sum())
    head0 = init_head(conv_head=conv0)
    rows = []

    def add(method, params):
        for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            rows.append({"method": method, "split": split, "map": round(knn_map(embed_with_head(params, x), y), 2)})

    add("off-the-shelf", head0)
    k = min(args.k, n_tr - 1)
    pos_k = min(args.pos_k, n_tr - 2)
    agreement = label_agreement(embed_with_head(head0, x_tr), y_tr, k=k, pos_k=pos_k, neg_k=args.neg_k,
                                num_anchors=args.num_anchors)
    print(f"[{name}] initial mining: {agreement}", flush=True)
    t0 = time.time()
    params, hist = finetune_mined(
        x_tr, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch=args.batch, lr=args.lr,
        margin=0.5, negatives=5, k=k, pos_k=pos_k, neg_k=args.neg_k, num_anchors=args.num_anchors,
        remine=args.remine, conv_head=conv0, seed=args.seed,
        callback=lambda epoch, p: knn_map(embed_with_head(p, x_te), y_te))
    print(f"[{name}] mined: {args.epochs} epochs in {time.time() - t0:.0f}s, {hist['positives'][0]} positive "
          f"pairs, loss {hist['epoch_loss'][0]:.4f} -> {hist['epoch_loss'][-1]:.4f}", flush=True)
    add("mined", params)
    steps = args.epochs * args.steps_per_epoch
    t0 = time.time()
    params, sup_hist = finetune_head(x_tr, y_tr, steps=steps, lr=args.lr, margin=0.3, batch=args.batch,
                                     negatives=5, mine_every=20, conv_head=conv0, seed=args.seed)
    print(f"[{name}] supervised: {steps} steps in {time.time() - t0:.0f}s", flush=True)
    add("supervised", params)
    for r in rows:
        print(f"[{name}] {r['method']:14s} {r['split']:5s} mAP {r['map']:6.2f}", flush=True)
    curves = {"epoch_loss": hist["epoch_loss"], "test_map": np.asarray(hist["callback"], np.float64),
              "supervised_loss": sup_hist["loss"].reshape(args.epochs, -1).mean(axis=1)}
    return rows, curves, agreement


def plot_curves(path: Path, name: str, rows: list[dict], curves: dict) -> None:
    plt = pyplot()
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    epochs = np.arange(1, len(curves["epoch_loss"]) + 1)
    ax_l.plot(epochs, curves["epoch_loss"], marker="o", label="mined (weighted triplet, m = 0.5)")
    ax_l.plot(epochs, curves["supervised_loss"], marker="s", label="supervised (triplet, m = 0.3)")
    ax_l.set_yscale("symlog", linthresh=1e-3)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("mean training loss")
    ax_l.set_title(f"{name}: training loss", fontsize=9)
    ax_l.legend(fontsize=7)
    test = {r["method"]: r["map"] for r in rows if r["split"] == "test"}
    mined = np.concatenate([[test["off-the-shelf"]], curves["test_map"]])
    ax_m.plot(np.arange(len(mined)), mined, marker="o", label="mined (epoch 0: off-the-shelf)")
    ax_m.axhline(test["off-the-shelf"], color="grey", ls="--", label="off-the-shelf")
    ax_m.axhline(test["supervised"], color="C1", ls=":", label="supervised (final)")
    values = np.concatenate([mined, [test["supervised"]]])
    pad = 0.1 * max(float(np.ptp(values)), 0.5)
    ax_m.set_ylim(float(values.min()) - pad, float(values.max()) + pad)
    ax_m.set_xlabel("epoch")
    ax_m.set_ylabel("test-half kNN mAP (%)")
    ax_m.set_title(f"{name}: held-out classes", fontsize=9)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--datasets", nargs="+", choices=("coil20", "mpeg7"), default=["coil20", "mpeg7"])
    ap.add_argument("--images", type=Path, default=None, help="a labelled image folder (instead of --datasets)")
    ap.add_argument("--labels", type=Path, default=None, help="labels of --images, a .npy of one label per image")
    ap.add_argument("--size", type=int, default=48, help="image side fed to the backbone")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=30, help="kNN graph of the mining")
    ap.add_argument("--pos-k", type=int, default=50, help="the k of the positives P+")
    ap.add_argument("--neg-k", type=int, default=None, help="the k of the negatives P- (default: ceil(n / 2))")
    ap.add_argument("--num-anchors", type=int, default=None, help="random-walk anchors (default: every image)")
    ap.add_argument("--remine", action="store_true", help="mine again from the current head every epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="COIL-20 at 32 px, 24 poses per object, 3 x 5 steps")
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if (args.images is None) != (args.labels is None):
        ap.error("--images and --labels go together")
    per_class = None
    if args.quick:
        args.size, args.epochs, args.steps_per_epoch, args.batch, args.k, per_class = 32, 3, 5, 16, 10, 24
        if args.images is None:
            args.datasets = ["coil20"]
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    backbone = load_efficientnet_lite("lite0")
    conv0 = conv_head_params(backbone)
    if args.images is not None:
        images, _ = read_image_folder(args.images, args.size)
        sets = [("images", lambda: (images, read_labels(args.labels, len(images))))]
    else:
        sets = [(name, lambda name=name: load_image_dataset(name, args.size, per_class=per_class)[:2])
                for name in args.datasets]
    summary = {}
    for name, load in sets:
        try:
            images, labels = load()
        except FileNotFoundError as exc:
            print(f"[{name}] skipped: {exc}", file=sys.stderr)
            continue
        t0 = time.time()
        pre = backbone_feature_maps(backbone, images, pre_head=True)
        print(f"[{name}] frozen maps {pre.shape} in {time.time() - t0:.0f}s", flush=True)
        rows, curves, agreement = run(name, pre, labels, conv0, args)
        write_csv(args.out / f"{name}_results.csv", rows, ["method", "split", "map"])
        write_csv(args.out / f"{name}_history.csv",
                  [{"epoch": e + 1, "mined_loss": float(curves["epoch_loss"][e]),
                    "supervised_loss": float(curves["supervised_loss"][e]),
                    "test_map": round(float(curves["test_map"][e]), 2)} for e in range(args.epochs)])
        plot_curves(args.out / f"{name}_curves.png", name, rows, curves)
        share = recovered(rows)
        summary[name] = {"images": int(len(labels)), "classes": int(len(np.unique(labels))),
                         "recovered_share_of_supervised_test_gain": None if share is None else round(share, 3),
                         "initial_mining_label_agreement": agreement}
        print(f"[{name}] mined recovers {'n/a (supervised gains nothing)' if share is None else f'{share:.0%}'} "
              f"of the supervised test gain", flush=True)
    if not summary:
        print("no data set found", file=sys.stderr)
        return 2
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(summary=summary, seconds=round(time.time() - t_start, 1), versions=versions())
    write_json(args.out / "config.json", config)
    print(f"wrote {args.out} in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
