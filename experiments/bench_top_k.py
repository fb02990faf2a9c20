"""Does an optimisation barrier after the query-database top-k speed up a method's search?

    python -m experiments.bench_top_k [--n 100000] [--d 64] [--queries 64] [--repeat 5]
        [--methods aqe superglobal ...] [--out experiments/results/bench_top_k] [--quick]

A re-ranking method's jitted ``search`` computes the similarities S = Q X^T [nq, N] of
its queries with the database, takes a shortlist with ``lax.top_k(S, k)`` and works on
from there. XLA on CPU may fuse the [nq, N] product into what follows the top-k, and
the search then runs many times slower (docs/benchmarks/bench_top_k.md).
``lax.optimization_barrier`` on the top-k's output keeps the product and the top-k one
program of their own.

For every method of `retrieval_jax.methods.METHODS` whose search takes a top-k of the
query similarities (all but knn), this experiment compiles ``METHODS[name].search``
twice, whatever the code in the library does at the time:

* **plain**: every ``lax.top_k`` whose operand is [nq, N] (queries x database items)
  without a barrier;
* **barrier**: the same top-k's (values, ids) through one ``lax.optimization_barrier``.

A barrier the library itself puts right on such a top-k's output is passed through on
both routes, so each route has exactly its own.

Both are traced with ``jax.lax.top_k`` / ``jax.lax.optimization_barrier`` replaced
for the trace only (`top_k_route`), so the comparison holds before and after the
library's own change. Timing: a warm-up call of each program, then --repeat rounds of
one call of each, one route at a time; the median and min-max of ms per query
(--queries queries per call). ``plain_vs_barrier`` is plain / barrier (> 1: the
barrier helps); ``max_abs_diff`` the largest score difference of the two routes;
``sites`` how many top-k's of the query similarities the trace met.

Data: `common.clustered_database` (unit vectors around N / 100 centres, d = --d). The
graph methods (diffusion, rdp, fsr, offline-diffusion) share one kNN graph (k = 10,
gamma 3, mutual, ``graph_method`` auto) through their ``from_graph`` (FSR with rank 100,
a shorter eigendecomposition); the others build with their defaults. Methods whose
build is too slow at 100,000 run at a smaller N (`SMALLER_N`, the reason in the
``note`` column; --all-at-n runs them at --n too).

Writes ``bench_top_k.csv`` under --out and prints the table. --quick: N = 1,500,
d = 16, 8 queries, 3 rounds (the test).
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np

import jax

from retrieval_jax.methods import METHODS, resolve
from retrieval_jax.methods.base import config_graph

from experiments.common import block, clustered_database, write_csv

COLUMNS = ("method", "n", "d", "queries", "plain_ms", "plain_min", "plain_max", "barrier_ms", "barrier_min",
           "barrier_max", "plain_vs_barrier", "sites", "max_abs_diff", "build_s", "note")

# the rows: (label, registered method, options given to its config); knn takes no top-k
CASES = (
    ("aqe", "aqe", {}),
    ("aqewd", "aqewd", {}),
    ("alpha-qe", "alpha-qe", {}),
    ("dba-qe", "dba-qe", {}),
    ("dqe", "dqe", {}),
    ("superglobal", "superglobal", {}),
    ("k-reciprocal", "k-reciprocal", {}),
    ("gnn", "gnn", {}),
    ("diffusion", "diffusion", {"k": 10}),
    ("diffusion truncate=1000", "diffusion", {"k": 10, "truncate": 1000}),
    ("rdp", "rdp", {"k": 10}),
    ("cas", "cas", {}),
    ("offline-diffusion", "offline-diffusion", {"k": 10}),
    ("fsr", "fsr", {"k": 10, "rank": 100}),
    ("gss", "gss", {}),
)

# methods built on a smaller database than --n (the reason goes to the note column)
SMALLER_N = {
    "offline-diffusion": (20_000, "build solves one truncated diffusion per database item"),
    "gss": (5_000, "build trains the GCN full-batch for 200 epochs on a loss over all n^2 pairs"),
}
GRAPH_FROM = ("diffusion", "rdp", "fsr", "offline-diffusion")


@contextlib.contextmanager
def top_k_route(barrier: bool, n_db: int, nq: int):
    """While tracing inside: every ``jax.lax.top_k`` of an operand [nq, n_db] is followed by one
    optimisation barrier (``barrier``) or none. A barrier the caller puts directly on such a
    top-k's output is passed through (so the library's own barrier, if any, counts for neither
    route). Yields a one-item list counting those top-k's."""
    top_k, optimization_barrier = jax.lax.top_k, jax.lax.optimization_barrier
    outputs = []
    sites = [0]

    def patched_top_k(operand, k, **kwargs):
        out = top_k(operand, k, **kwargs)
        if getattr(operand, "shape", None) != (nq, n_db):
            return out
        sites[0] += 1
        if barrier:
            out = tuple(optimization_barrier(tuple(out)))
        outputs.append(jax.tree_util.tree_leaves(out))
        return out

    def patched_barrier(value):
        leaves = jax.tree_util.tree_leaves(value)
        for made in outputs:
            if len(made) == len(leaves) and all(a is b for a, b in zip(made, leaves)):
                return value
        return optimization_barrier(value)

    jax.lax.top_k, jax.lax.optimization_barrier = patched_top_k, patched_barrier
    jax.clear_caches()   # the jitted functions inside are traced anew
    try:
        yield sites
    finally:
        jax.lax.top_k, jax.lax.optimization_barrier = top_k, optimization_barrier
        jax.clear_caches()


