"""The splitter's order_id -> shop_id index: how a return without `shop_id` finds its shard.

The rule (docs/splitter.md): such a return goes to the shop of the nearest earlier purchase
of its order in the same file; failing that, to the purchase in the file whose index completed
first among the files complete when this file was FIRST split (its `horizon`); else it is
`unroutable`. The horizon is stored with the file, so a re-split (retry, rewind, crash, another
replica) sees exactly the same purchases and writes the same lines.

Purchases are written with LOAD DATA LOCAL INFILE from small TSV chunks built in memory
(`db.load_local`: no file is written, and the server can ask for no file of this machine), by a
background thread, so the index costs the splitting loop little more than a formatted write.
The purchases of chunks not yet confirmed loaded are kept in memory (bounded), so a lookup
never waits for the loader. The last chunk goes in with the file's completion, one round trip.

Rows are clustered by (epoch, order_id): an epoch holds about EPOCH_ROWS purchases, so writes
land in one small, hot range of the tree, and pruning (`prune`, run by the splitter on its
own) deletes whole epochs once every file in them was indexed more than two windows ago
(ORDER_INDEX_WINDOW: what a return sees, plus as long again for re-splits to see the same).

Sealing (`seal`, from the same pass): a closed epoch's rows are formatted by the server into
fixed-size entries and cut into buckets of 64 (`splitter_sealed`, ~29 bytes a purchase instead
of ~80), and its hot rows are dropped by truncating their partition (the hot table is a ring of
RING partitions by epoch), so no row is deleted one by one. A lookup reads the hot rows, the
buckets and each epoch's sealed flag in one statement: it sees every purchase once, whatever
sealing does meanwhile.
"""
from __future__ import annotations

import logging
import struct
import sys
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
import pymysql

from .. import db
from ..config import MySQLURL
from ..daemon import Retryable
from ..stages import Stage

# The order index's migrations: db/migrations/splitter/ (applied by `db.migrate`).
SCHEMA = "splitter"
INT64_MAX = 2**63 - 1
CHUNK = 4096          # purchases per TSV chunk handed to the loader
MAX_INFLIGHT = 2      # chunks loaded concurrently with the split before it waits
LOOKUP_BATCH = 1000   # order ids per lookup query (divided among the epochs looked in)
INSERT_BATCH = 2000
EPOCH_ROWS = 1 << 18  # purchases per epoch: a few MiB of the tree is where writes land, and
                      # what stays hot (not sealed) at most, with the ring's unsealed epochs
PRUNE_EVERY = 60.0    # seconds between two looks for epochs to prune
PRUNE_ROWS = 20_000   # rows per DELETE statement (each its own short transaction)
PRUNE_STATEMENTS = 50  # DELETEs per prune call at most; the rest waits for the next
DEFAULT_WINDOW = 7 * 86400.0
# Sealing (see the module's docstring and docs/splitter.md, "Sealing").
RING = 8              # partitions of splitter_order (migration 0003: PARTITION BY HASH (epoch) PARTITIONS 8)
BUCKET = 64           # entries per sealed bucket
ENTRY = struct.Struct(">qIIq")   # order_id, file_id, line, shop_id: what the server packs
FILE = struct.Struct(">Iq")      # file_id, indexed_seq: a sealed epoch's files
_ORDER = struct.Struct(">q")     # an entry's first field
_BUCKET_HEAD = struct.Struct(">IH")   # a bucket's epoch and length, before it in a lookup's answer
SEAL_PIECE_BYTES = 8 << 20       # at most this much packed in one statement (max_allowed_packet caps it)
SEAL_GRACE = 600.0    # seconds an unindexed file opened in a closed epoch holds its sealing back
TRUNCATE_LOCK_WAIT = 10  # seconds a TRUNCATE PARTITION waits for running statements (then: later)
SEALED_CACHE = 256    # sealed epochs whose directory a process keeps
# The server packs each row of an epoch into its 24-byte entry (HEX of a negative BIGINT is its
# two's complement, so every field has a fixed width).
_PACK_ROW = ("UNHEX(CONCAT(LPAD(HEX(order_id),16,'0'),LPAD(HEX(file_id),8,'0'),LPAD(HEX(line),8,'0'),"
             "LPAD(HEX(shop_id),16,'0')))")

log = logging.getLogger(Stage.SPLITTER)


def _digits(top: int) -> str:
    """The integers 0..top (at most 15) as a derived table of constants: `n`."""
    return "(" + " UNION ALL ".join(f"SELECT {d:d} AS n" for d in range(top + 1)) + ")"


