"""Checkpoints keep empty containers, refuse keys they cannot store and directory paths;
hard-negative mining says when an anchor is short of negatives; the contrastive loss
refuses targets other than 0 / 1 and NaN descriptors (concrete values only)."""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.training import contrastive_loss, load_checkpoint, mine_hard_negatives, save_checkpoint


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
@pytest.mark.parametrize("tree", [
    {"a": [], "b": 1.0},
    {"a": {}, "b": None, "c": (), "d": [[], {"e": []}, 2.0]},
    {"x": {"y": {"z": []}}},
    [], {}, None,
], ids=["empty-list", "mixed-empties", "nested-empty", "root-list", "root-dict", "root-none"])
def test_empty_containers_survive_a_round_trip(tmp_path, tree):
    path = tmp_path / "c.npz"
    save_checkpoint(path, tree)
    back = load_checkpoint(path)
    # tuples load back as lists; everything else exactly, keys in their saved order
    expected = json.loads(json.dumps(tree))
    assert json.loads(json.dumps(jax.tree_util.tree_map(float, back))) == expected
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda v: v, expected))
    with np.load(path, allow_pickle=False) as data:      # readable without pickle
        assert "__retrieval_jax_meta__" in data.files


def test_empty_containers_with_a_target_and_int_keys(tmp_path):
    path = tmp_path / "c.npz"
    tree = {"opt": (jnp.zeros(2), ()), "extra": {0: jnp.ones(1), 2: {}}}
    save_checkpoint(path, tree)
    back = load_checkpoint(path, target=tree)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    assert load_checkpoint(path)["extra"][2] == {}        # all-int keys are kept


@pytest.mark.parametrize("tree, match", [
    ({1: 1.0, "1": 2.0}, "mixing int keys"),
    ({"a": {"b": 1.0, 3: 2.0}}, "mixing int keys"),
    ({True: 1.0}, "bool key True"),
    ({(1, 2): 1.0}, "tuple key"),
    ({None: 1.0, "a": 2.0}, "NoneType key"),
])
def test_keys_a_checkpoint_cannot_store_are_refused(tmp_path, tree, match):
    with pytest.raises(TypeError, match=match):           # a JAX sorting error before
        save_checkpoint(tmp_path / "k.npz", tree)
    assert os.listdir(tmp_path) == []


def test_directory_and_empty_paths_are_refused_up_front(tmp_path):
    (tmp_path / "old.npz").write_bytes(b"x")
    with pytest.raises(IsADirectoryError, match="is a directory; give a file inside it"):
        save_checkpoint(tmp_path, {"a": 1.0})
    assert sorted(os.listdir(tmp_path)) == ["old.npz"]     # no temp file left behind
    with pytest.raises(ValueError, match="path is empty"):
        save_checkpoint("", {"a": 1.0})


@pytest.mark.parametrize("empty", [
    "nope", [{"path": [["d", "a"]], "kind": "set", "at": 1}],
    [{"path": [["d", "a"]], "kind": "list", "at": 7}],
    [{"path": [["d", "w"]], "kind": "list", "at": 1}],           # the leaf's own path
    [{"path": [["x", "a"]], "kind": "list", "at": 1}],
])
def test_malformed_empty_node_metadata_is_a_value_error(tmp_path, empty):
    meta = {"version": 1, "leaves": [{"name": "['w']", "path": [["d", "w"]], "dtype": "float32"}],
            "empty": empty}
    path = tmp_path / "m.npz"
    np.savez(path, **{"['w']": np.ones(2, np.float32)}, __retrieval_jax_meta__=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match="m.npz"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- mining
def _desc(n=20, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_mining_warns_when_an_anchor_is_short_of_negatives():
    x = _desc()
    labels = np.zeros(20, int)
    labels[:2] = 1                                        # anchors of label 0 have 2 negatives
    with pytest.warns(RuntimeWarning, match=r"2 anchor\(s\) have fewer than num = 3.*anchor 1, label 0, "
                                            r"2 negative\(s\).*jnp.isfinite"):
        sims, _ = mine_hard_negatives(x[2:8:2], np.array([1, 0, 0]), x, labels, 3)
    assert np.isinf(np.asarray(sims)[1:, 2]).all()        # the documented mask contract stays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine_hard_negatives(x[:4], np.array([0, 0, 0, 0]), x, labels, 2)          # enough: silent
        jax.jit(mine_hard_negatives, static_argnums=4)(x[:4], labels[:4], x, labels, 3)   # traced: mask only


def test_mining_refuses_nan_descriptors():
    x = _desc()
    x[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"pool_desc has NaN or inf in 1 pool item\(s\) \(first: pool item 5\)"):
        mine_hard_negatives(x[:3], np.arange(3), x, np.arange(20), 2)


# ----------------------------------------------------------------------------- contrastive loss
@pytest.mark.parametrize("target", [[0, 1, 2], [0, 0.5, 1], [0, 1, np.nan], [-1, 0, 1]])
def test_contrastive_targets_must_be_zero_or_one(target):
    a, b = _desc(3, 4), _desc(3, 4, seed=1)
    with pytest.raises(ValueError, match="target must be 1 .* or 0"):
        contrastive_loss(a, b, np.array(target))


def test_contrastive_loss_masked_targets_and_nan_descriptors():
    a, b = _desc(3, 4), _desc(3, 4, seed=1)
    # a padded pair (mask 0) may carry any target
    np.testing.assert_allclose(contrastive_loss(a, b, np.array([0, 1, 7]), mask=np.array([1, 1, 0])),
                               contrastive_loss(a[:2], b[:2], np.array([0, 1])), rtol=1e-6)
    bad = a.copy()
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"a has NaN or inf in 1 pair\(s\) \(first: pair 2\)"):
        contrastive_loss(bad, b, np.array([0, 1, 1]), mask=np.array([1, 1, 0]))   # NaN * 0 is NaN
    with pytest.raises(ValueError, match="mask must have shape"):
        contrastive_loss(a, b, np.array([0, 1, 1]), mask=np.ones(2))


def test_contrastive_loss_still_traces():
    a, b = _desc(3, 4), _desc(3, 4, seed=1)
    assert np.isfinite(float(jax.jit(contrastive_loss)(a, b, jnp.array([0.0, 1.0, 1.0]))))
    g = jax.grad(contrastive_loss)(jnp.asarray(a), b, np.array([0, 1, 1]))
    assert np.isfinite(np.asarray(g)).all()
