"""Writes that land whole or not at all, even across a crash or a power cut.

A file is written under a temporary name beside its target, flushed to disk (fsync), renamed over
the target, and the directory is flushed too (the rename itself is then on disk). A directory is
filled under a temporary name, every file in it flushed, and then takes the target's place: on
Linux by swapping the two names in one step (``renameat2(RENAME_EXCHANGE)``), so that at no moment
is there nothing at the target path; elsewhere, or on a file system without the swap, by two
renames with the old directory moved aside for the instant between them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path, suffix: str = "tmp") -> Path:
    """A hidden name beside ``path`` that no other writer picks."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_directory(directory: Path) -> None:
    # Makes renames and new names in it durable; not possible on every platform (Windows), hence the guard.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and directory under ``root`` (and root itself) flushed to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_directory(Path(directory))


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it takes ``path``'s place (an existing
    directory there is replaced only then), on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target`` (same file system), replacing what was there."""
    if not target.exists():
        os.replace(new, target)
    elif exchange(new, target):
        shutil.rmtree(new)  # holds the old contents now
    else:
        old = temporary_name(target, "old")
        os.replace(target, old)  # the one instant without a directory at target
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_directory(target.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step (Linux 3.15+, on file systems that support it);
    False where that is not possible, and nothing has changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))
