"""The shard worker's persistent state in the pipeline database: seen keys, stock, shop
status, held returns, the shard's event clock and each file's recorded decisions.

Only one worker process works a shard at a time (a named lock, `lock_shard`); balances are
shared between shards and live in `ledger.py`. The statements a batch needs are built here and
run in the batch's transaction, so state and decisions commit together; expiring holds while
idle and pruning have transactions of their own.
"""
from __future__ import annotations

import heapq
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import pymysql

from .. import db
from ..config import MySQLURL
from ..events import TIME_FORMAT
from .rules import HELD, ORPHAN_RETURN, Event, add_seconds, minute_of

# The worker's tables' migrations: db/migrations/worker/ (applied by `db.migrate`).
SCHEMA = "worker"
TIME = TIME_FORMAT
# What packed reads (`Ledger.lock_sql`) may return in one value: far above a batch's users.
GROUP_CONCAT_MAX = 1 << 30
# A connection idle this long is pinged before its next use; one used more recently is not (a
# file's first statement finds a dead one, and the task is handed back and retried): a ping was
# one of a 500-event file's eight round trips.
PING_AFTER = 5.0
# Dedup keys whose minute is this many minutes before the shard clock move to worker_seen_sealed
# (db/migrations/worker/0004; packed since 0005): later keys of such a minute are rare (a late or
# duplicate event).
SEAL_MINUTES = 2
NOTHING_SEALED = -(1 << 31)
# A sealed minute's keys are packed by part (the hash's top byte): `hashes` holds each key's
# hash as 8 bytes, big-endian (db/migrations/worker/0005).
_HASHES = struct.Struct(">q")
# The keys of worker_seen below a minute, packed into worker_seen_sealed (`seal`); a part already
# there (late keys of a sealed minute) gets the new ones appended. The connection's
# group_concat_max_len (GROUP_CONCAT_MAX) holds ~130M keys of a part; past it a value would be cut
# with a warning, which `seal` refuses.
SEAL_SQL = ("INSERT INTO worker_seen_sealed (shard, bucket, part, hashes) SELECT p.shard, p.bucket, p.part, p.packed "
            "FROM (SELECT shard, bucket, hash >> 56 AS part, "
            "GROUP_CONCAT(UNHEX(LPAD(HEX(hash), 16, '0')) ORDER BY hash SEPARATOR '') AS packed FROM worker_seen "
            "WHERE shard=%s AND bucket < %s GROUP BY shard, bucket, hash >> 56) p ORDER BY p.bucket, p.part "
            "ON DUPLICATE KEY UPDATE hashes=CONCAT(worker_seen_sealed.hashes, p.packed)")
# worker_seen is a ring (db/migrations/worker/0008): shards 0 to SEEN_RING_SHARDS-1 have
# SEEN_RING partitions each, a minute's keys in `s<shard>m<abs(minute) % SEEN_RING>`, so a sealing
# pass empties a partition that holds no minute still unsealed by TRUNCATE PARTITION (no row
# deleted, nothing for InnoDB's purge) and deletes only the sealed keys of partitions that also
# hold unsealed minutes. Other shards' keys are deleted, as before 0008.
SEEN_RING = 8
SEEN_RING_SHARDS = 4
# seconds a TRUNCATE PARTITION waits for the other workers' open transactions on worker_seen
# (its metadata lock); then the partitions' keys are deleted instead
TRUNCATE_LOCK_WAIT = 10
_SEEN_RING_SQL = ("SELECT COUNT(*) FROM information_schema.partitions WHERE table_schema=DATABASE() "
                  "AND table_name='worker_seen' AND partition_name LIKE 's%m%'")


def seen_partition(shard: int, slot: int) -> str:
    return f"s{shard:d}m{slot:d}"


def ring_slots(first: int, last: int) -> set[int]:
    """The ring's slots (partitions of a shard) of the minutes first..last (none if last < first),
    as the partitioning expression places them: MOD(ABS(bucket), SEEN_RING)."""
    if last - first + 1 >= SEEN_RING:
        return set(range(SEEN_RING))
    return {abs(m) % SEEN_RING for m in range(first, last + 1)}


# A record's codes (one byte a line, each below 255: app/worker/rules.py CODE) are stored
# compressed when the batch is longer than this, behind a 255 byte that no raw code list starts
# with: a 10,000-line batch's codes took a 16 KiB page of their own, ~1.5 KiB compressed.
PACK_CODES_FROM = 64
_PACKED_CODES = b"\xff"


def pack_codes(codes: bytes) -> bytes:
    return _PACKED_CODES + zlib.compress(codes, 1) if len(codes) >= PACK_CODES_FROM else codes


def unpack_codes(stored: bytes, count: int) -> bytes:
    """A record's codes as `pack_codes` stored them (raw, as before, or compressed), refused
    unless there is one a line."""
    if stored[:1] == _PACKED_CODES:
        unpacker = zlib.decompressobj()
        codes = unpacker.decompress(stored[1:], count + 1)
        if not unpacker.eof:
            raise ValueError(f"packed codes of a {count}-line record do not end where they should")
    else:
        codes = stored
    if len(codes) != count:
        raise ValueError(f"a {count}-line record has {len(codes)} codes")
    return codes


def time_text(value: datetime | None) -> str | None:
    return None if value is None else value.strftime(TIME)[:-3]


class SeenConflict(Exception):
    """A dedup key this batch took for new was already recorded: decide it again, looking
    every key up."""


