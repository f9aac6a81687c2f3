"""The shard worker's outputs per file: what it costs the file system to publish them, and that
the prepared lines rendered a batch at a time are the bytes rendered one line at a time. The
real WorkerStage on the test server (tests/test_worker_state.py's `worker`)."""
from __future__ import annotations

import orjson
import pytest

from app import layout, safefiles
from app.worker.ledger import ALL_BALANCES
from tests.test_worker_state import F1, F2, MINUTE, sql, worker  # noqa: F401
from tests.test_worker_support import purchase, refund, restock


def test_a_files_two_outputs_are_published_with_one_folder_fsync(worker, monkeypatch):
    w = worker()
    synced = []
    real = safefiles.Folder.fsync
    monkeypatch.setattr(safefiles.Folder, "fsync", lambda self: synced.append(1) or real(self))
    lines = [purchase(0, 100, user=1, shop=2, price=10), b'{"event_type": 1', restock(1, 2, 1, 5)]
    assert w.decide(F1, lines).events == 2
    assert len(synced) == 1
    prepared, rejected = w.outputs(F1)
    assert len(prepared.splitlines()) == 2 and orjson.loads(rejected)["reason"] == "malformed"
    assert layout.worker_rejected(w.shared, F1, 0).stat().st_mode & 0o777 == 0o600
    assert layout.worker_output(w.shared, F1, 0).stat().st_mode & 0o777 == 0o644
    # a file with nothing rejected still gets its (empty) rejected file, as before
    assert w.decide(F2, [refund(2, 100, user=1, amount=4, shop=2)]).events == 1
    assert w.outputs(F2)[1] == b"" and len(synced) == 2


def test_after_a_file_the_worker_prunes_only_when_a_pass_may_find_something(worker, monkeypatch):
    """A pass after the first file; none after files in the same minute of the shard clock
    while the last pass removed nothing (each would be a round trip finding nothing); one when
    the clock enters another minute, when PRUNE_FILE_EVERY went by, and after every file while
    passes keep removing rows."""
    from app.worker import stage as stage_module

    w = worker(DEDUP_WINDOW="1m")
    passes = []
    real = w.stage.state.prune
    monkeypatch.setattr(w.stage.state, "prune", lambda *a, **k: passes.append(a) or real(*a, **k))
    for n in range(4):                                          # all in the clock's first minute
        w.decide(f"2026030112000{n}", [restock(n * 1000, 2, 1, 1)])
    assert len(passes) == 1
    w.decide("20260301120010", [restock(MINUTE + 10, 2, 1, 1)])  # the next minute
    assert len(passes) == 2
    w.decide("20260301120011", [restock(2 * MINUTE + 10, 2, 1, 1)] + [restock(2 * MINUTE + 20 + n, 2, 1, 1)
                                                                       for n in range(3)])
    assert len(passes) == 3 and sql(w.url, "SELECT COUNT(*) FROM worker_seen") == [(5,)]   # minute 0 went
    w.decide("20260301120012", [restock(2 * MINUTE + 30, 2, 1, 1)])   # the last pass removed rows
    assert len(passes) == 4
    w.decide("20260301120013", [restock(2 * MINUTE + 40, 2, 1, 1)])   # ... and that one nothing
    assert len(passes) == 4
    monkeypatch.setattr(stage_module, "PRUNE_FILE_EVERY", 0.0)
    w.decide("20260301120014", [restock(2 * MINUTE + 50, 2, 1, 1)])
    assert len(passes) == 5


def test_a_file_of_one_batch_is_decided_without_the_reading_and_writing_threads(worker, monkeypatch):
    from app.worker import stage as stage_module

    started = []
    for name in ("ReadAhead", "Behind"):
        real = getattr(stage_module, name)
        monkeypatch.setattr(stage_module, name, lambda *a, _real=real, _name=name, **k: started.append(_name)
                            or _real(*a, **k))
    w = worker(WORKER_BATCH_LINES="3")
    small = [purchase(0, 100, user=1, shop=2, price=10), restock(1, 2, 1, 5), b"{", refund(3, 100, user=1, amount=4,
                                                                                           shop=2)]
    assert w.decide(F1, small[:3]).events == 2 and started == []
    prepared, rejected = w.outputs(F1)
    assert [orjson.loads(x)["event_type"] for x in prepared.splitlines()] == [1, 0]
    assert orjson.loads(rejected)["line_no"] == 3
    assert w.decide(F2, small[3:] + [restock(4 + n, 2, 1, 1) for n in range(5)]).events == 6   # two batches
    assert started == ["ReadAhead", "Behind"]
    assert [orjson.loads(x)["event_type"] for x in w.outputs(F2)[0].splitlines()] == [3, 0, 0, 0, 0, 0]


