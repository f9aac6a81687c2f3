"""shard-worker: every rule and reason, deduplication, the out-of-order cache, rule switches.

The real worker stage runs under the shared daemon loop against the real API and MariaDB; the
test plays the splitter (writes the shard files, marks them done through the API)."""
from __future__ import annotations

import threading
import time
from decimal import Decimal

import pymysql

from app import db, layout
from app.worker.ledger import ALL_BALANCES, CREDITED, Ledger, LedgerConflict
from app.worker.rules import CODE, REASONS, Order, buyer_of
from app.worker.state import WorkerState
from tests import servers
from tests.test_worker_support import (module_api, pipeline, price_change, purchase, reasons, refund,  # noqa: F401
                                       restock, shop_status, ts)

BIG = 2**63 - 1          # above 2^53: a float would change it
F1, F2, F3 = "20260301120000", "20260301120010", "20260301120020"


def test_each_rule_and_reason(pipeline):
    lines = [
        purchase(0, BIG, user=1, shop=2, price=600.25),                 # 1 accepted
        purchase(1, 11, user=1, shop=2, price=400.00),                  # 2 insufficient_balance
        restock(2, 2, 1, 5),                                            # 3 accepted
        restock(3, 2, 1, -6, "defect"),                                 # 4 negative_stock
        restock(4, 2, 1, -5, "loss"),                                   # 5 accepted: stock 0
        shop_status(5, 4, False),                                       # 6 accepted
        purchase(6, 12, user=2, shop=4),                                # 7 shop_inactive
        price_change(7, 2, 1, 0),                                       # 8 non_positive_price
        purchase(8, 13, user=2, shop=2, price=-1),                      # 9 non_positive_price
        purchase(9, 14, user=2, shop=2, qty=0),                         # 10 non_positive_qty
        b'{"event_type": 1, "payload": {"order_id": ',                  # 11 malformed
        purchase(10, 15, user=2, shop=3),                               # 12 wrong_shard
        purchase(11, 16, user=3, shop=2, price=50),                     # 13 accepted
        refund(12, 16, user=3, amount=50.01, shop=2),                   # 14 refund_exceeds_purchase
        purchase(13, 17, user=3, shop=4, price=5),                      # 15 shop_inactive
        refund(14, 17, user=3, amount=5, shop=4),                       # 16 purchase_rejected
        purchase(15, 18, user=3, shop=2, price=20),                     # 17 accepted
        refund(16, 18, user=4, amount=20, shop=2),                      # 18 return_mismatch
        refund(17, BIG, user=1, amount=100.00),                         # 19 accepted, no shop_id
        refund(17, BIG, user=1, amount=100.00),                         # 20 duplicate
        refund(18, 19, user=5, amount=1, shop=2),                       # 21 held, then orphan_return
        price_change(19, 2, 1, 12.5),                                   # 22 accepted
        shop_status(31_000, 6, True),                                   # 23 accepted (expires 21 first)
        line_with_time("2026-13-01 00:00:00.000"),                      # 24 malformed timestamp
        purchase(20, 21, user=6, shop=2)[:-1] + b', "pad": "' + b"x" * 5000 + b'"}}',  # 25 too_large
    ]
    pipeline.feed(F1, {0: lines})
    w = pipeline.worker(0, MAX_LINE_BYTES=4096)
    task = pipeline.wait_done(F1)
    stats = task["stats"]["shard-worker"]
    prepared, rejected = pipeline.prepared(F1), pipeline.rejected(F1)
    w.stop()

    assert reasons(rejected) == [
        "insufficient_balance", "negative_stock", "shop_inactive", "non_positive_price", "non_positive_price",
        "non_positive_qty", "malformed", "wrong_shard", "refund_exceeds_purchase", "shop_inactive",
        "purchase_rejected", "return_mismatch", "duplicate", "orphan_return", "malformed", "too_large"]
    assert [r["line_no"] for r in rejected] == [2, 4, 7, 8, 9, 10, 11, 12, 14, 15, 16, 18, 20, 21, 24, 25]
    assert all(r["source_file"] == F1 for r in rejected)
    assert rejected[1]["line"] == lines[3].decode()
    assert "detail" in rejected[6] and "detail" in rejected[7] and "timestamp" in rejected[14]["detail"]

    assert [p["event_type"] for p in prepared] == [1, 0, 0, 4, 1, 1, 3, 2, 4]
    first = prepared[0]
    assert first == {"event_key": f"1:{BIG}", "event_type": 1, "shop_id": 2, "user_id": 1, "timestamp": ts(0),
                     "shard": 0, "order_id": BIG, "good_id": 1, "qty": 1, "amount": "600.25", "source_file": F1,
                     "payload": {"order_id": BIG, "user_id": 1, "shop_id": 2, "good_id": 1, "qty": 1,
                                 "price_at_order": 600.25}}
    ret = prepared[6]
    assert (ret["event_key"], ret["shop_id"], ret["user_id"], ret["amount"], ret["order_id"]) == \
        (f"3:{BIG}", 2, 1, "100.00", BIG)
    assert "shop_id" not in ret["payload"]
    assert prepared[7]["amount"] == "12.50" and prepared[7]["user_id"] is None
    assert prepared[1]["qty"] == 5 and prepared[1]["amount"] is None
    assert all(p["timestamp"][-4] == "." for p in prepared)

    assert rejected[15]["line_truncated"] and len(rejected[15]["line"]) == 1024
    assert rejected[15]["detail"].startswith(f"{len(lines[24])} bytes, over the limit of 4096")
    assert stats == {"events": 9, "in": 25, "accepted": 9, "held": 1, "released": 0, "expired": 1,
                     "rejected": {"duplicate": 1, "insufficient_balance": 1, "malformed": 2, "negative_stock": 1,
                                  "non_positive_price": 2, "non_positive_qty": 1, "orphan_return": 1,
                                  "purchase_rejected": 1, "refund_exceeds_purchase": 1, "return_mismatch": 1,
                                  "shop_inactive": 2, "too_large": 1, "wrong_shard": 1}}
    assert pipeline.balance(1) == Decimal("499.75")      # 1000 - 600.25 + 100
    assert pipeline.balance(3) == Decimal("930.00")      # 1000 - 50 - 20
    assert pipeline.balance(2) is None                   # all its purchases rejected: still the opening balance
    assert pipeline.sql("SELECT count FROM worker_stock WHERE shop_id=2 AND good_id=1") == [(0,)]
    assert pipeline.sql("SELECT active FROM worker_shops ORDER BY shop_id") == [(0,), (1,)]
    assert pipeline.sql("SELECT state FROM worker_orders WHERE order_id=%s", (BIG,)) == [(CREDITED,)]
    # Every reason but the one only reachable with RULE_DEDUP off is exercised above.
    assert set(stats["rejected"]) == set(REASONS) - {"already_refunded"}


