"""Logging for every service: lines to stdout (supervisord collects them) and, for the
daemons, to `$SHARED_DIR/<service>/activity.log`."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACTIVITY_LOG = "activity.log"


def setup_logging(service: str, folder: Path | None, level: int = logging.INFO) -> logging.Logger:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT)
    formatter.converter = time.gmtime
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(formatter)
    root.addHandler(out)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        activity = logging.FileHandler(folder / ACTIVITY_LOG)
        activity.setFormatter(formatter)
        root.addHandler(activity)
    root.setLevel(level)
    return logging.getLogger(service)
