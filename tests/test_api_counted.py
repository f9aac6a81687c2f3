"""Migration 0007: the count triggers skip a session with @pipeline_counted set (a transaction
that writes its own count changes)."""
from __future__ import annotations

from app import db


def test_the_count_triggers_skip_a_session_that_counts_itself(make_database):
    """Migration 0007: with @pipeline_counted set, an insert or a status change of
    pipeline_tracking moves no counter; unset, the triggers count as before."""
    url = make_database("gate")
    conn = db.connect(url)
    try:
        db.migrate(conn, "tracking")
        with conn.cursor() as cur:
            cur.execute("SET @pipeline_counted = 1")
            cur.execute("INSERT INTO pipeline_tracking (filename, shard) VALUES ('20250101000000', 0)")
            cur.execute("UPDATE pipeline_tracking SET event_ingest_status='done'")
            conn.commit()
            cur.execute("SELECT COUNT(*) FROM pipeline_task_counts WHERE n <> 0")
            assert cur.fetchone()[0] == 0
            cur.execute("SET @pipeline_counted = NULL")
            cur.execute("INSERT INTO pipeline_tracking (filename, shard) VALUES ('20250101000001', 1)")
            cur.execute("UPDATE pipeline_tracking SET shard_splitter_status='started' WHERE shard=0")
            conn.commit()
            cur.execute("SELECT stage, shard, status, n FROM pipeline_task_counts WHERE n <> 0 ORDER BY 1, 2, 3")
            # The gated rows were never counted: only what moved afterwards shows (-1 from 0).
            assert cur.fetchall() == (("event-ingest", 1, "new", 1), ("mysql-sender", 1, "new", 1),
                                      ("shard-splitter", 0, "new", -1), ("shard-splitter", 0, "ready", -1),
                                      ("shard-splitter", 0, "started", 1), ("shard-splitter", 1, "new", 1),
                                      ("shard-worker", 1, "new", 1))
    finally:
        conn.close()
