"""The shard worker's compact state (db/migrations/worker/0003): an upgrade from 0002 keeps what
the old tables knew (dedup keys, orders, balances), and the retention windows prune by
themselves: rows older than DEDUP_WINDOW, ORDER_WINDOW and REPLAY_WINDOW go, rows inside stay,
and a re-run inside the window is byte-identical. The real WorkerStage decides real files on
the test server (no API: the stage is called as its daemon loop calls it)."""
from __future__ import annotations

import logging
import shutil
import struct
import threading
from decimal import Decimal

import orjson
import pymysql
import pytest

from app import db, layout
from app.client import Task
from app.config import Settings
from app.daemon import Context, TaskFailed
from app.events import event_key
from app.worker.ledger import ALL_BALANCES
from app.worker.rules import CODE, ORPHAN_RETURN, buyer_of, minute_of
from app.worker import stage as stage_module
from app.worker import state as state_module
from app.worker.stage import WorkerStage
from app.worker.state import WorkerState
from tests import servers
from tests.test_worker_support import purchase, refund, restock, shop_status, ts

F0, F1, F2, F3, F4 = "20260301115950", "20260301120000", "20260301120010", "20260301120020", "20260301120030"


class Worker:
    def __init__(self, url, shared, **env):
        self.url, self.shared = url, shared
        self.settings = Settings.from_env(dict(servers.service_env(url, shared, servers.free_port()), **env))
        self.stage = WorkerStage(self.settings, 0)
        self.ctx = Context(threading.Event(), logging.getLogger("test"))
        self.stage.setup(self.ctx)

    def decide(self, filename: str, lines: list[bytes]):
        path = layout.splitter_output(self.shared, filename, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(x + b"\n" for x in lines))
        return self.again(filename)

    def again(self, filename: str):
        layout.worker_output(self.shared, filename, 0).unlink(missing_ok=True)
        layout.worker_rejected(self.shared, filename, 0).unlink(missing_ok=True)
        [outcome] = self.stage.process([Task(filename, 0)], self.ctx)
        return outcome

    def outputs(self, filename: str) -> tuple[bytes, bytes]:
        return (layout.worker_output(self.shared, filename, 0).read_bytes(),
                layout.worker_rejected(self.shared, filename, 0).read_bytes())

    def reasons(self, filename: str) -> list[str]:
        return [orjson.loads(x)["reason"] for x in self.outputs(filename)[1].splitlines()]

    def close(self):
        self.stage.teardown()


@pytest.fixture
def worker(pipeline_db, shared_dir):
    made = []

    def make(**env):
        w = Worker(pipeline_db, shared_dir, **env)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()


def sql(url, query, args=()):
    return servers.query(url, query, args)


def older_worker_schema(tmp_path, monkeypatch, last: int):
    """Make db.migrate know the worker migrations only up to `last` (an upgrade test's starting
    point); returns the real folder, to set back before migrating on."""
    current_sql, old_sql = db.SQL_DIR, tmp_path / "db"
    shutil.copytree(db.SQL_DIR, old_sql)
    for later in (old_sql / "migrations" / "worker").glob("*.sql"):
        if int(later.name[:4]) > last:
            later.unlink()
    monkeypatch.setattr(db, "SQL_DIR", old_sql)
    return current_sql


def test_upgrade_from_0002_keeps_dedup_keys_orders_and_balances(make_database, shared_dir, tmp_path, monkeypatch):
    url = make_database("upg")
    current_sql = older_worker_schema(tmp_path, monkeypatch, last=2)
    conn = db.connect(url)
    assert [m.version for m in db.migrate(conn, "worker")] == [1, 2]
    old_restock, old_status = restock(1000, 2, 1, 5), shop_status(1500, 4, True)
    with conn.cursor() as cur:   # what the 0002 worker left after deciding F0
        cur.execute("INSERT INTO worker_shards (shard, newest_event) VALUES (0, %s)", (ts(2000),))
        cur.execute("INSERT INTO worker_files (id, shard, filename, lines_decided, complete, newest_event) "
                    "VALUES (7, 0, %s, 4, 1, %s)", (F0, ts(2000)))
        for raw in (old_restock, old_status):
            cur.execute("INSERT INTO worker_seen (shard, event_key, file_id) VALUES (0, %s, 7)",
                        (event_key(orjson.loads(raw)),))
        cur.execute("INSERT INTO worker_seen (shard, event_key, file_id) VALUES (0, '3:555', 7)")   # a rejected return
        cur.execute("INSERT INTO worker_orders (order_id, shard, user_id, shop_id, good_id, qty, amount, debited, "
                    "credit, file_id, line) VALUES (900, 0, 1, 2, 1, 1, 10.00, 1, NULL, 7, 2), "
                    "(-901, 0, 1, 2, 1, 1, 5.00, 1, NULL, 7, 3)")
        cur.execute("INSERT INTO worker_balances (user_id, balance) VALUES (1, 985.00)")
    conn.close()
    monkeypatch.setattr(db, "SQL_DIR", current_sql)

    w = worker_for(url, shared_dir)
    try:
        assert sql(url, "SELECT version FROM schema_migrations WHERE component='worker' ORDER BY 1") == \
            [(m.version,) for m in db.migrations("worker")]
        assert sql(url, "SELECT COUNT(*) FROM worker_seen") == [(4,)]   # 2 keys x 2 minutes
        assert sql(url, "SELECT shard, order_id FROM worker_return_keys") == [(0, 555)]
        assert sql(url, "SELECT order_id, state FROM worker_orders ORDER BY order_id") == [(-901, 1), (900, 1)]
        lines = [old_restock, old_status,                              # duplicates of F0's events
                 refund(3000, 555, user=9, amount=1, shop=2),          # duplicate of F0's rejected return
                 purchase(3100, 900, user=1, shop=2, price=10),        # duplicate order
                 refund(3200, 900, user=1, amount=10, shop=2),         # return of F0's purchase: credited
                 refund(3300, -901, user=1, amount=5)]                 # the same, no shop_id
        w.decide(F1, lines)
        prepared, _ = w.outputs(F1)
        assert w.reasons(F1) == ["duplicate"] * 4
        assert [(x["order_id"], x["shop_id"]) for x in map(orjson.loads, prepared.splitlines())] == \
            [(900, 2), (-901, 2)]
        assert sql(url, f"SELECT balance FROM ({ALL_BALANCES}) b WHERE user_id=1") == [(Decimal("1000.00"),)]
        assert sql(url, "SELECT order_id, state FROM worker_orders ORDER BY order_id") == [(-901, 2), (900, 2)]
        assert not {"worker_seen_0002", "worker_orders_0002", "worker_seen_compact", "worker_orders_compact"} & \
            {r[0] for r in sql(url, "SELECT table_name FROM information_schema.tables WHERE table_schema=DATABASE()")}
    finally:
        w.close()


