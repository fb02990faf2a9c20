"""How to solve (I - alpha W) x = y: solvers as small pytrees, one `solve` for all of them.

The shape of lineax (an operator, a solver with an offline ``init`` state, one solve
returning a solution record), without its one-vector-at-a-time CG: ours is batched
with per-column stopping. Every solver has

* ``init(operator) -> state``: the offline work (nothing for CG; the per-component
  Cholesky inverse; the Lanczos eigenpairs), on the host where it decides shapes;
* ``run(operator, state, y) -> (scores, iterations, residual)``: pure and jittable, for
  a dense y [nq, n] or a `SparseObservation`.

Solvers:

* `CG(tol, max_iter)`: batched conjugate gradient, gradients by implicit
  differentiation (one more solve with the same operator);
* `ExactInverse(max_nodes)`: (I - alpha W)^-1 one dense block per connected component
  (`diffusion_inverse`); exact, differentiable through the Cholesky factorisation;
* `Spectral(rank, transfer, mode)`: x ~ U h(L) U^T y from the r largest eigenpairs
  (Fast Spectral Ranking, Iscen et al., CVPR 2018); by default h(l) = 1 / (1 - alpha l),
  the same scale as the exact solution;
* `Auto(...)`: picks `ExactInverse` when every component is small and the blocks fit,
  else `CG`, and records the choice in its state.

Only what decides a shape or a loop bound (max_iter, rank, mode, max_nodes) is static;
tol, alpha and the filter's parameters are leaves.

Example::

    op = diffusion_operator(W, alpha=0.99)
    solver = ExactInverse()
    state = solver.init(op)                        # offline
    sol = solve(op, observe_items(ids, n), solver, state)
    sol.scores, sol.iterations, sol.residual, sol.route
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ..spectral import (ResolventFilter, SpectralEmbedding, filter_embedding, fsr_scores_dense, fsr_scores_sparse,
                        spectral_embedding)
from ..spectral.fsr import FSR_MODES
from .cg import CGResult, conjugate_gradient
from .inverse import DiffusionInverse, diffusion_inverse, plan_inverse
from .observation import SparseObservation
from .operator import DiffusionOperator, expect_state, node_first, query_first
from .preconditioned import PreconditionedCG

# Auto picks the exact inverse when every component has at most this many nodes (a
# 4096-node block costs 4096^3 / 3 flops to factor and 64 MiB in float32) and the blocks fit here.
AUTO_INVERSE_MAX_NODES = 4096
AUTO_INVERSE_MAX_BYTES = 2 ** 28


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scores", "iterations", "residual"],
                   meta_fields=["route"])
@dataclasses.dataclass(frozen=True)
class Solution:
    """The result of `solve`.

    Attributes:
      scores: float[nq, n], x = (I - alpha W)^-1 y (or its spectral approximation).
      iterations: int32[nq] CG steps per query (0 for the direct routes).
      residual: float[nq] final relative residual ||y - M x|| / ||y|| (0 for the exact
        inverse; not computed for the spectral route, which approximates M^-1).
      route: "cg", "inverse" or "spectral" (static).
    """

    scores: jax.Array
    iterations: jax.Array
    residual: jax.Array
    route: str


def solve_spd(matvec, b, *, tol, max_iter: int) -> CGResult:
    """Solve M x = b for a symmetric positive-definite M by batched CG, differentiably.

    The derivative is implicit (``lax.custom_linear_solve`` with ``symmetric=True``):
    a cotangent x_bar is pulled back by one more CG solve M b_bar = x_bar, and the
    derivative with respect to whatever ``matvec`` closes over (alpha, W's weights)
    is -b_bar^T (dM x). ``b``: [n] or [n, B]; returns the `CGResult` of the forward solve.
    """
    def inner(mv, rhs):
        res = conjugate_gradient(mv, rhs, tol=tol, max_iter=max_iter)
        return res.x, (res.iterations, res.residual)

    x, (its, resid) = jax.lax.custom_linear_solve(matvec, b, inner, symmetric=True, has_aux=True)
    return CGResult(x, its, resid)


def _dense(y) -> jax.Array:
    """y as a dense [nq, n] right-hand side."""
    return y.todense() if isinstance(y, SparseObservation) else y


def _no_steps(nq: int, dtype):
    return jnp.zeros((nq,), jnp.int32), jnp.zeros((nq,), dtype)


# ----------------------------------------------------------------------------- CG
@functools.partial(jax.tree_util.register_dataclass, data_fields=["tol"], meta_fields=["max_iter"])
@dataclasses.dataclass(frozen=True)
class CG:
    """Batched conjugate gradient to a relative residual ``tol`` or ``max_iter`` steps.

    When W carries a `LocalityLayout` (`normalize` of a large concrete graph) the
    iteration runs on P W P^T with y renumbered in and x renumbered back: the same
    solution, in the caller's node order, with the product's gathers served from cache.
    """

    tol: Any = 1e-6
    max_iter: int = 20
    route = "cg"

    def validate(self) -> "CG":
        _checks.check_tolerance(self.tol, "tol")
        if not _checks.is_int(self.max_iter) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1 (static: it bounds the loop), got {self.max_iter!r}")
        return self

    def init(self, operator: DiffusionOperator) -> None:
        return None

    def check_state(self, operator: DiffusionOperator, state) -> None:
        if state is not None:
            raise TypeError(f"CG has no offline state; pass state=None, got {type(state).__name__}")

    def run(self, operator: DiffusionOperator, state, y):
        op, layout = operator.in_layout()
        b = node_first(y, layout)       # node axis first: [n, nq]
        res: CGResult = solve_spd(op.mv, b, tol=self.tol, max_iter=self.max_iter)
        return query_first(res.x, layout), res.iterations, res.residual


# ----------------------------------------------------------------------------- exact inverse
@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["max_nodes"])
@dataclasses.dataclass(frozen=True)
class ExactInverse:
    """(I - alpha W)^-1 per connected component, by batched Cholesky (`diffusion_inverse`)."""

    max_nodes: int = 20_000
    route = "inverse"

    def validate(self) -> "ExactInverse":
        _checks.check_positive_int(self.max_nodes, "max_nodes")
        return self

    def init(self, operator: DiffusionOperator, plan=None) -> DiffusionInverse:
        """Offline: ``plan`` (`plan_inverse`, host side) may be given to build under a trace."""
        return diffusion_inverse(operator.graph, operator.alpha, max_nodes=self.max_nodes, plan=plan)

    def check_state(self, operator: DiffusionOperator, state) -> None:
        """A `DiffusionInverse` of the operator's n nodes, built for its alpha (when both are concrete)."""
        expect_state(state, DiffusionInverse, "ExactInverse", operator.num_nodes)
        if state.alpha is not None and not _checks.is_traced(state.alpha, operator.alpha):
            built, now = np.float32(state.alpha), np.float32(operator.alpha)
            if built != now:
                raise ValueError(f"this ExactInverse state inverts I - alpha W for alpha = {built}, the operator has "
                                 f"alpha = {now}; rebuild it with ExactInverse().init(operator)")

    def run(self, operator: DiffusionOperator, state: DiffusionInverse, y):
        nq = y.weights.shape[0] if isinstance(y, SparseObservation) else y.shape[0]
        if nq == 0:
            return (jnp.zeros((0, operator.num_nodes), state.blocks[0].dtype), *_no_steps(0, state.blocks[0].dtype))
        if isinstance(y, SparseObservation):
            x = state.weighted_rows(y.weights, y.indices)
        else:
            x = jnp.matmul(y.astype(state.blocks[0].dtype), state.todense(), precision=jax.lax.Precision.HIGHEST)
        return (x, *_no_steps(x.shape[0], x.dtype))


# ----------------------------------------------------------------------------- spectral
@functools.partial(jax.tree_util.register_dataclass, data_fields=["transfer"], meta_fields=["rank", "mode"])
@dataclasses.dataclass(frozen=True)
class Spectral:
    """Fast Spectral Ranking: x ~ U h(L) U^T y (+ h(0)(y - U U^T y) for ``mode='approx'``).

    ``transfer`` is a pytree filter (`regularized_laplacian_filter`, `heat_kernel_filter`,
    `ResolventFilter`); None means h(l) = 1 / (1 - alpha l) with the operator's alpha,
    whose exact limit (r = n) is the CG solution itself.
    """

    rank: int = 400
    transfer: Any = None
    mode: str = "approx"
    route = "spectral"
    _HOST_INIT = ("Spectral.init finds W's eigenpairs on the host: call state = Spectral(...).init(operator) "
                  "outside jax.jit and pass it in, solve(operator, y, solver, state)")

    def validate(self) -> "Spectral":
        _checks.check_positive_int(self.rank, "rank")
        if self.mode not in FSR_MODES:
            raise ValueError(f"mode must be one of {FSR_MODES}, got {self.mode!r}")
        if self.transfer is not None and not callable(self.transfer):
            raise TypeError(f"transfer must be a callable filter h(lambda), got {type(self.transfer).__name__}")
        return self

    def _filter(self, operator):
        return ResolventFilter(operator.alpha) if self.transfer is None else self.transfer

    def init(self, operator: DiffusionOperator) -> SpectralEmbedding:
        """Offline: the ``rank`` largest eigenpairs of W (host, Lanczos), filtered."""
        if _checks.is_traced(operator.graph.indices, operator.graph.weights):
            raise TypeError(self._HOST_INIT)
        n = operator.num_nodes
        if self.rank > n:
            raise ValueError(f"rank = {self.rank} exceeds the graph's {n} nodes; choose rank <= {n}")
        try:
            emb = spectral_embedding(operator.graph, self.rank, lambda lam: lam, mode=FSR_MODES[0])
        except jax.errors.TracerArrayConversionError as exc:
            raise TypeError(self._HOST_INIT) from exc
        return filter_embedding(emb, self._filter(operator), mode=self.mode)

    def check_state(self, operator: DiffusionOperator, state) -> None:
        expect_state(state, SpectralEmbedding, "Spectral", operator.num_nodes)

    def run(self, operator: DiffusionOperator, state: SpectralEmbedding, y):
        # re-filtered here so the scores follow a traced alpha or transfer parameter
        emb = filter_embedding(state, self._filter(operator), mode=self.mode)
        if isinstance(y, SparseObservation):
            x = fsr_scores_sparse(emb, y.weights, y.indices)
        else:
            x = fsr_scores_dense(emb, y)
        return (x, *_no_steps(x.shape[0], x.dtype))


# ----------------------------------------------------------------------------- auto
@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner"], meta_fields=["route"])
@dataclasses.dataclass(frozen=True)
class AutoState:
    """The route `Auto` chose ("inverse" or "cg", static) and that solver's state."""

    route: str
    inner: Any = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tol"],
                   meta_fields=["max_iter", "max_nodes", "max_bytes"])
