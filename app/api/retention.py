"""Retention of pipeline_transitions: rows older than TRANSITIONS_WINDOW are deleted by the API
itself, by one process of one instance at a time (a named lock of the database), in short
batches along the primary key so no pass holds locks long or scans the table.

Rows are appended in time order, so the oldest rows are the lowest ids: a pass reads the first
row (one index lookup); while it is older than the window, it deletes up to BATCH rows below a
bound found by an index walk of BATCH entries. The figures /metrics serves are counters kept
beside the log (migration 0004), so pruning the log changes none of them; what it takes away
is old files' history in GET /files/{name} and old minutes of /metrics/throughput.
"""
from __future__ import annotations

from .store import Store

BATCH = 5000


class Retention:
    def __init__(self, store: Store, window_seconds: float):
        self.store = store
        self.window_us = int(window_seconds * 1_000_000)

    def lock_name(self) -> str:
        database = self.store.read("SELECT DATABASE() AS d")[0]["d"]
        return f"pipeline_transitions.prune.{database}"[:64]

    def prune(self, max_batches: int = 100) -> int | None:
        """Delete what is older than the window; rows deleted, or None when another process
        holds the lock (it is pruning)."""
        name = self.lock_name()
        if self.store.read("SELECT GET_LOCK(%s, 0) AS got", (name,))[0]["got"] != 1:
            return None
        try:
            deleted = 0
            for _ in range(max_batches):
                first = self.store.read(
                    "SELECT id, at < NOW(3) - INTERVAL %s MICROSECOND AS old FROM pipeline_transitions "
                    "ORDER BY id LIMIT 1", (self.window_us,))
                if not first or not first[0]["old"]:
                    break
                bound = self.store.read("SELECT id FROM pipeline_transitions WHERE id >= %s ORDER BY id "
                                        "LIMIT 1 OFFSET %s", (first[0]["id"], BATCH))
                upto = bound[0]["id"] if bound else 2**63 - 1
                n = self.store.execute("DELETE FROM pipeline_transitions WHERE id < %s "
                                       "AND at < NOW(3) - INTERVAL %s MICROSECOND", (upto, self.window_us))
                deleted += n
                if n == 0:
                    break
            return deleted
        finally:
            self.store.read("SELECT RELEASE_LOCK(%s) AS released", (name,))
