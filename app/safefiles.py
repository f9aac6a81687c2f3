"""Opening entries of the shared folder as untrusted: regular files only, no link followed.

Anyone who can write `$SHARED_DIR` can plant a symbolic link, a FIFO or a device where the
pipeline expects a file (`events/<tick>.event-ingest.txt -> /proc/self/environ`), or a link at
a folder's name (`shard-worker-0 -> $HOME`). So every file of the shared folder is opened here:

- folders are walked from a trusted root (SHARED_DIR as the operator configured it) one
  component at a time with `O_NOFOLLOW | O_DIRECTORY`, and files are opened relative to the
  folder's descriptor, so no link anywhere below the root is followed;
- a file is `lstat`ed before it is opened (a FIFO or device is refused without being opened:
  opening a FIFO blocks, a tape drive rewinds), opened with `O_NOFOLLOW | O_NONBLOCK`, and
  `fstat`ed: only a regular file is handed out (`Refused` otherwise, naming what it is);
- temporary files are created with `O_CREAT | O_EXCL | O_NOFOLLOW` under an unpredictable
  name and renamed within the same folder descriptor.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".tmp-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Refused(Exception):
    """An entry the pipeline will not open: a link, FIFO, device, socket or folder where a
    regular file belongs (or a link or file where a folder belongs). Nothing of it was read."""

    def __init__(self, path: Path | str, what: str, expected: str = "a regular file"):
        self.path = Path(path)
        self.what = what
        super().__init__(f"{path} is {what}, not {expected}: refused (no link, FIFO or device "
                         f"in the shared folder is ever opened)")


def describe(mode: int) -> str:
    """What an `st_mode` is, in words for an error message."""
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "of an unknown kind"


# -- folders ------------------------------------------------------------------------------

def _open_below(fd: int, name: str, shown: Path, create: bool, mode: int) -> int:
    if create:
        try:
            os.mkdir(name, mode, dir_fd=fd)
        except FileExistsError:
            pass
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise Refused(shown, describe(os.lstat(name, dir_fd=fd).st_mode), "a folder") from None


class Folder:
    """An open folder below a trusted `root`: no component below the root may be a link.

    Without `root`, only the folder's own last component is checked (its parent is trusted).
    `create`: missing components are created (mode `mode`, less the umask)."""

    def __init__(self, path: Path, root: Path | None = None, create: bool = False, mode: int = 0o755):
        path = Path(path)
        if root is None and path.name in ("", ".."):
            root, parts = path, ()
        elif root is None:
            root, parts = path.parent, (path.name,)
        else:
            parts = path.relative_to(root).parts
        self.path = path
        if create:
            Path(root).mkdir(parents=True, exist_ok=True)
        fd = os.open(root, _DIR_FLAGS)
        try:
            shown = Path(root)
            for part in parts:
                shown = shown / part
                child = _open_below(fd, part, shown, create, mode)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __enter__(self) -> "Folder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lstat(self, name: str) -> os.stat_result:
        return os.lstat(name, dir_fd=self.fd)

    def open_read(self, name: str, buffering: int = -1) -> BinaryIO:
        """A regular file of this folder, for reading; `Refused` for anything else (a FIFO or
        device is never opened), FileNotFoundError when absent."""
        shown = self.path / name
        st = os.lstat(name, dir_fd=self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(shown, describe(st.st_mode))
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
                raise Refused(shown, "a symbolic link") from None
            raise
        return _regular(fd, shown, "rb", buffering)

    def open_append(self, name: str, mode: int = 0o600) -> BinaryIO:
        """A regular file of this folder opened for appending (created if missing)."""
        try:
            fd = os.open(name, _APPEND_FLAGS, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise Refused(self.path / name, describe(os.lstat(name, dir_fd=self.fd).st_mode)) from None
            raise
        return _regular(fd, self.path / name, "ab", -1)

    def create_temp(self, final: str, mode: int = 0o644) -> tuple[int, str]:
        """A new file for `final`'s content, under a temporary name no one could have
        planted anything at: (its descriptor, its name)."""
        for _ in range(16):
            name = temp_name(final)
            try:
                return os.open(name, _CREATE_FLAGS, mode, dir_fd=self.fd), name
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, f"no free temporary name for {self.path / final}")

    def replace(self, src: str, dst: str) -> None:
        """Rename within this folder (a link at `dst` is replaced, never followed)."""
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def link(self, src: str, dst: str) -> None:
        """Give `src` the second name `dst` in this folder; FileExistsError if `dst` exists."""
        os.link(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def unlink(self, name: str, missing_ok: bool = True) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def fsync(self) -> None:
        os.fsync(self.fd)


def _regular(fd: int, shown: Path, mode: str, buffering: int) -> BinaryIO:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(shown, describe(st.st_mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


# -- single files ---------------------------------------------------------------------------

def open_read(path: Path, root: Path | None = None, buffering: int = -1) -> BinaryIO:
    """`path`, a regular file reached without following any link below `root` (without
    `root`: its folder and itself are not links)."""
    path = Path(path)
    with Folder(path.parent, root) as folder:
        return folder.open_read(path.name, buffering)


def open_named(path: Path, buffering: int = -1) -> BinaryIO:
    """A file an operator named on the command line: links are followed (the operator chose
    the path), but only a regular file is opened (a FIFO would block, a device never ends)."""
    path = Path(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(path, describe(st.st_mode))
    return _regular(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC), path, "rb", buffering)


def under(path: Path, root: Path | None) -> Path | None:
    """`root` if `path` lies below it, else None (then only `path`'s own folder is checked)."""
    if root is None:
        return None
    try:
        Path(path).relative_to(root)
    except ValueError:
        return None
    return Path(root)


# -- temporary names ------------------------------------------------------------------------

def _compute_space() -> str:
    """Which pid namespace of which running kernel, on which host name, this process lives in.
    A pid says whether its process is alive only inside that space: every container's program
    may be pid 1, and containers of one host share the host's boot id, hosts share nothing.
    The host name makes hosts that share a kernel and pid namespace (UTS namespaces, as the
    multi-host test makes them) spaces of their own too: another host's files are never
    judged by a local pid."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname().encode()
    try:
        ns = os.readlink("/proc/self/ns/pid").encode()
    except OSError:
        ns = socket.gethostname().encode()
    return hashlib.blake2s(boot + b"/" + ns + b"/" + socket.gethostname().encode(), digest_size=5).hexdigest()


_SPACE: str | None = None


def space_id() -> str:
    """10 hex digits naming this process's pid space (see `_compute_space`), cached."""
    global _SPACE
    if _SPACE is None:
        _SPACE = _compute_space()
    return _SPACE


def temp_name(final: str) -> str:
    """`<final>.tmp-<space>-<pid>-<random>`: says who writes it (space and pid, for
    `atomic.writer_alive`) and cannot be guessed (a link planted at a guessed name would
    make O_EXCL fail: a denial of service, never a write elsewhere)."""
    return f"{final}{TMP_MARK}{space_id()}-{os.getpid()}-{secrets.token_hex(4)}"


def temp_writer(name: str) -> tuple[str | None, int] | None:
    """(space, pid) of a temporary name, None when it is not one. Names of earlier releases
    (`.tmp-<pid>`) have no space: None in its place."""
    if TMP_MARK not in name:
        return None
    tail = name.rsplit(TMP_MARK, 1)[1]
    parts = tail.split("-")
    try:
        if len(parts) == 1:
            return None, int(parts[0])
        if len(parts) == 3 and len(parts[0]) == 10:
            return parts[0], int(parts[1])
    except ValueError:
        pass
    return None
