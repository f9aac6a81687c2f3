"""The task state machine over `pipeline_tracking`: the only code that writes it.

A task is one (filename, shard) row; each stage has its own status column. Every change is one
short transaction that appends its row to `pipeline_transitions` in the same commit.

Sessions run at READ COMMITTED: every rule is checked either by a conditional UPDATE (the
status it requires is in its WHERE; `rowcount` says whether it won) or under a row lock
(`FOR UPDATE`, `SKIP LOCKED` for claims), so the snapshot of REPEATABLE READ buys nothing,
while its gap locks on the many secondary indexes made concurrent claims deadlock.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import orjson
import pymysql
import pymysql.cursors

from ..stages import FIRST, ORDERED, STAGES, STATUSES, WORK_STAGES, Action, Stage, Status, sql_in

# The tracking tables' migrations: db/migrations/tracking/ (applied by `db.migrate`).
SCHEMA = "tracking"
NEW, STARTED, DONE, FAILED = Status.NEW, Status.STARTED, Status.DONE, Status.FAILED
ERROR_MAX = 2000
DEADLOCK = 1213  # retried at once; a lock wait timeout (1205) is not: it already took LOCK_WAIT_SECONDS
LOCK_WAIT_SECONDS = 5
# /metrics/summary scans the whole table; when that gets slow its answer is reused for a while.
SUMMARY_SLOW_SECONDS = 0.1


class TaskError(Exception):
    http_status = 400

    def __init__(self, message: str, **body: Any):
        super().__init__(message)
        self.body = {"error": message, **body}


class NotFound(TaskError):
    http_status = 404


class Conflict(TaskError):
    http_status = 409


class SchemaMissing(Exception):
    """A tracking table vanished under a running API (dropped by hand): install it again."""


@dataclass
class Outcome:
    filename: str
    shard: int
    stage: Stage
    status: Status
    changed: bool
    attempts: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"filename": self.filename, "shard": self.shard, "stage": self.stage,
                "status": self.status, "changed": self.changed, "attempts": self.attempts, **self.extra}


def _status_col(stage: Stage) -> str:
    return stage.status_column


def _attempts_col(stage: Stage) -> str:
    return stage.attempts_column


# -- the queue queries ----------------------------------------------------------------------------
# Each names its index: with LIMIT and ORDER BY id the optimizers (MariaDB and MySQL alike)
# otherwise like to walk the primary key "until enough rows match", which is fast while the
# queue is most of the table and a scan of all finished history once it is not. Reading the
# ready index is right at every size: it holds exactly the ready rows, already in id order.
def ready_index(stage: Stage, sharded: bool) -> str:
    return f"ix_{stage.short}_ready{'_shard' if sharded else ''}"


def sql_ready(stage: str, sharded: bool, columns: str, tail: str, extra: str = "") -> str:
    """Ready tasks of a stage, oldest first: `%s` for the shard when `sharded`, then `tail`'s."""
    shard = " AND shard=%s" if sharded else ""
    return (f"SELECT {columns} FROM pipeline_tracking FORCE INDEX ({ready_index(stage, sharded)}) "
            f"WHERE {_status_col(stage.previous)}={DONE.sql} AND {_status_col(stage)}={NEW.sql}{shard}{extra} "
            f"ORDER BY id {tail}")


def sql_held(stage: str, sharded: bool) -> str:
    """What a worker holds, locked (args: worker, [shard,] limit). Owner is set only on started
    tasks, so ix_owner stays tiny and the lock touches only the worker's own rows (a scan of
    another index would lock, and wait on, rows other workers are finishing)."""
    return (f"SELECT id FROM pipeline_tracking FORCE INDEX (ix_owner) WHERE owner=%s"
            f" AND {_status_col(stage)}={STARTED.sql}{' AND shard=%s' if sharded else ''} ORDER BY id LIMIT %s FOR UPDATE")


def sql_shard_busy(stage: str) -> str:
    """Another worker holds a started task of this shard (args: shard, worker)."""
    return (f"SELECT 1 FROM pipeline_tracking FORCE INDEX ({ready_index(stage, True)}) "
            f"WHERE {_status_col(stage.previous)} IN {sql_in(*STATUSES)} "
            f"AND {_status_col(stage)}={STARTED.sql} AND shard=%s AND NOT (owner <=> %s) LIMIT 1")


def sql_shard_blocker(stage: str) -> str:
    """The shard's oldest file still waiting for the previous stage (args: shard)."""
    return (f"SELECT MIN(id) AS id FROM pipeline_tracking FORCE INDEX ({ready_index(stage, True)}) "
            f"WHERE {_status_col(stage.previous)} IN {sql_in(NEW, STARTED)} AND {_status_col(stage)}={NEW.sql} "
            f"AND shard=%s AND {FIRST.status_column}={DONE.sql}")


SQL_EXPIRED = (f"SELECT id, filename, shard, owner, {', '.join(s.status_column for s in WORK_STAGES)},"
               f" {', '.join(s.attempts_column for s in WORK_STAGES)},"
               " TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000 AS ran_ms"
               " FROM pipeline_tracking FORCE INDEX (ix_lease) WHERE lease_expires_at < NOW(3)"
               " ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED")


