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
never waits for the loader.
"""
from __future__ import annotations

import io
import logging
import threading
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
LOOKUP_BATCH = 1000   # order ids per lookup query
INSERT_BATCH = 2000

log = logging.getLogger(Stage.SPLITTER)


class OrderIndex:
    """Long-lived: owns the splitter's two connections to the pipeline database (one for
    lookups and bookkeeping, one for the loader thread; never shared between threads)."""

    def __init__(self, url: MySQLURL, use_infile: bool = True):
        self.url = url
        self.use_infile = use_infile
        # Not checked before each use (a split uses them thousands of times): after an error
        # `reset` drops them and the next use reconnects.
        self._main = db.Reconnecting(url, check_after=None)
        self._loader = db.Reconnecting(url, check_after=None, local_infile=use_infile)
        self._lookup = db.Reconnecting(url, check_after=None)
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
        """Fix the file's horizon on its first split and read it back (same for every replica)."""
        self.ensure_schema()
        with self.conn().cursor() as cur:
            cur.execute("INSERT INTO splitter_file (filename, horizon) SELECT %s, value FROM splitter_seq "
                        "WHERE id = 1 ON DUPLICATE KEY UPDATE horizon = horizon", (filename,))
            cur.execute("SELECT file_id, horizon, indexed_seq FROM splitter_file WHERE filename = %s", (filename,))
            file_id, horizon, indexed_seq = cur.fetchone()
        return FileRouting(self, filename, file_id, horizon, indexed_seq is not None)

    def lookup_async(self, file_id: int, horizon: int, orders: list[tuple[int, int]]) -> Future:
        """The same lookup on the lookup thread (its own connection), so the split goes on
        reading while the database answers."""
        if self._lookups is None:
            self._lookups = ThreadPoolExecutor(1, thread_name_prefix="order-lookup")
        return self._lookups.submit(self._lookup_on_thread, file_id, horizon, orders)

    def _lookup_on_thread(self, file_id: int, horizon: int, orders: list[tuple[int, int]]) -> list[int | None]:
        return self.lookup(file_id, horizon, orders, self._lookup.get())

    def lookup(self, file_id: int, horizon: int, orders: list[tuple[int, int]], conn=None) -> list[int | None]:
        """Shop of each (order_id, line): the nearest earlier purchase of this file, else the
        purchase of the earliest-indexed file visible at the horizon."""
        ids = sorted({o for o, _ in orders})
        own: dict[int, list[tuple[int, int]]] = {}
        other: dict[int, tuple[int, int, int, int]] = {}
        with (conn or self.conn()).cursor() as cur:
            for start in range(0, len(ids), LOOKUP_BATCH):
                part = ids[start:start + LOOKUP_BATCH]
                marks = ",".join(["%s"] * len(part))
                # Driven by the order index: left to itself the optimizer may start from the
                # (tiny) file table and walk every row of each file.
                cur.execute(f"SELECT o.order_id, o.file_id, o.line, o.shop_id, f.indexed_seq "
                            f"FROM splitter_order o FORCE INDEX (ix_splitter_order) "
                            f"STRAIGHT_JOIN splitter_file f ON f.file_id = o.file_id "
                            f"WHERE o.order_id IN ({marks}) AND (o.file_id = %s OR f.indexed_seq <= %s)",
                            (*part, file_id, horizon))
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

    def finalize(self, file_id: int, purchases: int) -> None:
        """Mark the file's index complete with the next sequence number (once)."""
        conn = self.conn()
        conn.begin()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT value FROM splitter_seq WHERE id = 1 FOR UPDATE")
                (value,) = cur.fetchone()
                cur.execute("SELECT indexed_seq FROM splitter_file WHERE file_id = %s FOR UPDATE", (file_id,))
                (seq,) = cur.fetchone()
                if seq is None:
                    cur.execute("UPDATE splitter_seq SET value = %s WHERE id = 1", (value + 1,))
                    cur.execute("UPDATE splitter_file SET indexed_seq = %s, indexed_at = NOW(3), purchases = %s "
                                "WHERE file_id = %s", (value + 1, purchases, file_id))
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                pass
            raise

    def load(self, name: str, data: bytes) -> None:
        """Load one TSV chunk (order_id, file_id, line, shop_id); the same rows again are a no-op."""
        conn = self.loader_conn()
        if self.use_infile:
            try:
                with conn.cursor() as cur:
                    db.load_local(cur, "LOAD DATA LOCAL INFILE %s REPLACE INTO TABLE splitter_order "
                                       "(order_id, file_id, line, shop_id)", (name,), name, data)
                return
            except (pymysql.err.OperationalError, pymysql.err.InternalError, pymysql.err.ProgrammingError) as exc:
                if not exc.args or exc.args[0] not in db.LOCAL_INFILE_REFUSED:
                    raise
                log.warning("LOAD DATA LOCAL INFILE refused (%s); indexing with INSERTs instead", exc)
                self.use_infile = False
        with conn.cursor() as cur:
            batch: list[tuple[int, ...]] = []
            for row in data.splitlines():
                batch.append(tuple(int(v) for v in row.split(b"\t")))
                if len(batch) >= INSERT_BATCH:
                    self._insert(cur, batch)
                    batch = []
            if batch:
                self._insert(cur, batch)

    @staticmethod
    def _insert(cur, rows) -> None:
        cur.executemany("INSERT INTO splitter_order (order_id, file_id, line, shop_id) VALUES (%s,%s,%s,%s) "
                        "ON DUPLICATE KEY UPDATE shop_id = shop_id", rows)

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.shutdown(wait=True)
            self._lookups = None
        self.reset()


