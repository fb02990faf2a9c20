"""Helpers shared by the experiments: timing, peak memory, data, CSV / JSON / PNG output.

Every experiment runs from the repository root as ``python -m experiments.NAME``
(no ``sys.path`` edits); outputs are written atomically.
"""
from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

from retrieval_jax.data import (atomic_write, default_data_dir, load_coil20, load_digits,
                                load_mpeg7)
from retrieval_jax import files as data_io

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"


# Scores within this fraction of a row's largest score count as 0 when routes are
# compared (``ranking_from_scores(rtol=)``): the items outside the query's graph
# component get exactly 0 from diffusion, but a float32 spectral route leaves ~1e-8
# noise there whose signs would order that tail differently for every route.
SCORE_RTOL = 1e-6


# ----------------------------------------------------------------------------- agreement and quality
def top_overlap(a, b, top: int = 100) -> np.ndarray:
    """Per row, the share of the ``top`` best items of scores ``a`` found among those of ``b``."""
    ta = np.argpartition(-np.asarray(a), top, axis=1)[:, :top]
    tb = np.argpartition(-np.asarray(b), top, axis=1)[:, :top]
    return np.array([len(np.intersect1d(x, y)) / top for x, y in zip(ta, tb)])


def query_label_map(scores, q_labels, db_labels, *, top: int | None = None) -> float:
    """Label mAP (%) of out-of-graph queries: a query's positives are the database items
    of its label. Over the full ranking, or the first ``top`` items (n_db = database size)."""
    from retrieval_jax.diffusion import ranking_from_scores, top_n
    from retrieval_jax.evaluation import mean_average_precision
    ranking = ranking_from_scores(scores) if top is None else np.asarray(top_n(scores, top)[1])
    positives = [np.flatnonzero(db_labels == c) for c in q_labels]
    return 100 * mean_average_precision(ranking, positives, n_db=len(db_labels)).map


