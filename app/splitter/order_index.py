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
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
import pymysql

from .. import db
from ..config import MySQLURL
from ..stages import Stage

# The order index's migrations: db/migrations/splitter/ (applied by `db.migrate`).
SCHEMA = "splitter"
INT64_MAX = 2**63 - 1
CHUNK = 4096          # purchases per TSV chunk handed to the loader
MAX_INFLIGHT = 2      # chunks loaded concurrently with the split before it waits
LOOKUP_BATCH = 1000   # order ids per lookup query (divided among the epochs looked in)
INSERT_BATCH = 2000
EPOCH_ROWS = 1 << 18  # purchases per epoch: a few MiB of the tree is where writes land
PRUNE_EVERY = 60.0    # seconds between two looks for epochs to prune
PRUNE_ROWS = 20_000   # rows per DELETE statement (each its own short transaction)
PRUNE_STATEMENTS = 50  # DELETEs per prune call at most; the rest waits for the next
DEFAULT_WINDOW = 7 * 86400.0

log = logging.getLogger(Stage.SPLITTER)

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


def _insert_rows_sql(tsv: bytes, epoch: int) -> str:
    """A TSV chunk of integers this module formatted, as one multi-row INSERT (no input text)."""
    values = tsv[:-1].replace(b"\t", b",").replace(b"\n", b",%d),(" % epoch).decode("ascii")
    return (f"INSERT INTO splitter_order (order_id, file_id, line, shop_id, epoch) VALUES ({values},{epoch:d}) "
            f"ON DUPLICATE KEY UPDATE shop_id = shop_id")


class WindowPruned(Exception):
    """A re-split needs rows that pruning has deleted: it could not route as its first split did."""