def test_the_next_file_reads_only_the_keys_of_the_holds_this_process_left(worker, monkeypatch):
    from app.worker import state as state_module

    w = worker(HOLD_SECONDS="1h")
    w.decide(F1, [refund(0, 500 + n, user=1, amount=4, shop=2) for n in range(3)])   # three held
    read = []
    real = state_module._hold
    monkeypatch.setattr(state_module, "_hold", lambda row: read.append(row[3]) or real(row))
    # the next files start from the book the last one left: no held row read again
    assert w.decide(F2, [purchase(1, 500, user=1, shop=2, price=10)]).stats["released"] == 1
    assert w.decide("20260301120020", [restock(2, 2, 1, 1)]).events == 1
    assert read == []
    assert sorted(h.order_id for h in w.stage.known_holds.values()) == [501, 502]
    # the idle expiry changes them: the next file reads them (none left) and reports the expiry
    w.stage.state.expire_idle()
    assert w.decide("20260301120030", [restock(3, 2, 1, 1)]).stats["expired"] == 2


def test_holds_another_process_resolved_meanwhile_are_not_resolved_again(worker):
    a, b = worker(HOLD_SECONDS="10s"), worker(HOLD_SECONDS="10s")
    assert a.decide(F1, [refund(0, 500, user=1, amount=4, shop=2)]).stats["held"] == 1
    released = b.decide(F2, [purchase(1, 500, user=1, shop=2, price=10)])      # b releases a's hold
    assert released.stats["released"] == 1 and released.events == 2
    # a's last book still has the hold; an event a minute on would expire it in a's book
    later = a.decide("20260301120020", [restock(MINUTE, 2, 1, 1)])
    assert later.stats["expired"] == 0 and later.events == 1 and a.outputs("20260301120020")[1] == b""
    assert sql(a.url, "SELECT state FROM worker_holds") == [("released",)]


def test_files_in_a_row_do_not_ping_and_a_connection_lost_meanwhile_hands_the_file_back(worker, monkeypatch):
    import pymysql

    from app.daemon import Retryable

    w = worker()
    w.decide(F1, [restock(0, 2, 1, 1)])
    pings = []
    real = pymysql.connections.Connection.ping
    monkeypatch.setattr(pymysql.connections.Connection, "ping", lambda self, *a, **k: pings.append(1) or
                        real(self, *a, **k))
    w.decide(F2, [restock(1, 2, 1, 1)])
    assert pings == []
    conn_id = w.stage.state.conn.thread_id()
    sql(w.url, f"KILL CONNECTION {conn_id:d}")
    with pytest.raises(Retryable):
        w.decide("20260301120020", [restock(2, 2, 1, 1)])
    assert w.again("20260301120020").events == 1                  # the next try opens a new connection


def test_a_batch_locks_its_returns_users_with_its_purchases_users_in_one_read(worker, monkeypatch):
    """The balances a batch may change are locked by one statement of its reads script,
    ascending: the users of its purchases and of its returns (a return of an earlier file's
    purchase credits that user). Locking the returns' users after the orders came back was a
    round trip more per batch, and two shard workers each locking twice could lock out of order.
    The user of a return that credits nothing (its purchase unknown) gets no balance row."""
    from app.worker.ledger import Ledger

    w = worker()
    locked = []
    real = Ledger.lock_sql
    monkeypatch.setattr(Ledger, "lock_sql", lambda self, conn, users: locked.append(set(users))
                        or real(self, conn, users))
    assert w.decide(F1, [purchase(0, 100, user=1, shop=2, price=10)]).events == 1
    assert locked == [{1}]
    lines = [purchase(1, 101, user=2, shop=2, price=5), refund(2, 100, user=1, amount=10, shop=2),
             refund(3, 999, user=3, amount=1, shop=2)]
    assert w.decide(F2, lines).events == 2   # the return of order 999 is held
    assert locked == [{1}, {1, 2, 3}]
    assert sql(w.url, f"SELECT user_id, balance FROM ({ALL_BALANCES}) b ORDER BY user_id") == [
        (1, w.settings.opening_balance), (2, w.settings.opening_balance - 5)]
