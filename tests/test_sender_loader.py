"""The sender's loader on the real MariaDB: exact values, exactly once, whole files refused whole."""
from __future__ import annotations

import hashlib
import json
import threading
import time
from decimal import Decimal

import orjson
import pymysql
import pytest

from app import db
from app.sender import loader
from tests import servers

SOURCE = "20250102030405"
OTHER = "20250102030406"


def line(key: str, shop: int = 4, *, etype: int = 1, source: str = SOURCE, shard: int = 0, **over) -> dict:
    row = {"event_key": key, "event_type": etype, "shop_id": shop, "user_id": 7,
           "timestamp": "2026-11-26 22:15:20.002", "shard": shard, "order_id": None, "good_id": 3, "qty": 2,
           "amount": "199.99", "source_file": source, "payload": {"shop_id": shop, "good_id": 3}}
    row.update(over)
    return row


def write(path, rows) -> bytes:
    data = b"".join(r if isinstance(r, bytes) else orjson.dumps(r) + b"\n" for r in rows)
    path.write_bytes(data)
    return data


def many(n: int, prefix: str = "k", source: str = SOURCE) -> list[dict]:
    return [line(f"0:{prefix}{i}", 2 * (i % 50), etype=0, source=source, amount=None) for i in range(n)]


@pytest.fixture
def shard(make_database):
    url = make_database("shard")
    loader.prepare_database(url)
    conn = loader.connect(url)
    yield url, conn
    conn.close()


def query(url, sql, args=()):
    conn = db.connect(url)
    with conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    conn.close()
    return rows


def counts(url) -> tuple[int, int]:
    return query(url, "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM loaded_files)")[0]


@pytest.mark.parametrize("method", loader.METHODS)
def test_rows_land_with_exact_values(shard, tmp_path, method):
    url, conn = shard
    payload = {"order_id": 8674665223082153551, "user_id": 2, "shop_id": 3, "good_id": 2, "qty": 2,
               "price_at_order": 199.99, "note": "tab\there \"quoted\" back\\slash\nnew line 'single' магазин 🛒 %s"}
    rows = [
        line("1:8674665223082153551", 4, order_id=8674665223082153551, payload=payload),
        line("1:9223372036854775807", 6, order_id=(1 << 63) - 1, user_id=(1 << 63) - 1,
             timestamp="1999-12-31 23:59:59.999", amount="9999999999999.99"),
        line("3:-9223372036854775808", -2, etype=3, order_id=-(1 << 63), amount="0.01",
             timestamp="2026-01-01 00:00:00.000"),
        line("4:h00ff", 8, etype=4, user_id=None, good_id=None, qty=None, amount=None,
             payload={"shop_id": 8, "active": False}),
        line("2:hbeef", 10, etype=2, user_id=None, qty=None, amount="-0.50"),
    ]
    data = write(tmp_path / "p.txt", rows)
    result = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, method=method)
    assert (result.lines, result.loaded, result.duplicates, result.method) == (5, 5, 0, method)
    assert result.checksum == hashlib.sha1(data).hexdigest()
    got = query(url, "SELECT event_key, event_type, shop_id, user_id, DATE_FORMAT(`timestamp`, '%%Y-%%m-%%d %%H:%%i:%%s.%%f'),"
                     " shard, order_id, good_id, qty, amount, source_file, payload FROM events ORDER BY id")
    assert len(got) == 5
    for row, (key, etype, shop, user, ts, shard_no, order, good, qty, amount, source, stored) in zip(rows, got):
        assert (key, etype, shop, user, ts[:23], shard_no, order, good, qty, source) == (
            row["event_key"], row["event_type"], row["shop_id"], row["user_id"], row["timestamp"], 0,
            row["order_id"], row["good_id"], row["qty"], SOURCE)
        assert ts.endswith("000")  # milliseconds exactly, nothing below them
        assert amount == (None if row["amount"] is None else Decimal(row["amount"]))
        assert orjson.loads(stored) == row["payload"]
    assert got[0][6] == 8674665223082153551 and orjson.loads(got[0][11])["order_id"] == 8674665223082153551
    record = query(url, "SELECT source_file, shard, line_count, loaded_count, duplicate_count, checksum, method "
                        "FROM loaded_files")
    assert record == ((SOURCE, 0, 5, 5, 0, result.checksum, method),)
    assert query(url, "SELECT order_id, price_at_order FROM purchase_history ORDER BY order_id") == (
        (8674665223082153551, Decimal("199.99")), ((1 << 63) - 1, Decimal("9999999999999.99")))
    assert [p.name for p in tmp_path.iterdir()] == ["p.txt"]  # chunk files are gone


@pytest.mark.parametrize("method", loader.METHODS)
def test_a_file_loaded_twice_adds_nothing(shard, tmp_path, method):
    url, conn = shard
    write(tmp_path / "p.txt", many(1200))
    first = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, method=method, chunk_rows=500)
    assert (first.loaded, first.already_loaded) == (1200, False)
    for again in loader.METHODS:
        second = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, method=again)
        assert (second.loaded, second.lines, second.already_loaded) == (1200, 1200, True)
        assert second.stats()["already_loaded"] is True
    (tmp_path / "p.txt").unlink()  # once loaded, the prepared file is no longer needed
    assert loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2).already_loaded
    assert counts(url) == (1200, 1)


@pytest.mark.parametrize("method", loader.METHODS)
def test_an_event_already_loaded_is_an_explicit_no_op(shard, tmp_path, method):
    url, conn = shard
    write(tmp_path / "a.txt", many(300))
    loader.load_file(conn, tmp_path / "a.txt", SOURCE, 0, 2, method=method, chunk_rows=100)
    # the second file repeats 100 keys of the first, and one of its own twice
    rows = many(300, source=OTHER)[200:] + many(150, prefix="new", source=OTHER) + [many(1, "new", OTHER)[0]]
    write(tmp_path / "b.txt", rows)
    result = loader.load_file(conn, tmp_path / "b.txt", OTHER, 0, 2, method=method, chunk_rows=100)
    assert (result.lines, result.loaded, result.duplicates) == (251, 150, 101)
    assert result.method == ("insert" if method == "insert" else "load_data>insert")
    assert counts(url) == (450, 2)
    assert query(url, "SELECT source_file, COUNT(*) FROM events GROUP BY source_file ORDER BY 1") == (
        (SOURCE, 300), (OTHER, 150))


