"""experiments/mining_on_manifolds.py: the class split, the labels file, and quick end-to-end runs.

The runs (``main(["--quick", ...])``) are slow: COIL-20 (real data, skipped when absent)
and a small generated labelled image folder. Checked: the CSV's columns and rows, that the
off-the-shelf row is the same on a re-evaluation by an independent numpy mAP, the history
and the plot. The miner itself is tested in tests/training/test_mining.py.
"""
import json

import numpy as np
import pytest

from conftest import assert_valid_png, read_csv, require_data

from experiments import mining_on_manifolds as mom


def test_class_halves_split_the_sorted_classes():
    labels = np.array([5, 1, 1, 9, 5, 7, 3])
    train, test = mom.class_halves(labels)        # classes 1 3 5 | 7 9
    np.testing.assert_array_equal(train, [True, True, True, False, True, False, True])
    np.testing.assert_array_equal(test, ~train)
    with pytest.raises(ValueError, match="at least 2 classes"):
        mom.class_halves(np.zeros(4))


def test_labels_file_must_match_the_folder(tmp_path):
    path = tmp_path / "labels.npy"
    np.save(path, np.array(["b", "a", "b"]))
    np.testing.assert_array_equal(mom.read_labels(path, 3), [1, 0, 1])
    with pytest.raises(ValueError, match="one label per image"):
        mom.read_labels(path, 4)


def _np_map(desc, labels):
    """Label mAP (%) by brute force: every item against the others, Oxford AP (Philbin et al.
    2007: the mean over positives at 0-based ranks r_j of (j / r_j + (j + 1) / (r_j + 1)) / 2)."""
    s = desc @ desc.T
    aps = []
    for q in range(len(desc)):
        others = np.array([j for j in np.argsort(-s[q], kind="stable") if j != q])
        r = np.flatnonzero(labels[others] == labels[q])
        if r.size:
            j = np.arange(r.size)
            p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
            aps.append(np.mean((p0 + (j + 1) / (r + 1)) / 2))
    return 100 * np.mean(aps)


def _check_outputs(out, name, epochs):
    rows = read_csv(out / f"{name}_results.csv")
    assert list(rows[0]) == ["method", "split", "map"]
    assert [(r["method"], r["split"]) for r in rows] == [(m, s) for m in mom.METHODS for s in ("train", "test")]
    assert all(0 < float(r["map"]) <= 100 for r in rows)
    hist = read_csv(out / f"{name}_history.csv")
    assert len(hist) == epochs and all(np.isfinite(float(h["mined_loss"])) for h in hist)
    assert_valid_png(out / f"{name}_curves.png")
    summary = json.loads((out / "config.json").read_text())["summary"][name]
    agreement = summary["initial_mining_label_agreement"]
    assert agreement["positive_pairs"] > 0 and 0 <= agreement["positives_same_class"] <= 1
    return {(r["method"], r["split"]): float(r["map"]) for r in rows}


@pytest.mark.slow
def test_quick_run_on_coil20(tmp_path):
    require_data("coil20")
    assert mom.main(["--quick", "--out", str(tmp_path)]) == 0
    maps = _check_outputs(tmp_path, "coil20", epochs=3)
    # the off-the-shelf test row, re-evaluated independently
    from experiments.common import load_image_dataset
    from retrieval_jax.backbones import backbone_feature_maps, conv_head_params, load_efficientnet_lite
    from retrieval_jax.training import embed_with_head, init_head
    images, labels, _ = load_image_dataset("coil20", 32, per_class=24)
    backbone = load_efficientnet_lite("lite0")
    test = labels >= 10
    pre = backbone_feature_maps(backbone, images[test], pre_head=True)
    desc = np.asarray(embed_with_head(init_head(conv_head=conv_head_params(backbone)), pre), np.float64)
    assert maps[("off-the-shelf", "test")] == pytest.approx(_np_map(desc, labels[test]), abs=0.02)


@pytest.mark.slow
def test_quick_run_on_a_labelled_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    labels = []
    for c in range(4):                       # 4 classes of 10 noisy colour patterns
        (folder / f"class{c}").mkdir(parents=True)
        base = rng.uniform(0, 255, size=(4, 4, 3))
        for i in range(10):
            img = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 25, size=(32, 32, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"class{c}" / f"{i:02d}.png")
            labels.append(c)
    np.save(tmp_path / "labels.npy", np.array(labels))
    out = tmp_path / "out"
    assert mom.main(["--quick", "--images", str(folder), "--labels", str(tmp_path / "labels.npy"),
                     "--out", str(out)]) == 0
    _check_outputs(out, "images", epochs=3)
