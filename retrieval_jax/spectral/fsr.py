"""Fast Spectral Ranking (Iscen, Avrithis, Tolias, Furon, Chum, CVPR 2018).

Diffusion on a kNN graph ranks the database by x = h(W) y, e.g. the regularised
Laplacian h(l) = (1 - alpha) / (1 - alpha l) for which x = (1 - alpha)(I - alpha W)^-1 y.
FSR moves the work offline with the r largest eigenpairs W U_r = U_r L_r:

* FSR.rank-r:  x ~ U_r h(L_r) U_r^T y
* FSR.approx:  x ~ U_r (h(L_r) - h(0) I) U_r^T y + h(0) y
  (the discarded eigenvalues are taken as 0, i.e. h(W) ~ U_r h(L_r) U_r^T
  + h(0) (I - U_r U_r^T); exact at r = n like rank-r, never worse per eigen-direction
  for the regularised Laplacian).

Online, a query costs z = U_r^T y (for the usual out-of-graph query observation
with k non-zeros: a sum of k rows of U_r, O(k r)) then one [n, r] x [r] product.

The offline result is a `SpectralEmbedding` pytree: one formula
x = U (f * (U^T y)) + h0 y covers both modes (f = h(L_r), h0 = 0 for rank-r;
f = h(L_r) - h(0), h0 = h(0) for approx). U may be sparsified (paper, Sec. 4.3):
only the largest-magnitude entries of each row are kept, stored as padded
(value, column) pairs.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._precision import HIGHEST as _HI
from .. import _checks
from ..graph.affinity import similarity_power
from .components import (FSR_MODES, ComponentEigenpairs, ComponentSpectralEmbedding, component_eigenpairs,
                         component_fsr_scores_dense, component_fsr_scores_sparse, filter_component_pairs)
from .decomposition import Eigenpairs, graph_eigenpairs



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpectralEmbedding:
    """Offline part of FSR: scores x = U diag(filtered) U^T y + h0 y.

    Attributes:
      vectors: float32[n, r] eigenvectors U_r (dense), or float32[n, s] the kept
        entries of each row when ``columns`` is set (sparse).
      filtered: float32[r], h(L_r) (rank-r) or h(L_r) - h(0) (approx).
      h0: float32 scalar, 0 (rank-r) or h(0) (approx).
      values: float32[r] the eigenvalues L_r (descending).
      columns: None (dense) or int32[n, s] eigenvector index of each kept entry.
    """

    vectors: jax.Array
    filtered: jax.Array
    h0: jax.Array
    values: jax.Array
    columns: jax.Array | None = None

    @property
    def num_nodes(self) -> int:
        return self.vectors.shape[0]

    @property
    def rank(self) -> int:
        return self.filtered.shape[0]

    @property
    def is_sparse(self) -> bool:
        return self.columns is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the [n, r] (or sparse [n, s] values + columns) embedding."""
        total = self.vectors.size * self.vectors.dtype.itemsize
        if self.columns is not None:
            total += self.columns.size * self.columns.dtype.itemsize
        return int(total)

    def dense_vectors(self) -> jax.Array:
        """U as a dense float32[n, r] array."""
        return _dense_u(self)


def _dense_u(emb: SpectralEmbedding) -> jax.Array:
    if emb.columns is None:
        return emb.vectors
    n, s = emb.vectors.shape
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], (n, s))
    return jnp.zeros((n, emb.rank), emb.vectors.dtype).at[rows, emb.columns].add(emb.vectors)


# --------------------------------------------------------------------------- offline
def _eval_filter(h, lam: np.ndarray, what: str) -> np.ndarray:
    try:
        out = h(jnp.asarray(lam, jnp.float32))
    except Exception as exc:
        raise ValueError(f"the transfer function h failed on {what}: {exc}") from exc
    out = np.asarray(out, np.float64)
    out = np.broadcast_to(out, np.shape(lam)) if out.shape != np.shape(lam) else out
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(np.atleast_1d(out)))
        lam_bad = np.atleast_1d(lam)[bad[0]]
        raise ValueError(
            f"the transfer function h is not finite on {what} (h({lam_bad:.6g}) = "
            f"{np.atleast_1d(out)[bad[0]]}); e.g. 1 / (1 - l) has a pole at the eigenvalue 1 "
            "of every connected component - use regularized_laplacian_filter(alpha < 1)")
    return out


