"""experiments/bench_cg_step.py: the solve it times is the method's (its scores equal scipy's cg
after the same number of steps), its parts add up (vector work = CG loop - products, layout =
solve - CG loop), the guard that every column took the steps holds, and --quick writes the
CSV and plot it promises. No timing is asserted."""
import numpy as np
import pytest
import scipy.sparse.linalg as sla

from conftest import assert_valid_png, read_csv
from experiments import bench_cg_step, step_floor
from retrieval_jax.diffusion import diffusion_operator


@pytest.fixture(scope="module")
def small():
    return bench_cg_step.build(600, 8)


def test_width_row_scores_equal_scipy_and_parts_add_up(small):
    w, y, m32 = small
    steps = 4
    row, scores = bench_cg_step.width_row(diffusion_operator(w, bench_cg_step.ALPHA), y, 5, steps, 1, 1.0)
    assert scores.shape == (5, 600)
    dense = np.asarray(y.todense())[:5]
    ref = np.stack([sla.cg(m32, b, rtol=bench_cg_step.TOL, maxiter=steps)[0] for b in dense])
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    assert row["B"] == 5 and row["steps"] == steps and row["budget_ms"] == pytest.approx(0.1)
    assert row["vector_ms"] == pytest.approx(row["cg_loop_ms"] - row["products_ms"])
    assert row["layout_ms"] == pytest.approx(row["solve_ms"] - row["cg_loop_ms"])
    assert row["products_share_of_budget"] == pytest.approx(row["products_ms"] / row["budget_ms"])
    assert row["solve_min"] <= row["solve_ms"] <= row["solve_max"]


def test_width_row_refuses_columns_that_stop_early(small):
    w, y, _ = small
    # 300 steps: every column reaches 1e-6 before, so the per-step times would be wrong
    with pytest.raises(RuntimeError, match="every column"):
        bench_cg_step.width_row(diffusion_operator(w, bench_cg_step.ALPHA), y, 2, 300, 1, 1.0)


@pytest.mark.slow
def test_quick(tmp_path):
    assert bench_cg_step.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "cg_step.csv")
    assert list(rows[0]) == list(bench_cg_step.COLUMNS)
    assert [int(r["B"]) for r in rows] == [16, 4]
    for r in rows:
        assert int(r["n"]) == 3000 and int(r["steps"]) == 5
        assert float(r["budget_ms"]) == pytest.approx(float(r["scipy_ms"]) / bench_cg_step.SPEEDUP)
        assert float(r["solve_vs_scipy"]) == pytest.approx(float(r["scipy_ms"]) / float(r["solve_ms"]))
        assert float(r["max_rel_diff_vs_scipy"]) < 1e-3
    assert_valid_png(tmp_path / "cg_step.png")


def test_width_row_with_the_hand_written_kernels(small, tmp_path):
    kernels, why = step_floor.compile_kernels(tmp_path)
    if kernels is None:
        pytest.skip(f"the hand-written kernels need a C compiler: {why}")
    w, y, _ = small
    row, _ = bench_cg_step.width_row(diffusion_operator(w, bench_cg_step.ALPHA), y, 5, 4, 1, 1.0, kernels)
    assert row["c_floor_ms"] == pytest.approx(row["c_product_ms"] + row["c_update_ms"])
    assert row["floor_vs_scipy"] == pytest.approx(1.0 / row["c_floor_ms"])
    assert row["c_cg_vs_scipy"] == pytest.approx(1.0 / row["c_cg_ms"])
    assert row["max_rel_diff_c_cg"] < 1e-4   # the fused CG solves the library's system


def test_width_row_without_kernels_leaves_their_columns_empty(small):
    w, y, _ = small
    row, _ = bench_cg_step.width_row(diffusion_operator(w, bench_cg_step.ALPHA), y, 3, 2, 1, 1.0)
    assert all(np.isnan(row[c]) for c in bench_cg_step.C_COLUMNS)
    assert list(bench_cg_step.C_COLUMNS) == list(bench_cg_step.COLUMNS[-len(bench_cg_step.C_COLUMNS):])
