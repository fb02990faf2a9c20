"""Pooling, l2_normalize and whitening refuse what would silently become NaN or garbage
(NaN / inf maps, complex maps, non-positive array parameters, eps <= 0), with clear errors
on concrete input, and still trace under jit / vmap / grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.descriptors import (Whitening, apply_whitening, combine_scales, crow, crow_weights, gem,
                                       l2_normalize, learn_pca_whitening, mac, rmac, rmac_regions, spoc)

POOLINGS = [mac, spoc, gem, rmac, crow, rmac_regions, crow_weights]


def _map(shape=(2, 5, 6, 4), seed=0):
    return np.abs(np.random.default_rng(seed).standard_normal(shape)).astype(np.float32) + 0.01


@pytest.fixture(scope="module")
def wt():
    return learn_pca_whitening(np.random.default_rng(0).standard_normal((30, 4)), dim=3)


@pytest.mark.parametrize("pool", POOLINGS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_map_is_refused(pool, bad):
    x = _map()
    x[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match=r"x has 1 NaN or inf value\(s\) \(first at index \(1, 2, 3, 0\)\)"):
        pool(x)


@pytest.mark.parametrize("pool", [mac, spoc, gem, crow], ids=lambda f: f.__name__)
def test_nan_at_a_masked_out_position_is_allowed(pool):
    x = _map()
    mask = np.ones(x.shape[:3], bool)
    mask[0, 0, 0] = False
    x[0, 0, 0, :] = np.nan                               # padding never contributes
    assert np.isfinite(np.asarray(pool(x, mask=mask))).all()


@pytest.mark.parametrize("fn", [mac, gem, rmac, crow, l2_normalize, lambda x: combine_scales([x, x])],
                         ids=["mac", "gem", "rmac", "crow", "l2_normalize", "combine_scales"])
def test_complex_input_is_refused(fn):
    x = _map().astype(np.complex64) * (1 + 1j)           # the imaginary part was dropped silently
    with pytest.raises(TypeError, match="complex"):
        fn(x)


@pytest.mark.parametrize("p", [jnp.array(-1.0), jnp.array(0.0), jnp.array(np.nan), jnp.array(np.inf),
                               np.array([3.0, 3.0, -1.0, 3.0]), jnp.array([0.0])])
def test_gem_array_p_must_be_positive_and_finite(p):
    with pytest.raises(ValueError, match="GeM power p must be positive and finite"):
        gem(_map(), p=p)


def test_gem_p_shape_type_and_valid_arrays():
    x = _map()
    with pytest.raises(ValueError, match=r"one power per channel \(C = 4\)"):
        gem(x, p=jnp.array([3.0, 3.0]))
    with pytest.raises(TypeError, match="positive number"):
        gem(x, p=None)
    with pytest.raises(ValueError, match="eps must be positive"):
        gem(x, eps=jnp.array(0.0))
    np.testing.assert_allclose(gem(x, p=jnp.array(3.0)), gem(x, p=3.0), rtol=1e-6)
    np.testing.assert_allclose(gem(x, p=jnp.full(4, 3.0)), gem(x, p=3.0), rtol=1e-6)


def test_crow_array_parameters_are_checked():
    with pytest.raises(ValueError, match="CroW a must be positive"):
        crow(_map(), a=jnp.array(-1.0))
    with pytest.raises(ValueError, match="eps must be positive"):
        rmac(_map(), eps=0.0)


@pytest.mark.parametrize("eps", [0.0, -1.0, np.nan, jnp.array(0.0)])
def test_l2_normalize_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps must be positive and finite"):
        l2_normalize(np.zeros((1, 3)), eps=eps)          # eps = 0: a NaN row before


def test_l2_normalize_other_bad_input():
    np.testing.assert_array_equal(l2_normalize(np.zeros((1, 3))), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        l2_normalize(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="axis = 5 is out of range"):
        l2_normalize(np.ones((2, 3)), axis=5)
    with pytest.raises(ValueError, match="NaN or inf"):
        combine_scales([np.ones((2, 3)), np.full((2, 3), np.inf)])


def test_whitening_bad_input(wt):
    X = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="X has 4 NaN or inf"):
        apply_whitening(wt, np.full((1, 4), np.nan))
    with pytest.raises(TypeError, match="swapped"):
        apply_whitening(X, wt)
    with pytest.raises(TypeError, match="must be a Whitening"):
        apply_whitening("x", X)
    nan_mean = Whitening(mean=jnp.full(4, jnp.nan), projection=wt.projection)
    with pytest.raises(ValueError, match="whitening.mean has 4 NaN"):
        apply_whitening(nan_mean, X)
    with pytest.raises(ValueError, match="whitening.mean has 4 NaN"):
        rmac(_map(), whitening=nan_mean)
    with pytest.raises(TypeError, match="must be a Whitening"):
        rmac(_map(), whitening="x")
    with pytest.raises(TypeError, match="complex"):
        apply_whitening(wt, X.astype(np.complex64))
    assert apply_whitening(wt, X).shape == (3, 3)


def test_still_traces_under_jit_vmap_and_grad(wt):
    x = _map()
    # values of traced inputs cannot be read: jit passes them through unchecked
    assert jax.jit(mac)(x).shape == (2, 4)
    np.testing.assert_allclose(jax.jit(lambda a, p: gem(a, p=p))(x, 3.0), gem(x, p=3.0), rtol=1e-5)
    assert jax.vmap(lambda a: rmac(a[None], whitening=wt)[0])(x).shape == (2, 3)
    assert jax.jit(lambda v: apply_whitening(wt, v))(np.ones((2, 4), np.float32)).shape == (2, 3)


def test_still_differentiable(wt):
    x = _map()
    g = jax.grad(lambda p: gem(x, p=p).sum())(jnp.float32(3.0))
    assert np.isfinite(float(g))
    gx = jax.grad(lambda a: l2_normalize(a, eps=jnp.float32(1e-6)).sum())(jnp.zeros((2, 3)))
    assert np.isfinite(np.asarray(gx)).all()
