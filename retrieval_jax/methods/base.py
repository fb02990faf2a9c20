"""What every ranking method shares: the `Method` record, the query checks, similarities.

As optax gives every optimiser an (init, update) pair, every ranking method here is a
`Method` of pure functions:

* ``build(database, config) -> state`` runs offline, on the host where it must (graph
  construction decides array shapes), and returns a pytree ``state`` whose config is
  static metadata;
* ``search(state, queries) -> scores`` is jitted: float[nq, d] descriptors -> scores
  float32[nq, n], higher is better;
* ``search_items(state, ids) -> scores`` ranks from database items used as queries.

``search`` pads the query batch to a few bucket sizes (`bucket_size`), so a stream of
batches of varying size compiles a handful of programs, not one per size.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._precision import HIGHEST
from .. import _checks, defaults
from ..graph.core import Graph
from ..graph.neighbours import SEARCH_METHODS, knn_graph
from .options import Option, finite_float, positive_int



class Method(NamedTuple):
    """A ranking method: ``build`` offline, ``search`` / ``search_items`` jitted online.

    ``config_type`` is the config class ``build`` accepts (a frozen dataclass whose fields
    may declare user options, see `options`); a config of another method is refused with a
    clear error. The optional rest:

    * ``check_sizes(config, n)``: raises ValueError when a size of ``config`` does not fit a
      database of n items (the checks ``build`` runs before any work);
    * ``from_graph(database, graph, config)``: a state on a kNN affinity graph made elsewhere
      (a graph method: its config has k, gamma, mutual and graph_method, see `config_graph`);
    * ``unreached``: items scoring at most this fraction of a query's best score were never
      reached (outside the query's graph component); rankings put them after the reached
      ones in similarity order. None: every score ranks;
    * ``summary``: the method in one line, for listings.
    """

    name: str
    build: Callable[..., Any]
    search: Callable[[Any, Any], jax.Array]
    search_items: Callable[[Any, Any], jax.Array]
    config_type: type | None = None
    check_sizes: Callable[[Any, int], None] | None = None
    from_graph: Callable[..., Any] | None = None
    unreached: float | None = None
    summary: str = ""


def database_state(cls):
    """Class decorator of a state that holds ``database`` (an array leaf) and its
    ``config`` (static): a frozen dataclass registered as a pytree."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=["database"], meta_fields=["config"])


def check_config(config, config_type: type, method: str):
    """``config`` if it is a ``config_type``, else a TypeError naming both."""
    if not isinstance(config, config_type):
        raise TypeError(f"the {method} method takes a {config_type.__name__}, got "
                        f"{type(config).__name__}; build each method with its own config")
    return config


def check_queries(state, queries):
    """Validated float32[nq, d] queries for a state holding ``database`` [n, d].

    Under a trace the shape and dtype are checked at trace time and the values when the
    computation runs (NaN or inf rows fail the call, `_checks.raise_rows_when_run`)."""
    traced = isinstance(queries, jax.core.Tracer)
    if _checks.is_traced(queries) and not traced:
        return queries   # spans other processes' devices: checked by its single-process entry
    if traced:
        if queries.ndim != 2:
            raise ValueError(f"queries must be a 2-D array [n_queries, d], got shape {tuple(queries.shape)}")
        _checks.check_real_dtype(queries, "queries")
        q = queries
    else:
        q = _checks.as_matrix(queries, "queries")
    if q.shape[1] != state.database.shape[1]:
        raise ValueError(f"dimension mismatch: queries have d = {q.shape[1]} but the database "
                         f"has d = {state.database.shape[1]}; use the same descriptor pipeline")
    if traced:
        _checks.raise_rows_when_run(jnp.all(jnp.isfinite(q), axis=1),
                                    lambda count, first: f"queries contain NaN or inf in {count} row(s) "
                                                         f"(first: row {first})")
        return q.astype(jnp.float32)   # as the concrete path's as_matrix
    return jnp.asarray(q)


def check_items(state, ids):
    """Validated int32[nq] database ids in [0, n) (integer dtype only: no silent cast).

    Under a trace the shape and dtype are checked at trace time and the range when the
    computation runs."""
    traced = isinstance(ids, jax.core.Tracer)
    if _checks.is_traced(ids) and not traced:
        return ids
    if not traced:
        ids = np.asarray(ids)
    n = state.database.shape[0]
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be a 1-D integer array of database ids, got {ids.dtype} {tuple(ids.shape)}")
    if traced:
        _checks.raise_rows_when_run((ids >= 0) & (ids < n),
                                    lambda count, first: f"ids must lie in [0, {n}): {count} do not "
                                                         f"(first: position {first})")
        return ids.astype(jnp.int32)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"ids must lie in [0, {n}), got range [{ids.min()}, {ids.max()}]")
    return jnp.asarray(ids, jnp.int32)