@dataclasses.dataclass(frozen=True)
class Auto:
    """The fastest route that reaches the exact ranking.

    Cost model: the inverse costs sum_c n_c^3 once and k n_c per query, CG costs
    (steps x nnz) per query; mutual kNN graphs usually split into small components, where
    the inverse wins by an order of magnitude (docs/benchmarks/bench_diffusion.md). So: `ExactInverse`
    when the largest component has at most ``max_nodes`` nodes and the blocks take at most
    ``max_bytes``, else `CG(tol, max_iter)`. Truncation and the spectral route change the
    ranking (at a million items truncation loses 39 mAP points and rank-100 FSR 82-84:
    docs/benchmarks/bench_million.md), so
    Auto never picks them.
    """

    tol: Any = 1e-6
    max_iter: int = 20
    max_nodes: int = AUTO_INVERSE_MAX_NODES
    max_bytes: int = AUTO_INVERSE_MAX_BYTES

    @property
    def route(self) -> str:
        return "auto"

    def validate(self) -> "Auto":
        CG(self.tol, self.max_iter).validate()
        _checks.check_positive_int(self.max_nodes, "max_nodes")
        _checks.check_positive_int(self.max_bytes, "max_bytes")
        return self

    def choose(self, operator: DiffusionOperator, plan=None) -> str:
        """"inverse" or "cg" for this operator's graph (host side: finds its components)."""
        plan = plan_inverse(operator.graph) if plan is None else plan
        cheap = plan.largest <= self.max_nodes and plan.nbytes <= self.max_bytes
        return "inverse" if cheap else "cg"

    def init(self, operator: DiffusionOperator, plan=None) -> AutoState:
        plan = plan_inverse(operator.graph) if plan is None else plan
        route = self.choose(operator, plan)
        if route == "inverse":
            return AutoState("inverse", ExactInverse().init(operator, plan=plan))
        return AutoState("cg", None)

    def check_state(self, operator: DiffusionOperator, state) -> None:
        expect_state(state, AutoState, "Auto", None)
        if state.route == "inverse":
            ExactInverse().check_state(operator, state.inner)

    def run(self, operator: DiffusionOperator, state: AutoState, y):
        if state.route == "inverse":
            return ExactInverse().run(operator, state.inner, y)
        return CG(self.tol, self.max_iter).run(operator, None, y)


