"""experiments/bench_defaults.py --quick (n = 3,000, 40 queries, 10 solved by scipy, 2 runs) into a tmp dir.

The CSV holds one row per route and one per scipy baseline, with the columns it promises;
the ratios are the rows' own; and the rankings the routes wrote agree with an independent
reference: a direct sparse solve (I - alpha W) x = y in float64 (scipy's spsolve) on the
graph rebuilt here from the same data. No timing is asserted.
"""
import json

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from conftest import assert_valid_png, read_csv
from experiments import bench_defaults
from experiments.common import clustered_database
from retrieval_jax.diffusion import query_vectors
from retrieval_jax.graph import knn, knn_graph, normalize

N, NQ, NSC = 3000, 40, 10


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_defaults")
    assert bench_defaults.main(["--quick", "--out", str(d)]) == 0
    return d


@pytest.mark.slow
def test_csv_structure_and_ratios(out):
    rows = read_csv(out / "bench_defaults.csv")
    assert list(rows[0]) == list(bench_defaults.COLUMNS)
    routes = [bench_defaults.SEARCH, bench_defaults.ITEMS, bench_defaults.DIFFUSE, bench_defaults.DIFFUSE_GIVEN]
    assert [r["route"] for r in rows[0::2]] == routes
    by = {r["route"]: r for r in rows}
    for name in routes:
        r = by[name]
        base = by[r["baseline"]]                  # the scipy loop of the same stopping rule
        assert base["route"].startswith("scipy cg loop") and "float32 CSR" in base["route"]
        assert int(r["n"]) == N and int(r["queries"]) == NQ and int(base["queries"]) == NSC
        assert int(r["runs"]) == int(base["runs"]) == 2
        for row in (r, base):
            assert 0 < float(row["ms_min"]) <= float(row["ms_per_query"]) <= float(row["ms_max"])
        assert float(r["warm_ms_per_query"]) > 0 and float(r["offline_s"]) > 0
        np.testing.assert_allclose(float(r["vs_scipy"]),
                                   float(base["ms_per_query"]) / float(r["ms_per_query"]), rtol=1e-6)
        np.testing.assert_allclose(float(r["warm_vs_scipy"]),
                                   float(base["ms_per_query"]) / float(r["warm_ms_per_query"]), rtol=1e-6)
        assert float(r["vs_scipy_min"]) <= float(r["vs_scipy"]) <= float(r["vs_scipy_max"])
        assert int(r["max_iter"]) == int(base["max_iter"])
    assert int(by[bench_defaults.DIFFUSE]["max_iter"]) == int(by[bench_defaults.DIFFUSE_GIVEN]["max_iter"]) == 1000
    # the same runs less the graph build: cheaper, same warm call and ranking
    given, whole = by[bench_defaults.DIFFUSE_GIVEN], by[bench_defaults.DIFFUSE]
    assert float(given["ms_per_query"]) < float(whole["ms_per_query"])
    assert float(given["offline_s"]) < float(whole["offline_s"])
    assert given["warm_ms_per_query"] == whole["warm_ms_per_query"]
    assert given["top100_vs_scipy_same_rule"] == whole["top100_vs_scipy_same_rule"]
    # converged to tol: the true residual is small, the ranking the scipy loop's
    diffused = by[bench_defaults.DIFFUSE]
    assert float(diffused["residual_max"]) < 1e-4
    assert float(diffused["top100_vs_scipy_same_rule"]) >= 0.99
    config = json.loads((out / "config.json").read_text())
    assert config["n"] == N and config["search"] in ("faiss", "exact")
    assert_valid_png(out / "bench_defaults.png", min_width=300, min_height=200)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_rankings_match_a_direct_solve(out):
    db, q, _, _ = clustered_database(N, NQ, 64)
    w = normalize(knn_graph(db, bench_defaults.K, gamma=3.0)).to_scipy().astype(np.float64)
    m = (sp.identity(N, format="csc") - bench_defaults.ALPHA * w).tocsc()
    sims, ids = knn(q[:NSC], db, bench_defaults.QUERY_K)
    y = np.asarray(query_vectors(sims, ids, N, gamma=3.0), np.float64)
    tops = np.load(out / "top100.npz")
    items = tops["item_ids"]
    assert items.shape == (NSC,) and tops["diffuse"].shape == (NSC, 100)
    exact_q = sla.spsolve(m, y.T).T                       # [NSC, N]
    e = np.zeros((NSC, N))
    e[np.arange(NSC), items] = 1.0
    exact_items = sla.spsolve(m, e.T).T

    def overlap(top, exact):   # the share of the route's top 100 among the exact top 100
        best = np.argsort(-exact, axis=1, kind="stable")[:, :100]
        return np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(top, best)])

    assert overlap(tops["diffuse"], exact_q) >= 0.99          # CG to tol 1e-6: the exact ranking
    # the method's default step limit may stop short of convergence: close to the exact ranking
    assert overlap(tops["search"], exact_q) >= 0.95
    assert overlap(tops["items"], exact_items) >= 0.95


def test_queries_for_a_ratio():
    # scipy 40 ms per query; warm 2 ms per query (0.2 s for 100); whole 1.2 s: F = 1 s,
    # so N queries run at 40 / (2 + 1000 / N) ms: 10x from N = 500 on
    assert bench_defaults.queries_for(10.0, 0.040, 1.2, 0.2, 100) == 500
    assert 0.040 / (0.002 + 1.0 / 500) == pytest.approx(10.0)
    assert bench_defaults.queries_for(10.0, 0.040, 0.2, 0.2, 100) == 0          # no fixed cost
    assert bench_defaults.queries_for(10.0, 0.040, 1.2, 0.4, 100) == float("inf")   # warm only 10x
    assert bench_defaults.queries_for(10.0, 0.040, 1.2, float("nan"), 100) == float("inf")
