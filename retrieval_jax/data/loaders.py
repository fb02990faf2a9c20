"""Loaders for benchmark ground truth and descriptor files.

Formats:
  * ground truth ``gnd_*.pkl`` as published with the Revisited Oxford/Paris
    benchmark (Radenovic et al., CVPR 2018) and for the original Oxford5k /
    Paris6k (Philbin et al., CVPR 2007 / 2008): a dict with 'gnd' (one dict per
    query), 'imlist' (database image names), 'qimlist' (query image names) and,
    for the classic files, 'qidx'. Indices are 0-based.
  * their MATLAB twins ``gnd_*.mat``: 'gnd' is a struct array with the same
    fields, but indices are **1-based**; they are converted to 0-based here (the
    bounding boxes 'bbx' are identical in both files and are left as they are).
  * descriptors: ``.npy`` ([n, d]), ``.npz`` (several named [n, d] arrays) and the
    revisitop ``.mat`` files with ``X`` (database) and ``Q`` (queries) stored
    d x n, i.e. one descriptor per column; they are transposed to [n, d].
  * the TEXMEX vector files of the ANN_SIFT1M / ANN_GIST1M / ANN_SIFT1B corpora
    (Jegou, Douze and Schmid, "Product quantization for nearest neighbor
    search", TPAMI 2011): ``.fvecs`` (float32), ``.ivecs`` (int32) and ``.bvecs``
    (uint8); each row is a little-endian int32 dimension d followed by d values.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np

from ..files import atomic_write, check_expansion, check_pickle, npz_names, read_npz

__all__ = ["GroundTruth", "load_descriptors", "load_gnd", "save_descriptors"]

# Per-query fields holding database indices (0-based in .pkl, 1-based in .mat).
_INDEX_FIELDS = ("easy", "hard", "junk", "ok", "good")
_PROTOCOLS = {"revisited": ("easy", "hard", "junk"), "classic": ("ok", "junk")}

_NPY_MAGIC = b"\x93NUMPY"
# TEXMEX vector files: extension -> little-endian value type of each row's d values.
_TEXMEX = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


# ---------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class GroundTruth:
    """Ground truth of a landmark retrieval benchmark, with 0-based indices.

    Attributes:
      gnd: one dict per query. Revisited files have 'easy', 'hard', 'junk';
        classic files have 'ok', 'junk'; index lists are sorted as published,
        int64 1-D arrays into ``imlist``. 'bbx' is the query crop
        [x1, y1, x2, y2] as float64[4] (pixel coordinates, identical in .pkl and
        .mat).
      imlist: database image names (n_db).
      qimlist: query image names (n_queries).
      qidx: int64[n_queries] position of each query image in ``imlist`` (classic
        Oxford5k / Paris6k, whose queries are database images), else None.
    """

    gnd: tuple
    imlist: tuple
    qimlist: tuple
    qidx: np.ndarray | None = None

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    @property
    def protocol(self) -> str:
        """'revisited' (easy/hard/junk) or 'classic' (ok/junk)."""
        return "revisited" if "easy" in self.gnd[0] else "classic"


# ---- restricted unpickling of numpy arrays ----------------------------------
# numpy pickles an array as ``_reconstruct(ndarray, (0,), b'b')`` followed by a
# BUILD with ``(version, shape, dtype, fortran, raw_bytes)``; a dtype as
# ``dtype('i8', False, True)`` plus a BUILD with its byte order; protocol 5 uses
# ``_frombuffer(buffer, dtype, shape, order)``; protocol 2 spells the raw bytes
# ``_codecs.encode(text, 'latin1')``. The real callables would allocate whatever
# shape the pickle names (``ndarray((10**9,))`` from a 100-byte file), so each
# is replaced by a stand-in that builds arrays only from bytes present in the
# file, of plain numeric or string dtypes.

_MAX_DIMS = 64
_DTYPE_KINDS = "biufcSU"  # bool, ints, floats, complex, bytes, str: no objects, no void


class _NdarrayMarker:
    """Stand-in for ``numpy.ndarray``: only valid as the class argument of ``_reconstruct``."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray may only be rebuilt from the bytes stored in "
                                     "the file, not constructed with a shape")


_NDARRAY = _NdarrayMarker()