def worker_for(url, shared, **env) -> Worker:
    return Worker(url, shared, **env)


def test_a_worker_seen_dropped_by_hand_comes_back_compact(pipeline_db):
    conn = db.connect(pipeline_db)
    try:
        db.migrate(conn, "worker")
        with conn.cursor() as cur:
            cur.execute("DROP TABLE worker_seen")
        assert [str(m) for m in db.migrate(conn, "worker")] == ["worker 0001_worker_state", "worker 0003_compact_state"]
        assert db.migrate(conn, "worker") == []
    finally:
        conn.close()
    columns = sql(pipeline_db, "SELECT column_name FROM information_schema.columns WHERE table_schema=DATABASE() "
                               "AND table_name='worker_seen' ORDER BY ordinal_position")
    assert columns == [("shard",), ("bucket",), ("hash",)]


MINUTE = 60_000


def test_windows_prune_old_rows_keep_recent_ones_and_reruns_inside_stay_identical(worker):
    w = worker(DEDUP_WINDOW="5m", ORDER_WINDOW="10m", REPLAY_WINDOW="1h", HOLD_SECONDS="1h")
    url = w.url
    f1 = [restock(0, 2, 1, 5),
          purchase(10, 100, user=1, shop=2, price=10),
          refund(20, 200, user=1, amount=3, shop=2),       # held: its purchase comes in F2
          refund(30, 300, user=1, amount=3, shop=4)]       # held, never released
    w.decide(F1, f1)
    f2 = [purchase(40, 200, user=1, shop=2, price=3),      # releases the hold of order 200
          restock(6 * MINUTE, 2, 1, 1)]                    # 6 minutes of event time later
    w.decide(F2, f2)
    first_f2 = w.outputs(F2)
    # DEDUP_WINDOW 5m: F1's dedup keys (minute 0) are gone, F2's are there; the orders (10m) stay
    assert sql(url, "SELECT COUNT(*) FROM worker_seen") == [(1,)]
    assert sql(url, "SELECT order_id FROM worker_orders ORDER BY order_id") == [(100,), (200,)]
    assert sql(url, "SELECT order_id, state FROM worker_holds ORDER BY order_id") == [(200, "released"),
                                                                                      (300, "held")]
    # inside REPLAY_WINDOW a re-run is byte-identical, state untouched
    assert w.again(F2).events == 3 and w.outputs(F2) == first_f2
    # 11 minutes on: F1's orders (its newest event: minute 0) leave the ledger, F2's (minute 6)
    # stay; a return of one of F1's orders is held, not credited
    w.decide(F3, [restock(11 * MINUTE, 2, 1, 1)])
    assert sql(url, "SELECT order_id FROM worker_orders") == [(200,)]
    assert w.decide(F4, [refund(11 * MINUTE + 1, 100, user=1, amount=10, shop=2)]).stats["held"] == 1
    assert w.outputs(F4) == (b"", b"")
    # REPLAY_WINDOW is wall time: F1 and F2 decided "two hours ago"; the next pass forgets their
    # decisions and the hold F2 resolved, keeps the active holds, and refuses to re-run them
    before = sql(url, "SELECT COUNT(*) FROM worker_batches WHERE file_id IN "
                      "(SELECT id FROM worker_files WHERE filename=%s)", (F3,))
    with db.connect(url).cursor() as cur:
        cur.execute("UPDATE worker_files SET updated_at = NOW(3) - INTERVAL 2 HOUR WHERE filename IN (%s, %s)",
                    (F1, F2))
    w.stage._prune()
    assert sql(url, "SELECT filename, pruned FROM worker_files ORDER BY filename") == [(F1, 1), (F2, 1), (F3, 0),
                                                                                      (F4, 0)]
    assert sql(url, "SELECT f.filename FROM worker_batches b JOIN worker_files f ON f.id=b.file_id "
                    "ORDER BY f.filename") == [(F3,)] * before[0][0] + [(F4,)]
    assert sql(url, "SELECT order_id, state FROM worker_holds ORDER BY order_id") == [(100, "held"), (300, "held")]
    with pytest.raises(TaskFailed, match="REPLAY_WINDOW"):
        w.again(F2)
    assert w.again(F3).events == 1 and w.again(F4).stats["held"] == 1


def test_pruning_is_bounded_per_pass(worker):
    w = worker(DEDUP_WINDOW="1h")
    w.decide(F1, [restock(i, 2, 1, 1) for i in range(300)])
    w.decide(F2, [restock(3 * MINUTE, 2, 1, 1)])
    # inside the hour; minute 0 is sealed (SEAL_MINUTES before the clock), minute 3 is not
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 300}
    # sealed keys are packed (0005): pruning counts their rows, a row per part of the minute
    [(rows,)] = sql(w.url, "SELECT COUNT(*) FROM worker_seen_sealed")
    assert 120 < rows < 240
    passes = [w.stage.state.prune(60, 86400, 86400, max_rows=100, step=40) for _ in range(3)]
    assert passes == [{"worker_seen_sealed": 120}, {"worker_seen_sealed": rows - 120}, {}]
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 0}


