"""Fewer CG steps to the same converged ranking: a two-level aggregation preconditioner.

At alpha = 0.99 the slow modes of M = I - alpha W are the graph's smooth signals: on a
graph of many weakly linked clusters, one nearly constant vector (times D^1/2) per
cluster, with eigenvalues of M near 1 - alpha. Plain CG needs about 60 steps to reach
a relative residual of 1e-6 on such a graph. Here those modes are handled directly:

* on the host, the graph's nodes are grouped into aggregates (greedy standard
  aggregation, Vanek, Mandel & Brezina, Computing 1996, repeated on the coarse graph
  until at most ``max_coarse`` aggregates remain);
* the coarse basis P [n, m] has one column per aggregate, D^1/2 restricted to the
  aggregate and normalised (so P^T P = I): the near-null space of I - alpha W;
* the coarse operator P^T M P = I - alpha P^T W P (m x m, dense) is inverted once.

Two ways to use it, both keeping M's solution and CG's stopping rule (the relative
residual ||y - M x|| / ||y|| <= tol of the returned x):

* ``mode="deflation"`` (default; deflated CG, Nicolaides 1987, Saad, Yeung, Erhel &
  Guyomarc'h 2000, in the "DEF1" form of Tang, Nabben, Vuik & Erlangga 2009): with
  Q = P (P^T M P)^-1 P^T and the projection P_D = I - M Q, CG runs on the positive
  semi-definite system P_D M u = P_D y and returns x = Q y + (I - Q M) u. Its residual
  P_D (y - M u) *is* y - M x, so stopping is decided on the true residual. Per step:
  one product with M plus the cheap coarse work (segment sums, an m x m matrix product
  and a gather from the m coarse values); one more product with M at the end.
* ``mode="additive"``: preconditioned CG with B^-1 = I + Q (an identity smoother, as
  diag(M) = 1, plus the additive coarse correction); symmetric positive definite.

Everything a step does is pure and jittable; the aggregation and the inverse of the
coarse operator are host work done once (`aggregation_preconditioner`, or
`PreconditionedCG.init`). alpha stays a traced leaf: when it differs from the alpha the
coarse inverse was built for, the coarse operator is refactorised inside the trace
(Cholesky of an m x m matrix), so ``vmap`` over alpha and ``grad`` work. Gradients are
implicit (``lax.custom_linear_solve``, symmetric): the backward pass is one more
preconditioned solve.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .. import _checks
from ..graph.aggregation import aggregate_nodes, standard_aggregation  # noqa: F401 (public here too)
from ..graph.core import Graph
from .cg import CGResult
from .operator import DiffusionOperator, expect_state, node_first, query_first

MODES = ("deflation", "additive")


# ----------------------------------------------------------------------------- batched PCG
def preconditioned_cg(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *,
                      precondition: Callable[[jax.Array], jax.Array] | None = None, tol=1e-6,
                      max_iter: int = 100, b_norm: jax.Array | None = None,
                      project: Callable[[jax.Array], jax.Array] | None = None) -> CGResult:
    """Preconditioned conjugate gradient on many right-hand sides, each stopping on its own.

    Solves A x = b, b [n, B] (node axis first), A symmetric positive (semi-)definite on
    the span of b, with a symmetric positive-definite preconditioner ``precondition``
    (r -> B^-1 r; the identity if None). A column stops updating once its residual
    satisfies ||r|| <= tol ||b|| (the 2-norm of the residual itself, not r^T B^-1 r,
    so the stopping rule is plain CG's); the ``lax.while_loop`` ends when every column
    has stopped or after ``max_iter`` steps. ``b_norm`` [B] replaces ||b|| in that rule
    (deflation solves a projected system but measures against the original y).
    ``project`` (a projector onto a subspace holding b, or None) is applied to the
    residual at the start and after every update, so rounding cannot drift it out.

    Returns:
      `CGResult` (x [n, B], iterations int32[B], residual [B] = ||r|| / ||b||).
    """
    squeeze = b.ndim == 1
    if squeeze:
        b = b[:, None]
        mv = lambda v: matvec(v[:, 0])[:, None]  # noqa: E731
        pc = None if precondition is None else (lambda v: precondition(v[:, 0])[:, None])  # noqa: E731
    else:
        mv, pc = matvec, precondition
    pc = (lambda v: v) if pc is None else pc  # noqa: E731
    dtype = b.dtype
    tol = jnp.asarray(tol, dtype)
    nrm = jnp.linalg.norm(b, axis=0) if b_norm is None else jnp.asarray(b_norm, dtype).reshape(-1)
    thresh = tol * nrm
    x = jnp.zeros_like(b)
    r = b if project is None else project(b)
    z = pc(r)
    rz = jnp.sum(r * z, axis=0)
    rr = jnp.sum(r * r, axis=0)
    nb = b.shape[1]

    def active(rr):
        return jnp.sqrt(rr) > thresh

    def cond(state):
        rr, k = state[5], state[7]
        return jnp.logical_and(k < max_iter, jnp.any(active(rr)))

    def body(state):
        # p = z + beta p_prev at the top of the step (as `conjugate_gradient`): the loop
        # carries p_prev and updates it in place instead of copying it once per step
        x, r, z, p, rz, rr, beta, k, its = state
        act = active(rr)
        p = z + beta * p
        ap = mv(p)
        pap = jnp.sum(p * ap, axis=0)
        step = jnp.where(act & (pap > 0), rz / jnp.where(pap > 0, pap, 1), 0).astype(dtype)
        x = x + step * p
        r = r - step * ap
        if project is not None:
            r = project(r)
        z = pc(r)
        rz_new = jnp.sum(r * z, axis=0)
        rr_new = jnp.sum(r * r, axis=0)
        beta = jnp.where(act, rz_new / jnp.where(rz > 0, rz, 1), 0).astype(dtype)
        rz_new = jnp.where(act, rz_new, rz)
        rr_new = jnp.where(act, rr_new, rr)
        return x, r, z, p, rz_new, rr_new, beta, k + 1, its + act.astype(jnp.int32)

    init = (x, r, z, z, rz, rr, jnp.zeros((nb,), dtype), jnp.int32(0), jnp.zeros((nb,), jnp.int32))
    x, r, _, _, rz, rr, _, _, its = jax.lax.while_loop(cond, body, init)
    res = jnp.where(nrm > 0, jnp.sqrt(rr) / jnp.where(nrm > 0, nrm, 1), 0).astype(dtype)
    if squeeze:
        return CGResult(x[:, 0], its[0], res[0])
    return CGResult(x, its, res)


# ----------------------------------------------------------------------------- the preconditioner
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["aggregate", "basis", "wp_ids", "wp_weights",
                                "coarse_w", "alpha", "coarse_inverse"],
                   meta_fields=["num_aggregates"])
@dataclasses.dataclass(frozen=True)
class AggregationPreconditioner:
    """The two-level coarse space of `aggregation_preconditioner` (arrays, a pytree).

    Attributes:
      aggregate: int32[n], the aggregate of each node.
      basis: float[n], P's one non-zero per row: sqrt(d_i) / sqrt(sum of d over i's aggregate).
      wp_ids, wp_weights: int32/float[n, S], the rows of W P as padded lists (coarse ids).
      coarse_w: float[m, m], P^T W P (so P^T M P = I - alpha P^T W P).
      alpha: the alpha ``coarse_inverse`` was built for.
      coarse_inverse: float[m, m], (I - alpha P^T W P)^-1.
      num_aggregates: m (static).
    """

    aggregate: jax.Array
    basis: jax.Array
    wp_ids: jax.Array
    wp_weights: jax.Array
    coarse_w: jax.Array
    alpha: jax.Array
    coarse_inverse: jax.Array
    num_aggregates: int

    @property
    def num_nodes(self) -> int:
        return self.aggregate.shape[0]

    def nbytes(self) -> int:
        return int(sum(np.dtype(a.dtype).itemsize * a.size for a in jax.tree_util.tree_leaves(self)))

    # --- pieces of Q = P (P^T M P)^-1 P^T and of M P, for x [n, B]
    def restrict(self, r: jax.Array) -> jax.Array:
        """P^T r: [n, B] -> [m, B] (one segment sum over the nodes: O(n B) whatever the
        aggregates' sizes, where a gather per member slot costs m x the largest size)."""
        return jax.ops.segment_sum(self.basis.astype(r.dtype)[:, None] * r, self.aggregate,
                                   num_segments=self.num_aggregates)

    def prolong(self, c: jax.Array) -> jax.Array:
        """P c: [m, B] -> [n, B]."""
        return self.basis.astype(c.dtype)[:, None] * c[self.aggregate]

    def times_mp(self, c: jax.Array, alpha) -> jax.Array:
        """M P c = P c - alpha (W P) c: [m, B] -> [n, B], gathers from the small c only."""
        w = self.wp_weights.astype(c.dtype)
        idx = self.wp_ids

        def body(s, acc):
            return acc + w[:, s, None] * c[idx[:, s]]
        wpc = jax.lax.fori_loop(0, idx.shape[1], body, jnp.zeros((idx.shape[0], c.shape[1]), c.dtype),
                                unroll=min(4, idx.shape[1]))
        return self.prolong(c) - jnp.asarray(alpha, c.dtype) * wpc

    def coarse_solver(self, alpha) -> jax.Array:
        """(P^T M P)^-1 for this alpha: the stored inverse, or a fresh Cholesky inverse if alpha moved."""
        alpha = jnp.asarray(alpha, self.coarse_inverse.dtype)

        def fresh(_):
            m = self.coarse_w.shape[0]
            ac = jnp.eye(m, dtype=self.coarse_w.dtype) - alpha * self.coarse_w
            ac = 0.5 * (ac + ac.T)
            chol = jnp.linalg.cholesky(ac)
            return jax.scipy.linalg.cho_solve((chol, True), jnp.eye(m, dtype=ac.dtype))
        same = jnp.abs(alpha - self.alpha.astype(alpha.dtype)) <= 1e-7 * jnp.abs(alpha)
        return jax.lax.cond(same, lambda _: self.coarse_inverse.astype(alpha.dtype), fresh, None)

    def coarse_apply(self, inv: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.matmul(inv.astype(v.dtype), v, precision=jax.lax.Precision.HIGHEST)


def _padded_rows(mat: sp.csr_matrix):
    """A CSR matrix's rows as padded (ids int32[r, S], values [r, S]); padding id 0, value 0."""
    mat = sp.csr_matrix(mat)
    counts = np.diff(mat.indptr)
    width = max(int(counts.max(initial=0)), 1)
    ids = np.zeros((mat.shape[0], width), np.int32)
    vals = np.zeros((mat.shape[0], width), np.float64)
    pos = np.arange(mat.nnz) - np.repeat(mat.indptr[:-1], counts)
    rows = np.repeat(np.arange(mat.shape[0]), counts)
    ids[rows, pos] = mat.indices
    vals[rows, pos] = mat.data
    return ids, vals


def aggregation_preconditioner(graph: Graph, alpha=0.99, *, max_coarse: int = 2048, aggregates=None,
                               dtype=jnp.float32) -> AggregationPreconditioner:
    """The two-level coarse space of W and (P^T (I - alpha W) P)^-1, built on the host.

    Args:
      graph: the normalised graph W (n nodes; a `Graph`, or anything with ``to_scipy``).
      alpha: the alpha of the stored coarse inverse (another traced alpha refactorises).
      max_coarse: largest number of aggregates m (the coarse matrix is dense, m x m,
        and every CG step multiplies by it: m of a few thousand at most).
      aggregates: optional int[n] aggregate ids to use instead of `aggregate_nodes`
        (e.g. known clusters).
      dtype: storage dtype of the arrays.

    Returns:
      `AggregationPreconditioner`.
    """
    alpha = float(_checks.check_alpha(alpha))
    _checks.check_positive_int(max_coarse, "max_coarse")
    w = sp.csr_matrix(graph.to_scipy(), dtype=np.float64)
    n = w.shape[0]
    if aggregates is None:
        agg = aggregate_nodes(w, max_coarse)
    else:
        agg = np.asarray(aggregates)
        if agg.shape != (n,) or not np.issubdtype(agg.dtype, np.integer) or (agg.size and agg.min() < 0):
            raise ValueError(f"aggregates must be {n} non-negative integer ids, got {agg.dtype} {agg.shape}")
    _, agg = np.unique(agg, return_inverse=True)
    agg = agg.reshape(-1)
    m = int(agg.max()) + 1 if n else 0
    # the near-null space of I - alpha W: D^1/2 per aggregate (the Perron vector of W is D^1/2 1)
    deg = np.asarray(abs(w).sum(axis=1)).ravel()
    sq = np.sqrt(np.maximum(deg, 0))
    sq = np.where(sq > 0, sq, 1.0)  # isolated nodes: their own indicator
    norms = np.sqrt(np.bincount(agg, weights=sq * sq, minlength=m))
    basis = sq / norms[agg]
    pmat = sp.csr_matrix((basis, (np.arange(n), agg)), shape=(n, m))
    wp = (w @ pmat).tocsr()
    coarse_w = (pmat.T @ wp).toarray()
    coarse_w = 0.5 * (coarse_w + coarse_w.T)
    ac = np.eye(m) - alpha * coarse_w
    inv = np.linalg.inv(ac)
    inv = 0.5 * (inv + inv.T)
    wp_ids, wp_vals = _padded_rows(wp)
    return AggregationPreconditioner(
        aggregate=jnp.asarray(agg, jnp.int32), basis=jnp.asarray(basis, dtype),
        wp_ids=jnp.asarray(wp_ids), wp_weights=jnp.asarray(wp_vals, dtype),
        coarse_w=jnp.asarray(coarse_w, dtype), alpha=jnp.asarray(alpha, dtype),
        coarse_inverse=jnp.asarray(inv, dtype), num_aggregates=m)


# ----------------------------------------------------------------------------- solves
def deflated_solve(matvec, b, pre: AggregationPreconditioner, alpha, *, tol, max_iter: int) -> CGResult:
    """M x = b by deflated CG (DEF1) with the coarse space ``pre``; b [n, B]. Not differentiable
    by itself (see `two_level_solve`)."""
    inv = pre.coarse_solver(alpha)

    def q_coarse(v):  # (P^T M P)^-1 P^T v, [m, B]
        return pre.coarse_apply(inv, pre.restrict(v))

    def deflate(v):  # P_D v = v - M Q v = v - (M P) (P^T M P)^-1 P^T v
        return v - pre.times_mp(q_coarse(v), alpha)

    b_norm = jnp.linalg.norm(b, axis=0)
    c0 = q_coarse(b)
    r0 = b - pre.times_mp(c0, alpha)                       # y - M Q y
    # CG on the subspace P^T v = 0, where P_D M is symmetric positive definite. Rounding
    # drifts the residual into range(P) (the null space of P_D M), and the float32
    # recurrence then diverges once the residual nears 1e-5 (for some node orders at
    # once): the orthogonal projector I - P P^T puts it back after every step. The
    # residual then already lies in the subspace, so no preconditioner is needed.
    res = preconditioned_cg(lambda v: deflate(matvec(v)), r0, project=lambda v: v - pre.prolong(pre.restrict(v)),
                            tol=tol, max_iter=max_iter, b_norm=b_norm)
    u = res.x
    x = pre.prolong(c0) + u - pre.prolong(q_coarse(matvec(u)))  # Q y + (I - Q M) u
    return CGResult(x, res.iterations, res.residual)


def additive_solve(matvec, b, pre: AggregationPreconditioner, alpha, *, tol, max_iter: int) -> CGResult:
    """M x = b by PCG with B^-1 = I + P (P^T M P)^-1 P^T; b [n, B]."""
    inv = pre.coarse_solver(alpha)
    return preconditioned_cg(matvec, b, precondition=lambda r: r + pre.prolong(pre.coarse_apply(inv, pre.restrict(r))),
                             tol=tol, max_iter=max_iter)


def two_level_solve(matvec, b, pre: AggregationPreconditioner, alpha, *, tol, max_iter: int,
                    mode: str = "deflation") -> CGResult:
    """M x = b with the two-level preconditioner, differentiably (implicit, symmetric M)."""
    inner = deflated_solve if mode == "deflation" else additive_solve

    def solve(mv, rhs):
        res = inner(mv, rhs, pre, alpha, tol=tol, max_iter=max_iter)
        return res.x, (res.iterations, res.residual)

    x, (its, resid) = jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True, has_aux=True)
    return CGResult(x, its, resid)


# ----------------------------------------------------------------------------- the solver
@functools.partial(jax.tree_util.register_dataclass, data_fields=["tol"],
                   meta_fields=["max_iter", "max_coarse", "mode"])
@dataclasses.dataclass(frozen=True)
class PreconditionedCG:
    """Batched CG to a relative residual ``tol`` with the two-level aggregation preconditioner.

    The same solution and stopping rule as `CG(tol, max_iter)`, in fewer steps when the
    aggregates capture the graph's slow modes (a graph of fewer weakly linked clusters
    than ``max_coarse``); with many more clusters than aggregates (a million items in
    10,000 clusters) it takes as many steps as CG, each dearer: docs/benchmarks/bench_million.md.
    ``init`` builds `aggregation_preconditioner` (host, once per graph; in W's
    `LocalityLayout` when it has one, as `CG`); ``run`` is pure and jittable,
    ``alpha`` traced (a different alpha refactorises the m x m coarse
    matrix inside the trace).
    """

    tol: Any = 1e-6
    max_iter: int = 200
    max_coarse: int = 2048
    mode: str = "deflation"
    route = "pcg"

    def validate(self) -> "PreconditionedCG":
        _checks.check_tolerance(self.tol, "tol")
        if not _checks.is_int(self.max_iter) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1 (static: it bounds the loop), got {self.max_iter!r}")
        _checks.check_positive_int(self.max_coarse, "max_coarse")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        return self

    def init(self, operator: DiffusionOperator) -> AggregationPreconditioner:
        """Offline: aggregates and the inverse coarse operator at the operator's alpha (host),
        in W's `LocalityLayout` when it has one (where ``run`` iterates)."""
        if _checks.is_traced(operator.alpha, operator.graph.weights):
            raise ValueError("PreconditionedCG.init aggregates the graph on the host: call it outside jax.jit "
                             "and pass the state in")
        op, _ = operator.in_layout()
        return aggregation_preconditioner(op.graph, float(op.alpha), max_coarse=self.max_coarse,
                                          dtype=op.graph.weights.dtype)

    def check_state(self, operator: DiffusionOperator, state) -> None:
        """An `AggregationPreconditioner` of the operator's n nodes (another alpha is fine:
        the coarse operator is refactorised)."""
        expect_state(state, AggregationPreconditioner, "PreconditionedCG", operator.num_nodes)

    def run(self, operator: DiffusionOperator, state: AggregationPreconditioner, y):
        op, layout = operator.in_layout()
        b = node_first(y, layout)                          # node axis first: [n, nq]
        res = two_level_solve(op.mv, b, state, op.alpha, tol=self.tol, max_iter=self.max_iter,
                              mode=self.mode)
        return query_first(res.x, layout), res.iterations, res.residual
