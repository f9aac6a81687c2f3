"""shard-worker: `python -m app.worker --shard N` — dedup, business rules and the out-of-order
cache for one shard, with every decision recorded so a re-run repeats it exactly.

A file is decided in batches of WORKER_BATCH_LINES lines; each batch's decisions (one code byte
per line) commit in the same transaction as the state they change (seen keys, balances, the
ledger, stock, shop status, holds). A re-run replays the recorded batches and decides only the
rest, and the prepared and rejected files are always written from the records, so they come out
the same byte for byte. See docs/business-rules.md.
"""
from __future__ import annotations

import gc
import hashlib
import itertools
from itertools import compress
import logging
import stat
import sys
import time
from contextlib import contextmanager
from typing import Any, Optional

import msgspec
import orjson
import pymysql

from .. import db, layout, rejected, safefiles
from ..atomic import atomic_writes
from ..config import Settings
from ..daemon import (Context, Done, Failed, InputMissing, Retryable, StageWork, StopRequested, TaskFailed,
                      run_shard_stage)
from ..db import DEADLOCK_CODES, UNAVAILABLE
from ..db import DUP_ENTRY as DUPLICATE_KEY
from ..events import PRICE_CHANGE, PURCHASE, RESTOCK, RETURN, SHOP_STATUS
from ..lines import READ_BUFFER, LineReader, TooLarge
from ..overlap import Behind, ReadAhead, Turns
from ..stages import Stage
from .ledger import Ledger, LedgerConflict
from .rules import (ACCEPTED, DUPLICATE, HELD, MALFORMED, ORPHAN_RETURN, PURCHASE_REJECTED, REASON,
                    TOO_LARGE, WRONG_SHARD, Bad, Event, Order, add_seconds, amounts_check, lines_validator, minute_of,
                    purchase, refund, stock_change, validator)
from .state import SCHEMA, BatchRecord, FileStart, Hold, Recent, SeenConflict, WorkerState

log = logging.getLogger(Stage.WORKER)
BATCH_RETRIES = 8
SHARD_LOCK_WAIT = 5.0
PRUNE_EVERY = 60.0        # while idle
PRUNE_FILE_EVERY = 1.0    # after a file, at least this often (and whenever a pass may have more: `_prune_after`)
PRUNE_ROWS = 20_000       # rows a pass deletes from a table at most
SWITCH_INTERVAL = 0.0005
# Rejected lines quote whatever input arrived and are not part of the contract: private.
REJECTED_MODE = 0o600
# Claimed files of the shard up to this size are decided together (`WorkerStage.group`): one
# start script, one transaction, one commit, one folder fsync for all; each still gets its own
# records, so a re-run of any one replays alone. 0: every file on its own.
GROUP_FILE_BYTES = 1 << 20
# A group is one batch (`WorkerStage._decide_group_tx`) of at most this many lines and BATCH_BYTES
# bytes (its statements' size): four files of 1 MiB, or 64 of 500 lines.
GROUP_LINES = 32_000
PAUSE_LINES = 256         # lines a helper thread handles between looks at whose turn it is
# A batch also ends once its lines hold this many bytes, so a file of long lines is decided in
# small batches: memory (a batch read ahead, one deciding, one being written) and the batch's
# statements (a held return's line is stored) stay bounded whatever the lines' size.
BATCH_BYTES = 4 << 20


_ACCEPTED_ONLY = bytes(int(c == ACCEPTED) for c in range(256))   # codes.translate(): 1 where accepted, else 0
_PREPARED = ('{"event_key":"%s","event_type":%d,"shop_id":%s,"user_id":%s,"timestamp":"%s","shard":%d,'
             '"order_id":%s,"good_id":%s,"qty":%s,"amount":%s,"source_file":%s,"payload":%s}\n')


class _Prepared(msgspec.Struct, gc=False):
    """A prepared line's fields in the brief's order, as `PreparedLines.lines` has msgspec print
    them (`source_file` and `payload` are JSON text already, copied as they are)."""

    event_key: str
    event_type: int
    shop_id: Optional[int]
    user_id: Optional[int]
    timestamp: str
    shard: int
    order_id: Optional[int]
    good_id: Optional[int]
    qty: Optional[int]
    amount: Any
    source_file: msgspec.Raw
    payload: msgspec.Raw


_PRINT_LINES = msgspec.json.Encoder(decimal_format="string").encode_lines


class PreparedLines:
    """The sender's input lines of one (file, shard) (format fixed in the brief), as orjson
    prints the dict of those fields in that order: the key, the timestamp and the amount hold no
    character JSON escapes (the key is a type and a number or hex digits, the timestamp passed
    `valid_time`, the amount is a Decimal's digits), the payload is orjson's text (or the line's
    own, `Event.payload_json`, a `msgspec.Raw` printed as it is, UTF-8 as msgspec checked). The shard and the file's name are put in
    the templates once.

    `lines` renders many at a time, as the worker does: a `_Prepared` Struct per event (one C
    call with its fields), and msgspec's `encode_lines` prints them all, newline after each, in
    one C call; msgspec prints exactly what the template would (the ints as digits, None as
    `null`, a Decimal as its `str` in quotes, the file's name and the payload as the JSON text
    given), and an Event's fields its type leaves null are None (`rules.validate` sets exactly
    the others), so each line is what `__call__`, the generic template, renders for it. A
    template per event type with its nulls in, the lines' templates joined and formatted in one
    str operation and one encode, cost ~0.3 µs a line more: each line's tuple of values, the
    payload's str and the format's parsing were Python's work per line."""

    def __init__(self, shard: int, source_file: str):
        source = orjson.dumps(source_file).decode().replace("%", "%%")
        self.template = _PREPARED.replace('"shard":%d', '"shard":%d' % shard).replace(
            '"source_file":%s', '"source_file":' + source)
        self.shard, self.source = shard, msgspec.Raw(orjson.dumps(source_file))

    def __call__(self, ev: Event, shop_id: int | None) -> bytes:
        payload, amount = ev.payload_json, ev.amount
        user, order, good, qty = ev.user_id, ev.order_id, ev.good_id, ev.qty
        return (self.template % (
            ev.key, ev.etype, "null" if shop_id is None else shop_id, "null" if user is None else user, ev.ts,
            "null" if order is None else order, "null" if good is None else good, "null" if qty is None else qty,
            "null" if amount is None else '"%s"' % amount,
            orjson.dumps(ev.payload).decode() if payload is None else bytes(payload).decode())).encode()

    def lines(self, events: list[Event], shop_of: dict[int, int]) -> bytes:
        """The prepared lines of `events`, in order; a return is output with its purchase's
        shop, `shop_of[order_id]` (a decided batch's `ShopOf`: its orders asked here, without
        a Python call of its `__getitem__` per return)."""
        shard, source, make, raw = self.shard, self.source, _Prepared, msgspec.Raw
        orders = shop_of.orders if type(shop_of) is ShopOf else None
        items = []
        add = items.append
        for ev in events:
            payload = ev.payload_json
            etype = ev.etype
            if etype == RETURN:
                shop = shop_of[ev.order_id] if orders is None else orders[ev.order_id].shop_id
            else:
                shop = ev.shop_id
            add(make(ev.key, etype, shop, ev.user_id, ev.ts, shard, ev.order_id, ev.good_id, ev.qty, ev.amount, source,
                     raw(orjson.dumps(ev.payload)) if payload is None else payload))
        return _PRINT_LINES(items)


