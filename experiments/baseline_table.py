"""One table of every registered ranking method at its defaults: quality, speed, memory.

    python -m experiments.baseline_table [--sizes 5000 100000 1000000] [--datasets coil20 mpeg7 revisited]
        [--methods NAME ...] [--repeat 5] [--batch 64] [--queries 70] [--d 64] [--timeout 1200]
        [--max-rss-gb 6] [--in-process] [--out experiments/results/baseline_table] [--quick]

Every method of `retrieval_jax.methods.METHODS` (looked up when the script runs, so a
method registered later joins the table without an edit here) is built with its
config's defaults, ``METHODS[name].build(database, METHODS[name].config_type())``; the
graph methods (those with ``from_graph``) share one kNN graph per data set, built once
with their default graph options (``methods.base.config_graph``) and given to
``from_graph``. Data sets:

* ``coil20``: COIL-20, 32x32 pixels (``data.load_coil20``), every image queries the rest
  (``search_items``); label mAP with the query left out of its own ranking;
* ``mpeg7``: MPEG-7 CE-Shape-1 (``data.load_mpeg7``), every shape a query, the bull's-eye
  score (same-class shapes among the first 40, the query included; a method whose
  ``search_items`` leaves the item out of its own ranking gets it put first, said in the row);
* ``revisited``: the Revisited Oxford / Paris protocol (Radenovic et al., CVPR 2018) on
  synthetic R1M-style data at each ``--sizes`` n: ``experiments.common.clustered_database``
  (n / 100 clusters of unit descriptors on short curves, d = ``--d``), ``--queries``
  out-of-database queries from the same clusters (70, as ROxford and RParis); a query's
  positives are the members of its cluster, ordered by similarity to it: the closer half
  easy, the next 40% hard, the farthest 10% junk; every other item is a distractor.
  mAP Easy / Medium / Hard by ``evaluation.revisited_map`` on each query's ranking
  (the first 100,000 items when n is larger, ``n_db = n``).

The rankings order a graph method's unreached items (``Method.unreached``) after the
reached ones by similarity, as ``retrieval-jax rank`` does. Columns:

* ``ms_per_query``: the median over ``--repeat`` warm calls (after the evaluation run,
  which compiled them) of ``search`` / ``search_items`` on one batch of ``--batch``
  queries, divided by the batch size; the offline step is not in it;
* ``offline_s``: ``build`` (or the shared graph's build plus ``from_graph``; the graph's
  part is ``graph_s``), once, compilation included;
* ``peak_mb``: the peak resident memory (kernel VmHWM, its mark reset before the method)
  above the resident memory before the build, over the build and the timed calls: host
  numpy and the JAX CPU buffers alike (the data set and the shared graph were resident
  before and are not counted; the evaluation's rankings come after). In a subprocess
  the watchdog's sampled peak of the whole process is reported for a stopped run.

By default each (data set, n, method) runs in a subprocess of its own, with a watchdog:
a run whose resident memory passes ``--max-rss-gb`` or that takes longer than
``--timeout`` seconds is stopped and its row says so (no method may hold an [N, N]
array past N = 20,000: that is 1.6 GB there, 40 GB at N = 100,000). A method whose
``check_sizes`` refuses the size is skipped with its message; a method that fails
writes its error in its row; the table goes on. ``--in-process`` runs everything in
this process (no watchdog). The data and graphs are cached under ``--out/cache``.

Writes ``baseline_table.csv``, ``baseline_table.md``, ``baseline_table.png`` (mAP, or
bull's-eye, or Medium mAP, against ms per query: one panel per data set and n, one
point per method) and ``config.json`` into ``--out``, each atomically, after every row.
--quick: COIL-20 every 4th image (360), MPEG-7 5 shapes per class (350), revisited at
n = 2,000 with 16 queries, one timed repeat, in-process (the test; pick the data sets
with --datasets).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from retrieval_jax._progress import progress

from experiments.common import (RESULTS, block, peak_rss_mb, pyplot, reset_peak_rss, save_figure, versions,
                                write_csv, write_json, write_text)

COLUMNS = ("dataset", "n", "queries", "method", "status", "quality", "mAP", "bullseye", "mAP_easy", "mAP_medium",
           "mAP_hard", "ms_per_query", "offline_s", "graph_s", "peak_mb", "note")
DATASETS = ("coil20", "mpeg7", "revisited")
SIZES = (5_000, 100_000, 1_000_000)
DEPTH = 100_000          # revisited rankings are cut here (n_db = n) when n is larger
NN_LIMIT = 20_000        # no method may hold an [N, N] array past this N
BULLSEYE_TOP = 40


@dataclasses.dataclass(frozen=True)
class Task:
    """One data set at one size: what the runs of its methods share."""

    dataset: str
    n: int
    cache: str            # folder holding X.npy (and Q.npy, labels.npy, q_labels.npy)


# ----------------------------------------------------------------------------- data
def _coil20(data_dir, quick):
    from retrieval_jax.data import load_coil20
    ds = load_coil20(None if data_dir is None else Path(data_dir) / "coil20", size=32)
    X, labels = np.asarray(ds.X, np.float32), np.asarray(ds.labels)
    return (X[::4], labels[::4]) if quick else (X, labels)


def _mpeg7(data_dir, quick):
    from retrieval_jax.data import load_mpeg7
    ds = load_mpeg7(None if data_dir is None else Path(data_dir) / "mpeg7", size=32)
    X, labels = np.asarray(ds.X, np.float32), np.asarray(ds.labels)
    if quick:  # the first 5 shapes of every class
        keep = np.concatenate([np.flatnonzero(labels == c)[:5] for c in np.unique(labels)])
        keep.sort()
        X, labels = X[keep], labels[keep]
    return X, labels


def revisited_gnd(q, db, q_labels, db_labels):
    """Per query: its cluster's members by similarity, the closer half easy, the next 40% hard,
    the farthest 10% junk (as ROxford's junk: the positives hardest to recognise)."""
    gnd = []
    for i, c in enumerate(q_labels):
        members = np.flatnonzero(db_labels == c)
        order = members[np.argsort(-(db[members] @ q[i]), kind="stable")]
        easy = max(1, order.size // 2)
        junk = order.size // 10
        gnd.append({"easy": order[:easy], "hard": order[easy:order.size - junk],
                    "junk": order[order.size - junk:]})
    return gnd


def prepare(dataset: str, n: int | None, args) -> Task:
    """The data of one task written to its cache folder (reused when present)."""
    from experiments.common import clustered_database
    name = f"{dataset}{'-quick' if args.quick else ''}" + (f"-{n}-{args.queries}q-d{args.d}" if n else "")
    cache = Path(args.out) / "cache" / name
    if not (cache / "X.npy").exists():
        cache.mkdir(parents=True, exist_ok=True)
        if dataset == "revisited":
            X, Q, labels, q_labels = clustered_database(n, args.queries, args.d)
            np.save(cache / "Q.npy", Q)
            np.save(cache / "q_labels.npy", q_labels)
        else:
            X, labels = (_coil20 if dataset == "coil20" else _mpeg7)(args.data_dir, args.quick)
        np.save(cache / "labels.npy", labels)
        np.save(cache / "X.npy", X)  # last: its presence marks a complete cache
    n = int(np.load(cache / "X.npy", mmap_mode="r").shape[0])
    return Task(dataset, n, str(cache))


def load_task(task: Task):
    """(X, labels, Q or None, q_labels or None) of a prepared task."""
    cache = Path(task.cache)
    X = np.load(cache / "X.npy")
    labels = np.load(cache / "labels.npy")
    if task.dataset != "revisited":
        return X, labels, None, None
    return X, labels, np.load(cache / "Q.npy"), np.load(cache / "q_labels.npy")


# ----------------------------------------------------------------------------- shared graphs
def graph_key(method) -> tuple | None:
    """The graph options of a graph method's default config (None for the other methods)."""
    if method.from_graph is None or method.config_type is None:
        return None
    cfg = method.config_type()
    return (cfg.k, cfg.gamma, cfg.mutual, cfg.graph_method)


def graph_file(task: Task, key: tuple) -> Path:
    k, gamma, mutual, search = key
    return Path(task.cache) / f"graph-k{k}-g{gamma:g}-{'mutual' if mutual else 'knn'}-{search}.npz"


def shared_graph(task: Task, method, X) -> tuple[Path, float]:
    """The task's graph for ``method``'s default graph options, built once and saved:
    (file, seconds of its build)."""
    from retrieval_jax.graph import save_graph
    from retrieval_jax.methods.base import config_graph
    path = graph_file(task, graph_key(method))
    seconds_file = path.with_suffix(".seconds")
    if not path.exists():
        t = time.perf_counter()
        graph = block(config_graph(X, method.config_type(), show_progress=False))
        seconds = time.perf_counter() - t
        save_graph(path, graph)
        write_text(seconds_file, f"{seconds}\n")
    return path, float(seconds_file.read_text())


# ----------------------------------------------------------------------------- one run
def rss_mb() -> float:
    """Resident memory of this process now (VmRSS), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def ranking_key(scores, sims, unreached):
    """Scores as `retrieval-jax rank` orders them: items at most ``unreached`` of the query's
    best score (a graph method's unreached items) after the reached ones, by similarity."""
    s = np.asarray(scores, np.float64)
    if unreached is None:
        return s
    sims = sims / (np.abs(sims).max(axis=1, keepdims=True) + 1e-30)
    smax = s.max(axis=1, keepdims=True)
    smax = np.where(smax > 0, smax, 1.0)
    return np.where(s > unreached * smax, s / smax, sims - 2.0)


def _ranked(key, depth: int, exclude=None) -> np.ndarray:
    """The first ``depth`` items of each row of ``key`` (best first, ties by index); ``exclude``
    (one id per row) goes to the end."""
    key = np.array(key, np.float64)
    if exclude is not None:
        key[np.arange(key.shape[0]), exclude] = -np.inf
    n = key.shape[1]
    if depth >= n:
        return np.argsort(-key, axis=1, kind="stable")
    out = np.empty((key.shape[0], depth), np.int64)
    for i, row in enumerate(-key):
        cut = np.partition(row, depth - 1)[depth - 1]
        candidates = np.flatnonzero(row <= cut)  # every item tied at the cut too, in index order
        out[i] = candidates[np.argsort(row[candidates], kind="stable")[:depth]]
    return out


def _batches(total: int, size: int):
    return [np.arange(s, min(total, s + size)) for s in range(0, total, size)]


def _padded(batch, size: int):
    """``batch`` padded to ``size`` rows by repeating its first (one compiled shape)."""
    if batch.shape[0] == size:
        return batch
    return np.concatenate([batch, np.repeat(batch[:1], size - batch.shape[0], axis=0)])


def search_call(method, state, X, Q, batch: int):
    """(the call of ``search`` / ``search_items`` on the first batch of queries, its size)."""
    items = Q is None
    size = min(batch, X.shape[0] if items else Q.shape[0])
    if items:
        ids = np.arange(size, dtype=np.int32)
        return (lambda: method.search_items(state, ids)), size
    first = Q[:size]
    return (lambda: method.search(state, first)), size


def evaluate(task: Task, method, state, X, labels, Q, q_labels, batch: int) -> dict:
    """The quality columns of a built state: every query scored in batches of ``batch`` (the
    last one padded to the same compiled shape), ranked, evaluated."""
    from retrieval_jax.evaluation import bullseye_score, label_map, revisited_map

    n = X.shape[0]
    items = Q is None
    nq = n if items else Q.shape[0]
    size = min(batch, nq)
    search = method.search_items if items else method.search
    depth = min(BULLSEYE_TOP, n) if task.dataset == "mpeg7" else n if items else min(n, DEPTH)
    rows = []
    chunk = max(1, (1 << 24) // n)  # rows ranked at once: at most 16M float64 cells
    for ids in _batches(nq, size):
        arg = _padded(ids.astype(np.int32), size) if items else _padded(Q[ids], size)
        scores = np.asarray(block(search(state, arg)))[:ids.size]
        bad = ~np.isfinite(scores).all(axis=1)
        if bad.any():
            raise FloatingPointError(f"non-finite scores for {int(bad.sum())} queries")
        for part in _batches(ids.size, chunk):
            qids = ids[part]
            queries = X[qids] if items else Q[qids]
            sims = queries @ X.T if method.unreached is not None else None
            key = ranking_key(scores[part], sims, method.unreached)
            rows.append(_ranked(key, depth, exclude=qids if items and task.dataset == "coil20" else None))
    ranking = np.concatenate(rows)
    if task.dataset == "coil20":
        return {"mAP": 100 * label_map(ranking, labels)}
    if task.dataset == "mpeg7":
        self_ids = np.arange(n)
        if not (ranking == self_ids[:, None]).any(axis=1).all():
            # a method whose search_items leaves the item out of its own ranking: the protocol
            # counts the query, so it is put first, ahead of the method's first 39
            rest = np.stack([row[row != q][:depth - 1] for q, row in enumerate(ranking)])
            ranking = np.concatenate([self_ids[:, None], rest], axis=1)
            return {"bullseye": 100 * bullseye_score(ranking, labels, top=depth),
                    "note": "the query put first (its search_items ranking leaves it out)"}
        return {"bullseye": 100 * bullseye_score(ranking, labels, top=depth)}
    res = revisited_map(ranking, revisited_gnd(Q, X, q_labels, labels), n_db=n)
    return {"mAP_easy": 100 * res.easy.map, "mAP_medium": 100 * res.medium.map, "mAP_hard": 100 * res.hard.map}


def _short(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def run_one(task: Task, name: str, repeat: int, batch: int) -> dict:
    """The row of method ``name`` on ``task``, in this process."""
    from retrieval_jax.graph import load_graph
    from retrieval_jax.methods import METHODS

    method = METHODS[name]
    row = {"dataset": task.dataset, "n": task.n, "method": name}
    X, labels, Q, q_labels = load_task(task)
    row["queries"] = task.n if Q is None else Q.shape[0]
    config = None if method.config_type is None else method.config_type()
    if method.check_sizes is not None and config is not None:
        try:
            method.check_sizes(config, task.n)
        except (ValueError, TypeError) as exc:
            return {**row, "status": "skipped", "note": f"check_sizes: {_short(exc)}"}
    graph, graph_s = None, 0.0
    if graph_key(method) is not None:
        path, graph_s = shared_graph(task, method, X)
        graph = load_graph(path, num_nodes=task.n)[0]
    base = rss_mb()
    reset_peak_rss()
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t = time.perf_counter()
            if graph is not None:
                state = method.from_graph(X, graph, config)
            else:
                state = method.build(X) if config is None else method.build(X, config)
            block(state)
            offline = time.perf_counter() - t + graph_s
            call, size = search_call(method, state, X, Q, batch)
            block(call())  # compiled: the timed calls are warm
            times = []
            for _ in range(max(1, repeat)):
                t = time.perf_counter()
                block(call())
                times.append(time.perf_counter() - t)
            peak = peak_rss_mb() - base  # the method's: before the evaluation's rankings
            quality = evaluate(task, method, state, X, labels, Q, q_labels, batch)
        except Exception as exc:  # the row says why; the table goes on
            return {**row, "status": "failed", "note": _short(exc), "peak_mb": peak_rss_mb() - base}
    if "note" in quality:
        notes.append(quality.pop("note"))
    for message in dict.fromkeys(str(w.message).splitlines()[0][:120] for w in caught):
        notes.append(f"warning: {message}")
    if graph is not None:
        notes.insert(0, f"shared graph {graph_s:.1f} s of offline")
    return {**row, "status": "ok", **quality, "ms_per_query": 1e3 * float(np.median(times)) / size,
            "offline_s": offline, "graph_s": graph_s if graph is not None else None,
            "peak_mb": peak, "note": "; ".join(notes)}


# ----------------------------------------------------------------------------- a run in a subprocess
def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    task = Task(**spec["task"])
    try:
        row = run_one(task, spec["method"], spec["repeat"], spec["batch"])
    except Exception as exc:
        row = {"dataset": task.dataset, "n": task.n, "method": spec["method"], "status": "failed",
               "note": _short(exc)}
        traceback.print_exc()
    write_json(spec["result"], row)
    return 0


def _proc_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _watch(argv, log_path: Path, task: Task, args) -> tuple[int | None, str | None, float]:
    """Run ``python -m experiments.baseline_table argv`` and wait: (exit status, why it was
    stopped or None, sampled peak resident MB). Stopped past ``--timeout`` seconds or
    ``--max-rss-gb`` of resident memory."""
    env = {**os.environ, "RETRIEVAL_JAX_NO_PROGRESS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.baseline_table", *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1])
        start, limit_mb, peak, stopped = time.monotonic(), 1024 * args.max_rss_gb, 0.0, None
        while proc.poll() is None:
            rss = _proc_rss_mb(proc.pid)
            peak = max(peak, rss)
            if rss > limit_mb:
                stopped = (f"its resident memory passed {args.max_rss_gb:g} GB (--max-rss-gb)"
                           + (f" (an [N, N] float32 at N = {task.n:,} is {4 * task.n ** 2 / 2 ** 30:.1f} GB)"
                              if task.n > NN_LIMIT else ""))
            elif time.monotonic() - start > args.timeout:
                stopped = f"still running after {args.timeout:g} s (--timeout)"
            if stopped:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
    return proc.returncode, stopped, peak


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return f": {lines[-1][-200:]}" if lines else ""


def isolated_graph(task: Task, method, args, failures: dict) -> str | None:
    """Build the shared graph of ``method`` on ``task`` in a subprocess (watched) unless it is
    there: None when it is, else (status, why not), remembered so the next graph method of the
    task says the same."""
    key = graph_key(method)
    path = graph_file(task, key)
    if path.exists() or (task.dataset, task.n, key) in failures:
        return failures.get((task.dataset, task.n, key))
    work = Path(task.cache) / "runs"
    work.mkdir(exist_ok=True)
    spec = work / f"graph-{method.name}.json"
    write_json(spec, {"task": dataclasses.asdict(task), "method": method.name})
    log = work / f"graph-{method.name}.log"
    status, stopped, _ = _watch(["--child-graph", str(spec)], log, task, args)
    why = None
    if stopped:
        why = ("stopped", f"the shared graph's build was stopped: {stopped}")
    elif status != 0 or not path.exists():
        why = ("failed", f"the shared graph's build failed (exit status {status}){_log_tail(log)}")
    failures[(task.dataset, task.n, key)] = why
    return why


def _child_graph(spec_path: str) -> int:
    from retrieval_jax.methods import METHODS
    spec = json.loads(Path(spec_path).read_text())
    task = Task(**spec["task"])
    shared_graph(task, METHODS[spec["method"]], load_task(task)[0])
    return 0


def run_isolated(task: Task, name: str, args, failures: dict) -> dict:
    """The row of method ``name`` on ``task`` from a subprocess (see `_watch`)."""
    from retrieval_jax.methods import METHODS
    row = {"dataset": task.dataset, "n": task.n, "method": name}
    if graph_key(METHODS[name]) is not None:
        why = isolated_graph(task, METHODS[name], args, failures)
        if why:
            return {**row, "status": why[0], "note": why[1]}
    work = Path(task.cache) / "runs"
    work.mkdir(exist_ok=True)
    spec_path, result, log = work / f"{name}.json", work / f"{name}.result.json", work / f"{name}.log"
    result.unlink(missing_ok=True)
    write_json(spec_path, {"task": dataclasses.asdict(task), "method": name, "repeat": args.repeat,
                           "batch": args.batch, "result": str(result)})
    status, stopped, peak = _watch(["--child", str(spec_path)], log, task, args)
    if stopped:
        return {**row, "status": "stopped", "note": f"{stopped}; the whole process was at {peak:.0f} MB"}
    if not result.exists():
        return {**row, "status": "failed", "note": f"exit status {status}{_log_tail(log)}"}
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------- output
def quality_text(row) -> str:
    """The quality cell: mAP, bull's-eye, or E / M / H."""
    def num(key):
        v = row.get(key)
        return None if v in (None, "") or (isinstance(v, float) and np.isnan(v)) else float(v)
    if num("mAP_medium") is not None:
        return f"E {num('mAP_easy'):.2f} / M {num('mAP_medium'):.2f} / H {num('mAP_hard'):.2f}"
    if num("bullseye") is not None:
        return f"bull's-eye {num('bullseye'):.2f}"
    if num("mAP") is not None:
        return f"mAP {num('mAP'):.2f}"
    return ""


def _headline(row):
    for key in ("mAP", "bullseye", "mAP_medium"):
        v = row.get(key)
        if v not in (None, "") and not (isinstance(v, float) and np.isnan(v)):
            return float(v)
    return None


def _cell(v, fmt="{:.2f}") -> str:
    if v is None or v == "" or (isinstance(v, float) and np.isnan(v)):
        return ""
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def markdown(rows, header: str) -> str:
    lines = [header, "", "| dataset | n | method | quality (%) | ms / query | offline s | peak MB | note |",
             "|---|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        note = r.get("note") or ""
        if r.get("status") not in ("ok", None):
            note = f"**{r['status']}**: {note}"
        lines.append(f"| {r['dataset']} | {r['n']:,} | {r['method']} | {quality_text(r)} | "
                     f"{_cell(r.get('ms_per_query'), '{:.3g}')} | {_cell(r.get('offline_s'), '{:.3g}')} | "
                     f"{_cell(r.get('peak_mb'), '{:.0f}')} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def plot(rows, path) -> Path:
    """mAP (bull's-eye, Medium mAP) against ms per query, one panel per data set and n."""
    plt = pyplot()
    panels = list(dict.fromkeys((r["dataset"], r["n"]) for r in rows))
    cols = min(3, max(1, len(panels)))
    nrows = -(-max(1, len(panels)) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for ax, (ds, n) in zip(axes.flat, panels):
        done = [r for r in rows if (r["dataset"], r["n"]) == (ds, n) and r.get("status") == "ok"
                and _headline(r) is not None]
        for r in done:
            ms = max(float(r["ms_per_query"]), 1e-4)
            ax.scatter([ms], [_headline(r)], s=25)
            ax.annotate(r["method"], (ms, _headline(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("ms per query (warm, after the offline step)")
        ax.set_ylabel({"coil20": "mAP (%)", "mpeg7": "bull's-eye (%)"}.get(ds, "Medium mAP (%)"))
        ax.set_title(f"{ds}, n = {n:,}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def _earlier_rows(path: Path) -> dict:
    """The rows of an earlier run's CSV by (data set, n or None, method), numbers as numbers."""
    import csv
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        r = {k: (v if k in ("dataset", "method", "status", "quality", "note") or v == "" else float(v))
             for k, v in r.items()}
        r = {k: (None if v == "" else v) for k, v in r.items()}
        for key in ("n", "queries"):
            if r.get(key) is not None:
                r[key] = int(r[key])
        size = r["n"] if r["dataset"] == "revisited" else None
        out[(r["dataset"], size, r["method"])] = r
    return out


def table_order(rows) -> list:
    """The rows as a paper's table: by data set, size, then the registry's order of methods
    (a row re-run with ``--resume`` goes back to its place)."""
    from retrieval_jax.methods import METHODS
    names = {name: i for i, name in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (DATASETS.index(r["dataset"]) if r["dataset"] in DATASETS else len(DATASETS),
                                       r.get("n") or 0, names.get(r["method"], len(names)), r["method"]))


def write_outputs(out: Path, rows, header: str) -> None:
    rows = table_order(rows)
    write_csv(out / "baseline_table.csv", rows, COLUMNS)
    write_text(out / "baseline_table.md", markdown(rows, header))
    plot(rows, out / "baseline_table.png")


# ----------------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "baseline_table"), help="output folder")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="database sizes of the revisited data")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="data sets")
    p.add_argument("--methods", nargs="+", default=None, help="registered methods (default: all)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per method (the median is kept)")
    p.add_argument("--batch", type=int, default=64, help="queries per search call")
    p.add_argument("--queries", type=int, default=70, help="queries of the revisited data")
    p.add_argument("--d", type=int, default=64, help="descriptor dimension of the revisited data")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per method and data set")
    p.add_argument("--max-rss-gb", type=float, default=6.0, help="resident memory at which a run is stopped")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (and no watchdog)")
    p.add_argument("--data-dir", default=None, help="folder holding coil20/ and mpeg7/")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier run in --out (by data set, n and method) and run the others")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat, in-process (the test)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-graph", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)
    if args.child_graph:
        return _child_graph(args.child_graph)
    from retrieval_jax.methods import METHODS
    if args.quick:
        args.sizes, args.queries, args.repeat, args.in_process = [2000], 16, 1, True
    names = list(METHODS) if args.methods is None else args.methods
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(METHODS)}")
    if min(args.sizes) < 2 or args.batch < 1 or args.queries < 1 or args.repeat < 1:
        parser.error("--sizes must be >= 2, --batch, --queries and --repeat >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [(ds, None) for ds in args.datasets if ds != "revisited"]
    specs += [("revisited", n) for n in args.sizes if "revisited" in args.datasets]
    write_json(out / "config.json", {"argv": sys.argv[1:] if argv is None else list(argv), **vars(args),
                                     "methods": names, "versions": versions()})
    header = (f"# Baseline table\n\nEvery registered method at its defaults ({', '.join(names)}); "
              f"{args.repeat} timed calls of {args.batch} queries; peak = VmHWM above the RSS before the build.")
    rows, failures = [], {}
    earlier = _earlier_rows(out / "baseline_table.csv") if args.resume else {}
    pairs = [(spec, name) for spec in specs for name in names]
    tasks = {}
    for (ds, n), name in progress(pairs, desc="baseline table", total=len(pairs), enable=None, auto_threshold=1):
        kept = earlier.pop((ds, n, name), None)
        if kept is not None:
            rows.append(kept)
            continue
        if (ds, n) not in tasks:
            try:
                tasks[(ds, n)] = prepare(ds, n, args)
            except Exception as exc:
                tasks[(ds, n)] = _short(exc)
        task = tasks[(ds, n)]
        if isinstance(task, str):
            row = {"dataset": ds, "n": n, "method": name, "status": "failed", "note": f"data: {task}"}
        elif args.in_process:
            try:
                row = run_one(task, name, args.repeat, args.batch)
            except Exception as exc:
                row = {"dataset": ds, "n": task.n, "method": name, "status": "failed", "note": _short(exc)}
        else:
            row = run_isolated(task, name, args, failures)
        row["quality"] = quality_text(row)
        rows.append(row)
        write_outputs(out, rows + list(earlier.values()), header)
    write_outputs(out, rows + list(earlier.values()), header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
