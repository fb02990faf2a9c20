"""CNN descriptors on real images: EfficientNet-Lite0 GeM / MAC / R-MAC on COIL-20 and MPEG-7.

1. Descriptors. Every image (COIL-20: 128x128 grey objects; MPEG-7: binary
   silhouettes padded to a centred square, as in ``load_mpeg7``) is resized to
   ``--size`` x ``--size`` (default 224, the Lite0 training resolution; bilinear),
   replicated to RGB and passed through the ImageNet-pretrained EfficientNet-Lite0
   (``load_efficientnet_lite("lite0")``, last conv map [B, S/32, S/32, 1280]). One
   backbone pass per image and scale feeds all three poolings (GeM p=3, MAC, R-MAC
   with 3 levels, no whitening); each is L2-normalised. ``--scales 1 0.7071`` adds
   multi-scale descriptors (per-scale descriptors summed, then L2-normalised).
2. Retrieval. Every image is a query against the whole collection:
   * kNN: cosine ranking (``KNN_SEARCH.search_items``);
   * diffusion: ``DIFFUSION.search_items`` with ``DiffusionConfig(k=--k, alpha=0.99,
     gamma=3, max_iter=--max-iter, tol=1e-6)`` (CG until the relative residual is
     1e-6; 500 steps is far more than needed at alpha = 0.99).
   COIL-20 is scored by label mAP (query excluded from its own ranking), MPEG-7 by
   the bull's-eye score (top 40 = 2 x class size, the query counted).
3. Speed. Images per second of the backbone forward pass on this CPU (fixed batch
   of real images, compiled, median of several timed calls), the FLOPs of one
   forward pass from XLA's ``compile().cost_analysis()`` (and, as a cross-check,
   2 x the multiply-adds of the conv layers counted analytically), the implied
   GFLOP/s, and next to it the GFLOP/s of a float32 ``jnp.dot`` of two 2048 x 2048
   matrices timed in the same run.

    python -m experiments.features_benchmark                # full: 2840 images, 224 px
    python -m experiments.features_benchmark --quick        # 10 classes per dataset, 128 px

Writes results.csv, timing.csv, results.md and features_benchmark.png into --out
(default experiments/results/features); descriptors are cached in --out/cache.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.backbones import efficientnet_lite_config, load_efficientnet_lite
from retrieval_jax.descriptors import extract, gem, l2_normalize, mac, rmac
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import bullseye_score, label_map
from retrieval_jax.methods import DIFFUSION, KNN_SEARCH, DiffusionConfig

from experiments.common import (IMAGE_DATASETS, RESULTS, load_image_dataset, pyplot, save_figure,
                                timed, write_csv, write_text)

DEFAULT_OUT = RESULTS / "features"
DATASETS = IMAGE_DATASETS
POOLINGS = ("GeM", "MAC", "R-MAC")
C = 1280  # EfficientNet-Lite head channels
QUICK = dict(classes=10, per_class=10, size=128)


# ----------------------------------------------------------------------------- evaluation
def evaluate(scores, labels, protocol: str) -> float:
    """Label mAP (self excluded) or bull's-eye (top = 2 x class size, self counted)."""
    n = scores.shape[0]
    if protocol == "mAP":
        ranking = ranking_from_scores(scores, exclude=np.arange(n))
        return float(label_map(ranking, labels, exclude_self=True))
    top = 2 * int(np.bincount(labels).max())
    return float(bullseye_score(ranking_from_scores(scores), labels, top=top))


def rank_all(X, labels, protocol: str, k: int, max_iter: int, alpha: float = 0.99) -> dict:
    """{"kNN": score, "diffusion": score} with every item a query."""
    X = np.asarray(X, np.float32)
    ids = np.arange(X.shape[0])
    knn_scores = KNN_SEARCH.search_items(KNN_SEARCH.build(X), ids)
    cfg = DiffusionConfig(k=k, alpha=alpha, gamma=3.0, tol=1e-6, max_iter=max_iter)
    diff_scores = DIFFUSION.search_items(DIFFUSION.build(X, cfg), ids)
    return {"kNN": evaluate(np.asarray(knn_scores), labels, protocol),
            "diffusion": evaluate(np.asarray(diff_scores), labels, protocol)}


# ----------------------------------------------------------------------------- descriptors
def gem_mac_rmac(x, mask=None):
    """[B, H, W, C] -> [B, 3C]: L2-normalised GeM (p=3) | MAC | R-MAC (3 levels), one pass."""
    return jnp.concatenate([l2_normalize(gem(x, mask=mask)), l2_normalize(mac(x, mask=mask)),
                            rmac(x, mask=mask)], axis=-1)


# the extract cache fingerprints the pooling by module + name: keep it the same whether
# this module runs with ``python -m`` (__main__) or is imported (tests), and as it was
# when experiments were scripts (caches stay valid)
gem_mac_rmac.__module__ = "features_benchmark"


