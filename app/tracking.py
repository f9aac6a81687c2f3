"""The task state machine over `pipeline_tracking`: the only code that writes it.

A task is one (filename, shard) row; each stage has its own status column. Every change runs
in one short transaction that locks the row (or claims rows with SKIP LOCKED), checks the rule,
updates, and appends a row to `pipeline_transitions`.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson
import pymysql
import pymysql.cursors

from . import db

DDL_PATH = Path(__file__).resolve().parent.parent / "db" / "ddl.sql"

STAGES = ("event-ingest", "shard-splitter", "shard-worker", "mysql-sender")
WORK_STAGES = STAGES[1:]
COLUMN = {s: s.replace("-", "_") for s in STAGES}
PREVIOUS = {"shard-splitter": "event-ingest", "shard-worker": "shard-splitter", "mysql-sender": "shard-worker"}
# Stages whose tasks of one shard must run in registration order (see docs/business-rules.md).
ORDERED = {"shard-worker"}
ACTIONS = ("start", "done", "fail", "retry", "release", "rewind")
STATUSES = ("new", "started", "done", "failed")


class TaskError(Exception):
    http_status = 400

    def __init__(self, message: str, **body: Any):
        super().__init__(message)
        self.body = {"error": message, **body}


class NotFound(TaskError):
    http_status = 404


class Conflict(TaskError):
    http_status = 409


@dataclass
class Outcome:
    filename: str
    shard: int
    stage: str
    status: str
    changed: bool
    attempts: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"filename": self.filename, "shard": self.shard, "stage": self.stage,
                "status": self.status, "changed": self.changed, "attempts": self.attempts, **self.extra}


def _status_col(stage: str) -> str:
    return f"{COLUMN[stage]}_status"


def _attempts_col(stage: str) -> str:
    return f"{COLUMN[stage]}_attempts"


def _iso(value) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _iso_s(value) -> str | None:
    """The contract's timestamps: seconds, UTC, `Z`."""
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


# Columns an original-shaped table lacks, with how to add them (the upgrade path of ddl.sql).
UPGRADE_COLUMNS = [
    ("owner", "VARCHAR(128) NULL"),
    ("started_at", "DATETIME(3) NULL"),
    ("lease_expires_at", "DATETIME(3) NULL"),
    ("shard_splitter_attempts", "SMALLINT UNSIGNED NOT NULL DEFAULT 0"),
    ("shard_worker_attempts", "SMALLINT UNSIGNED NOT NULL DEFAULT 0"),
    ("mysql_sender_attempts", "SMALLINT UNSIGNED NOT NULL DEFAULT 0"),
    ("last_error", "VARCHAR(2000) NULL"),
]
UPGRADE_INDEXES = [
    ("uq_filename_shard", "UNIQUE KEY uq_filename_shard (filename, shard)"),
    ("ix_splitter_ready", "KEY ix_splitter_ready (event_ingest_status, shard_splitter_status)"),
    ("ix_splitter_ready_shard", "KEY ix_splitter_ready_shard (event_ingest_status, shard_splitter_status, shard)"),
    ("ix_worker_ready", "KEY ix_worker_ready (shard_splitter_status, shard_worker_status)"),
    ("ix_worker_ready_shard", "KEY ix_worker_ready_shard (shard_splitter_status, shard_worker_status, shard)"),
    ("ix_sender_ready", "KEY ix_sender_ready (shard_worker_status, mysql_sender_status)"),
    ("ix_sender_ready_shard", "KEY ix_sender_ready_shard (shard_worker_status, mysql_sender_status, shard)"),
    ("ix_worker_order", "KEY ix_worker_order (shard, shard_worker_status)"),
    ("ix_lease", "KEY ix_lease (lease_expires_at)"),
    ("ix_owner", "KEY ix_owner (owner)"),
]


