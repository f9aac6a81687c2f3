"""db/pipeline-examples.sql runs as written on a fresh schema, and what it leaves behind reads
back through the state machine as the story it tells."""
from __future__ import annotations

from pathlib import Path

from app import db
from app.api import schema, tracking

EXAMPLES = Path(__file__).resolve().parent.parent / "db" / "pipeline-examples.sql"


def test_worked_examples_run_and_leave_the_described_state(make_database):
    url = make_database("examples")
    conn = db.connect(url)
    db.migrate(conn, schema.SCHEMA)
    with conn.cursor() as cur:
        for stmt in db.split_sql(EXAMPLES.read_text()):
            cur.execute(stmt)
            cur.fetchall()
    conn.close()
    tracker = tracking.Tracker(db.ThreadConnections(url, multi_statements=True), 2, 60, 5)
    shard0, shard1 = tracker.file("20250101000000")["shards"]
    assert (shard0["event_ingest_status"], shard0["shard_splitter_status"], shard0["shard_worker_status"]) == \
        ("done", "done", "failed")
    assert "attempts exhausted" in shard0["last_error"] and "host-b/shard-worker-0" in shard0["last_error"]
    assert [h["action"] for h in shard0["history"]] == \
        ["register", "done", "claim", "done", "start", "fail", "retry", "claim", "release", "reap"]
    assert shard0["stats"]["shard-splitter"] == {"events": 250, "lines": 250}
    assert (shard1["shard_splitter_status"], shard1["shard_worker_status"]) == ("new", "new")
    assert shard1["last_error"].startswith("input missing")
    assert [h["action"] for h in shard1["history"]][-2:] == ["rewind", "rewind"]
    queue = tracker.queue("shard-splitter", 10, 0, None)["items"]
    assert [(i["filename"], i["shard"]) for i in queue] == [("20250101000000", 1)]
