"""Tests of retrieval_jax.evaluation against hand-computed values and reference loops."""
from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest

from conftest import require_data
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_jax.data import load_gnd
from retrieval_jax.evaluation import (
    MapResult,
    average_precision,
    bullseye_score,
    classic_map,
    label_map,
    mean_average_precision,
    revisited_map,
)






def _gnd_pickle(folder: str, name: str) -> dict:
    with open(require_data(folder) / name, "rb") as f:
        return pickle.load(f)


# ---------------------------------------------------------------------------
# Independent reference: a transcription of revisitop's compute_map
# (github.com/filipradenovic/revisitop, python/evaluate.py), loop by loop.
# ---------------------------------------------------------------------------

def _ref_compute_ap(ranks, nres):
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def _ref_compute_map(ranks, gnd, kappas):
    """ranks: [n_db, n_queries] as in revisitop; gnd: list of {'ok', 'junk'}."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        qgndj = np.array(gnd[i].get("junk", []))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        aps[i] = _ref_compute_ap(pos, len(qgnd))
        pos = pos + 1
        for j, kappa in enumerate(kappas):
            kq = min(max(pos), kappa)
            prs[i, j] = (pos <= kq).sum() / kq
    return aps, prs


def _ref_settings(gnd):
    out = {}
    for setting in ("easy", "medium", "hard"):
        g = []
        for q in gnd:
            if setting == "easy":
                g.append({"ok": q["easy"], "junk": list(q["junk"]) + list(q["hard"])})
            elif setting == "medium":
                g.append({"ok": list(q["easy"]) + list(q["hard"]), "junk": q["junk"]})
            else:
                g.append({"ok": q["hard"], "junk": list(q["junk"]) + list(q["easy"])})
        out[setting] = g
    return out


def _perfect_ranking(positive_lists, n_db):
    rows = []
    for pos in positive_lists:
        pos = list(pos)
        rest = np.setdiff1d(np.arange(n_db), pos)
        rows.append(np.concatenate([np.asarray(pos, np.int64), rest]))
    return np.stack(rows)


# ---------------------------------------------------------------------------
# average_precision: hand-computed cases
# ---------------------------------------------------------------------------

def test_ap_single_positive_first():
    assert average_precision([3, 1, 2, 0], [3]) == 1.0


def test_ap_hand_computed_two_positives():
    # positives at r = 1 (j = 0): (0 + 1/2)/2 ; r = 3 (j = 1): (1/3 + 2/4)/2 ; n_pos = 2
    assert average_precision([0, 1, 2, 3, 4], [1, 3]) == pytest.approx(1 / 3, abs=1e-15)


def test_ap_junk_between_positives():
    # after junk removal [0, 1, 2]: r = 0 -> 1 ; r = 2, j = 1 -> (1/2 + 2/3)/2
    ap = average_precision([0, 9, 1, 8, 2], [0, 2], junk=[9, 8])
    assert ap == pytest.approx((1 + 7 / 12) / 2, abs=1e-15)
    # without the junk declaration the same list scores lower
    assert average_precision([0, 9, 1, 8, 2], [0, 2]) < ap


def test_ap_junk_before_first_positive():
    assert average_precision([9, 7, 0, 1], [0], junk=[9, 7]) == 1.0
    assert average_precision([9, 7, 0, 1], [0]) == pytest.approx((0 + 1 / 3) / 2)


def test_ap_no_positives_is_nan():
    assert np.isnan(average_precision([0, 1, 2], []))


def test_ap_positive_missing_from_ranking_is_a_miss():
    # truncated ranking: positive 5 never retrieved, n_pos = 2
    assert average_precision([0, 1, 2], [0, 5], n_db=6) == pytest.approx(0.5)
    assert average_precision([1, 2, 3], [7]) == 0.0


def test_ap_duplicate_positives_count_once_and_positive_beats_junk():
    assert average_precision([0, 1, 2], [1, 1]) == average_precision([0, 1, 2], [1])
    # an index listed as positive and junk is a positive (revisitop behaviour)
    assert average_precision([0, 1, 2], [1], junk=[1, 0]) == 1.0


def test_precision_at_k_hand_computed():
    # positives at 1-based positions 2 and 4; last positive at 4
    res = mean_average_precision(np.arange(10)[None], [[1, 3]], ks=(1, 5, 10))
    assert isinstance(res, MapResult)
    assert res.mp == {1: 0.0, 5: pytest.approx(0.5), 10: pytest.approx(0.5)}
    # junk removed: [1, 0, 2] -> positives at 1-based positions 1 and 3
    res = mean_average_precision(np.array([[9, 1, 0, 2]]), [[1, 2]], [[9]], ks=(1, 2), n_db=10)
    assert res.mp == {1: 1.0, 2: pytest.approx(0.5)}
    assert res.map == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)


# ---------------------------------------------------------------------------
# average_precision: properties
# ---------------------------------------------------------------------------

@st.composite
def _ranking_and_positives(draw):
    n = draw(st.integers(1, 40))
    perm = draw(st.permutations(range(n)))
    positives = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    return np.asarray(perm), positives


@settings(max_examples=150, deadline=None)
@given(_ranking_and_positives())
def test_ap_in_unit_interval_and_one_iff_positives_first(case):
    ranking, positives = case
    ap = average_precision(ranking, positives)
    assert 0.0 <= ap <= 1.0 + 1e-12
    first = set(ranking[: len(positives)].tolist()) == set(positives)
    assert (abs(ap - 1.0) < 1e-12) == first
    assert np.isclose(ap, _ref_compute_ap(np.flatnonzero(np.isin(ranking, positives)),
                                          len(positives)), rtol=0, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(_ranking_and_positives(), st.data())
def test_ap_invariant_to_inserting_junk(case, data):
    ranking, positives = case
    n = ranking.size
    n_junk = data.draw(st.integers(1, 10))
    junk = list(range(n, n + n_junk))
    row = ranking.tolist()
    for j in junk:
        row.insert(data.draw(st.integers(0, len(row))), j)
    assert average_precision(row, positives, junk) == pytest.approx(
        average_precision(ranking, positives), abs=1e-12)


# ---------------------------------------------------------------------------
# Revisited Oxford / Paris on the real ground truth
# ---------------------------------------------------------------------------

REVISITED = ["gnd_roxford5k.pkl", "gnd_rparis6k.pkl"]


@pytest.mark.parametrize("name", REVISITED)
def test_revisited_perfect_ranking_scores_one(name):
    d = _gnd_pickle("revisitop", name)
    n_db = len(d["imlist"])
    ranking = _perfect_ranking([list(q["easy"]) + list(q["hard"]) for q in d["gnd"]], n_db)
    res = revisited_map(ranking, d["gnd"])
    for s in ("easy", "medium", "hard"):
        assert res[s].map == pytest.approx(1.0, abs=1e-12)
        assert all(v == pytest.approx(1.0, abs=1e-12) for v in res[s].mp.values())
    assert res.map == {s: pytest.approx(1.0) for s in ("easy", "medium", "hard")}


@pytest.mark.parametrize("name", REVISITED)
def test_revisited_reversed_and_random_rankings_score_low(name):
    d = _gnd_pickle("revisitop", name)
    n_db = len(d["imlist"])
    perfect = _perfect_ranking([list(q["easy"]) + list(q["hard"]) for q in d["gnd"]], n_db)
    worst = revisited_map(perfect[:, ::-1], d["gnd"])
    rand = revisited_map(np.stack([np.random.default_rng(i).permutation(n_db)
                                   for i in range(len(d["gnd"]))]), d["gnd"])
    for s in ("easy", "medium", "hard"):
        assert worst[s].map < 0.05
        assert worst[s].mp[1] == 0.0
        assert rand[s].map < 0.1


@pytest.mark.parametrize("name", REVISITED)
def test_revisited_matches_reference_loop(name):
    d = _gnd_pickle("revisitop", name)
    n_db = len(d["imlist"])
    rng = np.random.default_rng(0)
    # a random ranking that is still informative: positives get a score boost
    scores = rng.standard_normal((len(d["gnd"]), n_db))
    for i, q in enumerate(d["gnd"]):
        scores[i, q["easy"]] += 2.0
        scores[i, q["hard"]] += 1.0
        scores[i, q["junk"]] += 1.5
    ranking = np.argsort(-scores, axis=1)
    ks = (1, 5, 10)
    res = revisited_map(ranking, d["gnd"], ks=ks)
    for setting, g in _ref_settings(d["gnd"]).items():
        aps, prs = _ref_compute_map(ranking.T, g, list(ks))
        np.testing.assert_allclose(res[setting].aps, aps, rtol=0, atol=1e-9)
        np.testing.assert_allclose(res[setting].prs, prs, rtol=0, atol=1e-9)
        assert res[setting].map == pytest.approx(np.nanmean(aps), abs=1e-9)
        np.testing.assert_allclose(list(res[setting].mp.values()), np.nanmean(prs, axis=0),
                                   atol=1e-9)
    assert 0.1 < res.medium.map < 0.99  # informative, not trivial


def test_revisited_oxford_queries_without_easy_positives_are_left_out():
    d = _gnd_pickle("revisitop", "gnd_roxford5k.pkl")
    empty = [i for i, q in enumerate(d["gnd"]) if len(q["easy"]) == 0]
    assert empty  # two Revisited Oxford queries have no 'easy' image
    ranking = np.tile(np.arange(len(d["imlist"])), (len(d["gnd"]), 1))
    res = revisited_map(ranking, d["gnd"])
    assert np.isnan(res.easy.aps[empty]).all()
    assert res.easy.n_valid == len(d["gnd"]) - len(empty)
    assert res.medium.n_valid == len(d["gnd"])
    assert res.easy.map == pytest.approx(np.nanmean(res.easy.aps))


def test_revisited_accepts_groundtruth_object_and_is_fast():
    path = require_data("revisitop") / "gnd_roxford5k.pkl"
    gt = load_gnd(path)
    d = _gnd_pickle("revisitop", "gnd_roxford5k.pkl")
    rng = np.random.default_rng(1)
    ranking = np.stack([rng.permutation(gt.n_db) for _ in range(gt.n_queries)])
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a = revisited_map(ranking, gt)
        best = min(best, time.perf_counter() - t0)
    b = revisited_map(ranking, d["gnd"])
    assert a.as_dict() == b.as_dict()
    assert best < 1.0
    assert "mAP" in str(a)


@pytest.mark.parametrize("name", ["gnd_oxford5k.pkl", "gnd_paris6k.pkl"])
def test_classic_map_perfect_and_reference(name):
    d = _gnd_pickle("oxford_paris_classic", name)
    n_db = len(d["imlist"])
    res = classic_map(_perfect_ranking([q["ok"] for q in d["gnd"]], n_db), d["gnd"])
    assert res.map == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((len(d["gnd"]), n_db))
    for i, q in enumerate(d["gnd"]):
        scores[i, q["ok"]] += 2.0
        scores[i, q["junk"]] += 2.0
    ranking = np.argsort(-scores, axis=1)
    res = classic_map(ranking, d["gnd"])
    aps, prs = _ref_compute_map(ranking.T, d["gnd"], [1, 5, 10])
    np.testing.assert_allclose(res.aps, aps, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.prs, prs, rtol=0, atol=1e-9)
    assert res.map == pytest.approx(aps.mean(), abs=1e-9)
    rand = classic_map(np.stack([rng.permutation(n_db) for _ in d["gnd"]]), d["gnd"])
    assert rand.map < 0.1


def test_truncated_ranking_with_distractors_needs_n_db():
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}]
    ranking = np.array([[0, 2, 100, 1]])  # top-4 of a 1000-image database (distractors)
    with pytest.raises(ValueError, match="pass n_db="):
        revisited_map(ranking, gnd)
    res = revisited_map(ranking, gnd, n_db=1000)
    # medium: positives 0, 2, 1 at r = 0, 1, 3
    want = (1 + 1 + (2 / 3 + 3 / 4) / 2) / 3
    assert res.medium.map == pytest.approx(want)


# ---------------------------------------------------------------------------
# label mAP and bull's-eye
# ---------------------------------------------------------------------------

LABELS4 = np.array([0, 0, 1, 1])
RANK4 = np.array([[0, 2, 1, 3],
                  [1, 0, 2, 3],
                  [2, 3, 0, 1],
                  [3, 0, 1, 2]])


def test_label_map_hand_computed():
    # self excluded: APs 1/4, 1, 1, 1/6
    m, aps = label_map(RANK4, LABELS4, return_aps=True)
    np.testing.assert_allclose(aps, [0.25, 1.0, 1.0, 1 / 6], atol=1e-15)
    assert m == pytest.approx(29 / 48)
    # self counted as a positive: APs 19/24, 1, 1, 17/24
    assert label_map(RANK4, LABELS4, exclude_self=False) == pytest.approx(84 / 96)
    # the same ranking with the query already dropped gives the same score
    dropped = np.stack([row[row != q] for q, row in enumerate(RANK4)])
    assert label_map(dropped, LABELS4) == pytest.approx(29 / 48)
    # labels of any dtype
    assert label_map(RANK4, np.array(["cat", "cat", "dog", "dog"])) == pytest.approx(29 / 48)


def test_label_map_query_ids_hand_computed():
    # queries 1 and 3 of the same collection: their APs from the hand-computed set above
    q = np.array([3, 1])
    m, aps = label_map(RANK4[q], LABELS4, return_aps=True, query_ids=q)
    np.testing.assert_allclose(aps, [1 / 6, 1.0], atol=1e-15)
    assert m == pytest.approx((1 / 6 + 1) / 2)
    res = label_map(RANK4[q], LABELS4, query_ids=q, ks=(1, 2))
    np.testing.assert_allclose(res.aps, aps)
    # a truncated ranking: positives beyond the cut are misses. Query 3, rows [3, 0], finds
    # one of its 2 positives at the top: AP 1/2; query 1, rows [1, 0], finds both: AP 1
    assert label_map(RANK4[q][:, :2], LABELS4, query_ids=q, exclude_self=False) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="query_ids has 1 ids but the ranking has 2 rows"):
        label_map(RANK4[q], LABELS4, query_ids=[1])
    with pytest.raises(ValueError, match="query_ids"):
        label_map(RANK4[q], LABELS4, query_ids=[1, 4])
    with pytest.raises(ValueError, match="pass query_ids="):
        label_map(np.array([[0, 1], [1, 0]]), LABELS4)


def test_label_map_singletons_left_out():
    labels = np.array([0, 0, 1])
    ranking = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    m, aps = label_map(ranking, labels, return_aps=True)
    assert np.isnan(aps[2]) and m == 1.0
    with pytest.raises(ValueError, match="singleton"):
        label_map(ranking, np.array([0, 1, 2]))


def test_label_map_coil20_labels_perfect_and_fast():
    labels = np.repeat(np.arange(20), 72)
    n = labels.size
    key = (labels[None, :] != labels[:, None]).astype(np.int64) * n + np.arange(n)[None, :]
    perfect = np.argsort(key, axis=1)
    assert label_map(perfect, labels) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(3)
    rand = np.argsort(rng.random((n, n)), axis=1)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        m = label_map(rand, labels)
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0
    assert 0.03 < m < 0.08  # chance level ~ 71/1439 plus the small-rank bonus


def test_bullseye_hand_computed():
    labels = np.array([0, 0, 0, 1, 1, 1])
    ranking = np.array([[0, 1, 3, 2, 4, 5],
                        [1, 3, 0, 2, 4, 5],
                        [2, 0, 1, 3, 4, 5],
                        [3, 0, 1, 2, 4, 5],
                        [4, 5, 0, 1, 2, 3],
                        [5, 1, 0, 2, 3, 4]])
    # hits in the top 2: 2, 1, 2, 1, 2, 1 = 9 ; denominator 6 * 3
    assert bullseye_score(ranking, labels, top=2) == pytest.approx(0.5)
    assert bullseye_score(ranking[:, :2], labels, top=2) == pytest.approx(0.5)
    assert bullseye_score(ranking, labels, top=6) == 1.0


def test_bullseye_mpeg7_perfect_ranking_is_one():
    root = require_data("mpeg7")
    names = sorted(f.rsplit("-", 1)[0] for f in os.listdir(root) if f.lower().endswith(".gif"))
    _, labels = np.unique(names, return_inverse=True)
    n = labels.size
    assert n == 1400 and set(np.bincount(labels)) == {20}
    # self first, then its class, then the rest
    key = ((labels[None, :] != labels[:, None]).astype(np.int64) * 2
           + (np.arange(n)[None, :] != np.arange(n)[:, None])) * n + np.arange(n)[None, :]
    perfect = np.argsort(key, axis=1)
    assert (perfect[:, 0] == np.arange(n)).all()
    assert bullseye_score(perfect, labels) == 1.0
    rng = np.random.default_rng(4)
    rand = np.argsort(rng.random((n, n)), axis=1)
    assert bullseye_score(rand, labels) < 0.05


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

GND2 = [{"easy": [0], "hard": [1], "junk": [2]}, {"easy": [3], "hard": [], "junk": []}]
RANK2 = np.tile(np.arange(5), (2, 1))


@pytest.mark.parametrize("ranking, match", [
    (np.arange(5), "2-D"),
    (np.zeros((2, 5, 1), int), "2-D"),
    (np.tile(np.arange(5), (3, 1)), "3 rows but gnd has 2"),
    (np.array([[0, 1, 1, 3, 4], [0, 1, 2, 3, 4]]), "row 0 lists database item 1 more than once"),
    (np.array([[0, 1, 2, 3, 5], [0, 1, 2, 3, 4]]), "index 5 .* outside the database range"),
    (np.array([[0, 1, 2, 3, -1], [0, 1, 2, 3, 4]]), "index -1"),
    (np.array([[0, 1, 2, 3, np.nan], [0, 1, 2, 3, 4]]), "NaN"),
    (np.array([[0, 1, 2, 3, 4.5], [0, 1, 2, 3, 4]]), "non-integer"),
    (np.zeros((0, 5), int), "no queries"),
])
def test_revisited_rejects_bad_rankings(ranking, match):
    with pytest.raises(ValueError, match=match):
        revisited_map(ranking, GND2)


def test_revisited_rejects_bad_ground_truth():
    with pytest.raises(ValueError, match=r"gnd\[1\]\['easy'\] has index 7"):
        revisited_map(RANK2, [GND2[0], {"easy": [7], "hard": [], "junk": []}])
    with pytest.raises(ValueError, match="NaN"):
        revisited_map(RANK2, [GND2[0], {"easy": [np.nan], "hard": [], "junk": []}])
    with pytest.raises(KeyError, match="no key 'hard'"):
        revisited_map(RANK2, [GND2[0], {"easy": [1], "junk": []}])
    with pytest.raises(TypeError, match="pass d\\['gnd'\\]"):
        revisited_map(RANK2, {"gnd": GND2, "imlist": [], "qimlist": []})
    with pytest.raises(ValueError, match="no query has any positive in the hard setting"):
        revisited_map(RANK2, [{"easy": [0], "hard": [], "junk": []}] * 2)
    with pytest.raises(ValueError, match="ks must be positive"):
        revisited_map(RANK2, GND2, ks=(0,))
    with pytest.raises(KeyError, match="no key 'ok'"):
        classic_map(RANK2, GND2)


def test_other_entry_points_validate():
    with pytest.raises(ValueError, match="1-D"):
        average_precision(np.zeros((2, 2), int), [0])
    with pytest.raises(ValueError, match="more than once"):
        average_precision([0, 1, 0], [0])
    with pytest.raises(ValueError, match="index 9"):
        average_precision([0, 1, 2], [9], n_db=3)
    with pytest.raises(ValueError, match="NaN"):
        label_map(RANK4, np.array([0.0, 0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="4 rows"):
        label_map(RANK4, np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="outside the database range"):
        label_map(np.array([[0, 4], [1, 0], [2, 3], [3, 2]]), LABELS4)
    with pytest.raises(ValueError, match="only 2 columns"):
        bullseye_score(RANK4[:, :2], LABELS4, top=3)
    with pytest.raises(ValueError, match="no query appears among its own top"):
        bullseye_score(np.stack([row[row != q] for q, row in enumerate(RANK4)]), LABELS4, top=2)
    with pytest.raises(ValueError, match="top must be a positive int"):
        bullseye_score(RANK4, LABELS4, top=0)
    with pytest.raises(TypeError, match="integer indices"):
        mean_average_precision(np.array([[True, False]]), [[0]])


# ---------------------------------------------------------------------------
# precision@k, recall@k, UKBench N-S (hand-computed)
# ---------------------------------------------------------------------------

def test_precision_and_recall_at_k_by_hand():
    from retrieval_jax.evaluation import precision_at_k, recall_at_k

    ranking = np.array([[0, 1, 2, 3, 4], [1, 0, 3, 2, 4]])
    positives = [[1, 2, 4], [0]]
    junk = [[0], [1]]                 # each query is junk: deleted before counting
    # q0 after junk removal: 1 2 3 4 -> hits at k=1,2,3,4: 1 2 2 3
    # q1 after junk removal: 0 3 2 4 -> hits 1 1 1 1
    p = precision_at_k(ranking, positives, junk, ks=(1, 2, 3, 4))
    assert p == pytest.approx({1: 1.0, 2: (1 + 0.5) / 2, 3: (2 / 3 + 1 / 3) / 2, 4: (3 / 4 + 1 / 4) / 2})
    r = recall_at_k(ranking, positives, junk, ks=(1, 2, 4))
    assert r == pytest.approx({1: (1 / 3 + 1) / 2, 2: (2 / 3 + 1) / 2, 4: 1.0})
    # revisitop's mP@k differs: precision at min(k, last positive) can reach 1
    mp = mean_average_precision(ranking, positives, junk, ks=(4,)).mp[4]
    assert mp == pytest.approx((3 / 4 + 1.0) / 2) and p[4] == pytest.approx(0.5)
    # a query with no positive is left out; truncated rankings count the rest as misses
    p = precision_at_k(ranking[:, :2], [[1], []], None, ks=(2,), n_db=5)
    assert p == pytest.approx({2: 0.5})
    with pytest.raises(ValueError, match="k = 6 exceeds the 5 database items"):
        precision_at_k(ranking, positives, junk, ks=(6,))
    with pytest.raises(ValueError, match="no query has any positive"):
        recall_at_k(ranking, [[], []], None, ks=(1,))


def test_ukbench_score_by_hand():
    from retrieval_jax.evaluation import ukbench_score

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    good = np.array([[q] + [i for i in range(8) if i != q] for q in range(8)])
    ranking = np.array([np.r_[np.flatnonzero(labels == labels[q]),
                              np.flatnonzero(labels != labels[q])] for q in range(8)])
    assert ukbench_score(ranking, labels) == pytest.approx(4.0)
    # rows "q, then the others in index order", the query counted: q0..q3 see 0-3 (4 each),
    # q4 sees 4, 0, 1, 2 (1 each for q4..q7): (4 * 4 + 4 * 1) / 8
    assert ukbench_score(good, labels) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="needs the top 4"):
        ukbench_score(ranking[:, :3], labels)


def test_label_map_with_ks_is_the_same_record_as_the_list_protocol():
    from retrieval_jax.evaluation import MapResult, label_map, mean_average_precision
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=30)
    ranking = np.stack([rng.permutation(30) for _ in range(30)])
    res = label_map(ranking, labels, ks=(1, 5))
    assert isinstance(res, MapResult) and res.map == pytest.approx(label_map(ranking, labels))
    # the same protocol spelled as positive / junk lists: same label positive, the query junk
    pos = [np.flatnonzero((labels == labels[q]) & (np.arange(30) != q)) for q in range(30)]
    ref = mean_average_precision(ranking, pos, [[q] for q in range(30)], ks=(1, 5))
    assert res.map == pytest.approx(ref.map) and res.mp == pytest.approx(ref.mp)