_STATUS_KEYS = tuple(s.value for s in STATUSES)  # JSON keys must be plain str
# The contract's counts: one GROUP BY over every stage's status, aliased a, b, c, d...
_COUNT_KEYS = "abcdefghij"[:len(STAGES)]
SQL_COUNTS = (f"SELECT shard, {', '.join(f'{s.status_column} {k}' for s, k in zip(STAGES, _COUNT_KEYS))}, "
              f"COUNT(*) n FROM pipeline_tracking GROUP BY shard, {', '.join(_COUNT_KEYS)}")


def queue_queries(shard_count: int = 2) -> list[tuple[str, str, tuple]]:
    """Every queue and claim query with sample arguments, for the EXPLAIN test and docs."""
    cols = "id, filename, shard, created_at"
    out = []
    for stage in WORK_STAGES:
        out += [(f"queue {stage}", sql_ready(stage, False, cols, "LIMIT %s OFFSET %s"), (100, 0)),
                (f"queue {stage} shard", sql_ready(stage, True, cols, "LIMIT %s OFFSET %s"), (1, 100, 0)),
                (f"claim {stage}", sql_ready(stage, False, cols, "LIMIT %s FOR UPDATE SKIP LOCKED"), (4,)),
                (f"claim {stage} shard", sql_ready(stage, True, cols, "LIMIT %s FOR UPDATE SKIP LOCKED"), (1, 4)),
                (f"held {stage}", sql_held(stage, False), ("host/worker", 4)),
                (f"held {stage} shard", sql_held(stage, True), ("host/worker", 1, 4))]
    for stage in ORDERED:
        out += [(f"ordered busy {stage}", sql_shard_busy(stage), (1, "host/worker")),
                (f"ordered blocker {stage}", sql_shard_blocker(stage), (1,)),
                (f"ordered claim {stage}", sql_ready(stage, True, cols, "LIMIT %s FOR UPDATE", " AND id < %s"),
                 (1, 10**9, 4))]
    out.append(("reap", SQL_EXPIRED, (500,)))
    return out


def _iso(value) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _iso_s(value) -> str | None:
    """The contract's timestamps: seconds, UTC, `Z`."""
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the state machine ----------------------------------------------------------------------------

class Result:
    """One statement's answer within a batch."""

    __slots__ = ("rows", "rowcount", "lastrowid")

    def __init__(self, rows, rowcount: int, lastrowid: int | None):
        self.rows, self.rowcount, self.lastrowid = list(rows or ()), rowcount, lastrowid

    def one(self) -> dict | None:
        return self.rows[0] if self.rows else None


class Tx:
    """One transaction in as few round trips as its logic allows.

    Statements are sent in batches (the multi-statement protocol: `db.connect(...,
    multi_statements=True)`): the first batch opens the transaction, typically with the locking
    read the rules need; `finish` sends the writes and the COMMIT together. So a transition is
    two round trips and a claim two, where one statement per trip made them four to six: on
    this machine each trip costs more CPU (system calls, wake-ups) than the SQL itself.
    """

    def __init__(self, cur):
        self.cur = cur
        self.open = False
        self.closed = False

    def run(self, *statements: tuple[str, tuple | list | None]) -> list[Result]:
        head = [] if self.open else ["START TRANSACTION"]
        self.open = True
        return self._send(head, statements)

    def finish(self, *statements: tuple[str, tuple | list | None], commit: bool = True) -> list[Result]:
        if not self.open and not statements:
            self.closed = True
            return []
        head = [] if self.open else ["START TRANSACTION"]
        results = self._send(head, [*statements, ("COMMIT" if commit else "ROLLBACK", None)])
        self.open, self.closed = False, True
        return results[:-1]

    def _send(self, head: list[str], statements) -> list[Result]:
        cur = self.cur
        sql = ";\n".join([*head, *(cur.mogrify(s, a) if a is not None else s for s, a in statements)])
        cur.execute(sql)  # no args: the values are already rendered, a '%' in them must stay
        results = []
        while True:
            results.append(Result(cur.fetchall(), cur.rowcount, cur.lastrowid))
            if not cur.nextset():
                break
        return results[len(head):]


def _log_sql(rows: list[tuple]) -> tuple[str, list]:
    """One multi-row INSERT of transitions: (tracking_id, filename, shard, stage, from, to,
    action, actor, error, duration_ms, events, stats)."""
    marks = ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(rows))
    return ("INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status,"
            f" action, actor, error, duration_ms, events, stats) VALUES {marks}",
            [v for row in rows for v in row])


def _marks(values) -> str:
    return ",".join(["%s"] * len(values))