def _integers(count: int) -> str:
    """The integers 0..count-1 as a derived table `s` of one column, `seq`, that MariaDB and
    MySQL 8.0 both run (MariaDB's seq_0_to_N tables are not in MySQL; a recursive CTE stops
    at MySQL's cte_max_recursion_depth, 1000): hexadecimal digits cross-joined, the top one
    only up to the top digit of count-1, so at most twice `count` rows are made and filtered.
    Made in no particular order (a join's): a caller that needs them in order says ORDER BY
    seq, which the LIMIT makes a sort of this small table of integers alone (materialized, not
    merged into the caller's query), so every temporary table of it is an in-memory one."""
    if count < 1:
        raise ValueError(f"no integers below {count}")
    places = max(1, ((count - 1).bit_length() + 3) // 4)
    top = (count - 1) >> (4 * (places - 1))
    tables = [f"{_digits(15)} d{place:d}" for place in range(places - 1)]
    tables.append(f"{_digits(top)} d{places - 1:d}")
    value = " + ".join(f"d{place:d}.n" if not place else f"{16 ** place:d} * d{place:d}.n" for place in range(places))
    return (f"(SELECT {value} AS seq FROM {' CROSS JOIN '.join(tables)} WHERE {value} < {count:d} "
            f"LIMIT {count:d}) s")

# A file's row, made on its first split: the horizon (the index sequence now), the floor (the
# sequence of the first file indexed within the window; past the horizon when there is none)
# and the epoch its rows go to. Opened again before its index completed, it takes the current
# epoch (the old one may be pruned by then); nothing else ever changes.
_OPEN_FILE = (
    "INSERT INTO splitter_file (filename, horizon, floor_seq, epoch) "
    "SELECT %s, s.value, COALESCE((SELECT f.indexed_seq FROM splitter_file f "
    "WHERE f.indexed_at >= NOW(3) - INTERVAL %s SECOND ORDER BY f.indexed_at LIMIT 1), s.value + 1), s.epoch "
    "FROM splitter_seq s WHERE s.id = 1 "
    "ON DUPLICATE KEY UPDATE epoch = IF(splitter_file.indexed_seq IS NULL, VALUES(epoch), splitter_file.epoch), "
    "opened_at = IF(splitter_file.indexed_seq IS NULL, NOW(3), splitter_file.opened_at)")


# A file's index completion (splitter/0004_finalize_procedure.sql): in the caller's transaction,
# its answer left in a session variable, read by the next statement.
_FINALIZE = "CALL splitter_finalize(%s, %s, %s, %s, %s, %s, @splitter_state)"


# A chunk of purchases into its epoch (the same rows again: a no-op).
_LOAD_ROWS = ("LOAD DATA LOCAL INFILE %s REPLACE INTO TABLE splitter_order "
              "(order_id, file_id, line, shop_id) SET epoch = %s")


class _LoadRows(str):
    """A completion's LOAD DATA of the file's last chunk (rendered, integers only): its TSV
    travels with the script, sent when the server asks for `name`."""

    name: bytes
    data: bytes

    @classmethod
    def of(cls, file_id: int, epoch: int, data: bytes) -> "_LoadRows":
        name = f"splitter_order.{file_id:d}.last.tsv"
        sql = cls(_LOAD_ROWS % (f"'{name}'", f"{epoch:d}"))
        sql.name, sql.data = name.encode(), data
        return sql


class InfileRefused(Retryable):
    """The server refused the completion's LOAD DATA LOCAL (local_infile off): nothing was
    written; split the file again (its index is written with INSERTs from now on)."""


def _insert_rows_sql(tsv: bytes, epoch: int) -> str:
    """A TSV chunk of integers this module formatted, as one multi-row INSERT (no input text)."""
    values = tsv[:-1].replace(b"\t", b",").replace(b"\n", b",%d),(" % epoch).decode("ascii")
    return (f"INSERT INTO splitter_order (order_id, file_id, line, shop_id, epoch) VALUES ({values},{epoch:d}) "
            f"ON DUPLICATE KEY UPDATE shop_id = shop_id")


class WindowPruned(Exception):
    """A re-split needs rows that pruning has deleted: it could not route as its first split did."""


class EpochSealed(Retryable):
    """The file's epoch was closed for sealing before its index completed (a split that ran
    longer than SEAL_GRACE, or resumed after a crash): split it again, in the current epoch."""


def _entries_of(entries: bytes, wanted: list[int]):
    """The entries of a bucket whose order_id is in `wanted` (sorted): each wanted order within
    the bucket's range found by a byte search of its 8-byte key at an entry's start (C speed;
    a decode or a binary search in Python cost several times more per bucket)."""
    size, unpack = ENTRY.size, ENTRY.unpack_from
    count = len(entries) // size
    if not count:
        return
    first, last = _ORDER.unpack_from(entries, 0)[0], _ORDER.unpack_from(entries, (count - 1) * size)[0]
    for order in wanted[bisect_left(wanted, first):bisect_right(wanted, last)]:
        key = _ORDER.pack(order)
        at = entries.find(key)
        while at >= 0:
            if at % size == 0:
                yield unpack(entries, at)
            at = entries.find(key, at + 1)


class SealedEpoch:
    """What a lookup needs of a sealed epoch besides its buckets, read once per process: the
    first order_id of each bucket, and each indexed file's sequence number."""

    __slots__ = ("starts", "files")

    def __init__(self, directory: bytes, files: bytes):
        starts = array("q", directory or b"")
        if sys.byteorder == "little":
            starts.byteswap()
        self.starts = starts
        self.files = {fid: seq for fid, seq in FILE.iter_unpack(files or b"")}

    def buckets(self, order_id: int) -> range:
        """The buckets that may hold `order_id`: those whose range [first, next first] meets
        it (an order's entries may straddle two buckets)."""
        starts = self.starts
        return range(max(bisect_left(starts, order_id) - 1, 0), bisect_right(starts, order_id))


class OrderIndex:
    """Long-lived: owns the splitter's connections to the pipeline database (one for
    bookkeeping, one for the loader thread, one for lookups; never shared between threads).
    `window`: ORDER_INDEX_WINDOW in seconds; `epoch_rows`, `prune_every`, `seal_grace`: for tests."""

    def __init__(self, url: MySQLURL, use_infile: bool = True, window: float = DEFAULT_WINDOW,
                 epoch_rows: int = EPOCH_ROWS, prune_every: float = PRUNE_EVERY, seal_grace: float = SEAL_GRACE):
        self.url = url
        self.use_infile = use_infile
        self.window = float(window)
        self.epoch_rows = epoch_rows
        self.prune_every = prune_every
        self.seal_grace = float(seal_grace)
        self._pruned_at: float | None = None
        self._prune_more = False         # the last pruning stopped at PRUNE_STATEMENTS
        self._seal_due = True            # sealing may have work: look on the next pass
        self._held_open: int | None = None   # the epoch a file opened within seal_grace keeps open
        self._sealed: dict[int, SealedEpoch] = {}
        # Not checked before each use (a split uses them thousands of times): after an error
        # `reset` drops them and the next use reconnects.
        # (LOCAL INFILE on the bookkeeping connection too: a completion loads the last chunk.)
        self._main = db.Reconnecting(url, check_after=None, multi_statements=True, local_infile=use_infile)
        self._loader = db.Reconnecting(url, check_after=None, local_infile=use_infile)
        self._lookup = db.Reconnecting(url, check_after=None, multi_statements=True)
        self._lookups: ThreadPoolExecutor | None = None
        self._schema_ready = False

    # -- connections -----------------------------------------------------------------------

    def conn(self):
        return self._main.get()

    def loader_conn(self):
        return self._loader.get()

    def reset(self) -> None:
        """Drop the connections (after an error, nothing running): the next use reconnects."""
        for connection in (self._main, self._loader, self._lookup):
            connection.discard()

    def ensure_schema(self) -> None:
        if not self._schema_ready:
            db.migrate(self.conn(), SCHEMA)
            self._schema_ready = True

    # -- per file ---------------------------------------------------------------------------

    def open_file(self, filename: str, defer: bool = False) -> "FileRouting":
        """Fix the file's horizon and window floor on its first split and read them back (the
        same for every replica, every re-split), with what its first lookup needs: the epochs
        it sees (`visible_epochs`), the pruned mark, and the directories of those sealed that
        this process does not hold yet (those in a second round trip, once per sealed epoch
        and process); one round trip. A file whose index is not complete writes into the
        current epoch. (Read now, after the file's row: every file whose
        sequence number is within its horizon completed its index, and its epoch's range,
        before; files indexed later are past the horizon: the set is the one a later read
        would give, but for an epoch that holds nothing the file sees.)

        `defer`: the file's row is written in a READ COMMITTED transaction left open on this
        connection (`FileRouting.pending`) and committed with the index's completion, so a
        small file costs one commit (one redo-log flush), not two. Nothing the split publishes
        depends on the row before that commit; the routing commits it first when another
        connection is to read it (the loader, the lookup thread), and rolls it back on abort.
        READ COMMITTED: the row's INSERT ... SELECT reads the sequence without locking it, and
        each statement of the transaction reads in a view of its own, as in autocommit."""
        self.ensure_schema()
        cached = [int(e) for e in list(self._sealed)]   # list(): the lookup thread adds
        unknown = f"e.sealed = 1 AND e.epoch NOT IN ({','.join(str(e) for e in cached)})" if cached else "e.sealed = 1"
        # One column, one result: PyMySQL parses each column's descriptor (and the server
        # answers each statement) for more CPU than splitting a short string costs. The file's
        # row is the one value with spaces (six integers); each other is an epoch it sees,
        # negative (-1 - epoch) when sealed and this process holds no directory of it.
        script = db.Script()
        if defer:
            script.add("begin", ["SET TRANSACTION ISOLATION LEVEL READ COMMITTED", "START TRANSACTION"])
        script.add("open", _OPEN_FILE, (filename, self.window))
        script.add("file", "SELECT CONCAT_WS(' ', f.file_id, f.horizon, f.floor_seq, f.epoch, f.indexed_seq IS NOT NULL, "
                           "s.pruned_epoch) FROM splitter_file f JOIN splitter_seq s ON s.id = 1 WHERE f.filename = %s "
                           f"UNION ALL SELECT CAST(IF({unknown}, -1 - CAST(e.epoch AS SIGNED), e.epoch) AS SIGNED) "
                           f"FROM splitter_file f JOIN splitter_epoch e ON (e.last_seq >= f.floor_seq "
                           f"AND e.first_seq <= f.horizon) OR e.epoch = f.epoch WHERE f.filename = %s",
                   (filename, filename))
        conn = self.conn()
        with conn.cursor() as cur:
            try:
                got = script.run(cur)
                values = [v for (v,) in got["file"].rows]
                (row,) = [v for v in values if " " in v]
                file_id, horizon, floor_seq, epoch, indexed, pruned = (int(v) for v in row.split())
                seen = [int(v) for v in values if " " not in v]
                unknown_sealed = [-1 - e for e in seen if e < 0]
                if unknown_sealed:      # once per sealed epoch and process
                    self._load_sealed(cur, unknown_sealed)
            except BaseException:
                if defer:
                    self._roll_back(conn)
                raise
        routing = FileRouting(self, filename, file_id, horizon, bool(indexed), floor_seq, epoch)
        routing.pending = defer
        routing.epochs = sorted({epoch, *(e if e >= 0 else -1 - e for e in seen)})
        routing.pruned = pruned
        return routing

    def _window_pruned(self, epochs: list[int], pruned: int) -> None:
        if epochs[0] < pruned:
            raise WindowPruned(f"the order index rows this file saw when first split were pruned (epoch {epochs[0]} < "
                               f"{pruned}; ORDER_INDEX_WINDOW {self.window:g} s): its returns without shop_id "
                               f"cannot be routed as they were")

    def visible_epochs(self, floor_seq: int, horizon: int, own_epoch: int, conn=None) -> list[int]:
        """The epochs holding the rows a file sees: its own and those whose files' sequence
        numbers meet [floor_seq, horizon] (maybe one more than needed, never one less).
        WindowPruned when pruning deleted any of them."""
        script = db.Script()
        script.add("epochs", "SELECT epoch FROM splitter_epoch WHERE last_seq >= %s AND first_seq <= %s",
                   (floor_seq, horizon))
        script.add("pruned", "SELECT pruned_epoch FROM splitter_seq WHERE id = 1")
        with (conn or self.conn()).cursor() as cur:
            got = script.run(cur)
        epochs = sorted({own_epoch, *(e for (e,) in got["epochs"].rows)})
        (pruned,) = got["pruned"].one()
        self._window_pruned(epochs, pruned)
        return epochs

    def lookup_async(self, routing: "FileRouting", orders: list[tuple[int, int]]) -> Future:
        """The same lookup on the lookup thread (its own connection), so the split goes on
        reading while the database answers."""
        if self._lookups is None:
            self._lookups = ThreadPoolExecutor(1, thread_name_prefix="order-lookup")
        return self._lookups.submit(self._lookup_on_thread, routing, orders)

    def _lookup_on_thread(self, routing: "FileRouting", orders: list[tuple[int, int]]) -> list[int | None]:
        return self.lookup(routing, orders, self._lookup.get())

    def lookup(self, routing: "FileRouting", orders: list[tuple[int, int]], conn=None,
               finish: tuple[int, bytes] | None = None, commit: bool = False) -> list[int | None]:
        """Shop of each (order_id, line): the nearest earlier purchase of this file, else the
        purchase of the earliest-indexed file of its window (indexed_seq in [floor, horizon]).
        `finish`: (purchases, last chunk) of a file whose every line was read: its `finalize`
        goes in the first statement's round trip, after the lookup (which it cannot change:
        the file's own rows it writes are later than the lookup's read, and its own earlier
        purchases were in memory), and EpochSealed is raised as `finalize` raises it.

        Each batch is one statement: the hot rows of the epochs this process believes unsealed,
        the buckets of those it knows sealed, and every epoch's sealed flag, all in one read
        view (and under the metadata lock that holds a TRUNCATE PARTITION back). An epoch the
        statement finds sealed meanwhile has its directory read and the batch runs again.
        `commit`: the pending opening (`open_file(defer=True)`) of a file whose index has
        nothing to complete is committed in the same round trip (with `finish`, the
        completion's transaction is the opening's)."""
        conn = conn or self.conn()
        file_id, floor_seq, horizon = routing.file_id, routing.floor_seq, routing.horizon
        if routing.epochs is None:
            routing.epochs = self.visible_epochs(floor_seq, horizon, routing.epoch, conn)
        epochs = routing.epochs
        if routing.pruned is not None:      # read by open_file: checked where it is used
            self._window_pruned(epochs, routing.pruned)
        ids = sorted({o for o, _ in orders})
        own: dict[int, list[tuple[int, int]]] = {}
        other: dict[int, tuple[int, int, int, int]] = {}

        def candidate(order_id: int, fid: int, line: int, shop_id: int, seq: int | None) -> None:
            if fid == file_id:
                own.setdefault(order_id, []).append((line, shop_id))
            elif seq is not None and floor_seq <= seq <= horizon:
                best = other.get(order_id)
                if best is None or (seq, fid, line) < best[:3]:
                    other[order_id] = (seq, fid, line, shop_id)

        # (epoch, order_id) pairs are ranges of the primary key; keep their number per query small.
        batch = max(1, LOOKUP_BATCH // len(epochs))
        state = then = None
        with conn.cursor() as cur:
            if finish is not None:
                statements = self._finalize_statements(file_id, routing.epoch, *finish, seen_from=epochs[0])
                begin = not routing.pending
                then = (("START TRANSACTION;" if begin else "")
                        + ";".join(sql if args is None else cur.mogrify(sql, args) for sql, args in statements)
                        + ";COMMIT", len(statements) + 1 + begin,
                        {sql.name: sql.data for sql, _ in statements if isinstance(sql, _LoadRows)})
            elif commit and routing.pending:
                then = ("COMMIT", 1)
            for start in range(0, len(ids), batch):
                part = ids[start:start + batch]
                while True:
                    known = {e: self._sealed.get(e) for e in epochs}
                    try:
                        rows, answered = self._refused_as_retry(self._lookup_rows, cur, known, part, file_id,
                                                                floor_seq, horizon, then)
                    except BaseException:
                        if then is not None:
                            self._roll_back(conn)
                        raise
                    if then is not None:
                        state, then = answered, None
                        routing.pending = False
                    flags = {epoch: sealed for kind, epoch, sealed, *_ in rows if kind == 2}
                    # The pruned mark in the same read view: one raised before this read
                    # began is seen, and rows it deletes after it began are still read.
                    self._window_pruned(epochs, max([0, *(epoch for kind, epoch, *_ in rows if kind == 3)]))
                    newly = [e for e in epochs if flags.get(e) and known[e] is None]
                    if not newly:
                        break
                    self._load_sealed(cur, newly)
                wanted = part     # sorted
                for kind, epoch, order_id, fid, line, shop_id, seq, entries in rows:
                    if kind == 0:
                        candidate(order_id, fid, line, shop_id, seq)
                    elif kind == 1:
                        files = known[epoch].files
                        for order_id, fid, line, shop_id in _entries_of(entries, wanted):
                            candidate(order_id, fid, line, shop_id, files.get(fid))
        if state is not None:
            self._finalized(routing.epoch, state)
        result: list[int | None] = []
        for order_id, line in orders:
            earlier = [(ln, shop) for ln, shop in own.get(order_id, ()) if ln < line]
            if earlier:
                result.append(max(earlier)[1])
            elif order_id in other:
                result.append(other[order_id][3])
            else:
                result.append(None)
        return result

    @staticmethod
    def _lookup_rows(cur, known: dict[int, SealedEpoch | None], part: list[int], file_id: int, floor_seq: int,
                     horizon: int, then: tuple[str, int, dict] | None = None) -> tuple[list[tuple], object]:
        """One statement, rows (kind, epoch, ...): 0, a hot row with its file's sequence (of the
        epochs `known` as not sealed); 1, a sealed bucket (its entries); 2, an epoch's sealed
        flag; 3, the pruned mark (in `epoch`). The statement answers in two columns, the kind
        and one value (a row's integers in one string): PyMySQL parses each column's
        descriptor for more CPU than splitting a few short strings costs. `then`: a script
        (its number of statements, and the files of its LOAD DATA by name) sent after it in
        the same round trip; the last value it answered comes back with the rows (else None)."""
        epochs = list(known)
        hot = [e for e, sealed in known.items() if sealed is None]
        buckets: list[tuple[int, list[int]]] = []
        for e, sealed in known.items():
            if sealed is not None:
                numbers = sorted({b for o in part for b in sealed.buckets(o)})
                if numbers:
                    buckets.append((e, numbers))
        selects: list[str] = []
        args: list[int] = []
        if hot:
            # Driven by the order index: left to itself the optimizer may start from the
            # (tiny) file table and walk every row of each file.
            # The file's sequence last: NULL (not indexed yet) is left out by CONCAT_WS.
            selects.append(f"SELECT 0, CONCAT_WS(' ', o.epoch, o.order_id, o.file_id, o.line, o.shop_id, f.indexed_seq) "
                           f"FROM splitter_order o FORCE INDEX (PRIMARY) "
                           f"STRAIGHT_JOIN splitter_file f ON f.file_id = o.file_id "
                           f"WHERE o.epoch IN ({','.join(['%s'] * len(hot))}) "
                           f"AND o.order_id IN ({','.join(['%s'] * len(part))}) "
                           f"AND (o.file_id = %s OR f.indexed_seq BETWEEN %s AND %s)")
            args += [*hot, *part, file_id, floor_seq, horizon]
        size = 0
        if buckets:
            # All the buckets in one value, each behind its epoch (4 bytes) and length (2): one
            # row to parse, not one per bucket (rendered from integers only).
            selects.append("SELECT 1, GROUP_CONCAT(UNHEX(LPAD(HEX(s.epoch), 8, '0')), "
                           "UNHEX(LPAD(HEX(LENGTH(s.entries)), 4, '0')), s.entries SEPARATOR '') "
                           "FROM splitter_sealed s WHERE "
                           + " OR ".join(f"(s.epoch = {e:d} AND s.bucket IN ({','.join(str(int(b)) for b in n)}))"
                                         for e, n in buckets))
            size = sum(len(n) for _, n in buckets) * (BUCKET * ENTRY.size + 6) + 1024
        selects.append(f"SELECT 2, CONCAT_WS(' ', e.epoch, e.sealed) FROM splitter_epoch e "
                       f"WHERE e.epoch IN ({','.join(['%s'] * len(epochs))})")
        selects.append("SELECT 3, pruned_epoch FROM splitter_seq WHERE id = 1")
        args += epochs
        sql = " UNION ALL ".join(selects)
        offered = None
        if then is not None:
            sql = cur.mogrify(sql, args) + ";" + then[0]
            args = None
            offered = then[2] if len(then) > 2 else None
        if offered:     # the script's LOAD DATA: its rows sent when the server asks for them
            if not isinstance(cur.connection, db.LocalDataConnection):
                raise TypeError("a completion's LOAD DATA needs the connection opened with local_infile")
            cur.connection.offered = offered
        try:
            return OrderIndex._lookup_answer(cur, sql, args, size, then)
        finally:
            if offered:
                cur.connection.offered = None

    @staticmethod
    def _lookup_answer(cur, sql: str, args, size: int, then) -> tuple[list[tuple], object]:
        if size > 1024:
            # Room for this statement's buckets, set in the same round trip (`SET STATEMENT
            # ... FOR` is MariaDB's only; the lookup connections run multi-statement scripts).
            cur.execute(f"SET SESSION group_concat_max_len = {size:d};{sql}", args)
            cur.nextset()
        else:
            cur.execute(sql, args)
        rows = []
        for kind, value in cur.fetchall():
            if kind == 0:
                epoch, order_id, fid, line, shop_id, *seq = (int(v) for v in value.split())
                rows.append((0, epoch, order_id, fid, line, shop_id, seq[0] if seq else None, None))
                continue
            if kind == 2:
                epoch, sealed = (int(v) for v in value.split())
                rows.append((2, epoch, sealed, None, None, None, None, None))
                continue
            if kind == 3:
                rows.append((3, int(value), None, None, None, None, None, None))
                continue
            packed, at = value or b"", 0
            while at < len(packed):
                epoch, length = _BUCKET_HEAD.unpack_from(packed, at)
                at += _BUCKET_HEAD.size
                rows.append((1, epoch, None, None, None, None, None, packed[at:at + length]))
                at += length
        answered = None
        for _ in range(then[1] if then is not None else 0):
            if not cur.nextset():
                raise pymysql.err.InterfaceError("a statement of the script after the lookup gave no result")
            if cur.description:
                answered = cur.fetchone()[0]
        return rows, answered

    def _load_sealed(self, cur, epochs: list[int]) -> None:
        """Read the directories of sealed epochs (unchanged until pruned: kept for good)."""
        cur.execute(f"SELECT epoch, dir, files FROM splitter_epoch WHERE sealed = 1 AND epoch IN "
                    f"({','.join(['%s'] * len(epochs))})", epochs)
        found = {epoch: SealedEpoch(directory, files) for epoch, directory, files in cur.fetchall()}
        for epoch in epochs:    # one gone meanwhile was pruned: it holds nothing any more
            self._keep_sealed(epoch, found.get(epoch) or SealedEpoch(b"", b""))

    def _keep_sealed(self, epoch: int, sealed: SealedEpoch) -> None:
        while len(self._sealed) >= SEALED_CACHE:
            self._sealed.pop(next(iter(self._sealed)), None)
        self._sealed[epoch] = sealed

    def finalize(self, file_id: int, epoch: int, purchases: int, last_chunk: bytes = b"",
                 also: list[str] = (), begun: bool = False) -> None:
        """Write the last chunk of rows and mark the file's index complete with the next
        sequence number (once), in one transaction and one round trip; the purchases count
        towards the current epoch, which moves on past `epoch_rows` (unless its partition of
        the ring still holds an epoch not truncated yet: then it grows until sealing caught up).
        `also`: statements of the caller's (rendered, no args) run in the same transaction, so
        they cost no round trip of their own (the file's rejected rows).
        EpochSealed when the file's epoch was closed for sealing first (nothing is marked;
        `also` is committed all the same). `begun`: the transaction is open already (a deferred
        opening's)."""
        conn = self.conn()
        with conn.cursor() as cur:
            statements = self._finalize_statements(file_id, epoch, purchases, last_chunk, also)
            script = db.Script()
            if not begun:
                script.add("begin", "START TRANSACTION")
            for n, (sql, args) in enumerate(statements):
                if isinstance(sql, _LoadRows):
                    script.load(str(n), sql, sql.name.decode(), sql.data)
                else:
                    script.add(str(n), sql, args)
            script.add("end", "COMMIT")
            try:
                state = self._refused_as_retry(script.run, cur)[str(len(statements) - 1)].one()[0]
            except BaseException:
                self._roll_back(conn)
                raise
        self._finalized(epoch, state)

    def _refused_as_retry(self, run, *args):
        """`run(*args)`; a refused LOAD DATA LOCAL of a completion as `InfileRefused` (and
        INSERTs from now on)."""
        try:
            return run(*args)
        except (pymysql.err.OperationalError, pymysql.err.InternalError, pymysql.err.ProgrammingError) as exc:
            if not self.use_infile or not exc.args or exc.args[0] not in db.LOCAL_INFILE_REFUSED:
                raise
            log.warning("LOAD DATA LOCAL INFILE refused (%s); indexing with INSERTs instead", exc)
            self.use_infile = False
            raise InfileRefused(f"the order index's LOAD DATA LOCAL was refused ({exc}): split again") from None

    def commit_main(self, also: list[str] = ()) -> None:
        """Commit the bookkeeping connection's open transaction, `also` (rendered) run in it first."""
        conn = self.conn()
        with conn.cursor() as cur:
            transaction = db.Transaction(cur)
            transaction.open = True
            try:
                transaction.finish(*((sql, None) for sql in also))
            except BaseException:
                self._roll_back(conn)
                raise

    def roll_back_main(self) -> None:
        """Roll back what the bookkeeping connection holds open, without connecting anew; a
        connection that cannot is dropped (the next use reconnects, nothing left open)."""
        conn = self._main.conn
        if conn is None:
            return
        try:
            conn.rollback()
        except Exception:
            self._main.discard()

    @staticmethod
    def _roll_back(conn) -> None:
        try:
            conn.rollback()
        except Exception:
            pass

    def _finalize_statements(self, file_id: int, epoch: int, purchases: int, last_chunk: bytes,
                             also: list[str] = (), seen_from: int | None = None) -> list[tuple[str, tuple | None]]:
        """`finalize`'s transaction but its START and COMMIT; the last one answers one value,
        for `_finalized`. `seen_from`: the first epoch the file's lookups read; the index is
        not completed (nothing marked, as for a sealed epoch) when pruning has passed it, so a
        completion sent with a lookup that pruning failed completes nothing."""
        # The caller's statements first: the sequence's row lock is taken after them.
        statements = [(sql, None) for sql in also]
        if last_chunk:
            # LOAD DATA where the server takes it: it parses a row for less than an INSERT's text.
            statements.append((_LoadRows.of(file_id, epoch, last_chunk) if self.use_infile
                               else _insert_rows_sql(last_chunk, epoch), None))
        # The completion itself is one procedure (migration 0004): its six statements, and
        # the OK packet of each, were ~0.1 ms of server and client CPU per file.
        statements += [
            (_FINALIZE, (file_id, epoch, purchases, self.epoch_rows, RING, seen_from)),
            ("SELECT @splitter_state", None),
        ]
        return statements

    def _finalized(self, epoch: int, state) -> None:
        """What the completion's last statement answered: EpochSealed if the file's index is
        not complete; sealing due if an epoch waits for it."""
        indexed, current, closed, sealed, truncated = (int(v) for v in state.split())
        if not indexed:
            raise EpochSealed(f"order index epoch {epoch} was closed for sealing before this file's index completed "
                              f"(a split longer than {self.seal_grace:g} s, or resumed): split it again")
        if (closed < current and closed != self._held_open) or sealed < closed or truncated < sealed:
            self._seal_due = True

    # -- pruning ------------------------------------------------------------------------------

    def prune_due(self, now: float) -> bool:
        return self._seal_due or self._pruned_at is None or now - self._pruned_at >= self.prune_every

    def prune(self, now: float | None = None) -> int:
        """The pass the splitter runs between files and when idle (when `prune_due`): sealing
        (one epoch a call at most) when a file's completion found work for it or `prune_every`
        passed, then, every `prune_every`, the pruning of epochs no file can still see; the rows
        it deleted. A sealing that fails other than by the database being unreachable is
        logged, not raised: the split it follows is done, and unsealed rows stay correct."""
        now = time.monotonic() if now is None else now
        due = self._pruned_at is None or now - self._pruned_at >= self.prune_every or self._prune_more
        try:
            if due or self._seal_due:
                self.seal()
        except db.UNAVAILABLE:
            raise
        except Exception:
            log.exception("order index: sealing failed; the hot rows stay (the epoch grows until it succeeds)")
        return self._prune(now) if due else 0

    # -- sealing ------------------------------------------------------------------------------

    def seal(self) -> int | None:
        """Seal the oldest closed epoch not sealed yet, closing it first when it may be (older
        than the current epoch, and no file of it unindexed and opened within `seal_grace`),
        then empty the partitions of sealed epochs (at most RING). The epoch sealed, if any.
        One sealer at a time per database (a named lock); another busy: nothing to do here."""
        self._seal_due = False
        conn = self.conn()
        with conn.cursor() as cur:
            cur.execute("SELECT GET_LOCK(CONCAT('splitter_seal.', DATABASE()), 0)")
            if cur.fetchone()[0] != 1:
                return None
            try:
                sealed = self._seal_locked(cur)
                self._truncate_sealed(cur)
                return sealed
            finally:
                cur.execute("DO RELEASE_LOCK(CONCAT('splitter_seal.', DATABASE()))")

    def _state(self, cur) -> tuple[int, int, int, int, int]:
        cur.execute("SELECT epoch, closed_below, sealed_below, truncated_below, pruned_epoch FROM splitter_seq WHERE id = 1")
        return cur.fetchone()

    def _seal_locked(self, cur) -> int | None:
        current, closed, sealed, truncated, pruned = self._state(cur)
        if min(closed, sealed, truncated) < pruned:
            # Epochs pruning removed are neither sealed nor truncated: their rows were deleted.
            cur.execute("UPDATE splitter_seq SET closed_below = GREATEST(closed_below, pruned_epoch), "
                        "sealed_below = GREATEST(sealed_below, pruned_epoch), "
                        "truncated_below = GREATEST(truncated_below, pruned_epoch) WHERE id = 1")
            current, closed, sealed, truncated, pruned = self._state(cur)
        if sealed == closed:
            if closed >= current:
                return None
            cur.execute("SELECT COUNT(*) FROM splitter_file WHERE indexed_seq IS NULL AND epoch = %s "
                        "AND opened_at >= NOW(3) - INTERVAL %s SECOND", (closed, self.seal_grace))
            if cur.fetchone()[0]:
                self._held_open = closed    # a file may still be splitting into it: the periodic pass looks again
                return None
            # From now on a file of this epoch whose index is not complete is refused (finalize
            # reads closed_below under the same row lock), so its rows can change no more.
            cur.execute("UPDATE splitter_seq SET closed_below = %s WHERE id = 1 AND closed_below = %s",
                        (closed + 1, closed))
            closed += 1
        epoch = sealed
        self._seal_epoch(cur, epoch)
        self._seal_due = True   # the next pass looks for more
        return epoch

    def _seal_epoch(self, cur, epoch: int) -> None:
        """Pack the epoch's rows into buckets (server-side, in pieces of at most
        SEAL_PIECE_BYTES, by order_id range), then, in one transaction, its directory, its
        files and its sealed flag. A sealing cut short starts the epoch again from nothing
        (its buckets are invisible until the flag is set)."""
        cur.execute("SELECT @@max_allowed_packet")
        cap = min(SEAL_PIECE_BYTES, int(cur.fetchone()[0]) - 4096) // ENTRY.size * ENTRY.size
        cur.execute("SET SESSION group_concat_max_len = %s", (cap + ENTRY.size,))
        cur.execute("DELETE FROM splitter_sealed WHERE epoch = %s", (epoch,))
        bucket_bytes = BUCKET * ENTRY.size
        directory: list[bytes] = []
        pieces = [(-2**63, 2**63 - 1)]
        while pieces:
            low, high = pieces.pop()
            cur.execute(f"SELECT GROUP_CONCAT({_PACK_ROW} SEPARATOR '') INTO @sealing FROM splitter_order "
                        f"FORCE INDEX (PRIMARY) WHERE epoch = %s AND order_id BETWEEN %s AND %s", (epoch, low, high))
            cur.execute("SELECT COALESCE(LENGTH(@sealing), 0)")
            size = cur.fetchone()[0]
            if size > cap and low < high:
                middle = (low + high) // 2      # too many for one statement: halves, lower first
                pieces += [(middle + 1, high), (low, middle)]
                continue
            if size % ENTRY.size:
                raise RuntimeError(f"sealing epoch {epoch}: packed {size} bytes, not whole entries")
            count = -(-size // bucket_bytes)
            if not count:
                continue
            # Sliced by the server, the packed bytes passed as a parameter of a prepared
            # statement: read from the variable itself, SUBSTRING would copy all of it for
            # every bucket, and a derived table holding it is an on-disk temporary table.
            seq = _integers(count)
            script = db.Script()
            script.add("vars", "SET @sealing_epoch = %s, @sealing_first = %s", (epoch, len(directory)))
            script.add("prepare", "PREPARE splitter_seal_put FROM %s",
                       (f"INSERT INTO splitter_sealed (epoch, bucket, entries) SELECT ?, ? + seq, "
                        f"SUBSTRING(?, seq * {bucket_bytes:d} + 1, {bucket_bytes:d}) FROM {seq} ORDER BY seq",))
            script.add("put", "EXECUTE splitter_seal_put USING @sealing_epoch, @sealing_first, @sealing")
            script.add("prepare", "PREPARE splitter_seal_dir FROM %s",
                       (f"SELECT GROUP_CONCAT(SUBSTRING(?, seq * {bucket_bytes:d} + 1, 8) ORDER BY seq SEPARATOR '') "
                        f"FROM {seq}",))
            script.add("dir", "EXECUTE splitter_seal_dir USING @sealing")
            script.add("free", "DEALLOCATE PREPARE splitter_seal_put")
            script.add("free", "DEALLOCATE PREPARE splitter_seal_dir")
            got = script.run(cur)
            starts = got["dir"].one()[0] or b""
            if len(starts) != 8 * count or got["put"].rowcount != count:
                raise RuntimeError(f"sealing epoch {epoch}: {count} buckets, {got['put'].rowcount} written, "
                                   f"{len(starts)} bytes of directory")
            directory += [starts[at:at + 8] for at in range(0, len(starts), 8)]
        cur.execute("SET @sealing = NULL")
        starts = SealedEpoch(b"".join(directory), b"").starts
        if any(a > b for a, b in zip(starts, starts[1:])):
            raise RuntimeError(f"sealing epoch {epoch}: the server packed rows out of key order")
        db.Transaction(cur).finish(
            ("SELECT GROUP_CONCAT(UNHEX(CONCAT(LPAD(HEX(f.file_id),8,'0'),LPAD(HEX(f.indexed_seq),16,'0'))) SEPARATOR '') "
             "INTO @sealing_files FROM splitter_epoch e JOIN splitter_file f "
             "ON f.indexed_seq BETWEEN e.first_seq AND e.last_seq WHERE e.epoch = %s AND f.epoch = %s", (epoch, epoch)),
            ("INSERT INTO splitter_epoch (epoch, first_seq, last_seq, sealed, dir, files) "
             "VALUES (%s, 0, -1, 1, %s, COALESCE(@sealing_files, '')) "
             "ON DUPLICATE KEY UPDATE sealed = 1, dir = VALUES(dir), files = VALUES(files)",
             (epoch, b"".join(directory))),
            ("UPDATE splitter_seq SET sealed_below = GREATEST(sealed_below, %s) WHERE id = 1", (epoch + 1,)),
            ("SET @sealing_files = NULL", None))
        log.info("order index: sealed epoch %d into %d buckets", epoch, len(starts))

    def _truncate_sealed(self, cur) -> None:
        """Empty the partition of each sealed epoch not truncated yet, in order. Safe when no
        epoch not sealed yet shares the partition, which the ring guarantees (an epoch starts
        only on a partition already truncated); epochs from before the ring (migration 0003)
        may share one: their rows are deleted instead."""
        for _ in range(RING):
            current, closed, sealed, truncated, pruned = self._state(cur)
            t = max(truncated, pruned)
            if t >= sealed:
                return
            mate = t + (current - t) // RING * RING      # the last epoch <= current in t's partition
            if mate < sealed:
                cur.execute("SET SESSION lock_wait_timeout = %s", (TRUNCATE_LOCK_WAIT,))
                try:
                    cur.execute(f"ALTER TABLE splitter_order TRUNCATE PARTITION p{t % RING:d}")
                finally:
                    cur.execute("SET SESSION lock_wait_timeout = DEFAULT")
            else:
                while cur.execute("DELETE FROM splitter_order WHERE epoch = %s LIMIT %s", (t, PRUNE_ROWS)) >= PRUNE_ROWS:
                    pass
            cur.execute("UPDATE splitter_seq SET truncated_below = GREATEST(truncated_below, %s) WHERE id = 1", (t + 1,))

    # -- pruning ------------------------------------------------------------------------------

    def _prune(self, now: float) -> int:
        """Delete the epochs no file can still see (hot rows and sealed buckets deleted; at
        most PRUNE_STATEMENTS DELETEs a call). Kept: every epoch of a file indexed within two
        windows, or opened within two windows and not indexed yet, and the current epoch."""
        self._pruned_at = now
        keep = 2 * self.window
        script = db.Script()
        script.add("seq", "SELECT epoch, pruned_epoch FROM splitter_seq WHERE id = 1")
        script.add("indexed", "SELECT MIN(e.epoch) FROM splitter_epoch e "
                              "WHERE e.last_seq >= (SELECT f.indexed_seq FROM splitter_file f "
                              "WHERE f.indexed_at >= NOW(3) - INTERVAL %s SECOND ORDER BY f.indexed_at LIMIT 1)",
                   (keep,))
        script.add("open", "SELECT MIN(epoch) FROM splitter_file WHERE indexed_seq IS NULL "
                           "AND opened_at >= NOW(3) - INTERVAL %s SECOND", (keep,))
        with self.conn().cursor() as cur:
            got = script.run(cur)
            current, pruned = got["seq"].one()
            candidates = [current, *(r[0] for tag in ("indexed", "open") for r in got[tag].rows if r[0] is not None)]
            below = min(candidates)
            if below > pruned:
                cur.execute("UPDATE splitter_seq SET pruned_epoch = GREATEST(pruned_epoch, %s) WHERE id = 1", (below,))
            elif self._prune_more:
                below = pruned              # the last call stopped halfway: go on
            else:
                return 0
            for epoch in [e for e in list(self._sealed) if e < below]:   # list(): the lookup thread adds
                self._sealed.pop(epoch, None)
            cur.execute("UPDATE splitter_epoch SET dir = NULL, files = NULL WHERE epoch < %s AND dir IS NOT NULL",
                        (below,))
            deleted, statements, self._prune_more = 0, 0, False
            for table in ("splitter_order", "splitter_sealed"):
                while True:
                    if table == "splitter_sealed":     # counted in purchases, as the hot rows are
                        # (Lengths in the derived table, not the BLOBs: a BLOB there makes
                        # MariaDB write an on-disk temporary table.)
                        cur.execute("SELECT COALESCE(SUM(n), 0) FROM (SELECT LENGTH(entries) AS n FROM splitter_sealed "
                                    "WHERE epoch < %s LIMIT %s) s", (below, PRUNE_ROWS))
                        deleted += int(cur.fetchone()[0]) // ENTRY.size
                    n = cur.execute(f"DELETE FROM {table} WHERE epoch < %s LIMIT %s", (below, PRUNE_ROWS))
                    deleted += n if table == "splitter_order" else 0
                    statements += 1
                    if n < PRUNE_ROWS:
                        break
                    if statements >= PRUNE_STATEMENTS:
                        self._prune_more = True
                        self._pruned_at = None      # more to delete: the next call goes on
                        break
                if self._prune_more:
                    break
        if deleted:
            log.info("order index: pruned %d rows of epochs below %d", deleted, below)
        return deleted

    def load(self, name: str, data: bytes, epoch: int = 0) -> None:
        """Load one TSV chunk (order_id, file_id, line, shop_id) into `epoch`; the same rows
        again are a no-op."""
        conn = self.loader_conn()
        if self.use_infile:
            try:
                with conn.cursor() as cur:
                    db.load_local(cur, _LOAD_ROWS, (name, epoch), name, data)
                return
            except (pymysql.err.OperationalError, pymysql.err.InternalError, pymysql.err.ProgrammingError) as exc:
                if not exc.args or exc.args[0] not in db.LOCAL_INFILE_REFUSED:
                    raise
                log.warning("LOAD DATA LOCAL INFILE refused (%s); indexing with INSERTs instead", exc)
                self.use_infile = False
        with conn.cursor() as cur:
            batch: list[tuple[int, ...]] = []
            for row in data.splitlines():
                batch.append((*(int(v) for v in row.split(b"\t")), epoch))
                if len(batch) >= INSERT_BATCH:
                    self._insert(cur, batch)
                    batch = []
            if batch:
                self._insert(cur, batch)

    @staticmethod
    def _insert(cur, rows) -> None:
        cur.executemany("INSERT INTO splitter_order (order_id, file_id, line, shop_id, epoch) "
                        "VALUES (%s,%s,%s,%s,%s) ON DUPLICATE KEY UPDATE shop_id = shop_id", rows)

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.shutdown(wait=True)
            self._lookups = None
        self.reset()


class FileRouting:
    """The index as one split of one file sees it: purchases are added as lines are read,
    shop-less returns are looked up in memory first, then in the database."""

    def __init__(self, index: OrderIndex, filename: str, file_id: int, horizon: int, indexed: bool,
                 floor_seq: int = 0, epoch: int = 0):
        self.index = index
        self.filename = filename
        self.file_id = file_id
        self.horizon = horizon
        self.floor_seq = floor_seq
        self.epoch = epoch
        self.epochs: list[int] | None = None   # the epochs its lookups read (open_file's, else on the first)
        self.pruned: int | None = None         # the pruned mark open_file read with them
        self.indexed = indexed          # a previous split indexed it: nothing to write
        self.pending = False            # its row is in a transaction still open (open_file's `defer`)
        self.current: dict[int, int] = {}
        # The current chunk's purchases, flat: order_id, line, shop_id, order_id, ... (the
        # splitting loop extends it; formatted once per chunk, not once per row).
        self.rows: list[int] = []
        self.rotate_rows = 3 * CHUNK
        self.inflight: deque[dict[int, int]] = deque()
        self._rows_before = 0
        self._chunk_no = 0
        self._row_format = b"%%d\t%d\t%%d\t%%d\n" % file_id
        self._submitted = 0
        self._loaded = 0
        self._error: BaseException | None = None
        self._queue: deque[tuple[str, bytes]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- the hot path ---------------------------------------------------------------------

    @property
    def purchases(self) -> int:
        return self._rows_before + len(self.rows) // 3

    def add_purchase(self, order_id: int, shop_id: int, line: int) -> None:
        """What the splitting loop does inline (then `rotate_due` now and then)."""
        self.current[order_id] = shop_id
        self.rows.extend((order_id, line, shop_id))
        if self.rotate_due():
            self.rotate()

    def rotate_due(self) -> bool:
        return len(self.rows) >= self.rotate_rows

    def local(self, order_id: int) -> int | None:
        """Shop of the nearest earlier purchase of this file still held in memory."""
        shop = self.current.get(order_id)
        if shop is not None:
            return shop
        for chunk in reversed(self.inflight):
            shop = chunk.get(order_id)
            if shop is not None:
                return shop
        return None

    def lookup(self, orders: list[tuple[int, int]], finish: bool = False) -> list[int | None]:
        """`finish`: every line was read; when the index has a completion to send
        (`finalizes`), it goes with the lookup, one round trip for both (`finish` then has
        nothing left to do)."""
        self._raise_loader_error()
        if not (finish and self.finalizes):
            return self.index.lookup(self, orders, commit=finish and not self.finalizes)
        _, data = self._chunk()
        self._stop_loader()
        self._raise_loader_error()
        result = self.index.lookup(self, orders, finish=(self.purchases, data))
        self.indexed = True
        return result

    def lookup_async(self, orders: list[tuple[int, int]]) -> Future:
        """Rows this lookup needs from this file are those of chunks already dropped from
        memory, which were loaded before they were dropped: no need to wait for the loader."""
        self._raise_loader_error()
        self.settle()
        return self.index.lookup_async(self, orders)

    def settle(self, also: list[str] = ()) -> None:
        """Commit a deferred opening (another connection is about to read the file's row, or
        the split is done), with `also` (see `finalize`) in its transaction."""
        if self.pending:
            self.pending = False
            self.index.commit_main(also)
        elif also:
            raise ValueError("statements for a file whose index is complete or has no purchases: nothing is sent")

    # -- chunks and the loader --------------------------------------------------------------

    def _chunk(self) -> tuple[str, bytes]:
        """The current chunk as TSV, named for the LOAD DATA statement (no such file exists),
        its rows in key order (order_id, then line): random order ids written as they come
        land on a random page of the epoch's range each, sorted they walk the range once (the
        server's CPU per row ~25% lower, for ~0.2 us of sorting here; docs/performance.md,
        "The order index written in key order"). The rows are the same in any order."""
        rows = self.rows
        name = f"{self.filename}.orders.{self._chunk_no + 1}.tsv"
        count = len(rows) // 3
        if not count:
            return name, b""
        lines = ((self._row_format * count) % tuple(rows)).splitlines(True)
        ids = rows[0::3]
        return name, b"".join([lines[i] for i in sorted(range(count), key=ids.__getitem__)])

    def _next_chunk(self) -> None:
        self._chunk_no += 1
        self._rows_before += len(self.rows) // 3
        self.rows = []

    def rotate(self) -> None:
        """The current chunk goes to the loader (the caller takes `current` and `rows` anew)."""
        self.settle()
        self.inflight.append(self.current)
        self.current = {}
        if self.indexed:
            self._next_chunk()
            while len(self.inflight) > MAX_INFLIGHT:
                self.inflight.popleft()
            return
        with self._cond:
            self._queue.append(self._chunk())
            self._submitted += 1
            self._cond.notify_all()
        self._next_chunk()
        if self._thread is None:
            self._thread = threading.Thread(target=self._load_loop, name="order-index-loader", daemon=True)
            self._thread.start()
        with self._cond:
            while self._submitted - self._loaded > MAX_INFLIGHT and self._error is None:
                self._cond.wait(0.5)
            loaded = self._loaded
        self._raise_loader_error()
        while len(self.inflight) > self._submitted - loaded:
            self.inflight.popleft()

    def _load_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                name, data = self._queue[0]
            try:
                self.index.load(name, data, self.epoch)
            except BaseException as exc:
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._queue.popleft()
                self._loaded += 1
                self._cond.notify_all()

    def _raise_loader_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop_loader(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None

    @property
    def finalizes(self) -> bool:
        """Whether the index has a completion to send."""
        return not self.indexed and self.purchases > 0

    @property
    def carries(self) -> bool:
        """Whether `finish` will send a transaction (which can carry the caller's statements):
        the completion's, or a deferred opening's commit."""
        return self.finalizes or self.pending

    def finish(self, also: list[str] = ()) -> None:
        """Write what is left and mark the file's index complete (a file without purchases
        has nothing anyone could see: it costs no statement). `also`: see `finalize`; sent
        only when `carries` said so. A deferred opening is committed here if nothing did yet."""
        if self.indexed:
            self.settle(also)
            return
        _, data = self._chunk()
        self._stop_loader()
        self._raise_loader_error()
        purchases = self.purchases
        if purchases:
            begun, self.pending = self.pending, False
            self.index.finalize(self.file_id, self.epoch, purchases, data, also, begun)
        else:
            self.settle(also)
        self.indexed = True

    def abort(self) -> None:
        """Stop loading and drop the chunks (the split was abandoned); a deferred opening is
        rolled back (nothing was published: a later split opens the file afresh)."""
        with self._cond:
            self._queue.clear()
        self._stop_loader()
        self.rows = []
        if self.pending:
            self.pending = False
            self.index.roll_back_main()
