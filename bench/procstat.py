"""CPU seconds and peak memory of running processes, read from /proc (Linux only).

The bench samples these at the start and the end of a measured window: a process's CPU is
utime + stime of every process of its tree (gunicorn's workers are children of the master),
plus the children's times the kernel has folded in once they were waited for.
"""
from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                kids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def tree(pid: int) -> list[int]:
    """The process and all its descendants alive now."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of the process tree rooted at `pid`, reaped children included."""
    total = 0
    for p in tree(pid):
        fields = _stat_fields(p)
        if fields:
            # Fields 14-17 of stat (utime, stime, cutime, cstime), counted from field 3 here.
            total += sum(int(x) for x in fields[11:15])
    return total / TICK


def peak_rss_mib(pid: int) -> dict[int, float]:
    """VmHWM of each process of the tree, in MiB (a process's own peak since it started)."""
    peaks = {}
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[p] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return peaks
