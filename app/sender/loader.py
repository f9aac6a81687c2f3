"""Loading one prepared file into its shard database, exactly once.

The whole file goes in ONE transaction together with its row in `loaded_files`; that row is
inserted first, so a second loader of the same file waits on its lock and then finds it
loaded, and a load cut short anywhere (kill, lost connection, server restart) leaves nothing.
`events` has a unique key on (timestamp, event_key), so an event that reaches the shard twice
(in two files, or twice in one) is an explicit no-op, never a second row and never a silenced
error.

Two bulk methods, same result (bench/load.py measures both):
- `load_data`: the file's rows as TSV chunks in the sender's folder, each sent with
  `LOAD DATA LOCAL INFILE`. LOCAL loads turn errors into warnings, so a chunk is accepted
  only with zero warnings and every row inserted; otherwise the transaction is rolled back
  and the file is loaded again with `insert`, which skips duplicates explicitly.
- `insert`: multi-row `INSERT ... ON DUPLICATE KEY UPDATE id = id`.
A thread parses and checks the next chunk while the server stores the current one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import orjson
import pymysql
from pymysql.converters import escape_string

from .. import db
from ..atomic import TMP_MARK
from ..config import MySQLURL
from ..events import EVENT_TYPES
from ..overlap import ReadAhead

log = logging.getLogger("shard-loader")

# The shard database's migrations: db/migrations/shard/ (applied by `db.migrate`).
SCHEMA = "shard"
METHODS = ("load_data", "insert")
INSERT_ROWS = 2000          # rows per INSERT statement (~0.7 MB, far below max_allowed_packet)
READ_BLOCK = 1 << 22
FIRST_BATCH = 1000          # rows in the first chunk; each next one doubles up to the chunk size

INT64 = (-(1 << 63), (1 << 63) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)
_KEY = re.compile(r"[0-9A-Za-z:._+/=\-]{1,64}").fullmatch
_AMOUNT = re.compile(r"-?\d{1,16}(?:\.\d{1,2})?").fullmatch
_EVENT_COLUMNS = {"event_key", "event_type", "shop_id", "user_id", "timestamp", "shard", "created_at",
                  "source_file", "order_id", "good_id", "qty", "amount", "payload"}
# Optional indexes of `events` (SHARD_INDEXES), each for a documented question (docs/sender.md).
OPTIONAL_INDEXES = {
    "user": ("ix_events_user_time", "(user_id, `timestamp`)"),
    "order": ("ix_events_order", "(order_id)"),
    "type": ("ix_events_type_time", "(event_type, `timestamp`)"),
}
_N = "\\N"                   # NULL in LOAD DATA's default format
_LO, _HI = INT64
_LO32, _HI32 = INT32
_loads, _dumps, _fromisoformat = orjson.loads, orjson.dumps, datetime.fromisoformat

_LOAD_DATA = ("LOAD DATA LOCAL INFILE %s INTO TABLE events CHARACTER SET utf8mb4 "
              # the default field format: tab-separated, backslash escapes, \N for NULL
              "(event_key, event_type, shop_id, user_id, `timestamp`, order_id, good_id, qty, amount, payload) "
              "SET shard = %s, source_file = %s")
_INSERT = ("INSERT INTO events (event_key, event_type, shop_id, user_id, `timestamp`, order_id, good_id, qty, "
           "amount, payload, shard, source_file) VALUES {} ON DUPLICATE KEY UPDATE id = id")
_CLAIM = ("INSERT INTO loaded_files (source_file, shard, line_count, loaded_count, duplicate_count, checksum, "
          "method) VALUES (%s, %s, 0, 0, 0, '', '') ON DUPLICATE KEY UPDATE source_file = source_file")
_RECORD = ("UPDATE loaded_files SET line_count=%s, loaded_count=%s, duplicate_count=%s, checksum=%s, method=%s, "
           "seconds=%s, loaded_at=CURRENT_TIMESTAMP(3) WHERE source_file=%s")
_RECORDED = ("SELECT line_count, loaded_count, duplicate_count, checksum, method FROM loaded_files "
             "WHERE source_file=%s FOR UPDATE")  # the latest committed row, not a snapshot


class BadLine(ValueError):
    """A prepared line that cannot be loaded; the file is refused whole."""

    def __init__(self, line_no: int, problem: str):
        super().__init__(f"malformed prepared line {line_no}: {problem}")
        self.line_no = line_no


class WrongShard(BadLine):
    def __init__(self, line_no: int, problem: str):
        ValueError.__init__(self, f"wrong shard: prepared line {line_no}: {problem}")
        self.line_no = line_no


class PreparedMissing(FileNotFoundError):
    """The prepared file is not there (and the file was never loaded)."""


class SchemaMismatch(RuntimeError):
    """The shard database holds an `events` table this sender cannot load into."""


class RowsRefused(RuntimeError):
    """The server stored fewer rows than sent, or warned, with no duplicate to explain it."""


@dataclass
class LoadResult:
    source_file: str
    lines: int              # rows in the prepared file
    loaded: int             # rows this file put into `events`
    duplicates: int         # rows skipped because their event_key was already there
    method: str
    seconds: float
    checksum: str
    already_loaded: bool = False
    local_infile_refused: bool = False

    def stats(self) -> dict:
        out = {"rows": self.lines, "loaded": self.loaded, "duplicates": self.duplicates,
               "method": self.method, "seconds": round(self.seconds, 3)}
        if self.already_loaded:
            out["already_loaded"] = True
        return out


# -- schema -----------------------------------------------------------------------------------

def prepare_database(url: MySQLURL, indexes: tuple[str, ...] = ()) -> None:
    """Create the shard database if missing and bring its schema up to date (`prepare`)."""
    db.ensure_database(url)
    conn = db.connect(url)
    try:
        prepare(conn, indexes)
    finally:
        conn.close()


def prepare(conn, indexes: tuple[str, ...] = ()) -> None:
    """Bring the schema of the connection's shard database up to date (`db.migrate`, under a
    lock), then build or drop the optional indexes so that exactly `indexes` (names of
    OPTIONAL_INDEXES, from SHARD_INDEXES) exist. An original deployment's `events` table is
    refused, not loaded into; its `purchase_history`/`order_return` tables are kept."""
    unknown = set(indexes) - set(OPTIONAL_INDEXES)
    if unknown:
        raise ValueError(f"unknown optional index {sorted(unknown)}; expected some of {sorted(OPTIONAL_INDEXES)}")
    with conn.cursor() as cur:
        cur.execute("SELECT DATABASE(), COLUMN_NAME FROM information_schema.COLUMNS "
                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'events'")
        rows = cur.fetchall()
    present = {r[1].lower() for r in rows}
    if present and _EVENT_COLUMNS - present:
        raise SchemaMismatch(
            f"{rows[0][0]}.events predates the sender's schema (missing "
            f"{', '.join(sorted(_EVENT_COLUMNS - present))}): rename it and restart the sender, "
            f"which creates the table of db/migrations/{SCHEMA}/")
    db.migrate(conn, SCHEMA)
    _optional_indexes(conn, indexes)
    if not conn.get_autocommit():
        conn.commit()


def _optional_indexes(conn, indexes: tuple[str, ...]) -> None:
    """Add or drop OPTIONAL_INDEXES so that exactly `indexes` exist, under a named lock (senders
    starting together do not race; one that waits 60 s in vain retries later)."""
    with conn.cursor() as cur:
        cur.execute("SELECT DATABASE()")
        database = cur.fetchone()[0]
        lock = f"shard-indexes:{database}"[:64]
        cur.execute("SELECT GET_LOCK(%s, 60)", (lock,))
        if cur.fetchone()[0] != 1:
            raise SchemaMismatch(f"could not take the lock {lock!r} within 60 s (another sender is building "
                                 f"an index)")
        try:
            have = _event_indexes(cur)
            for name, (index, columns) in sorted(OPTIONAL_INDEXES.items()):
                if name in indexes and index not in have:
                    log.info("%s: building index %s %s (SHARD_INDEXES)", database, index, columns)
                    cur.execute(f"ALTER TABLE events ADD INDEX {index} {columns}")
                elif name not in indexes and index in have:
                    log.info("%s: dropping index %s (not in SHARD_INDEXES)", database, index)
                    cur.execute(f"ALTER TABLE events DROP INDEX {index}")
        finally:
            cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))


def _event_indexes(cur) -> set[str]:
    cur.execute("SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'events'")
    return {r[0] for r in cur.fetchall()}


# -- reading and checking prepared lines --------------------------------------------------

def _opt_int(ev: dict, name: str, line_no: int, bounds=INT64):
    value = ev.get(name)
    if value is None:
        return None
    if type(value) is not int or not bounds[0] <= value <= bounds[1]:
        raise BadLine(line_no, f"{name} must be an integer or null, got {value!r}"[:300])
    return value


def check_line(line: bytes, line_no: int, source_file: str, shard: int, shard_count: int) -> tuple:
    """The loadable fields of one prepared line, or BadLine/WrongShard naming the problem.

    One combined test on the hot path (this runs a million times per million rows); a line
    that fails it is examined again by `_explain`, which names what is wrong."""
    try:
        ev = _loads(line)
        key, etype, shop, user, ts = ev["event_key"], ev["event_type"], ev["shop_id"], ev["user_id"], ev["timestamp"]
        order, good, qty, amount, payload = ev["order_id"], ev["good_id"], ev["qty"], ev["amount"], ev["payload"]
        if (type(key) is str and _KEY(key) and type(etype) is int and etype in EVENT_TYPES
                and type(shop) is int and _LO <= shop <= _HI and shop % shard_count == shard
                and type(ev["shard"]) is int and ev["shard"] == shard and ev["source_file"] == source_file
                and (user is None or (type(user) is int and _LO <= user <= _HI))
                and (order is None or (type(order) is int and _LO <= order <= _HI))
                and (good is None or (type(good) is int and _LO <= good <= _HI))
                and (qty is None or (type(qty) is int and _LO32 <= qty <= _HI32))
                and (amount is None or (type(amount) is str and _AMOUNT(amount)))
                and type(ts) is str and len(ts) == 23 and ts[19] == "." and ts[10] == " " and ts >= "1000"
                and type(payload) is dict):
            _fromisoformat(ts)
            return key, etype, shop, user, ts, order, good, qty, amount, _dumps(payload).decode()
    except (ValueError, KeyError, TypeError):
        pass
    _explain(line, line_no, source_file, shard, shard_count)
    raise BadLine(line_no, "unreadable line")


def _explain(line: bytes, line_no: int, source_file: str, shard: int, shard_count: int) -> None:
    """Raise BadLine/WrongShard for the first problem of a line the hot path refused."""
    try:
        ev = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadLine(line_no, f"not JSON ({exc})") from None
    if type(ev) is not dict:
        raise BadLine(line_no, "not a JSON object")
    key = ev.get("event_key")
    if type(key) is not str or not _KEY(key):
        raise BadLine(line_no, f"event_key must be 1-64 characters of [0-9A-Za-z:._+/=-], got {key!r}"[:300])
    etype = ev.get("event_type")
    if type(etype) is not int or etype not in EVENT_TYPES:
        raise BadLine(line_no, f"event_type must be one of {sorted(EVENT_TYPES)}, got {etype!r}"[:300])
    shop = ev.get("shop_id")
    if type(shop) is not int or not INT64[0] <= shop <= INT64[1]:
        raise BadLine(line_no, f"shop_id must be an integer, got {shop!r}"[:300])
    if shop % shard_count != shard:
        raise WrongShard(line_no, f"shop_id {shop} belongs to shard {shop % shard_count} "
                                  f"(shop_id % {shard_count}), not to shard {shard}")
    line_shard = ev.get("shard")
    if type(line_shard) is not int or line_shard != shard:
        raise WrongShard(line_no, f"the line says shard {line_shard!r}, this is shard {shard}"[:300])
    ts = ev.get("timestamp")
    if type(ts) is not str or len(ts) != 23 or ts[19] != "." or ts[10] != " " or ts < "1000":
        raise BadLine(line_no, f"timestamp must be 'YYYY-MM-DD HH:MM:SS.mmm' (UTC), got {ts!r}"[:300])
    try:
        datetime.fromisoformat(ts)
    except ValueError:
        raise BadLine(line_no, f"timestamp is not a valid time: {ts!r}") from None
    amount = ev.get("amount")
    if amount is not None and (type(amount) is not str or not _AMOUNT(amount)):
        raise BadLine(line_no, f"amount must be a decimal string such as \"123.45\" (at most 16 digits "
                               f"before the point, 2 after) or null, got {amount!r}"[:300])
    if ev.get("source_file") != source_file:
        raise BadLine(line_no, f"source_file is {ev.get('source_file')!r}, but the line is in "
                               f"{source_file!r}'s prepared file"[:300])
    if type(ev.get("payload")) is not dict:
        raise BadLine(line_no, "payload must be a JSON object")
    for name in ("user_id", "order_id", "good_id", "qty"):
        if name not in ev:
            raise BadLine(line_no, f"{name} is missing (null when the event has none)")
        _opt_int(ev, name, line_no, INT32 if name == "qty" else INT64)


def _tsv(fields: tuple) -> str:
    key, etype, shop, user, ts, order, good, qty, amount, payload = fields
    if "\\" in payload:
        payload = payload.replace("\\", "\\\\")
    return (f"{key}\t{etype}\t{shop}\t{_N if user is None else user}\t{ts}\t"
            f"{_N if order is None else order}\t{_N if good is None else good}\t"
            f"{_N if qty is None else qty}\t{_N if amount is None else amount}\t{payload}\n")


def _sql_row(fields: tuple, tail: str) -> str:
    key, etype, shop, user, ts, order, good, qty, amount, payload = fields
    return (f"('{key}',{etype},{shop},{'NULL' if user is None else user},'{ts}',"
            f"{'NULL' if order is None else order},{'NULL' if good is None else good},"
            f"{'NULL' if qty is None else qty},{'NULL' if amount is None else amount},"
            f"'{escape_string(payload)}',{tail})")


class _Reading:
    """What the reading thread learns about the whole file, read by the loader at the end."""

    def __init__(self):
        self.rows = 0
        self.hasher = hashlib.sha1()  # `sha1sum <prepared file>` gives the same: an operator can compare


def _formatted(f, reading: _Reading, source_file: str, shard: int, shard_count: int,
               fmt: Callable[[tuple], str], per_batch: int) -> Iterator[list[str]]:
    """Batches of checked lines, each formatted by `fmt`; one loop, no per-line generator. The
    first batches are small, so the server starts working while the rest is still being read."""
    check = check_line
    hasher = reading.hasher
    buf: list[str] = []
    size = min(FIRST_BATCH, per_batch)
    rest = b""
    line_no = 0
    while block := f.read(READ_BLOCK):
        hasher.update(block)
        lines = block.split(b"\n")
        lines[0] = rest + lines[0]
        rest = lines.pop()
        for line in lines:
            line_no += 1
            if not line or line.isspace():
                continue
            buf.append(fmt(check(line, line_no, source_file, shard, shard_count)))
            if len(buf) >= size:
                reading.rows += len(buf)
                yield buf
                buf = []
                size = min(size * 2, per_batch)
    if rest and not rest.isspace():
        buf.append(fmt(check(rest, line_no + 1, source_file, shard, shard_count)))
    if buf:
        reading.rows += len(buf)
        yield buf


def chunk_name(work_dir: Path, source_file: str, index: int) -> Path:
    """A chunk's TSV in the sender's folder; the `.tmp-<pid>` mark keeps a live replica's chunk
    from being swept when another sender starts."""
    return work_dir / f"{source_file}.chunk-{index:05d}.tsv{TMP_MARK}{os.getpid()}"


def _tsv_chunks(batches: Iterator[list[str]], work_dir: Path, source_file: str) -> Iterator[tuple]:
    for index, batch in enumerate(batches):
        path = chunk_name(work_dir, source_file, index)
        with open(path, "w", encoding="utf-8", newline="\n") as out:
            out.write("".join(batch))
        yield path, len(batch)


def _insert_statements(batches: Iterator[list[str]]) -> Iterator[tuple]:
    for batch in batches:
        yield _INSERT.format(",".join(batch)), len(batch)


class _FallBack(Exception):
    """LOAD DATA could not prove every row went in exactly as sent: redo the file with INSERT."""

    def __init__(self, why: str, refused: bool = False):
        super().__init__(why)
        self.refused = refused


def _warnings(cur) -> str:
    cur.execute("SHOW WARNINGS LIMIT 3")
    return "; ".join(f"{r[1]} {r[2]}" for r in cur.fetchall())


def _by_load_data(cur, f, reading, source_file, shard, shard_count, work_dir, chunk_rows, check) -> int:
    batches = _formatted(f, reading, source_file, shard, shard_count, _tsv, chunk_rows)
    loaded = 0
    try:
        # The reader thread is joined when the block ends, so no chunk appears after the cleanup.
        with ReadAhead(_tsv_chunks(batches, work_dir, source_file), depth=1) as chunks:
            for path, count in chunks:
                if check:
                    check()
                try:
                    stored = cur.execute(_LOAD_DATA, (str(path), shard, source_file))
                except pymysql.err.MySQLError as exc:
                    if exc.args and exc.args[0] in db.LOCAL_INFILE_REFUSED:
                        raise _FallBack(f"LOAD DATA LOCAL INFILE refused: {exc.args[-1]}", refused=True) from None
                    raise
                except AttributeError as exc:
                    # PyMySQL, when the server goes away while it sends a LOCAL file, fails on its
                    # closed socket with AttributeError instead of reporting the lost connection.
                    if cur.connection is not None and cur.connection.open:
                        raise
                    raise pymysql.err.OperationalError(
                        2013, f"connection lost during LOAD DATA LOCAL ({exc})") from None
                finally:
                    path.unlink(missing_ok=True)
                if cur.warning_count or stored != count:
                    raise _FallBack(f"{path.name}: {stored} of {count} rows stored, {cur.warning_count} "
                                    f"warnings ({_warnings(cur)})")
                loaded += stored
    finally:
        for leftover in work_dir.glob(f"{source_file}.chunk-*{TMP_MARK}{os.getpid()}"):
            leftover.unlink(missing_ok=True)
    return loaded


def _by_insert(cur, f, reading, source_file, shard, shard_count, work_dir, chunk_rows, check) -> int:
    tail = f"{shard},'{escape_string(source_file)}'"
    batches = _formatted(f, reading, source_file, shard, shard_count, lambda fields: _sql_row(fields, tail),
                         INSERT_ROWS)
    loaded = 0
    with ReadAhead(_insert_statements(batches), depth=4) as statements:
        for sql, _count in statements:
            if check:
                check()
            loaded += cur.execute(sql)
            if cur.warning_count:
                raise RowsRefused(f"the server warned while storing {source_file}: {_warnings(cur)}")
    return loaded


_METHOD = {"load_data": _by_load_data, "insert": _by_insert}


def _rollback(conn) -> None:
    try:
        conn.rollback()
    except Exception:  # the connection is gone: the server rolls back on its own
        pass


def load_file(conn, path: Path, source_file: str, shard: int, shard_count: int, work_dir: Path, *,
              method: str = "load_data", chunk_rows: int = 10_000,
              check: Callable[[], None] | None = None) -> LoadResult:
    """Load `path` (the prepared file of `source_file`) into the shard `conn` is connected to
    (autocommit off, local_infile on), all of it or nothing, once.

    Raises PreparedMissing, BadLine/WrongShard (nothing loaded), RowsRefused, a pymysql error
    when the server fails (nothing loaded, or everything if the commit went through: the next
    call tells which), or whatever `check` raises; it is called before each chunk, never after
    the last one, so a stop either rolls back or lets the commit finish.
    """
    if method not in _METHOD:
        raise ValueError(f"unknown load method {method!r}; expected one of {METHODS}")
    started = time.monotonic()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        f = None
    plan = [method] if method == "insert" else [method, "insert"]
    refused = False
    try:
        with conn.cursor() as cur:
            for attempt in plan:
                conn.begin()
                try:
                    if cur.execute(_CLAIM, (source_file, shard)) == 0:
                        cur.execute(_RECORDED, (source_file,))
                        lines, loaded, duplicates, checksum, used = cur.fetchone()
                        conn.rollback()
                        return LoadResult(source_file, lines, loaded, duplicates, used,
                                          time.monotonic() - started, checksum, already_loaded=True)
                    if f is None:
                        conn.rollback()
                        raise PreparedMissing(f"prepared file {path} is missing")
                    f.seek(0)
                    reading = _Reading()
                    try:
                        loaded = _METHOD[attempt](cur, f, reading, source_file, shard, shard_count, work_dir,
                                                  chunk_rows, check)
                    except _FallBack as why:
                        conn.rollback()
                        refused = refused or why.refused
                        log.warning("%s: %s; loading it again with INSERT", source_file, why)
                        continue
                    seconds = time.monotonic() - started
                    checksum = reading.hasher.hexdigest()
                    used = attempt if attempt == method else f"{method}>{attempt}"
                    cur.execute(_RECORD, (reading.rows, loaded, reading.rows - loaded, checksum, used,
                                          round(seconds, 3), source_file))
                    conn.commit()  # with every row sent, committing is quicker than a rollback
                    return LoadResult(source_file, reading.rows, loaded, reading.rows - loaded, used,
                                      time.monotonic() - started, checksum, local_infile_refused=refused)
                except BaseException:
                    _rollback(conn)
                    raise
        raise AssertionError("unreachable: the INSERT method never falls back")
    finally:
        if f is not None:
            f.close()
