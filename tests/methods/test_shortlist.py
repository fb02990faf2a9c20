"""`rerank_shortlist`: the shortlist first in its new order, the rest after it in the first order."""
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.methods.base import rerank_shortlist


def test_shortlist_ranks_first_in_its_new_order_rest_keeps_first_order():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 30)).astype(np.float32)
    shortlist = np.argsort(-scores, axis=1)[:, :7]
    new = rng.normal(size=(5, 7)).astype(np.float32)
    out = np.asarray(jax.jit(rerank_shortlist)(scores, shortlist, new))
    for q in range(5):
        order = np.argsort(-out[q], kind="stable")
        np.testing.assert_array_equal(order[:7], shortlist[q][np.argsort(-new[q], kind="stable")])
        rest = [j for j in np.argsort(-scores[q], kind="stable") if j not in set(shortlist[q])]
        np.testing.assert_array_equal(order[7:], rest)
        np.testing.assert_allclose(out[q, shortlist[q]], new[q])


def test_shortlist_under_vmap_matches_rows():
    scores = jnp.arange(12.0).reshape(2, 6)
    shortlist = jnp.array([[5, 4], [0, 1]])
    new = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    batched = jax.vmap(lambda s, i, v: rerank_shortlist(s[None], i[None], v[None])[0])(scores, shortlist, new)
    np.testing.assert_allclose(batched, rerank_shortlist(scores, shortlist, new))
