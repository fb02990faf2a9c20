"""What a user writes first, timed whole (compilation and offline work included), against the scipy cg loop.

    python -m experiments.bench_defaults [--n 100000] [--d 64] [--queries 200] [--scipy-queries 20]
        [--repeat 3] [--out results/bench_defaults] [--quick]

Synthetic clustered descriptors as ``bench_million`` makes them
(``common.clustered_database``: n database items, --queries out-of-graph queries from
the same distribution). One mutual kNN affinity A = ``knn_graph(X, 20)`` (the default
search, `search_route`) is built first, untimed, as the "given graph". Then, each run in
a fresh compilation cache (``jax.clear_caches()``), so that every run pays what a first
call pays:

(a) the ranking method from a given graph, default config but tol = 1e-6:
    ``state = diffusion_state_from_graph(X, A, DiffusionConfig(tol=1e-6))`` (normalisation
    and whatever offline work the default route does), then ``DIFFUSION.search(state,
    queries)`` (out-of-graph queries) and ``DIFFUSION.search_items(state, ids)`` (200
    database items); the build is counted once, in the search row and again in the
    items row, each timed on its own;
(b) the function API: ``diffuse(normalize(knn_graph(X, 20)), Y, tol=1e-6, max_iter=1000)``
    with Y = ``query_vectors`` of the queries' 10 nearest items (similarity^3), prepared
    outside the timing; the graph build is timed with it, and the same runs less their
    graph build give the row "A given" (what ``diffuse`` costs given the affinity, as the
    scipy loop is given it).

Only the public defaults are called, so the timings follow whatever route the library
takes by default. Each route is also timed warm (a second call, the state kept): the
online cost alone.

The baseline is the loop a researcher writes: ``scipy.sparse.linalg.cg`` once per query on
the float32 CSR of the same (I - alpha W) (W = normalize(A).to_scipy()), rtol = 1e-6, and
maxiter = the route's own step limit (the method's config.max_iter for (a), 1000 for (b)),
timed on --scipy-queries queries. A pause separates every JAX route from every scipy
loop (OpenBLAS threads spin after a scipy call). ``ms per query`` = a run's seconds / the
route's queries; ratios = t(scipy) / t(route) per query, the median run over the median
scipy loop, with the spread over the runs (min-max). Agreement, over the queries scipy
solved: the top-100 overlap with the scipy solution of the same stopping rule and with
the converged scipy solution (tol 1e-6, 1000 steps), the relative residual ||y - M x|| /
||y|| in float64. ``queries_for_10x``: the batch at which a route's whole run would reach
10x the scipy loop, its fixed cost (whole - warm) spread over more queries (`queries_for`;
inf when even the warm route is slower than a tenth of the scipy loop).

Writes ``bench_defaults.csv`` (one row per route), ``bench_defaults.png``, ``top100.npz``
(the first 100 items of each route's ranking for the queries scipy solved: keys search,
items, diffuse; and item_ids, the items of search_items) and ``config.json`` under --out.
--quick: n = 3,000, 40 queries, 10 for scipy, 2 runs (tests/experiments/test_bench_defaults.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from retrieval_jax.diffusion import diffuse, query_vectors
from retrieval_jax.graph import knn, knn_graph, normalize
from retrieval_jax.graph.neighbours import search_route
from retrieval_jax.methods.diffusion import DIFFUSION, DiffusionConfig, diffusion_state_from_graph

from retrieval_jax.files import atomic_write

from experiments.common import (clustered_database, pause, pyplot, save_figure, spread, top_overlap, versions,
                                write_csv, write_json)

K, ALPHA, TOL, QUERY_K, GAMMA, DIFFUSE_MAX_ITER = 20, 0.99, 1e-6, 10, 3.0, 1000
COLUMNS = ("route", "n", "queries", "ms_per_query", "ms_min", "ms_max", "runs", "warm_ms_per_query",
           "vs_scipy", "vs_scipy_min", "vs_scipy_max", "warm_vs_scipy", "baseline", "offline_s", "max_iter",
           "top100_vs_scipy_same_rule", "top100_vs_scipy_converged", "residual_max", "queries_for_10x", "note")
SEARCH = "DIFFUSION.search from a given graph (default config, tol 1e-6)"
ITEMS = "DIFFUSION.search_items from a given graph (default config, tol 1e-6)"
DIFFUSE = "diffuse(normalize(knn_graph(X, 20)), Y, tol=1e-6, max_iter=1000)"
DIFFUSE_GIVEN = "diffuse(normalize(A), Y, tol=1e-6, max_iter=1000), A given"


def scipy_rows(m32, y, max_iter: int, label: str, repeat: int):
    """The scipy cg loop on the float32 CSR ``m32`` (y cast to float32): solutions, seconds
    per query of each of ``repeat`` loops; a pause after each."""
    y32 = np.asarray(y, np.float32)
    times, xs = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        xs = np.stack([sla.cg(m32, b, rtol=TOL, maxiter=max_iter)[0] for b in y32])
        times.append((time.perf_counter() - t) / len(y32))
        pause()
    print(f"  {label}: {1e3 * np.median(times):.1f} ms per query (min-max {1e3 * min(times):.1f}-"
          f"{1e3 * max(times):.1f}, {len(y32)} queries, {repeat} loops)", flush=True)
    return xs, times


def first_calls(fn, repeat: int):
    """``repeat`` runs of ``fn()`` (which returns (scores, offline seconds, state or None)),
    each in a fresh compilation cache, then one warm call of the online part: (scores,
    seconds of each run, offline seconds of each run, warm seconds)."""
    times, offline, out, warm = [], [], None, float("nan")
    for _ in range(repeat):
        jax.clear_caches()
        t = time.perf_counter()
        out, t_off, online = fn()
        out = np.asarray(jax.block_until_ready(out))
        times.append(time.perf_counter() - t)
        offline.append(t_off)
        pause()
    if online is not None:
        t = time.perf_counter()
        jax.block_until_ready(online())
        warm = time.perf_counter() - t
        pause()
    return out, times, offline, warm


def save_npz(path, **arrays) -> None:
    """``arrays`` as an npz file, atomically."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def residuals(m64, x, y) -> np.ndarray:
    """||y - M x|| / ||y|| per row, float64."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return np.linalg.norm(y.T - m64 @ x.T, axis=0) / np.linalg.norm(y, axis=1)


def run(n: int, d: int, nq: int, nsc: int, repeat: int, out: Path, log=print):
    out.mkdir(parents=True, exist_ok=True)
    db, q, _, _ = clustered_database(n, nq, d)
    items = np.linspace(0, n - 1, nq).round().astype(np.int32)
    log(f"n = {n}, d = {d}, {nq} queries ({nsc} for scipy), {repeat} runs; jax {jax.__version__} on "
        f"{jax.default_backend()}; knn_graph's search: {search_route('auto', db)!r}", flush=True)

    t = time.perf_counter()
    a = knn_graph(db, K, gamma=GAMMA)                             # the given graph
    w32 = normalize(a).to_scipy().astype(np.float32)
    log(f"given graph: knn_graph(X, {K}) + W, {time.perf_counter() - t:.1f} s; nnz {w32.nnz}", flush=True)
    m32 = (sp.identity(n, format="csr", dtype=np.float32) - np.float32(ALPHA) * w32).tocsr()
    m64 = (sp.identity(n, format="csr") - ALPHA * w32.astype(np.float64)).tocsr()
    sims, ids = knn(q, db, QUERY_K)
    y_search = np.asarray(query_vectors(sims, ids, n, gamma=GAMMA))
    y_items = np.zeros((nq, n), np.float32)
    y_items[np.arange(nq), items] = 1.0
    config = DiffusionConfig(tol=TOL)
    pause()

    # ---- the JAX routes, each run paying its compilation and offline work
    def method_run(kind):
        def fn():
            t0 = time.perf_counter()
            state = diffusion_state_from_graph(db, a, config)
            jax.block_until_ready(state)
            t_off = time.perf_counter() - t0
            call = (lambda: DIFFUSION.search(state, q)) if kind == "search" else (
                lambda: DIFFUSION.search_items(state, items))
            method_run.state = state
            return call(), t_off, call
        return fn

    def diffuse_run():
        t0 = time.perf_counter()
        graph = jax.block_until_ready(knn_graph(db, K, gamma=GAMMA))
        diffuse_run.graph_s.append(time.perf_counter() - t0)
        w = normalize(graph)
        jax.block_until_ready(w)
        t_off = time.perf_counter() - t0
        call = lambda: diffuse(w, y_search, alpha=ALPHA, tol=TOL, max_iter=DIFFUSE_MAX_ITER)  # noqa: E731
        return call(), t_off, call

    diffuse_run.graph_s = []
    results = {}
    for name, fn, y in ((SEARCH, method_run("search"), y_search), (ITEMS, method_run("items"), y_items),
                        (DIFFUSE, diffuse_run, y_search)):
        log(f"{name} ...", flush=True)
        scores, times, offline, warm = first_calls(fn, repeat)
        results[name] = (scores, times, offline, warm, y)
        log(f"  {1e3 * np.median(times) / nq:.1f} ms per query (min-max {1e3 * min(times) / nq:.1f}-"
            f"{1e3 * max(times) / nq:.1f}), offline {np.median(offline):.1f} s, warm {1e3 * warm / nq:.2f} ms "
            f"per query", flush=True)
    # the same runs without the graph build: what `diffuse` costs given the affinity A, as
    # the scipy loop is given it (normalize, the layout, compilation and the solve)
    scores, times, offline, warm, y = results[DIFFUSE]
    results[DIFFUSE_GIVEN] = (scores, [t - g for t, g in zip(times, diffuse_run.graph_s)],
                              [o - g for o, g in zip(offline, diffuse_run.graph_s)], warm, y)
    state_config = method_run.state.config
    method_iter = state_config.max_iter

    # ---- the scipy loops (after every JAX route: spinning BLAS threads slow nothing timed)
    ref_search, t_search = scipy_rows(m32, y_search[:nsc], method_iter, f"scipy cg, max_iter {method_iter}", repeat)
    ref_items, t_items = scipy_rows(m32, y_items[:nsc], method_iter, f"scipy cg on items, max_iter {method_iter}",
                                    repeat)
    ref_conv, t_conv = scipy_rows(m32, y_search[:nsc], DIFFUSE_MAX_ITER, f"scipy cg, max_iter {DIFFUSE_MAX_ITER}",
                                  repeat)
    ref_items_conv = (ref_items if method_iter >= DIFFUSE_MAX_ITER else
                      np.stack([sla.cg(m32, b, rtol=TOL, maxiter=DIFFUSE_MAX_ITER)[0] for b in y_items[:nsc]]))
    baselines = {SEARCH: (ref_search, t_search, ref_conv), ITEMS: (ref_items, t_items, ref_items_conv),
                 DIFFUSE: (ref_conv, t_conv, ref_conv), DIFFUSE_GIVEN: (ref_conv, t_conv, ref_conv)}
    scipy_label = {SEARCH: f"scipy cg loop, float32 CSR (tol 1e-6, max_iter {method_iter})",
                   ITEMS: f"scipy cg loop on items, float32 CSR (tol 1e-6, max_iter {method_iter})",
                   DIFFUSE: f"scipy cg loop, float32 CSR (tol 1e-6, max_iter {DIFFUSE_MAX_ITER})"}
    scipy_label[DIFFUSE_GIVEN] = scipy_label[DIFFUSE]

    rows = []
    for name, (scores, times, offline, warm, y) in results.items():
        ref, t_ref, conv = baselines[name]
        per_query = np.asarray(times) / nq
        base = float(np.median(t_ref))
        st = spread(per_query)
        converged = name in (DIFFUSE, DIFFUSE_GIVEN)
        rows.append({
            "route": name, "n": n, "queries": nq, "ms_per_query": 1e3 * st["median"], "ms_min": 1e3 * st["min"],
            "ms_max": 1e3 * st["max"], "runs": st["runs"], "warm_ms_per_query": 1e3 * warm / nq,
            "vs_scipy": base / st["median"], "vs_scipy_min": min(t_ref) / st["max"],
            "vs_scipy_max": max(t_ref) / st["min"], "warm_vs_scipy": base / (warm / nq),
            "baseline": scipy_label[name],
            "offline_s": float(np.median(offline)),
            "max_iter": DIFFUSE_MAX_ITER if converged else method_iter,
            "top100_vs_scipy_same_rule": float(top_overlap(scores[:nsc], ref, min(100, n - 1)).mean()),
            "top100_vs_scipy_converged": float(top_overlap(scores[:nsc], conv, min(100, n - 1)).mean()),
            "residual_max": float(residuals(m64, scores[:nsc], y[:nsc]).max()),
            "queries_for_10x": queries_for(10.0, base, st["median"] * nq, warm, nq),
            "note": {DIFFUSE: "graph build and normalize timed with it",
                     DIFFUSE_GIVEN: "the DIFFUSE runs less their graph build"}.get(name, f"config {state_config}")})
        st_ref = spread(np.asarray(t_ref))
        rows.append({
            "route": scipy_label[name], "n": n, "queries": nsc, "ms_per_query": 1e3 * st_ref["median"],
            "ms_min": 1e3 * st_ref["min"], "ms_max": 1e3 * st_ref["max"], "runs": st_ref["runs"],
            "warm_ms_per_query": float("nan"), "vs_scipy": 1.0, "vs_scipy_min": float("nan"),
            "vs_scipy_max": float("nan"), "warm_vs_scipy": float("nan"), "baseline": scipy_label[name],
            "offline_s": 0.0,
            "max_iter": DIFFUSE_MAX_ITER if converged else method_iter,
            "top100_vs_scipy_same_rule": 1.0,
            "top100_vs_scipy_converged": float(top_overlap(ref, conv, min(100, n - 1)).mean()),
            "residual_max": float(residuals(m64, ref, y[:nsc]).max()), "queries_for_10x": float("nan"),
            "note": "the given graph's W, solve only"})
    report(rows, log)
    write_csv(out / "bench_defaults.csv", rows, COLUMNS)
    tops = {key: np.argsort(-results[name][0][:nsc], axis=1, kind="stable")[:, :100].astype(np.int32)
            for key, name in (("search", SEARCH), ("items", ITEMS), ("diffuse", DIFFUSE))}
    save_npz(out / "top100.npz", item_ids=items[:nsc], **tops)
    plot(out / "bench_defaults.png", rows, n)
    write_json(out / "config.json", {"command": sys.argv, "n": n, "d": d, "queries": nq, "scipy_queries": nsc,
                                     "repeat": repeat, "k": K, "alpha": ALPHA, "tol": TOL,
                                     "search": search_route("auto", db), "method_config": str(state_config),
                                     "versions": versions()})
    log(f"wrote {out / 'bench_defaults.csv'} and {out / 'bench_defaults.png'}")
    return rows


def queries_for(ratio: float, scipy_s: float, whole_s: float, warm_s: float, nq: int) -> float:
    """Queries a route needs to run at ``ratio`` times the scipy loop, compilation and
    offline work included: its fixed cost F = whole - nq * warm per query paid once,
    then warm / nq per query, so the ratio at N queries is scipy / (warm / nq + F / N).
    inf when even the warm route is slower than scipy / ratio."""
    per_query = warm_s / nq
    margin = scipy_s / ratio - per_query
    if not np.isfinite(warm_s) or margin <= 0:
        return float("inf")
    return float(np.ceil(max(0.0, whole_s - nq * per_query) / margin))


def report(rows, log):
    log("\nms per query = a whole run (compilation, offline work, graph build for diffuse) / its queries; "
        "vs scipy = t(scipy loop, same stopping rule) / t(route); warm = the online call alone, state kept")
    log(f"| {'route':<72} | ms/query (min-max)      | warm ms/q | vs scipy (range)   | warm vs scipy | "
        f"offline s | top-100 same / conv | residual | queries for 10x |")
    for r in rows:
        rng = "" if not np.isfinite(r["vs_scipy_min"]) else f"({r['vs_scipy_min']:.2f}-{r['vs_scipy_max']:.2f})"
        warm = "-" if not np.isfinite(r["warm_vs_scipy"]) else f"{r['warm_vs_scipy']:.2f}x"
        log(f"| {r['route']:<72} | {r['ms_per_query']:8.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f}) | "
            f"{r['warm_ms_per_query']:9.2f} | {r['vs_scipy']:6.2f}x {rng:<11} | {warm:>13} | "
            f"{r['offline_s']:9.2f} | "
            f"{r['top100_vs_scipy_same_rule']:.3f} / {r['top100_vs_scipy_converged']:.3f} | "
            f"{r['residual_max']:.1e} | {r['queries_for_10x']:>15} |", flush=True)


def plot(path, rows, n):
    fig, ax = pyplot().subplots(figsize=(10, 0.55 * len(rows) + 1.5))
    med = np.array([r["ms_per_query"] for r in rows])
    err = np.array([med - [r["ms_min"] for r in rows], [r["ms_max"] for r in rows] - med])
    ax.barh([r["route"] for r in rows], med, xerr=err,
            color=["tab:gray" if r["route"].startswith("scipy") else "tab:blue" for r in rows])
    for j, r in enumerate(rows):
        ax.text(r["ms_max"], j, f"  {r['ms_per_query']:.1f} ms, {r['vs_scipy']:.2f}x scipy", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("ms per query (log), median and min-max of the runs; first calls, compilation included")
    ax.set_title(f"the defaults as a user calls them, n = {n}")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--scipy-queries", type=int, default=20, help="queries each scipy loop is timed on")
    p.add_argument("--repeat", type=int, default=3, help="runs of every route (median, min-max)")
    p.add_argument("--out", default="results/bench_defaults")
    p.add_argument("--quick", action="store_true", help="n = 3,000, 40 queries, 10 for scipy, 2 runs")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.scipy_queries, args.repeat = 3000, 40, 10, 2
    run(args.n, args.d, args.queries, min(args.scipy_queries, args.queries), args.repeat, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