BAD_LINES = {
    "not JSON": (b'{"event_key": "0:x", \n', "malformed prepared line 251: not JSON"),
    "no key": (line("", 4), "malformed prepared line 251: event_key"),
    "no milliseconds": (line("0:x", 4, timestamp="2026-11-26 22:15:20"), "malformed prepared line 251: timestamp"),
    "bad date": (line("0:x", 4, timestamp="2026-02-30 22:15:20.000"), "malformed prepared line 251: timestamp"),
    "float amount": (line("0:x", 4, amount=199.99), "malformed prepared line 251: amount"),
    "3 decimals": (line("0:x", 4, amount="1.005"), "malformed prepared line 251: amount"),
    "float order": (line("0:x", 4, order_id=1.5), "malformed prepared line 251: order_id"),
    "order > 64 bit": (line("0:x", 4, order_id=1 << 63), "malformed prepared line 251: order_id"),
    "other file": (line("0:x", 4, source=OTHER), "malformed prepared line 251: source_file"),
    "no payload": (line("0:x", 4, payload=None), "malformed prepared line 251: payload"),
    "unknown type": (line("0:x", 4, etype=9), "malformed prepared line 251: event_type"),
    "wrong shard": (line("0:x", 5), "wrong shard: prepared line 251: shop_id 5 belongs to shard 1"),
    "shard field": (line("0:x", 4, shard=1), "wrong shard: prepared line 251: the line says shard 1"),
}


@pytest.mark.parametrize("method", loader.METHODS)
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_refuses_the_whole_file(shard, tmp_path, method, case):
    url, conn = shard
    bad, message = BAD_LINES[case]
    write(tmp_path / "p.txt", many(250) + [bad] + many(100, prefix="after"))
    expected = loader.WrongShard if message.startswith("wrong shard") else loader.BadLine
    with pytest.raises(expected) as info:  # after two chunks of 100 rows went to the server
        loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, method=method, chunk_rows=100)
    assert str(info.value).startswith(message), str(info.value)
    assert counts(url) == (0, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["p.txt"]


def test_missing_file_is_reported_and_nothing_is_recorded(shard, tmp_path):
    url, conn = shard
    with pytest.raises(loader.PreparedMissing, match="is missing"):
        loader.load_file(conn, tmp_path / "absent.txt", SOURCE, 0, 2)
    assert counts(url) == (0, 0)


def test_check_between_chunks_rolls_back(shard, tmp_path):
    url, conn = shard
    write(tmp_path / "p.txt", many(1000))
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 4:
            raise Stop()

    with pytest.raises(Stop):
        loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, chunk_rows=100, check=check)
    assert counts(url) == (0, 0)
    assert loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, chunk_rows=100).loaded == 1000


def test_schema_is_idempotent_and_keeps_original_tables(make_database):
    url = make_database("orig")
    conn = servers.admin_connect(database=url.database)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE purchase_history (order_id BIGINT UNIQUE, user_id BIGINT, good_id BIGINT, "
                    "shop_id BIGINT, qty INT, price_at_order DECIMAL(18,2))")
        cur.execute("INSERT INTO purchase_history VALUES (1, 2, 3, 4, 5, 6.00)")
    conn.close()
    for _ in range(2):
        loader.prepare_database(url)
    assert query(url, "SELECT * FROM purchase_history") == ((1, 2, 3, 4, 5, Decimal("6.00")),)
    assert query(url, "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA=%s "
                      "ORDER BY 1", (url.database,)) == (
        ("events", "BASE TABLE"), ("loaded_files", "BASE TABLE"), ("order_return", "VIEW"),
        ("purchase_history", "BASE TABLE"), ("schema_migrations", "BASE TABLE"))


def test_an_original_events_table_is_named_not_loaded_into(make_database):
    url = make_database("old")
    conn = servers.admin_connect(database=url.database)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE events (id BIGINT AUTO_INCREMENT PRIMARY KEY, event_type TINYINT, "
                    "shop_id BIGINT NULL, user_id BIGINT NULL, timestamp DATETIME, shard TINYINT, created_at DATETIME)")
    conn.close()
    with pytest.raises(loader.SchemaMismatch, match=r"events predates .*missing .*event_key"):
        loader.prepare_database(url)


def test_prepare_creates_the_database(make_database):
    url = make_database("gone")
    conn = servers.admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE `{url.database}`")
    conn.close()
    loader.prepare_database(url)
    assert counts(url) == (0, 0)


@pytest.mark.parametrize("first_finishes", [True, False])
def test_two_loaders_of_one_file_load_it_once(shard, tmp_path, first_finishes):
    """A replica that got the same file (a lease lost) waits for the first load's record, then
    finds it loaded, or loads it itself if the first rolled back."""
    url, conn = shard
    write(tmp_path / "p.txt", many(1000))
    sent = threading.Event()
    results: dict = {}
    calls = []

    class Abandon(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) > 1:  # called before each chunk: the first one, with the claim, was sent
            sent.set()
        time.sleep(0.1)
        if not first_finishes and time.monotonic() > deadline:
            raise Abandon()

    def first():
        try:
            results["first"] = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2,
                                                chunk_rows=100, check=check)
        except Abandon:
            results["first"] = "abandoned"

    deadline = time.monotonic() + 0.5
    thread = threading.Thread(target=first)
    thread.start()
    assert sent.wait(10)
    other = loader.connect(url)
    second = loader.load_file(other, tmp_path / "p.txt", SOURCE, 0, 2, chunk_rows=100)
    other.close()
    thread.join(30)
    if first_finishes:
        assert results["first"].already_loaded is False and second.already_loaded is True
    else:
        assert results["first"] == "abandoned" and second.already_loaded is False
    assert second.loaded == 1000
    assert counts(url) == (1000, 1)



def test_a_small_file_costs_three_statements_in_two_round_trips(shard, tmp_path):
    """The claim, holding the whole record, goes with the LOAD DATA, then the COMMIT: each
    statement and each round trip costs the sender and the server CPU (no UPDATE of the record)."""
    url, conn = shard
    data = write(tmp_path / "p.txt", many(500))
    before = servers.session_statements(conn)
    sent = servers.count_round_trips(conn)
    result = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)
    assert (result.loaded, result.method, len(sent)) == (500, "load_data", 2), sent
    assert servers.session_statements(conn) - before - 1 == 3
    assert query(url, "SELECT line_count, loaded_count, duplicate_count, checksum, method, seconds IS NOT NULL "
                      "FROM loaded_files") == ((500, 500, 0, hashlib.sha1(data).hexdigest(), "load_data", 1),)
    sent.clear()
    again = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)  # the claim finds the row: nothing sent
    assert (again.already_loaded, again.loaded, again.checksum) == (True, 500, result.checksum)
    assert counts(url) == (500, 1)
    # one chunk that cannot be stored whole (a duplicate event) is rolled back, record and all
    fresh = many(3, prefix="n", source=OTHER)
    write(tmp_path / "q.txt", fresh + many(1, source=OTHER) + fresh[:1])  # k0 is in the first file
    other = loader.load_file(conn, tmp_path / "q.txt", OTHER, 0, 2)
    assert (other.method, other.lines, other.loaded, other.duplicates) == ("load_data>insert", 5, 3, 2)
    assert query(url, "SELECT line_count, loaded_count, duplicate_count, method FROM loaded_files "
                      "WHERE source_file=%s", (OTHER,)) == ((5, 3, 2, "load_data>insert"),)
    assert counts(url) == (503, 2)