class _PickledDtype:
    """A numpy dtype under construction: ``dtype(code, align, copy)`` then BUILD (byte order)."""

    __hash__ = None  # never a dict key or set member

    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or len(code) > 16:
            raise pickle.UnpicklingError(f"unexpected numpy dtype code {code!r}")
        dtype = np.dtype(code)
        if dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype:
            raise pickle.UnpicklingError(f"refusing numpy dtype {dtype}: a ground-truth pickle "
                                         "holds only numeric and string arrays")
        self.dtype = dtype

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise pickle.UnpicklingError(f"unexpected numpy dtype state {state!r}")
        endian, subarray, names, fields, elsize = state[1:6]
        if subarray is not None or names is not None or fields is not None or (
                len(state) == 9 and state[8] is not None):
            raise pickle.UnpicklingError("refusing a structured or annotated numpy dtype")
        if elsize not in (-1, self.dtype.itemsize):
            raise pickle.UnpicklingError(f"numpy dtype {self.dtype} with inconsistent item size "
                                         f"{elsize!r}")
        if endian in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(endian)
        elif endian not in ("|", "="):
            raise pickle.UnpicklingError(f"unexpected numpy byte order {endian!r}")


def _as_dtype(value) -> np.dtype:
    if not isinstance(value, _PickledDtype):
        raise pickle.UnpicklingError(f"expected a numpy dtype, got {type(value).__name__}")
    return value.dtype


def _array_from_bytes(shape, dtype: np.dtype, fortran: bool, raw) -> np.ndarray:
    """An array of ``shape`` from exactly ``prod(shape) * itemsize`` bytes of ``raw``."""
    if not (isinstance(shape, tuple) and len(shape) <= _MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise pickle.UnpicklingError(f"bad numpy array shape {shape!r}")
    if isinstance(raw, str):  # protocol 0/1 and Python 2 pickles: bytes as latin-1 text
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise pickle.UnpicklingError(f"numpy array data should be bytes, got {type(raw).__name__}")
    count = 1
    for d in shape:
        count *= d
    nbytes = len(memoryview(raw).cast("B"))
    if count * dtype.itemsize != nbytes or (count and not dtype.itemsize):
        raise pickle.UnpicklingError(
            f"numpy array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes "
            f"but the file holds {nbytes}")
    flat = np.frombuffer(raw, dtype=dtype, count=count) if count else np.empty(0, dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


class _PickledArray:
    """An array under construction: ``_reconstruct`` makes it, BUILD fills it from file bytes."""

    __hash__ = None

    def __init__(self, array=None):
        self.array = array

    def __setstate__(self, state):
        if self.array is not None:
            raise pickle.UnpicklingError("a numpy array is built twice")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("unexpected numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array_from_bytes(shape, _as_dtype(dtype), bool(fortran), raw)


def _reconstruct(cls, shape, dtype_code):
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("only plain numpy.ndarray objects can be unpickled")
    return _PickledArray()


def _frombuffer(buffer, dtype, shape, order):
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"unexpected numpy array order {order!r}")
    if not isinstance(shape, (tuple, list)):
        raise pickle.UnpicklingError(f"bad numpy array shape {shape!r}")
    return _PickledArray(_array_from_bytes(tuple(shape), _as_dtype(dtype), order == "F", buffer))


def _scalar(dtype, data=None):
    dtype = _as_dtype(dtype)
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy {dtype} scalar needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol 2 uses it for bytes: latin-1 text to the same bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only accepted on text with 'latin1'")
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()``, which protocols 0-2 use for empty bytes; never ``bytes(n)`` (n zero bytes)."""
    if args:
        raise pickle.UnpicklingError("builtins.bytes is only accepted without arguments")
    return b""


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves no real global: numpy arrays are rebuilt by safe stand-ins.

    The published ground-truth pickles hold only dicts, lists, strings, numbers and
    (in some copies) numpy arrays. Any other global is refused, so a malicious
    .pkl cannot run code on load; the numpy globals are mapped to stand-ins that
    build arrays only from bytes present in the file (see `_array_from_bytes`),
    so it cannot make the loader allocate more than it holds either. Call
    `finish` on the loaded object to turn the stand-ins into numpy objects.
    """

    _GLOBALS = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _PickledDtype,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
    }
    for _core in ("numpy.core", "numpy._core"):
        _GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
        _GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
        _GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer
    del _core

    def find_class(self, module, name):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a ground-truth pickle should hold only "
            "dicts, lists, strings, numbers and numpy arrays")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent reference: a ground-truth pickle "
                                     "holds no external objects")

    @staticmethod
    def finish(obj):
        """``obj`` with every array/dtype stand-in replaced by its numpy object.

        Shared containers stay shared (one copy per original), so the walk is
        linear in the pickle's size; `check_expansion` has ruled out cycles.
        """
        done: dict[int, object] = {}

        def convert(node):
            if isinstance(node, _PickledArray):
                if node.array is None:
                    raise pickle.UnpicklingError("a numpy array without its data")
                return node.array
            if isinstance(node, _PickledDtype):
                return node.dtype
            if not isinstance(node, (list, tuple, dict)):
                return node
            key = id(node)
            if key not in done:
                if isinstance(node, dict):
                    done[key] = {k: convert(v) for k, v in node.items()}
                elif isinstance(node, list):
                    done[key] = [convert(v) for v in node]
                else:
                    done[key] = tuple(convert(v) for v in node)
            return done[key]

        return convert(obj)


