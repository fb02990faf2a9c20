"""The main job: kNN search vs diffusion on a real data set, as a table and a figure.

    python -m retrieval_jax.demo [--dataset digits|coil20|mpeg7] [--out results/demo]

Every item of the collection is a query (label protocol, the query excluded from
its own ranking). Prints mAP and mP@10 of plain kNN search and of diffusion (full
CG, with Iscen et al.'s 20 steps and run to convergence; exact, by the inverse per
connected component when the components are small; and truncated), writes
``results.csv`` and ``queries.png``: the queries whose AP diffusion raises most over
kNN search (`largest_gains`), each shown where the two rankings part (from the first
rank at which one is right and the other wrong, `first_difference`), the kNN row
above the diffusion row, correct results framed green and wrong ones red;
``queries.csv`` lists those queries with both APs and that rank.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from .data import datasets
from .files import atomic_write, write_csv
from .diffusion import ranking_from_scores
from .evaluation import mean_average_precision
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


# the two rankings the picture compares
SHOWN = ("kNN search", "diffusion, CG to tol 1e-6")


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
        top: int = 8):
    data = load(dataset)
    X, labels = data.X, data.labels
    n = X.shape[0]
    ids = np.arange(n, dtype=np.int32)
    rows, rankings, aps = [], {}, {}
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
        aps[label] = res.aps
        rows.append({"method": label, "mAP": 100 * res.map, "mP@10": 100 * res.mp[10],
                     "build_s": t1 - t0, "search_s": t2 - t1,
                     "config": repr(dataclasses.asdict(getattr(state, "config", cfg)))})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _print_table(dataset, n, rows)
    write_csv(out / "results.csv", rows)
    print(f"wrote {out / 'results.csv'}")
    base, new = (rankings[name] for name in SHOWN)
    ap_base, ap_new = (aps[name] for name in SHOWN)
    queries = largest_gains(ap_base, ap_new, n_show)
    correct_base, correct_new = (labels[r[queries]] == labels[queries, None] for r in (base, new))
    starts = first_difference(correct_base, correct_new)
    write_csv(out / "queries.csv", [
        {"query": int(q), "label": labels[q].item(), "ap_knn": 100 * ap_base[q],
         "ap_diffusion": 100 * ap_new[q], "gain": 100 * (ap_new[q] - ap_base[q]),
         "first_difference": int(r) + 1} for q, r in zip(queries, starts)])
    print(f"wrote {out / 'queries.csv'}")
    if data.images is not None:
        disagreement_figure(out / "queries.png", data.images, labels, queries, starts,
                            {"kNN search": base, "diffusion": new},
                            {"kNN search": ap_base, "diffusion": ap_new}, top)
        print(f"wrote {out / 'queries.png'}")
    return rows


def largest_gains(ap_base, ap_new, n: int) -> np.ndarray:
    """The ``n`` queries whose AP rises most from ``ap_base`` to ``ap_new``, largest first.

    Ties go to the smaller query id; queries whose AP is NaN (no positive) are left out.
    ap_base, ap_new: float[nq]; returns int[min(n, valid queries)].
    """
    gain = np.asarray(ap_new, np.float64) - np.asarray(ap_base, np.float64)
    valid = np.flatnonzero(np.isfinite(gain))
    order = np.lexsort((valid, -gain[valid]))         # by gain descending, then by id
    return valid[order[:n]]


def first_difference(a, b) -> np.ndarray:
    """Per row, the first (0-based) column where two arrays differ; their width if nowhere.

    a, b: [nq, m] arrays of the same shape: two rankings of the same queries, or (as the
    demo uses it) whether each of their results is correct. Returns int[nq].
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"two arrays of the same shape [nq, m] expected, got {a.shape} and {b.shape}")
    differ = a != b
    return np.where(differ.any(axis=1), differ.argmax(axis=1), a.shape[1])


def disagreement_figure(path, images, labels, queries, starts, named_rankings: dict, aps: dict,
                        top: int = 8, dpi: int = 80) -> Path:
    """A PNG: per query, one row per ranking, ``top`` results from the rank where they part.

    Both rows of query ``queries[i]`` show ranks starts[i] + 1 .. starts[i] + top of their
    ranking (numbered above the first row). Results of the query's class are framed
    green, others red; the query is framed blue; each query's heading gives its class,
    every method's AP and how many of the ranks above the window each ranking got
    right. Written atomically.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(named_rankings)
    row_h, caption_h = 0.95 * len(names) + 0.45, 0.55
    fig = plt.figure(figsize=(1.0 * (top + 1) + 0.9, row_h * len(queries) + caption_h))
    caption, *subfigs = fig.subfigures(len(queries) + 1, 1,
                                       height_ratios=[caption_h] + [row_h] * len(queries))
    caption.text(0.5, 0.5, f"The {len(queries)} queries where diffusion raises AP most over kNN search, "
                 f"each shown from the first rank\nwhere one ranking is right and the other wrong "
                 f"({' / '.join(names)} rows; green = the query's class, red = another class)",
                 ha="center", va="center", fontsize=8)
    for sub, q, start in zip(subfigs, queries, starts):
        right = [int(np.sum(labels[named_rankings[name][q, :start]] == labels[q])) for name in names]
        head = ", ".join(f"{name} AP {100 * aps[name][q]:.0f}" for name in names)
        if not start:
            above = "they part at rank 1"
        elif len(set(right)) == 1:
            above = f"ranks 1-{start} alike ({right[0]} of {start} right in each)"
        else:
            above = f"ranks 1-{start}: " + ", ".join(f"{r} right" for r in right)
        sub.suptitle(f"query {q} (class {labels[q]}): {head}; {above}", fontsize=7, y=0.99)
        axes = sub.subplots(len(names), top + 1, squeeze=False,
                            gridspec_kw=dict(hspace=0.08, wspace=0.08, top=0.8, bottom=0.02,
                                             left=0.09, right=0.99))
        for mi, (name, row) in enumerate(zip(names, axes)):
            ranking = named_rankings[name]
            row[0].imshow(images[q], cmap="gray")
            row[0].set_ylabel(name, fontsize=7)
            _frame(row[0], "tab:blue", 2)
            for j in range(top):
                ax, rank = row[j + 1], start + j
                if rank >= ranking.shape[1]:
                    ax.axis("off")
                    continue
                item = ranking[q, rank]
                ax.imshow(images[item], cmap="gray")
                if mi == 0:
                    ax.set_title(f"rank {rank + 1}", fontsize=6, pad=2)
                _frame(ax, "tab:green" if labels[item] == labels[q] else "tab:red", 3)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return out


def _frame(ax, colour, width):
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


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
