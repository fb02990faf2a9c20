"""PCA whitening of global or regional descriptors.

Learned on a set of training descriptors X [n, d] (Jegou & Chum, ECCV 2012;
used after R-MAC by Tolias et al., ICLR 2016 and after GeM by Radenovic et al.,
TPAMI 2018):

  mu = mean(X),  C = (X - mu)^T (X - mu) / (n - 1)  (optionally shrunk towards
  (tr C / d) I),  C = U diag(lambda) U^T  (lambda descending),
  P = U[:, :dim] diag(max(lambda, floor)[:dim])^(-1/2),
  whiten(x) = l2( (x - mu) P ).

Learning runs on the host in float64 (it is a one-off fit); applying is a pure
jittable function.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .pooling import l2_normalize, whitening_arrays

__all__ = ["Whitening", "learn_pca_whitening", "apply_whitening"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Whitening:
    """Learned PCA whitening, a pytree (both fields are leaves).

    Attributes:
      mean: float32[d] training mean mu.
      projection: float32[d, dim] P = U_dim Lambda_dim^(-1/2); columns sorted by
        decreasing variance, so ``projection[:, :k]`` is the whitening to k dims.
    """

    mean: jax.Array
    projection: jax.Array

    @property
    def input_dim(self) -> int:
        return self.projection.shape[0]

    @property
    def dim(self) -> int:
        return self.projection.shape[1]


def learn_pca_whitening(X, dim: int | None = None, shrinkage: float = 0.0,
                        eig_floor: float = 1e-6) -> Whitening:
    """Fit PCA whitening on training descriptors.

    Args:
      X: float[n, d] training descriptors (usually L2-normalised), finite.
      dim: output dimension, 1 <= dim <= d (default d).
      shrinkage: s in [0, 1]; C <- (1 - s) C + s (tr C / d) I, which makes C full rank
        and so allows dim >= n.
      eig_floor: eigenvalues are floored at eig_floor * lambda_max (and a tiny
        absolute value) before the inverse square root, so near-null directions are
        not blown up to infinity.

    Returns:
      `Whitening` with mean [d] and projection [d, dim] (float32). On the training
      set, (X - mean) @ projection has identity covariance (1/(n-1) normalisation)
      in every direction whose eigenvalue is above the floor.

    Raises:
      ValueError: NaN/inf in X, dim outside [1, d], shrinkage outside [0, 1], or
        fewer than dim + 1 samples without shrinkage (the centred covariance of n
        samples has rank <= n - 1).
    """
    X = _checks.as_matrix(X, "X", dtype=np.float64, allow_zero_rows=True)
    n, d = X.shape
    if dim is None:
        dim = d
    if not _checks.is_int(dim):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    dim = int(dim)
    if not 1 <= dim <= d:
        raise ValueError(f"dim = {dim} must lie in [1, d] with d = {d} (the descriptor dimension)")
    shrinkage = float(shrinkage)
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    if n < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {n}")
    if shrinkage == 0.0 and n < dim + 1:
        raise ValueError(
            f"too few samples: {n} descriptors give a covariance of rank <= {n - 1}, but dim = {dim} "
            f"needs at least {dim + 1}; lower dim, add samples, or set shrinkage > 0")
    eig_floor = _checks.check_positive(eig_floor, "eig_floor")

    mean = X.mean(axis=0)
    Xc = X - mean
    cov = Xc.T @ Xc / (n - 1)
    if shrinkage > 0.0:
        cov = (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:dim]
    evals, evecs = evals[order], evecs[:, order]
    top = max(float(evals[0]), 0.0)
    floor = max(eig_floor * top, np.finfo(np.float64).tiny * 1e6)
    if top <= 0.0:
        raise ValueError("X has zero variance (all descriptors identical); nothing to whiten")
    # fix the sign of each eigenvector (largest |entry| positive) for reproducibility
    signs = np.sign(evecs[np.argmax(np.abs(evecs), axis=0), np.arange(dim)])
    signs[signs == 0] = 1.0
    proj = evecs * signs / np.sqrt(np.maximum(evals, floor))
    return Whitening(mean=jnp.asarray(mean, dtype=jnp.float32),
                     projection=jnp.asarray(proj, dtype=jnp.float32))


def apply_whitening(w: Whitening, X, normalize: bool = True) -> jax.Array:
    """y = l2( (X - mean) @ projection ) for X [..., d] -> [..., dim]. Jittable.

    ``normalize=False`` returns the raw projection (identity covariance on the
    training set), e.g. to check the fit or to concatenate before normalising.

    Raises:
      TypeError: ``w`` is not a `Whitening` (e.g. the arguments swapped: the whitening
        comes first), or ``X`` is complex or not numeric.
      ValueError: ``X``'s last axis is not the whitening's d, or a concrete ``X`` (or
        whitening) holds NaN / inf. Traced values are checked for shape and dtype only.
    """
    normalize = _checks.check_bool(normalize, "normalize")
    if isinstance(X, Whitening) and not isinstance(w, Whitening):
        raise TypeError("apply_whitening(w, X) takes the Whitening first and the descriptors second; "
                        "the arguments look swapped")
    mean, proj = whitening_arrays(w, what="dimensions")
    _checks.check_real_dtype(X, "X")
    X = jnp.asarray(X)
    if not jnp.issubdtype(X.dtype, jnp.floating):
        X = X.astype(jnp.float32)
    if X.ndim < 1 or X.shape[-1] != proj.shape[0]:
        raise ValueError(f"whitening was learned on d = {proj.shape[0]} dimensional descriptors, "
                         f"got an array of shape {tuple(X.shape)}")
    _checks.check_finite_values(X, "X")
    y = jnp.matmul(X - mean.astype(X.dtype), proj.astype(X.dtype),
                   precision=jax.lax.Precision.HIGHEST)
    return l2_normalize(y) if normalize else y
