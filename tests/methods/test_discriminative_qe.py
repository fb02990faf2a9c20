"""DQE: the dual SVM solver against hand-solved cases and a scipy solve of the primal; the Method
against a numpy + scipy reference; traced C; validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import LinearConstraint, minimize

from retrieval_jax.methods.discriminative_qe import (DQE, DqeConfig, discriminative_directions,
                                                     svm_dual_coordinate_ascent, train_linear_svm)


def _unit(rng, n, d=6):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _primal_svm(x, y, c, bias):
    """Reference: the primal QP min 1/2 ||(w, b)||^2 + C sum xi, y_i (<w, x_i> + B b) >= 1 - xi_i,
    xi >= 0, solved by scipy's interior-point trust-constr in float64. Returns (w, intercept B b,
    objective)."""
    x = np.asarray(x, np.float64)
    m, d = x.shape
    z = np.hstack([x, np.full((m, 1), bias)])
    k = d + 1
    hess = np.diag(np.r_[np.ones(k), np.zeros(m)])
    constraints = [LinearConstraint(np.hstack([y[:, None] * z, np.eye(m)]), np.ones(m), np.inf),
                   LinearConstraint(np.hstack([np.zeros((m, k)), np.eye(m)]), np.zeros(m), np.inf)]
    res = minimize(lambda v: 0.5 * v[:k] @ v[:k] + c * v[k:].sum(), np.r_[np.zeros(k), np.full(m, 2.0)],
                   jac=lambda v: np.r_[v[:k], np.full(m, c)], hess=lambda v: hess, constraints=constraints,
                   method="trust-constr", options={"gtol": 1e-12, "xtol": 1e-14, "maxiter": 5000})
    assert res.status in (1, 2), res.message
    return res.x[:d], bias * res.x[d], res.fun


def _primal_objective(x, y, c, bias, w, intercept):
    b = intercept / bias if bias else 0.0
    margins = y * (x.astype(np.float64) @ w + intercept)
    return 0.5 * (w @ w + b * b) + c * np.maximum(0.0, 1.0 - margins).sum()


# ----------------------------------------------------------------------------- hand-solved SVMs
@pytest.mark.parametrize("bias", [0.0, 1.0])
def test_symmetric_pair_max_margin_is_x_over_its_squared_norm(bias):
    # x+ = a, x- = -a: by symmetry a+ = a- = 1 / (2 ||a||^2), w = a / ||a||^2, no intercept
    a = np.array([3.0, 4.0], np.float32)
    w, b = train_linear_svm(np.stack([a, -a]), np.array([1.0, -1.0]), 10.0, epochs=300, bias=bias)
    np.testing.assert_allclose(np.asarray(w), a / 25.0, atol=1e-6)
    assert abs(float(b)) < 1e-6


def test_asymmetric_pair_with_bias_by_hand():
    # z+ = (2, 0, 1), z- = (0, 0, 1): both margins active, 5 a+ - a- = 1 and a+ - a- = -1
    # give a+ = 1/2, a- = 3/2, (w, b) = (1, 0, -1): f(x) = x_1 - 1, f(x+) = 1, f(x-) = -1
    x = np.array([[2.0, 0.0], [0.0, 0.0]], np.float32)
    y = np.array([1.0, -1.0], np.float32)
    a = svm_dual_coordinate_ascent(x @ x.T + 1.0, y, 10.0, epochs=100)
    np.testing.assert_allclose(np.asarray(a), [0.5, 1.5], atol=1e-5)
    w, b = train_linear_svm(x, y, 10.0, epochs=100, bias=1.0)
    np.testing.assert_allclose(np.asarray(w), [1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(float(b), -1.0, atol=1e-5)
    # C = 0.1 < 3/2: both points inside the margin, both at the box a = C: (w, b) = 0.1 (2, 0, 0)
    w, b = train_linear_svm(x, y, 0.1, epochs=100, bias=1.0)
    np.testing.assert_allclose(np.asarray(w), [0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(float(b), 0.0, atol=1e-6)


@pytest.mark.parametrize("c, bias", [(0.1, 1.0), (1.0, 1.0), (10.0, 0.5), (1.0, 0.0)])
def test_svm_matches_scipy_primal_on_a_random_problem(c, bias):
    rng = np.random.default_rng(int(10 * c + bias))
    x = _unit(rng, 14, 5)
    x[:7] += 0.4 * rng.normal(size=5).astype(np.float32)  # overlapping classes: some slack
    y = np.r_[np.ones(7), -np.ones(7)]
    w_ref, b_ref, obj_ref = _primal_svm(x, y, c, bias)
    w, b = train_linear_svm(x, y, c, epochs=500, bias=bias)
    w, b = np.asarray(w, np.float64), float(b)
    np.testing.assert_allclose(w, w_ref, atol=2e-4 * max(1.0, np.abs(w_ref).max()))
    assert abs(b - b_ref) < 2e-4 * max(1.0, abs(b_ref))
    assert _primal_objective(x, y, c, bias, w, b) == pytest.approx(obj_ref, rel=1e-5)
    a = np.asarray(svm_dual_coordinate_ascent(x @ x.T + bias**2, y, c, epochs=500))
    assert a.min() >= 0.0 and a.max() <= c * (1 + 1e-6)
    # strong duality: the dual objective reaches the primal optimum
    q = np.outer(y, y) * (x.astype(np.float64) @ x.T + bias**2)
    assert a.sum() - 0.5 * a @ q @ a == pytest.approx(obj_ref, rel=1e-5)


def test_svm_under_vmap_over_c_and_jit():
    rng = np.random.default_rng(7)
    x = _unit(rng, 10, 4)
    y = np.r_[np.ones(5), -np.ones(5)]
    cs = jnp.array([0.05, 0.5, 5.0])
    grid = jax.vmap(lambda c: train_linear_svm(x, y, c, 300, 1.0)[0])(cs)
    for c, w in zip(cs, grid):
        np.testing.assert_allclose(np.asarray(w), np.asarray(train_linear_svm(x, y, float(c), 300, 1.0)[0]),
                                   atol=1e-5)
    jitted = jax.jit(train_linear_svm, static_argnums=3)
    np.testing.assert_allclose(np.asarray(jitted(x, y, 0.5, 300, 1.0)[0]), np.asarray(grid[1]), atol=1e-5)


# ----------------------------------------------------------------------------- the method
def _np_dqe_scores(queries, db, n_pos, n_neg, c, bias, exclude=None):
    """Reference DQE from the paper's definition: positives the query + its n_pos nearest, negatives
    the n_neg lowest <q, x>; the SVM solved in the primal by scipy; the database ranked by <w, x>."""
    out = []
    for j, q in enumerate(queries):
        s = db.astype(np.float64) @ q
        order = np.argsort(-s, kind="stable")
        if exclude is not None:
            order = order[order != exclude[j]]
        pos, neg = order[:n_pos], order[::-1][:n_neg]
        x = np.vstack([q[None], db[pos], db[neg]])
        y = np.r_[np.ones(1 + n_pos), -np.ones(n_neg)]
        w, _, _ = _primal_svm(x, y, c, bias)
        out.append(db @ (w / np.linalg.norm(w)))
    return np.array(out)


def test_dqe_method_matches_reference_and_items_exclude_self():
    rng = np.random.default_rng(11)
    db, q = _unit(rng, 40), _unit(rng, 2)
    cfg = DqeConfig(n_pos=5, n_neg=6, c=1.0, bias=1.0, epochs=800)
    state = DQE.build(db, cfg)
    np.testing.assert_allclose(np.asarray(DQE.search(state, q)), _np_dqe_scores(q, db, 5, 6, 1.0, 1.0), atol=5e-4)
    ids = np.array([0, 39])
    np.testing.assert_allclose(np.asarray(DQE.search_items(state, ids)),
                               _np_dqe_scores(db[ids], db, 5, 6, 1.0, 1.0, exclude=ids), atol=5e-4)
    np.testing.assert_allclose(np.asarray(discriminative_directions(q, db, 5, 6, 1.0, 800, 1.0)) @ db.T,
                               np.asarray(DQE.search(state, q)), atol=1e-5)


def test_dqe_state_values_are_traced_one_program_for_a_grid_of_c():
    rng = np.random.default_rng(12)
    db, q = _unit(rng, 30), _unit(rng, 4)
    states = [DQE.build(db, DqeConfig(n_pos=4, n_neg=4, c=c, epochs=100)) for c in (0.1, 2.0)]
    assert jax.tree_util.tree_structure(states[0]) == jax.tree_util.tree_structure(states[1])
    assert states[1].config == DqeConfig(n_pos=4, n_neg=4, c=2.0, epochs=100)
    jitted = jax.jit(lambda s, x: DQE.search(s, x))
    grid = jax.vmap(lambda c: jitted(dataclasses.replace(states[0], c=c), q))(jnp.array([0.1, 2.0]))
    for g, st in zip(grid, states):
        np.testing.assert_allclose(np.asarray(g), np.asarray(DQE.search(st, q)), atol=1e-5)
    assert DQE.search(states[0], q).dtype == np.float32


@pytest.mark.parametrize("call, match", [
    (lambda db: DqeConfig(n_pos=0), "DqeConfig.n_pos must be a positive int"),
    (lambda db: DqeConfig(epochs=1.5), "DqeConfig.epochs must be a positive int"),
    (lambda db: DqeConfig(c=0.0), "DqeConfig.c must be a finite number > 0"),
    (lambda db: DqeConfig(bias=-1.0), "DqeConfig.bias must be a finite number >= 0"),
    (lambda db: DqeConfig(c=float("nan")), "finite"),
    (lambda db: DQE.build(db, DqeConfig(n_pos=15, n_neg=15)), "15 \\+ 15 training items need a database of at least"),
    (lambda db: discriminative_directions(db[:2], db, 20, 11), "at least 31 items"),
    (lambda db: DQE.build(db, DqeConfig(n_pos=20, n_neg=10)), "at least 31 items"),
    (lambda db: discriminative_directions(db[:2, :3], db, 2, 2), "dimension mismatch"),
    (lambda db: DQE.search(DQE.build(db, DqeConfig(n_pos=3, n_neg=3)), db[:, :4]), "dimension mismatch"),
    (lambda db: DQE.search_items(DQE.build(db, DqeConfig(n_pos=3, n_neg=3)), [30]), r"ids must lie in \[0, 30\)"),
    (lambda db: DQE.build(db, object()), "DqeConfig"),
])
def test_validation_errors(call, match):
    db = _unit(np.random.default_rng(0), 30)
    with pytest.raises((ValueError, TypeError), match=match):
        call(db)
