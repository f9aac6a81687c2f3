"""The tracking tables' SQL, named and built from the stage vocabulary (app/stages.py); never
from input: every value goes in as a parameter. And how their rows' times become JSON. The texts
of the hot queries are built once per stage and kept (`lru_cache`): building them on every
request was about 2% of the API's CPU.
"""
from __future__ import annotations

from functools import lru_cache

from ..db import Call
from ..stages import FIRST, ORDERED, STAGES, STATUSES, WORK_STAGES, Stage, Status, sql_in

NEW, STARTED, DONE, FAILED = Status.NEW, Status.STARTED, Status.DONE, Status.FAILED


# -- the queue queries ----------------------------------------------------------------------------
# Each names its index: with LIMIT and ORDER BY id the optimizers (MariaDB and MySQL alike)
# otherwise like to walk the primary key "until enough rows match", which is fast while the
# queue is most of the table and a scan of all finished history once it is not. Reading the
# ready index is right at every size: it holds exactly the ready rows, already in id order.

def status_index(stage: Stage) -> str:
    """The contract's index on a stage's status column; InnoDB appends the id to it, so
    "status = x AND id > after ORDER BY id" is one range read at any depth."""
    return f"ix_{'ingest' if stage is Stage.INGEST else stage.short}_status"


def next_page(rows: list[dict], limit: int, after: int | None) -> dict:
    """`next_after`: the cursor of the next page (None when this one was the last)."""
    return {"after": after, "next_after": rows[-1]["id"] if len(rows) == limit else None}


def ready_index(stage: Stage, sharded: bool) -> str:
    return f"ix_{stage.short}_ready{'_shard' if sharded else ''}"


@lru_cache(maxsize=256)
def sql_ready(stage: Stage, sharded: bool, columns: str, tail: str, extra: str = "") -> str:
    """Ready tasks of a stage, oldest first: `%s` for the shard when `sharded`, then `tail`'s."""
    shard = " AND shard=%s" if sharded else ""
    return (f"SELECT {columns} FROM pipeline_tracking FORCE INDEX ({ready_index(stage, sharded)}) "
            f"WHERE {stage.previous.status_column}={DONE.sql} AND {stage.status_column}={NEW.sql}{shard}{extra} "
            f"ORDER BY id {tail}")


@lru_cache(maxsize=256)
def sql_held(stage: Stage, sharded: bool, lock: bool = True) -> str:
    """What a daemon holds, locked (args: owner, [shard,] limit). Owner is set only on started
    tasks, so ix_owner stays tiny and the lock touches only the daemon's own rows (a scan of
    another index would lock, and wait on, rows other daemons are finishing). `lock` False:
    whether it holds any (args: owner, [shard]), unlocked."""
    where = (f"SELECT id FROM pipeline_tracking FORCE INDEX (ix_owner) WHERE owner=%s"
             f" AND {stage.status_column}={STARTED.sql}{' AND shard=%s' if sharded else ''}")
    return f"{where} ORDER BY id LIMIT %s FOR UPDATE" if lock else f"{where} LIMIT 1"


def sql_shard_busy(stage: Stage) -> str:
    """Another daemon holds a started task of this shard (args: shard, owner)."""
    return (f"SELECT 1 FROM pipeline_tracking FORCE INDEX ({ready_index(stage, True)}) "
            f"WHERE {stage.previous.status_column} IN {sql_in(*STATUSES)} "
            f"AND {stage.status_column}={STARTED.sql} AND shard=%s AND NOT (owner <=> %s) LIMIT 1")


def sql_shard_blocker(stage: Stage, pending: Status) -> str:
    """The shard's oldest file the previous stage has `pending` (new or started) although ingest
    is done (args: shard). One per status, ORDER BY id LIMIT 1, not one MIN(id) over both: the
    ingest condition is not in the index, so MIN read every row of the range (each worker claim
    read the shard's whole backlog at the splitter); this stops at the first file that qualifies."""
    return (f"SELECT id FROM pipeline_tracking FORCE INDEX ({ready_index(stage, True)}) "
            f"WHERE {stage.previous.status_column}={pending.sql} AND {stage.status_column}={NEW.sql} "
            f"AND shard=%s AND {FIRST.status_column}={DONE.sql} ORDER BY id LIMIT 1")


NO_ID = 9223372036854775807   # above every id: "no bound"


@lru_cache(maxsize=256)
def sql_shard_gate(stage: Stage) -> str:
    """Both reads above in one statement (args: shard, owner, shard, shard), kept in session
    variables for `SQL_BEFORE_GATE` in the same packet: `@pipeline_busy` 1 or 0,
    `@pipeline_blocker` the id or NULL. Each part is the index read the EXPLAIN test checks on
    its own. A SELECT, not a `SET @v = (subquery)`: MariaDB's SET locks the rows its subquery
    reads (the shard's files still pending at the splitter, until the claim commits), and a
    splitter's claim, skipping locked rows, then took half a file."""
    oldest = ", ".join(f"COALESCE(({sql_shard_blocker(stage, pending)}), {NO_ID})" for pending in (NEW, STARTED))
    return (f"SELECT @pipeline_busy := EXISTS({sql_shard_busy(stage)}) AS busy,"
            f" @pipeline_blocker := NULLIF(LEAST({oldest}), {NO_ID}) AS blocker")


