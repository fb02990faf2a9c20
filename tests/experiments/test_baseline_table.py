"""experiments/baseline_table.py --quick into a tmp dir: a row for every registered method, and
knn's COIL-20 mAP equal to a numpy computation of the protocol from the paper's definitions
(inner products, the query left out, Oxford AP). No timing is asserted."""
import numpy as np
import pytest

from conftest import read_csv, require_data


def _oxford_ap(order, positives) -> float:
    """Oxford AP (Philbin et al. 2007) of one ranking: (1/n_pos) sum_j (p0_j + p1_j) / 2."""
    ranks = np.flatnonzero(np.isin(order, positives))
    ap = 0.0
    for j, r in enumerate(ranks):
        p0 = 1.0 if r == 0 else j / r
        ap += (p0 + (j + 1) / (r + 1)) / 2
    return ap / len(positives)


@pytest.mark.slow
def test_quick_table_has_every_method_and_knn_matches_numpy(tmp_path):
    root = require_data("coil20")
    from experiments import baseline_table
    from retrieval_jax.data import load_coil20
    from retrieval_jax.methods import METHODS

    out = tmp_path / "table"
    assert baseline_table.main(["--quick", "--datasets", "coil20", "--out", str(out)]) == 0
    rows = read_csv(out / "baseline_table.csv")
    assert [r["method"] for r in rows] == list(METHODS)  # every method, whatever happened to it
    assert all(r["dataset"] == "coil20" and r["status"] in ("ok", "skipped", "failed") for r in rows)
    assert all(r["note"] for r in rows if r["status"] != "ok")  # a row that did not run says why
    for name in ("baseline_table.md", "baseline_table.png", "config.json"):
        assert (out / name).stat().st_size > 0
    md = (out / "baseline_table.md").read_text()
    assert all(f"| {name} |" in md for name in METHODS)

    knn = next(r for r in rows if r["method"] == "knn")
    assert knn["status"] == "ok" and float(knn["ms_per_query"]) > 0 and int(knn["n"]) == 360
    data = load_coil20(root, size=32)
    x, labels = np.asarray(data.X, np.float64)[::4], np.asarray(data.labels)[::4]
    sims = x @ x.T
    aps = []
    for q in range(len(x)):
        order = np.argsort(-sims[q], kind="stable")
        order = order[order != q]
        aps.append(_oxford_ap(order, np.flatnonzero((labels == labels[q]) & (np.arange(len(x)) != q))))
    # two of the images' similarities to a third differ by 6e-8, under float32's resolution: the
    # method's float32 scores may order that pair either way (1e-5 points of mAP)
    assert float(knn["mAP"]) == pytest.approx(100 * np.mean(aps), abs=1e-4)


@pytest.mark.slow
def test_quick_table_protocols_and_a_refused_size(tmp_path):
    require_data("mpeg7")
    from experiments import baseline_table

    out = tmp_path / "table"
    assert baseline_table.main(["--quick", "--datasets", "mpeg7", "--methods", "knn", "fsr", "--out", str(out)]) == 0
    mpeg7 = {r["method"]: r for r in read_csv(out / "baseline_table.csv")}
    assert mpeg7["knn"]["quality"].startswith("bull's-eye") and 0 < float(mpeg7["knn"]["bullseye"]) <= 100
    # FSR's default rank 400 does not fit 350 shapes: its check_sizes says so in the row
    assert mpeg7["fsr"]["status"] == "skipped" and "rank" in mpeg7["fsr"]["note"]

    assert baseline_table.main(["--quick", "--datasets", "revisited", "--methods", "knn", "diffusion",
                                "--out", str(out)]) == 0
    rows = {r["method"]: r for r in read_csv(out / "baseline_table.csv")}
    for r in rows.values():
        assert r["status"] == "ok" and r["dataset"] == "revisited" and int(r["n"]) == 2000
        assert int(r["queries"]) == 16 and r["quality"].startswith("E ")
        assert all(0 <= float(r[f"mAP_{p}"]) <= 100 for p in ("easy", "medium", "hard"))
    # clusters on curves: the graph method follows them, the plain search does not
    assert float(rows["diffusion"]["mAP_medium"]) > float(rows["knn"]["mAP_medium"])
    assert float(rows["diffusion"]["offline_s"]) >= float(rows["diffusion"]["graph_s"]) > 0


