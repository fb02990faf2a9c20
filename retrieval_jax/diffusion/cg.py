"""Batched conjugate gradient for symmetric positive-definite operators."""
from __future__ import annotations

import enum
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks


class CGStatus(enum.IntEnum):
    """What became of one right-hand side (`CGResult.status`; compare the int32 codes).

    CONVERGED: ||b - A x|| <= tol ||b|| (b = 0 included).
    MAX_ITER: ``max_iter`` steps taken first; x is the last iterate.
    INDEFINITE: a search direction with p^T A p <= 0: A is not positive definite (or
      not symmetric) on the Krylov space, so CG's step is meaningless; x is NaN.
    NONFINITE: NaN or inf in b or in a product A p; x is NaN.
    """

    CONVERGED = 0
    MAX_ITER = 1
    INDEFINITE = 2
    NONFINITE = 3


class CGResult(NamedTuple):
    """Solution of A x = b for B right-hand sides.

    Attributes:
      x: solution, same shape as ``b`` ([n] or [n, B]); NaN where the solve failed.
      iterations: int32[B] (scalar for 1-D b): CG steps taken by each right-hand side.
      residual: float32[B]: final relative residual ||b - A x|| / ||b|| (0 for b = 0; NaN
        for a column that failed).
      status: int32[B] (scalar for 1-D b) `CGStatus` codes, as lineax's ``Solution.result``:
        this low-level loop never raises, the record says it (the public entries raise
        from it, under ``jax.jit`` too: their ``throw``); None from solvers that do not
        report one.
    """

    x: jax.Array
    iterations: jax.Array
    residual: jax.Array
    status: jax.Array | None = None


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *,
                       tol: float = 1e-6, max_iter: int = 20, x0: jax.Array | None = None) -> CGResult:
    """Conjugate gradient (Hestenes & Stiefel, 1952) on many right-hand sides at once.

    Solves A x = b for a symmetric positive-definite A given as ``matvec``, which
    maps [n, B] to [n, B] (node axis first, right-hand sides last). Every column runs
    its own CG recurrence (its own step sizes); a column stops updating once
    ||r|| <= tol ||b||, and the loop (``lax.while_loop``) ends when every column has
    converged or after ``max_iter`` steps. Pure and traceable: call it under
    ``jax.jit`` (``diffuse`` does) or ``vmap`` it. Cost: one product with A per step.

    A column whose search direction p has p^T A p <= 0 (A not positive definite) or
    whose products turn NaN / inf stops there with x = NaN, and its ``status`` says
    which (`CGStatus`). Called on concrete values (outside a trace) the function
    checks b for NaN / inf before it starts and raises on a failed column after it;
    under a trace it cannot, and the caller reads ``status``.

    Every column is first scaled by a power of two near its largest entry (exact in
    floating point): right-hand sides of any magnitude (1e-20 or 1e20 in float32) solve
    as well as unit ones.

    Args:
      matvec: x [n, B] -> A x [n, B] (also called on [n] when b is 1-D).
      b: float[n] or float[n, B].
      tol: relative residual tolerance (as scipy's ``rtol``).
      max_iter: largest number of CG steps.
      x0: initial guess, shape of b (default 0).

    Returns:
      `CGResult` (x, iterations, residual, status).

    Raises:
      ValueError: tol not in (0, 1) (when concrete), max_iter not an int >= 1, x0 or
        ``matvec``'s output not of b's shape; (concrete values only) b holds NaN or inf,
        or a column broke down (A not positive definite, or NaN / inf from ``matvec``).
    """
    b = jnp.asarray(b)
    if b.ndim not in (1, 2):
        raise ValueError(f"b must be [n] or [n, B] (node axis first), got shape {b.shape}")
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise TypeError(f"b must be a real floating-point array, got dtype {b.dtype}")
    if not _checks.is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1 (static: it bounds the loop), got {max_iter!r}")
    tol = _checks.check_tolerance(tol, "tol")
    if x0 is not None and jnp.shape(x0) != b.shape:
        raise ValueError(f"x0 must have b's shape {b.shape}, got {jnp.shape(x0)}")
    out = jax.eval_shape(matvec, jax.ShapeDtypeStruct(b.shape, b.dtype))
    if getattr(out, "shape", None) != b.shape:
        raise ValueError(f"matvec must map an array of b's shape {b.shape} to the same shape, "
                         f"got {getattr(out, 'shape', type(out).__name__)}")
    if not _checks.is_traced(b) and not np.isfinite(np.asarray(b)).all():
        bad = np.flatnonzero(~np.isfinite(np.asarray(b)).reshape(b.shape[0], -1).all(axis=0))
        raise ValueError(f"b (the right-hand side) has NaN or inf (column {bad[0]}); CG would return NaN")
    # each column is scaled by a power of two near its largest entry (exact in floating
    # point, so the iterates are those of the unscaled recurrence): ||b||^2 and r^T r can
    # then neither overflow (entries ~1e20 in float32) nor underflow (~1e-20)
    scale = _power_of_two_scale(b)
    b = b / scale
    x0 = None if x0 is None else jnp.asarray(x0) / scale
    squeeze = b.ndim == 1
    if squeeze:
        b = b[:, None]
        x0 = None if x0 is None else x0[:, None]
        mv = lambda v: matvec(v[:, 0])[:, None]  # noqa: E731
    else:
        mv = matvec
    dtype = b.dtype
    tol = jnp.asarray(tol, dtype)
    b_norm = jnp.linalg.norm(b, axis=0)
    thresh = tol * b_norm
    if x0 is None:
        x = jnp.zeros_like(b)
        r = b
    else:
        x = x0.astype(dtype)
        r = b - mv(x)
    rs = jnp.sum(r * r, axis=0)
    nb = b.shape[1]

    def active(rs, status):
        return (jnp.sqrt(rs) > thresh) & (status == CGStatus.CONVERGED)

    def cond(state):
        _, _, _, rs, _, k, _, status = state
        return jnp.logical_and(k < max_iter, jnp.any(active(rs, status)))

    def body(state):
        # the search direction p = r + beta p_prev is formed at the top of the step, from the
        # previous step's beta (0 on the first step and for converged columns, whose step
        # size is 0): the loop then carries p_prev and XLA updates it in place, where the
        # update at the end of the step made it copy the [n, B] direction once per step
        x, r, p, rs, beta, k, its, status = state
        act = active(rs, status)
        p = r + beta * p
        ap = mv(p)
        pap = jnp.sum(p * ap, axis=0)
        # a failed column stops here: NaN / inf products, or p^T A p <= 0 (A indefinite)
        status = jnp.where(act & ~jnp.isfinite(pap), CGStatus.NONFINITE,
                           jnp.where(act & (pap <= 0), CGStatus.INDEFINITE, status)).astype(jnp.int32)
        act = act & (status == CGStatus.CONVERGED)
        step = jnp.where(act, rs / jnp.where(act, pap, 1), 0).astype(dtype)
        x = x + step * p
        r = r - step * ap
        rs_new = jnp.sum(r * r, axis=0)
        beta = jnp.where(act, rs_new / jnp.where(rs > 0, rs, 1), 0).astype(dtype)
        rs_new = jnp.where(act, rs_new, rs)
        return x, r, p, rs_new, beta, k + 1, its + act.astype(jnp.int32), status

    status = jnp.where(jnp.isfinite(b_norm) & jnp.isfinite(rs), CGStatus.CONVERGED,
                       CGStatus.NONFINITE).astype(jnp.int32)
    init = (x, r, r, rs, jnp.zeros((nb,), dtype), jnp.int32(0), jnp.zeros((nb,), jnp.int32), status)
    x, r, _, rs, _, _, its, status = jax.lax.while_loop(cond, body, init)
    status = jnp.where((status == CGStatus.CONVERGED) & (jnp.sqrt(rs) > thresh), CGStatus.MAX_ITER,
                       status).astype(jnp.int32)
    failed = (status == CGStatus.INDEFINITE) | (status == CGStatus.NONFINITE)
    # a failed column (e.g. a NaN cotangent in a backward pass) gives a NaN solution,
    # never a silent zero or a plausible-looking iterate
    x = jnp.where(failed, jnp.nan, x)
    res = jnp.where(b_norm > 0, jnp.sqrt(rs) / jnp.where(b_norm > 0, b_norm, 1), 0).astype(dtype)
    res = jnp.where(jnp.isfinite(b_norm) & ~failed, res, jnp.nan)
    if not _checks.is_traced(status):
        _raise_failures(np.asarray(status))
    x = x * scale
    if squeeze:
        return CGResult(x[:, 0], its[0], res[0], status[0])
    return CGResult(x, its, res, status)


def _power_of_two_scale(b: jax.Array) -> jax.Array:
    """Per column of b ([n] or [n, B]): 2^e with 2^(e-1) <= max |b| < 2^e (1 for a zero or
    non-finite column), shape [B] (or [] for 1-D b)."""
    peak = jnp.max(jnp.abs(b), axis=0)
    _, e = jnp.frexp(peak)
    scale = jnp.ldexp(jnp.ones_like(peak), e)
    return jnp.where((peak > 0) & jnp.isfinite(peak), scale, jnp.ones_like(peak)).astype(b.dtype)


def _raise_failures(status: np.ndarray) -> None:
    """The concrete entry's error for failed columns (see `CGStatus`)."""
    for code, why in ((CGStatus.NONFINITE, "NaN or inf appeared in a product A p (check the operator)"),
                      (CGStatus.INDEFINITE, "a search direction has p^T A p <= 0: the operator is not "
                                            "symmetric positive definite (for diffusion: pass the normalised "
                                            "W and 0 < alpha < 1)")):
        cols = np.flatnonzero(status == code)
        if cols.size:
            raise ValueError(f"conjugate gradient failed on {cols.size} right-hand side(s) (first: column "
                             f"{cols[0]}): {why}")
