"""Read PyTorch ``.pth`` checkpoints into numpy arrays without importing torch.

Two on-disk formats are supported:

* the **legacy** format (``torch.save(..., _use_new_zipfile_serialization=False)``
  and every checkpoint written before PyTorch 1.6): a plain sequence of pickles --
  magic number, protocol version, system info, the object pickle (whose
  ``persistent_load`` references storages by key), the list of storage keys -- and
  then, per storage in that order, an 8-byte little-endian element count followed
  by the raw data;
* the **zip** format (``torch.save`` default since 1.6): a zip archive
  ``<name>/data.pkl`` + ``<name>/data/<key>`` (one raw file per storage) and an
  optional ``<name>/byteorder`` record.

Unpickling is restricted: only ``collections.OrderedDict``, a few harmless
builtins and the torch tensor/storage rebuild functions are resolved (mapped to
numpy stand-ins); any other global raises :class:`pickle.UnpicklingError`, so a
checkpoint cannot execute code on load (same spirit as ``torch.load(weights_only=True)``).
Reading is also bounded by what the file holds: pickles are checked opcode by
opcode before they are loaded (`retrieval_jax.files.check_pickle`), storage
sizes and zip members against the file size, and every tensor view against the
stored elements backing it (no stride-0 or overlapping blow-ups), so a small
corrupt or malicious file raises a ``ValueError`` instead of allocating gigabytes.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, NamedTuple

import numpy as np

from ..files import atomic_write, check_expansion, check_pickle, check_zip_members

__all__ = ["load_torch_state_dict", "load_torch_pickle", "save_torch_zip"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _bfloat16():
    try:
        import ml_dtypes  # shipped with jax
        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover
        return None


# torch storage class name -> numpy dtype (little-endian).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}


class _StorageType(NamedTuple):
    """Stand-in for a ``torch.*Storage`` class: only its element dtype matters."""
    name: str
    dtype: Any


class _StorageRef(NamedTuple):
    """A storage referenced by the object pickle; data resolved later (legacy) or now (zip)."""
    key: str
    dtype: Any
    numel: int
    view: tuple | None  # legacy (view_key, offset, size) or None


class _TensorRef(NamedTuple):
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _storage_type(name: str) -> _StorageType:
    if name == "BFloat16Storage":
        dt = _bfloat16()
        if dt is None:  # pragma: no cover
            raise pickle.UnpicklingError("bfloat16 tensors need the ml_dtypes package")
        return _StorageType(name, dt)
    if name not in _STORAGE_DTYPES:
        raise pickle.UnpicklingError(f"unsupported torch storage type torch.{name}")
    return _StorageType(name, _STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _bytes(*args):
    """``bytes`` as pickles use it (from bytes, a list of ints, or text plus an encoding).

    ``bytes(n)`` would allocate n zero bytes that the file does not hold, so an
    integer argument is refused.
    """
    if len(args) > 3 or (args and isinstance(args[0], int)):
        raise pickle.UnpicklingError("builtins.bytes with an integer size is not accepted in "
                                     "a checkpoint: it would allocate bytes the file does not hold")
    if args and not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
        raise pickle.UnpicklingError(f"builtins.bytes of a {type(args[0]).__name__} is not "
                                     "accepted in a checkpoint")
    return bytes(*args)


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "bytes"): _bytes,
    ("builtins", "slice"): slice,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: str, load_storage):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._load_storage = load_storage  # callable(_StorageRef) -> _StorageRef | np.ndarray

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _storage_type(name)
        if module == "torch" and name == "Size":
            return tuple
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to load global {module}.{name}; only tensors, storages and "
            "plain containers are allowed in a state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unknown persistent id {pid!r}")
        # legacy: ('storage', type, key, location, numel, view_metadata)
        # zip:    ('storage', type, key, location, numel)
        stype, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"{self._path}: bad storage type {stype!r}")
        return self._load_storage(_StorageRef(str(key), stype.dtype, int(numel), view))


def _as_tensor(ref: _TensorRef, flat: np.ndarray, path: str) -> np.ndarray:
    """The tensor view (offset, size, stride) of ``flat``, copied out as a numpy array.

    The view must be backed by the storage's elements actually in the file: it
    must end inside the storage (the last element it touches is
    ``offset + sum((size - 1) * stride)``), use positive strides along every
    dimension longer than 1 (stride 0 would repeat one stored element into an
    arbitrarily large array, negative strides run backwards out of the storage),
    and have no more elements than the storage holds from ``offset`` on.
    """
    size, stride, offset = ref.size, ref.stride, ref.offset
    where = f"{path}: tensor view (offset {offset}, size {size}, stride {stride})"
    if len(size) != len(stride):
        raise ValueError(f"{path}: tensor size {size} and stride {stride} differ in rank")
    if len(size) > 64 or any(n < 0 for n in size):
        raise ValueError(f"{where} has a negative size or too many dimensions; the file is corrupt")
    if offset < 0 or offset > flat.size:
        raise ValueError(f"{where} starts outside its storage of {flat.size} elements; "
                         "the file is corrupt")
    if any(n == 0 for n in size):
        return np.zeros(size, flat.dtype.newbyteorder("="))
    if any(st <= 0 for n, st in zip(size, stride) if n > 1):
        raise ValueError(f"{where} has a zero or negative stride; only views that the stored "
                         "elements back one for one are read")
    count = 1
    for n in size:
        count *= n
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= flat.size or count > flat.size - offset:
        raise ValueError(f"{where} runs past its storage of {flat.size} elements; the file is "
                         "corrupt")
    item = flat.dtype.itemsize
    strides = tuple((s if n > 1 else 1) * item for n, s in zip(size, stride))
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=strides)
    return np.array(view, dtype=flat.dtype.newbyteorder("="), copy=True)


def _resolve(obj, storages: dict, path: str):
    """Replace every ``_TensorRef`` in a nested container by its numpy array."""
    if isinstance(obj, _TensorRef):
        st = obj.storage
        flat = storages[st.key] if isinstance(st, _StorageRef) else st
        if isinstance(st, _StorageRef) and st.view is not None:  # legacy storage view
            view_key, view_offset, view_size = st.view
            view_offset, view_size = int(view_offset), int(view_size)
            if view_offset < 0 or view_size < 0 or view_offset + view_size > flat.size:
                raise ValueError(f"{path}: storage view (offset {view_offset}, size {view_size}) "
                                 f"runs past its storage of {flat.size} elements; the file is "
                                 "corrupt")
            flat = flat[view_offset: view_offset + view_size]
        return _as_tensor(obj, flat, path)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve(v, storages, path)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve(v, storages, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, storages, path) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_resolve(v, storages, path) for v in obj)
    return obj


def _load_one(f, path: str, load_storage):
    """One pickle from ``f``'s position, bounded by what the file holds.

    `check_pickle` first walks the opcodes so that no declared length or memo
    index can make the unpickler allocate more than the file holds;
    `check_expansion` then refuses shared containers that would blow up when
    `_resolve` copies them.
    """
    start = f.tell()
    check_pickle(f, path)
    obj = _Unpickler(f, path, load_storage).load()
    check_expansion(obj, f.tell() - start + 64, path)
    return obj


def _load_plain(f, path: str):
    """One pickled header object, under the same restricted globals as the payload."""

    def no_storage(ref):
        raise pickle.UnpicklingError(f"{path}: storage reference outside the object pickle")

    return _load_one(f, path, no_storage)


def _load_legacy(f, path: str):
    file_size = os.fstat(f.fileno()).st_size
    magic = _load_plain(f, path)
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number {magic!r})")
    protocol = _load_plain(f, path)
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy protocol version {protocol!r}")
    sys_info = _load_plain(f, path)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    refs: dict[str, _StorageRef] = {}

    def remember(ref: _StorageRef) -> _StorageRef:
        refs.setdefault(ref.key, ref)
        return ref

    obj = _load_one(f, path, remember)
    keys = _load_plain(f, path)
    if not isinstance(keys, (list, tuple)):
        raise ValueError(f"{path}: storage key list is a {type(keys).__name__}, not a list")
    storages = {}
    for key in keys:
        key = str(key)
        header = f.read(8)
        if len(header) != 8:
            raise ValueError(f"{path}: truncated file while reading storage {key!r}")
        (numel,) = struct.unpack("<q", header)
        if key not in refs:
            raise ValueError(f"{path}: storage {key!r} is listed but never referenced")
        dtype = refs[key].dtype
        nbytes = numel * dtype.itemsize
        left = file_size - f.tell()
        if numel < 0 or nbytes > left:  # checked before reading: f.read(n) allocates n
            raise ValueError(f"{path}: truncated file: storage {key!r} declares {numel} elements "
                             f"({nbytes} bytes) but only {left} bytes remain")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{path}: truncated file: storage {key!r} needs {nbytes} bytes, "
                             f"got {len(raw)}")
        dt = dtype if little else dtype.newbyteorder(">")
        storages[key] = np.frombuffer(raw, dtype=dt)
    missing = set(refs) - set(storages)
    if missing:
        raise ValueError(f"{path}: storages {sorted(missing)} are referenced but not stored")
    return _resolve(obj, storages, path)


def _load_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        check_zip_members(zf, path, os.path.getsize(path))
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError(f"{path}: zip file without <name>/data.pkl; not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = zf.read(prefix + "byteorder").decode().strip() != "big"
        storages: dict[str, np.ndarray] = {}

        def load(ref: _StorageRef):
            if ref.key not in storages:
                name = f"{prefix}data/{ref.key}"
                try:
                    raw = zf.read(name)
                except KeyError:
                    raise ValueError(f"{path}: storage file {name} is missing") from None
                dt = ref.dtype if little else ref.dtype.newbyteorder(">")
                if len(raw) % dt.itemsize:
                    raise ValueError(f"{path}: storage {name} has {len(raw)} bytes, not a "
                                     f"multiple of {dt.itemsize}")
                storages[ref.key] = np.frombuffer(raw, dtype=dt)
            return ref

        obj = _load_one(io.BytesIO(zf.read(pkl[0])), path, load)
        return _resolve(obj, storages, path)


def load_torch_pickle(path) -> Any:
    """Load a ``.pth`` file (legacy or zip format) with tensors as numpy arrays.

    Returns the pickled object (usually an ``OrderedDict``) with every tensor
    replaced by a C-contiguous ``np.ndarray`` of the stored dtype.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as f:
            return _load_legacy(f, path)
    except OSError:
        raise
    except Exception as exc:  # corrupt bytes surface as many pickle/struct/zip error types
        if isinstance(exc, ValueError) and path in str(exc):
            raise
        raise ValueError(f"{path}: cannot read as a PyTorch checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc


def _flatten(obj, prefix: str, out: dict):
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, np.ndarray):
            out[name] = v
        elif isinstance(v, dict):
            _flatten(v, name + ".", out)


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
    """Load a PyTorch state dict as ``{name: np.ndarray}`` without torch.

    Accepts a bare state dict or a training checkpoint wrapping it under
    ``"state_dict"`` / ``"model"`` / ``"model_state_dict"``. A ``"module."``
    prefix (``nn.DataParallel``) is stripped. Non-tensor entries are dropped.
    """
    obj = load_torch_pickle(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    for wrapper in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and any(isinstance(v, np.ndarray) for v in inner.values()):
            obj = inner
            break
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    if not out:
        raise ValueError(f"{path}: no tensors found in the checkpoint")
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------
# Writer (zip format), so tests and users can produce torch-readable files
# without torch.
# ---------------------------------------------------------------------------

class _Global:
    """Marker pickled as the global ``module.name`` (which need not be importable here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise TypeError(f"{self.module}.{self.name} is only a pickling marker")


class _Storage(NamedTuple):
    storage_type: _Global
    key: str
    numel: int


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64))
                       for i in range(len(self.shape)))
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit arbitrary globals
    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None

    def _save_marker(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = _save_marker


def _storage_name(dtype: np.dtype) -> str:
    bf16 = _bfloat16()
    if bf16 is not None and dtype == bf16:
        return "BFloat16Storage"
    for name, dt in _STORAGE_DTYPES.items():
        if name != "UntypedStorage" and dt == dtype.newbyteorder("<"):
            return name
    raise TypeError(f"dtype {dtype} has no PyTorch storage equivalent")


def save_torch_zip(state_dict: dict, path, *, archive_name: str = "archive") -> None:
    """Write ``{name: np.ndarray}`` as a zip-format ``.pth`` (what ``torch.save`` writes).

    Each array becomes one contiguous little-endian storage; ``torch.load`` and
    :func:`load_torch_state_dict` both read the result. Meant for tests and for
    exporting weights without torch. The file is written atomically
    (`retrieval_jax.files.atomic_write`): a writer killed mid-way leaves the
    previous file intact, never a half-written archive.
    """
    tensors, obj = {}, collections.OrderedDict()
    for i, (name, value) in enumerate(state_dict.items()):
        arr = np.array(value, order="C", copy=True)  # (ascontiguousarray turns 0-d into 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        storage = _Storage(_Global("torch", _storage_name(arr.dtype)), str(i), int(arr.size))
        tensors[str(i)] = arr
        obj[str(name)] = _Tensor(storage, tuple(int(d) for d in arr.shape))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{archive_name}/data.pkl", buf.getvalue())
            zf.writestr(f"{archive_name}/byteorder", "little")
            for key, arr in tensors.items():
                zf.writestr(f"{archive_name}/data/{key}", arr.tobytes())
            zf.writestr(f"{archive_name}/version", "3\n")

    atomic_write(os.fspath(path), write)