# An ordered claim's ready read, after `sql_shard_gate` (a range on id, so one index read): below
# the blocker, nothing while the shard is busy. Unset variables (NULL) leave the range open.
SQL_BEFORE_GATE = f" AND id < IF(@pipeline_busy, 0, COALESCE(@pipeline_blocker, {NO_ID}))"


@lru_cache(maxsize=64)
def sql_claim(gate: str) -> Call:
    """A claim (migration tracking 0008; args: stage, shard or None, owner, limit, lease in us),
    which claims only when `gate`, an SQL condition, holds (else rolls the transaction back)."""
    return Call(f"CALL pipeline_claim(%s,%s,%s,%s,%s,{gate})")


# Started tasks whose lease ran out, for the reaper (args: limit).
SQL_EXPIRED = (f"SELECT id, filename, shard, owner, {', '.join(s.status_column for s in WORK_STAGES)},"
               f" {', '.join(s.attempts_column for s in WORK_STAGES)},"
               " TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000 AS ran_ms"
               " FROM pipeline_tracking FORCE INDEX (ix_lease) WHERE lease_expires_at < NOW(3)"
               " ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED")


@lru_cache(maxsize=256)
def row_sql(stage: Stage, lock: bool) -> str:
    """A task as the rules see it, with the stage's last logged action (which tells a
    repeat from an illegal call). Args: stage, filename, shard."""
    return (f"SELECT id, {stage.previous.status_column} AS prev, {stage.status_column} AS status, owner,"
            f" {stage.attempts_column} AS attempts, TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000 AS ran_ms,"
            f" (SELECT CONCAT_WS(':', x.action, x.to_status, x.actor) FROM pipeline_transitions x"
            f"  WHERE x.tracking_id = pipeline_tracking.id AND x.stage = %s ORDER BY x.id DESC LIMIT 1) AS last"
            f" FROM pipeline_tracking WHERE filename=%s AND shard=%s{' FOR UPDATE' if lock else ''}")


# The contract's counts, kept by pipeline_tracking's triggers (migration 0004): a few dozen rows
# however big the table. `status` is a Status, or READY (previous stage done, this one new).
READY = "ready"
STATUS_KEYS = tuple(s.value for s in STATUSES)  # JSON keys must be plain str
SQL_TASK_COUNTS = "SELECT stage, shard, status, n FROM pipeline_task_counts WHERE n <> 0"
# The same counted from the table itself (a full scan): what the counts must always equal.
SQL_COUNTS_SCANNED = " UNION ALL ".join(
    [f"SELECT {s.sql} stage, shard, {s.status_column} status, COUNT(*) n FROM pipeline_tracking "
     f"GROUP BY shard, {s.status_column}" for s in STAGES]
    + [f"SELECT {s.sql}, shard, '{READY}', COUNT(*) FROM pipeline_tracking WHERE {s.previous.status_column}={DONE.sql}"
       f" AND {s.status_column}={NEW.sql} GROUP BY shard" for s in WORK_STAGES])


def queue_queries(shard_count: int = 2) -> list[tuple[str, str, tuple]]:
    """Every queue and claim query with sample arguments, for the EXPLAIN test and docs."""
    cols = "id, filename, shard, created_at"
    out = []
    for stage in WORK_STAGES:
        out += [(f"queue {stage}", sql_ready(stage, False, cols, "LIMIT %s OFFSET %s"), (100, 0)),
                (f"queue {stage} shard", sql_ready(stage, True, cols, "LIMIT %s OFFSET %s"), (1, 100, 0)),
                (f"claim {stage}", sql_ready(stage, False, cols, "LIMIT %s FOR UPDATE SKIP LOCKED"), (4,)),
                (f"claim {stage} shard", sql_ready(stage, True, cols, "LIMIT %s FOR UPDATE SKIP LOCKED"), (1, 4)),
                (f"held {stage}", sql_held(stage, False), ("host/daemon", 4)),
                (f"held {stage} shard", sql_held(stage, True), ("host/daemon", 1, 4)),
                (f"may claim: held {stage} shard", sql_held(stage, True, lock=False), ("host/daemon", 1)),
                (f"may claim: ready {stage} shard", sql_ready(stage, True, "1", "LIMIT 1"), (1,))]
    for stage in ORDERED:
        out += [(f"ordered busy {stage}", sql_shard_busy(stage), (1, "host/daemon")),
                (f"ordered blocker {stage} new", sql_shard_blocker(stage, NEW), (1,)),
                (f"ordered blocker {stage} started", sql_shard_blocker(stage, STARTED), (1,)),
                (f"ordered claim {stage}", sql_ready(stage, True, cols, "LIMIT %s FOR UPDATE", SQL_BEFORE_GATE),
                 (1, 4))]
    out.append(("reap", SQL_EXPIRED, (500,)))
    return out


# -- rows to JSON and the transitions log ----------------------------------------------------------

def iso(value) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def iso_s(value) -> str | None:
    """The contract's timestamps: seconds, UTC, `Z`."""
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def log_sql(rows: list[tuple]) -> tuple[str, list]:
    """One multi-row INSERT of transitions: (tracking_id, filename, shard, stage, from, to,
    action, actor, error, duration_ms, events, stats)."""
    marks = ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(rows))
    return ("INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status,"
            f" action, actor, error, duration_ms, events, stats) VALUES {marks}",
            [v for row in rows for v in row])


def marks(values) -> str:
    return ",".join(["%s"] * len(values))
