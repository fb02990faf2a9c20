"""k-reciprocal re-ranking (Zhong, Zheng, Cao & Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017) on a top-M shortlist, with sparse database encodings.

With L2-normalised descriptors the distance is the squared Euclidean one,
d(p, g) = ||x_p - x_g||^2 = 2 - 2 <x_p, x_g> (the authors' code squares its Euclidean
distances; it also divides each row by its maximum over probe + gallery, which this module
does not: with unit vectors d already lies in [0, 4]). The ranking list of p starts with p
itself (d = 0), so N(p, k) holds p and its k nearest other items, and

    R(p, k)  = {g in N(p, k) : p in N(g, k)}                                (k-reciprocal set)
    R*(p)    = R(p, k1) u R(c, h) for every c in R(p, k1) with |R(p, k1) n R(c, h)| > 2/3 |R(c, h)|,
               h = round(k1 / 2)                                            (expansion)
    V_p[g]   = exp(-d(p, g)) / sum_{g' in R*(p)} exp(-d(p, g')),  g in R*(p); 0 elsewhere
    V'_p     = (1 / k2) sum_{g in N(p, k2 - 1)} V_g                         (local query expansion)
    d_J(p, g) = 1 - sum_j min(V'_p[j], V'_g[j]) / sum_j max(V'_p[j], V'_g[j])
    d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g)

with the paper's k1 = 20, k2 = 6, lambda = 0.3 (the normalisation of V_p by its sum and
h = round(k1 / 2) are the authors' code). The score is -d*, higher is better.

Nothing here is [N, N]. ``build`` computes, over the database alone, every item's kNN list
(blocked search), its sets and its encodings V and V' kept sparse: at most ``capacity``
entries of V and ``qe_capacity`` of V' per item (the largest; ``state.overflow`` counts the
entries dropped, 0 when everything fits). Online, a query q

* takes its top-M shortlist by inner product (M = ``shortlist``, 200 by default, at most n);
* builds its own R(q, k1) as the paper does with q added to the database: g (one of q's k1
  nearest items) is k-reciprocal when q would enter g's top k1, <q, x_g> >= the similarity
  of g to its k1-th nearest database item (a per-item threshold kept offline). The
  expansion uses the database items' offline sets R(c, h); the query itself enters no
  database item's set (database encodings do not change with the query);
* holds V_q and V'_q as dense rows [nq, n] (a query's row is as wide as its scores), V'_q
  averaging V_q and the offline V of its k2 - 1 nearest items;
* re-scores its shortlist by d* against the shortlisted items' offline V' and returns the
  re-ranked shortlist first, the rest in first-search order (`base.rerank_shortlist`).

Descriptors must be L2-normalised (database and queries): ``build`` and ``search`` raise a
ValueError for a concrete row whose norm is off 1 by more than `UNIT_NORM_TOL` (on raw
descriptors exp(-d) overflows and every score would be NaN); traced queries (under jit /
vmap) are not checked.

A database item used as a query (``search_items``) is the paper's definition over the
database exactly (its own offline V'), so with M = n and no overflow the re-ranking is the
paper's on the database. lambda = 1 gives the kNN ranking.

Public API:
  * ``reciprocal_sets(neighbours, k)``: R(p, k) of every item from kNN lists;
  * ``expanded_sets(neighbours, k1)``: R*(p) of every item;
  * ``K_RECIPROCAL`` / ``KReciprocalConfig`` / ``KReciprocalState``: the `Method` ``k-reciprocal``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._progress import progress
from ..graph.neighbours import knn
from .base import HIGHEST as _HIGHEST
from .base import check_queries, checked_database, make_method, padded, rerank_shortlist, top_k_scores
from .options import finite_float, option, positive_int

__all__ = ["K_RECIPROCAL", "KReciprocalConfig", "KReciprocalState", "expanded_sets", "half_k",
           "reciprocal_sets"]

# Entries gathered at once in the offline blocks (ids x descriptor floats).
_BLOCK_FLOATS = 1 << 24

UNIT_NORM_TOL = 1e-2
"""How far from 1 a descriptor's L2 norm may be: |norm - 1| <= UNIT_NORM_TOL (loose enough
for descriptors stored in float16 / bfloat16, tight enough to catch raw, unnormalised ones)."""


def half_k(k1: int) -> int:
    """h = round(k1 / 2), the size of the expansion's sets (rounded half to even, as numpy's
    ``around`` in the authors' code: k1 = 20 -> 10, k1 = 5 -> 2)."""
    return int(np.around(k1 / 2.0))


