"""Hostile input: one bad line costs one rejected record, never a failed file (issue 16).

The real splitter (split_file with its order index on MariaDB), the real worker (its stage's
file run on a real pipeline database) and the real loader of the sender, fed lines no one
should write: nested 100,000 deep, longer than MAX_LINE_BYTES, a BOM, NUL, CR, invalid UTF-8,
one field of a valid event broken. Ends with a generative test: any mix of such lines with
valid events, and each valid event is decided exactly as in a file of the valid events alone.
"""
from __future__ import annotations

import base64
import io
import itertools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app import layout
from app.config import Settings
from app.daemon import Context
from app.lines import LineReader, TooLarge, too_deep
from app.sender import loader
from app.shutdown import StopFlag
from app.splitter import reasons as splitter_reasons
from app.splitter.order_index import OrderIndex
from app.splitter.stage import split_file
from app.worker.rules import REASONS as WORKER_REASONS
from app.worker.stage import WorkerStage
from tests import servers

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4096          # MAX_LINE_BYTES in these tests: oversized lines stay cheap to make
BOM = b"\xef\xbb\xbf"
T = "2026-05-01 10:00:00.000"


def documented_reasons(doc: str, section: str) -> set[str]:
    """The reason codes of the first column of the table in a doc's section."""
    text = (ROOT / "docs" / doc).read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M))


SPLITTER_TABLE = documented_reasons("splitter.md", "Rejected lines")
WORKER_TABLE = documented_reasons("business-rules.md", "Reasons")


def event(etype: int, ts: str = T, **payload) -> bytes:
    return orjson.dumps({"event_type": etype, "payload": payload, "timestamp": ts,
                         "saved_at": "2026-05-01 10:00:00.000"}) + b"\n"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def with_field(line: bytes, raw_value: bytes, where: str = "payload") -> bytes:
    """`line` with one more field holding `raw_value` (JSON text) in its payload or at its top."""
    body = line.rstrip(b"\r\n")
    if where == "payload":
        i = body.index(b'"payload":{') + len(b'"payload":{')
        return body[:i] + b'"extra":' + raw_value + b"," + body[i:] + b"\n"
    return body[:-1] + b',"extra":' + raw_value + b"}\n"


# -- the reader ----------------------------------------------------------------------------------

def read_all(data: bytes, limit: int = 10) -> tuple[bool, list]:
    reader = LineReader(io.BufferedReader(io.BytesIO(data), 4), limit)
    return reader.bom, [(bytes(x), x.size if type(x) is TooLarge else None) for x in reader]


def test_reader_bounds_every_line_and_skips_a_leading_bom():
    assert read_all(BOM + b"abc\nde\r\n" + b"x" * 25 + b"\n0123456789\nlast") == (True, [
        (b"abc\n", None), (b"de\r\n", None), (b"x" * 11, 25), (b"0123456789\n", None), (b"last", None)])
    # over the limit by one, with and without a final newline; a BOM later on is data
    assert read_all(b"01234567890\n" + BOM + b"a\n" + b"y" * 11) == (False, [
        (b"01234567890"[:11], 11), (BOM + b"a\n", None), (b"y" * 11, 11)])
    assert read_all(b"") == (False, [])
    assert read_all(BOM[:2]) == (False, [(BOM[:2], None)])


def test_depth_is_exact_ignores_brackets_in_strings_and_stays_linear():
    def depth(value) -> int:
        if isinstance(value, (dict, list)):
            return 1 + max(map(depth, value.values() if isinstance(value, dict) else value), default=0)
        return 0
    texts = [b'{"a":[1,{"b":"[[[[\\"[["}]}', b'{"payload":{}}', b'[[],[[]],{"x":[{}]}]', b'["\\\\",["]]]"]]',
             orjson.dumps({"a": [[[["\\\"[[[["]]]]}), b"[" * 40 + b"]" * 40, b"[[]," * 40 + b"1" + b"]" * 40]
    for text in texts:
        for limit in range(1, 45):
            assert too_deep(text, limit) is (depth(orjson.loads(text)) > limit), (text, limit)
    started = time.process_time()
    for text in (nested(500_000), b"[" * 1_000_000, b'["' + b'\\"' * 500_000, b"[[]," * 250_000 + b"]" * 250_000,
                 (b"[" * 20 + b"]" * 19) * 25_000, b"[" + b'"",' * 330_000 + b"1]"):
        too_deep(text, 32)
    assert time.process_time() - started < 5   # linear: ~0.3 s here; a backtracking scan took hours


