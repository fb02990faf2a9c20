"""Crash-safe file writing."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "write_csv"]


def atomic_write(path, write_fn: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically: readers see the old file or the complete new one.

    ``write_fn(f)`` writes the content to a binary file object ``f``, a temporary
    file in the same directory as ``path``. It is flushed and fsync'ed, then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows within
    one file system), and the directory entry is fsync'ed where the OS allows.
    If ``write_fn`` raises, the temporary file is removed, ``path`` is untouched
    and the exception propagates.

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
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    import io

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