def describe(images, model, scales, cache: Path, batch_size: int = 16):
    """{pooling: float32[n, C]} and the wall-clock seconds (None when read from the cache)."""
    hit = cache.exists()
    t0 = time.perf_counter()
    out = extract(list(images), model, gem_mac_rmac, batch_size=batch_size, scales=scales,
                  cache=cache, normalize=False)
    seconds = None if hit else time.perf_counter() - t0
    D = out.descriptors
    parts = {p: np.asarray(l2_normalize(D[:, i * C:(i + 1) * C])) for i, p in enumerate(POOLINGS)}
    return parts, seconds


# ----------------------------------------------------------------------------- speed
def _median_seconds(fn, reps: int, min_seconds: float = 0.0) -> float:
    """Median seconds of ``fn()`` after one untimed warm-up call (compilation)."""
    fn()
    return timed(fn, reps, min_seconds=min_seconds)[1]


def analytic_flops(size: int, variant: str = "lite0") -> float:
    """2 x multiply-adds of every conv of EfficientNet-Lite features() at size x size.

    Stem 3x3/2, per block 1x1 expand, kxk depthwise (stride s), 1x1 project, 1x1 head;
    batch norm, ReLU6 and residual adds are not counted (< 1% of the total).
    """
    cfg = efficientnet_lite_config(variant)
    h = -(-size // 2)
    macs = h * h * 3 * 3 * 3 * cfg.stem_channels
    for b in cfg.blocks:
        hidden = b.in_channels * b.expand_ratio
        if b.expand_ratio != 1:
            macs += h * h * b.in_channels * hidden
        h = -(-h // b.stride)
        macs += h * h * b.kernel_size ** 2 * hidden + h * h * hidden * b.out_channels
    macs += h * h * cfg.blocks[-1].out_channels * cfg.head_channels
    return 2.0 * macs


def xla_flops(model, batch) -> float | None:
    """FLOPs per image of model.features from XLA's cost analysis (None if unavailable)."""
    try:
        cost = jax.jit(lambda x: model.features(x)).lower(batch).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - backend without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) / batch.shape[0] if flops and flops > 0 else None


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), np.float32))
    dot = jax.jit(jnp.dot)
    secs = _median_seconds(lambda: dot(a, b).block_until_ready(), reps)
    return 2.0 * n ** 3 / secs / 1e9


def speed(model, images, size: int, batch_size: int, reps: int) -> dict:
    """Forward-pass images/s on a batch of real images, FLOPs, GFLOP/s, matmul GFLOP/s."""
    grey = np.asarray(images[:batch_size], np.float32) / 255.0
    if grey.shape[0] < batch_size:
        grey = np.concatenate([grey] * math.ceil(batch_size / grey.shape[0]))[:batch_size]
    batch = jnp.asarray(np.repeat(grey[..., None], 3, axis=-1))
    secs = _median_seconds(lambda: model.features(batch).block_until_ready(), reps, 2.0)
    ips = batch_size / secs
    f_xla, f_ana = xla_flops(model, batch), analytic_flops(size)
    flops = f_xla if f_xla is not None else f_ana
    mm = matmul_gflops()
    gf = ips * flops / 1e9
    return {"size": size, "batch": batch_size, "forward_images_per_s": ips,
            "gflop_per_image": flops / 1e9,
            "flop_source": "xla cost_analysis" if f_xla is not None else "analytic",
            "gflop_per_image_xla": (f_xla or float("nan")) / 1e9,
            "gflop_per_image_analytic": f_ana / 1e9,
            "model_gflops": gf, "matmul_gflops": mm, "ratio": gf / mm}


# ----------------------------------------------------------------------------- outputs
def markdown(rows: list[dict], timing: dict, extract_ips: dict, scales, args) -> str:
    descs = list(dict.fromkeys(r["descriptor"] for r in rows))
    val = {(r["dataset"], r["descriptor"], r["method"]): r["score"] for r in rows}
    n = {r["dataset"]: r["n"] for r in rows}
    head = ("| descriptor | COIL-20 mAP, kNN | COIL-20 mAP, diffusion | "
            "MPEG-7 bull's-eye, kNN | MPEG-7 bull's-eye, diffusion |")
    lines = [f"EfficientNet-Lite0 (ImageNet), {args.size} x {args.size} px input, "
             f"scales {' and '.join('+'.join(f'{s:g}' for s in ss) for ss in scales)}; COIL-20 n = {n.get('coil20')}, "
             f"MPEG-7 n = {n.get('mpeg7')}; diffusion k = {args.k}, alpha = 0.99, gamma = 3, "
             f"CG tol 1e-6, max {args.max_iter} steps.", "", head, "|---|---|---|---|---|"]
    for d in descs:
        cells = [f"{100 * val[(ds, d, m)]:.2f}" if (ds, d, m) in val else "-"
                 for ds in DATASETS for m in ("kNN", "diffusion")]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    t = timing
    lines += ["", "| input | forward img/s | GFLOP / image | model GFLOP/s | "
              "2048^2 matmul GFLOP/s | ratio | extract img/s (end to end) |",
              "|---|---|---|---|---|---|---|",
              f"| {t['size']} px, batch {t['batch']} | {t['forward_images_per_s']:.1f} | "
              f"{t['gflop_per_image']:.3f} ({t['flop_source']}; analytic conv count "
              f"{t['gflop_per_image_analytic']:.3f}) | {t['model_gflops']:.1f} | "
              f"{t['matmul_gflops']:.1f} | {t['ratio']:.2f} | "
              + ", ".join(f"{k}: {v:.1f}" if v else f"{k}: cached" for k, v in extract_ips.items())
              + " |"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], timing: dict, path: Path) -> None:
    descs = list(dict.fromkeys(r["descriptor"] for r in rows))
    val = {(r["dataset"], r["descriptor"], r["method"]): r["score"] for r in rows}
    fig, axes = pyplot().subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [3, 3, 1.6]})
    xs = np.arange(len(descs))
    for ax, ds, title in zip(axes, DATASETS, ("COIL-20: label mAP (%)", "MPEG-7: bull's-eye (%)")):
        for j, (m, colour) in enumerate((("kNN", "tab:grey"), ("diffusion", "tab:blue"))):
            v = [100 * val.get((ds, d, m), np.nan) for d in descs]
            bars = ax.bar(xs + (j - 0.5) * 0.4, v, 0.4, label=m, color=colour)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(xs, descs, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, 105)
        ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    bars = ax.bar([0, 1], [timing["model_gflops"], timing["matmul_gflops"]],
                  color=["tab:orange", "tab:green"])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([0, 1], [f"Lite0\n{timing['forward_images_per_s']:.0f} img/s", "2048^2\nmatmul"],
                  fontsize=8)
    ax.set_title(f"GFLOP/s (ratio {timing['ratio']:.2f})")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- main