def _load_pickle(path: Path):
    """Unpickle ``path`` with `_SafeUnpickler`, bounded by the file's size (see retrieval_jax.files)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        check_pickle(f, path)
        data = _SafeUnpickler(f).load()
    check_expansion(data, size + 64, path)
    return _SafeUnpickler.finish(data)


def _check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    return path


def _head(path: Path, n: int = 128) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _loadmat(path: Path) -> dict:
    import scipy.io

    head = _head(path)
    try:
        data = scipy.io.loadmat(path)
    except NotImplementedError as exc:  # MATLAB v7.3 = HDF5
        raise ValueError(f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; "
                         "re-save it with save(..., '-v7') or read it with h5py") from exc
    except Exception as exc:
        kind = _sniff(head)
        raise ValueError(f"{path} is not a readable MATLAB .mat file"
                         f"{' (it looks like ' + kind + ')' if kind else ''}: {exc}") from exc
    return {k: v for k, v in data.items() if not k.startswith("__")}


def _sniff(head: bytes) -> str:
    if head.startswith(_NPY_MAGIC):
        return "a .npy array"
    if head.startswith(_ZIP_MAGICS):
        return "a zip / .npz archive"
    if head[:1] == b"\x80":
        return "a pickle"
    if head.startswith(b"MATLAB"):
        return "a MATLAB .mat file"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    return ""


def _mat_str(x) -> str:
    """A MATLAB char array / cell element as a Python str."""
    a = np.asarray(x)
    while a.dtype == object and a.size == 1:
        a = np.asarray(a.reshape(-1)[0])
    if a.size == 0:
        return ""
    return str(a.reshape(-1)[0]) if a.dtype.kind == "U" and a.size == 1 else "".join(
        str(c) for c in a.reshape(-1))


def _mat_cellstr(x, name: str, path: Path) -> list[str]:
    a = np.asarray(x)
    if a.dtype.kind == "U":  # char matrix, one name per row
        return [str(s).rstrip() for s in a.reshape(a.shape[0], -1)[:, 0]] if a.ndim else [str(a)]
    if a.dtype != object:
        raise ValueError(f"{path}: '{name}' should be a cell array of strings, got {a.dtype}")
    return [_mat_str(c) for c in a.reshape(-1)]


def _gnd_from_mat(data: dict, path: Path) -> dict:
    """Convert a loadmat dict into the pickle layout, indices still 1-based."""
    g = np.asarray(data["gnd"])
    if g.dtype.names is None:
        raise ValueError(f"{path}: 'gnd' should be a MATLAB struct array, got dtype {g.dtype}")
    entries = []
    for rec in g.reshape(-1):
        entries.append({name: rec[name] for name in g.dtype.names})
    out = {"gnd": entries,
           "imlist": _mat_cellstr(data["imlist"], "imlist", path),
           "qimlist": _mat_cellstr(data["qimlist"], "qimlist", path)}
    if "qidx" in data:
        out["qidx"] = data["qidx"]
    return out


def _as_indices(x, what: str, path: Path, n_db: int, base: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    arr = arr.reshape(-1)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"{path}: {what} holds non-integer values")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{path}: {what} should hold integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64) - base
    bad = (arr < 0) | (arr >= n_db)
    if bad.any():
        value = int(arr[bad][0]) + base
        extra = (" (indices in a .mat file are read as 1-based; is this file 0-based?)"
                 if base else "")
        raise ValueError(f"{path}: {what} has index {value}, outside the range of imlist "
                         f"({n_db} images, {'1-based' if base else '0-based'}){extra}")
    return arr


def _read_gnd_pickle(path: Path):
    """The ground-truth pickle's content (restricted unpickler); every failure a ValueError."""
    head = _head(path)

    def looks_like():
        kind = _sniff(head)
        return f" (it looks like {kind})" if kind else ""

    try:
        return _load_pickle(path)
    except ValueError as exc:  # from check_pickle / check_expansion, naming the file
        if _sniff(head) and "not a valid pickle" in str(exc):
            raise ValueError(f"{path} is not a valid pickle{looks_like()}: {exc.__cause__ or exc}") from exc
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: {exc}") from exc
    except pickle.UnpicklingError as exc:
        if "refusing" in str(exc):
            raise ValueError(f"{path}: {exc}") from exc
        raise ValueError(f"{path} is not a valid pickle{looks_like()}: {exc}") from exc
    except (MemoryError, PermissionError):
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a valid pickle{looks_like()}: {exc}") from exc