def keys(url) -> dict[str, int]:
    """Dedup keys by table: worker_seen a row each, worker_seen_sealed packed 8 bytes each (0005)."""
    return {"worker_seen": sql(url, "SELECT COUNT(*) FROM worker_seen")[0][0],
            "worker_seen_sealed": int(sql(url, "SELECT COALESCE(SUM(LENGTH(hashes)), 0) FROM worker_seen_sealed")[0][0])
            // 8}


def test_old_minutes_are_sealed_and_their_duplicates_and_late_keys_still_found(worker):
    """Dedup keys SEAL_MINUTES behind the shard clock move to worker_seen_sealed (0004); a
    duplicate of a moved key is still a duplicate for a worker that never saw it (a new
    process: nothing recent, so it inserts without looking up), a late new key of a sealed
    minute is accepted and recorded (in worker_seen until the next sealing pass packs it,
    0005), and sealing moves at most about max_rows keys a pass, whole minutes."""
    w = worker()
    f1 = [restock(i * 100, 2, 1, 1) for i in range(50)] + [restock(MINUTE + i, 2, 1, 1) for i in range(30)]
    w.decide(F1, f1)
    w.decide(F2, [restock(4 * MINUTE, 2, 1, 1)])
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 80}
    assert sql(w.url, "SELECT sealed_below - MIN(bucket) FROM worker_shards, worker_seen_sealed") == [(2,)]
    w.close()
    fresh = worker()
    late = restock(30 * 100 + 1, 2, 1, 1)
    fresh.decide(F3, [f1[7], f1[60], late, restock(4 * MINUTE + 1, 2, 1, 1)])
    assert fresh.reasons(F3) == ["duplicate", "duplicate"]
    assert keys(w.url) == {"worker_seen": 3, "worker_seen_sealed": 80}
    first = fresh.outputs(F3)
    fresh.again(F3)
    assert fresh.outputs(F3) == first
    # bounded: 30 keys a pass moves minute 7 (20 keys) but not minute 8, then minute 8
    fresh.decide(F4, [restock(7 * MINUTE + i, 2, 1, 1) for i in range(20)]
                 + [restock(8 * MINUTE + i, 2, 1, 1) for i in range(20)])
    assert keys(w.url) == {"worker_seen": 40, "worker_seen_sealed": 83}
    state, nine = fresh.stage.state, minute_of(ts(9 * MINUTE))
    assert [state.seal(nine, max_rows=30), state.seal(nine, max_rows=30), state.seal(nine, max_rows=30)] == [20, 20, 0]
    assert keys(w.url) == {"worker_seen": 0, "worker_seen_sealed": 123}
    assert sql(w.url, "SELECT sealed_below FROM worker_shards") == [(nine,)]


def test_sealing_a_few_keys_reads_them_for_the_pack_and_the_delete_only(worker):
    """A sealing pass bounded by max_rows found where the bound falls by counting the keys below
    its minute, one by one (`LIMIT 1 OFFSET max_rows`): a third of its reads when the keys are
    far fewer. The optimizer's estimate now says so first; the keys are read twice (packed,
    deleted), and a pass over more than the bound still stops at whole minutes (above)."""
    w = worker()
    w.decide(F1, [restock(m * MINUTE + i, 2, 1, 1) for m in range(2) for i in range(200)]
             + [restock(2 * MINUTE, 2, 1, 1)])
    state = w.stage.state
    assert keys(w.url)["worker_seen"] == 401

    def reads() -> int:
        with state.conn.cursor() as cur:
            cur.execute("SHOW SESSION STATUS LIKE 'Handler_read_next'")
            return int(cur.fetchone()[1])
    before = reads()
    assert state.seal(minute_of(ts(2 * MINUTE))) == 400
    assert reads() - before < 2.5 * 400
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 400}