def image_experiment_parser(doc: str, *, out: Path, datasets) -> argparse.ArgumentParser:
    """The flags of an experiment on CNN descriptors of the image data sets: --out,
    --quick (the `QUICK` subset), --size and --datasets (choices ``datasets``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['classes']} classes x {QUICK['per_class']} images per "
                             f"dataset at {QUICK['size']} px (for tests)")
    parser.add_argument("--size", type=int, default=None, help="input side in px (default 224)")
    parser.add_argument("--datasets", nargs="+", default=list(datasets), choices=datasets)
    return parser


def main(argv=None) -> int:
    parser = image_experiment_parser(__doc__, out=DEFAULT_OUT, datasets=DATASETS)
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="extra runs at these scales (summed), e.g. 1 0.7071")
    parser.add_argument("--k", type=int, default=10, help="diffusion graph neighbours")
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="timed forward calls (median)")
    args = parser.parse_args(argv)
    args.size = args.size or (QUICK["size"] if args.quick else 224)
    sub = dict(classes=QUICK["classes"], per_class=QUICK["per_class"]) if args.quick else {}
    tag = "quick" if args.quick else "full"
    out = args.out
    (out / "cache").mkdir(parents=True, exist_ok=True)

    model = load_efficientnet_lite("lite0")
    scale_sets = [(1.0,)] + ([tuple(args.scales)] if args.scales and
                             tuple(args.scales) != (1.0,) else [])
    rows, extract_ips, first_images = [], {}, None
    for name in args.datasets:
        images, labels, protocol = load_image_dataset(name, args.size, **sub)
        first_images = images if first_images is None else first_images
        for scales in scale_sets:
            stag = "+".join(f"{s:g}" for s in scales)
            cache = out / "cache" / f"{name}_{tag}_{args.size}px_s{stag}.npz"
            parts, secs = describe(images, model, scales, cache, args.batch_size)
            if scales == (1.0,):
                extract_ips[name] = len(images) / secs if secs else None
            for pooling, X in parts.items():
                label = pooling if scales == (1.0,) else f"{pooling} MS({stag})"
                res = rank_all(X, labels, protocol, args.k, args.max_iter)
                for method, score in res.items():
                    rows.append(dict(dataset=name, n=len(labels), protocol=protocol,
                                     size=args.size, scales=stag, descriptor=label,
                                     method=method, score=round(score, 5)))
                print(f"{name:7s} {label:22s} kNN {100 * res['kNN']:6.2f}  "
                      f"diffusion {100 * res['diffusion']:6.2f}  ({protocol})", flush=True)

    timing = speed(model, first_images, args.size, args.batch_size, args.reps)
    timing["extract_images_per_s"] = "; ".join(
        f"{k}={v:.2f}" if v else f"{k}=cached" for k, v in extract_ips.items())
    print(f"forward {timing['forward_images_per_s']:.1f} img/s at {args.size} px x "
          f"{timing['gflop_per_image']:.3f} GFLOP ({timing['flop_source']}) = "
          f"{timing['model_gflops']:.1f} GFLOP/s; 2048^2 float32 matmul "
          f"{timing['matmul_gflops']:.1f} GFLOP/s; ratio {timing['ratio']:.2f}", flush=True)

    write_csv(out / "results.csv", rows)
    write_csv(out / "timing.csv", [{k: (round(v, 4) if isinstance(v, float) else v)
                                     for k, v in timing.items()}])
    write_text(out / "results.md", markdown(rows, timing, extract_ips, scale_sets, args))
    plot(rows, timing, out / "features_benchmark.png")
    print(f"wrote {out}/results.csv, timing.csv, results.md, features_benchmark.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