# ----------------------------------------------------------------------------- sets
def _reciprocal(rows, fwd_block, nbr, k: int):
    """R(p, k) of the items ``rows`` [b]: int32[b, k + 1], slot 0 the item itself, then its k
    nearest others where reciprocal, -1 elsewhere. ``fwd_block`` [b, >= k] their lists,
    ``nbr`` [n, >= k] every item's list (other items by decreasing similarity)."""
    if k == 0:
        return rows[:, None]
    fwd = fwd_block[:, :k]
    back = nbr[fwd][:, :, :k]                                   # [b, k, k]
    ok = jnp.any(back == rows[:, None, None], axis=-1)
    return jnp.concatenate([rows[:, None], jnp.where(ok, fwd, -1)], axis=1)


_reciprocal_jit = jax.jit(_reciprocal, static_argnames="k")


def _expansion(sets1, half):
    """R*(p) with repeats, int32[b, (k1 + 1)(h + 2)] (-1 = no member), from R(p, k1) ``sets1``
    [b, k1 + 1] and every item's R(c, h) ``half`` [n, h + 1] (both -1 padded)."""
    valid1 = sets1 >= 0
    cand = half[jnp.where(valid1, sets1, 0)]                    # [b, k1 + 1, h + 1]
    cvalid = (cand >= 0) & valid1[:, :, None]
    size = jnp.sum(cvalid, axis=-1)
    inside = jnp.any((cand[..., None] == sets1[:, None, None, :]) & valid1[:, None, None, :], axis=-1)
    inter = jnp.sum(inside & cvalid, axis=-1)
    take = valid1 & (3 * inter > 2 * size)                      # |R n R(c, h)| > 2/3 |R(c, h)|
    added = jnp.where(take[..., None] & cvalid, cand, -1).reshape(sets1.shape[0], -1)
    return jnp.concatenate([sets1, added], axis=1)


def _as_neighbours(neighbours, k: int, name: str = "neighbours") -> np.ndarray:
    nbr = np.asarray(neighbours)
    if nbr.ndim != 2 or not np.issubdtype(nbr.dtype, np.integer):
        raise ValueError(f"{name} must be a 2-D integer array [n, K] of neighbour ids, got {nbr.dtype} "
                         f"{nbr.shape}")
    n = nbr.shape[0]
    if nbr.size and (nbr.min() < 0 or nbr.max() >= n):
        raise ValueError(f"{name} must hold ids in [0, {n}), got range [{nbr.min()}, {nbr.max()}]")
    if nbr.shape[1] < k:
        raise ValueError(f"{name} has {nbr.shape[1]} neighbours per item; k = {k} needs at least {k}")
    if np.any(nbr == np.arange(n)[:, None]):
        raise ValueError(f"{name} must list other items only (an item is never its own neighbour here)")
    return nbr.astype(np.int32)


def reciprocal_sets(neighbours, k: int) -> np.ndarray:
    """The k-reciprocal sets R(p, k) = {g in N(p, k) : p in N(g, k)} of every item.

    N(p, k) is p itself and its k nearest other items (the ranking list of p starts with p),
    so p is always in R(p, k).

    Args:
      neighbours: int[n, K] (K >= k), row p the other items by increasing distance to p.
      k: neighbours, 0 <= k <= K.

    Returns:
      int32[n, k + 1]: slot 0 is p, slot a >= 1 the a-th nearest other item of p when it is
      k-reciprocal, else -1.
    """
    k = _check_set_k(k)
    nbr = _as_neighbours(neighbours, k)
    rows = jnp.arange(nbr.shape[0], dtype=jnp.int32)
    return np.asarray(_reciprocal_jit(rows, jnp.asarray(nbr), jnp.asarray(nbr), k=k))