def line_with_time(when: str) -> bytes:
    return ('{"event_type":4,"payload":{"shop_id":8,"active":true},"timestamp":"%s"}' % when).encode()


def test_rules_switched_off(pipeline):
    lines = [
        purchase(0, 1, user=1, shop=2, price=900),           # accepted
        purchase(1, 2, user=1, shop=2, price=900),           # accepted: RULE_BALANCE off
        restock(2, 2, 1, -3, "loss"),                        # accepted: RULE_STOCK off
        shop_status(3, 4, False),
        purchase(4, 3, user=2, shop=4, price=1),             # accepted: RULE_SHOP_ACTIVE off
        price_change(5, 2, 1, 0),                            # accepted: RULE_POSITIVE_PRICE off
        restock(6, 2, 1, 1), restock(6, 2, 1, 1),            # both accepted: RULE_DEDUP off
        refund(7, 1, user=1, amount=950, shop=2),            # accepted: RULE_REFUND_LIMIT off
        refund(7, 1, user=1, amount=950, shop=2),            # already_refunded (the ledger still says once)
        purchase(8, 1, user=1, shop=2, price=900),           # duplicate: an order is charged once, always
        refund(9, 77, user=3, amount=1, shop=2),             # orphan_return at once: HOLD_SECONDS=0
    ]
    pipeline.feed(F1, {0: lines})
    w = pipeline.worker(0, RULE_BALANCE="false", RULE_STOCK="false", RULE_SHOP_ACTIVE="false",
                        RULE_POSITIVE_PRICE="false", RULE_DEDUP="false", RULE_REFUND_LIMIT="false", HOLD_SECONDS="0")
    pipeline.wait_done(F1)
    rejected, prepared = pipeline.rejected(F1), pipeline.prepared(F1)
    w.stop()
    assert reasons(rejected) == ["already_refunded", "duplicate", "orphan_return"]
    assert len(prepared) == 9
    assert pipeline.balance(1) == Decimal("150.00")      # 1000 - 900 - 900 + 950: below zero was allowed
    assert pipeline.sql("SELECT count FROM worker_stock WHERE shop_id=2 AND good_id=1") == [(-1,)]


def test_purchase_takes_stock_when_switched_on(pipeline):
    lines = [restock(0, 2, 1, 2), purchase(1, 1, user=1, shop=2, qty=3), purchase(2, 2, user=1, shop=2, qty=2),
             refund(3, 2, user=1, qty=1, amount=10, shop=2)]
    pipeline.feed(F1, {0: lines})
    w = pipeline.worker(0, PURCHASE_TAKES_STOCK="true")
    pipeline.wait_done(F1)
    rejected = pipeline.rejected(F1)
    w.stop()
    assert reasons(rejected) == ["negative_stock"] and rejected[0]["line_no"] == 2
    assert pipeline.sql("SELECT count FROM worker_stock") == [(1,)]   # 2 - 2 + 1 returned


def test_duplicates_within_a_file_across_files_and_across_a_restart(pipeline):
    a, p = restock(0, 2, 1, 5), purchase(1, 500, user=1, shop=2, price=10)
    pipeline.feed(F1, {0: [a, a, p, p, shop_status(2, 2, True)]})
    w = pipeline.worker(0)
    pipeline.wait_done(F1)
    assert reasons(pipeline.rejected(F1)) == ["duplicate", "duplicate"]
    pipeline.feed(F2, {0: [restock(10, 2, 1, 5), a, p]})
    pipeline.wait_done(F2)
    assert reasons(pipeline.rejected(F2)) == ["duplicate", "duplicate"]
    w.stop()

    w = pipeline.worker(0)                               # a new process's worth of memory
    pipeline.feed(F3, {0: [p, shop_status(2, 2, True), a, purchase(20, 501, user=1, shop=2, price=10)]})
    pipeline.wait_done(F3)
    rejected, prepared = pipeline.rejected(F3), pipeline.prepared(F3)
    w.stop()
    assert reasons(rejected) == ["duplicate", "duplicate", "duplicate"]
    assert [x["order_id"] for x in prepared] == [501]
    assert pipeline.balance(1) == Decimal("980.00")       # charged once for order 500, once for 501
    assert pipeline.stats(F3)["rejected"] == {"duplicate": 3}


