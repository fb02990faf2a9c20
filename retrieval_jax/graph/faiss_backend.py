"""faiss (``IndexFlatIP``) as the CPU backend of exact kNN search.

`faiss_knn` has the contract of `retrieval_jax.graph.neighbours.knn`: exact inner
products, each row sorted in decreasing order, the same input checks. It runs on
the host with faiss's multi-threaded BLAS kernel and returns numpy arrays, so it
is not traceable under ``jax.jit``; the JAX path (`knn`) stays the one for
accelerators and for composition with other jitted code.

faiss is optional: ``pip install faiss-cpu`` (or the ``faiss`` extra of this
package). `faiss_available` says whether it can be imported.
"""
from __future__ import annotations

import numpy as np

from .. import _checks
from .._progress import progress

_INSTALL_HINT = ("the faiss kNN backend needs faiss: pip install faiss-cpu "
                 "(or pip install 'retrieval-jax[faiss]')")


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return faiss


def faiss_available() -> bool:
    """True when faiss can be imported (``pip install faiss-cpu``)."""
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def _drop_self(sims: np.ndarray, idx: np.ndarray, first_row: int, k: int):
    """k neighbours per row out of k + 1, without the row's own item.

    Query row r is database item ``first_row + r``. When the item is among the k + 1
    returned it is removed; when it is not (another item ties with it, or the data
    are not normalised and k + 1 others score higher), the (k + 1)-th is dropped.
    The order of the remaining entries is kept (a stable sort on the self flag).
    """
    rows = first_row + np.arange(idx.shape[0])[:, None]
    is_self = idx == rows
    # self moves to the end; a row without self keeps its order and loses the last entry
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def faiss_knn(queries, database, k: int, *, exclude_self: bool = False, chunk_size: int = 65536,
              num_threads: int | None = None, show_progress: bool | None = None):
    """Exact k nearest neighbours by inner product with faiss ``IndexFlatIP``.

    sims[q, j] = <queries[q], database[idx[q, j]]>, sorted in decreasing order: the
    same result as `retrieval_jax.graph.neighbours` (up to the order of tied similarities
    and float32 rounding of the products).

    Args:
      queries: float[nq, d].
      database: float[n, d].
      k: neighbours per query, 1 <= k <= n (k <= n - 1 with ``exclude_self``).
      exclude_self: queries are the database itself (row q is item q); item q is
        never returned as its own neighbour. Searched as k + 1 neighbours with self
        removed afterwards (or the last one, when ties or unnormalised data keep
        self out of the k + 1).
      chunk_size: queries per ``index.search`` call (bounds the output buffers and
        paces the progress bar; faiss blocks its own BLAS products inside a call).
      num_threads: OpenMP threads for faiss during this call (default: faiss's
        current setting, usually every core); restored afterwards.
      show_progress: a bar over the chunks (None: only for many chunks).

    Returns:
      (similarities float32[nq, k], indices int32[nq, k]) as numpy arrays.

    Raises:
      ImportError: faiss is not installed (``pip install faiss-cpu``).
    """
    q, db, k = _checks.check_knn_args(queries, database, k, exclude_self)
    chunk_size = _checks.check_positive_int(chunk_size, "chunk_size")
    if num_threads is not None:
        num_threads = _checks.check_positive_int(num_threads, "num_threads")
    faiss = _import_faiss()

    q = np.ascontiguousarray(q, dtype=np.float32)
    db = np.ascontiguousarray(db, dtype=np.float32)
    search_k = k + 1 if exclude_self else k
    nq = q.shape[0]
    out_s = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int32)

    previous_threads = faiss.omp_get_max_threads()
    if num_threads is not None:
        faiss.omp_set_num_threads(num_threads)
    try:
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db)
        starts = range(0, nq, chunk_size)
        for start in progress(starts, desc="faiss knn", total=len(starts), enable=show_progress,
                              auto_threshold=4):
            part = q[start:start + chunk_size]
            sims, idx = index.search(part, search_k)
            if exclude_self:
                sims, idx = _drop_self(sims, idx, start, k)
            out_s[start:start + part.shape[0]] = sims
            out_i[start:start + part.shape[0]] = idx
    finally:
        if num_threads is not None:
            faiss.omp_set_num_threads(previous_threads)
    if (out_i < 0).any():  # pragma: no cover - a flat index returns every item
        raise RuntimeError("faiss returned fewer neighbours than requested")
    return out_s, out_i