def install_schema(conn) -> None:
    """Create the tracking tables, or upgrade an original-shaped `pipeline_tracking` in place.

    Idempotent and serialised by a named lock, so two API instances may start together.
    """
    statements = [s for s in db.split_sql(DDL_PATH.read_text())
                  if not s.upper().startswith(("CREATE DATABASE", "USE "))]
    with conn.cursor() as cur:
        cur.execute("SELECT GET_LOCK('pipeline_tracking_ddl', 60)")
        try:
            cur.execute("SELECT DATABASE()")
            schema = cur.fetchone()[0]
            cur.execute("SELECT COUNT(*) FROM information_schema.tables "
                        "WHERE table_schema=%s AND table_name='pipeline_tracking'", (schema,))
            existed = cur.fetchone()[0] > 0
            for stmt in statements:
                cur.execute(stmt)
            if existed:
                _upgrade(cur, schema)
        finally:
            cur.execute("SELECT RELEASE_LOCK('pipeline_tracking_ddl')")


def _upgrade(cur, schema: str) -> None:
    cur.execute("SELECT column_name FROM information_schema.columns "
                "WHERE table_schema=%s AND table_name='pipeline_tracking'", (schema,))
    have = {r[0].lower() for r in cur.fetchall()}
    for name, definition in UPGRADE_COLUMNS:
        if name not in have:
            cur.execute(f"ALTER TABLE pipeline_tracking ADD COLUMN {name} {definition}")
    cur.execute("SELECT DISTINCT index_name FROM information_schema.statistics "
                "WHERE table_schema=%s AND table_name='pipeline_tracking'", (schema,))
    have_idx = {r[0].lower() for r in cur.fetchall()}
    cur.execute("SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema=%s "
                "AND table_name='pipeline_tracking' AND non_unique=0 AND index_name<>'PRIMARY'", (schema,))
    has_unique = cur.fetchone()[0] > 0
    for name, definition in UPGRADE_INDEXES:
        if name in have_idx or (name == "uq_filename_shard" and has_unique):
            continue
        cur.execute(f"ALTER TABLE pipeline_tracking ADD {definition}")
    # The original's created_at/updated_at may lack milliseconds; widening loses nothing.
    cur.execute("SELECT column_name, datetime_precision FROM information_schema.columns "
                "WHERE table_schema=%s AND table_name='pipeline_tracking' "
                "AND column_name IN ('created_at','updated_at')", (schema,))
    for name, precision in cur.fetchall():
        if not precision:
            extra = " ON UPDATE CURRENT_TIMESTAMP(3)" if name.lower() == "updated_at" else ""
            cur.execute(f"ALTER TABLE pipeline_tracking MODIFY {name} DATETIME(3) NOT NULL "
                        f"DEFAULT CURRENT_TIMESTAMP(3){extra}")