def check_normalized_spectrum(values, slack: float = 1e-3) -> None:
    """Raise unless the eigenvalues lie in [-1, 1] (up to ``slack``), as those of a
    normalised W = D^-1/2 A D^-1/2 do: an affinity A passed for W has eigenvalues up to
    its degrees, where the filters meant for [-1, 1] turn negative or blow up."""
    v = np.asarray(values)
    if v.size and (v.max() > 1 + slack or v.min() < -1 - slack):
        raise ValueError(f"the eigenvalues span [{v.min():.4g}, {v.max():.4g}], outside [-1, 1]: spectral "
                         "ranking needs the normalised graph W = normalize(A), not the affinity A")


def spectral_embedding(source, r: int, h, *, mode: str = "rank_r", sparsify: int | None = None,
                       per_component: bool = False, **eig_kwargs):
    """Offline FSR: eigenpairs of W, filtered by h (host side, not jitted).

    Args:
      source: the symmetric normalised `Graph` W (its eigenvalues must lie in [-1, 1],
        checked), whose r largest eigenpairs are
        computed by `graph_eigenpairs` (``eig_kwargs`` are passed on), or
        precomputed `Eigenpairs` with at least r pairs (the r largest are used).
      r: rank of the approximation, 1 <= r <= n.
      h: transfer function, a jittable callable of an array of eigenvalues
        (`regularized_laplacian_filter`, `heat_kernel_filter` or any user function);
        must be finite on the eigenvalues (and at 0 for ``mode='approx'``).
      mode: "rank_r" (x = U h(L) U^T y) or "approx" (x = U (h(L) - h(0)) U^T y + h(0) y).
      sparsify: keep only this many largest-magnitude entries per row of U (see
        `sparsify_embedding`; the memory saved is ``dense.nbytes - sparse.nbytes``).
      per_component: the top r eigenpairs of *every* connected component instead of
        the graph's global top r (`component_eigenpairs`; a `ComponentEigenpairs`
        source implies it). Use it when the graph has more components than r: each
        contributes an eigenvalue 1, so the global top r are all 1 there.

    Returns:
      a `SpectralEmbedding`, or a `ComponentSpectralEmbedding` per component; both are
      taken by `fast_spectral_ranking`, `fast_spectral_ranking_sparse` and `filter_embedding`.
    """
    if mode not in FSR_MODES:
        raise ValueError(f"mode must be 'rank_r' or 'approx', got {mode!r}")
    if not callable(h):
        raise TypeError(f"h must be a callable transfer function of the eigenvalues, got {type(h).__name__}")
    if per_component or isinstance(source, ComponentEigenpairs):
        return _component_embedding(source, r, h, mode, sparsify, eig_kwargs)
    if isinstance(source, Eigenpairs):
        if eig_kwargs:
            raise TypeError(f"eigen-solver options {sorted(eig_kwargs)} only apply to a Graph source")
        values = np.asarray(source.values)
        vectors = source.vectors
        if values.ndim != 1 or vectors.ndim != 2 or vectors.shape[1] != values.shape[0]:
            raise ValueError(f"inconsistent Eigenpairs: values {values.shape}, vectors {vectors.shape}")
        if not _checks.is_int(r) or not 1 <= r <= values.shape[0]:
            raise ValueError(f"r must be an int with 1 <= r <= {values.shape[0]} (the available pairs), got {r!r}")
        r = int(r)
        order = np.argsort(-values, kind="stable")[:r]
        values = values[order]
        vectors = jnp.asarray(vectors)[:, jnp.asarray(order)]
    else:
        pairs = graph_eigenpairs(source, r, **eig_kwargs)
        values, vectors = np.asarray(pairs.values), pairs.vectors
    if not np.isfinite(values).all():
        raise ValueError("the eigenvalues contain NaN or inf (the eigen-solver did not converge)")
    check_normalized_spectrum(values)
    hv = _eval_filter(h, values, "the eigenvalues")
    if mode == "approx":
        h0 = float(_eval_filter(h, np.zeros((), np.float32), "0 (needed by mode='approx')"))
        filtered = hv - h0
    else:
        h0, filtered = 0.0, hv
    emb = SpectralEmbedding(vectors=jnp.asarray(vectors, jnp.float32),
                            filtered=jnp.asarray(filtered, jnp.float32),
                            h0=jnp.asarray(h0, jnp.float32),
                            values=jnp.asarray(values, jnp.float32))
    if sparsify is not None:
        emb, _ = sparsify_embedding(emb, sparsify)
    return emb


