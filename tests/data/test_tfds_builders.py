"""TensorFlow Datasets builders (optional extra ``retrieval-jax[tfds]``).

Skipped as a whole when tensorflow-datasets is not installed: the numpy loaders
stay the default path. TensorFlow is imported once, when the module's first test runs
(not at collection, so a test process that runs none of them never loads it); every
tfds ``data_dir`` lives under pytest's tmp dirs, nothing is written into the repo.
"""
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, require_data
from retrieval_jax.data import load_coil20, load_gnd, load_mpeg7

_EXTRA = ("tensorflow_datasets", "tensorflow", "importlib_resources")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in _EXTRA),
    reason="optional extra not installed: pip install 'retrieval-jax[tfds]' "
           "(tensorflow-datasets, tensorflow-cpu, importlib_resources)")
tb = None  # retrieval_jax.data.tfds_builders, imported by the fixture below


@pytest.fixture(scope="module", autouse=True)
def _tensorflow():
    """Import TensorFlow (quietly) and the builders for this module's tests."""
    global tb
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    importlib.import_module("tensorflow_datasets").disable_progress_bar()
    tb = importlib.import_module("retrieval_jax.data.tfds_builders")


def test_data_package_does_not_import_tensorflow():
    code = ("import sys, retrieval_jax.data; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets')); assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]


# ---------------------------------------------------------------------------
# Revisited Oxford / Paris on a tiny fake revisitop folder
# ---------------------------------------------------------------------------

def _make_revisitop(base, dataset="roxford5k", seed=0):
    """A revisitop-layout folder: jpg/<name>.jpg + gnd_<dataset>.pkl (0-based)."""
    rng = np.random.default_rng(seed)
    (base / "jpg").mkdir(parents=True)
    imlist = [f"place_{i:06d}" for i in range(5)]
    qimlist = ["query_000001", "query_000002", "query_000003"]
    sizes = {}
    for k, name in enumerate(imlist + qimlist):
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        sizes[name] = (h, w)
        if k == 1:  # a greyscale JPEG in the database: must come out as RGB
            img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        else:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        img.save(base / "jpg" / f"{name}.jpg", quality=90)
    h2, w2 = sizes[qimlist[2]]
    gnd = [
        {"bbx": [2.4, 3.5, 20.5, 25.6], "easy": [0, 3], "hard": [1], "junk": [4]},
        {"bbx": [0.0, 0.0, 12.0, 9.0], "easy": [], "hard": [2, 4], "junk": []},
        # a box reaching past the image: clipped to it
        {"bbx": [w2 - 10.2, h2 - 8.7, w2 + 5.0, h2 + 3.0], "easy": [1, 2], "hard": [],
         "junk": [0, 3]},
    ]
    with open(base / f"gnd_{dataset}.pkl", "wb") as f:
        pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, f)
    return base


@pytest.fixture(scope="module")
def revisited(tmp_path_factory):
    root = _make_revisitop(tmp_path_factory.mktemp("roxford5k"))
    data_dir = tmp_path_factory.mktemp("tfds_rev")
    builder = tb.prepare_builder(tb.RevisitedOxfordParis, root, "roxford5k", data_dir=data_dir)
    return root, builder, {s: tb.as_numpy(builder, s) for s in ("database", "query")}


def test_revisited_splits_and_database(revisited):
    root, builder, data = revisited
    gt = load_gnd(root / "gnd_roxford5k.pkl")
    assert builder.info.splits["database"].num_examples == gt.n_db == 5
    assert builder.info.splits["query"].num_examples == gt.n_queries == 3
    db = data["database"]
    assert list(db["filename"]) == [f"{n}.jpg" for n in gt.imlist]
    assert db["index"].tolist() == list(range(gt.n_db))
    for i, name in enumerate(gt.imlist):
        with Image.open(root / "jpg" / f"{name}.jpg") as img:
            expected = np.asarray(img.convert("RGB"))
        got = db["image"][i]
        assert got.dtype == np.uint8 and got.shape == expected.shape and got.shape[2] == 3
        np.testing.assert_array_equal(got, expected)
        h, w = expected.shape[:2]
        assert (db["full_height"][i], db["full_width"][i]) == (h, w)
        assert db["crop_box"][i].tolist() == [0, 0, w, h]
        assert all(db[k][i].size == 0 for k in ("easy", "hard", "junk"))
    grey = db["image"][1]  # greyscale source: three equal channels
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()


