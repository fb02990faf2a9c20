"""Batched conjugate gradient for symmetric positive-definite operators."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class CGResult(NamedTuple):
    """Solution of A x = b for B right-hand sides.

    Attributes:
      x: solution, same shape as ``b`` ([n] or [n, B]).
      iterations: int32[B] (scalar for 1-D b): CG steps taken by each right-hand side.
      residual: float32[B]: final relative residual ||b - A x|| / ||b|| (0 for b = 0).
    """

    x: jax.Array
    iterations: jax.Array
    residual: jax.Array


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *,
                       tol: float = 1e-6, max_iter: int = 20, x0: jax.Array | None = None) -> CGResult:
    """Conjugate gradient (Hestenes & Stiefel, 1952) on many right-hand sides at once.

    Solves A x = b for a symmetric positive-definite A given as ``matvec``, which
    maps [n, B] to [n, B] (node axis first, right-hand sides last). Every column runs
    its own CG recurrence (its own step sizes); a column stops updating once
    ||r|| <= tol ||b||, and the loop (``lax.while_loop``) ends when every column has
    converged or after ``max_iter`` steps. Pure and traceable: call it under
    ``jax.jit`` (``diffuse`` does) or ``vmap`` it.

    Args:
      matvec: x [n, B] -> A x [n, B] (also called on [n] when b is 1-D).
      b: float[n] or float[n, B].
      tol: relative residual tolerance (as scipy's ``rtol``).
      max_iter: largest number of CG steps.
      x0: initial guess, shape of b (default 0).

    Returns:
      `CGResult` (x, iterations, residual).
    """
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

    def active(rs):
        return jnp.sqrt(rs) > thresh

    def cond(state):
        _, _, _, rs, _, k, _ = state
        return jnp.logical_and(k < max_iter, jnp.any(active(rs)))

    def body(state):
        # the search direction p = r + beta p_prev is formed at the top of the step, from the
        # previous step's beta (0 on the first step and for converged columns, whose step
        # size is 0): the loop then carries p_prev and XLA updates it in place, where the
        # update at the end of the step made it copy the [n, B] direction once per step
        # (one [n, B] copy saved per step)
        x, r, p, rs, beta, k, its = state
        act = active(rs)
        p = r + beta * p
        ap = mv(p)
        pap = jnp.sum(p * ap, axis=0)
        step = jnp.where(act, rs / jnp.where(pap > 0, pap, 1), 0).astype(dtype)
        x = x + step * p
        r = r - step * ap
        rs_new = jnp.sum(r * r, axis=0)
        beta = jnp.where(act, rs_new / jnp.where(rs > 0, rs, 1), 0).astype(dtype)
        rs_new = jnp.where(act, rs_new, rs)
        return x, r, p, rs_new, beta, k + 1, its + act.astype(jnp.int32)

    init = (x, r, r, rs, jnp.zeros((nb,), dtype), jnp.int32(0), jnp.zeros((nb,), jnp.int32))
    x, r, _, rs, _, _, its = jax.lax.while_loop(cond, body, init)
    # a non-finite right-hand side (e.g. a NaN cotangent in a backward pass) gives a NaN
    # solution, never a silent zero: its residual test would otherwise read as converged
    x = jnp.where(jnp.isfinite(b_norm), x, jnp.nan)
    res = jnp.where(b_norm > 0, jnp.sqrt(rs) / jnp.where(b_norm > 0, b_norm, 1), 0).astype(dtype)
    res = jnp.where(jnp.isfinite(b_norm), res, jnp.nan)
    if squeeze:
        return CGResult(x[:, 0], its[0], res[0])
    return CGResult(x, its, res)