def _read_gnd_file(path: Path) -> tuple[dict, int]:
    """(dict with 'gnd', 'imlist', 'qimlist' and maybe 'qidx', index base: 0 pkl, 1 mat)."""
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        data, base = _read_gnd_pickle(path), 0
    elif suffix == ".mat":
        data, base = _loadmat(path), 1
    else:
        raise ValueError(f"{path}: unknown ground-truth format {suffix!r}; expected .pkl or .mat")
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a dict with 'gnd', 'imlist', 'qimlist', "
                         f"got {type(data).__name__}")
    for key in ("gnd", "imlist", "qimlist"):
        if key not in data:
            raise KeyError(f"{path} has no key {key!r} (keys: {sorted(data)}); "
                           "is this a benchmark ground-truth file?")
    if suffix == ".mat":
        data = _gnd_from_mat(data, path)
    return data, base


def _gnd_protocol(entry: dict, i: int, path: Path) -> str:
    """'revisited' or 'classic', from the keys of the first query's entry."""
    protocol = next((p for p, keys in _PROTOCOLS.items() if keys[0] in entry), None)
    if protocol is None:
        raise KeyError(f"{path}: gnd[{i}] has neither 'easy' (revisited) nor 'ok' "
                       f"(classic) (keys: {sorted(entry)})")
    return protocol


