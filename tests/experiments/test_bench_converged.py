"""experiments/bench_converged.py --quick into a tmp dir: every route writes a row, all reach the
float64 scipy ranking (top-100 overlap, small score difference), the ratios are against the
float32 scipy loop (like for like) with the float64 one beside it, the bandwidth rows and the
PNG exist. No timing is asserted."""
import pytest

from conftest import assert_valid_png, read_csv

from experiments import bench_converged


@pytest.mark.slow
def test_quick(tmp_path):
    assert bench_converged.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = {r["route"]: r for r in read_csv(tmp_path / "bench_converged.csv")}
    jax_routes = {"jax batched CG", "jax two-level CG (deflation)", "jax two-level CG (additive)"}
    scipy_routes = {bench_converged.SCIPY, bench_converged.SCIPY64}
    assert scipy_routes == {"scipy cg loop (float32 CSR)", "scipy cg loop (float64 CSR)"}
    assert set(rows) == (scipy_routes | {"jax batched CG, block order"} | jax_routes
                         | {f"{r}, locality order" for r in jax_routes})
    for r in rows.values():
        assert float(r["ms_per_query"]) > 0
        assert float(r["top100_overlap_min"]) >= 0.95
        assert float(r["max_rel_diff_vs_scipy"]) < 1e-3
    t32 = float(rows[bench_converged.SCIPY]["ms_per_query"])
    t64 = float(rows[bench_converged.SCIPY64]["ms_per_query"])
    for r in rows.values():
        assert float(r["vs_scipy"]) == pytest.approx(t32 / float(r["ms_per_query"]), rel=1e-6)
        assert float(r["vs_scipy_float64"]) == pytest.approx(t64 / float(r["ms_per_query"]), rel=1e-6)
    assert int(rows["jax two-level CG (deflation)"]["iterations_max"]) < int(rows["jax batched CG"]["iterations_max"])
    bw = read_csv(tmp_path / "bandwidth.csv")
    assert len(bw) == 9 and all(float(r["copy_GBps"]) > 0 for r in bw)
    assert_valid_png(tmp_path / "bench_converged.png")
