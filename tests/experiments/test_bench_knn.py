"""experiments.bench_knn --quick (n = 2000, d = 32, k = 10, two rounds, no pynndescent) into a tmp dir.

Every route of the quick mode writes a CSV row with positive times (median within its
min-max), the exact JAX and faiss routes (faiss when installed) find the numpy
neighbours (recall >= 0.99, ties aside), the default knn_graph and the faiss + scipy
reference hold the exact mutual graph's edges, the ratio columns are the rows' own
ratios, and the PNG opens. No timing is asserted.
"""
import math

import pytest

from conftest import assert_valid_png, read_csv
from experiments import bench_knn

QUICK_ROUTES = {
    bench_knn.NUMPY,
    "sklearn NearestNeighbors brute cosine",
    bench_knn.JAX_KNN,
    bench_knn.JAX_GRAPH,
    bench_knn.DEFAULT,
}
FAISS_ROUTES = {bench_knn.FAISS_FLAT, bench_knn.FAISS_KNN, bench_knn.FAISS_GRAPH, bench_knn.REFERENCE}
HAVE_FAISS = bench_knn.faiss_available()
GRAPH_ROUTES = {bench_knn.JAX_GRAPH, bench_knn.DEFAULT, bench_knn.FAISS_GRAPH, bench_knn.REFERENCE}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_knn")
    assert bench_knn.main(["--quick", "--out", str(d)]) == 0
    return d


@pytest.mark.slow
def test_csv_rows(out):
    rows = read_csv(out / "knn_speed.csv")
    by = {r["route"]: r for r in rows}
    # no pynndescent in --quick; faiss when installed
    assert set(by) == QUICK_ROUTES | (FAISS_ROUTES if HAVE_FAISS else set())
    for r in rows:
        assert (int(r["n"]), int(r["d"]), int(r["k"])) == (2000, 32, 10)
        assert 0 < float(r["seconds_min"]) <= float(r["seconds"]) <= float(r["seconds_max"])
        assert float(r["vs_numpy"]) > 0 and float(r["vs_jax"]) > 0
        assert float(r["peak_rss_mb"]) > 0
        assert int(r["runs"]) == (1 if r["route"] == bench_knn.NUMPY else 2)
    base = by[bench_knn.NUMPY]
    assert float(base["vs_numpy"]) == pytest.approx(1.0)
    assert float(base["recall_at_k"]) == pytest.approx(1.0)
    for route in (bench_knn.JAX_KNN, "sklearn NearestNeighbors brute cosine"):
        assert float(by[route]["recall_at_k"]) >= 0.99, route
        assert math.isnan(float(by[route]["edge_recall"]))
        assert math.isnan(float(by[route]["vs_reference"]))
    graph = by[bench_knn.JAX_GRAPH]
    assert float(by[bench_knn.JAX_KNN]["vs_jax"]) == pytest.approx(1.0)
    assert float(graph["vs_jax"]) == pytest.approx(1.0)
    for route in GRAPH_ROUTES & set(by):
        assert float(by[route]["edge_recall"]) >= 0.99, route
        assert float(by[route]["vs_jax"]) == pytest.approx(float(graph["seconds"]) / float(by[route]["seconds"]))
    assert f"search {bench_knn.search_route('auto')!r}" in by[bench_knn.DEFAULT]["note"]
    if HAVE_FAISS:
        for route in (bench_knn.FAISS_FLAT, bench_knn.FAISS_KNN):
            assert float(by[route]["recall_at_k"]) >= 0.99, route
        ref, default = float(by[bench_knn.REFERENCE]["seconds"]), by[bench_knn.DEFAULT]
        assert float(by[bench_knn.REFERENCE]["vs_reference"]) == pytest.approx(1.0)
        assert float(default["vs_reference"]) == pytest.approx(ref / float(default["seconds"]))


@pytest.mark.slow
def test_png(out):
    assert_valid_png(out / "knn_speed.png", min_width=300, min_height=200)
    assert not list(out.glob(".*.tmp")), "atomic_write left a temporary file"


def test_recall_helpers():
    true = [[1, 2, 3], [0, 2, 3]]
    assert bench_knn.recall_at_k(true, true, 3) == 1.0
    assert bench_knn.recall_at_k([[3, 2, 1], [4, 5, 0]], true, 3) == pytest.approx((3 + 1) / 6)
    import numpy as np
    np.testing.assert_array_equal(bench_knn.drop_self(np.array([[0, 5, 6], [7, 1, 8]]), 2),
                                  [[5, 6], [7, 8]])
