"""Fast Spectral Ranking benchmark (Iscen et al., CVPR 2018): issue 3.

    python -m experiments.spectral_benchmark [--quick] [--sizes 5000,20000,50000]
        [--ranks 10,25,...] [--out experiments/results/spectral]

Four parts, each measured in one process (routes interleaved, medians reported):

1. Accuracy vs rank (``map_vs_rank.csv``, ``map_vs_rank_<dataset>.png``). COIL-20
   (k = 5, the graph of ../shared/benchmarks/PEERS.md) and MPEG-7 (k = 15), 32x32
   pixels, mutual kNN graph, gamma = 3, W = D^-1/2 A D^-1/2, alpha = 0.99. Every
   item is a query with y = its indicator. Routes: plain kNN (cosine), the exact
   diffusion (scipy ``splu`` of I - alpha W), batched CG diffusion to tolerance
   (``retrieval_jax.diffusion.diffuse``, tol 1e-6), FSR.rank-r / FSR.approx for
   every r (the eigenpairs are computed once at the largest r and truncated), and
   FSR.approx on every connected component's own top r eigenpairs
   (``spectral_embedding(per_component=True)``).
   COIL-20: label mAP, the query excluded from its ranking. MPEG-7: label mAP (same
   rule) and the bull's-eye score (top 40 of the method's own full ranking, the
   query included wherever the method ranks it).
2. Online seconds per query (``online.csv``, ``online.png``): at the smallest r of
   the sweep where FSR's mAP is within 1 point of CG's, FSR against batched CG on
   the same queries (all items) in the same run, interleaved, median of --repeat.
   Two FSR routes: ``fast_spectral_ranking_sparse`` (y has one non-zero, so U^T y
   is one row of U: the way FSR is meant to run online) and the dense
   ``fast_spectral_ranking`` (y as an [nq, n] matrix). The mAP of each timed output
   is recomputed, so the speed is reported at the mAP actually obtained.
   End to end (``end_to_end.csv``): the same queries with every route's offline
   work included, against the fastest scipy routes of PEERS.md (``splu``, and FSR on
   ARPACK ``eigsh``): JAX's exact inverse per connected component, FSR.approx on
   ``graph_eigenpairs``, batched CG to tolerance; mAP of each output.
3. Offline seconds (``offline.csv``, ``offline.png``): ``graph_eigenpairs``
   (thick-restart Lanczos, float32, jitted) against ``scipy.sparse.linalg.eigsh``
   (ARPACK, float64, which="LA") for the same r, on synthetic clustered descriptors
   (``common.clustered``: d = 64, n / 100 curved clusters) with a k = 50
   mutual graph. Lanczos is timed on its first call (compilation included) and,
   where n <= --warm-max, again with another start key (warm). Accuracy: the max
   relative eigenvalue error against eigsh, the max residual |W u - l u| and the
   orthogonality error of the Lanczos vectors.
4. Frequency response (``frequency.csv``, ``frequency_response.png``): the whole
   spectrum of W on COIL-20 (dense eigh), the transfer function h(lambda) of the
   regularised Laplacian (alpha) and of the heat kernel (t), and for one query the
   energy |u_i^T y|^2 per eigenvalue before and after filtering
   (h(lambda_i)^2 |u_i^T y|^2): diffusion keeps the low graph frequencies
   (lambda near 1) and removes the rest, i.e. it is a low-pass filter.

--quick (used by tests/experiments/test_spectral_experiment.py) runs every part small: ranks
up to 200, one offline size n = 2000 at r = 50, two timing repeats.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from scipy.sparse.csgraph import connected_components

from retrieval_jax.diffusion import diffuse, diffusion_inverse, indicator_vectors, ranking_from_scores
from retrieval_jax.evaluation import bullseye_score, label_map
from retrieval_jax.graph import knn_graph, normalize
from retrieval_jax.spectral import (fast_spectral_ranking, fast_spectral_ranking_sparse,
                                    graph_eigenpairs, heat_kernel_filter,
                                    regularized_laplacian_filter, spectral_embedding)

from experiments.common import RESULTS, SCORE_RTOL, clustered, label_axes, pyplot, save_figure, timed, write_csv

DATASETS = {"coil20": 5, "mpeg7": 15}  # name -> graph k
FULL = dict(ranks="10,25,50,75,100,150,200,300,400", sizes="5000,20000,50000",
            timing_ranks="100,200,300", large_rank=300, repeat=5, warm_max=20000)
QUICK = dict(ranks="25,100", sizes="2000", timing_ranks="50", large_rank=50, repeat=2,
             warm_max=2000)
CG_TOL, CG_MAX_ITER = 1e-6, 5000


# --------------------------------------------------------------------------- helpers
_ROUTE_LABELS = {"exact": "exact diffusion (splu)", "cg": "CG diffusion (tol 1e-6)", "knn": "plain kNN"}


def load(name: str):
    from retrieval_jax.data import load_coil20, load_mpeg7
    data = {"coil20": load_coil20, "mpeg7": load_mpeg7}[name](size=32)
    return data.X, data.labels


def scores_metrics(scores, labels, bullseye: bool) -> dict:
    """label mAP (query excluded) and, for MPEG-7, the bull's-eye score, in percent."""
    s = np.asarray(scores, np.float64)
    n = s.shape[0]
    out = {"map": 100 * label_map(ranking_from_scores(s, exclude=np.arange(n), rtol=SCORE_RTOL), labels)}
    out["bullseye"] = (100 * bullseye_score(ranking_from_scores(s, rtol=SCORE_RTOL), labels) if bullseye
                       else float("nan"))
    return out


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(v, v)


