"""The README's recipe at a million items, every route, on one 2-core machine.

    python -m experiments.bench_million [--n 1000000] [--d 64] [--k 20] [--queries 100]
        [--scipy-queries 10] [--truncate 1000] [--fsr-rank 100] [--out results/million] [--quick]

Synthetic descriptors clustered on short curves (``experiments.common.clustered_database``,
n / 100 centres, unit norm, as ``bench_diffusion``), queries from the same
distribution. Steps, each timed with its peak resident memory:

1. graph: ``knn_graph(method=--graph-method, mutual=True, gamma=3)`` with its
   progress bar; its mutual-edge recall against the exact mutual kNN graph on 1,000
   sampled nodes (exact lists of the sampled nodes and of their exact neighbours);
   saved with ``save_graph`` (temp + rename) and reopened with ``load_graph(mmap=True)``;
2. the queries' y: their 10 nearest database items, similarity^3 (``query_vectors``);
3. routes, each solving (I - alpha W) x = y, alpha = 0.99:
   * converged CG (tol 1e-6), all queries at once: the reference ranking;
   * the same in the locality layout ``normalize(A)`` attaches at this size (``with_locality``
     on the same W), the default route: ``diffuse`` iterates in it and answers in the
     database's order; also timed whole (the layout, then a first call with compilation);
   * the scipy cg loop on the same float32 CSR (rtol = tol), --scipy-queries queries: the
     baseline of the speed-ups (like for like); beside it, labelled, the same loop on the
     float64 CSR (each loop run --repeat times, a pause after each);
   * CG stopped at 20 steps (Iscen et al.'s setting);
   * truncated diffusion on each query's --truncate nearest items (CG to tol there);
   * offline diffusion (Yang et al. 2019, ``score="direct"``): the rows of the items the
     queries attach to are computed (``offline_rows(items=)``), their per-item time
     extrapolated to the whole collection (stated as such), then the online scores;
   * FSR.approx on ``graph_eigenpairs(W, --fsr-rank)``, the global top eigenpairs, and on
     ``component_eigenpairs(W, --fsr-rank)``, every component's own (skipped with --fsr-rank 0);
4. agreement with the converged ranking: mean top-100 overlap; quality: mAP of each
   route against the cluster labels (positives = the query's cluster, rankings cut at
   1,000 with ``n_db = n``);
5. the Revisited protocol on the million (``revisited_map`` with ``n_db = n``): per
   query, easy = the closer half of its cluster, hard = the farther half, no junk;
   time and peak memory of the evaluation.

Routes are timed one at a time (a warm-up call, then --repeat calls, a pause after each
route and each scipy loop, as ``experiments.common`` times them): ``seconds`` is the median,
``seconds_min`` / ``seconds_max`` the spread. Writes ``million.csv`` (one row per step /
route) and ``config.json`` under --out.
--quick: n = 20,000, 20 queries, T = 200, r = 20 (the test).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import jax
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from retrieval_jax._progress import progress
from retrieval_jax.diffusion import diffuse, offline_rows, query_vectors, top_n, truncated_diffuse
from retrieval_jax.evaluation import revisited_map
from retrieval_jax.graph import component_blocks, knn, knn_graph, load_graph, normalize, save_graph, with_locality
from retrieval_jax.spectral import (component_eigenpairs, fast_spectral_ranking_sparse, graph_eigenpairs,
                                    regularized_laplacian_filter, spectral_embedding)

from experiments.common import (clustered_database, pause, peak_rss_mb, process_peak_rss_mb, query_label_map,
                                reset_peak_rss, timed_runs_with_peak, timed_with_peak, top_overlap, versions, write_csv,
                                write_json)

COLUMNS = ("step", "n", "queries", "seconds", "seconds_min", "seconds_max", "ms_per_query", "peak_rss_mb",
           "top100_overlap", "mAP", "speedup_vs_scipy", "note")
ALPHA, TOL, QUERY_K, TOP = 0.99, 1e-6, 10, 1000
LAYOUT_ROUTE = "converged CG (tol 1e-6), the default locality layout"


def sampled_edge_recall(graph, x, k: int, sample: int = 1000, seed: int = 0) -> float:
    """Fraction of the exact mutual kNN graph's edges at ``sample`` random nodes that
    ``graph`` holds: exact lists of the sampled nodes and of their exact neighbours."""
    n = x.shape[0]
    nodes = np.random.default_rng(seed).choice(n, min(sample, n), replace=False)

    def exact_lists(ids):
        _, idx = knn(x[ids], x, k + 1, show_progress=False)
        idx = np.asarray(idx)
        keep = idx != np.asarray(ids)[:, None]  # drop the node itself
        return np.stack([row[m][:k] for row, m in zip(idx, keep)])

    own = exact_lists(nodes)
    neigh = np.unique(own)
    lists = dict(zip(neigh.tolist(), exact_lists(neigh)))
    indices, weights = np.asarray(graph.indices), np.asarray(graph.weights)
    found = total = 0
    for i, row in zip(nodes, own):
        exact = {int(j) for j in row if i in lists[int(j)]}
        held = {int(j) for j, w in zip(indices[i], weights[i]) if w > 0 and j != i}
        found += len(exact & held)
        total += len(exact)
    return found / max(total, 1)


def warm_timed(fn, repeat: int):
    """One warm-up call (compilation), then ``repeat`` timed calls, then a pause:
    (output, (median seconds, peak MB, seconds of every call))."""
    jax.block_until_ready(fn())
    out, times, peak = timed_runs_with_peak(fn, repeat)
    pause(2.0)
    return out, (float(np.median(times)), peak, times)


def synthetic_gnd(q, db, q_labels, db_labels):
    """Per query: easy = the closer half of its cluster (by similarity), hard = the rest."""
    gnd = []
    for i, c in enumerate(q_labels):
        members = np.flatnonzero(db_labels == c)
        sims = db[members] @ q[i]
        order = members[np.argsort(-sims, kind="stable")]
        half = max(1, order.size // 2)
        gnd.append({"easy": order[:half], "hard": order[half:], "junk": np.zeros(0, np.int64)})
    return gnd


class Bench:
    """The rows of one run and what every route is compared with (the converged scores,
    the scipy loop's seconds per query, the labels)."""

    def __init__(self, n, nq, repeat, db_labels, q_labels, log):
        self.n, self.nq, self.repeat, self.log = n, nq, repeat, log
        self.db_labels, self.q_labels = db_labels, q_labels
        self.rows, self.reference, self.scipy_s = [], None, float("nan")

    def add(self, step, seconds=float("nan"), peak=float("nan"), per_query=True, **extra):
        row = {"step": step, "n": self.n, "queries": self.nq, "seconds": seconds, "peak_rss_mb": peak,
               "ms_per_query": 1e3 * seconds / self.nq if per_query else float("nan"), **extra}
        self.rows.append(row)
        self.log(f"  {step:<48s} {seconds:9.2f} s  peak {peak:7.0f} MB  " +
                 "  ".join(f"{key} {val}" for key, val in extra.items()), flush=True)
        return row

    def scored(self, name, scores, seconds, peak, note="", times=None):
        """A row for a route's [nq, n] scores: agreement with the reference, mAP, speed-up
        (median seconds; ``times``, every call's, give the min-max)."""
        s = np.asarray(scores)
        times = [seconds] if times is None else times
        return self.add(name, seconds, peak, seconds_min=min(times), seconds_max=max(times),
                        top100_overlap=round(float(top_overlap(s, self.reference).mean()), 4),
                        mAP=round(query_label_map(s, self.q_labels, self.db_labels, top=TOP), 2),
                        speedup_vs_scipy=round(self.scipy_s * self.nq / seconds, 2), note=note)

    def route(self, name, fn, note=""):
        scores, (seconds, peak, times) = warm_timed(fn, self.repeat)
        return self.scored(name, scores, seconds, peak, note, times)


def graph_step(bench: Bench, db, k: int, graph_method: str, out: Path):
    """Build, check, save and reload the graph; the normalised W."""
    graph, (t_graph, p_graph) = timed_with_peak(
        lambda: knn_graph(db, k, gamma=3.0, mutual=True, method=graph_method, show_progress=True))
    recall = sampled_edge_recall(graph, db, k)
    bench.add(f"graph ({graph_method}, mutual, k = {k})", t_graph, p_graph, per_query=False,
              note=f"mutual-edge recall {recall:.4f} (1,000 sampled nodes); width {graph.max_degree}")
    path = out / "graph.npz"
    t = time.perf_counter()
    save_graph(path, graph, k=k, gamma=3.0, mutual=True)
    t_save = time.perf_counter() - t
    (graph, _), (t_load, p_load) = timed_with_peak(lambda: load_graph(path, num_nodes=db.shape[0], mmap=True))
    bench.add("graph saved (temp + rename), reopened memory-mapped", t_save + t_load, p_load, per_query=False,
              note=f"{path.stat().st_size / 2**20:.0f} MB file; save {t_save:.1f} s, checked reopen {t_load:.1f} s")
    w = normalize(graph, locality=False)  # the database's order; the ordered route renumbers it itself
    del graph
    path.unlink()  # hundreds of MB: the CSV keeps what was measured
    return w


def scipy_cg_seconds(mat, y, desc: str, repeat: int):
    """The loop a researcher writes, ``scipy.sparse.linalg.cg`` once per query on the CSR
    ``mat`` (y cast to its dtype), ``repeat`` times, a pause after each: (solutions, median
    seconds per query, peak MB, seconds per query of every loop)."""
    yq = np.asarray(y, mat.dtype)
    reset_peak_rss()
    times = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        x = np.stack([sla.cg(mat, b, rtol=TOL, maxiter=2000)[0] for b in progress(yq, desc=desc, total=len(yq))])
        times.append((time.perf_counter() - t) / len(yq))
        pause(2.0)  # BLAS threads spinning after scipy would slow the next route
    return x, float(np.median(times)), peak_rss_mb(), times


def converged_step(bench: Bench, w, y, scipy_queries: int):
    """The reference (batched CG to tol) and the scipy cg loop on the same float32 CSR (and,
    labelled, on the float64 CSR)."""
    conv, (t_conv, p_conv, ts_conv) = warm_timed(lambda: diffuse(w, y, alpha=ALPHA, tol=TOL, max_iter=2000),
                                                 bench.repeat)
    bench.reference = np.asarray(conv)
    w_csr = w.to_scipy()   # float32: the weights the JAX routes use
    mat32 = (sp.identity(bench.n, format="csr", dtype=np.float32) - np.float32(ALPHA) * w_csr).tocsr()
    ref, bench.scipy_s, p_scipy, ts32 = scipy_cg_seconds(mat32, y[:scipy_queries], "scipy cg loop (float32)",
                                                         bench.repeat)
    scipy_row = bench.add("scipy cg loop (CSR float32, tol 1e-6)", bench.scipy_s * bench.nq, p_scipy,
                          seconds_min=min(ts32) * bench.nq, seconds_max=max(ts32) * bench.nq,
                          top100_overlap=round(float(top_overlap(ref, bench.reference[:scipy_queries]).mean()), 4),
                          note=f"timed on {scipy_queries} queries; the baseline of speedup_vs_scipy")
    mat64 = (sp.identity(bench.n, format="csr") - ALPHA * w_csr.astype(np.float64)).tocsr()
    ref64, t64, p64, ts64 = scipy_cg_seconds(mat64, y[:scipy_queries], "scipy cg loop (float64)", bench.repeat)
    bench.add("scipy cg loop (CSR float64, tol 1e-6)", t64 * bench.nq, p64,
              seconds_min=min(ts64) * bench.nq, seconds_max=max(ts64) * bench.nq,
              top100_overlap=round(float(top_overlap(ref64, bench.reference[:scipy_queries]).mean()), 4),
              speedup_vs_scipy=round(bench.scipy_s / t64, 2),
              note=f"timed on {scipy_queries} queries; float64 costs {t64 / bench.scipy_s:.2f}x the float32 loop")
    conv_row = bench.scored("converged CG (tol 1e-6), batched", bench.reference, t_conv, p_conv, times=ts_conv)
    # the default route: the layout normalize(A) attaches at this size, the scores answered
    # in the database's order by diffuse itself; timed whole (layout, then a first call with
    # its compilation) as well as warm
    t = time.perf_counter()
    w_default = with_locality(w)
    t_layout = time.perf_counter() - t
    jax.clear_caches()
    t = time.perf_counter()
    jax.block_until_ready(diffuse(w_default, y, alpha=ALPHA, tol=TOL, max_iter=2000))
    t_first = time.perf_counter() - t
    whole = t_layout + t_first
    bench.route(LAYOUT_ROUTE, lambda: diffuse(w_default, y, alpha=ALPHA, tol=TOL, max_iter=2000),
                note=f"layout {t_layout:.1f} s once (with_locality, what normalize(A) attaches), not included; "
                     f"whole (layout + first call with compilation) {whole:.1f} s = "
                     f"{1e3 * whole / bench.nq:.0f} ms/query, {bench.scipy_s * bench.nq / whole:.2f}x")
    bench.route("CG, 20 steps", lambda: diffuse(w, y, alpha=ALPHA, tol=1e-12, max_iter=20))
    return scipy_row, conv_row


def shortlist_steps(bench: Bench, w, y, q, db, sims, ids, truncate: int):
    """Truncated diffusion on each query's shortlist, and offline diffusion (direct scores)."""
    n, nq = bench.n, bench.nq
    _, short = knn(q, db, truncate, show_progress=False)
    short_np = np.asarray(short)

    def on_shortlist(s):  # [nq, T] scores on each query's shortlist -> [nq, n]
        dense = np.zeros((nq, n), np.float32)
        np.put_along_axis(dense, short_np, np.asarray(s), axis=1)
        return dense
    # how much of each query's class the shortlist can reach at all (a bound on its mAP)
    reach = np.mean([np.isin(np.flatnonzero(bench.db_labels == c), row).mean()
                     for c, row in zip(bench.q_labels, short_np)])
    bench.route(f"truncated diffusion, T = {truncate} (CG to tol)",
                lambda: on_shortlist(truncated_diffuse(w, y, short, alpha=ALPHA, tol=TOL, max_iter=200)),
                note=f"shortlist search not included; the shortlists hold {100 * reach:.1f}% of the queries' clusters")

    items = np.unique(np.asarray(ids))
    rows_off, (t_off, p_off, _) = warm_timed(
        lambda: offline_rows(w, db, truncate, alpha=ALPHA, tol=TOL, max_iter=20, items=items, show_progress=True), 1)
    position = {int(i): r for r, i in enumerate(items)}
    weights = np.maximum(np.asarray(sims), 0) ** 3
    r_ids, r_vals = np.asarray(rows_off.indices), np.asarray(rows_off.values)

    def offline_online():  # the query's result: the similarity-weighted sum of its kNN's rows
        scores = np.zeros((nq, n), np.float32)
        for qi in range(nq):
            for j, wt in zip(np.asarray(ids[qi]), weights[qi]):
                r = position[int(j)]
                np.add.at(scores[qi], r_ids[r], wt * r_vals[r])
        return scores
    per_item = t_off / items.size
    bench.add(f"offline diffusion rows (T = {truncate}), {items.size} items", t_off, p_off, per_query=False,
              note=f"{1e3 * per_item:.2f} ms per item: the whole collection would take "
                   f"{per_item * n / 3600:.1f} h (extrapolated)")
    bench.route("offline diffusion, online direct scores", offline_online, note="offline rows not included")


def fsr_step(bench: Bench, w, sims, ids, fsr_rank: int):
    """FSR.approx on the global top eigenpairs, then on every component's own (`per_component`)."""
    h = regularized_laplacian_filter(ALPHA)
    pairs, (t_eig, p_eig) = timed_with_peak(lambda: graph_eigenpairs(w, fsr_rank))
    top_vals = np.asarray(pairs.values)
    bench.add(f"graph_eigenpairs(W, {fsr_rank})", t_eig, p_eig, per_query=False,
              note=f"eigenvalues {top_vals.min():.4f} to {top_vals.max():.4f}; "
                   f"{int((top_vals > 1 - 1e-5).sum())} equal to 1")
    emb = spectral_embedding(pairs, fsr_rank, h, mode="approx")
    bench.route(f"FSR.approx, r = {fsr_rank}", lambda: fast_spectral_ranking_sparse(emb, sims, ids, gamma=3.0),
                note="eigenpairs not included")
    del pairs, emb
    comp, (t_comp, p_comp) = timed_with_peak(lambda: component_eigenpairs(w, fsr_rank))
    sizes = component_blocks(w).sizes()
    bench.add(f"component_eigenpairs(W, {fsr_rank})", t_comp, p_comp, per_query=False,
              note=f"{sizes.size} components (largest {sizes.max()}, {int((sizes <= fsr_rank).sum())} solved whole); "
                   f"{comp.nbytes / 2**20:.0f} MB")
    emb = spectral_embedding(comp, fsr_rank, h, mode="approx")
    bench.route(f"FSR.approx per component, r = {fsr_rank}",
                lambda: fast_spectral_ranking_sparse(emb, sims, ids, gamma=3.0), note="eigenpairs not included")


def revisited_step(bench: Bench, q, db):
    gnd = synthetic_gnd(q, db, bench.q_labels, bench.db_labels)
    reset_peak_rss()
    t = time.perf_counter()
    res = revisited_map(np.asarray(top_n(bench.reference, TOP)[1]), gnd, n_db=bench.n)
    bench.add("revisited_map on the converged top-1000 (n_db = n)", time.perf_counter() - t, peak_rss_mb(),
              per_query=False, note=f"mAP E/M/H {100 * res.easy.map:.2f} / {100 * res.medium.map:.2f} / "
                                    f"{100 * res.hard.map:.2f}")


def run(n, d, k, nq, scipy_queries, truncate, fsr_rank, out, graph_method, repeat, log=print):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    db, q, db_labels, q_labels = clustered_database(n, nq, d)
    bench = Bench(n, nq, repeat, db_labels, q_labels, log)
    log(f"n = {n}, d = {d}, k = {k}, {nq} queries, {max(10, n // 100)} clusters", flush=True)
    w = graph_step(bench, db, k, graph_method, out)
    sims, ids = knn(q, db, QUERY_K, show_progress=False)
    y = query_vectors(sims, ids, n)
    scipy_row, conv_row = converged_step(bench, w, y, scipy_queries)
    shortlist_steps(bench, w, y, q, db, sims, ids, truncate)
    if fsr_rank:
        fsr_step(bench, w, sims, ids, fsr_rank)
    revisited_step(bench, q, db)
    write_csv(out / "million.csv", bench.rows, COLUMNS, float_format="{:.4g}")
    write_json(out / "config.json", {"command": sys.argv, "n": n, "d": d, "k": k, "queries": nq,
                                     "scipy_queries": scipy_queries, "truncate": truncate, "fsr_rank": fsr_rank,
                                     "graph_method": graph_method, "alpha": ALPHA, "tol": TOL,
                                     "process_peak_rss_mb": process_peak_rss_mb(), "versions": versions()})
    log(f"converged CG: {conv_row['speedup_vs_scipy']}x the scipy cg loop on the same float32 CSR "
        f"({conv_row['ms_per_query']:.0f} vs {scipy_row['ms_per_query']:.0f} ms/query); "
        f"process peak {process_peak_rss_mb():.0f} MB; wrote {out / 'million.csv'}")
    return bench.rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--scipy-queries", type=int, default=10)
    p.add_argument("--truncate", type=int, default=1000)
    p.add_argument("--fsr-rank", type=int, default=100, help="0 skips FSR")
    p.add_argument("--graph-method", default="nndescent", choices=("exact", "nndescent", "faiss"))
    p.add_argument("--repeat", type=int, default=2, help="timed calls per route (median)")
    p.add_argument("--out", default="results/million")
    p.add_argument("--quick", action="store_true", help="n = 20,000, 20 queries, T = 200, r = 20")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.scipy_queries, args.truncate, args.fsr_rank, args.repeat = 20000, 20, 5, 200, 20, 1
    run(args.n, args.d, args.k, args.queries, min(args.scipy_queries, args.queries), args.truncate,
        args.fsr_rank, args.out, args.graph_method, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
