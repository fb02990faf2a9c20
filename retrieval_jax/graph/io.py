"""Saving and loading graphs (an offline index) as .npz, atomically."""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .. import _checks
from .core import Graph, NormalizedGraph, check_normalized_rows
from .order import LOCALITY_MIN_NODES, with_locality

NORMALIZED_KEY = "normalized"
"""The archive entry (a bool) by which `save_graph` records that the graph is a `NormalizedGraph`."""
_RESERVED = ("indices", "weights", NORMALIZED_KEY)


def save_graph(path, graph: Graph, **meta) -> Path:
    """Write ``graph`` (indices, weights) and scalar metadata (k, gamma...) to an .npz file.

    A `NormalizedGraph` is recorded as such (entry ``normalized``), and `load_graph`
    returns it as one. The file is written to a temporary name and renamed, so a crash
    never leaves a half-written graph.

    A graph built with a fixed capacity that overflowed (edges lost, see
    `Graph.check_overflow`) is refused: the file would not record the loss.

    Raises:
      TypeError: ``graph`` is not a concrete `Graph` (e.g. a traced one, inside
        ``jax.jit``), or a metadata value is not a number, string or array of them
        (the archive stores no pickled Python objects, which `load_graph` refuses).
      ValueError: a metadata key is reserved (indices, weights, normalized), or the
        graph overflowed its capacity (rebuild it with a larger ``max_degree``).
    """
    from ..files import atomic_write

    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    if _checks.is_traced(graph.indices, graph.weights, graph.overflow):
        raise TypeError("save_graph needs a concrete graph, got a traced one: return the graph from the "
                        "jitted function and save it outside jax.jit")
    try:
        graph.check_overflow()
    except ValueError as exc:
        raise ValueError(f"refusing to save an incomplete graph: {exc}") from None
    for key in _RESERVED:
        if key in meta:
            raise ValueError(f"metadata key {key!r} is reserved for the graph itself")
    stored = {}
    for key, value in meta.items():
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.dtype.kind == "O":
            raise TypeError(f"metadata {key!r} must be a number, string or array of them, got "
                            f"{type(value).__name__}: the archive stores no Python objects (load_graph "
                            "refuses them); convert it, e.g. str(value) or np.asarray(value, float)")
        stored[key] = arr
    arrays = {"indices": np.asarray(graph.indices, np.int32), "weights": np.asarray(graph.weights, np.float32),
              **stored}
    if isinstance(graph, NormalizedGraph):
        arrays[NORMALIZED_KEY] = np.bool_(True)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_graph(path, *, num_nodes: int | None = None, mmap: bool = False) -> tuple[Graph, dict]:
    """Read a graph written by `save_graph` -> (Graph, metadata dict).

    Checks that it holds int ``indices`` and float ``weights`` of the same [n, K]
    shape, neighbour ids in [0, n), finite non-negative weights, and (when given)
    ``num_nodes`` nodes; raises ValueError naming the file and the problem
    otherwise, a truncated or corrupt archive included (see `retrieval_jax.files.read_npz`).

    A graph saved as a `NormalizedGraph` is checked once here to be one (symmetric,
    largest eigenvalue at most 1: `check_normalized_rows`, O(n K) per power-iteration
    step, in blocks) and returned as a `NormalizedGraph`, which the diffusion solvers
    then take without checking it again at every call; from `LOCALITY_MIN_NODES` nodes
    on it carries its `LocalityLayout`, as `normalize` gives it. Any other graph is a
    `Graph`.

    With ``mmap=True`` the arrays stay in the file: the graph's ``indices`` and
    ``weights`` are read-only ``np.memmap`` views (int32 / float32, as `save_graph`
    writes them), checked in blocks of rows without a full copy; host work
    (``to_scipy``, `locality_order`) reads them from the page cache, and a JAX
    function copies them to the device when it is called. Otherwise they are read
    into device arrays.
    """
    from ..files import read_npz

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graph file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise ValueError(f"graph {path} is a single array, not an .npz archive of indices and weights")
    # read_npz checks the archive's declared sizes against the file before allocating and
    # turns truncated or corrupt bytes (bad zip, CRC, .npy header) into a ValueError.
    try:
        arrays = read_npz(path, mmap=mmap)
    except ValueError as exc:
        raise ValueError(f"graph {exc}") from exc  # the message starts with the path
    if "indices" not in arrays or "weights" not in arrays:
        raise ValueError(f"graph {path} has no 'indices' / 'weights' arrays (found {sorted(arrays)}); "
                         "write it with save_graph or `retrieval-jax graph`")
    idx, w = arrays.pop("indices"), arrays.pop("weights")
    flag = arrays.pop(NORMALIZED_KEY, None)
    if flag is not None and (flag.shape != () or flag.dtype != np.bool_):
        raise ValueError(f"graph {path}: the {NORMALIZED_KEY!r} entry must be one bool, got "
                         f"{flag.dtype}{list(flag.shape)}")
    normalized = bool(flag) if flag is not None else False
    meta = {k: v[()] for k, v in arrays.items()}
    if idx.ndim != 2 or idx.shape != w.shape or idx.dtype.kind not in "iu" or w.dtype.kind != "f":
        raise ValueError(f"graph {path}: indices / weights must be int and float arrays of the same "
                         f"shape [n, K], got {idx.dtype}{list(idx.shape)} and {w.dtype}{list(w.shape)}")
    n = idx.shape[0]
    if num_nodes is not None and n != num_nodes:
        raise ValueError(f"graph {path} has {n} nodes but {num_nodes} were expected; "
                         "build the graph from the same descriptors")
    if mmap and (idx.dtype != np.int32 or w.dtype != np.float32):
        raise ValueError(f"graph {path}: mmap needs int32 indices and float32 weights (save_graph's), "
                         f"got {idx.dtype} and {w.dtype}; load it with mmap=False")
    rows = max(1, 2 ** 22 // max(1, idx.shape[1]))   # check in blocks: no temporaries of the file's size
    for start in range(0, n, rows):
        ib, wb = idx[start:start + rows], w[start:start + rows]
        if ib.size and (ib.min() < 0 or ib.max() >= n):
            raise ValueError(f"graph {path} has neighbour ids outside [0, {n})")
        if not np.isfinite(wb).all() or (wb < 0).any():
            raise ValueError(f"graph {path} has negative or non-finite weights")
    graph_type = Graph
    if normalized:
        try:
            check_normalized_rows(idx, w)
        except ValueError as exc:
            raise ValueError(f"graph {path} was saved as a NormalizedGraph, but {exc}") from None
        graph_type = NormalizedGraph
    if not mmap:
        idx, w = jnp.asarray(idx, jnp.int32), jnp.asarray(w, jnp.float32)
    graph = graph_type(indices=idx, weights=w)
    if graph_type is NormalizedGraph and n >= LOCALITY_MIN_NODES:
        graph = with_locality(graph)   # as normalize does: the CG routes solve in this layout
    return graph, meta
