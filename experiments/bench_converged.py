"""The converged ranking (CG to tol 1e-6) at scale: scipy cg loop vs batched CG vs two-level CG.

    python -m experiments.bench_converged [--n 100000] [--d 64] [--k 50] [--queries 500]
        [--repeat 3] [--out results/bench_converged] [--quick]

One mutual kNN graph (k = 50, similarity^3, W = D^-1/2 A D^-1/2) over synthetic
clustered descriptors (points on short random curves around n / 100 centres, unit
norm, as ``experiments/bench_diffusion.py``), out-of-graph queries from the same
distribution with y = their top-10 database similarities cubed, alpha = 0.99. Every
route solves (I - alpha W) x = y to the relative residual tol = 1e-6:

* ``scipy cg loop (float32 CSR)``: ``scipy.sparse.linalg.cg`` once per query on the
  float32 CSR matrix of the graph the JAX routes use (rtol = tol), timed on
  --scipy-queries queries: the baseline of every ratio (like for like); and beside it,
  labelled, ``scipy cg loop (float64 CSR)`` (the same loop on the float64 matrix, the
  agreement reference);
* ``jax batched CG``: `solve` with `CG(tol, 5000)`, all queries at once, jitted;
* ``jax two-level CG (deflation)`` / ``(additive)``: `PreconditionedCG` (aggregation
  coarse space, `retrieval_jax.diffusion.preconditioned`), its offline setup timed apart;
* each JAX route again on the graph renumbered by `locality_order` (nested aggregates,
  ``permute_graph``; y renumbered in, x back out; the order's cost counted in the
  setup), so that the product's gathers hit cache; batched CG also in
  `locality_order(method="blocks")` (breadth-first blocks), to compare the two orders.

Each route is timed alone (warm-up call first, then --repeat calls; a 2 s pause
between routes, so that BLAS threads spinning after one route do not slow the next),
in --rounds rounds; medians over all calls with the min-max spread. Ratios: t(scipy,
float32) / t(route) and t(scipy, float64) / t(route). Agreement: per query, the top-100
overlap with the float64 scipy ranking and the max relative score difference
||x - x_scipy||_inf / ||x_scipy||_inf, over the queries scipy solved; the true relative
residual ||y - M x|| / ||y|| of every route in float64.

Bandwidth: one product W @ X (X [n, B], B = the batch) in float32 (``Graph.matvec``'s
loop: all K slots fused where `matvec_unroll` fuses them, and unrolled by 8 only) and
with bfloat16 operands (float32 accumulation), timed as CG runs it (inside a jitted loop
of products, so no fresh output buffer per product), against the machine's copy
bandwidth measured in the
same run (a 512 MB array copy, read + write counted). Two byte counts for the product:
"streamed" = indices + weights + X once + the output (the least any product moves),
"gathered" = indices + weights + every gathered row of X + the output (no cache reuse).

Writes ``bench_converged.csv`` (one row per route), ``bandwidth.csv`` and
``bench_converged.png`` under --out. --quick: n = 3000, d = 32, k = 10, 40 queries,
two repeats (used by tests/experiments/test_bench_converged.py).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from scipy.sparse.csgraph import connected_components

from retrieval_jax.files import atomic_write, write_csv
from retrieval_jax.diffusion import CG, diffusion_operator, query_vectors, solve
from retrieval_jax.diffusion.preconditioned import PreconditionedCG
from retrieval_jax.graph import knn, knn_graph, locality_order, normalize, permute_graph
from retrieval_jax.graph.core import NormalizedGraph, matvec_unroll

from .common import REPO, clustered, product_seconds, timed_calls, top_overlap

PAUSE_S = 2.0


def build(n, d, k, nq, cache: Path | None):
    """The normalised graph and the queries' (similarities, ids) of their top 10; cached as npz."""
    if cache is not None and cache.is_file():
        f = np.load(cache)
        graph = NormalizedGraph(indices=jnp.asarray(f["indices"]), weights=jnp.asarray(f["weights"]))
        return graph, f["qs"][:nq], f["qi"][:nq], 0.0
    x, _ = clustered(n + nq, d, max(10, n // 100), seed=n)
    db, q = x[:n], x[n:]
    t = time.perf_counter()
    # the default search (search_route); W in the database's order (no LocalityLayout): the
    # ordered routes below renumber it themselves
    graph = normalize(knn_graph(db, k, gamma=3.0, mutual=True), locality=False)
    jax.block_until_ready(graph.weights)
    t_graph = time.perf_counter() - t
    s, i = knn(q, db, 10)
    s, i = np.asarray(s), np.asarray(i)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, indices=np.asarray(graph.indices), weights=np.asarray(graph.weights), qs=s, qi=i)
    return graph, s, i, t_graph


def copy_bandwidth(nbytes=2 ** 29, repeat=5):
    """Bytes/s of a large array copy (read + write counted), numpy."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return 2 * a.nbytes / float(np.median(times)), 2 * a.nbytes / min(times)


def product_bandwidth(graph, b, repeat):
    """W @ X, X [n, b], float32 and bfloat16 operands, as CG runs it (`common.product_seconds`,
    inside a jitted loop): rows of milliseconds and bytes/s."""
    n, kk = graph.indices.shape
    x32 = jnp.asarray(np.random.default_rng(0).normal(size=(n, b)).astype(np.float32))
    rows = []
    full = matvec_unroll(n, kk, b)  # Graph.matvec's choice (float32 accumulator)
    for name, dtype, unroll in (("float32", jnp.float32, full),
                                ("float32, slots unrolled by 8 (not all fused)", jnp.float32, min(8, kk)),
                                ("bfloat16 operands, float32 accumulation", jnp.bfloat16, full)):
        times = product_seconds(graph.indices, graph.weights.astype(dtype), x32.astype(dtype),
                                unroll=unroll, repeat=repeat)
        sec = float(np.median(times))
        item = np.dtype(dtype).itemsize
        streamed = n * kk * (4 + item) + n * b * item + n * b * 4
        gathered = n * kk * (4 + item) + n * kk * b * item + n * b * 4
        rows.append({"product": name, "n": n, "K": kk, "B": b, "ms": 1e3 * sec,
                     "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times),
                     "streamed_GBps": streamed / sec / 1e9, "gathered_GBps": gathered / sec / 1e9})
    return rows


SCIPY = "scipy cg loop (float32 CSR)"
SCIPY64 = "scipy cg loop (float64 CSR)"


def scipy_cg_loop(m, yn, nsc: int, tol: float):
    """The loop a researcher writes: ``scipy.sparse.linalg.cg`` once per query (x, steps), in
    the dtype of the CSR matrix ``m`` (the right-hand sides cast to it)."""
    yn = np.asarray(yn, m.dtype)

    def loop():
        n = m.shape[0]
        xs, its = np.zeros((nsc, n), m.dtype), np.zeros(nsc, int)
        for r in range(nsc):
            count = [0]

            def cb(_):
                count[0] += 1
            xs[r], _ = sla.cg(m, yn[r], rtol=tol, maxiter=10 * n, callback=cb)
            its[r] = count[0]
        return xs, its
    return loop


def make_routes(graph, op, y, args):
    """{name: (solver, state, operator, y, inverse order or None)}, setup seconds, the
    renumbered graphs {suffix: graph}. Every JAX route twice: in the database's order and
    renumbered by `locality_order` (nested aggregates; x = P^T solve(P W P^T, P y));
    batched CG also in `locality_order(method="blocks")`."""
    systems = {"": (op, y, None, 0.0)}
    two_level = {"", ", locality order"}   # the block order runs batched CG only
    ordered = {}
    for suffix, method in ((", locality order", "aggregation"), (", block order", "blocks")):
        t = time.perf_counter()
        order = locality_order(graph, method=method)
        ordered[suffix] = permute_graph(graph, order)
        jax.block_until_ready(ordered[suffix].indices)
        t_order = time.perf_counter() - t
        systems[suffix] = (diffusion_operator(ordered[suffix], args.alpha), y[:, order], np.argsort(order), t_order)
        print(f"locality_order(method={method!r}): {t_order:.2f}s", flush=True)
    routes, setup = {}, {SCIPY: 0.0, SCIPY64: 0.0}
    for suffix, (op_s, y_s, inv, t_s) in systems.items():
        routes[f"jax batched CG{suffix}"] = (CG(args.tol, 5000), None, op_s, y_s, inv)
        setup[f"jax batched CG{suffix}"] = t_s
        for mode in [m_ for m_ in args.modes.split(",") if m_ and suffix in two_level]:
            solver = PreconditionedCG(args.tol, 1000, args.max_coarse, mode)
            t = time.perf_counter()
            state = solver.init(op_s)
            jax.block_until_ready(state)
            key = f"jax two-level CG ({mode}){suffix}"
            setup[key] = time.perf_counter() - t + t_s
            routes[key] = (solver, state, op_s, y_s, inv)
            print(f"{key}: setup {setup[key]:.2f}s, {state.num_aggregates} aggregates, "
                  f"largest {int(np.bincount(np.asarray(state.aggregate)).max())}, W P width {state.wp_ids.shape[1]}, "
                  f"{state.nbytes() / 2 ** 20:.0f} MB", flush=True)
    return routes, setup, ordered


def time_routes(routes, scipy_loops, args, nq: int, nsc: int):
    """Each route alone (first call, then --repeat calls), in --rounds rounds, a pause
    between routes; ``scipy_loops`` {name: loop} timed last in each round:
    (seconds per query lists, last outputs, first-call seconds)."""
    times = {key: [] for key in list(routes) + list(scipy_loops)}
    outs, first = {}, {}
    for rnd in range(args.rounds):
        for key, (solver, state, op_s, y_s, _) in routes.items():
            def run(solver=solver, state=state, op_s=op_s, y_s=y_s):
                return jax.block_until_ready(solve(op_s, y_s, solver, state))
            if rnd == 0:
                t = time.perf_counter()
                run()
                first[key] = time.perf_counter() - t
            outs[key], ts = timed_calls(run, args.repeat)
            times[key] += [t / nq for t in ts]
            time.sleep(PAUSE_S)
        time.sleep(PAUSE_S)
        for key, loop in scipy_loops.items():
            for _ in range(1 + max(1, args.repeat - 2)):  # the slowest routes: fewer calls
                t = time.perf_counter()
                outs[key] = loop()
                times[key].append((time.perf_counter() - t) / nsc)
            time.sleep(PAUSE_S)
    return times, outs, first


def report(routes, times, outs, first, setup, yn, m, nsc, n, nq, args, ncomp, largest):
    """One row per route: steps, ms per query (median, min-max), ratios to the float32 and
    float64 scipy loops, agreement with the float64 scipy ranking and the true residual in
    float64; printed as a table."""
    ref = np.asarray(outs[SCIPY64][0], np.float64)
    ynorm = np.linalg.norm(yn, axis=1)
    base = float(np.median(times[SCIPY]))
    base64 = float(np.median(times[SCIPY64]))
    rows = []
    for key in times:
        if key in (SCIPY, SCIPY64):
            x, its = np.asarray(outs[key][0], np.float64), outs[key][1]
        else:
            sol, inv = outs[key], routes[key][4]
            x = np.asarray(sol.scores, np.float64)
            x = x if inv is None else x[:, inv]  # back to the database's numbering
            its = np.asarray(sol.iterations)
        true_res = np.linalg.norm(yn[:len(x)].T - m @ x.T, axis=0) / ynorm[:len(x)]
        xs = x[:nsc]
        over = top_overlap(xs, ref, 100)
        rel = np.abs(xs - ref).max(axis=1) / np.abs(ref).max(axis=1)
        ts = np.asarray(times[key])
        med = float(np.median(ts))
        rows.append({"route": key, "n": n, "d": args.d, "k": args.k, "queries": nsc if key in (SCIPY, SCIPY64) else nq,
                     "components": ncomp, "largest_component": largest,
                     "iterations_median": float(np.median(its)), "iterations_max": int(np.max(its)),
                     "ms_per_query": 1e3 * med, "ms_min": 1e3 * float(ts.min()), "ms_max": 1e3 * float(ts.max()),
                     "runs": len(ts), "vs_scipy": base / med,
                     "vs_scipy_min": float(np.min(times[SCIPY])) / float(ts.max()),
                     "vs_scipy_max": float(np.max(times[SCIPY])) / float(ts.min()),
                     "vs_scipy_float64": base64 / med,
                     "setup_s": setup[key], "first_call_s": first.get(key, float("nan")),
                     "top100_overlap_min": float(over.min()), "top100_overlap_mean": float(over.mean()),
                     "max_rel_diff_vs_scipy": float(rel.max()), "true_residual_max": float(true_res.max())})
    print("\nvs scipy = t(scipy cg loop, float32 CSR) / t(route), the like-for-like ratio; vs f64 = the same "
          "against the float64 loop; agreement against the float64 loop's solutions")
    print(f"| {'route':<32} | its med/max | ms/query (min-max) | vs scipy (range) | vs f64 | setup s "
          f"| top-100 overlap | max rel diff | true residual |")
    for r in rows:
        print(f"| {r['route']:<32} | {r['iterations_median']:5.0f}/{r['iterations_max']:<5d} | "
              f"{r['ms_per_query']:8.2f} ({r['ms_min']:.2f}-{r['ms_max']:.2f}) | {r['vs_scipy']:5.1f}x "
              f"({r['vs_scipy_min']:.1f}-{r['vs_scipy_max']:.1f}) | {r['vs_scipy_float64']:5.1f}x | "
              f"{r['setup_s']:7.2f} | "
              f"{r['top100_overlap_min']:.3f} | {r['max_rel_diff_vs_scipy']:.1e} | {r['true_residual_max']:.1e} |")

    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--scipy-queries", type=int, default=50, help="queries the scipy loop is timed on")
    p.add_argument("--alpha", type=float, default=0.99)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-coarse", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="deflation,additive")
    p.add_argument("--cache", default=None, help="npz file caching the graph and the queries")
    p.add_argument("--out", default=str(REPO / "results" / "bench_converged"))
    p.add_argument("--quick", action="store_true", help="n = 3000, d = 32, k = 10, 40 queries, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.queries, args.scipy_queries = 3000, 32, 10, 40, 20
        args.repeat, args.rounds, args.max_coarse = 2, 1, 256
    global PAUSE_S
    if args.quick:
        PAUSE_S = 0.2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n, nq = args.n, args.queries

    graph, qs, qi, t_graph = build(n, args.d, args.k, nq, Path(args.cache) if args.cache else None)
    wsp = graph.to_scipy()                               # float32, the JAX routes' weights
    ncomp, comp = connected_components(wsp, directed=False)
    sizes = np.bincount(comp)
    y = query_vectors(jnp.asarray(qs), jnp.asarray(qi, jnp.int32), n, gamma=3.0)
    yn = np.asarray(y, np.float64)
    m32 = (sp.identity(n, format="csr", dtype=np.float32) - np.float32(args.alpha) * wsp).tocsr()
    m = (sp.identity(n, format="csr") - args.alpha * wsp.astype(np.float64)).tocsr()
    op = diffusion_operator(graph, args.alpha)
    print(f"n = {n}, d = {args.d}, k = {args.k}, {nq} queries, nnz = {wsp.nnz}, max degree {graph.max_degree}, "
          f"{ncomp} components (largest {sizes.max()}), graph {t_graph:.0f}s; alpha {args.alpha}, tol {args.tol:g}",
          flush=True)

    nsc = min(args.scipy_queries, nq)
    routes, setup, ordered = make_routes(graph, op, y, args)
    loops = {SCIPY: scipy_cg_loop(m32, yn, nsc, args.tol), SCIPY64: scipy_cg_loop(m, yn, nsc, args.tol)}
    times, outs, first = time_routes(routes, loops, args, nq, nsc)
    rows = report(routes, times, outs, first, setup, yn, m, nsc, n, nq, args, ncomp, int(sizes.max()))

    time.sleep(PAUSE_S)
    bw = product_bandwidth(graph, nq, max(3, args.repeat))
    for suffix, g in ordered.items():
        time.sleep(PAUSE_S)
        bw += [dict(r, product=r["product"] + suffix) for r in product_bandwidth(g, nq, max(3, args.repeat))]
    copy_med, copy_best = copy_bandwidth(2 ** 24 if args.quick else 2 ** 29)
    print(f"\ncopy bandwidth (512 MB array copy, read + write): {copy_med / 1e9:.1f} GB/s median, "
          f"{copy_best / 1e9:.1f} GB/s best")
    for r in bw:
        r["copy_GBps"] = copy_med / 1e9
        r["streamed_vs_copy"] = r["streamed_GBps"] / r["copy_GBps"]
        r["gathered_vs_copy"] = r["gathered_GBps"] / r["copy_GBps"]
        print(f"W @ X [{n}, {r['B']}] {r['product']:<42} {r['ms']:8.1f} ms ({r['ms_min']:.1f}-{r['ms_max']:.1f}): "
              f"streamed {r['streamed_GBps']:.1f} GB/s ({r['streamed_vs_copy']:.2f} of copy), "
              f"gathered {r['gathered_GBps']:.1f} GB/s ({r['gathered_vs_copy']:.2f} of copy)")
    write_csv(out / "bench_converged.csv", rows)
    write_csv(out / "bandwidth.csv", bw)
    plot(out / "bench_converged.png", rows, n)
    print(f"\nwrote {out / 'bench_converged.csv'}, {out / 'bandwidth.csv'}, {out / 'bench_converged.png'}")
    return 0


def plot(path, rows, n):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    med = np.array([r["ms_per_query"] for r in rows])
    err = np.array([[r["ms_per_query"] - r["ms_min"] for r in rows], [r["ms_max"] - r["ms_per_query"] for r in rows]])
    ax.barh([r["route"] for r in rows], med, xerr=err, color=["tab:gray" if "scipy" in r["route"] else "tab:blue"
                                                                for r in rows])
    for j, r in enumerate(rows):
        ax.text(r["ms_per_query"], j, f"  {r['ms_per_query']:.1f} ms, x{r['vs_scipy']:.1f}, "
                                      f"{r['iterations_max']} steps", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (log), median and min-max; x = t(scipy cg loop, float32 CSR) / t(route)")
    ax.set_title(f"converged diffusion (tol 1e-6), n = {n}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