# ----------------------------------------------------------------------------- solve
SOLVERS = {"cg": CG, "pcg": PreconditionedCG, "inverse": ExactInverse, "spectral": Spectral, "auto": Auto}
"""The solvers by name: the one registry configs (``DiffusionConfig.solver``) and the CLI resolve."""


def resolve_solver(spec, *, tol=None, max_iter=None):
    """A solver object from a name of `SOLVERS` or a solver object (returned as is).

    A name is built with ``tol`` and ``max_iter`` where the solver has those fields
    (CG, PreconditionedCG, Auto) and its defaults otherwise; ``tol`` may be traced.
    """
    if isinstance(spec, str):
        if spec not in SOLVERS:
            raise ValueError(f"solver must be one of {tuple(SOLVERS)} or a solver object, got {spec!r}")
        cls = SOLVERS[spec]
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {"tol": tol, "max_iter": max_iter}
        return cls(**{k: v for k, v in given.items() if k in fields and v is not None})
    if not all(hasattr(spec, name) for name in ("init", "run", "validate")):
        raise TypeError(f"solver must be a name of {tuple(SOLVERS)} or a solver object "
                        f"({', '.join(c.__name__ for c in SOLVERS.values())}), got {type(spec).__name__}")
    return spec


def route_of(solver, state) -> str:
    """The route a solver with this state takes: ``state.route`` for `Auto`, else ``solver.route``."""
    return state.route if isinstance(state, AutoState) else solver.route


