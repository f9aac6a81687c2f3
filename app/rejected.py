"""Rejected lines, durably: the `rejected_lines` table of the pipeline database.

A stage's rejected file lives in its own folder, which a stop empties (the contract says so);
the operator's record of a rejected line (where, why, the line itself) must outlive that. So
the stage that rejects tees its rejected file into this table: the records are buffered and
written in bulk (multi-row INSERTs, a few hundred rows a statement) while the file goes
through, and the rest before the task is reported done, so a done task's rejected lines are all
in the table. A re-run writes the same rows again; the unique key (file, stage, shard, line)
keeps the first, so each rejected line is there exactly once. The per-reason counts the stages
report are untouched.

What a row keeps of the line is bounded: its first LINE_KEEP_BYTES bytes (`line_truncated`
when cut), plus the whole line's length. A line over MAX_LINE_BYTES keeps the prefix the stage
kept (app/lines.py PREFIX_BYTES).
"""
from __future__ import annotations

import base64
import re
import threading
import time
from typing import Callable

import orjson

from . import db
from .config import MySQLURL

# The table's migrations: db/migrations/rejected/ (applied by `db.migrate`, by every writer
# and by pipeline-apid before it reads).
SCHEMA = "rejected"
LINE_KEEP_BYTES = 65536     # what a row keeps of a long (but not too_large) line
NO_SHARD = -1               # the splitter rejects a line before it has a shard
FLUSH_ROWS = 500            # rows buffered before a bulk write
FLUSH_BYTES = 4 << 20       # ... or bytes of lines
# app/lines.py TooLarge.detail: "<size> bytes, over the limit of <limit> (MAX_LINE_BYTES)"
_TOO_LARGE_SIZE = re.compile(r"^(\d+) bytes, over the limit")

INSERT = ("INSERT INTO rejected_lines (filename, stage, shard, line_no, reason, detail, line_bytes,"
          " line_truncated, line) VALUES ")
# A re-run's row for a line already kept is an explicit no-op (not IGNORE, which would also
# turn a real error, e.g. a value out of range, into a warning).
KEEP_FIRST = " ON DUPLICATE KEY UPDATE id = id"

# Retention (REJECTED_WINDOW, app/config.py): rows are deleted from the oldest id on, a range of
# PRUNE_IDS ids a statement, while the range holds only rows older than the window (ids grow
# with created_at); a call stops at the first range with a younger row, or after
# PRUNE_STATEMENTS. Any number of writers may prune at once: each DELETE is idempotent.
PRUNE_EVERY = 300.0
PRUNE_IDS = 5000
PRUNE_STATEMENTS = 20
OLDEST = "SELECT MIN(id) FROM rejected_lines"
PRUNE = "DELETE FROM rejected_lines WHERE id < %s AND created_at < NOW(3) - INTERVAL %s SECOND"
COLUMNS = "id, filename, stage, shard, line_no, reason, detail, line_bytes, line_truncated, line, created_at"


def _row_of(record: bytes, filename: str, stage: str, shard: int) -> tuple:
    """A stage's rejected-file record (one JSON object, app/splitter/stage.py and
    app/worker/stage.py) as a row. The line's bytes come back exactly: the splitter adds
    `line_base64` for a line that is not UTF-8, and the worker only sees lines the splitter
    found to be UTF-8."""
    r = orjson.loads(record)
    text = r.get("line") or ""
    raw = base64.b64decode(r["line_base64"]) if "line_base64" in r else text.encode("utf-8")
    detail = r.get("detail")
    size = len(raw)
    truncated = bool(r.get("line_truncated"))
    if truncated and detail and (m := _TOO_LARGE_SIZE.match(detail)):
        size = int(m.group(1))
    if len(raw) > LINE_KEEP_BYTES:
        raw, truncated = raw[:LINE_KEEP_BYTES], True
    return (r.get("source_file") or filename, stage, shard, int(r["line_no"]), r["reason"],
            None if detail is None else detail[:1000], size, int(truncated), raw)


