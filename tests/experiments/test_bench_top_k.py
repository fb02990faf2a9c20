"""experiments/bench_top_k.py: its two routes differ exactly by optimisation barriers on the
query-database top-k's (counted from the traced program, not from the script's own count),
score alike, and --quick writes one row per chosen method with consistent columns. No timing
is asserted."""
import jax
import numpy as np

from conftest import read_csv
from experiments import bench_top_k
from retrieval_jax.methods import METHODS


def _barriers(method, state, queries, barrier: bool) -> int:
    with bench_top_k.top_k_route(barrier, state.database.shape[0], queries.shape[0]):
        text = str(jax.make_jaxpr(method.search)(state, queries))
    return text.count("optimization_barrier")


def test_routes_add_and_remove_barriers():
    db, q, _, _ = bench_top_k.clustered_database(300, 8, 8)
    for name in ("alpha-qe", "dqe"):
        method = METHODS[name]
        state = bench_top_k.build_state(name, {}, db, {})
        plain = _barriers(method, state, jax.numpy.asarray(q), False)
        barrier = _barriers(method, state, jax.numpy.asarray(q), True)
        sites = 2 if name == "dqe" else 1   # DQE: its positives and negatives
        assert (plain, barrier) == (0, sites), name
    # the patch is undone: the library's own top-k and barrier are back
    assert jax.lax.top_k.__name__ == "top_k"
    assert jax.lax.optimization_barrier.__name__ == "optimization_barrier"


def test_every_method_with_a_top_k_has_a_row():
    assert {name for _, name, _ in bench_top_k.CASES} == set(METHODS) - {"knn"}


def test_quick(tmp_path, capsys):
    chosen = ["aqe", "alpha-qe"]
    assert bench_top_k.main(["--quick", "--methods", *chosen, "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "bench_top_k.csv")
    assert [r["method"] for r in rows] == chosen
    assert tuple(rows[0]) == bench_top_k.COLUMNS
    for r in rows:
        assert (int(r["n"]), int(r["d"]), int(r["queries"])) == (1500, 16, 8)
        for route in ("plain", "barrier"):
            assert 0 < float(r[f"{route}_min"]) <= float(r[f"{route}_ms"]) <= float(r[f"{route}_max"])
        np.testing.assert_allclose(float(r["plain_vs_barrier"]), float(r["plain_ms"]) / float(r["barrier_ms"]),
                                   rtol=1e-6)
        assert int(r["sites"]) == 1
        assert float(r["max_abs_diff"]) <= 1e-5
    out = capsys.readouterr().out
    assert "| method | N |" in out and out.count("| aqe |") == 1 and out.count("| alpha-qe |") == 1
