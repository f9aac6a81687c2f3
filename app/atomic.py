"""Files that appear whole or not at all: write to a temporary name, fsync, rename.

The temporary file is created with O_EXCL | O_NOFOLLOW under an unguessable name in the
destination's folder, opened without following links (app/safefiles.py), and renamed within
that same open folder: a link planted at either name is never written through.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from . import owned
from .processes import pid_alive
from .safefiles import TMP_MARK, Folder, space_id, temp_writer

# A temporary file of another pid space (another host or container) whose writer cannot be
# asked: presumed alive until it has not changed for this long (a live writer writes on).
FOREIGN_IDLE_SECONDS = 900.0

__all__ = ["TMP_MARK", "atomic_write", "fsync_dir", "is_temp", "writer_alive", "FOREIGN_IDLE_SECONDS"]


def is_temp(path: Path) -> bool:
    return TMP_MARK in Path(path).name


def writer_alive(path: Path, other_than_me: bool = False, mtime: float | None = None) -> bool:
    """Whether the process that writes a temporary file may still be running, so its
    unfinished file must be left alone (`other_than_me`: our own files do not count).

    Within this pid space the pid answers. A file of another space (another container or
    host sharing the folder, where every program may be pid 1) is presumed alive unless it
    has not changed for FOREIGN_IDLE_SECONDS (`mtime`: its modification time, if known)."""
    writer = temp_writer(Path(path).name)
    if writer is None:
        return False
    space, pid = writer
    if space is not None and space != space_id():
        if mtime is None:
            try:
                mtime = os.lstat(path).st_mtime
            except FileNotFoundError:
                return False
        return time.time() - mtime < FOREIGN_IDLE_SECONDS
    if pid == os.getpid():
        return not other_than_me
    return pid_alive(pid)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path, buffering: int = 1 << 20, root: Path | None = None,
                 mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it becomes `path` atomically, on error it vanishes.

    No reader ever sees a half-written `path`, and a crash mid-write leaves only a
    `*.tmp-<space>-<pid>-<random>` file, which no stage treats as complete. The writer is noted
    in this process's ledger in that folder first (app/owned.py), so a daemon of another host
    sharing the folder leaves the file alone. `root`: the
    trusted folder above `path` (no link below it is followed; default: only `path`'s own
    folder is checked); `mode`: the file's permissions (less the umask).
    """
    path = Path(path)
    folder = Folder(path.parent, root, create=True)
    try:
        fd, tmp = folder.create_temp(path.name, mode)
        try:
            owned.record(folder, path.name, os.fstat(fd).st_ino)  # before the name: app/owned.py
        except BaseException:
            os.close(fd)
            folder.unlink(tmp)
            raise
        f = os.fdopen(fd, "wb", buffering=buffering)
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            folder.replace(tmp, path.name)
            folder.fsync()
        except BaseException:
            f.close()
            folder.unlink(tmp)
            raise
    finally:
        folder.close()