def test_dedup_keys_older_than_the_window_are_pruned(pipeline):
    a = restock(0, 2, 1, 5)
    pipeline.feed(F1, {0: [a]})
    w = pipeline.worker(0, DEDUP_WINDOW="10s")
    pipeline.wait_done(F1)
    pipeline.feed(F2, {0: [restock(120_000, 2, 1, 1)]})     # the shard's clock moves 2 minutes on
    pipeline.wait_done(F2)
    assert pipeline.sql("SELECT COUNT(*) FROM worker_seen") == [(1,)]
    assert pipeline.sql("SELECT pruned FROM worker_files ORDER BY id") == [(0,), (0,)]   # REPLAY_WINDOW: 1 day
    pipeline.feed(F3, {0: [a]})                              # older than the window: not a duplicate
    pipeline.wait_done(F3)
    assert pipeline.rejected(F3) == [] and len(pipeline.prepared(F3)) == 1
    w.stop()


def test_return_before_its_purchase_is_released_by_a_later_file(pipeline):
    pipeline.feed(F1, {0: [refund(0, 900, user=1, amount=10, shop=2),       # held
                           refund(1, 901, user=1, amount=4)]})               # held, no shop_id
    w = pipeline.worker(0)
    pipeline.wait_done(F1)
    assert pipeline.prepared(F1) == [] and pipeline.rejected(F1) == []
    assert pipeline.stats(F1)["held"] == 2
    pipeline.feed(F2, {0: [purchase(2, 900, user=1, shop=2, price=10),
                           restock(3, 2, 1, 1),
                           purchase(4, 901, user=1, shop=4, price=5)]})
    pipeline.wait_done(F2)
    prepared = pipeline.prepared(F2)
    w.stop()
    assert [(x["event_type"], x["order_id"]) for x in prepared] == [(1, 900), (3, 900), (0, None), (1, 901),
                                                                   (3, 901)]
    assert all(x["source_file"] == F2 for x in prepared)
    assert prepared[4]["shop_id"] == 4 and prepared[4]["timestamp"] == ts(1)   # its purchase's shop
    assert pipeline.stats(F2)["released"] == 2 and pipeline.stats(F2)["accepted"] == 5
    assert pipeline.balance(1) == Decimal("999.00")
    assert pipeline.sql("SELECT state FROM worker_holds ORDER BY line") == [("released",), ("released",)]


def test_return_released_by_a_rejected_purchase_is_rejected(pipeline):
    pipeline.feed(F1, {0: [refund(0, 900, user=1, amount=10, shop=2),
                           purchase(1, 900, user=1, shop=2, price=5000)]})
    w = pipeline.worker(0)
    pipeline.wait_done(F1)
    rejected = pipeline.rejected(F1)
    w.stop()
    assert [(r["reason"], r["line_no"]) for r in rejected] == [("insufficient_balance", 2),
                                                              ("purchase_rejected", 1)]


def test_hold_expires_in_event_time(pipeline):
    pipeline.feed(F1, {0: [refund(0, 900, user=1, amount=10, shop=2), restock(29_000, 2, 1, 1)]})
    w = pipeline.worker(0)
    pipeline.wait_done(F1)
    assert pipeline.rejected(F1) == []                      # 29 s of event time: still held
    pipeline.feed(F2, {0: [restock(30_500, 2, 1, 1), purchase(30_600, 900, user=1, shop=2, price=10)]})
    pipeline.wait_done(F2)
    rejected, prepared = pipeline.rejected(F2), pipeline.prepared(F2)
    w.stop()
    assert [(r["reason"], r["source_file"], r["line_no"]) for r in rejected] == [("orphan_return", F1, 1)]
    assert [x["event_type"] for x in prepared] == [0, 1]    # the purchase came 30.6 s later: too late
    assert pipeline.stats(F2)["expired"] == 1 and pipeline.stats(F2)["released"] == 0


def test_hold_expires_by_the_wall_clock_cap_when_the_stream_is_idle(pipeline):
    pipeline.feed(F1, {0: [refund(0, 900, user=1, amount=10, shop=2)]})
    w = pipeline.worker(0, HOLD_WALL_CAP_SECONDS="1")
    pipeline.wait_done(F1)
    started = time.monotonic()
    servers.wait_until(lambda: pipeline.sql("SELECT state, code, resolved_file_id FROM worker_holds") ==
                       [("expired", CODE["orphan_return"], 0)], 10, 0.1, "the idle worker expiring the hold")
    assert time.monotonic() - started >= 0.5
    pipeline.feed(F2, {0: [purchase(1000, 900, user=1, shop=2, price=10)]})   # only 1 s of event time later
    pipeline.wait_done(F2)
    rejected, prepared = pipeline.rejected(F2), pipeline.prepared(F2)
    w.stop()
    assert [(r["reason"], r["source_file"], r["line_no"]) for r in rejected] == [("orphan_return", F1, 1)]
    assert [x["event_type"] for x in prepared] == [1]
    assert pipeline.stats(F2)["expired"] == 1


