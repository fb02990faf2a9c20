"""Largest eigenpairs of a symmetric operator by thick-restart Lanczos.

Fast Spectral Ranking (Iscen, Avrithis, Tolias, Furon, Chum, "Fast Spectral Ranking
for Similarity Search", CVPR 2018) needs the r largest eigenpairs W U_r = U_r L_r of
the normalised affinity W = D^-1/2 A D^-1/2 of a kNN graph.

Algorithm (all in one ``jax.jit``, static shapes, no host round-trip):

* Lanczos with *full* reorthogonalisation: every new Krylov vector is orthogonalised
  twice (classical Gram-Schmidt, "twice is enough") against the whole stored basis
  V [M+1, n], plus a third pass when the second one shows heavy cancellation. All
  coefficients V^T A v_j are recorded, so the projected matrix H = V^T A V is exact
  (tridiagonal for plain Lanczos, arrow + tridiagonal after a restart) and the
  Rayleigh-Ritz step is ``jnp.linalg.eigh`` of a small M x M matrix.
* Thick restarts (Wu & Simon 2000): after a cycle of M vectors the top ``keep``
  Ritz vectors and the residual vector are kept and the iteration continues until
  the Lanczos residual |beta_M s_{M,i}| of each of the r wanted pairs is below
  ``tol * ||A||``.
* Breakdown (beta ~ 0: the Krylov space became invariant, e.g. a small connected
  component, an isolated node, r close to n): a fresh random vector orthogonalised
  against the basis replaces the exhausted direction (the coupling is then exactly
  0), so repeated eigenvalues of small blocks are found and nothing divides by 0.
* Invariant *blocks* (``blocks`` labels, e.g. the connected components of a graph):
  a single-vector Krylov space holds only one vector per eigenvalue, so the
  eigenvalue 1 of W, repeated once per connected component, cannot be resolved by
  plain Lanczos. When the operator is block diagonal (never couples two labels) one
  independent Lanczos process runs per block *in the same n-vectors* (blocks are
  disjoint), inner products become per-block segment sums and H becomes a batch
  [c, M, M]; the global top r is taken over all blocks' Ritz values. Memory stays
  O(M n + c M^2).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..graph.core import Graph
from ..graph.neighbours import check_symmetric as check_symmetric_matrix, connected_components
from .._precision import HIGHEST as _HI
from .. import _checks



class Eigenpairs(NamedTuple):
    """r eigenpairs of a symmetric operator, A vectors[:, i] = values[i] vectors[:, i].

    values: float[r] in descending order; vectors: float[n, r] orthonormal columns.
    """

    values: jax.Array
    vectors: jax.Array


# --------------------------------------------------------------------------- core
@dataclasses.dataclass(frozen=True)
class _UserOp:
    """Wraps a user matvec ``x[n] -> y[n]`` as ``op(operand, x)`` (hashable: a static jit arg)."""

    matvec: Callable

    def __call__(self, operand, x):
        return self.matvec(x)


def _graph_matvec(graph, x):
    """y = W x (`Graph.matvec`, in the (operator, vector) form the Lanczos loop takes)."""
    return graph.matvec(x)


class _State(NamedTuple):
    V: jax.Array          # [M+1, n] basis rows (row M: residual direction)
    H: jax.Array          # [c, M, M] recorded coefficients V^T A V (upper triangle used)
    active: jax.Array     # bool[c, M+1]: row j is a basis vector of block c
    beta: jax.Array       # [c] last coupling beta_M per block
    anorm: jax.Array      # running estimate of ||A||
    theta: jax.Array      # [c, M] Ritz values (-inf: not a Ritz value of block c)
    S: jax.Array          # [c, M, M] Ritz vectors in the basis
    converged: jax.Array  # bool
    cycle: jax.Array      # int32


# ---- inner products: one object for the global (c = 1) and the per-block case
@dataclasses.dataclass(frozen=True)
class _GlobalInner:
    """Inner products of n-vectors over the whole space (one block: plain BLAS products)."""

    n: int
    num_blocks = 1

    def segsum(self, x):        # [n] -> [1]
        return jnp.sum(x)[None]

    def bcast(self, v):         # [1] -> [n]
        return jnp.broadcast_to(v[0], (self.n,))

    def dots(self, V, w):       # V w: [1, rows]
        return jnp.matmul(V, w, precision=_HI)[None]

    def combine(self, V, h):    # sum_l h[0, l] V[l]: [n]
        return jnp.matmul(h[0], V, precision=_HI)

    def rotate(self, V, S):     # Y[i] = sum_l S[0, l, i] V[l]: [keep, n]
        return jnp.matmul(S[0].T, V, precision=_HI)

    def restrict(self, Y, blocks):  # vectors live in the whole space
        return Y


@dataclasses.dataclass(frozen=True)
class _BlockInner:
    """Inner products within each of c disjoint blocks (``labels[i]``: block of index i).

    One Lanczos process per block runs in the same n-vectors; every reduction is a
    per-block segment sum, so block b's vectors never mix with another block's.
    """

    labels: jax.Array
    n: int
    num_blocks: int

    def segsum(self, x):        # [n] -> [c]
        return jax.ops.segment_sum(x, self.labels, num_segments=self.num_blocks)

    def bcast(self, v):         # [c] -> [n]
        return v[self.labels]

    def dots(self, V, w):       # per-block V w: [c, rows]
        return jax.ops.segment_sum((V * w[None, :]).T, self.labels, num_segments=self.num_blocks)

    def combine(self, V, h):    # sum_l h[block(i), l] V[l, i]: [n]
        return jnp.einsum("ln,nl->n", V, h[self.labels], precision=_HI)

    def rotate(self, V, S):     # Y[i, j] = sum_l S[block(j), l, i] V[l, j]: [keep, n]
        def row(i, Y):
            coef = S[:, :, i][self.labels]                                # [n, M]
            return Y.at[i].set(jnp.einsum("jn,nj->n", V, coef, precision=_HI))
        return jax.lax.fori_loop(0, S.shape[2], row, jnp.zeros((S.shape[2], self.n), V.dtype))

    def restrict(self, Y, blocks):  # row i of Y belongs to block blocks[i]: zero elsewhere
        return jnp.where(self.labels[None, :] == blocks[:, None], Y, 0.0)


def _orth(inner, V, w):
    """w - V^T (V w) within each block, and the coefficients V w [c, rows]."""
    h = inner.dots(V, w)
    return w - inner.combine(V, h), h


def _norms(inner, w):
    return jnp.sqrt(jnp.maximum(inner.segsum(w * w), 0.0))


def _unit(inner, w):
    nrm = _norms(inner, w)
    return w / inner.bcast(jnp.where(nrm > 0, nrm, 1.0)), nrm


# ---- the three steps of a thick-restart cycle
def _expand(s: _State, start: int, key, *, op, operand, inner, sizes, dtype) -> _State:
    """Lanczos steps j = start..M-1: basis row j+1 from A v_j, orthogonalised twice
    (a third time on cancellation) against the whole basis; H[:, :, j] records the
    coefficients. Breakdown (beta ~ 0, block exhausted or invariant) brings in a fresh
    random vector orthogonal to the basis, or deactivates the row when the block is full."""
    M = s.V.shape[0] - 1
    n = s.V.shape[1]
    eps = float(jnp.finfo(dtype).eps)
    tol_breakdown, tol_fresh = 64.0 * eps, 1e3 * eps
    rows_M = jnp.arange(M + 1)

    def step(j, s: _State):
        V = s.V
        w = op(operand, V[j]).astype(dtype)
        anorm = jnp.maximum(s.anorm, jnp.max(_norms(inner, w)))
        w, h1 = _orth(inner, V, w)
        n1 = _norms(inner, w)
        w, h2 = _orth(inner, V, w)
        H = s.H.at[:, :, j].set((h1 + h2)[:, :M])
        beta = _norms(inner, w)
        count = jnp.sum(s.active & (rows_M <= j)[None, :], axis=1)
        room = count < sizes
        ok = (beta > tol_breakdown * anorm) & room
        q, _ = _unit(inner, w)
        # third pass when the second one removed a large part (cancellation)
        q = jax.lax.cond(jnp.any(ok & (beta < 0.5 * n1)),
                         lambda q: _unit(inner, _orth(inner, V, q)[0])[0], lambda q: q, q)
        need = (~ok) & room

        def fresh(_):
            z = jax.random.normal(jax.random.fold_in(key, j), (n,), dtype)
            z, _ = _unit(inner, z)
            z = _orth(inner, V, _orth(inner, V, z)[0])[0]
            return _unit(inner, z)

        z, zn = jax.lax.cond(jnp.any(need), fresh,
                             lambda _: (jnp.zeros((n,), dtype), jnp.zeros((inner.num_blocks,), dtype)),
                             None)
        need = need & (zn > tol_fresh)
        nxt = jnp.where(inner.bcast(ok), q, jnp.where(inner.bcast(need), z, 0.0))
        return s._replace(V=V.at[j + 1].set(nxt), H=H,
                          active=s.active.at[:, j + 1].set(ok | need),
                          beta=jnp.where(ok, beta, 0.0).astype(dtype), anorm=anorm)

    return jax.lax.fori_loop(start, M, step, s)


def _rayleigh_ritz(s: _State, *, r: int, tol, dtype) -> _State:
    """Ritz pairs of each block's projected matrix H (eigh of [c, M, M]; inactive rows
    get a sentinel below the spectrum) and whether the global top r have converged:
    Lanczos residual |beta_M s_{M,i}| <= tol ||A||."""
    M = s.H.shape[1]
    eps = float(jnp.finfo(dtype).eps)
    H = jnp.triu(s.H)
    H = H + jnp.swapaxes(jnp.triu(s.H, 1), 1, 2)
    act = s.active[:, :M]
    H = jnp.where(act[:, :, None] & act[:, None, :], H, 0.0)
    sentinel = -(4.0 * s.anorm + 1.0)
    H = H + jax.vmap(jnp.diag)(jnp.where(act, 0.0, sentinel).astype(dtype))
    theta, S = jnp.linalg.eigh(H, symmetrize_input=False)
    valid = jnp.sum(jnp.where(act[:, :, None], S * S, 0.0), axis=1) > 0.5
    theta = jnp.where(valid, theta, -jnp.inf)
    top, idx = jax.lax.top_k(theta.reshape(-1), r)
    cs, ii = idx // M, idx % M
    res = jnp.abs(s.beta[cs]) * jnp.abs(S[cs, M - 1, ii])
    conv = jnp.all(jnp.isfinite(top)) & jnp.all(res <= tol * jnp.maximum(s.anorm, eps))
    return s._replace(theta=theta, S=S, converged=conv)


def _restart(s: _State, *, inner, keep: int, dtype) -> _State:
    """Thick restart (Wu & Simon 2000): keep each block's top ``keep`` Ritz vectors and
    the residual direction; H restarts as diag(theta_kept)."""
    M = s.H.shape[1]
    order = jnp.argsort(-s.theta, axis=1)[:, :keep]                       # [c, keep]
    theta_k = jnp.take_along_axis(s.theta, order, axis=1)
    valid_k = jnp.isfinite(theta_k)
    S_k = jnp.take_along_axis(s.S, order[:, None, :], axis=2)            # [c, M, keep]
    Y = inner.rotate(s.V[:M], S_k)                                       # [keep, n]
    V = jnp.zeros_like(s.V).at[:keep].set(Y).at[keep].set(s.V[M])
    active = jnp.zeros_like(s.active).at[:, :keep].set(valid_k).at[:, keep].set(s.active[:, M])
    diag = jnp.where(valid_k, theta_k, 0.0).astype(dtype)
    H = jnp.zeros_like(s.H).at[:, jnp.arange(keep), jnp.arange(keep)].set(diag)
    return s._replace(V=V, H=H, active=active)


def _top_ritz_pairs(s: _State, *, inner, r: int) -> Eigenpairs:
    """The global top r Ritz pairs over all blocks (NaN values where none exists)."""
    M = s.H.shape[1]
    top, idx = jax.lax.top_k(s.theta.reshape(-1), r)
    cs, ii = idx // M, idx % M
    Y = jnp.matmul(s.S[cs, :, ii], s.V[:M], precision=_HI)               # [r, n]
    Y = inner.restrict(Y, cs)
    return Eigenpairs(values=jnp.where(jnp.isfinite(top), top, jnp.nan), vectors=Y.T)


@functools.partial(jax.jit, static_argnames=("op", "n", "r", "m", "keep", "num_blocks",
                                             "max_restarts", "dtype"))
def _lanczos_jit(operand, labels, sizes, key, tol, *, op, n: int, r: int, m: int, keep: int,
                 num_blocks: int, max_restarts: int, dtype):
    """Thick-restart Lanczos: a first cycle of m vectors, then restart / expand /
    Rayleigh-Ritz until the top r converge or ``max_restarts`` cycles have run."""
    M, c = m, num_blocks
    tol = jnp.asarray(tol, dtype)
    inner = _GlobalInner(n) if c == 1 else _BlockInner(labels, n, c)
    expand = functools.partial(_expand, op=op, operand=operand, inner=inner, sizes=sizes, dtype=dtype)
    rayleigh_ritz = functools.partial(_rayleigh_ritz, r=r, tol=tol, dtype=dtype)

    # first cycle from one random unit vector per block
    z0 = jax.random.normal(jax.random.fold_in(key, 0), (n,), dtype)
    v0, _ = _unit(inner, jnp.where(inner.bcast(sizes > 0), z0, 0.0))
    s = _State(V=jnp.zeros((M + 1, n), dtype).at[0].set(v0),
               H=jnp.zeros((c, M, M), dtype),
               active=jnp.zeros((c, M + 1), bool).at[:, 0].set(sizes > 0),
               beta=jnp.zeros((c,), dtype), anorm=jnp.asarray(0.0, dtype),
               theta=jnp.full((c, M), -jnp.inf, dtype), S=jnp.zeros((c, M, M), dtype),
               converged=jnp.asarray(False), cycle=jnp.asarray(0, jnp.int32))
    s = rayleigh_ritz(expand(s, 0, jax.random.fold_in(key, 1)))

    def cycle(s: _State):
        s = _restart(s, inner=inner, keep=keep, dtype=dtype)
        s = expand(s, keep, jax.random.fold_in(key, s.cycle + 2))
        return rayleigh_ritz(s)._replace(cycle=s.cycle + 1)

    s = jax.lax.while_loop(lambda s: (~s.converged) & (s.cycle < max_restarts), cycle, s)
    return _top_ritz_pairs(s, inner=inner, r=r), s.converged, s.cycle


# --------------------------------------------------------------------------- helpers
def _check_r(r, n: int, *, allow_n: bool = False) -> int:
    if not _checks.is_int(r):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    r = int(r)
    if r <= 0:
        raise ValueError(f"r (number of eigenpairs) must be positive, got {r}")
    if allow_n:
        if r > n:
            raise ValueError(f"r = {r} exceeds the operator size n = {n}")
    elif r >= n:
        raise ValueError(
            f"r = {r} must be < n = {n} for Lanczos (a Krylov method, like scipy's eigsh); "
            "for the full spectrum use graph_eigenpairs(..., method='dense')")
    return r


def _resolve_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype=float64 needs jax.config.update('jax_enable_x64', True); "
                         "float32 with full reorthogonalisation is the default")
    return dtype


def _default_tol(dtype) -> float:
    return 1e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-10


def _check_tol(tol) -> float | None:
    """None (the dtype's default) or a positive finite float (host side: tol is not traced here)."""
    if tol is None:
        return None
    return float(_checks.check_positive(tol, "tol"))


def _krylov_dims(n: int, r: int, num_iter) -> tuple[int, int]:
    if num_iter is None:
        m = min(n, max(2 * r, r + 128))  # r + 64 stalls on clustered top eigenvalues (n = 20k, r = 100)
    else:
        if not _checks.is_int(num_iter):
            raise TypeError(f"num_iter must be an int, got {type(num_iter).__name__}")
        m = int(num_iter)
        if not (r < m <= n):
            raise ValueError(f"num_iter = {m} must satisfy r < num_iter <= n (r = {r}, n = {n})")
    keep = r + (m - r) // 2
    keep = min(keep, m - 1)
    return m, keep


def _check_symmetric_probe(matvec, n: int, key, dtype) -> None:
    ku, kv = jax.random.split(jax.random.fold_in(key, 7))
    u = jax.random.normal(ku, (n,), dtype)
    v = jax.random.normal(kv, (n,), dtype)
    au, av = matvec(u), matvec(v)
    if any(_checks.is_traced(a) for a in (au, av)):
        return
    au, av = np.asarray(au, np.float64), np.asarray(av, np.float64)
    if au.shape != (n,) or av.shape != (n,):
        raise ValueError(f"matvec must map a vector of shape ({n},) to shape ({n},), got {au.shape}")
    if not (np.isfinite(au).all() and np.isfinite(av).all()):
        raise ValueError("matvec returned NaN or inf on a random vector")
    un, vn = np.asarray(u, np.float64), np.asarray(v, np.float64)
    uav, vau = float(un @ av), float(vn @ au)
    scale = np.linalg.norm(un) * np.linalg.norm(av) + np.linalg.norm(vn) * np.linalg.norm(au)
    if abs(uav - vau) > 1e-3 * scale + 1e-30:
        raise ValueError(
            f"the operator does not look symmetric: u^T A v = {uav:.6g} but v^T A u = {vau:.6g} "
            "for random u, v; Lanczos needs A = A^T (pass check_symmetric=False to skip)")


def _run(op, operand, n, r, *, num_iter, key, dtype, tol, max_restarts, labels, sizes,
         space=None):
    """Host wrapper of `_lanczos_jit`; ``sizes[b]`` = dimension of block b (0: disabled)."""
    dtype = _resolve_dtype(dtype)
    space = n if space is None else space  # dimension actually explored
    m, keep = _krylov_dims(space, min(r, space - 1) if space > 1 else 0, num_iter)
    m = max(m, r + 1)
    keep = min(keep, m - 1)
    if key is None:
        key = jax.random.key(0)
    tol = _default_tol(dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    pairs, converged, cycles = _lanczos_jit(
        operand, jnp.asarray(labels, jnp.int32), jnp.asarray(sizes, jnp.int32), key, tol,
        op=op, n=int(n), r=int(r), m=int(m), keep=int(keep), num_blocks=int(len(sizes)),
        max_restarts=int(max_restarts), dtype=dtype)
    if not _checks.is_traced(converged) and not bool(converged):
        warnings.warn(
            f"Lanczos did not reach tol = {tol:g} after {int(cycles)} restarts (n = {n}, r = {r}, "
            f"Krylov dimension {m}); increase num_iter or max_restarts", RuntimeWarning, stacklevel=3)
    return pairs


# --------------------------------------------------------------------------- public
def lanczos(matvec: Callable, n: int, r: int, *, num_iter: int | None = None, key=None,
            dtype=jnp.float32, tol: float | None = None, max_restarts: int = 100,
            blocks=None, check_symmetric: bool = True) -> Eigenpairs:
    """The r largest (algebraic) eigenpairs of a symmetric operator, A u_i = l_i u_i.

    Thick-restart Lanczos with full reorthogonalisation (see the module docstring),
    jitted with static shapes. Memory O(num_iter * n).

    Args:
      matvec: x float[n] -> A x float[n], jax-traceable, A symmetric.
      n: operator size.
      r: number of eigenpairs, 1 <= r < n.
      num_iter: Krylov basis size M per cycle, r < M <= n (default max(2r, r + 128),
        capped at n). Each restart keeps r + (M - r) // 2 Ritz vectors.
      key: PRNG key of the start / restart vectors (default ``jax.random.key(0)``).
      dtype: float32 (default) or float64 (needs ``jax_enable_x64``).
      tol: relative residual |A u - l u| / ||A|| of every wanted pair, positive and finite
        (default 1e-5 in float32, 1e-10 in float64).
      max_restarts: restart budget; a RuntimeWarning is issued if not converged.
      blocks: optional int[n] labels of invariant blocks (A never couples two labels,
        e.g. connected components); one Lanczos process then runs per block, which
        resolves eigenvalues repeated across blocks.
      check_symmetric: probe u^T A v = v^T A u on random vectors (host side, skipped
        when called under a jax transformation).

    Returns:
      ``Eigenpairs(values float[r] descending, vectors float[n, r])``.
    """
    if not _checks.is_int(n) or n <= 1:
        raise ValueError(f"n must be an int > 1, got {n!r}")
    n = int(n)
    r = _check_r(r, n)
    tol = _check_tol(tol)
    if not callable(matvec):
        raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
    dtype = _resolve_dtype(dtype)
    key = jax.random.key(0) if key is None else key
    if check_symmetric:
        _check_symmetric_probe(matvec, n, key, dtype)
    if num_iter is not None:
        _krylov_dims(n, r, num_iter)  # validate
    labels = np.zeros(n, np.int32)
    if blocks is not None:
        blocks = np.asarray(blocks)
        if blocks.shape != (n,) or not np.issubdtype(blocks.dtype, np.integer) or blocks.min() < 0:
            raise ValueError(f"blocks must be non-negative integer labels of shape ({n},)")
        _, labels = np.unique(blocks, return_inverse=True)
    sizes = np.bincount(labels)
    return _run(_UserOp(matvec), None, n, r, num_iter=num_iter, key=key, dtype=dtype, tol=tol,
                max_restarts=max_restarts, labels=labels, sizes=sizes)


@functools.partial(jax.jit, static_argnames=("r",))
def _dense_eigenpairs(graph, *, r: int) -> Eigenpairs:
    n = graph.indices.shape[0]
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], graph.indices.shape)
    W = jnp.zeros((n, n), graph.weights.dtype).at[rows, graph.indices].add(graph.weights)
    values, vectors = jnp.linalg.eigh(W, symmetrize_input=True)
    return Eigenpairs(values=values[::-1][:r], vectors=vectors[:, ::-1][:, :r])