def _component_embedding(source, r, h, mode, sparsify, eig_kwargs) -> ComponentSpectralEmbedding:
    if sparsify is not None:
        raise ValueError("sparsify applies to the global embedding only, not per_component")
    if isinstance(source, ComponentEigenpairs):
        if eig_kwargs:
            raise TypeError(f"eigen-solver options {sorted(eig_kwargs)} only apply to a Graph source")
        if not _checks.is_int(r) or r != source.rank:
            raise ValueError(f"r must equal the ComponentEigenpairs' rank {source.rank}, got {r!r}")
        pairs = source
    else:
        pairs = component_eigenpairs(source, r, **eig_kwargs)
    for values in pairs.values:
        check_normalized_spectrum(values)
        _eval_filter(h, np.asarray(values), "the eigenvalues")
    if mode == "approx":
        _eval_filter(h, np.zeros((), np.float32), "0 (needed by mode='approx')")
    return filter_component_pairs(pairs, h, mode=mode)


@functools.partial(jax.jit, static_argnames=("mode",))
def filter_embedding(embedding, h, *, mode: str = "rank_r"):
    """The same eigenpairs under another transfer function h: a pure, jittable function.

    filtered = h(L_r) (rank-r) or h(L_r) - h(0) (approx), h0 = 0 or h(0). With h a
    pytree filter (`regularized_laplacian_filter(alpha)`, `heat_kernel_filter(t)`)
    built from traced parameters, FSR scores can be ``vmap``-ed over alpha or t (one
    eigendecomposition, one compiled program for a whole grid) and differentiated with
    respect to them by ``grad``. No finiteness check here (values may be traced):
    `spectral_embedding` checks h on the host. A `ComponentSpectralEmbedding` is
    refiltered per component.
    """
    if mode not in FSR_MODES:
        raise ValueError(f"mode must be 'rank_r' or 'approx', got {mode!r}")
    if isinstance(embedding, ComponentSpectralEmbedding):
        return filter_component_pairs(embedding.pairs, h, mode=mode)
    values = embedding.values
    hv = jnp.asarray(h(values), values.dtype)
    if mode == "approx":
        h0 = jnp.asarray(h(jnp.zeros((), values.dtype)), values.dtype)
        filtered = hv - h0
    else:
        h0, filtered = jnp.zeros((), values.dtype), hv
    return dataclasses.replace(embedding, filtered=filtered, h0=h0)


@functools.partial(jax.jit, static_argnames=("per_row",))
def _sparsify(vectors, *, per_row: int):
    _, cols = jax.lax.top_k(jnp.abs(vectors), per_row)
    return jnp.take_along_axis(vectors, cols, axis=1), cols.astype(jnp.int32)


def sparsify_embedding(embedding: SpectralEmbedding, per_row: int) -> tuple[SpectralEmbedding, int]:
    """Keep the ``per_row`` largest-magnitude entries of every row of U.

    Storage goes from n r float32 values to n s (float32 value + int32 column).

    Returns:
      (sparse embedding, bytes saved = dense bytes - sparse bytes; negative when
      per_row > r / 2, where the padded sparse form is larger).
    """
    if not isinstance(embedding, SpectralEmbedding):
        raise TypeError(f"expected a SpectralEmbedding, got {type(embedding).__name__}")
    r = embedding.rank
    if not _checks.is_int(per_row) or not 1 <= per_row <= r:
        raise ValueError(f"sparsify (entries kept per row) must be an int in [1, r = {r}], got {per_row!r}")
    dense = embedding.dense_vectors()
    before = dense.size * dense.dtype.itemsize
    vals, cols = _sparsify(dense, per_row=int(per_row))
    out = dataclasses.replace(embedding, vectors=vals, columns=cols)
    return out, int(before - out.nbytes)


# --------------------------------------------------------------------------- online
@jax.jit
def fsr_scores_dense(embedding: SpectralEmbedding, y):
    """x = U diag(f) U^T y + h0 y for dense y float[nq, n]; float[nq, n]. Pure and jittable
    (no checks: see `fast_spectral_ranking` for the checked entry point). O(nq n r)."""
    emb = embedding
    U = _dense_u(emb)
    y = y.astype(U.dtype)
    z = jnp.matmul(y, U, precision=_HI) * emb.filtered           # [nq, r] = (U^T y)^T * f
    return jnp.matmul(z, U.T, precision=_HI) + emb.h0 * y