# -- the splitter --------------------------------------------------------------------------------

@pytest.fixture
def index(pipeline_db, shared_dir):
    folder = layout.splitter_dir(shared_dir)
    folder.mkdir(parents=True)
    idx = OrderIndex(pipeline_db, folder)
    yield idx
    idx.close()


def split(shared: Path, index: OrderIndex, name: str, data: bytes, limit: int | None = None):
    """split_file on `data`; with `limit`, MAX_LINE_BYTES (default: the setting's default)."""
    source = layout.source_file(shared, name)
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    kwargs = {} if limit is None else {"max_line_bytes": limit}
    result = split_file(source, name, shared, 2, [0, 1], [0, 1], index, True, **kwargs)
    outputs = [layout.splitter_output(shared, name, s).read_bytes() for s in (0, 1)]
    rejected = layout.splitter_rejected(shared, name)
    records = [orjson.loads(x) for x in rejected.read_bytes().splitlines()] if rejected.exists() else []
    return result, outputs, records


def valid_lines(n: int, start: int = 0) -> list[bytes]:
    return [event(0, shop_id=i % 4, good_id=1, delta_count=i + 1, n=start + i) for i in range(n)]


def test_a_line_nested_100000_deep_is_one_malformed_record(shared_dir, index):
    good = valid_lines(20)
    deep = event(2, shop_id=1, good_id=1, new_price=1.5, history=0).replace(b"0}", nested(100_000) + b"}")
    result, outputs, records = split(shared_dir, index, "20260501100000", b"".join(good[:10] + [deep] + good[10:]))
    assert records == [{"line_no": 11, "reason": "malformed_json", "detail": "nested too deep to parse",
                        "line": deep.decode().rstrip("\n")}]
    assert outputs[0] + outputs[1] and sorted(outputs[0].splitlines() + outputs[1].splitlines()) == \
        sorted(x.rstrip(b"\n") for x in good)
    assert result.lines_in == 21 and result.stats()["rejected_total"] == 1


def test_a_leading_bom_is_skipped_and_counted(shared_dir, index):
    good = valid_lines(3)
    result, outputs, records = split(shared_dir, index, "20260501100001", BOM + b"".join(good))
    assert records == []
    assert outputs[0] == good[0] + good[2] and outputs[1] == good[1]
    assert result.stats()["bom_skipped"] == 1 and result.lines_in == 3


def test_a_line_over_the_limit_is_read_past_and_rejected_with_its_length(shared_dir, index):
    fits = with_field(event(0, shop_id=2, good_id=1, delta_count=1), b'"' + b"a" * 10 + b'"')
    fits = fits[:-1].replace(b"a" * 10, b"a" * (10 + LIMIT - len(fits) + 1)) + b"\n"   # exactly LIMIT bytes
    over = fits.replace(b'"aaa', b'"aaaa', 1)                                           # one byte more
    huge = b"\xff" + b"z" * (3 << 20) + b"\r\n"                                         # 3 MB, not UTF-8
    good = valid_lines(4)
    data = b"".join([good[0], fits, over, good[1], huge, good[2], good[3][:-1] + b" " * LIMIT])
    result, outputs, records = split(shared_dir, index, "20260501100002", data, LIMIT)
    assert len(fits) == LIMIT + 1 and len(over) == LIMIT + 2
    assert [(r["line_no"], r["reason"]) for r in records] == [(3, "too_large"), (5, "too_large"),
                                                              (7, "too_large")]
    assert [r["detail"] for r in records] == [f"{n} bytes, over the limit of {LIMIT} (MAX_LINE_BYTES)"
                                              for n in (LIMIT + 1, (3 << 20) + 2, len(good[3]) - 1 + LIMIT)]
    assert all(r["line_truncated"] for r in records)
    assert records[0]["line"] == over[:1024].decode()
    assert "line_base64" in records[1] and base64.b64decode(records[1]["line_base64"]) == huge[:1024]
    assert outputs[0] + outputs[1] == good[0] + fits + good[2] + good[1]
    assert result.lines_in == 7 and result.stats()["rejected"] == {"too_large": 3}