def check_database_graph(database, graph):
    """(database float32[n, d], graph) for a state built on a graph made elsewhere: a `Graph`
    with one node per database item, and the k of a graph build (< n) checked by the caller."""
    db = _checks.as_matrix(database, "database")
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    if graph.num_nodes != db.shape[0]:
        raise ValueError(f"the graph has {graph.num_nodes} nodes but the database has {db.shape[0]} items")
    return db, graph


def config_graph(database, config, *, show_progress=None) -> Graph:
    """The kNN affinity graph a graph method's config asks for (its k, gamma, mutual and
    graph_method), over validated database descriptors."""
    return knn_graph(database, config.k, gamma=config.gamma, mutual=config.mutual,
                     method=config.graph_method, show_progress=show_progress)


def checked_database(database, config, config_type, method_name: str) -> np.ndarray:
    """A method's ``build`` inputs checked: ``config`` of ``config_type``, and the database
    descriptors as a float32 host matrix [n, d] (finite, 2-D, non-empty; the graph
    search runs on the host, so it stays there until a state stores it)."""
    check_config(config, config_type, method_name)
    return _checks.as_matrix(database, "database")


def database_and_graph(database, config, config_type, method_name: str, check_sizes=None, *,
                       show_progress=None) -> tuple[np.ndarray, Graph]:
    """The first half of a graph method's ``build``: the config checked (its type, the
    graph's k < n, and ``check_sizes(config, n)`` for the method's own sizes), the
    database as a float matrix [n, d] and its kNN graph (`config_graph`)."""
    db = checked_database(database, config, config_type, method_name)
    n = db.shape[0]
    check_graph_k(config.k, n)
    if check_sizes is not None:
        check_sizes(config, n)
    return db, config_graph(db, config, show_progress=show_progress)


def check_graph_k(k, n: int) -> int:
    """The graph's k for n database items: 1 <= k < n."""
    return _checks.check_k(k, n - 1, name="k", what="other database items (graph k must be < n)")


def with_graph_k(check_sizes=None):
    """A graph method's ``Method.check_sizes``: the graph's k < n (`check_graph_k`), then the
    method's own ``check_sizes(config, n)``, as `database_and_graph` checks them."""
    def check(config, n: int) -> None:
        check_graph_k(config.k, n)
        if check_sizes is not None:
            check_sizes(config, n)
    return check


# The options the graph methods' configs share (see `options`): the graph's k, gamma, mutual
# and graph_method (`config_graph`), the out-of-graph query's query_k, and alpha.
GRAPH_OPTIONS = {
    "k": Option("graph neighbours; without it k = round(n^(1/3) / 2), at least 3, at most 50 "
                "(3 up to ~340 items, 6 for 1400, 50 at a million: Iscen et al.'s k = 50 suits "
                "large collections, not a small folder); a k large for n is warned about",
                parse=positive_int, choose=lambda n, values: defaults.default_k(n),
                rule="round(n^(1/3) / 2), at least 3, at most 50",
                warn=lambda k, n: defaults.k_warning(k, n) if n >= 2 else None),
    "gamma": Option("similarity exponent", parse=finite_float),
    "mutual": Option("keep reciprocal neighbour pairs only (Iscen et al.'s mutual kNN graph)"),
    "graph_method": Option("neighbour search: auto (faiss on a CPU host where it is installed, else the "
                           "JAX search), exact (blocked matmul + top-k), nndescent (approximate "
                           "pynndescent, for large n), faiss (faiss-cpu, exact); see "
                           "retrieval_jax.graph.knn_graph", choices=SEARCH_METHODS),
    "query_k": Option("database neighbours forming an out-of-graph query (default min(10, k))",
                      parse=positive_int, choose=lambda n, values: defaults.default_query_k(values["k"], n),
                      rule="min(10, k)"),
    "alpha": Option("diffusion alpha in (0, 1)", parse=finite_float),
}


def similarities(state, queries):
    """Inner products <q, x_j> of queries [nq, d] with the state's database [n, d]: [nq, n]."""
    return jnp.matmul(queries.astype(jnp.float32), state.database.T, precision=HIGHEST)


