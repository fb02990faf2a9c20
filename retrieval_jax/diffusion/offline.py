"""Offline diffusion: one truncated diffusion per database item, computed once.

Yang, Hinami, Matsui, Ly & Satoh, "Efficient Image Retrieval via Decoupling
Diffusion into Online and Offline Processing" (AAAI 2019). Offline, every database
item i solves

    (I - alpha W_SS) x = e_i   on S = its T nearest items (by descriptor similarity),

with W_SS the rows and columns of the normalised graph W in S (edges leaving S are
dropped; "late truncation": the graph is the whole database's). The solution is kept
as a sparse row of the largest L entries (`OfflineRows`, [n, L] ids and values).
Online, a query costs no solve:

* ``direct`` (the paper): the query's scores are the similarity-weighted sum of the
  offline rows of its k nearest database items, sum_j max(s_j, 0)^gamma x_{nn_j};
* ``cosine`` (the published code's ``search``): rows are L2-normalised and the score
  of database item j is the cosine between the query's row and row j.

The offline pass runs in chunks of items (a jitted call each: the T-NN shortlists by
`retrieval_jax.graph.neighbours`, then ``lax.map`` over batches of ``vmap``-ed CG solves on
the [T, K] subgraphs), so peak memory is O(chunk * T * K), not O(n * T); only the
[n, L] rows are kept. `save_offline` / `load_offline` store them like a graph.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._progress import progress
from ..graph.core import Graph, neighbour_product
from ..graph.neighbours import knn_traced
from .operator import DiffusionOperator, check_normalized
from .solvers import CG, solve_unchecked

__all__ = ["OfflineInfo", "OfflineRows", "cosine_scores", "direct_scores", "load_offline", "offline_nbytes",
           "offline_rows", "save_offline", "unit_rows"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OfflineRows:
    """Sparse offline diffusion rows: row i holds item i's L largest diffusion scores.

    Attributes:
      indices: int32[n, L] database ids of row i's entries (distinct within a row).
      values: float32[n, L] their diffusion scores x_i[indices[i, l]].

    Every other entry of row i is zero (outside item i's T-shortlist, or cut by L).
    """

    indices: jax.Array
    values: jax.Array

    @property
    def num_rows(self) -> int:
        return self.indices.shape[0]

    @property
    def top_l(self) -> int:
        return self.indices.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the rows (ids and values)."""
        return offline_nbytes(self.num_rows, self.top_l)

    def to_dense(self) -> np.ndarray:
        """The rows as a dense float32[n, n] numpy array (small n only: tests, checks)."""
        idx = np.asarray(self.indices)
        out = np.zeros((idx.shape[0], idx.shape[0]), np.float32)
        np.put_along_axis(out, idx, np.asarray(self.values, np.float32), axis=1)
        return out


class OfflineInfo(NamedTuple):
    """How the offline pass went: CG steps and final relative residual per item, the
    seconds it took, the bytes of the kept rows and the largest chunk's working set."""

    iterations: np.ndarray
    residual: np.ndarray
    seconds: float
    nbytes: int
    chunk_nbytes: int


def offline_nbytes(n: int, top_l: int) -> int:
    """Memory of n offline rows of L entries: int32 ids + float32 values."""
    return int(n) * int(top_l) * 8


# --------------------------------------------------------------------------- offline
def _local_subgraph(graph: Graph, s):
    """Neighbour lists of the nodes ``s`` [T] as positions in ``s`` (edges leaving s get weight 0).

    The positions are found by binary search in the sorted shortlist: O(T K log T)
    work and memory, independent of the number of graph nodes.
    """
    t = s.shape[0]
    order = jnp.argsort(s)
    srt = s[order]
    nb = graph.indices[s]
    pos = jnp.clip(jnp.searchsorted(srt, nb), 0, t - 1)
    inside = srt[pos] == nb
    local = jnp.where(inside, order[pos], jnp.arange(t, dtype=order.dtype)[:, None]).astype(jnp.int32)
    w = jnp.where(inside, graph.weights[s], 0.0)
    return local, w


@functools.partial(jax.jit, static_argnames=("max_iter", "batch_size", "top_l"))
def _offline_chunk(graph: Graph, shortlist, alpha, tol, *, max_iter: int, batch_size: int, top_l: int):
    """Offline rows of a chunk: shortlist int32[c, T] with the item itself first.

    Returns (ids int32[c, L], values float32[c, L], iterations int32[c], residual float32[c]).
    """
    t = shortlist.shape[1]
    e0 = jnp.zeros((t,), jnp.float32).at[0].set(1.0)

    solver = CG(tol, max_iter)

    def one(s):
        local, w = _local_subgraph(graph, s)
        sol = solve_unchecked(DiffusionOperator(graph=Graph(indices=local, weights=w), alpha=alpha), e0[None],
                              solver)
        x = sol.scores[0]
        if top_l < t:
            vals, pos = jax.lax.top_k(x, top_l)
            ids = s[pos]
        else:
            vals, ids = x, s
        return ids, vals, sol.iterations[0], sol.residual[0]

    return jax.lax.map(one, shortlist, batch_size=min(batch_size, shortlist.shape[0]))


_shortlists = jax.jit(knn_traced, static_argnames=("k", "exclude_self", "block_size"))


def _self_first(ids: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Shortlists with each item at position 0 (a duplicate descriptor may outrank it)."""
    is_self = ids == items[:, None]
    has = is_self.any(axis=1)
    order = np.argsort(~is_self, axis=1, kind="stable")
    moved = np.take_along_axis(ids, order, axis=1)
    # an item missing from its own shortlist (exact ties beyond T) takes the last slot's place
    missing = np.concatenate([items[:, None], ids[:, :-1]], axis=1)
    return np.where(has[:, None], moved, missing).astype(np.int32)


def offline_rows(graph: Graph, database, truncate: int, *, alpha: float = 0.99, tol: float = 1e-6,
                 max_iter: int = 20, top_l: int | None = None, chunk_size: int = 1024,
                 batch_size: int = 64, show_progress: bool | None = None,
                 return_info: bool = False, items=None):
    """Offline truncated diffusion rows for every database item (or for ``items``).

    Item i's shortlist S_i is itself followed by its T - 1 most similar database items
    (inner products of ``database`` rows, exact `knn`); it solves
    (I - alpha W_SS) x = e_i on S_i by CG (``tol``, ``max_iter``; the published code
    uses rtol 1e-6 and 20 steps) and keeps the ``top_l`` largest entries of x.

    Args:
      graph: the normalised graph W (``normalize(knn_graph(database, k))``) on n nodes.
      database: float[n, d] descriptors, the graph's nodes in order.
      truncate: T, shortlist size, 1 <= T <= n.
      top_l: entries kept per row, 1 <= L <= T (default T: the whole shortlist).
      chunk_size: items per jitted call (bounds memory: the chunk's [c, T] shortlists
        and [c, T, K] subgraphs); a progress bar shows past 20 chunks.
      batch_size: subproblems solved side by side (``vmap``) inside a chunk.
      return_info: also return an `OfflineInfo`.
      items: optional int[m] database ids: only their rows are computed (row r of the
        result is item ``items[r]``'s), e.g. to time the offline step on a sample of a
        large collection or to refresh part of an index.

    Returns:
      `OfflineRows` ([n, L], or [m, L] with ``items``) (and `OfflineInfo`).
    """
    graph = check_normalized(graph)
    db = _checks.as_matrix(database, "database")
    n = db.shape[0]
    if graph.num_nodes != n:
        raise ValueError(f"the graph has {graph.num_nodes} nodes but the database has {n} items")
    alpha = _checks.check_alpha(alpha)
    _checks.check_tolerance(tol, "tol")
    max_iter = _checks.check_positive_int(max_iter, "max_iter")
    t = _checks.check_k(truncate, n, name="truncate")
    top_l = t if top_l is None else _checks.check_k(top_l, t, name="top_l", what="shortlist items (top_l <= truncate)")
    if items is None:
        todo = np.arange(n)
    else:
        items = np.asarray(items)
        _checks.check_node_ids(items, n, "items")
        if items.ndim != 1:
            raise ValueError(f"items must be a 1-D array of database ids, got shape {items.shape}")
        todo = items.astype(np.int64)
    total = todo.shape[0]
    if total == 0:
        raise ValueError("items is empty: no offline row to compute")
    chunk = min(_checks.check_positive_int(chunk_size, "chunk_size"), total)
    n_chunks = -(-total // chunk)
    chunk = -(-total // n_chunks)  # equal chunks: the last one pads as little as possible
    batch = _checks.check_positive_int(batch_size, "batch_size")

    t0 = time.perf_counter()
    db_j = jnp.asarray(db)
    ids_out = np.empty((total, top_l), np.int32)
    vals_out = np.empty((total, top_l), np.float32)
    its = np.empty((total,), np.int32)
    resid = np.empty((total,), np.float32)
    starts = range(0, total, chunk)
    for start in progress(starts, desc="offline diffusion", total=len(starts), enable=show_progress):
        ids = todo[np.arange(start, start + chunk) % total]  # the last chunk wraps: one compiled shape
        _, nn = _shortlists(db_j[ids], db_j, k=t)  # the database was checked above: no second scan
        short = jnp.asarray(_self_first(np.asarray(nn), ids))
        i, v, it, r = _offline_chunk(graph, short, jnp.float32(alpha), jnp.float32(tol), max_iter=max_iter,
                                     batch_size=batch, top_l=top_l)
        m = min(chunk, total - start)
        ids_out[start:start + m] = np.asarray(i)[:m]
        vals_out[start:start + m] = np.asarray(v)[:m]
        its[start:start + m] = np.asarray(it)[:m]
        resid[start:start + m] = np.asarray(r)[:m]
    rows = OfflineRows(indices=jnp.asarray(ids_out), values=jnp.asarray(vals_out))
    if not return_info:
        return rows
    k = graph.max_degree
    # per chunk: similarities of a knn block, the shortlists, and the batch's [T, K] subgraphs
    chunk_nbytes = chunk * t * 8 + min(256, chunk) * n * 4 + min(batch, chunk) * t * (k * 8 + 6 * 4)
    return rows, OfflineInfo(its, resid, time.perf_counter() - t0, rows.nbytes, int(chunk_nbytes))


# --------------------------------------------------------------------------- online
def unit_rows(rows: OfflineRows) -> OfflineRows:
    """The rows L2-normalised (an all-zero row stays zero)."""
    v = rows.values
    norm = jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True))
    return OfflineRows(indices=rows.indices, values=jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), 0.0))


def direct_scores(rows: OfflineRows, weights, neighbours, *, batch_size: int = 256):
    """Weighted combinations of offline rows, dense: out[q] = sum_j weights[q, j] rows[neighbours[q, j]].

    Args:
      rows: `OfflineRows` on n items.
      weights: float[nq, m] (the query's max(s, 0)^gamma).
      neighbours: int[nq, m] database ids.
      batch_size: queries scattered at once (memory O(batch * m * L)).

    Returns:
      float32[nq, n].
    """
    weights = jnp.asarray(weights, jnp.float32)
    neighbours = jnp.asarray(neighbours, jnp.int32)
    n = rows.num_rows

    def one(args):
        w, nb = args
        vals = (w[:, None] * rows.values[nb]).ravel()
        return jnp.zeros((n,), jnp.float32).at[rows.indices[nb].ravel()].add(vals)

    return jax.lax.map(one, (weights, neighbours), batch_size=max(1, min(batch_size, weights.shape[0])))


# up to this many n * n entries, cosine scoring densifies the rows and runs one matmul
DENSE_COSINE_MAX_ENTRIES = 2 ** 24


def cosine_scores(unit: OfflineRows, query_rows, *, dense: bool | None = None):
    """Cosines between dense query rows [nq, n] and the L2-normalised offline rows: [nq, n].

    ``query_rows`` need not be normalised (each is scaled to unit length here; a zero
    row scores 0). With ``dense`` (default: n * n <= ``DENSE_COSINE_MAX_ENTRIES``) the
    rows are scattered into an [n, n] matrix and multiplied at once; otherwise row j's
    score sum_l unit.values[j, l] * q[unit.indices[j, l]] is accumulated one slot l at a
    time (`graph.core.neighbour_product`, the loop of `Graph.matvec`, without building a
    `Graph` and checking its ids on every call: no [nq, n, L] intermediate, memory O(nq * n)).
    """
    q = jnp.asarray(query_rows, jnp.float32)
    norm = jnp.sqrt(jnp.sum(q * q, axis=1, keepdims=True))
    q = jnp.where(norm > 0, q / jnp.where(norm > 0, norm, 1.0), 0.0)
    n = unit.num_rows
    if dense is None:
        dense = n * n <= DENSE_COSINE_MAX_ENTRIES
    if dense:
        m = jnp.zeros((n, n), jnp.float32).at[jnp.arange(n)[:, None], unit.indices].set(unit.values)
        return jnp.matmul(q, m.T, precision=jax.lax.Precision.HIGHEST)
    return neighbour_product(unit.indices, unit.values, q.T).T


# --------------------------------------------------------------------------- storage
_RESERVED = ("indices", "values")


def save_offline(path, rows: OfflineRows, **meta) -> Path:
    """Write offline rows (indices, values) and scalar metadata (truncate, alpha...) to an .npz file.

    Written to a temporary name and renamed (`retrieval_jax.files.atomic_write`), so
    a crash never leaves a half-written file.
    """
    from ..files import atomic_write

    if not isinstance(rows, OfflineRows):
        raise TypeError(f"rows must be OfflineRows, got {type(rows).__name__}")
    for key in _RESERVED:
        if key in meta:
            raise ValueError(f"metadata key {key!r} is reserved for the offline arrays")
    arrays = {"indices": np.asarray(rows.indices, np.int32), "values": np.asarray(rows.values, np.float32),
              **{k: np.asarray(v) for k, v in meta.items()}}
    for k, v in arrays.items():
        if v.dtype == object:
            raise ValueError(f"metadata {k!r} is not a plain array or scalar")
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_offline(path, *, num_rows: int | None = None) -> tuple[OfflineRows, dict]:
    """Read rows written by `save_offline` -> (OfflineRows, metadata dict).

    Never unpickles. Checks int ``indices`` and float ``values`` of the same [n, L]
    shape, ids in [0, n), finite values and (when given) ``num_rows`` rows; raises
    ValueError naming the problem otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"offline diffusion file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"offline diffusion file {path} is not a readable .npz file ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"offline diffusion file {path} is a single array, not an .npz archive")
    try:
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"offline diffusion file {path} is damaged ({exc})") from exc
    if "indices" not in arrays or "values" not in arrays:
        raise ValueError(f"offline diffusion file {path} has no 'indices' / 'values' arrays "
                         f"(found {sorted(arrays)}); write it with save_offline")
    idx, val = arrays.pop("indices"), arrays.pop("values")
    meta = {k: v[()] for k, v in arrays.items()}
    if (idx.ndim != 2 or idx.shape != val.shape or idx.dtype.kind not in "iu" or val.dtype.kind != "f"
            or idx.shape[1] == 0):
        raise ValueError(f"offline diffusion file {path}: indices / values must be int and float arrays of "
                         f"the same shape [n, L], L >= 1, got {idx.dtype}{list(idx.shape)} and "
                         f"{val.dtype}{list(val.shape)}")
    n = idx.shape[0]
    if num_rows is not None and n != num_rows:
        raise ValueError(f"offline diffusion file {path} has {n} rows but the database has {num_rows} items; "
                         "compute the rows from the same descriptors")
    if idx.shape[1] > n:
        raise ValueError(f"offline diffusion file {path} has rows of {idx.shape[1]} entries for {n} items")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"offline diffusion file {path} has item ids outside [0, {n})")
    if not np.isfinite(val).all():
        raise ValueError(f"offline diffusion file {path} has non-finite values")
    srt = np.sort(idx, axis=1)
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise ValueError(f"offline diffusion file {path} repeats an item id within a row")
    return OfflineRows(indices=jnp.asarray(idx, jnp.int32), values=jnp.asarray(val, jnp.float32)), meta
