"""Crash-safe file writing, and bounded reading of untrusted .npz archives and pickles.

Writers go through `atomic_write`, so a reader sees the old file or the complete
new one, never a half-written file. Readers of archives and pickles check what
a file *declares* (member sizes, array shapes, byte counts, memo indices)
against what it actually *holds* before anything is allocated, so that a tiny
corrupt or malicious file gives a one-line ``ValueError`` naming the file rather
than a raw exception from deep inside zipfile/numpy, or a huge allocation.
"""
from __future__ import annotations

import io
import os
import pickletools
import re
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

try:  # POSIX: advisory locks tell a live writer's temporary file from an orphan
    import fcntl
except ImportError:  # pragma: no cover - e.g. Windows
    fcntl = None

__all__ = ["STALE_TEMP_SECONDS", "atomic_write", "check_expansion", "check_pickle",
           "check_zip_members", "clean_stale_temps", "npz_names", "read_npz", "write_csv"]

# `atomic_write` holds an exclusive lock (``flock``) on its temporary file until the
# rename, and the OS drops it when the writer dies, however it dies: a temporary file
# nobody holds is an orphan, and the next `atomic_write` of the same target removes it
# whatever its age. Where locks are not available (no ``fcntl``), and for
# `clean_stale_temps` called on its own, a temporary file is an orphan once it is
# older than this (seconds).
STALE_TEMP_SECONDS = 3600.0

# Temporary names are ".<target name>.<8 random chars>.tmp" (tempfile.mkstemp's
# alphabet), in the target's directory.
_TEMP_SUFFIX = ".tmp"
_TEMP_RANDOM = re.compile(r"[a-z0-9_]{8}")


def _temp_target(name: str) -> str | None:
    """The target file name a temporary name of `atomic_write` belongs to, else None."""
    if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
        return None
    stem = name[1:-len(_TEMP_SUFFIX)]
    target, dot, rand = stem.rpartition(".")
    if not dot or not target or not _TEMP_RANDOM.fullmatch(rand):
        return None
    return target


def _held_by_writer(path: str) -> bool | None:
    """True if a live `atomic_write` holds ``path`` (its lock), False if nobody does (the
    file is then removed here, under the lock), None when that cannot be told (no locks)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return True  # gone already, or not ours to open: leave it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        try:  # still the file we locked (not a new one under the same name)?
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        except OSError:
            pass
        return False
    finally:
        os.close(fd)


def clean_stale_temps(directory, *, target: str | None = None,
                      older_than: float | None = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove temporary files that killed `atomic_write` calls left in ``directory``.

    A writer killed between creating its temporary file and renaming it (SIGKILL,
    power loss) cannot clean up after itself; its ``.<name>.<random>.tmp`` file
    stays behind. Only files of exactly that pattern are candidates, and never the
    one of a writer still at work: `atomic_write` holds a lock on its temporary file
    until the rename, which the OS releases when the writer dies. A candidate nobody
    holds is removed once its last modification is more than ``older_than`` seconds
    ago; ``older_than=None`` removes every one nobody holds, whatever its age (what
    `atomic_write` does for its own target). Without file locks (no ``fcntl``) the
    age alone decides (``None`` then means `STALE_TEMP_SECONDS`). ``target`` limits
    the clean-up to the temporaries of one file name. Removal is best effort (a file
    that vanishes or cannot be removed is skipped).

    Returns:
      The paths removed.
    """
    directory = Path(directory)
    if older_than is None and fcntl is None:
        older_than = STALE_TEMP_SECONDS
    now = time.time()
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        owner = _temp_target(entry.name)
        if owner is None or (target is not None and owner != target):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if older_than is not None and now - entry.stat(follow_symlinks=False).st_mtime <= older_than:
                continue
            held = _held_by_writer(entry.path)
            if held:
                continue
            if held is None:
                os.unlink(entry.path)
        except OSError:
            continue
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed


def _locked_temp(directory: Path, name: str) -> tuple[int, str]:
    """A new temporary file for ``name`` in ``directory``, opened and locked (see
    `clean_stale_temps`): (fd, path)."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=_TEMP_SUFFIX)
        if fcntl is None:
            return fd, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # a clean-up may have taken the unlocked file between mkstemp and flock
            if os.fstat(fd).st_nlink:
                return fd, tmp
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def atomic_write(path, write_fn: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically: readers see the old file or the complete new one.

    ``write_fn(f)`` writes the content to a binary file object ``f``, a temporary
    file ``.<name>.<random>.tmp`` in the same directory as ``path``. It is flushed
    and fsync'ed, then renamed over ``path`` with ``os.replace`` (atomic on POSIX
    and Windows within one file system), and the directory entry is fsync'ed where
    the OS allows. If ``write_fn`` raises, the temporary file is removed, ``path``
    is untouched and the exception propagates. The temporary file stays locked
    (``flock``) until the rename; a writer killed outright leaves it behind unlocked,
    and the next `atomic_write` of the same target removes it first
    (`clean_stale_temps`), while the file of a writer still at work is left alone.

    Args:
      path: destination file; its parent directory must exist.
      write_fn: callable taking the open binary file object.

    Returns:
      ``path`` as a ``Path``.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    clean_stale_temps(directory, target=path.name, older_than=None)
    fd, tmp = _locked_temp(directory, path.name)
    try:
        # the file object closes (and unlocks) only after the rename
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
            # mkstemp creates 0600 files: keep the mode of the file being replaced, or
            # give a new file the usual umask-based mode.
            try:
                mode = path.stat().st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o666 & ~_umask()
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return path


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # pragma: no cover - non-Linux fallback
    os.umask(umask)
    return umask


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort; not supported on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_csv(path, rows, columns=None, *, float_format: str | None = None) -> Path:
    """Write a list of dict rows as CSV, atomically (see `atomic_write`).

    ``columns`` (default: the keys of the first row) orders the columns; keys of a
    row that are not columns are ignored, missing ones are left empty.
    ``float_format`` (e.g. ``"{:.4f}"``) formats float values.
    """
    import csv

    rows = list(rows)
    if not rows and columns is None:
        raise ValueError(f"nothing to write to {path}: no rows and no columns")
    columns = list(rows[0]) if columns is None else list(columns)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        if float_format is not None:
            row = {k: (float_format.format(v) if isinstance(v, float) else v) for k, v in row.items()}
        writer.writerow(row)
    data = text.getvalue().encode()
    return atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------
# Bounded reading of zip archives (.npz, zip-format .pth)
# ---------------------------------------------------------------------------

# DEFLATE cannot expand data by more than about 1032:1; a member declaring more
# output than that for its compressed bytes is corrupt.
_DEFLATE_MAX_RATIO = 1032
_PASS_THROUGH = (MemoryError, FileNotFoundError, PermissionError, IsADirectoryError)


def check_zip_members(zf: zipfile.ZipFile, path, file_size: int) -> None:
    """Check that every member's declared sizes fit in the ``file_size`` bytes of the archive.

    zipfile trusts the sizes in the central directory when it reads a member; a
    corrupt entry could make it request gigabytes from a small file. Stored
    members must hold exactly their declared size, deflated ones at most
    1032 times their compressed size; other compression methods are refused.
    """
    for info in zf.infolist():
        where = f"{path}: member {info.filename!r}"
        if info.header_offset + info.compress_size > file_size:
            raise ValueError(f"{where} claims {info.compress_size} bytes at offset "
                             f"{info.header_offset}, past the end of the {file_size}-byte file")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise ValueError(f"{where} is stored uncompressed but declares {info.file_size} "
                                 f"bytes for {info.compress_size} stored bytes; the file is corrupt")
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 1024:
                raise ValueError(f"{where} declares {info.file_size} bytes from "
                                 f"{info.compress_size} compressed bytes, more than DEFLATE "
                                 "can produce; the file is corrupt")
        else:
            raise ValueError(f"{where} uses zip compression method {info.compress_type}; "
                             "only stored and deflated members are read")


def _npy_member_header(fp, where: str) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) from the .npy header at the start of ``fp``."""
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        return fmt.read_array_header_1_0(fp)
    if version == (2, 0):
        return fmt.read_array_header_2_0(fp)
    read = getattr(fmt, "_read_array_header", None)
    if version == (3, 0) and read is not None:
        return read(fp, version)
    raise ValueError(f"{where}: unsupported .npy format version {version}")


