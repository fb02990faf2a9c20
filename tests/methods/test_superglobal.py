"""SuperGlobal re-ranking against explicit Python loops over the shortlist; the top-M law; the Method;
traced beta; validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_jax.methods.superglobal import (SUPERGLOBAL, SuperGlobalConfig, refine_shortlist, shortlist_scores,
                                               superglobal_rerank)


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _np_refine(x, k, beta):
    """Reference refinement, one item at a time: the item (weight 1) and its k nearest others in the
    shortlist (weights beta <x_i, x_j>), their weighted mean."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        sims = {j: float(x[i] @ x[j]) for j in others}
        nbrs = sorted(others, key=lambda j: -sims[j])[:k]
        num = x[i] + sum(beta * sims[j] * x[j] for j in nbrs)
        out[i] = num / (1.0 + sum(beta * sims[j] for j in nbrs))
    return out


def _np_scores(q, x, k, beta):
    """Reference new scores of one shortlist: (<q, x'_i> + <q'', x'_i>) / 2, q'' the element-wise
    max of the k + 1 refined items closest to q."""
    refined = _np_refine(x, k, beta)
    s1 = refined @ q.astype(np.float64)
    top = np.argsort(-s1, kind="stable")[:k + 1]
    q2 = refined[top].max(axis=0)
    return 0.5 * (s1 + refined @ q2)


def _np_ranking(q, db, m, k, beta, exclude=None):
    """Reference ranking of the whole database: the re-scored shortlist first, then the rest by <q, x>."""
    s = db.astype(np.float64) @ q
    order = np.argsort(-s, kind="stable")
    if exclude is not None:
        order = order[order != exclude]
    shortlist = order[:m]
    new = _np_scores(q, db[shortlist], k, beta)
    head = shortlist[np.argsort(-new, kind="stable")]
    tail = np.array([j for j in np.argsort(-s, kind="stable") if j not in set(head)])
    return np.concatenate([head, tail]), dict(zip(shortlist, new))


def _ranking(scores):
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("k, beta", [(1, 0.15), (3, 0.15), (5, 0.6)])
def test_refinement_matches_a_loop_over_items(k, beta):
    x = _unit(np.random.default_rng(k), 12)
    np.testing.assert_allclose(np.asarray(refine_shortlist(x, k, beta)), _np_refine(x, k, beta), atol=2e-6)
    q = _unit(np.random.default_rng(100 + k), 1)[0]
    np.testing.assert_allclose(np.asarray(shortlist_scores(q, x, k, beta)), _np_scores(q, x, k, beta), atol=2e-6)


