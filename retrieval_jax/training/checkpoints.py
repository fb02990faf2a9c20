"""Atomic ``.npz`` checkpoints of arbitrary pytrees (e.g. a `TrainState`).
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ..files import atomic_write, read_npz

__all__ = ["save_checkpoint", "load_checkpoint"]


_META = "__retrieval_jax_meta__"


def _path_entry(key) -> list:
    tu = jax.tree_util
    if isinstance(key, tu.DictKey):
        k = key.key
        if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise TypeError(f"checkpoint dict keys must be str or int, got {type(k).__name__}")
        return ["d", k]
    if isinstance(key, tu.SequenceKey):
        return ["s", key.idx]
    if isinstance(key, tu.GetAttrKey):
        return ["a", key.name]
    if isinstance(key, tu.FlattenedIndexKey):
        return ["s", key.key]
    raise TypeError(f"unsupported pytree key {key!r}")


def _storable(arr: np.ndarray) -> np.ndarray:
    """Arrays whose dtype .npy cannot describe (bfloat16, fp8) are stored widened."""
    if np.dtype(arr.dtype.str) == arr.dtype:
        return arr
    if jnp.issubdtype(arr.dtype, jnp.floating):
        return arr.astype(np.float32)
    return arr.astype(np.int64)


def _is_number_dtype(dtype) -> bool:
    """bool, integer, floating (bfloat16 and fp8 included) or complex."""
    return dtype == np.bool_ or any(jnp.issubdtype(dtype, t) for t in (jnp.integer, jnp.floating,
                                                                     jnp.complexfloating))


def _default_write(fileobj, arrays: dict) -> None:
    np.savez(fileobj, **arrays)


def _check_dict_keys(node) -> None:
    """A TypeError for a dict whose keys a checkpoint cannot store: keys must be all str or
    all int (no bool), as JAX sorts a dict's keys to flatten it and JSON keeps str and int."""
    if not isinstance(node, dict) or not node:
        return
    kinds = {type(k) for k in node}
    bad = [k for k in node if not isinstance(k, (str, int)) or isinstance(k, bool)]
    if bad:
        raise TypeError(f"checkpoint dict keys must be str (or all int), got the {type(bad[0]).__name__} key "
                        f"{bad[0]!r}; rename the key to a string")
    if len({str if issubclass(t, str) else int for t in kinds}) > 1:
        ints = [k for k in node if isinstance(k, int)][:3]
        strs = [k for k in node if isinstance(k, str)][:3]
        raise TypeError(f"checkpoint dict keys must be all str or all int, got a dict mixing int keys {ints} "
                        f"and str keys {strs}; use str keys (e.g. str(k)) throughout")


def _childless(node) -> bool:
    """True for a pytree node without children: an empty dict / list / tuple, None, an
    empty NamedTuple or dataclass; `save_checkpoint` records these so they load back."""
    _check_dict_keys(node)
    if node is None:
        return True
    children = jax.tree_util.tree_flatten(node, is_leaf=lambda child: child is not node)[0]
    return not children


def _empty_kind(node) -> str:
    """How an empty node loads back without a target: None, [] (lists and tuples) or {}."""
    if node is None:
        return "none"
    return "list" if isinstance(node, (list, tuple)) else "dict"


def _check_path(path: str) -> str:
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a file name, got {type(path).__name__}")
    if not path:
        raise ValueError("path is empty; give the checkpoint file to write, e.g. 'ckpt.npz'")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint path {path} is a directory; give a file inside it, "
                                f"e.g. {os.path.join(path, 'ckpt.npz')}")
    return path


