"""Each input is checked once, at the public entry: one scan of the database per build,
one scan of the queries per search, whatever the build passes them through."""
import numpy as np
import pytest

from retrieval_jax import _checks
from retrieval_jax.methods import DIFFUSION, FSR, OFFLINE_DIFFUSION, DiffusionConfig, FsrConfig, OfflineDiffusionConfig


def _data(seed=0, n=80, d=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def scans(monkeypatch):
    """Counts of `_checks.scan_rows` calls by the name of the scanned matrix."""
    counts = {}
    real = _checks.scan_rows

    def counting(arr, name, **kw):
        counts[name] = counts.get(name, 0) + 1
        return real(arr, name, **kw)
    monkeypatch.setattr(_checks, "scan_rows", counting)
    return counts


@pytest.mark.parametrize("method, config", [
    (DIFFUSION, DiffusionConfig(k=5, query_k=4)),
    (DIFFUSION, DiffusionConfig(k=5, query_k=4, solver="auto")),
    (FSR, FsrConfig(k=5, query_k=4, rank=10)),
    (OFFLINE_DIFFUSION, OfflineDiffusionConfig(k=5, query_k=4, truncate=20)),
])
def test_one_database_scan_per_build_and_one_query_scan_per_search(scans, method, config):
    x = _data()
    state = method.build(x, config)
    assert sum(scans.values()) == 1, scans
    scans.clear()
    method.search(state, _data(1, n=3))
    assert sum(scans.values()) == 1, scans


def test_a_scanned_matrix_is_scanned_again_when_it_is_another_array(scans):
    x = _data()
    a = _checks.as_matrix(x, "database")
    assert _checks.as_matrix(a, "database") is a        # the checked view itself: no second scan
    assert sum(scans.values()) == 1
    _checks.as_matrix(x, "database")                    # the caller's own array: scanned again
    _checks.as_matrix(a[:10], "database")               # a slice is another array
    assert sum(scans.values()) == 3
    y = x.copy()
    checked = _checks.as_matrix(y, "database")
    y[3] = np.nan                                        # the caller changed its array: found
    with pytest.raises(ValueError, match="NaN"):
        _checks.as_matrix(y, "database")
    assert checked.base is y or checked.base is y.base


def test_a_nan_database_is_still_refused_at_the_entry():
    x = _data()
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match="database has NaN"):
        DIFFUSION.build(x, DiffusionConfig(k=5, query_k=4))