def test_a_big_runs_shard_file_is_one_load_data_in_two_round_trips(shard, tmp_path):
    """A shard's part of a 10,000-event source file (~5,000 rows, ~1.7 MB, over the 1 MiB the
    loading thread used to take alone) is read and checked by the loading thread and sent as
    ONE LOAD DATA with its claim, then COMMIT: no read-ahead thread, no chunks of 1,000 and
    2,000 rows, no record UPDATE."""
    url, conn = shard
    rows = [line(f"1:{i}", 2 * (i % 500), order_id=i, payload={"order_id": i, "note": "x" * 200})
            for i in range(5000)]
    data = write(tmp_path / "p.txt", rows)
    assert len(data) > 1 << 20
    before = servers.session_statements(conn)
    sent = servers.count_round_trips(conn)
    result = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)
    assert (result.lines, result.loaded, result.method, len(sent)) == (5000, 5000, "load_data", 2)
    assert servers.session_statements(conn) - before - 1 == 3
    assert query(url, "SELECT line_count, loaded_count, checksum FROM loaded_files") == (
        (5000, 5000, hashlib.sha1(data).hexdigest()),)
    assert counts(url) == (5000, 1)
    # two such files of a claim each load alone (one LOAD DATA of both costs more than two)
    write(tmp_path / "q.txt", [dict(r, source_file=OTHER, event_key=f"9{r['event_key']}") for r in rows])
    assert loader.load_batch(conn, [(tmp_path / "q.txt", OTHER)], 0, 2) == [None]
    assert counts(url) == (5000, 1)


def test_a_load_after_a_claim_sends_only_its_chunk_and_only_if_claimed(shard, tmp_path):
    """db.load_local_after: the server gets the offered bytes for the named chunk, nothing for
    another name (a file of this machine), and an empty file when the first statement (the
    claim) changed no row."""
    url, conn = shard
    secret = tmp_path / "secret.txt"
    secret.write_text("do not send\n")
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE got (line VARCHAR(64))")
        cur.execute("CREATE TABLE claims (name VARCHAR(8) PRIMARY KEY)")
        claim = "INSERT INTO claims VALUES (%s) ON DUPLICATE KEY UPDATE name = name"
        load = "LOAD DATA LOCAL INFILE %s INTO TABLE got"
        assert db.load_local_after(cur, claim, ("a",), load, ("c.tsv",), "c.tsv", b"one\ntwo\n") == (1, 2)
        assert db.load_local_after(cur, claim, ("a",), load, ("c.tsv",), "c.tsv", b"three\n") == (0, 0)
        with pytest.raises(db.LocalFileRefused):
            db.load_local_after(cur, claim, ("b",), load, (str(secret),), "c.tsv", b"four\n")
        cur.execute("SELECT line FROM got ORDER BY line")
        assert cur.fetchall() == (("one",), ("two",))
    conn.rollback()
    plain = db.connect(url, local_infile=True)  # without multi_statements: refused before sending
    try:
        with plain.cursor() as cur, pytest.raises(TypeError, match="multi_statements"):
            db.load_local_after(cur, "DO 1", None, "DO 2", None, "c.tsv", b"")
    finally:
        plain.close()

def test_a_loaded_file_is_reported_loaded_even_if_its_prepared_file_went_bad(shard, tmp_path):
    """The file is read and checked before its claim goes out; a retry whose file changed
    since still finds the load record first, as when the claim came first."""
    url, conn = shard
    write(tmp_path / "p.txt", many(20))
    loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)
    write(tmp_path / "p.txt", many(20)[:5] + [b"not json\n"])
    again = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)
    assert (again.already_loaded, again.loaded) == (True, 20)
    write(tmp_path / "q.txt", many(5, source=OTHER) + [b"not json\n"])
    with pytest.raises(loader.BadLine, match="prepared line 6"):  # never loaded: refused
        loader.load_file(conn, tmp_path / "q.txt", OTHER, 0, 2)
    assert counts(url) == (20, 1)


# -- the prepared lines' checks: the block path and the line path agree ------------------------

def test_block_and_line_paths_give_the_same_rows(tmp_path):
    """The same lines loaded as one block (the fast path) and one by one after a blank line
    forced the line path: the same TSV, payload bytes copied through (a 2**70 integer and a
    `\\u00e9` escape survive as written; a tab between JSON tokens becomes a space)."""
    rows = many(30) + [line("0:big", 4, payload={"n": 1}), line("0:tab", 4, user_id=None, qty=None, amount="-1.5")]
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    data = data.replace(b'{"n":1}', b'{"n":1180591620717411303424,"s":"\\u00e9\\\\"}')
    data = data.replace(b'"payload":{"shop_id":4,"good_id":3}}\n', b'"payload":{"shop_id":4,\t"good_id":3}}\n', 1)
    lines = data.count(b"\n")
    fast = loader._block_rows(data, lines, SOURCE, 0, 2)
    assert fast is not None
    slow = loader.checked_rows(b"\n" + data, lines + 1, 1, SOURCE, 0, 2)
    assert loader.tsv(*fast) == loader.tsv(*slow)
    out = loader.tsv(*fast).decode().splitlines()
    assert len(out) == len(rows) and all(row.count("\t") == 9 for row in out)
    # backslashes escaped for LOAD DATA
    assert out[30].endswith('\t{"n":1180591620717411303424,"s":"\\\\u00e9\\\\\\\\"}')
    assert out[31].split("\t")[3] == "\\N" and out[31].split("\t")[8] == "-1.5"
    assert '"shop_id":4, "good_id":3' in out[0] or '"shop_id":4, "good_id":3' in "".join(out)


def _valid_line() -> dict:
    return line("1:123", 4, order_id=123, payload={"order_id": 123, "qty": 2, "note": "ok"})


JSON_VALUES = [None, True, False, 0, 1, -1, 1.5, 1 << 63, -(1 << 63) - 1, (1 << 31), "", "0:x", "12.345", "1.5",
               "2026-11-26 22:15:20.002", "2026-02-30 22:15:20.002", "2026-11-26 24:15:20.002",
               "0999-11-26 22:15:20.002", "2026-11-26T22:15:20.002", "2026-11-26 22:15:60.002",
               "a b", "a\tb", "a\nb", "é", "١٢", [], {}, [1], {"a": 1}]


@pytest.mark.parametrize("field", ["event_key", "event_type", "shop_id", "user_id", "timestamp", "shard", "order_id",
                                   "good_id", "qty", "amount", "source_file", "payload"])