def save_checkpoint(path, pytree, *, write_fn: Callable | None = None) -> None:
    """Atomically write a pytree of arrays to ``path`` (an ``.npz`` file).

    Leaves are flattened and stored under their key paths
    (``jax.tree_util.keystr``, e.g. ``"['params']['w']"``); a small JSON entry keeps
    each path's structure and original dtype. The file is first written to a
    temporary file in the same directory, flushed and fsync'ed, then moved over
    ``path`` with ``os.replace``: a crash at any point leaves either the previous
    checkpoint or the new one, never a truncated file.

    Args:
      path: destination file (the name is used as is).
      pytree: any pytree whose leaves are number (or bool) arrays or scalars (e.g. a
        `TrainState`, params dicts, a `Whitening`).
      write_fn: (file object, {name: ndarray}) -> None; default ``np.savez``
        (use ``np.savez_compressed`` to compress).

    Empty containers (``[]``, ``()``, ``{}``, an empty NamedTuple) and ``None`` hold no
    leaf; their key paths are kept in the metadata too, so a load without a target gives
    them back (as ``[]``, ``{}`` and ``None``) where they were.

    Raises:
      TypeError: a leaf of object or string dtype (it would need pickle to be read back);
        a dict key that is not a str or int (or a bool), or a dict mixing str and int keys.
      ValueError: two leaves with the same key path; an empty ``path``.
      IsADirectoryError: ``path`` is a directory.
    """
    path = _check_path(path)
    write_fn = _default_write if write_fn is None else write_fn
    nodes_with_paths, _ = jax.tree_util.tree_flatten_with_path(pytree, is_leaf=_childless)
    arrays, meta, empty = {}, [], []
    for at, (key_path, leaf) in enumerate(nodes_with_paths):
        if _childless(leaf):
            empty.append({"path": [_path_entry(k) for k in key_path], "kind": _empty_kind(leaf), "at": at})
            continue
        name = jax.tree_util.keystr(key_path) or "<root>"
        if name == _META or name in arrays:
            raise ValueError(f"cannot store leaf with key path {name!r}")
        arr = np.asarray(jax.device_get(leaf))
        if not _is_number_dtype(arr.dtype):
            raise TypeError(f"checkpoint leaf {name} has dtype {arr.dtype}; a checkpoint stores number "
                            "(and bool) arrays only, not Python objects or strings")
        meta.append({"name": name, "path": [_path_entry(k) for k in key_path], "dtype": str(arr.dtype)})
        arrays[name] = _storable(arr)
    arrays[_META] = np.array(json.dumps({"version": 1, "leaves": meta, "empty": empty}))

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: write_fn(f, arrays))


class _Empty:
    """An empty container or None of a checkpoint, in `_build_nested`'s entries."""

    def __init__(self, kind: str):
        self.kind = kind

    def value(self):
        return {"none": None, "list": [], "dict": {}}[self.kind]


def _build_nested(entries):
    """Nested dicts/lists from (path, value) pairs; attributes become dict keys; an `_Empty`
    value becomes its None, [] or {}."""
    if len(entries) == 1 and not entries[0][0]:
        value = entries[0][1]
        return value.value() if isinstance(value, _Empty) else value
    root: dict = {}
    seq_nodes = set()  # prefixes whose children are sequence indices
    for path, value in entries:
        node, prefix = root, ()
        for i, (kind, key) in enumerate(path):
            if kind == "s":
                seq_nodes.add(prefix)
            if i == len(path) - 1:
                node[key] = value
            else:
                node = node.setdefault(key, {})
                prefix = prefix + (key,)

    def convert(node, prefix):
        if isinstance(node, _Empty):
            return node.value()
        if not isinstance(node, dict):
            return node
        out = {k: convert(v, prefix + (k,)) for k, v in node.items()}
        if prefix in seq_nodes:
            if not all(type(k) is int for k in out) or set(out) != set(range(len(out))):
                raise ValueError(f"sequence {list(prefix)} has items {sorted(map(repr, out))}, "
                                 f"not 0..{len(out) - 1}")
            return [out[i] for i in range(len(out))]
        return out

    return convert(root, ())


_PATH_KINDS = {"d": (str, int), "s": (int,), "a": (str,)}


def _valid_key_path(key_path) -> bool:
    return isinstance(key_path, list) and all(
        isinstance(k, list) and len(k) == 2 and isinstance(k[0], str) and k[0] in _PATH_KINDS
        and isinstance(k[1], _PATH_KINDS[k[0]]) and not isinstance(k[1], bool)
        for k in key_path)


