"""File readers and writers fail loudly and boundedly.

Every reader must turn a truncated, bit-flipped or malformed file into a one-line
ValueError naming the file, and must never allocate more than the file can
back (tiny malicious files); every writer must leave the previous file intact
when it fails or is killed.
"""
import collections
import io
import json
import os
import pickle
import struct
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import temp_files, writer_at_half
from retrieval_jax.data import clean_stale_temps, load_descriptors, load_gnd, read_npz
from retrieval_jax.files import atomic_write
from retrieval_jax.backbones import torch_pickle as tp
from retrieval_jax.training import checkpoints
from retrieval_jax.graph import knn_graph, load_graph, save_graph

MEMORY_BUDGET = 20 * 2**20  # far below what any of the malicious files asks for


def _bounded(fn, *args):
    """Run ``fn(*args)``; return (exception, peak traced bytes, seconds)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the caller checks the type
        error = exc
    else:
        error = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak, time.perf_counter() - t0


def _assert_refused(fn, path, *, match=None):
    """``fn(path)`` raises a ValueError naming the file, quickly and with little memory."""
    error, peak, seconds = _bounded(fn, path)
    assert isinstance(error, ValueError), f"{path.name}: expected ValueError, got {error!r}"
    assert str(path) in str(error)
    assert "\n" not in str(error)
    if match is not None:
        assert match in str(error), str(error)
    assert peak < MEMORY_BUDGET, f"{path.name}: peak {peak / 2**20:.0f} MiB while refusing"
    assert seconds < 10


def _corruptions(data: bytes, seed: int, n_cuts: int = 60, n_flips: int = 150):
    """Seeded truncations (always including the empty and almost-whole file) and bit flips."""
    rng = np.random.default_rng(seed)
    cuts = {0, 1, len(data) // 2, len(data) - 1, *rng.integers(0, len(data), n_cuts).tolist()}
    for cut in sorted(cuts):
        yield f"cut{cut}", data[:cut]
    for i in range(n_flips):
        pos = int(rng.integers(0, len(data)))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        yield f"flip{i}@{pos}", bytes(flipped)


def _load_corruptions(data: bytes, bad: Path, load, seed: int):
    """Write each of `_corruptions` to ``bad`` and ``load`` it: a ValueError must name the
    file (any other exception fails the test). (number refused, [(label, result)] loaded)."""
    errors, loaded = 0, []
    for label, corrupt in _corruptions(data, seed=seed):
        bad.write_bytes(corrupt)
        try:
            loaded.append((label, load(bad)))
        except ValueError as exc:
            assert str(bad) in str(exc), (label, exc)
            errors += 1
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{label}: {type(exc).__name__} escaped: {exc}")
    return errors, loaded


# ---------------------------------------------------------------------------
# 1. Truncated / corrupt checkpoints and graphs
# ---------------------------------------------------------------------------

def _tree():
    return {"params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)},
            "layers": [jnp.arange(3, dtype=jnp.int32), jnp.zeros(())], "step": jnp.asarray(7)}


def _same_tree(a, b):
    import jax

    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(x.dtype == y.dtype and x.shape == y.shape
                            and np.array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))
                            for x, y in zip(la, lb))


@pytest.mark.parametrize("write_fn", [None, lambda f, a: np.savez_compressed(f, **a)],
                         ids=["stored", "deflated"])
def test_checkpoint_truncated_or_bit_flipped_raises_value_error(tmp_path, write_fn):
    good = tmp_path / "good.npz"
    tree = _tree()
    checkpoints.save_checkpoint(good, tree, write_fn=write_fn)
    data = good.read_bytes()
    errors, loaded = _load_corruptions(data, tmp_path / "bad.npz", checkpoints.load_checkpoint, seed=1)
    for label, back in loaded:
        # a flip in a field nothing reads (a timestamp) may leave the content intact
        assert _same_tree(back, checkpoints.load_checkpoint(good)), f"{label} loaded different data"
    assert errors > 100


def _checkpoint_with_meta(path, meta, **arrays):
    arrays = {"['w']": np.ones(2, np.float32), **arrays}
    np.savez(path, **arrays, __retrieval_jax_meta__=meta)
    return path


@pytest.mark.parametrize("meta", [
    np.array("{not json"),
    np.array(json.dumps([1, 2])),
    np.array(json.dumps({"version": 1})),
    np.array(json.dumps({"leaves": [{"path": [["d", "w"]], "dtype": "float32"}]})),
    np.array(json.dumps({"leaves": [{"name": "['x']", "path": [["d", "x"]], "dtype": "float32"}]})),
    np.array(json.dumps({"leaves": [{"name": "['w']", "path": [["d", "w"]], "dtype": "nonsense"}]})),
    np.array(json.dumps({"leaves": [{"name": "['w']", "path": [["q", "w"]], "dtype": "float32"}]})),
    np.array(json.dumps({"leaves": [{"name": "['w']", "path": "w", "dtype": "float32"}]})),
    np.array(json.dumps({"leaves": [{"name": "['w']", "path": [["s", 1]], "dtype": "float32"}]})),
    np.array(json.dumps({"leaves": [{"name": "['w']", "path": [["d", "w"]], "dtype": "float32"},
                                    {"name": "['w']", "path": [["d", "v"]], "dtype": "float32"}]})),
    np.array([json.dumps({"leaves": []})]),
    np.arange(3),
], ids=["json", "list", "no-leaves", "no-name", "missing-array", "dtype", "kind", "path-str",
        "seq-gap", "twice", "meta-1d", "meta-int"])
def test_checkpoint_malformed_metadata_raises_value_error(tmp_path, meta):
    path = _checkpoint_with_meta(tmp_path / "m.npz", meta)
    with pytest.raises(ValueError, match="m.npz"):
        checkpoints.load_checkpoint(path)


def test_checkpoint_prefix_paths_and_missing_file(tmp_path):
    meta = np.array(json.dumps({"leaves": [
        {"name": "['w']", "path": [["d", "w"]], "dtype": "float32"},
        {"name": "['v']", "path": [["d", "w"], ["d", "v"]], "dtype": "float32"}]}))
    path = _checkpoint_with_meta(tmp_path / "p.npz", meta, **{"['v']": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="p.npz"):
        checkpoints.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        checkpoints.load_checkpoint(tmp_path / "missing.npz")


def test_graph_truncated_or_bit_flipped_raises_value_error(tmp_path):
    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    good = save_graph(tmp_path / "good.npz", knn_graph(x, 3), k=3)
    ref, _ = load_graph(good)
    errors, loaded = _load_corruptions(good.read_bytes(), tmp_path / "bad.npz", load_graph, seed=2)
    for label, (graph, _) in loaded:
        assert np.array_equal(np.asarray(graph.indices), np.asarray(ref.indices)), label
        assert np.array_equal(np.asarray(graph.weights), np.asarray(ref.weights)), label
    assert errors > 100


def _npz_with_header(path, shape, data=b"\0" * 8, compress=zipfile.ZIP_STORED):
    """An .npz whose one member's .npy header declares ``shape`` but holds only ``data``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", compress) as zf:
        zf.writestr("indices.npy", header.getvalue() + data)
        zf.writestr("weights.npy", header.getvalue() + data)
    return path


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_header_declaring_a_huge_array_is_refused_without_allocating(tmp_path, compress):
    path = _npz_with_header(tmp_path / "huge.npz", (100_000, 10_000), compress=compress)
    _assert_refused(read_npz, path, match="declares shape")
    _assert_refused(load_graph, path)
    _assert_refused(checkpoints.load_checkpoint, path)
    _assert_refused(lambda p: load_descriptors(p, key="indices"), path)


