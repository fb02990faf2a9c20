"""retrieval_jax.training.learned_diffusion against independent references.

The scores against a dense solve of (I - alpha W) S^T = Y^T on a kNN graph built in
numpy; the gradients of the scores and of the objective with respect to a, g and D
against central finite differences in float64; the listwise loss against a hand
computation on three items; jit / vmap against the eager calls.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import unit_clusters
from retrieval_jax.training import (ALPHA_MAX, LearnedDiffusionParams, learned_diffusion_scores,
                                    learned_diffusion_step, listwise_loss, listwise_objective, project)


def _dense_scores(X, P, alpha, gamma, k, Y, mutual=True):
    """numpy: rows_l2(X P), the (mutual) kNN affinity, D^-1/2 A D^-1/2, a dense solve."""
    Z = X @ P
    Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    n = Z.shape[0]
    sim = Z @ Z.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.zeros((n, n), bool)
    for i in range(n):
        nn[i, np.argsort(-sim[i])[:k]] = True
    keep = (nn & nn.T) if mutual else (nn | nn.T)
    A = np.where(keep, np.maximum(np.where(np.isfinite(sim), sim, 0.0), 0.0) ** gamma, 0.0)
    d = A.sum(1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)
    W = inv[:, None] * A * inv[None, :]
    return np.linalg.solve(np.eye(n) - alpha * W, Y.T).T


def _params(d, alpha, gamma, seed=None, scale=0.05, dtype=jnp.float32):
    p = LearnedDiffusionParams.create(d, alpha=alpha, gamma=gamma, dtype=dtype)
    if seed is None:
        return p
    D = scale * np.random.default_rng(seed).normal(size=(d, d))
    return LearnedDiffusionParams(a=p.a, g=p.g, D=jnp.asarray(D, dtype))


def test_create_recovers_alpha_gamma_and_identity():
    p = LearnedDiffusionParams.create(5, alpha=0.9, gamma=2.5)
    assert abs(float(p.alpha) - 0.9) < 1e-6 and abs(float(p.gamma) - 2.5) < 1e-5
    np.testing.assert_array_equal(np.asarray(p.projection), np.eye(5))
    assert float(LearnedDiffusionParams(a=jnp.float32(50.0), g=p.g, D=p.D).alpha) < 1.0   # capped
    assert float(ALPHA_MAX * jax.nn.sigmoid(0.0)) == pytest.approx(float(
        LearnedDiffusionParams(a=jnp.float32(0.0), g=p.g, D=p.D).alpha))
    with pytest.raises(ValueError, match="alpha"):
        LearnedDiffusionParams.create(5, alpha=1.0)
    with pytest.raises(ValueError, match="gamma"):
        LearnedDiffusionParams.create(5, gamma=0.0)
    leaves = jax.tree_util.tree_leaves(p)
    assert len(leaves) == 3                                   # a pytree of a, g, D


def test_project_is_rows_l2_of_xp():
    rng = np.random.default_rng(0)
    X, P = rng.normal(size=(7, 4)), rng.normal(size=(4, 3))
    ref = (X @ P) / np.linalg.norm(X @ P, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(project(X.astype(np.float32), P.astype(np.float32))), ref,
                               rtol=1e-5, atol=1e-6)
    z = np.asarray(project(np.zeros((2, 4), np.float32), P.astype(np.float32)))
    assert np.all(z == 0)                                     # a zero row stays 0, no NaN
    with pytest.raises(ValueError, match="X must be"):
        project(X, P.T)


@pytest.mark.parametrize("mutual", [True, False])
def test_scores_match_a_dense_solve(mutual):
    X, _ = unit_clusters(3, 40, 6, 4, noise=0.4)
    p = _params(6, 0.9, 2.0, seed=1)
    Y = np.eye(40)[[0, 5, 17]]
    S = np.asarray(learned_diffusion_scores(p, X, jnp.asarray(Y, jnp.float32), k=5, mutual=mutual,
                                            tol=1e-7, max_iter=500))
    ref = _dense_scores(X.astype(np.float64), np.asarray(p.projection, np.float64), float(p.alpha),
                        float(p.gamma), 5, Y, mutual=mutual)
    np.testing.assert_allclose(S, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    # the same program under jit (the traced kNN graph) and the eager (concrete) route
    jitted = jax.jit(lambda q, x, y: learned_diffusion_scores(q, x, y, k=5, mutual=mutual, tol=1e-7,
                                                              max_iter=500))
    np.testing.assert_allclose(np.asarray(jitted(p, X, jnp.asarray(Y, jnp.float32))), S,
                               rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_scores_vmap_over_parameters():
    X, _ = unit_clusters(4, 30, 5, 3, noise=0.4)
    y = jnp.eye(30, dtype=jnp.float32)[:4]
    base = _params(5, 0.9, 3.0)
    a = jnp.asarray([-1.0, 0.5, 2.0], jnp.float32)
    batched = jax.vmap(lambda ai: learned_diffusion_scores(
        LearnedDiffusionParams(a=ai, g=base.g, D=base.D), X, y, k=4, tol=1e-7, max_iter=400))(a)
    for i, ai in enumerate(np.asarray(a)):
        p = LearnedDiffusionParams(a=jnp.float32(ai), g=base.g, D=base.D)
        ref = _dense_scores(X.astype(np.float64), np.eye(5), float(p.alpha), float(p.gamma), 4,
                            np.asarray(y, np.float64))
        np.testing.assert_allclose(np.asarray(batched[i]), ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())


def _fd(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


def test_score_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        X, _ = unit_clusters(5, 30, 5, 3, noise=0.4)
        X = X.astype(np.float64)
        p0 = _params(5, 0.9, 2.0, seed=2, dtype=jnp.float64)
        y = jnp.asarray(np.eye(30)[[0, 11]])
        w = jnp.asarray(np.random.default_rng(3).normal(size=(2, 30)))     # a fixed read-out

        # jitted: the traced kNN graph keeps float64 (the eager search returns float32
        # similarities, too coarse for a finite difference)
        @jax.jit
        def f(p):
            S = learned_diffusion_scores(p, X, y, k=5, tol=1e-12, max_iter=1000)
            return jnp.sum(w * S)

        grads = jax.jit(jax.grad(f))(p0)
        ga = _fd(lambda v: float(f(LearnedDiffusionParams(a=v, g=p0.g, D=p0.D))), p0.a, 1e-5)
        gg = _fd(lambda v: float(f(LearnedDiffusionParams(a=p0.a, g=v, D=p0.D))), p0.g, 1e-5)
        assert abs(float(grads.a) - ga) < 1e-4 * abs(ga), (grads.a, ga)
        assert abs(float(grads.g) - gg) < 1e-4 * abs(gg), (grads.g, gg)
        for i, j in ((0, 0), (1, 3), (4, 2)):
            e = jnp.zeros((5, 5)).at[i, j].set(1.0)
            gd = _fd(lambda v: float(f(LearnedDiffusionParams(a=p0.a, g=p0.g, D=p0.D + v * e))), 0.0, 1e-6)
            assert abs(float(grads.D[i, j]) - gd) < 1e-4 * max(abs(gd), 1e-3), (i, j, grads.D[i, j], gd)


def test_listwise_loss_by_hand():
    # three items, classes [0, 0, 1]; T = 0.5
    S = np.array([[9.0, 2.0, 1.0],
                  [4.0, 9.0, 4.0],
                  [-1.0, -2.0, 9.0]], np.float32)
    T = 0.5
    # row 0: others (2, 1), scale 2 -> logits (1, 0.5)/T = (2, 1); positive item 1
    l0 = -(2.0 - np.log(np.exp(2.0) + np.exp(1.0)))
    # row 1: others (4, 4), scale 4 -> logits (2, 2); positive item 0
    l1 = -(2.0 - np.log(2 * np.exp(2.0)))
    # row 2: others (-1, -2), max <= 0 -> unscaled, logits (-2, -4); no positive: adds 0
    ref = (l0 + l1 + 0.0) / 3
    for labels in (np.array([0, 0, 1]), np.eye(2, dtype=np.float32)[[0, 0, 1]]):
        assert float(listwise_loss(S, labels, T)) == pytest.approx(ref, rel=1e-6)
    # the query's own score never matters
    S2 = S.copy()
    np.fill_diagonal(S2, [-5.0, 100.0, 0.0])
    assert float(listwise_loss(S2, np.array([0, 0, 1]), T)) == pytest.approx(ref, rel=1e-6)
    # jit with a traced temperature, and a finite gradient on an all-zero (isolated) row
    g = jax.jit(jax.grad(listwise_loss), static_argnums=())(jnp.asarray(S * [[1], [1], [0]]),
                                                             jnp.array([0, 0, 1]), jnp.float32(T))
    assert np.isfinite(np.asarray(g)).all()
    with pytest.raises(ValueError, match=r"\[n, n\]"):
        listwise_loss(S[:2], np.array([0, 0]), T)
    with pytest.raises(ValueError, match="labels"):
        listwise_loss(S, np.array([0, 0]), T)
    with pytest.raises(ValueError, match="temperature"):
        listwise_loss(S, np.array([0, 0, 1]), 0.0)


def test_objective_gradient_and_step():
    with jax.enable_x64(True):
        X, labels = unit_clusters(6, 24, 5, 3, noise=0.5)
        X = X.astype(np.float64)
        p0 = _params(5, 0.95, 3.0, seed=4, dtype=jnp.float64)
        kw = dict(k=4, tol=1e-12, max_iter=1000, temperature=0.1)

        @jax.jit
        def f(p):
            return listwise_objective(p, X, labels, **kw)
        g = jax.grad(f)(p0)
        ga = _fd(lambda v: float(f(LearnedDiffusionParams(a=v, g=p0.g, D=p0.D))), p0.a, 1e-5)
        assert abs(float(g.a) - ga) < 1e-4 * abs(ga) + 1e-9
        e = jnp.zeros((5, 5)).at[2, 1].set(1.0)
        gd = _fd(lambda v: float(f(LearnedDiffusionParams(a=p0.a, g=p0.g, D=p0.D + v * e))), 0.0, 1e-6)
        assert abs(float(g.D[2, 1]) - gd) < 1e-4 * max(abs(gd), 1e-3)
        # the step: the loss it reports is the objective before the update; plain SGD moves by -lr g
        step = learned_diffusion_step(optax.sgd(0.1), **kw)
        opt = optax.sgd(0.1)
        p1, _, loss, finite = step(p0, opt.init(p0), X, labels)
        assert bool(finite) and float(loss) == pytest.approx(float(f(p0)), rel=1e-9)
        np.testing.assert_allclose(np.asarray(p1.D), np.asarray(p0.D - 0.1 * g.D), rtol=1e-7, atol=1e-12)
        assert float(p1.a) == pytest.approx(float(p0.a - 0.1 * g.a), rel=1e-9)


def test_bad_params_type():
    X, _ = unit_clusters(0, 10, 3, 2, noise=0.3)
    with pytest.raises(TypeError, match="LearnedDiffusionParams"):
        learned_diffusion_scores({"a": 0.0}, X, np.eye(10, dtype=np.float32), k=3)
