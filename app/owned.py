"""Which host wrote a finished file of a shared stage folder, so a stopping daemon removes only
what its own host wrote (docs/operations.md, "Growing past one machine").

A finished file's name is the contract's (`<filename>.shard-splitter.<shard>.txt`): it cannot
carry its writer. So every writer notes `<inode> <name>` in a ledger of its own in the same
folder, `.owned.<host>.<space>-<pid>`, before the file gets its name (`atomic_write`): whoever
sees the name can already read who wrote it. A rename keeps the inode, and the inode tells a
file apart from an earlier one of the same name another host wrote.

The rule `daemon.empty_folder` follows:
- a file another host's ledger names (same name, same inode) stays: it is that host's, written
  for the next stage, or being read by it;
- every other finished file goes (this host's, or nobody's: a leftover), so on a single host a
  stopped daemon still leaves its folder empty, as the contract says;
- temporary files go only when their writer is this process or a dead one of this host
  (`atomic.writer_alive`; their names carry host space and pid);
- this host's ledgers of processes no longer alive go with their files; other hosts' never.

Ledgers are read as untrusted (a regular file, bounded, malformed lines skipped): the worst a
forged one can do is make a daemon spare a file, or remove one it would have removed anyway.
"""
from __future__ import annotations

import os
import re
import socket

from .processes import pid_alive
from .safefiles import Folder, Refused, space_id

LEDGER_MARK = ".owned."
MAX_LEDGER_BYTES = 16 << 20
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def host_tag() -> str:
    """This host's name as a ledger names it (no dots, no path characters)."""
    return _HOST_UNSAFE.sub("_", socket.gethostname())[:64] or "unknown"


def ledger_name() -> str:
    """This process's ledger: host, pid space and pid (a restarted daemon starts a new one)."""
    return f"{LEDGER_MARK}{host_tag()}.{space_id()}-{os.getpid()}"


def is_ledger(name: str) -> bool:
    return name.startswith(LEDGER_MARK)


def parse_ledger_name(name: str) -> tuple[str, str, int] | None:
    """(host, space, pid) of a ledger's name; None for anything else."""
    if not is_ledger(name):
        return None
    host, _, tail = name[len(LEDGER_MARK):].rpartition(".")
    space, _, pid = tail.partition("-")
    if not host or len(space) != 10 or not pid.isdigit():
        return None
    return host, space, int(pid)


def record_many(folder: Folder, entries: list[tuple[str, int]]) -> None:
    """Note that this process writes these files (name, inode) in `folder`, in one write."""
    with folder.open_append(ledger_name()) as ledger:
        ledger.write(b"".join(f"{inode} {name}\n".encode() for name, inode in entries))


def written(folder: Folder, names: list[str]) -> dict[tuple[str, int], set[str]]:
    """(name, inode) -> the hosts whose ledgers among `names` say they wrote it."""
    out: dict[tuple[str, int], set[str]] = {}
    for ledger in names:
        parsed = parse_ledger_name(ledger)
        if parsed is None:
            continue
        try:
            with folder.open_read(ledger) as f:
                data = f.read(MAX_LEDGER_BYTES)
        except (FileNotFoundError, Refused):
            continue
        for line in data.splitlines():
            inode, _, name = line.partition(b" ")
            if inode.isdigit() and name:
                out.setdefault((name.decode(errors="replace"), int(inode)), set()).add(parsed[0])
    return out


def spare(owners: dict[tuple[str, int], set[str]], name: str, inode: int) -> bool:
    """Whether a finished file must stay: another host says it wrote it."""
    return bool(owners.get((name, inode), set()) - {host_tag()})


def removable_ledger(name: str) -> bool:
    """A ledger of this host whose process is this one or gone (its files are removed with it)."""
    parsed = parse_ledger_name(name)
    if parsed is None:
        return False
    host, space, pid = parsed
    if host != host_tag() or space != space_id():
        return False
    return pid == os.getpid() or not pid_alive(pid)
