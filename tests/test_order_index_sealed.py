"""The sealed order index (migration 0003, docs/splitter.md "Sealing"), on the real MariaDB:
sealed epochs route exactly as their hot rows did, lookups racing sealing and truncation see
every purchase once, the ring never wraps onto an epoch not truncated, a file whose epoch was
closed under it is split again, and the upgrade of a populated 0002 database."""
from __future__ import annotations

import random
import re
import threading

import pymysql
import pytest

from app import db, layout
from app.daemon import Retryable
from app.splitter import order_index
from app.splitter.order_index import BUCKET, ENTRY, RING, EpochSealed, OrderIndex
from tests import servers
from tests.test_splitter_routing import ev, split, write_source


def make_index(url, **kw) -> OrderIndex:
    kw.setdefault("seal_grace", 0.0)
    idx = OrderIndex(url, **kw)
    idx.ensure_schema()
    return idx


def index_file(idx: OrderIndex, name: str, purchases: list[tuple[int, int]]) -> None:
    """Index a file's purchases (order_id, shop_id) at lines 1, 2, ... as a split does."""
    routing = idx.open_file(name)
    for line, (order, shop) in enumerate(purchases, 1):
        routing.add_purchase(order, shop, line)
    routing.finish()


def seal_all(idx: OrderIndex) -> int:
    """Seal every closed epoch (one a call, as the splitter's pass does); how many."""
    n = 0
    while idx.seal() is not None:
        n += 1
    return n


def state(url) -> tuple:
    return servers.query(url, "SELECT epoch, closed_below, sealed_below, truncated_below FROM splitter_seq")[0]


def hot_rows(url) -> list[tuple]:
    return servers.query(url, "SELECT epoch, order_id, file_id, line, shop_id FROM splitter_order "
                              "ORDER BY epoch, order_id, file_id, line")


def sealed_rows(url) -> list[tuple]:
    rows = []
    for epoch, entries in servers.query(url, "SELECT epoch, entries FROM splitter_sealed ORDER BY epoch, bucket"):
        rows += [(epoch, *entry) for entry in ENTRY.iter_unpack(entries)]
    return rows


