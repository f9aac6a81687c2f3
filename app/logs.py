"""Logging for every service: lines to stdout (supervisord collects them) and, for the
daemons, to `$SHARED_DIR/<service>/activity.log` (mode 0600: error texts may quote event
data; opened without following links, see app/safefiles.py)."""
from __future__ import annotations

import logging
import io
import os
import sys
import time
from pathlib import Path

from .safefiles import Folder, under

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACTIVITY_LOG = "activity.log"
ACTIVITY_LOG_MODE = 0o600


class ActivityLog(logging.FileHandler):
    """`<folder>/activity.log`, appended to; a link, FIFO or device planted at its name is
    refused at start (never written through), and a log left readable by others is made
    private."""

    def __init__(self, folder: Path, root: Path | None = None):
        self.folder, self.root = Path(folder), under(folder, root)
        super().__init__(self.folder / ACTIVITY_LOG, encoding="utf-8")

    def _open(self):
        with Folder(self.folder, self.root, create=True) as folder:
            raw = folder.open_append(ACTIVITY_LOG, ACTIVITY_LOG_MODE)
        st = os.fstat(raw.fileno())
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.fchmod(raw.fileno(), ACTIVITY_LOG_MODE)
        return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", write_through=True)


def setup_logging(service: str, folder: Path | None, level: int = logging.INFO,
                  root_dir: Path | None = None) -> logging.Logger:
    """`root_dir`: the trusted folder above `folder` (SHARED_DIR): no link below it is followed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT)
    formatter.converter = time.gmtime
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(formatter)
    root.addHandler(out)
    if folder is not None:
        activity = ActivityLog(folder, root_dir)
        activity.setFormatter(formatter)
        root.addHandler(activity)
    root.setLevel(level)
    return logging.getLogger(service)