def test_held_returns_survive_a_restart(pipeline):
    pipeline.feed(F1, {0: [refund(0, 900, user=1, amount=10, shop=2)]})
    w = pipeline.worker(0)
    pipeline.wait_done(F1)
    w.stop()
    w = pipeline.worker(0)
    pipeline.feed(F2, {0: [purchase(5, 900, user=1, shop=2, price=10)]})
    pipeline.wait_done(F2)
    prepared = pipeline.prepared(F2)
    w.stop()
    assert [(x["event_type"], x["order_id"]) for x in prepared] == [(1, 900), (3, 900)]
    assert pipeline.balance(1) == Decimal("1000.00")


def ledger_database(make_database, name: str):
    """A fresh worker database with its schema: (url, a ledger, a connection as the worker writes with)."""
    url = make_database(name)
    WorkerState(url, 0).open().close()
    return url, Ledger(Decimal("1000.00")), db.connect(url, local_infile=True, multi_statements=True)


def write_counts(ledger: Ledger, conn, *writes) -> dict:
    """The ledger's writes for a batch (`Ledger.add_writes`' arguments) run as one script: rows
    changed by each tagged statement."""
    script = db.Script()
    ledger.add_writes(script, conn, *writes)
    with conn.cursor() as cur:
        return {tag: r.rowcount for tag, r in script.run(cur).items()}


def test_ledger_detects_a_user_or_an_order_written_by_another_worker_meanwhile(make_database):
    """The optimistic first attempt of a batch takes unknown users and orders for new. Another
    shard's worker creating the same user waits for this transaction and then fails (the worker
    retries both a conflict and a deadlock); an order this worker took for undecided but another
    one wrote changes no row, which the worker's row-count check turns into a conflict."""
    url = make_database("ledger")
    WorkerState(url, 0).open().close()
    ledger = Ledger(Decimal("1000.00"))
    a, b = (db.connect(url, local_infile=True, multi_statements=True) for _ in range(2))
    watch = db.connect(url)

    def run(conn, *writes) -> dict:
        return write_counts(ledger, conn, *writes)
    try:
        a.begin()
        with a.cursor() as cur:
            cur.execute(ledger.lock_sql(a, {5}))
            balances, new_users = ledger.balances(cur.fetchall(), {5}, cur)
        assert balances == {5: Decimal("1000.00")} and new_users == {5}
        outcome = []

        def other_worker():
            b.begin()
            try:
                with b.cursor() as cur:
                    cur.execute(ledger.lock_sql(b, {5}))
                    ledger.create_users(cur, ledger.balances(cur.fetchall(), {5}, cur)[1])
                b.commit()
                outcome.append("committed")
            except LedgerConflict:
                b.rollback()
                outcome.append("conflict")
            except pymysql.err.OperationalError as exc:   # InnoDB may call it a deadlock instead
                b.rollback()
                outcome.append("deadlock" if exc.args[0] in db.DEADLOCK_CODES else repr(exc))
        t = threading.Thread(target=other_worker)
        t.start()

        def other_waits():
            with watch.cursor() as cur:
                cur.execute("SELECT info FROM information_schema.processlist WHERE id=%s", (b.thread_id(),))
                info = cur.fetchone()[0] or ""
                return info.startswith("INSERT INTO worker_balances") or outcome
        servers.wait_until(other_waits, 10, 0.02, "the other worker waiting to create user 5")
        order = Order(77, 5, Decimal("10.00"), 2, 1, 1, True, line=1)
        done = run(a, 0, 1, [order], [], {5: Decimal("990.00")}, {5}, new_users)
        assert done["orders"] == ledger.expected_orders([order], []) == 1
        a.commit()
        t.join(10)
        assert outcome in (["conflict"], ["deadlock"])    # either way it decides its batch again

        b.begin()                                          # order 78 decided by the other worker
        run(b, 1, 2, [Order(78, 6, Decimal("3.00"), 3, 1, 1, True, line=4)], [], {}, set(), set())
        b.commit()
        a.begin()
        late = Order(78, 5, Decimal("10.00"), 2, 1, 1, True, line=2)
        done = run(a, 0, 1, [late], [], {}, set(), set())
        assert done["orders"] == 0 != ledger.expected_orders([late], [])
        a.rollback()
        with a.cursor() as cur:
            cur.execute(ALL_BALANCES)
            assert cur.fetchall() == ((5, Decimal("990.00")),)
            cur.execute("SELECT order_id, buyer, amount FROM worker_orders ORDER BY order_id")
            assert cur.fetchall() == ((77, buyer_of(5, 1), Decimal("10.00")), (78, buyer_of(6, 1), Decimal("3.00")))
    finally:
        for conn in (a, b, watch):
            conn.close()