def check_observations(y, n: int):
    """y as the right-hand side of a diffusion on n nodes: a `SparseObservation` of n
    nodes, or a real array [nq, n] (floating; integers, float16 and bfloat16 become
    float32), finite when concrete. Complex y is refused (diffusion scores are real; a
    cast would drop the imaginary part)."""
    if isinstance(y, SparseObservation):
        if y.num_nodes != n:
            raise ValueError(f"the observation has {y.num_nodes} nodes but the graph has {n}")
        if _half_precision(y.weights.dtype):
            y = dataclasses.replace(y, weights=y.weights.astype(jnp.float32))
        return y
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.complexfloating):
        raise TypeError(f"y must be real, got dtype {y.dtype}: diffuse the real and imaginary parts "
                        "separately (the operator is real)")
    if not (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer)
            or y.dtype == jnp.bool_):
        raise TypeError(f"y must hold real numbers, got dtype {y.dtype}")
    if y.ndim != 2 or y.shape[1] != n:
        raise ValueError(f"y must be [n_queries, n] with n = {n} graph nodes (or a SparseObservation), "
                         f"got shape {y.shape}")
    if not jnp.issubdtype(y.dtype, jnp.floating) or _half_precision(y.dtype):
        y = y.astype(jnp.float32)
    if not _checks.is_traced(y) and not np.isfinite(np.asarray(y)).all():
        raise ValueError("y contains NaN or inf")
    return y