def expanded_sets(neighbours, k1: int) -> list[np.ndarray]:
    """R*(p): R(p, k1) joined by the R(c, h) (h = `half_k` (k1)) of its members c that share
    more than 2/3 of their items with R(p, k1).

    Args:
      neighbours: int[n, K] (K >= k1), row p the other items by increasing distance to p.
      k1: neighbours of the k-reciprocal sets, 1 <= k1 <= K.

    Returns:
      n sorted int arrays, the members of each R*(p) (p included).
    """
    k1 = _check_set_k(k1, minimum=1)
    nbr = jnp.asarray(_as_neighbours(neighbours, k1))
    rows = jnp.arange(nbr.shape[0], dtype=jnp.int32)
    sets1 = _reciprocal_jit(rows, nbr, nbr, k=k1)
    half = _reciprocal_jit(rows, nbr, nbr, k=half_k(k1))
    ext = np.asarray(jax.jit(_expansion)(sets1, half))
    return [np.unique(r[r >= 0]) for r in ext]


def _check_set_k(k, minimum: int = 0) -> int:
    if not _checks.is_int(k) or k < minimum:
        raise ValueError(f"k must be an int >= {minimum}, got {k!r}")
    return int(k)


# ----------------------------------------------------------------------------- sparse rows
def _merge(ids, w, sentinel: int, capacity: int, sum_repeats: bool):
    """Rows of (id, weight) pairs with repeats -> the ``capacity`` largest distinct entries.

    ``ids`` int32[b, L] (``sentinel`` = empty, its weight 0), ``w`` float32[b, L]. Repeated
    ids sum their weights (``sum_repeats``) or count once. Returns (ids [b, capacity] with
    ``sentinel`` in empty slots, weights [b, capacity], total weight of all distinct entries
    [b], distinct entries [b]).
    """
    b, length = ids.shape
    if length < capacity:
        ids = jnp.concatenate([ids, jnp.full((b, capacity - length), sentinel, ids.dtype)], axis=1)
        w = jnp.concatenate([w, jnp.zeros((b, capacity - length), w.dtype)], axis=1)
        length = capacity
    order = jnp.argsort(ids, axis=1)
    ids_s = jnp.take_along_axis(ids, order, axis=1)
    w_s = jnp.take_along_axis(w, order, axis=1)
    live = ids_s != sentinel
    last = jnp.concatenate([ids_s[:, 1:] != ids_s[:, :-1], jnp.ones((b, 1), bool)], axis=1) & live
    if sum_repeats:
        # a run's sum at its last position: the running sum minus the running sum at the previous
        # run's end (running sums of weights >= 0 never decrease, so that is a running maximum)
        cs = jnp.cumsum(w_s, axis=1)
        ends = jax.lax.cummax(jnp.where(last, cs, 0.0), axis=1)
        before = jnp.concatenate([jnp.zeros((b, 1), cs.dtype), ends[:, :-1]], axis=1)
        w_s = cs - before
    sums = jnp.where(last, w_s, 0.0)
    top_w, pos = jax.lax.top_k(jnp.where(last, sums, -1.0), capacity)
    top_id = jnp.take_along_axis(ids_s, pos, axis=1)
    keep = top_w > 0
    return (jnp.where(keep, top_id, sentinel), jnp.where(keep, top_w, 0.0), jnp.sum(sums, axis=1),
            jnp.sum(last, axis=1))


@functools.partial(jax.jit, static_argnames=("k1", "h", "capacity"))
def _encode_block(rows, database, nbr, half, *, k1: int, h: int, capacity: int):
    """V_p of the items ``rows``: (ids, weights) [b, capacity], distinct members [b]."""
    n = database.shape[0]
    sets1 = _reciprocal(rows, nbr[rows], nbr, k1)
    ext = _expansion(sets1, half)
    valid = ext >= 0
    safe = jnp.where(valid, ext, 0)
    sims = jnp.einsum("bd,bld->bl", database[rows], database[safe], precision=_HIGHEST)
    w = jnp.where(valid, jnp.exp(-(2.0 - 2.0 * sims)), 0.0)
    ids, wt, total, count = _merge(jnp.where(valid, ext, n), w, n, capacity, sum_repeats=False)
    return ids, wt / total[:, None], count


@functools.partial(jax.jit, static_argnames=("k2", "capacity"))
def _expand_block(rows, nbr, v_ids, v_w, *, k2: int, capacity: int):
    """V'_p of the items ``rows``: the mean of V over p and its k2 - 1 nearest items."""
    n = v_ids.shape[0]
    members = jnp.concatenate([rows[:, None], nbr[rows, :k2 - 1]], axis=1)      # [b, k2]
    ids = v_ids[members].reshape(rows.shape[0], -1)
    w = v_w[members].reshape(rows.shape[0], -1) / k2
    out_ids, out_w, _, count = _merge(ids, w, n, capacity, sum_repeats=True)
    return out_ids, out_w, count