def _fsr_items(emb, n: int):
    """Online FSR for in-graph queries, sparse route: y = e_q, so U^T y = U[q]."""
    ids = jnp.arange(n, dtype=jnp.int32)[:, None]
    return lambda: fast_spectral_ranking_sparse(emb, jnp.ones((n, 1), jnp.float32), ids, gamma=1.0)


# --------------------------------------------------------------------------- part 1 + 2
def map_experiment(name: str, k: int, alpha: float, ranks, repeat: int, map_rows: list,
                   online_rows: list, end_rows: list):
    X, labels = load(name)
    n = X.shape[0]
    bull = name == "mpeg7"
    graph = normalize(knn_graph(X, k, gamma=3.0, mutual=True))
    W = graph.to_scipy().astype(np.float64)
    ncomp = connected_components(W, directed=False)[0]
    base = dict(dataset=name, n=n, k=k, alpha=alpha)

    def add(method, r, metrics, seconds=float("nan"), note=""):
        map_rows.append({**base, "method": method, "r": r, "map": metrics["map"],
                         "bullseye": metrics["bullseye"], "seconds": seconds, "note": note})

    add("knn", 0, scores_metrics(X @ X.T, labels, bull))
    t = time.perf_counter()
    exact = (1 - alpha) * sla.splu((sp.identity(n) - alpha * W).tocsc()).solve(np.eye(n))
    add("exact", n, scores_metrics(exact.T, labels, bull), time.perf_counter() - t, "scipy splu, all queries")
    Y = indicator_vectors(np.arange(n), n)
    cg_fn = lambda: diffuse(graph, Y, alpha=alpha, tol=CG_TOL, max_iter=CG_MAX_ITER,  # noqa: E731
                            return_info=True)
    (cg_scores, info), t_cg = timed(cg_fn)
    cg = scores_metrics(cg_scores, labels, bull)
    add("cg", 0, cg, t_cg, f"tol {CG_TOL:g}, steps max {int(np.max(info.iterations))} (first call)")

    h = regularized_laplacian_filter(alpha)
    r_max = min(max(ranks), n - 1)
    ranks = sorted({min(r, r_max) for r in ranks})
    pairs, t_eig = timed(lambda: graph_eigenpairs(graph, r_max))
    fsr = {}
    for r in ranks:
        for mode in ("rank_r", "approx"):
            emb = spectral_embedding(pairs, r, h, mode=mode)
            scores, dt = timed(_fsr_items(emb, n))
            m = scores_metrics(scores, labels, bull)
            fsr[mode, r] = m["map"]
            add(f"fsr_{mode}", r, m, dt)
        # every connected component's own top r eigenpairs (`component_eigenpairs`)
        emb = spectral_embedding(graph, r, h, mode="approx", per_component=True)
        scores, dt = timed(_fsr_items(emb, n))
        add("fsr_approx_per_component", r, scores_metrics(scores, labels, bull), dt)
    print(f"\n{name}: n = {n}, k = {k}, {ncomp} components; eigenpairs r = {r_max} in {t_eig:.1f}s "
          f"(compilation included); CG steps max {int(np.max(info.iterations))}", flush=True)
    print(f"| {'method':<12} | {'r':>4} | {'mAP':>6} | {'bull':>6} |")
    for row in map_rows:
        if row["dataset"] == name:
            print(f"| {row['method']:<12} | {row['r']:>4} | {row['map']:6.2f} | {row['bullseye']:6.2f} |")

    # ---- part 2: online seconds per query at the smallest r within 1 point of CG
    for mode in ("approx", "rank_r"):
        ok = [r for r in ranks if fsr[mode, r] >= cg["map"] - 1.0]
        note = "" if ok else f"no r <= {r_max} within 1 point of CG: timed at r = {r_max}"
        r_star = ok[0] if ok else r_max
        emb = spectral_embedding(pairs, r_star, h, mode=mode)
        routes = {
            "cg_batched": cg_fn,
            f"fsr_{mode}_sparse_y": _fsr_items(emb, n),
            f"fsr_{mode}_dense_y": lambda emb=emb: fast_spectral_ranking(emb, Y),
        }
        times = {key: [] for key in routes}
        outs = {}
        for key, fn in routes.items():  # warm-up (compilation)
            jax.block_until_ready(fn())
        for _ in range(repeat):  # interleaved
            for key, fn in routes.items():
                outs[key], dt = timed(fn)
                times[key].append(dt)
        t_cg_med = float(np.median(times["cg_batched"]))
        for key in routes:
            scores = outs[key][0] if key == "cg_batched" else outs[key]
            m = scores_metrics(scores, labels, bull)
            med = float(np.median(times[key]))
            online_rows.append({**base, "mode": mode, "r": r_star, "route": key, "map": m["map"],
                                "bullseye": m["bullseye"], "cg_map": cg["map"],
                                "queries": n, "repeats": repeat,
                                "seconds_total_median": med, "ms_per_query": 1e3 * med / n,
                                "speedup_vs_cg": t_cg_med / med,
                                "cg_steps_max": int(np.max(outs["cg_batched"][1].iterations)),
                                "note": note})
    r_approx = next(row["r"] for row in online_rows
                    if row["dataset"] == name and row["mode"] == "approx" and row["route"] != "cg_batched")
    end_to_end_experiment(name, graph, W, labels, bull, alpha, r_approx, repeat, cg["map"], end_rows)
    print(f"online ({name}, {n} queries, median of {repeat}, interleaved):")
    for row in online_rows:
        if row["dataset"] == name:
            print(f"  {row['route']:<22} r={row['r']:>4} {row['ms_per_query']:9.4f} ms/query "
                  f"x{row['speedup_vs_cg']:8.1f} vs CG  mAP {row['map']:.2f} (CG {row['cg_map']:.2f}) {row['note']}",
                  flush=True)
    return graph, pairs