def _gnd_entry(entry, i: int, protocol: str, path: Path, n_db: int, base: int) -> dict:
    """One query's entry with its index lists checked and made 0-based int64."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: gnd[{i}] should be a dict, got {type(entry).__name__}")
    for key in _PROTOCOLS[protocol]:
        if key not in entry:
            raise KeyError(f"{path}: gnd[{i}] has no key {key!r} (keys: {sorted(entry)}); "
                           f"{protocol} ground truth needs {_PROTOCOLS[protocol]}")
    out = {}
    for key, value in entry.items():
        if key in _INDEX_FIELDS:
            out[key] = _as_indices(value, f"gnd[{i}][{key!r}]", path, n_db, base)
        elif key == "bbx":
            out[key] = np.asarray(value, np.float64).reshape(-1)
        else:
            out[key] = value
    return out


def load_gnd(path) -> GroundTruth:
    """Load a benchmark ground truth ``gnd_*.pkl`` or its ``gnd_*.mat`` twin.

    The .mat files store MATLAB 1-based indices; they are shifted to 0-based, so
    both twins give identical ``GroundTruth`` objects.

    Args:
      path: ``.pkl`` / ``.pickle`` or ``.mat`` file.

    Returns:
      ``GroundTruth`` with int64 0-based index arrays.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: unknown extension, unreadable content, indices out of range.
      KeyError: a required key ('gnd', 'imlist', 'qimlist', or a per-query
        protocol key) is missing.
    """
    path = _check_file(path)
    data, base = _read_gnd_file(path)
    imlist = tuple(str(s) for s in data["imlist"])
    qimlist = tuple(str(s) for s in data["qimlist"])
    n_db = len(imlist)
    raw = list(data["gnd"])
    if len(raw) != len(qimlist):
        raise ValueError(f"{path}: 'gnd' has {len(raw)} queries but 'qimlist' has {len(qimlist)}")
    if not raw:
        raise ValueError(f"{path}: 'gnd' is empty")
    if not isinstance(raw[0], dict):
        raise ValueError(f"{path}: gnd[0] should be a dict, got {type(raw[0]).__name__}")
    protocol = _gnd_protocol(raw[0], 0, path)
    gnd = [_gnd_entry(entry, i, protocol, path, n_db, base) for i, entry in enumerate(raw)]
    qidx = None
    if data.get("qidx") is not None:
        qidx = _as_indices(data["qidx"], "'qidx'", path, n_db, base)
        if qidx.size != len(qimlist):
            raise ValueError(f"{path}: 'qidx' has {qidx.size} entries, expected {len(qimlist)}")
    return GroundTruth(gnd=tuple(gnd), imlist=imlist, qimlist=qimlist, qidx=qidx)


# ---------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------

def _check_descriptors(arr, what: str, dtype) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n, d], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating)
                                 or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.flatnonzero(~finite.all(axis=1))
            raise ValueError(f"{what} has NaN or inf in {bad.size} row(s) (first: row {bad[0]}); "
                             "clean or drop those descriptors")
    return arr


def _pick(keys: list[str], key: str | None, path: Path) -> str:
    if key is None:
        if len(keys) == 1:
            return keys[0]
        raise KeyError(f"{path} holds {len(keys)} arrays {keys}; choose one with key=")
    if key not in keys:
        raise KeyError(f"{path} has no array {key!r} (available: {keys})")
    return key


def _read_texmex(path: Path, value: np.dtype) -> np.ndarray:
    """The [n, d] values of a TEXMEX ``.fvecs`` / ``.ivecs`` / ``.bvecs`` file (a read-only memory map).

    Every row is ``int32 d`` then ``d`` values of ``value``, little-endian. The first
    row's d fixes the row length; it must be positive and its row must fit in the
    file, the file must be a whole number of rows, and every row must repeat the same
    d. Nothing is allocated before that: the rows are mapped, not read, and the map
    covers exactly the bytes of the file.
    """
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (a {path.suffix} file holds at least one row)")
    if size < 4:
        raise ValueError(f"{path} is truncated: {size} byte(s), less than the 4-byte dimension "
                         "that starts every row")
    d = int(np.frombuffer(_head(path, 4), "<i4")[0])
    room = (size - 4) // value.itemsize
    if d <= 0:
        raise ValueError(f"{path}: row 0 declares dimension {d}; a {path.suffix} row starts with "
                         "its dimension, a positive little-endian int32 (is this a TEXMEX file?)")
    if d > room:
        raise ValueError(f"{path}: row 0 declares dimension {d}, which would need "
                         f"{4 + d * value.itemsize} bytes, but the file holds {size}; the file is "
                         "truncated or not a TEXMEX file")
    row_bytes = 4 + d * value.itemsize
    n, rest = divmod(size, row_bytes)
    rows = np.memmap(path, dtype=np.dtype([("d", "<i4"), ("x", value, (d,))]), mode="r", shape=(n,))
    dims = rows["d"]
    changed = np.flatnonzero(dims != d)
    if changed.size:
        i = int(changed[0])
        raise ValueError(f"{path}: row {i} declares dimension {int(dims[i])} but row 0 declares {d}; "
                         "every row of a TEXMEX file has the same dimension")
    if rest:
        tail = _tail(path, n * row_bytes, min(rest, 4))
        if len(tail) == 4 and int(np.frombuffer(tail, "<i4")[0]) != d:
            raise ValueError(f"{path}: row {n} declares dimension {int(np.frombuffer(tail, '<i4')[0])} but "
                             f"row 0 declares {d}; every row of a TEXMEX file has the same dimension")
        raise ValueError(f"{path} ends in a truncated row: {rest} byte(s) after {n} whole row(s) of "
                         f"{row_bytes} bytes (dimension {d})")
    return rows["x"]


def _tail(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def load_descriptors(path, key: str | None = None, *, dtype=np.float32) -> np.ndarray:
    """Load a descriptor matrix as [n, d], one descriptor per row.

    Formats (chosen by extension, content verified):
      * ``.npy``: an [n, d] array (``key`` must be None).
      * ``.npz``: named [n, d] arrays; ``key`` selects one (optional if only one).
      * ``.mat``: the revisitop layout, matrices ``X`` (database) and ``Q``
        (queries) of shape d x n, transposed here to [n, d]; ``key`` selects one
        (optional if the file holds a single matrix).
      * ``.fvecs`` / ``.ivecs`` / ``.bvecs``: TEXMEX vectors (float32 / int32 /
        uint8), each row a little-endian int32 d then its d values (``key`` must
        be None). The file is memory-mapped and checked before anything is
        allocated: a positive d whose row fits in the file, the same d on every
        row, no truncated last row.

    Args:
      path: the file.
      key: array name inside .npz / .mat.
      dtype: output dtype (float32 by default; None keeps the stored dtype).

    Returns:
      [n, d] array of ``dtype``, all values finite.

    Raises:
      FileNotFoundError: no such file.
      KeyError: missing / ambiguous key.
      ValueError: not 2-D, non-finite values, content not matching the extension,
        a malformed TEXMEX file (bad or changing dimension, truncated row).
      TypeError: not numeric.
    """
    path = _check_file(path)
    suffix = path.suffix.lower()
    head = _head(path)
    if suffix == ".npy":
        if key is not None:
            raise KeyError(f"{path} is a single .npy array; key={key!r} does not apply")
        if not head.startswith(_NPY_MAGIC):
            kind = _sniff(head)
            raise ValueError(f"{path} is not a .npy file"
                             f"{' (it looks like ' + kind + ')' if kind else ''}")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable .npy array: {exc}") from exc
        what = str(path)
    elif suffix == ".npz":
        if not head.startswith(_ZIP_MAGICS):
            kind = _sniff(head)
            raise ValueError(f"{path} is not a .npz archive"
                             f"{' (it looks like ' + kind + ')' if kind else ''}")
        # read_npz checks every declared size against the file before allocating and
        # turns a truncated or corrupt archive into a ValueError naming the file.
        name = _pick(npz_names(path), key, path)
        arr = read_npz(path, [name])[name]
        what = f"{path}[{name!r}]"
    elif suffix == ".mat":
        data = _loadmat(path)
        name = _pick(sorted(k for k, v in data.items() if isinstance(v, np.ndarray)), key, path)
        arr = np.asarray(data[name])
        if arr.ndim != 2:
            raise ValueError(f"{path}[{name!r}] must be a 2-D matrix d x n, got shape {arr.shape}")
        arr = arr.T  # revisitop stores one descriptor per column
        what = f"{path}[{name!r}] (transposed from d x n)"
    elif suffix in _TEXMEX:
        if key is not None:
            raise KeyError(f"{path} is a single {suffix} matrix; key={key!r} does not apply")
        # a row starting with d = 128 begins with 0x80, a pickle's first byte: only the
        # magic strings (each an absurd d as an int32) are taken as another format
        kind = "" if head[:1] == b"\x80" else _sniff(head)
        if kind:
            raise ValueError(f"{path} is not a {suffix} file (it looks like {kind})")
        arr = _read_texmex(path, _TEXMEX[suffix])
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False) if dtype is None else arr
        what = str(path)
    else:
        raise ValueError(f"{path}: unknown descriptor format {suffix!r}; "
                         "expected .npy, .npz, .mat, .fvecs, .ivecs or .bvecs")
    return np.ascontiguousarray(_check_descriptors(arr, what, dtype))


def save_descriptors(path, /, **arrays) -> Path:
    """Save named [n, d] descriptor arrays to an ``.npz`` file, atomically.

    The archive is written to a temporary file in the same directory, fsync'ed
    and renamed over ``path`` (see ``atomic_write``), so a crash never leaves a
    truncated file. Read back with ``load_descriptors(path, key=name)``.

    Args:
      path: destination, must end in ``.npz``.
      **arrays: name -> finite numeric 2-D array (e.g. ``X=db, Q=queries``).

    Returns:
      ``path`` as a ``Path``.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"save_descriptors writes .npz archives; {path} should end in .npz")
    if not arrays:
        raise ValueError("save_descriptors needs at least one named array, e.g. X=descriptors")
    checked = {name: _check_descriptors(a, f"array {name!r}", None) for name, a in arrays.items()}

    return atomic_write(path, lambda f: np.savez(f, **checked))