def test_npz_member_declaring_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / "sizes.npz"
    np.savez(path, x=np.ones(4, np.float32))
    data = bytearray(path.read_bytes())
    # the central directory's uncompressed size (offset 24 in its entry): claim 2 GB
    cd = data.rindex(b"PK\x01\x02")
    data[cd + 24: cd + 28] = struct.pack("<I", 2**31)
    path.write_bytes(bytes(data))
    _assert_refused(read_npz, path)


# ---------------------------------------------------------------------------
# 2. Atomic writes of .pth files, and stale temporary files
# ---------------------------------------------------------------------------

def test_save_torch_zip_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    old = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    tp.save_torch_zip(old, path)
    before = path.read_bytes()
    real = zipfile.ZipFile.writestr
    calls = []

    def failing(self, name, *args, **kwargs):
        calls.append(name)
        real(self, name, *args, **kwargs)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing)
    with pytest.raises(OSError, match="simulated"):
        tp.save_torch_zip({"w": np.zeros((50, 50), np.float32)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    np.testing.assert_array_equal(tp.load_torch_state_dict(path)["w"], old["w"])


_SLOW_WRITER = textwrap.dedent("""
    import sys, time, zipfile
    import numpy as np
    from retrieval_jax.backbones import torch_pickle as tp

    real = zipfile.ZipFile.writestr

    def slow(self, name, *args, **kwargs):
        real(self, name, *args, **kwargs)
        if name.endswith("data/0"):  # half of the archive is on disk
            self.fp.flush()
            print("half", flush=True)
            time.sleep(120)

    zipfile.ZipFile.writestr = slow
    tp.save_torch_zip({"w": np.zeros(100_000, np.float32), "v": np.ones(3, np.float32)},
                      sys.argv[1])
""")


def test_save_torch_zip_killed_mid_write_keeps_old_file_and_orphan_is_cleaned(tmp_path):
    path = tmp_path / "w.pth"
    old = {"w": np.arange(5, dtype=np.float32)}
    tp.save_torch_zip(old, path)
    before = path.read_bytes()
    with writer_at_half(_SLOW_WRITER, path):
        orphans = temp_files(tmp_path)
        assert len(orphans) == 1 and orphans[0].startswith(".w.pth.")
    assert path.read_bytes() == before  # the old file survived the kill
    np.testing.assert_array_equal(tp.load_torch_state_dict(path)["w"], old["w"])
    # the killed writer's temporary file stays ...
    assert temp_files(tmp_path) == orphans
    # ... until the next write of the same target removes it (no live writer holds it)
    tp.save_torch_zip(old, path)
    assert temp_files(tmp_path) == []


def test_clean_stale_temps_removes_only_old_orphans_of_atomic_write(tmp_path):
    stale = time.time() - 2 * 3600
    names = {
        ".a.npz.abc_1234.tmp": True,    # orphan of a.npz, old: removed
        ".b.pth.zz99zz99.tmp": True,    # orphan of b.pth, old: removed
        ".a.npz.young123.tmp": False,   # a live writer's file: kept
        ".a.npz.tmp": False,            # not the pattern
        "a.npz.abcdefgh.tmp": False,    # no leading dot
        ".a.npz.ABCDEFGH.tmp": False,   # not mkstemp's alphabet
        "data.tmp": False,
        "a.npz": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        if name != ".a.npz.young123.tmp":
            os.utime(tmp_path / name, (stale, stale))
    assert sorted(p.name for p in clean_stale_temps(tmp_path, target="b.pth")) == [
        ".b.pth.zz99zz99.tmp"]
    removed = sorted(p.name for p in clean_stale_temps(tmp_path))
    assert removed == [".a.npz.abc_1234.tmp"]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n, gone in names.items() if not gone}
    # atomic_write cleans up only the temporaries of its own target
    (tmp_path / ".c.bin.abcdefgh.tmp").write_bytes(b"x")
    os.utime(tmp_path / ".c.bin.abcdefgh.tmp", (stale, stale))
    atomic_write(tmp_path / "a.npz", lambda f: f.write(b"new"))
    assert (tmp_path / ".c.bin.abcdefgh.tmp").exists()
    atomic_write(tmp_path / "c.bin", lambda f: f.write(b"new"))
    assert not (tmp_path / ".c.bin.abcdefgh.tmp").exists()


# ---------------------------------------------------------------------------
# 3. Tiny malicious files must not allocate what they do not hold
# ---------------------------------------------------------------------------

def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _binint(n):
    return b"J" + struct.pack("<i", n)


def _unicode(s):
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


# numpy.ndarray((137_500_000,), 'f8'): 1.1 GB from a few dozen bytes
_GND_NDARRAY = (b"\x80\x02" + _global("numpy", "ndarray") + _binint(137_500_000) + b"\x85"
                + _unicode("f8") + b"\x86R.")
# _reconstruct(ndarray, (137_500_000,), b'd'): the same through numpy's reconstructor
_GND_RECONSTRUCT = (b"\x80\x02" + _global("numpy.core.multiarray", "_reconstruct")
                    + _global("numpy", "ndarray") + _binint(137_500_000) + b"\x85"
                    + b"C\x01d" + b"\x87R.")


def _gnd_build(shape, raw, dtype="f8"):
    """A pickle of _reconstruct(...) + BUILD whose state names ``shape`` over ``raw``."""
    dtype_ops = (_global("numpy", "dtype") + _unicode(dtype) + b"\x89\x88\x87R"
                 + b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    shape_ops = b"(" + b"".join(_binint(d) for d in shape) + b"t"
    return (b"\x80\x02" + _global("numpy.core.multiarray", "_reconstruct")
            + _global("numpy", "ndarray") + b"K\x00\x85C\x01b\x87R"
            + b"(K\x01" + shape_ops + dtype_ops + b"\x89" + b"C" + bytes([len(raw)]) + raw
            + b"tb.")


def _laughs(levels):
    """[x, x] nested ``levels`` deep through the memo: tiny file, 2**levels leaves."""
    ops = b"\x80\x02]q\x00K\x01a"  # memo 0 = [1]
    for i in range(1, levels + 1):
        ops += b"](h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"eq" + bytes([i])
    # {'gnd': [{'easy': deep, 'hard': [], 'junk': []}], 'imlist': ['a'], 'qimlist': ['q']}
    return (ops + b"0" + b"}(" + _unicode("gnd") + b"]}(" + _unicode("easy") + b"h" + bytes([levels])
            + _unicode("hard") + b"]" + _unicode("junk") + b"]ua" + _unicode("imlist") + b"]"
            + _unicode("a") + b"a" + _unicode("qimlist") + b"]" + _unicode("q") + b"au.")


_TINY_GND = [
    ("ndarray", _GND_NDARRAY),
    ("reconstruct", _GND_RECONSTRUCT),
    ("build-shape", _gnd_build((100_000, 10_000), b"\0" * 8)),
    ("build-zero-itemsize", _gnd_build((10**6, 10**6), b"", dtype="S0")),
    ("binbytes8", b"\x80\x04\x8e" + struct.pack("<Q", 10**9) + b"x"),
    ("binunicode8", b"\x80\x04\x8d" + struct.pack("<Q", 10**9) + b"x"),
    ("frame", b"\x80\x04\x95" + struct.pack("<Q", 10**9) + b"N."),
    ("memo", b"\x80\x02Nr" + struct.pack("<I", 10**8) + b"."),
    ("laughs", _laughs(30)),
    ("bytes-int", b"\x80\x02" + _global("builtins", "bytes") + _binint(200_000_000) + b"\x85R."),
    ("codecs-other", b"\x80\x02" + _global("_codecs", "encode") + _unicode("x")
     + _unicode("rot13") + b"\x86R."),
]


@pytest.mark.parametrize("name, data", _TINY_GND, ids=[name for name, _ in _TINY_GND])
def test_tiny_gnd_pickles_are_refused_without_allocating(tmp_path, name, data):
    assert len(data) < 400
    path = tmp_path / f"gnd_{name}.pkl"
    path.write_bytes(data)
    _assert_refused(load_gnd, path)


def test_gnd_build_with_the_right_bytes_still_loads(tmp_path):
    # the hand-written opcodes above are accepted when the data matches the shape
    path = tmp_path / "ok.pkl"
    array_ops = _gnd_build((2,), struct.pack("<2d", 0.0, 1.0))[2:-1]
    path.write_bytes(b"\x80\x02}(" + _unicode("gnd") + b"]}(" + _unicode("easy") + array_ops
                     + _unicode("hard") + b"]" + _unicode("junk") + b"]ua" + _unicode("imlist")
                     + b"](" + _unicode("a") + _unicode("b") + b"e" + _unicode("qimlist") + b"]"
                     + _unicode("q") + b"au.")
    gnd = load_gnd(path)
    np.testing.assert_array_equal(gnd.gnd[0]["easy"], [0, 1])


class _TorchTensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return (tp._Global("torch._utils", "_rebuild_tensor_v2"),
                (*self.args, False, collections.OrderedDict()))


def _zip_pth(path, size, stride, offset=0, storage=np.ones(1, np.float32)):
    st = tp._Storage(tp._Global("torch", "FloatStorage"), "0", int(storage.size))
    buf = io.BytesIO()
    tp._Pickler(buf, protocol=2).dump(
        collections.OrderedDict([("w", _TorchTensor(st, offset, size, stride))]))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arc/data.pkl", buf.getvalue())
        zf.writestr("arc/data/0", storage.astype("<f4").tobytes())
    return path


@pytest.mark.parametrize("size, stride, storage", [
    ((10_000, 10_000), (0, 0), 1),        # one stored float repeated 1e8 times
    ((10_000, 10_000), (0, 1), 10_000),   # one stored row repeated
    ((10_000, 10_000), (1, 1), 20_000),   # overlapping rows: 2e4 floats -> 1e8
    ((4, 4), (-1, 1), 16),                # runs backwards out of the storage
    ((4,), (1,), 3),                      # runs past the end
    ((-3, 4), (4, 1), 16),                # negative size
])
def test_tiny_pth_views_are_refused_without_allocating(tmp_path, size, stride, storage):
    path = _zip_pth(tmp_path / "view.pth", size, stride, storage=np.ones(storage, np.float32))
    assert path.stat().st_size < 100_000
    _assert_refused(tp.load_torch_state_dict, path)


def test_pth_views_the_storage_backs_still_load(tmp_path):
    base = np.arange(24, dtype=np.float32)
    out = tp.load_torch_state_dict(_zip_pth(tmp_path / "t.pth", (4, 3), (1, 4), storage=base[:12]))
    np.testing.assert_array_equal(out["w"], base[:12].reshape(3, 4).T)
    out = tp.load_torch_state_dict(_zip_pth(tmp_path / "s.pth", (1, 3), (0, 2), 1, storage=base))
    np.testing.assert_array_equal(out["w"], [[1, 3, 5]])  # stride 0 on a length-1 dim is fine


def _legacy_header():
    return b"".join(pickle.dumps(o, protocol=2)
                    for o in (tp._LEGACY_MAGIC, tp._LEGACY_PROTOCOL, {"little_endian": True}))


_TINY_PTH = [
    # bytes(200_000_000) as the magic number: 200 MB of zeros from 30 bytes
    ("bytes-int", b"\x80\x02" + _global("__builtin__", "bytes") + _binint(200_000_000) + b"\x85R."),
    ("bytes-int-builtins", b"\x80\x02" + _global("builtins", "bytes") + _binint(200_000_000)
     + b"\x85R."),
    ("binbytes8", b"\x80\x04\x8e" + struct.pack("<Q", 10**9) + b"x"),
    ("memo", b"\x80\x02Nr" + struct.pack("<I", 10**8) + b"."),
]


@pytest.mark.parametrize("name, data", _TINY_PTH, ids=[name for name, _ in _TINY_PTH])
def test_tiny_pth_pickles_are_refused_without_allocating(tmp_path, name, data):
    path = tmp_path / f"{name}.pth"
    path.write_bytes(data)
    _assert_refused(tp.load_torch_state_dict, path)
    path.write_bytes(_legacy_header() + data)
    _assert_refused(tp.load_torch_state_dict, path)


def test_legacy_storage_count_beyond_the_file_is_refused(tmp_path):
    st = tp._Storage(tp._Global("torch", "FloatStorage"), "0", 4)
    buf = io.BytesIO()
    tp._Pickler(buf, protocol=2).dump(
        collections.OrderedDict([("w", _TorchTensor(st, 0, (4,), (1,)))]))
    # the legacy writer's persistent id has a sixth field (view metadata)
    obj = buf.getvalue()
    path = tmp_path / "legacy.pth"
    for numel, payload in ((10**9, b"\0" * 16), (-5, b"\0" * 16)):
        path.write_bytes(_legacy_header() + obj + pickle.dumps(["0"], protocol=2)
                         + struct.pack("<q", numel) + payload)
        _assert_refused(tp.load_torch_state_dict, path)
    path.write_bytes(_legacy_header() + obj + pickle.dumps(["0"], protocol=2)
                     + struct.pack("<q", 4) + np.arange(4, dtype="<f4").tobytes())
    np.testing.assert_array_equal(tp.load_torch_state_dict(path)["w"], np.arange(4))


# ---------------------------------------------------------------------------
# 4. Valid ground-truth pickles with numpy arrays, every protocol
# ---------------------------------------------------------------------------

def _gnd_dict():
    return {
        "gnd": [{"easy": np.array([0, 2]), "hard": np.array([1], dtype=">i4"),
                 "junk": np.array([], dtype=np.int64), "bbx": np.array([1.0, 2.0, 30.0, 40.0])},
                {"easy": [1], "hard": np.arange(2, dtype=np.uint8).reshape(1, 2, order="F"),
                 "junk": [], "bbx": [0, 0, 5, 5]}],
        "imlist": np.array(["a", "b", "c"]),
        "qimlist": ["q0", "q1"],
        "qidx": np.array([0, 2]),
        "score": np.float32(0.5),
    }


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_gnd_pickle_with_numpy_arrays_loads(tmp_path, protocol):
    path = tmp_path / f"gnd_p{protocol}.pkl"
    with open(path, "wb") as f:
        pickle.dump(_gnd_dict(), f, protocol=protocol)
    if protocol == 2:
        assert b"_codecs\nencode" in path.read_bytes()  # numpy's raw bytes as latin-1 text
    gnd = load_gnd(path)
    assert gnd.imlist == ("a", "b", "c") and gnd.qimlist == ("q0", "q1")
    np.testing.assert_array_equal(gnd.gnd[0]["easy"], [0, 2])
    np.testing.assert_array_equal(gnd.gnd[0]["hard"], [1])
    np.testing.assert_array_equal(gnd.gnd[1]["hard"], [0, 1])
    np.testing.assert_array_equal(gnd.gnd[0]["bbx"], [1, 2, 30, 40])
    np.testing.assert_array_equal(gnd.qidx, [0, 2])
    assert gnd.gnd[0]["easy"].dtype == np.int64


def test_gnd_pickle_refuses_object_arrays_and_numpy_subclasses(tmp_path):
    path = tmp_path / "obj.pkl"
    for value in (np.array([1, "x"], dtype=object), np.ma.masked_array([1, 2]),
                  np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")])):
        d = _gnd_dict()
        d["gnd"][0]["extra"] = value
        with open(path, "wb") as f:
            pickle.dump(d, f, protocol=2)
        with pytest.raises(ValueError, match="obj.pkl"):
            load_gnd(path)