# --------------------------------------------------------------------------- part 2b
def end_to_end_experiment(name, graph, W, labels, bull: bool, alpha: float, r: int, repeat: int,
                          cg_map: float, rows: list):
    """Every route with its offline work included, all items as queries (the PEERS.md block).

    scipy: ``splu`` of I - alpha W then one solve pair per query (the exact solution), and
    FSR.approx on ARPACK ``eigsh`` eigenpairs (r largest, float64) in numpy. JAX: the
    exact inverse per connected component (``diffusion_inverse``), FSR.approx on
    ``graph_eigenpairs`` + the sparse online route, and batched CG to tolerance.
    Same r for both FSR routes (the smallest within 1 point of CG). JAX is timed warm
    (its compilation happens in the warm-up call); median of ``max(repeat, 3)`` runs.
    """
    n = W.shape[0]
    ids = np.arange(n)
    h = regularized_laplacian_filter(alpha)
    m = (sp.identity(n) - alpha * W).tocsc()

    def scipy_splu():
        lu = sla.splu(m)
        return np.stack([lu.solve(e) for e in np.eye(n)])

    def scipy_fsr():
        lam, u = sla.eigsh(W, k=r, which="LA", v0=np.ones(n))
        f = (1 - alpha) / (1 - alpha * lam) - (1 - alpha)
        return (u * f) @ u.T + (1 - alpha) * np.eye(n)  # x = U (h(L) - h(0)) U^T y + h(0) y, y = e_q

    inv_rows = jax.jit(lambda inv: inv.rows(jnp.arange(n)))

    def jax_inverse():
        return inv_rows(diffusion_inverse(graph, alpha))

    def jax_fsr():
        emb = spectral_embedding(graph_eigenpairs(graph, r), r, h, mode="approx")
        return fast_spectral_ranking_sparse(emb, jnp.ones((n, 1), jnp.float32),
                                            jnp.asarray(ids, jnp.int32)[:, None], gamma=1.0)

    def jax_cg():
        return diffuse(graph, indicator_vectors(ids, n), alpha=alpha, tol=CG_TOL, max_iter=CG_MAX_ITER)

    routes = {"scipy splu (exact)": scipy_splu, f"scipy eigsh + FSR.approx r={r}": scipy_fsr,
              "jax diffusion_inverse per component (exact)": jax_inverse,
              f"jax graph_eigenpairs + FSR.approx r={r}": jax_fsr,
              "jax batched CG to tol": jax_cg}
    # one route at a time, warm-up first: interleaving would time each route just after
    # another one's BLAS threads, which keep spinning for a while and steal the cores
    times = {key: [] for key in routes}
    outs = {}
    for key, fn in routes.items():
        outs[key] = jax.block_until_ready(fn())
        for _ in range(max(repeat, 3)):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[key].append(time.perf_counter() - t)
    base = float(np.median(times["scipy splu (exact)"]))
    print(f"end to end ({name}, {n} queries, offline included, median of {max(repeat, 3)}):")
    for key in routes:
        met = scores_metrics(np.asarray(outs[key]), labels, bull)
        med = float(np.median(times[key]))
        rows.append({"dataset": name, "n": n, "route": key, "r": r if "FSR" in key else "",
                     "map": met["map"], "bullseye": met["bullseye"], "cg_map": cg_map,
                     "seconds_total_median": med, "ms_per_query": 1e3 * med / n,
                     "speedup_vs_splu": base / med})
        print(f"  {key:<46} {1e3 * med / n:9.4f} ms/query  x{base / med:7.1f} vs splu  mAP {met['map']:.2f}",
              flush=True)