def test_revisited_gnd_splits_each_cluster_by_similarity():
    from experiments.baseline_table import revisited_gnd
    db = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]] * 4)
    labels = np.array([0, 0, 0, 0, 1] * 4)  # cluster 0: 16 items, 4 each of 4 similarities
    gnd = revisited_gnd(np.array([[1.0, 0.0]]), db, np.array([0]), labels)[0]
    sims = db @ np.array([1.0, 0.0])
    assert len(gnd["easy"]) == 8 and len(gnd["hard"]) == 7 and len(gnd["junk"]) == 1
    assert sims[gnd["easy"]].min() >= sims[gnd["hard"]].max() >= sims[gnd["junk"]].max()
    assert set(np.concatenate(list(gnd.values()))) == set(np.flatnonzero(labels == 0))


def test_ranking_order_ties_exclusion_and_unreached():
    from experiments.baseline_table import _ranked, ranking_key
    key = np.array([[0.5, 0.9, 0.5, 0.1, 0.9]])
    assert _ranked(key, 5).tolist() == [[1, 4, 0, 2, 3]]            # ties by index
    assert _ranked(key, 3).tolist() == [[1, 4, 0]]                  # a prefix of the same
    assert _ranked(key, 5, exclude=[1]).tolist() == [[4, 0, 2, 3, 1]]
    # unreached (score <= 0.1 of the best): after the reached items, by similarity
    scores = np.array([[1.0, 0.05, 0.5, 0.0]])
    sims = np.array([[0.9, 0.2, 0.1, 0.8]])
    assert _ranked(ranking_key(scores, sims, 0.1), 4).tolist() == [[0, 2, 3, 1]]
    assert _ranked(ranking_key(scores, sims, None), 4).tolist() == [[0, 2, 1, 3]]


def test_outputs_read_back_for_resume(tmp_path):
    from experiments.baseline_table import _earlier_rows, quality_text, write_outputs
    rows = [{"dataset": "coil20", "n": 1440, "queries": 1440, "method": "knn", "status": "ok", "mAP": 61.5,
             "ms_per_query": 0.19, "offline_s": 0.2, "peak_mb": 63.0, "note": ""},
            {"dataset": "revisited", "n": 5000, "queries": 70, "method": "knn", "status": "ok", "mAP_easy": 98.0,
             "mAP_medium": 77.5, "mAP_hard": 40.25, "ms_per_query": 0.02, "offline_s": 0.1, "peak_mb": 30.0,
             "note": "a | b"},
            {"dataset": "revisited", "n": 5000, "queries": 70, "method": "fsr", "status": "stopped",
             "note": "still running after 600 s (--timeout)"}]
    for r in rows:
        r["quality"] = quality_text(r)
    assert [r["quality"] for r in rows] == ["mAP 61.50", "E 98.00 / M 77.50 / H 40.25", ""]
    write_outputs(tmp_path, rows, "# t")
    back = _earlier_rows(tmp_path / "baseline_table.csv")
    assert list(back) == [("coil20", None, "knn"), ("revisited", 5000, "knn"), ("revisited", 5000, "fsr")]
    for r in rows:
        b = back[(r["dataset"], r["n"] if r["dataset"] == "revisited" else None, r["method"])]
        assert {k: v for k, v in b.items() if v is not None} == {k: v for k, v in r.items() if v != ""}
    md = (tmp_path / "baseline_table.md").read_text()
    assert "| revisited | 5,000 | fsr |  |  |  |  | **stopped**: still running after 600 s" in md
    assert "a / b" in md  # a note cannot break the table