def prepared_line(ev: Event, shop_id: int | None, shard: int, source_file: str) -> bytes:
    """One line of `PreparedLines` (the worker keeps one renderer per file)."""
    return PreparedLines(shard, source_file)(ev, shop_id)


def rejected_line(raw: bytes, code: int, detail: str | None, source_file: str, line_no: int) -> bytes:
    """One rejected line: why, where from, and the line (for a line over MAX_LINE_BYTES only
    its first bytes, marked `line_truncated`)."""
    record = {"reason": REASON[code]}
    if detail:
        record["detail"] = detail
    record.update(source_file=source_file, line_no=line_no,
                  line=raw.rstrip(b"\r\n").decode("utf-8", "replace"))
    if type(raw) is TooLarge:
        record["line_truncated"] = True
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def digest(lines: list[bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for line in lines:
        h.update(line)
    return h.digest()


class Counts:
    """Per-file figures sent with `done` (and shown by GET /files/{filename})."""

    def __init__(self):
        self.lines = self.accepted = self.held = self.released = self.expired = 0
        self.bom_skipped = 0
        self.rejected: dict[str, int] = {}

    def reject(self, code: int) -> None:
        reason = REASON[code]
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def stats(self) -> dict:
        out = {"in": self.lines, "accepted": self.accepted, "rejected": dict(sorted(self.rejected.items())),
               "held": self.held, "released": self.released, "expired": self.expired}
        if self.bom_skipped:  # the splitter never writes one: only a file put here by hand has it
            out["bom_skipped"] = self.bom_skipped
        return out


class Batch:
    """What deciding one batch changed, written in its transaction."""

    def __init__(self):
        self.new_keys: list = []    # dedup keys (Event.dkey) first recorded by this batch
        self.return_minutes: dict[int, int] = {}   # the minute of each return among them
        self.new_orders: list[Order] = []
        self.credited: dict[int, Order] = {}
        self.changed_users: set[int] = set()
        self.changed_stock: set[tuple[int, int]] = set()
        self.changed_shops: dict[int, tuple[bool, str]] = {}
        self.holds: dict[tuple[int, int], Hold] = {}
        self.resolved: list[Hold] = []


class Plan:
    """What a batch will look up, worked out from its lines alone (in the read-ahead thread)."""

    def __init__(self, events: list, rules):
        """One pass over the batch (six set comprehensions over it cost half again as much)."""
        returns, purchases, keys, pairs, shops, users = [], set(), set(), set(), set(), set()
        dedup, takes = rules.dedup, rules.purchase_takes_stock
        for e in events:
            if type(e) is not Event:
                continue
            etype = e.etype
            if etype == PURCHASE:
                purchases.add(e.order_id)
                shops.add(e.shop_id)
                users.add(e.user_id)
                if takes:
                    pairs.add((e.shop_id, e.good_id))
                continue
            if dedup:
                keys.add(e.dkey)
            if etype == RETURN:
                returns.append(e)
            elif etype == RESTOCK:
                pairs.add((e.shop_id, e.good_id))
            elif etype == SHOP_STATUS:
                shops.add(e.shop_id)
        self.returns, self.purchases, self.keys = returns, purchases, keys
        self.pairs, self.shops, self.users = pairs, shops, users

    @classmethod
    def joined(cls, plans: list["Plan"]) -> "Plan":
        """What a group's files look up together (`WorkerStage._decide_group_tx`)."""
        plan = cls.__new__(cls)
        plan.returns = [e for p in plans for e in p.returns]
        for name in ("purchases", "keys", "pairs", "shops", "users"):
            setattr(plan, name, set().union(*(getattr(p, name) for p in plans)))
        return plan


class ShopOf:
    """`order id -> shop` of a decided batch's orders, asked only for the returns it outputs
    (a dict of every order of the batch, made per batch, cost more than the returns' lookups)."""

    __slots__ = ("orders",)

    def __init__(self, orders: dict[int, Order]):
        self.orders = orders

    def __getitem__(self, order_id: int) -> int:
        return self.orders[order_id].shop_id


class Found:
    """What a batch's lookup answered besides the orders, balances and stock (`FileRun._look_up`)."""

    __slots__ = ("seen", "shops", "new_users", "adopted")

    def __init__(self, seen: set, shops: dict, new_users: set, adopted: list):
        self.seen, self.shops, self.new_users, self.adopted = seen, shops, new_users, adopted


class FileRun:
    """One (file, shard) task: replay what is recorded, decide the rest, write the outputs."""

    def __init__(self, stage: "WorkerStage", filename: str, ctx: Context):
        self.stage = stage
        self.settings = stage.settings
        self.rules = stage.settings.rules
        self.state = stage.state
        self.ledger = stage.ledger
        self.shard = stage.shard
        self.filename = filename
        self.ctx = ctx
        self.counts = Counts()
        self.prepare = PreparedLines(stage.shard, filename)
        self.seq = 0
        self.turns = Turns()
        limits = (stage.shard, stage.settings.shard_count, stage.settings.max_line_bytes, stage.settings.max_json_depth)
        self.validate, self.validate_lines = validator(*limits), lines_validator(*limits)

    # -- the task ------------------------------------------------------------------------------

    def run(self, f: LineReader, start: FileStart) -> Done:
        self.begin(start)
        info = start.info
        self.uncommitted = False   # the file's one batch decided and written, its transaction open
        try:
            with atomic_writes(self.outputs(), root=self.settings.shared_dir) as (out, rej):
                self.open_outputs(out, rej)
                line_no = self._replay(f, start.records)
                if not info.complete:
                    self._decide_rest(f, line_no)
                elif not f.at_end():
                    raise TaskFailed(f"{self.filename} shard {self.shard} has more lines than when it was decided")
                self.finish_outputs()
                if self.uncommitted:
                    self.stage.commit(self.rej.take(), self.newest)
                    self.uncommitted = False
                    self.stage.remember([self.b])
        except BaseException:
            if self.uncommitted:
                self.stage.roll_back()
            raise
        return self.done(f)

    def begin(self, start: FileStart) -> None:
        """Where the file starts from: its row, the holds it resolved (a re-run), the shard's
        active holds and clock."""
        info = start.info
        if info.pruned:
            raise TaskFailed(f"the decisions of {self.filename} shard {self.shard} were pruned (it was decided "
                             f"longer than REPLAY_WINDOW ago): it cannot be replayed")
        self.file_id = info.id
        resolved = start.resolved
        self.seq = max((h.resolved_seq for h in resolved), default=0)
        self.pending: dict[int, list[Hold]] = {}
        for h in resolved:
            self.pending.setdefault(h.resolved_line, []).append(h)
        self.holds = start.holds
        self.newest = start.newest
        self.idle_expired = start.idle_expired

    def outputs(self) -> list:
        """Both outputs in one batch: one opening of the folder, one ledger write and one folder
        fsync per file instead of one each per output (each still appears whole or not at all)."""
        shared = self.settings.shared_dir
        return [(layout.worker_output(shared, self.filename, self.shard), 0o644),
                (layout.worker_rejected(shared, self.filename, self.shard), REJECTED_MODE)]

    def open_outputs(self, out, rej) -> None:
        self.out = out
        self.rej = rejected.writer(self.settings.pipeline_db).tee(rej.write, self.filename, Stage.WORKER, self.shard)

    def finish_outputs(self) -> None:
        """The resolved holds due after the file's last line (a re-run's), the rejected rows."""
        if self.pending:
            left = [h for line in sorted(self.pending) for h in self.pending[line]]
            accepted: list = []
            self._emit_resolved(left, accepted, before=None)
            if accepted:
                self.out.write(self.prepare.lines(accepted, self._return_shops([], b"", 0, left)))
                self.counts.accepted += len(accepted)
        if not self.rej.deferred:   # else they go with the commit (`WorkerStage.commit`)
            self.rej.flush()

    def done(self, f: LineReader) -> Done:
        if f.bom:
            self.counts.bom_skipped = 1
        return Done(events=self.counts.accepted, stats=self.counts.stats())

    def _replay(self, f: LineReader, records: list[BatchRecord]) -> int:
        line_no = 1
        for rec in records:
            if rec.first_line != line_no:
                raise TaskFailed(f"recorded decisions of {self.filename} have a gap at line {line_no}")
            raws = f.take(rec.line_count)
            if len(raws) != rec.line_count or digest(raws) != rec.digest:
                raise TaskFailed(f"{self.filename} shard {self.shard} lines {line_no}-{line_no + rec.line_count - 1}"
                                 f" differ from those first decided: the splitter output changed")
            events = self.validate_lines(raws)
            self._emit(raws, rec.first_line, rec.codes, events, self._return_shops(events, rec.codes, rec.first_line))
            line_no += rec.line_count
            self.ctx.check()
        return line_no

    def _read(self, f: LineReader):
        """Batches of lines, validated (runs in the read-ahead thread)."""
        while True:
            batch = self._read_batch(f, self.turns.pause)
            yield batch
            if batch[-1]:
                return

    def _read_batch(self, f: LineReader, pause=None):
        """The next batch: its lines, their events, its Plan, its digest, whether it is the last.
        `pause`: called every PAUSE_LINES lines (in a helper thread, to give the deciding loop
        its turns)."""
        raws = f.take(self.settings.worker_batch_lines, BATCH_BYTES)
        return self._batch(raws, f.at_end(), pause)

    def _batch(self, raws: list[bytes], last: bool, pause=None):
        """`_read_batch` for lines taken already."""
        check = self.validate_lines
        if pause is None:   # no turns to give (a group's files, a file's first batch): one call, no slices
            events = check(raws)
        else:
            events = []
            for i in range(0, len(raws), PAUSE_LINES):
                pause()
                events.extend(check(raws[i:i + PAUSE_LINES]))
            pause()
        return raws, events, Plan(events, self.rules), digest(raws), last

    def _decide_rest(self, f, line_no: int) -> None:
        """Decide the undecided lines: reading and validating run one batch ahead and writing
        the outputs one batch behind, in threads, while this one waits for the database. The
        first batch is read here: when it is the last (every small file) there is nothing to
        overlap, and it is decided and written without starting the two threads."""
        raws, events, plan, dig, last = first = self._read_batch(f)
        if last:
            # its transaction stays open while the outputs are written: the commit takes the
            # rejected rows along (`run`, `WorkerStage.commit`)
            codes, shops, resolved = self._decide(raws, events, plan, dig, line_no, last, adopt=self.idle_expired,
                                                  commit=False)
            self.rej.deferred = True
            self._emit_batch((raws, line_no, codes, events, shops, resolved), helper=False)
            return
        adopt = self.idle_expired
        with ReadAhead(itertools.chain([first], self._read(f)), self.turns) as batches, \
                Behind(self._emit_batch, self.turns) as emitter:
            for raws, events, plan, dig, last in batches:
                codes, shops, resolved = self._decide(raws, events, plan, dig, line_no, last, adopt=adopt)
                emitter.put((raws, line_no, codes, events, shops, resolved))
                adopt = False
                line_no += len(raws)
                if not last:
                    self.ctx.check()

    def _emit_batch(self, item, helper: bool = True) -> None:
        """Write a decided batch's outputs (`helper`: in the write-behind thread, which pauses
        for the deciding loop's turns)."""
        raws, first_line, codes, events, shops, resolved = item
        for h in resolved:
            self.pending.setdefault(h.resolved_line, []).append(h)
        self._emit(raws, first_line, codes, events, shops, self.turns.pause if helper else None)

    # -- deciding a batch ---------------------------------------------------------------------------

    def _decide(self, raws, events, plan, dig, first_line, last, adopt, commit: bool = True):
        """Decide a batch in one transaction, retried on conflicts. The first attempt looks up
        only keys and orders this process saw lately (`Recent`) and takes the others for new;
        the inserts' affected-row counts catch a wrong guess, and the batch is decided again
        with everything looked up. Without `commit` the transaction is left open (`self.uncommitted`)."""
        conn = self.state.conn
        seq = self.seq
        optimistic = True
        for attempt in range(BATCH_RETRIES):
            try:
                with conn.cursor() as cur:
                    result = self._decide_tx(cur, raws, events, plan, dig, first_line, last, adopt, optimistic)
                if not commit:
                    self.uncommitted = True
                    return result
                with self.turns.waiting():
                    conn.commit()
                self.stage.remember([self.b])
                return result
            except (LedgerConflict, SeenConflict, pymysql.err.OperationalError, pymysql.err.InternalError,
                    pymysql.err.ProgrammingError) as exc:
                conn.rollback()
                refused = self.state.infile_refused(exc)   # LOAD DATA LOCAL refused: INSERTs from now on
                retry = refused or not isinstance(exc, pymysql.err.MySQLError) or (exc.args and
                                                                                  exc.args[0] in DEADLOCK_CODES)
                if not retry or attempt == BATCH_RETRIES - 1:
                    raise
                if refused:
                    log.warning("%s lines %d+: LOAD DATA LOCAL INFILE refused (%s); the worker's state goes in by "
                                "INSERTs instead", self.filename, first_line, exc)
                elif optimistic and not isinstance(exc, pymysql.err.MySQLError):
                    log.info("%s lines %d+: %s; deciding the batch again with every key looked up",
                             self.filename, first_line, exc)
                else:
                    # Two shards locking one user's balance may deadlock now and then; InnoDB picks a
                    # victim and a second try goes through. Only a batch that keeps losing is news.
                    log.log(logging.INFO if attempt == 0 else logging.WARNING,
                            "%s lines %d+: %s; deciding the batch again", self.filename, first_line, exc)
                    time.sleep(0.05 * attempt)
                optimistic = False
                self.seq = seq
                self.holds = self.state.active_holds()
                self.newest = self.state.newest()
            except BaseException:
                conn.rollback()
                raise
        raise AssertionError("unreachable")

    def _decide_tx(self, cur, raws, events, plan, dig, first_line, last, adopt, optimistic):
        """Three round trips: one script reads (and locks) what the batch needs, the lines are
        decided in memory, one script writes everything; the caller commits. (A group of small
        files is one such batch across its files: `WorkerStage._decide_group_tx`.)"""
        found = self._look_up(cur, plan, adopt, optimistic)
        b = self.b = Batch()
        for h in found.adopted:
            self._resolve(b, h, "expired", ORPHAN_RETURN, first_line)
        was = self.newest
        codes, batch_newest = self._decide_lines(raws, events, first_line, found.seen, set(), found.shops)
        writes = db.Script()
        writes.add("record", self.state.record_sql(cur.connection, self.file_id, first_line, len(raws), dig,
                                                   bytes(codes), last, batch_newest))
        self._write(cur, writes, [b], found.new_users, was)
        return bytes(codes), ShopOf(self.orders), b.resolved

    def _look_up(self, cur, plan, adopt, optimistic) -> "Found":
        """Start the transaction and read (locking the balances) what `plan` needs, in one
        script: the orders, balances and stock become this run's (`self.orders`, ...); the
        seen keys, shops, users to create and idle-expired holds to adopt are answered."""
        rules, st, ledger, conn = self.rules, self.state, self.ledger, cur.connection
        returns = plan.returns
        # purchases are deduplicated by worker_orders, everything else by worker_seen
        order_ids, lookup = plan.purchases, plan.keys
        if optimistic:
            recent_orders, recent_keys = self.stage.recent_orders, self.stage.recent_keys
            order_ids = recent_orders.among(order_ids)
            lookup = recent_keys.among(lookup) | st.sealed_keys(lookup)
        order_ids = order_ids | {e.order_id for e in returns}
        reads = db.Script()
        reads.add("begin", "START TRANSACTION")
        if adopt:
            reads.add("adopt", st.idle_expired_sql())
        if lookup:
            reads.add("seen", st.seen_sql(conn, lookup))
        if order_ids:
            reads.add("orders", ledger.orders_sql(conn, order_ids))
        if plan.pairs:
            reads.add("stock", st.stock_sql(conn, plan.pairs))
        if plan.shops:
            reads.add("shops", st.shops_sql(conn, plan.shops))
        # the users of purchases, and of returns (most credit an earlier purchase's user): one
        # locking read in ascending user order, where locking the returns' users after the
        # orders came back was a round trip more and let two shard workers lock out of order
        users = plan.users | {e.user_id for e in returns}
        if users:
            reads.add("balances", ledger.lock_sql(conn, users))
        with self.turns.waiting():
            got = reads.run(cur)
        seen = st.parse_seen(got.get("seen", ((), 0))[0])
        orders = ledger.parse_orders(got.get("orders", ((), 0))[0])
        stock = {(s, g): c for s, g, c in got.get("stock", ((), 0))[0]}
        shops = {s: bool(a) for s, a in got.get("shops", ((), 0))[0]}
        balances, new_users = ledger.balances(got.get("balances", ((), 0))[0], users, cur)
        # returns of earlier purchases credit those purchases' users (a return whose user is not
        # its purchase's is a return_mismatch and moves nothing)
        # (the ledger keeps a digest of the purchase's user: a return that matches it names the user)
        # (every return's user was locked above)
        credits = {e.user_id for e in returns if (o := orders.get(e.order_id)) is not None and o.debited
                   and o.credit is None}
        if rules.purchase_takes_stock:
            extra = {(orders[e.order_id].shop_id, e.good_id) for e in returns if e.order_id in orders} - plan.pairs
            if extra:
                cur.execute(st.stock_sql(conn, extra))
                stock.update(((s, g), c) for s, g, c in cur.fetchall())
        if new_users and not optimistic:
            # only users this batch may change: not the user of a return that credits nothing
            ledger.create_users(cur, new_users & (plan.users | credits))
            new_users = set()
        self.orders, self.balances, self.stock = orders, balances, stock
        return Found(seen, shops, new_users, st.parse_holds(got.get("adopt", ((), 0))[0]) if adopt else [])

    def _decide_lines(self, raws, events, first_line: int, seen: set, batch_keys: set, shops: dict):
        """Decide a batch's lines in memory (into `self.b`), from the state looked up and what
        the lines before changed (`batch_keys`: keys recorded since the lookup, the files before
        in a group's included). Their codes, and the batch's newest event time."""
        rules, b = self.rules, self.b
        orders, stock = self.orders, self.stock
        codes = bytearray(len(raws))
        newest = self.newest or ""
        batch_newest = None
        hold_seconds = self.settings.hold_seconds
        dedup = rules.dedup
        holds = self.holds
        for i, ev in enumerate(events):
            if type(ev) is Bad:
                codes[i] = ev.code
                continue
            line = first_line + i
            ts = ev.ts
            if ts > newest:
                newest = ts
            if batch_newest is None or ts > batch_newest:
                batch_newest = ts
            if holds.heap and holds.heap[0][0] < newest:
                for h in holds.expired(newest):
                    self._resolve(b, h, "expired", ORPHAN_RETURN, line)
            etype = ev.etype
            if etype == PURCHASE:
                if ev.order_id in orders:
                    codes[i] = DUPLICATE  # an order is decided once, whatever RULE_DEDUP says
                    continue
                code = codes[i] = self._purchase(ev, line, shops)
                if ev.order_id in holds.by_order:
                    for h in holds.take(ev.order_id):
                        h.event = h.event or self.validate(h.raw)
                        rc = self._refund(h.event) if code == ACCEPTED else PURCHASE_REJECTED
                        self._resolve(b, h, "released", rc, line)
                continue
            key = ev.dkey
            if key in seen or key in batch_keys:
                if dedup:
                    codes[i] = DUPLICATE
                    continue
            if etype == RETURN:
                order = orders.get(ev.order_id)
                code = amounts_check(ev, rules)
                if code:
                    pass
                elif order is None:
                    expires = add_seconds(ts, hold_seconds)
                    if hold_seconds <= 0 or expires < newest:
                        code = ORPHAN_RETURN
                    else:
                        h = Hold(self.file_id, line, self.filename, ev.order_id, raws[i], ts, expires)
                        h.event = ev
                        holds.add(h)
                        b.holds[(h.file_id, h.line)] = h
                        code = HELD
                elif not order.debited:
                    code = PURCHASE_REJECTED
                elif order.credit is not None and dedup:
                    code = DUPLICATE
                else:
                    code = self._refund(ev)
                codes[i] = code
                if code != ACCEPTED and code != DUPLICATE:
                    batch_keys.add(key)
                    b.new_keys.append(key)
                    b.return_minutes[key] = minute_of(ts)
                continue
            batch_keys.add(key)
            b.new_keys.append(key)
            if etype == RESTOCK:
                pair = (ev.shop_id, ev.good_id)
                count = stock.get(pair, 0)
                code = codes[i] = stock_change(count, ev.qty, rules)
                if code == ACCEPTED:
                    stock[pair] = count + ev.qty
                    b.changed_stock.add(pair)
            elif etype == PRICE_CHANGE:
                codes[i] = amounts_check(ev, rules)
            else:
                shops[ev.shop_id] = ev.active
                b.changed_shops[ev.shop_id] = (ev.active, ts)
        self.newest = newest or None
        return codes, batch_newest

    def _write(self, cur, writes, batches: list, new_users: set, was: str | None) -> None:
        """Add the state `batches` changed (one batch's, or a group's files' in order) to
        `writes` (which holds their records) and run it, checking that no other worker wrote
        a key, order or user of them meanwhile. `was`: the shard clock before them."""
        st, conn = self.state, cur.connection
        if len(batches) == 1:
            b = batches[0]
        else:
            b = Batch()
            for one in batches:
                b.new_keys += one.new_keys
                b.return_minutes.update(one.return_minutes)
                b.new_orders += one.new_orders
                b.credited.update(one.credited)
                b.changed_users |= one.changed_users
                b.changed_stock |= one.changed_stock
                b.changed_shops.update(one.changed_shops)
                b.holds.update(one.holds)
        st.add_seen(writes, "seen", b.new_keys, b.return_minutes)
        credited = list(b.credited.values())
        self.ledger.add_writes(writes, conn, self.shard, self.file_id, b.new_orders, credited, self.balances,
                               b.changed_users, new_users, infile=st.use_infile)
        writes.add("stock", st.stock_write_sql(conn, self.stock, b.changed_stock))
        writes.add("shops", st.shops_write_sql(conn, b.changed_shops))
        writes.add("holds", st.holds_write_sql(conn, list(b.holds.values())))
        if self.newest and self.newest != (was or ""):
            writes.add("clock", st.newest_sql(conn, self.newest))
        try:
            with self.turns.waiting():
                done = writes.run(cur)
        except pymysql.err.IntegrityError as exc:
            if exc.args and exc.args[0] == DUPLICATE_KEY:
                raise LedgerConflict(f"a row of this batch was written by another worker meanwhile: {exc}") from exc
            raise
        if self.rules.dedup and b.new_keys and done["seen"][1] != len(b.new_keys):
            raise SeenConflict(f"{len(b.new_keys) - done['seen'][1]} key(s) of this batch were recorded already")
        expected = self.ledger.expected_orders(b.new_orders, credited)
        if expected and done["orders"][1] != expected:
            raise LedgerConflict(f"orders of this batch were written by another worker "
                                 f"({done['orders'][1]} rows changed, {expected} expected)")
        expected = self.ledger.expected_users(b.changed_users, new_users)
        if expected and done["users"][1] != expected:
            raise LedgerConflict(f"{expected - done['users'][1]} new user(s) of this batch were created by another "
                                 f"worker meanwhile")

    def _resolve(self, b: Batch, h: Hold, state: str, code: int, line: int) -> None:
        self.seq += 1
        h.resolve(state, code, self.file_id, line, self.seq)
        b.holds[(h.file_id, h.line)] = h
        b.resolved.append(h)

    def _purchase(self, ev: Event, line: int, shops: dict[int, bool]) -> int:
        pair = (ev.shop_id, ev.good_id)
        takes = self.rules.purchase_takes_stock
        balance = self.balances[ev.user_id]
        code = purchase(ev, balance, shops.get(ev.shop_id, True), self.stock.get(pair, 0) if takes else None,
                        self.rules)
        accepted = code == ACCEPTED
        order = Order(ev.order_id, ev.user_id, ev.amount, ev.shop_id, ev.good_id, ev.qty, accepted, line=line)
        self.orders[ev.order_id] = order
        self.b.new_orders.append(order)
        if accepted:
            self.balances[ev.user_id] = balance - ev.amount
            self.b.changed_users.add(ev.user_id)
            if takes:
                self.stock[pair] = self.stock.get(pair, 0) - ev.qty
                self.b.changed_stock.add(pair)
        return code

    def _refund(self, ev) -> int:
        if type(ev) is not Event:
            return MALFORMED
        order = self.orders[ev.order_id]
        if not order.debited:
            return PURCHASE_REJECTED
        code = refund(ev, order, self.rules, self.shard, self.settings.shard_count)
        if code == ACCEPTED:
            b = self.b
            self.balances[ev.user_id] += ev.amount   # the purchase's user: `refund` checked it
            b.changed_users.add(ev.user_id)
            order.credit = ev.amount
            if not order.line:
                b.credited[order.order_id] = order
            if self.rules.purchase_takes_stock:
                pair = (order.shop_id, ev.good_id)
                self.stock[pair] = self.stock.get(pair, 0) + ev.qty
                b.changed_stock.add(pair)
        return code

    # -- writing the outputs from the records ---------------------------------------------------------

    def _return_shops(self, events, codes: bytes, first_line: int, holds=()) -> dict[int, int]:
        """Shops of the purchases whose returns a replayed batch (or `holds`) outputs."""
        orders = {ev.order_id for ev, code in zip(events, codes) if code == ACCEPTED and ev.etype == RETURN}
        orders.update(h.order_id for h in holds if h.code == ACCEPTED)
        for line in range(first_line, first_line + len(events)):
            orders.update(h.order_id for h in self.pending.get(line, ()) if h.code == ACCEPTED)
        if not orders:
            return {}
        with self.state.conn.cursor() as cur:
            found = {o: order.shop_id for o, order in self.ledger.orders(cur, orders).items()}
        if len(found) < len(orders):
            raise TaskFailed(f"{self.filename} shard {self.shard}: the purchase of order {min(orders - found.keys())}, "
                             f"whose return it output, was pruned (ORDER_WINDOW): it cannot be replayed")
        return found

    def _emit(self, raws, first_line: int, codes: bytes, events, shop_of: dict[int, int], pause=None) -> None:
        """Write a batch's outputs from its codes: prepared lines rendered PAUSE_LINES lines at a
        time (`PreparedLines.lines`), rejected lines as they come. The lines between two where a
        resolved hold is due take their accepted events in one C pass (`compress` by the codes)
        and only the few others are looked at: a Python step per line was a third of the
        writing thread."""
        out, counts, lines = self.out, self.counts, self.prepare.lines
        pending = self.pending
        n = len(raws)
        counts.lines += n
        due = iter(sorted(k - first_line for k in pending if first_line <= k < first_line + n) if pending else ())
        next_due = next(due, n)
        for start in range(0, n, PAUSE_LINES):
            if pause is not None:
                pause()
            end = min(start + PAUSE_LINES, n)
            accepted: list = []
            i = start
            while next_due < end:
                self._emit_stretch(raws, first_line, codes, events, i, next_due, accepted)
                self._emit_due(raws, first_line, codes, events, next_due, accepted)
                i, next_due = next_due + 1, next(due, n)
            self._emit_stretch(raws, first_line, codes, events, i, end, accepted)
            if accepted:
                out.write(lines(accepted, shop_of))
                counts.accepted += len(accepted)

    def _emit_stretch(self, raws, first_line: int, codes: bytes, events, start: int, end: int, accepted: list) -> None:
        """Lines start..end-1, none with a resolved hold due: the accepted events join
        `accepted`, the others are counted or written."""
        chunk = codes[start:end]
        before = len(accepted)
        accepted.extend(compress(events[start:end], chunk.translate(_ACCEPTED_ONLY)))
        if len(accepted) - before < end - start:
            self._emit_others(raws, first_line, codes, events, compress(range(start, end), chunk))

    def _emit_others(self, raws, first_line: int, codes: bytes, events, indexes) -> None:
        """The lines at `indexes` (none of them accepted, none with a resolved hold due): held
        ones are counted, rejected ones written."""
        rej, counts, filename = self.rej, self.counts, self.filename
        for i in indexes:
            code = codes[i]
            if code == HELD:
                counts.held += 1
                continue
            detail = None
            if code == MALFORMED or code == WRONG_SHARD or code == TOO_LARGE:
                bad = events[i]
                detail = bad.detail if type(bad) is Bad else None
            rej.write(rejected_line(raws[i], code, detail, filename, first_line + i))
            counts.reject(code)

    def _emit_due(self, raws, first_line: int, codes: bytes, events, i: int, accepted: list) -> None:
        """Line i and the resolved holds due at it: expired ones before it, released ones after."""
        line = first_line + i
        after = self._emit_resolved(self.pending.pop(line), accepted, before=True)
        if codes[i] == ACCEPTED:
            accepted.append(events[i])
        else:
            self._emit_others(raws, first_line, codes, events, (i,))
        if after:
            self._emit_resolved(after, accepted, before=False)

    def _emit_resolved(self, holds: list[Hold], accepted: list, before: bool | None) -> list[Hold]:
        """Resolved holds: expired ones go before the line that resolved them, released ones
        after it; the accepted ones join `accepted` (the prepared lines to write, in order), the
        others are written to the rejected output. Returns the ones left for after the line."""
        later = []
        for h in holds:
            if before is True and h.state == "released":
                later.append(h)
                continue
            if h.state == "expired":
                self.counts.expired += 1
            else:
                self.counts.released += 1
            if h.code == ACCEPTED:
                accepted.append(h.event or self.validate(h.raw))
            else:
                self.rej.write(rejected_line(h.raw, h.code, None, h.origin, h.line))
                self.counts.reject(h.code)
        return later


@contextmanager
def paused_gc():
    """The cyclic collector off while a file or a group is read, decided and written, around
    the call that does it: a file allocates millions of short-lived acyclic objects, which the
    collector would walk again and again for nothing (about a tenth of the CPU); reference
    counting frees them, and cycles wait until the file is done. Turned back on only once that
    call has returned and its objects are freed: on inside it, the first allocation after a
    group found the group's lines, events and orders still alive, ~100k objects for a young
    collection to walk (~4% of a big run's worker CPU)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class WorkerStage(StageWork):
    name = Stage.WORKER
    schemas = (SCHEMA, rejected.SCHEMA)

    def __init__(self, settings: Settings, shard: int):
        self.settings = settings
        # A claim's small files are decided together (`group`), the others one at a time; the
        # dones of a claim of several go in one request with the next claim (app/daemon.py):
        # files that queue up cost a claim and a report between them, not one each.
        self.claim_limit = settings.worker_claim_limit
        self.shard = shard
        self.service = Stage.WORKER.program(shard)
        self.folder = layout.worker_dir(settings.shared_dir, shard)
        self.state = WorkerState(settings.pipeline_db, shard)
        self.ledger = Ledger(settings.opening_balance)
        self.recent_keys, self.recent_orders = Recent(), Recent()
        self.idle_since = time.monotonic()
        self.idle_done = False
        self.last_prune = 0.0
        # The shard's active holds as this process left them after its last file (`start_file`
        # reads only their keys then): at 500-event files, reading every held row again was a
        # third of the worker's CPU per file.
        self.known_holds: dict | None = None
        self.pruned_minute: int | None = None   # the shard clock's minute at the last pass after a file
        self.prune_more = True                  # the last pass removed rows: the next may find more

    def setup(self, ctx: Context) -> None:
        # The deciding thread waits on the database hundreds of times per second; each time
        # its answer is in, it must get the interpreter back from the reading and writing
        # threads, which by default only yield it every 5 ms.
        sys.setswitchinterval(SWITCH_INTERVAL)
        delay = 0.5
        while not ctx.stopping():
            try:
                self.state.open()
                return
            except UNAVAILABLE as exc:
                ctx.log.warning("pipeline database unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def teardown(self) -> None:
        self.state.close()

    def group(self, tasks) -> list:
        """Consecutive claimed files of this shard small enough to be one batch go in one group
        (`_process_several`); any other file alone, in the claim's order, so a missing input is
        sent back upstream alone and the files after it wait for it (`Daemon`)."""
        groups, run = [], []
        for t in tasks:
            if t.shard == self.shard and self._small(t.filename):
                run.append(t)
                continue
            if run:
                groups.append(run)
                run = []
            groups.append([t])
        if run:
            groups.append(run)
        return groups

    def _small(self, filename: str) -> bool:
        """From the folder's own entry (lstat): a link is not followed out of the shared folder,
        and a FIFO or device is no small file; anything but a regular file goes alone, where
        the safe open refuses it."""
        try:
            entry = layout.splitter_output(self.settings.shared_dir, filename, self.shard).lstat()
        except OSError:
            return False
        return stat.S_ISREG(entry.st_mode) and 0 < GROUP_FILE_BYTES and entry.st_size <= GROUP_FILE_BYTES

    def process(self, tasks, ctx: Context):
        outcomes = []
        try:
            if len(tasks) > 1:
                return self._process_several(tasks, ctx)
            for task in tasks:
                if task.shard != self.shard:
                    outcomes.append(Failed(f"task of shard {task.shard} given to the worker of shard {self.shard}"))
                    continue
                outcomes.append(self._process_one(task.filename, ctx))
            return outcomes
        except UNAVAILABLE as exc:
            self.state.close()
            raise Retryable(f"pipeline database unavailable: {exc}") from exc
        except OSError as exc:
            raise Retryable(f"file system error: {exc}") from exc
        finally:
            self.idle_since = time.monotonic()
            self.idle_done = False

    # -- several small files of the shard together ---------------------------------------------------

    def _process_several(self, tasks, ctx: Context) -> list:
        """A group (`group`): every input opened first (one gone since the claim hands the
        group back, nothing decided yet), the leading fresh one-batch files decided together
        (`_process_group`, as many times as the files fill one batch each), the rest, or all of
        them if that did not go through, one by one from the same open files, each with its own
        outcome."""
        files: list = []
        try:
            for task in tasks:
                path = layout.splitter_output(self.settings.shared_dir, task.filename, self.shard)
                try:
                    files.append(safefiles.open_read(path, self.settings.shared_dir, READ_BUFFER))
                except FileNotFoundError:
                    raise Retryable(f"{path.name} is gone since the claim: the group is handed back") from None
                except safefiles.Refused as exc:
                    files.append(TaskFailed(f"shard file refused: {exc}"))
            names = [t.filename for t in tasks]
            lead = 0
            while lead < len(files) and not isinstance(files[lead], TaskFailed):
                lead += 1
            outcomes: list = []
            while lead - len(outcomes) > 1:
                with paused_gc():
                    got = self._process_group(names[len(outcomes):lead], files[len(outcomes):lead], ctx)
                if not got:
                    break
                outcomes += got
            for name, f in zip(names[len(outcomes):], files[len(outcomes):]):
                if isinstance(f, TaskFailed):
                    outcomes.append(Failed(str(f)))
                    continue
                f.seek(0)
                try:
                    with paused_gc():
                        outcomes.append(self._decide_file(name, f, ctx))
                except TaskFailed as exc:
                    outcomes.append(Failed(str(exc)))
            return outcomes
        finally:
            for f in files:
                if not isinstance(f, TaskFailed):
                    f.close()

    def _process_group(self, names: list[str], files: list, ctx: Context) -> list:
        """Decide the leading files of `names` that are fresh (nothing recorded), one batch each
        and together within a group's bounds (GROUP_LINES, BATCH_BYTES), as one batch in
        one transaction: one start script, one read and one write script (`_decide_group_tx`:
        each file starts from the holds and clock the one before left, as one by one), one
        commit, their outputs in one `atomic_writes`. Their Dones, or fewer (the rest go on): [] when
        fewer than two qualify or when anything but the database being unavailable went wrong
        (rolled back; one by one then gives each file its own outcome)."""
        runs, readers, taken = [], [], []
        lines = size = 0
        for name, f in zip(names, files):
            # the group is one batch: the files that fit in its bounds together (the rest
            # make another group); taken first and validated once the group holds two or more
            if runs and (lines >= GROUP_LINES or size >= BATCH_BYTES):
                break
            f.seek(0)
            reader = LineReader(f, self.settings.max_line_bytes)
            try:
                raws = reader.take(min(self.settings.worker_batch_lines, GROUP_LINES - lines), BATCH_BYTES - size)
                if not reader.at_end():
                    break
            except Exception:   # whatever it is, the file alone will say it
                break
            lines += len(raws)
            size += sum(map(len, raws))
            runs.append(FileRun(self, name, ctx))
            readers.append(reader)
            taken.append(raws)
        if len(runs) < 2:
            return []
        items = []
        for run, raws in zip(runs, taken):
            try:
                items.append(run._batch(raws, True))
            except Exception:
                break
        if len(items) < 2:
            return []
        runs, readers = runs[:len(items)], readers[:len(items)]
        self.state.open()
        known, self.known_holds = self.known_holds, None
        starts = self.state.start_files([r.filename for r in runs], SHARD_LOCK_WAIT, known)
        if starts is None:
            raise Retryable(f"another worker process holds shard {self.shard}")
        try:
            fresh = 0
            for st in starts:
                if st.info.lines_decided or st.info.complete or st.info.pruned or st.records or st.resolved:
                    break
                fresh += 1
            if fresh < 2:
                return []
            runs, readers, items, starts = runs[:fresh], readers[:fresh], items[:fresh], starts[:fresh]
            last = runs[-1]
            open_tx = False
            try:
                self._decide_together(runs, items, starts)
                open_tx = True
                outputs = [o for run in runs for o in run.outputs()]
                with atomic_writes(outputs, root=self.settings.shared_dir) as written:
                    for n, (run, item) in enumerate(zip(runs, items)):
                        raws, events = item[0], item[1]
                        run.open_outputs(written[2 * n], written[2 * n + 1])
                        run.rej.deferred = True
                        run._emit_batch((raws, 1, run.codes, events, run.shops, run.resolved), helper=False)
                    for run in runs:
                        run.finish_outputs()
                    # the group's rejected rows in its commit's round trip (each file's are its
                    # own rows all the same), before its outputs appear
                    self.commit([row for run in runs for row in run.rej.take()], last.newest)
                    open_tx = False
                self.remember([run.b for run in runs])
            except UNAVAILABLE + (OSError, StopRequested):
                if open_tx:
                    self.roll_back()
                raise
            except Exception as exc:
                if open_tx:
                    self.roll_back()
                log.warning("%s: deciding %d files of shard %d together failed (%s: %s); one by one instead",
                            ", ".join(names), len(runs), self.shard, type(exc).__name__, exc)
                return []
            self.known_holds = {(h.file_id, h.line): h for held in last.holds.by_order.values() for h in held}
            self._prune_after(last.newest)
            return [run.done(reader) for run, reader in zip(runs, readers)]
        finally:
            self.state.unlock_shard()

    def _decide_together(self, runs: list, items: list, starts: list) -> None:
        """The files' batches as one batch in one transaction (`_decide_group_tx`), left open
        for the caller's `commit`; decided again on a conflict or deadlock, as `FileRun._decide`
        does one batch (each file's records are its own: a re-run of any one replays it alone)."""
        conn = self.state.conn
        holds, newest = starts[0].holds, starts[0].newest
        optimistic = True
        for attempt in range(BATCH_RETRIES):
            try:
                with conn.cursor() as cur:
                    self._decide_group_tx(cur, runs, items, starts, holds, newest, optimistic)
                return
            except (LedgerConflict, SeenConflict, pymysql.err.OperationalError, pymysql.err.InternalError,
                    pymysql.err.ProgrammingError) as exc:
                conn.rollback()
                refused = self.state.infile_refused(exc)
                retry = refused or not isinstance(exc, pymysql.err.MySQLError) or (exc.args and
                                                                                  exc.args[0] in DEADLOCK_CODES)
                if not retry or attempt == BATCH_RETRIES - 1:
                    raise
                log.log(logging.INFO if attempt == 0 else logging.WARNING,
                        "%d files of shard %d from %s: %s; deciding them again", len(runs), self.shard,
                        runs[0].filename, exc)
                if not refused and isinstance(exc, pymysql.err.MySQLError):
                    time.sleep(0.05 * attempt)
                optimistic = False
                holds = self.state.active_holds()
                newest = self.state.newest()
            except BaseException:
                conn.rollback()
                raise
        raise AssertionError("unreachable")

    def _decide_group_tx(self, cur, runs: list, items: list, starts: list, holds, newest, optimistic) -> None:
        """One batch spanning the files (`FileRun._decide_tx` for many): one script reads what
        all of them need, their lines are decided file after file (each from the holds, clock,
        balances, stock, orders and keys the one before left, as one by one), one script writes
        the state they changed and each file's own record. A file's holds, resolutions and
        ledger rows name it and its lines (`Order.stored_at`), and its codes and outputs are
        its own (`run.codes`, `run.shops`, `run.resolved`)."""
        lead = runs[0]
        lead.begin(starts[0])
        lead.holds, lead.newest = holds, newest
        was = newest
        found = lead._look_up(cur, Plan.joined([item[2] for item in items]), starts[0].idle_expired, optimistic)
        writes = db.Script()
        records: list[tuple] = []
        batch_keys: set = set()
        for n, (run, start, item) in enumerate(zip(runs, starts, items)):
            raws, events, _, dig, last = item
            if n:
                run.begin(start)
                run.orders, run.balances, run.stock = lead.orders, lead.balances, lead.stock
                run.holds, run.newest = holds, newest
            b = run.b = Batch()
            if not n:
                for h in found.adopted:
                    run._resolve(b, h, "expired", ORPHAN_RETURN, 1)
            codes, batch_newest = run._decide_lines(raws, events, 1, found.seen, batch_keys, found.shops)
            holds, newest = run.holds, run.newest
            for o in b.new_orders:
                o.stored_at = (run.file_id, o.line)
            run.codes, run.resolved = bytes(codes), b.resolved
            records.append((run.file_id, 1, len(raws), dig, run.codes, last, batch_newest))
        writes.add("records", self.state.records_sql(cur.connection, records))
        shop_of = ShopOf(lead.orders)
        for run in runs:
            run.shops = shop_of
        lead.newest = newest
        lead._write(cur, writes, [run.b for run in runs], found.new_users, was)

    def commit(self, rows: list[tuple], newest: str | None) -> None:
        """Commit the open batch of a small file (or group) with its rejected rows, and release
        the shard lock when no pass is due after it (`_prune_due`: a pass needs the lock), in
        one round trip: the COMMIT, the rows' INSERT on their writer's connection and the
        RELEASE_LOCK were three. The rows commit with the decisions that rejected them; a re-run
        writes them again through the writer, where the unique key keeps the first."""
        conn = self.state.conn
        script = db.Script()
        if rows:
            rejected.writer(self.settings.pipeline_db).ensure_schema()
            script.add("rejected", rejected.insert_sql(conn, rows))
        release = not self._prune_due(newest)
        self.state.commit_sql(script, release)
        with conn.cursor() as cur:
            script.run(cur)
        self.state.released = release

    def roll_back(self) -> None:
        """Roll back a batch left open for `commit` (nothing to do if the connection is gone)."""
        try:
            self.state.conn.rollback()
        except Exception:   # the connection is gone, and the transaction with it
            pass

    def remember(self, batches: list) -> None:
        """The keys and orders committed batches recorded, for the next batches' guesses (`Recent`)."""
        for b in batches:
            self.recent_keys.add_all(b.new_keys)
            self.recent_orders.add_all(o.order_id for o in b.new_orders)

    def _process_one(self, filename: str, ctx: Context):
        path = layout.splitter_output(self.settings.shared_dir, filename, self.shard)
        try:
            f = safefiles.open_read(path, self.settings.shared_dir, READ_BUFFER)
        except FileNotFoundError:
            raise InputMissing(f"{path.name} is missing") from None
        except safefiles.Refused as exc:
            raise TaskFailed(f"shard file refused: {exc}") from None
        with f:
            with paused_gc():
                return self._decide_file(filename, f, ctx)

    def _decide_file(self, filename: str, f, ctx: Context):
        """One file on its own, from its open input (called in `paused_gc`)."""
        self.state.open()
        known, self.known_holds = self.known_holds, None
        start = self.state.start_file(filename, SHARD_LOCK_WAIT, known)
        if start is None:
            raise Retryable(f"another worker process holds shard {self.shard}")
        try:
            run = FileRun(self, filename, ctx)
            done = run.run(LineReader(f, self.settings.max_line_bytes), start)
            self.known_holds = {(h.file_id, h.line): h for held in run.holds.by_order.values() for h in held}
            self._prune_after(run.newest)
            return done
        finally:
            self.state.unlock_shard()

    def idle(self, ctx: Context) -> None:
        """Wall-clock cap: after HOLD_WALL_CAP_SECONDS with no file to work, the shard's held
        returns expire (the next file reports them). Also prunes old state now and then."""
        now = time.monotonic()
        due = not self.idle_done and now - self.idle_since >= self.settings.hold_wall_cap
        if not due and now - self.last_prune < PRUNE_EVERY:
            return
        try:
            self.state.open()
            if not self.state.lock_shard(0):
                return
            try:
                if due:
                    self.known_holds = None
                    n = self.state.expire_idle()
                    self.idle_done = True
                    if n:
                        ctx.log.info("idle for %.0fs: %d held return(s) of shard %d expired as orphan_return; "
                                     "the next file reports them", now - self.idle_since, n, self.shard)
                self._prune()
            finally:
                self.state.unlock_shard()
        except UNAVAILABLE as exc:
            self.state.close()
            ctx.log.warning("idle work skipped, pipeline database unavailable: %s", exc)

    def _prune_due(self, newest: str | None) -> bool:
        """After a file, a pass only when it may find something: the last pass removed rows
        (each is bounded, so there may be more), the shard clock entered another minute (dedup
        keys go by the minute), or PRUNE_FILE_EVERY seconds went by (the ledger follows the
        files' clocks, replay records the wall clock). A pass is a round trip and six statements:
        at 500-event files most of them found nothing."""
        minute = minute_of(newest) if newest else None
        return self.prune_more or minute != self.pruned_minute or time.monotonic() - self.last_prune >= PRUNE_FILE_EVERY

    def _prune_after(self, newest: str | None) -> None:
        """A pass after a file if one is due (`_prune_due`), under the shard lock; none when
        the file's commit released the lock (it found none due then)."""
        if not self.state.released and self._prune_due(newest):
            self._prune(newest)
            self.pruned_minute = minute_of(newest) if newest else None

    def _prune(self, newest: str | None = None) -> None:
        """Bounded work after files (`newest`: the shard clock the file left), and now and
        then while idle."""
        self.last_prune = time.monotonic()
        s = self.settings
        removed = self.state.prune(s.dedup_window, s.order_window, s.replay_window, PRUNE_ROWS, newest=newest)
        if self.ledger.due():
            log.info("shard %d: %d new users' balances sealed", self.shard, self.ledger.seal(self.state.conn))
        self.prune_more = bool(removed)
        if removed:
            log.info("shard %d: pruned %s (DEDUP_WINDOW, ORDER_WINDOW, REPLAY_WINDOW)", self.shard,
                     ", ".join(f"{n} from {table}" for table, n in sorted(removed.items())))


def main(argv: list[str] | None = None) -> None:
    run_shard_stage("app.worker", WorkerStage, argv)