def test_the_block_path_refuses_exactly_what_the_rules_refuse(field):
    """For every field and many replacement values: the block path (decoder plus per-block
    checks) accepts a line exactly when the line-by-line rules (`_explain`) find nothing."""
    for value in JSON_VALUES + [SOURCE, 6, 5, 2, 3, "-9223372036854775808.5", "9999999999999999.99",
                                "99999999999999999", "x" * 64, "x" * 65]:
        row = _valid_line()
        row[field] = value
        raw = json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode()  # any int size
        accepted = loader._block_rows(raw + b"\n", 1, SOURCE, 0, 2) is not None
        try:
            loader._explain(raw, 1, SOURCE, 0, 2)
            explained = None
        except loader.BadLine as exc:
            explained = str(exc)
        assert accepted == (explained is None), (field, value, explained)
    row = _valid_line()
    del row[field]
    assert loader._block_rows(orjson.dumps(row) + b"\n", 1, SOURCE, 0, 2) is None
    with pytest.raises(loader.BadLine):
        loader.checked_rows(orjson.dumps(row) + b"\n", 1, 1, SOURCE, 0, 2)


def test_the_decoder_is_built_once_per_shard_not_per_file():
    """Building the shard's decoder takes ~0.1 ms, more than the file's name as a literal
    would save on a small file: files of many names, on two shards, build two."""
    loader._decoder.cache_clear()
    for n in range(6):
        source = f"2026112622{n:04d}"
        for shard in (0, 1):
            rows = [line(f"0:k{i}", 2 * i + shard, etype=0, source=source, shard=shard, amount=None) for i in range(3)]
            data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
            assert loader._block_rows(data, 3, source, shard, 2) is not None
    assert loader._decoder.cache_info().misses == 2


def _real_time(stamp: str) -> bool:
    """The rule the block check implements: `YYYY-MM-DD HH:MM:SS.mmm`, year 1000 or later, a real time."""
    import re
    from datetime import datetime
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}", stamp) or stamp < "1":
        return False
    try:
        datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f")
    except ValueError:
        return False
    return True


def test_the_block_timestamp_check_agrees_with_the_calendar():
    """`_times_ok` checks a block's timestamps column by column and looks at distinct days only
    when one is past the 28th: each stamp alone, and each bad one hidden in a block of good
    ones at any place, gets the calendar's answer (leap years, month ends, hours, zeros)."""
    import random
    stamps = [f"{y}-{m}-{d} {h}:{mi}:{sec}.{ms}"
              for y in ("0999", "1000", "1900", "2000", "2023", "2024", "2100", "9999")
              for m in ("00", "01", "02", "04", "09", "10", "11", "12", "13", "20", "1a")
              for d in ("00", "01", "09", "10", "19", "28", "29", "30", "31", "32", "40", "3")
              for h, mi, sec, ms in (("00", "00", "00", "000"), ("23", "59", "59", "999"), ("24", "00", "00", "000"),
                                     ("19", "60", "00", "000"), ("20", "00", "61", "000"), ("29", "00", "00", "000"),
                                     ("30", "00", "00", "000"), ("1", "00", "00", "0000"))]
    stamps += ["2026-11-26T22:15:20.002", "2026-11-26 22:15:20,002", "٢٠٢٦-11-26 22:15:20.002"]
    good = [s for s in stamps if len(s) == 23 and _real_time(s)]
    assert len(good) > 300 and len(stamps) - len(good) > 1000
    rnd = random.Random(12)
    filler = [f"2026-03-{d:02d} {h:02d}:15:20.002" for d in range(1, 29) for h in (0, 9, 10, 19, 20, 23)]
    for stamp in stamps:
        if len(stamp) != 23:  # the decoder refuses these
            continue
        assert loader._times_ok([stamp]) == _real_time(stamp), stamp
        block = rnd.sample(filler, 100)
        block.insert(rnd.randrange(101), stamp)
        loader._known_days.clear()
        assert loader._times_ok(block) == _real_time(stamp), stamp
    assert loader._times_ok(good)


@pytest.mark.parametrize("text", [
    b'{"a":1}', b'[]', b'{"event_key":"0:x"} {"event_key":"0:y"}',
    orjson.dumps(line("0:x", 4)) + b" " + orjson.dumps(line("0:y", 4)),  # two rows on one line
    orjson.dumps(line("0:x", 4)).replace(b'"payload":{', b'"payload":{"a":"\xff",'),  # not UTF-8
    orjson.dumps(line("0:x", 4)).replace(b'"payload":{"shop_id":4,"good_id":3}', b'"payload":[1]'),
])
def test_a_line_that_is_not_one_row_is_refused(text):
    assert loader._block_rows(text + b"\n", 1, SOURCE, 0, 2) is None
    with pytest.raises(loader.BadLine):
        loader.checked_rows(text + b"\n", 1, 7, SOURCE, 0, 2)


def test_blank_lines_and_crlf_are_read_line_by_line(shard, tmp_path):
    url, conn = shard
    lines = [orjson.dumps(r) for r in many(5)]
    (tmp_path / "p.txt").write_bytes(b"\n" + lines[0] + b"\r\n  \n" + b"\n".join(lines[1:]))  # no final newline
    result = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)
    assert (result.lines, result.loaded) == (5, 5)
    assert counts(url) == (5, 1)


# -- NO_BACKSLASH_ESCAPES: the connection's own escaping --------------------------------------

def _hex(text: str) -> str:
    return "0x" + text.encode().hex()


@pytest.mark.parametrize("method", loader.METHODS)
def test_no_backslash_escapes_cannot_forge_a_row(shard, tmp_path, method):
    """Under sql_mode NO_BACKSLASH_ESCAPES a backslash does not escape a quote. A payload string
    that ends the literal early (as `\\'` would) and appends a row of its own must be stored as
    the text it is; a backslash must stay one backslash."""
    url, conn = shard
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
    forged = (f"' IS NULL,0,{_hex(SOURCE)}),({_hex('0:forged')},0,4,NULL,FROM_UNIXTIME(1),NULL,NULL,NULL,NULL,"
              f"JSON_OBJECT(),0,{_hex(SOURCE)})#")
    payload = {"note": forged, "path": "C:\\temp\\", "quote": "it's"}
    write(tmp_path / "p.txt", [line("0:x", 4, payload=payload)])
    result = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, method=method)
    assert (result.loaded, result.method) == (1, method)  # LOAD DATA's format does not depend on sql_mode
    got = query(url, "SELECT event_key, payload FROM events")
    assert [key for key, _ in got] == ["0:x"]
    assert orjson.loads(got[0][1]) == payload


# -- the original writers' INSERT, next to the sender ------------------------------------------

ORIGINAL_INSERT = "INSERT INTO events (event_type, shop_id, user_id, timestamp, shard) VALUES (%s, %s, %s, %s, %s)"


