"""Reproduce the results table: kNN search, alpha-QE, DBA + alpha-QE and diffusion, per data set.

    python -m experiments.reproduce [--quick] [--out results/reproduce]
                                    [--datasets digits coil20 mpeg7]
                                    [--roxford DESCRIPTORS.mat --gnd gnd_roxford5k.pkl]

Data sets:
  * sklearn digits (always; bundled with scikit-learn), COIL-20 and MPEG-7 from
    ``../shared/data`` (or ``$RETRIEVAL_JAX_DATA``) when present: every item (every
    ``query_stride``-th with --quick) queries the whole collection; label mAP and
    mP@10 with the query itself ignored, and for MPEG-7 the bull's-eye score
    (top 40, query included);
  * Revisited Oxford / Paris when ``--roxford`` names a descriptor file in the
    published layout (.mat with ``X`` database and ``Q`` query matrices, d x n; or
    .npz with X and Q) and ``--gnd`` its ground truth: mAP Easy / Medium / Hard
    and mP@10 Medium (Radenovic et al., CVPR 2018).

The rows are one list of ``(row name, Method, config)`` (``table_rows``), so a new
method is one more line there. Writes ``results.csv``, ``results.md`` and
``config.json`` (settings, every row's config, versions) into ``--out``, each
atomically.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from retrieval_jax.data import load_descriptors, load_gnd
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import bullseye_score, label_map, revisited_map
from retrieval_jax.methods import (ALPHA_QE, DBA_ALPHA_QE, DIFFUSION, FSR, KNN_SEARCH, OFFLINE_DIFFUSION,
                                   AlphaQEConfig, DbaQEConfig, DiffusionConfig, FsrConfig, KnnConfig,
                                   OfflineDiffusionConfig)

from experiments.common import (available_label_datasets, block, label_experiment_parser, load_label_dataset,
                                parse_experiment_args, versions, write_csv, write_json, write_text)

COLUMNS = ("dataset", "method", "mAP", "mP@10", "bullseye", "mAP_easy", "mAP_medium", "mAP_hard",
           "mP@10_medium", "n_items", "n_queries", "build_s", "search_s")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Parameters shared by the rows of one data set."""

    k: int = 10                # graph neighbours (small label data sets: 10; landmarks: 50)
    query_k: int = 10          # database neighbours of an out-of-graph query (diffusion)
    qe_n: int = 5              # alpha-QE neighbours
    dba_n: int = 5             # DBA neighbours
    qe_alpha: float = 3.0      # alpha-QE / DBA weight exponent
    max_iter_tol: int = 1000   # CG steps allowed for "to tolerance"
    truncate: int = 500        # truncated diffusion shortlist T (capped at n)
    rank: int = 400            # FSR rank r (capped at n)
    query_stride: int = 1      # every query_stride-th item is a query (label data sets)


FULL = Settings()
QUICK = Settings(max_iter_tol=200, truncate=200, query_stride=4, rank=100)
LANDMARKS = Settings(k=50, qe_n=2, dba_n=10, truncate=1000)
LANDMARKS_QUICK = dataclasses.replace(LANDMARKS, max_iter_tol=200, truncate=300, rank=100)


def table_rows(s: Settings, n: int):
    """The rows of the table: (row name, Method, config). Add a method with one line."""
    T = min(s.truncate, n)
    r = min(s.rank, n - 1)
    return [
        ("kNN search", KNN_SEARCH, KnnConfig()),
        (f"alpha-QE (n={s.qe_n})", ALPHA_QE, AlphaQEConfig(n=s.qe_n, alpha=s.qe_alpha)),
        (f"DBA + alpha-QE (n={s.dba_n}/{s.qe_n})", DBA_ALPHA_QE,
         DbaQEConfig(dba_n=s.dba_n, qe_n=s.qe_n, alpha=s.qe_alpha)),
        ("diffusion, CG 20 steps", DIFFUSION,
         DiffusionConfig(k=s.k, query_k=s.query_k, max_iter=20)),
        ("diffusion, CG to tol 1e-6", DIFFUSION,
         DiffusionConfig(k=s.k, query_k=s.query_k, max_iter=s.max_iter_tol)),
        (f"truncated diffusion T={T}", DIFFUSION,
         DiffusionConfig(k=s.k, query_k=s.query_k, max_iter=s.max_iter_tol, truncate=T)),
        ("diffusion, exact (inverse per component)", DIFFUSION,
         DiffusionConfig(k=s.k, query_k=s.query_k, solver="inverse")),
        (f"FSR rank-r (r={r})", FSR, FsrConfig(k=s.k, query_k=s.query_k, rank=r, mode="rank_r")),
        (f"FSR approx (r={r})", FSR, FsrConfig(k=s.k, query_k=s.query_k, rank=r, mode="approx")),
        (f"offline diffusion, cosine T={T}", OFFLINE_DIFFUSION,
         OfflineDiffusionConfig(k=s.k, query_k=s.query_k, truncate=T, score="cosine")),
        (f"offline diffusion, direct T={T}", OFFLINE_DIFFUSION,
         OfflineDiffusionConfig(k=s.k, query_k=s.query_k, truncate=T, score="direct")),
    ]


