"""TEXMEX vector files (.fvecs / .ivecs / .bvecs) through load_descriptors and the CLI.

The files are written here row by row with ``struct`` (an int32 dimension, then the
values, little-endian), independently of the reader, including hand-built malformed ones.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cli_fails, cli_run

from retrieval_jax.data import load_descriptors

_CODES = {".fvecs": ("f", np.float32), ".ivecs": ("i", np.int32), ".bvecs": ("B", np.uint8)}


def _row(d: int, values, code: str) -> bytes:
    return struct.pack("<i", d) + struct.pack(f"<{len(values)}{code}", *values)


def _write(path, rows, code: str | None = None) -> object:
    """Rows as (declared d, values) or bare value lists (d = their length)."""
    code = code or _CODES[path.suffix][0]
    data = b"".join(_row(*r, code) if isinstance(r, tuple) else _row(len(r), r, code) for r in rows)
    path.write_bytes(data)
    return path


def test_texmex_round_trip(tmp_path):
    rows = [[1.5, -2.0, 0.25], [0.0, 3.0, 1e-3], [7.0, 8.0, -9.5], [1.0, 1.0, 1.0]]
    f = load_descriptors(_write(tmp_path / "x.fvecs", rows))
    assert f.dtype == np.float32 and f.shape == (4, 3) and f.flags.c_contiguous
    np.testing.assert_array_equal(f, np.array(rows, np.float32))
    ints = [[1, -2, 2**31 - 1], [0, 5, -(2**31)]]
    i = load_descriptors(_write(tmp_path / "x.ivecs", ints), dtype=None)
    assert i.dtype == np.int32
    np.testing.assert_array_equal(i, np.array(ints, np.int32))
    assert load_descriptors(tmp_path / "x.ivecs").dtype == np.float32
    # d = 128 (SIFT) starts the file with byte 0x80, a pickle's first byte: still a .bvecs file
    sift = np.arange(3 * 128).reshape(3, 128) % 256
    b = load_descriptors(_write(tmp_path / "sift.bvecs", sift.tolist()), dtype=None)
    assert b.dtype == np.uint8
    np.testing.assert_array_equal(b, sift.astype(np.uint8))
    np.testing.assert_array_equal(load_descriptors(tmp_path / "sift.bvecs"), sift.astype(np.float32))
    # one row, one value
    np.testing.assert_array_equal(load_descriptors(_write(tmp_path / "one.fvecs", [[2.0]])), [[2.0]])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_texmex_law_rows_read_back_as_written(tmp_path_factory, n, d, seed):
    """Law: a matrix written row by row in each format reads back as the same [n, d] matrix."""
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("law")
    x = rng.standard_normal((n, d)).astype(np.float32)
    np.testing.assert_array_equal(load_descriptors(_write(tmp / "x.fvecs", x.tolist())), x)
    k = rng.integers(-1000, 1000, (n, d))
    np.testing.assert_array_equal(load_descriptors(_write(tmp / "k.ivecs", k.tolist()), dtype=None), k)
    u = rng.integers(0, 256, (n, d))
    np.testing.assert_array_equal(load_descriptors(_write(tmp / "u.bvecs", u.tolist()), dtype=None), u)


@pytest.mark.parametrize("suffix", [".fvecs", ".ivecs", ".bvecs"])
def test_texmex_malformed_files(tmp_path, suffix):
    code = _CODES[suffix][0]
    size = struct.calcsize(code)
    p = tmp_path / f"bad{suffix}"

    def fails(match):
        with pytest.raises(ValueError, match=match) as info:
            load_descriptors(p)
        assert str(p) in str(info.value)

    p.write_bytes(b"")
    fails("is empty")
    p.write_bytes(b"\x03\x00")
    fails("truncated: 2 byte")
    _write(p, [(0, [])])
    fails("row 0 declares dimension 0")
    _write(p, [(-3, [1, 2, 3])])
    fails("row 0 declares dimension -3")
    _write(p, [(2**31 - 1, [1, 2])])  # absurd: far more than the file holds, never allocated
    fails(f"dimension {2**31 - 1}, which would need {4 + (2**31 - 1) * size} bytes, but the file holds "
          f"{4 + 2 * size}")
    _write(p, [(3, [1, 2])])  # one value short: the first row does not fit
    fails("row 0 declares dimension 3")
    _write(p, [[1, 2, 3], [4, 5, 6], [7, 8]])  # the dimension changes on the last row
    fails("row 2 declares dimension 2 but row 0 declares 3")
    _write(p, [[1, 2], [3, 4], [5, 6, 7], [8, 9]])  # a changed row shifts the rest out of step
    fails("row 2 declares dimension 3 but row 0 declares 2")
    _write(p, [[1, 2, 3], [4, 5, 6]])
    p.write_bytes(p.read_bytes()[:-1])  # last row cut by a byte
    fails(rf"ends in a truncated row: {3 + 3 * size} byte\(s\) after 1 whole row\(s\)")
    p.write_bytes(_row(3, [1, 2, 3], code) + struct.pack("<i", 3)[:2])  # cut inside a row's dimension
    fails(r"ends in a truncated row: 2 byte\(s\) after 1 whole row\(s\)")


def test_texmex_other_errors(tmp_path, capsys):
    _write(tmp_path / "x.fvecs", [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(KeyError, match="single .fvecs matrix; key='X' does not apply"):
        load_descriptors(tmp_path / "x.fvecs", key="X")
    _write(tmp_path / "nan.fvecs", [[1.0, 2.0], [3.0, float("nan")], [0.0, float("inf")]])
    with pytest.raises(ValueError, match=r"nan.fvecs has NaN or inf in 2 row\(s\) \(first: row 1\)"):
        load_descriptors(tmp_path / "nan.fvecs")
    np.save(tmp_path / "arr.npy", np.zeros((2, 2), np.float32))
    (tmp_path / "arr.npy").rename(tmp_path / "arr.fvecs")
    with pytest.raises(ValueError, match=r"arr.fvecs is not a .fvecs file \(it looks like a .npy array\)"):
        load_descriptors(tmp_path / "arr.fvecs")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_descriptors(tmp_path / "missing.bvecs")
    # the CLI reads through load_descriptors and says which file it could not read
    _write(tmp_path / "short.fvecs", [[1.0, 2.0], [3.0]])
    cli_fails(["graph", tmp_path / "short.fvecs", "-o", tmp_path / "g.npz"], capsys,
              "row 1 declares dimension 1 but row 0 declares 2")


def test_cli_ranks_fvecs_descriptors(tmp_path):
    """`rank` on an .fvecs database and .fvecs queries gives knn's ranking by inner product."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:5] + 0.05 * rng.standard_normal((5, 6)).astype(np.float32)
    _write(tmp_path / "db.fvecs", x.tolist())
    _write(tmp_path / "q.fvecs", q.tolist())
    cli_run(["rank", tmp_path / "db.fvecs", "--queries", tmp_path / "q.fvecs", "--method", "knn",
             "--top", 10, "-o", tmp_path / "r.npz"])
    with np.load(tmp_path / "r.npz") as r:
        ranking = r["ranking"]
    expected = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ranking, expected)