def test_upgrade_from_0003_keeps_keys_and_balances_and_runs_again_from_the_top(make_database, shared_dir, tmp_path,
                                                                               monkeypatch):
    url = make_database("upg4")
    current_sql = older_worker_schema(tmp_path, monkeypatch, last=3)
    conn = db.connect(url)
    assert [m.version for m in db.migrate(conn, "worker")] == [1, 2, 3]
    old = [restock(i, 2, 1, 1) for i in range(5)]
    with conn.cursor() as cur:   # what the 0003 worker left after deciding F0
        cur.execute("INSERT INTO worker_shards (shard, newest_event) VALUES (0, %s)", (ts(9 * MINUTE),))
        cur.execute("INSERT INTO worker_files (id, shard, filename, lines_decided, complete, newest_event) "
                    "VALUES (7, 0, %s, 5, 1, %s)", (F0, ts(9 * MINUTE)))
        for raw in old:
            digest = bytes.fromhex(event_key(orjson.loads(raw)).split(":h")[1])
            cur.execute("INSERT INTO worker_seen (shard, bucket, hash) VALUES (0, %s, %s)",
                        (minute_of(ts(0)), int.from_bytes(digest[:8], "big", signed=True)))
        cur.execute("INSERT INTO worker_balances (user_id, balance, updated_at) VALUES (1, 985.00, NOW(3))")
        cur.execute("INSERT INTO worker_orders (shard, file_id, line, order_id, user_id, shop_id, good_id, qty, amount, "
                    "debited, credit) VALUES (0, 7, 2, 900, 1, 2, 3, 2, 10.00, 1, NULL), "
                    "(0, 7, 3, 901, 1, 2, 3, 2, 5.00, 1, 5.00), (0, 7, 4, 902, 1, 2, 3, 1, 4.00, 0, NULL), "
                    "(0, 7, 5, 903, 12345678901234, 2, 98765432109876, 1, 9999999999999.99, 1, NULL), "
                    "(0, 7, 6, 904, 1, 2, 3, 1, 1.00, 1, NULL)")
    conn.close()
    monkeypatch.setattr(db, "SQL_DIR", current_sql)

    conn = db.connect(url)
    try:
        assert [str(m) for m in db.migrate(conn, "worker")] == ["worker 0004_lean_state",
                                                                 "worker 0005_packed_sealed_keys",
                                                                 "worker 0006_holds_in_place",
                                                                 "worker 0007_young_balances", "worker 0008_seen_ring"]
        shape = sql(url, "SELECT table_name, column_name, column_type FROM information_schema.columns "
                         "WHERE table_schema=DATABASE() AND table_name LIKE %s ORDER BY 1, 2", ("worker%",))
        with conn.cursor() as cur:   # the migration again, from its first statement: it changes nothing
            for statement in db.migrations("worker")[3].statements():
                cur.execute(statement)
    finally:
        conn.close()
    assert sql(url, "SELECT table_name, column_name, column_type FROM information_schema.columns "
                    "WHERE table_schema=DATABASE() AND table_name LIKE %s ORDER BY 1, 2", ("worker%",)) == shape
    assert sql(url, "SELECT column_name FROM information_schema.columns WHERE table_schema=DATABASE() "
                    "AND table_name='worker_balances' ORDER BY ordinal_position") == [("user_id",), ("balance",)]
    assert sql(url, "SELECT shard, sealed_below FROM worker_shards") == [(0, -2**31)]
    assert sql(url, "SELECT user_id, balance FROM worker_balances") == [(1, Decimal("985.00"))]
    assert sql(url, "SELECT order_id, shard, file_id, line, shop_id, buyer, qty, amount, state FROM worker_orders "
                    "ORDER BY order_id") == [
        (900, 0, 7, 2, 2, buyer_of(1, 3), 2, Decimal("10.00"), 1), (901, 0, 7, 3, 2, buyer_of(1, 3), 2, Decimal("5.00"), 2),
        (902, 0, 7, 4, 2, buyer_of(1, 3), 1, Decimal("4.00"), 0),
        (903, 0, 7, 5, 2, buyer_of(12345678901234, 98765432109876), 1, Decimal("9999999999999.99"), 1),
        (904, 0, 7, 6, 2, buyer_of(1, 3), 1, Decimal("1.00"), 1)]
    w = worker_for(url, shared_dir)
    try:
        w.decide(F1, old + [restock(10 * MINUTE, 2, 1, 1)])
        assert w.reasons(F1) == ["duplicate"] * 5
        # the clock moved on: the old keys are sealed, and still found by a worker that never saw them
        assert keys(url) == {"worker_seen": 1, "worker_seen_sealed": 5}
    finally:
        w.close()
    w = worker_for(url, shared_dir)
    try:
        w.decide(F2, old[:2] + [refund(10 * MINUTE + 1, 900, user=1, good=3, qty=2, amount=10, shop=2),
                                 refund(10 * MINUTE + 2, 901, user=1, good=3, amount=1, shop=2),
                                 refund(10 * MINUTE + 3, 902, user=1, good=3, amount=1),
                                 refund(10 * MINUTE + 4, 903, user=12345678901234, good=98765432109876, amount=1),
                                 refund(10 * MINUTE + 5, 904, user=1, good=4, amount=1)])
        assert w.reasons(F2) == ["duplicate"] * 3 + ["purchase_rejected", "return_mismatch"]
        assert sql(url, f"SELECT user_id, balance FROM ({ALL_BALANCES}) b ORDER BY user_id") == [
            (1, Decimal("995.00")), (12345678901234, Decimal("1001.00"))]
        assert sql(url, "SELECT order_id, state FROM worker_orders ORDER BY order_id") == [(900, 2), (901, 2), (902, 0),
                                                                                           (903, 2), (904, 1)]
    finally:
        w.close()


def test_balances_of_0003_lose_the_bytes_of_updated_at(make_database, tmp_path, monkeypatch):
    """0004 drops worker_balances.updated_at by copying the table: an instant DROP COLUMN left
    its 7 bytes in every row (47 bytes a row instead of 40)."""
    url = make_database("bal4")
    current_sql = older_worker_schema(tmp_path, monkeypatch, last=3)
    conn = db.connect(url)
    try:
        db.migrate(conn, "worker")
        monkeypatch.setattr(db, "SQL_DIR", current_sql)
        db.migrate(conn, "worker")
        with conn.cursor() as cur:
            cur.execute("INSERT INTO worker_balances (user_id, balance) SELECT seq, 1000 FROM seq_1_to_200000")
            conn.commit()
            cur.execute("ANALYZE TABLE worker_balances")
            cur.fetchall()
            cur.execute("SELECT data_length FROM information_schema.tables WHERE table_schema=DATABASE() "
                        "AND table_name='worker_balances'")
            assert cur.fetchone()[0] / 200_000 < 42
    finally:
        conn.close()


def test_sealing_after_a_file_catches_up_in_passes(worker, monkeypatch):
    """A file adds more keys than one sealing pass moves (PRUNE_ROWS): the passes go on until
    every minute SEAL_MINUTES behind the clock is sealed (one pass left the rest in
    worker_seen, and a stream of big files kept it growing)."""
    monkeypatch.setattr(stage_module, "PRUNE_ROWS", 25)
    w = worker()
    w.decide(F1, [restock(m * MINUTE + i, 2, 1, 1) for m in range(6) for i in range(10)])
    assert keys(w.url) == {"worker_seen": 30, "worker_seen_sealed": 30}
    assert sql(w.url, "SELECT sealed_below FROM worker_shards") == [(minute_of(ts(3 * MINUTE)),)]


