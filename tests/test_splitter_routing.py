"""The splitter's routing on the real MariaDB, without the daemon: reasons, byte-for-byte
output, and the order index rule for returns without shop_id (deterministic on re-split)."""
from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from app import layout
from app.splitter import order_index
from app.splitter.order_index import OrderIndex
from app.splitter.stage import split_file
from tests import servers

FIXTURE = servers.ROOT.parent / "shared" / "fixtures" / "original-generator" / "20261126221520.event-ingest.txt"
if not FIXTURE.exists():
    FIXTURE = Path("/work/shared/fixtures/original-generator/20261126221520.event-ingest.txt")


def ev(etype, ts="2026-01-01 00:00:00.001", **payload) -> bytes:
    return orjson.dumps({"event_type": etype, "payload": payload, "saved_at": "2026-01-01 00:00:00.000",
                         "timestamp": ts}) + b"\n"


@pytest.fixture
def index(pipeline_db, shared_dir):
    folder = layout.splitter_dir(shared_dir)
    folder.mkdir(parents=True)
    idx = OrderIndex(pipeline_db)
    yield idx
    idx.close()


def write_source(shared: Path, name: str, lines: list[bytes]) -> Path:
    path = layout.source_file(shared, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def split(shared, index, name, shards=(0, 1), shard_count=2, registered=(0, 1), rejected=True):
    result = split_file(layout.source_file(shared, name), name, shared, shard_count, list(shards),
                        list(registered), index, rejected)
    outputs = {s: layout.splitter_output(shared, name, s).read_bytes() for s in shards}
    rej = layout.splitter_rejected(shared, name)
    records = [orjson.loads(x) for x in rej.read_bytes().splitlines()] if rejected and rej.exists() else []
    return result, outputs, records


def test_fixture_every_line_in_one_place(shared_dir, index):
    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    write_source(shared_dir, "20261126221520", lines)
    result, outputs, records = split(shared_dir, index, "20261126221520")
    expected = {0: b"", 1: b""}
    for line in lines:
        shop = orjson.loads(line)["payload"].get("shop_id")
        if shop is not None:
            expected[shop % 2] += line
    assert outputs == expected
    assert [r["line_no"] for r in records] == [i + 1 for i, ln in enumerate(lines) if b'"shop_id"' not in ln]
    assert {r["reason"] for r in records} == {"unroutable"}
    assert [r["line"].encode() + b"\n" for r in records] == [ln for ln in lines if b'"shop_id"' not in ln]
    assert result.lines_in == len(lines) == sum(result.per_shard) + sum(result.rejected.values())


def test_every_reason_and_byte_for_byte(shared_dir, index):
    good = ev(0, shop_id=4, good_id=1, delta_count=2)
    lines = [
        good,
        b"\n",                                                   # empty_line
        b"not json\n",                                           # malformed_json
        b"[1,2]\n",                                              # malformed_json
        b'{"event_type":1,"payload":"x"}\n',                     # malformed_json
        b'{"event_type":1}\n',                                   # malformed_json (no payload)
        b'{"event_type":0,"payload":{"shop_id":1,"r":"\xff"}}\n',  # malformed_json (bad UTF-8)
        ev("1", shop_id=3),                                      # unknown_event_type
        ev(True, shop_id=3),                                     # unknown_event_type
        ev(7, shop_id=3),                                        # unknown_event_type
        ev(2, good_id=1, new_price=1.5),                         # missing_shop_id
        ev(2, shop_id=None, good_id=1, new_price=1.5),           # missing_shop_id
        ev(2, shop_id="3", good_id=1),                           # non_integer_shop_id
        ev(2, shop_id=3.0, good_id=1),                           # non_integer_shop_id
        ev(2, shop_id=-1, good_id=1),                            # shop_id_out_of_range
        b'{"event_type":2,"payload":{"shop_id":9223372036854775808}}\n',  # shop_id_out_of_range
        ev(1, order_id=2**62 + 5, user_id=1, shop_id=7, good_id=1, qty=1, price_at_order=9.99),
        ev(3, order_id=2**62 + 5, user_id=1, good_id=1, qty=1, refund_amount=9.99),   # routed to 7 % 2
        ev(3, order_id=2**62 + 6, user_id=1, good_id=1, qty=1, refund_amount=9.99),   # unroutable (after)
        ev(1, order_id=2**62 + 6, user_id=1, shop_id=8, good_id=1, qty=1, price_at_order=9.99),
        ev(3, order_id="x", user_id=1, good_id=1, qty=1, refund_amount=9.99),         # unroutable
        ev(3, order_id=2**62 + 6, user_id=1, shop_id=5, good_id=1, qty=1, refund_amount=9.99),
        b'{"event_type":4,"payload":{"shop_id":10,"active":true}}\r\n',
        b'{"event_type":4,"payload":{"shop_id":11,"active":false}}',  # no newline at the end
    ]
    write_source(shared_dir, "20260101000000", lines)
    result, outputs, records = split(shared_dir, index, "20260101000000")
    assert outputs[0] == lines[0] + lines[19] + lines[22]
    assert outputs[1] == lines[16] + lines[17] + lines[21] + lines[23] + b"\n"
    reasons = [(r["line_no"], r["reason"]) for r in records]
    assert reasons == [(2, "empty_line"), (3, "malformed_json"), (4, "malformed_json"), (5, "malformed_json"),
                       (6, "malformed_json"), (7, "malformed_json"), (8, "unknown_event_type"),
                       (9, "unknown_event_type"), (10, "unknown_event_type"), (11, "missing_shop_id"),
                       (12, "missing_shop_id"), (13, "non_integer_shop_id"), (14, "non_integer_shop_id"),
                       (15, "shop_id_out_of_range"), (16, "shop_id_out_of_range"), (19, "unroutable"),
                       (21, "unroutable")]
    assert records[5]["line_base64"]          # the invalid UTF-8 line is kept exactly
    assert result.stats()["rejected_total"] == 17
    assert result.routed_by_order == 1
    assert result.lines_in == 24 == sum(result.per_shard) + result.stats()["rejected_total"]


def test_only_held_shards_written_and_rejected_once(shared_dir, index):
    lines = [ev(0, shop_id=s, good_id=1, delta_count=1) for s in range(6)] + [b"bad\n"]
    write_source(shared_dir, "20260101000001", lines)
    result, outputs, records = split(shared_dir, index, "20260101000001", shards=(1,), rejected=False)
    assert outputs == {1: lines[1] + lines[3] + lines[5]}
    assert not layout.splitter_output(shared_dir, "20260101000001", 0).exists()
    assert not layout.splitter_rejected(shared_dir, "20260101000001").exists()
    assert result.per_shard == [3, 3] and result.rejected == {"malformed_json": 1}
    # A file registered without shard 1: its lines have no task to go to.
    result, outputs, records = split(shared_dir, index, "20260101000001", shards=(0,), registered=(0,))
    assert [r["reason"] for r in records] == ["unregistered_shard"] * 3 + ["malformed_json"]


def test_returns_route_by_orders_of_earlier_files_deterministically(shared_dir, index):
    x, y, z = 2**60 + 1, 2**60 + 2, 2**60 + 3
    ret = lambda order: ev(3, order_id=order, user_id=1, good_id=1, qty=1, refund_amount=1.0)  # noqa: E731
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    write_source(shared_dir, "20260101000010", [buy(x, 3), buy(y, 4)])
    write_source(shared_dir, "20260101000011", [ret(x), ret(y), ret(z)])
    write_source(shared_dir, "20260101000012", [buy(z, 5)])
    write_source(shared_dir, "20260101000013", [ret(z), ret(x)])

    split(shared_dir, index, "20260101000010")
    _, out_b, rec_b = split(shared_dir, index, "20260101000011")
    assert out_b == {0: ret(y), 1: ret(x)} and [r["line_no"] for r in rec_b] == [3]

    # File 13 is first split before file 12's purchases are indexed: z stays unroutable there,
    # even when 13 is split again after 12 (its horizon is fixed at its first split).
    _, out_d, rec_d = split(shared_dir, index, "20260101000013")
    assert out_d == {0: b"", 1: ret(x)} and [r["reason"] for r in rec_d] == ["unroutable"]
    split(shared_dir, index, "20260101000012")
    assert split(shared_dir, index, "20260101000013")[1:] == (out_d, rec_d)
    assert split(shared_dir, index, "20260101000011")[1:] == (out_b, rec_b)


def test_same_file_routing_beyond_memory_and_resplit(shared_dir, index, monkeypatch):
    """With tiny chunks the file's early purchases leave memory: they are found in the
    database, the same way on a first split (loader running) and on a re-split (indexed)."""
    monkeypatch.setattr(order_index, "CHUNK", 4)
    monkeypatch.setattr(order_index, "MAX_INFLIGHT", 1)
    lines = [ev(1, order_id=2**61 + i, user_id=1, shop_id=i, good_id=1, qty=1, price_at_order=1.0)
             for i in range(40)]
    lines += [ev(3, order_id=2**61 + i, user_id=1, good_id=1, qty=1, refund_amount=1.0) for i in range(45)]
    write_source(shared_dir, "20260101000020", lines)
    first = split(shared_dir, index, "20260101000020")
    assert first[0].routed_by_order == 40
    assert [r["line_no"] for r in first[2]] == list(range(81, 86))
    second = split(shared_dir, index, "20260101000020")
    assert second[1:] == first[1:]
    assert not list(layout.splitter_dir(shared_dir).glob("*.tsv*"))


def test_insert_fallback_gives_the_same_routing(shared_dir, pipeline_db):
    folder = layout.splitter_dir(shared_dir)
    folder.mkdir(parents=True)
    lines = [ev(1, order_id=2**61 + i, user_id=1, shop_id=i, good_id=1, qty=1, price_at_order=1.0)
             for i in range(20)]
    write_source(shared_dir, "20260101000030", lines)
    write_source(shared_dir, "20260101000031",
                 [ev(3, order_id=2**61 + i, user_id=1, good_id=1, qty=1, refund_amount=1.0) for i in range(22)])
    idx = OrderIndex(pipeline_db, use_infile=False)
    try:
        split(shared_dir, idx, "20260101000030")
        result, outputs, records = split(shared_dir, idx, "20260101000031")
    finally:
        idx.close()
    assert result.routed_by_order == 20 and len(records) == 2
    assert result.per_shard == [10, 10]


def test_last_segment_looks_up_on_the_splitting_thread(shared_dir, index, monkeypatch):
    """A file's last segment (a small file's only one) looks up its returns without the lookup
    thread: nothing is left to overlap, and the hand-over costs CPU per file. Earlier segments
    still look up on the thread while the next one fills, and the routing is the same."""
    from app.splitter import stage
    ret = lambda order: ev(3, order_id=order, user_id=1, good_id=1, qty=1, refund_amount=1.0)  # noqa: E731
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    orders = [2**59 + i for i in range(300)]
    write_source(shared_dir, "20260101000030", [buy(o, i) for i, o in enumerate(orders)])
    write_source(shared_dir, "20260101000031", [ret(o) for o in orders])
    split(shared_dir, index, "20260101000030")
    threaded = []
    real = OrderIndex.lookup_async
    monkeypatch.setattr(OrderIndex, "lookup_async", lambda self, *a: threaded.append(1) or real(self, *a))

    result, whole, _ = split(shared_dir, index, "20260101000031")
    assert threaded == [] and result.routed_by_order == 300
    assert whole == {0: b"".join(ret(o) for i, o in enumerate(orders) if i % 2 == 0),
                     1: b"".join(ret(o) for i, o in enumerate(orders) if i % 2 == 1)}

    monkeypatch.setattr(stage, "BUFFER_LINES", 100)  # segments of ~128 lines (checked every CHECKPOINT)
    result, segmented, _ = split(shared_dir, index, "20260101000031")
    assert len(threaded) >= 1 and result.routed_by_order == 300 and segmented == whole


def count_round_trips(monkeypatch) -> list[int]:
    """Every command PyMySQL sends (a query, a multi-statement script, a ping) counted."""
    import pymysql
    trips = [0]
    send = pymysql.connections.Connection._execute_command

    def counted(self, *args, **kwargs):
        trips[0] += 1
        return send(self, *args, **kwargs)
    monkeypatch.setattr(pymysql.connections.Connection, "_execute_command", counted)
    return trips


def test_a_small_file_with_returns_costs_two_round_trips(shared_dir, index, monkeypatch):
    """A small file that indexes purchases and looks returns up: opening it reads what its
    first lookup needs (the epochs it sees, the pruned mark), and its index's completion goes
    with its (last) lookup, so it costs one round trip to open and one to look up and
    complete its index: no round trip for the epochs, none for the completion alone."""
    ret = lambda order: ev(3, order_id=order, user_id=1, good_id=1, qty=1, refund_amount=1.0)  # noqa: E731
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    orders = [2**58 + i for i in range(200)]
    write_source(shared_dir, "20260101000040", [buy(o, i) for i, o in enumerate(orders)])
    write_source(shared_dir, "20260101000041", [buy(2**57 + i, i) for i in range(300)] + [ret(o) for o in orders])
    split(shared_dir, index, "20260101000040")
    trips = count_round_trips(monkeypatch)
    result, outputs, _ = split(shared_dir, index, "20260101000041")
    assert result.routed_by_order == 200 and result.purchases == 300
    assert trips[0] == 2
    assert servers.query(index.url, "SELECT indexed_seq IS NOT NULL, purchases FROM splitter_file "
                                    "WHERE filename = '20260101000041'") == [(1, 300)]
    # A re-split routes the same, its index complete: one round trip to open, one to look up.
    trips[0] = 0
    assert split(shared_dir, index, "20260101000041")[1] == outputs
    assert trips[0] == 2


def test_a_small_files_index_completion_is_one_procedure_call(shared_dir, index, monkeypatch):
    """The completion's transaction runs the sequence's lock, the file's mark, its epoch's
    range and the sequence's move as one stored procedure (migration splitter/0004), and the
    opening reads the file's row and its epochs in one statement: a small file without returns
    costs 8 statements, not 12 (opening 4: the transaction's isolation, its START, the row's
    INSERT, its SELECT; its rows, the CALL, its answer, COMMIT: the opening's transaction is
    the completion's), and completes its index as before: its sequence number, its epoch's
    range, the sequence moved on by its purchases."""
    import pymysql
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    write_source(shared_dir, "20260101000090", [buy(2**51 + i, i) for i in range(30)])
    write_source(shared_dir, "20260101000091", [buy(2**50 + i, i) for i in range(20)])
    split(shared_dir, index, "20260101000090")
    results = [0]
    read = pymysql.connections.MySQLResult.read

    def counted(self):
        results[0] += 1
        return read(self)
    monkeypatch.setattr(pymysql.connections.MySQLResult, "read", counted)
    trips = count_round_trips(monkeypatch)
    result, _, _ = split(shared_dir, index, "20260101000091", rejected=False)
    assert result.purchases == 20 and trips[0] == 2 and results[0] == 8
    assert servers.query(index.url, "SELECT filename, indexed_seq, purchases, epoch FROM splitter_file "
                                    "ORDER BY file_id") == [("20260101000090", 1, 30, 0), ("20260101000091", 2, 20, 0)]
    assert servers.query(index.url, "SELECT epoch, first_seq, last_seq FROM splitter_epoch") == [(0, 1, 2)]
    assert servers.query(index.url, "SELECT value, epoch, epoch_rows FROM splitter_seq") == [(2, 0, 50)]


def test_a_small_files_answers_have_few_columns(shared_dir, index, monkeypatch):
    """PyMySQL parses each result column's descriptor for about as much CPU as a round trip's
    own (db.connect's connections parse a shape once, but still read every column's packet):
    a small file's opening, lookup and completion answer in four columns in all (one, two,
    one), not fifteen; the routing is the one of the earlier files' purchases."""
    from app import db
    ret = lambda order: ev(3, order_id=order, user_id=1, good_id=1, qty=1, refund_amount=1.0)  # noqa: E731
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    write_source(shared_dir, "20260101000070", [buy(2**53 + i, i) for i in range(20)])
    write_source(shared_dir, "20260101000071", [buy(2**52 + i, 1) for i in range(20)] + [ret(2**53 + i) for i in range(20)])
    split(shared_dir, index, "20260101000070")
    columns = [0]
    describe = db._Result._get_descriptions

    def counted(self):
        columns[0] += self.field_count
        return describe(self)
    monkeypatch.setattr(db._Result, "_get_descriptions", counted)
    result, outputs, _ = split(shared_dir, index, "20260101000071")
    assert result.routed_by_order == 20 and columns[0] == 4
    assert outputs[0].count(b'"event_type":3') == 10 and outputs[1].count(b'"event_type":3') == 10


def test_a_small_files_rejected_rows_ride_with_its_index_completion(shared_dir, index, monkeypatch):
    """A small file's rejected rows go in the transaction that completes its index: one round
    trip to open, one to look up, one to complete the index with the rows (no round trip of
    their own); without a lookup, two. Every rejected line is in the table once, as the
    rejected file says, also after a re-split (its index complete: the rows go alone)."""
    from app import rejected
    ret = lambda order: ev(3, order_id=order, user_id=1, good_id=1, qty=1, refund_amount=1.0)  # noqa: E731
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    bad = [b"{not json\n", ev(2, user_id=1), ev(9, shop_id=1)]
    write_source(shared_dir, "20260101000060", [buy(2**56 + i, i) for i in range(50)] + bad + [ret(2**55)])
    write_source(shared_dir, "20260101000061", bad + [buy(2**54 + i, i) for i in range(50)] + bad)
    rows = rejected.RejectedWriter(index.url)

    def split_counted(name: str) -> tuple[int, list[int]]:
        trips = count_round_trips(monkeypatch)
        split_file(layout.source_file(shared_dir, name), name, shared_dir, 2, [0, 1], [0, 1], index, True,
                   rejected_rows=rows)
        monkeypatch.undo()
        records = [orjson.loads(x)["line_no"] for x in
                   layout.splitter_rejected(shared_dir, name).read_bytes().splitlines()]
        return trips[0], records

    try:
        index.ensure_schema()
        rows.ensure_schema()
        trips, records = split_counted("20260101000060")
        assert trips == 3 and records == [51, 52, 53, 54]       # the return unroutable: a lookup
        trips, records = split_counted("20260101000061")
        assert trips == 2 and records == [1, 2, 3, 54, 55, 56]
        trips, again = split_counted("20260101000061")
        assert trips == 2 and again == records                 # opened; the rows alone
        for name, lines in (("20260101000060", [51, 52, 53, 54]), ("20260101000061", records)):
            assert [r[0] for r in servers.query(index.url, "SELECT line_no FROM rejected_lines WHERE filename = %s "
                                                           "ORDER BY id", (name,))] == lines
    finally:
        rows.close()


def test_pruning_after_a_file_was_opened_is_seen_by_its_lookups(shared_dir, index):
    """The pruned mark read when the file is opened, and again by each lookup in its own
    read view: a lookup after pruning passed the file's epochs raises WindowPruned (opening
    does not: a file with no shop-less return routes without them)."""
    from tests import servers
    write_source(shared_dir, "20260101000050", [ev(1, order_id=5, user_id=1, shop_id=1, good_id=1, qty=1,
                                                   price_at_order=1.0)])
    split(shared_dir, index, "20260101000050")
    routing = index.open_file("20260101000051")
    assert index.lookup(routing, [(5, 1)]) == [1]
    servers.query(index.url, "UPDATE splitter_seq SET pruned_epoch = 1000 WHERE id = 1")
    with pytest.raises(order_index.WindowPruned):
        index.lookup(routing, [(5, 1)])
    routing = index.open_file("20260101000051")     # opened again: no error until a lookup
    with pytest.raises(order_index.WindowPruned):
        index.lookup(routing, [(5, 1)])


def test_a_small_files_row_is_committed_with_its_index_completion(shared_dir, index, monkeypatch):
    """A split opens its file's row in a transaction that its index's completion commits (one
    commit a small file, not two): while the file splits, another connection does not see the
    row; after, the row is there, indexed, and the sequence's row is not locked meanwhile (a
    second index completes another file while the first file splits). A file without
    purchases and a re-split commit the opening too: nothing is left open."""
    from app.splitter import stage
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    write_source(shared_dir, "20260101000070", [buy(2**45 + i, i) for i in range(10)] + [b"{bad\n"])
    write_source(shared_dir, "20260101000071", [buy(2**44 + i, i) for i in range(10)])
    write_source(shared_dir, "20260101000072", [b"{bad\n", ev(2, user_id=1, shop_id=3, good_id=1, qty=1)])
    other = OrderIndex(index.url)
    seen = []
    real = stage.split_stream

    def watched(*args, **kwargs):
        if seen:        # the other index's split
            return real(*args, **kwargs)
        seen.append(servers.query(index.url, "SELECT COUNT(*) FROM splitter_file WHERE filename = '20260101000070'"))
        split_file(layout.source_file(shared_dir, "20260101000071"), "20260101000071", shared_dir, 2, [0, 1],
                   [0, 1], other, False)
        return real(*args, **kwargs)
    monkeypatch.setattr(stage, "split_stream", watched)
    try:
        result, _, records = split(shared_dir, index, "20260101000070")
    finally:
        other.close()
    monkeypatch.setattr(stage, "split_stream", real)
    assert seen == [[(0,)]] and result.purchases == 10 and len(records) == 1
    assert servers.query(index.url, "SELECT filename, indexed_seq FROM splitter_file ORDER BY indexed_seq") == [
        ("20260101000071", 1), ("20260101000070", 2)]
    for name in ("20260101000072", "20260101000070"):      # no purchases; a re-split
        split(shared_dir, index, name)
        assert servers.query(index.url, "SELECT COUNT(*) FROM splitter_file WHERE filename = %s", (name,)) == [(1,)]
        with index.conn().cursor() as cur:
            cur.execute("SELECT @@in_transaction")
            assert cur.fetchone() == (0,)


def test_an_abandoned_split_leaves_no_file_row(shared_dir, index, monkeypatch):
    """A split that fails before its end rolls its opening back (nothing was published: a
    later split opens the file afresh), and leaves nothing open on the index's connection:
    the next file's split commits as usual."""
    from app.splitter import stage
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    write_source(shared_dir, "20260101000080", [buy(2**43 + i, i) for i in range(10)])
    write_source(shared_dir, "20260101000081", [buy(2**42 + i, i) for i in range(10)])
    real = stage.split_stream

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("disk gone")
    monkeypatch.setattr(stage, "split_stream", failing)
    with pytest.raises(OSError):
        split(shared_dir, index, "20260101000080")
    monkeypatch.setattr(stage, "split_stream", real)
    assert servers.query(index.url, "SELECT COUNT(*) FROM splitter_file") == [(0,)]
    split(shared_dir, index, "20260101000081")
    assert servers.query(index.url, "SELECT filename, indexed_seq FROM splitter_file") == [("20260101000081", 1)]
    split(shared_dir, index, "20260101000080")
    assert servers.query(index.url, "SELECT filename, indexed_seq FROM splitter_file ORDER BY file_id") == [
        ("20260101000081", 1), ("20260101000080", 2)]


def _loads_and_inserts(index) -> tuple[int, int]:
    """The LOAD DATA and INSERT statements the index's bookkeeping connection ran so far."""
    with index.conn().cursor() as cur:
        cur.execute("SHOW SESSION STATUS WHERE Variable_name IN ('Com_load', 'Com_insert')")
        counts = {name.lower(): int(value) for name, value in cur.fetchall()}
    return counts["com_load"], counts["com_insert"]


@pytest.mark.parametrize("with_return", [False, True])
def test_the_index_is_written_in_key_order_its_last_chunk_by_load_data(shared_dir, index, with_return):
    """A chunk's purchases go to the server sorted by order id (random ids written as they
    came landed on a random page of the epoch's range each: ~25% more server CPU a row), and a
    completion's last chunk is a LOAD DATA, not a multi-row INSERT (whose text the server parses
    for ~15% more a row), whether it rides alone or with the file's last lookup; the rows stored
    and the routing are the ones of the file's purchases."""
    buy = lambda order, shop: ev(1, order_id=order, user_id=1, shop_id=shop, good_id=1, qty=1,  # noqa: E731
                                 price_at_order=1.0)
    ret = lambda order: ev(3, order_id=order, user_id=1, good_id=1, qty=1, refund_amount=1.0)  # noqa: E731
    orders = [(i * 7919 % 101) * 2**40 + i for i in range(1, 61)]       # not in key order
    lines = [buy(o, o % 5 + 1) for o in orders] + ([ret(2**45 + 1)] if with_return else [])
    write_source(shared_dir, "20260101000095", lines)
    routing = index.open_file("20260101000094")
    for line, order in enumerate(orders, 1):
        routing.add_purchase(order, order % 5 + 1, line)
    _, tsv = routing._chunk()
    rows = [tuple(int(v) for v in row.split(b"\t")) for row in tsv.splitlines()]
    assert rows == sorted((o, routing.file_id, line, o % 5 + 1) for line, o in enumerate(orders, 1))
    routing.abort()
    loads, inserts = _loads_and_inserts(index)
    result, _, records = split(shared_dir, index, "20260101000095")
    assert result.purchases == 60
    assert [r["reason"] for r in records] == (["unroutable"] if with_return else [])
    after = _loads_and_inserts(index)
    assert after[0] - loads == 1, "the last chunk is one LOAD DATA"
    assert after[1] - inserts <= 1, "no INSERT of rows, the opening's at most"
    assert sorted(servers.query(index.url, "SELECT order_id, line, shop_id FROM splitter_order")) == \
        sorted((o, line, o % 5 + 1) for line, o in enumerate(orders, 1))
