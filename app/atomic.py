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
from typing import BinaryIO, Iterator, Sequence

from . import owned
from .processes import pid_alive
from .safefiles import TMP_MARK, Folder, space_id, temp_writer

# A temporary file of another pid space (another host or container) whose writer cannot be
# asked: presumed alive until it has not changed for this long (a live writer writes on).
FOREIGN_IDLE_SECONDS = 900.0

_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync

__all__ = ["TMP_MARK", "atomic_write", "atomic_writes", "fsync_dir", "is_temp", "writer_alive", "FOREIGN_IDLE_SECONDS"]


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
    with atomic_writes([(path, mode)], buffering, root) as (f,):
        yield f


@contextmanager
def atomic_writes(paths: Sequence[tuple[Path, int]], buffering: int = 1 << 20,
                  root: Path | None = None) -> Iterator[list[BinaryIO]]:
    """`atomic_write` of several files of one folder (`paths`: (path, mode) pairs) at once: each
    appears whole or not at all, as one would alone, for one opening of the folder, one ledger
    write and one folder fsync instead of one each per file. All are published together, after
    every one was written and synced; an error before that publishes none (and leaves no
    temporary file)."""
    paths = [(Path(p), m) for p, m in paths]
    if not paths:
        yield []
        return
    parent = paths[0][0].parent
    if any(p.parent != parent for p, _ in paths):
        raise ValueError("atomic_writes: every file must be in one folder")
    folder = Folder(parent, root, create=True)
    temps: list[str] = []
    files: list[BinaryIO] = []
    try:
        try:
            fds = []
            for p, mode in paths:
                fd, tmp = folder.create_temp(p.name, mode)
                fds.append(fd)
                temps.append(tmp)
            owned.record_many(folder, [(p.name, os.fstat(fd).st_ino) for (p, _), fd in zip(paths, fds)])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        files = [os.fdopen(fd, "wb", buffering=buffering) for fd in fds]
        yield files
        for f in files:
            f.flush()
            _datasync(f.fileno())  # the data and the size; the name is the folder's fsync below
            f.close()
        for i, (p, _) in enumerate(paths):
            folder.replace(temps[i], p.name)
            temps[i] = ""
        folder.fsync()
    except BaseException:
        for f in files:
            f.close()
        for tmp in temps:
            if tmp:
                folder.unlink(tmp)
        raise
    finally:
        folder.close()