# ----------------------------------------------------------------------------- evaluation
def _timed_scores(method, cfg, X, search_arg, *, items: bool):
    t0 = time.perf_counter()
    state = method.build(X, cfg)
    block(state)
    t1 = time.perf_counter()
    fn = method.search_items if items else method.search
    scores = np.asarray(fn(state, search_arg))
    return scores, t1 - t0, time.perf_counter() - t1


def label_scores(ranking_self_excluded, labels, query_ids, ks=(10,)):
    """Label mAP / mP@k (a `MapResult`) of rankings of the query items ``query_ids``
    (themselves ignored)."""
    return label_map(ranking_self_excluded, labels, query_ids=query_ids, ks=ks)


def bullseye(ranking_with_self, labels, query_ids, top: int = 40) -> float:
    """Bull's-eye score (query included); the library function when every item is a query."""
    n = labels.size
    if query_ids.size == n and np.array_equal(query_ids, np.arange(n)):
        return bullseye_score(ranking_with_self, labels, top=top)
    counts = np.bincount(labels)
    hits = (labels[ranking_with_self[:, :top]] == labels[query_ids][:, None]).sum()
    return float(hits / counts[labels[query_ids]].sum())


def evaluate_label_dataset(name, data, settings: Settings, rows=None, *, log=print):
    X, labels = data.X, np.asarray(data.labels)
    n = X.shape[0]
    qids = np.arange(0, n, settings.query_stride, dtype=np.int32)
    out = []
    for row, method, cfg in (rows if rows is not None else table_rows(settings, n)):
        scores, tb, ts = _timed_scores(method, cfg, X, qids, items=True)
        res = label_scores(ranking_from_scores(scores, exclude=qids), labels, qids)
        rec = {"dataset": name, "method": row, "mAP": 100 * res.map, "mP@10": 100 * res.mp[10],
               "n_items": n, "n_queries": int(qids.size), "build_s": tb, "search_s": ts,
               "config": _config_dict(method, cfg)}
        if name == "mpeg7":
            rec["bullseye"] = 100 * bullseye(ranking_from_scores(scores), labels, qids)
        out.append(rec)
        log(f"  {name:8s} {row:36s} mAP {rec['mAP']:6.2f}  mP@10 {rec['mP@10']:6.2f}"
            + (f"  bull's-eye {rec['bullseye']:6.2f}" if "bullseye" in rec else "")
            + f"  ({tb:.1f} s + {ts:.1f} s)")
    return out


def load_landmarks(descriptors, gnd_path):
    """(X [n, d], Q [nq, d], GroundTruth) from the published descriptor layout."""
    X = load_descriptors(descriptors, key="X")
    Q = load_descriptors(descriptors, key="Q")
    gt = load_gnd(gnd_path)
    if X.shape[0] != gt.n_db:
        raise ValueError(f"{descriptors}: X has {X.shape[0]} database descriptors but "
                         f"{gnd_path} lists {gt.n_db} images")
    if Q.shape[0] != gt.n_queries:
        raise ValueError(f"{descriptors}: Q has {Q.shape[0]} queries but {gnd_path} has "
                         f"{gt.n_queries}")
    return X, Q, gt


def evaluate_landmarks(name, X, Q, gt, settings: Settings, rows=None, *, log=print):
    out = []
    for row, method, cfg in (rows if rows is not None else table_rows(settings, X.shape[0])):
        scores, tb, ts = _timed_scores(method, cfg, X, Q, items=False)
        res = revisited_map(ranking_from_scores(scores), gt, ks=(1, 5, 10))
        rec = {"dataset": name, "method": row, "mAP": 100 * res.medium.map,
               "mP@10": 100 * res.medium.mp[10],
               "mAP_easy": 100 * res.easy.map, "mAP_medium": 100 * res.medium.map,
               "mAP_hard": 100 * res.hard.map, "mP@10_medium": 100 * res.medium.mp[10],
               "n_items": X.shape[0], "n_queries": Q.shape[0], "build_s": tb, "search_s": ts,
               "config": _config_dict(method, cfg)}
        out.append(rec)
        log(f"  {name:8s} {row:36s} mAP E {rec['mAP_easy']:6.2f} M {rec['mAP_medium']:6.2f} "
            f"H {rec['mAP_hard']:6.2f}  ({tb:.1f} s + {ts:.1f} s)")
    return out


