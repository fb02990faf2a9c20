"""PCA whitening against numpy covariances."""
import jax
import numpy as np
import pytest

from retrieval_jax.descriptors import whitening


def _correlated(n=600, d=12, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) * np.linspace(0.2, 3.0, d)
    return (rng.normal(size=(n, d)) @ A + rng.normal(size=d) * 5).astype(np.float32)


def test_whitening_identity_covariance():
    X = _correlated()
    w = whitening.learn_pca_whitening(X)
    Y = np.asarray(whitening.apply_whitening(w, X, normalize=False), np.float64)
    np.testing.assert_allclose(Y.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(Y, rowvar=False), np.eye(12), atol=1e-3)
    Z = whitening.apply_whitening(w, X)
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)


def test_whitening_dim_reduction_keeps_top_variance():
    X = _correlated(seed=1)
    w = whitening.learn_pca_whitening(X, dim=5)
    assert w.mean.shape == (12,) and w.projection.shape == (12, 5) and w.dim == 5
    Y = np.asarray(whitening.apply_whitening(w, X, normalize=False), np.float64)
    assert Y.shape == (600, 5)
    np.testing.assert_allclose(np.cov(Y, rowvar=False), np.eye(5), atol=1e-3)
    # the kept directions are the top principal axes
    Xc = X - X.mean(0)
    ev, U = np.linalg.eigh(np.cov(Xc, rowvar=False))
    top = U[:, ::-1][:, :5]
    P = np.asarray(w.projection, np.float64)
    P = P / np.linalg.norm(P, axis=0)
    np.testing.assert_allclose(np.abs(np.sum(P * top, axis=0)), 1.0, atol=1e-4)
    # jittable and a pytree
    leaves = jax.tree_util.tree_leaves(w)
    assert len(leaves) == 2
    out = jax.jit(whitening.apply_whitening)(w, X[:3])
    assert out.shape == (3, 5)


def test_whitening_errors():
    X = _correlated(n=20, d=12)
    with pytest.raises(ValueError, match=r"dim = 13 must lie in \[1, d\]"):
        whitening.learn_pca_whitening(X, dim=13)
    with pytest.raises(ValueError, match="too few samples"):
        whitening.learn_pca_whitening(X[:8], dim=10)
    whitening.learn_pca_whitening(X[:8], dim=10, shrinkage=0.1)  # shrinkage makes it full rank
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        whitening.learn_pca_whitening(bad)
    with pytest.raises(ValueError, match="at least 2 samples"):
        whitening.learn_pca_whitening(X[:1], dim=1)
    w = whitening.learn_pca_whitening(X, dim=4)
    with pytest.raises(ValueError, match="d = 12"):
        whitening.apply_whitening(w, np.ones((2, 5)))


def test_whitening_floor_keeps_rank_deficient_finite():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 8))  # rank 3 in 8 dims
    w = whitening.learn_pca_whitening(X, shrinkage=0.0)
    assert np.all(np.isfinite(np.asarray(w.projection)))
