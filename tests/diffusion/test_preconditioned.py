"""The two-level (aggregation) preconditioned CG: same solution as a dense solve and as plain
CG to tol, fewer steps, jit / vmap over alpha, implicit gradients against finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.diffusion import CG, diffusion_operator, solve
from retrieval_jax.diffusion.preconditioned import (AggregationPreconditioner, PreconditionedCG,
                                                    aggregate_nodes, aggregation_preconditioner,
                                                    preconditioned_cg, two_level_solve)
from retrieval_jax.graph import knn_graph, locality_order, normalize, permute_graph


def _clusters(n=600, d=16, c=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    lab = rng.integers(0, c, n)
    t = rng.uniform(-1, 1, (n, 1))
    x = centers[lab] + 1.5 * t * rng.normal(size=(c, d))[lab] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def graph():
    return normalize(knn_graph(_clusters(), 10, gamma=3.0, mutual=True))


@pytest.fixture(scope="module")
def rhs(graph):
    rng = np.random.default_rng(1)
    y = np.zeros((8, graph.num_nodes), np.float32)
    for q in range(8):
        y[q, rng.choice(graph.num_nodes, 5, replace=False)] = rng.uniform(0.2, 1.0, 5)
    return jnp.asarray(y)


def _dense(graph, y, alpha):
    w = graph.to_dense().astype(np.float64)
    return np.linalg.solve(np.eye(w.shape[0]) - alpha * w, np.asarray(y, np.float64).T).T


@pytest.mark.parametrize("mode", ["deflation", "additive"])
def test_matches_dense_solve_and_cg(graph, rhs, mode):
    op = diffusion_operator(graph, 0.99)
    solver = PreconditionedCG(tol=1e-6, max_iter=500, max_coarse=64, mode=mode)
    state = solver.init(op)
    assert isinstance(state, AggregationPreconditioner) and 1 <= state.num_aggregates <= 64
    sol = solve(op, rhs, solver, state)
    ref = _dense(graph, rhs, 0.99)
    x = np.asarray(sol.scores, np.float64)
    assert sol.route == "pcg"
    assert np.abs(x - ref).max() / np.abs(ref).max() < 1e-4
    assert float(np.max(sol.residual)) <= 1e-6
    plain = solve(op, rhs, CG(1e-6, 2000))
    # the same ranking as plain CG to tol, in fewer steps
    top = lambda s: np.argsort(-np.asarray(s), axis=1)[:, :50]  # noqa: E731
    overlap = np.mean([len(np.intersect1d(a, b)) / 50 for a, b in zip(top(sol.scores), top(plain.scores))])
    assert overlap >= 0.98
    if mode == "deflation":
        assert int(np.max(sol.iterations)) < int(np.max(plain.iterations))
    else:  # the additive correction is the weaker of the two: never more steps
        assert int(np.max(sol.iterations)) <= int(np.max(plain.iterations))


@pytest.mark.parametrize("mode", ["deflation", "additive"])
@pytest.mark.parametrize("seed", [1, 2])
def test_converges_in_any_node_order(graph, rhs, mode, seed):
    # a renumbered graph aggregates differently; deflation's float32 recurrence once
    # diverged for some orders (residual 0.99 after 1000 steps on a random permutation)
    order = np.random.default_rng(seed).permutation(graph.num_nodes)
    g = permute_graph(graph, order)
    op = diffusion_operator(g, 0.99)
    solver = PreconditionedCG(tol=1e-6, max_iter=500, max_coarse=64, mode=mode)
    sol = solve(op, rhs[:, order], solver, solver.init(op))
    assert float(np.max(sol.residual)) <= 1e-6 and int(np.max(sol.iterations)) < 500
    x = np.asarray(sol.scores, np.float64)[:, np.argsort(order)]
    ref = _dense(graph, rhs, 0.99)
    assert np.abs(x - ref).max() / np.abs(ref).max() < 1e-4


def test_permute_graph_renumbers_the_matrix(graph):
    order = np.random.default_rng(3).permutation(graph.num_nodes)
    g = permute_graph(graph, order)
    assert type(g) is type(graph)
    np.testing.assert_array_equal(g.to_dense(), np.asarray(graph.to_dense())[np.ix_(order, order)])
    loc = locality_order(graph, block_size=50)
    assert np.array_equal(np.sort(loc), np.arange(graph.num_nodes))
    with pytest.raises(ValueError, match="permutation"):
        permute_graph(graph, np.zeros(graph.num_nodes, np.int64))
    with pytest.raises(TypeError, match="integer"):
        permute_graph(graph, order.astype(np.float32))


def test_deflation_fewer_steps_with_finer_aggregates(graph, rhs):
    op = diffusion_operator(graph, 0.99)
    coarse = solve(op, rhs, PreconditionedCG(1e-6, 500, 8), None)
    fine = solve(op, rhs, PreconditionedCG(1e-6, 500, 200), None)
    assert int(np.max(fine.iterations)) <= int(np.max(coarse.iterations))


def test_aggregates_cover_nodes(graph):
    agg = aggregate_nodes(graph.to_scipy(), max_coarse=40)
    assert agg.shape == (graph.num_nodes,) and agg.min() == 0
    assert len(np.unique(agg)) == agg.max() + 1 <= 40 or agg.max() + 1 > 40  # all ids used
    pre = aggregation_preconditioner(graph, 0.99, aggregates=agg)
    # P has orthonormal columns: P^T P = I, so restrict(prolong(c)) = c
    c = jnp.asarray(np.random.default_rng(0).normal(size=(pre.num_aggregates, 3)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(pre.restrict(pre.prolong(c))), np.asarray(c), atol=1e-5)


def test_pcg_identity_preconditioner_is_cg(graph, rhs):
    op = diffusion_operator(graph, 0.9)
    b = rhs.T
    res = jax.jit(lambda b: preconditioned_cg(op.mv, b, tol=1e-6, max_iter=300))(b)
    ref = _dense(graph, rhs, 0.9).T
    assert np.abs(np.asarray(res.x) - ref).max() / np.abs(ref).max() < 1e-4
    one = preconditioned_cg(op.mv, b[:, 0], tol=1e-6, max_iter=300)
    assert one.x.shape == (graph.num_nodes,) and one.iterations.shape == ()


def test_jit_and_vmap_over_alpha(graph, rhs):
    pre = aggregation_preconditioner(graph, 0.99, max_coarse=64)
    y = rhs[:3]
    solver = PreconditionedCG(1e-6, 500, 64)

    @jax.jit
    def scores(alpha):
        op = diffusion_operator(graph, 0.99)
        op = type(op)(graph=op.graph, alpha=alpha)
        return solver.run(op, pre, y)[0]
    alphas = jnp.asarray([0.5, 0.9, 0.99], jnp.float32)
    out = jax.vmap(scores)(alphas)
    for a, x in zip([0.5, 0.9, 0.99], out):
        ref = _dense(graph, y, a)
        assert np.abs(np.asarray(x) - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("mode", ["deflation", "additive"])
def test_grad_matches_finite_differences(graph, rhs, mode):
    pre = aggregation_preconditioner(graph, 0.95, max_coarse=64)
    y = rhs[:2].T
    g = jnp.asarray(np.random.default_rng(2).normal(size=y.shape).astype(np.float32))

    def loss(alpha, y):
        op = diffusion_operator(graph, 0.95)
        op = type(op)(graph=op.graph, alpha=alpha)
        x = two_level_solve(op.mv, y, pre, alpha, tol=1e-7, max_iter=500, mode=mode).x
        return jnp.sum(g * x)

    da, dy = jax.grad(loss, argnums=(0, 1))(jnp.float32(0.95), y)

    def loss64(a, yy):
        w = graph.to_dense().astype(np.float64)
        return float(np.sum(np.asarray(g, np.float64) * np.linalg.solve(np.eye(w.shape[0]) - a * w, yy)))
    y64 = np.asarray(y, np.float64)
    h = 1e-5
    fd = (loss64(0.95 + h, y64) - loss64(0.95 - h, y64)) / (2 * h)
    assert abs(float(da) - fd) / abs(fd) < 1e-3
    w = graph.to_dense().astype(np.float64)
    dy_ref = np.linalg.solve(np.eye(w.shape[0]) - 0.95 * w, np.asarray(g, np.float64))
    assert np.abs(np.asarray(dy) - dy_ref).max() / np.abs(dy_ref).max() < 1e-4


def test_validate():
    with pytest.raises(ValueError):
        PreconditionedCG(mode="nope").validate()
    with pytest.raises(ValueError):
        PreconditionedCG(max_iter=0).validate()
    assert PreconditionedCG().validate().route == "pcg"


def _aggregation_reference(a):
    """Standard aggregation (Vanek, Mandel & Brezina, 1996) written node by node, as the
    paper states it: the reference for the vectorised `standard_aggregation`."""
    a = a.tocsr()
    n = a.shape[0]
    agg = -np.ones(n, np.int64)
    count = 0
    for i in range(n):
        nbr = a.indices[a.indptr[i]:a.indptr[i + 1]]
        if agg[i] < 0 and (agg[nbr] < 0).all():
            agg[i] = agg[nbr] = count
            count += 1
    phase1 = agg.copy()
    for i in range(n):
        if agg[i] < 0:
            nbr, w = a.indices[a.indptr[i]:a.indptr[i + 1]], a.data[a.indptr[i]:a.indptr[i + 1]]
            ok = phase1[nbr] >= 0
            if ok.any():
                agg[i] = phase1[nbr[ok][np.argmax(w[ok])]]
    for i in range(n):
        if agg[i] < 0:
            nbr = a.indices[a.indptr[i]:a.indptr[i + 1]]
            agg[i] = count
            agg[nbr[agg[nbr] < 0]] = count
            count += 1
    return agg


def _random_symmetric(seed, nodes, density, *, ties=False):
    """(rng, a): a random symmetric CSR graph without self-loops, its node count drawn from
    ``nodes`` (low, high) and its density from ``density``; ``ties``: integer weights, many equal."""
    import scipy.sparse as sp
    from retrieval_jax.graph.aggregation import without_diagonal
    rng = np.random.default_rng(seed)
    n = int(rng.integers(*nodes))
    m = sp.random(n, n, density=float(rng.uniform(*density)), random_state=seed, format="csr")
    if ties:
        m.data = np.round(m.data * 3) + 1.0
    return rng, without_diagonal(m + m.T)


@pytest.mark.parametrize("seed", range(6))
def test_standard_aggregation_equals_the_node_by_node_rule(seed):
    from retrieval_jax.graph.aggregation import standard_aggregation
    _, a = _random_symmetric(seed, (2, 300), (0.002, 0.05), ties=bool(seed % 2))   # ties go to the first edge
    np.testing.assert_array_equal(standard_aggregation(a), _aggregation_reference(a))


def _breadth_first_reference(a):
    """Breadth-first ranks by the rule, node by node: from the lowest unranked id,
    neighbours in CSR order."""
    from collections import deque
    n = a.shape[0]
    rank, r = -np.ones(n, np.int64), 0
    for start in range(n):
        if rank[start] >= 0:
            continue
        rank[start], r = r, r + 1
        queue = deque([start])
        while queue:
            u = queue.popleft()
            for v in a.indices[a.indptr[u]:a.indptr[u + 1]]:
                if rank[v] < 0:
                    rank[v], r = r, r + 1
                    queue.append(v)
    return rank


@pytest.mark.parametrize("seed", range(6))
def test_breadth_first_rank_equals_the_node_by_node_rule(seed):
    from retrieval_jax.graph.order import _breadth_first_rank
    rng, a = _random_symmetric(seed, (1, 400), (0.0005, 0.03))   # many components, isolated nodes among them
    a.indices = a.indices.copy()
    for i in range(a.shape[0]):            # neighbours in no particular order within a row
        lo, hi = a.indptr[i], a.indptr[i + 1]
        perm = rng.permutation(hi - lo)
        a.indices[lo:hi], a.data[lo:hi] = a.indices[lo:hi][perm], a.data[lo:hi][perm]
    a.has_sorted_indices = False
    np.testing.assert_array_equal(_breadth_first_rank(a), _breadth_first_reference(a))
