"""Mining on manifolds (Iscen et al., CVPR 2018): the mined sets against their definitions,
computed by brute force in numpy from a dense inverse; anchors; the weighted losses; training."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retrieval_jax.graph import knn_graph
from retrieval_jax.training import finetune_mined, mine_on_manifold
from retrieval_jax.training.finetune import embed_with_head, init_head
from retrieval_jax.training.mining import (random_walk_anchors, stationary_distribution,
                                           weighted_contrastive_loss, weighted_triplet_loss)
from retrieval_jax.training.step import make_train_step


# ----------------------------------------------------------------------------- numpy references
def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n=60, d=8, seed=0):
    return _unit(np.random.default_rng(seed).normal(size=(n, d)))


def _blobs(seed=1):
    """Two far-apart clusters (40 and 20 items): a mutual kNN graph of two components or more."""
    rng = np.random.default_rng(seed)
    c = np.eye(8)[:2] * 3.0
    x = np.concatenate([c[0] + rng.normal(size=(40, 8)), c[1] + rng.normal(size=(20, 8))])
    return _unit(x)


def _np_affinity(X, k, gamma=3.0):
    """Mutual kNN affinity from the paper's definition (dense, float64)."""
    X = X.astype(np.float64)
    s = X @ X.T
    n = len(X)
    nn = np.zeros((n, n), bool)
    for i in range(n):
        order = [j for j in np.argsort(-s[i], kind="stable") if j != i]
        nn[i, order[:k]] = True
    return np.where(nn & nn.T, np.maximum(s, 0) ** gamma, 0.0)


def _np_manifold(A, alpha=0.99):
    """Column q of (I - alpha W)^-1, W = D^-1/2 A D^-1/2: the manifold similarities of q."""
    d = A.sum(1)
    inv = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)
    W = inv[:, None] * A * inv[None, :]
    return np.linalg.inv(np.eye(len(A)) - alpha * W)


def _np_sets(X, A, q, pos_k, neg_k, P, N, pool):
    """(P+ ids, their manifold sims, P- ids) of anchor q, from eq. 6 of the paper."""
    sm = _np_manifold(A)[:, q]
    se = X.astype(np.float64) @ X[q].astype(np.float64)
    others = [j for j in range(len(X)) if j != q and pool[j]]
    eucl = sorted(others, key=lambda j: -se[j])
    mani = sorted([j for j in others if sm[j] > 0], key=lambda j: -sm[j])
    pos = [j for j in mani[:pos_k] if j not in set(eucl[:pos_k])][:P]
    neg = [j for j in eucl[:neg_k] if j not in set(mani[:neg_k])][:N]
    return pos, sm[pos], neg


def _np_anchors(A, num):
    """Largest component, stationary vector of D^-1 A by eigen-decomposition, strict 1-hop maxima."""
    n = len(A)
    comp, seen = [], np.zeros(n, bool)
    for s in range(n):                     # components by breadth-first search
        if seen[s]:
            continue
        c, frontier = [], [s]
        seen[s] = True
        while frontier:
            i = frontier.pop()
            c.append(i)
            for j in np.flatnonzero(A[i]):
                if not seen[j]:
                    seen[j] = True
                    frontier.append(j)
        comp.append(sorted(c))
    big = max(comp, key=len)
    Ac = A[np.ix_(big, big)]
    P = Ac / Ac.sum(1, keepdims=True)
    evals, evecs = np.linalg.eig(P.T)
    pi = np.abs(np.real(evecs[:, np.argmin(np.abs(evals - 1))]))
    pi /= pi.sum()
    maxima = [a for a in range(len(big)) if all(pi[a] > pi[b] for b in np.flatnonzero(Ac[a]))]
    maxima.sort(key=lambda a: -pi[a])
    return [big[a] for a in maxima[:num]], big, pi


