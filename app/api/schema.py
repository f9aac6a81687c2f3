"""The tracking tables: their migrations (db/migrations/tracking/) applied once per process
under the database's migration lock, and again after a table vanished under the running API.
"""
from __future__ import annotations

import threading

from .. import db
from ..config import MySQLURL
from .store import Store

SCHEMA = "tracking"
TABLES = ("pipeline_tracking", "pipeline_transitions", "pipeline_claim_lock", "pipeline_task_counts",
          "pipeline_transition_counts", "pipeline_rejected_counts")
# pipeline_tracking.last_error and pipeline_transitions.error are VARCHAR(2000).
ERROR_MAX = 2000
# pipeline_rejected_counts.reason is VARCHAR(64).
REASON_MAX = 64
SQL_PRESENT = ("SELECT table_name AS t FROM information_schema.tables WHERE table_schema=DATABASE() "
               f"AND table_name IN ({','.join(repr(t) for t in TABLES)})")


class Schema:
    def __init__(self, store: Store, url: MySQLURL):
        self.store = store
        self.url = url
        self._ready = False
        self._lock = threading.Lock()

    def ensure(self) -> None:
        """Migrate the database unless this process already did (one thread does it)."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            db.ensure_database(self.url)
            db.migrate(self.store.conns.get(), SCHEMA)
            self._ready = True

    def lost(self) -> None:
        """A table is gone (SchemaMissing): the next `ensure` migrates again, which re-creates it."""
        self._ready = False

    def present(self) -> list[str]:
        """Which of the tracking tables exist, sorted."""
        rows = self.store.read(SQL_PRESENT)
        return sorted(r["t"] for r in rows)