def _component_plan(comp: np.ndarray, *, small_size: int, max_blocks: int):
    """Split nodes by connected component.

    Components of at most ``small_size`` nodes are solved exactly by a batched dense
    eigh (``small``: list of node arrays); the others get one Lanczos block each,
    the largest first, the remainder sharing the last block.
    Returns (small_components, labels int32[n], sizes int32[c]) where small nodes carry
    the label of a disabled block (size 0).
    """
    ncomp = int(comp.max(initial=-1)) + 1
    sizes = np.bincount(comp, minlength=ncomp)
    is_small = sizes <= small_size
    order = np.argsort(-sizes, kind="stable")
    large = [c for c in order if not is_small[c]]
    nb = min(len(large), max_blocks)
    slot = np.full(ncomp, -1, np.int64)
    for i, cidx in enumerate(large):
        slot[cidx] = min(i, nb - 1)
    labels = slot[comp]
    block_sizes = np.bincount(labels[labels >= 0], minlength=nb) if nb else np.zeros(0, np.int64)
    # disabled block for the nodes handled densely
    labels = np.where(labels < 0, nb, labels).astype(np.int32)
    block_sizes = np.concatenate([block_sizes, [0]]).astype(np.int32)
    node_order = np.argsort(comp, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    small = [node_order[starts[c]:starts[c + 1]] for c in np.flatnonzero(is_small)]
    return small, labels, block_sizes


@functools.partial(jax.jit, static_argnames=("r",))
def _small_top(blocks, nodes, *, r: int):
    """Top r eigenpairs of a batch of padded dense blocks.

    blocks: float[b, P, P] (padding rows/cols zero, padding diagonal a large negative
    sentinel), nodes: int32[b, P] node ids (-1 on padding).
    Returns (values [r], node ids int32[r, P], coefficients [r, P]).
    """
    values, vecs = jnp.linalg.eigh(blocks, symmetrize_input=True)      # [b, P], [b, P, P]
    P = blocks.shape[1]
    real = jnp.sum(jnp.where(nodes[:, :, None] >= 0, vecs * vecs, 0.0), axis=1) > 0.5
    values = jnp.where(real, values, -jnp.inf).reshape(-1)
    top, flat = jax.lax.top_k(values, r)
    bi, ei = flat // P, flat % P
    return top, nodes[bi], jnp.swapaxes(vecs, 1, 2)[bi, ei]


def _small_parts(mat, small, r: int, dtype):
    """Exact eigenpairs of the small components, bucketed by padded size (powers of two)."""
    coo = mat.tocoo()
    n = mat.shape[0]
    sizes = np.array([len(c) for c in small])
    buckets = np.array([1 << int(s - 1).bit_length() for s in sizes])
    parts = []
    for P in np.unique(buckets):
        members = [small[i] for i in np.flatnonzero(buckets == P)]
        b = len(members)
        nodes = np.full((b, P), -1, np.int64)
        slot = np.full(n, -1, np.int64)
        pos = np.zeros(n, np.int64)
        for i, c in enumerate(members):
            nodes[i, :len(c)] = c
            slot[c] = i
            pos[c] = np.arange(len(c))
        sub = np.zeros((b, P, P), np.float64)
        keep = slot[coo.row] >= 0
        sub[slot[coo.row[keep]], pos[coo.row[keep]], pos[coo.col[keep]]] = coo.data[keep]
        scale = float(np.abs(sub).max()) if sub.size else 0.0
        idx = np.arange(P)
        sub[:, idx, idx] += np.where(nodes >= 0, 0.0, -(4.0 * scale + 1.0))
        r_b = min(r, int((nodes >= 0).sum()))
        parts.append(_small_top(jnp.asarray(sub, dtype), jnp.asarray(nodes, jnp.int32), r=r_b))
    return parts


@functools.partial(jax.jit, static_argnames=("r", "n"))
def _merge(values_l, vectors_l, parts, *, r: int, n: int) -> Eigenpairs:
    """Top r of the Lanczos pairs and the small-component pairs (scattered to [n, r_b])."""
    values, vectors = [values_l], [vectors_l]
    for vals, nodes, coef in parts:
        cols = jnp.broadcast_to(jnp.arange(vals.shape[0])[:, None], nodes.shape)
        rows = jnp.where(nodes >= 0, nodes, n)  # padding -> out of range, dropped
        vec = jnp.zeros((n, vals.shape[0]), coef.dtype).at[rows, cols].set(coef, mode="drop")
        values.append(vals)
        vectors.append(vec)
    top, idx = jax.lax.top_k(jnp.concatenate(values), r)
    return Eigenpairs(values=top, vectors=jnp.concatenate(vectors, axis=1)[:, idx])


def graph_eigenpairs(graph, r: int, *, method: str = "auto", num_iter: int | None = None, key=None,
                     dtype=jnp.float32, tol: float | None = None, max_restarts: int = 100,
                     split_components: bool = True, small_component: int = 64,
                     max_blocks: int | None = None, check_symmetric: bool = True) -> Eigenpairs:
    """The r largest eigenpairs of a graph's (usually normalised) matrix W.

    For W = D^-1/2 A D^-1/2 of a kNN graph (``normalize``) the spectrum lies in
    [-1, 1]; every connected component with an edge contributes one eigenvalue 1 and
    every isolated node an eigenvalue 0, so a disconnected graph has repeated
    eigenvalues that a single Krylov sequence cannot resolve.

    With ``split_components`` (default) the connected components are found on the
    host (scipy) and W, being block diagonal, is solved per component:
    components of at most ``small_component`` nodes exactly (one batched dense
    ``eigh`` of padded blocks), the others by `lanczos` with one independent
    Lanczos process per component (``blocks``). At most ``max_blocks`` large
    components get their own process (default: as many as keep the batched
    [c, M, M] projected matrices under 64 MB and their eigh under ~20 GFLOP per
    restart); beyond that, the smallest ones share the last process.

    Args:
      graph: a symmetric `Graph` (checked on the host via ``to_scipy``).
      r: 1 <= r < n for Lanczos, r <= n for ``method='dense'``.
      method: "lanczos", "dense" (``jnp.linalg.eigh`` of the dense n x n matrix,
        O(n^2) memory) or "auto" (dense when r == n, else Lanczos).

    Returns:
      ``Eigenpairs(values float[r] descending, vectors float[n, r])``.

    The other arguments are those of `lanczos`.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    n = graph.num_nodes
    if method not in ("auto", "lanczos", "dense"):
        raise ValueError(f"method must be 'auto', 'lanczos' or 'dense', got {method!r}")
    r = _check_r(r, n, allow_n=method in ("auto", "dense"))
    tol = _check_tol(tol)   # checked even when every component is solved densely (tol unused)
    if method == "auto":
        method = "dense" if r == n else "lanczos"
    dtype = _resolve_dtype(dtype)
    mat = check_symmetric_matrix(graph) if check_symmetric else graph.to_scipy()  # (the flag shadows the name)
    if method == "dense":
        g = type(graph)(indices=graph.indices, weights=graph.weights.astype(dtype))
        return _dense_eigenpairs(g, r=r)
    m, _ = _krylov_dims(n, r, num_iter)
    if not split_components:
        return _run(_graph_matvec, graph, n, r, num_iter=num_iter, key=key, dtype=dtype, tol=tol,
                    max_restarts=max_restarts, labels=np.zeros(n, np.int32), sizes=np.array([n]))
    if max_blocks is None:
        max_blocks = max(2, min(2 ** 24 // (m * m), 2 ** 31 // (m ** 3)))
    small, labels, sizes = _component_plan(connected_components(graph), small_size=int(small_component),
                                           max_blocks=int(max_blocks))
    n_large = int(sizes.sum())
    pairs_l = None
    if n_large:
        r_l = min(r, n_large)
        if len(sizes) == 2:  # one large block + the (empty or) disabled one
            if n_large == n:
                labels, sizes = np.zeros(n, np.int32), np.array([n], np.int32)
        pairs_l = _run(_graph_matvec, graph, n, r_l, num_iter=num_iter, key=key, dtype=dtype, tol=tol,
                       max_restarts=max_restarts, labels=labels, sizes=sizes, space=n_large)
        if not small:
            return pairs_l
    parts = _small_parts(mat, small, r, dtype)
    if pairs_l is None:
        pairs_l = Eigenpairs(values=jnp.zeros((0,), dtype), vectors=jnp.zeros((n, 0), dtype))
    return _merge(pairs_l.values, pairs_l.vectors, parts, r=r, n=n)
