"""Durable writes: what reaches the disk before a checkpoint counts as committed.

A write is durable once its file is fsynced and the directory entry naming it is fsynced too; a rename is atomic
but not durable until its directory is. Plain filesystem code (no torch).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

# Errors after which os.link cannot work here but a plain copy can (cross-device, no hard-link support).
_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush one file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (creations, renames, unlinks) to stable storage."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: Path, data: dict[str, Any]) -> None:
    """Write JSON via tmp + fsync + rename, so a reader sees the old file or the whole new one. The temporary file
    has a name of its own per writer: several ranks may write the same file at once, and the last rename wins whole."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove(path: Path) -> None:
    """Remove a directory tree, a file or a (possibly dangling) symlink."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def make_durable_dir(path: Path) -> None:
    """mkdir -p, with every new directory entry fsynced: a power cut must not take the run directory (and the
    checkpoints committed in it) with it."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link src to dst; copy where the filesystem refuses links. True if a hard link was made."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno not in _NO_LINK_ERRNOS:
            raise
    shutil.copy2(src, dst)
    return False
