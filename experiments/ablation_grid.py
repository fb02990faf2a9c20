"""The ablation grid as one compiled program, against the loop of builds.

    python -m experiments.ablation_grid [--quick] [--out results/ablation_grid] [--repeats 3]
    (or python experiments/ablation_grid.py ...)

On COIL-20 (raw 32x32 pixels, L2-normalised; ``load_coil20(size=32)``) the
diffusion grid alpha x gamma and the Fast Spectral Ranking filter parameters (alpha of
the regularised Laplacian, t of the heat kernel) are computed twice:

* **loop**: today's ablation, a Python loop over configs, each one
  ``DIFFUSION.build`` (host kNN graph, normalisation) + ``DIFFUSION.search_items``
  (CG to ``tol``), resp. ``FSR.build`` (graph + eigenpairs) + ``FSR.search_items``:
  every config is a new static config, hence a new compilation;
* **grid**: one ``jax.jit`` of a nested ``vmap`` over traced alpha and gamma through
  ``knn_graph`` + ``normalize`` + ``diffuse`` (the graph is built on device, once per
  gamma, inside the program); for FSR one graph and one eigendecomposition, then one
  jitted ``vmap`` of ``filter_embedding`` + ``fast_spectral_ranking`` over alpha and
  over t.

Both routes score every ``query_stride``-th item against the collection; label mAP
(query excluded, ``retrieval_jax.evaluation.label_map`` protocol) per cell must agree
to float32 rounding. Times are medians over ``--repeats`` runs of each route, one route
at a time: "cold" clears JAX's compilation caches before every run (what an ablation
script pays: each loop config compiles anew, the grid compiles once), "warm" runs again
with the caches full. Writes ``ablation_grid.csv`` (one row per cell: both mAPs, their
difference, the largest relative score difference), ``timing.csv`` and ``config.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp

from retrieval_jax.data import atomic_write, default_data_dir, load_coil20, write_csv
from retrieval_jax.diffusion import diffuse, ranking_from_scores
from retrieval_jax.evaluation import label_map
from retrieval_jax.graph import knn_graph, normalize
from retrieval_jax.methods import DIFFUSION, FSR, DiffusionConfig, FsrConfig
from retrieval_jax.spectral import (fast_spectral_ranking, filter_embedding, heat_kernel_filter,
                                    regularized_laplacian_filter, spectral_embedding)

from experiments.common import SCORE_RTOL


@dataclasses.dataclass(frozen=True)
class GridSettings:
    k: int = 10
    tol: float = 1e-6
    max_iter: int = 300
    alphas: tuple = (0.8, 0.9, 0.95, 0.99)
    gammas: tuple = (1.0, 3.0, 6.0)
    fsr_rank: int = 200
    fsr_mode: str = "approx"
    fsr_gamma: float = 3.0
    fsr_alphas: tuple = (0.8, 0.9, 0.95, 0.99)
    fsr_ts: tuple = (2.0, 5.0, 10.0, 20.0)
    query_stride: int = 1
    item_stride: int = 1       # every item_stride-th image of COIL-20 (quick: a smaller collection)
    repeats: int = 3
    warm: bool = True          # also time each route with the compilation caches full


FULL = GridSettings()
QUICK = GridSettings(tol=1e-5, max_iter=200, alphas=(0.9, 0.99), gammas=(1.0, 3.0), fsr_rank=30,
                     fsr_alphas=(0.99,), fsr_ts=(10.0,), query_stride=4, item_stride=2, repeats=1,
                     warm=False)

CELL_COLUMNS = ("family", "param", "alpha", "gamma", "t", "mAP_loop", "mAP_grid", "mAP_diff",
                "max_rel_score_diff")
TIME_COLUMNS = ("family", "route", "cells", "cold_s", "warm_s", "cold_ratio", "warm_ratio",
                "cold_runs", "warm_runs")


# ----------------------------------------------------------------------------- the grid program
@functools.partial(jax.jit, static_argnames=("k", "max_iter", "mutual"))
def diffusion_grid(X, y, alphas, gammas, tol, *, k: int, max_iter: int, mutual: bool = True):
    """Diffusion scores for every (gamma, alpha): float[len(gammas), len(alphas), nq, n].

    One program: per gamma the kNN graph is built and normalised in the trace
    (``knn_graph`` on a traced X), then diffused under a ``vmap`` over alpha. ``y`` is an
    argument (not a closed-over constant) so that it is traced too.
    """
    def per_gamma(g):
        W = normalize(knn_graph(X, k, gamma=g, mutual=mutual))
        return jax.vmap(lambda a: diffuse(W, y, alpha=a, tol=tol, max_iter=max_iter))(alphas)
    return jax.vmap(per_gamma)(gammas)


@functools.partial(jax.jit, static_argnames=("mode",))
def fsr_grid(embedding, y, alphas, ts, *, mode: str):
    """FSR scores under every regularised-Laplacian alpha and every heat-kernel t, one program."""
    def scores(h):
        return fast_spectral_ranking(filter_embedding(embedding, h, mode=mode), y)
    by_alpha = jax.vmap(lambda a: scores(regularized_laplacian_filter(a)))(alphas)
    by_t = jax.vmap(lambda t: scores(heat_kernel_filter(t)))(ts)
    return by_alpha, by_t


# ----------------------------------------------------------------------------- helpers
def label_map_of(scores, labels, qids) -> float:
    """Label mAP of the queries ``qids`` (items themselves ignored), as a fraction."""
    ranking = ranking_from_scores(np.asarray(scores), exclude=qids, rtol=SCORE_RTOL)
    return label_map(ranking, labels, query_ids=qids)


def load_coil(data_dir=None):
    """COIL-20 at 32x32 (raw pixels, L2-normalised), from ``data_dir/coil20`` or the default."""
    root = Path(data_dir) / "coil20" if data_dir is not None else default_data_dir() / "coil20"
    return load_coil20(root, size=32)


def versions() -> dict:
    import platform
    return {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
            "backend": jax.default_backend()}


def _block(tree):
    return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready")
                                  else x, tree)


def _timed(fn, repeats: int, *, cold: bool):
    """(median seconds, every run's seconds, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        if cold:
            jax.clear_caches()
        t0 = time.perf_counter()
        out = _block(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times, out


def diffusion_cells(s: GridSettings):
    return [(a, g) for g in s.gammas for a in s.alphas]


def fsr_cells(s: GridSettings):
    return ([("diffusion", a) for a in s.fsr_alphas] + [("heat", t) for t in s.fsr_ts])


# ----------------------------------------------------------------------------- the two routes
def loop_diffusion(X, qids, s: GridSettings):
    out = []
    for a, g in diffusion_cells(s):
        cfg = DiffusionConfig(k=s.k, alpha=a, gamma=g, tol=s.tol, max_iter=s.max_iter, solver="cg")
        state = DIFFUSION.build(X, cfg, show_progress=False)
        out.append(np.asarray(DIFFUSION.search_items(state, qids)))
    return out


def grid_diffusion(X, qids, s: GridSettings):
    y = jax.nn.one_hot(qids, X.shape[0], dtype=jnp.float32)
    S = diffusion_grid(jnp.asarray(X), y, jnp.asarray(s.alphas, jnp.float32),
                       jnp.asarray(s.gammas, jnp.float32), s.tol, k=s.k, max_iter=s.max_iter)
    S = np.asarray(S)
    return [S[gi, ai] for gi in range(len(s.gammas)) for ai in range(len(s.alphas))]


def loop_fsr(X, qids, s: GridSettings):
    out = []
    for kind, v in fsr_cells(s):
        extra = dict(alpha=v) if kind == "diffusion" else dict(t=v)
        cfg = FsrConfig(k=s.k, gamma=s.fsr_gamma, rank=s.fsr_rank, mode=s.fsr_mode, filter=kind, **extra)
        state = FSR.build(X, cfg, show_progress=False)
        out.append(np.asarray(FSR.search_items(state, qids)))
    return out


def grid_fsr(X, qids, s: GridSettings):
    W = normalize(knn_graph(X, s.k, gamma=s.fsr_gamma, mutual=True, show_progress=False))
    emb = spectral_embedding(W, s.fsr_rank, regularized_laplacian_filter(0.99), mode=s.fsr_mode)
    y = jax.nn.one_hot(qids, X.shape[0], dtype=jnp.float32)
    by_a, by_t = fsr_grid(emb, y, jnp.asarray(s.fsr_alphas, jnp.float32),
                          jnp.asarray(s.fsr_ts, jnp.float32), mode=s.fsr_mode)
    by_a, by_t = np.asarray(by_a), np.asarray(by_t)
    return [by_a[i] for i in range(len(s.fsr_alphas))] + [by_t[i] for i in range(len(s.fsr_ts))]


def _max_rel_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def compare(family, cells, loop_scores, grid_scores, labels, qids):
    recs = []
    for cell, sl, sg in zip(cells, loop_scores, grid_scores):
        ml, mg = 100 * label_map_of(sl, labels, qids), 100 * label_map_of(sg, labels, qids)
        rec = {"family": family, "mAP_loop": ml, "mAP_grid": mg, "mAP_diff": mg - ml,
               "max_rel_score_diff": _max_rel_diff(sl, sg)}
        if family == "diffusion":
            rec.update(param="alpha x gamma", alpha=cell[0], gamma=cell[1])
        elif cell[0] == "diffusion":
            rec.update(param="FSR alpha", alpha=cell[1])
        else:
            rec.update(param="FSR heat t", t=cell[1])
        recs.append(rec)
    return recs


def run(out="results/ablation_grid", *, quick: bool = False, repeats: int | None = None,
        data_dir=None, log=print):
    s = QUICK if quick else FULL
    if repeats is not None:
        s = dataclasses.replace(s, repeats=repeats)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_coil(data_dir)
    keep = np.arange(0, len(data.labels), s.item_stride)
    X = np.asarray(data.X, np.float32)[keep]
    labels = np.asarray(data.labels)[keep]
    n = X.shape[0]
    qids = np.arange(0, n, s.query_stride, dtype=np.int32)
    stride = f" (every {s.item_stride}-th)" if s.item_stride > 1 else ""
    log(f"COIL-20: {n} items{stride}, {qids.size} queries, k = {s.k}, tol = {s.tol}, max_iter = {s.max_iter}")
    cells_d, cells_f = diffusion_cells(s), fsr_cells(s)
    routes = {
        "diffusion": (cells_d, lambda: loop_diffusion(X, qids, s), lambda: grid_diffusion(X, qids, s)),
        "fsr": (cells_f, lambda: loop_fsr(X, qids, s), lambda: grid_fsr(X, qids, s)),
    }
    records, timing = [], []
    for family, (cells, loop_fn, grid_fn) in routes.items():
        res = {}
        for route, fn in (("loop", loop_fn), ("grid", grid_fn)):   # one route at a time
            cold, cold_runs, scores = _timed(fn, s.repeats, cold=True)
            warm, warm_runs = (_timed(fn, s.repeats, cold=False)[:2] if s.warm
                               else (float("nan"), []))
            res[route] = (cold, warm, cold_runs, warm_runs, scores)
            log(f"  {family:9s} {route:4s} ({len(cells)} cells): cold {cold:7.2f} s, warm {warm:7.2f} s")
        recs = compare(family, cells, res["loop"][4], res["grid"][4], labels, qids)
        records += recs
        worst = max(abs(r["mAP_diff"]) for r in recs)
        log(f"  {family:9s} largest |mAP(grid) - mAP(loop)| = {worst:.2e} points, "
            f"largest relative score difference {max(r['max_rel_score_diff'] for r in recs):.1e}")
        for route in ("loop", "grid"):
            cold, warm, cr, wr, _ = res[route]
            timing.append({"family": family, "route": route, "cells": len(cells), "cold_s": cold,
                           "warm_s": warm, "cold_ratio": res["loop"][0] / cold,
                           "warm_ratio": res["loop"][1] / warm,
                           "cold_runs": " ".join(f"{t:.3f}" for t in cr),
                           "warm_runs": " ".join(f"{t:.3f}" for t in wr)})
    write_csv(out / "ablation_grid.csv", records, CELL_COLUMNS, float_format="{:.6g}")
    write_csv(out / "timing.csv", timing, TIME_COLUMNS, float_format="{:.4f}")
    config = {"command": sys.argv, "quick": quick, "settings": dataclasses.asdict(s), "n": n,
              "n_queries": int(qids.size), "versions": versions()}
    atomic_write(out / "config.json",
                 lambda f: f.write((json.dumps(config, indent=2, default=str) + "\n").encode()))
    print_table(records, timing, log=log)
    log(f"wrote {out / 'ablation_grid.csv'}, {out / 'timing.csv'}, {out / 'config.json'}")
    return records, timing


def print_table(records, timing, log=print):
    log("")
    log(f"{'cell':28s} {'mAP loop':>9s} {'mAP grid':>9s} {'diff':>9s}")
    for r in records:
        if r["family"] == "diffusion":
            name = f"diffusion a={r['alpha']:g} g={r['gamma']:g}"
        elif "t" in r:
            name = f"FSR heat t={r['t']:g}"
        else:
            name = f"FSR reg. Laplacian a={r['alpha']:g}"
        log(f"{name:28s} {r['mAP_loop']:9.3f} {r['mAP_grid']:9.3f} {r['mAP_diff']:9.1e}")
    log("")
    log(f"{'family':9s} {'route':5s} {'cells':>5s} {'cold s':>8s} {'warm s':>8s} {'loop/route cold':>16s} "
        f"{'warm':>6s}")
    for t in timing:
        log(f"{t['family']:9s} {t['route']:5s} {t['cells']:5d} {t['cold_s']:8.2f} {t['warm_s']:8.2f} "
            f"{t['cold_ratio']:16.2f} {t['warm_ratio']:6.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 x 2 grid, half the images, 1/4 of them as queries, one cold run per route")
    p.add_argument("--out", default="results/ablation_grid")
    p.add_argument("--repeats", type=int, default=None, help="runs per route (median); default 3, quick 1")
    p.add_argument("--data-dir", default=None, help="folder holding coil20/")
    a = p.parse_args(argv)
    run(a.out, quick=a.quick, repeats=a.repeats, data_dir=a.data_dir)


if __name__ == "__main__":
    main()