def compiled_search(method, state, queries, barrier: bool):
    """(the compiled program of ``method.search(state, queries)`` on one route, top-k sites met)."""
    with top_k_route(barrier, state.database.shape[0], queries.shape[0]) as sites:
        program = jax.jit(method.search).lower(state, queries).compile()
    return program, sites[0]


def build_state(name: str, given: dict, db, graphs: dict):
    """A state of METHODS[name] over db with the options ``given`` (the rest resolved for n);
    the graph methods share graphs (by k, gamma, mutual, graph_method) through from_graph."""
    method = METHODS[name]
    values, _ = resolve(method.config_type, given, db.shape[0])
    config = method.config_type(**values)
    if name not in GRAPH_FROM:
        return method.build(db, config)
    key = (db.shape[0], config.k, config.gamma, config.mutual, config.graph_method)
    if key not in graphs:
        graphs[key] = config_graph(db, config, show_progress=False)
    return method.from_graph(db, graphs[key], config)


def time_routes(programs: dict, state, queries, repeat: int) -> dict:
    """Seconds of --repeat calls of each compiled program, one route at a time, round by round
    (after one warm-up call each); also each route's last scores."""
    scores = {route: np.asarray(block(p(state, queries))) for route, p in programs.items()}
    seconds = {route: [] for route in programs}
    for _ in range(repeat):
        for route, p in programs.items():
            t = time.perf_counter()
            block(p(state, queries))
            seconds[route].append(time.perf_counter() - t)
    return {"seconds": seconds, "scores": scores}


def run_case(label: str, name: str, given: dict, n: int, d: int, nq: int, repeat: int, smaller: bool,
             graphs: dict) -> dict:
    note = ""
    if smaller and name in SMALLER_N and SMALLER_N[name][0] < n:
        n, note = SMALLER_N[name]
    db, queries, _, _ = clustered_database(n, nq, d)
    t = time.perf_counter()
    state = block(build_state(name, given, db, graphs))
    build_s = time.perf_counter() - t
    q = jax.device_put(queries)
    method = METHODS[name]
    programs, sites = {}, {}
    for route in ("plain", "barrier"):
        programs[route], sites[route] = compiled_search(method, state, q, route == "barrier")
    if sites["plain"] != sites["barrier"]:
        raise RuntimeError(f"{label}: the routes met {sites['plain']} and {sites['barrier']} top-k's")
    timed = time_routes(programs, state, q, repeat)
    row = {"method": label, "n": n, "d": d, "queries": nq, "sites": sites["plain"],
           "build_s": round(build_s, 2), "note": note}
    for route, secs in timed["seconds"].items():
        ms = 1e3 * np.asarray(secs) / nq
        row[f"{route}_ms"], row[f"{route}_min"], row[f"{route}_max"] = (float(np.median(ms)), float(ms.min()),
                                                                        float(ms.max()))
    row["plain_vs_barrier"] = row["plain_ms"] / row["barrier_ms"]
    row["max_abs_diff"] = float(np.max(np.abs(timed["scores"]["plain"] - timed["scores"]["barrier"])))
    return row


def table(rows) -> str:
    """The rows as a markdown table."""
    head = ("method", "N", "ms / query plain (min-max)", "ms / query barrier (min-max)", "plain / barrier",
            "top-k sites", "max abs diff", "build s", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n']:,} | {r['plain_ms']:.3g} ({r['plain_min']:.3g}-{r['plain_max']:.3g})"
                     f" | {r['barrier_ms']:.3g} ({r['barrier_min']:.3g}-{r['barrier_max']:.3g})"
                     f" | {r['plain_vs_barrier']:.2f} | {r['sites']} | {r['max_abs_diff']:.2g} | {r['build_s']:.1f}"
                     f" | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    labels = [c[0] for c in CASES]
    p.add_argument("--n", type=int, default=100_000, help="database items")
    p.add_argument("--d", type=int, default=64, help="descriptor dimension")
    p.add_argument("--queries", type=int, default=64, help="queries per search call")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per route (>= 3)")
    p.add_argument("--all-at-n", action="store_true", help="every method at --n (no smaller N for slow builds)")
    p.add_argument("--methods", nargs="+", choices=labels, default=None, help="rows to run (default: all)")
    p.add_argument("--out", default="experiments/results/bench_top_k", help="output folder")
    p.add_argument("--quick", action="store_true", help="N = 1,500, d = 16, 8 queries, 3 rounds (the test)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.queries, args.repeat = 1_500, 16, 8, 3
    if args.repeat < 3:
        p.error("--repeat must be >= 3 (a median and a spread)")
    if args.n < 2 or args.queries < 1 or args.d < 1:
        p.error("--n >= 2, --queries >= 1 and --d >= 1 are needed")
    chosen = [c for c in CASES if args.methods is None or c[0] in args.methods]
    rows, graphs = [], {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for label, name, given in chosen:
        rows.append(run_case(label, name, given, args.n, args.d, args.queries, args.repeat,
                             not (args.quick or args.all_at_n), graphs))
        r = rows[-1]
        print(f"{label}: N = {r['n']}, plain {r['plain_ms']:.3g} ms / query, barrier {r['barrier_ms']:.3g}, "
              f"ratio {r['plain_vs_barrier']:.2f}", flush=True)
        write_csv(out / "bench_top_k.csv", rows, COLUMNS)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
