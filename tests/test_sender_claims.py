"""The sender claims several small files a request, and one at a time after a slow file."""
from __future__ import annotations

import logging

from app.client import Task
from app.config import Settings
from app.daemon import Context, Done
from app.sender import stage
from app.sender.loader import LoadResult
from app.shutdown import StopFlag


def test_claim_limit_follows_how_fast_files_load(monkeypatch):
    settings = Settings.from_env({"CLAIM_LIMIT": "6"})
    sender = stage.Sender(settings, 0)
    assert sender.claim_limit == 1                          # nothing known yet: one file at a time
    ctx = Context(StopFlag(), logging.getLogger("test"))
    clock = [100.0]
    took = [0.05]

    def load_file(*args, **kwargs):
        clock[0] += took[0]
        return LoadResult("f", 500, 500, 0, "load_data", took[0], "x")
    monkeypatch.setattr(stage.loader, "load_file", load_file)
    monkeypatch.setattr(stage.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sender.shard_db, "get", lambda: None)
    [out] = sender.process([Task("20260101000000", 0)], ctx)
    assert isinstance(out, Done) and out.events == 500
    assert sender.claim_limit == 6                          # a small file: the next claim takes several
    took[0] = 2 * stage.FAST_LOAD_SECONDS
    sender.process([Task("20260101000001", 0)], ctx)
    assert sender.claim_limit == 1                          # a slow one: back to one at a time


def test_a_claims_files_load_together_each_with_its_own_outcome(make_database, tmp_path):
    """Sender.process on a real shard database: the claim's small files in one transaction, a
    missing one sent back (Rewind), a bad one failed, each other file still loaded once."""
    import orjson

    from app import db, layout
    from app.daemon import Failed, Rewind
    from tests import servers
    from tests.test_sender import prepared_rows, write_prepared

    url = make_database("shard")
    settings = Settings.from_env({"MYSQL_SHARD_0_URL": url.secret_text(), "SHARED_DIR": str(tmp_path),
                                  "SHARD_COUNT": "2"})
    sender = stage.Sender(settings, 0)
    ctx = Context(StopFlag(), logging.getLogger("test"))
    names = [f"2026010100000{i}" for i in range(5)]
    for i, name in enumerate(names):
        if i == 1:
            continue  # missing
        rows = prepared_rows(name, 0, 10 + i, start=100 * i)
        write_prepared(tmp_path, name, 0, rows + ([b"not json\n"] if i == 3 else []))
    conn = sender.shard_db.get()
    before = servers.session_statements(conn)
    try:
        outcomes = sender.process([Task(n, 0) for n in names], ctx)
        assert [type(o) for o in outcomes] == [Done, Rewind, Done, Failed, Done]
        assert [o.events for o in outcomes if isinstance(o, Done)] == [10, 12, 14]
        assert "prepared line 14" in outcomes[3].reason
        # the three good files: claim + LOAD + COMMIT; then the missing and the bad one as
        # load_file takes them alone (its claim and rollbacks: 3 and 2), where one file at a
        # time was 3 statements a good file
        assert servers.session_statements(sender.shard_db.get()) - before - 1 == 3 + 5
        check = db.connect(url)
        with check.cursor() as cur:
            cur.execute("SELECT source_file, COUNT(*) FROM events GROUP BY source_file ORDER BY source_file")
            assert cur.fetchall() == ((names[0], 10), (names[2], 12), (names[4], 14))
            cur.execute("SELECT COUNT(*) FROM loaded_files")
            assert cur.fetchone() == (3,)
        check.close()
        again = sender.process([Task(n, 0) for n in (names[0], names[2])], ctx)
        assert [o.stats.get("already_loaded") for o in again] == [True, True]
        assert layout.worker_output(tmp_path, names[0], 0).exists()
        assert orjson.loads(layout.worker_output(tmp_path, names[0], 0).read_bytes().split(b"\n")[0])["shard"] == 0
    finally:
        sender.teardown()
