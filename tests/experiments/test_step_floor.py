"""experiments/step_floor.py: the hand-written C kernels compute what they claim (the product
against a dense M x, the update pass against its three formulas, the fused CG against scipy's
cg after the same steps, for widths that are and are not a multiple of the column chunk), the
library is built once per source text and atomically, and a failing compiler is reported
instead of raised. No timing is asserted."""
import numpy as np
import pytest
import scipy.sparse.linalg as sla

from experiments import step_floor
from retrieval_jax.graph import Graph, normalize

ALPHA = 0.9


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    lib, why = step_floor.compile_kernels(tmp_path_factory.mktemp("kernels"))
    if lib is None:
        pytest.skip(f"the hand-written kernels need a C compiler: {why}")
    return lib


@pytest.fixture(scope="module")
def graph():
    """A normalised random symmetric graph on 600 nodes (more than two blocks of the fused CG's
    float sums) with padded slots (weight 0)."""
    rng = np.random.default_rng(0)
    n = 600
    a = rng.random((n, n)) * (rng.random((n, n)) < 0.01)
    a = np.triu(a, 1)
    a = a + a.T
    a[np.arange(n), (np.arange(n) + 1) % n] += 0.5   # a ring keeps every node connected
    a[(np.arange(n) + 1) % n, np.arange(n)] += 0.5
    w = normalize(Graph.from_dense(a.astype(np.float32)))
    return np.asarray(w.indices), np.asarray(w.weights), w.to_dense()


@pytest.mark.parametrize("cols", [1, 32, 37, 70])
def test_product_and_update_pass_match_their_formulas(kernels, graph, cols):
    idx, wt, dense = graph
    n = idx.shape[0]
    assert (wt == 0).any(), "the graph should have padded slots"
    rng = np.random.default_rng(cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    y = np.empty_like(x)
    kernels.ell_product(n, idx.shape[1], cols, step_floor._ptr(idx), step_floor._ptr(wt), ALPHA,
                        step_floor._ptr(x), step_floor._ptr(y))
    np.testing.assert_allclose(y, x - ALPHA * dense @ x, rtol=1e-5, atol=1e-5)

    xs, r, p, q = (rng.standard_normal((n, cols)).astype(np.float32) for _ in range(4))
    a, b = rng.random(cols).astype(np.float32), rng.random(cols).astype(np.float32)
    p_ref = r + b * p
    x_ref, r_ref = xs + a * p_ref, r - a * q
    kernels.update_pass(n, cols, *(step_floor._ptr(v) for v in (xs, r, p, q, a, b)))
    np.testing.assert_allclose(p, p_ref, rtol=1e-6, atol=1e-6)   # one rounding (FMA) apart
    np.testing.assert_allclose(xs, x_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r, r_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cols,steps", [(5, 1), (37, 6)])
def test_fused_cg_equals_scipy_after_the_same_steps(kernels, graph, cols, steps):
    idx, wt, dense = graph
    n = idx.shape[0]
    m = np.eye(n) - ALPHA * dense
    rhs = np.random.default_rng(1).standard_normal((n, cols)).astype(np.float32)
    rhs[:, 0] = 0.0   # a zero column stays zero (no 0 / 0)
    times, x = step_floor.floor_times(kernels, idx, wt, ALPHA, rhs, steps, repeat=1)
    assert set(times) == {"c_product", "c_update", "c_cg"}
    for t in times.values():
        assert 0 < t["min"] <= t["median"] <= t["max"]
    ref = np.stack([sla.cg(m, rhs[:, c].astype(np.float64), rtol=1e-14, maxiter=steps)[0]
                    for c in range(cols)], axis=1)
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert not x[:, 0].any()


def test_floor_times_refuses_mismatched_shapes(kernels, graph):
    idx, wt, _ = graph
    with pytest.raises(ValueError, match=r"rhs \[n, B\]"):
        step_floor.floor_times(kernels, idx, wt, ALPHA, np.zeros((idx.shape[0] + 1, 3), np.float32), 1, 1)
    bad = idx.copy()
    bad[0, 0] = idx.shape[0]
    with pytest.raises(ValueError, match="outside"):
        step_floor.floor_times(kernels, bad, wt, ALPHA, np.zeros((idx.shape[0], 3), np.float32), 1, 1)


def test_built_once_per_source_and_a_failing_compiler_is_reported(kernels, tmp_path, monkeypatch):
    assert step_floor.compile_kernels(tmp_path)[0] is not None
    built = sorted(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    step_floor.compile_kernels(tmp_path)
    assert sorted(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == mtime

    failing = tmp_path / "failing"
    monkeypatch.setenv("CC", "false")
    lib, why = step_floor.compile_kernels(failing)
    assert lib is None and "false failed" in why
    assert list(failing.iterdir()) == []   # no temporary file left behind