def top_k_scores(scores, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row of query-database scores [nq, n], best first:
    (values [nq, k], ids int32[nq, k]), as ``lax.top_k(scores, k)``, behind an optimisation barrier.

    A re-ranking method's jitted search computes S = Q X^T [nq, n], takes each query's
    shortlist by top-k and works on from there. XLA on CPU may fuse the [nq, n] product
    into the work that follows the top-k, and the whole search then runs many times
    slower at large n (query expansion, k-reciprocal and GNN re-ranking; measured with
    and without the barrier for every method by ``experiments/bench_top_k.py``, see
    docs/benchmarks/bench_top_k.md: methods where it does not help keep ``lax.top_k``).
    ``lax.optimization_barrier`` on (values, ids) keeps the product and the top-k a
    program of their own. It changes no value (the same product and top-k, bit for bit),
    and works under jit / vmap (``k`` static, 1 <= k <= n, unchecked).
    """
    return jax.lax.optimization_barrier(jax.lax.top_k(scores, k))


def top_similar(queries, database, k: int, exclude=None) -> tuple[jax.Array, jax.Array]:
    """Each query's k most similar database items by inner product: (sims float32[nq, k], ids int32[nq, k]).

        sims[q, j] = <q, x_ids[q, j]>, the k largest of <q, x> over the database (`top_k_scores`)

    Args:
      queries: float[nq, d].
      database: float[n, d].
      k: 1 <= k <= n (static; unchecked, less one with ``exclude``).
      exclude: optional int[nq]; database item ``exclude[q]`` is never among q's results
        (a database item ranked as a query, left out of its own neighbours).
    """
    sims = jnp.matmul(jnp.asarray(queries, jnp.float32), database.T, precision=HIGHEST)
    if exclude is not None:
        sims = sims.at[jnp.arange(sims.shape[0]), exclude].set(-jnp.inf)
    return top_k_scores(sims, k)


BUCKETS_PER_OCTAVE_FROM = 64
"""Above this many queries `bucket_size` steps by a quarter octave instead of an octave."""


def bucket_size(nq: int) -> int:
    """The padded batch size for nq queries.

    Up to `BUCKETS_PER_OCTAVE_FROM`: the next power of two (at least 8). Above it, the
    next multiple of a quarter of the octave's lower power of two (80, 96, 112, 128,
    160, 192, 224, 256, 320, ...): four programs per doubling of the batch, and padding
    of at most a quarter of the batch where the next power of two padded 200 queries
    to 256 (a search's cost is linear in the padded batch).
    """
    nq = max(1, int(nq))
    if nq <= BUCKETS_PER_OCTAVE_FROM:
        return max(8, 1 << (nq - 1).bit_length())
    step = 1 << ((nq - 1).bit_length() - 3)
    return -(-nq // step) * step


def padded(fn: Callable[[Any, jax.Array], jax.Array]) -> Callable[[Any, jax.Array], jax.Array]:
    """Wrap a jitted ``fn(state, batch)`` so concrete batches are padded to `bucket_size`.

    Padding rows repeat the first row; their outputs are dropped. The batch (queries
    [nq, d] or ids [nq], small) is padded on the host, so a new batch size compiles no
    eager padding ops. Under a trace the batch passes through unchanged (its size is
    already fixed by the caller).
    """
    def run(state, batch):
        if _checks.is_traced(batch) or batch.shape[0] == 0:
            return fn(state, batch)
        nq = batch.shape[0]
        size = bucket_size(nq)
        if size != nq:
            rows = np.asarray(batch)
            pad = np.broadcast_to(rows[:1], (size - nq,) + rows.shape[1:])
            batch = jax.device_put(np.concatenate([rows, pad]))   # a transfer; jnp.asarray compiles per shape
        return fn(state, batch)[:nq]
    return run


def make_method(name: str, build, search_jit, search_items_jit, config_type: type, **extra) -> Method:
    """A `Method` whose online calls check their input and pad the batch to a bucket size;
    ``extra``: its optional fields (check_sizes, from_graph, unreached, summary)."""
    search = padded(search_jit)
    search_items = padded(search_items_jit)
    return Method(
        name,
        build,
        lambda state, q: search(state, check_queries(state, q)),
        lambda state, ids: search_items(state, check_items(state, ids)),
        config_type,
        **extra,
    )


def rerank_shortlist(scores, shortlist, shortlist_scores) -> jax.Array:
    """Scores float32[nq, n] that rank a re-ranked shortlist first, the rest after it.

    A re-ranking method scores only the top M items of a first search (its shortlist); a
    `Method` still returns a score for every database item. Items of the shortlist get
    ``shortlist_scores``; every other item keeps its first-search score shifted down by a
    per-row constant so that it ranks after the whole shortlist, in its first-search order:

        out[q, shortlist[q, m]] = shortlist_scores[q, m]
        out[q, j] = scores[q, j] - (max_j' scores[q, j'] - min_m shortlist_scores[q, m]) - 1,  j not listed

    Args:
      scores: float[nq, n] first-search scores (higher is better).
      shortlist: int[nq, M] database ids of each query's shortlist (distinct within a row).
      shortlist_scores: float[nq, M] the re-ranked scores of the shortlist.

    Returns:
      float32[nq, n]. Works under jit / vmap / grad (M is static through the shapes).
    """
    scores = jnp.asarray(scores, jnp.float32)
    new = jnp.asarray(shortlist_scores, jnp.float32)
    rows = jnp.arange(scores.shape[0])[:, None]
    offset = jnp.max(scores, axis=1, keepdims=True) - jnp.min(new, axis=1, keepdims=True) + 1.0
    out = scores - offset
    return out.at[rows, shortlist].set(new)
