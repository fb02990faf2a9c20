"""kNN-graph construction speed: JAX exact search vs the routes a researcher would otherwise use.

    python -m experiments.bench_knn [--sizes 20000 100000] [--d 256] [--k 50]
        [--sklearn-max N] [--no-nndescent] [--quick] [--out experiments/results/knn]

For each n, synthetic clustered unit vectors (``common.clustered``: n / 100
curved clusters, L2-normalised), and the k nearest neighbours of every item among
the others by inner product (self excluded), by every route in the same process:

* numpy, blocked (the loop a researcher writes): for blocks of 1024 rows,
  ``S = Xb @ X.T``, self masked, ``np.argpartition(-S, k)[:, :k]``, then the k
  sorted. Its neighbours are the ground truth of every recall;
* scikit-learn ``NearestNeighbors(n_neighbors=k + 1, algorithm="brute",
  metric="cosine")`` on the L2-normalised data, fit + kneighbors (n <= --sklearn-max);
* ``retrieval_jax.graph.neighbours(X, X, k, exclude_self=True)``: first call
  (compilation included) and a warm call;
* faiss ``IndexFlatIP`` (exact, the field's standard CPU engine; skipped when
  faiss-cpu is not installed, or with --no-faiss): index build + ``search(X, k + 1)``
  + self dropped, as a researcher calls it; and the library's wrapper
  ``retrieval_jax.graph.faiss_backend.faiss_knn(X, X, k, exclude_self=True)``
  (same search, input checks, int32 output), alone and followed by the mutual
  affinity and padded `Graph` (``affinity_matrix`` + ``Graph.from_scipy``, what
  ``knn_graph(method="faiss")`` does);
* ``retrieval_jax.graph.knn_graph(X, k, gamma=3, mutual=True)``: the whole graph
  (search + mutual affinity + padded `Graph`), ``method="exact"`` (warm) and
  ``method="nndescent"`` (the library's approximate route);
* pynndescent ``NNDescent(X, metric="dot", n_neighbors=k + 1, random_state=0)``
  (approximate): first call (numba compilation included) and a second call on
  the same data (pynndescent caches numba's compiled code on disk, so the first
  call of a process compiles fully only on a cold cache, e.g. an empty
  NUMBA_CACHE_DIR). Run before ``knn_graph(method="nndescent")``, which therefore
  finds numba's functions compiled.

Reported per route: wall-clock seconds (median of --repeat for the warm routes;
first calls are timed once), the ratio t(numpy) / t(route) (> 1: faster than
numpy), the ratio t(jax knn, warm) / t(route) (> 1: faster than the JAX kernel;
for the graph routes, t(jax knn_graph exact) / t(route)), recall@k against the numpy neighbours
(mean over rows of |found & true| / k;
ties in similarity aside, exact routes give 1), and for the ``knn_graph`` routes
the edge recall: the fraction of the edges of the exact mutual graph (built from
the numpy neighbours by ``affinity_matrix``) present in the route's graph. Also
the peak resident memory during each route (the kernel's VmHWM mark, reset before the
route; data and arrays kept from earlier routes included). Writes ``knn_speed.csv``
and ``knn_speed.png`` (atomically).

--quick (used by tests/test_bench_knn.py): n = 2000, d = 32, k = 10, no pynndescent
(faiss included when installed).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import numpy as np

from retrieval_jax.graph import Graph, affinity_matrix, knn, knn_graph
from retrieval_jax.graph.faiss_backend import faiss_available, faiss_knn

from experiments.common import (clustered, process_peak_rss_mb, pyplot, save_figure,
                                timed_with_peak, write_csv)

GAMMA = 3.0
NUMPY_BLOCK = 1024
COLUMNS = ["n", "d", "k", "route", "kind", "seconds", "vs_numpy", "vs_jax", "recall_at_k",
           "edge_recall", "peak_rss_mb", "note"]
JAX_KNN = "jax knn, warm"
JAX_GRAPH = "jax knn_graph exact (mutual graph, warm)"
FAISS_FLAT = "faiss IndexFlatIP search k + 1, self dropped"
FAISS_KNN = "retrieval_jax faiss_knn (IndexFlatIP backend)"
FAISS_GRAPH = "faiss_knn + affinity_matrix (mutual graph)"

_NNDESCENT_RUN: list = []  # sizes at which pynndescent ran (its first call compiles once per process)


# --------------------------------------------------------------------------- routes
def numpy_knn(X: np.ndarray, k: int, block: int = NUMPY_BLOCK):
    """Exact top-k inner products of every row among the others: blocked matmul + argpartition."""
    n = X.shape[0]
    sims = np.empty((n, k), np.float32)
    idx = np.empty((n, k), np.int64)
    for s in range(0, n, block):
        S = X[s:s + block] @ X.T
        r = np.arange(S.shape[0])
        S[r, s + r] = -np.inf  # exclude self
        part = np.argpartition(-S, k, axis=1)[:, :k]
        ps = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-ps, axis=1)
        idx[s:s + block] = np.take_along_axis(part, order, axis=1)
        sims[s:s + block] = np.take_along_axis(ps, order, axis=1)
    return sims, idx


def drop_self(idx: np.ndarray, k: int) -> np.ndarray:
    """k neighbours per row from k + 1 that usually include the row itself."""
    is_self = idx == np.arange(idx.shape[0])[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)[:, :k]


def sklearn_knn(X: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="cosine").fit(Xn)
    _, idx = nn.kneighbors(Xn)
    return drop_self(idx, k)


def faiss_flat_ip(X: np.ndarray, k: int) -> np.ndarray:
    """faiss as a researcher calls it: exact inner-product index, k + 1 neighbours, self dropped."""
    import faiss
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(np.ascontiguousarray(X, dtype=np.float32))
    _, idx = index.search(X, k + 1)
    return drop_self(idx, k)


def faiss_graph(X: np.ndarray, k: int):
    """The mutual kNN graph from faiss neighbours (what knn_graph(method="faiss") builds)."""
    sims, idx = faiss_knn(X, X, k, exclude_self=True, show_progress=False)
    return Graph.from_scipy(affinity_matrix(sims, idx, X.shape[0], gamma=GAMMA, mutual=True))


def pynndescent_knn(X: np.ndarray, k: int) -> np.ndarray:
    import pynndescent
    index = pynndescent.NNDescent(X, metric="dot", n_neighbors=k + 1, random_state=0)
    idx, _ = index.neighbor_graph
    return drop_self(idx, k)


# --------------------------------------------------------------------------- accuracy
def recall_at_k(found, true, k: int, chunk: int = 4096) -> float:
    """Mean over rows of |found_i & true_i| / k (neighbour sets, order ignored)."""
    found = np.asarray(found)[:, :k]
    true = np.asarray(true)[:, :k]
    hits = 0
    for s in range(0, found.shape[0], chunk):
        f, t = found[s:s + chunk], true[s:s + chunk]
        hits += int((f[:, :, None] == t[:, None, :]).any(axis=2).sum())
    return hits / (found.shape[0] * k)


def edge_recall(graph, exact_pattern) -> float:
    """Fraction of the exact graph's edges present in ``graph``."""
    g = graph.to_scipy()
    g.data[:] = 1.0
    return float(exact_pattern.multiply(g).nnz) / max(exact_pattern.nnz, 1)


