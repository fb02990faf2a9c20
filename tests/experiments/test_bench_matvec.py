"""experiments/bench_matvec.py --quick: the product loop it times (`common.neighbour_products`)
equals scipy's W @ X, applied once and twice, for any unroll and in bfloat16 operands; one
row per (n, B, order, unroll), the ratio column is the rows' own ratio, and the recorded
choice is `matvec_unroll`'s. No timing is asserted."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_valid_png, read_csv
from experiments import bench_matvec
from experiments.common import neighbour_products
from retrieval_jax.graph.core import matvec_unroll


def test_product_matches_scipy():
    g = bench_matvec.build_graph(600, 8, 6)
    x = np.random.default_rng(0).normal(size=(600, 5)).astype(np.float32)
    m = g.to_scipy()
    for unroll in (1, 3, g.max_degree):
        for count, want in ((0, x), (1, m @ x), (2, m @ (m @ x))):
            got = neighbour_products(g.indices, g.weights, jnp.asarray(x), jnp.int32(count), unroll=unroll)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    got = neighbour_products(g.indices, g.weights.astype(jnp.bfloat16), jnp.asarray(x, jnp.bfloat16),
                             jnp.int32(1), unroll=g.max_degree)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), m @ x, rtol=3e-2, atol=3e-2)


@pytest.mark.slow
def test_quick(tmp_path):
    assert bench_matvec.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "matvec.csv")
    keys = {(int(r["n"]), int(r["B"]), r["order"], int(r["unroll"])) for r in rows}
    kk = int(rows[0]["K"])
    assert keys == {(n, b, o, u) for n in (2000, 4000) for b in (1, 16) for o in ("database", "locality")
                    for u in (8, kk)}
    by = {(int(r["n"]), int(r["B"]), r["order"], int(r["unroll"])): r for r in rows}
    for (n, b, o, u), r in by.items():
        assert float(r["ms_min"]) <= float(r["ms"]) <= float(r["ms_max"])
        assert int(r["matvec_unroll_choice"]) == matvec_unroll(n, kk, b)
        ratio = float(by[(n, b, o, 8)]["ms"]) / float(by[(n, b, o, kk)]["ms"])
        np.testing.assert_allclose(float(r["all_vs_8"]), ratio, rtol=1e-6)
    assert_valid_png(tmp_path / "matvec.png")