def test_orders_written_meanwhile_never_change_and_never_balance_the_row_count(make_database):
    """Two orders this worker took for new were written by another worker meanwhile: one this
    worker would reject, one it would accept. Neither row changes (a rejection must not turn a
    debited order into a rejected one), and the count stays short of the expected one, so the
    batch is decided again (with the two collisions counting 2 and 0 the count balanced)."""
    url, ledger, conn = ledger_database(make_database, "ledger2")
    try:
        def run(*writes) -> dict:
            return write_counts(ledger, conn, *writes)
        run(1, 2, [Order(80, 6, Decimal("3.00"), 3, 1, 1, True, line=4),
                   Order(81, 6, Decimal("3.00"), 3, 1, 1, True, line=5)], [], {}, set(), set())
        conn.commit()
        late = [Order(80, 5, Decimal("10.00"), 2, 1, 1, False, line=2), Order(81, 5, Decimal("10.00"), 2, 1, 1, True,
                                                                               line=3)]
        done = run(0, 1, late, [], {}, set(), set())
        assert done["orders"] < ledger.expected_orders(late, []) == 2
        conn.commit()
        assert servers.query(url, "SELECT order_id, state FROM worker_orders ORDER BY order_id") == [(80, 1), (81, 1)]
    finally:
        conn.close()


def test_a_credit_updates_its_order_in_place_and_counts_one_row(make_database):
    """A return's credit on an earlier order is an update of that row through its order id: one
    row changed (`expected_orders` counts 1), nothing inserted or tried (the INSERT ... ON
    DUPLICATE KEY UPDATE of before tried to insert the whole row first: a write attempt and 2
    rows); a credit on an order already credited changes nothing and falls short of the count."""
    url, ledger, conn = ledger_database(make_database, "ledger_credit")
    try:
        def run(*writes) -> dict:
            return write_counts(ledger, conn, *writes)

        def writes_tried() -> int:
            with conn.cursor() as cur:
                cur.execute("SHOW SESSION STATUS LIKE 'Handler_write'")
                return int(cur.fetchone()[1])
        run(0, 1, [Order(90, 6, Decimal("3.00"), 2, 1, 1, True, line=4),
                   Order(91, 6, Decimal("3.00"), 2, 1, 1, True, line=5)], [], {}, set(), set())
        conn.commit()
        with conn.cursor() as cur:
            credited = list(Ledger.orders(cur, [90, 91]).values())
        for o in credited:
            o.credit = Decimal("3.00")
        before = writes_tried()
        done = run(0, 2, [], credited, {}, set(), set())
        assert writes_tried() == before
        assert done["orders"] == ledger.expected_orders([], credited) == 2
        conn.commit()
        assert servers.query(url, "SELECT order_id, state FROM worker_orders ORDER BY order_id") == [
            (90, CREDITED), (91, CREDITED)]
        done = run(0, 3, [], credited[:1], {}, set(), set())
        assert done["orders"] == 0 < ledger.expected_orders([], credited[:1])
        conn.rollback()
    finally:
        conn.close()


def test_a_new_user_created_meanwhile_is_never_overwritten_and_never_balances_the_count(make_database):
    """The users this batch took for new are loaded (a duplicate is skipped, not an error): one
    created by another worker meanwhile keeps its balance, and the users count falls short of
    `expected_users`, which the worker turns into a conflict. The balances of locked users
    are replaced in place, in the table they were found in."""
    url, ledger, conn = ledger_database(make_database, "ledger3")
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO worker_balances (user_id, balance) VALUES (6, 700.00)")
            # a user another worker created meanwhile: new users go to the young table
            cur.execute("INSERT INTO worker_balances_young (user_id, balance) VALUES (5, 400.00)")
        script = db.Script()
        ledger.add_writes(script, conn, 0, 1, [], [], {5: Decimal("990.00"), 6: Decimal("650.25"),
                                                        7: Decimal("980.00")}, {5, 6, 7}, {5, 7})
        with conn.cursor() as cur:
            done = script.run(cur)
        assert done["users"].rowcount == 1 < ledger.expected_users({5, 6, 7}, {5, 7}) == 2
        assert servers.query(url, f"SELECT user_id, balance FROM ({ALL_BALANCES}) b ORDER BY user_id") == [
            (5, Decimal("400.00")), (6, Decimal("650.25")), (7, Decimal("980.00"))]
    finally:
        conn.close()


def test_two_shard_workers_create_new_users_without_waiting_for_each_other(make_database):
    """Each shard worker locks the balances of its batch's users, most of them not in the table
    yet. Neither lock keeps the other worker from creating its own new users (under REPEATABLE
    READ both locked the gap above the highest user, and one waited for the other's commit);
    a user both take for new is created once, and the second creator's short count is a
    conflict."""
    url = make_database("ledger4")
    ledger = Ledger(Decimal("1000.00"))
    a, b = WorkerState(url, 0), WorkerState(url, 1)
    try:
        ca, cb = a.open(), b.open()
        with cb.cursor() as cur:
            cur.execute("SET SESSION innodb_lock_wait_timeout = 2")
        ca.begin()
        cb.begin()
        with ca.cursor() as cur:
            cur.execute(ledger.lock_sql(ca, {5, 6}))
            assert ledger.balances(cur.fetchall(), {5, 6}, cur)[1] == {5, 6}
        with cb.cursor() as cur:
            cur.execute(ledger.lock_sql(cb, {6, 9}))
            assert ledger.balances(cur.fetchall(), {6, 9}, cur)[1] == {6, 9}

        def create(conn, users: set) -> int:
            script = db.Script()
            ledger.add_writes(script, conn, 0, 1, [], [], {u: Decimal("990.00") for u in users}, users, users)
            with conn.cursor() as cur:
                return script.run(cur)["users"].rowcount
        assert create(ca, {5}) == 1
        assert create(cb, {9}) == 1                 # no wait for worker a's locks
        assert create(ca, {6}) == 1
        outcome = []
        t = threading.Thread(target=lambda: outcome.append(create(cb, {6})))
        t.start()
        t.join(0.3)
        assert outcome == []                        # waiting for worker a's row 6
        ca.commit()
        t.join(10)
        assert outcome == [0] < [ledger.expected_users({6}, {6})]   # b waited for a's row: a conflict
        cb.rollback()
        assert servers.query(url, f"SELECT user_id FROM ({ALL_BALANCES}) b ORDER BY user_id") == [(5,), (6,)]
    finally:
        a.close()
        b.close()