def test_revisited_query_crop_and_ground_truth(revisited):
    root, _, data = revisited
    gt = load_gnd(root / "gnd_roxford5k.pkl")
    q = data["query"]
    assert list(q["filename"]) == [f"{n}.jpg" for n in gt.qimlist]
    assert q["index"].tolist() == [0, 1, 2]
    for i, name in enumerate(gt.qimlist):
        with Image.open(root / "jpg" / f"{name}.jpg") as img:
            full = np.asarray(img.convert("RGB"))
            pil_crop = np.asarray(img.convert("RGB").crop(tuple(q["crop_box"][i])))
        h, w = full.shape[:2]
        assert (q["full_height"][i], q["full_width"][i]) == (h, w)
        bbx = gt.gnd[i]["bbx"]
        np.testing.assert_array_equal(q["bbx"][i], bbx)  # float64, exact round trip
        x1, y1, x2, y2 = (int(v) for v in q["crop_box"][i])
        assert (x1, y1, x2, y2) == tb.crop_box(bbx, w, h)
        np.testing.assert_array_equal(q["image"][i], full[y1:y2, x1:x2])
        np.testing.assert_array_equal(q["image"][i], pil_crop)
        for key in ("easy", "hard", "junk"):
            assert q[key][i].dtype == np.int64
            np.testing.assert_array_equal(q[key][i], gt.gnd[i][key])
    # rounding as PIL's crop: 2.4 -> 2, 3.5 -> 4 (half to even), 20.5 -> 20, 25.6 -> 26
    assert q["crop_box"][0].tolist() == [2, 4, 20, 26]
    assert q["image"][0].shape == (22, 18, 3)
    # third box overhangs the image: clipped to its bottom-right corner
    h2, w2 = q["full_height"][2], q["full_width"][2]
    assert q["crop_box"][2].tolist() == [w2 - 10, h2 - 9, w2, h2]


def test_crop_box_rounding_and_errors():
    assert tb.crop_box([0.5, 1.5, 2.5, 3.5], 10, 10) == (0, 2, 2, 4)
    assert tb.crop_box([-3, -2, 50, 40], 20, 10) == (0, 0, 20, 10)
    with pytest.raises(ValueError, match="empty"):
        tb.crop_box([15, 0, 30, 5], 10, 10)
    with pytest.raises(ValueError, match="4 finite"):
        tb.crop_box([0, 0, np.nan, 5], 10, 10)


def test_revisited_nested_layout_rparis(tmp_path):
    """revisitop's data/datasets/<dataset>/ folder works as the manual dir, via as_numpy on a
    tf.data.Dataset too."""
    _make_revisitop(tmp_path / "data" / "datasets" / "rparis6k", "rparis6k", seed=1)
    builder = tb.prepare_builder(tb.RevisitedOxfordParis, tmp_path / "data", "rparis6k",
                                 data_dir=tmp_path / "tfds")
    gt = load_gnd(tmp_path / "data" / "datasets" / "rparis6k" / "gnd_rparis6k.pkl")
    q = tb.as_numpy(builder.as_dataset(split="query"))
    assert list(q["filename"]) == [f"{n}.jpg" for n in gt.qimlist]
    for i in range(gt.n_queries):
        np.testing.assert_array_equal(q["junk"][i], gt.gnd[i]["junk"])