def _checkpoint_meta(arrays: dict, path) -> tuple[list[dict], list[dict]]:
    """The validated leaf list and empty-node list of a checkpoint's JSON metadata entry.

    Each leaf needs a ``name`` that is an array of the file, a key ``path`` of
    ``[kind, key]`` pairs (kind 'd' dict key, 's' sequence index, 'a' attribute)
    and a ``dtype`` numpy/JAX understands; each empty node (optional list ``empty``;
    files written before it have none) a key ``path``, a ``kind`` ('none', 'list',
    'dict') and its position ``at`` among all leaves and empty nodes. Anything else
    means the file is corrupt or not a checkpoint, reported as a ValueError naming
    the file.
    """
    raw = arrays.get(_META)
    if raw is None:
        raise ValueError(f"{path} is not a retrieval_jax checkpoint (no metadata entry)")
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise ValueError(f"{path}: the checkpoint metadata should be one JSON string, got "
                         f"{raw.dtype}{list(raw.shape)}")
    try:
        meta = json.loads(str(raw[()]))
    except ValueError as exc:
        raise ValueError(f"{path}: the checkpoint metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("leaves"), list):
        raise ValueError(f"{path}: the checkpoint metadata has no list of leaves")
    empty = meta.get("empty", [])
    if not isinstance(empty, list):
        raise ValueError(f"{path}: the checkpoint metadata's list of empty nodes is not a list")
    total = len(meta["leaves"]) + len(empty)
    names, paths = set(), set()
    for i, entry in enumerate(meta["leaves"]):
        bad = f"{path}: checkpoint metadata leaf {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{bad} has no name")
        name = entry["name"]
        if name not in arrays or name == _META or name in names:
            raise ValueError(f"{bad} names array {name!r}, which the file does not hold "
                             "(or holds twice)")
        names.add(name)
        key_path = entry.get("path")
        if not _valid_key_path(key_path):
            raise ValueError(f"{bad} ({name}) has a malformed key path {key_path!r}")
        key = tuple(tuple(k) for k in key_path)
        if key in paths or (not key and total > 1):
            raise ValueError(f"{bad} ({name}) repeats key path {key_path!r}"
                             if key in paths else f"{bad} ({name}) has an empty key path but "
                             "is not the only leaf")
        paths.add(key)
        try:
            if not isinstance(entry.get("dtype"), str):
                raise TypeError
            entry["jnp_dtype"] = jnp.dtype(entry["dtype"])
        except (TypeError, ValueError):
            raise ValueError(f"{bad} ({name}) has an unknown dtype {entry.get('dtype')!r}") from None
        if not _is_number_dtype(entry["jnp_dtype"]):
            raise ValueError(f"{bad} ({name}) has dtype {entry['dtype']!r}, not a number dtype; "
                             "checkpoints hold number arrays only")
        if arrays[name].dtype.kind not in "biufc":
            raise ValueError(f"{bad} ({name}) is stored as {arrays[name].dtype}, not a number array")
    positions = set()
    for i, entry in enumerate(empty):
        bad = f"{path}: checkpoint metadata empty node {i}"
        if (not isinstance(entry, dict) or entry.get("kind") not in ("none", "list", "dict")
                or not _checks.is_int(entry.get("at")) or not 0 <= entry["at"] < total
                or entry["at"] in positions or not _valid_key_path(entry.get("path"))):
            raise ValueError(f"{bad} is malformed: {entry!r}")
        positions.add(entry["at"])
        key = tuple(tuple(k) for k in entry["path"])
        if key in paths or (not key and total > 1):
            raise ValueError(f"{bad} repeats key path {entry['path']!r}" if key in paths else
                             f"{bad} has an empty key path but is not the only node")
        paths.add(key)
    return meta["leaves"], empty


def load_checkpoint(path, target=None):
    """Load a checkpoint written by `save_checkpoint`.

    Args:
      path: the ``.npz`` file.
      target: optional pytree with the structure to restore (e.g. a freshly
        initialised `TrainState`); its leaves give only the structure and the
        expected shapes. Without it, the result is nested dicts/lists following
        the stored key paths (dataclass attributes become dict keys).
    Returns:
      The pytree with ``jax.Array`` leaves in their original dtypes. Without a target,
      empty containers and None come back as ``[]``, ``{}`` and ``None`` where they were
      saved (tuples and NamedTuples as lists).
    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError (naming the file): the file is truncated, corrupt or not such a
        checkpoint (archive, sizes and metadata are all checked, see
        `retrieval_jax.files.read_npz`), or its key paths/shapes do not match ``target``.
    """

    arrays = read_npz(os.fspath(path))
    leaf_meta, empty = _checkpoint_meta(arrays, path)
    meta = {"leaves": leaf_meta}
    leaves = {}
    for entry in meta["leaves"]:
        leaves[entry["name"]] = jnp.asarray(arrays[entry["name"]], dtype=entry["jnp_dtype"])
    if target is None:
        # leaves and empty nodes in their saved order (dict keys come back in that order)
        entries = [(e["path"], leaves[e["name"]]) for e in meta["leaves"]]
        for e in sorted(empty, key=lambda e: e["at"]):
            entries.insert(e["at"], (e["path"], _Empty(e["kind"])))
        try:
            return _build_nested(entries)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: the checkpoint's key paths do not form a tree "
                             f"({type(exc).__name__}: {exc})") from None

    t_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [jax.tree_util.keystr(p) or "<root>" for p, _ in t_leaves]
    missing = [n for n in names if n not in leaves]
    extra = sorted(set(leaves) - set(names))
    if missing or extra:
        raise ValueError(f"checkpoint {path} does not match the target structure: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}")
    out = []
    for name, (_, ref) in zip(names, t_leaves):
        ref_shape = tuple(np.shape(ref))
        if tuple(leaves[name].shape) != ref_shape:
            raise ValueError(f"checkpoint leaf {name} has shape {tuple(leaves[name].shape)}, "
                             f"target expects {ref_shape}")
        out.append(leaves[name])
    return jax.tree_util.tree_unflatten(treedef, out)