class OrderIndex:
    """Long-lived: owns the splitter's connections to the pipeline database (one for
    bookkeeping, one for the loader thread, one for lookups; never shared between threads).
    `window`: ORDER_INDEX_WINDOW in seconds; `epoch_rows`, `prune_every`: for tests."""

    def __init__(self, url: MySQLURL, use_infile: bool = True, window: float = DEFAULT_WINDOW,
                 epoch_rows: int = EPOCH_ROWS, prune_every: float = PRUNE_EVERY):
        self.url = url
        self.use_infile = use_infile
        self.window = float(window)
        self.epoch_rows = epoch_rows
        self.prune_every = prune_every
        self._pruned_at: float | None = None
        # Not checked before each use (a split uses them thousands of times): after an error
        # `reset` drops them and the next use reconnects.
        self._main = db.Reconnecting(url, check_after=None, multi_statements=True)
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

    def open_file(self, filename: str) -> "FileRouting":
        """Fix the file's horizon and window floor on its first split and read them back (the
        same for every replica, every re-split); one round trip. A file whose index is not
        complete writes into the current epoch."""
        self.ensure_schema()
        script = db.Script()
        script.add("open", _OPEN_FILE, (filename, self.window))
        script.add("file", "SELECT file_id, horizon, floor_seq, epoch, indexed_seq FROM splitter_file "
                           "WHERE filename = %s", (filename,))
        with self.conn().cursor() as cur:
            file_id, horizon, floor_seq, epoch, indexed_seq = script.run(cur)["file"].one()
        return FileRouting(self, filename, file_id, horizon, indexed_seq is not None, floor_seq, epoch)

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
        if epochs[0] < pruned:
            raise WindowPruned(f"the order index rows this file saw when first split were pruned (epoch {epochs[0]} < "
                               f"{pruned}; ORDER_INDEX_WINDOW {self.window:g} s): its returns without shop_id "
                               f"cannot be routed as they were")
        return epochs

    def lookup_async(self, routing: "FileRouting", orders: list[tuple[int, int]]) -> Future:
        """The same lookup on the lookup thread (its own connection), so the split goes on
        reading while the database answers."""
        if self._lookups is None:
            self._lookups = ThreadPoolExecutor(1, thread_name_prefix="order-lookup")
        return self._lookups.submit(self._lookup_on_thread, routing, orders)

    def _lookup_on_thread(self, routing: "FileRouting", orders: list[tuple[int, int]]) -> list[int | None]:
        return self.lookup(routing, orders, self._lookup.get())

    def lookup(self, routing: "FileRouting", orders: list[tuple[int, int]], conn=None) -> list[int | None]:
        """Shop of each (order_id, line): the nearest earlier purchase of this file, else the
        purchase of the earliest-indexed file of its window (indexed_seq in [floor, horizon])."""
        conn = conn or self.conn()
        file_id, floor_seq, horizon = routing.file_id, routing.floor_seq, routing.horizon
        if routing.epochs is None:
            routing.epochs = self.visible_epochs(floor_seq, horizon, routing.epoch, conn)
        epochs = routing.epochs
        ids = sorted({o for o, _ in orders})
        own: dict[int, list[tuple[int, int]]] = {}
        other: dict[int, tuple[int, int, int, int]] = {}
        # (epoch, order_id) pairs are ranges of the primary key; keep their number per query small.
        batch = max(1, LOOKUP_BATCH // len(epochs))
        epoch_marks = ",".join(["%s"] * len(epochs))
        with conn.cursor() as cur:
            for start in range(0, len(ids), batch):
                part = ids[start:start + batch]
                marks = ",".join(["%s"] * len(part))
                # Driven by the order index: left to itself the optimizer may start from the
                # (tiny) file table and walk every row of each file.
                cur.execute(f"SELECT o.order_id, o.file_id, o.line, o.shop_id, f.indexed_seq "
                            f"FROM splitter_order o FORCE INDEX (PRIMARY) "
                            f"STRAIGHT_JOIN splitter_file f ON f.file_id = o.file_id "
                            f"WHERE o.epoch IN ({epoch_marks}) AND o.order_id IN ({marks}) "
                            f"AND (o.file_id = %s OR f.indexed_seq BETWEEN %s AND %s)",
                            (*epochs, *part, file_id, floor_seq, horizon))
                for order_id, fid, line, shop_id, seq in cur.fetchall():
                    if fid == file_id:
                        own.setdefault(order_id, []).append((line, shop_id))
                    else:
                        best = other.get(order_id)
                        if best is None or (seq, fid, line) < best[:3]:
                            other[order_id] = (seq, fid, line, shop_id)
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

    def finalize(self, file_id: int, epoch: int, purchases: int, last_chunk: bytes = b"") -> None:
        """Write the last chunk of rows and mark the file's index complete with the next
        sequence number (once), in one transaction and one round trip; the purchases count
        towards the current epoch, which moves on past `epoch_rows`."""
        statements = []
        if last_chunk:
            statements.append((_insert_rows_sql(last_chunk, epoch), None))
        statements += [
            ("SELECT value, epoch, epoch_rows INTO @seq, @epoch, @rows FROM splitter_seq WHERE id = 1 FOR UPDATE",
             None),
            ("UPDATE splitter_file SET indexed_seq = @seq + 1, indexed_at = NOW(3), purchases = %s "
             "WHERE file_id = %s AND indexed_seq IS NULL", (purchases, file_id)),
            ("SET @done = ROW_COUNT()", None),
            ("INSERT INTO splitter_epoch (epoch, first_seq, last_seq) SELECT %s, @seq + 1, @seq + 1 FROM DUAL "
             "WHERE @done > 0 ON DUPLICATE KEY UPDATE first_seq = LEAST(first_seq, VALUES(first_seq)), "
             "last_seq = GREATEST(last_seq, VALUES(last_seq))", (epoch,)),
            ("UPDATE splitter_seq SET value = @seq + 1, epoch = IF(@rows + %s >= %s, @epoch + 1, @epoch), "
             "epoch_rows = IF(@rows + %s >= %s, 0, @rows + %s) WHERE id = 1 AND @done > 0",
             (purchases, self.epoch_rows, purchases, self.epoch_rows, purchases)),
        ]
        conn = self.conn()
        with conn.cursor() as cur:
            try:
                db.Transaction(cur).finish(*statements)
            except BaseException:
                try:
                    conn.rollback()
                except Exception:
                    pass
                raise

    # -- pruning ------------------------------------------------------------------------------

    def prune_due(self, now: float) -> bool:
        return self._pruned_at is None or now - self._pruned_at >= self.prune_every

    def prune(self, now: float | None = None) -> int:
        """Delete the epochs no file can still see (rows deleted; at most PRUNE_STATEMENTS
        DELETEs a call). Kept: every epoch of a file indexed within two windows, or opened
        within two windows and not indexed yet, and the current epoch."""
        self._pruned_at = time.monotonic() if now is None else now
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
            if below <= pruned:
                return 0
            cur.execute("UPDATE splitter_seq SET pruned_epoch = GREATEST(pruned_epoch, %s) WHERE id = 1", (below,))
            deleted = 0
            for _ in range(PRUNE_STATEMENTS):
                n = cur.execute("DELETE FROM splitter_order WHERE epoch < %s LIMIT %s", (below, PRUNE_ROWS))
                deleted += n
                if n < PRUNE_ROWS:
                    break
            else:
                self._pruned_at = None      # more to delete: the next call goes on
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
                    db.load_local(cur, "LOAD DATA LOCAL INFILE %s REPLACE INTO TABLE splitter_order "
                                       "(order_id, file_id, line, shop_id) SET epoch = %s", (name, epoch), name, data)
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
        self.epochs: list[int] | None = None   # the epochs its lookups read (on the first one)
        self.indexed = indexed          # a previous split indexed it: nothing to write
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

    def lookup(self, orders: list[tuple[int, int]]) -> list[int | None]:
        self._raise_loader_error()
        return self.index.lookup(self, orders)

    def lookup_async(self, orders: list[tuple[int, int]]) -> Future:
        """Rows this lookup needs from this file are those of chunks already dropped from
        memory, which were loaded before they were dropped: no need to wait for the loader."""
        self._raise_loader_error()
        return self.index.lookup_async(self, orders)

    # -- chunks and the loader --------------------------------------------------------------

    def _chunk(self) -> tuple[str, bytes]:
        """The current chunk as TSV, named for the LOAD DATA statement (no such file exists)."""
        rows = self.rows
        return (f"{self.filename}.orders.{self._chunk_no + 1}.tsv",
                (self._row_format * (len(rows) // 3)) % tuple(rows) if rows else b"")

    def _next_chunk(self) -> None:
        self._chunk_no += 1
        self._rows_before += len(self.rows) // 3
        self.rows = []

    def rotate(self) -> None:
        """The current chunk goes to the loader (the caller takes `current` and `rows` anew)."""
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

    def finish(self) -> None:
        """Write what is left and mark the file's index complete (a file without purchases
        has nothing anyone could see: it costs no statement)."""
        if self.indexed:
            return
        _, data = self._chunk()
        self._stop_loader()
        self._raise_loader_error()
        purchases = self.purchases
        if purchases:
            self.index.finalize(self.file_id, self.epoch, purchases, data)
        self.indexed = True

    def abort(self) -> None:
        """Stop loading and drop the chunks (the split was abandoned)."""
        with self._cond:
            self._queue.clear()
        self._stop_loader()
        self.rows = []
