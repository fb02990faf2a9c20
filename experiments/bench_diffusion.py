"""Diffusion speed: batched JAX CG vs the routes a researcher would otherwise use.

    python -m experiments.bench_diffusion [--sizes 5000 100000] [--out experiments/results/bench]

For each size, one mutual kNN graph (k = 50, gamma = 3, W = D^-1/2 A D^-1/2) over
synthetic clustered descriptors, and out-of-graph queries (y = top-10 neighbours,
similarity^3). Every route solves (I - alpha W) x = y on the same graph, the same
y, in the same process:

* scipy `cg` called once per query on the CSR matrix (rtol = tol, the loop a
  researcher writes);
* scipy `splu` of (I - alpha W), factorisation included (the exact solve; only
  where the fill-in allows, n <= --splu-max);
* `retrieval_jax.diffusion.diffuse`: all queries at once, jitted;
* `retrieval_jax.diffusion.truncated_diffuse` with T = 1000 (vmapped subproblems);
* `retrieval_jax.diffusion.diffusion_inverse`: the exact (I - alpha W)^-1 by
  Cholesky, one dense block per connected component, inversion included, then
  each query is k rows of it (n <= --inverse-max).

A COIL-20 block (--coil20, the graph of ../shared/benchmarks/PEERS.md: 32x32
pixels, k = 5, every item a query with y its indicator) and a synthetic block
like PEERS.md's (--items 5000: clustered descriptors, d = 256, k = 50, every
item a query) compare the same routes with label mAP.

Reported: seconds per query, ratio to the scipy loop and to the fastest scipy
route, peak resident memory growth, and the mAP of every route against the
cluster labels (rankings must agree). Also the sparse-product layouts. Writes
CSV and a PNG bar chart. Times are wall-clock medians of --repeat runs after a
warm-up (JAX compilation excluded and reported separately).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from retrieval_jax.diffusion import (diffuse, diffusion_inverse, indicator_vectors, query_vectors,
                                     ranking_from_scores, truncated_diffuse)
from retrieval_jax.graph import knn, knn_graph, normalize

from experiments.common import clustered, process_peak_rss_mb, query_label_map, pyplot, save_figure, timed, write_csv


_weighted_rows = jax.jit(lambda inv, weights, idx: inv.weighted_rows(weights, idx))
_rows = jax.jit(lambda inv, ids: inv.rows(ids))


def bench_size(n, nq, d, k, alpha, tol, max_iter, truncate, repeat, splu_max, scipy_queries,
               inverse_max):
    x, labels = clustered(n + nq, d, max(10, n // 100), seed=n)
    db, db_labels = x[:n], labels[:n]
    q, q_labels = x[n:], labels[n:]
    t = time.perf_counter()
    w = normalize(knn_graph(db, k, gamma=3.0, mutual=True))
    jax.block_until_ready(w)
    t_graph = time.perf_counter() - t
    s, i = knn(q, db, 10)
    y = query_vectors(s, i, n, gamma=3.0)
    _, short = knn(q, db, truncate) if truncate and truncate < n else (None, None)
    evaluate = lambda scores: query_label_map(scores, q_labels, db_labels)  # noqa: E731
    header = f"n = {n}, {nq} queries, k = {k}, graph built in {t_graph:.1f}s, max degree {w.max_degree}"
    rows = run_routes(w, y, evaluate, alpha=alpha, tol=tol, max_iter=max_iter, repeat=repeat,
                      splu=n <= splu_max, inverse=n <= inverse_max, shortlist=short,
                      base_scores=np.asarray(q @ db.T), scipy_queries=scipy_queries,
                      inverse_rows=lambda inv: np.asarray(
                          _weighted_rows(inv, jnp.maximum(s, 0.0) ** 3, i)))
    report(header, rows, {"n": n, "queries": nq, "block": "out-of-graph queries"})
    return rows, w


def bench_coil20(alpha, tol, max_iter, repeat):
    """The PEERS.md COIL-20 block: n = 1440, k = 5, every item queries the rest."""
    from retrieval_jax.data import load_coil20
    from retrieval_jax.evaluation import label_map
    data = load_coil20(size=32)
    n = len(data)
    w = normalize(knn_graph(data.X, 5, gamma=3.0, mutual=True))
    ids = np.arange(n)
    y = indicator_vectors(ids, n)
    evaluate = lambda scores: 100 * label_map(ranking_from_scores(scores, exclude=ids), data.labels)  # noqa: E731
    rows = run_routes(w, y, evaluate, alpha=alpha, tol=tol, max_iter=max_iter, repeat=repeat, splu=True,
                      inverse=True, shortlist=None, base_scores=None, scipy_queries=n,
                      inverse_rows=lambda inv: np.asarray(_rows(inv, ids)))
    knn_map = evaluate(np.asarray(data.X @ data.X.T))
    rows.insert(0, {"route": "plain kNN (dot product)", "ms_per_query": float("nan"), "mAP": knn_map, "note": ""})
    report(f"COIL-20, n = {n}, k = 5, every item a query", rows, {"n": n, "queries": n, "block": "COIL-20"})
    return rows


def bench_items(n, d, k, alpha, tol, max_iter, repeat, scipy_queries):
    """The PEERS.md synthetic block: clustered descriptors, every item queries the rest."""
    from retrieval_jax.evaluation import label_map
    x, labels = clustered(n, d, max(10, n // 100), seed=n + 1)
    w = normalize(knn_graph(x, k, gamma=3.0, mutual=True))
    ids = np.arange(n)
    y = indicator_vectors(ids, n)
    evaluate = lambda scores: 100 * label_map(ranking_from_scores(scores, exclude=ids), labels)  # noqa: E731
    rows = run_routes(w, y, evaluate, alpha=alpha, tol=tol, max_iter=max_iter, repeat=repeat, splu=True,
                      inverse=True, shortlist=None, base_scores=None, scipy_queries=scipy_queries,
                      inverse_rows=lambda inv: np.asarray(_rows(inv, ids)))
    report(f"synthetic clusters, n = {n}, d = {d}, k = {k}, every item a query", rows,
           {"n": n, "queries": n, "block": "items"})
    return rows


def run_routes(w, y, evaluate, *, alpha, tol, max_iter, repeat, splu, inverse, shortlist, base_scores,
               scipy_queries, inverse_rows):
    """Every route on one graph and one batch of y; rows of ms/query and mAP."""
    n = w.num_nodes
    nq = y.shape[0]
    yn = np.asarray(y, np.float64)
    m = (sp.eye(n, format="csr") - alpha * w.to_scipy()).astype(np.float64).tocsr()
    rows = []

    def add(route, sec_per_query, scores, note=""):
        rows.append({"route": route, "ms_per_query": 1e3 * sec_per_query, "mAP": evaluate(scores),
                     "note": note})

    nq_sc = min(nq, scipy_queries)

    def scipy_loop():
        out = np.zeros((nq, n))
        for r in range(nq_sc):
            out[r], _ = sla.cg(m, yn[r], rtol=tol, maxiter=max_iter)
        return out
    sc, t_sc = timed(scipy_loop, 1)
    if nq_sc < nq:  # untimed rest, so that mAP is over the same queries
        for r in range(nq_sc, nq):
            sc[r], _ = sla.cg(m, yn[r], rtol=tol, maxiter=max_iter)
    add(f"scipy cg per query (rtol {tol:g}, maxiter {max_iter})", t_sc / nq_sc, sc,
        f"{nq_sc} queries timed" if nq_sc < nq else "")
    if splu:
        def direct():  # one factorisation, then one triangular solve pair per query
            lu = sla.splu(m.tocsc())
            return np.stack([lu.solve(yn[r]) for r in range(nq)])
        ex, t_ex = timed(direct, 1)
        add("scipy splu (factorisation included)", t_ex / nq, ex)
    for mi, label in [(max_iter, f"jax diffuse, batched CG (max_iter {max_iter})"),
                      (5000, "jax diffuse, batched CG (to tol)")]:
        rss0 = process_peak_rss_mb()
        t = time.perf_counter()
        jax.block_until_ready(diffuse(w, y, alpha=alpha, tol=tol, max_iter=mi))
        t_first = time.perf_counter() - t
        (scores, info), t_j = timed(lambda: jax.block_until_ready(
            diffuse(w, y, alpha=alpha, tol=tol, max_iter=mi, return_info=True)), repeat)
        add(label, t_j / nq, np.asarray(scores),
            f"first call {t_first:.2f}s; CG steps max {int(np.max(info.iterations))}; "
            f"peak rss +{process_peak_rss_mb() - rss0:.0f} MB")
    if inverse:
        inverse_rows(jax.block_until_ready(diffusion_inverse(w, alpha)))  # compile
        inv, t_inv = timed(lambda: jax.block_until_ready(diffusion_inverse(w, alpha)), repeat)
        scores, t_rows = timed(lambda: inverse_rows(inv), repeat)
        sizes = "/".join(str(b.shape[1]) for b in inv.blocks[:3]) + ("/..." if len(inv.blocks) > 3 else "")
        add("jax diffusion_inverse (inversion included)", (t_inv + t_rows) / nq, scores,
            f"{len(inv.blocks)} buckets of components (sizes {sizes}), {inv.nbytes / 2 ** 20:.0f} MB; "
            f"inversion {t_inv:.3f}s, then {1e3 * t_rows / nq:.4f} ms/query")
    if shortlist is not None:
        jax.block_until_ready(truncated_diffuse(w, y, shortlist, alpha=alpha, tol=tol, max_iter=5000))
        xs, t_t = timed(lambda: jax.block_until_ready(
            truncated_diffuse(w, y, shortlist, alpha=alpha, tol=tol, max_iter=5000)), repeat)
        full = base_scores - 3.0
        np.put_along_axis(full, np.asarray(shortlist), np.asarray(xs), axis=1)
        add(f"jax truncated_diffuse T={shortlist.shape[1]} (to tol)", t_t / nq, full)
    return rows


def report(header, rows, extra):
    timed_rows = [r for r in rows if np.isfinite(r["ms_per_query"])]
    base = next(r["ms_per_query"] for r in timed_rows if r["route"].startswith("scipy cg"))
    fastest_scipy = min(r["ms_per_query"] for r in timed_rows if r["route"].startswith("scipy"))
    for r in rows:
        r.update(extra)
        r["vs_scipy_cg"] = base / r["ms_per_query"]
        r["vs_fastest_scipy"] = fastest_scipy / r["ms_per_query"]
    print(f"\n{header}; peak rss {process_peak_rss_mb():.0f} MB")
    print(f"| {'route':<48} | {'ms/query':>9} | {'vs cg loop':>10} | {'vs best scipy':>13} | {'mAP':>6} | note")
    for r in rows:
        print(f"| {r['route']:<48} | {r['ms_per_query']:9.3f} | {r['vs_scipy_cg']:9.1f}x | "
              f"{r['vs_fastest_scipy']:12.1f}x | {r['mAP']:6.2f} | {r['note']}")


def bench_layouts(w, b=70, repeat=10):
    """Time one W @ X, X [n, b], for several sparse layouts."""
    from jax.experimental import sparse as jsparse
    n = w.num_nodes
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, b)).astype(np.float32))
    coo = w.to_scipy().tocoo()
    bcoo = jsparse.BCOO((jnp.asarray(coo.data, jnp.float32),
                         jnp.asarray(np.stack([coo.row, coo.col], 1), jnp.int32)), shape=(n, n))
    layouts = {
        "one-shot gather einsum": (lambda w, x: jnp.einsum("nk,nkb->nb", w.weights, x[w.indices]), (w, x)),
        "BCOO": (lambda m, x: m @ x, (bcoo, x)),
        "BCSR": (lambda m, x: m @ x, (jsparse.BCSR.from_bcoo(bcoo), x)),
        "Graph.matvec (fori_loop over slots)": (lambda w, x: w.matvec(x), (w, x)),
    }
    out = []
    for name, (fn, args) in layouts.items():
        f = jax.jit(fn)
        jax.block_until_ready(f(*args))
        _, t = timed(lambda: jax.block_until_ready(f(*args)), repeat)
        out.append((name, 1e3 * t))
    csr, xn = w.to_scipy(), np.asarray(x)
    _, t = timed(lambda: csr @ xn, repeat)
    out.append(("scipy CSR @ X", 1e3 * t))
    print(f"\nsparse product W @ X, n = {n}, X [n, {b}]:")
    for name, ms in out:
        print(f"  {name:<40} {ms:8.2f} ms")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 100000])
    p.add_argument("--queries", type=int, nargs="+", default=[70, 500])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--alpha", type=float, default=0.99)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--truncate", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--splu-max", type=int, default=20000)
    p.add_argument("--scipy-queries", type=int, default=100,
                   help="time the scipy loop on at most this many queries")
    p.add_argument("--inverse-max", type=int, default=20000)
    p.add_argument("--coil20", action="store_true", help="also run the COIL-20 block of PEERS.md")
    p.add_argument("--items", type=int, default=0, metavar="N",
                   help="also run the synthetic block of PEERS.md: N clustered items (d = 256), "
                        "every item a query")
    p.add_argument("--out", default="experiments/results/bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows = []
    layout_rows = None
    if args.coil20:
        all_rows += bench_coil20(args.alpha, args.tol, args.max_iter, args.repeat)
    if args.items:
        all_rows += bench_items(args.items, 256, args.k, args.alpha, args.tol, args.max_iter, args.repeat,
                                args.scipy_queries)
    for n, nq in zip(args.sizes, args.queries + [args.queries[-1]] * len(args.sizes)):
        rows, w = bench_size(n, nq, args.d, args.k, args.alpha, args.tol, args.max_iter, args.truncate,
                             args.repeat, args.splu_max, args.scipy_queries, args.inverse_max)
        all_rows += rows
        if layout_rows is None:
            layout_rows = bench_layouts(w)
    write_csv(out / "diffusion_speed.csv", all_rows)
    _plot(out / "diffusion_speed.png", all_rows)
    print(f"\nwrote {out / 'diffusion_speed.csv'} and {out / 'diffusion_speed.png'}")


def _plot(path, rows):
    blocks = list(dict.fromkeys((r["block"], r["n"]) for r in rows))
    fig, axes = pyplot().subplots(1, len(blocks), figsize=(6 * len(blocks), 4), squeeze=False)
    for ax, (block, n) in zip(axes[0], blocks):
        rs = [r for r in rows if (r["block"], r["n"]) == (block, n) and np.isfinite(r["ms_per_query"])]
        ax.barh([r["route"] for r in rs], [r["ms_per_query"] for r in rs], color="tab:blue")
        for j, r in enumerate(rs):
            ax.text(r["ms_per_query"], j, f" {r['ms_per_query']:.2f} ms, mAP {r['mAP']:.1f}", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("ms per query (log)")
        ax.set_title(f"{block}, n = {n}")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    main()
