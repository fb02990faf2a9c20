"""Retrieval metrics: Oxford AP, the Revisited Oxford/Paris protocol, label mAP, bull's-eye.

Everything here runs in numpy on the host. A *ranking* is an integer array
``[n_queries, m]`` of database indices, best first; ``m`` is normally the
database size ``n_db`` (a full ranking), but a truncated top-``m`` list is
accepted too, in which case positives that do not appear count as misses.

Average precision (Philbin et al., "Object retrieval with large vocabularies and
fast spatial matching", CVPR 2007; the code of Radenovic et al., "Revisiting
Oxford and Paris: Large-Scale Image Retrieval Benchmarking", CVPR 2018):
junk images are deleted from the ranking, then with ``r_0 < r_1 < ...`` the
0-based positions of the retrieved positives in what is left,

    AP = (1 / n_pos) * sum_j (p0_j + p1_j) / 2,
    p0_j = j / r_j  (p0_j = 1 when r_j = 0),    p1_j = (j + 1) / (r_j + 1),

i.e. the trapezoidal area under the precision/recall curve. ``n_pos`` is the
number of distinct positives in the ground truth, retrieved or not. All scores
are fractions in [0, 1] (multiply by 100 for the percentages papers print).

The implementation is vectorised: for a block of queries a relevance code
``0 = negative, 1 = positive, 2 = junk`` is laid out over the database, gathered
along the ranking, and AP / precision follow from two cumulative sums. Revisited
Oxford (70 x 4993) or label mAP on COIL-20 (1440 x 1440) cost O(nq n) each.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from .. import _checks

_NEG, _POS, _JUNK = 0, 1, 2
# Queries are processed in blocks of at most this many (query x database) cells,
# so the temporaries stay around 100 MB even for a million-image database.
_BLOCK_CELLS = 1 << 21

SETTINGS = ("easy", "medium", "hard")


# ---------------------------------------------------------------------------
# Validation (host side, at the public boundary)
# ---------------------------------------------------------------------------

def _as_index_array(x, name: str, ndim: int) -> np.ndarray:
    """``x`` as an int64 array of ``ndim`` dimensions; floats must be NaN-free integers."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic array-likes
        raise TypeError(f"{name} must be an integer array, got {type(x).__name__}") from exc
    if arr.ndim != ndim:
        want = "a 2-D array [n_queries, n_database]" if ndim == 2 else "a 1-D array"
        raise ValueError(f"{name} must be {want} of integer indices, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64).reshape(arr.shape)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                 or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any():
            where = np.argwhere(np.isnan(arr))[0]
            raise ValueError(f"{name} has NaN (first at {tuple(int(i) for i in where)}); "
                             "indices must be integers")
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"{name} holds non-integer values; pass integer indices "
                             "(a ranking, not scores)")
    return arr.astype(np.int64)


def _check_range(arr: np.ndarray, n_db: int, name: str, hint: str = "") -> None:
    if arr.size == 0:
        return
    bad = (arr < 0) | (arr >= n_db)
    if bad.any():
        where = np.argwhere(bad)[0]
        value = int(arr[tuple(where)])
        raise ValueError(
            f"{name} has index {value} at {tuple(int(i) for i in where)}, outside the database "
            f"range [0, {n_db}){hint}")


def _check_ranking(ranking, n_db: int | None, name: str = "ranking") -> tuple[np.ndarray, int]:
    """Validate a ranking ``[n_queries, m]``; return it as int64 and the database size."""
    r = _as_index_array(ranking, name, 2)
    if r.shape[0] == 0:
        raise ValueError(f"{name} has no queries (shape {r.shape})")
    if n_db is None:
        n_db = r.shape[1]
    else:
        n_db = _checks.check_positive_int(n_db, "n_db")
        if r.shape[1] > n_db:
            raise ValueError(f"{name} has {r.shape[1]} columns but the database has only "
                             f"n_db = {n_db} items; a ranking lists each item at most once")
    _check_range(r, n_db, name,
                 "; for a database larger than the ranking width (e.g. a truncated ranking or "
                 "added distractors) pass n_db=")
    if r.shape[1] > 1:
        s = np.sort(r, axis=1)
        dup = s[:, 1:] == s[:, :-1]
        if dup.any():
            q, j = np.argwhere(dup)[0]
            raise ValueError(f"{name} row {int(q)} lists database item {int(s[q, j])} more than "
                             "once; each row must be a ranking (a permutation or a prefix of one)")
    return r, n_db