# -- the worker ----------------------------------------------------------------------------------

def worker_settings(url, shared: Path, **extra) -> Settings:
    env = {"MYSQL_PIPELINE_URL": servers.url_text(url), "SHARED_DIR": str(shared), "SHARD_COUNT": "2",
           "MAX_LINE_BYTES": str(LIMIT), **{k: str(v) for k, v in extra.items()}}
    return Settings.from_env(env)


def context() -> Context:
    return Context(StopFlag(), logging.getLogger("test-hostile"))


def work(stage: WorkerStage, name: str, lines: list[bytes]):
    """Play the splitter (write the shard file), run the real worker's file run on it."""
    shared = stage.settings.shared_dir
    path = layout.splitter_output(shared, name, stage.shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    done = stage._process_one(name, context())
    prepared = layout.worker_output(shared, name, stage.shard).read_bytes().splitlines()
    rejected = [orjson.loads(x) for x in layout.worker_rejected(shared, name, stage.shard).read_bytes().splitlines()]
    return done, prepared, rejected


@pytest.fixture
def worker0(pipeline_db, shared_dir):
    stages = []

    def make(**extra) -> WorkerStage:
        stage = WorkerStage(worker_settings(pipeline_db, shared_dir, **extra), 0)
        stages.append(stage)
        return stage
    yield make
    for stage in stages:
        stage.teardown()


def test_worker_refuses_what_a_later_stage_could_not_take(worker0):
    stage = worker0(HOLD_SECONDS=0)
    floats = b"[" + b",".join([b"1e15"] * 160) + b"]"   # 800 bytes read, 3040 printed
    lines = [
        with_field(event(0, shop_id=2, good_id=1, delta_count=1), nested(31)),        # 1 line depth 33
        with_field(event(2, shop_id=2, good_id=1, new_price=2.5), nested(300)),       # 2 orjson.dumps gives up
        with_field(event(0, shop_id=2, good_id=1, delta_count=1), nested(30)),        # 3 depth 32: accepted
        event(4, "0999-12-31 23:59:59.999", shop_id=2, active=True),                 # 4 before DATETIME's range
        with_field(event(2, shop_id=2, good_id=1, new_price=2.5), floats),            # 5 prepared line too large
        event(1, order_id=7, user_id=1, shop_id=2, good_id=1, qty=1, price_at_order=5.0),  # 6 accepted
        with_field(event(0, shop_id=4, good_id=1, delta_count=1), nested(40), "top"),  # 7 depth 41 (not payload)
    ]
    done, prepared, rejected = work(stage, "20260501100003", lines)
    assert [(r["line_no"], r["reason"]) for r in rejected] == [(1, "malformed"), (2, "malformed"),
                                                               (4, "malformed"), (5, "too_large"), (7, "malformed")]
    assert rejected[0]["detail"] == rejected[1]["detail"] == "nested deeper than 32 levels (MAX_JSON_DEPTH)"
    assert "timestamp" in rejected[2]["detail"]
    assert rejected[3]["detail"].startswith("its prepared line would be up to ")
    assert done.stats["in"] == 7 and done.stats["accepted"] == 2 == len(prepared)
    # everything the worker wrote, the sender takes
    for n, raw in enumerate(prepared, 1):
        loader.check_line(raw, n, "20260501100003", 0, 2)
    assert max(map(len, prepared)) <= LIMIT


def test_a_held_return_of_70_kb_is_kept_and_released(worker0):
    stage = worker0(MAX_LINE_BYTES=1 << 20, HOLD_SECONDS=30)
    ret = with_field(event(3, order_id=11, user_id=1, good_id=1, qty=1, refund_amount=5.0, shop_id=2),
                     b'"' + b"r" * 70_000 + b'"')
    buy = event(1, "2026-05-01 10:00:01.000", order_id=11, user_id=1, shop_id=2, good_id=1, qty=1, price_at_order=5.0)
    done, prepared, rejected = work(stage, "20260501100004", [ret, buy])
    assert rejected == [] and len(prepared) == 2
    assert done.stats["held"] == 1 and done.stats["released"] == 1 and done.stats["accepted"] == 2
    assert len(orjson.loads(prepared[1])["payload"]["extra"]) == 70_000


def test_a_return_held_at_the_end_of_time_does_not_overflow(worker0):
    stage = worker0(HOLD_SECONDS=30)
    late = event(3, "9999-12-31 23:59:59.000", order_id=12, user_id=1, good_id=1, qty=1, refund_amount=5.0,
                 shop_id=2)
    done, prepared, rejected = work(stage, "20260501100005", [late, valid_lines(1)[0]])
    assert done.stats["held"] == 1 and done.stats["accepted"] == 1 and rejected == []
    assert servers.query(stage.settings.pipeline_db, "SELECT expires_at FROM worker_holds")[0][0].year == 9999


def test_with_rule_balance_off_a_balance_never_leaves_its_column(worker0):
    stage = worker0(RULE_BALANCE="false", HOLD_SECONDS=0)
    lines = [event(1, f"2026-05-01 10:00:{i // 1000:02d}.{i % 1000:03d}", order_id=i + 1, user_id=1, shop_id=2,
                   good_id=1, qty=1, price_at_order=9999999999999.99) for i in range(1002)]
    done, prepared, rejected = work(stage, "20260501100009", lines)
    # 1000.00 + 1000 purchases of 9,999,999,999,999.99 fit in DECIMAL(18,2); the next two do not
    assert done.stats["accepted"] == 1000 and done.stats["rejected"] == {"insufficient_balance": 2}
    assert [r["line_no"] for r in rejected] == [1001, 1002]


def test_migration_0002_widens_the_held_lines_of_a_database_of_before(pipeline_db):
    from app import db
    conn = db.connect(pipeline_db)
    try:
        db.migrate(conn, "worker")
        with conn.cursor() as cur:   # as migration 0001 alone left it, with a held return in it
            cur.execute("ALTER TABLE worker_holds MODIFY raw BLOB NOT NULL")
            cur.execute("DELETE FROM schema_migrations WHERE component = 'worker' AND version = 2")
            cur.execute("INSERT INTO worker_holds (file_id, line, shard, order_id, event_time, expires_at, raw) "
                        "VALUES (1, 1, 0, 7, NOW(3), NOW(3), 'kept')")
        assert [str(m) for m in db.migrate(conn, "worker")] == ["worker 0002_held_lines_mediumblob"]
    finally:
        conn.close()
    assert servers.query(pipeline_db, "SELECT DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
                                      "DATABASE() AND TABLE_NAME = 'worker_holds' AND COLUMN_NAME = 'raw'") == \
        [("mediumblob",)]
    assert servers.query(pipeline_db, "SELECT raw FROM worker_holds") == [(b"kept",)]


# -- the sender -----------------------------------------------------------------------------------

@pytest.fixture
def shard(make_database):
    from app import db
    url = make_database("shard")
    loader.prepare_database(url)
    conn = db.connect(url, autocommit=False, local_infile=True)
    yield url, conn
    conn.close()


def prepared(key: str, payload: dict, source: str = "20260501100006") -> bytes:
    return orjson.dumps({"event_key": key, "event_type": 0, "shop_id": 2, "user_id": None, "timestamp": T,
                         "shard": 0, "order_id": None, "good_id": 1, "qty": 1, "amount": None,
                         "source_file": source, "payload": payload}) + b"\n"


def deep_payload(depth: int) -> dict:
    value: list = []
    for _ in range(depth - 2):
        value = [value]
    return {"shop_id": 2, "x": value}


def test_sender_names_a_prepared_line_too_deep_or_too_large(shard, tmp_path):
    url, conn = shard
    path = tmp_path / "p.txt"
    path.write_bytes(prepared("0:a", {"shop_id": 2}) + prepared("0:b", deep_payload(32)))
    with pytest.raises(loader.BadLine, match="prepared line 2: nested deeper than 32 levels"):
        loader.load_file(conn, path, "20260501100006", 0, 2)
    path.write_bytes(prepared("0:a", {"shop_id": 2}) + prepared("0:c", {"shop_id": 2, "x": "y" * 5000}))
    with pytest.raises(loader.BadLine, match=r"prepared line 2: longer than 4096 bytes"):
        loader.load_file(conn, path, "20260501100006", 0, 2, max_line_bytes=LIMIT)
    assert servers.query(url, "SELECT COUNT(*) FROM events") == [(0,)]
    path.write_bytes(prepared("0:a", {"shop_id": 2}) + prepared("0:b", deep_payload(31)))
    assert loader.load_file(conn, path, "20260501100006", 0, 2).loaded == 2


def test_long_rows_never_make_a_statement_over_max_allowed_packet(shard, tmp_path):
    url, conn = shard
    packet = servers.query(url, "SELECT @@max_allowed_packet")[0][0]
    rows = [prepared(f"0:r{i}", {"shop_id": 2, "pad": "p" * 1_000_000}) for i in range(packet * 3 // 2_000_000 + 2)]
    assert sum(map(len, rows)) > packet  # one INSERT of these rows could not be sent
    (tmp_path / "p.txt").write_bytes(b"".join(rows))
    result = loader.load_file(conn, tmp_path / "p.txt", "20260501100006", 0, 2, method="insert")
    assert result.loaded == len(rows)


# -- generative: any mix of hostile lines and valid events -------------------------------------------

@dataclass
class World:
    """One pipeline database and shared folder, its splitter index and both shards' workers."""
    shared: Path
    index: OrderIndex
    workers: list[WorkerStage]

    def run(self, name: str, data: bytes) -> tuple[dict, list[tuple]]:
        """Split `data` and work both shards; the split's stats and each line's fate:
        ("splitter", reason) or ("worker", shard, "accepted" | reason)."""
        source = layout.source_file(self.shared, name)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(data)
        result = split_file(source, name, self.shared, 2, [0, 1], [0, 1], self.index, True, max_line_bytes=LIMIT)
        rejected_path = layout.splitter_rejected(self.shared, name)
        split_rejected = {r["line_no"]: r["reason"] for r in
                          map(orjson.loads, rejected_path.read_bytes().splitlines())} if rejected_path.exists() else {}
        fates_by_shard = {}
        for w in self.workers:
            done = w._process_one(name, context())
            stats = done.stats
            assert stats["in"] + stats["released"] + stats["expired"] == \
                stats["accepted"] + sum(stats["rejected"].values()) + stats["held"], stats
            assert stats["held"] == 0 and stats["in"] == result.per_shard[w.shard]
            rej = {r["line_no"]: r["reason"] for r in map(orjson.loads, layout.worker_rejected(
                self.shared, name, w.shard).read_bytes().splitlines())}
            fates_by_shard[w.shard] = [rej.get(i, "accepted") for i in range(1, stats["in"] + 1)]
            assert fates_by_shard[w.shard].count("accepted") == stats["accepted"]
        # Walk the source: a line not rejected by the splitter is the next line of its shard file.
        shard_lines = {s: iter(layout.splitter_output(self.shared, name, s).read_bytes().splitlines(keepends=True))
                       for s in (0, 1)}
        heads = {s: next(shard_lines[s], None) for s in (0, 1)}
        taken = {0: 0, 1: 0}
        lines = (data[3:] if data.startswith(BOM) else data).split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        fates = []
        for no, line in enumerate(lines, 1):
            if no in split_rejected:
                fates.append(("splitter", split_rejected[no]))
                continue
            s = next(s for s in (0, 1) if heads[s] is not None and heads[s].rstrip(b"\n") == line)
            fates.append(("worker", s, fates_by_shard[s][taken[s]]))
            taken[s] += 1
            heads[s] = next(shard_lines[s], None)
        assert heads == {0: None, 1: None}
        assert len(fates) == result.lines_in
        return result.stats(), fates


@pytest.fixture
def worlds(make_database, tmp_path):
    made = []
    for side in ("clean", "mixed"):
        url = make_database(f"host{side[0]}")
        shared = tmp_path / side
        folder = layout.splitter_dir(shared)
        folder.mkdir(parents=True)
        settings = worker_settings(url, shared, HOLD_SECONDS=0)
        made.append(World(shared, OrderIndex(url, folder), [WorkerStage(settings, s) for s in (0, 1)]))
    yield made
    for w in made:
        w.index.close()
        for stage in w.workers:
            stage.teardown()


class Raw:
    """A JSON value written as it is (a number no Python float or int prints that way)."""

    def __init__(self, text: bytes):
        self.text = text


BAD = {
    "id": ["x", 1.5, True, None, [1], {"a": 1}, Raw(b"18446744073709551616"), Raw(b"1e400"), -1],
    "order": ["x", 1.5, True, None, [1], Raw(b"-9223372036854775809"), Raw(b"1e400")],
    "qty": ["x", 1.5, True, None, [1], 1 << 40, Raw(b"1e400")],
    "money": ["x", True, None, [1], 1.234, 1e13, Raw(b"1e400"), Raw(b"NaN")],
    "bool": ["x", 1.5, None, [1], 2],
}
BAD_TIMES = ["2026-02-30 00:00:00.000", "0999-12-31 23:59:59.999", "2026-05-01T10:00:00.000", "", 5, None,
             "2026-05-01 24:00:00.000"]
BAD_TYPES = [7, "1", True, None, -1, 1.0]
FIELDS = {  # the worker's required fields per event type (docs/business-rules.md)
    0: (("shop_id", "id"), ("good_id", "id"), ("delta_count", "qty")),
    1: (("order_id", "order"), ("user_id", "id"), ("shop_id", "id"), ("good_id", "id"), ("qty", "qty"),
        ("price_at_order", "money")),
    2: (("shop_id", "id"), ("good_id", "id"), ("new_price", "money")),
    3: (("order_id", "order"), ("user_id", "id"), ("good_id", "id"), ("qty", "qty"), ("refund_amount", "money")),
    4: (("shop_id", "id"), ("active", "bool")),
}


def render(obj: dict) -> bytes:
    """JSON with Raw values spliced in."""
    raws: list[bytes] = []

    def default(value):
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError
    text = orjson.dumps(obj, default=default)
    for i, raw in enumerate(raws):
        text = text.replace(orjson.dumps(f"\x00raw{i}\x00"), raw)
    return text


@st.composite
def scenario(draw):
    """Valid events (as small ids, mapped into an example's own id space by the test) and hostile
    lines, each hostile line with the index of the valid event it is made from and where it goes."""
    n = draw(st.integers(1, 8))
    valid = []
    for i in range(n):
        etype = draw(st.sampled_from([0, 1, 1, 2, 3, 3, 4]))
        spec = {"etype": etype, "shop": draw(st.integers(0, 3)), "good": draw(st.integers(1, 2)),
                "user": draw(st.integers(0, 2)), "order": draw(st.integers(0, 3)),
                "amount": draw(st.sampled_from([1.5, 20.0, 700.0, 0.0])), "qty": draw(st.sampled_from([1, 2, -3])),
                "active": draw(st.booleans()), "shopless": draw(st.booleans()), "crlf": draw(st.booleans())}
        valid.append(spec)
    kinds = st.one_of(
        st.tuples(st.just("random"), st.binary(max_size=300)),
        st.tuples(st.just("mutate"), st.integers(0, n - 1), st.integers(0, 10_000)),
        st.tuples(st.just("oversized"), st.integers(0, n - 1), st.integers(LIMIT - 300, 3 * LIMIT), st.booleans()),
        # around the limit, around orjson's printing limit (255), past the splitter's decoder (~1000,
        # arrays only: objects that deep are over the test's MAX_LINE_BYTES)
        st.tuples(st.just("deep"), st.integers(0, n - 1),
                  st.sampled_from([(31, 40), (250, 300), (990, 1900)]).flatmap(lambda r: st.integers(*r)),
                  st.sampled_from(["payload", "top", "event_type", "shop_id"]), st.booleans()),
        st.tuples(st.just("inject"), st.integers(0, n - 1), st.sampled_from([b"\x00", b"\xff", b"\xc3", BOM, b"\r"]),
                  st.integers(0, 10_000)),
    )
    hostile = draw(st.lists(st.tuples(kinds, st.integers(0, n)), min_size=1, max_size=6))
    return valid, hostile, draw(st.booleans())


def build(valid_specs: list[dict], k: int) -> list[dict]:
    """The valid events of example `k` (ids of their own, times after every earlier example)."""
    base = 1000 * (k + 1)
    out = []
    for i, s in enumerate(valid_specs):
        ts = f"2026-05-01 {10 + k // 60 % 12:02d}:{k % 60:02d}:{i:02d}.{i * 7:03d}"
        shop, user, order = base + s["shop"], base + s["user"], base + s["order"]
        etype = s["etype"]
        if etype == 0:
            payload = {"shop_id": shop, "good_id": s["good"], "delta_count": s["qty"] * 3}
        elif etype == 1:
            payload = {"order_id": order, "user_id": user, "shop_id": shop, "good_id": s["good"], "qty": s["qty"],
                       "price_at_order": s["amount"]}
        elif etype == 2:
            payload = {"shop_id": shop, "good_id": s["good"], "new_price": s["amount"]}
        elif etype == 3:
            payload = {"order_id": order, "user_id": user, "good_id": s["good"], "qty": abs(s["qty"]),
                       "refund_amount": s["amount"]}
            if not s["shopless"]:
                payload["shop_id"] = shop
        else:
            payload = {"shop_id": shop, "active": s["active"]}
        out.append({"event_type": etype, "payload": payload, "timestamp": ts, "crlf": s["crlf"]})
    return out


def line_of(ev: dict) -> bytes:
    body = render({k: v for k, v in ev.items() if k != "crlf"})
    return body + (b"\r\n" if ev.get("crlf") else b"\n")


def hostile_line(kind: tuple, events: list[dict], k: int, j: int) -> bytes:
    """A line that must be rejected without touching any state. Copies of purchases get an order
    of their own, so a broken copy never shares a business key with a valid event."""
    if kind[0] == "random":
        return kind[1].replace(b"\n", b"") + b"\n"
    ev = {**events[kind[1]]}
    ev["payload"] = dict(ev["payload"])
    if ev["event_type"] == 1:
        ev["payload"]["order_id"] = 1000 * (k + 1) + 500 + j
    if kind[0] == "mutate":
        choice = kind[2]
        fields = [("timestamp", None), ("event_type", None), ("payload", None)] + list(FIELDS[ev["event_type"]])
        name, sort = fields[choice % len(fields)]
        if name == "timestamp":
            ev["timestamp"] = BAD_TIMES[choice // len(fields) % len(BAD_TIMES)]
        elif name == "event_type":
            ev["event_type"] = BAD_TYPES[choice // len(fields) % len(BAD_TYPES)]
        elif name == "payload":
            ev["payload"] = ["x", [], None, 5][choice // len(fields) % 4]
        elif choice // len(fields) % 5 == 0 and not (ev["event_type"] == 3 and name == "shop_id"):
            del ev["payload"][name]
        else:
            bad = [v for v in BAD[sort] if not (ev["event_type"] == 3 and name == "shop_id" and v is None)]
            ev["payload"][name] = bad[choice // len(fields) % len(bad)]
        return line_of(ev)
    if kind[0] == "oversized":      # over the limit (the splitter), or its prepared line would be (the worker)
        _, _, size, junk = kind
        if junk:
            return b"#" * (LIMIT + size) + b"\n"
        base = with_field(line_of(ev), b'""')
        return with_field(line_of(ev), b'"' + b"p" * max(size - (len(base) - 1), 0) + b'"')
    if kind[0] == "deep":
        _, _, depth, where, objects = kind
        if where == "top":          # one level less deep than in the payload
            depth += 1
        value = b'{"a":' * depth + b"1" + b"}" * depth if objects and depth < 500 else nested(depth)
        line = line_of(ev)
        key = f'"{where}":'.encode()
        if where in ("payload", "top") or key not in line:
            return with_field(line, value, "top" if where == "top" else "payload")
        return line.replace(key, key + value + b',"was":', 1)
    _, _, byte, at = kind
    line = line_of(ev).rstrip(b"\r\n")
    if byte == b"\r":      # a raw CR inside a string (outside one it is JSON whitespace)
        opening = [i for i, c in enumerate(line) if c == 34][::2]
        pos = opening[at % len(opening)] + 1
    elif byte == BOM:
        pos = 0
    else:
        pos = at % (len(line) + 1)
    return line[:pos] + byte + line[pos:] + b"\n"


EXAMPLES = 120


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=scenario())
def test_any_mix_of_hostile_lines_costs_only_those_lines(worlds, case):
    valid_specs, hostile, bom = case
    k = next(COUNTER)
    events = build(valid_specs, k)
    valid = [line_of(ev) for ev in events]
    bad = [hostile_line(kind, events, k, j) for j, (kind, _) in enumerate(hostile)]
    mixed, origin = [], []      # origin: ("valid", i) or ("hostile", j)
    for i in range(len(valid) + 1):
        for j, (_, at) in enumerate(hostile):
            if at == i:
                mixed.append(bad[j])
                origin.append(("hostile", j))
        if i < len(valid):
            mixed.append(valid[i])
            origin.append(("valid", i))
    name = f"2026050{k // 1000}{k % 1000:06d}"
    clean_world, mixed_world = worlds
    _, alone = clean_world.run(name, b"".join(valid))
    stats, fates = mixed_world.run(name, (BOM if bom else b"") + b"".join(mixed))

    assert stats["lines_in"] == len(mixed) and stats["bom_skipped"] == int(bom)
    assert stats["lines_in"] == sum(stats["lines_by_shard"].values()) + stats["rejected_total"]
    for (what, i), fate in zip(origin, fates):
        if what == "valid":
            assert fate == alone[i], (valid[i], fate, alone[i])
        else:
            event(f"hostile {hostile[i][0][0]}: {fate[0]} {fate[-1]}")
            assert fate[-1] != "accepted", (bad[i][:300], fate)
            table = SPLITTER_TABLE if fate[0] == "splitter" else WORKER_TABLE
            assert fate[-1] in table, (bad[i][:300], fate)


COUNTER = itertools.count()


def test_documented_tables_name_every_reason():
    assert SPLITTER_TABLE == set(splitter_reasons.REASONS)
    assert WORKER_TABLE == set(WORKER_REASONS)
