"""base.top_k_scores / top_similar: the shortlist's top-k behind an optimisation barrier. Values and
ids against numpy's sort, the barrier present in the traced program, and jit / vmap / grad through it."""
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.methods.base import top_k_scores, top_similar


def _data(nq=5, n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(nq, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def test_top_similar_matches_numpy():
    q, db = _data()
    sims = q.astype(np.float64) @ db.T.astype(np.float64)
    s, i = jax.jit(top_similar, static_argnames="k")(q, db, k=7)
    want = np.argsort(-sims, axis=1)[:, :7]
    np.testing.assert_array_equal(np.asarray(i), want)
    np.testing.assert_allclose(np.asarray(s), np.take_along_axis(sims, want, axis=1), rtol=1e-5, atol=1e-5)


def test_exclude_leaves_the_item_out():
    q, db = _data()
    exclude = np.array([3, 0, 39, 3, 17])
    q = db[exclude] + 1e-3                      # each query's nearest is its excluded item
    _, i = top_similar(q, db, 5, jnp.asarray(exclude))
    assert not np.any(np.asarray(i) == exclude[:, None])
    sims = q.astype(np.float64) @ db.T.astype(np.float64)
    sims[np.arange(5), exclude] = -np.inf
    np.testing.assert_array_equal(np.asarray(i), np.argsort(-sims, axis=1)[:, :5])


def test_top_k_scores_is_lax_top_k_behind_a_barrier():
    q, db = _data(nq=4, n=50)
    scores = jnp.asarray(q @ db.T)
    got = jax.jit(top_k_scores, static_argnames="k")(scores, k=9)
    want = jax.lax.top_k(scores, 9)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "optimization_barrier" in str(jax.make_jaxpr(lambda x: top_k_scores(x, 9))(scores))


def test_vmap_and_grad_pass_the_barrier():
    q, db = _data()
    batched = jax.vmap(lambda row: top_similar(row[None], db, 4))(q)
    s, i = top_similar(q, db, 4)
    np.testing.assert_array_equal(np.asarray(batched[1][:, 0]), np.asarray(i))
    np.testing.assert_allclose(np.asarray(batched[0][:, 0]), np.asarray(s), rtol=1e-6)
    # d/dq of the sum of the top-4 similarities: the sum of those 4 database items
    g = jax.grad(lambda x: jnp.sum(top_similar(x, db, 4)[0]))(jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(g), db[np.asarray(i)].sum(axis=1), rtol=1e-5, atol=1e-5)