def _check_index_list(x, n_db: int, name: str) -> np.ndarray:
    """A ground-truth index list as sorted unique int64 (duplicates count once)."""
    arr = _as_index_array(np.asarray(x).reshape(-1) if np.ndim(x) > 1 else x, name, 1)
    _check_range(arr, n_db, name, " of the ranking; does the ground truth belong to this "
                 "database (and is it 0-based)?")
    return np.unique(arr)


def _check_ks(ks) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    out = []
    for k in ks:
        if not _checks.is_int(k) or k <= 0:
            raise ValueError(f"ks must be positive ints, got {k!r} in {tuple(ks)!r}")
        out.append(int(k))
    return tuple(out)


def _check_labels(labels, n: int, name: str = "labels", *, every_item_a_query: bool = True) -> np.ndarray:
    """Labels as int codes 0..C-1 (any hashable dtype accepted); NaN rejected."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array with one label per item, got shape {arr.shape}")
    if arr.shape[0] != n:
        if every_item_a_query:
            raise ValueError(f"{name} has {arr.shape[0]} entries but the ranking has {n} rows; "
                             "every item of the collection is a query, so they must match "
                             "(for a subset of the items as queries pass query_ids=)")
        raise ValueError(f"{name} has {arr.shape[0]} entries but the collection has {n} items")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"{name} has NaN (first at {int(np.flatnonzero(np.isnan(arr))[0])})")
    if arr.dtype == object:
        missing = [i for i, v in enumerate(arr) if v is None or (isinstance(v, float) and v != v)]
        if missing:
            raise ValueError(f"{name} has None or NaN (first at {missing[0]}); every item needs a label")
    try:
        _, codes = np.unique(arr, return_inverse=True)
    except TypeError as exc:  # labels of mixed, incomparable types (e.g. 1 and "a")
        kinds = sorted({type(v).__name__ for v in arr.tolist()})
        raise TypeError(f"{name} mixes label types that cannot be ordered ({', '.join(kinds)}); "
                        "use one type for every label") from exc
    return codes.reshape(-1).astype(np.int64)


def _gnd_entries(gnd) -> tuple[Sequence[Mapping], int | None]:
    """Accept a list of per-query dicts or a ``GroundTruth`` (anything with .gnd and .imlist)."""
    n_db = None
    if hasattr(gnd, "gnd") and hasattr(gnd, "imlist"):
        n_db = len(gnd.imlist)
        gnd = gnd.gnd
    elif isinstance(gnd, Mapping) and "gnd" in gnd:
        raise TypeError("gnd must be the list of per-query dicts (the 'gnd' entry of the "
                        "pickle), or a GroundTruth from retrieval_jax.data.load_gnd; got the "
                        "whole pickle dict - pass d['gnd']")
    if isinstance(gnd, np.ndarray) and gnd.dtype == object:
        gnd = list(gnd.reshape(-1))
    if isinstance(gnd, (str, bytes)) or not isinstance(gnd, Sequence):
        raise TypeError(f"gnd must be a sequence of per-query dicts, got {type(gnd).__name__}")
    for i, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise TypeError(f"gnd[{i}] must be a dict, got {type(entry).__name__}")
    return gnd, n_db


def _get(entry: Mapping, key: str, i: int, required: bool = True):
    if key not in entry:
        if not required:
            return ()
        raise KeyError(f"gnd[{i}] has no key {key!r} (keys: {sorted(entry)}); "
                       "is this the right protocol (revisited: easy/hard/junk, classic: ok/junk)?")
    return entry[key]


# ---------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------

def _ap_prec_from_codes(codes: np.ndarray, n_pos: np.ndarray, ks: tuple[int, ...]):
    """AP and precision@k from relevance codes gathered along the ranking.

    codes: int8[c, m] with codes[q, i] the code of the item at position i.
    n_pos: int[c] number of positives of each query (retrieved or not).
    Returns (ap float64[c], prec float64[c, len(ks)]), NaN where n_pos == 0.
    """
    is_pos = codes == _POS
    kept = codes != _JUNK
    # 0-based position after junk removal, and number of earlier positives.
    r = np.cumsum(kept, axis=1, dtype=np.int64) - 1
    j = np.cumsum(is_pos, axis=1, dtype=np.int64) - 1
    rf = r.astype(np.float64)
    jf = j.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(r > 0, jf / np.maximum(rf, 1.0), 1.0)
        p1 = (jf + 1.0) / (rf + 1.0)
    terms = np.where(is_pos, 0.5 * (p0 + p1), 0.0)
    valid = n_pos > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = np.where(valid, terms.sum(axis=1) / np.maximum(n_pos, 1), np.nan)

    # Precision at k' = min(k, 1-based position of the last retrieved positive).
    pos1 = np.where(is_pos, r + 1, 0)
    last = pos1.max(axis=1) if pos1.shape[1] else np.zeros(pos1.shape[0], np.int64)
    prec = np.zeros((codes.shape[0], len(ks)), np.float64)
    for t, k in enumerate(ks):
        kq = np.minimum(last, k)
        hits = (is_pos & (pos1 <= kq[:, None])).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            prec[:, t] = np.where(kq > 0, hits / np.maximum(kq, 1), 0.0)
    prec[~valid] = np.nan
    return ap, prec


def _check_lists(positives: Sequence, junk: Sequence | None, nq: int, n_db: int):
    """Validated (positives, junk) index lists, one per query (junk None: none)."""
    for what, lists in (("positives", positives), ("junk", junk)):
        if lists is None and what == "junk":
            continue
        if isinstance(lists, (str, bytes)) or not hasattr(lists, "__len__"):
            raise TypeError(f"{what} must be a sequence of {nq} index lists (one per query), "
                            f"got {type(lists).__name__}")
        for i, entry in enumerate(lists):
            if entry is None:
                raise TypeError(f"{what}[{i}] is None; give an empty list for a query without {what}")
    if len(positives) != nq:
        raise ValueError(f"positives has {len(positives)} entries but ranking has {nq} rows")
    if junk is None:
        junk = [()] * nq
    if len(junk) != nq:
        raise ValueError(f"junk has {len(junk)} entries but ranking has {nq} rows")
    pos = [_check_index_list(p, n_db, f"positives[{i}]") for i, p in enumerate(positives)]
    jnk = [_check_index_list(p, n_db, f"junk[{i}]") for i, p in enumerate(junk)]
    return pos, jnk


def _list_blocks(ranking: np.ndarray, n_db: int, positives: Sequence[np.ndarray],
                 junk: Sequence[np.ndarray]):
    """Yield (start, stop, codes int8[stop - start, m]): the relevance code of every ranked
    item, a block of queries at a time (at most ``_BLOCK_CELLS`` table cells)."""
    nq = ranking.shape[0]
    block = max(1, _BLOCK_CELLS // max(n_db, 1))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        table = np.zeros((stop - start, n_db), np.int8)
        # Junk first, positives second: an index listed in both counts as a positive
        # (revisitop's code would delete it as junk; see `average_precision`).
        for lists, code in ((junk, _JUNK), (positives, _POS)):
            part = lists[start:stop]
            lens = [p.size for p in part]
            if sum(lens):
                rows = np.repeat(np.arange(stop - start), lens)
                table[rows, np.concatenate(part)] = code
        yield start, stop, np.take_along_axis(table, ranking[start:stop], axis=1)


def _evaluate_lists(ranking: np.ndarray, n_db: int, positives: Sequence[np.ndarray],
                    junk: Sequence[np.ndarray], ks: tuple[int, ...]):
    """AP / precision for per-query positive and junk index lists (validated, unique)."""
    nq = ranking.shape[0]
    ap = np.empty(nq, np.float64)
    prec = np.empty((nq, len(ks)), np.float64)
    n_pos = np.array([p.size for p in positives], np.int64)
    for start, stop, codes in _list_blocks(ranking, n_db, positives, junk):
        ap[start:stop], prec[start:stop] = _ap_prec_from_codes(codes, n_pos[start:stop], ks)
    return ap, prec


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MapResult:
    """Mean average precision and mean precision@k over a set of queries.

    All values are fractions in [0, 1].

    Attributes:
      map: mean AP over the queries that have at least one positive.
      mp: {k: mean precision@k} over the same queries (revisitop's mP@k).
      aps: float64[n_queries] per-query AP, NaN for queries left out (no positives).
      prs: float64[n_queries, len(ks)] per-query precision@k, NaN for left-out queries.
      ks: the cut-offs k.
      n_valid: number of queries that entered the means.
    """

    map: float
    mp: dict
    aps: np.ndarray
    prs: np.ndarray
    ks: tuple
    n_valid: int

    def __str__(self) -> str:
        mp = ", ".join(f"mP@{k} {100 * v:.2f}" for k, v in self.mp.items())
        return f"mAP {100 * self.map:.2f}, {mp} (%, {self.n_valid} queries)"


@dataclasses.dataclass(frozen=True)
class RevisitedResult:
    """Revisited Oxford/Paris results for the Easy, Medium and Hard settings.

    ``result.medium.map`` (or ``result["medium"].map``) is the Medium mAP as a
    fraction in [0, 1]; ``str(result)`` prints the usual percentages.
    """

    easy: MapResult
    medium: MapResult
    hard: MapResult

    def __getitem__(self, setting: str) -> MapResult:
        if setting not in SETTINGS:
            raise KeyError(f"unknown setting {setting!r}; choose one of {SETTINGS}")
        return getattr(self, setting)

    @property
    def map(self) -> dict:
        """{'easy': mAP, 'medium': mAP, 'hard': mAP} as fractions."""
        return {s: self[s].map for s in SETTINGS}

    def as_dict(self) -> dict:
        """Flat summary: {'easy': {'map': .., 'mp@1': .., ...}, ...} (fractions)."""
        return {s: {"map": self[s].map, **{f"mp@{k}": v for k, v in self[s].mp.items()}}
                for s in SETTINGS}

    def __str__(self) -> str:
        maps = ", ".join(f"{s[0].upper()}: {100 * self[s].map:.2f}" for s in SETTINGS)
        lines = [f"mAP (%) {maps}"]
        for s in SETTINGS:
            mp = ", ".join(f"{100 * v:.2f}" for v in self[s].mp.values())
            lines.append(f"mP@{list(self[s].ks)} (%) {s[0].upper()}: {mp}")
        return "\n".join(lines)


def _summarise(ap: np.ndarray, prec: np.ndarray, ks: tuple[int, ...], what: str) -> MapResult:
    valid = ~np.isnan(ap)
    if not valid.any():
        raise ValueError(f"no query has any positive in {what}; mAP is undefined "
                         "(check the ground truth and the protocol setting)")
    mean_prec = prec[valid].mean(axis=0)
    return MapResult(map=float(ap[valid].mean()),
                     mp={k: float(v) for k, v in zip(ks, mean_prec)},
                     aps=ap, prs=prec, ks=ks, n_valid=int(valid.sum()))


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

def average_precision(ranking_row, positives, junk=(), *, n_db: int | None = None) -> float:
    """Oxford average precision of one ranked list (Philbin et al., CVPR 2007).

    Junk items are removed from the ranking; with r_0 < r_1 < ... the 0-based
    positions of the positives in what is left,

        AP = (1 / n_pos) sum_j (p0_j + p1_j) / 2,   p0_j = j / r_j (1 if r_j = 0),
                                                    p1_j = (j + 1) / (r_j + 1).

    Args:
      ranking_row: int[m] database indices, best first (a permutation of the
        database or a prefix of one).
      positives: int[p] indices of the relevant items. ``n_pos`` is the number of
        distinct positives; those absent from ``ranking_row`` count as misses.
      junk: int[q] indices to ignore (deleted from the ranking). An index that is
        both positive and junk counts here as a *positive*: a relevant image is never
        discarded. The revisitop reference code (``compute_ap`` after ``np.in1d``)
        deletes it as junk instead, so on such ground truth the two can differ; the
        published Revisited Oxford / Paris files list no index in both.
      n_db: database size for range checks; defaults to the largest index seen + 1
        (at least the length of ``ranking_row``).

    Returns:
      AP as a float in [0, 1]; NaN if ``positives`` is empty (AP is undefined; the
      benchmarks leave such queries out of the mean).
    """
    row = _as_index_array(ranking_row, "ranking_row", 1)
    pos = _as_index_array(np.asarray(positives).reshape(-1), "positives", 1)
    jnk = _as_index_array(np.asarray(junk).reshape(-1), "junk", 1)
    if n_db is None:
        n_db = max([int(a.max()) + 1 for a in (row, pos, jnk) if a.size] + [row.size, 1])
    r, n_db = _check_ranking(row[None, :], n_db, "ranking_row")
    pos = _check_index_list(pos, n_db, "positives")
    jnk = _check_index_list(jnk, n_db, "junk")
    ap, _ = _evaluate_lists(r, n_db, [pos], [jnk], ())
    return float(ap[0])


def mean_average_precision(ranking, positives: Sequence, junk: Sequence | None = None,
                           ks=(1, 5, 10), *, n_db: int | None = None) -> MapResult:
    """mAP and mP@k for arbitrary per-query positive / junk lists.

    Args:
      ranking: int[n_queries, m] database indices, best first.
      positives: n_queries index lists (the relevant items of each query).
      junk: n_queries index lists of ignored items, or None.
      ks: cut-offs for precision@k (see ``revisited_map`` for the definition).
      n_db: database size; defaults to ``m`` (full rankings).

    Returns:
      ``MapResult`` (fractions); queries without positives are left out of the means.
    """
    r, n_db = _check_ranking(ranking, n_db)
    ks = _check_ks(ks)
    pos, jnk = _check_lists(positives, junk, r.shape[0], n_db)
    ap, prec = _evaluate_lists(r, n_db, pos, jnk, ks)
    return _summarise(ap, prec, ks, "any query")


def _check_gnd_ranking(ranking, gnd, ks, n_db):
    """(per-query ground-truth entries, checked ranking, database size, cut-offs) of a
    benchmark evaluation; row i of the ranking must be query i of ``gnd``."""
    entries, gt_n = _gnd_entries(gnd)
    r, n_db = _check_ranking(ranking, _default_n_db(ranking, n_db, gt_n))
    ks = _check_ks(ks)
    if len(entries) != r.shape[0]:
        raise ValueError(f"ranking has {r.shape[0]} rows but gnd has {len(entries)} queries; "
                         "row i of the ranking must be query i of the ground truth")
    return entries, r, n_db, ks


def revisited_map(ranking, gnd, ks=(1, 5, 10), *, n_db: int | None = None) -> RevisitedResult:
    """Revisited Oxford / Paris evaluation (Radenovic et al., CVPR 2018).

    For each query and setting (positives P, junk J removed from the ranking):

      Easy:   P = easy,         J = junk + hard
      Medium: P = easy + hard,  J = junk
      Hard:   P = hard,         J = junk + easy

    mAP is the mean Oxford AP (see ``average_precision``). mP@k is the mean of
    precision@k' with k' = min(k, position of the last retrieved positive), the
    position 1-based and counted after junk removal (as in the revisitop code), so
    a query with fewer than k positives can still reach precision 1. Queries with
    no positive in a setting (two Revisited Oxford queries have no 'easy' image)
    are left out of that setting's means; their per-query values are NaN.

    Args:
      ranking: int[n_queries, m] database indices, best first; row i is query i
        of the ground truth. ``m`` = database size for a full ranking.
      gnd: the list of per-query dicts of ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``
        (keys 'easy', 'hard', 'junk', 0-based), or a ``GroundTruth`` from
        ``retrieval_jax.data.load_gnd``.
      ks: cut-offs for mP@k.
      n_db: database size (for range checks); defaults to max(m, len(imlist)).
        Pass it when the ranking is truncated and indices go beyond that (e.g. +1M
        distractors, which are appended after the 4993 / 6322 benchmark images).

    Returns:
      ``RevisitedResult`` with a ``MapResult`` (fractions in [0, 1]) per setting.
    """
    entries, r, n_db, ks = _check_gnd_ranking(ranking, gnd, ks, n_db)
    easy, hard, junk = [], [], []
    for i, e in enumerate(entries):
        easy.append(_check_index_list(_get(e, "easy", i), n_db, f"gnd[{i}]['easy']"))
        hard.append(_check_index_list(_get(e, "hard", i), n_db, f"gnd[{i}]['hard']"))
        junk.append(_check_index_list(_get(e, "junk", i, required=False), n_db,
                                      f"gnd[{i}]['junk']"))
    u = np.union1d
    protocol = {
        "easy": (easy, [u(j, h) for j, h in zip(junk, hard)]),
        "medium": ([u(e, h) for e, h in zip(easy, hard)], junk),
        "hard": (hard, [u(j, e) for j, e in zip(junk, easy)]),
    }
    out = {}
    for setting, (pos, jnk) in protocol.items():
        ap, prec = _evaluate_lists(r, n_db, pos, jnk, ks)
        out[setting] = _summarise(ap, prec, ks, f"the {setting} setting")
    return RevisitedResult(**out)


def classic_map(ranking, gnd, ks=(1, 5, 10), *, n_db: int | None = None) -> MapResult:
    """Original Oxford5k / Paris6k mAP (Philbin et al., CVPR 2007 / 2008).

    Positives are the 'ok' images (the published 'good' + 'ok'), 'junk' images
    are removed from the ranking; AP as in ``average_precision``.

    Args:
      ranking: int[n_queries, m] database indices, best first.
      gnd: list of per-query dicts with keys 'ok' and 'junk' (0-based), e.g. the
        'gnd' entry of ``gnd_oxford5k.pkl``, or a ``GroundTruth``.
      ks: cut-offs for mP@k (same definition as ``revisited_map``).
      n_db: database size; defaults to max(m, len(imlist)).

    Returns:
      ``MapResult`` with fractions in [0, 1].
    """
    entries, r, n_db, ks = _check_gnd_ranking(ranking, gnd, ks, n_db)
    pos = [_check_index_list(_get(e, "ok", i), n_db, f"gnd[{i}]['ok']")
           for i, e in enumerate(entries)]
    jnk = [_check_index_list(_get(e, "junk", i, required=False), n_db, f"gnd[{i}]['junk']")
           for i, e in enumerate(entries)]
    ap, prec = _evaluate_lists(r, n_db, pos, jnk, ks)
    return _summarise(ap, prec, ks, "the ground truth")


def _default_n_db(ranking, n_db, gt_n):
    if n_db is not None or gt_n is None:
        return n_db
    width = np.shape(ranking)[1] if np.ndim(ranking) == 2 else 0
    return max(width, gt_n)


def label_map(ranking, labels, exclude_self: bool = True, *, return_aps: bool = False, ks=None,
              query_ids=None):
    """Label mAP: the queries are items of a labelled collection.

    Query q's positives are the items with ``labels[q]``. With ``exclude_self``
    the query itself is removed from its ranking (treated as junk, so it neither
    counts as a positive nor takes a rank) and n_pos = class size - 1; without it
    the query is one of its own positives. AP as in ``average_precision``.
    Queries without positives (singleton classes) are left out of the mean.

    Args:
      ranking: int[nq, m] indices into the collection, best first. Without
        ``query_ids`` every item is a query (nq = n) and row q ranks the collection
        for item q; it may include q or not.
      labels: [n] class labels of the collection (any dtype; NaN rejected).
      exclude_self: see above (the COIL-20 protocol: True).
      return_aps: also return the per-query APs (float64[nq], NaN if left out).
      ks: cut-offs k; when given, the result is a `MapResult` (mAP, mP@k, per-query AP
        and precision@k), the same record as `revisited_map` and
        `mean_average_precision` return.
      query_ids: int[nq] the collection items the rows query (a subset of the items as
        queries, e.g. every 4th); default: every item, in order.

    Returns:
      mAP as a float in [0, 1] (and the per-query APs if ``return_aps``), or a
      `MapResult` when ``ks`` is given.
    """
    exclude_self = _checks.check_bool(exclude_self, "exclude_self")
    if query_ids is None:
        r, n = _check_ranking(ranking, None if np.ndim(ranking) != 2 else np.shape(ranking)[0])
        codes_of = _check_labels(labels, r.shape[0])
        qids = np.arange(r.shape[0])
    else:
        n = len(labels) if np.ndim(labels) == 1 else None
        r, n = _check_ranking(ranking, n)
        codes_of = _check_labels(labels, n, every_item_a_query=False)
        qids = _as_index_array(query_ids, "query_ids", 1)
        if qids.shape[0] != r.shape[0]:
            raise ValueError(f"query_ids has {qids.shape[0]} ids but the ranking has {r.shape[0]} rows")
        _check_range(qids, n, "query_ids")
    counts = np.bincount(codes_of)
    n_pos = counts[codes_of[qids]] - (1 if exclude_self else 0)
    cut = () if ks is None else _check_ks(ks)
    nq = r.shape[0]
    ap = np.empty(nq, np.float64)
    prec = np.empty((nq, len(cut)), np.float64)
    block = max(1, _BLOCK_CELLS // max(r.shape[1], 1))
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        rows = r[start:stop]
        same = codes_of[rows] == codes_of[qids[start:stop], None]
        codes = same.astype(np.int8)  # _POS where same label
        if exclude_self:
            codes[rows == qids[start:stop, None]] = _JUNK
        ap[start:stop], prec[start:stop] = _ap_prec_from_codes(codes, n_pos[start:stop], cut)
    if ks is not None:
        return _summarise(ap, prec, cut, "any class (every class is a singleton)")
    if np.isnan(ap).all():
        raise ValueError("no query has a positive (every class is a singleton); "
                         "label mAP is undefined")
    result = float(np.nanmean(ap))
    return (result, ap) if return_aps else result


def _label_ranking_head(ranking, labels, top, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(the first ``top`` columns of a checked every-item-a-query ranking, label codes)."""
    _checks.check_positive_int(top, "top")
    r, _ = _check_ranking(ranking, None if np.ndim(ranking) != 2 else np.shape(ranking)[0])
    codes_of = _check_labels(labels, r.shape[0])
    if r.shape[1] < top:
        raise ValueError(f"ranking has only {r.shape[1]} columns; {what} needs the top "
                         f"{top} results of every query")
    return r[:, :top], codes_of


def bullseye_score(ranking, labels, top: int = 40) -> float:
    """MPEG-7 bull's-eye score (Latecki, Lakamper & Eckhardt, CVPR 2000).

    Every shape is a query; count the shapes of its class among its first
    ``top`` results, the query itself included (it is normally its own first
    result):

        score = sum_q |{i < top : labels[ranking[q, i]] == labels[q]}|
                / sum_q class_size(labels[q])

    which for MPEG-7 (1400 shapes, 70 classes x 20, top 40) is total / (1400 * 20).

    Args:
      ranking: int[n, m], m >= top, indices into the same collection of n shapes,
        best first; row q ranks the *whole* collection for shape q, the query
        included (do not drop self-matches: a self-excluded ranking under-counts by
        one per query).
      labels: [n] class labels.
      top: number of results inspected (40 in the protocol).

    Returns:
      The score as a fraction in [0, 1] (1 = every class fully retrieved in the top
      ``top``; with classes larger than ``top`` the maximum is below 1).
    """
    head, codes_of = _label_ranking_head(ranking, labels, top, "the bull's-eye test")
    n = head.shape[0]
    if not (head == np.arange(n)[:, None]).any():
        raise ValueError(
            f"no query appears among its own top {top} results; the bull's-eye protocol "
            "counts the query itself, so rank the whole collection including self-matches")
    counts = np.bincount(codes_of)
    hits = (codes_of[head] == codes_of[:, None]).sum()
    return float(hits / counts[codes_of].sum())


def _hits_at_k(ranking, positives, junk, ks, n_db):
    """(hits int[nq, len(ks)], n_pos int[nq], ks): positives among the first k results.

    Junk is deleted from the ranking first, so "the first k" are the first k non-junk
    results (with the query as junk: the first k results after the query).
    """
    r, n_db = _check_ranking(ranking, n_db)
    ks = _check_ks(ks)
    for k in ks:
        if k > n_db:
            raise ValueError(f"k = {k} exceeds the {n_db} database items; choose k <= {n_db}")
    nq = r.shape[0]
    pos, jnk = _check_lists(positives, junk, nq, n_db)
    hits = np.zeros((nq, len(ks)), np.int64)
    n_pos = np.array([p.size for p in pos], np.int64)
    for start, stop, codes in _list_blocks(r, n_db, pos, jnk):
        place = np.cumsum(codes != _JUNK, axis=1)          # 1-based position after junk removal
        for t, k in enumerate(ks):
            hits[start:stop, t] = ((codes == _POS) & (place <= k)).sum(axis=1)
    return hits, n_pos, ks


def _mean_at_k(ranking, positives, junk, ks, n_db, what: str, denominator) -> dict:
    """{k: mean over the queries with a positive of hits@k / denominator(k, n_pos)}."""
    hits, n_pos, ks = _hits_at_k(ranking, positives, junk, ks, n_db)
    valid = n_pos > 0
    if not valid.any():
        raise ValueError(f"no query has any positive; {what} is undefined")
    return {k: float((hits[valid, t] / denominator(k, n_pos[valid])).mean()) for t, k in enumerate(ks)}


def precision_at_k(ranking, positives: Sequence, junk: Sequence | None = None, ks=(1, 5, 10), *,
                   n_db: int | None = None) -> dict:
    """Mean precision@k: positives among the first k results, divided by k.

    Unlike revisitop's mP@k (`MapResult.mp`, precision at min(k, position of the last
    positive)), this is the plain textbook figure: a query with 3 positives has at most
    precision@4 = 3/4. Junk is deleted from the ranking first (pass the query itself as
    junk to exclude it). Queries without positives are left out of the mean.

    Args:
      ranking: int[n_queries, m] database indices, best first; results beyond m count as
        misses.
      positives: per-query index lists (as in `mean_average_precision`).
      junk: per-query index lists.
      ks: cut-offs, each at most the database size.
      n_db: database size; defaults to m.

    Returns:
      {k: mean precision@k} as fractions in [0, 1].
    """
    return _mean_at_k(ranking, positives, junk, ks, n_db, "precision@k", lambda k, n_pos: k)


def recall_at_k(ranking, positives: Sequence, junk: Sequence | None = None, ks=(1, 5, 10), *,
                n_db: int | None = None) -> dict:
    """Mean recall@k: positives among the first k results, divided by the query's positives.

    Same conventions as `precision_at_k` (junk deleted first, queries without positives
    left out).

    Returns:
      {k: mean recall@k} as fractions in [0, 1].
    """
    return _mean_at_k(ranking, positives, junk, ks, n_db, "recall@k", lambda k, n_pos: n_pos)


def ukbench_score(ranking, labels, top: int = 4) -> float:
    """UKBench N-S score (Nister & Stewenius, CVPR 2006): same-group images in the top 4.

    Every image is a query; the score is the mean over queries of the number of images of
    the query's group among its first ``top`` results, *the query itself included* (it is
    normally its own first result). On UKBench (groups of 4) it lies in [0, 4], 4 being
    perfect.

    Args:
      ranking: int[n, m], m >= top, indices into the same collection, best first; row q
        ranks the whole collection for item q, the query included.
      labels: [n] group labels.
      top: results inspected (4 in the protocol).

    Returns:
      The mean count, a float in [0, top] (not a fraction).
    """
    head, codes_of = _label_ranking_head(ranking, labels, top, "the N-S score")
    return float((codes_of[head] == codes_of[:, None]).sum(axis=1).mean())