def test_beta_zero_leaves_the_shortlist_and_a_pair_by_hand():
    x = _unit(np.random.default_rng(1), 10)
    np.testing.assert_allclose(np.asarray(refine_shortlist(x, 4, 0.0)), x, atol=1e-7)
    # two items at similarity s = 0.6, k = 1, beta = 0.5: x'_0 = (x_0 + 0.3 x_1) / 1.3
    pair = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    np.testing.assert_allclose(np.asarray(refine_shortlist(pair, 1, 0.5)),
                               [[1.18 / 1.3, 0.24 / 1.3], [0.9 / 1.3, 0.8 / 1.3]], atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_law_shortlist_scores_are_permutation_equivariant(seed):
    rng = np.random.default_rng(seed)
    x, q = _unit(rng, 12), _unit(rng, 1)[0]
    perm = rng.permutation(12)
    a = np.asarray(shortlist_scores(q, x, 3, 0.15))
    b = np.asarray(shortlist_scores(q, x[perm], 3, 0.15))
    np.testing.assert_allclose(b, a[perm], atol=1e-6)


@pytest.mark.parametrize("m, k", [(6, 2), (15, 4)])
def test_law_top_m_reordered_first_the_rest_in_knn_order(m, k):
    rng = np.random.default_rng(m)
    db, q = _unit(rng, 40), _unit(rng, 4)
    scores = np.asarray(superglobal_rerank(q, db, m, k, 0.15))
    knn = _ranking(q @ db.T)
    for row in range(len(q)):
        got = _ranking(scores)[row]
        assert set(got[:m]) == set(knn[row, :m])  # the shortlist is the kNN top M ...
        np.testing.assert_array_equal(got[m:], knn[row, m:])  # ... the rest keeps its kNN order
        ref, new = _np_ranking(q[row], db, m, k, 0.15)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_allclose(scores[row, got[:m]], [new[j] for j in got[:m]], atol=2e-6)


# ----------------------------------------------------------------------------- the method
def test_method_search_and_items_match_reference():
    rng = np.random.default_rng(3)
    db, q = _unit(rng, 50), _unit(rng, 3)
    state = SUPERGLOBAL.build(db, SuperGlobalConfig(m=12, k=3, beta=0.15))
    np.testing.assert_allclose(np.asarray(SUPERGLOBAL.search(state, q)),
                               np.asarray(superglobal_rerank(q, db, 12, 3, 0.15)), atol=1e-6)
    ids = np.array([0, 21, 49])
    got = _ranking(SUPERGLOBAL.search_items(state, ids))
    for row, i in enumerate(ids):
        ref, _ = _np_ranking(db[i], db, 12, 3, 0.15, exclude=i)  # the item is not in its own shortlist
        np.testing.assert_array_equal(got[row, :12], ref[:12])
        assert i not in got[row, :12]


def test_state_beta_is_traced_one_program_for_a_grid_and_jit_vmap():
    rng = np.random.default_rng(4)
    db, q = _unit(rng, 30), _unit(rng, 2)
    states = [SUPERGLOBAL.build(db, SuperGlobalConfig(m=10, k=3, beta=b)) for b in (0.0, 0.5)]
    assert jax.tree_util.tree_structure(states[0]) == jax.tree_util.tree_structure(states[1])
    assert states[1].config == SuperGlobalConfig(m=10, k=3, beta=0.5)
    jitted = jax.jit(lambda s, x: SUPERGLOBAL.search(s, x))
    grid = jax.vmap(lambda b: jitted(dataclasses.replace(states[0], beta=b), q))(jnp.array([0.0, 0.5]))
    for g, s in zip(grid, states):
        np.testing.assert_allclose(np.asarray(g), np.asarray(SUPERGLOBAL.search(s, q)), atol=1e-6)
    # the kernel under vmap over shortlists
    x = jnp.asarray(np.stack([_unit(rng, 8), _unit(rng, 8)]))
    batched = jax.vmap(lambda v: refine_shortlist(v, 2, 0.15))(x)
    np.testing.assert_allclose(np.asarray(batched[1]), _np_refine(np.asarray(x[1]), 2, 0.15), atol=2e-6)


@pytest.mark.parametrize("call, match", [
    (lambda db: SuperGlobalConfig(m=0), "SuperGlobalConfig.m must be a positive int"),
    (lambda db: SuperGlobalConfig(m=5, k=5), "k = 5 must be < SuperGlobalConfig.m = 5"),
    (lambda db: SuperGlobalConfig(beta=-0.1), "beta must be a finite number >= 0"),
    (lambda db: SuperGlobalConfig(beta=float("inf")), "finite"),
    (lambda db: SUPERGLOBAL.build(db, SuperGlobalConfig()), "m = 400 shortlist items need a database"),
    (lambda db: SUPERGLOBAL.build(db, SuperGlobalConfig(m=30, k=3)), "choose SuperGlobalConfig.m <= 29"),
    (lambda db: superglobal_rerank(db[:2], db, 31, 3), "choose m <= 30"),
    (lambda db: superglobal_rerank(db[:2], db, 10, 10), "need k < m"),
    (lambda db: superglobal_rerank(db[:2, :3], db, 10, 3), "dimension mismatch"),
    (lambda db: SUPERGLOBAL.search(SUPERGLOBAL.build(db, SuperGlobalConfig(m=10, k=3)), db[:, :3]),
     "dimension mismatch"),
    (lambda db: SUPERGLOBAL.search_items(SUPERGLOBAL.build(db, SuperGlobalConfig(m=10, k=3)), [30]),
     r"ids must lie in \[0, 30\)"),
])
def test_validation_errors(call, match):
    db = _unit(np.random.default_rng(0), 30)
    with pytest.raises((ValueError, TypeError), match=match):
        call(db)