# ----------------------------------------------------------------------------- command lines
def label_experiment_parser(doc: str, *, out: str, quick: str, datasets=None,
                            datasets_help: str = "label data sets (default: digits and every one found "
                                                 "in the data dir)"):
    """The flags of an experiment over the label data sets: --out, --quick (``quick``
    says what it shrinks), --datasets (among ``datasets``, default every label data set) and --data-dir. Parse with
    `parse_experiment_args`."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--datasets", nargs="+", choices=datasets or LABEL_DATASETS, default=None, help=datasets_help)
    p.add_argument("--data-dir", default=None, help="folder holding coil20/ and mpeg7/")
    return p


def parse_experiment_args(parser, argv):
    """``parser.parse_args(argv)``, refusing a --data-dir that is not a directory."""
    args = parser.parse_args(argv)
    if getattr(args, "data_dir", None) is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    return args


# ----------------------------------------------------------------------------- timing
def block(tree):
    """Wait for every JAX array in ``tree`` (other leaves pass through); returns ``tree``."""
    import jax
    return jax.block_until_ready(tree)


def _call_seconds(fn, repeat: int, min_seconds: float = 0.0):
    """(output of the last call, seconds of each call of ``fn()``), each call waited for:
    ``repeat`` calls, and more until ``min_seconds`` have passed."""
    out, times = None, []
    repeat = max(1, int(repeat))
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        out = block(fn())
        times.append(time.perf_counter() - t)
    return out, times


def timed(fn, repeat: int = 1, *, min_seconds: float = 0.0):
    """(output of the last call, median wall-clock seconds of the calls of ``fn()``).

    ``fn`` is called ``repeat`` times, and again until ``min_seconds`` have passed.
    Each call's output is waited for (``jax.block_until_ready``), so asynchronous
    dispatch is timed to completion.
    """
    out, times = _call_seconds(fn, repeat, min_seconds)
    return out, float(np.median(times))


def timed_calls(fn, repeat: int):
    """A warm-up call of ``fn()`` (compilation), then ``repeat`` timed calls, each waited
    for: (output of the last call, list of seconds)."""
    block(fn())
    return _call_seconds(fn, repeat)


LOOP_PRODUCTS = 6


def neighbour_products(indices, weights, x, count, unroll: int):
    """x <- W x, ``count`` times (traced: one while loop), by `graph.core.neighbour_product`
    (the loop of `Graph.matvec`) with ``unroll`` slots fused per pass; operands in x's
    dtype, accumulated in float32."""
    import jax
    import jax.numpy as jnp

    from retrieval_jax.graph.core import neighbour_product

    def one(_, v):
        return neighbour_product(indices, weights, v, unroll=unroll, accumulate=jnp.float32)
    return jax.lax.fori_loop(0, count, one, x)


def product_seconds(indices, weights, x, *, unroll: int, repeat: int) -> list[float]:
    """Seconds of one neighbour product y_i = sum_k w_ik x[idx_ik] (indices int[n, K],
    weights [n, K] and x [n, B] in the dtype to time), as an iterative solver runs it.

    Timed inside a jitted loop of products (x <- W x; W normalised, so x stays bounded):
    one product = (time of LOOP_PRODUCTS products - median time of one) / (LOOP_PRODUCTS - 1),
    ``repeat`` values. A lone jitted call would also allocate its [n, B] output and take
    the page faults of touching it (about 0.35 ms per MB on the 2-core CPU), which a
    solver's step does not pay.
    """
    import jax
    import jax.numpy as jnp

    loop = jax.jit(neighbour_products, static_argnames=("unroll",))
    run = {c: (lambda c=c: loop(indices, weights, x, jnp.int32(c), unroll=unroll))
           for c in (1, LOOP_PRODUCTS)}
    _, one = timed_calls(run[1], repeat)
    _, many = timed_calls(run[LOOP_PRODUCTS], repeat)
    return [(t - float(np.median(one))) / (LOOP_PRODUCTS - 1) for t in many]


def timed_with_peak(fn, repeat: int = 1):
    """(output, (median seconds, peak RSS MB)) as `timed`, the peak-RSS mark reset first,
    so the peak is the call's own (data and arrays alive from before included)."""
    out, times, peak = timed_runs_with_peak(fn, repeat)
    return out, (float(np.median(times)), peak)


def timed_runs_with_peak(fn, repeat: int = 1):
    """(output of the last call, seconds of each of ``repeat`` calls, peak RSS MB of the
    calls), the peak-RSS mark reset first; every call waited for."""
    reset_peak_rss()
    out, times = _call_seconds(fn, repeat)
    return out, times, peak_rss_mb()


def pause(seconds: float = 2.0) -> None:
    """Sleep between two timed routes: OpenBLAS's threads keep spinning for a while after
    a scipy / numpy / faiss call and would slow the next route's first calls."""
    time.sleep(seconds)


def spread(times) -> dict:
    """{"median", "min", "max", "runs"} of a list of seconds (or ratios)."""
    t = np.asarray(times, np.float64)
    return {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max()), "runs": int(t.size)}


# ----------------------------------------------------------------------------- peak memory
_PEAKS_BEFORE_RESETS = [0.0]


def peak_rss_mb() -> float:
    """Peak resident memory since the last `reset_peak_rss` (VmHWM), else of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where not possible."""
    _PEAKS_BEFORE_RESETS.append(peak_rss_mb())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_peak_rss_mb() -> float:
    """Peak resident memory of the whole process so far, across `reset_peak_rss` calls."""
    return max(max(_PEAKS_BEFORE_RESETS), peak_rss_mb(),
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)


# ----------------------------------------------------------------------------- data
LABEL_DATASETS = ("digits", "coil20", "mpeg7")
IMAGE_DATASETS = ("coil20", "mpeg7")


