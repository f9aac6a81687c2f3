"""What the tracking operations refuse, and why; the HTTP layer (service.py) picks the codes."""
from __future__ import annotations

from typing import Any


class TaskError(Exception):
    """A request the rules refuse as it stands (a bad argument). `body` is the JSON answer."""

    def __init__(self, message: str, **body: Any):
        super().__init__(message)
        self.body = {"error": message, **body}


class NotFound(TaskError):
    """No such file or task."""


class Conflict(TaskError):
    """The task is not in a status the transition starts from, or is held by another owner."""


class SchemaMissing(Exception):
    """A tracking table vanished under a running API (dropped by hand): migrate again."""
