"""Files that appear whole or not at all: write to a temporary name, fsync, rename."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .processes import pid_alive

TMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def is_temp(path: Path) -> bool:
    return TMP_MARK in path.name


def writer_alive(path: Path, other_than_me: bool = False) -> bool:
    """Whether the process named by a temporary file (`*.tmp-<pid>`) is still running, so its
    unfinished file must be left alone (`other_than_me`: our own files do not count)."""
    try:
        pid = int(path.name.rsplit(TMP_MARK, 1)[1])
    except (IndexError, ValueError):
        return False
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
def atomic_write(path: Path, buffering: int = 1 << 20) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it becomes `path` atomically, on error it vanishes.

    No reader ever sees a half-written `path`, and a crash mid-write leaves only a
    `*.tmp-<pid>` file, which no stage treats as complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    f = open(tmp, "wb", buffering=buffering)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
