"""alpha-QE and DBA against a straightforward numpy implementation; Method API; validation."""
import jax
import numpy as np
import pytest

from retrieval_jax.data import load_digits
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import label_map
from retrieval_jax.methods import KNN_SEARCH, KnnConfig
from retrieval_jax.methods.query_expansion import (ALPHA_QE, DBA_ALPHA_QE, AlphaQEConfig, DbaQEConfig,
                                           alpha_query_expansion, alpha_weights,
                                           database_augmentation, expand)


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
