"""Tests of retrieval_jax.data: ground truth, descriptor files, atomic writes, image data sets."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from conftest import require_data

from retrieval_jax.data import (
    GroundTruth,
    atomic_write,
    default_data_dir,
    load_coil20,
    load_descriptors,
    load_digits,
    load_gnd,
    load_mpeg7,
    save_descriptors,
)






def _assert_same_gt(a: GroundTruth, b: GroundTruth):
    assert a.imlist == b.imlist and a.qimlist == b.qimlist
    assert len(a.gnd) == len(b.gnd)
    for qa, qb in zip(a.gnd, b.gnd):
        assert set(qa) == set(qb)
        for key in qa:
            assert qa[key].dtype == qb[key].dtype
            np.testing.assert_array_equal(qa[key], qb[key])


# ---------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gnd_roxford5k", "gnd_rparis6k"])
def test_gnd_pkl_and_mat_twins_agree(name):
    root = require_data("revisitop")
    from_pkl = load_gnd(root / f"{name}.pkl")
    from_mat = load_gnd(root / f"{name}.mat")
    _assert_same_gt(from_pkl, from_mat)
    assert from_pkl.protocol == "revisited" and from_pkl.qidx is None
    assert from_pkl.n_queries == 70
    assert from_pkl.n_db == {"gnd_roxford5k": 4993, "gnd_rparis6k": 6322}[name]
    q = from_pkl.gnd[0]
    assert q["easy"].dtype == np.int64 and q["bbx"].shape == (4,)
    # the raw pickle is reproduced exactly
    with open(root / f"{name}.pkl", "rb") as f:
        raw = pickle.load(f)
    for got, want in zip(from_pkl.gnd, raw["gnd"]):
        for key in ("easy", "hard", "junk", "bbx"):
            np.testing.assert_array_equal(got[key], want[key])


def test_gnd_mat_indices_are_one_based():
    root = require_data("revisitop")
    raw = scipy.io.loadmat(root / "gnd_roxford5k.mat")["gnd"]
    gt = load_gnd(root / "gnd_roxford5k.mat")
    for i in (0, 11, 69):
        for key in ("easy", "hard", "junk"):
            np.testing.assert_array_equal(gt.gnd[i][key], raw[i, 0][key].ravel().astype(np.int64) - 1)
    with open(root / "gnd_roxford5k.pkl", "rb") as f:
        assert list(gt.gnd[0]["easy"][:3]) == pickle.load(f)["gnd"][0]["easy"][:3]


@pytest.mark.parametrize("name", ["gnd_oxford5k.pkl", "gnd_paris6k.pkl"])
def test_classic_gnd(name):
    gt = load_gnd(require_data("oxford_paris_classic") / name)
    assert gt.protocol == "classic" and gt.n_queries == 55
    assert gt.qidx.dtype == np.int64
    assert [gt.imlist[i] for i in gt.qidx] == list(gt.qimlist)
    assert set(gt.gnd[0]) == {"ok", "junk", "bbx"}


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def _small_gnd():
    return {"gnd": [{"easy": [0, 2], "hard": [1], "junk": [], "bbx": [0, 0, 5, 5]}],
            "imlist": ["a", "b", "c"], "qimlist": ["q"]}


def test_gnd_small_pickle_roundtrip(tmp_path):
    gt = load_gnd(_write_pickle(tmp_path / "g.pkl", _small_gnd()))
    np.testing.assert_array_equal(gt.gnd[0]["easy"], [0, 2])
    assert gt.gnd[0]["junk"].dtype == np.int64 and gt.gnd[0]["junk"].size == 0
    assert gt.imlist == ("a", "b", "c")


def test_gnd_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_gnd(tmp_path / "missing.pkl")
    (tmp_path / "text.pkl").write_text("hello, not a pickle")
    with pytest.raises(ValueError, match="not a valid pickle"):
        load_gnd(tmp_path / "text.pkl")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    os.replace(tmp_path / "arr.npy", tmp_path / "arr.pkl")
    with pytest.raises(ValueError, match="looks like a .npy array"):
        load_gnd(tmp_path / "arr.pkl")
    (tmp_path / "text.mat").write_text("not matlab")
    with pytest.raises(ValueError, match="not a readable MATLAB .mat file"):
        load_gnd(tmp_path / "text.mat")
    with pytest.raises(ValueError, match="unknown ground-truth format '.json'"):
        (tmp_path / "g.json").write_text("{}")
        load_gnd(tmp_path / "g.json")

    d = _small_gnd()
    del d["imlist"]
    with pytest.raises(KeyError, match="no key 'imlist'"):
        load_gnd(_write_pickle(tmp_path / "g1.pkl", d))
    d = _small_gnd()
    del d["gnd"][0]["hard"]
    with pytest.raises(KeyError, match="no key 'hard'"):
        load_gnd(_write_pickle(tmp_path / "g2.pkl", d))
    d = _small_gnd()
    d["gnd"][0] = {"positives": [0]}
    with pytest.raises(KeyError, match="neither 'easy'"):
        load_gnd(_write_pickle(tmp_path / "g3.pkl", d))
    d = _small_gnd()
    d["gnd"][0]["easy"] = [0, 3]
    with pytest.raises(ValueError, match=r"gnd\[0\]\['easy'\] has index 3, outside the range of imlist"):
        load_gnd(_write_pickle(tmp_path / "g4.pkl", d))
    d = _small_gnd()
    d["qimlist"] = ["q", "r"]
    with pytest.raises(ValueError, match="1 queries but 'qimlist' has 2"):
        load_gnd(_write_pickle(tmp_path / "g5.pkl", d))
    _write_pickle(tmp_path / "list.pkl", [1, 2])
    with pytest.raises(ValueError, match="should hold a dict"):
        load_gnd(tmp_path / "list.pkl")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_gnd_pickle_refuses_code(tmp_path):
    d = _small_gnd()
    d["gnd"][0]["bbx"] = _Evil()
    with pytest.raises(ValueError, match="refusing to load global"):
        load_gnd(_write_pickle(tmp_path / "evil.pkl", d))


def test_gnd_mat_errors(tmp_path):
    root = require_data("revisitop")
    data = scipy.io.loadmat(root / "gnd_roxford5k.mat")
    data = {k: v for k, v in data.items() if not k.startswith("__")}
    # a 0-based index written into a 1-based file
    bad = data["gnd"].copy()
    easy = bad[0, 0]["easy"].copy()
    easy[0, 0] = 0
    bad[0, 0]["easy"] = easy
    scipy.io.savemat(tmp_path / "zero.mat", {**data, "gnd": bad})
    with pytest.raises(ValueError, match="index 0, outside the range.*1-based"):
        load_gnd(tmp_path / "zero.mat")
    scipy.io.savemat(tmp_path / "noq.mat", {k: v for k, v in data.items() if k != "qimlist"})
    with pytest.raises(KeyError, match="no key 'qimlist'"):
        load_gnd(tmp_path / "noq.mat")
    # an unmodified re-save round-trips
    scipy.io.savemat(tmp_path / "same.mat", data)
    _assert_same_gt(load_gnd(tmp_path / "same.mat"), load_gnd(root / "gnd_roxford5k.pkl"))


# ---------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------

@pytest.fixture
def descs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)


def test_descriptors_mat_revisitop_layout(tmp_path, descs):
    X, Q = descs
    scipy.io.savemat(tmp_path / "feats.mat", {"X": X.T, "Q": Q.T})  # d x n, as published
    np.testing.assert_array_equal(load_descriptors(tmp_path / "feats.mat", key="X"), X)
    q = load_descriptors(tmp_path / "feats.mat", key="Q")
    np.testing.assert_array_equal(q, Q)
    assert q.dtype == np.float32 and q.flags.c_contiguous
    scipy.io.savemat(tmp_path / "one.mat", {"X": X.T.astype(np.float64)})
    x64 = load_descriptors(tmp_path / "one.mat", dtype=None)
    assert x64.dtype == np.float64 and x64.shape == (7, 5)


def test_descriptors_npy_npz(tmp_path, descs):
    X, Q = descs
    np.save(tmp_path / "x.npy", X)
    np.testing.assert_array_equal(load_descriptors(tmp_path / "x.npy"), X)
    np.savez(tmp_path / "plain.npz", X=X)
    np.testing.assert_array_equal(load_descriptors(tmp_path / "plain.npz"), X)
    out = save_descriptors(tmp_path / "both.npz", X=X, Q=Q)
    assert out == tmp_path / "both.npz"
    np.testing.assert_array_equal(load_descriptors(out, key="X"), X)
    np.testing.assert_array_equal(load_descriptors(out, key="Q"), Q)
    np.save(tmp_path / "ints.npy", np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert load_descriptors(tmp_path / "ints.npy").dtype == np.float32


def test_descriptor_errors(tmp_path, descs):
    X, Q = descs
    scipy.io.savemat(tmp_path / "feats.mat", {"X": X.T, "Q": Q.T})
    save_descriptors(tmp_path / "both.npz", X=X, Q=Q)
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_descriptors(tmp_path / "nope.npy")
    with pytest.raises(KeyError, match="no array 'Z'"):
        load_descriptors(tmp_path / "feats.mat", key="Z")
    with pytest.raises(KeyError, match="no array 'Z'"):
        load_descriptors(tmp_path / "both.npz", key="Z")
    with pytest.raises(KeyError, match="holds 2 arrays.*choose one with key="):
        load_descriptors(tmp_path / "both.npz")
    with pytest.raises(KeyError, match="key='X' does not apply"):
        load_descriptors(tmp_path / "x.npy", key="X")

    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"2-D array \[n, d\], got shape \(2, 3, 4\)"):
        load_descriptors(tmp_path / "cube.npy")
    np.save(tmp_path / "vec.npy", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="got shape \\(4,\\)"):
        load_descriptors(tmp_path / "vec.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="empty"):
        load_descriptors(tmp_path / "empty.npy")
    bad = X.copy()
    bad[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="NaN or inf in 1 row.*first: row 4"):
        load_descriptors(tmp_path / "nan.npy")
    scipy.io.savemat(tmp_path / "inf.mat", {"X": np.where(np.arange(7) == 2, np.inf, X.T)})
    with pytest.raises(ValueError, match="NaN or inf .*first: row 2"):
        load_descriptors(tmp_path / "inf.mat")
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    with pytest.raises(TypeError, match="real numbers"):
        load_descriptors(tmp_path / "str.npy")
    np.save(tmp_path / "obj.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_descriptors(tmp_path / "obj.npy")

    # content that does not match the extension
    os.replace(tmp_path / "both.npz", tmp_path / "zip.npy")
    os.replace(tmp_path / "x.npy", tmp_path / "arr.npz")
    (tmp_path / "text.mat").write_text("just text")
    (tmp_path / "x.csv").write_text("1,2")
    for name, match in [("zip.npy", "not a .npy file.*zip"), ("arr.npz", "not a .npz archive.*\\.npy array"),
                        ("text.mat", "not a readable MATLAB .mat"),
                        ("x.csv", "unknown descriptor format '.csv'")]:
        with pytest.raises(ValueError, match=match):
            load_descriptors(tmp_path / name)


def test_save_descriptors_validates(tmp_path, descs):
    X, _ = descs
    with pytest.raises(ValueError, match="should end in .npz"):
        save_descriptors(tmp_path / "x.npy", X=X)
    with pytest.raises(ValueError, match="at least one named array"):
        save_descriptors(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="array 'X' has NaN"):
        save_descriptors(tmp_path / "x.npz", X=np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="array 'v' must be a 2-D"):
        save_descriptors(tmp_path / "x.npz", v=np.zeros(3))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------

def test_atomic_write_replaces_and_keeps_mode(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, lambda f: f.write(b"one"))
    assert target.read_bytes() == b"one"
    os.chmod(target, 0o640)
    atomic_write(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_crash_leaves_old_file(tmp_path):
    target = tmp_path / "f.npz"
    save_descriptors(target, X=np.ones((2, 2), np.float32))
    before = target.read_bytes()

    def crash(f):
        f.write(b"PK\x03\x04 half an archive")
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_write(target, crash)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["f.npz"]  # no temp file left
    np.testing.assert_array_equal(load_descriptors(target), np.ones((2, 2)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "no" / "dir.bin", lambda f: f.write(b""))


# ---------------------------------------------------------------------------
# Image data sets
# ---------------------------------------------------------------------------

def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRIEVAL_JAX_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("RETRIEVAL_JAX_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="RETRIEVAL_JAX_DATA=.*absent is not a directory"):
        default_data_dir()
    with pytest.raises(FileNotFoundError, match="RETRIEVAL_JAX_DATA"):
        load_coil20()
    monkeypatch.delenv("RETRIEVAL_JAX_DATA")
    real = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if real.is_dir():
        assert default_data_dir() == real
    else:
        with pytest.raises(FileNotFoundError, match="no data directory"):
            default_data_dir()


def test_load_digits():
    ds = load_digits(images=True)
    assert ds.X.shape == (1797, 64) and ds.X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ds.X, axis=1), 1.0, atol=1e-6)
    assert ds.images.shape == (1797, 8, 8) and ds.images.dtype == np.uint8
    assert ds.images.max() == 255 and ds.paths is None
    assert ds.n_classes == 10 and set(np.bincount(ds.labels)) <= set(range(170, 190))
    # X is the L2-normalised pixels
    raw = ds.images.reshape(1797, -1).astype(np.float64)
    cos = np.sum(raw / np.linalg.norm(raw, axis=1, keepdims=True) * ds.X, axis=1)
    assert cos.min() > 0.999
    assert load_digits().images is None


@pytest.fixture(scope="module")
def coil():
    return load_coil20(root=require_data("coil20"), size=16, images=True)


def test_load_coil20(coil):
    from PIL import Image

    assert coil.X.shape == (1440, 256) and coil.X.dtype == np.float32
    assert coil.images.shape == (1440, 16, 16) and coil.images.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(coil.X, axis=1), 1.0, atol=1e-5)
    assert set(np.bincount(coil.labels)) == {72} and coil.labels.max() == 19
    for i in (0, 100, 1439):
        stem = Path(coil.paths[i]).name
        obj, pose = stem[3:-4].split("__")
        assert coil.class_names[coil.labels[i]] == f"obj{obj}" and int(obj) == coil.labels[i] + 1
    assert Path(coil.paths[1]).name == "obj1__1.png"  # numeric, not lexicographic, order
    # an independent re-derivation of one row
    with Image.open(coil.paths[100]) as img:
        px = np.asarray(img.convert("L").resize((16, 16), Image.Resampling.BILINEAR), np.float64)
    np.testing.assert_array_equal(coil.images[100], px.astype(np.uint8))
    np.testing.assert_allclose(coil.X[100], px.ravel() / np.linalg.norm(px), atol=1e-6)


def test_load_mpeg7_subset_and_errors(tmp_path):
    root = require_data("mpeg7")
    names = ["apple-1.gif", "apple-2.gif", "apple-10.gif", "personal_car-3.gif", "Glas-1.gif"]
    for n in names:
        os.symlink(root / n, tmp_path / n)
    (tmp_path / "README").write_text("ignored")
    with pytest.warns(UserWarning, match="holds 5 MPEG-7 images, the benchmark has 1400"):
        ds = load_mpeg7(root=tmp_path, size=24, images=True)
    assert ds.class_names == ("Glas", "apple", "personal_car")
    assert [Path(p).name for p in ds.paths] == ["Glas-1.gif", "apple-1.gif", "apple-2.gif",
                                                "apple-10.gif", "personal_car-3.gif"]
    np.testing.assert_array_equal(ds.labels, [0, 1, 1, 1, 2])
    assert ds.X.shape == (5, 576) and ds.images.shape == (5, 24, 24)
    np.testing.assert_allclose(np.linalg.norm(ds.X, axis=1), 1.0, atol=1e-5)
    # silhouettes keep their aspect ratio: personal_car-3 is 549 x 237, so about 7 of
    # the 24 output rows at the top and bottom are black padding (the car touches
    # the left and right borders of its frame)
    car = ds.images[4]
    assert car[:5].max() == 0 and car[-5:].max() == 0
    assert car[:, :2].max() > 0 and car[:, -2:].max() > 0
    with pytest.warns(UserWarning):
        ds2 = load_mpeg7(root=tmp_path, size=24)
    np.testing.assert_array_equal(ds.X, ds2.X)  # deterministic
    assert ds2.images is None
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_mpeg7(root=tmp_path, size=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MPEG-7 images found"):
        load_mpeg7(root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="mpeg7 directory not found"):
        load_mpeg7(root=tmp_path / "absent")


def test_load_mpeg7_full():
    ds = load_mpeg7(root=require_data("mpeg7"), size=16)
    assert ds.X.shape == (1400, 256)
    assert ds.n_classes == 70 and set(np.bincount(ds.labels)) == {20}
    for i in range(0, 1400, 97):
        assert Path(ds.paths[i]).name.rsplit("-", 1)[0] == ds.class_names[ds.labels[i]]