def test_the_original_writers_insert_next_to_the_sender(shard, tmp_path):
    """The original deployment's writers list only the contract's columns; every column the
    sender added has a default (NULL), their rows never collide with each other or with ours,
    and the sender's exactly-once holds beside them."""
    url, conn = shard
    write(tmp_path / "a.txt", many(3))
    loader.load_file(conn, tmp_path / "a.txt", SOURCE, 0, 2)
    original = servers.admin_connect(url.host, url.port, url.database)
    with original.cursor() as cur:
        for _ in range(2):  # the original table has no key: the same row twice is two rows
            cur.execute(ORIGINAL_INSERT, (1, 4, 7, "2026-11-26 22:15:20", 0))
        cur.execute(ORIGINAL_INSERT, (0, 2, None, "2026-11-26 22:15:20.002", 0))  # the time of one of ours
    original.close()
    write(tmp_path / "b.txt", many(3, source=OTHER) + many(2, prefix="b", source=OTHER))
    second = loader.load_file(conn, tmp_path / "b.txt", OTHER, 0, 2)
    assert (second.loaded, second.duplicates) == (2, 3)  # the first file's three events: explicit no-ops
    assert loader.load_file(conn, tmp_path / "a.txt", SOURCE, 0, 2).already_loaded
    got = query(url, "SELECT event_type, shop_id, user_id, DATE_FORMAT(`timestamp`, '%%Y-%%m-%%d %%H:%%i:%%s.%%f'), "
                     "shard, event_key, source_file, payload FROM events ORDER BY id")
    assert [g[5] for g in got] == ["0:k0", "0:k1", "0:k2", None, None, None, "0:b0", "0:b1"]
    assert got[3] == got[4] == (1, 4, 7, "2026-11-26 22:15:20.000000", 0, None, None, None)
    assert got[5] == (0, 2, None, "2026-11-26 22:15:20.002000", 0, None, None, None)
    assert query(url, "SELECT source_file, loaded_count, duplicate_count FROM loaded_files ORDER BY 1") == (
        (SOURCE, 3, 0), (OTHER, 2, 3))


# -- the schema: upgrade from step 1, optional indexes ---------------------------------------

def _indexes(url) -> set[str]:
    return {r[0] for r in query(url, "SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS "
                                     "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'events'")}


def test_a_step_one_table_is_upgraded_without_losing_a_row(make_database, tmp_path):
    """A shard database made by the previous sender (migration 0001's table, not yet recorded in
    schema_migrations), with rows, becomes the lean table of 0002: the same rows, byte for
    byte, the new keys, and loads go on exactly once."""
    url = make_database("upgrade")
    conn = servers.admin_connect(url.host, url.port, url.database)
    with conn.cursor() as cur:
        first = db.migrations(loader.SCHEMA)[0]
        assert first.version == 1
        for stmt in first.statements():
            cur.execute(stmt)
        cur.execute("INSERT INTO events (event_key, event_type, shop_id, user_id, `timestamp`, shard, source_file, "
                    "order_id, good_id, qty, amount, payload) VALUES ('1:5', 1, 4, 7, '2026-11-26 22:15:20.002', 0, "
                    "%s, 5, 3, 2, 199.99, '{\"a\": 1}'), ('0:k0', 0, 2, NULL, '2026-11-26 22:15:20.002', 0, %s, "
                    "NULL, 3, 2, NULL, '{}')", (OTHER, OTHER))
        cur.execute("INSERT INTO loaded_files (source_file, shard, line_count, loaded_count, duplicate_count, "
                    "checksum, method) VALUES (%s, 0, 2, 2, 0, '', 'load_data')", (OTHER,))
    conn.close()
    assert "uq_events_event_key" in _indexes(url)
    before = query(url, "SELECT * FROM events ORDER BY id")
    loader.prepare_database(url)
    assert query(url, "SELECT version, name, adopted FROM schema_migrations WHERE component='shard' ORDER BY 1") == (
        (1, "events", 1), (2, "lean_events", 0))
    assert _indexes(url) == {"PRIMARY", "uq_events_time_key", "ix_events_shop_time"}
    assert query(url, "SELECT * FROM events ORDER BY id") == before
    loader.prepare_database(url)  # idempotent
    conn = loader.connect(url)
    write(tmp_path / "p.txt", many(3))
    result = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)
    conn.close()
    assert (result.loaded, result.duplicates) == (2, 1)  # 0:k0 at that time was already there
    assert counts(url) == (4, 2)


def test_optional_indexes_follow_the_setting(make_database):
    url = make_database("indexes")
    loader.prepare_database(url, ("order", "user"))
    assert _indexes(url) == {"PRIMARY", "uq_events_time_key", "ix_events_shop_time", "ix_events_order",
                             "ix_events_user_time"}
    loader.prepare_database(url, ("type",))
    assert _indexes(url) == {"PRIMARY", "uq_events_time_key", "ix_events_shop_time", "ix_events_type_time"}
    loader.prepare_database(url)
    assert _indexes(url) == {"PRIMARY", "uq_events_time_key", "ix_events_shop_time"}
    with pytest.raises(ValueError, match="unknown optional index"):
        loader.prepare_database(url, ("shop",))


def test_the_setting_names_the_loaders_indexes():
    from app.config import SHARD_INDEXES, ConfigError, Settings
    assert set(SHARD_INDEXES) == set(loader.OPTIONAL_INDEXES)
    assert Settings.from_env({"SHARD_INDEXES": " User,order "}).shard_indexes == ("order", "user")
    assert Settings.from_env({}).shard_indexes == ()
    with pytest.raises(ConfigError, match="SHARD_INDEXES"):
        Settings.from_env({"SHARD_INDEXES": "user,shop"})


def test_no_chunk_file_is_written_anywhere(shard, tmp_path):
    """Chunks go to the server from memory: no file appears beside the prepared one, even
    mid-load."""
    url, conn = shard
    write(tmp_path / "p.txt", many(1000))
    seen = []
    loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, chunk_rows=100,
                     check=lambda: seen.append(sorted(p.name for p in tmp_path.iterdir() if p.name != "p.txt")))
    assert len(seen) >= 5 and all(s == [] for s in seen)  # several chunks, none of them a file
    assert counts(url) == (1000, 1)