def _config_dict(method, cfg) -> dict:
    return {"method": method.name, "config_type": type(cfg).__name__,
            **dataclasses.asdict(cfg)}


# ----------------------------------------------------------------------------- output
def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.2f}" if not np.isnan(v) else ""
    return str(v)


def markdown(records) -> str:
    lines = ["# Results", ""]
    for ds in dict.fromkeys(r["dataset"] for r in records):
        rs = [r for r in records if r["dataset"] == ds]
        r0 = rs[0]
        if "mAP_medium" in r0:
            cols = ["mAP_easy", "mAP_medium", "mAP_hard", "mP@10_medium"]
            head = ["mAP E", "mAP M", "mAP H", "mP@10 M"]
            what = f"{r0['n_queries']} queries, {r0['n_items']} database images (revisited protocol)"
        else:
            cols = ["mAP", "mP@10"] + (["bullseye"] if "bullseye" in r0 else [])
            head = ["mAP", "mP@10"] + (["bull's-eye"] if "bullseye" in r0 else [])
            what = (f"{r0['n_queries']} of {r0['n_items']} items as queries, "
                    "the query itself ignored")
        lines += [f"## {ds}", "", f"{what}; scores in %, times in seconds.", "",
                  "| method | " + " | ".join(head) + " | build s | search s |",
                  "|---|" + "---:|" * (len(head) + 2)]
        for r in rs:
            lines.append(f"| {r['method']} | " + " | ".join(_fmt(r.get(c)) for c in cols)
                         + f" | {r['build_s']:.2f} | {r['search_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(out: Path, records, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", records, COLUMNS, float_format="{:.4f}")
    write_text(out / "results.md", markdown(records))
    write_json(out / "config.json", config)


# ----------------------------------------------------------------------------- main
def run(out="results/reproduce", *, quick: bool = False, datasets=None, data_dir=None,
        roxford=None, gnd=None, log=print):
    """Evaluate every row on every data set; returns the records (one dict per row)."""
    settings = QUICK if quick else FULL
    names = list(datasets) if datasets else available_label_datasets(data_dir)
    records, configs = [], {}
    for name in names:
        data = load_label_dataset(name, data_dir)
        log(f"{name}: {len(data)} items, {data.n_classes} classes")
        records += evaluate_label_dataset(name, data, settings, log=log)
        configs[name] = {"settings": dataclasses.asdict(settings),
                         "rows": [[row, m.name, _config_dict(m, c)]
                                  for row, m, c in table_rows(settings, len(data))]}
    if roxford is not None:
        lm = LANDMARKS_QUICK if quick else LANDMARKS
        X, Q, gt = load_landmarks(roxford, gnd)
        name = Path(gnd).stem.replace("gnd_", "") or "landmarks"
        log(f"{name}: {X.shape[0]} database images, {Q.shape[0]} queries ({gt.protocol})")
        records += evaluate_landmarks(name, X, Q, gt, lm, log=log)
        configs[name] = {"settings": dataclasses.asdict(lm), "descriptors": str(roxford),
                         "gnd": str(gnd), "rows": [[row, m.name, _config_dict(m, c)]
                                                   for row, m, c in table_rows(lm, X.shape[0])]}
    config = {"command": sys.argv, "quick": quick, "datasets": configs, "versions": versions()}
    out = Path(out)
    write_outputs(out, records, config)
    log(f"\n{markdown(records)}\nwrote {out / 'results.csv'}, {out / 'results.md'}, "
        f"{out / 'config.json'}")
    return records


def main(argv=None):
    p = label_experiment_parser(__doc__, out="results/reproduce",
                                quick="small settings: every 4th item a query, CG <= 200 steps, T = 200")
    p.add_argument("--roxford", default=None,
                   help="descriptors in the published layout (.mat X, Q as d x n; or .npz X, Q)")
    p.add_argument("--gnd", default=None, help="ground truth for --roxford (gnd_roxford5k.pkl)")
    args = parse_experiment_args(p, argv)
    if (args.roxford is None) != (args.gnd is None):
        p.error("--roxford and --gnd go together")
    for path in (args.roxford, args.gnd):
        if path is not None and not Path(path).is_file():
            p.error(f"{path} does not exist")
    if args.roxford is not None:
        try:
            load_landmarks(args.roxford, args.gnd)
        except (KeyError, ValueError, TypeError) as exc:
            p.error(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    run(args.out, quick=args.quick, datasets=args.datasets, data_dir=args.data_dir,
        roxford=args.roxford, gnd=args.gnd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