def _blocks(fn, n: int, block: int, desc: str, show_progress):
    """``fn(rows)`` over row blocks of one size (the last padded by repeating row 0),
    outputs concatenated on the host."""
    outs = []
    starts = range(0, n, block)
    for start in progress(starts, desc=desc, total=len(starts), enable=show_progress):
        rows = np.arange(start, min(start + block, n), dtype=np.int32)
        pad = block - rows.size
        padded_rows = np.concatenate([rows, np.zeros(pad, np.int32)]) if pad else rows
        out = fn(jnp.asarray(padded_rows))
        outs.append([np.asarray(o)[:rows.size] for o in out])
    return [np.concatenate(parts) for parts in zip(*outs)]


# ----------------------------------------------------------------------------- method
@dataclasses.dataclass(frozen=True)
class KReciprocalConfig:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of each query's top-M shortlist.

    Attributes:
      k1: neighbours of the k-reciprocal sets R(p, k1) (the paper's 20); the expansion uses
        R(c, round(k1 / 2)).
      k2: local query expansion: V' averages V over p and its k2 - 1 nearest items (the
        paper's 6; 1 = none).
      lam: lambda, the weight of the original distance in d* = (1 - lambda) d_J + lambda d
        (the paper's 0.3; 1 = kNN). A traced value of the state (``state.lam``).
      shortlist: M, the first-search items re-ranked per query (at most n; the rest follow
        in first-search order).
      capacity: entries of V kept per database item (the largest).
      qe_capacity: entries of V' kept per database item (the largest).
    """

    k1: int = option(20, "k-reciprocal neighbours k1", flag="--kr-k1", parse=positive_int)
    k2: int = option(6, "local query expansion: V averaged over an item and its k2 - 1 nearest (1 = none)",
                     flag="--kr-k2", parse=positive_int)
    lam: float = option(0.3, "weight of the original distance: d* = (1 - lambda) d_Jaccard + lambda d",
                        flag="--kr-lambda", parse=finite_float)
    shortlist: int = option(200, "first-search items re-ranked per query (at most n)", flag="--kr-shortlist",
                            parse=positive_int)
    capacity: int = option(64, "entries of each database item's k-reciprocal encoding V kept",
                           flag="--kr-capacity", parse=positive_int)
    qe_capacity: int = option(160, "entries of each database item's expanded encoding V' kept",
                              flag="--kr-qe-capacity", parse=positive_int)

    def __post_init__(self):
        for name in ("k1", "k2", "shortlist", "capacity", "qe_capacity"):
            _checks.check_positive_int(getattr(self, name), f"KReciprocalConfig.{name}")
        lam = getattr(self, "lam")
        if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)):
            raise TypeError(f"KReciprocalConfig.lam must be a number, got {lam!r}")
        if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
            raise ValueError(f"KReciprocalConfig.lam must lie in [0, 1], got {lam}")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["database", "threshold", "half", "v_ids", "v_w", "qe_ids", "qe_w", "lam",
                                "overflow"],
                   meta_fields=["k1", "k2", "shortlist"])
@dataclasses.dataclass(frozen=True)
class KReciprocalState:
    """The database and its offline k-reciprocal structures.

    Attributes:
      database: float32[n, d].
      threshold: float32[n], each item's similarity to its k1-th nearest other item (a query
        q is in N(g, k1) when <q, x_g> >= threshold[g]).
      half: int32[n, h + 1], R(g, h) (h = round(k1 / 2)), -1 padded.
      v_ids, v_w: int32 / float32[n, capacity], the largest entries of V (id n = empty).
      qe_ids, qe_w: int32 / float32[n, qe_capacity], the largest entries of V'.
      lam: float32 scalar, lambda (traced: a new value does not recompile).
      overflow: int32[2], the entries of V and of V' dropped over all items (0: exact).
      k1, k2: the config's k1 and k2 (static).
      shortlist: M = min(config.shortlist, n) (static).

    States of configs that differ in lambda only share one compiled search.
    """

    database: jax.Array
    threshold: jax.Array
    half: jax.Array
    v_ids: jax.Array
    v_w: jax.Array
    qe_ids: jax.Array
    qe_w: jax.Array
    lam: jax.Array
    overflow: jax.Array
    k1: int
    k2: int
    shortlist: int


def check_unit_rows(x: np.ndarray, name: str) -> None:
    """A ValueError unless every row of the host matrix ``x`` [n, d] has L2 norm 1 (within
    `UNIT_NORM_TOL`). The distance d = 2 - 2 <x_p, x_g> and its weights exp(-d) hold for
    unit vectors only: on raw descriptors exp(2 <x_p, x_g> - 2) overflows to inf and
    every score is NaN."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))       # no copy of x; float32 is ample for the tolerance
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOL)
    if bad.size:
        raise ValueError(
            f"k-reciprocal needs L2-normalised descriptors (its distance is 2 - 2 <x, y> of unit vectors), "
            f"but {bad.size} row(s) of {name} have norms off 1 (first: row {bad[0]}, norm {norms[bad[0]]:.4g}; "
            f"norms in [{norms.min():.4g}, {norms.max():.4g}]); apply "
            "retrieval_jax.descriptors.l2_normalize to database and queries alike")