def _half_precision(dtype) -> bool:
    """float16 / bfloat16: 3 significant digits, in which CG's recurrence breaks down, so
    the solve runs in float32."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def solve(operator: DiffusionOperator, y, solver=None, state=None, *, throw: bool = True) -> Solution:
    """x = (I - alpha W)^-1 y by ``solver`` (default `CG()`), with its solution record.

    The one path of every diffusion here: `diffuse`, `truncated_diffuse`,
    `katz_centrality` and the ranking methods check their own inputs and call the
    unchecked core `solve_unchecked`; this entry checks the operator, the solver and y.

    Args:
      operator: `diffusion_operator(W, alpha)`.
      y: float[nq, n] or a `SparseObservation` (`observe_neighbours`, `observe_items`).
      solver: a solver object (`CG`, `PreconditionedCG`, `ExactInverse`, `Spectral`,
        `Auto`) or its name in `SOLVERS`.
      state: ``solver.init(operator)`` when computed offline; computed here if None
        (on the host: not under ``jax.jit`` for the inverse, spectral and two-level routes).
      throw: raise when a query's solve failed (`raise_failed_rows`): at once on
        concrete values; under ``jax.jit``, ``vmap`` or ``grad`` when the compiled
        computation runs (as lineax's ``throw``). False: no check, the record's NaN
        residual and scores say it (for code that handles failures itself, or exports
        the computation: the runtime check is a host callback).

    Returns:
      `Solution` (scores [nq, n], iterations, residual, route). Jittable and
      differentiable given ``state``.

    Raises:
      TypeError / ValueError: a bad operator, solver, y, or a ``state`` that is not the
        solver's for this operator (another type, graph or alpha); with ``throw``, a
        query whose solve broke down (under a trace, when the computation runs).
    """
    if not isinstance(operator, DiffusionOperator):
        raise TypeError(f"operator must be a DiffusionOperator (diffusion_operator(W, alpha)), "
                        f"got {type(operator).__name__}")
    solver = CG() if solver is None else resolve_solver(solver)
    solver.validate()
    y = check_observations(y, operator.num_nodes)
    if state is not None and hasattr(solver, "check_state"):
        solver.check_state(operator, state)
    return checked_solution(solve_unchecked(operator, y, solver, state), _checks.check_bool(throw, "throw"))


def checked_solution(sol: Solution, throw: bool = True) -> Solution:
    """``sol``, with the public entries' last check: with ``throw``, `raise_failed_rows`
    on its residual (at once when concrete, when the computation runs under a trace)."""
    if throw:
        raise_failed_rows(sol.residual)
    return sol


def solve_unchecked(operator: DiffusionOperator, y, solver, state=None) -> Solution:
    """`solve` without its checks: for callers that checked operator, y and solver at
    their own public boundary (y a floating [nq, n] array or a `SparseObservation`)."""
    if state is None:
        state = solver.init(operator)
    scores, its, res = _run(solver, operator, state, y)
    return Solution(scores=scores, iterations=its, residual=res, route=route_of(solver, state))


def raise_failed_rows(residual) -> None:
    """Raise for the queries whose solve failed: a NaN relative residual, the iterative
    solvers' record of a breakdown (NaN or inf in y or W, or I - alpha W not positive
    definite on a query's Krylov space), whose scores are NaN.

    Concrete: a ValueError here. Traced (``jax.jit``, ``vmap``, ``grad``): the same check
    runs with the computation (`_checks.raise_rows_when_run`), so the call fails when it
    runs (a ``JaxRuntimeError`` carrying the message) instead of returning NaN scores
    silently. A concrete residual spanning several processes is left to its record:
    raising on one process alone would leave the others waiting in their next collective."""
    if isinstance(residual, jax.core.Tracer):
        _checks.raise_rows_when_run(~jnp.isnan(residual), _failed_rows_message)
    elif not _checks.is_traced(residual):
        _checks.raise_bad_rows(~np.isnan(np.asarray(residual)), _failed_rows_message)


def _failed_rows_message(count: int, first: int) -> str:
    return (f"the solve failed on {count} query(ies) (first: row {first}): NaN or inf appeared in y, in W or "
            "in a product with I - alpha W, or it is not positive definite on the query's Krylov space; pass "
            "finite y, the normalised, symmetric W (normalize(A)) and 0 < alpha < 1")


@jax.jit
def _run(solver, operator, state, y):
    return solver.run(operator, state, y)