def test_the_worker_writes_its_state_by_inserts_where_the_server_refuses_local_infile(shared_dir):
    """A batch's state rows go in by LOAD DATA LOCAL; a server with local_infile off (MySQL
    8.0's default) refuses it (MariaDB: 4166). The batch is decided again with INSERTs, and so
    is every later one: same decisions, same rows."""
    server = servers.new_private_mariadb(["--local-infile=0"])
    try:
        url = server.url("pipeline_db")
        w = Worker(url, shared_dir)
        opening = w.settings.opening_balance
        first = w.decide(F1, [purchase(0, 100, user=1, shop=2, price=10), restock(1, 2, 1, 5), restock(1, 2, 1, 5),
                              purchase(2, 101, user=2, shop=2, price=3)])
        assert w.stage.state.use_infile is False
        assert first.stats["accepted"] == 3 and first.stats["rejected"] == {"duplicate": 1}
        second = w.decide(F2, [refund(MINUTE, 100, user=1, amount=4, shop=2), purchase(MINUTE + 1, 102, user=1, shop=2,
                                                                                       price=1)])
        assert second.stats["accepted"] == 2
        assert sql(url, f"SELECT user_id, balance FROM ({ALL_BALANCES}) b ORDER BY user_id") == [
            (1, opening - 10 + 4 - 1), (2, opening - 3)]
        assert sql(url, "SELECT order_id, state FROM worker_orders ORDER BY order_id") == [(100, 2), (101, 1), (102, 1)]
        assert sql(url, "SELECT COUNT(*) FROM worker_seen") == [(1,)]
        w.close()
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)


def part_of(raw: bytes) -> tuple[int, int]:
    """A restock's dedup key as stored: (minute, hash), from its text key's digest."""
    digest = bytes.fromhex(event_key(orjson.loads(raw)).split(":h")[1])
    return minute_of(orjson.loads(raw)["timestamp"]), int.from_bytes(digest[:8], "big", signed=True)


def test_sealed_keys_are_packed_by_part_and_a_late_key_joins_its_part(worker):
    """0005: a sealed minute's keys take one row per part (the hash's top byte), hashes 8 bytes
    each in key order, not a row a key; a late key of a sealed minute waits in worker_seen, is
    found there and in the packed rows by a worker that never saw it, and the next sealing pass
    appends it to its part's row."""
    w = worker()
    f1 = [restock(i * 10, 2, 1, 1) for i in range(200)]
    w.decide(F1, f1)
    w.decide(F2, [restock(3 * MINUTE, 2, 1, 1)])
    rows = sql(w.url, "SELECT bucket, part, hashes FROM worker_seen_sealed ORDER BY bucket, part")
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 200} and len(rows) < 200
    stored = {(m, int.from_bytes(packed[i:i + 8], "big", signed=True)) for m, _, packed in rows
              for i in range(0, len(packed), 8)}
    assert stored == {part_of(x) for x in f1}
    for m, part, packed in rows:
        hashes = [int.from_bytes(packed[i:i + 8], "big", signed=True) for i in range(0, len(packed), 8)]
        assert hashes == sorted(hashes) and {h >> 56 & 0xFF for h in hashes} == {part}
    parts = {part for _, part, _ in rows}
    late = next(x for x in (restock(i * 10 + 1, 2, 1, 1) for i in range(1000)) if part_of(x)[1] >> 56 & 0xFF in parts)
    w.close()
    fresh = worker()
    fresh.decide(F3, [f1[5], late, restock(3 * MINUTE + 1, 2, 1, 1)])
    assert fresh.reasons(F3) == ["duplicate"]
    assert keys(w.url) == {"worker_seen": 3, "worker_seen_sealed": 200}
    fresh.close()
    again = worker()
    again.decide(F4, [late, restock(6 * MINUTE, 2, 1, 1)])      # found unpacked; the clock seals minutes 0-3
    assert again.reasons(F4) == ["duplicate"]
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 203}
    assert sql(w.url, "SELECT COUNT(*) FROM worker_seen_sealed WHERE bucket=%s", (minute_of(ts(0)),)) == [(len(rows),)]
    again.close()
    last = worker()
    last.decide("20260301120040", [late, f1[6], restock(7, 2, 1, 1)])   # found packed
    assert last.reasons("20260301120040") == ["duplicate", "duplicate"]


def test_upgrade_from_0004_packs_sealed_keys_and_runs_again_from_the_top_after_stopping_halfway(
        make_database, shared_dir, tmp_path, monkeypatch):
    url = make_database("upg5")
    current_sql = older_worker_schema(tmp_path, monkeypatch, last=4)
    conn = db.connect(url)
    assert [m.version for m in db.migrate(conn, "worker")] == [1, 2, 3, 4]
    old = [restock(i * 7, 2, 1, 1) for i in range(300)] + [restock(MINUTE + i, 2, 1, 1) for i in range(40)]
    with conn.cursor() as cur:   # what the 0004 worker left: minutes 0 and 1 sealed
        cur.execute("INSERT INTO worker_shards (shard, newest_event, sealed_below) VALUES (0, %s, %s)",
                    (ts(4 * MINUTE), minute_of(ts(2 * MINUTE))))
        cur.executemany("INSERT INTO worker_seen_sealed (shard, bucket, hash) VALUES (0, %s, %s)",
                        [part_of(x) for x in old])
        cur.execute("INSERT INTO worker_seen_sealed (shard, bucket, hash) VALUES (1, 5, -1), (1, 5, 1)")
    conn.close()
    monkeypatch.setattr(db, "SQL_DIR", current_sql)
    conn = db.connect(url)
    try:
        statements = db.migrations("worker")[4].statements()
        stop = next(i for i, s in enumerate(statements) if s.startswith("SET @sql = IF(@old_sealed > 0, 'RENAME"))
        with conn.cursor() as cur:   # stopped before the rename: the copy is there, the old table too
            for statement in statements[:stop]:
                cur.execute(statement)
        assert [str(m) for m in db.migrate(conn, "worker")] == ["worker 0005_packed_sealed_keys",
                                                                 "worker 0006_holds_in_place",
                                                                 "worker 0007_young_balances", "worker 0008_seen_ring"]
        with conn.cursor() as cur:   # and once more from its first statement: nothing changes
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()
    assert keys(url)["worker_seen_sealed"] == 342
    assert sql(url, "SELECT table_name FROM information_schema.tables WHERE table_schema=DATABASE() "
                    "AND table_name LIKE %s", ("worker_seen_%",)) == [("worker_seen_sealed",)]
    assert sql(url, "SELECT bucket, part, HEX(hashes) FROM worker_seen_sealed WHERE shard=1 ORDER BY part") == [
        (5, 0, "0000000000000001"), (5, 255, "FFFFFFFFFFFFFFFF")]
    w = worker_for(url, shared_dir)
    try:
        w.decide(F1, [old[0], old[299], old[300], restock(4 * MINUTE + 1, 2, 1, 1)])
        assert w.reasons(F1) == ["duplicate"] * 3
    finally:
        w.close()