def _check_sizes(config: KReciprocalConfig, n: int) -> None:
    _checks.check_k(config.k1, n - 1, name="KReciprocalConfig.k1", what="other database items")
    _checks.check_k(config.k2, n, name="KReciprocalConfig.k2")
    if config.shortlist < max(config.k1, config.k2 - 1):
        raise ValueError(f"KReciprocalConfig.shortlist = {config.shortlist} must hold a query's k1 = {config.k1} "
                         f"and k2 - 1 = {config.k2 - 1} nearest items")


def _build(database, config: KReciprocalConfig = KReciprocalConfig(), *,
           show_progress: bool | None = None) -> KReciprocalState:
    """The k-reciprocal state of ``database`` float[n, d] (L2-normalised rows).

    Raises:
      TypeError: ``config`` is not a `KReciprocalConfig`.
      ValueError: the database is not a finite 2-D real matrix without zero rows, a row's
        norm is off 1 by more than `UNIT_NORM_TOL` (apply ``descriptors.l2_normalize``),
        or a size of ``config`` does not fit n.
    """
    db = checked_database(database, config, KReciprocalConfig, "k-reciprocal")
    check_unit_rows(db, "database")
    n, d = db.shape
    _check_sizes(config, n)
    k1, k2, h = config.k1, config.k2, half_k(config.k1)
    width = max(k1, k2 - 1)
    sims, nbr = knn(db, db, width, exclude_self=True, show_progress=show_progress)
    threshold = sims[:, k1 - 1]
    x = jnp.asarray(db)
    half = _blocks(lambda r: (_reciprocal_jit(r, nbr[r], nbr, k=h),), n, 4096, "", False)[0]
    half = jnp.asarray(half)
    length = (k1 + 1) * (h + 2)
    block = int(max(1, min(1024, _BLOCK_FLOATS // (length * d))))
    v_ids, v_w, v_count = _blocks(
        lambda r: _encode_block(r, x, nbr, half, k1=k1, h=h, capacity=config.capacity),
        n, block, "k-reciprocal encodings", show_progress)
    qe_ids, qe_w, qe_count = _blocks(
        lambda r: _expand_block(r, nbr, jnp.asarray(v_ids), jnp.asarray(v_w), k2=k2,
                                capacity=config.qe_capacity),
        n, 1024, "k-reciprocal expansion", show_progress)
    overflow = np.array([np.maximum(v_count - config.capacity, 0).sum(),
                         np.maximum(qe_count - config.qe_capacity, 0).sum()], np.int32)
    if overflow.any():
        warnings.warn(f"k-reciprocal encodings over capacity: {overflow[0]} entries of V (capacity "
                      f"{config.capacity}, largest {int(v_count.max())}) and {overflow[1]} of V' (qe_capacity "
                      f"{config.qe_capacity}, largest {int(qe_count.max())}) were dropped, the smallest first; "
                      "raise the capacities for the exact encodings", stacklevel=2)
    return KReciprocalState(database=x, threshold=threshold, half=half, v_ids=jnp.asarray(v_ids),
                            v_w=jnp.asarray(v_w), qe_ids=jnp.asarray(qe_ids), qe_w=jnp.asarray(qe_w),
                            lam=jnp.float32(config.lam), overflow=jnp.asarray(overflow), k1=k1, k2=k2,
                            shortlist=min(config.shortlist, n))


def _jaccard_rerank(state: KReciprocalState, sims, short_s, short_i, vq, vq_sum):
    """d* of each query's shortlist against the database's V', as `rerank_shortlist` scores.

    ``vq`` float32[nq, n] the queries' V' over database columns, ``vq_sum`` [nq] their total
    weight (with the query's own column where it has one)."""
    g_ids = state.qe_ids[short_i]                                          # [nq, M, C']
    g_w = state.qe_w[short_i]
    at = jax.vmap(lambda row, ids: row.at[ids].get(mode="fill", fill_value=0.0))(vq, g_ids)
    mins = jnp.sum(jnp.minimum(at, g_w), axis=-1)
    maxs = vq_sum[:, None] + jnp.sum(g_w, axis=-1) - mins
    d_jaccard = 1.0 - mins / jnp.maximum(maxs, 1e-30)
    lam = state.lam
    d_star = (1.0 - lam) * d_jaccard + lam * (2.0 - 2.0 * short_s)
    return rerank_shortlist(sims, short_i, -d_star)


def _scatter_rows(nq: int, n: int, ids, w):
    """Dense rows float32[nq, n] summing the sparse (ids [nq, L], w [nq, L]) entries (id n dropped)."""
    rows = jnp.arange(nq)[:, None]
    return jnp.zeros((nq, n), jnp.float32).at[rows, ids].add(w, mode="drop")


@jax.jit
def _search(state: KReciprocalState, queries):
    k1, k2 = state.k1, state.k2
    x = state.database
    n = x.shape[0]
    nq = queries.shape[0]
    sims = jnp.matmul(queries.astype(jnp.float32), x.T, precision=_HIGHEST)
    short_s, short_i = top_k_scores(sims, state.shortlist)
    # R(q, k1): q itself and its k1 nearest g for which q would enter N(g, k1)
    fwd_s, fwd_i = short_s[:, :k1], short_i[:, :k1]
    members = jnp.where(fwd_s >= state.threshold[fwd_i], fwd_i, -1)        # [nq, k1]
    # expansion by the database sets R(c, h) of the members c (q's own R(q, h) lies inside R(q, k1),
    # and no R(c, h) holds q, so q's slot changes nothing)
    ext = _expansion(members, state.half)
    rows = jnp.arange(nq)[:, None]
    inside = jnp.zeros((nq, n), bool).at[rows, jnp.where(ext >= 0, ext, n)].set(True, mode="drop")
    w = jnp.where(inside, jnp.exp(-(2.0 - 2.0 * sims)), 0.0)
    total = jnp.sum(w, axis=1) + 1.0                                        # + q itself, exp(-0)
    v = w / total[:, None]
    # V'_q: V_q and the V of q's k2 - 1 nearest items, averaged
    near = short_i[:, :k2 - 1]
    extra = _scatter_rows(nq, n, state.v_ids[near].reshape(nq, -1), state.v_w[near].reshape(nq, -1))
    vq = (v + extra) / k2
    vq_sum = jnp.sum(vq, axis=1) + 1.0 / (k2 * total)                      # q's own column
    return _jaccard_rerank(state, sims, short_s, short_i, vq, vq_sum)


@jax.jit
def _search_items(state: KReciprocalState, ids):
    x = state.database
    n = x.shape[0]
    sims = jnp.matmul(x[ids], x.T, precision=_HIGHEST)
    short_s, short_i = top_k_scores(sims, state.shortlist)
    vq = _scatter_rows(ids.shape[0], n, state.qe_ids[ids], state.qe_w[ids])
    return _jaccard_rerank(state, sims, short_s, short_i, vq, jnp.sum(state.qe_w[ids], axis=1))


_padded_search = padded(_search)


def _checked_search(state: KReciprocalState, queries):
    """`check_queries`, then (concrete queries) unit norms (`check_unit_rows`), then the padded
    jitted search. Traced queries pass unchecked (their values cannot be read)."""
    if _checks.is_traced(queries):
        return _padded_search(state, queries)
    q = _checks.as_matrix(queries, "queries")
    checked = check_queries(state, q)            # the dimension (q is not scanned twice)
    check_unit_rows(q, "queries")
    return _padded_search(state, checked)


K_RECIPROCAL = make_method("k-reciprocal", _build, _search, _search_items, KReciprocalConfig,
                           check_sizes=_check_sizes,
                           summary="k-reciprocal re-ranking of a top-M shortlist (Jaccard of k-reciprocal encodings)"
                           )._replace(search=_checked_search)
