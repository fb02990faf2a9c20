"""Where a conjugate-gradient step's time goes, against what 10x the scipy cg loop would allow it.

    python -m experiments.bench_cg_step [--n 100000] [--queries 200] [--steps 20] [--widths 200 50 10]
        [--scipy-queries 20] [--repeat 5] [--out results/bench_cg_step] [--no-c] [--quick]

The graph and queries of ``bench_defaults``: `common.clustered_database` (n items, d = 64),
A = ``knn_graph(X, 20, gamma=3)``, W = ``normalize(A)`` (with the locality layout it
attaches to a large graph), M = I - 0.99 W; each query observes its 10 nearest items
(similarity^3, `observe_neighbours`), as ``DIFFUSION.search`` does.

For every batch width B in --widths (the first --widths[i] queries), warm, one route at a
time with a pause between, --repeat calls each (median, min-max):

* ``solve``: ``solve(op, y, CG(tol=1e-6, max_iter=steps))``, the solve of the method's
  default search (no column reaches 1e-6 in 20 steps, so every column takes --steps steps;
  the record's iterations are checked);
* ``cg loop``: `conjugate_gradient` on the operator in its layout, the right-hand sides
  already renumbered: the iteration alone;
* ``products``: --steps products with M alone, in a jitted loop as CG runs them.

From these, per query and step: the product, the vector work (cg loop - products: the
three vector updates and two reductions of a step) and the layout (solve - cg loop: y
renumbered in, the scores renumbered out, spread over the steps). The baseline is the
loop a researcher writes: ``scipy.sparse.linalg.cg`` once per query on the float32 CSR of
the same M, ``maxiter=steps``, on --scipy-queries queries: ms per query and step. The
budget is a tenth of it: what the library's batched step may cost, per query, for the
method to run at 10x the scipy loop warm, before compilation and offline work. Agreement:
the largest relative difference between the library's scores and scipy's after the same
number of steps, over the queries scipy solved.

The floor under the library's loop (`experiments.step_floor`, skipped with --no-c or without
a C compiler): the same steps written by hand in C (``step_floor.c``, OpenMP over rows) on
the same layout and right-hand sides: the product alone, the least vector work of a CG step
(p = r + b p, x += a p, r -= a q: four [n, B] arrays read, three written), their sum (the
floor: what a step costs at best on this machine), and a hand-fused CG (two passes per step),
checked against the library's iterates.

Writes ``cg_step.csv`` (one row per width, times in ms per query and step, with the
budget and the share of it the products alone take) and ``cg_step.png`` under --out.
--quick: n = 3,000, 16 queries, widths 16 and 4, 5 steps, 4 for scipy, 2 repeats (the test).
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

from retrieval_jax.diffusion import CG, conjugate_gradient, diffusion_operator, observe_neighbours, solve
from retrieval_jax.diffusion.operator import node_first
from retrieval_jax.graph import knn, knn_graph, normalize

from experiments.common import (clustered_database, label_axes, pause, pyplot, save_figure, spread, timed_calls,
                                versions, write_csv, write_json)
from experiments.step_floor import compile_kernels, floor_times

K, ALPHA, TOL, QUERY_K, GAMMA, SPEEDUP = 20, 0.99, 1e-6, 10, 3.0, 10.0
COLUMNS = ("n", "B", "steps", "scipy_ms", "budget_ms", "solve_ms", "solve_min", "solve_max", "cg_loop_ms",
           "products_ms", "products_min", "products_max", "vector_ms", "layout_ms", "solve_vs_scipy",
           "products_share_of_budget", "solve_share_of_budget", "max_rel_diff_vs_scipy", "c_product_ms",
           "c_update_ms", "c_floor_ms", "c_cg_ms", "floor_vs_scipy", "c_cg_vs_scipy", "max_rel_diff_c_cg")
C_COLUMNS = COLUMNS[COLUMNS.index("c_product_ms"):]


def build(n: int, nq: int):
    """(W with its layout, the queries' observations [nq], float32 CSR of M)."""
    db, q, _, _ = clustered_database(n, nq)
    w = normalize(knn_graph(db, K, gamma=GAMMA))
    sims, ids = knn(q, db, QUERY_K)
    y = observe_neighbours(sims, ids, n, gamma=GAMMA)
    m32 = (sp.identity(n, format="csr", dtype=np.float32) - np.float32(ALPHA) * w.to_scipy().astype(np.float32))
    return w, y, m32.tocsr()


def scipy_loop(m32, y_dense: np.ndarray, steps: int, repeat: int):
    """(solutions [nq, n], seconds per query and step of each loop): scipy's cg, ``steps`` steps."""
    times, xs = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        xs = np.stack([sla.cg(m32, b, rtol=TOL, maxiter=steps)[0] for b in y_dense])
        times.append((time.perf_counter() - t) / (len(y_dense) * steps))
        pause()
    return xs, times


def _rows(y, b: int):
    return jax.tree_util.tree_map(lambda a: a[:b], y)


@jax.jit
def _solve(op, y, solver):
    sol = solve(op, y, solver)
    return sol.scores, sol.iterations


def _cg_loop(steps: int):
    @jax.jit
    def run(op, b):
        res = conjugate_gradient(op.mv, b, tol=TOL, max_iter=steps)
        return res.x, res.iterations
    return run


def _products(steps: int):
    @jax.jit
    def run(op, b):
        return jax.lax.fori_loop(0, steps, lambda _, v: op.mv(v), b)
    return run


def width_row(op, y, b: int, steps: int, repeat: int, scipy_ms: float, kernels=None):
    """The three routes at width ``b``: one row of `COLUMNS` (ms per query and step); with
    ``kernels`` (`step_floor.compile_kernels`) the hand-written C product, update pass and
    fused CG on the same layout and right-hand sides as well, else those columns are NaN."""
    yb = _rows(y, b)
    inner, layout = op.in_layout()
    rhs = jax.block_until_ready(node_first(yb, layout))
    per = 1e3 / (b * steps)
    (scores, its), t_solve = timed_calls(lambda: _solve(op, yb, CG(TOL, steps)), repeat)
    pause()
    its = np.asarray(its)
    if not (its == steps).all():
        raise RuntimeError(f"expected every column to take {steps} steps, got {its.min()}-{its.max()}")
    loop, products = _cg_loop(steps), _products(steps)
    (x_loop, _), t_loop = timed_calls(lambda: loop(inner, rhs), repeat)
    pause()
    _, t_prod = timed_calls(lambda: products(inner, rhs), repeat)
    pause()
    s, lp, pr = spread(t_solve), spread(t_loop), spread(t_prod)
    budget = scipy_ms / SPEEDUP
    row = {"B": b, "steps": steps, "scipy_ms": scipy_ms, "budget_ms": budget,
           "solve_ms": per * s["median"], "solve_min": per * s["min"], "solve_max": per * s["max"],
           "cg_loop_ms": per * lp["median"], "products_ms": per * pr["median"], "products_min": per * pr["min"],
           "products_max": per * pr["max"]}
    row["vector_ms"] = row["cg_loop_ms"] - row["products_ms"]
    row["layout_ms"] = row["solve_ms"] - row["cg_loop_ms"]
    row["solve_vs_scipy"] = scipy_ms / row["solve_ms"]
    row["products_share_of_budget"] = row["products_ms"] / budget
    row["solve_share_of_budget"] = row["solve_ms"] / budget
    row.update(dict.fromkeys(C_COLUMNS, float("nan")))
    if kernels is not None:
        times, x_c = floor_times(kernels, inner.graph.indices, inner.graph.weights, ALPHA, rhs, steps, repeat, pause)
        row.update({f"{key}_ms": per * t["median"] for key, t in times.items()})
        row["c_floor_ms"] = row["c_product_ms"] + row["c_update_ms"]
        row["floor_vs_scipy"] = scipy_ms / row["c_floor_ms"]
        row["c_cg_vs_scipy"] = scipy_ms / row["c_cg_ms"]
        x_loop = np.asarray(x_loop)
        row["max_rel_diff_c_cg"] = float(np.max(np.abs(x_c - x_loop)) / np.max(np.abs(x_loop)))
    return row, np.asarray(scores)


def plot(rows, path: Path) -> Path:
    """Stacked bars (product, vector work, layout) per width, ms per query and step, the
    hand-written C floor and fused CG as markers (when measured), and the scipy loop's step
    and its tenth as lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for key, label in (("products_ms", "sparse product"), ("vector_ms", "vector work"), ("layout_ms", "layout in/out")):
        v = np.maximum([r[key] for r in rows], 0.0)
        ax.bar(xs, v, bottom=bottom, label=label)
        bottom += v
    floor = np.array([r["c_floor_ms"] for r in rows], dtype=float)
    if np.isfinite(floor).any():
        ax.plot(xs, floor, "kx", ms=9, mew=2, ls="none", label="hand-written C: product + least update")
        ax.plot(xs, [r["c_cg_ms"] for r in rows], "o", mfc="none", mec="k", ls="none", label="hand-written C: fused CG")
    ax.axhline(rows[0]["scipy_ms"], color="k", lw=1, label="scipy cg loop")
    ax.axhline(rows[0]["budget_ms"], color="r", ls="--", lw=1, label=f"{SPEEDUP:g}x the scipy loop")
    ax.set_xticks(xs, [f"B = {r['B']}" for r in rows])
    label_axes(ax, xlabel="batch width", ylabel="ms per query and step", title=f"A CG step at n = {rows[0]['n']:,}")
    return save_figure(fig, path)


def run(n: int, nq: int, widths, steps: int, nsc: int, repeat: int, out: Path, log=print,
        hand_written: bool = True) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    kernels, why = compile_kernels(out / "kernels") if hand_written else (None, "--no-c")
    if kernels is None:
        log(f"hand-written C kernels skipped: {why}", flush=True)
    widths = sorted({min(int(b), nq) for b in widths}, reverse=True)
    w, y, m32 = build(n, nq)
    op = diffusion_operator(w, ALPHA)
    log(f"n = {n}, {nq} queries, widths {widths}, {steps} steps; jax {jax.__version__} on "
        f"{jax.default_backend()}; nnz {m32.nnz}; layout: {w.layout is not None}", flush=True)
    pause()
    y_dense = np.asarray(y.todense())[:nsc]
    x_scipy, t_scipy = scipy_loop(m32, y_dense, steps, repeat)
    scipy_ms = 1e3 * float(np.median(t_scipy))
    log(f"scipy cg loop, float32 CSR: {scipy_ms:.3f} ms per query and step (min-max {1e3 * min(t_scipy):.3f}-"
        f"{1e3 * max(t_scipy):.3f}); 10x allows {scipy_ms / SPEEDUP:.3f}", flush=True)
    rows = []
    for b in widths:
        row, scores = width_row(op, y, b, steps, repeat, scipy_ms, kernels)
        k = min(nsc, b)
        ref = x_scipy[:k]
        row["max_rel_diff_vs_scipy"] = float(np.max(np.abs(scores[:k] - ref)) / np.max(np.abs(ref)))
        row["n"] = n
        rows.append(row)
        log(f"B = {b}: solve {row['solve_ms']:.3f} ms per query and step ({row['solve_vs_scipy']:.1f}x scipy): "
            f"product {row['products_ms']:.3f}, vector work {row['vector_ms']:.3f}, layout {row['layout_ms']:.3f}; "
            f"the product alone is {row['products_share_of_budget']:.2f} of the 10x budget; "
            f"max rel. diff vs scipy {row['max_rel_diff_vs_scipy']:.1e}", flush=True)
        if kernels is not None:
            log(f"  hand-written C: product {row['c_product_ms']:.3f} + least update pass {row['c_update_ms']:.3f} "
                f"= floor {row['c_floor_ms']:.3f} ({row['floor_vs_scipy']:.1f}x scipy); fused CG "
                f"{row['c_cg_ms']:.3f} ({row['c_cg_vs_scipy']:.1f}x; the library's CG loop {row['cg_loop_ms']:.3f}); "
                f"max rel. diff of the fused CG vs the library's {row['max_rel_diff_c_cg']:.1e}", flush=True)
    write_csv(out / "cg_step.csv", rows, COLUMNS)
    plot(rows, out / "cg_step.png")
    write_json(out / "config.json", {"n": n, "queries": nq, "widths": widths, "steps": steps,
                                     "scipy_queries": nsc, "repeat": repeat, "hand_written_c": kernels is not None,
                                     "hand_written_c_skipped": why, "versions": versions()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--widths", type=int, nargs="+", default=[200, 50, 10])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scipy-queries", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/bench_cg_step"))
    p.add_argument("--no-c", action="store_true", help="skip the hand-written C kernels (experiments/step_floor.c)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.queries, a.widths, a.steps, a.scipy_queries, a.repeat = 3000, 16, [16, 4], 5, 4, 2
    run(a.n, a.queries, a.widths, a.steps, a.scipy_queries, a.repeat, a.out, hand_written=not a.no_c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
