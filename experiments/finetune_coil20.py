"""Fine-tuning EfficientNet-Lite0 GeM descriptors on COIL-20 objects 1-10, tested on 11-20.

    python -m experiments.finetune_coil20 [--out experiments/results/finetune]
        [--sizes 48 128] [--steps 200] [--seed 0] [--data ../shared/data/coil20] [--quick]

Recipe (`retrieval_jax.training.finetune`, after Radenovic, Tolias & Chum, TPAMI
2018): frozen ImageNet EfficientNet-Lite0 up to its last conv block, features of
the 1440 grey images (replicated to RGB, resized to each ``--sizes`` side) computed
once; then triplet loss (margin 0.3, 5 hard negatives per anchor re-mined every 20
steps from the current descriptors, a random positive pose) trains, with Adam,

* ``conv``: GeM p + the last conv block (1x1 conv 320 -> 1280, BN folded, ReLU6);
* ``whiten``: GeM p + a linear whitening head (1280 x 1280, identity init).

Both start exactly at the ImageNet GeM descriptor (row ``imagenet``). Every
held-out image (objects 11-20, 720 images) queries the other held-out images
(itself excluded) by kNN search and by diffusion (``DIFFUSION``, mutual kNN graph
k = 5 and 10, alpha = 0.99) on the held-out descriptors; the score is label mAP.

Writes into ``--out`` (atomically): ``results.csv`` (size, head, search, mAP),
``training_curve.png`` (triplet loss and GeM p per step), ``saliency_*.png``
(gradient saliency of the similarity, Simonyan et al. 2014, for a few held-out
query / top-1 result pairs before and after fine-tuning, and CroW feature
saliency of the fine-tuned maps), ``config.json`` (and with ``--save-heads`` the fine-tuned heads as checkpoints).
About 3 minutes on 2 busy CPU cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from retrieval_jax.backbones import backbone_feature_maps, conv_head_params, load_efficientnet_lite
from retrieval_jax.data import load_coil20
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import label_map
from retrieval_jax.explanation.saliency import feature_saliency, save_overlay, similarity_saliency
from retrieval_jax.methods import DIFFUSION, KNN_SEARCH, DiffusionConfig, KnnConfig
from retrieval_jax.training.finetune import (apply_conv_head, embed_with_head, finetune_head, head_model,
                                             init_head)

from experiments.common import REPO, RESULTS, save_figure, write_csv, write_json

DEFAULT_OUT = RESULTS / "finetune"
DIFFUSION_K = (5, 10)
HEADS = ("imagenet", "whiten", "conv")


def _default_data() -> Path:
    root = os.environ.get("RETRIEVAL_JAX_DATA")
    return (Path(root) if root else REPO.parent / "shared" / "data") / "coil20"


def search_maps(desc, labels, diffusion_k=DIFFUSION_K) -> dict[str, float]:
    """Held-out label mAP of kNN search and diffusion, every item querying the others."""
    desc = np.asarray(desc, np.float32)
    ids = np.arange(len(desc), dtype=np.int32)
    out = {}
    scores = KNN_SEARCH.search_items(KNN_SEARCH.build(desc, KnnConfig()), ids)
    out["knn"] = label_map(ranking_from_scores(scores, exclude=ids), labels)
    for k in diffusion_k:
        state = DIFFUSION.build(desc, DiffusionConfig(k=k, alpha=0.99, max_iter=200, tol=1e-6))
        scores = DIFFUSION.search_items(state, ids)
        out[f"diffusion k={k}"] = label_map(ranking_from_scores(scores, exclude=ids), labels)
    return out


def _plot_curves(path: Path, histories: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    ax_l, ax_p = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, h in histories.items():
        loss = h["loss"]
        w = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax_l.plot(np.arange(len(smooth)) + w - 1, smooth, label=name)
        ax_p.plot(h["p"], label=name)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("triplet loss (moving mean)")
    ax_l.set_yscale("symlog", linthresh=1e-3)
    ax_p.set_xlabel("step")
    ax_p.set_ylabel("GeM p")
    ax_l.legend(fontsize=7)
    ax_l.set_title("COIL-20 objects 1-10, hard negatives", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _saliency_figures(out: Path, backbone, images, params_ft, desc0, desc1, labels,
                      n_pairs: int) -> list[str]:
    """Gradient saliency of query/top-1 pairs before (ImageNet) and after fine-tuning."""
    written = []
    model0 = head_model(backbone, init_head(conv_head=conv_head_params(backbone)))
    model1 = head_model(backbone, params_ft)
    s0, s1 = desc0 @ desc0.T, desc1 @ desc1.T
    np.fill_diagonal(s0, -np.inf)
    np.fill_diagonal(s1, -np.inf)
    top0, top1 = s0.argmax(1), s1.argmax(1)
    fixed = np.flatnonzero((labels[top0] != labels) & (labels[top1] == labels))
    # queries whose top-1 fine-tuning corrected first, then one per object
    others = [int(np.flatnonzero(labels == c)[9]) for c in np.unique(labels)]
    queries = list(dict.fromkeys([int(q) for q in fixed[:n_pairs]] + others))[:n_pairs]
    rgb = images.astype(np.float32) / 255.0
    for q in queries:
        r0, r1 = int(top0[q]), int(top1[q])
        panels, sals, titles = [], [], []
        for tag, model, desc, r in (("ImageNet", model0, desc0, r0), ("fine-tuned", model1, desc1, r1)):
            panels += [rgb[q], rgb[r]]
            sals += [similarity_saliency(*model, rgb[q], desc[r], percentile=99.0),
                     similarity_saliency(*model, rgb[r], desc[q], percentile=99.0)]
            ok = "ok" if labels[r] == labels[q] else "wrong"
            titles += [f"{tag}: query obj{labels[q] + 1}",
                       f"top-1 obj{labels[r] + 1} ({ok}) s={desc[q] @ desc[r]:.3f}"]
        path = out / f"saliency_query{q}.png"
        save_overlay(path, panels, sals, title=titles)
        written.append(path.name)
        # CroW feature saliency of the fine-tuned last conv maps (query, result)
        f1 = np.asarray(model1[0](rgb[[q, r1]][..., None].repeat(3, -1)))
        feats = [feature_saliency(f, image_size=rgb.shape[1:3]) for f in f1]
        path = out / f"feature_saliency_query{q}.png"
        save_overlay(path, [rgb[q], rgb[r1]], feats,
                     title=[f"CroW map, query obj{labels[q] + 1}", f"top-1 obj{labels[r1] + 1}"])
        written.append(path.name)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--data", type=Path, default=None, help="COIL-20 folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 128])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=3, help="saliency query/result pairs")
    ap.add_argument("--save-heads", action="store_true",
                    help="also write the fine-tuned conv heads (head_conv_<size>px.npz, ~11 MB each)")
    ap.add_argument("--quick", action="store_true", help="one small size, 60 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.pairs = [32], 60, 1
    root = args.data or _default_data()
    if not root.is_dir():
        print(f"COIL-20 folder {root} is absent (set RETRIEVAL_JAX_DATA or --data)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    backbone = load_efficientnet_lite("lite0")
    conv0 = conv_head_params(backbone)
    rows, histories, saliency_files = [], {}, []
    for size in args.sizes:
        t0 = time.time()
        data = load_coil20(root, size=size, images=True)
        pre = backbone_feature_maps(backbone, data.images, pre_head=True)
        print(f"[{size}px] frozen maps {pre.shape} in {time.time() - t0:.1f}s", flush=True)
        train, test = data.labels < 10, data.labels >= 10
        y_test = data.labels[test]
        head0 = init_head(conv_head=conv0)
        descs = {"imagenet": np.asarray(embed_with_head(head0, pre[test]))}
        last = None
        for head in ("whiten", "conv"):
            t0 = time.time()
            if head == "conv":
                params, hist = finetune_head(pre[train], data.labels[train], steps=args.steps,
                                             lr=1e-3, margin=0.3, seed=args.seed, conv_head=conv0,
                                             checkpoint=(args.out / f"head_conv_{size}px.npz"
                                                         if args.save_heads else None))
                descs[head] = np.asarray(embed_with_head(params, pre[test]))
                params_conv = params
            else:
                if last is None:  # ImageNet last conv maps (= backbone.features)
                    last = np.asarray(apply_conv_head(conv0, pre))
                params, hist = finetune_head(last[train], data.labels[train], steps=args.steps,
                                             lr=1e-3, margin=0.3, seed=args.seed)
                descs[head] = np.asarray(embed_with_head(params, last[test]))
            histories[f"{head} {size}px"] = hist
            print(f"[{size}px] {head}: {args.steps} steps in {time.time() - t0:.1f}s, "
                  f"loss {hist['loss'][:10].mean():.4f} -> {hist['loss'][-10:].mean():.4f}, "
                  f"p {hist['p'][0]:.2f} -> {float(params['p']):.2f}", flush=True)
        for head in HEADS:
            for search, m in search_maps(descs[head], y_test).items():
                rows.append({"size": size, "head": head, "search": search,
                             "heldout_mAP": round(100 * m, 2), "steps": 0 if head == "imagenet" else args.steps})
                print(f"[{size}px] {head:9s} {search:14s} held-out mAP {100 * m:6.2f}", flush=True)
        if size == args.sizes[-1]:
            saliency_files = _saliency_figures(args.out, backbone, data.images[test],
                                               params_conv, descs["imagenet"], descs["conv"],
                                               y_test, args.pairs)
    write_csv(args.out / "results.csv", rows)
    _plot_curves(args.out / "training_curve.png", histories)
    config = {"sizes": args.sizes, "steps": args.steps, "seed": args.seed, "lr": 1e-3, "margin": 0.3,
              "batch": 32, "negatives": 5, "mine_every": 20, "diffusion_k": list(DIFFUSION_K),
              "train_objects": "1-10", "test_objects": "11-20", "saliency": saliency_files,
              "seconds": round(time.time() - t_start, 1)}
    write_json(args.out / "config.json", config)
    print(f"wrote {args.out} in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