def test_revisited_missing_files_are_listed(tmp_path):
    root = _make_revisitop(tmp_path / "rox")
    (root / "jpg" / "place_000003.jpg").unlink()
    (root / "jpg" / "query_000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 8") as info:
        tb.prepare_builder(tb.RevisitedOxfordParis, root, "roxford5k", data_dir=tmp_path / "d1")
    assert "place_000003.jpg" in str(info.value) and "query_000002.jpg" in str(info.value)

    (root / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl") as info:
        tb.prepare_builder(tb.RevisitedOxfordParis, root, "roxford5k", data_dir=tmp_path / "d2")
    assert "revisitop" in str(info.value)  # the instructions come with the error

    with pytest.raises(FileNotFoundError, match="does not exist"):
        tb.prepare_builder(tb.RevisitedOxfordParis, tmp_path / "nowhere", "roxford5k",
                           data_dir=tmp_path / "d3")


# ---------------------------------------------------------------------------
# Labelled image folders
# ---------------------------------------------------------------------------

def _rgb(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_folder_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "shapes"
    modes = {"cat": "L", "dog10": "P", "dog2": "RGBA"}  # 'dog2' sorts before 'dog10'
    for cls, mode in modes.items():
        (root / cls).mkdir(parents=True)
        for k in (1, 10, 2):
            arr = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            img = Image.fromarray(arr, "RGB").convert(mode)
            img.save(root / cls / f"img{k}.{'gif' if mode == 'P' else 'png'}")
    (root / "notes.txt").write_text("ignored")
    (root / "cat" / "readme.txt").write_text("ignored")
    data = tb.load_tfds_folder(root, data_dir=tmp_path / "tfds")
    assert data["class_names"] == ["cat", "dog2", "dog10"]
    assert data["label"].tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert list(data["filename"][:3]) == ["cat/img1.png", "cat/img2.png", "cat/img10.png"]
    assert data["image"].shape == (9, 12, 12, 3) and data["image"].dtype == np.uint8
    for img, rel in zip(data["image"], data["filename"], strict=True):
        np.testing.assert_array_equal(img, _rgb(root / rel))

    # a second call reuses the prepared data; another folder into the same cache is refused
    again = tb.load_tfds_folder(root, data_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(again["image"], data["image"])
    assert again["class_names"] == data["class_names"]  # ClassLabel names restored from disk
    other = tmp_path / "other" / "x"
    other.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(other / "a.png")
    with pytest.raises(ValueError, match="prepared from"):
        tb.load_tfds_folder(other.parent, data_dir=tmp_path / "tfds")


def test_folder_flat_regex_custom_config(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "flat"
    root.mkdir()
    for cls in ("3", "12"):
        for n in (2, 1):
            arr = rng.integers(0, 256, (6, 8), dtype=np.uint8)
            Image.fromarray(arr, "L").save(root / f"obj{cls}__{n}.png")
    (root / "unrelated.png").write_bytes(b"")
    config = tb.LabelledImageFolderConfig(name="tiny_coil", pattern=r"obj(\d+)__(\d+)\.png",
                                          class_template="obj{}")
    data = tb.load_tfds_folder(root, config, data_dir=tmp_path / "tfds")
    assert data["class_names"] == ["obj3", "obj12"]  # numeric class order
    assert list(data["filename"]) == ["obj3__1.png", "obj3__2.png", "obj12__1.png",
                                      "obj12__2.png"]
    assert data["label"].tolist() == [0, 0, 1, 1]
    assert data["image"].shape == (4, 6, 8, 3)
    np.testing.assert_array_equal(data["image"][..., 0], data["image"][..., 2])


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="no sub-folder holding images"):
        tb.load_tfds_folder(tmp_path / "empty", data_dir=tmp_path / "t1")
    with pytest.raises(FileNotFoundError, match=r"matches"):
        tb.load_tfds_folder(tmp_path / "empty", "coil20", data_dir=tmp_path / "t2")


def test_folder_mpeg7_scan_matches_numpy_loader():
    """The mpeg7 config lists the real folder in load_mpeg7's order (no TF work)."""
    root = require_data("mpeg7")
    config = tb.LabelledImageFolder.builder_configs["mpeg7"]
    files, names = tb.scan_labelled_folder(root, config)
    ref = load_mpeg7(root, size=8)
    assert len(files) == 1400 and len(names) == 70 and tuple(names) == ref.class_names
    assert [f for f, _ in files] == [os.path.basename(p) for p in ref.paths]
    np.testing.assert_array_equal([lab for _, lab in files], ref.labels)
    rgb = tb.read_rgb(root / files[0][0])  # GIF palette -> RGB
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


def test_folder_real_coil20(tmp_path):
    root = require_data("coil20")
    data = tb.load_tfds_folder(root, "coil20", data_dir=tmp_path / "tfds")
    ref = load_coil20(root, size=128, images=True)
    assert len(data["label"]) == 1440
    assert data["class_names"] == list(ref.class_names) == [f"obj{k}" for k in range(1, 21)]
    assert len(set(data["label"].tolist())) == 20
    np.testing.assert_array_equal(data["label"], ref.labels)
    assert list(data["filename"]) == [os.path.basename(p) for p in ref.paths]
    assert data["image"].shape == (1440, 128, 128, 3) and data["image"].dtype == np.uint8
    np.testing.assert_array_equal(data["image"][..., 0], ref.images)  # grey -> equal channels
    np.testing.assert_array_equal(data["image"][..., 1], ref.images)