def _open_npz(path) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    size = path.stat().st_size
    zf = zipfile.ZipFile(path)
    try:
        check_zip_members(zf, path, size)
        members = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"{path}: member {info.filename!r} is not a .npy array")
            members[info.filename[:-4]] = info
        return zf, members
    except BaseException:
        zf.close()
        raise


def _wrap_npz_error(exc: Exception, path) -> ValueError | None:
    if isinstance(exc, _PASS_THROUGH):
        return None
    if isinstance(exc, ValueError) and str(path) in str(exc):
        return exc
    return ValueError(f"{path} is not a readable .npz archive ({type(exc).__name__}: {exc})")


def _open_npz_or_fail(path):
    """`_open_npz`, with an unreadable archive turned into the ValueError naming the file."""
    try:
        return _open_npz(path)
    except Exception as exc:
        wrapped = _wrap_npz_error(exc, path)
        if wrapped is None:
            raise
        raise wrapped from exc


def npz_names(path) -> list[str]:
    """The array names in an ``.npz`` archive, sorted; ValueError naming the file if unreadable."""
    zf, members = _open_npz_or_fail(path)
    zf.close()
    return sorted(members)


def _stored_data_offset(path, info: zipfile.ZipInfo) -> int:
    """Byte offset in the file where a stored (uncompressed) member's data starts."""
    import struct

    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: member {info.filename!r} has no local zip header; the file is corrupt")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_npz(path, names=None, *, mmap: bool = False) -> dict[str, np.ndarray]:
    """Read arrays of an ``.npz`` archive, allocating no more than the file can back.

    Each member's .npy header is checked before its array is allocated: the
    shape times the item size must be exactly the bytes the member holds, and
    those must fit in the file (see `check_zip_members`). Object arrays are
    refused (they would need pickle). A truncated or corrupt archive (bad zip
    structure, CRC mismatch, bad header) raises a ``ValueError`` naming the file.

    Args:
      path: the ``.npz`` file.
      names: array names to read (default: all of them); a missing name raises
        ``KeyError``.
      mmap: map the uncompressed members (``np.savez`` writes them so) read-only into
        memory (``np.memmap``: nothing is read until used, no CRC check) instead of
        reading them; compressed members are read as usual.

    Returns:
      ``{name: ndarray}`` in the order of ``names`` (archive order by default).
    """
    zf, members = _open_npz_or_fail(path)
    with zf:
        if names is None:
            names = list(members)
        else:
            names = list(names)
            missing = [n for n in names if n not in members]
            if missing:
                raise KeyError(f"{path} has no array {missing[0]!r} (available: {sorted(members)})")
        out = {}
        for name in names:
            info = members[name]
            where = f"{path}: array {name!r}"
            try:
                with zf.open(info) as fp:
                    shape, fortran, dtype = _npy_member_header(fp, where)
                    if dtype.hasobject:
                        raise ValueError(f"{where} holds Python objects (dtype {dtype}), which "
                                         "are not read")
                    count = 1
                    for dim in shape:
                        count *= int(dim)
                    needed = fp.tell() + count * dtype.itemsize
                    if needed != info.file_size:
                        raise ValueError(
                            f"{where} declares shape {tuple(shape)} of {dtype} ({needed} bytes with "
                            f"its header) but its member holds {info.file_size} bytes; the file "
                            "is corrupt")
                    if mmap and info.compress_type == zipfile.ZIP_STORED and count:
                        offset = _stored_data_offset(path, info) + fp.tell()
                        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape),
                                              order="F" if fortran else "C")
                        continue
                    fp.seek(0)
                    out[name] = np.lib.format.read_array(fp, allow_pickle=False)
            except Exception as exc:
                wrapped = _wrap_npz_error(exc, path)
                if wrapped is None:
                    raise
                raise wrapped from exc
        return out


