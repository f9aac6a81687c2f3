"""Whether a process runs, by pid (local run, temporary files of live writers)."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs; an exited child of this process is reaped rather than counted."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our own child, just reaped
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