# --------------------------------------------------------------------------- one size
def bench_size(n: int, d: int, k: int, *, repeat: int, sklearn_max: int, nndescent: bool,
               faiss: bool = True):
    X, _ = clustered(n, d, max(10, n // 100), seed=n)
    rows = []

    def add(route, kind, time_peak, recall=float("nan"), e_recall=float("nan"), note=""):
        seconds, peak_mb = time_peak
        rows.append({"n": n, "d": d, "k": k, "route": route, "kind": kind, "seconds": seconds,
                     "recall_at_k": recall, "edge_recall": e_recall, "peak_rss_mb": peak_mb,
                     "note": note})

    (true_s, true_i), t_np = timed_with_peak(lambda: numpy_knn(X, k), repeat)
    add(f"numpy blocked matmul + argpartition ({NUMPY_BLOCK} rows)", "exact", t_np,
        recall_at_k(true_i, true_i, k))
    exact_pattern = affinity_matrix(true_s, true_i, n, gamma=GAMMA, mutual=True)
    exact_pattern.data[:] = 1.0

    if n <= sklearn_max:
        import sklearn.neighbors  # noqa: F401  (imported outside the timing)
        sk, t_sk = timed_with_peak(lambda: sklearn_knn(X, k), repeat)
        add("sklearn NearestNeighbors brute cosine", "exact", t_sk, recall_at_k(sk, true_i, k))
    else:
        print(f"  (sklearn skipped: n = {n} > --sklearn-max {sklearn_max})")

    def jknn():
        return tuple(np.asarray(a) for a in knn(X, X, k, exclude_self=True, show_progress=False))

    (_, ji), t_first = timed_with_peak(jknn, 1)
    add("jax knn, first call (compile included)", "exact", t_first, recall_at_k(ji, true_i, k))
    (_, ji), t_warm = timed_with_peak(jknn, repeat)
    add(JAX_KNN, "exact", t_warm, recall_at_k(ji, true_i, k))
    g, t_g = timed_with_peak(lambda: knn_graph(X, k, gamma=GAMMA, mutual=True, method="exact",
                                     show_progress=False), repeat)
    add(JAX_GRAPH, "exact", t_g, e_recall=edge_recall(g, exact_pattern),
        note=f"{g.to_scipy().nnz} directed edges, max degree {g.max_degree}")

    if faiss and faiss_available():
        import faiss as faiss_module  # imported outside the timing
        threads = f"{faiss_module.omp_get_max_threads()} OpenMP threads"
        fi, t_f = timed_with_peak(lambda: faiss_flat_ip(X, k), repeat)
        add(FAISS_FLAT, "exact", t_f, recall_at_k(fi, true_i, k), note=threads)
        (_, fi), t_fk = timed_with_peak(lambda: faiss_knn(X, X, k, exclude_self=True, show_progress=False), repeat)
        add(FAISS_KNN, "exact", t_fk, recall_at_k(fi, true_i, k), note=threads)
        g, t_fg = timed_with_peak(lambda: faiss_graph(X, k), repeat)
        add(FAISS_GRAPH, "exact", t_fg, e_recall=edge_recall(g, exact_pattern),
            note=f"{g.to_scipy().nnz} directed edges, max degree {g.max_degree}")
    elif faiss:
        print("  (faiss skipped: not installed; pip install faiss-cpu)")

    if nndescent:
        import pynndescent  # noqa: F401  (numba and pynndescent imported outside the timing)
        pi, t_p1 = timed_with_peak(lambda: pynndescent_knn(X, k), 1)
        cache = os.environ.get("NUMBA_CACHE_DIR") or "numba's default (pynndescent/__pycache__)"
        note = (f"first call of the process, numba on-disk cache {cache}" if not _NNDESCENT_RUN
                else "numba's code already compiled by an earlier size in this process")
        _NNDESCENT_RUN.append(n)
        add("pynndescent NNDescent, first call (numba compile)", "approx", t_p1, recall_at_k(pi, true_i, k),
            note=note)
        pi, t_p2 = timed_with_peak(lambda: pynndescent_knn(X, k), 1)
        add("pynndescent NNDescent, second call", "approx", t_p2, recall_at_k(pi, true_i, k))
        g, t_gn = timed_with_peak(lambda: knn_graph(X, k, gamma=GAMMA, mutual=True, method="nndescent",
                                          show_progress=False), 1)
        add("jax knn_graph nndescent (mutual graph)", "approx", t_gn,
            e_recall=edge_recall(g, exact_pattern), note=f"{g.to_scipy().nnz} directed edges")

    t_jax_knn = next(r["seconds"] for r in rows if r["route"] == JAX_KNN)
    t_jax_graph = next(r["seconds"] for r in rows if r["route"] == JAX_GRAPH)
    for r in rows:
        r["vs_numpy"] = t_np[0] / r["seconds"]
        graph_route = np.isfinite(r["edge_recall"])
        r["vs_jax"] = (t_jax_graph if graph_route else t_jax_knn) / r["seconds"]
    report(n, d, k, rows, exact_pattern.nnz)
    return rows


def report(n, d, k, rows, exact_edges):
    print(f"\nn = {n}, d = {d}, k = {k} (exact mutual graph: {exact_edges} directed edges); "
          f"process peak rss so far {process_peak_rss_mb():.0f} MB; peak MB = the route's own peak")
    print("vs jax = t(jax knn, warm) / t(route); for graph routes t(jax knn_graph exact) / t(route)")
    print(f"| {'route':<52} | {'seconds':>8} | {'vs numpy':>8} | {'vs jax':>7} | {'recall@k':>9} | "
          f"{'edge rec.':>9} | {'peak MB':>7} | note")
    fmt = lambda v: "-" if not np.isfinite(v) else f"{v:.6f}"  # noqa: E731
    for r in rows:
        print(f"| {r['route']:<52} | {r['seconds']:8.3g} | {r['vs_numpy']:7.2f}x | {r['vs_jax']:6.2f}x | "
              f"{fmt(r['recall_at_k']):>9} | {fmt(r['edge_recall']):>9} | {r['peak_rss_mb']:7.0f} | "
              f"{r['note']}", flush=True)


def _plot(path, rows):
    sizes = list(dict.fromkeys(r["n"] for r in rows))
    fig, axes = pyplot().subplots(1, len(sizes), figsize=(7 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        rs = [r for r in rows if r["n"] == n]
        colors = ["tab:orange" if r["route"].startswith("jax") else
                  "tab:blue" if "faiss_knn" in r["route"] else "tab:gray" for r in rs]
        ax.barh([r["route"] for r in rs], [r["seconds"] for r in rs], color=colors)
        for j, r in enumerate(rs):
            rec = r["recall_at_k"] if np.isfinite(r["recall_at_k"]) else r["edge_recall"]
            what = "recall" if np.isfinite(r["recall_at_k"]) else "edge recall"
            ax.text(r["seconds"], j, f" {r['seconds']:.2f}s, {r['vs_numpy']:.2f}x numpy, "
                    f"{r['vs_jax']:.2f}x jax, {what} {rec:.3f}",
                    va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log); ratios = t(numpy or jax) / t(route)")
        ax.set_title(f"kNN graph, n = {n}, d = {rs[0]['d']}, k = {rs[0]['k']}")
        ax.tick_params(axis="y", labelsize=7)
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi * 30)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--repeat", type=int, default=1, help="median of this many calls for the warm routes")
    p.add_argument("--sklearn-max", type=int, default=100000, help="run sklearn only for n <= this")
    p.add_argument("--no-nndescent", action="store_true", help="skip pynndescent and knn_graph(method='nndescent')")
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss IndexFlatIP routes")
    p.add_argument("--quick", action="store_true", help="n = 2000, d = 32, k = 10, no pynndescent")
    p.add_argument("--out", default="experiments/results/knn")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.d, args.k, args.no_nndescent = [2000], 32, 10, True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {len(jax.devices())} device(s)")
    all_rows = []
    for n in args.sizes:
        all_rows += bench_size(n, args.d, args.k, repeat=args.repeat, sklearn_max=args.sklearn_max,
                               nndescent=not args.no_nndescent, faiss=not args.no_faiss)
    write_csv(out / "knn_speed.csv", all_rows, columns=COLUMNS)
    _plot(out / "knn_speed.png", all_rows)
    print(f"\nprocess peak rss {process_peak_rss_mb():.0f} MB; "
          f"wrote {out / 'knn_speed.csv'} and {out / 'knn_speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