def test_sealing_refuses_keys_cut_short_by_group_concat_max_len(worker):
    """A part's packed hashes longer than the connection's group_concat_max_len would be cut with
    a warning (a strict sql_mode makes it an error; without one only the worker's check stops
    it): the sealing transaction fails and rolls back, and no key is lost."""
    w = worker()
    w.decide(F1, [restock(i, 2, 1, 1) for i in range(40)] + [restock(MINUTE, 2, 1, 1)])
    state = w.stage.state
    assert keys(w.url) == {"worker_seen": 41, "worker_seen_sealed": 0}
    before = sql(w.url, "SELECT sealed_below FROM worker_shards")
    with state.conn.cursor() as cur:
        cur.execute("SET SESSION group_concat_max_len = 4, sql_mode = ''")
    with pytest.raises(pymysql.err.MySQLError, match="1260|cut"):
        state.seal(minute_of(ts(MINUTE)))
    assert keys(w.url) == {"worker_seen": 41, "worker_seen_sealed": 0}
    assert sql(w.url, "SELECT sealed_below FROM worker_shards") == before
    with state.conn.cursor() as cur:
        cur.execute("SET SESSION group_concat_max_len = 1048576")
    assert state.seal(minute_of(ts(MINUTE))) == 40
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 40}


def hold_pages(url) -> int:
    """Pages of worker_holds' rows (InnoDB's statistics, after ANALYZE; each page counts while the
    table holds fewer than 32)."""
    sql(url, "ANALYZE TABLE worker_holds")
    return int(sql(url, "SELECT stat_value FROM mysql.innodb_index_stats WHERE database_name=DATABASE() "
                        "AND table_name='worker_holds' AND index_name='PRIMARY' AND stat_name='size'")[0][0])


def test_resolving_holds_updates_their_rows_in_place_and_their_pages_stay_full(worker):
    """A hold's row has its final size at insert (0006): releasing 1000 holds appended in key order
    does not split their pages (a row growing by its resolution did, to about twice the pages)."""
    w = worker(HOLD_SECONDS="1h")
    n = 1000
    w.decide(F1, [refund(i, 10_000 + i, user=1, amount=1, shop=2) for i in range(n)])
    assert sql(w.url, "SELECT COUNT(*) FROM worker_holds WHERE state='held'") == [(n,)]
    before = hold_pages(w.url)
    assert before >= 10
    assert w.decide(F2, [purchase(n + i, 10_000 + i, user=1, shop=2, price=1) for i in range(n)]).stats["released"] == n
    assert sql(w.url, "SELECT COUNT(*) FROM worker_holds WHERE state='released'") == [(n,)]
    assert hold_pages(w.url) <= before + 1


def test_upgrade_from_0005_keeps_holds_as_they_were_and_runs_again_from_the_top_after_stopping_halfway(
        make_database, shared_dir, tmp_path, monkeypatch):
    """0006 writes the sentinels into the NULLs of existing holds (held, released, expired by the
    idle worker and not yet reported) and makes the columns NOT NULL; the worker reads each hold
    as before, and finds the unreported one."""
    url = make_database("upg6")
    current_sql = older_worker_schema(tmp_path, monkeypatch, last=5)
    conn = db.connect(url)
    assert [m.version for m in db.migrate(conn, "worker")] == [1, 2, 3, 4, 5]
    with conn.cursor() as cur:   # what the 0005 worker left
        cur.execute("INSERT INTO worker_files (id, shard, filename) VALUES (7, 0, %s), (8, 0, %s)", (F1, F2))
        cur.execute("INSERT INTO worker_holds (file_id, line, shard, order_id, event_time, expires_at, raw, state, "
                    "code, resolved_file_id, resolved_line, resolved_seq, resolved_at) VALUES "
                    "(7, 1, 0, 100, '2026-03-01 12:00:00', '2026-03-01 12:10:00', 'a', 'held', NULL, NULL, NULL, NULL, NULL), "
                    "(7, 2, 0, 200, '2026-03-01 12:00:01', '2026-03-01 12:10:01', 'b', 'released', 0, 8, 3, 1, NOW(3)), "
                    "(7, 3, 0, 300, '2026-03-01 12:00:02', '2026-03-01 12:10:02', 'c', 'expired', %s, NULL, NULL, NULL, "
                    "NOW(3))", (ORPHAN_RETURN,))
    conn.close()
    monkeypatch.setattr(db, "SQL_DIR", current_sql)
    conn = db.connect(url)
    try:
        statements = db.migrations("worker")[5].statements()
        stop = next(i for i, s in enumerate(statements) if s.startswith("SET @sql = IF(@nullable > 0, 'ALTER"))
        with conn.cursor() as cur:   # stopped after the sentinels were written, before the columns changed
            for statement in statements[:stop]:
                cur.execute(statement)
        conn.commit()
        assert [str(m) for m in db.migrate(conn, "worker")] == ["worker 0006_holds_in_place",
                                                                 "worker 0007_young_balances", "worker 0008_seen_ring"]
        with conn.cursor() as cur:   # and once more from its first statement: nothing changes
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()
    assert sql(url, "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_schema=DATABASE() "
                    "AND table_name='worker_holds' AND column_name IN ('code', 'resolved_file_id', 'resolved_line', "
                    "'resolved_seq', 'resolved_at') ORDER BY 1") == [
        ("code", "NO"), ("resolved_at", "NO"), ("resolved_file_id", "NO"), ("resolved_line", "NO"),
        ("resolved_seq", "NO")]
    w = worker_for(url, shared_dir)
    try:
        state = w.stage.state
        held = [(h.order_id, h.state, h.code, h.resolved_file_id) for hs in state.active_holds().by_order.values()
                for h in hs]
        assert held == [(100, "held", None, None)]
        assert [(h.order_id, h.code, h.resolved_file_id, h.resolved_line, h.resolved_seq)
                for h in state.resolved_in(8)] == [(200, 0, 8, 3, 1)]
        with state.conn.cursor() as cur:
            cur.execute(state.idle_expired_sql())
            expired = state.parse_holds(cur.fetchall())
        state.conn.rollback()
        assert [(h.order_id, h.state, h.code, h.resolved_file_id) for h in expired] == [
            (300, "expired", ORPHAN_RETURN, None)]
    finally:
        w.close()


