"""Losses, hard-negative mining, the train step and checkpoints."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retrieval_jax.descriptors.pooling import l2_normalize
from retrieval_jax.training import checkpoints, losses
from retrieval_jax.training import step as train_step


# ----------------------------------------------------------------------------- losses
def test_contrastive_hand_computed():
    a = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    b = np.array([[3.0, 4.0], [3.0, 4.0], [0.3, 0.4]], np.float32)  # distances 5, 5, 0.5
    t = np.array([1, 0, 0])
    # pair 0: 5^2 = 25; pair 1: [7 - 5]^2 = 4; pair 2: [7 - 0.5]^2 = 42.25
    np.testing.assert_allclose(losses.contrastive_loss(a, b, t, margin=7.0), (25 + 4 + 42.25) / 3,
                               rtol=1e-6)
    # margin 0.7: the far negative costs nothing, the near one (0.7 - 0.5)^2 = 0.04
    np.testing.assert_allclose(losses.contrastive_loss(a, b, t, margin=0.7), (25 + 0 + 0.04) / 3,
                               rtol=1e-5)
    # mask drops pair 0
    np.testing.assert_allclose(losses.contrastive_loss(a, b, t, margin=7.0, mask=[0, 1, 1]),
                               (4 + 42.25) / 2, rtol=1e-6)


def test_triplet_hand_computed():
    a = np.array([[0.0, 0.0], [0.0, 0.0]], np.float32)
    p = np.array([[2.0, 0.0], [2.0, 0.0]], np.float32)  # ||a - p||^2 = 4
    n = np.array([[0.0, 2.4], [0.0, 2.0]], np.float32)  # ||a - n||^2 = 5.76, 4
    # [1 + 4 - 5.76]_+ = 0, [1 + 4 - 4]_+ = 1  (unsquared distances would give 0.6 and 1)
    np.testing.assert_allclose(losses.triplet_loss(a, p, n, margin=1.0), 0.5, rtol=1e-6)
    nk = np.stack([n, n[::-1]], axis=1)  # [P, K=2, D]: both anchors see both negatives
    np.testing.assert_allclose(losses.triplet_loss(a, p, nk, margin=1.0), 0.5, rtol=1e-6)
    np.testing.assert_allclose(losses.triplet_loss(a, p, nk, margin=1.0, mask=[[1, 0], [1, 0]]),
                               0.5, rtol=1e-6)
    np.testing.assert_allclose(losses.triplet_loss(a, p, nk, margin=1.0, mask=[[0, 1], [1, 0]]),
                               1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="negative must be"):
        losses.triplet_loss(a, p, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="margin"):
        losses.triplet_loss(a, p, n, margin=-1.0)


def _np_contrastive(a, b, t, m):
    d = np.linalg.norm(a - b, axis=-1)
    return np.mean(t * d ** 2 + (1 - t) * np.maximum(m - d, 0) ** 2)


def test_contrastive_gradient_finite_differences():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4)) * 0.3
    b = rng.normal(size=(6, 4)) * 0.3
    t = np.array([1, 0, 1, 0, 0, 1], np.float64)
    m = 1.2
    assert np.any((np.linalg.norm(a - b, axis=1) < m) & (t == 0))  # an active hinge
    ga, gb = jax.grad(losses.contrastive_loss, argnums=(0, 1))(
        jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), t, m)
    h = 1e-6
    for arr, g, which in ((a, ga, 0), (b, gb, 1)):
        fd = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            args_p = (plus, b) if which == 0 else (a, plus)
            args_m = (minus, b) if which == 0 else (a, minus)
            fd[idx] = (_np_contrastive(*args_p, t, m) - _np_contrastive(*args_m, t, m)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-5)
    # identical descriptors: finite gradient (safe sqrt)
    g0 = jax.grad(losses.contrastive_loss)(jnp.ones((2, 3)), jnp.ones((2, 3)), np.array([0, 0]), 0.7)
    assert np.all(np.isfinite(g0))


def test_mine_hard_negatives_brute_force():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(7, 5)).astype(np.float32)
    P = rng.normal(size=(30, 5)).astype(np.float32)
    la = rng.integers(0, 4, 7)
    lp = rng.integers(0, 4, 30)
    sims, idx = losses.mine_hard_negatives(A, la, P, lp, 3)
    assert sims.shape == (7, 3) and idx.dtype == jnp.int32
    for i in range(7):
        cand = [j for j in range(30) if lp[j] != la[i]]
        s = {j: float(A[i].astype(np.float64) @ P[j]) for j in cand}
        best = sorted(cand, key=lambda j: -s[j])[:3]
        assert idx[i].tolist() == best
        np.testing.assert_allclose(sims[i], [s[j] for j in best], rtol=1e-5, atol=1e-6)
    # too few negatives: missing slots are -inf
    lp2 = np.zeros(30, int)
    lp2[:2] = 1
    s2, i2 = losses.mine_hard_negatives(A, np.zeros(7, int), P, lp2, 3)
    assert np.all(np.isfinite(s2[:, :2])) and np.all(np.isinf(s2[:, 2]))
    assert set(np.asarray(i2[:, :2]).ravel().tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="num must be"):
        losses.mine_hard_negatives(A, la, P, lp, 31)
    with pytest.raises(ValueError, match="labels"):
        losses.mine_hard_negatives(A, la[:3], P, lp, 2)


# ----------------------------------------------------------------------------- training
def _map_score(desc, labels):
    """Mean average precision, each item querying all others (self excluded)."""
    desc = np.asarray(desc, np.float64)
    sims = desc @ desc.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]
    rel = labels[order] == labels[:, None]
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, rel.shape[1] + 1)
    return float(np.mean(np.sum(prec * rel, axis=1) / np.maximum(rel.sum(axis=1), 1)))


def test_triplet_training_with_mined_negatives_raises_map():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    tr, te = perm[:900], perm[900:]
    mu = X[tr].mean(0)
    Xtr = jnp.asarray((X[tr] - mu) / 16.0, jnp.float32)
    Xte = jnp.asarray((X[te] - mu) / 16.0, jnp.float32)
    ytr, yte = y[tr], y[te]

    def embed_fn(params, feats):
        return l2_normalize(feats @ params["w"] + params["b"])

    params = {"w": jnp.asarray(rng.normal(size=(64, 16)) / 8.0, jnp.float32),
              "b": jnp.zeros((16,), jnp.float32)}
    optimizer = optax.adam(1e-2)
    step = train_step.make_train_step(embed_fn, train_step.triplet_objective(margin=0.2), optimizer)
    state = train_step.TrainState.create(params, optimizer)
    embed = jax.jit(embed_fn)
    before = _map_score(embed(params, Xte), yte)

    by_label = {c: np.flatnonzero(ytr == c) for c in range(10)}
    ytr_j = jnp.asarray(ytr)
    for _ in range(120):
        anchors = rng.choice(len(ytr), 64, replace=False)
        positives = np.array([rng.choice(by_label[ytr[a]][by_label[ytr[a]] != a]) for a in anchors])
        pool = embed(state.params, Xtr)  # current descriptors, mined on device
        sims, neg = losses.mine_hard_negatives(pool[anchors], ytr_j[anchors], pool, ytr_j, 4)
        batch = {"anchor": Xtr[anchors], "positive": Xtr[positives], "negative": Xtr[neg],
                 "mask": jnp.isfinite(sims)}
        state, _ = state.apply(step, batch)
    after = _map_score(embed(state.params, Xte), yte)
    assert int(state.step) == 120
    print(f"held-out mAP: initial head {before:.3f}, trained {after:.3f}")
    assert after > before + 0.1, (before, after)
    assert after > _map_score(l2_normalize(Xte), yte) + 0.05  # beats the raw pixels too


def test_train_step_contrastive_and_errors():
    def embed_fn(params, feats):
        return feats @ params

    opt = optax.sgd(0.1)
    step = train_step.make_train_step(embed_fn, train_step.contrastive_objective(margin=1.0), opt)
    params = jnp.eye(3, dtype=jnp.float32)
    batch = {"a": jnp.eye(3), "b": jnp.eye(3)[::-1], "target": jnp.array([1, 0, 1])}
    p1, _, l1 = step(params, opt.init(params), batch)
    # independent check of one SGD step: loss and update from jax.grad of the plain loss
    def ref(p):
        return losses.contrastive_loss(batch["a"] @ p, batch["b"] @ p, batch["target"], 1.0)
    np.testing.assert_allclose(l1, ref(params), rtol=1e-6)
    np.testing.assert_allclose(p1, params - 0.1 * jax.grad(ref)(params), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="embed_fn"):
        train_step.make_train_step(None, train_step.contrastive_objective(), opt)
    with pytest.raises(TypeError, match="optax"):
        train_step.make_train_step(embed_fn, train_step.contrastive_objective(), object())


# ----------------------------------------------------------------------------- checkpoints
def _state():
    params = {"dense": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)},
              "p": jnp.float32(3.0), "layers": [jnp.zeros(2), jnp.full((1,), 7, jnp.int32)],
              "half": jnp.ones((2,), jnp.bfloat16)}
    opt = optax.adam(1e-3)
    return train_step.TrainState.create(params, opt)


def _assert_tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert jnp.asarray(x).dtype == jnp.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


def test_checkpoint_round_trip(tmp_path):
    state = _state()
    path = tmp_path / "ckpt.npz"
    checkpoints.save_checkpoint(path, state)
    _assert_tree_equal(checkpoints.load_checkpoint(path, target=state), state)
    with np.load(path) as data:
        assert "['dense']['w']" not in data.files  # TrainState fields are attributes
        assert ".params['dense']['w']" in data.files
    # without a target: nested dicts/lists along the key paths
    raw = checkpoints.load_checkpoint(path)
    np.testing.assert_array_equal(raw["params"]["dense"]["w"], state.params["dense"]["w"])
    assert isinstance(raw["params"]["layers"], list) and raw["params"]["layers"][1].dtype == jnp.int32
    assert raw["params"]["half"].dtype == jnp.bfloat16
    # structure mismatch is reported
    with pytest.raises(ValueError, match="does not match"):
        checkpoints.load_checkpoint(path, target={"w": jnp.zeros(2)})
    wrong = train_step.TrainState.create({**state.params, "p": jnp.zeros(2)}, optax.adam(1e-3))
    with pytest.raises(ValueError, match="shape"):
        checkpoints.load_checkpoint(path, target=wrong)


def test_checkpoint_crash_keeps_previous(tmp_path):
    path = tmp_path / "ckpt.npz"
    old = {"w": jnp.arange(4.0)}
    checkpoints.save_checkpoint(path, old)

    def crashing_write(f, arrays):
        f.write(b"PK\x03\x04 partial garbage")
        raise RuntimeError("simulated crash mid-write")

    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoints.save_checkpoint(path, {"w": jnp.zeros(4)}, write_fn=crashing_write)
    _assert_tree_equal(checkpoints.load_checkpoint(path, target=old), old)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]  # no temp file left behind
    # a later successful save replaces it
    checkpoints.save_checkpoint(path, {"w": jnp.ones(4)}, write_fn=lambda f, a: np.savez_compressed(f, **a))
    np.testing.assert_array_equal(checkpoints.load_checkpoint(path)["w"], np.ones(4))
