"""Crash-safe file writing."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


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