class Recent:
    """Keys (or orders) this process committed lately, in two generations of at most `limit`
    each. A duplicate usually repeats a recent event, so a batch looks up only the keys found
    here, takes the others for new, and lets the insert's affected-row count prove it."""

    def __init__(self, limit: int = 250_000):
        self.limit = limit
        self.new: set = set()
        self.old: set = set()

    def __contains__(self, item) -> bool:
        return item in self.new or item in self.old

    def among(self, items: set) -> set:
        """The items of `items` seen lately (set intersections, in C)."""
        return (items & self.new) | (items & self.old)

    def add_all(self, items) -> None:
        self.new.update(items)
        if len(self.new) > self.limit:
            self.old, self.new = self.new, set()


@dataclass
class FileInfo:
    id: int
    lines_decided: int
    complete: bool
    pruned: bool


@dataclass
class FileStart:
    """What a (file, shard) task starts from: `WorkerState.start_file`."""
    info: FileInfo
    records: list
    resolved: list
    holds: "HoldBook"
    newest: str | None
    # whether the idle expiry left holds for the file to adopt (`idle_expired_sql`): read under
    # the shard lock, and only its holder expires holds, so it stays true until the lock goes
    idle_expired: bool = True


@dataclass
class BatchRecord:
    first_line: int
    line_count: int
    digest: bytes
    codes: bytes


class Hold:
    """A return waiting for its purchase, and, once resolved, where it was resolved."""

    __slots__ = ("file_id", "line", "origin", "order_id", "raw", "ts", "expires", "held_at", "state", "code",
                 "resolved_file_id", "resolved_line", "resolved_seq", "event")

    def __init__(self, file_id, line, origin, order_id, raw, ts, expires, held_at=None, state="held", code=None,
                 resolved_file_id=None, resolved_line=None, resolved_seq=None):
        self.file_id, self.line, self.origin, self.order_id = file_id, line, origin, order_id
        self.raw, self.ts, self.expires, self.held_at = raw, ts, expires, held_at
        self.state, self.code = state, code
        self.resolved_file_id, self.resolved_line, self.resolved_seq = resolved_file_id, resolved_line, resolved_seq
        self.event: Event | None = None

    def resolve(self, state: str, code: int, file_id: int, line: int, seq: int) -> None:
        self.state, self.code = state, code
        self.resolved_file_id, self.resolved_line, self.resolved_seq = file_id, line, seq


class HoldBook:
    """The shard's active holds: by order (to release) and by expiry (a heap, to expire)."""

    def __init__(self, holds: list[Hold] = ()):
        self.by_order: dict[int, list[Hold]] = {}
        self.heap: list[tuple[str, int, int, Hold]] = []
        for h in holds:
            self.add(h)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_order.values())

    def add(self, h: Hold) -> None:
        self.by_order.setdefault(h.order_id, []).append(h)
        heapq.heappush(self.heap, (h.expires, h.file_id, h.line, h))

    def take(self, order_id: int) -> list[Hold]:
        """The holds of an order, removed from the book (the heap drops them lazily)."""
        return self.by_order.pop(order_id, [])

    def expired(self, newest: str) -> list[Hold]:
        """Holds whose deadline is before `newest`, oldest first, removed from the book."""
        out = []
        heap = self.heap
        while heap and heap[0][0] < newest:
            h = heapq.heappop(heap)[3]
            if h.state != "held":
                continue
            waiting = self.by_order.get(h.order_id)
            if waiting and h in waiting:
                waiting.remove(h)
                if not waiting:
                    del self.by_order[h.order_id]
                out.append(h)
        return out


_HOLD_COLS = ("h.file_id, h.line, f.filename, h.order_id, h.raw, h.event_time, h.expires_at, h.held_at, h.state,"
              " h.code, h.resolved_file_id, h.resolved_line, h.resolved_seq")


# A hold's row has its final size at insert, so its resolution updates it in place (migration
# worker/0006): these stand for "not yet" in the table; a Hold has None.
UNRESOLVED_FILE = 0
UNRESOLVED_AT = "1970-01-01 00:00:00.000"


def _hold(row) -> Hold:
    (file_id, line, origin, order_id, raw, event_time, expires, held_at, state, code, r_file, r_line, r_seq) = row
    if state == "held":
        code = None
    if r_file == UNRESOLVED_FILE:
        r_file = r_line = r_seq = None
    return Hold(file_id, line, origin, order_id, bytes(raw), time_text(event_time), time_text(expires), held_at,
                state, code, r_file, r_line, r_seq)


# A file's row, and whether it has records or holds it resolved (`WorkerState.start_files`).
_FILE_INFO_SQL = ("SELECT id, lines_decided, complete, pruned, "
                  "EXISTS(SELECT 1 FROM worker_batches WHERE file_id=LAST_INSERT_ID()), "
                  "EXISTS(SELECT 1 FROM worker_holds WHERE resolved_file_id=LAST_INSERT_ID()) "
                  "FROM worker_files WHERE id=LAST_INSERT_ID()")
# The same for a group's files, by name (`uq_shard_file`); the name last, to match a row to its file.
_FILES_INFO_SQL = ("SELECT f.id, f.lines_decided, f.complete, f.pruned, "
                   "EXISTS(SELECT 1 FROM worker_batches WHERE file_id=f.id), "
                   "EXISTS(SELECT 1 FROM worker_holds WHERE resolved_file_id=f.id), f.filename "
                   "FROM worker_files f WHERE f.shard=%%s AND f.filename IN (%s)")


