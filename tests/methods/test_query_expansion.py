"""AQE, AQEwD, alpha-QE and DBA against a straightforward numpy implementation; laws; Method API; validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_jax.data import load_digits
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import label_map
from retrieval_jax.methods import KNN_SEARCH, KnnConfig
from retrieval_jax.methods.query_expansion import (ALPHA_QE, AQE, AQEWD, DBA_ALPHA_QE, AlphaQEConfig, AqeConfig,
                                                   AqewdConfig, DbaQEConfig, alpha_query_expansion, alpha_weights,
                                                   average_query_expansion, database_augmentation,
                                                   decay_query_expansion, decay_weights, expand, expand_weighted)


def _unit(rng, n, d=12):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _np_expand(v, db, n, alpha, exclude=None):
    """Reference: normalise(v + sum over top-n of max(s, 0)^alpha x), one vector at a time."""
    out = []
    for j, x in enumerate(v.astype(np.float64)):
        s = db.astype(np.float64) @ x
        if exclude is not None:
            s[exclude[j]] = -np.inf
        top = np.argsort(-s, kind="stable")[:n]
        y = x + sum(max(s[i], 0.0) ** alpha * db[i].astype(np.float64) for i in top)
        out.append(y / np.linalg.norm(y))
    return np.array(out)


def _np_rank_expand(v, db, n, decay, exclude=None):
    """Reference AQE / AQEwD from the papers' definitions: the query at weight 1, the i-th nearest
    (i = 0..n-1) at weight 1 (AQE) or (n - i) / n (AQEwD), then L2-normalised; one vector at a time."""
    out = []
    for j, x in enumerate(v.astype(np.float64)):
        s = db.astype(np.float64) @ x
        if exclude is not None:
            s[exclude[j]] = -np.inf
        top = np.argsort(-s, kind="stable")[:n]
        y = x.copy()
        for rank, i in enumerate(top):
            y += ((n - rank) / n if decay else 1.0) * db[i].astype(np.float64)
        out.append(y / np.linalg.norm(y))
    return np.array(out)


# ----------------------------------------------------------------------------- laws
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([2, 6]))
def test_law_aqe_zero_is_knn_and_decay_one_is_aqe_one(seed, n):
    rng = np.random.default_rng(seed)
    db, q = _unit(rng, 20), _unit(rng, 3)
    # n = 0: no expansion, q' = q: the kNN scores
    np.testing.assert_allclose(np.asarray(average_query_expansion(q, db, 0)), q, atol=1e-6)
    np.testing.assert_allclose(np.asarray(decay_query_expansion(q, db, 0)), q, atol=1e-6)
    # AQEwD with n = 1 weighs its one neighbour 1 / 1: AQE with n = 1
    np.testing.assert_allclose(np.asarray(decay_query_expansion(q, db, 1)),
                               np.asarray(average_query_expansion(q, db, 1)), atol=1e-6)
    # alpha-QE with alpha = 0 is AQE (0^0 = 1), whatever n
    np.testing.assert_allclose(np.asarray(alpha_query_expansion(q, db, n, 0.0)),
                               np.asarray(average_query_expansion(q, db, n)), atol=1e-6)


def test_decay_weights_by_hand_and_aqewd_two_neighbours():
    np.testing.assert_allclose(np.asarray(decay_weights(4)), [1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(np.asarray(decay_weights(1)), [1.0])
    assert decay_weights(0).shape == (0,)
    # q = e1, nearest x1 = (0.8, 0.6), then x2 = (0.6, -0.8): q' ~ q + 1 x1 + 0.5 x2 = (2.1, 0.2)
    q = np.array([[1.0, 0.0]], np.float32)
    db = np.array([[0.8, 0.6], [0.6, -0.8], [-1.0, 0.0]], np.float32)
    ref = np.array([2.1, 0.2]) / np.hypot(2.1, 0.2)
    np.testing.assert_allclose(np.asarray(decay_query_expansion(q, db, 2))[0], ref, atol=1e-6)
    ref = np.array([2.4, -0.2]) / np.hypot(2.4, -0.2)  # AQE: q + x1 + x2
    np.testing.assert_allclose(np.asarray(average_query_expansion(q, db, 2))[0], ref, atol=1e-6)


@pytest.mark.parametrize("n", [0, 5])
def test_aqe_and_aqewd_methods_match_numpy(n):
    rng = np.random.default_rng(20 + n)
    db, q = _unit(rng, 50), _unit(rng, 5)
    ids = np.array([0, 7, 49])
    for method, cfg, decay in ((AQE, AqeConfig(n=n), False), (AQEWD, AqewdConfig(n=n), True)):
        state = method.build(db, cfg)
        np.testing.assert_allclose(np.asarray(method.search(state, q)), _np_rank_expand(q, db, n, decay) @ db.T,
                                   atol=3e-6)
        ref = _np_rank_expand(db[ids], db, n, decay, exclude=ids) @ db.T  # the item is no neighbour of itself
        np.testing.assert_allclose(np.asarray(method.search_items(state, ids)), ref, atol=3e-6)
    if n:
        np.testing.assert_allclose(np.asarray(average_query_expansion(q, db, n)), _np_rank_expand(q, db, n, False),
                                   atol=2e-6)
        np.testing.assert_allclose(np.asarray(decay_query_expansion(q, db, n)), _np_rank_expand(q, db, n, True),
                                   atol=2e-6)


def test_aqe_search_jits_and_weighted_expansion_vmaps_over_weights():
    rng = np.random.default_rng(5)
    db, q = _unit(rng, 40), _unit(rng, 4)
    for method, cfg in ((AQE, AqeConfig(n=3)), (AQEWD, AqewdConfig(n=5))):
        state = method.build(db, cfg)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        assert len(leaves) == 1 and jax.tree_util.tree_unflatten(treedef, leaves).config == cfg
        jitted = jax.jit(lambda s, x, m=method: m.search(s, x))
        np.testing.assert_allclose(np.asarray(jitted(state, q)), np.asarray(method.search(state, q)), atol=1e-6)
    s = q @ db.T
    idx = np.argsort(-s, axis=1)[:, :4]
    grid = jnp.stack([jnp.ones((4, 4)), jnp.broadcast_to(decay_weights(4), (4, 4))])
    out = jax.vmap(lambda w: expand_weighted(q, w, idx, db))(grid)
    np.testing.assert_allclose(np.asarray(out[0]), _np_rank_expand(q, db, 4, False), atol=2e-6)
    np.testing.assert_allclose(np.asarray(out[1]), _np_rank_expand(q, db, 4, True), atol=2e-6)


@pytest.mark.parametrize("n, alpha", [(1, 3.0), (5, 3.0), (7, 0.0), (4, 1.5)])
def test_alpha_qe_matches_numpy(n, alpha):
    rng = np.random.default_rng(n)
    db, q = _unit(rng, 60), _unit(rng, 9)
    got = np.asarray(alpha_query_expansion(q, db, n, alpha))
    np.testing.assert_allclose(got, _np_expand(q, db, n, alpha), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("n, alpha", [(3, 3.0), (10, 0.5)])
def test_dba_matches_numpy(n, alpha):
    rng = np.random.default_rng(10 + n)
    db = _unit(rng, 50)
    got = np.asarray(database_augmentation(db, n, alpha))
    ref = _np_expand(db, db, n, alpha, exclude=np.arange(50))
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_alpha_zero_is_average_qe_and_negative_sims_get_no_weight():
    x = np.array([[1.0, 0.0]], np.float32)
    db = np.array([[0.6, 0.8], [-1.0, 0.0], [0.0, 1.0]], np.float32)
    sims = x @ db.T
    idx = np.argsort(-sims, axis=1)
    s_sorted = np.take_along_axis(sims, idx, 1)
    # alpha = 0 is average QE: every one of the top-n has weight 1 (0^0 = 1)
    out = np.asarray(expand(x, s_sorted, idx, db, 0.0))
    ref = x[0] + db.sum(axis=0)
    np.testing.assert_allclose(out[0], ref / np.linalg.norm(ref), atol=1e-6)
    # alpha > 0: s <= 0 gets weight 0
    out = np.asarray(expand(x, s_sorted, idx, db, 2.0))
    ref = x[0] + 0.36 * db[0]
    np.testing.assert_allclose(out[0], ref / np.linalg.norm(ref), atol=1e-6)
    np.testing.assert_allclose(np.asarray(alpha_weights([[0.5, -0.5]], 2.0)), [[0.25, 0.0]])


def test_methods_match_reference_and_items_exclude_self():
    rng = np.random.default_rng(3)
    db, q = _unit(rng, 80), _unit(rng, 6)
    state = ALPHA_QE.build(db, AlphaQEConfig(n=4, alpha=3.0))
    scores = np.asarray(ALPHA_QE.search(state, q))
    np.testing.assert_allclose(scores, _np_expand(q, db, 4, 3.0) @ db.T, atol=3e-6)
    ids = np.array([0, 5, 79])
    items = np.asarray(ALPHA_QE.search_items(state, ids))
    ref = _np_expand(db[ids], db, 4, 3.0, exclude=ids) @ db.T
    np.testing.assert_allclose(items, ref, atol=3e-6)

    dstate = DBA_ALPHA_QE.build(db, DbaQEConfig(dba_n=3, qe_n=2, alpha=2.0))
    aug = _np_expand(db, db, 3, 2.0, exclude=np.arange(80))
    np.testing.assert_allclose(np.asarray(dstate.database), aug, atol=3e-6)
    np.testing.assert_allclose(np.asarray(DBA_ALPHA_QE.search(dstate, q)),
                               _np_expand(q, aug, 2, 2.0) @ aug.T, atol=3e-6)
    np.testing.assert_allclose(np.asarray(DBA_ALPHA_QE.search_items(dstate, ids)),
                               _np_expand(aug[ids], aug, 2, 2.0, exclude=ids) @ aug.T, atol=3e-6)
    dba_only = DBA_ALPHA_QE.build(db, DbaQEConfig(dba_n=3, qe_n=0, alpha=2.0))
    np.testing.assert_allclose(np.asarray(DBA_ALPHA_QE.search(dba_only, q)), q @ aug.T, atol=3e-6)


def test_state_is_pytree_with_static_config_and_search_jits():
    rng = np.random.default_rng(4)
    db, q = _unit(rng, 40), _unit(rng, 3)
    for method, cfg in ((ALPHA_QE, AlphaQEConfig(n=3)), (DBA_ALPHA_QE, DbaQEConfig(3, 3, 3.0))):
        state = method.build(db, cfg)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        assert len(leaves) == 1
        again = jax.tree_util.tree_unflatten(treedef, leaves)
        assert again.config == cfg
        f = jax.jit(method.search)
        np.testing.assert_allclose(np.asarray(f(state, q)), np.asarray(method.search(state, q)),
                                   atol=1e-6)
        assert method.search(state, q).dtype == np.float32


@pytest.mark.slow  # end to end: make test-slow
def test_qe_improves_knn_on_digits():
    data = load_digits()
    full = np.arange(len(data.X))

    def score(method, cfg):
        s = np.asarray(method.search_items(method.build(data.X, cfg), full))
        return label_map(ranking_from_scores(s, exclude=full), data.labels)

    knn_map = score(KNN_SEARCH, KnnConfig())
    qe_map = score(ALPHA_QE, AlphaQEConfig(n=5))
    dba_map = score(DBA_ALPHA_QE, DbaQEConfig(dba_n=5, qe_n=5))
    assert qe_map > knn_map + 0.01 and dba_map > knn_map + 0.01, (knn_map, qe_map, dba_map)
    aqe_map, aqewd_map = score(AQE, AqeConfig()), score(AQEWD, AqewdConfig())
    assert aqe_map > knn_map + 0.01 and aqewd_map > knn_map + 0.01, (knn_map, aqe_map, aqewd_map)


@pytest.mark.parametrize("call, match", [
    (lambda db: alpha_query_expansion(db[:2], db, 30), "n = 30 neighbours"),
    (lambda db: alpha_query_expansion(db[:2], db, 0), "positive"),
    (lambda db: alpha_query_expansion(db[:2], db, 2, -1.0), "alpha must be a finite exponent >= 0"),
    (lambda db: alpha_query_expansion(db[:2], db, 2, float("nan")), "finite exponent"),
    (lambda db: alpha_query_expansion(db[:2, :5], db, 2), "dimension mismatch"),
    (lambda db: database_augmentation(db, 30), "choose n <= 29"),
    (lambda db: ALPHA_QE.build(db, AlphaQEConfig(n=30)), "AlphaQEConfig.n = 30"),
    (lambda db: DBA_ALPHA_QE.build(db, DbaQEConfig(dba_n=31)), "dba_n = 31"),
    (lambda db: DBA_ALPHA_QE.build(db, DbaQEConfig(qe_n=40)), "qe_n = 40"),
    (lambda db: AlphaQEConfig(alpha=-2), "alpha must be a finite exponent"),
    (lambda db: AlphaQEConfig(n=0), "positive int"),
    (lambda db: DbaQEConfig(qe_n=-1), "qe_n must be an int >= 0"),
    (lambda db: AqeConfig(n=-1), "AqeConfig.n must be an int >= 0"),
    (lambda db: AqewdConfig(n=2.5), "AqewdConfig.n must be an int >= 0"),
    (lambda db: AQE.build(db, AqeConfig(n=30)), "AqeConfig.n = 30"),
    (lambda db: AQEWD.build(db, AqewdConfig(n=31)), "AqewdConfig.n = 31"),
    (lambda db: AQE.build(db, AqewdConfig()), "AqeConfig"),
    (lambda db: average_query_expansion(db[:2], db, 30), "n = 30 neighbours"),
    (lambda db: decay_query_expansion(db[:2, :5], db, 2), "dimension mismatch"),
    (lambda db: AQEWD.search_items(AQEWD.build(db, AqewdConfig(n=2)), [-1]), r"ids must lie in \[0, 30\)"),
    (lambda db: ALPHA_QE.search(ALPHA_QE.build(db, AlphaQEConfig(n=2)), db[:, :3]),
     "dimension mismatch"),
    (lambda db: ALPHA_QE.search_items(ALPHA_QE.build(db, AlphaQEConfig(n=2)), [30]),
     r"ids must lie in \[0, 30\)"),
])
def test_validation_errors(call, match):
    db = _unit(np.random.default_rng(0), 30)
    with pytest.raises((ValueError, TypeError), match=match):
        call(db)


def test_wrong_config_type_and_nonfinite_input():
    db = _unit(np.random.default_rng(0), 30)
    with pytest.raises(TypeError, match="AlphaQEConfig"):
        ALPHA_QE.build(db, DbaQEConfig())
    bad = db.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        database_augmentation(bad, 3)
