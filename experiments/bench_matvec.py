"""How many neighbour slots `Graph.matvec` should fuse into one pass: the grid behind `matvec_unroll`.

    python -m experiments.bench_matvec [--sizes 5000 20000 50000 100000] [--batches 1 16 70 200]
        [--k 50] [--repeat 7] [--out results/bench_matvec] [--quick]

``Graph.matvec`` computes y_i = sum_j w_ij x[idx_ij] as a loop over the K neighbour
slots; ``unroll`` slots per pass are fused by XLA into one loop over the rows, so the
[n, B] accumulator goes through memory K / unroll times. `graph.core.matvec_unroll`
fuses all K slots (up to `MATVEC_UNROLL`) from `FULL_UNROLL_NODES` nodes on, and below
that when the accumulator is at most `CACHED_ACCUMULATOR_BYTES`; 8 otherwise. This
experiment times one product W @ X (X float32[n, B]) with 8 slots per pass and all K,
for every n in --sizes, B in --batches, in the database's order and in `locality_order`
(``permute_graph``), inside a jitted loop of products as CG runs them
(`experiments.common.product_seconds`: no fresh output buffer per product),
--repeat values, one configuration at a time; the median and min-max.

Graphs: mutual kNN (k = --k, gamma = 3, normalised) over the clustered synthetic
descriptors of ``bench_diffusion`` / ``bench_converged`` (d = 64, n / 100 centres).

Writes ``matvec.csv`` (one row per n, B, order, unroll, with the ratio of all-K to
8 slots per pass and `matvec_unroll`'s choice) and ``matvec.png`` under --out, and
prints for each (n, B, order) which unroll was faster. --quick: n = 2,000 and 4,000,
B = 1 and 16, k = 10, 3 repeats (the test).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import jax.numpy as jnp

from retrieval_jax.graph import knn_graph, locality_order, normalize, permute_graph
from retrieval_jax.graph.core import matvec_unroll

from experiments.common import clustered, label_axes, product_seconds, pyplot, save_figure, write_csv

COLUMNS = ("n", "K", "B", "order", "unroll", "ms", "ms_min", "ms_max", "all_vs_8", "matvec_unroll_choice")


def time_product(graph, b: int, unroll: int, repeat: int) -> list[float]:
    """Seconds of --repeat products W @ X, X float32[n, b], ``unroll`` slots per pass,
    timed inside a jitted loop of products (`common.product_seconds`)."""
    x = jnp.asarray(np.random.default_rng(b).normal(size=(graph.num_nodes, b)).astype(np.float32))
    return product_seconds(graph.indices, graph.weights, x, unroll=unroll, repeat=repeat)


def build_graph(n: int, d: int, k: int):
    x, _ = clustered(n, d, max(10, n // 100), seed=n)
    try:
        import faiss  # noqa: F401
        method = "faiss" if n > 20000 else "exact"
    except ImportError:
        method = "exact"
    return normalize(knn_graph(x, k, gamma=3.0, mutual=True, method=method))


def run(sizes, batches, k: int, d: int, repeat: int) -> list[dict]:
    rows = []
    for n in sizes:
        t = time.perf_counter()
        graph = build_graph(n, d, k)
        graphs = {"database": graph, "locality": permute_graph(graph, locality_order(graph))}
        kk = graph.max_degree
        print(f"n = {n}: graph K = {kk} in {time.perf_counter() - t:.1f}s", flush=True)
        for b in batches:
            for order, g in graphs.items():
                timed_rows = {}
                for unroll in sorted({min(8, kk), kk}):
                    ts = np.asarray(time_product(g, b, unroll, repeat))
                    timed_rows[unroll] = {"n": n, "K": kk, "B": b, "order": order, "unroll": unroll,
                                          "ms": 1e3 * float(np.median(ts)), "ms_min": 1e3 * float(ts.min()),
                                          "ms_max": 1e3 * float(ts.max()),
                                          "matvec_unroll_choice": matvec_unroll(n, kk, b)}
                    time.sleep(0.5)
                ratio = timed_rows[min(8, kk)]["ms"] / timed_rows[kk]["ms"]
                for r in timed_rows.values():
                    r["all_vs_8"] = ratio
                    rows.append(r)
                best = kk if ratio > 1 else min(8, kk)
                print(f"  B = {b:4d}, {order:<9} 8 per pass {timed_rows[min(8, kk)]['ms']:8.2f} ms, all {kk} "
                      f"{timed_rows[kk]['ms']:8.2f} ms: all-K {ratio:.2f}x; faster: {best}"
                      f"{'' if best == matvec_unroll(n, kk, b) else '  (matvec_unroll picks the other)'}", flush=True)
    return rows


def plot(path, rows):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for order, marker in (("database", "o"), ("locality", "s")):
        for b in sorted({r["B"] for r in rows}):
            pts = sorted({(r["n"], r["all_vs_8"]) for r in rows if r["order"] == order and r["B"] == b})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{order} order, B = {b}")
    ax.axhline(1.0, color="grey", lw=0.8)
    label_axes(ax, xlabel="nodes n", ylabel="time(8 slots per pass) / time(all K)", xscale="log",
               title="Graph.matvec: fusing all K slots vs 8 per pass (> 1: all K faster)")
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000, 100000])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 70, 200])
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default="results/bench_matvec")
    p.add_argument("--quick", action="store_true", help="n = 2,000 / 4,000, B = 1 / 16, k = 10, 3 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.k, args.d, args.repeat = [2000, 4000], [1, 16], 10, 16, 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(args.sizes, args.batches, args.k, args.d, args.repeat)
    write_csv(out / "matvec.csv", rows, COLUMNS)
    plot(out / "matvec.png", rows)
    print(f"wrote {out / 'matvec.csv'}, {out / 'matvec.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