def history(rng: random.Random) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Files of purchases with random 63-bit, negative and extreme order ids, and one order
    bought so often that its entries span several buckets of one epoch."""
    crowded = 2**40 + 5
    orders = [-2**63, 2**63 - 1, -1, 0, crowded]
    files = []
    for f in range(12):
        purchases = [(rng.getrandbits(64) - 2**63, rng.randrange(1000)) for _ in range(rng.randrange(40, 90))]
        purchases += [(crowded, f * 100 + k) for k in range(BUCKET + 10)]
        purchases.append((orders[f % 4], f))
        rng.shuffle(purchases)
        orders += [o for o, _ in purchases[::5]]
        files.append(purchases)
    return files, orders + [12345, -12345]       # the last two were never bought


def lookups(idx: OrderIndex, name: str, orders: list[int], conn=None) -> list[int | None]:
    routing = idx.open_file(name)
    return idx.lookup(routing, [(o, 1) for o in orders], conn)


def test_sealed_epochs_route_exactly_as_their_hot_rows_and_the_partitions_are_emptied(pipeline_db):
    idx = make_index(pipeline_db, epoch_rows=150)
    try:
        files, orders = history(random.Random(7))
        for n, purchases in enumerate(files):
            index_file(idx, f"2026010100{n:04d}", purchases)
        before_rows = hot_rows(pipeline_db)
        before = lookups(idx, "2026010200000", orders)          # a file that sees them all
        assert sum(shop is not None for shop in before) == len(orders) - 2
        current = state(pipeline_db)[0]
        assert current >= 4

        assert seal_all(idx) == current                         # every epoch but the current one
        assert state(pipeline_db) == (current, current, current, current)
        # What was hot is sealed, in key order, entry for entry; the sealed epochs' hot rows are gone.
        assert sealed_rows(pipeline_db) == [r for r in before_rows if r[0] < current]
        assert hot_rows(pipeline_db) == [r for r in before_rows if r[0] == current]
        # The same file and a new one route as before, with a fresh process and with this one.
        assert lookups(idx, "2026010200000", orders) == before
        fresh = make_index(pipeline_db)
        try:
            assert lookups(fresh, "2026010200000", orders) == before
            assert lookups(fresh, "2026010200001", orders) == before
        finally:
            fresh.close()
    finally:
        idx.close()


def test_the_nearest_earlier_purchase_of_the_same_file_is_found_in_its_sealed_epoch(pipeline_db):
    idx = make_index(pipeline_db, epoch_rows=1)
    try:
        order = 2**62 + 3
        index_file(idx, "20260101000001", [(order, 5), (7, 1), (order, 6), (8, 1)])
        index_file(idx, "20260101000002", [(order, 9)])
        assert seal_all(idx) == 2
        # A re-split of the first file: its own earlier purchases, and not the second file's
        # (indexed after its horizon was fixed); the second file sees the first's earliest.
        routing = idx.open_file("20260101000001")
        assert idx.lookup(routing, [(order, 1), (order, 2), (order, 4), (order, 3)]) == [None, 5, 6, 5]
        assert idx.lookup(idx.open_file("20260101000002"), [(order, 1)]) == [5]
    finally:
        idx.close()


def test_lookups_racing_sealing_and_truncation_see_every_purchase_once(pipeline_db):
    """Lookups on their own connection while another process seals epoch after epoch (and
    truncates their partitions), three times round the ring: every answer is the one the
    hot rows gave."""
    idx = make_index(pipeline_db, epoch_rows=60)
    reader = make_index(pipeline_db)
    rng = random.Random(11)
    owners: dict[int, int] = {}
    seen_states: set[int] = set()
    try:
        for round_ in range(3):
            for n in range(RING - 1):      # fills the ring: RING - 1 closed epochs and the current one
                purchases = [(rng.getrandbits(63), rng.randrange(1, 10**6)) for _ in range(70)]
                for order, shop in purchases:
                    owners.setdefault(order, shop)       # the earliest file's purchase is the one seen
                index_file(idx, f"2026010{round_}00{n:04d}", purchases)
            orders = sorted(owners)
            expected = [owners[o] for o in orders]
            current = state(pipeline_db)[0]
            errors: list[BaseException] = []
            done = threading.Event()

            def read() -> None:
                conn = db.connect(pipeline_db, multi_statements=True)
                try:
                    while not done.is_set():
                        routing = reader.open_file(f"202602010000{round_}")   # its horizon: all indexed so far
                        got = reader.lookup(routing, [(o, 1) for o in orders], conn)
                        if got != expected:
                            wrong = sum(a != b for a, b in zip(got, expected))
                            raise AssertionError(f"{wrong} of {len(orders)} lookups differ at {state(pipeline_db)}")
                        seen_states.add(state(pipeline_db)[2])
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    conn.close()

            thread = threading.Thread(target=read)
            thread.start()
            try:
                while not errors and idx.seal() is not None:
                    done.wait(0.03)          # lets the reader run between two sealings
            finally:
                done.set()
                thread.join()
            assert not errors, errors[0]
            assert state(pipeline_db)[0] == current and state(pipeline_db)[2:] == (current, current)
        assert current >= 2 * RING
        # The reader really ran while sealing went on: it saw many sealing states.
        assert len(seen_states) >= 6, seen_states
    finally:
        reader.close()
        idx.close()


def test_the_ring_never_wraps_onto_an_epoch_whose_partition_was_not_emptied(pipeline_db):
    idx = make_index(pipeline_db, epoch_rows=1)
    try:
        for n in range(RING + 3):
            index_file(idx, f"20260101{n:06d}", [(1000 + n, n)])
        # Nothing sealed: the epoch stops at the last partition of the ring and grows.
        assert state(pipeline_db)[0] == RING - 1
        assert servers.query(pipeline_db, "SELECT COUNT(*) FROM splitter_order WHERE epoch = %s", (RING - 1,)) == [(4,)]
        assert idx.seal() == 0                        # epoch 0 sealed, its partition emptied
        index_file(idx, "20260102000000", [(5000, 1)])
        assert state(pipeline_db)[0] == RING          # onto partition 0 again
        index_file(idx, "20260102000001", [(5001, 2)])
        assert state(pipeline_db)[0] == RING          # partition 1 still holds epoch 1
        assert seal_all(idx) == RING - 1
        # Every purchase still found, from buckets and hot rows.
        got = lookups(idx, "20260103000000", [1000 + n for n in range(RING + 3)] + [5000, 5001])
        assert got == list(range(RING + 3)) + [1, 2]
    finally:
        idx.close()


def test_the_table_has_as_many_partitions_as_the_ring(pipeline_db):
    make_index(pipeline_db).close()
    assert servers.query(pipeline_db, "SELECT COUNT(*) FROM information_schema.partitions WHERE table_schema = "
                                      "DATABASE() AND table_name = 'splitter_order'") == [(RING,)]


def test_a_file_whose_epoch_was_closed_before_its_index_completed_is_split_again(pipeline_db):
    idx = make_index(pipeline_db, epoch_rows=1)
    try:
        slow = idx.open_file("20260101000001")              # opened in epoch 0, still splitting
        slow.add_purchase(2**50 + 1, 3, 1)
        index_file(idx, "20260101000002", [(2**50 + 2, 4)])  # epoch 0 -> 1
        index_file(idx, "20260101000003", [(2**50 + 3, 5)])  # epoch 1 -> 2
        # With a grace, an unindexed file opened just now keeps its epoch open.
        graced = make_index(pipeline_db, seal_grace=600.0)
        try:
            assert graced.seal() is None and state(pipeline_db)[1] == 0
        finally:
            graced.close()
        assert idx.seal() == 0                               # no grace: epoch 0 closed and sealed
        with pytest.raises(EpochSealed, match="closed for sealing"):
            slow.finish()
        assert issubclass(EpochSealed, Retryable)            # the daemon hands the task back
        # Split again, it takes the current epoch, and its purchase is found.
        index_file(idx, "20260101000001", [(2**50 + 1, 3)])
        assert servers.query(pipeline_db, "SELECT epoch, indexed_seq IS NOT NULL FROM splitter_file "
                                          "WHERE filename = '20260101000001'") == [(2, 1)]
        assert lookups(idx, "20260101000009", [2**50 + 1, 2**50 + 2, 2**50 + 3]) == [3, 4, 5]
    finally:
        idx.close()


def test_splitting_files_seals_by_itself_and_resplits_stay_byte_identical(shared_dir, pipeline_db):
    layout.splitter_dir(shared_dir).mkdir(parents=True)
    idx = OrderIndex(pipeline_db, epoch_rows=1, seal_grace=0.0, prune_every=3600.0)
    try:
        buy = [ev(1, order_id=2**60 + n, user_id=1, shop_id=n, good_id=1, qty=1, price_at_order=1.0) for n in range(6)]
        ret = [ev(3, order_id=2**60 + n, user_id=1, good_id=1, qty=1, refund_amount=1.0) for n in range(6)]
        for n in range(6):
            write_source(shared_dir, f"2026010100000{n}", [buy[n]])
            split(shared_dir, idx, f"2026010100000{n}")
        write_source(shared_dir, "20260101000009", ret + [buy[0], ret[0]])
        _, first, rec = split(shared_dir, idx, "20260101000009")
        assert rec == [] and first == {0: b"".join(ret[0::2]) + buy[0] + ret[0], 1: b"".join(ret[1::2])}
        # The splitter's own pass after each file seals what closed (as the stage calls it).
        while idx.prune_due(0.0):
            idx.prune()
        assert state(pipeline_db)[2] == state(pipeline_db)[0] >= 6
        assert split(shared_dir, idx, "20260101000009")[1] == first
    finally:
        idx.close()


def test_the_upgrade_of_a_populated_0002_database_keeps_every_row_and_seals_old_epochs(make_database):
    url = make_database("upgrade3")
    conn = db.connect(url)
    rng = random.Random(3)
    with conn.cursor() as cur:
        for m in db.migrations("splitter")[:2]:
            for statement in m.statements():
                cur.execute(statement)
        # 12 epochs of one file each (more than the ring: old epochs share partitions).
        for f in range(12):
            cur.execute("INSERT INTO splitter_file (filename, horizon, indexed_seq, indexed_at, purchases, epoch) "
                        "VALUES (%s, %s, %s, NOW(3), 20, %s)", (f"2025010100{f:04d}", f, f + 1, f))
            cur.execute("INSERT INTO splitter_epoch (epoch, first_seq, last_seq) VALUES (%s, %s, %s)", (f, f + 1, f + 1))
            cur.executemany("INSERT INTO splitter_order (epoch, order_id, file_id, line, shop_id) VALUES (%s,%s,%s,%s,%s)",
                            [(f, rng.getrandbits(63), f + 1, line, rng.randrange(100)) for line in range(1, 21)])
        cur.execute("UPDATE splitter_seq SET value = 12, epoch = 11")
    conn.close()
    before = hot_rows(url)
    orders = [r[1] for r in before]
    idx = make_index(url, epoch_rows=1)
    try:
        assert hot_rows(url) == before
        expected = lookups(idx, "2025020100000", orders)
        assert None not in expected
        # Run again from the top (as after a stop halfway): nothing changes.
        conn = db.connect(url)
        with conn.cursor() as cur:
            for statement in db.migrations("splitter")[2].statements():
                cur.execute(statement)
        conn.close()
        assert hot_rows(url) == before and state(url) == (11, 0, 0, 0)
        assert seal_all(idx) == 11
        assert state(url) == (11, 11, 11, 11)
        assert sealed_rows(url) == [r for r in before if r[0] < 11]
        assert hot_rows(url) == [r for r in before if r[0] == 11]
        assert lookups(idx, "2025020100000", orders) == expected
        index_file(idx, "2025020100001", [(1, 1)])            # the epoch moves on again
        assert state(url)[0] == 12
    finally:
        idx.close()


def test_pruning_deletes_sealed_buckets_by_the_window(pipeline_db):
    idx = make_index(pipeline_db, epoch_rows=1, window=3600.0)
    try:
        index_file(idx, "20260101000001", [(11, 1), (12, 2)])
        index_file(idx, "20260101000002", [(13, 3)])
        assert seal_all(idx) == 2
        servers.query(pipeline_db, "UPDATE splitter_file SET indexed_at = NOW(3) - INTERVAL 3 HOUR, "
                                   "opened_at = NOW(3) - INTERVAL 3 HOUR WHERE filename = '20260101000001'")
        assert idx.prune() == 2
        assert sorted(r[1] for r in sealed_rows(pipeline_db)) == [13]
        assert servers.query(pipeline_db, "SELECT epoch, dir IS NULL FROM splitter_epoch ORDER BY epoch") == \
            [(0, 1), (1, 0)]
    finally:
        idx.close()


def test_prune_goes_on_where_it_stopped(pipeline_db, monkeypatch):
    """A pruning cut short by PRUNE_STATEMENTS goes on at the next call (it stopped for good:
    the epoch floor was already recorded, so the next call found nothing to do)."""
    monkeypatch.setattr(order_index, "PRUNE_ROWS", 2)
    monkeypatch.setattr(order_index, "PRUNE_STATEMENTS", 1)
    idx = make_index(pipeline_db, epoch_rows=1000, window=3600.0, seal_grace=600.0)
    try:
        index_file(idx, "20260101000001", [(n, 1) for n in range(1, 8)])
        servers.query(pipeline_db, "UPDATE splitter_seq SET epoch = 1, epoch_rows = 0")   # as if it moved on
        servers.query(pipeline_db, "UPDATE splitter_file SET indexed_at = NOW(3) - INTERVAL 3 HOUR, "
                                   "opened_at = NOW(3) - INTERVAL 3 HOUR")
        deleted = 0
        for _ in range(6):
            deleted += idx._prune(0.0)
        assert deleted == 7 and hot_rows(pipeline_db) == []
    finally:
        idx.close()


def test_the_integers_sealing_slices_by_are_exactly_0_to_count_on_the_server(pipeline_db):
    for count in (1, 2, 15, 16, 17, 255, 256, 257, 4095, 4096, 4097, 5463):
        got = servers.query(pipeline_db, f"SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) "
                                         f"FROM {order_index._integers(count)}")
        assert got == [(count, count, 0, count - 1)], count


def test_sealing_and_lookups_send_no_mariadb_only_sql(pipeline_db, monkeypatch):
    """MySQL 8.0 runs the pipeline database too (db/README.md): no sequence-engine table
    (`seq_0_to_N`), no `SET STATEMENT ... FOR`. An epoch of 300 buckets (three digits of the
    integers it is sliced by) is sealed entry for entry and looked up as its hot rows were."""
    sent: list[str] = []
    original = pymysql.connections.Connection._execute_command

    def recording(conn, command, sql):
        sent.append(sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql))
        return original(conn, command, sql)
    monkeypatch.setattr(pymysql.connections.Connection, "_execute_command", recording)
    idx = make_index(pipeline_db, epoch_rows=BUCKET * 300)
    try:
        rng = random.Random(11)
        purchases = [(rng.getrandbits(64) - 2**63, rng.randrange(1, 1000)) for _ in range(BUCKET * 300)]
        index_file(idx, "20260101000001", purchases)
        index_file(idx, "20260101000002", [(purchases[0][0], 5)])
        before_rows = hot_rows(pipeline_db)
        orders = [o for o, _ in purchases[::7]] + [12345]
        before = lookups(idx, "20260102000000", orders)
        assert seal_all(idx) == 1
        assert servers.query(pipeline_db, "SELECT COUNT(*), MAX(bucket) FROM splitter_sealed") == [(300, 299)]
        assert sealed_rows(pipeline_db) == [r for r in before_rows if r[0] == 0]
        assert lookups(idx, "20260102000000", orders) == before
        fresh = make_index(pipeline_db)
        try:
            assert lookups(fresh, "20260102000001", orders) == before
        finally:
            fresh.close()
    finally:
        idx.close()
    assert any("INSERT INTO splitter_sealed" in s for s in sent)      # the statements were seen
    assert any("group_concat_max_len" in s and "splitter_sealed" in s for s in sent)
    assert [s for s in sent if re.search(r"\bseq_\d+_to_\d+", s) or re.search(r"\bSET\s+STATEMENT\b", s, re.I)] == []


def test_sealing_and_pruning_write_no_on_disk_temporary_table(pipeline_db):
    """A BLOB in a derived table is an on-disk temporary table on MariaDB (another mariadbd
    cleaning the same tmpdir once deleted one mid-statement): sealing and pruning make none."""
    idx = make_index(pipeline_db, epoch_rows=BUCKET * 3, window=3600.0)
    try:
        def disk_tables() -> int:
            with idx.conn().cursor() as cur:
                cur.execute("SHOW SESSION STATUS LIKE 'Created_tmp_disk_tables'")
                return int(cur.fetchone()[1])
        rng = random.Random(5)
        index_file(idx, "20260101000001", [(rng.getrandbits(62), 1) for _ in range(BUCKET * 3 + 10)])
        index_file(idx, "20260101000002", [(rng.getrandbits(62), 2) for _ in range(10)])
        before = disk_tables()
        assert seal_all(idx) == 1
        servers.query(pipeline_db, "UPDATE splitter_file SET indexed_at = NOW(3) - INTERVAL 3 HOUR, "
                                   "opened_at = NOW(3) - INTERVAL 3 HOUR WHERE filename = '20260101000001'")
        assert idx.prune() == BUCKET * 3 + 10
        assert disk_tables() == before
    finally:
        idx.close()


def test_opening_a_file_reads_the_directories_of_its_sealed_epochs(pipeline_db, monkeypatch):
    """A process that does not hold a sealed epoch's directory yet reads it when it opens a
    file that sees the epoch (the opening says which), so the first lookup is one statement;
    then it opens a file in one round trip, and no directory is sent again; an epoch sealed
    after the file was opened is still found by its lookup (the statement's sealed flag; the
    directory read, the statement run again)."""
    from tests.test_splitter_routing import count_round_trips
    idx = make_index(pipeline_db, epoch_rows=1)
    try:
        order = 2**61 + 9
        index_file(idx, "20260101000001", [(order, 5)])
        index_file(idx, "20260101000002", [(order + 1, 6)])
        assert seal_all(idx) == 2
        fresh = make_index(pipeline_db)
        try:
            trips = count_round_trips(monkeypatch)
            routing = fresh.open_file("20260101000003")
            assert fresh.lookup(routing, [(order, 1), (order + 1, 1)]) == [5, 6]
            assert trips[0] == 3
            trips[0] = 0
            routing = fresh.open_file("20260101000003")
            assert fresh.lookup(routing, [(order, 1), (order + 1, 1)]) == [5, 6]
            assert trips[0] == 2
            sent = []
            real = db.Script.add
            monkeypatch.setattr(db.Script, "add", lambda self, tag, sql, *a: sent.append(sql) or real(self, tag, sql, *a))
            fresh.open_file("20260101000004")
            assert any("NOT IN (0,1)" in sql for sql in sent)
            # Opened before its epochs are sealed, looked up after: the same answer.
            index_file(idx, "20260101000005", [(order + 2, 7)])
            routing = fresh.open_file("20260101000006")
            assert seal_all(idx) >= 1
            assert fresh.lookup(routing, [(order, 1), (order + 2, 1)]) == [5, 7]
        finally:
            fresh.close()
    finally:
        idx.close()


def test_a_files_last_lookup_carries_its_index_completion(pipeline_db):
    """A file's last lookup sends its index's completion in the same round trip: the answer is
    the lookup's (the file's own purchase later than a return does not route it), the file is
    indexed (later files find its purchases), `finish` has nothing left to send. A file whose
    epoch was closed for sealing meanwhile is refused as `finish` refuses it, and split again."""
    idx = make_index(pipeline_db, epoch_rows=1)
    try:
        index_file(idx, "20260101000001", [(2**49 + 1, 3)])                  # epoch 0 -> 1
        routing = idx.open_file("20260101000002")
        routing.add_purchase(2**49 + 2, 4, 1)
        routing.add_purchase(2**49 + 9, 7, 5)
        assert routing.lookup([(2**49 + 1, 2), (2**49 + 9, 3)], finish=True) == [3, None]
        assert routing.indexed
        assert servers.query(pipeline_db, "SELECT epoch, indexed_seq, purchases FROM splitter_file "
                                          "WHERE filename = '20260101000002'") == [(1, 2, 2)]
        routing.finish()
        assert lookups(idx, "20260101000003", [2**49 + 1, 2**49 + 2, 2**49 + 9]) == [3, 4, 7]

        slow = idx.open_file("20260101000004")                                # opened in epoch 2
        slow.add_purchase(2**49 + 5, 6, 1)
        index_file(idx, "20260101000005", [(2**49 + 6, 1)])                  # epoch 2 -> 3
        index_file(idx, "20260101000006", [(2**49 + 7, 1)])                  # epoch 3 -> 4
        assert seal_all(idx) == 4 and state(pipeline_db)[1] == 4               # epochs 0-3 closed, sealed
        with pytest.raises(EpochSealed, match="closed for sealing"):
            slow.lookup([(2**49 + 1, 2)], finish=True)
        assert servers.query(pipeline_db, "SELECT indexed_seq FROM splitter_file "
                                          "WHERE filename = '20260101000004'") == [(None,)]
        again = idx.open_file("20260101000004")                               # the current epoch
        again.add_purchase(2**49 + 5, 6, 1)
        assert again.lookup([(2**49 + 1, 2)], finish=True) == [3] and again.epoch == 4
        assert lookups(idx, "20260101000007", [2**49 + 5]) == [6]
    finally:
        idx.close()


def test_a_completion_sent_with_a_lookup_that_pruning_failed_completes_nothing(pipeline_db):
    """The lookup and the completion are one packet: when pruning passed the epochs the file
    reads after it was opened, the lookup raises WindowPruned and the completion behind it
    marks nothing (the file is not indexed, so no later file routes by its purchases), as when
    the completion came after the lookup's error and was never sent."""
    idx = make_index(pipeline_db, epoch_rows=1)
    try:
        index_file(idx, "20260101000001", [(2**48 + 1, 3)])                  # epoch 0 -> 1
        routing = idx.open_file("20260101000002")
        routing.add_purchase(2**48 + 2, 4, 1)
        servers.query(pipeline_db, "UPDATE splitter_seq SET pruned_epoch = 1 WHERE id = 1")
        with pytest.raises(order_index.WindowPruned):
            routing.lookup([(2**48 + 1, 2)], finish=True)
        assert servers.query(pipeline_db, "SELECT indexed_seq FROM splitter_file "
                                          "WHERE filename = '20260101000002'") == [(None,)]
        assert servers.query(pipeline_db, "SELECT value FROM splitter_seq") == [(1,)]
    finally:
        idx.close()