def test_upgrade_from_0006_keeps_balances_where_they_are_and_runs_again(make_database, shared_dir, tmp_path,
                                                                         monkeypatch):
    """0007 adds the young balances and worker_ledger's one row; the existing balances stay in
    worker_balances (nothing young below the highest), the worker spends from them there, and a
    new user goes young. Run again from its first statement, it changes nothing."""
    url = make_database("upg7")
    current_sql = older_worker_schema(tmp_path, monkeypatch, last=6)
    conn = db.connect(url)
    assert [m.version for m in db.migrate(conn, "worker")] == [1, 2, 3, 4, 5, 6]
    with conn.cursor() as cur:   # what the 0006 worker left
        cur.execute("INSERT INTO worker_balances (user_id, balance) VALUES (1, 985.00), (7, 5.00)")
    conn.close()
    monkeypatch.setattr(db, "SQL_DIR", current_sql)
    conn = db.connect(url)
    try:
        assert [str(m) for m in db.migrate(conn, "worker")] == ["worker 0007_young_balances", "worker 0008_seen_ring"]
        with conn.cursor() as cur:
            for statement in db.migrations("worker")[6].statements():
                cur.execute(statement)
    finally:
        conn.close()
    assert sql(url, "SELECT id, sealed_below FROM worker_ledger") == [(1, 7)]
    w = worker_for(url, shared_dir)
    try:
        w.decide(F1, [purchase(0, 100, user=1, shop=2, price=10), purchase(1, 101, user=9, shop=2, price=3)])
        assert sql(url, "SELECT user_id, balance FROM worker_balances ORDER BY user_id") == [
            (1, Decimal("975.00")), (7, Decimal("5.00"))]
        assert sql(url, "SELECT user_id, balance FROM worker_balances_young") == [(9, Decimal("997.00"))]
    finally:
        w.close()