class FileRouting:
    """The index as one split of one file sees it: purchases are added as lines are read,
    shop-less returns are looked up in memory first, then in the database."""

    def __init__(self, index: OrderIndex, filename: str, file_id: int, horizon: int, indexed: bool):
        self.index = index
        self.filename = filename
        self.file_id = file_id
        self.horizon = horizon
        self.indexed = indexed          # a previous split indexed it: nothing to write
        self.purchases = 0
        self.current: dict[int, int] = {}
        self.inflight: deque[dict[int, int]] = deque()
        self._chunk_no = 0
        self._tsv: io.BytesIO | None = None
        self._submitted = 0
        self._loaded = 0
        self._error: BaseException | None = None
        self._queue: deque[tuple[str, bytes]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        if not indexed:
            self._open_chunk()

    # -- the hot path ---------------------------------------------------------------------

    def add_purchase(self, order_id: int, shop_id: int, line: int) -> None:
        self.purchases += 1
        self.current[order_id] = shop_id
        if self._tsv is not None:
            self._tsv.write(b"%d\t%d\t%d\t%d\n" % (order_id, self.file_id, line, shop_id))
        if len(self.current) >= CHUNK:
            self._rotate()

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
        return self.index.lookup(self.file_id, self.horizon, orders)

    def lookup_async(self, orders: list[tuple[int, int]]) -> Future:
        """Rows this lookup needs from this file are those of chunks already dropped from
        memory, which were loaded before they were dropped: no need to wait for the loader."""
        self._raise_loader_error()
        return self.index.lookup_async(self.file_id, self.horizon, orders)

    # -- chunks and the loader --------------------------------------------------------------

    def _open_chunk(self) -> None:
        self._chunk_no += 1
        self._tsv = io.BytesIO()

    def _chunk(self) -> tuple[str, bytes]:
        """The current chunk, named for the LOAD DATA statement (no such file exists)."""
        return f"{self.filename}.orders.{self._chunk_no}.tsv", self._tsv.getvalue()

    def _rotate(self) -> None:
        self.inflight.append(self.current)
        self.current = {}
        if self.indexed:
            while len(self.inflight) > MAX_INFLIGHT:
                self.inflight.popleft()
            return
        with self._cond:
            self._queue.append(self._chunk())
            self._submitted += 1
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._load_loop, name="order-index-loader", daemon=True)
            self._thread.start()
        self._open_chunk()
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
                self.index.load(name, data)
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
        """Load what is left and mark the file's index complete."""
        if self.indexed:
            return
        name, data = self._chunk()
        self._tsv = None
        self._stop_loader()
        self._raise_loader_error()
        self.index.load(name, data)
        self.index.finalize(self.file_id, self.purchases)
        self.indexed = True

    def abort(self) -> None:
        """Stop loading and drop the chunks (the split was abandoned)."""
        with self._cond:
            self._queue.clear()
        self._stop_loader()
        self._tsv = None