class WorkerState:
    def __init__(self, url: MySQLURL, shard: int):
        self.url = url
        self.shard = shard
        self.conn = None  # the open connection, as `open` last returned it
        self.order_floor = 0  # files below this id have had their orders pruned
        # dedup keys of minutes below this are packed in worker_seen_sealed (a late one in
        # worker_seen until the next sealing pass), the others in worker_seen;
        # read with the shard lock (`start_file`), changed only by its holder (`seal`)
        self.sealed_below = NOTHING_SEALED
        # worker_seen is partitioned as a ring for this shard (0008; `_prepare` looks): the
        # sealing pass truncates partitions; otherwise it deletes keys
        self.seen_ring = False
        # local_infile: a batch's state rows go in by LOAD DATA LOCAL (`db.Script.load`), unless
        # the server refuses it (local_infile off, MySQL 8.0's default): INSERTs then
        self.use_infile = True
        self._db = db.Reconnecting(url, check_after=PING_AFTER, on_open=self._prepare, create_database=True,
                                   multi_statements=True, local_infile=True)
        # lock names are at most 64 characters: cut the database name, never the shard
        self.lock_name = f"event_pipeline.worker.{shard}.{url.database}"[:64]
        # the lock went with the last commit's script (`commit_sql`): `unlock_shard` sends nothing
        self.released = False

    # -- connection, schema, the shard lock --------------------------------------------------

    def open(self):
        """The connection, checked and (re)opened if needed."""
        self.conn = self._db.get()
        return self.conn

    def _prepare(self, conn) -> None:
        """A new connection brings the schema up to date first (`db.migrate`: under a lock, and
        a table dropped meanwhile comes back) and makes sure the shard has its row.

        READ COMMITTED: under REPEATABLE READ, locking the balances of users not in the table
        yet (`Ledger.lock_sql`) locks the gaps around them, new user ids are mostly the highest,
        so the two shard workers' batches each locked the gap above the last user and waited
        for each other to create any user. A user both take for new is still decided once:
        each loads it, one waits for the other's row and finds it there, and the short count is
        a `LedgerConflict` (the batch is decided again). Nothing else needs the snapshot: every
        other table a batch reads is its shard's, written only by the shard lock's holder, and
        the ledger's order ids are unique."""
        db.migrate(conn, SCHEMA)
        with conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            cur.execute("SET SESSION group_concat_max_len = %s", (GROUP_CONCAT_MAX,))
            cur.execute("INSERT INTO worker_shards (shard) VALUES (%s) ON DUPLICATE KEY UPDATE shard=shard",
                        (self.shard,))
            # a worker_seen dropped by hand comes back from 0001 and 0003, not partitioned
            cur.execute(_SEEN_RING_SQL)
            self.seen_ring = 0 <= self.shard < SEEN_RING_SHARDS and cur.fetchone()[0] == SEEN_RING * SEEN_RING_SHARDS

    def infile_refused(self, exc: BaseException) -> bool:
        """Whether `exc` is the server refusing LOAD DATA LOCAL, the first time: from now on the
        state rows go in by INSERTs (the caller decides the batch again)."""
        if (self.use_infile and isinstance(exc, pymysql.err.MySQLError) and exc.args
                and exc.args[0] in db.LOCAL_INFILE_REFUSED):
            self.use_infile = False
            return True
        return False

    def close(self) -> None:
        self._db.discard()
        self.conn = None

    def lock_shard(self, timeout: float) -> bool:
        """Whether this process now holds the shard (released by `unlock_shard` or when its
        connection ends, so a killed worker never keeps it)."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, %s)", (self.lock_name, timeout))
            self.released = False
            return cur.fetchone()[0] == 1

    def unlock_shard(self) -> None:
        """Release the shard lock, unless a script released it already (`commit_sql`)."""
        if self.released:
            self.released = False
            return
        with self.conn.cursor() as cur:
            cur.execute("SELECT RELEASE_LOCK(%s)", (self.lock_name,))

    def commit_sql(self, script, release: bool) -> None:
        """Add the open transaction's COMMIT to `script` and, with `release`, the shard lock's
        release after it; the caller sets `released` once the script ran. The server runs a
        script's statements in order and stops at the first that fails: a statement before the
        COMMIT failing leaves nothing committed and the lock held."""
        script.add("commit", "COMMIT")
        if release:
            script.add("unlock", "DO RELEASE_LOCK(%s)", (self.lock_name,))

    # -- files and their decisions ---------------------------------------------------------------

    def file_info(self, filename: str) -> FileInfo:
        with self.conn.cursor() as cur:
            cur.execute("INSERT INTO worker_files (shard, filename) VALUES (%s,%s) "
                        "ON DUPLICATE KEY UPDATE id=LAST_INSERT_ID(id)", (self.shard, filename))
            file_id = cur.lastrowid
            cur.execute("SELECT lines_decided, complete, pruned FROM worker_files WHERE id=%s", (file_id,))
            decided, complete, pruned = cur.fetchone()
        return FileInfo(file_id, decided, bool(complete), bool(pruned))

    def start_file(self, filename: str, lock_timeout: float, known: dict | None = None) -> FileStart | None:
        """Take the shard lock (`lock_shard`) and read what working `filename` starts from, in
        one round trip instead of seven; None if another process holds the shard (the file's
        row may then be created already: an empty row, as the lock holder would make it).

        `known`: the active holds this process left after its last file, by (file_id, line).
        Only the keys of the active holds are read then, and the book is made from `known` if
        they are the same set (a held row never changes while it is held: only its resolution
        takes it out of the set); otherwise (another process or the idle expiry changed them)
        every active hold is read as without `known`."""
        starts = self.start_files([filename], lock_timeout, known)
        return None if starts is None else starts[0]

    def start_files(self, filenames: list[str], lock_timeout: float,
                    known: dict | None = None) -> list[FileStart] | None:
        """`start_file` for several files of the shard in one script (decided together in one
        transaction, `WorkerStage._process_group`): each file's row and progress; the holds and
        the shard clock once. The starts share one HoldBook and clock: those of the first file
        (the next files start from what the one before leaves).

        A file's records and the holds it resolved are read only when its row says there are
        some (a re-run: one more round trip); a fresh file, nearly every one, has neither, and
        two empty result sets (17 columns described) a file were half the script's statements.
        With `known`, the held keys ride in the shard clock's row: one statement for both."""
        shard = self.shard
        script = db.Script()
        script.add("lock", "SELECT GET_LOCK(%s, %s)", (self.lock_name, lock_timeout))
        if len(filenames) == 1:
            script.add("file0", "INSERT INTO worker_files (shard, filename) VALUES (%s,%s) "
                                "ON DUPLICATE KEY UPDATE id=LAST_INSERT_ID(id)", (shard, filenames[0]))
            script.add("info0", _FILE_INFO_SQL)
        else:
            # a group's rows in one INSERT and one read (two statements a group, not two a file);
            # the rows are made in the claim's order, as file after file would make them
            script.add("files", "INSERT INTO worker_files (shard, filename) VALUES "
                                + ",".join(["(%s,%s)"] * len(filenames)) + " ON DUPLICATE KEY UPDATE id=id",
                       [v for filename in filenames for v in (shard, filename)])
            script.add("infos", _FILES_INFO_SQL % ",".join(["%s"] * len(filenames)),
                       [shard, *filenames])
        if known is None:
            script.add("holds", self._active_holds_sql())
            script.add("newest", f"SELECT newest_event, sealed_below, 0, NULL, {self._idle_expired_sql()} "
                                 f"FROM worker_shards WHERE shard={shard:d}")
        else:
            held = f"FROM worker_holds WHERE shard={shard:d} AND state='held'"
            script.add("newest", f"SELECT newest_event, sealed_below, (SELECT COUNT(*) {held}), "
                                 f"(SELECT GROUP_CONCAT(file_id, ':', line) {held}), {self._idle_expired_sql()} "
                                 f"FROM worker_shards WHERE shard={shard:d}")
        try:
            with self.conn.cursor() as cur:
                self.released = False
                got = script.run(cur)
                if got["lock"].one()[0] != 1:
                    return None
                if len(filenames) == 1:
                    infos = [got["info0"].one()]
                else:
                    by_name = {row[6]: row[:6] for row in got["infos"].rows}
                    infos = [by_name.get(filename) or self._file_info_row(cur, filename) for filename in filenames]
                past = self._past(cur, infos)
        except BaseException:
            # a statement after GET_LOCK failed: the lock must not outlive the task
            try:
                self.unlock_shard()
            except Exception:   # the connection is gone, and the lock with it
                pass
            raise
        newest = got["newest"].one()
        # no clock row (never so after `_prepare`): nothing known, every held row is read
        clock, sealed, count, keys, expired = newest if newest else (None, None, -1, None, 1)
        if known is None:
            holds = HoldBook([_hold(r) for r in got["holds"].rows])
        else:
            held = set((keys.decode() if type(keys) is bytes else keys).split(",")) if count > 0 else set()
            same = len(held) == count == len(known) and held == {f"{f}:{n}" for f, n in known}
            holds = HoldBook(list(known.values())) if same else self.active_holds()
        if sealed is not None:
            self.sealed_below = sealed
        return [FileStart(FileInfo(file_id, decided, bool(complete), bool(pruned)), *past.get(file_id, ([], [])),
                          holds, time_text(clock), expired is None or bool(expired))
                for file_id, decided, complete, pruned, _, _ in infos]

    def _file_info_row(self, cur, filename: str) -> tuple:
        """A file's `_FILE_INFO_SQL` row on its own: a group's file whose row came back under
        another spelling (the column's collation makes `a.txt` and `A.txt` one row), as
        file after file would have found it."""
        cur.execute("INSERT INTO worker_files (shard, filename) VALUES (%s,%s) "
                    "ON DUPLICATE KEY UPDATE id=LAST_INSERT_ID(id)", (self.shard, filename))
        cur.execute(_FILE_INFO_SQL)
        return cur.fetchone()

    def _past(self, cur, infos: list) -> dict[int, tuple[list[BatchRecord], list[Hold]]]:
        """The records and resolved holds of the files whose row says they have some (file id:
        (records, resolved)), in one script; {} when none has (no round trip)."""
        script = db.Script()
        ids = [row[0] for row in infos if row[4] or row[5]]
        for file_id in ids:
            script.add(f"batches{file_id}", "SELECT first_line, line_count, digest, codes FROM worker_batches "
                                            f"WHERE file_id={file_id:d} ORDER BY first_line")
            script.add(f"resolved{file_id}", self._resolved_in_sql(f"{file_id:d}"))
        if not ids:
            return {}
        got = script.run(cur)
        return {file_id: ([BatchRecord(a, b, bytes(c), unpack_codes(bytes(d), b))
                           for a, b, c, d in got[f"batches{file_id}"].rows],
                          [_hold(r) for r in got[f"resolved{file_id}"].rows]) for file_id in ids}

    def batches(self, file_id: int) -> list[BatchRecord]:
        with self.conn.cursor() as cur:
            cur.execute("SELECT first_line, line_count, digest, codes FROM worker_batches WHERE file_id=%s "
                        "ORDER BY first_line", (file_id,))
            return [BatchRecord(a, b, bytes(c), unpack_codes(bytes(d), b)) for a, b, c, d in cur.fetchall()]

    @staticmethod
    def record_sql(conn, file_id: int, first_line: int, count: int, digest: bytes, codes: bytes,
                   complete: bool, newest_in_batch: str | None) -> list[str]:
        """The batch's decisions (`pack_codes`) and the file's progress."""
        lit = db.literal_renderer(conn)
        newest = lit(newest_in_batch)
        return [
            "INSERT INTO worker_batches (file_id, first_line, line_count, digest, codes) VALUES "
            f"({file_id:d},{first_line:d},{count:d},{lit(digest)},{lit(pack_codes(codes))})",
            f"UPDATE worker_files SET lines_decided={first_line + count - 1:d}, complete={int(complete):d}, "
            f"newest_event=GREATEST(COALESCE(newest_event, {newest}), COALESCE({newest}, newest_event)) "
            f"WHERE id={file_id:d}"]

    @staticmethod
    def records_sql(conn, records: list[tuple]) -> list[str]:
        """`record_sql` for a group's files, each (file_id, first_line, count, digest, codes,
        complete, newest_in_batch): one INSERT of every file's batch row and one UPDATE of
        every file's progress, two statements a group instead of two a file. The same rows
        and values as `record_sql` file after file (the files are distinct rows)."""
        if len(records) == 1:
            return WorkerState.record_sql(conn, *records[0])
        lit = db.literal_renderer(conn)
        batches = ",".join(f"({file_id:d},{first:d},{count:d},{lit(digest)},{lit(pack_codes(codes))})"
                           for file_id, first, count, digest, codes, _, _ in records)
        decided = " ".join(f"WHEN {r[0]:d} THEN {r[1] + r[2] - 1:d}" for r in records)
        complete = " ".join(f"WHEN {r[0]:d} THEN {int(r[5]):d}" for r in records)
        newest = " ".join(f"WHEN {r[0]:d} THEN GREATEST(COALESCE(newest_event, {n}), COALESCE({n}, newest_event))"
                          for r in records for n in (lit(r[6]),))
        ids = ",".join(f"{r[0]:d}" for r in records)
        return [
            "INSERT INTO worker_batches (file_id, first_line, line_count, digest, codes) VALUES " + batches,
            f"UPDATE worker_files SET lines_decided=CASE id {decided} END, complete=CASE id {complete} END, "
            f"newest_event=CASE id {newest} END WHERE id IN ({ids})"]

    # -- the shard clock ---------------------------------------------------------------------------

    def newest(self) -> str | None:
        with self.conn.cursor() as cur:
            cur.execute("SELECT newest_event FROM worker_shards WHERE shard=%s", (self.shard,))
            row = cur.fetchone()
            return time_text(row[0]) if row else None

    def newest_sql(self, conn, newest: str) -> str:
        return f"UPDATE worker_shards SET newest_event={db.literal_renderer(conn)(newest)} WHERE shard={self.shard:d}"

    # -- dedup keys, stock, shops: statements for a batch's scripts -----------------------------------

    def seen_sql(self, conn, keys) -> str:
        """Which of these dedup keys (`Event.dkey`: (minute, hash) or a return's order id) are
        recorded: one statement, rows (minute, hash, NULL), (NULL, order id, NULL) or, for a
        sealed minute, (minute, part, packed hashes) (`parse_seen` unpacks them). A key of a
        minute not sealed (`sealed_below`) is looked up in worker_seen, one of a sealed minute
        in both tables: it is packed in worker_seen_sealed, or, a late event's, in worker_seen
        until the next sealing pass packs it."""
        shard = self.shard
        hashed = [k for k in keys if type(k) is tuple]
        returns = [k for k in keys if type(k) is not tuple]
        parts = []
        if hashed:
            pairs = ",".join("(%d,%d)" % k for k in hashed)
            parts.append(f"SELECT bucket, hash, NULL FROM worker_seen WHERE shard={shard:d} AND (bucket, hash) IN ({pairs})")
        floor = self.sealed_below
        sealed = {(m, (h >> 56) & 0xFF) for m, h in hashed if m < floor}
        if sealed:
            pairs = ",".join("(%d,%d)" % k for k in sealed)
            parts.append(f"SELECT bucket, part, hashes FROM worker_seen_sealed WHERE shard={shard:d} "
                         f"AND (bucket, part) IN ({pairs})")
        if returns:
            parts.append(f"SELECT NULL, order_id, NULL FROM worker_return_keys WHERE shard={shard:d} "
                         f"AND order_id IN ({','.join('%d' % k for k in returns)})")
        return " UNION ALL ".join(parts)

    @staticmethod
    def parse_seen(rows) -> set:
        """The recorded keys `seen_sql`'s rows name: a packed row gives every key of its part
        of the minute (more than were asked for, all of them recorded)."""
        seen = set()
        for m, k, packed in rows:
            if packed is not None:
                seen.update((m, h) for (h,) in _HASHES.iter_unpack(packed))
            else:
                seen.add(k if m is None else (m, k))
        return seen

    def sealed_keys(self, keys) -> set:
        """The hashed keys of sealed minutes among `keys`: always looked up, since their insert
        into worker_seen proves nothing about the packed keys of worker_seen_sealed."""
        floor = self.sealed_below
        return {k for k in keys if type(k) is tuple and k[0] < floor}

    def add_seen(self, script, tag: str, keys: list, return_minutes: dict[int, int]) -> None:
        """Record new dedup keys, loaded (`db.Script.load`: the server parses a key's line for
        less than its `(...)` in an INSERT). An existing key is skipped, so the tag's
        affected-row count says whether every key was new. In arrival order, not sorted: a
        sorted batch landing among a minute's earlier keys trips InnoDB's sequential-insert page
        split and leaves pages part empty (a third more space for 400k keys, bench-style
        batches). A key of a sealed minute (a late event) goes to worker_seen too (its lookup
        proved it is not packed in worker_seen_sealed); the next sealing pass packs it."""
        shard = self.shard
        hashed = [k for k in keys if type(k) is tuple]
        returns = [k for k in keys if type(k) is not tuple]
        if not self.use_infile:
            conn = self.conn
            script.add(tag, db.insert_statements(conn, "INSERT INTO worker_seen (shard, bucket, hash) VALUES ", hashed,
                                                 " ON DUPLICATE KEY UPDATE hash=hash",
                                                 render=lambda k: "(%d,%d,%d)" % (shard, k[0], k[1]))
                       + db.insert_statements(conn, "INSERT INTO worker_return_keys (shard, order_id, bucket) VALUES ",
                                              returns, " ON DUPLICATE KEY UPDATE bucket=bucket",
                                              render=lambda k: "(%d,%d,%d)" % (shard, k, return_minutes[k])))
            return
        if hashed:
            script.load(tag, f"LOAD DATA LOCAL INFILE 'worker_seen' INTO TABLE worker_seen (bucket, hash) "
                             f"SET shard={shard:d}", "worker_seen", "".join(map("%d\t%d\n".__mod__, hashed)).encode())
        if returns:
            script.load(tag, f"LOAD DATA LOCAL INFILE 'worker_return_keys' INTO TABLE worker_return_keys "
                             f"(order_id, bucket) SET shard={shard:d}", "worker_return_keys",
                        "".join(["%d\t%d\n" % (k, return_minutes[k]) for k in returns]).encode())

    @staticmethod
    def stock_sql(conn, pairs) -> str:
        return (f"SELECT shop_id, good_id, count FROM worker_stock "
                f"WHERE (shop_id, good_id) IN {db.sql_list(conn, pairs)}")

    @staticmethod
    def stock_write_sql(conn, stock: dict, changed) -> list[str]:
        return db.insert_statements(conn, "INSERT INTO worker_stock (shop_id, good_id, count) VALUES ",
                                    [(s, g, stock[(s, g)]) for s, g in sorted(changed)],
                                    " ON DUPLICATE KEY UPDATE count=VALUES(count)")

    @staticmethod
    def shops_sql(conn, shop_ids) -> str:
        return f"SELECT shop_id, active FROM worker_shops WHERE shop_id IN {db.sql_list(conn, shop_ids)}"

    @staticmethod
    def shops_write_sql(conn, changed: dict[int, tuple[bool, str]]) -> list[str]:
        return db.insert_statements(conn, "INSERT INTO worker_shops (shop_id, active, changed_at) VALUES ",
                                    [(s, int(a), ts) for s, (a, ts) in sorted(changed.items())],
                                    " ON DUPLICATE KEY UPDATE active=VALUES(active), changed_at=VALUES(changed_at)")

    # -- holds -----------------------------------------------------------------------------------------

    def _active_holds_sql(self) -> str:
        return (f"SELECT {_HOLD_COLS} FROM worker_holds h JOIN worker_files f ON f.id=h.file_id "
                f"WHERE h.shard={self.shard:d} AND h.state='held'")

    def active_holds(self) -> HoldBook:
        with self.conn.cursor() as cur:
            cur.execute(self._active_holds_sql())
            return HoldBook([_hold(r) for r in cur.fetchall()])

    @staticmethod
    def _resolved_in_sql(file_id: str) -> str:
        return (f"SELECT {_HOLD_COLS} FROM worker_holds h JOIN worker_files f ON f.id=h.file_id "
                f"WHERE h.resolved_file_id={file_id} ORDER BY h.resolved_line, h.resolved_seq")

    def resolved_in(self, file_id: int) -> list[Hold]:
        """Holds released or expired into this file's output, in output order."""
        with self.conn.cursor() as cur:
            cur.execute(self._resolved_in_sql(str(int(file_id))))
            return [_hold(r) for r in cur.fetchall()]

    def _idle_expired_sql(self) -> str:
        """Whether `idle_expired_sql` would find a hold (a column of the start's clock row)."""
        return (f"EXISTS(SELECT 1 FROM worker_holds WHERE resolved_file_id={UNRESOLVED_FILE:d} "
                f"AND shard={self.shard:d} AND state='expired')")

    def idle_expired_sql(self) -> str:
        """Holds the idle worker expired (wall-clock cap) that no file has reported yet."""
        return (f"SELECT {_HOLD_COLS} FROM worker_holds h JOIN worker_files f ON f.id=h.file_id "
                f"WHERE h.shard={self.shard:d} AND h.state='expired' AND h.resolved_file_id={UNRESOLVED_FILE:d} "
                f"ORDER BY h.file_id, h.line FOR UPDATE")

    @staticmethod
    def parse_holds(rows) -> list[Hold]:
        return [_hold(r) for r in rows]

    def holds_write_sql(self, conn, holds: list[Hold]) -> list[str]:
        """Insert new holds and record resolutions."""
        shard = self.shard
        now = datetime.now(timezone.utc).strftime(TIME)[:-3]
        return db.insert_statements(
            conn, "INSERT INTO worker_holds (file_id, line, shard, order_id, event_time, expires_at, raw, state,"
                  " code, resolved_file_id, resolved_line, resolved_seq, resolved_at) VALUES ",
            [(h.file_id, h.line, shard, h.order_id, h.ts, h.expires, h.raw, h.state,
              HELD if h.code is None else h.code,
              *((UNRESOLVED_FILE, 0, 0) if h.resolved_file_id is None else
                (h.resolved_file_id, h.resolved_line, h.resolved_seq)),
              UNRESOLVED_AT if h.state == "held" else now)
             for h in holds],
            " ON DUPLICATE KEY UPDATE state=VALUES(state), code=VALUES(code),"
            " resolved_file_id=VALUES(resolved_file_id), resolved_line=VALUES(resolved_line),"
            f" resolved_seq=VALUES(resolved_seq), resolved_at=IF(resolved_at='{UNRESOLVED_AT}', VALUES(resolved_at),"
            " resolved_at)")

    def expire_idle(self) -> int:
        """Wall-clock cap: expire every hold of the shard as `orphan_return`. They stay
        unreported (no file) until the next file of the shard adopts them."""
        with self.conn.cursor() as cur:
            self.conn.begin()
            try:
                cur.execute("UPDATE worker_holds SET state='expired', code=%s, resolved_at=NOW(3) "
                            "WHERE shard=%s AND state='held'", (ORPHAN_RETURN, self.shard))
                n = cur.rowcount
                self.conn.commit()
                return n
            except BaseException:
                self.conn.rollback()
                raise

    # -- pruning ----------------------------------------------------------------------------------------

    def prune(self, dedup_window: float, order_window: float, replay_window: float,
              max_rows: int = 20_000, step: int = 5_000, newest: str | None = None) -> dict[str, int]:
        """Forget what the windows no longer cover (docs/business-rules.md), bounded work per
        call (at most `max_rows` rows a table, in statements of `step`): dedup keys whose minute
        is before the shard's newest event minus DEDUP_WINDOW, ledger orders of the files before
        the first whose newest event is inside ORDER_WINDOW (each a range at the start of the
        shard's part of its table), and the records of files
        decided more than REPLAY_WINDOW ago in wall time: their decisions and the holds they
        resolved (such a file can no longer be re-run). Then `seal` moves the dedup keys of
        minutes SEAL_MINUTES behind the clock, all of them, a transaction per `max_rows`. Rows
        removed, by table.

        It runs after every file, so the first step of each part goes in one script (one round
        trip; most passes find nothing more to do); `newest` is the shard clock if the caller
        knows it."""
        shard = self.shard
        removed = {"worker_seen": 0, "worker_seen_sealed": 0, "worker_return_keys": 0, "worker_orders": 0,
                   "worker_batches": 0, "worker_holds": 0}
        if newest is None:
            newest = self.newest()
        script = db.Script()
        parts = []
        if newest is not None:
            dedup_cut = minute_of(add_seconds(newest, -dedup_window))
            # the ledger goes by file: every file before the first whose newest event is
            # inside ORDER_WINDOW (or that is not decided yet), so no order goes early
            # (a user variable, not a subquery: the DELETE then scans only the range below it)
            script.add("kept", "SET @worker_kept = (SELECT MIN(id) FROM worker_files WHERE shard=%d AND id >= %d AND "
                               "(complete=0 OR newest_event >= %s))"
                       % (shard, self.order_floor, self.conn.escape(add_seconds(newest, -order_window))))
            script.add("kept", "SELECT @worker_kept")
            parts = [("worker_seen", "bucket", str(dedup_cut)), ("worker_seen_sealed", "bucket", str(dedup_cut)),
                     ("worker_return_keys", "bucket", str(dedup_cut)), ("worker_orders", "file_id", "@worker_kept")]
            for table, column, cut in parts:
                script.add(table, f"DELETE FROM {table} WHERE shard={shard:d} AND {column} < {cut} LIMIT {step:d}")
        script.add("replay", "SELECT id FROM worker_files WHERE shard=%s AND pruned=0 AND complete=1 AND "
                             "updated_at < NOW(3) - INTERVAL %s MICROSECOND ORDER BY id LIMIT 20",
                   (shard, int(replay_window * 1_000_000)))
        with self.conn.cursor() as cur:
            got = script.run(cur)
            if parts:
                first_kept = got["kept"].one()[0]
                for table, column, cut in parts:
                    n = got[table].rowcount if table in got else 0
                    removed[table] = n
                    while n == step and removed[table] < max_rows:
                        n = cur.execute(f"DELETE FROM {table} WHERE shard=%s AND {column} < %s LIMIT %s",
                                        (shard, first_kept if table == "worker_orders" else int(cut), step))
                        removed[table] += n
                if first_kept is not None and removed["worker_orders"] < max_rows:
                    self.order_floor = first_kept
            for (file_id,) in got["replay"].rows:
                self.conn.begin()
                try:
                    removed["worker_batches"] += cur.execute("DELETE FROM worker_batches WHERE file_id=%s",
                                                             (file_id,))
                    removed["worker_holds"] += cur.execute(
                        "DELETE FROM worker_holds WHERE resolved_file_id=%s AND state<>'held'", (file_id,))
                    cur.execute("UPDATE worker_files SET pruned=1 WHERE id=%s", (file_id,))
                    self.conn.commit()
                except BaseException:
                    self.conn.rollback()
                    raise
        if newest is not None and removed["worker_seen"] < max_rows:
            # in passes of max_rows keys, until caught up: a big file adds more keys than one pass
            # moves, and every key is moved once whatever the passes
            below = minute_of(newest) - SEAL_MINUTES
            while self.sealed_below < below and self.seal(below, max_rows):
                pass
        return {k: v for k, v in removed.items() if v}

    def _keys_below(self, cur, below: int) -> int:
        """The optimizer's estimate of the shard's keys in worker_seen below minute `below` (two
        dives into the index, InnoDB's records_in_range), where counting them to find where
        `max_rows` ends reads every one (a third of sealing's reads when they are few)."""
        cur.execute("EXPLAIN SELECT 1 FROM worker_seen FORCE INDEX (PRIMARY) WHERE shard=%s AND bucket < %s",
                    (self.shard, below))
        column = [d[0].lower() for d in cur.description].index("rows")
        return sum(int(row[column] or 0) for row in cur.fetchall())

    def seal(self, below: int, max_rows: int = 20_000) -> int:
        """Move the shard's dedup keys of minutes before `below` from worker_seen to
        worker_seen_sealed, packed: one row per minute and part (the hash's top byte), appended
        in key order, so its pages stay full and a key costs its 8 bytes, not a row of its own
        (db/migrations/worker/0005); a late key of a minute packed before is added to its part's
        row; keys moved. Whole minutes, about `max_rows` keys at most
        (a minute with more moves whole; counted only where the optimizer's estimate is over
        half of it), in one transaction with the shard's `sealed_below`
        (`seen_sql` looks a key of a minute below it up in both tables). Called by the shard lock holder,
        after pruning (keys DEDUP_WINDOW drops are not moved first)."""
        if below <= self.sealed_below:
            return 0
        shard = self.shard
        with self.conn.cursor() as cur:
            self.conn.begin()
            try:
                cur.execute("SELECT sealed_below FROM worker_shards WHERE shard=%s FOR UPDATE", (shard,))
                floor = cur.fetchone()[0]
                if below > floor:
                    over = None
                    if self._keys_below(cur, below) > max_rows // 2:
                        cur.execute("SELECT bucket FROM worker_seen WHERE shard=%s AND bucket < %s "
                                    "ORDER BY bucket, hash LIMIT 1 OFFSET %s", (shard, below, max_rows))
                        over = cur.fetchone()
                    if over is not None:
                        cur.execute("SELECT MIN(bucket) FROM worker_seen WHERE shard=%s", (shard,))
                        below = max(over[0], cur.fetchone()[0] + 1)
                    cur.execute(SEAL_SQL, (shard, below))
                    if self.conn._result is not None and self.conn._result.warning_count:
                        cur.execute("SHOW WARNINGS")
                        raise pymysql.err.DataError(1260, f"sealing dedup keys: {cur.fetchall()}")
                    if self.seen_ring:
                        moved, empty = self._empty_sealed(cur, below)
                    else:
                        moved, empty = cur.execute("DELETE FROM worker_seen WHERE shard=%s AND bucket < %s",
                                                   (shard, below)), []
                    cur.execute("UPDATE worker_shards SET sealed_below=%s WHERE shard=%s", (below, shard))
                else:
                    below, moved, empty = floor, 0, []
                self.conn.commit()
            except BaseException:
                self.conn.rollback()
                raise
            self.sealed_below = below
            if empty:
                self._truncate(cur, empty, below)
        return moved

    def _empty_sealed(self, cur, below: int) -> tuple[int, list[str]]:
        """In the sealing pass's transaction, after its pack: delete the packed keys (minutes
        before `below`) of the ring's partitions that also hold minutes not sealed (`below` up to
        the newest key's minute), and count those of the partitions that hold none, to be
        truncated once the pass committed (`_truncate`): (keys moved, those partitions). Only the
        shard lock's holder writes the shard's keys, so nothing lands in them meanwhile; a
        worker killed before the truncation leaves packed keys there, which the next pass packs
        again (a part's row then holds those hashes twice: the lookups read a set) and empties."""
        shard = self.shard
        cur.execute("SELECT MIN(bucket), MAX(bucket) FROM worker_seen WHERE shard=%s", (shard,))
        low, high = cur.fetchone()
        if low is None or low >= below:
            return 0, []
        live = ring_slots(below, high)
        sealed = ring_slots(low, below - 1)
        moved = 0
        if sealed & live:
            moved = cur.execute(f"DELETE FROM worker_seen PARTITION "
                                f"({','.join(seen_partition(shard, j) for j in sorted(sealed & live))}) "
                                f"WHERE shard={shard:d} AND bucket < {below:d}")
        empty = [seen_partition(shard, j) for j in sorted(sealed - live)]
        if empty:
            cur.execute(f"SELECT COUNT(*) FROM worker_seen PARTITION ({','.join(empty)})")
            count = cur.fetchone()[0]
            moved += count
            if not count:
                empty = []
        return moved, empty

    def _truncate(self, cur, partitions: list[str], below: int) -> None:
        """Empty ring partitions whose keys the committed pass packed. TRUNCATE PARTITION waits
        for every open transaction on worker_seen (the other shards' batches) at most
        TRUNCATE_LOCK_WAIT (or is a metadata deadlock's victim); then the keys are deleted, as
        before 0008."""
        names = ",".join(partitions)
        try:
            cur.execute("SET SESSION lock_wait_timeout = %s", (TRUNCATE_LOCK_WAIT,))
            try:
                cur.execute(f"ALTER TABLE worker_seen TRUNCATE PARTITION {names}")
                return
            finally:
                cur.execute("SET SESSION lock_wait_timeout = DEFAULT")
        except pymysql.err.MySQLError as exc:
            # the wait ran out, or the server chose this DDL as a metadata deadlock's victim
            if not exc.args or exc.args[0] not in db.DEADLOCK_CODES:
                raise
        cur.execute(f"DELETE FROM worker_seen PARTITION ({names}) WHERE shard={self.shard:d} AND bucket < {below:d}")
