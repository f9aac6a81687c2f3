"""Loading one prepared file into its shard database, exactly once.

The whole file goes in ONE transaction together with its row in `loaded_files`; that row is
inserted first, so a second loader of the same file waits on its lock and then finds it
loaded, and a load cut short anywhere (kill, lost connection, server restart) leaves nothing.
`events` has a unique key on (timestamp, event_key), so an event that reaches the shard twice
(in two files, or twice in one) is an explicit no-op, never a second row and never a silenced
error.

Two bulk methods, same result (bench/load.py measures both):
- `load_data`: the file's rows as TSV chunks built in memory, each sent with `LOAD DATA LOCAL
  INFILE` through `db.load_local` (the server gets that chunk and can ask for no file of this
  machine; nothing is written to disk). LOCAL loads turn errors into warnings, so a
  chunk is accepted only with zero warnings and every row inserted; otherwise the transaction
  is rolled back and the file is loaded again with `insert`, which skips duplicates explicitly.
- `insert`: multi-row `INSERT ... ON DUPLICATE KEY UPDATE id = id`, strings escaped by the
  connection (which honours NO_BACKSLASH_ESCAPES).

Checking and converting a prepared file costs half of what parsing each line into objects and
dumping its payload again did: msgspec decodes and type-checks a whole block of
lines in C, keeping each payload as the bytes it was written as, and the rules the types cannot
say (the shard, the file, the key's characters, real times, decimal amounts) are checked once
per block on joined or distinct values. A block that fails any of it is examined line by line,
which names the first bad line.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache, partial
from itertools import accumulate, repeat
from operator import attrgetter, contains, is_not, itemgetter
from pathlib import Path
from typing import Annotated, Callable, Iterator, Literal

import msgspec
import orjson
import pymysql
from pymysql.constants import CLIENT

from .. import db, safefiles
from ..config import MySQLURL
from ..events import EVENT_TYPES
from ..overlap import ReadAhead

log = logging.getLogger("shard-loader")

# The shard database's migrations: db/migrations/shard/ (applied by `db.migrate`).
SCHEMA = "shard"
METHODS = ("load_data", "insert")
INSERT_ROWS = 2000          # rows per INSERT statement (~0.7 MB, far below max_allowed_packet)
FIRST_BATCH = 1000          # rows in a big file's first chunk; each next one doubles up to the chunk size
# A file up to this size is read and checked by the loading thread itself, and sent as one chunk when it has
# at most `chunk_rows` lines: a big run's shard file (~5,000 rows, ~1.7 MB) costs the sender ~13% less CPU so
# than through the read-ahead thread in chunks of 1,000 and 2,000 rows (docs/performance.md).
INLINE_BYTES = 4 << 20
# A claim's file up to this size joins a batch (`load_batch`); a bigger one loads alone: two big run's files in
# one LOAD DATA cost the server and the sender more than one each (the file's name then a column of every row).
BATCH_FILE_BYTES = 1 << 20
# A chunk also ends once its lines hold this many bytes, so long lines make small chunks: an
# INSERT (at most twice its lines once escaped) stays far below max_allowed_packet, and a TSV
# chunk is a few MB of memory at most.
CHUNK_BYTES = 8 << 20
INSERT_BYTES = 2 << 20
# A prepared line longer than this is refused (the worker writes lines of a few hundred bytes),
# and never held whole; a payload nested deeper than MAX_JSON_DEPTH - 1 levels is refused too
# (the line is one level more): MariaDB's JSON functions stop at 32, and so the JSON column.
MAX_LINE_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
BOM = b"\xef\xbb\xbf"        # a UTF-8 byte-order mark, skipped at the very start of a file

INT64 = (-(1 << 63), (1 << 63) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)
_KEY = re.compile(r"[0-9A-Za-z:._+/=\-]{1,64}").fullmatch
_AMOUNT = re.compile(r"-?[0-9]{1,16}(?:\.[0-9]{1,2})?").fullmatch
_EVENT_COLUMNS = {"event_key", "event_type", "shop_id", "user_id", "timestamp", "shard", "created_at",
                  "source_file", "order_id", "good_id", "qty", "amount", "payload"}
# Optional indexes of `events` (SHARD_INDEXES), each for a documented question (docs/sender.md).
OPTIONAL_INDEXES = {
    "user": ("ix_events_user_time", "(user_id, `timestamp`)"),
    "order": ("ix_events_order", "(order_id)"),
    "type": ("ix_events_type_time", "(event_type, `timestamp`)"),
}
_N = "\\N"                   # NULL in LOAD DATA's default format

# The TSV's character set: `{charset}`, `file_charset` of the connection; `load_statement` fills
# it in and, on MariaDB, runs the statement without the JSON column's CHECK (`load_statement`).
_LOAD_DATA = ("LOAD DATA LOCAL INFILE %s INTO TABLE events CHARACTER SET {charset} "
              # The default format (tab-separated, backslash escapes, \N for NULL), spelled out in hex:
              # under sql_mode NO_BACKSLASH_ESCAPES the default escape character is none at all.
              "FIELDS TERMINATED BY X'09' ESCAPED BY X'5C' LINES TERMINATED BY X'0A' "
              "(event_key, event_type, shop_id, user_id, `timestamp`, order_id, good_id, qty, amount, payload) "
              "SET shard = %s, source_file = %s")
_INSERT = ("INSERT INTO events (event_key, event_type, shop_id, user_id, `timestamp`, order_id, good_id, qty, "
           "amount, payload, shard, source_file) VALUES {} ON DUPLICATE KEY UPDATE id = id")
_CLAIM = ("INSERT INTO loaded_files (source_file, shard, line_count, loaded_count, duplicate_count, checksum, "
          "method) VALUES (%s, %s, 0, 0, 0, '', '') ON DUPLICATE KEY UPDATE source_file = source_file")
# A file sent as one LOAD DATA is claimed with its record complete (its rows must all be stored,
# or the transaction is rolled back): no UPDATE, one statement less per small file.
_CLAIM_RECORDED = ("INSERT INTO loaded_files (source_file, shard, line_count, loaded_count, duplicate_count, "
                   "checksum, method, seconds) VALUES (%s, %s, %s, %s, 0, %s, %s, %s) "
                   "ON DUPLICATE KEY UPDATE source_file = source_file")
_RECORD = ("UPDATE loaded_files SET line_count=%s, loaded_count=%s, duplicate_count=%s, checksum=%s, method=%s, "
           "seconds=%s, loaded_at=CURRENT_TIMESTAMP(3) WHERE source_file=%s")
# Several small files of one claim in ONE transaction (`load_batch`): their claims, each holding
# its whole record, in one INSERT, then all their rows in one LOAD DATA, `source_file` a column
# of the rows (each file's rows carry their own name), then one COMMIT.
_CLAIM_BATCH = ("INSERT INTO loaded_files (source_file, shard, line_count, loaded_count, duplicate_count, "
                "checksum, method, seconds) VALUES {} ON DUPLICATE KEY UPDATE source_file = source_file")
_CLAIM_BATCH_ROW = "(%s, %s, %s, %s, 0, %s, 'load_data', %s)"
_LOAD_BATCH = ("LOAD DATA LOCAL INFILE %s INTO TABLE events CHARACTER SET {charset} "
               "FIELDS TERMINATED BY X'09' ESCAPED BY X'5C' LINES TERMINATED BY X'0A' "
               "(event_key, event_type, shop_id, user_id, `timestamp`, order_id, good_id, qty, amount, payload, "
               "source_file) SET shard = %s")
BATCH_FILES = 64            # files at most in one batch transaction (a claim holds CLAIM_LIMIT, 4 by default)
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
    duplicates: int         # rows skipped because their event was already there
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


# -- checking prepared lines ------------------------------------------------------------------

_I64 = Annotated[int, msgspec.Meta(ge=INT64[0], le=INT64[1])]


class Prepared(msgspec.Struct, gc=False):
    """One prepared line as the worker writes it (app/worker/stage.py `prepared_line`); other
    members are ignored. The payload stays the bytes it was written as."""

    event_key: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    event_type: Annotated[int, msgspec.Meta(ge=min(EVENT_TYPES), le=max(EVENT_TYPES))]
    shop_id: _I64
    user_id: _I64 | None
    timestamp: Annotated[str, msgspec.Meta(min_length=23, max_length=23)]
    shard: int
    order_id: _I64 | None
    good_id: _I64 | None
    qty: Annotated[int, msgspec.Meta(ge=INT32[0], le=INT32[1])] | None
    amount: str | None
    source_file: str
    payload: msgspec.Raw


assert set(EVENT_TYPES) == set(range(min(EVENT_TYPES), max(EVENT_TYPES) + 1)), "event types must be a range"


@lru_cache(maxsize=8)
def _decoder(shard: int) -> Callable[[bytes], list[Prepared]]:
    """`Prepared` lines of one shard: `shard` as a literal, so the decoder refuses another
    shard's line in C (building a decoder takes ~0.1 ms: one per shard, kept; one per file
    would cost a small file more than it saves)."""
    fields = [(f.name, Literal[shard] if f.name == "shard" else f.type) for f in msgspec.structs.fields(Prepared)]
    return msgspec.json.Decoder(msgspec.defstruct("Prepared", fields, gc=False)).decode_lines


_source_of, _shop_of = attrgetter("source_file"), attrgetter("shop_id")
_key_of, _time_of, _amount_of, _payload_of = (attrgetter("event_key"), attrgetter("timestamp"),
                                              attrgetter("amount"), attrgetter("payload"))
_day_of = itemgetter(slice(0, 10))
_not_none = partial(is_not, None)
_LINE_START = b'{"event_key":"'
_NEXT_LINE_START = b"\n" + _LINE_START
_KEY_BYTES = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz:._+/=-"
_AMOUNTS = re.compile(r"(?:-?[0-9]{1,16}(?:\.[0-9]{1,2})?\n)*").fullmatch
_TIME_MARKS = ((4, b"-"), (7, b"-"), (10, b" "), (13, b":"), (16, b":"), (19, b"."))
_known_days: set[str] = set()


def _flags(digits: bytes) -> bytes:
    """A translate table: 1 for each of `digits`, 0 for every other byte."""
    return bytes(int(b in digits) for b in range(256))


# (column of a first digit, the digits that need a look at the second one, its column, the second
# digits that are then wrong): hours 2x past 23, months 1x past 12 and 00, days 00.
_PAIRS = ((11, _flags(b"2"), 12, _flags(b"456789")), (5, _flags(b"1"), 6, _flags(b"3456789")),
          (5, _flags(b"0"), 6, _flags(b"0")), (8, _flags(b"0"), 9, _flags(b"0")))
_LATE_DAY = (_flags(b"2"), _flags(b"9"))   # day 29; days 3x are the other late ones


def _times_ok(stamps: list[str]) -> bool:
    """Every timestamp is `YYYY-MM-DD HH:MM:SS.mmm` and a real time (each is 23 characters, the
    decoder saw to that): checked on the joined text, column by column (a pair of columns as
    two integers of 0/1 bytes: a row wrong in both is a common bit), and the distinct days of
    a block that holds a day past the 28th by the calendar."""
    joined = "".join(stamps)
    if not joined.isascii():
        return False
    text, n = joined.encode(), len(stamps)
    if any(text[at::23] != mark * n for at, mark in _TIME_MARKS):
        return False
    if (len(text.translate(None, b"0123456789")) != 6 * n   # everything else is a digit
            or text[0::23].translate(None, b"123456789")     # year 1000 or later
            or text[14::23].translate(None, b"012345") or text[17::23].translate(None, b"012345")
            or text[11::23].translate(None, b"012") or text[5::23].translate(None, b"01")
            or text[8::23].translate(None, b"0123")):
        return False
    for first, wrong_first, second, wrong_second in _PAIRS:
        if (int.from_bytes(text[first::23].translate(wrong_first))
                & int.from_bytes(text[second::23].translate(wrong_second))):
            return False
    days = text[8::23]
    if b"3" not in days and not (int.from_bytes(days.translate(_LATE_DAY[0]))
                                 & int.from_bytes(text[9::23].translate(_LATE_DAY[1]))):
        return True  # months 01-12 and days 01-28: a real date in every year
    for day in set(map(_day_of, stamps)) - _known_days:
        try:
            date.fromisoformat(day)
        except ValueError:
            return False
        if len(_known_days) > 100_000:
            _known_days.clear()
        _known_days.add(day)
    return True


def _block_rows(block: bytes, lines: int, source_file: str, shard: int, shard_count: int,
                max_depth: int = MAX_JSON_DEPTH) -> tuple[list[Prepared], list[str]] | None:
    """The rows of `lines` prepared lines (each `\\n`-terminated) and their payloads' text, when
    every line is one valid row of this shard and file; None otherwise (the caller then looks
    line by line)."""
    # Every line starts as the worker writes it (so none is blank; another writer's lines are
    # looked at one by one), and one decoded row per line means no line holds two objects.
    if not block.startswith(_LINE_START) or block.count(_NEXT_LINE_START) != lines - 1:
        return None
    try:
        rows = _decoder(shard)(block)
    except (msgspec.MsgspecError, RecursionError):  # the decoder's recursion: nesting in the thousands
        return None
    n = len(rows)
    if (n != lines or set(map(_source_of, rows)) != {source_file}
            or any(shop % shard_count != shard for shop in set(map(_shop_of, rows)))):
        return None
    keys = "".join(map(_key_of, rows))
    if not keys.isascii() or keys.encode().translate(None, _KEY_BYTES) or not _times_ok(list(map(_time_of, rows))):
        return None
    amounts = list(filter(_not_none, map(_amount_of, rows)))
    if amounts:
        joined = "\n".join(amounts) + "\n"
        if joined.count("\n") != len(amounts) or not _AMOUNTS(joined):
            return None
    # The payloads: JSON text holds no NUL, so joining by NUL and splitting again gives them back.
    # A raw tab in JSON is whitespace between tokens (never inside a string): a space means the
    # same, and keeps the TSV's columns.
    # Each payload is an object: the first one starts with `{`, and so does what follows each NUL.
    blob = b"\0".join(map(_payload_of, rows))
    if blob[:1] != b"{" or blob.count(b"\0{") != n - 1 or _too_deep(blob, n, max_depth - 1):
        return None
    if b"\t" in blob:
        blob = blob.replace(b"\t", b" ")
    try:
        payloads = blob.decode().split("\0")
    except UnicodeDecodeError:
        return None
    return rows, payloads


def checked_rows(block: bytes, lines: int, first_line_no: int, source_file: str, shard: int,
                 shard_count: int, max_depth: int = MAX_JSON_DEPTH) -> tuple[list[Prepared], list[str]]:
    """`_block_rows` of a block of whole lines, or, when it declines, the same line by line
    (blank lines skipped): BadLine/WrongShard names the first line that is not a row."""
    got = _block_rows(block, lines, source_file, shard, shard_count, max_depth)
    if got is not None:
        return got
    rows: list[Prepared] = []
    payloads: list[str] = []
    for line_no, line in enumerate(block.split(b"\n"), first_line_no):
        line = line.strip()
        if not line:
            continue
        one = _block_rows(line + b"\n", 1, source_file, shard, shard_count, max_depth)
        if one is None:
            if _too_deep(line, 1, max_depth):
                raise BadLine(line_no, f"nested deeper than {max_depth} levels (MAX_JSON_DEPTH)")
            _explain(line, line_no, source_file, shard, shard_count)
            raise BadLine(line_no, "not a prepared line as the worker writes it (compact JSON starting "
                                   "with {\"event_key\":)")
        rows += one[0]
        payloads += one[1]
    return rows, payloads


def check_line(line: bytes, line_no: int, source_file: str, shard: int, shard_count: int,
               max_depth: int = MAX_JSON_DEPTH) -> Prepared:
    """One prepared line as the sender takes it, or BadLine/WrongShard naming its problem (for
    a caller that holds a single line: the worker's tests ask what the sender will accept)."""
    rows, _ = checked_rows(line.rstrip(b"\r\n") + b"\n", 1, line_no, source_file, shard, shard_count, max_depth)
    if not rows:
        raise BadLine(line_no, "blank line")
    return rows[0]


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _json_depth(text: bytes) -> int:
    """How deep the arrays and objects of JSON text nest (`{"a":[1]}` is 2), brackets inside
    strings not counted; no recursion, so safe on any input."""
    brackets = _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _too_deep(blob: bytes, values: int, max_depth: int) -> bool:
    """Whether one of `values` JSON texts joined in `blob` nests deeper than `max_depth`. A text
    that deep has more than `max_depth` brackets, so when all of them together have fewer than
    one each plus `max_depth`, none does: two counts for the common case."""
    brackets = blob.count(b"{") + blob.count(b"[")
    if brackets - values < max_depth:
        return False
    return any(_json_depth(text) > max_depth for text in blob.split(b"\0")
               if text.count(b"{") + text.count(b"[") > max_depth)


def _opt_int(ev: dict, name: str, line_no: int, bounds=INT64):
    value = ev.get(name)
    if value is None:
        return None
    if type(value) is not int or not bounds[0] <= value <= bounds[1]:
        raise BadLine(line_no, f"{name} must be an integer or null, got {value!r}"[:300])
    return value


def _explain(line: bytes, line_no: int, source_file: str, shard: int, shard_count: int) -> None:
    """Raise BadLine/WrongShard for the first problem of a line the checks refused."""
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
    if type(ts) is not str or len(ts) != 23 or ts[19] != "." or ts[10] != " " or ts < "1000" or not ts.isascii():
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


# -- rendering --------------------------------------------------------------------------------

def tsv(rows: list[Prepared], payloads: list[str]) -> bytes:
    """LOAD DATA's default format: tab-separated, `\\N` for NULL, backslashes escaped (only a
    payload can hold one, or a tab: see `_block_rows`; no field holds a newline)."""
    if any(map(contains, payloads, repeat("\\"))):
        payloads = [p.replace("\\", "\\\\") for p in payloads]
    return "".join([
        f"{r.event_key}\t{r.event_type}\t{r.shop_id}\t{_N if r.user_id is None else r.user_id}\t{r.timestamp}\t"
        f"{_N if r.order_id is None else r.order_id}\t{_N if r.good_id is None else r.good_id}\t"
        f"{_N if r.qty is None else r.qty}\t{_N if r.amount is None else r.amount}\t{p}\n"
        for r, p in zip(rows, payloads)]).encode()


def sql_values(rows: list[Prepared], payloads: list[str], escape: Callable[[str], str], tail: str) -> str:
    """`(...),(...)` for the INSERT: keys and times are checked to hold only safe characters,
    amounts are decimal numbers, and the payload is a string literal made by `escape` (the
    connection's own escaping, which knows the session's NO_BACKSLASH_ESCAPES)."""
    return ",".join([
        f"('{r.event_key}',{r.event_type},{r.shop_id},{'NULL' if r.user_id is None else r.user_id},"
        f"'{r.timestamp}',{'NULL' if r.order_id is None else r.order_id},"
        f"{'NULL' if r.good_id is None else r.good_id},{'NULL' if r.qty is None else r.qty},"
        f"{'NULL' if r.amount is None else r.amount},{escape(p)},{tail})"
        for r, p in zip(rows, payloads)])


# -- reading ----------------------------------------------------------------------------------

class _Reading:
    """What the reading learns about the whole file, read by the loader at the end."""

    def __init__(self):
        self.rows = 0
        self.hasher = hashlib.sha1()  # `sha1sum <prepared file>` gives the same: an operator can compare


def _blocks(f, hasher, first: int, most: int, max_bytes: int,
            max_line: int) -> Iterator[tuple[bytes, int, int]]:
    """The file as blocks of whole lines: (lines, how many, the first one's number), about
    `first` lines in the first block and twice as many in each next one up to about `most`,
    and at most about `max_bytes` (each block's size is estimated from the lines seen so far).
    Reads are at most `max_line` bytes, so only a line that crosses reads can be longer: its
    length is followed across them, and a line over `max_line` is refused (BadLine) once that
    many bytes of it were read, never held whole. A UTF-8 byte-order mark at the start is
    skipped (and hashed); a last line without its newline gets one."""
    pending, line_no, want, per_line, eof = b"", 1, first, 400, False
    head = f.read(len(BOM))
    hasher.update(head)
    if head != BOM:
        pending = head
    while True:
        target = min(max(want * per_line, 1 << 12), max_bytes)
        parts, size = [pending], len(pending)
        tail = len(pending) - pending.rfind(b"\n") - 1  # the unfinished line's length so far
        ended = tail < len(pending)                     # a line ends in what is here
        while not eof and (size < target or not ended):
            data = f.read(min(max_line, max(target - size, 1 << 12)))
            if not data:
                eof = True
                break
            hasher.update(data)
            parts.append(data)
            size += len(data)
            first_end = data.find(b"\n")
            tail += len(data) if first_end < 0 else first_end
            if tail > max_line:
                number = line_no + b"".join(parts[:-1]).count(b"\n")
                raise BadLine(number, f"longer than {max_line} bytes (MAX_LINE_BYTES)")
            if first_end >= 0:
                ended = True
                tail = len(data) - data.rfind(b"\n") - 1
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        if not data:
            return
        end = data.rfind(b"\n") + 1
        if end:
            piece, pending = (data[:end], data[end:]) if end < len(data) else (data, b"")
        else:  # the end of the file: its last line, without a newline
            piece, pending = data + b"\n", b""
        count = piece.count(b"\n")
        yield piece, count, line_no
        line_no += count
        per_line = max(len(piece) // count, 16)
        want = min(want * 2, most)


def _converted(blocks, reading: _Reading, render, source_file: str, shard: int, shard_count: int,
               max_depth: int) -> Iterator[tuple[object, int]]:
    for block, lines, first_line_no in blocks:
        rows, payloads = checked_rows(block, lines, first_line_no, source_file, shard, shard_count, max_depth)
        if rows:
            reading.rows += len(rows)
            yield render(rows, payloads), len(rows)


def chunk_name(source_file: str, index: int) -> str:
    """The name a chunk's LOAD DATA statement gives its (in-memory) file."""
    return f"{source_file}.chunk-{index:05d}.tsv"


class _FallBack(Exception):
    """LOAD DATA could not prove every row went in exactly as sent: redo the file with INSERT."""

    def __init__(self, why: str, refused: bool = False):
        super().__init__(why)
        self.refused = refused


class _AlreadyLoaded(Exception):
    """The claim found the file's row in loaded_files: it was loaded before (or by a replica)."""


class _Claim:
    """The file's row in `loaded_files`, inserted first in the load's transaction. On a
    connection with multi_statements it goes in the same round trip as the first LOAD DATA
    chunk (`db.load_local_after`); otherwise, and before an INSERT or when there is no chunk,
    on its own. Either way no row of the file reaches the server before the claim. For a file
    of one LOAD DATA the claim is the whole record (`recorded`)."""

    def __init__(self, cur, source_file: str, shard: int, method: str, started: float):
        self.cur = cur
        self.sql, self.args = _CLAIM, (source_file, shard)
        self.method, self.started = method, started
        self.sent = False
        self.recorded = False
        self.along = _multi_statements(cur.connection)

    def record(self, rows: int, checksum: str) -> None:
        """Claim with the file's record complete: all its `rows` go in one statement that
        stores every one of them, or the transaction is rolled back."""
        self.sql = _CLAIM_RECORDED
        self.args = (*self.args[:2], rows, rows, checksum, self.method, round(time.monotonic() - self.started, 3))
        self.recorded = True

    def alone(self) -> None:
        """Claim now; _AlreadyLoaded when the row is there."""
        self.sent = True
        if self.cur.execute(self.sql, self.args) == 0:
            raise _AlreadyLoaded()

    def load_with(self, sql: str, args, name: str, data: bytes) -> int:
        """The LOAD DATA of one chunk, claiming first if that is still to do: the rows stored."""
        if self.sent:
            return db.load_local(self.cur, sql, args, name, data)
        if not self.along:
            self.alone()
            return db.load_local(self.cur, sql, args, name, data)
        self.sent = True
        claimed, stored = db.load_local_after(self.cur, self.sql, self.args, sql, args, name, data)
        if not claimed:
            raise _AlreadyLoaded()
        return stored


def _multi_statements(conn) -> bool:
    return bool(conn.client_flag & CLIENT.MULTI_STATEMENTS)


def file_charset(conn) -> str:
    """The character set LOAD DATA reads the sender's TSV in. On MariaDB `binary`: every byte
    goes to its column as it is, without the server decoding and re-checking UTF-8 (~0.4 µs of
    server CPU a row, 6%: docs/performance.md); the sender has checked that keys and names are
    ASCII and payloads valid UTF-8, so the stored text is the same. MySQL refuses a binary
    string for a JSON column (error 3144), so elsewhere the TSV is read as `utf8mb4`."""
    return "binary" if _mariadb(conn) else "utf8mb4"


def _mariadb(conn) -> bool:
    return "mariadb" in conn.get_server_info().lower()


# MariaDB's `JSON` is LONGTEXT with CHECK (json_valid(payload)): the server parses every payload
# again. Every payload the LOAD sends has passed the sender's own JSON parse (msgspec's strict
# decoder of the block, or orjson line by line; both refuse text json_valid accepts, such as
# `1.`, never the reverse: docs/sender.md), UTF-8 and nesting checks, so the statement runs
# without CHECK constraints (~0.5 us of server CPU a row, 6% of the load: docs/performance.md).
SKIP_CHECKS = "SET STATEMENT check_constraint_checks = 0 FOR "


def load_statement(template: str, conn) -> str:
    """A LOAD DATA template (`_LOAD_DATA`, `_LOAD_BATCH`) as this server runs it: on MariaDB
    the TSV read as `binary` and the table's CHECK constraints (only JSON's json_valid) not
    evaluated again, for this one statement (`SET STATEMENT ... FOR`). MySQL has neither
    `SET STATEMENT` nor a CHECK behind JSON (its JSON type parses the text itself): there the
    statement is the template with `utf8mb4`."""
    if _mariadb(conn):
        return SKIP_CHECKS + template.format(charset="binary")
    return template.format(charset="utf8mb4")


def connect(url: MySQLURL, **options):
    """A connection as the sender loads with: autocommit off, LOAD DATA LOCAL from memory
    only, and several statements per round trip (the claim with the first chunk, the record
    with the COMMIT)."""
    return db.connect(url, autocommit=False, local_infile=True, multi_statements=True, **options)


def _warnings(cur) -> str:
    cur.execute("SHOW WARNINGS LIMIT 3")
    return "; ".join(f"{r[1]} {r[2]}" for r in cur.fetchall())


def _by_load_data(cur, chunks, claim: _Claim, source_file: str, shard: int, check) -> int:
    loaded = 0
    sql = load_statement(_LOAD_DATA, cur.connection)
    for index, (data, count) in enumerate(chunks):
        if check:
            check()
        name = chunk_name(source_file, index)
        try:
            stored = claim.load_with(sql, (name, shard, source_file), name, data)
        except pymysql.err.MySQLError as exc:
            if exc.args and exc.args[0] in db.LOCAL_INFILE_REFUSED:
                raise _FallBack(f"LOAD DATA LOCAL INFILE refused: {exc.args[-1]}", refused=True) from None
            raise
        except AttributeError as exc:
            # PyMySQL, when the server goes away while it sends LOCAL data, fails on its
            # closed socket with AttributeError instead of reporting the lost connection.
            if cur.connection is not None and cur.connection.open:
                raise
            raise pymysql.err.OperationalError(
                2013, f"connection lost during LOAD DATA LOCAL ({exc})") from None
        if cur.warning_count or stored != count:
            raise _FallBack(f"{name}: {stored} of {count} rows stored, {cur.warning_count} warnings "
                            f"({_warnings(cur)})")
        loaded += stored
    return loaded


def _by_insert(cur, statements, claim: _Claim, source_file: str, check) -> int:
    loaded = 0
    for sql, _count in statements:
        if check:
            check()
        if not claim.sent:
            claim.alone()
        loaded += cur.execute(sql)
        if cur.warning_count:
            raise RowsRefused(f"the server warned while storing {source_file}: {_warnings(cur)}")
    return loaded


def _rollback(conn) -> None:
    try:
        conn.rollback()
    except Exception:  # the connection is gone: the server rolls back on its own
        pass


def _recorded(cur, source_file: str, started: float) -> LoadResult:
    """What loaded_files says of a file loaded before (the transaction is then rolled back)."""
    cur.execute(_RECORDED, (source_file,))
    lines, loaded, duplicates, checksum, used = cur.fetchone()
    cur.connection.rollback()
    return LoadResult(source_file, lines, loaded, duplicates, used, time.monotonic() - started, checksum,
                      already_loaded=True)


def _record_and_commit(cur, args: tuple) -> None:
    """The file's counts and checksum into its row, and COMMIT: one round trip where the
    connection takes several statements."""
    if not _multi_statements(cur.connection):
        cur.execute(_RECORD, args)
        cur.connection.commit()
        return
    cur.execute(cur.mogrify(_RECORD, args) + ";\nCOMMIT")
    if not cur.nextset():
        raise pymysql.err.InterfaceError(2014, "no result for the COMMIT sent after the record")


def load_file(conn, path: Path, source_file: str, shard: int, shard_count: int, *,
              method: str = "load_data", chunk_rows: int = 10_000, root: Path | None = None,
              check: Callable[[], None] | None = None, max_line_bytes: int = MAX_LINE_BYTES,
              max_json_depth: int = MAX_JSON_DEPTH) -> LoadResult:
    """Load `path` (the prepared file of `source_file`) into the shard `conn` is connected to
    (`connect`: autocommit off, LOAD DATA LOCAL, several statements a round trip; a connection
    without the last works too, at two more round trips a file), all of it or nothing, once.
    `path` is opened without following links below `root` (app/safefiles.py).

    Raises PreparedMissing, safefiles.Refused (a link, FIFO or device at `path`: nothing
    opened), BadLine/WrongShard (nothing loaded), RowsRefused, a pymysql error
    when the server fails (nothing loaded, or everything if the commit went through: the next
    call tells which), or whatever `check` raises; it is called before each chunk, never after
    the last one, so a stop either rolls back or lets the commit finish. A file up to
    INLINE_BYTES is read in this thread (and, with `load_data`, sent as one chunk when it has at
    most `chunk_rows` rows); a bigger one is read and checked by a thread one chunk ahead of the
    server.

    What one small file costs the server with `load_data`: two round trips, the claim (holding
    the file's whole record) with the LOAD DATA, then the COMMIT (one log flush).
    """
    if method not in METHODS:
        raise ValueError(f"unknown load method {method!r}; expected one of {METHODS}")
    started = time.monotonic()
    try:
        f = safefiles.open_read(path, safefiles.under(path, root))
    except FileNotFoundError:
        f = None
    plan = [method] if method == "insert" else [method, "insert"]
    refused = False
    try:
        with conn.cursor() as cur:
            for attempt in plan:
                if conn.get_autocommit():
                    conn.begin()  # otherwise the claim below opens the transaction
                used = attempt if attempt == method else f"{method}>{attempt}"
                claim = _Claim(cur, source_file, shard, used, started)
                try:
                    if f is None:
                        claim.alone()
                        conn.rollback()
                        raise PreparedMissing(f"prepared file {path} is missing")
                    f.seek(0)
                    reading = _Reading()
                    try:
                        loaded = _send(cur, f, reading, attempt, claim, source_file, shard, shard_count,
                                       chunk_rows, check, max_line_bytes, max_json_depth)
                        if not claim.sent:  # a file without a row
                            claim.alone()
                    except _FallBack as why:
                        conn.rollback()
                        refused = refused or why.refused
                        log.warning("%s: %s; loading it again with INSERT", source_file, why)
                        continue
                    except BadLine:
                        if not claim.sent:  # found before anything was sent: loaded before, or not?
                            claim.alone()
                        raise
                    checksum = reading.hasher.hexdigest()
                    if claim.recorded:
                        conn.commit()
                    else:
                        _record_and_commit(cur, (reading.rows, loaded, reading.rows - loaded, checksum, used,
                                                 round(time.monotonic() - started, 3), source_file))
                    return LoadResult(source_file, reading.rows, loaded, reading.rows - loaded, used,
                                      time.monotonic() - started, checksum, local_infile_refused=refused)
                except _AlreadyLoaded:
                    return _recorded(cur, source_file, started)
                except BaseException:
                    _rollback(conn)
                    raise
        raise AssertionError("unreachable: the INSERT method never falls back")
    finally:
        if f is not None:
            f.close()


def _send(cur, f, reading: _Reading, method: str, claim: _Claim, source_file: str, shard: int, shard_count: int,
          chunk_rows: int, check, max_line: int, max_depth: int) -> int:
    """Read, check, render and send the whole file by `method` (claiming it first); the rows
    stored."""
    inline = os.fstat(f.fileno()).st_size <= INLINE_BYTES
    if method == "load_data":
        most, max_bytes, render = chunk_rows, CHUNK_BYTES, tsv
    else:
        most, max_bytes = INSERT_ROWS, INSERT_BYTES
        escape = cur.connection.escape
        tail = f"{shard},{escape(source_file)}"

        def render(rows, payloads):
            return _INSERT.format(sql_values(rows, payloads, escape, tail))
    blocks = _blocks(f, reading.hasher, most if inline else min(FIRST_BATCH, most), most, max_bytes, max_line)
    chunks = _converted(blocks, reading, render, source_file, shard, shard_count, max_depth)
    if inline:
        if method == "load_data":
            chunks = list(chunks)  # at most INLINE_BYTES of lines, all checked before anything is sent
            if len(chunks) == 1:
                claim.record(reading.rows, reading.hasher.hexdigest())
        return _run(method, cur, chunks, claim, source_file, shard, check)
    # The reading thread is joined when the block ends, so nothing reads the file after this.
    with ReadAhead(chunks, depth=1 if method == "load_data" else 4) as ahead:
        return _run(method, cur, ahead, claim, source_file, shard, check)


def _run(method: str, cur, chunks, claim: _Claim, source_file: str, shard: int, check) -> int:
    if method == "load_data":
        return _by_load_data(cur, chunks, claim, source_file, shard, check)
    return _by_insert(cur, chunks, claim, source_file, check)


# -- several small files in one transaction ----------------------------------------------------

@dataclass
class _Ready:
    """A small file read, checked and rendered for a batch: its rows as TSV with its name as the
    last column."""
    source_file: str
    data: bytes
    rows: int
    checksum: str
    seconds: float


def _ready(path: Path, source_file: str, shard: int, shard_count: int, chunk_rows: int, root: Path | None,
           max_line: int, max_depth: int) -> _Ready | None:
    """The file as one batch member, or None for any file `load_file` must take on its own
    (missing, refused, over BATCH_FILE_BYTES or `chunk_rows`, empty, a bad line, a name that is not
    a key's characters): that path then decides and reports it exactly as it always did."""
    if not _KEY(source_file):  # it goes into the TSV as it is: no tab, newline or backslash
        return None
    started = time.monotonic()
    try:
        f = safefiles.open_read(path, safefiles.under(path, root))
    except (OSError, safefiles.Refused):
        return None
    with f:
        if os.fstat(f.fileno()).st_size > BATCH_FILE_BYTES:
            return None
        reading = _Reading()
        try:
            chunks = list(_converted(_blocks(f, reading.hasher, chunk_rows, chunk_rows, CHUNK_BYTES, max_line),
                                     reading, tsv, source_file, shard, shard_count, max_depth))
        except BadLine:
            return None
    if len(chunks) != 1:
        return None
    data, rows = chunks[0]
    # No field holds a newline (see `tsv`): each one ends a row, which takes the file's name.
    return _Ready(source_file, data.replace(b"\n", b"\t" + source_file.encode() + b"\n"), rows,
                  reading.hasher.hexdigest(), time.monotonic() - started)


def load_batch(conn, files: list[tuple[Path, str]], shard: int, shard_count: int, *, chunk_rows: int = 10_000,
               root: Path | None = None, check: Callable[[], None] | None = None,
               max_line_bytes: int = MAX_LINE_BYTES, max_json_depth: int = MAX_JSON_DEPTH) -> list[LoadResult | None]:
    """Load several small prepared files `(path, source_file)` of one shard (a claim's) in ONE
    transaction each batch: their claims with complete records in one INSERT and all their rows
    in one LOAD DATA (one round trip), then one COMMIT, where one transaction a file cost two
    round trips, three statements and a log flush each. A LoadResult per file loaded so; None
    for a file to load with `load_file` (not a small valid file; or its batch was rolled back
    because one of its files was loaded before, or the server did not store every row exactly
    as sent: every file of it, then). Exactly once as `load_file`: nothing is sent before the
    claims, a claim found already there rolls the batch back, a cut anywhere leaves nothing.
    Files are claimed in name order, so two loaders of overlapping batches wait on each other
    (a deadlock the server reports anyway is a server fault: raised, nothing stored).
    `check` is called before each batch. Raises what `load_file` raises for a server fault."""
    results: list[LoadResult | None] = [None] * len(files)
    ready: list[tuple[int, _Ready]] = []
    names: set[str] = set()
    for index, (path, source_file) in enumerate(files):
        if source_file in names:
            continue
        names.add(source_file)
        got = _ready(path, source_file, shard, shard_count, chunk_rows, root, max_line_bytes, max_json_depth)
        if got is not None:
            ready.append((index, got))
    ready.sort(key=lambda item: item[1].source_file)
    batches: list[list[tuple[int, _Ready]]] = []
    rows = size = 0
    for item in ready:
        r = item[1]
        if (not batches or len(batches[-1]) >= BATCH_FILES or rows + r.rows > chunk_rows
                or size + len(r.data) > CHUNK_BYTES):
            batches.append([])
            rows = size = 0
        batches[-1].append(item)
        rows, size = rows + r.rows, size + len(r.data)
    for batch in batches:
        if check:
            check()
        if _load_together(conn, [r for _, r in batch], shard):
            for index, r in batch:
                results[index] = LoadResult(r.source_file, r.rows, r.rows, 0, "load_data", r.seconds, r.checksum)
    return results


def _load_together(conn, ready: list[_Ready], shard: int) -> bool:
    """The claims (whole records) and one LOAD DATA of `ready`, then COMMIT: True. False when
    a claim found its file loaded before, the server refused LOAD DATA LOCAL, or it did not
    store every row without a warning: rolled back, nothing stored."""
    claim = _CLAIM_BATCH.format(", ".join([_CLAIM_BATCH_ROW] * len(ready)))
    args = [v for r in ready for v in (r.source_file, shard, r.rows, r.rows, r.checksum, round(r.seconds, 3))]
    rows = sum(r.rows for r in ready)
    name = f"{ready[0].source_file}.batch-{len(ready):03d}.tsv"
    load = load_statement(_LOAD_BATCH, conn)
    data = b"".join(r.data for r in ready)
    try:
        with conn.cursor() as cur:
            if conn.get_autocommit():
                conn.begin()
            try:
                if _multi_statements(conn):
                    claimed, stored = db.load_local_after(cur, claim, args, load, (name, shard), name, data)
                else:
                    claimed = cur.execute(claim, args)
                    stored = db.load_local(cur, load, (name, shard), name, data) if claimed == len(ready) else 0
            except pymysql.err.MySQLError as exc:
                if exc.args and exc.args[0] in db.LOCAL_INFILE_REFUSED:
                    conn.rollback()
                    return False
                raise
            except AttributeError as exc:  # as in _by_load_data: PyMySQL on a socket the server closed
                if cur.connection is not None and cur.connection.open:
                    raise
                raise pymysql.err.OperationalError(
                    2013, f"connection lost during LOAD DATA LOCAL ({exc})") from None
            if claimed != len(ready) or stored != rows or cur.warning_count:
                log.info("%d files loaded one by one: %d of %d claimed, %d of %d rows stored, %d warnings",
                         len(ready), claimed, len(ready), stored, rows, cur.warning_count)
                conn.rollback()
                return False
            conn.commit()
            return True
    except BaseException:
        _rollback(conn)
        raise
