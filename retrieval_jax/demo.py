"""The main job: kNN search vs diffusion on a real data set, as a table and a figure.

    python -m retrieval_jax.demo [--dataset digits|coil20|mpeg7] [--out results/demo]

Every item of the collection is a query (label protocol, the query excluded from
its own ranking). Prints mAP and mP@10 of plain kNN search and of diffusion (full
CG, with Iscen et al.'s 20 steps and run to convergence; exact, by the inverse per
connected component when the components are small; and truncated), writes
``results.csv`` and ``queries.png``: a few queries with their top results, the kNN
row above the diffusion row, correct results framed green and wrong ones red.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from .data import datasets
from .files import write_csv
from .diffusion import ranking_from_scores
from .evaluation import mean_average_precision
from .evaluation.figures import ranked_results_figure
from .methods import DIFFUSION, KNN_SEARCH, DiffusionConfig, KnnConfig


def label_protocol(ranking: np.ndarray, labels: np.ndarray, ks=(10,)):
    """mAP and mP@k of rankings of a labelled collection against itself (self is junk)."""
    n = labels.shape[0]
    by_label = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    positives = [by_label[labels[q]][by_label[labels[q]] != q] for q in range(n)]
    junk = [[q] for q in range(n)]
    return mean_average_precision(ranking, positives, junk, ks=ks)


def load(name: str, *, images: bool = True):
    if name == "digits":
        return datasets.load_digits(images=images)
    if name == "coil20":
        return datasets.load_coil20(images=images)
    if name == "mpeg7":
        return datasets.load_mpeg7(images=images)
    raise ValueError(f"unknown data set {name!r}; choose digits, coil20 or mpeg7")


def default_configs(n: int, k: int):
    """The rows of the demo table: (label, method, config)."""
    return [
        ("kNN search", KNN_SEARCH, KnnConfig()),
        ("diffusion, CG 20 steps", DIFFUSION, DiffusionConfig(k=k, max_iter=20)),
        ("diffusion, CG to tol 1e-6", DIFFUSION, DiffusionConfig(k=k, max_iter=1000)),
        ("diffusion, exact (solver auto)", DIFFUSION, DiffusionConfig(k=k, solver="auto")),
        (f"truncated diffusion T={min(500, n)}", DIFFUSION,
         DiffusionConfig(k=k, max_iter=1000, truncate=min(500, n))),
    ]


def run(dataset: str = "digits", k: int = 10, out: str | Path = "results/demo", n_show: int = 6,
        top: int = 8, seed: int = 0):
    data = load(dataset)
    X, labels = data.X, data.labels
    n = X.shape[0]
    ids = np.arange(n, dtype=np.int32)
    rows, rankings = [], {}
    for label, method, cfg in default_configs(n, k):
        t0 = time.perf_counter()
        state = method.build(X, cfg)
        t1 = time.perf_counter()
        scores = method.search_items(state, ids)
        scores = np.asarray(scores)
        t2 = time.perf_counter()
        ranking = ranking_from_scores(scores, exclude=ids)
        res = label_protocol(ranking, labels, ks=(10,))
        rankings[label] = ranking
        rows.append({"method": label, "mAP": 100 * res.map, "mP@10": 100 * res.mp[10],
                     "build_s": t1 - t0, "search_s": t2 - t1,
                     "config": repr(dataclasses.asdict(getattr(state, "config", cfg)))})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _print_table(dataset, n, rows)
    write_csv(out / "results.csv", rows)
    print(f"wrote {out / 'results.csv'}")
    if data.images is not None:
        rng = np.random.default_rng(seed)
        queries = rng.choice(n, size=n_show, replace=False)
        ranked_results_figure(
            out / "queries.png", data.images, labels, queries,
            {"kNN search": rankings["kNN search"], "diffusion": rankings["diffusion, CG to tol 1e-6"]}, top,
            title="top results per query: kNN search (upper row) vs diffusion (lower row); "
                  "green = same class, red = other")
        print(f"wrote {out / 'queries.png'}")
    return rows


def _print_table(dataset, n, rows):
    print(f"\n{dataset}: {n} items, every item a query (itself excluded)\n")
    print(f"| {'method':<32} | {'mAP':>6} | {'mP@10':>6} | {'build s':>8} | {'search s':>8} |")
    print(f"|{'-' * 34}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 10}|")
    for r in rows:
        print(f"| {r['method']:<32} | {r['mAP']:6.2f} | {r['mP@10']:6.2f} "
              f"| {r['build_s']:8.2f} | {r['search_s']:8.2f} |")


def main(argv=None, prog: str | None = None):
    """Run the demo on ``argv``; ``prog`` names it in the usage line (`retrieval-jax demo`)."""
    p = argparse.ArgumentParser(prog=prog or "python -m retrieval_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=["digits", "coil20", "mpeg7"])
    p.add_argument("--k", type=int, default=10, help="graph neighbours (default 10)")
    p.add_argument("--out", default="results/demo", help="output folder for results.csv and queries.png")
    args = p.parse_args(argv)
    run(args.dataset, k=args.k, out=args.out)


if __name__ == "__main__":
    main()