class Tracker:
    """Task operations. `conns` hands out this thread's connection (`db.ThreadConnections`
    opened with `multi_statements=True`)."""

    def __init__(self, conns, shard_count: int, lease_seconds: float, max_attempts: int):
        self.conns = conns
        self.shard_count = shard_count
        self.lease_seconds = lease_seconds
        self.lease_us = int(lease_seconds * 1_000_000)
        self.max_attempts = max_attempts
        self._summary: tuple[float, dict] | None = None
        self._summary_lock = threading.Lock()

    # -- transactions ---------------------------------------------------------------------

    def _conn(self):
        conn = self.conns.get()
        if not getattr(conn, "pipeline_read_committed", False):
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                # Locks here are held for milliseconds; a wait this long means trouble, and an
                # answer (503, retry) beats a client timing out on a request stuck for 50 s.
                cur.execute(f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}")
            conn.pipeline_read_committed = True
        return conn

    def _tx(self, fn: Callable[[Tx], Any]):
        """Run fn(Tx); retried on deadlock or lock-wait timeout. If fn did not `finish`, its
        transaction is committed, or rolled back when fn returned exactly False."""
        conn = self._conn()
        for attempt in range(6):
            tx = None
            try:
                with conn.cursor(pymysql.cursors.DictCursor) as cur:
                    tx = Tx(cur)
                    result = fn(tx)
                    if tx.open and not tx.closed:
                        tx.finish(commit=result is not False)
                return result
            except pymysql.err.MySQLError as exc:
                self._rollback(conn)
                code = exc.args[0] if exc.args else None
                if code == DEADLOCK and attempt < 5:
                    time.sleep(0.002 * (attempt + 1))
                    continue
                if code == 1146:
                    raise SchemaMissing(str(exc)) from exc
                raise
            except BaseException:
                if tx is not None and tx.open:
                    self._rollback(conn)
                raise

    @staticmethod
    def _rollback(conn) -> None:
        try:
            conn.rollback()
        except Exception:
            pass

    def _read(self, sql: str, args=()) -> list[dict]:
        conn = self._conn()
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except pymysql.err.ProgrammingError as exc:
            if exc.args and exc.args[0] == 1146:
                raise SchemaMissing(str(exc)) from exc
            raise

    def _lease_until(self) -> str:
        """The lease end a heartbeat just set, as the API host's clock sees it."""
        return _iso(datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=self.lease_seconds))

    # -- registration ---------------------------------------------------------------------

    def register(self, filename: str, shards: list[int]) -> dict:
        def tx(t: Tx):
            # A unique key with an explicit no-op: concurrent registrations of one file cannot
            # both insert, and neither fails (affected rows: 1 inserted, 0 existed).
            inserted = t.run(*[(f"INSERT INTO pipeline_tracking (filename, shard, {FIRST.status_column}) "
                                f"VALUES (%s,%s,{STARTED.sql}) ON DUPLICATE KEY UPDATE id=id", (filename, shard))
                               for shard in shards])
            created = [(r.lastrowid, shard) for r, shard in zip(inserted, shards) if r.rowcount == 1]
            writes = [_log_sql([(tid, filename, s, FIRST, None, STARTED, Action.REGISTER,
                                 None, None, None, None, None) for tid, s in created])] if created else []
            existing = t.finish(*writes, ("SELECT shard FROM pipeline_tracking WHERE filename=%s", (filename,)))
            return {"filename": filename, "shards": sorted(set(shards) | {r["shard"] for r in existing[-1].rows}),
                    "created": bool(created)}
        return self._tx(tx)

    def ingest_done(self, filename: str, actor: str | None = None, events: int | None = None) -> dict:
        column = FIRST.status_column

        def tx(t: Tx):
            rows = t.run((f"SELECT id, shard, {column} FROM pipeline_tracking WHERE filename=%s "
                          "ORDER BY shard FOR UPDATE", (filename,)))[0].rows
            if not rows:
                raise NotFound(f"file {filename!r} is not registered", filename=filename)
            failed = [r["shard"] for r in rows if r[column] == FAILED]
            if failed:
                raise Conflict(f"{FIRST} failed for this file; it cannot be marked done",
                               filename=filename, stage=FIRST, status=FAILED, shards=failed)
            todo = [r for r in rows if r[column] != DONE]
            if todo:
                # `events` counts the whole file: logged once (on its first shard), so that
                # per-stage sums such as /metrics/throughput do not count it once per shard.
                t.finish((f"UPDATE pipeline_tracking SET {column}={DONE.sql} WHERE filename=%s "
                          f"AND {column} IN {sql_in(NEW, STARTED)}", (filename,)),
                         _log_sql([(r["id"], filename, r["shard"], FIRST, r[column], DONE,
                                    Action.DONE, actor, None, None, events if r is todo[0] else None, None)
                                   for r in todo]))
            return {"filename": filename, "updated_rows": len(todo)}
        return self._tx(tx)

    # -- one task's transitions -------------------------------------------------------------

    def transition(self, stage: str, action: str, filename: str, shard: int, worker: str | None = None,
                   error: str | None = None, events: int | None = None, stats: dict | None = None) -> Outcome:
        """Lock the task and read what the rules need, decide here, then write and commit:
        two round trips (`done`, the hot one, takes one: see `_done_at_once`)."""
        stage = Stage(stage)
        action = Action(action)
        stats_text = orjson.dumps(stats).decode() if stats else None
        if action == Action.DONE:
            outcome = self._done_at_once(stage, filename, shard, worker, events, stats_text)
            if outcome is not None:
                return outcome

        def tx(t: Tx):
            row = self._task(stage, filename, shard, t.run((self._row_sql(stage, lock=True),
                                                            (stage, filename, shard)))[0])
            outcome, writes = getattr(self, f"_{action}")(stage, row, worker, error, events, stats_text)
            if writes:
                t.finish(*writes)
            return outcome
        return self._tx(tx)

    @staticmethod
    def _row_sql(stage: str, lock: bool) -> str:
        """A task as the rules see it, with the stage's last logged action (which tells a
        repeat from an illegal call). Args: stage, filename, shard."""
        return (f"SELECT id, {_status_col(stage.previous)} AS prev, {_status_col(stage)} AS status, owner,"
                f" {_attempts_col(stage)} AS attempts, TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000 AS ran_ms,"
                f" (SELECT CONCAT_WS(':', x.action, x.to_status, x.actor) FROM pipeline_transitions x"
                f"  WHERE x.tracking_id = pipeline_tracking.id AND x.stage = %s ORDER BY x.id DESC LIMIT 1) AS last"
                f" FROM pipeline_tracking WHERE filename=%s AND shard=%s{' FOR UPDATE' if lock else ''}")

    @staticmethod
    def _task(stage: str, filename: str, shard: int, result: Result) -> dict:
        row = result.one()
        if row is None:
            raise NotFound(f"no task ({filename!r}, shard {shard})", filename=filename, shard=shard)
        action, to, actor = ((row["last"] or "").split(":", 2) + [None, None, None])[:3]
        row.update(filename=filename, shard=shard, last={"action": action, "to_status": to, "actor": actor})
        return row

    def _done_at_once(self, stage, filename, shard, worker, events, stats_text) -> Outcome | None:
        """`done` by a named worker in one round trip of five statements: the rule sits in the
        UPDATE's WHERE and its row count, kept in a session variable, gates the log row. The
        UPDATE hands back the attempt count through LAST_INSERT_ID(x) (the reply's insert id),
        so nothing is read. Only a refusal or a repeat then costs a read, to be explained."""
        if worker is None:
            return None  # the log names the owner: take the locked path, which reads it
        status_col, att_col = _status_col(stage), _attempts_col(stage)

        def tx(t: Tx):
            results = t.finish(
                (f"UPDATE pipeline_tracking SET {status_col}={DONE.sql}, owner=NULL, lease_expires_at=NULL,"
                 f" {att_col}=LAST_INSERT_ID({att_col}) WHERE filename=%s AND shard=%s AND {status_col}={STARTED.sql}"
                 f" AND (owner IS NULL OR owner=%s)", (filename, shard, worker)),
                ("SET @pipeline_done = ROW_COUNT()", None),
                ("INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status,"
                 " action, actor, duration_ms, events, stats)"
                 f" SELECT id, filename, shard, %s, {STARTED.sql}, {DONE.sql}, {Action.DONE.sql}, %s,"
                 " TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000, %s, %s FROM pipeline_tracking"
                 " WHERE filename=%s AND shard=%s AND @pipeline_done = 1",
                 (stage, worker, events, stats_text, filename, shard)))
            return results[0].lastrowid if results[0].rowcount == 1 else False
        attempts = self._tx(tx)
        if attempts is not False:
            return Outcome(filename, shard, stage, DONE, True, attempts or 0)
        row = self._task(stage, filename, shard, Result(self._read(self._row_sql(stage, lock=False),
                                                                   (stage, filename, shard)), 1, None))
        outcome, writes = self._done(stage, row, worker, None, events, stats_text)  # a repeat, or a 409
        return None if writes else outcome  # None: it became done-able meanwhile; take the locked path

    def _conflict(self, stage, row, why):
        return Conflict(why, filename=row["filename"], shard=row["shard"], stage=stage, status=row["status"],
                        previous_status=row["prev"], owner=row["owner"])

    def _set(self, stage, row, to, action, actor, error=None, events=None, stats=None, extra="", args=(),
             duration=False) -> list:
        """The writes of one transition: the guarded-by-lock UPDATE and its log row."""
        return [(f"UPDATE pipeline_tracking SET {_status_col(stage)}=%s{extra} WHERE id=%s", (to, *args, row["id"])),
                _log_sql([(row["id"], row["filename"], row["shard"], stage, row["status"], to, action, actor,
                           error, row["ran_ms"] if duration else None, events, stats)])]

    @staticmethod
    def _outcome(stage, row, status, changed, attempts=None, **extra) -> Outcome:
        return Outcome(row["filename"], row["shard"], stage, status, changed,
                       row["attempts"] if attempts is None else attempts, extra)

    def _check_owner(self, stage, row, worker):
        if worker and row["owner"] and row["owner"] != worker:
            raise self._conflict(stage, row, f"task is held by {row['owner']!r}, not {worker!r} "
                                             f"(its lease was lost)")

    def _start(self, stage, row, worker, error, events, stats):
        if row["status"] == STARTED and worker and row["owner"] == worker:
            return self._outcome(stage, row, STARTED, False), [
                ("UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND WHERE id=%s",
                 (self.lease_us, row["id"]))]
        if row["status"] != NEW:
            raise self._conflict(stage, row, f"{stage} can start only from '{NEW}'")
        if row["prev"] != DONE:
            raise self._conflict(stage, row, f"{stage.previous} is {row['prev']!r}; "
                                             f"{stage} starts only after it is done")
        att = _attempts_col(stage)
        return self._outcome(stage, row, STARTED, True, row["attempts"] + 1), self._set(
            stage, row, STARTED, Action.START, worker,
            extra=f", owner=%s, started_at=NOW(3), lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND, {att}={att}+1",
            args=(worker, self.lease_us))

    def _done(self, stage, row, worker, error, events, stats):
        if row["status"] == DONE:
            by = row["last"].get("actor") if row["last"].get("to_status") == DONE else None
            if worker and by and by != worker:
                raise self._conflict(stage, row, f"{stage} was finished by {by!r}, not {worker!r} "
                                                 f"(its lease was lost and the task taken over)")
            return self._outcome(stage, row, DONE, False), []
        if row["status"] != STARTED:
            raise self._conflict(stage, row, f"{stage} can be done only from '{STARTED}'")
        self._check_owner(stage, row, worker)
        return self._outcome(stage, row, DONE, True), self._set(
            stage, row, DONE, Action.DONE, worker or row["owner"], events=events, stats=stats,
            extra=", owner=NULL, lease_expires_at=NULL", duration=True)

    def _fail(self, stage, row, worker, error, events, stats):
        if row["status"] == FAILED:
            return self._outcome(stage, row, FAILED, False), []
        if row["status"] not in (NEW, STARTED):
            raise self._conflict(stage, row, f"{stage} can fail only from '{NEW}' or '{STARTED}'")
        if row["status"] == STARTED:
            self._check_owner(stage, row, worker)
        return self._outcome(stage, row, FAILED, True), self._set(
            stage, row, FAILED, Action.FAIL, worker or row["owner"], error=error, events=events, stats=stats,
            extra=", owner=NULL, lease_expires_at=NULL, last_error=%s", args=(error,),
            duration=row["status"] == STARTED)

    def _retry(self, stage, row, worker, error, events, stats):
        if row["status"] == NEW and row["last"].get("action") == Action.RETRY:
            return self._outcome(stage, row, NEW, False), []
        if row["status"] != FAILED:
            raise self._conflict(stage, row, f"{stage} can be retried only from '{FAILED}'")
        return self._outcome(stage, row, NEW, True, 0), self._set(
            stage, row, NEW, Action.RETRY, worker, extra=f", {_attempts_col(stage)}=0")

    def _release(self, stage, row, worker, error, events, stats):
        """A daemon hands a task back unfinished (clean shutdown): no attempt is spent."""
        if row["status"] == NEW and row["last"].get("action") == Action.RELEASE:
            return self._outcome(stage, row, NEW, False), []
        if row["status"] != STARTED:
            raise self._conflict(stage, row, f"{stage} can be released only from '{STARTED}'")
        self._check_owner(stage, row, worker)
        att = _attempts_col(stage)
        return self._outcome(stage, row, NEW, True, max(row["attempts"] - 1, 0)), self._set(
            stage, row, NEW, Action.RELEASE, worker or row["owner"], error=error,
            extra=f", owner=NULL, lease_expires_at=NULL, {att}=GREATEST({att}-1, 0)")

    def _rewind(self, stage, row, worker, error, events, stats):
        """The stage's input file is missing: send the task back to the stage that produces it."""
        upstream = stage.previous
        if upstream is FIRST:
            raise self._conflict(stage, row, f"{stage} reads the registered source file; nothing "
                                             "upstream can rebuild it: fail the task instead")
        if row["status"] == NEW and row["prev"] == NEW and row["last"].get("action") == Action.REWIND:
            return self._outcome(stage, row, NEW, False, rewound_to=upstream), []
        if row["status"] not in (NEW, STARTED):
            raise self._conflict(stage, row, f"{stage} can be rewound only from '{NEW}' or '{STARTED}'")
        if row["status"] == STARTED:
            self._check_owner(stage, row, worker)
        if row["attempts"] >= self.max_attempts:
            reason = f"input missing after {row['attempts']} attempts: {error or 'no reason given'}"
            return self._fail(stage, row, worker, reason[:ERROR_MAX], None, None)
        reason = f"input missing, rebuilt by {upstream}: {error or 'no reason given'}"[:ERROR_MAX]
        writes = self._set(stage, row, NEW, Action.REWIND, worker or row["owner"], error=reason,
                           extra=f", {_status_col(upstream)}={NEW.sql}, owner=NULL, lease_expires_at=NULL, last_error=%s",
                           args=(reason,))
        writes.append(_log_sql([(row["id"], row["filename"], row["shard"], upstream, row["prev"], NEW, Action.REWIND,
                                 worker, reason, None, None, None)]))
        return self._outcome(stage, row, NEW, True, rewound_to=upstream), writes

    def heartbeat(self, stage: str, filename: str, shard: int, worker: str) -> dict:
        """One autocommitted UPDATE: extends the lease only while `worker` holds the task."""
        stage = Stage(stage)
        status_col = _status_col(stage)
        conn = self._conn()
        with conn.cursor() as cur:
            cur.execute(f"UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND "
                        f"WHERE filename=%s AND shard=%s AND {status_col}={STARTED.sql} AND owner=%s",
                        (self.lease_us, filename, shard, worker))
            extended = cur.rowcount == 1
        body = {"filename": filename, "shard": shard, "stage": stage, "status": STARTED, "worker": worker,
                "lease_seconds": self.lease_seconds, "lease_expires_at": self._lease_until()}
        if extended:
            return body
        rows = self._read(f"SELECT {status_col} AS status, owner FROM pipeline_tracking WHERE filename=%s "
                          f"AND shard=%s", (filename, shard))
        if not rows:
            raise NotFound(f"no task ({filename!r}, shard {shard})", filename=filename, shard=shard)
        if rows[0]["status"] == STARTED and rows[0]["owner"] == worker:
            return body  # two heartbeats in one millisecond: the second changed nothing
        raise Conflict(f"{worker!r} does not hold this task (lease lost or task finished)",
                       filename=filename, shard=shard, stage=stage, status=rows[0]["status"],
                       owner=rows[0]["owner"])

    def retry_all(self, stage: str, shard: int | None, actor: str | None) -> dict:
        stage = Stage(stage)
        status_col, att = _status_col(stage), _attempts_col(stage)
        where, args = f"{status_col}={FAILED.sql}", []
        if shard is not None:
            where, args = where + " AND shard=%s", [shard]

        def tx(t: Tx):
            rows = t.run((f"SELECT id, filename, shard FROM pipeline_tracking WHERE {where} ORDER BY id FOR UPDATE",
                          args))[0].rows
            writes = []
            for start in range(0, len(rows), 1000):
                chunk = rows[start:start + 1000]
                writes += [(f"UPDATE pipeline_tracking SET {status_col}={NEW.sql}, {att}=0 WHERE id IN ({_marks(chunk)})",
                            [r["id"] for r in chunk]),
                           _log_sql([(r["id"], r["filename"], r["shard"], stage, FAILED, NEW, Action.RETRY, actor,
                                      None, None, None, None) for r in chunk])]
            t.finish(*writes)
            return {"stage": stage, "shard": shard, "retried": len(rows),
                    "items": [{"filename": r["filename"], "shard": r["shard"]} for r in rows[:1000]]}
        return self._tx(tx)

    # -- claims and leases ---------------------------------------------------------------------

    def claim(self, stage: str, limit: int, shard: int | None, worker: str) -> list[dict]:
        """Up to `limit` tasks for `worker`: first those it already holds (a restarted daemon
        resumes its own work), then ready ones, oldest first, each won by exactly one caller.
        Two round trips: lock what the worker holds and up to `limit` ready rows nobody else
        is locking; then write. Ready rows locked but not needed are freed by the commit."""
        stage = Stage(stage)
        status_col, att = _status_col(stage), _attempts_col(stage)
        cols = f"id, filename, shard, created_at, {att} AS attempts"
        ordered = stage in ORDERED and shard is not None

        def tx(t: Tx):
            reads = [(sql_held(stage, shard is not None), (worker, *([shard] if shard is not None else []), limit))]
            if ordered:
                reads += self._ordered_reads(stage, shard, worker)
            else:
                reads.append((sql_ready(stage, shard is not None, cols, "LIMIT %s FOR UPDATE SKIP LOCKED"),
                               (*([shard] if shard is not None else []), limit)))
            results = t.run(*reads)
            mine = results[0].rows
            want = limit - len(mine)
            if ordered:
                fresh = self._ordered_fresh(t, stage, shard, results[1:], want, cols)
            else:
                fresh = results[1].rows[:want] if want > 0 else []
            writes = []
            if mine:
                ids = [r["id"] for r in mine]
                writes += [(f"UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND "
                            f"WHERE id IN ({_marks(ids)})", (self.lease_us, *ids)),
                           (f"SELECT {cols} FROM pipeline_tracking WHERE id IN ({_marks(ids)}) ORDER BY id", ids)]
            if fresh:
                writes += [(f"UPDATE pipeline_tracking SET {status_col}={STARTED.sql}, owner=%s, started_at=NOW(3),"
                            f" lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND, {att}={att}+1"
                            f" WHERE id IN ({_marks(fresh)})", (worker, self.lease_us, *[r["id"] for r in fresh])),
                           _log_sql([(r["id"], r["filename"], r["shard"], stage, NEW, STARTED, Action.CLAIM, worker,
                                      None, None, None, None) for r in fresh])]
            done = t.finish(*writes)
            mine = done[1].rows if mine else []
            return ([self._claimed(r, r["attempts"], True) for r in mine]
                    + [self._claimed(r, r["attempts"] + 1, False) for r in fresh])
        return self._tx(tx)

    @staticmethod
    def _claimed(r: dict, attempts: int, resumed: bool) -> dict:
        return {"filename": r["filename"], "shard": r["shard"], "created_at": _iso_s(r["created_at"]),
                "attempts": attempts, "resumed": resumed}

    @staticmethod
    def _ordered_reads(stage: str, shard: int, worker: str) -> list:
        """An ordered claim first takes the shard's claim lock (the upsert locks its row, so two
        replicas cannot take consecutive files at once) and reads whether another worker holds
        one of the shard's files and which is the oldest file still waiting upstream."""
        return [("INSERT INTO pipeline_claim_lock (stage, shard) VALUES (%s,%s) ON DUPLICATE KEY UPDATE shard=shard",
                 (stage, shard)),
                (sql_shard_busy(stage), (shard, worker)),
                (sql_shard_blocker(stage), (shard,))]

    @staticmethod
    def _ordered_fresh(t: Tx, stage: str, shard: int, results: list[Result], want: int, cols: str) -> list[dict]:
        """Oldest ready tasks of one shard, never past an earlier task that is still pending.

        Pending = the previous stage has not finished yet (new/started) although ingest is done;
        files still being written (ingest not done) and files the previous stage failed are not
        in the shard's stream and block nothing. While another worker holds one of the shard's
        files, nobody else gets any.
        """
        _lock, busy, blocker = results
        if want <= 0 or busy.rows:
            return []
        first_pending = blocker.one()["id"]
        before, args = (" AND id < %s", (first_pending,)) if first_pending is not None else ("", ())
        return t.run((sql_ready(stage, True, cols, "LIMIT %s FOR UPDATE", before), (shard, *args, want)))[0].rows

    def reap(self, limit: int = 500) -> list[dict]:
        """Return tasks whose lease expired to `new` (attempt counted) or, after `max_attempts`,
        to `failed` with the reason."""
        def tx(t: Tx):
            writes, reaped = [], []
            for r in t.run((SQL_EXPIRED, (limit,)))[0].rows:
                stage = next((s for s in WORK_STAGES if r[_status_col(s)] == STARTED), None)
                if stage is None:
                    writes.append(("UPDATE pipeline_tracking SET owner=NULL, lease_expires_at=NULL WHERE id=%s",
                                   (r["id"],)))
                    continue
                attempts = r[_attempts_col(stage)]
                to = FAILED if attempts >= self.max_attempts else NEW
                holder = "a worker that gave no id" if r["owner"] is None else repr(r["owner"])
                error = (f"lease of {holder} expired (attempt {attempts} of {self.max_attempts})"
                         + ("; attempts exhausted" if to == FAILED else ""))
                writes += [(f"UPDATE pipeline_tracking SET {_status_col(stage)}=%s, owner=NULL, "
                            f"lease_expires_at=NULL, last_error=%s WHERE id=%s", (to, error, r["id"])),
                           _log_sql([(r["id"], r["filename"], r["shard"], stage, STARTED, to, Action.REAP, r["owner"],
                                      error, r["ran_ms"], None, None)])]
                reaped.append({"filename": r["filename"], "shard": r["shard"], "stage": stage, "status": to,
                               "error": error})
            t.finish(*writes)
            return reaped
        return self._tx(tx)

    # -- reads ---------------------------------------------------------------------------------

    def queue(self, stage: str, limit: int, offset: int, shard: int | None) -> dict:
        stage = Stage(stage)
        args = [shard] if shard is not None else []
        rows = self._read(sql_ready(stage, shard is not None, "filename, shard, created_at", "LIMIT %s OFFSET %s"),
                          (*args, limit, offset))
        return {"stage": stage, "limit": limit, "offset": offset,
                "items": [{"filename": r["filename"], "shard": r["shard"], "created_at": _iso_s(r["created_at"])}
                          for r in rows]}

    def tasks(self, stage: str, status: str, shard: int | None, limit: int, offset: int) -> dict:
        """Tasks of one stage in one status, with owner, lease, attempts and last error."""
        stage = Stage(stage)
        status = Status(status)
        status_col = _status_col(stage)
        where, args = f"{status_col}=%s", [status]
        if shard is not None:
            where += " AND shard=%s"
            args.append(shard)
        att = stage.attempts_column or "0"
        rows = self._read(
            f"SELECT filename, shard, created_at, updated_at, owner, started_at, lease_expires_at, "
            f"{att} AS attempts, last_error, lease_expires_at < NOW(3) AS lease_expired, "
            f"TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000 AS running_ms "
            f"FROM pipeline_tracking WHERE {where} ORDER BY id LIMIT %s OFFSET %s", (*args, limit, offset))
        return {"stage": stage, "status": status, "limit": limit, "offset": offset, "items": [
            {"filename": r["filename"], "shard": r["shard"], "created_at": _iso_s(r["created_at"]),
             "updated_at": _iso(r["updated_at"]), "attempts": r["attempts"], "last_error": r["last_error"],
             **({"owner": r["owner"], "started_at": _iso(r["started_at"]),
                 "lease_expires_at": _iso(r["lease_expires_at"]), "lease_expired": bool(r["lease_expired"]),
                 "running_ms": r["running_ms"]} if status == STARTED else {})}
            for r in rows]}

    def file(self, filename: str) -> dict:
        rows = self._read("SELECT * FROM pipeline_tracking WHERE filename=%s ORDER BY shard", (filename,))
        if not rows:
            raise NotFound(f"file {filename!r} is not registered", filename=filename)
        marks = ",".join(["%s"] * len(rows))
        history = self._read("SELECT id, tracking_id, stage, from_status, to_status, action, at, actor, error, "
                             f"duration_ms, events, stats FROM pipeline_transitions WHERE tracking_id IN ({marks})",
                             [r["id"] for r in rows])
        history.sort(key=lambda h: h["id"])
        shards = []
        for r in rows:
            entry = {"shard": r["shard"], **{_status_col(s): r[_status_col(s)] for s in STAGES},
                     "updated_at": _iso_s(r["updated_at"]), "created_at": _iso_s(r["created_at"]),
                     "attempts": {s.value: r.get(s.attempts_column, 0) for s in WORK_STAGES},
                     "last_error": r.get("last_error"), "owner": r.get("owner"),
                     "lease_expires_at": _iso(r.get("lease_expires_at")), "stats": {}, "history": []}
            for h in history:
                if h["tracking_id"] != r["id"]:
                    continue
                try:
                    stats = orjson.loads(h["stats"]) if h["stats"] else None
                except orjson.JSONDecodeError:
                    stats = {"unreadable": h["stats"][:200]}
                entry["history"].append({"stage": h["stage"], "from": h["from_status"], "to": h["to_status"],
                                         "action": h["action"], "at": _iso(h["at"]), "by": h["actor"],
                                         "error": h["error"], "duration_ms": h["duration_ms"],
                                         "events": h["events"], "stats": stats})
                if h["to_status"] == DONE and (stats or h["events"] is not None):
                    entry["stats"][h["stage"]] = {"events": h["events"], **(stats if isinstance(stats, dict) else {})}
            shards.append(entry)
        return {"filename": filename, "shards": shards}

    def summary(self) -> dict:
        """The contract's counts plus per-stage queue metrics.

        The counts need a scan of the whole table (about a second per million rows); once a
        scan takes longer than SUMMARY_SLOW_SECONDS its answer is served for five times as long
        as it took (`as_of` says when it was computed), so pollers cannot pile scans up.
        """
        cached = self._summary
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        with self._summary_lock:
            cached = self._summary
            if cached is not None and time.monotonic() < cached[0]:
                return cached[1]
            began = time.monotonic()
            result = self._compute_summary()
            took = time.monotonic() - began
            result["as_of"] = _iso(datetime.now(timezone.utc).replace(tzinfo=None))
            result["took_ms"] = round(took * 1000, 1)
            self._summary = (began + 5 * took, result) if took > SUMMARY_SLOW_SECONDS else None
            return result

    def _compute_summary(self) -> dict:
        rows = self._read(SQL_COUNTS)
        by_stage = {s.column: dict.fromkeys(_STATUS_KEYS, 0) for s in STAGES}
        by_shard: dict[int, dict] = {}
        total = 0
        for r in rows:
            total += r["n"]
            for key, stage in zip(_COUNT_KEYS, STAGES):
                if r[key] in STATUSES:
                    by_stage[stage.column][r[key]] += r["n"]
            sh = by_shard.setdefault(r["shard"], {"shard": r["shard"], "total": 0, **dict.fromkeys(_STATUS_KEYS, 0)})
            sh["total"] += r["n"]
            last = r[_COUNT_KEYS[-1]]
            if last in STATUSES:
                sh[last] += r["n"]
        stage_metrics = {}
        for stage in WORK_STAGES:
            status_col, prev_col = _status_col(stage), _status_col(stage.previous)
            ready = self._read(f"SELECT COUNT(*) n FROM pipeline_tracking WHERE {prev_col}={DONE.sql} "
                               f"AND {status_col}={NEW.sql}")[0]["n"]
            oldest = self._read(sql_ready(stage, False, "TIMESTAMPDIFF(MICROSECOND, created_at, NOW(3)) DIV 1000 age",
                                          "LIMIT 1"))
            recent = self._read("SELECT COUNT(*) n, COALESCE(SUM(events), 0) ev FROM pipeline_transitions "
                                f"WHERE stage=%s AND to_status={DONE.sql} AND at > NOW(3) - INTERVAL 60 SECOND", (stage,))[0]
            runs = [r["duration_ms"] for r in self._read(
                f"SELECT duration_ms FROM pipeline_transitions WHERE stage=%s AND to_status={DONE.sql} "
                "AND duration_ms IS NOT NULL ORDER BY at DESC LIMIT 500", (stage,))]
            stage_metrics[stage.column] = {
                "ready": ready,
                "oldest_ready_age_seconds": oldest[0]["age"] / 1000 if oldest and oldest[0]["age"] is not None
                else None,
                "done_last_minute": recent["n"], "events_last_minute": int(recent["ev"]),
                "median_run_ms": statistics.median(runs) if runs else None,
            }
        return {"total": total, "by_stage": by_stage,
                "by_shard": [{"shard": s["shard"], "total": s["total"],
                              **{k: s[k] for k in (DONE.value, FAILED.value, NEW.value, STARTED.value)}}
                             for s in sorted(by_shard.values(), key=lambda x: x["shard"])],
                "stages": stage_metrics}

    def throughput(self, minutes: int) -> dict:
        """Files and events finished per stage per minute, oldest minute first."""
        rows = self._read("SELECT stage, TIMESTAMPDIFF(MINUTE, at, NOW(3)) ago, COUNT(*) files, "
                          "COALESCE(SUM(events), 0) events FROM pipeline_transitions "
                          f"WHERE stage IN {sql_in(*STAGES)} "
                          f"AND to_status={DONE.sql} AND at > NOW(3) - INTERVAL %s MINUTE GROUP BY stage, ago",
                          (minutes,))
        out = {s.column: {"files": [0] * minutes, "events": [0] * minutes} for s in STAGES}
        for r in rows:
            i = minutes - 1 - int(r["ago"])
            if 0 <= i < minutes:
                out[Stage(r["stage"]).column]["files"][i] = int(r["files"])
                out[Stage(r["stage"]).column]["events"][i] = int(r["events"])
        return {"minutes": minutes, "stages": out}

    def ready(self) -> dict:
        rows = self._read("SELECT table_name AS t FROM information_schema.tables WHERE table_schema=DATABASE() "
                          "AND table_name IN ('pipeline_tracking','pipeline_transitions','pipeline_claim_lock')")
        return {"tables": sorted(r["t"] for r in rows)}
