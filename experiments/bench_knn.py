"""kNN-graph construction speed: the library's default route vs the routes a researcher would otherwise use.

    python -m experiments.bench_knn [--sizes 50000] [--d 128] [--k 50] [--repeat 3]
        [--sklearn-max N] [--no-nndescent] [--core] [--quick] [--out experiments/results/knn]

For each n, synthetic clustered unit vectors (``common.clustered``: n / 100
curved clusters, L2-normalised), and the k nearest neighbours of every item among
the others by inner product (self excluded), by every route in the same process:

* the mutual kNN graph (k, similarity^3) three ways, timed in interleaved rounds
  (reference, default, exact, the order turned by one each round; a pause between
  routes, so that BLAS threads spinning after one route do not slow the next), --repeat
  rounds:
  - the reference a researcher writes: faiss ``IndexFlatIP`` search of k + 1, self
    dropped, then the mutual filter in scipy (``affinity_matrix``: a CSR matrix);
  - ``knn_graph(X, k)`` as a user calls it (``method="auto"``, which
    ``search_route`` resolves: faiss on a CPU host where it is installed, else the
    JAX search), the padded `Graph` out;
  - ``knn_graph(X, k, method="exact")``, the JAX search;
* numpy, blocked (the loop a researcher writes): for blocks of 1024 rows,
  ``S = Xb @ X.T``, self masked, ``np.argpartition(-S, k)[:, :k]``, then the k
  sorted, timed once. Its neighbours are the ground truth of every recall (with
  --core, the reference's, also exact, and numpy is skipped);
* scikit-learn ``NearestNeighbors(n_neighbors=k + 1, algorithm="brute",
  metric="cosine")`` on the L2-normalised data, fit + kneighbors (n <= --sklearn-max);
* ``retrieval_jax.graph.knn(X, X, k, exclude_self=True, method="exact")``, warm
  (compiled by the graph rounds);
* faiss ``IndexFlatIP`` search alone (index build + ``search(X, k + 1)`` + self
  dropped) and the library's wrapper ``faiss_knn(X, X, k, exclude_self=True)``, alone
  and followed by ``affinity_matrix`` + ``Graph.from_scipy``;
* pynndescent ``NNDescent(X, metric="dot", n_neighbors=k + 1, random_state=0)``
  (approximate): first call (numba compilation included, when numba's on-disk cache
  is cold) and a second call, then ``knn_graph(method="nndescent")``.

Reported per route: wall-clock seconds (median of the timed calls, with the min-max
spread), t(numpy) / t(route), t(jax) / t(route) (for the graph routes
t(jax knn_graph exact) / t(route)), t(reference) / t(route) (graph routes), recall@k
against the ground truth (mean over rows of |found & true| / k; ties in similarity
aside, exact routes give 1), for the graph routes the edge recall (the fraction of
the exact mutual graph's edges present), and the peak resident memory of the route
(the kernel's VmHWM mark, reset before the route). Then the default route against
the reference and pynndescent: the per-round ratios t(reference) / t(default), median
and min-max. Writes ``knn_speed.csv`` and ``knn_speed.png`` (atomically).

--core: the three graph routes and pynndescent only. --quick (used by
tests/experiments/test_bench_knn.py): n = 2000, d = 32, k = 10, two rounds, no pynndescent.
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
from retrieval_jax.graph.neighbours import search_route

from experiments.common import (clustered, pause, process_peak_rss_mb, pyplot, save_figure, spread,
                                timed_runs_with_peak, write_csv)

GAMMA = 3.0
NUMPY_BLOCK = 1024
COLUMNS = ["n", "d", "k", "route", "kind", "seconds", "seconds_min", "seconds_max", "runs", "vs_numpy",
           "vs_jax", "vs_reference", "recall_at_k", "edge_recall", "peak_rss_mb", "note"]
NUMPY = f"numpy blocked matmul + argpartition ({NUMPY_BLOCK} rows)"
JAX_KNN = "jax knn, warm"
JAX_GRAPH = "jax knn_graph exact (mutual graph, warm)"
REFERENCE = "faiss search + scipy mutual filter (reference)"
DEFAULT = "knn_graph(X, k) default (mutual graph)"
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


def faiss_scipy_graph(X: np.ndarray, k: int):
    """The reference: faiss IndexFlatIP search of k + 1, self dropped, scipy's mutual filter
    (``affinity_matrix``, a symmetric CSR matrix)."""
    import faiss
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(np.ascontiguousarray(X, dtype=np.float32))
    sims, idx = index.search(X, k + 1)
    is_self = idx == np.arange(idx.shape[0])[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    sims, idx = np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)
    return idx, affinity_matrix(sims, idx, X.shape[0], gamma=GAMMA, mutual=True)


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
def graph_rounds(X, k: int, repeat: int, pause_s: float, reference: bool = True):
    """The three mutual-graph routes in --repeat interleaved rounds (reference, default,
    exact, the order turned by one each round; a pause after each): {route: (last output,
    seconds list, peak MB)}."""
    routes = {REFERENCE: lambda: faiss_scipy_graph(X, k),
              DEFAULT: lambda: knn_graph(X, k, gamma=GAMMA, show_progress=False),
              JAX_GRAPH: lambda: knn_graph(X, k, gamma=GAMMA, method="exact", show_progress=False)}
    if not (reference and faiss_available()):
        del routes[REFERENCE]
    # the JAX search's compilation is not a graph build's cost here: one untimed call first
    # where that is cheap (larger n: the first round's JAX route includes it, within its spread)
    if X.shape[0] <= 20000:
        knn(X, X, k, exclude_self=True, method="exact")
    pause(pause_s)
    results = {key: [None, [], 0.0] for key in routes}
    keys = list(routes)
    for r in range(max(1, repeat)):
        # the order turns every round: no route always follows the same one
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            fn = routes[key]
            out, times, peak = timed_runs_with_peak(fn, 1)
            res = results[key]
            res[0], res[2] = out, max(res[2], peak)
            res[1] += times
            pause(pause_s)
    return {key: tuple(v) for key, v in results.items()}


def bench_size(n: int, d: int, k: int, *, repeat: int, sklearn_max: int, nndescent: bool,
               faiss: bool = True, core: bool = False, pause_s: float = 2.0):
    X, _ = clustered(n, d, max(10, n // 100), seed=n)
    rows = []

    def add(route, kind, times, peak, recall=float("nan"), e_recall=float("nan"), note=""):
        st = spread(times)
        rows.append({"n": n, "d": d, "k": k, "route": route, "kind": kind, "seconds": st["median"],
                     "seconds_min": st["min"], "seconds_max": st["max"], "runs": st["runs"],
                     "recall_at_k": recall, "edge_recall": e_recall, "peak_rss_mb": peak, "note": note})

    def timed(fn, calls):
        out, times, peak = timed_runs_with_peak(fn, calls)
        pause(pause_s)
        return out, times, peak

    route = search_route("auto", X)
    print(f"\nn = {n}: knn_graph's method='auto' runs the {route!r} search here", flush=True)
    graphs = graph_rounds(X, k, repeat, pause_s, reference=faiss)
    if core:
        if REFERENCE not in graphs:
            raise SystemExit("--core takes the faiss reference's neighbours as the ground truth: "
                             "pip install faiss-cpu")
        true_i = graphs[REFERENCE][0][0]
        exact_pattern = graphs[REFERENCE][0][1].copy()
        t_np = None
    else:
        (true_s, true_i), t_np, p_np = timed(lambda: numpy_knn(X, k), 1)
        add(NUMPY, "exact", t_np, p_np, recall_at_k(true_i, true_i, k), note="timed once; the ground truth")
        exact_pattern = affinity_matrix(true_s, true_i, n, gamma=GAMMA, mutual=True)
    exact_pattern.data[:] = 1.0
    for key, (out, times, peak) in graphs.items():
        g = Graph.from_scipy(out[1]) if key == REFERENCE else out
        note = f"{g.to_scipy().nnz} directed edges, max degree {g.max_degree}"
        note += f"; search {route!r}" if key == DEFAULT else "; a scipy CSR matrix" if key == REFERENCE else ""
        add(key, "exact", times, peak, e_recall=edge_recall(g, exact_pattern), note=note)

    if n <= sklearn_max and not core:
        import sklearn.neighbors  # noqa: F401  (imported outside the timing)
        sk, t_sk, p_sk = timed(lambda: sklearn_knn(X, k), repeat)
        add("sklearn NearestNeighbors brute cosine", "exact", t_sk, p_sk, recall_at_k(sk, true_i, k))
    elif not core:
        print(f"  (sklearn skipped: n = {n} > --sklearn-max {sklearn_max})")

    def jknn():
        return tuple(np.asarray(a) for a in knn(X, X, k, exclude_self=True, method="exact",
                                                show_progress=False))

    if not core:
        (_, ji), t_warm, p_warm = timed(jknn, repeat)
        add(JAX_KNN, "exact", t_warm, p_warm, recall_at_k(ji, true_i, k))

    if faiss and faiss_available() and not core:
        import faiss as faiss_module  # imported outside the timing
        threads = f"{faiss_module.omp_get_max_threads()} OpenMP threads"
        fi, t_f, p_f = timed(lambda: faiss_flat_ip(X, k), repeat)
        add(FAISS_FLAT, "exact", t_f, p_f, recall_at_k(fi, true_i, k), note=threads)
        (_, fi), t_fk, p_fk = timed(lambda: faiss_knn(X, X, k, exclude_self=True, show_progress=False), repeat)
        add(FAISS_KNN, "exact", t_fk, p_fk, recall_at_k(fi, true_i, k), note=threads)
        g, t_fg, p_fg = timed(lambda: faiss_graph(X, k), repeat)
        add(FAISS_GRAPH, "exact", t_fg, p_fg, e_recall=edge_recall(g, exact_pattern),
            note=f"{g.to_scipy().nnz} directed edges, max degree {g.max_degree}")
    elif faiss and not faiss_available():
        print("  (faiss skipped: not installed; pip install faiss-cpu)")

    if nndescent:
        import pynndescent  # noqa: F401  (numba and pynndescent imported outside the timing)
        pi, t_p1, p_p1 = timed(lambda: pynndescent_knn(X, k), 1)
        cache = os.environ.get("NUMBA_CACHE_DIR") or "numba's default (pynndescent/__pycache__)"
        note = (f"first call of the process, numba on-disk cache {cache}" if not _NNDESCENT_RUN
                else "numba's code already compiled by an earlier size in this process")
        _NNDESCENT_RUN.append(n)
        add("pynndescent NNDescent, first call (numba compile)", "approx", t_p1, p_p1, recall_at_k(pi, true_i, k),
            note=note)
        pi, t_p2, p_p2 = timed(lambda: pynndescent_knn(X, k), repeat)
        add(PYNNDESCENT, "approx", t_p2, p_p2, recall_at_k(pi, true_i, k))
        g, t_gn, p_gn = timed(lambda: knn_graph(X, k, gamma=GAMMA, mutual=True, method="nndescent",
                                                show_progress=False), 1)
        add("jax knn_graph nndescent (mutual graph)", "approx", t_gn, p_gn,
            e_recall=edge_recall(g, exact_pattern), note=f"{g.to_scipy().nnz} directed edges")

    by = {r["route"]: r for r in rows}
    t_numpy = float(np.median(t_np)) if t_np is not None else float("nan")
    t_jax_graph = by[JAX_GRAPH]["seconds"]
    t_jax_knn = by[JAX_KNN]["seconds"] if JAX_KNN in by else t_jax_graph
    t_ref = by[REFERENCE]["seconds"] if REFERENCE in by else float("nan")
    for r in rows:
        r["vs_numpy"] = t_numpy / r["seconds"]
        graph_route = np.isfinite(r["edge_recall"])
        r["vs_jax"] = (t_jax_graph if graph_route else t_jax_knn) / r["seconds"]
        r["vs_reference"] = t_ref / r["seconds"] if graph_route else float("nan")
    report(n, d, k, rows, exact_pattern.nnz)
    summary(graphs, by)
    return rows


PYNNDESCENT = "pynndescent NNDescent, second call"


def summary(graphs, by):
    """The default route against the reference (per-round ratios) and pynndescent."""
    t_def = np.asarray(graphs[DEFAULT][1])
    print(f"\ndefault knn_graph: {spread_text(t_def)} s")
    if REFERENCE in graphs:
        ratios = np.asarray(graphs[REFERENCE][1]) / t_def     # the same round: the same load
        st = spread(ratios)
        print(f"  t(faiss + scipy reference) / t(default) per round: {st['median']:.2f}x "
              f"(min-max {st['min']:.2f}-{st['max']:.2f}, {st['runs']} rounds); reference "
              f"{spread_text(graphs[REFERENCE][1])} s")
    ratios = np.asarray(graphs[JAX_GRAPH][1]) / t_def
    st = spread(ratios)
    print(f"  t(knn_graph exact, JAX search) / t(default) per round: {st['median']:.2f}x "
          f"(min-max {st['min']:.2f}-{st['max']:.2f})")
    if PYNNDESCENT in by:
        p = by[PYNNDESCENT]
        print(f"  t(pynndescent, second call, search only) / t(default, whole graph): "
              f"{p['seconds'] / float(np.median(t_def)):.2f}x (pynndescent {p['seconds']:.3g} s, "
              f"min-max {p['seconds_min']:.3g}-{p['seconds_max']:.3g}; recall@k {p['recall_at_k']:.4f})")


def spread_text(times) -> str:
    st = spread(times)
    return f"median {st['median']:.3g} (min-max {st['min']:.3g}-{st['max']:.3g}, {st['runs']} runs)"


def report(n, d, k, rows, exact_edges):
    print(f"\nn = {n}, d = {d}, k = {k} (exact mutual graph: {exact_edges} directed edges); "
          f"process peak rss so far {process_peak_rss_mb():.0f} MB; peak MB = the route's own peak")
    print("vs jax = t(jax knn, warm) / t(route), for graph routes t(jax knn_graph exact) / t(route); "
          "vs ref = t(faiss + scipy reference) / t(route)")
    print(f"| {'route':<52} | {'seconds (min-max)':>22} | {'vs numpy':>8} | {'vs jax':>7} | {'vs ref':>7} | "
          f"{'recall@k':>9} | {'edge rec.':>9} | {'peak MB':>7} | note")
    fmt = lambda v: "-" if not np.isfinite(v) else f"{v:.6f}"  # noqa: E731
    ratio = lambda v: "-" if not np.isfinite(v) else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        secs = f"{r['seconds']:.3g} ({r['seconds_min']:.3g}-{r['seconds_max']:.3g})"
        print(f"| {r['route']:<52} | {secs:>22} | {ratio(r['vs_numpy']):>8} | {ratio(r['vs_jax']):>7} | "
              f"{ratio(r['vs_reference']):>7} | {fmt(r['recall_at_k']):>9} | {fmt(r['edge_recall']):>9} | "
              f"{r['peak_rss_mb']:7.0f} | {r['note']}", flush=True)


def _plot(path, rows):
    sizes = list(dict.fromkeys(r["n"] for r in rows))
    fig, axes = pyplot().subplots(1, len(sizes), figsize=(8 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        rs = [r for r in rows if r["n"] == n]
        colors = ["tab:orange" if r["route"] == DEFAULT else "tab:gray" if r["route"] == REFERENCE else
                  "tab:red" if r["route"].startswith("jax") else "tab:blue" if "faiss" in r["route"] else
                  "tab:olive" for r in rs]
        med = np.array([r["seconds"] for r in rs])
        err = np.array([med - [r["seconds_min"] for r in rs], [r["seconds_max"] for r in rs] - med])
        ax.barh([r["route"] for r in rs], med, xerr=err, color=colors)
        for j, r in enumerate(rs):
            rec = r["recall_at_k"] if np.isfinite(r["recall_at_k"]) else r["edge_recall"]
            what = "recall" if np.isfinite(r["recall_at_k"]) else "edge recall"
            ref = f", {r['vs_reference']:.2f}x ref" if np.isfinite(r["vs_reference"]) else ""
            ax.text(r["seconds_max"], j, f" {r['seconds']:.2f}s{ref}, {r['vs_jax']:.2f}x jax, {what} {rec:.3f}",
                    va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log), median and min-max; ratios = t(reference or jax) / t(route)")
        ax.set_title(f"kNN graph, n = {n}, d = {rs[0]['d']}, k = {rs[0]['k']}")
        ax.tick_params(axis="y", labelsize=7)
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi * 30)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50000])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds of the graph routes, calls of the other warm routes (median, min-max)")
    p.add_argument("--sklearn-max", type=int, default=20000, help="run sklearn only for n <= this")
    p.add_argument("--no-nndescent", action="store_true", help="skip pynndescent and knn_graph(method='nndescent')")
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss IndexFlatIP routes")
    p.add_argument("--core", action="store_true",
                   help="the three mutual-graph routes and pynndescent only (faiss's neighbours as ground truth)")
    p.add_argument("--pause", type=float, default=2.0, help="seconds of rest after each timed route")
    p.add_argument("--quick", action="store_true", help="n = 2000, d = 32, k = 10, 2 rounds, no pynndescent")
    p.add_argument("--out", default="experiments/results/knn")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.d, args.k, args.no_nndescent, args.repeat, args.pause = [2000], 32, 10, True, 2, 0.1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {len(jax.devices())} device(s)")
    all_rows = []
    for n in args.sizes:
        all_rows += bench_size(n, args.d, args.k, repeat=args.repeat, sklearn_max=args.sklearn_max,
                               nndescent=not args.no_nndescent, faiss=not args.no_faiss, core=args.core,
                               pause_s=args.pause)
    write_csv(out / "knn_speed.csv", all_rows, columns=COLUMNS)
    _plot(out / "knn_speed.png", all_rows)
    print(f"\nprocess peak rss {process_peak_rss_mb():.0f} MB; "
          f"wrote {out / 'knn_speed.csv'} and {out / 'knn_speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