def test_a_records_codes_are_stored_packed_and_records_of_before_still_replay(worker):
    """A batch's codes (one byte a line) are stored compressed: a 10,000-line batch's took a
    16 KiB page of their own. A re-run replays them byte-identically, and so it does a record
    the worker stored raw before (what a database of earlier versions holds)."""
    w = worker()
    lines = [restock(n // 4, 2, 1 + n % 50, 1) for n in range(2000)]
    lines += [restock(0, 2, 1, 1)] * 500                                # 500 duplicates of the first line
    first = w.decide(F1, lines)
    assert first.stats["rejected"] == {"duplicate": 500}
    out = w.outputs(F1)
    [(stored,)] = sql(w.url, "SELECT codes FROM worker_batches")
    assert stored[:1] == b"\xff" and len(stored) < 100
    assert w.again(F1).events == 2000 and w.outputs(F1) == out
    raw = bytes([0] * 2000 + [CODE["duplicate"]] * 500)
    with db.connect(w.url).cursor() as cur:
        cur.execute("UPDATE worker_batches SET codes=%s", (raw,))
    assert w.again(F1).events == 2000 and w.outputs(F1) == out


def test_a_groups_file_rows_are_made_and_read_in_two_statements_as_one_by_one(worker):
    """A group's start makes and reads its files' rows in one INSERT and one SELECT (two
    statements a file before): each file gets the row file after file would give it, in the
    claim's order (new rows' ids ascending), a decided file its progress and its records, and a
    name the column's collation makes one row with another (`A.txt`, `a.txt`) that same row."""
    w = worker()
    done = w.decide(F1, [restock(n, 2, 1, 1) for n in range(3)])
    assert done.events == 3
    state = w.stage.state
    state.open()
    names = ["g-new-1.txt", F1, "g-new-2.txt", "G-NEW-1.TXT"]
    script_tags = []
    real_run = db.Script.run
    try:
        db.Script.run = lambda self, cur: script_tags.append([t for t, *_ in self.items]) or real_run(self, cur)
        starts = state.start_files(names, 5, None)
    finally:
        db.Script.run = real_run
        state.unlock_shard()
    assert [t for t in script_tags[0] if t.startswith(("file", "info"))] == ["files", "infos"]
    ids = {name: i for i, name in sql(w.url, "SELECT id, filename FROM worker_files")}
    first, decided, second, twin = starts
    assert decided.info.id == ids[F1] and decided.info.lines_decided == 3
    assert decided.info.complete and [r.line_count for r in decided.records] == [3]
    assert first.info.id == twin.info.id == ids["g-new-1.txt"] < second.info.id == ids["g-new-2.txt"]
    assert "G-NEW-1.TXT" not in ids
    assert (first.info.lines_decided, first.info.complete, first.records) == (0, False, [])


def session_deletes(state) -> int:
    """Rows the state's connection deleted (Handler_delete: MariaDB counts a row of a partitioned
    table twice, its partition's and the table's handler; `DELETES_A_ROW` of these a row)."""
    with state.conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Handler_delete'")
        return int(cur.fetchone()[1])


DELETES_A_ROW = (1, 2)


def test_a_sealing_pass_truncates_the_ring_partitions_of_sealed_minutes_and_deletes_no_key(worker):
    """0008: worker_seen is a ring of partitions by minute (8 a shard); a pass that packed every
    key of a partition's minutes empties it by TRUNCATE PARTITION, where it deleted the keys one
    by one (400 row deletes, then InnoDB's purge). The keys stay found, by a worker that never
    saw them, and a re-run is identical."""
    w = worker()
    f1 = [restock(m * MINUTE + i, 2, 1, 1) for m in range(2) for i in range(200)]
    w.decide(F1, f1)
    assert keys(w.url) == {"worker_seen": 400, "worker_seen_sealed": 0}
    state = w.stage.state
    before = session_deletes(state)
    w.decide(F2, [restock(4 * MINUTE, 2, 1, 1)])   # the clock at minute 4: minutes 0 and 1 sealed
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 400}
    assert session_deletes(state) - before == 0
    w.close()
    fresh = worker()
    fresh.decide(F3, [f1[3], f1[250], restock(4 * MINUTE, 2, 1, 1), restock(4 * MINUTE + 1, 2, 1, 1)])
    assert fresh.reasons(F3) == ["duplicate", "duplicate", "duplicate"]
    first = fresh.outputs(F3)
    fresh.again(F3)
    assert fresh.outputs(F3) == first


def test_a_ring_partition_that_also_holds_unsealed_minutes_keeps_them_and_loses_its_sealed_keys(worker):
    """A file spanning more minutes than the ring has partitions: the sealed minutes that share a
    partition with minutes still unsealed are deleted from it (those minutes stay, and stay
    found), the other partitions are truncated; every key is either packed or in worker_seen."""
    w = worker()
    f1 = [restock(m * MINUTE + i, 2, 1, 1) for m in range(11) for i in range(10)]
    state = w.stage.state
    w.decide(F1, f1[:1])
    before = session_deletes(state)
    w.decide(F2, f1)    # clock at minute 10: minutes 0-7 sealed, 8-10 not (their slots hold 0-2 too)
    assert keys(w.url) == {"worker_seen": 30, "worker_seen_sealed": 80}
    # minutes 0, 1, 2 (in the partitions of 8, 9, 10) deleted, the other five truncated
    assert session_deletes(state) - before in [30 * n for n in DELETES_A_ROW]
    assert sorted(sql(w.url, "SELECT bucket - %s, COUNT(*) FROM worker_seen GROUP BY bucket",
                      (minute_of(ts(0)),))) == [(8, 10), (9, 10), (10, 10)]
    w.close()
    fresh = worker()
    fresh.decide(F3, [f1[5], f1[75], f1[85], f1[105], restock(10 * MINUTE + 11, 2, 1, 1)])
    assert fresh.reasons(F3) == ["duplicate"] * 4


def test_a_worker_killed_between_the_pack_and_the_truncation_loses_no_key(worker, monkeypatch):
    """The pass commits its pack and `sealed_below`, then truncates: killed in between, the
    packed keys stay in worker_seen too. They are found (a sealed minute is looked up in both
    tables), nothing is decided twice, and the next pass packs them again and empties them."""
    w = worker()
    f1 = [restock(m * MINUTE + i, 2, 1, 1) for m in range(2) for i in range(100)]
    w.decide(F1, f1)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed between the pack and the truncation")
    monkeypatch.setattr(WorkerState, "_truncate", killed)
    with pytest.raises((KeyboardInterrupt, TaskFailed)):
        w.decide(F2, [restock(4 * MINUTE, 2, 1, 1)])
    w.stage.state.close()
    monkeypatch.undo()
    assert keys(w.url) == {"worker_seen": 201, "worker_seen_sealed": 200}
    fresh = worker()
    fresh.decide(F2, [restock(4 * MINUTE, 2, 1, 1)])
    fresh.decide(F3, [f1[3], f1[150], restock(4 * MINUTE + 1, 2, 1, 1), restock(5 * MINUTE, 2, 1, 1)])
    assert fresh.reasons(F3) == ["duplicate", "duplicate"]
    # the next pass (the clock at minute 5 now) packed the leftovers again (their hashes twice in
    # their parts' rows) and emptied them; minutes 4 and 5 are not sealed
    assert keys(w.url) == {"worker_seen": 3, "worker_seen_sealed": 400}
    packed = set()
    for (raw,) in sql(w.url, "SELECT hashes FROM worker_seen_sealed"):
        packed.update(h for (h,) in struct.iter_unpack(">q", raw))
    assert len(packed) == 200


def test_a_truncation_waits_for_the_other_shards_transaction_then_deletes_instead(worker, monkeypatch):
    """TRUNCATE PARTITION needs worker_seen's metadata lock: an open transaction of another
    shard's worker on the table holds it back at most TRUNCATE_LOCK_WAIT; then the pass deletes
    the partition's keys (packed and committed already), as before the ring."""
    monkeypatch.setattr(state_module, "TRUNCATE_LOCK_WAIT", 1)
    w = worker()
    w.decide(F1, [restock(m * MINUTE + i, 2, 1, 1) for m in range(2) for i in range(50)])
    other = db.connect(w.url)
    try:
        other.begin()
        with other.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM worker_seen WHERE shard=1")
        state = w.stage.state
        before = session_deletes(state)
        w.decide(F2, [restock(4 * MINUTE, 2, 1, 1)])
        assert session_deletes(state) - before in [100 * n for n in DELETES_A_ROW]
    finally:
        other.rollback()
        other.close()
    assert keys(w.url) == {"worker_seen": 1, "worker_seen_sealed": 100}
