"""k-reciprocal re-ranking refuses descriptors that are not L2-normalised (its weights
exp(-(2 - 2 <q, x>)) overflow to NaN scores on raw descriptors), and stays jittable."""
import jax
import numpy as np
import pytest

from conftest import unit_clusters
from retrieval_jax.methods.k_reciprocal import K_RECIPROCAL, UNIT_NORM_TOL, KReciprocalConfig

CFG = KReciprocalConfig(k1=5, k2=3, shortlist=20, capacity=16, qe_capacity=32)


@pytest.fixture(scope="module")
def unit():
    return unit_clusters(0, 40, 8, 4, 0.3)[0]


@pytest.fixture(scope="module")
def state(unit):
    return K_RECIPROCAL.build(unit, CFG)


def test_unnormalised_database_is_refused_with_a_clear_message(unit):
    with pytest.raises(ValueError, match=r"L2-normalised.*row 0.*l2_normalize"):
        K_RECIPROCAL.build(np.abs(unit) * 3, CFG)       # raw ReLU-like descriptors: all-NaN scores before


def test_integer_database_is_refused_unless_its_rows_are_unit(state, unit):   # state: compiled first
    counts = np.random.default_rng(0).integers(0, 5, size=(40, 8))
    with pytest.raises(ValueError, match="L2-normalised"):
        K_RECIPROCAL.build(counts, CFG)                 # a NaN state before
    one_hot = np.eye(8, dtype=np.int64)[np.arange(40) % 8]
    scores = K_RECIPROCAL.search(K_RECIPROCAL.build(one_hot, CFG), np.eye(8, dtype=np.float32)[:2])
    assert np.isfinite(np.asarray(scores)).all()


@pytest.mark.parametrize("scale", [50.0, 1000.0, 0.5])
def test_scaled_queries_are_refused(state, unit, scale):
    with pytest.raises(ValueError, match="queries"):
        K_RECIPROCAL.search(state, unit[:3] * scale)


def test_near_unit_rows_pass_and_give_finite_scores(state, unit):
    q = unit[:3] * np.float32(1 + UNIT_NORM_TOL / 2)
    assert np.isfinite(np.asarray(K_RECIPROCAL.search(state, q))).all()
    half = unit[:3].astype(np.float16)                  # stored in half precision
    assert np.isfinite(np.asarray(K_RECIPROCAL.search(state, half))).all()


def test_other_query_errors_come_first_and_jit_still_works(state, unit):
    with pytest.raises(ValueError, match="dimension mismatch"):
        K_RECIPROCAL.search(state, unit[:2, :4] * 5)
    with pytest.raises(ValueError, match="NaN"):
        K_RECIPROCAL.search(state, np.full((1, 8), np.nan, np.float32))
    eager = K_RECIPROCAL.search(state, unit[:4])
    jitted = jax.jit(K_RECIPROCAL.search)(state, unit[:4])    # traced queries: no value check
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