# ---------------------------------------------------------------------------
# Bounded reading of pickles
# ---------------------------------------------------------------------------

class _BoundedReader:
    """Read-only view of ``f`` from its position to ``end``: no read asks for more than remains."""

    def __init__(self, f, end: int):
        self._f, self._end = f, end

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        left = max(self._end - self._f.tell(), 0)
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._f.readline(max(self._end - self._f.tell(), 0))


_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def check_pickle(f, path) -> None:
    """Check that the pickle starting at ``f``'s position asks for no more than the file holds.

    The C unpickler allocates what a counted opcode (BINBYTES8, BINUNICODE8,
    FRAME, ...) declares before it reads the bytes, and grows its memo to the
    largest index a PUT names: a pickle of a dozen bytes can thus allocate
    gigabytes. This walks the opcodes (``pickletools.genops``) with reads bounded
    by the end of the file, without building any object, and refuses counts that
    run past the end and memo indices beyond the number of opcodes so far. ``f``
    must be seekable; its position is restored.

    Raises:
      ValueError: naming ``path``, for a truncated, malformed or oversized pickle.
    """
    start = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(start)
    try:
        for n_ops, (op, arg, pos) in enumerate(pickletools.genops(_BoundedReader(f, end))):
            if op.name == "FRAME":
                left = end - (pos + 9 if pos is not None else f.tell())
                if arg > left:
                    raise ValueError(f"a frame of {arg} bytes at offset {pos}, but only "
                                     f"{left} bytes remain")
            elif op.name in _MEMO_PUTS and arg > n_ops:
                raise ValueError(f"memo index {arg} at offset {pos} after only {n_ops} opcodes")
    except Exception as exc:
        if isinstance(exc, _PASS_THROUGH):
            raise
        raise ValueError(f"{path} is not a valid pickle ({exc})") from exc
    finally:
        f.seek(start)


_CONTAINERS = (list, tuple, dict, set, frozenset)


def check_expansion(obj, limit: int, path) -> None:
    """Refuse a loaded pickle whose containers, expanded, exceed ``limit`` slots.

    Pickles share objects through their memo: ``a = [x, x]; b = [a, a]; ...``
    takes a few bytes per level but doubles at each level, so code that walks or
    converts the result (``np.asarray`` of nested lists, copying containers)
    would allocate exponentially more than the file holds. Each slot of an
    honest pickle costs at least one byte, so ``limit`` is typically the file
    size. Self-referencing containers are refused as well.

    Raises:
      ValueError: naming ``path``.
    """
    if not isinstance(obj, _CONTAINERS):
        return
    sizes: dict[int, int] = {}
    active: set[int] = set()  # containers on the current path (a repeat there is a cycle)
    # Iterative post-order walk: deep nesting must not hit the recursion limit.
    stack = [(obj, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if done:
            total = len(children) + sum(sizes[id(c)] for c in children
                                        if isinstance(c, _CONTAINERS))
            sizes[key] = total
            active.discard(key)
            if total > limit:
                raise ValueError(f"{path}: the pickle's shared containers expand to more than "
                                 f"{limit} items, far more than the file holds; refusing it")
            continue
        if key in sizes:
            continue
        if key in active:
            raise ValueError(f"{path}: the pickle holds a self-referencing container; refusing it")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if isinstance(c, _CONTAINERS))