def _pages(url, table: str) -> int:
    servers.query(url, f"ANALYZE TABLE {table}")
    return servers.query(url, "SELECT stat_value FROM mysql.innodb_index_stats WHERE database_name=DATABASE() "
                              "AND table_name=%s AND index_name='PRIMARY' AND stat_name='n_leaf_pages'", (table,))[0][0]


def test_new_users_of_two_workers_interleaved_leave_the_balances_pages_full(make_database):
    """A generator's new customers get ascending ids and each shard worker creates those its
    shard saw first, so the two workers' new users interleave at the top of the balances. Inserted
    straight into worker_balances they split its pages in the middle (~128 bytes a user there
    for a ~37-byte row, ~30% full); young first, then sealed in key order, the pages stay full.
    Every balance is found again, wherever it is."""
    url = make_database("ledger5")
    a, b = WorkerState(url, 0), WorkerState(url, 1)
    ledgers = [Ledger(Decimal("1000.00")), Ledger(Decimal("1000.00"))]
    rnd = __import__("random").Random(5)
    users, want = 40_000, {}
    try:
        conns = [a.open(), b.open()]
        for start in range(1, users + 1, 1000):
            parts: list[set] = [set(), set()]
            for u in range(start, start + 1000):
                parts[rnd.randrange(2)].add(u)
            for n in (0, 1):
                ledger, conn = ledgers[n], conns[n]
                known = set(rnd.sample(range(1, start), min(start - 1, 200)))   # earlier users spend too
                conn.begin()
                with conn.cursor() as cur:
                    cur.execute(ledger.lock_sql(conn, parts[n] | known))
                    balances, new = ledger.balances(cur.fetchall(), parts[n] | known, cur)
                    assert new == parts[n]
                    for u in known:
                        assert balances[u] == want[u]
                    balances = {u: v - 1 for u, v in balances.items()}
                    script = db.Script()
                    ledger.add_writes(script, conn, n, 1, [], [], balances, set(balances), new)
                    assert script.run(cur)["users"].rowcount == len(new)
                conn.commit()
                want.update(balances)
            if ledgers[start // 1000 % 2].created >= 4000:
                ledgers[start // 1000 % 2].seal(conns[start // 1000 % 2], keep=2000)
        assert dict(servers.query(url, ALL_BALANCES)) == want
        young = servers.query(url, "SELECT COUNT(*) FROM worker_balances_young")[0][0]
        assert 2000 <= young < 12_000
        # ~37 bytes a row: ~440 rows a full leaf page; interleaved inserts left ~130 (main: 290 pages)
        assert _pages(url, "worker_balances") * 16384 / (users - young) < 45
    finally:
        a.close()
        b.close()


def test_a_batch_locks_balances_by_key_in_both_tables_however_small(make_database):
    """A young table the optimizer takes for small (fewer rows than the batch has users) was
    scanned whole by the locking read, and a locking scan waits for every row the other worker
    locked, matching or not: the two shard workers took turns (a two-worker bench's wall time
    9.5 -> 15.5 s). Each table is read by its primary key, and the other worker's locked users
    do not stop this one."""
    url = make_database("ledger7")
    ledger = Ledger(Decimal("1000.00"))
    a, b = WorkerState(url, 0), WorkerState(url, 1)
    users = set(range(2, 12))
    try:
        ca, cb = a.open(), b.open()
        with ca.cursor() as cur:
            cur.execute("INSERT INTO worker_balances_young (user_id, balance) VALUES (1, 1.00)")
            cur.execute("INSERT INTO worker_balances (user_id, balance) VALUES (100, 3.00)")
            cur.execute("ANALYZE TABLE worker_balances_young, worker_balances")
            cur.fetchall()
            cur.execute("EXPLAIN " + ledger.lock_sql(ca, users))
            plans = {r[2]: (r[3], r[5]) for r in cur.fetchall()}
        assert plans["worker_balances_young"] == ("range", "PRIMARY") == plans["worker_balances"]
        with cb.cursor() as cur:
            cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
        ca.begin()
        with ca.cursor() as cur:
            cur.execute(ledger.lock_sql(ca, {1, 100}))
        cb.begin()
        with cb.cursor() as cur:                    # no wait for worker a's users 1 and 100
            cur.execute(ledger.lock_sql(cb, users))
            assert ledger.balances(cur.fetchall(), users, cur)[1] == users
        cb.rollback()
        ca.rollback()
    finally:
        a.close()
        b.close()


def test_sealing_new_users_waits_for_a_batch_reading_balances(make_database):
    """A batch holds worker_ledger's row shared from its locking read to its commit, and the
    sealing pass takes it exclusive: a user a batch counted new (or young) never moves under it
    (a user created meanwhile by the other worker stays where the batch's insert meets it)."""
    url = make_database("ledger6")
    ledger, sealer = Ledger(Decimal("1000.00")), Ledger(Decimal("1000.00"))
    a, b = WorkerState(url, 0), WorkerState(url, 1)
    try:
        ca, cb = a.open(), b.open()
        with ca.cursor() as cur:
            cur.execute("INSERT INTO worker_balances_young (user_id, balance) VALUES (1, 10.00), (2, 20.00), "
                        "(50, 30.00)")
        ca.begin()
        with ca.cursor() as cur:
            cur.execute(ledger.lock_sql(ca, {1, 3}))
            balances, new = ledger.balances(cur.fetchall(), {1, 3}, cur)
        assert balances == {1: Decimal("10.00"), 3: Decimal("1000.00")} and new == {3} and ledger.young == {1}
        assert sealer.due()                         # a process seals at its first pass after start
        moved = []
        t = threading.Thread(target=lambda: moved.append(sealer.seal(cb, keep=10)))
        t.start()
        t.join(0.5)
        assert moved == []                          # waiting for the batch
        script = db.Script()
        ledger.add_writes(script, ca, 0, 1, [], [], {1: Decimal("9.00"), 3: Decimal("999.00")}, {1, 3}, {3})
        with ca.cursor() as cur:
            assert script.run(cur)["users"].rowcount == 1
        ca.commit()
        t.join(10)
        assert moved == [3] and not sealer.due()    # 1, 2, 3 below 50 - 10
        assert servers.query(url, "SELECT user_id, balance FROM worker_balances ORDER BY user_id") == [
            (1, Decimal("9.00")), (2, Decimal("20.00")), (3, Decimal("999.00"))]
        assert servers.query(url, "SELECT user_id FROM worker_balances_young") == [(50,)]
        assert servers.query(url, "SELECT sealed_below FROM worker_ledger") == [(40,)]
        ca.begin()                                  # found in worker_balances now, written there
        with ca.cursor() as cur:
            cur.execute(ledger.lock_sql(ca, {1, 50}))
            balances, new = ledger.balances(cur.fetchall(), {1, 50}, cur)
            assert not new and ledger.young == {50}
            script = db.Script()
            ledger.add_writes(script, ca, 0, 1, [], [], {1: Decimal("8.00"), 50: Decimal("29.00")}, {1, 50}, set())
            script.run(cur)
        ca.commit()
        assert servers.query(url, f"SELECT user_id, balance FROM ({ALL_BALANCES}) b ORDER BY user_id") == [
            (1, Decimal("8.00")), (2, Decimal("20.00")), (3, Decimal("999.00")), (50, Decimal("29.00"))]
    finally:
        a.close()
        b.close()


def _keys_read(conn, sql: str) -> tuple[int, list]:
    """The index lookups (`Handler_read_key`) a statement makes on the session, and its rows."""
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Handler_read_key'")
        before = int(cur.fetchone()[1])
        cur.execute(sql)
        rows = cur.fetchall()
        cur.execute("SHOW SESSION STATUS LIKE 'Handler_read_key'")
        return int(cur.fetchone()[1]) - before, rows


def test_a_batch_looks_for_users_above_the_ledgers_bound_in_the_young_table_only(make_database):
    """No user above `worker_ledger.sealed_below` is in worker_balances (a pass moves only users
    below its bound there, and new users go young), and most of a fresh file's users are new:
    once a worker has read the bound, its locking read looks for them in the young table alone,
    one index lookup a user where there were two."""
    url, ledger, conn = ledger_database(make_database, "ledger8")
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO worker_balances (user_id, balance) VALUES (1, 1.00), (2, 2.00), (5, 5.00)")
            cur.execute("INSERT INTO worker_balances_young (user_id, balance) VALUES (3, 3.00), (50, 50.00)")
            cur.execute("UPDATE worker_ledger SET sealed_below = 5 WHERE id = 1")
        users = {2, 3, 5, 50, 60, 70}
        conn.begin()
        fresh, rows = _keys_read(conn, ledger.lock_sql(conn, users))   # the bound not read yet: both tables
        with conn.cursor() as cur:
            assert ledger.balances(rows, users, cur) == (
                {2: Decimal("2.00"), 3: Decimal("3.00"), 5: Decimal("5.00"), 50: Decimal("50.00"),
                 60: Decimal("1000.00"), 70: Decimal("1000.00")}, {60, 70})
        conn.rollback()
        assert ledger.bound == 5
        conn.begin()
        bounded, again = _keys_read(conn, ledger.lock_sql(conn, users))
        conn.rollback()
        assert again == rows
        assert fresh - bounded == len({50, 60, 70})   # not looked for in worker_balances
    finally:
        conn.close()


def test_a_batch_finds_users_another_workers_pass_sealed_since_it_read_the_bound(make_database):
    """A worker's bound is the one its last batch read: the other worker's pass may have moved
    users above it into worker_balances since. The ledger's row answers the bound under its
    shared lock in the same statement, and the users between the two found in neither table are
    read in worker_balances then: never taken for new (created twice, money twice). The bound
    is never lowered, whatever a pass keeps young."""
    url, ledger, conn = ledger_database(make_database, "ledger9")
    sealer = Ledger(Decimal("1000.00"))
    other = db.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO worker_balances_young (user_id, balance) VALUES (3, 3.00), (4, 4.00), "
                        "(40, 40.00)")
        conn.begin()
        with conn.cursor() as cur:
            cur.execute(ledger.lock_sql(conn, {3}))
            ledger.balances(cur.fetchall(), {3}, cur)
        conn.commit()
        was = ledger.bound
        assert sealer.seal(other, keep=30) == 2                     # 3 and 4 move: below 40 - 30
        assert servers.query(url, "SELECT sealed_below FROM worker_ledger") == [(10,)] and was < 3
        conn.begin()
        with conn.cursor() as cur:
            cur.execute(ledger.lock_sql(conn, {3, 4, 40, 41}))
            balances, new = ledger.balances(cur.fetchall(), {3, 4, 40, 41}, cur)
        conn.rollback()
        assert new == {41} and ledger.young == {40} and ledger.bound == 10
        assert balances == {3: Decimal("3.00"), 4: Decimal("4.00"), 40: Decimal("40.00"), 41: Decimal("1000.00")}
        assert sealer.seal(other, keep=35) == 0                     # below 5: nothing to move
        assert servers.query(url, "SELECT sealed_below FROM worker_ledger") == [(10,)]
    finally:
        conn.close()
        other.close()


def test_the_worker_claims_several_files_of_its_shard_at_once_and_reports_each(pipeline):
    files = [f"2026030112000{i}" for i in range(3)]
    for i, name in enumerate(files):
        pipeline.feed(name, {0: [purchase(i, 700 + i, user=1, shop=2, price=1)]})
    from app.daemon import Daemon
    from app.worker.stage import WorkerStage
    settings = pipeline.settings(WORKER_CLAIM_LIMIT=3)
    stage = WorkerStage(settings, 0)
    daemon = Daemon(stage, settings)
    claimed = []
    claim = daemon.client.claim

    def counting(*args, **kwargs):
        tasks = claim(*args, **kwargs)
        if tasks:
            claimed.append(len(tasks))
        return tasks
    daemon.client.claim = counting
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        for name in files:
            pipeline.wait_done(name)
        prepared = [[x["order_id"] for x in pipeline.prepared(name)] for name in files]
    finally:
        daemon.stop.set()
        thread.join(30)
    assert stage.claim_limit == 3 and claimed[0] == 3      # one claim for the three files
    assert prepared == [[700], [701], [702]]
    assert pipeline.balance(1) == Decimal("997.00")


def test_files_claimed_after_one_sent_back_upstream_wait_for_it(pipeline):
    """A worker holding several files of its shard whose first file's input is missing sends
    that file back to the splitter and hands back the others unread: deciding a later file
    first would take its return for one whose purchase never came (and hold it)."""
    files = [f"2026030113000{i}" for i in range(3)]
    pipeline.feed(files[0], {0: [purchase(0, 910, user=1, shop=2, price=10)]})
    pipeline.feed(files[1], {0: [refund(1, 910, user=1, amount=10, shop=2)]})
    pipeline.feed(files[2], {0: [purchase(2, 911, user=1, shop=2, price=1)]})
    first_input = layout.splitter_output(pipeline.shared, files[0], 0)
    kept = first_input.read_bytes()
    first_input.unlink()
    from app.daemon import Daemon
    from app.worker.stage import WorkerStage
    settings = pipeline.settings(WORKER_CLAIM_LIMIT=3, CLAIM_WAIT_SECONDS=0.2)
    daemon = Daemon(WorkerStage(settings, 0), settings)
    claims = []
    claim = daemon.client.claim

    def counting(*args, **kwargs):
        tasks = claim(*args, **kwargs)
        claims.append([t.filename for t in tasks])
        return tasks
    daemon.client.claim = counting
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        servers.wait_until(lambda: pipeline.task(files[0], 0)["shard_splitter_status"] == "new", 30, 0.02,
                           "the first file sent back to the splitter")
        assert claims[0] == files                          # the three came in one claim
        seen = len(claims)
        servers.wait_until(lambda: len(claims) > seen + 1, 30, 0.02, "the worker claiming again")
        assert [pipeline.task(name, 0)["shard_worker_status"] for name in files[1:]] == ["new", "new"]
        first_input.write_bytes(kept)                      # the splitter again
        pipeline.client.start("shard-splitter", files[0], 0, "test-splitter")
        pipeline.client.done("shard-splitter", files[0], 0, "test-splitter", events=1)
        for name in files:
            pipeline.wait_done(name)
        assert pipeline.stats(files[1])["held"] == 0 and pipeline.stats(files[1])["accepted"] == 1
        assert [x["source_file"] for x in pipeline.prepared(files[1])] == [files[1]]
    finally:
        daemon.stop.set()
        thread.join(30)
    assert pipeline.balance(1) == Decimal("999.00")