@jax.jit
def fsr_scores_sparse(embedding: SpectralEmbedding, weights, indices):
    """x = U diag(f) U^T y + h0 y for y with k non-zeros per query: y[q, indices[q, j]] =
    weights[q, j] (float[nq, k], int[nq, k]); float[nq, n]. Pure and jittable (no checks):
    U^T y is a weighted sum of k rows of U, O(nq k r), then one [n, r] product."""
    U = _dense_u(embedding)
    yv = weights.astype(U.dtype)
    z = jnp.einsum("qk,qkr->qr", yv, U[indices], precision=_HI) * embedding.filtered  # k rows of U
    x = jnp.matmul(z, U.T, precision=_HI)
    rows = jnp.broadcast_to(jnp.arange(indices.shape[0])[:, None], indices.shape)
    return x.at[rows, indices].add(embedding.h0 * yv)


def _fsr_sparse(emb, sims, idx, gamma):
    scores = component_fsr_scores_sparse if isinstance(emb, ComponentSpectralEmbedding) else fsr_scores_sparse
    return scores(emb, similarity_power(sims, gamma), idx)


def _check_embedding(embedding):
    if not isinstance(embedding, (SpectralEmbedding, ComponentSpectralEmbedding)):
        raise TypeError("expected a SpectralEmbedding or ComponentSpectralEmbedding (see spectral_embedding), "
                        f"got {type(embedding).__name__}")


def fast_spectral_ranking(embedding, y) -> jax.Array:
    """Online FSR scores x = U diag(f) U^T y + h0 y for dense query observations.

    Args:
      embedding: from `spectral_embedding` (global or per component).
      y: float[n] or float[nq, n] query observation vectors (e.g. ``query_vectors``).

    Returns:
      float32 scores of the same shape as y. Jitted; O(nq n r).
    """
    _check_embedding(embedding)
    y = jnp.asarray(y)
    n = embedding.num_nodes
    if y.ndim not in (1, 2) or y.shape[-1] != n:
        raise ValueError(f"y must have shape [{n}] or [nq, {n}] (one entry per database item), got {y.shape}")
    _checks.check_real_dtype(y, "y")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.float32)
    if not _checks.is_traced(y) and not np.isfinite(np.asarray(y)).all():
        raise ValueError("y contains NaN or inf; FSR scores would be NaN")
    scores = component_fsr_scores_dense if isinstance(embedding, ComponentSpectralEmbedding) else fsr_scores_dense
    out = scores(embedding, y[None] if y.ndim == 1 else y)
    return out[0] if y.ndim == 1 else out


def fast_spectral_ranking_sparse(embedding, similarities, indices, *,
                                 gamma: float = 3.0) -> jax.Array:
    """FSR scores for out-of-graph queries given by their k nearest database items.

    The observation is y[q, indices[q, j]] = max(similarities[q, j], 0)^gamma (as in
    ``query_vectors``), so U^T y is a weighted sum of k rows of U: O(nq k r) instead
    of O(nq n r), then x = U (f * U^T y) + h0 y.

    Args:
      similarities: float[nq, k]; indices: int[nq, k] in [0, n).
      gamma: similarity exponent (> 0).

    Returns:
      float32[nq, n] scores. Jitted.
    """
    _check_embedding(embedding)
    gamma = _checks.check_gamma(gamma)
    sims, idx = jnp.asarray(similarities), jnp.asarray(indices)
    if sims.ndim != 2 or sims.shape != idx.shape:
        raise ValueError(f"similarities and indices must both be [nq, k], got {sims.shape} and {idx.shape}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"indices must be integers, got {idx.dtype}")
    _checks.check_real_dtype(sims, "similarities")
    n = embedding.num_nodes
    if not _checks.is_traced(sims) and not np.isfinite(np.asarray(sims)).all():
        raise ValueError("similarities contain NaN or inf; FSR scores would be NaN")
    if not _checks.is_traced(idx) and idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"indices must lie in [0, {n}), got range [{int(idx.min())}, {int(idx.max())}]")
    return _fsr_sparse(embedding, sims.astype(jnp.float32), idx.astype(jnp.int32), jnp.asarray(gamma, jnp.float32))