def clustered(n, d, n_clusters, seed, noise=1.0):
    """Synthetic unit descriptors [n, d] float32 on short random curves around
    ``n_clusters`` centres (a manifold per class), and their labels int[n]."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d))
    # points along short random curves around each centre: a manifold per class
    labels = rng.integers(0, n_clusters, n)
    t = rng.uniform(-1, 1, size=(n, 1))
    dirs = rng.normal(size=(n_clusters, d))
    x = centers[labels] + 1.5 * t * dirs[labels] + noise * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def clustered_database(n: int, nq: int, d: int = 64):
    """The synthetic retrieval set of the scale benchmarks (bench_million, bench_defaults):
    `clustered` descriptors of n + nq points around max(10, n / 100) centres (seeded by n),
    the first n the database, the rest out-of-graph queries from the same distribution.
    Returns (database float32[n, d], queries float32[nq, d], database labels, query labels)."""
    x, labels = clustered(n + nq, d, max(10, n // 100), seed=n)
    return x[:n], x[n:], labels[:n], labels[n:]


def available_label_datasets(data_dir=None) -> list[str]:
    """digits, plus coil20 / mpeg7 when their folders exist."""
    names = ["digits"]
    try:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
    except FileNotFoundError:
        return names
    names += [n for n in ("coil20", "mpeg7") if (root / n).is_dir()]
    return names


def load_label_dataset(name: str, data_dir=None, *, images: bool = False):
    """digits, COIL-20 or MPEG-7 (descriptors and labels; ``images`` too if asked)."""
    if name == "digits":
        return load_digits(images=images)
    root = None if data_dir is None else Path(data_dir) / name
    if name == "coil20":
        return load_coil20(root, images=images)
    if name == "mpeg7":
        return load_mpeg7(root, images=images)
    raise ValueError(f"unknown data set {name!r}; choose from {LABEL_DATASETS}")


def load_image_dataset(name: str, size: int, classes: int | None = None,
                       per_class: int | None = None):
    """(grey uint8 images [n, size, size], labels int[n], protocol) of COIL-20 or MPEG-7.

    ``classes`` keeps the first classes, ``per_class`` an evenly spaced subset of each
    class (e.g. every 7th COIL pose), for quick runs.
    """
    loader = {"coil20": load_coil20, "mpeg7": load_mpeg7}[name]
    ds = loader(size=size, images=True)
    labels = np.asarray(ds.labels)
    keep = np.ones(len(labels), bool)
    if classes is not None:
        keep &= labels < classes
    if per_class is not None:
        for c in np.unique(labels[keep]):
            members = np.flatnonzero(labels == c)
            pick = members[np.linspace(0, len(members) - 1, per_class).round().astype(int)]
            drop = np.setdiff1d(members, pick)
            keep[drop] = False
    idx = np.flatnonzero(keep)
    protocol = "mAP" if name == "coil20" else "bull's-eye"
    return ds.images[idx], labels[idx], protocol


# ----------------------------------------------------------------------------- output
def write_csv(path, rows, columns=None, *, float_format: str | None = None) -> Path:
    """Rows (dicts) as CSV, atomically; ``columns`` default to every key in row order."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    return data_io.write_csv(path, rows, columns, float_format=float_format)


def write_text(path, text: str) -> Path:
    """``text`` (UTF-8) into ``path``, atomically."""
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data))


def write_json(path, obj) -> Path:
    """``obj`` as indented JSON (non-JSON values as ``str``), atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def label_axes(ax, *, xlabel: str, ylabel: str, title: str, xscale: str | None = None,
               yscale: str | None = None, legend_size: int = 8) -> None:
    """Axis labels, title, optional log scales, a light grid and the legend."""
    if xscale:
        ax.set_xscale(xscale)
    if yscale:
        ax.set_yscale(yscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(fig, path, *, dpi: int = 100) -> Path:
    """``fig`` as a PNG, atomically, then closed."""
    import matplotlib.pyplot as plt
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return out


def versions() -> dict:
    """Python, JAX and NumPy versions and the JAX backend, for a run's config."""
    import jax
    return {"python": platform.python_version(), "jax": jax.__version__,
            "numpy": np.__version__, "backend": jax.default_backend()}
