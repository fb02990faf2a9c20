"""experiments/bench_million.py --quick (n = 20,000, exact graph) into a tmp dir: every step
writes a row, the routes' agreement with the converged ranking is what the methods give.
No timing is asserted."""
import pytest

from conftest import read_csv


@pytest.mark.slow
def test_quick_million_recipe(tmp_path):
    from experiments import bench_million
    rows = bench_million.run(20000, 32, 10, 20, 5, 200, 10, tmp_path, "exact", 1, log=lambda *a, **k: None)
    by = {r["step"]: r for r in read_csv(tmp_path / "million.csv")}
    assert len(by) == len(rows) == 15
    assert "mutual-edge recall 1.0000" in by["graph (exact, mutual, k = 10)"]["note"]  # exact: every edge
    conv = by["converged CG (tol 1e-6), batched"]
    assert float(conv["top100_overlap"]) == 1.0 and float(conv["mAP"]) > 50
    # the same system renumbered, and the scipy loops on the float32 CSR (the speed-ups' baseline)
    # and on the float64 one: the same converged ranking
    default = by[bench_million.LAYOUT_ROUTE]
    assert float(default["top100_overlap"]) >= 0.99 and "whole (layout + first call" in default["note"]
    scipy32, scipy64 = by["scipy cg loop (CSR float32, tol 1e-6)"], by["scipy cg loop (CSR float64, tol 1e-6)"]
    for r in (scipy32, scipy64):
        assert float(r["top100_overlap"]) >= 0.99
    # speed-ups are written to 2 decimals, seconds to 4 significant digits
    for r in (conv, scipy64):
        assert float(r["speedup_vs_scipy"]) == pytest.approx(float(scipy32["seconds"]) / float(r["seconds"]),
                                                             rel=2e-2, abs=6e-3)
    assert float(conv["seconds_min"]) <= float(conv["seconds"]) <= float(conv["seconds_max"])
    # the approximations stop short of it (a shortlist of 200 on 200 clusters of 100)
    truncated = by["truncated diffusion, T = 200 (CG to tol)"]
    assert float(truncated["top100_overlap"]) < 0.99 and float(truncated["mAP"]) < float(conv["mAP"])
    assert "of the queries' clusters" in truncated["note"]
    assert "E/M/H" in by["revisited_map on the converged top-1000 (n_db = n)"]["note"]
    # every component's own spectrum ranks closer to the converged ranking than the global top r
    glob, comp = by["FSR.approx, r = 10"], by["FSR.approx per component, r = 10"]
    assert float(comp["top100_overlap"]) > float(glob["top100_overlap"])
    assert "components (largest" in by["component_eigenpairs(W, 10)"]["note"]
    assert not (tmp_path / "graph.npz").exists()