def test_the_workers_prepared_lines_take_the_block_path():
    """The worker's `prepared_line` (app/worker/stage.py) writes what the sender's block path
    reads: the original generator's events, each as the worker writes it, come through as one
    block, with their values. If the worker's format changes, lines would still load, one by
    one at a tenth of the speed; this test says so first."""
    from app.worker.rules import Bad, validate
    from app.worker.stage import prepared_line
    fixture = servers.ROOT.parent / "shared" / "fixtures" / "original-generator" / "20261126221520.event-ingest.txt"
    lines, events = [], []
    for raw in fixture.read_bytes().splitlines():
        ev = validate(raw, 0, 2)
        if type(ev) is Bad:  # another shard's
            continue
        shop = ev.shop_id if ev.shop_id is not None else 4  # a return's shop comes from the order index
        lines.append(prepared_line(ev, shop, 0, SOURCE))
        events.append((ev, shop))
    assert len(lines) > 10 and {ev.etype for ev, _ in events} == {0, 1, 2, 3, 4}
    got = loader._block_rows(b"".join(lines), len(lines), SOURCE, 0, 2)
    assert got is not None
    for row, payload, (ev, shop) in zip(*got, events):
        assert (row.event_key, row.event_type, row.shop_id, row.order_id, row.timestamp) == (
            ev.key, ev.etype, shop, ev.order_id, ev.ts)
        assert orjson.loads(payload) == ev.payload


# -- untrusted sizes: long lines, deep payloads, a BOM ----------------------------------------

class _Counted:
    """A file object that counts what was read from it."""

    def __init__(self, data: bytes):
        import io
        self.f, self.read_bytes = io.BytesIO(data), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data


def test_blocks_follow_lines_across_reads_and_refuse_a_long_one_unread():
    lines = [b"x" * n + b"\n" for n in (10, 3000, 0, 4095, 5000, 7)] + [b"last"]
    got = list(loader._blocks(_Counted(b"".join(lines)), hashlib.sha1(), 2, 4, 1 << 20, 5000))
    assert b"".join(piece for piece, _, _ in got) == b"".join(lines) + b"\n"
    assert [(count, first) for _, count, first in got] == [
        (piece.count(b"\n"), first) for piece, _, first in got]
    assert sum(count for _, count, _ in got) == 7 and got[0][2] == 1
    huge = _Counted(b"".join(lines[:3]) + b"y" * (50 << 20) + b"\nafter\n")
    with pytest.raises(loader.BadLine, match=r"line 4: longer than 5000 bytes \(MAX_LINE_BYTES\)"):
        list(loader._blocks(huge, hashlib.sha1(), 2, 4, 1 << 20, 5000))
    assert huge.read_bytes < 3 * 5000 + (1 << 13)  # never read whole


def test_a_line_over_the_limit_fails_the_file_by_its_number(shard, tmp_path):
    url, conn = shard
    big = line("0:big", 4, payload={"pad": "x" * 3000})
    write(tmp_path / "p.txt", many(250) + [big] + many(100, prefix="after"))
    with pytest.raises(loader.BadLine, match=r"line 251: longer than 2048 bytes \(MAX_LINE_BYTES\)"):
        loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, chunk_rows=100, max_line_bytes=2048)
    assert counts(url) == (0, 0)
    assert loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2).loaded == 351  # 1 MiB: fits


@pytest.mark.parametrize("depth, message", [(31, None), (32, "nested deeper than 32 levels"),
                                            (5000, "nested deeper than 32 levels")])
def test_a_payload_nested_past_the_json_column_is_refused_by_name(shard, tmp_path, depth, message):
    """The line is one level more than its payload; MariaDB's JSON stops at 32. Thousands of
    levels (past the decoder's recursion) are refused the same way, not by a crash."""
    url, conn = shard
    payload = b"{\"a\":" * (depth - 1) + b"{}" + b"}" * (depth - 1)  # `depth` levels
    bad = orjson.dumps(line("0:deep", 4)).replace(b'"payload":{"shop_id":4,"good_id":3}', b'"payload":' + payload)
    write(tmp_path / "p.txt", many(20) + [bad + b"\n"] + many(5, prefix="after"))
    if message is None:
        assert loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2).loaded == 26
        return
    with pytest.raises(loader.BadLine, match=f"line 21: {message}"):
        loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)
    assert counts(url) == (0, 0)


def test_a_byte_order_mark_is_skipped_and_hashed(shard, tmp_path):
    url, conn = shard
    data = b"\xef\xbb\xbf" + b"".join(orjson.dumps(r) + b"\n" for r in many(3))
    (tmp_path / "p.txt").write_bytes(data)
    result = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2)
    assert (result.loaded, result.checksum) == (3, hashlib.sha1(data).hexdigest())


@pytest.mark.parametrize("method, cap", [("load_data", loader.CHUNK_BYTES), ("insert", loader.INSERT_BYTES)])
def test_long_rows_make_small_chunks(shard, tmp_path, method, cap):
    """Chunks end at their row count or once they hold CHUNK_BYTES (INSERT_BYTES): long rows
    never build a statement near max_allowed_packet."""
    url, conn = shard
    rows = [line(f"0:long{i}", 4, payload={"pad": "x" * 200_000}) for i in range(60)]
    write(tmp_path / "p.txt", rows)
    sizes = []
    original = loader._by_load_data if method == "load_data" else loader._by_insert

    def measured(cur, chunks, *args):
        def each():
            for data, count in chunks:
                sizes.append(len(data))
                yield data, count
        return original(cur, each(), *args)
    name = "_by_load_data" if method == "load_data" else "_by_insert"
    setattr(loader, name, measured)
    try:
        result = loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2, method=method)
    finally:
        setattr(loader, name, original)
    assert result.loaded == 60
    assert len(sizes) >= (60 * 200_000) // cap and max(sizes) <= 1.1 * cap + 2 * 200_300


def test_check_line_is_the_loaders_judgement_of_one_line():
    """`check_line` (what the worker's tests ask the sender) accepts and refuses as a load does."""
    good = orjson.dumps(line("0:x", 4))
    assert loader.check_line(good + b"\n", 7, SOURCE, 0, 2).event_key == "0:x"
    with pytest.raises(loader.WrongShard, match="prepared line 7: shop_id 5 belongs to shard 1"):
        loader.check_line(orjson.dumps(line("0:x", 5)), 7, SOURCE, 0, 2)
    with pytest.raises(loader.BadLine, match="prepared line 3: blank line"):
        loader.check_line(b"  \n", 3, SOURCE, 0, 2)


# -- a claim's small files in one transaction (load_batch) ----------------------------------

NAMES = ("20250102030401", "20250102030402", "20250102030403", "20250102030404", "20250102030405")


def files_of(tmp_path, sizes: dict[str, int]) -> list:
    out = []
    for name, n in sizes.items():
        path = tmp_path / f"{name}.txt"
        if n >= 0:
            write(path, many(n, prefix=f"{name}-", source=name))
        out.append((path, name))
    return out