# ----------------------------------------------------------------------------- laws
@pytest.mark.parametrize("seed", [0, 3])
def test_positive_and_negative_sets_equal_their_definition(seed):
    X = _data(seed=seed)
    k, pos_k, neg_k, P, N = 6, 8, 12, 8, 8
    mined = mine_on_manifold(X, k=k, pos_k=pos_k, neg_k=neg_k, max_positives=P, max_negatives=N,
                             tol=1e-9, max_iter=300, batch_size=32)
    A = _np_affinity(X, k)
    assert mined.positives.shape == (60, P) and mined.negatives.shape == (60, N)
    np.testing.assert_array_equal(np.asarray(mined.anchors), np.arange(60))
    total_pos = 0
    for q in range(60):
        pos, sims, neg = _np_sets(X, A, q, pos_k, neg_k, P, N, np.ones(60, bool))
        pm, nm = np.asarray(mined.positive_mask[q]), np.asarray(mined.negative_mask[q])
        assert np.asarray(mined.positives[q])[pm].tolist() == pos, q
        np.testing.assert_allclose(np.asarray(mined.positive_similarity[q])[pm], sims, rtol=1e-3)
        assert np.asarray(mined.negatives[q])[nm].tolist() == neg, q
        assert not np.asarray(mined.positive_similarity[q])[~pm].any()
        total_pos += len(pos)
    assert total_pos > 60          # the sets are not trivially empty


def test_random_walk_anchors_are_the_strongest_local_maxima():
    X = _blobs()
    k = 5
    A = _np_affinity(X, k)
    want, big, pi = _np_anchors(A, 6)
    graph = knn_graph(X, k, mutual=True)
    got = random_walk_anchors(graph, 6, iterations=3000)
    assert got.tolist() == want
    r = np.asarray(stationary_distribution(graph, big, iterations=3000))
    np.testing.assert_allclose(r[big], pi, rtol=1e-3, atol=1e-6)
    assert np.all(r[np.setdiff1d(np.arange(len(X)), big)] == 0)


def test_random_walk_mining_stays_in_the_largest_component():
    X = _blobs()
    k, pos_k, neg_k = 5, 8, 12
    A = _np_affinity(X, k)
    anchors, big, _ = _np_anchors(A, 6)
    pool = np.zeros(len(X), bool)
    pool[big] = True
    assert pool.sum() < len(X)     # the data really has several components
    mined = mine_on_manifold(X, k=k, num_anchors=6, pos_k=pos_k, neg_k=neg_k, max_positives=8, max_negatives=8,
                             tol=1e-9, max_iter=300, batch_size=32, walk_iterations=3000)
    assert np.asarray(mined.anchors).tolist() == anchors
    for row, q in enumerate(anchors):
        pos, _, neg = _np_sets(X, A, q, pos_k, neg_k, 8, 8, pool)
        assert np.asarray(mined.positives[row])[np.asarray(mined.positive_mask[row])].tolist() == pos
        assert np.asarray(mined.negatives[row])[np.asarray(mined.negative_mask[row])].tolist() == neg