class Tracker:
    """Task operations. `conns` hands out this thread's connection (`db.ThreadConnections`)."""

    def __init__(self, conns, shard_count: int, lease_seconds: float, max_attempts: int):
        self.conns = conns
        self.shard_count = shard_count
        self.lease_ms = int(lease_seconds * 1000)
        self.max_attempts = max_attempts

    # -- transactions ---------------------------------------------------------------------

    def _tx(self, fn: Callable[[Any], Any]):
        """Run fn(cursor) in a transaction; retried on deadlock or lock-wait timeout."""
        conn = self.conns.get()
        for attempt in range(6):
            try:
                conn.begin()
                with conn.cursor(pymysql.cursors.DictCursor) as cur:
                    result = fn(cur)
                conn.commit()
                return result
            except pymysql.err.OperationalError as exc:
                self._rollback(conn)
                if exc.args and exc.args[0] in db.DEADLOCK_CODES and attempt < 5:
                    continue
                raise
            except BaseException:
                self._rollback(conn)
                raise

    @staticmethod
    def _rollback(conn) -> None:
        try:
            conn.rollback()
        except Exception:
            pass

    def _read(self, sql: str, args=()) -> list[dict]:
        conn = self.conns.get()
        with conn.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    @staticmethod
    def _log(cur, rows: list[tuple]) -> None:
        """Append transitions: (tracking_id, filename, shard, stage, from, to, action, actor,
        error, duration_ms, events, stats)."""
        if rows:
            cur.executemany(
                "INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status,"
                " to_status, action, actor, error, duration_ms, events, stats)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", rows)

    # -- registration ---------------------------------------------------------------------

    def register(self, filename: str, shards: list[int]) -> dict:
        def tx(cur):
            cur.execute("SELECT shard FROM pipeline_tracking WHERE filename=%s FOR UPDATE", (filename,))
            existing = {r["shard"] for r in cur.fetchall()}
            missing = [s for s in shards if s not in existing]
            if missing:
                cur.executemany(
                    "INSERT INTO pipeline_tracking (filename, shard, event_ingest_status) VALUES (%s,%s,'started')",
                    [(filename, s) for s in missing])
                cur.execute("SELECT id, shard FROM pipeline_tracking WHERE filename=%s", (filename,))
                ids = {r["shard"]: r["id"] for r in cur.fetchall()}
                self._log(cur, [(ids[s], filename, s, "event-ingest", None, "started", "register",
                                 None, None, None, None, None) for s in missing])
            return {"filename": filename, "shards": sorted(set(shards) | existing), "created": bool(missing)}
        return self._tx(tx)

    def ingest_done(self, filename: str, actor: str | None = None, events: int | None = None) -> dict:
        def tx(cur):
            cur.execute("SELECT id, shard, event_ingest_status FROM pipeline_tracking WHERE filename=%s "
                        "ORDER BY shard FOR UPDATE", (filename,))
            rows = cur.fetchall()
            if not rows:
                raise NotFound(f"file {filename!r} is not registered", filename=filename)
            failed = [r["shard"] for r in rows if r["event_ingest_status"] == "failed"]
            if failed:
                raise Conflict("event-ingest failed for this file; it cannot be marked done",
                               filename=filename, stage="event-ingest", status="failed", shards=failed)
            todo = [r for r in rows if r["event_ingest_status"] != "done"]
            if todo:
                cur.execute("UPDATE pipeline_tracking SET event_ingest_status='done' "
                            "WHERE filename=%s AND event_ingest_status IN ('new','started')", (filename,))
                self._log(cur, [(r["id"], filename, r["shard"], "event-ingest", r["event_ingest_status"], "done",
                                 "done", actor, None, None, events, None) for r in todo])
            return {"filename": filename, "updated_rows": len(todo)}
        return self._tx(tx)

    # -- one task's transitions -------------------------------------------------------------

    def transition(self, stage: str, action: str, filename: str, shard: int, worker: str | None = None,
                   error: str | None = None, events: int | None = None, stats: dict | None = None) -> Outcome:
        status_col, prev_col, att_col = _status_col(stage), _status_col(PREVIOUS[stage]), _attempts_col(stage)

        def tx(cur):
            cur.execute(f"SELECT id, {prev_col} AS prev, {status_col} AS status, owner, {att_col} AS attempts,"
                        f" TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000 AS ran_ms"
                        f" FROM pipeline_tracking WHERE filename=%s AND shard=%s FOR UPDATE", (filename, shard))
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no task ({filename!r}, shard {shard})", filename=filename, shard=shard)
            handler = getattr(self, f"_{action}")
            return handler(cur, stage, row, filename, shard, worker, error, events, stats)
        return self._tx(tx)

    def _conflict(self, stage, row, filename, shard, why):
        return Conflict(why, filename=filename, shard=shard, stage=stage, status=row["status"],
                        previous_status=row["prev"], owner=row["owner"])

    def _set(self, cur, stage, row, to, action, worker, error=None, events=None, stats=None,
             sql_extra="", args_extra=(), duration=False):
        status_col = _status_col(stage)
        cur.execute(f"UPDATE pipeline_tracking SET {status_col}=%s{sql_extra} WHERE id=%s",
                    (to, *args_extra, row["id"]))
        self._log(cur, [(row["id"], row["filename"], row["shard"], stage, row["status"], to, action, worker,
                         error, row["ran_ms"] if duration else None, events,
                         orjson.dumps(stats).decode() if stats else None)])

    def _outcome(self, stage, row, status, changed, attempts=None, **extra):
        return Outcome(row["filename"], row["shard"], stage, status, changed,
                       row["attempts"] if attempts is None else attempts, extra)

    def _start(self, cur, stage, row, filename, shard, worker, error, events, stats):
        row.update(filename=filename, shard=shard)
        if row["status"] == "started" and worker and row["owner"] == worker:
            cur.execute("UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND "
                        "WHERE id=%s", (self.lease_ms * 1000, row["id"]))
            return self._outcome(stage, row, "started", False)
        if row["status"] != "new":
            raise self._conflict(stage, row, filename, shard, f"{stage} can start only from 'new'")
        if row["prev"] != "done":
            raise self._conflict(stage, row, filename, shard,
                                 f"{PREVIOUS[stage]} is {row['prev']!r}; {stage} starts only after it is done")
        self._set(cur, stage, row, "started", "start", worker,
                  sql_extra=f", owner=%s, started_at=NOW(3), lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND,"
                            f" {_attempts_col(stage)}={_attempts_col(stage)}+1",
                  args_extra=(worker, self.lease_ms * 1000))
        return self._outcome(stage, row, "started", True, row["attempts"] + 1)

    def _check_owner(self, stage, row, filename, shard, worker):
        if worker and row["owner"] and row["owner"] != worker:
            raise self._conflict(stage, row, filename, shard,
                                 f"task is held by {row['owner']!r}, not {worker!r} (its lease was lost)")

    def _done(self, cur, stage, row, filename, shard, worker, error, events, stats):
        row.update(filename=filename, shard=shard)
        if row["status"] == "done":
            return self._outcome(stage, row, "done", False)
        if row["status"] != "started":
            raise self._conflict(stage, row, filename, shard, f"{stage} can be done only from 'started'")
        self._check_owner(stage, row, filename, shard, worker)
        self._set(cur, stage, row, "done", "done", worker or row["owner"], events=events, stats=stats,
                  sql_extra=", owner=NULL, lease_expires_at=NULL", duration=True)
        return self._outcome(stage, row, "done", True)

    def _fail(self, cur, stage, row, filename, shard, worker, error, events, stats):
        row.update(filename=filename, shard=shard)
        if row["status"] == "failed":
            return self._outcome(stage, row, "failed", False)
        if row["status"] not in ("new", "started"):
            raise self._conflict(stage, row, filename, shard, f"{stage} can fail only from 'new' or 'started'")
        if row["status"] == "started":
            self._check_owner(stage, row, filename, shard, worker)
        self._set(cur, stage, row, "failed", "fail", worker or row["owner"], error=error, events=events,
                  stats=stats, sql_extra=", owner=NULL, lease_expires_at=NULL, last_error=%s",
                  args_extra=(error,), duration=row["status"] == "started")
        return self._outcome(stage, row, "failed", True)

    def _last_action(self, cur, row, stage) -> str | None:
        cur.execute("SELECT action FROM pipeline_transitions WHERE tracking_id=%s AND stage=%s "
                    "ORDER BY id DESC LIMIT 1", (row["id"], stage))
        last = cur.fetchone()
        return last["action"] if last else None

    def _retry(self, cur, stage, row, filename, shard, worker, error, events, stats):
        row.update(filename=filename, shard=shard)
        if row["status"] == "new" and self._last_action(cur, row, stage) == "retry":
            return self._outcome(stage, row, "new", False)
        if row["status"] != "failed":
            raise self._conflict(stage, row, filename, shard, f"{stage} can be retried only from 'failed'")
        self._set(cur, stage, row, "new", "retry", worker, sql_extra=f", {_attempts_col(stage)}=0")
        return self._outcome(stage, row, "new", True, 0)

    def _release(self, cur, stage, row, filename, shard, worker, error, events, stats):
        """A daemon hands a task back unfinished (clean shutdown): no attempt is spent."""
        row.update(filename=filename, shard=shard)
        if row["status"] == "new" and self._last_action(cur, row, stage) == "release":
            return self._outcome(stage, row, "new", False)
        if row["status"] != "started":
            raise self._conflict(stage, row, filename, shard, f"{stage} can be released only from 'started'")
        self._check_owner(stage, row, filename, shard, worker)
        att = _attempts_col(stage)
        self._set(cur, stage, row, "new", "release", worker or row["owner"], error=error,
                  sql_extra=f", owner=NULL, lease_expires_at=NULL, {att}=GREATEST({att}-1, 0)")
        return self._outcome(stage, row, "new", True, max(row["attempts"] - 1, 0))

    def _rewind(self, cur, stage, row, filename, shard, worker, error, events, stats):
        """The stage's input file is missing: send the task back to the stage that produces it."""
        row.update(filename=filename, shard=shard)
        upstream = PREVIOUS[stage]
        if upstream == "event-ingest":
            raise self._conflict(stage, row, filename, shard,
                                 "shard-splitter reads the registered source file; nothing upstream can "
                                 "rebuild it: fail the task instead")
        if row["status"] == "new" and row["prev"] == "new" and self._last_action(cur, row, stage) == "rewind":
            return self._outcome(stage, row, "new", False, rewound_to=upstream)
        if row["status"] not in ("new", "started"):
            raise self._conflict(stage, row, filename, shard, f"{stage} can be rewound only from 'new' or 'started'")
        if row["status"] == "started":
            self._check_owner(stage, row, filename, shard, worker)
        if row["attempts"] >= self.max_attempts:
            reason = f"input missing after {row['attempts']} attempts: {error or 'no reason given'}"
            return self._fail(cur, stage, row, filename, shard, worker, reason, None, None)
        reason = f"input missing, rebuilt by {upstream}: {error or 'no reason given'}"
        self._set(cur, stage, row, "new", "rewind", worker or row["owner"], error=reason,
                  sql_extra=f", {_status_col(upstream)}='new', owner=NULL, lease_expires_at=NULL, last_error=%s",
                  args_extra=(reason,))
        self._log(cur, [(row["id"], filename, shard, upstream, row["prev"], "new", "rewind", worker, reason,
                         None, None, None)])
        return self._outcome(stage, row, "new", True, rewound_to=upstream)

    def heartbeat(self, stage: str, filename: str, shard: int, worker: str) -> dict:
        status_col = _status_col(stage)

        def tx(cur):
            cur.execute(f"UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND "
                        f"WHERE filename=%s AND shard=%s AND {status_col}='started' AND owner=%s",
                        (self.lease_ms * 1000, filename, shard, worker))
            if cur.rowcount:
                cur.execute("SELECT lease_expires_at FROM pipeline_tracking WHERE filename=%s AND shard=%s",
                            (filename, shard))
                return {"filename": filename, "shard": shard, "stage": stage, "status": "started",
                        "worker": worker, "lease_expires_at": _iso(cur.fetchone()["lease_expires_at"])}
            cur.execute(f"SELECT {status_col} AS status, owner FROM pipeline_tracking WHERE filename=%s AND shard=%s",
                        (filename, shard))
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no task ({filename!r}, shard {shard})", filename=filename, shard=shard)
            raise Conflict(f"{worker!r} does not hold this task (lease lost or task finished)",
                           filename=filename, shard=shard, stage=stage, status=row["status"], owner=row["owner"])
        return self._tx(tx)

    def retry_all(self, stage: str, shard: int | None, actor: str | None) -> dict:
        status_col, att = _status_col(stage), _attempts_col(stage)
        where, args = f"{status_col}='failed'", []
        if shard is not None:
            where, args = where + " AND shard=%s", [shard]

        def tx(cur):
            cur.execute(f"SELECT id, filename, shard FROM pipeline_tracking WHERE "
                        f"{_prev_any(stage)} AND {where} ORDER BY id FOR UPDATE", args)
            rows = cur.fetchall()
            if rows:
                ids = [r["id"] for r in rows]
                marks = ",".join(["%s"] * len(ids))
                cur.execute(f"UPDATE pipeline_tracking SET {status_col}='new', {att}=0 WHERE id IN ({marks})", ids)
                self._log(cur, [(r["id"], r["filename"], r["shard"], stage, "failed", "new", "retry", actor,
                                 None, None, None, None) for r in rows])
            return {"stage": stage, "shard": shard, "retried": len(rows),
                    "items": [{"filename": r["filename"], "shard": r["shard"]} for r in rows[:1000]]}
        return self._tx(tx)

    # -- claims and leases ---------------------------------------------------------------------

    def claim(self, stage: str, limit: int, shard: int | None, worker: str) -> list[dict]:
        """Up to `limit` tasks for `worker`: first those it already holds (a restarted daemon
        resumes its own work), then ready ones, oldest first, each won by exactly one caller."""
        status_col, prev_col, att = _status_col(stage), _status_col(PREVIOUS[stage]), _attempts_col(stage)
        shard_sql, shard_args = ("AND shard=%s", (shard,)) if shard is not None else ("", ())
        cols = f"id, filename, shard, created_at, {att} AS attempts"

        def tx(cur):
            cur.execute(f"SELECT {cols} FROM pipeline_tracking WHERE owner=%s AND {status_col}='started' "
                        f"{shard_sql} ORDER BY id LIMIT %s FOR UPDATE", (worker, *shard_args, limit))
            mine = cur.fetchall()
            if mine:
                marks = ",".join(["%s"] * len(mine))
                cur.execute(f"UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND "
                            f"WHERE id IN ({marks})", (self.lease_ms * 1000, *[r["id"] for r in mine]))
            want = limit - len(mine)
            fresh: list[dict] = []
            if want > 0:
                if stage in ORDERED and shard is not None:
                    fresh = self._ordered_candidates(cur, stage, shard, worker, want, cols)
                else:
                    cur.execute(f"SELECT {cols} FROM pipeline_tracking WHERE {prev_col}='done' AND "
                                f"{status_col}='new' {shard_sql} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                                (*shard_args, want))
                    fresh = cur.fetchall()
            if fresh:
                ids = [r["id"] for r in fresh]
                marks = ",".join(["%s"] * len(ids))
                cur.execute(f"UPDATE pipeline_tracking SET {status_col}='started', owner=%s, started_at=NOW(3),"
                            f" lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND, {att}={att}+1"
                            f" WHERE id IN ({marks})", (worker, self.lease_ms * 1000, *ids))
                self._log(cur, [(r["id"], r["filename"], r["shard"], stage, "new", "started", "claim", worker,
                                 None, None, None, None) for r in fresh])
                for r in fresh:
                    r["attempts"] += 1
            return [{"filename": r["filename"], "shard": r["shard"], "created_at": _iso_s(r["created_at"]),
                     "attempts": r["attempts"], "resumed": r in mine} for r in [*mine, *fresh]]
        return self._tx(tx)

    def _ordered_candidates(self, cur, stage, shard, worker, want, cols) -> list[dict]:
        """Oldest ready tasks of one shard, never past an earlier task that is still pending.

        A row of the claim-lock table serialises claims of (stage, shard), so two replicas cannot
        take consecutive files of one shard at once. Files whose ingest is not done, or whose
        splitter failed, are not in the shard's stream yet and do not block it.
        """
        status_col, prev_col = _status_col(stage), _status_col(PREVIOUS[stage])
        cur.execute("INSERT INTO pipeline_claim_lock (stage, shard) VALUES (%s,%s) "
                    "ON DUPLICATE KEY UPDATE shard=shard", (stage, shard))
        cur.execute("SELECT stage FROM pipeline_claim_lock WHERE stage=%s AND shard=%s FOR UPDATE", (stage, shard))
        cur.execute(f"SELECT 1 FROM pipeline_tracking WHERE shard=%s AND {status_col}='started' "
                    f"AND NOT (owner <=> %s) LIMIT 1", (shard, worker))
        if cur.fetchone():
            return []
        cur.execute(f"SELECT {cols}, {prev_col} AS prev, event_ingest_status AS ingest FROM pipeline_tracking "
                    f"WHERE shard=%s AND {status_col}='new' ORDER BY id LIMIT %s FOR UPDATE",
                    (shard, want + 64))
        picked = []
        for r in cur.fetchall():
            if r["ingest"] != "done" or r["prev"] == "failed":
                continue
            if r["prev"] != "done" or len(picked) == want:
                break
            picked.append(r)
        return picked

    def reap(self, limit: int = 500) -> list[dict]:
        """Return tasks whose lease expired to `new` (attempt counted) or, after `max_attempts`,
        to `failed` with the reason."""
        def tx(cur):
            cur.execute("SELECT id, filename, shard, owner, shard_splitter_status, shard_worker_status, "
                        "mysql_sender_status, shard_splitter_attempts, shard_worker_attempts, mysql_sender_attempts,"
                        " TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000 AS ran_ms "
                        "FROM pipeline_tracking WHERE lease_expires_at < NOW(3) ORDER BY lease_expires_at "
                        "LIMIT %s FOR UPDATE SKIP LOCKED", (limit,))
            reaped = []
            for r in cur.fetchall():
                stage = next((s for s in WORK_STAGES if r[_status_col(s)] == "started"), None)
                if stage is None:
                    cur.execute("UPDATE pipeline_tracking SET owner=NULL, lease_expires_at=NULL WHERE id=%s",
                                (r["id"],))
                    continue
                attempts = r[_attempts_col(stage)]
                to = "failed" if attempts >= self.max_attempts else "new"
                error = f"lease of {r['owner']!r} expired (attempt {attempts} of {self.max_attempts})"
                cur.execute(f"UPDATE pipeline_tracking SET {_status_col(stage)}=%s, owner=NULL, "
                            f"lease_expires_at=NULL, last_error=%s WHERE id=%s", (to, error, r["id"]))
                self._log(cur, [(r["id"], r["filename"], r["shard"], stage, "started", to, "reap", r["owner"],
                                 error, r["ran_ms"], None, None)])
                reaped.append({"filename": r["filename"], "shard": r["shard"], "stage": stage, "status": to})
            return reaped
        return self._tx(tx)

    # -- reads ---------------------------------------------------------------------------------

    def queue(self, stage: str, limit: int, offset: int, shard: int | None) -> dict:
        status_col, prev_col = _status_col(stage), _status_col(PREVIOUS[stage])
        shard_sql, args = ("AND shard=%s", [shard]) if shard is not None else ("", [])
        rows = self._read(f"SELECT filename, shard, created_at FROM pipeline_tracking WHERE {prev_col}='done' "
                          f"AND {status_col}='new' {shard_sql} ORDER BY id LIMIT %s OFFSET %s",
                          (*args, limit, offset))
        return {"stage": stage, "limit": limit, "offset": offset,
                "items": [{"filename": r["filename"], "shard": r["shard"], "created_at": _iso_s(r["created_at"])}
                          for r in rows]}

    def tasks(self, stage: str, status: str, shard: int | None, limit: int, offset: int) -> dict:
        """Tasks of one stage in one status, with owner, lease, attempts and last error."""
        status_col = _status_col(stage)
        where = f"{_prev_any(stage)} AND {status_col}=%s"
        args: list = [status]
        if shard is not None:
            where += " AND shard=%s"
            args.append(shard)
        att = _attempts_col(stage) if stage != "event-ingest" else "0"
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
                 "running_ms": r["running_ms"]} if status == "started" else {})}
            for r in rows]}

    def file(self, filename: str) -> dict:
        rows = self._read("SELECT * FROM pipeline_tracking WHERE filename=%s ORDER BY shard", (filename,))
        if not rows:
            raise NotFound(f"file {filename!r} is not registered", filename=filename)
        history = self._read("SELECT tracking_id, stage, from_status, to_status, action, at, actor, error, "
                             "duration_ms, events, stats FROM pipeline_transitions WHERE filename=%s ORDER BY id",
                             (filename,))
        shards = []
        for r in rows:
            entry = {"shard": r["shard"], **{_status_col(s): r[_status_col(s)] for s in STAGES},
                     "updated_at": _iso_s(r["updated_at"]), "created_at": _iso_s(r["created_at"]),
                     "attempts": {s: r[_attempts_col(s)] for s in WORK_STAGES},
                     "last_error": r["last_error"], "owner": r["owner"],
                     "lease_expires_at": _iso(r["lease_expires_at"]), "stats": {}, "history": []}
            for h in history:
                if h["tracking_id"] != r["id"]:
                    continue
                stats = orjson.loads(h["stats"]) if h["stats"] else None
                entry["history"].append({"stage": h["stage"], "from": h["from_status"], "to": h["to_status"],
                                         "action": h["action"], "at": _iso(h["at"]), "by": h["actor"],
                                         "error": h["error"], "duration_ms": h["duration_ms"],
                                         "events": h["events"], "stats": stats})
                if h["to_status"] == "done" and (stats or h["events"] is not None):
                    entry["stats"][h["stage"]] = {"events": h["events"], **(stats or {})}
            shards.append(entry)
        return {"filename": filename, "shards": shards}

    def summary(self) -> dict:
        rows = self._read("SELECT shard, event_ingest_status a, shard_splitter_status b, shard_worker_status c, "
                          "mysql_sender_status d, COUNT(*) n FROM pipeline_tracking GROUP BY shard, a, b, c, d")
        by_stage = {COLUMN[s]: dict.fromkeys(STATUSES, 0) for s in STAGES}
        by_shard: dict[int, dict] = {}
        total = 0
        for r in rows:
            total += r["n"]
            for key, stage in zip("abcd", STAGES):
                by_stage[COLUMN[stage]][r[key]] += r["n"]
            sh = by_shard.setdefault(r["shard"], {"shard": r["shard"], "total": 0, **dict.fromkeys(STATUSES, 0)})
            sh["total"] += r["n"]
            sh[r["d"]] += r["n"]
        stage_metrics = {}
        for stage in WORK_STAGES:
            status_col, prev_col = _status_col(stage), _status_col(PREVIOUS[stage])
            ready = self._read(f"SELECT COUNT(*) n, TIMESTAMPDIFF(MICROSECOND, MIN(created_at), NOW(3)) DIV 1000 age "
                               f"FROM pipeline_tracking WHERE {prev_col}='done' AND {status_col}='new'")[0]
            recent = self._read("SELECT COUNT(*) n, COALESCE(SUM(events), 0) ev FROM pipeline_transitions "
                                "WHERE stage=%s AND to_status='done' AND at > NOW(3) - INTERVAL 60 SECOND", (stage,))[0]
            runs = [r["duration_ms"] for r in self._read(
                "SELECT duration_ms FROM pipeline_transitions WHERE stage=%s AND to_status='done' "
                "AND duration_ms IS NOT NULL ORDER BY at DESC LIMIT 500", (stage,))]
            stage_metrics[COLUMN[stage]] = {
                "ready": ready["n"],
                "oldest_ready_age_seconds": None if ready["age"] is None else ready["age"] / 1000,
                "done_last_minute": recent["n"], "events_last_minute": int(recent["ev"]),
                "median_run_ms": statistics.median(runs) if runs else None,
            }
        return {"total": total, "by_stage": by_stage,
                "by_shard": [{"shard": s["shard"], "total": s["total"], "done": s["done"], "failed": s["failed"],
                              "new": s["new"], "started": s["started"]} for s in sorted(by_shard.values(),
                                                                                        key=lambda x: x["shard"])],
                "stages": stage_metrics}

    def throughput(self, minutes: int) -> dict:
        """Files and events finished per stage per minute, oldest minute first."""
        rows = self._read("SELECT stage, TIMESTAMPDIFF(MINUTE, at, NOW(3)) ago, COUNT(*) files, "
                          "COALESCE(SUM(events), 0) events FROM pipeline_transitions "
                          "WHERE stage IN ('event-ingest','shard-splitter','shard-worker','mysql-sender') "
                          "AND to_status='done' AND at > NOW(3) - INTERVAL %s MINUTE GROUP BY stage, ago",
                          (minutes,))
        out = {COLUMN[s]: {"files": [0] * minutes, "events": [0] * minutes} for s in STAGES}
        for r in rows:
            i = minutes - 1 - int(r["ago"])
            if 0 <= i < minutes:
                out[COLUMN[r["stage"]]]["files"][i] = int(r["files"])
                out[COLUMN[r["stage"]]]["events"][i] = int(r["events"])
        return {"minutes": minutes, "stages": out}

    def ready(self) -> dict:
        rows = self._read("SELECT table_name FROM information_schema.tables WHERE table_schema=DATABASE() "
                          "AND table_name IN ('pipeline_tracking','pipeline_transitions')")
        return {"tables": sorted(r["table_name"] for r in rows)}


def _prev_any(stage: str) -> str:
    """A predicate that lets a status lookup use the (previous, current) ready index."""
    if stage == "event-ingest":
        return "1=1"
    return f"{_status_col(PREVIOUS[stage])} IN ('new','started','done','failed')"
