"""Object discovery's region graph at scale, on synthetic feature maps.

Runs the first half of `retrieval_jax.discovery.discover` step by step on N synthetic
images (`retrieval_jax.discovery.synthetic_batch`: per image one of ``objects``
recurring objects and ``clutter`` blobs of its own, about nine EGM regions per image),
batch by batch:

1. pass 1 (`collect_regions`): FS maps, EGM regions, max-pooled regional descriptors;
2. PCA whitening learned on all regions and applied;
3. the reciprocal kNN graph of regions of different images (`region_graph`);
4. its normalisation and Katz centrality (`region_centrality`);

each with its wall time and peak resident memory, then the whole two-pass `discover`
(OS maps and OS.EGM descriptors included) on a smaller collection, with the share of
the FS and OS mass inside the object's box. Quality check at scale: the mean
centrality of the regions on the object against the others.

    python -m experiments.discovery_scale                 # 11,200 images, ~100,000 regions
    python -m experiments.discovery_scale --quick         # 300 images, a smoke run
    python -m experiments.discovery_scale --images 112000 --graph-method nndescent --discover-images 0
                                                          # ~1,000,000 regions, the graph by NN-descent

Writes experiments/results/discovery_scale/discovery_scale.json (atomically).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import RESULTS, peak_rss_mb, reset_peak_rss, versions, write_json
from retrieval_jax.descriptors import apply_whitening, learn_pca_whitening
from retrieval_jax.discovery import (GRAPH_METHODS, collect_regions, discover, other_image_neighbours,
                                     region_centrality, region_graph, saliency_precision, synthetic_batch)
from retrieval_jax.graph import normalize


def _source(n_images, batch_size, boxes, **kwargs):
    """A re-iterable batch source that records each image's object box on the way."""
    def batches():
        for j, start in enumerate(range(0, n_images, batch_size)):
            maps, bx, has = synthetic_batch(min(batch_size, n_images - start), seed=1000 + j, **kwargs)
            boxes[start:start + len(bx)] = np.where(has[:, None], bx, np.nan)
            yield maps

    batches.num_batches = -(-n_images // batch_size)
    return batches


def _step(rows, name, fn):
    reset_peak_rss()
    t = time.perf_counter()
    out = fn()
    rows.append({"step": name, "seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()})
    print(f"{name}: {rows[-1]['seconds']:.1f} s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=11_200, help="images of the graph run")
    p.add_argument("--discover-images", type=int, default=500, help="images of the end-to-end discover run (0: none)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=28, help="feature map height = width")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--clutter", type=int, default=9, help="clutter blobs per image")
    p.add_argument("--objects", type=int, default=1000, help="distinct recurring objects, one per image")
    p.add_argument("--discover-objects", type=int, default=50,
                   help="distinct objects of the discover run (each then recurs in about N / this many images)")
    p.add_argument("--discover-only", action="store_true", help="only the end-to-end discover run")
    p.add_argument("--capacity", type=int, default=16, help="EGM components per image (static)")
    p.add_argument("--k", type=int, default=10, help="neighbours per region in the graph")
    p.add_argument("--graph-method", choices=GRAPH_METHODS, default="auto",
                   help="the region graph's neighbour search (region_graph's method; 'auto' is NN-descent "
                        "from 200,000 regions on)")
    p.add_argument("--quick", action="store_true", help="300 images, discover on 64: a smoke run")
    p.add_argument("--out", default=str(RESULTS / "discovery_scale"))
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.discover_images, args.batch_size, args.objects, args.discover_objects = 300, 64, 64, 10, 4
    data = dict(shape=(args.size, args.size), channels=args.channels, clutter=args.clutter, objects=args.objects)
    egm = dict(capacity=args.capacity)
    rows = []
    quality = {}
    if not args.discover_only:
        quality = _graph_run(args, data, egm, rows)

    if args.discover_images > 0:
        dboxes = np.full((args.discover_images, 4), np.nan, np.float32)
        ddata = dict(data, objects=args.discover_objects)
        d = _step(rows, f"discover, both passes, {args.discover_images} images",
                  lambda: discover(_source(args.discover_images, args.batch_size, dboxes, **ddata), k=args.k,
                                   keep_maps=True, egm_options=egm, show_progress=True))
        has = ~np.isnan(dboxes[:, 0])
        fs = np.asarray(saliency_precision(np.stack(d.fs_maps)[has], dboxes[has]))
        os_ = np.asarray(saliency_precision(np.stack(d.os_maps)[has], dboxes[has]))
        quality.update({"discover_images": args.discover_images, "discover_regions": d.num_regions,
                        "fs_precision_mean": float(fs.mean()), "os_precision_mean": float(os_.mean()),
                        "os_better_share": float((os_ > fs).mean())})
        print(quality)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "discovery_scale_discover.json" if args.discover_only else "discovery_scale.json"
    out = write_json(f"{args.out}/{name}",
                     {"args": vars(args), "steps": rows, "quality": quality, "versions": versions()})
    print("| step | time | peak RSS |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB |")
    print(f"wrote {out}")
    return 0


def _graph_run(args, data, egm, rows) -> dict:
    """Steps 1-4 on ``args.images`` images: the rows appended, the quality figures returned."""
    boxes = np.full((args.images, 4), np.nan, np.float32)
    collected = _step(rows, "pass 1: FS maps + EGM + regional MAC (incl. generating the maps)",
                      lambda: collect_regions(_source(args.images, args.batch_size, boxes, **data),
                                              egm_options=egm, show_progress=True))
    n_regions = collected.descriptors.shape[0]
    print(f"{args.images} images, {n_regions} regions ({n_regions / args.images:.2f} per image)")
    whitening = _step(rows, "PCA whitening: learn", lambda: learn_pca_whitening(collected.descriptors))
    v = _step(rows, "PCA whitening: apply", lambda: np.asarray(apply_whitening(whitening, collected.descriptors)))
    graph = _step(rows, f"region graph (k = {args.k}, reciprocal, other images only, method {args.graph_method})",
                  lambda: region_graph(v, collected.image, args.k, method=args.graph_method, show_progress=True))
    w = _step(rows, "normalize", lambda: normalize(graph))
    g = _step(rows, "Katz centrality (alpha 0.99, CG)", lambda: region_centrality(w, 0.99))

    # which regions lie on the object: their centre inside the object's box
    centre = np.asarray(collected.regions.centre)[collected.image, collected.slot]
    b = boxes[collected.image]
    on = ((centre[:, 0] >= b[:, 0]) & (centre[:, 0] <= b[:, 2]) & (centre[:, 1] >= b[:, 1])
          & (centre[:, 1] <= b[:, 3]))
    deg = np.asarray(graph.weights > 0).sum(axis=1)
    quality = {"regions": int(n_regions), "images": args.images, "edges": int(deg.sum() // 2),
               "isolated_regions": int((deg == 0).sum()), "object_regions": int(on.sum()),
               "centrality_object_mean": float(g[on].mean()), "centrality_other_mean": float(g[~on].mean())}
    quality.update(_sampled_edge_recall(v, collected.image, graph, args.k))
    print(quality)
    return quality


def _sampled_edge_recall(v, image, graph, k, samples=1000, seed=0) -> dict:
    """The graph's edges at ``samples`` random regions against the exact reciprocal graph there.

    Exact lists (`other_image_neighbours`, method "exact" / faiss) of the sampled regions and of
    their neighbours give the exact mutual edges at the sample: recall = the share of them
    the graph has, precision = the share of the graph's edges there that are exact ones.
    """
    n = v.shape[0]
    rng = np.random.default_rng(seed)
    s = rng.choice(n, min(samples, n), replace=False)
    _, nb, ok = other_image_neighbours(v[s], image[s], v, image, k, method="auto", show_progress=False)
    nb = np.asarray(nb)
    second = np.unique(nb[np.asarray(ok)])
    _, nb2, ok2 = other_image_neighbours(v[second], image[second], v, image, k, method="auto",
                                         show_progress=False)
    lists = {int(j): set(np.asarray(nb2)[r][np.asarray(ok2)[r]].tolist()) for r, j in enumerate(second)}
    ids, w = np.asarray(graph.indices), np.asarray(graph.weights)
    exact_edges = found = got_edges = 0
    for r, i in enumerate(s):
        exact = {int(j) for j in nb[r][np.asarray(ok)[r]] if int(i) in lists[int(j)]}
        got = set(ids[i][w[i] > 0].tolist())
        exact_edges += len(exact)
        got_edges += len(got)
        found += len(exact & got)
    return {"sampled_regions": int(s.size), "sampled_exact_edges": exact_edges,
            "sampled_edge_recall": found / max(exact_edges, 1), "sampled_edge_precision": found / max(got_edges, 1)}


if __name__ == "__main__":
    sys.exit(main())