class RejectedWriter:
    """One process's writer: its own connection to the pipeline database (the schema brought up
    to date when it opens). Writes take turns: stages running as threads of one process (the
    tests run both shards' workers so) share it, and one connection cannot serve two at once."""

    def __init__(self, url: MySQLURL):
        self.url = url
        self._conn = db.Reconnecting(url, check_after=30.0, on_open=lambda conn: db.migrate(conn, SCHEMA))
        self._pruned_at: float | None = None
        self._lock = threading.Lock()
        self._schema_ready = False

    def prune_due(self, now: float | None = None, every: float = PRUNE_EVERY) -> bool:
        now = time.monotonic() if now is None else now
        return self._pruned_at is None or now - self._pruned_at >= every

    def prune(self, window: float) -> int:
        """Delete the rows older than `window` seconds, oldest first, in bounded statements
        (module constants above); rows deleted. A database error raises and drops the connection."""
        self._pruned_at = time.monotonic()
        deleted = 0
        with self._lock:
            try:
                with self._conn.get().cursor() as cur:
                    cur.execute(OLDEST)
                    (low,) = cur.fetchone()
                    for _ in range(PRUNE_STATEMENTS):
                        if low is None:
                            break
                        deleted += cur.execute(PRUNE, (low + PRUNE_IDS, float(window)))
                        cur.execute(OLDEST)
                        (after,) = cur.fetchone()
                        if after is not None and after < low + PRUNE_IDS:
                            break   # the range kept a row within the window: so do all after it
                        low = after
            except BaseException:
                self._conn.discard()
                raise
        return deleted

    def ensure_schema(self) -> None:
        """The table brought up to date (by opening this writer's connection), for a caller
        that writes rows on a connection of its own (`insert_sql`); once per writer."""
        if not self._schema_ready:
            with self._lock:
                try:
                    self._conn.get()
                except BaseException:
                    self._conn.discard()
                    raise
            self._schema_ready = True

    def write(self, rows: list[tuple]) -> int:
        """Insert the rows in bulk; rows already there are left as they are. A database error
        raises (the caller's task is retried) and drops the connection."""
        if not rows:
            return 0
        with self._lock:
            try:
                with self._conn.get().cursor() as cur:
                    return db.insert_rows(cur, INSERT, rows, KEEP_FIRST, max_bytes=1 << 20)
            except BaseException:
                self._conn.discard()
                raise

    def tee(self, write: Callable[[bytes], object], filename: str, stage: str,
            shard: int | None) -> "RejectedTee":
        return RejectedTee(self, write, filename, stage, NO_SHARD if shard is None else shard)

    def close(self) -> None:
        self._conn.discard()


class RejectedTee:
    """Stands where a stage writes its rejected file's records: passes each on to the file and
    buffers it as a row; `flush()` writes what is buffered (call it before reporting done)."""

    def __init__(self, writer: RejectedWriter, write: Callable[[bytes], object], filename: str, stage: str,
                 shard: int):
        self.writer = writer
        self.file_write = write
        self.filename, self.stage, self.shard = filename, str(stage), shard
        self.rows: list[tuple] = []
        self.size = 0
        self.written = 0
        # rows kept for `take` whatever their number: their caller writes them in a transaction
        # still open, and none may be in the table before it commits
        self.deferred = False

    def write(self, record: bytes) -> None:
        self.file_write(record)
        row = _row_of(record, self.filename, self.stage, self.shard)
        self.rows.append(row)
        self.size += len(row[-1])
        if not self.deferred and (len(self.rows) >= FLUSH_ROWS or self.size >= FLUSH_BYTES):
            self.flush()

    __call__ = write

    def flush(self) -> None:
        rows, self.rows, self.size = self.rows, [], 0
        self.writer.write(rows)
        self.written += len(rows)

    def take(self) -> list[tuple]:
        """The buffered rows, for a caller that writes them itself (`insert_sql`) in a
        transaction it sends anyway, instead of `flush`'s round trip."""
        rows, self.rows, self.size = self.rows, [], 0
        self.written += len(rows)
        return rows


def insert_sql(conn, rows: list[tuple]) -> list[str]:
    """The statements that write `rows` as `RejectedWriter.write` does, rendered for `conn` (a
    connection to the same database, its writer's `ensure_schema` called)."""
    return db.insert_statements(conn, INSERT, rows, KEEP_FIRST, max_bytes=1 << 20)


_writers: dict[MySQLURL, RejectedWriter] = {}
_writers_lock = threading.Lock()


def writer(url: MySQLURL) -> RejectedWriter:
    """The process's writer for this database (stages call it at their call site)."""
    with _writers_lock:
        w = _writers.get(url)
        if w is None:
            w = _writers[url] = RejectedWriter(url)
        return w


# -- reading (pipeline-apid, the export) ----------------------------------------------------------

def listing_sql(filename: str | None, reason: str | None, stage: str | None, shard: int | None,
                after: int | None, limit: int) -> tuple[str, list]:
    """A page of rows in id order (keyset: `after` is the last id of the previous page), by
    file, reason, stage and shard when given. Each filter is a parameter; the index follows
    the most selective filter given."""
    where, args = [], []
    for column, value in (("filename", filename), ("reason", reason), ("stage", stage), ("shard", shard)):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    if after is not None:
        where.append("id > %s")
        args.append(after)
    index = "ix_rejected_file" if filename is not None else "ix_rejected_reason" if reason is not None else "PRIMARY"
    sql = (f"SELECT {COLUMNS} FROM rejected_lines FORCE INDEX ({index})"
           f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id LIMIT %s")
    return sql, [*args, limit]


def as_json(row: dict) -> dict:
    """A row for the API: the line as text when it is UTF-8, else also as base64."""
    raw = bytes(row["line"])
    item = {k: row[k] for k in ("id", "filename", "stage", "line_no", "reason", "detail", "line_bytes")}
    item["shard"] = None if row["shard"] == NO_SHARD else row["shard"]
    item["line_truncated"] = bool(row["line_truncated"])
    try:
        item["line"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        item["line"] = raw.decode("utf-8", "replace")
        item["line_base64"] = base64.b64encode(raw).decode("ascii")
    created = row.get("created_at")
    item["created_at"] = None if created is None else created.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return item


def line_bytes_of(item: dict) -> bytes:
    """The line an API item carries, as bytes."""
    if "line_base64" in item:
        return base64.b64decode(item["line_base64"])
    return item["line"].encode("utf-8")