# --------------------------------------------------------------------------- part 3
def offline_experiment(n: int, ranks, k: int, warm_max: int, rows: list):
    x, _ = clustered(n, 64, max(10, n // 100), seed=n)
    graph, t_graph = timed(lambda: normalize(knn_graph(x, k, gamma=3.0, mutual=True)))
    W = graph.to_scipy().astype(np.float64)
    ncomp, comp = connected_components(W, directed=False)
    print(f"\noffline: n = {n}, k = {k}, nnz = {W.nnz}, {ncomp} components, "
          f"{int((np.bincount(comp) == 1).sum())} isolated, graph {t_graph:.1f}s", flush=True)
    for r in ranks:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p, first = timed(lambda: graph_eigenpairs(graph, r))
        conv = not any("did not reach" in str(w.message) for w in caught)

        def eigsh():
            return np.sort(sla.eigsh(W, k=r, which="LA", v0=np.ones(n))[0])[::-1]
        ref, t_eigsh = timed(eigsh)
        eigsh_s, warm_s = [t_eigsh], []
        if n <= warm_max:  # interleaved: lanczos (another start key), eigsh, lanczos, eigsh
            for rep in range(2):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    warm_s.append(timed(lambda: graph_eigenpairs(graph, r, key=jax.random.key(rep + 1)))[1])
                eigsh_s.append(timed(eigsh)[1])
        warm = float(np.median(warm_s)) if warm_s else float("nan")
        t_eigsh = float(np.median(eigsh_s))
        vals = np.asarray(p.values, np.float64)
        U = np.asarray(p.vectors, np.float64)
        rel = float(np.max(np.abs(vals - ref) / np.abs(ref)))
        res = float(np.linalg.norm(W @ U - U * vals, axis=0).max())
        orth = float(np.abs(U.T @ U - np.eye(r)).max())
        best = warm if warm_s else first
        rows.append(dict(n=n, k=k, r=r, components=ncomp, lanczos_first_s=first, lanczos_warm_s=warm,
                         eigsh_s=t_eigsh, eigsh_runs=" ".join(f"{t:.2f}" for t in eigsh_s),
                         lanczos_warm_runs=" ".join(f"{t:.2f}" for t in warm_s), ratio_first_vs_eigsh=first / t_eigsh,
                         ratio_warm_vs_eigsh=warm / t_eigsh, max_rel_eig_err=rel, max_residual=res,
                         max_orth_err=orth, lanczos_converged=conv, lambda_r=float(ref[-1])))
        print(f"  r={r:4d} lanczos {first:7.2f}s (1st, incl. compile) {warm:7.2f}s (warm, median)  "
              f"eigsh {t_eigsh:7.2f}s (median)"
              f"  lanczos/eigsh {best / t_eigsh:5.2f}  rel.err {rel:.1e} residual {res:.1e} orth {orth:.1e}"
              f"{'' if conv else '  NOT CONVERGED'}", flush=True)


# --------------------------------------------------------------------------- part 4
def frequency_experiment(graph, alpha: float, t_heat: float, query: int, rows: list):
    W = graph.to_dense().astype(np.float64)
    W = 0.5 * (W + W.T)
    ncomp, comp = connected_components(W, directed=False)
    if query < 0:  # default: the first item of the largest connected component
        query = int(np.flatnonzero(comp == np.argmax(np.bincount(comp)))[0])
    lam, U = np.linalg.eigh(W)
    lam, U = lam[::-1], U[:, ::-1]
    energy = U[query] ** 2  # |u_i^T e_q|^2, sums to 1
    filters = {"regularized_laplacian": regularized_laplacian_filter(alpha), "heat_kernel": heat_kernel_filter(t_heat)}
    h = {name: np.asarray(f(jnp.asarray(lam, jnp.float32)), np.float64) for name, f in filters.items()}
    for i in range(lam.size):
        row = dict(i=i, eigenvalue=lam[i], energy_y=energy[i])
        for name in filters:
            row[f"h_{name}"] = h[name][i]
            row[f"energy_{name}"] = h[name][i] ** 2 * energy[i]
        rows.append(row)
    print(f"\nfrequency response (COIL-20, query {query}): energy fraction at lambda >= 0.9 "
          f"(low graph frequencies):", flush=True)
    summary = {"y": float(energy[lam >= 0.9].sum() / energy.sum())}
    for name in filters:
        e = h[name] ** 2 * energy
        summary[name] = float(e[lam >= 0.9].sum() / e.sum())
    print("  " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary.items()), flush=True)
    return lam, energy, h, summary, query, int((comp == comp[query]).sum())


# --------------------------------------------------------------------------- plots
def plot_maps(out: Path, map_rows: list):
    plt = pyplot()
    paths = []
    for name in dict.fromkeys(r["dataset"] for r in map_rows):
        rows = [r for r in map_rows if r["dataset"] == name]
        metrics = [("map", "label mAP (%)")] + ([("bullseye", "bull's-eye (%)")] if name == "mpeg7" else [])
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
        for ax, (key, label) in zip(axes[0], metrics):
            for method, style in (("fsr_rank_r", "o-"), ("fsr_approx", "s--"), ("fsr_approx_per_component", "^-.")):
                sel = [r for r in rows if r["method"] == method]
                ax.plot([r["r"] for r in sel], [r[key] for r in sel], style, label=method.replace("_", " "))
            for method, ls, color in (("exact", "-", "k"), ("cg", "--", "tab:red"), ("knn", ":", "k")):
                val = next(r[key] for r in rows if r["method"] == method)
                ax.axhline(val, ls=ls, color=color, lw=1.2,
                           label=f"{_ROUTE_LABELS[method]} {val:.1f}")
            ax.set_xscale("log")
            ax.set_xlabel("rank r (eigenpairs kept)")
            ax.set_ylabel(label)
            head = rows[0]
            ax.set_title(f"{name} (n = {head['n']}, k = {head['k']}, alpha = {head['alpha']}): "
                         f"{label.split(' (')[0]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / f"map_vs_rank_{name}.png"
        save_figure(fig, path, dpi=110)
        paths.append(path)
    return paths


def plot_online(out: Path, rows: list):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    labels = [f"{r['dataset']} {r['route']} (r={r['r']})" if r["route"] != "cg_batched"
              else f"{r['dataset']} CG batched [{r['mode']} block]" for r in rows]
    vals = [r["ms_per_query"] for r in rows]
    ax.barh(labels, vals, color=["tab:red" if r["route"] == "cg_batched" else "tab:blue" for r in rows])
    for j, r in enumerate(rows):
        ax.text(r["ms_per_query"], j, f" {r['ms_per_query']:.3g} ms, x{r['speedup_vs_cg']:.0f}, mAP {r['map']:.1f}",
                va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("online ms per query (log; median, interleaved)")
    ax.invert_yaxis()
    ax.set_title("FSR vs batched CG at the smallest r within 1 mAP point of CG")
    fig.tight_layout()
    save_figure(fig, out / "online.png", dpi=110)


def plot_offline(out: Path, rows: list):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    n0 = rows[0]["n"]
    sel = [r for r in rows if r["n"] == n0]
    rs = [r["r"] for r in sel]
    ax.plot(rs, [r["lanczos_first_s"] for r in sel], "o:", label="lanczos, 1st call (incl. compile)")
    if any(np.isfinite(r["lanczos_warm_s"]) for r in sel):
        ax.plot(rs, [r["lanczos_warm_s"] for r in sel], "o-", label="lanczos, warm")
    ax.plot(rs, [r["eigsh_s"] for r in sel], "s-", label="scipy eigsh (ARPACK)")
    ax.set_xlabel("rank r")
    ax.set_ylabel("offline seconds")
    ax.set_title(f"eigenpairs vs r, n = {n0}, k = {sel[0]['k']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    r_big = rows[-1]["r"]
    sel = [r for r in rows if r["r"] == r_big]
    ns = [r["n"] for r in sel]
    ax.plot(ns, [r["lanczos_first_s"] for r in sel], "o:", label="lanczos, 1st call (incl. compile)")
    ax.plot(ns, [r["eigsh_s"] for r in sel], "s-", label="scipy eigsh (ARPACK)")
    for r in sel:
        ax.annotate(f"x{r['lanczos_first_s'] / r['eigsh_s']:.2f}", (r["n"], r["lanczos_first_s"]), fontsize=8)
    label_axes(ax, xscale="log", yscale="log", xlabel="n", ylabel="offline seconds",
               title=f"eigenpairs vs n, r = {r_big} (label: lanczos / eigsh)")
    fig.tight_layout()
    save_figure(fig, out / "offline.png", dpi=110)


def plot_frequency(out: Path, lam, energy, h, alpha, t_heat, query, comp_size):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    names = {"regularized_laplacian": f"regularised Laplacian, alpha = {alpha}",
             "heat_kernel": f"heat kernel, t = {t_heat}"}
    floor = 1e-16
    # y = e_q has no energy on the eigenvectors of the other connected components: not drawn
    on = energy > 1e-20
    for ax, (name, title) in zip(axes, names.items()):
        after = h[name] ** 2 * energy
        ax.scatter(lam[on], np.maximum(energy[on], floor), s=7, color="0.55", label="|u_i^T y|^2 (query y)")
        ax.scatter(lam[on], np.maximum(after[on], floor), s=7, color="tab:blue",
                   label="h(lambda_i)^2 |u_i^T y|^2 (filtered)")
        ax.set_yscale("log")
        ax.set_ylim(floor, 2)
        ax.set_xlabel("eigenvalue lambda of W (1 = lowest graph frequency)")
        ax.set_title(f"COIL-20, query {query} (component of {comp_size}): {title}", fontsize=10)
        ax.grid(alpha=0.3)
        tw = ax.twinx()
        order = np.argsort(lam)
        tw.plot(lam[order], h[name][order], color="tab:red", lw=1.5, label="h(lambda)")
        tw.set_ylabel("h(lambda)", color="tab:red")
        tw.set_ylim(0, 1.05)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = tw.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    axes[0].set_ylabel("energy per eigenvalue (log)")
    fig.tight_layout()
    save_figure(fig, out / "frequency_response.png", dpi=110)


# --------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "spectral"))
    p.add_argument("--quick", action="store_true", help="small run for the tests (< 1 minute)")
    p.add_argument("--ranks", help="ranks r of the mAP sweep (comma separated)")
    p.add_argument("--sizes", help="n of the offline eigenpair timing (comma separated; '' to skip)")
    p.add_argument("--timing-ranks", help="ranks timed offline at sizes n <= 5000")
    p.add_argument("--large-rank", type=int, help="rank timed offline at sizes n > 5000 (300)")
    p.add_argument("--datasets", default="coil20,mpeg7")
    p.add_argument("--alpha", type=float, default=0.99)
    p.add_argument("--heat-t", type=float, default=10.0)
    p.add_argument("--query", type=int, default=-1,
                   help="COIL-20 item used as the query of part 4 (default: first of the largest component)")
    p.add_argument("--k-offline", type=int, default=50)
    p.add_argument("--repeat", type=int)
    p.add_argument("--no-frequency", action="store_true", help="skip part 4")
    p.add_argument("--keep-offline", action="store_true",
                   help="keep the rows of --out/offline.csv for sizes not measured in this run "
                        "(to time large n in separate runs)")
    p.add_argument("--warm-max", type=int, help="largest n where lanczos is also timed warm")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    ranks = [int(r) for r in (args.ranks or preset["ranks"]).split(",")]
    sizes_arg = preset["sizes"] if args.sizes is None else args.sizes
    sizes = [int(s) for s in sizes_arg.split(",") if s.strip()]
    timing_ranks = [int(r) for r in (args.timing_ranks or preset["timing_ranks"]).split(",")]
    large_rank = args.large_rank or preset["large_rank"]
    repeat = args.repeat or preset["repeat"]
    warm_max = preset["warm_max"] if args.warm_max is None else args.warm_max
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    map_rows, online_rows, offline_rows, freq_rows, end_rows = [], [], [], [], []
    coil_graph = None
    for name in [d for d in args.datasets.split(",") if d]:
        graph, _ = map_experiment(name, DATASETS[name], args.alpha, ranks, repeat, map_rows, online_rows,
                                  end_rows)
        if name == "coil20":
            coil_graph = graph
    if map_rows:
        write_csv(out / "map_vs_rank.csv", map_rows)
        write_csv(out / "online.csv", online_rows)
        write_csv(out / "end_to_end.csv", end_rows)
        plot_maps(out, map_rows)
        plot_online(out, online_rows)
    if not args.no_frequency:
        if coil_graph is None:
            coil_graph = normalize(knn_graph(load("coil20")[0], DATASETS["coil20"], gamma=3.0, mutual=True))
        lam, energy, h, _, q, size = frequency_experiment(coil_graph, args.alpha, args.heat_t, args.query,
                                                          freq_rows)
        write_csv(out / "frequency.csv", freq_rows)
        plot_frequency(out, lam, energy, h, args.alpha, args.heat_t, q, size)
    kept = []
    if args.keep_offline and (out / "offline.csv").is_file():  # rows of sizes not measured now
        kept = [{k: _num(v) for k, v in r.items()} for r in _read_csv(out / "offline.csv")
                if int(r["n"]) not in sizes]
    for n in sorted(sizes):
        offline_experiment(n, timing_ranks if n <= 5000 else [large_rank], args.k_offline, warm_max, offline_rows)
        # after every size: a long run keeps what it measured
        write_csv(out / "offline.csv", sorted(kept + offline_rows, key=lambda r: (r["n"], r["r"])))
    if offline_rows:
        plot_offline(out, sorted(kept + offline_rows, key=lambda r: (r["n"], r["r"])))
    print(f"\nwrote {sorted(f.name for f in out.iterdir() if f.is_file() and not f.name.startswith('.'))} "
          f"into {out} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