def test_weighted_losses_match_numpy():
    rng = np.random.default_rng(0)
    a, p = _unit(rng.normal(size=(5, 4))), _unit(rng.normal(size=(5, 4)))
    n = _unit(rng.normal(size=(15, 4))).reshape(5, 3, 4)
    w = rng.uniform(0.1, 2.0, size=5).astype(np.float32)
    mask = rng.uniform(size=(5, 3)) > 0.3
    mask[0] = False
    d_ap = ((a - p) ** 2).sum(-1)
    d_an = ((a[:, None] - n) ** 2).sum(-1)
    hinge = np.maximum(0.5 + d_ap[:, None] - d_an, 0)
    want = (mask * w[:, None] * hinge).sum() / mask.sum()
    got = weighted_triplet_loss(a, p, n, w, margin=0.5, mask=mask)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # unmasked, one negative each: the reference's mean of w_i [m + d_ap - d_an]_+
    want1 = np.mean(w * np.maximum(0.5 + d_ap - d_an[:, 0], 0))
    np.testing.assert_allclose(float(weighted_triplet_loss(a, p, n[:, 0], w, margin=0.5)), want1, rtol=1e-5)
    # contrastive: weighted positive pairs plus negative pairs, mean over valid pairs
    u = mask.any(1)
    neg = np.maximum(0.7 - np.sqrt(d_an), 0) ** 2
    want_c = ((u * w * d_ap).sum() + (mask * neg).sum()) / (u.sum() + mask.sum())
    got_c = weighted_contrastive_loss(a, p, n, w, margin=0.7, mask=mask)
    np.testing.assert_allclose(float(got_c), want_c, rtol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        weighted_triplet_loss(a, p, n, w[:3])
    with pytest.raises(ValueError, match="margin"):
        weighted_triplet_loss(a, p, n, w, margin=-1.0)


def _maps(n=60, seed=0):
    """Feature maps [n, 2, 2, 8] of 4 noisy 'objects' (non-negative, as after ReLU)."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 1, size=(4, 2, 2, 8))
    return np.abs(protos[np.arange(n) % 4] + 0.35 * rng.normal(size=(n, 2, 2, 8))).astype(np.float32)


def test_one_training_step_lowers_the_weighted_loss():
    maps = _maps()
    params = init_head(maps)
    mined = mine_on_manifold(np.asarray(embed_with_head(params, maps)), k=5, pos_k=8, neg_k=12,
                             max_positives=8, max_negatives=8, tol=1e-9, max_iter=300, batch_size=32)
    pm = np.asarray(mined.positive_mask)
    rows = np.flatnonzero(pm[:, 0])
    assert rows.size > 5
    batch = {"anchor": maps[np.asarray(mined.anchors)[rows]], "positive": maps[np.asarray(mined.positives)[rows, 0]],
             "negative": maps[np.asarray(mined.negatives)[rows]],
             "weight": np.asarray(mined.positive_similarity)[rows, 0], "mask": np.asarray(mined.negative_mask)[rows]}

    def objective(embed, b):
        p, k = b["negative"].shape[:2]
        f = embed(jnp.concatenate([b["anchor"], b["positive"], b["negative"].reshape((p * k, 2, 2, 8))]))
        return weighted_triplet_loss(f[:p], f[p:2 * p], f[2 * p:].reshape(p, k, -1), b["weight"], 0.5, b["mask"])

    opt = optax.sgd(0.05)
    step = make_train_step(embed_with_head, objective, opt)
    new, _, before = step(params, opt.init(params), batch)
    _, _, after = step(new, opt.init(new), batch)
    assert float(before) > 0 and float(after) < float(before)


@pytest.mark.slow  # end to end: make test-slow
def test_finetune_mined_trains_and_reports():
    maps = _maps()
    seen = []
    params, hist = finetune_mined(maps, epochs=2, steps_per_epoch=3, batch=8, negatives=2, k=5, pos_k=8, neg_k=12,
                                  max_positives=8, max_negatives=8, max_iter=300, lr=1e-2, remine=True,
                                  callback=lambda e, p: seen.append(e) or float(p["p"]))
    assert hist["loss"].shape == (6,) and hist["epoch_loss"].shape == (2,)
    assert np.isfinite(hist["loss"]).all() and seen == [0, 1] and len(hist["callback"]) == 2
    assert not np.allclose(np.asarray(params["proj"]), np.eye(8))
    assert hist["positives"][0] > 0


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors():
    X = _data(n=10)
    with pytest.raises(ValueError, match="at least 2 items"):
        mine_on_manifold(X[:1], k=1)
    bad = X.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mine_on_manifold(bad, k=3, pos_k=3, neg_k=3)
    with pytest.raises(ValueError, match="k must be an int with 1 <= k < n"):
        mine_on_manifold(X, k=10, pos_k=3)
    with pytest.raises(ValueError, match="pos_k = 10 must be smaller"):
        mine_on_manifold(X, k=3, pos_k=10, neg_k=3)
    with pytest.raises(ValueError, match="feature_maps"):
        finetune_mined(X)
    with pytest.raises(ValueError, match="negatives"):
        finetune_mined(_maps(12), k=3, pos_k=4, neg_k=4, max_negatives=2, negatives=3)
    with pytest.raises(ValueError, match="loss"):
        finetune_mined(_maps(12), loss="hinge")