def test_a_claims_small_files_load_in_one_transaction(shard, tmp_path):
    """Three files: one claim INSERT holding their three records, one LOAD DATA of their rows
    (each row carrying its own file's name), one COMMIT; two round trips for all three, and the
    same rows and records as three load_file calls would leave."""
    url, conn = shard
    files = files_of(tmp_path, {NAMES[2]: 7, NAMES[0]: 250, NAMES[1]: 1})
    before = servers.session_statements(conn)
    sent = servers.count_round_trips(conn)
    results = loader.load_batch(conn, files, 0, 2)
    assert len(sent) == 2, sent
    assert servers.session_statements(conn) - before - 1 == 3
    assert [(r.source_file, r.lines, r.loaded, r.duplicates, r.method) for r in results] == [
        (NAMES[2], 7, 7, 0, "load_data"), (NAMES[0], 250, 250, 0, "load_data"), (NAMES[1], 1, 1, 0, "load_data")]
    for (path, _), r in zip(files, results):
        assert r.checksum == hashlib.sha1(path.read_bytes()).hexdigest()
    assert query(url, "SELECT source_file, line_count, loaded_count, duplicate_count, checksum, method, shard, "
                      "seconds IS NOT NULL FROM loaded_files ORDER BY source_file") == tuple(
        (r.source_file, r.lines, r.lines, 0, r.checksum, "load_data", 0, 1)
        for r in sorted(results, key=lambda r: r.source_file))
    assert query(url, "SELECT source_file, COUNT(*), MIN(shard), MAX(shard) FROM events GROUP BY source_file "
                      "ORDER BY source_file") == ((NAMES[0], 250, 0, 0), (NAMES[1], 1, 0, 0), (NAMES[2], 7, 0, 0))
    # the rows are the ones load_file stores: the same file loaded alone into another database
    assert query(url, "SELECT event_key, event_type, shop_id, payload FROM events WHERE source_file=%s "
                      "ORDER BY id LIMIT 1", (NAMES[0],)) == ((f"0:{NAMES[0]}-0", 0, 0, '{"shop_id":0,"good_id":3}'),)
    again = loader.load_batch(conn, files, 0, 2)  # every claim finds its row: rolled back, each alone
    assert again == [None, None, None]
    assert [loader.load_file(conn, p, n, 0, 2).already_loaded for p, n in files] == [True, True, True]
    assert counts(url) == (258, 3)


def test_a_batch_with_a_file_loaded_before_is_rolled_back_whole(shard, tmp_path):
    """One file of the batch was loaded before (a report lost after its commit): the batch
    stores nothing, and each file then goes through load_file, which finds that one loaded."""
    url, conn = shard
    files = files_of(tmp_path, {NAMES[0]: 5, NAMES[1]: 6, NAMES[2]: 7})
    loader.load_file(conn, *files[1], 0, 2)
    assert loader.load_batch(conn, files, 0, 2) == [None, None, None]
    assert counts(url) == (6, 1)
    alone = [loader.load_file(conn, p, n, 0, 2) for p, n in files]
    assert [(r.already_loaded, r.loaded) for r in alone] == [(False, 5), (True, 6), (False, 7)]
    assert counts(url) == (18, 3)


def test_a_batch_leaves_to_load_file_what_it_must_judge(shard, tmp_path):
    """Missing, bad, empty, too big for one chunk, a link: None for each (load_file then rewinds,
    fails or loads it as on its own); the good files of the claim still load together."""
    url, conn = shard
    files = files_of(tmp_path, {NAMES[0]: 3, NAMES[1]: -1, NAMES[2]: 0, NAMES[3]: 22_000, NAMES[4]: 4})
    assert files[3][0].stat().st_size > loader.INLINE_BYTES
    bad = tmp_path / "bad.txt"
    write(bad, many(3, source="20250102030406") + [b"not json\n"])
    link = tmp_path / "link.txt"
    link.symlink_to(files[0][0])
    files += [(bad, "20250102030406"), (link, "20250102030407")]
    results = loader.load_batch(conn, files, 0, 2, root=tmp_path)
    assert [r and (r.source_file, r.loaded) for r in results] == [
        (NAMES[0], 3), None, None, None, (NAMES[4], 4), None, None]
    assert counts(url) == (7, 2)
    with pytest.raises(loader.PreparedMissing):
        loader.load_file(conn, *files[1], 0, 2)
    with pytest.raises(loader.BadLine, match="prepared line 4"):
        loader.load_file(conn, *files[5], 0, 2)
    assert loader.load_file(conn, *files[3], 0, 2).loaded == 22_000
    assert counts(url) == (22_007, 3)


def test_an_event_in_two_files_of_a_batch_is_stored_once(shard, tmp_path):
    """The server skips a duplicate key in LOAD DATA with a warning: the batch is rolled back,
    and loading each file alone stores the event once, the second file naming it a duplicate."""
    url, conn = shard
    files = files_of(tmp_path, {NAMES[0]: 4, NAMES[1]: 3})
    shared = line("0:same", 2, etype=0, source=NAMES[1], amount=None)
    write(files[1][0], many(3, prefix="b", source=NAMES[1]) + [shared])
    write(files[0][0], many(4, prefix="a", source=NAMES[0]) + [dict(shared, source_file=NAMES[0])])
    assert loader.load_batch(conn, files, 0, 2) == [None, None]
    assert counts(url) == (0, 0)
    alone = [loader.load_file(conn, p, n, 0, 2) for p, n in files]
    assert [(r.loaded, r.duplicates, r.method) for r in alone] == [(5, 0, "load_data"), (3, 1, "load_data>insert")]
    assert counts(url) == (8, 2)


def test_batches_keep_to_the_chunk_size_and_stop_between_them(shard, tmp_path):
    """Files beyond `chunk_rows` rows go into the next batch (its own transaction); a stop asked
    between batches keeps the committed one and leaves nothing of the next."""
    url, conn = shard
    files = files_of(tmp_path, {NAMES[0]: 60, NAMES[1]: 30, NAMES[2]: 50})
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise Stop()
    with pytest.raises(Stop):
        loader.load_batch(conn, files, 0, 2, chunk_rows=100, check=check)
    assert query(url, "SELECT source_file FROM loaded_files ORDER BY source_file") == ((NAMES[0],), (NAMES[1],))
    assert counts(url) == (90, 2)
    results = loader.load_batch(conn, files, 0, 2, chunk_rows=100)
    assert [r and r.loaded for r in results] == [None, None, 50]
    assert counts(url) == (140, 3)


def test_a_batch_waits_for_another_loaders_claim(shard, tmp_path):
    """A replica holding one file's claim in an open transaction: the batch waits for its lock,
    then rolls back if that load committed, or loads everything if it rolled back."""
    url, conn = shard
    files = files_of(tmp_path, {NAMES[0]: 5, NAMES[1]: 6})
    for commit in (True, False):
        name = NAMES[1] if commit else NAMES[3]
        if not commit:
            files = files_of(tmp_path, {NAMES[2]: 2, NAMES[3]: 3})
        other = loader.connect(url)
        try:
            with other.cursor() as cur:
                cur.execute(loader._CLAIM, (name, 0))
            results: dict = {}
            thread = threading.Thread(target=lambda: results.update(got=loader.load_batch(conn, files, 0, 2)))
            thread.start()
            time.sleep(0.5)
            waiting = thread.is_alive()  # on the claim's lock
            other.commit() if commit else other.rollback()
        finally:
            other.close()
        thread.join(30)
        assert waiting
        if commit:
            assert results["got"] == [None, None]
        else:
            assert [r.loaded for r in results["got"]] == [2, 3]
    assert counts(url) == (5, 3)


def test_a_batch_works_on_a_connection_of_one_statement_a_round_trip(shard, tmp_path):
    """Without multi_statements the claims go alone first, and the rows only when every file
    was claimed."""
    url, _ = shard
    plain = db.connect(url, autocommit=False, local_infile=True)
    try:
        files = files_of(tmp_path, {NAMES[0]: 4, NAMES[1]: 5})
        sent = servers.count_round_trips(plain)
        assert [r.loaded for r in loader.load_batch(plain, files, 0, 2)] == [4, 5]
        assert len(sent) == 3, sent  # claims, LOAD DATA, COMMIT
        more = files_of(tmp_path, {NAMES[2]: 2}) + files[:1]
        assert loader.load_batch(plain, more, 0, 2) == [None, None]
    finally:
        plain.close()
    assert counts(url) == (9, 2)


def _text(sql) -> str:
    return sql.decode() if isinstance(sql, bytes) else sql


def test_mariadb_reads_the_tsv_as_bytes_other_servers_as_utf8mb4(shard, tmp_path):
    """On MariaDB the LOAD DATA of a file and of a batch reads its TSV as `binary` (the server
    does not decode and re-check the UTF-8 the sender checked: ~6% of its CPU a row), and stores
    the same text: non-ASCII, 4-byte characters, escapes. A server that is not MariaDB (MySQL
    refuses a binary string for a JSON column) gets `utf8mb4`, as before."""
    url, conn = shard
    note = "магазин 🛒 é \\ back\\slash \"q\" \t tab"
    rows = [line("0:a", 2, etype=0, amount=None, payload={"shop_id": 2, "note": note})]
    write(tmp_path / "p.txt", rows)
    sent = servers.count_round_trips(conn)
    assert loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2).loaded == 1
    loads = [s for s in map(_text, sent) if "LOAD DATA" in s]
    assert len(loads) == 1 and " CHARACTER SET binary " in loads[0], loads
    files = files_of(tmp_path, {NAMES[0]: 3, NAMES[1]: 2})
    rows_of = {NAMES[0]: 3, NAMES[1]: 2}
    write(files[0][0], [line(f"0:{NAMES[0]}-{i}", 2, etype=0, source=NAMES[0], amount=None,
                             payload={"shop_id": 2, "note": f"{note} {i}"}) for i in range(3)])
    sent.clear()
    assert [r.loaded for r in loader.load_batch(conn, files, 0, 2)] == [rows_of[n] for _, n in files]
    loads = [s for s in map(_text, sent) if "LOAD DATA" in s]
    assert len(loads) == 1 and " CHARACTER SET binary " in loads[0], loads
    stored = dict(query(url, "SELECT event_key, payload FROM events"))
    assert json.loads(stored["0:a"]) == {"shop_id": 2, "note": note}
    assert stored["0:a"] == orjson.dumps({"shop_id": 2, "note": note}).decode().replace("\t", " ")
    assert [json.loads(stored[f"0:{NAMES[0]}-{i}"])["note"] for i in range(3)] == [f"{note} {i}" for i in range(3)]
    conn.get_server_info = lambda: "8.0.36"
    write(tmp_path / "q.txt", many(2, prefix="m", source=OTHER))
    sent.clear()
    assert loader.load_file(conn, tmp_path / "q.txt", OTHER, 0, 2).loaded == 2
    loads = [s for s in map(_text, sent) if "LOAD DATA" in s]
    assert len(loads) == 1 and " CHARACTER SET utf8mb4 " in loads[0], loads
    assert counts(url) == (8, 4)



def test_mariadb_does_not_parse_each_payload_again_for_the_json_columns_check(shard, tmp_path):
    """MariaDB's JSON column is LONGTEXT with CHECK (json_valid(payload)): the server parsed
    again every payload the sender had parsed (~0.5 us of server CPU a row, 6% of the load:
    docs/performance.md). On MariaDB the LOAD DATA of a file and of a batch now runs without
    CHECK constraints (`SET STATEMENT check_constraint_checks = 0 FOR`): a probe constraint that
    every row breaks does not stop it (it did: the LOAD skipped the rows with a warning, and the
    INSERT it fell back to failed). What is stored is still valid JSON, the sender's bytes: a
    payload json_valid would refuse is refused by the sender's own parse, nothing stored, and
    so is a stricter one (`1.`, which json_valid takes). Another server gets the statement as
    before, checks and all."""
    url, conn = shard
    query(url, "ALTER TABLE events ADD CONSTRAINT probe CHECK (qty IS NULL OR qty < 0)")
    write(tmp_path / "p.txt", many(40))
    assert loader.load_file(conn, tmp_path / "p.txt", SOURCE, 0, 2).loaded == 40
    files = files_of(tmp_path, {NAMES[0]: 3, NAMES[1]: 2})
    assert [r.loaded for r in loader.load_batch(conn, files, 0, 2)] == [3, 2]
    assert query(url, "SELECT COUNT(*), SUM(JSON_VALID(payload)), SUM(qty = 2) FROM events") == ((45, 45, 45),)
    stored = dict(query(url, "SELECT event_key, payload FROM events"))
    assert stored["0:k7"] == orjson.dumps(many(40)[7]["payload"]).decode()
    for bad in (b'{"shop_id":2,"good_id":3,"x":tru}', b'{"shop_id":2,"good_id":3,"x":"\\ud800"}',
                b'{"shop_id":2,"good_id":3,"x":"a\x01b"}', b'{"shop_id":2,"good_id":3,"x":1.}'):
        text = orjson.dumps(line("0:bad", 2, etype=0, source=OTHER, amount=None, payload={})).replace(
            b'"payload":{}', b'"payload":' + bad) + b"\n"
        write(tmp_path / "bad.txt", [text])
        with pytest.raises(loader.BadLine):
            loader.load_file(conn, tmp_path / "bad.txt", OTHER, 0, 2)
    assert counts(url) == (45, 3)
    conn.get_server_info = lambda: "8.0.36"
    sent = servers.count_round_trips(conn)
    write(tmp_path / "q.txt", many(2, prefix="m", source=OTHER))
    with pytest.raises(pymysql.MySQLError):      # the probe holds: checked, refused
        loader.load_file(conn, tmp_path / "q.txt", OTHER, 0, 2)
    loads = [s for s in map(_text, sent) if "LOAD DATA" in s]
    assert loads and not any("SET STATEMENT" in s for s in loads), loads
    assert counts(url) == (45, 3)
