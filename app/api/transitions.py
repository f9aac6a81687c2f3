"""The task state machine over `pipeline_tracking`: registration, and each task's moves
through a stage (start, done, fail, retry, release, rewind), one at a time or a stage's failed
tasks at once.

A task is one (filename, shard) row; each stage has its own status column. Every change is one
short transaction that appends its row to `pipeline_transitions` in the same commit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import orjson

from ..stages import FIRST, Action, Stage, Status, sql_in
from .errors import Conflict, NotFound
from .queries import DONE, FAILED, NEW, STARTED, log_sql, marks, row_sql
from .schema import ERROR_MAX, REASON_MAX
from ..db import Call, Result, Transaction
from .store import Store


# Registration (migration tracking 0007): args filename, shards as "0,1", done, actor, events.
SQL_REGISTER = Call("CALL pipeline_register(%s,%s,%s,%s,%s)")


@dataclass
class Moved:
    """Where a transition left the task (`changed` False: it was there already, a repeat)."""

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


def rejected_counts(stats: dict | None) -> list[tuple[str, int]]:
    """(reason, lines) of a `done`'s `stats.rejected`, for the rejected-lines counters. A
    splitter reports its file's rejections on every shard's task but writes them with one
    (`rejected_file_written`): only that one counts."""
    if not isinstance(stats, dict) or stats.get("rejected_file_written") is False:
        return []
    rejected = stats.get("rejected")
    if not isinstance(rejected, dict):
        return []
    return sorted((reason, n) for reason, n in rejected.items()
                  if isinstance(reason, str) and 0 < len(reason) <= REASON_MAX
                  and isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31)


def rejected_sql(stage: Stage, rejected: list[tuple[str, int]], gate: str = "TRUE") -> tuple[str, list]:
    """Add to pipeline_rejected_counts, only when `gate` holds (the done took effect): each
    reason's lines, or 0 when it does not. One INSERT ... VALUES in key order (`rejected` is
    sorted by reason): a derived table of the reasons, gated by a WHERE, cost two temporary
    tables and ~70-100 us more of the server a statement. A done refused after all (the gate
    false) adds nothing; it may leave a reason's row at 0 where there was none (a batch's
    refusal rolls back; a single done's commits, a counter of 0 lines is what it says)."""
    rows = ",".join([f"(%s,%s,IF({gate}, %s, 0))"] * len(rejected))
    return (f"INSERT INTO pipeline_rejected_counts (stage, reason, n) VALUES {rows}"
            f" ON DUPLICATE KEY UPDATE n = n + VALUES(n)",
            [v for reason, n in rejected for v in (stage, reason, n)])


@lru_cache(maxsize=8)
def _done_texts(stage: Stage) -> tuple[str, str, str]:
    """`Transitions.done_sql`'s statements for a stage, built once."""
    status_col, att_col = stage.status_column, stage.attempts_column
    return (
        f"UPDATE pipeline_tracking SET {status_col}={DONE.sql}, owner=NULL, lease_expires_at=NULL,"
        f" {att_col}=LAST_INSERT_ID({att_col}) WHERE filename=%s AND shard=%s AND {status_col}={STARTED.sql}"
        f" AND (owner IS NULL OR owner=%s)",
        # LAST_INSERT_ID(), not the reply's insert id: the counting trigger's INSERT
        # (migration 0004) leaves that at 0.
        "SELECT @pipeline_done := ROW_COUNT() AS done, LAST_INSERT_ID() AS attempts",
        "INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status,"
        " action, actor, duration_ms, events, stats)"
        f" SELECT id, filename, shard, %s, {STARTED.sql}, {DONE.sql}, {Action.DONE.sql}, %s,"
        " TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000, %s, %s FROM pipeline_tracking"
        " WHERE filename=%s AND shard=%s AND @pipeline_done = 1")


def _tasks_where(n: int) -> str:
    """`n` tasks by their unique key (args: filename, shard per task): one range read each."""
    return "(" + " OR ".join(["(filename=%s AND shard=%s)"] * n) + ")"


@lru_cache(maxsize=64)
def _done_many_texts(stage: Stage, n: int) -> tuple[str, str, str]:
    """`Transitions.done_many_sql`'s statements for `n` tasks of a stage, built once."""
    status_col, att_col = stage.status_column, stage.attempts_column
    where = _tasks_where(n)
    # Which item a row is (1..n): its "filename shard" among the items' (args: n keys). A
    # filename holds neither space nor comma, so the key is unique.
    item = f"FIELD(CONCAT_WS(' ', filename, shard), {marks(range(n))})"
    return (
        f"UPDATE pipeline_tracking SET {status_col}={DONE.sql}, owner=NULL, lease_expires_at=NULL"
        f" WHERE {status_col}={STARTED.sql} AND (owner IS NULL OR owner=%s) AND {where}",
        # The row count of the UPDATE, and each task's attempts ("filename shard attempts", a
        # filename holds neither space nor comma): both in one row.
        f"SELECT @pipeline_done := ROW_COUNT() AS done, (SELECT GROUP_CONCAT(CONCAT_WS(' ', filename, shard,"
        f" {att_col}) SEPARATOR ',') FROM pipeline_tracking WHERE {where}) AS attempts",
        # The log rows read straight from the tasks' rows (one unique-key read each), each
        # item's events and stats picked by its position: no derived table of the items joined
        # to them, which cost two temporary tables and a sort a statement.
        "INSERT INTO pipeline_transitions (tracking_id, filename, shard, stage, from_status, to_status,"
        " action, actor, duration_ms, events, stats)"
        f" SELECT id, filename, shard, %s, {STARTED.sql}, {DONE.sql}, {Action.DONE.sql}, %s,"
        f" TIMESTAMPDIFF(MICROSECOND, started_at, NOW(3)) DIV 1000, ELT({item}, {marks(range(n))}),"
        f" ELT({item}, {marks(range(n))}) FROM pipeline_tracking WHERE {where} AND @pipeline_done = {n}"
        f" ORDER BY {item}")


class Transitions:
    def __init__(self, store: Store, lease_seconds: float, max_attempts: int):
        self.store = store
        self.lease_us = int(lease_seconds * 1_000_000)
        self.max_attempts = max_attempts

    def register(self, filename: str, shards: list[int], done: bool = False, actor: str | None = None,
                 events: int | None = None) -> dict:
        """Register the file's tasks (ingest `started`); `done`: and mark ingest done, as a
        following `ingest_done` would, in the same transaction: rows created now are inserted
        `done` with both moves logged (register, then done); rows that existed take the
        ordinary `ingest_done` after the commit (a repeat, or the original generator's file).
        One round trip: the stored procedure of migration tracking 0007 inserts, logs and
        answers each of the file's tasks with whether this call created it."""
        args = (filename, ",".join(str(s) for s in sorted(shards)), done, actor, events if done else None)
        rows = self.store.tx(lambda t: t.finish((SQL_REGISTER, args))[0].rows)
        created = [r["shard"] for r in rows if r["created"]]
        all_shards = sorted(set(shards) | {r["shard"] for r in rows})
        answer = {"filename": filename, "shards": all_shards, "created": bool(created)}
        if not done:
            return answer
        updated = len(created)
        if len(created) < len(all_shards):
            updated += self.ingest_done(filename, actor, None if created else events)["updated_rows"]
        return {**answer, "updated_rows": updated}

    def ingest_done(self, filename: str, actor: str | None = None, events: int | None = None) -> dict:
        column = FIRST.status_column

        def tx(t: Transaction):
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
                         log_sql([(r["id"], filename, r["shard"], FIRST, r[column], DONE,
                                   Action.DONE, actor, None, None, events if r is todo[0] else None, None)
                                  for r in todo]))
            return {"filename": filename, "updated_rows": len(todo)}
        return self.store.tx(tx)

    # -- one task's transitions -------------------------------------------------------------

    def transition(self, stage: str, action: str, filename: str, shard: int, owner: str | None = None,
                   error: str | None = None, events: int | None = None, stats: dict | None = None) -> Moved:
        """Lock the task and read what the rules need, decide here, then write and commit:
        two round trips (`done`, the hot one, takes one: see `_done_at_once`)."""
        stage = Stage(stage)
        action = Action(action)
        stats_text = orjson.dumps(stats).decode() if stats else None
        rejected = rejected_counts(stats) if action == Action.DONE else []
        if action == Action.DONE:
            moved = self._done_at_once(stage, filename, shard, owner, events, stats_text, rejected)
            if moved is not None:
                return moved

        def tx(t: Transaction):
            row = self._task(stage, filename, shard, t.run((row_sql(stage, lock=True),
                                                            (stage, filename, shard)))[0])
            moved, writes = getattr(self, f"_{action}")(stage, row, owner, error, events, stats_text)
            if writes and rejected and moved.changed and moved.status == DONE:
                writes.append(rejected_sql(stage, rejected))
            if writes:
                t.finish(*writes)
            return moved
        return self.store.tx(tx)

    @staticmethod
    def _task(stage: str, filename: str, shard: int, result: Result) -> dict:
        row = result.one()
        if row is None:
            raise NotFound(f"no task ({filename!r}, shard {shard})", filename=filename, shard=shard)
        action, to, actor = ((row["last"] or "").split(":", 2) + [None, None, None])[:3]
        row.update(filename=filename, shard=shard, last={"action": action, "to_status": to, "actor": actor})
        return row

    def _done_at_once(self, stage, filename, shard, owner, events, stats_text, rejected=()) -> Moved | None:
        """`done` by a named owner in one round trip of five statements: the rule sits in the
        UPDATE's WHERE and its row count, kept in a session variable, gates the log row. The
        UPDATE hands back the attempt count through LAST_INSERT_ID(x), read with the row count,
        so nothing else is read. Only a refusal or a repeat then costs a read, to be explained."""
        if owner is None:
            return None  # the log names the owner: take the locked path, which reads it

        def tx(t: Transaction):
            results = t.finish(*self.done_sql(stage, filename, shard, owner, events, stats_text, rejected))
            return results[1].rows[0]["attempts"] if results[0].rowcount == 1 else False
        attempts = self.store.tx(tx)
        if attempts is not False:
            return Moved(filename, shard, stage, DONE, True, attempts or 0)
        row = self._task(stage, filename, shard, Result(self.store.read(row_sql(stage, lock=False),
                                                                        (stage, filename, shard)), 1, None))
        moved, writes = self._done(stage, row, owner, None, events, stats_text)  # a repeat, or a 409
        return None if writes else moved  # None: it became done-able meanwhile; take the locked path

    @staticmethod
    def done_sql(stage: Stage, filename: str, shard: int, owner: str, events, stats_text, rejected=()) -> list:
        """A named owner's `done` as statements that decide nothing in Python: the UPDATE (its
        row count: 1 when it took effect), a SELECT of `done` and `attempts`, the log row and
        the rejected-lines counters, both gated on the UPDATE having taken effect."""
        update, select, log = _done_texts(stage)
        return [(update, (filename, shard, owner)), (select, None),
                (log, (stage, owner, events, stats_text, filename, shard)),
                *([rejected_sql(stage, rejected, gate="@pipeline_done = 1")] if rejected else [])]

    @staticmethod
    def done_many_sql(stage: Stage, items: list[tuple[str, int, int | None, str | None, list]], owner: str):
        """A named owner's `done` of several tasks (filename, shard, events, stats text,
        rejected counts) as four statements whatever their number (one `done_sql` each was
        five): one UPDATE of them all, its row count with every task's attempts, the log rows
        and the rejected-lines counters, gated on the UPDATE having moved every task. Returns
        the statements and a reader of their results: the attempts in the items' order, or
        None when not every task moved (then the caller rolls back and takes the one-by-one
        path, which explains the repeat or refusal)."""
        n = len(items)
        update, select, log = _done_many_texts(stage, n)
        keys = [v for filename, shard, *_ in items for v in (filename, shard)]
        item_keys = [f"{filename} {shard}" for filename, shard, *_ in items]
        rejected: dict[str, int] = {}
        for *_, counts in items:
            for reason, lines in counts:
                rejected[reason] = rejected.get(reason, 0) + lines
        statements = [(update, (owner, *keys)), (select, keys),
                      (log, (stage, owner, *item_keys, *[events for _, _, events, *_ in items],
                             *item_keys, *[stats for _, _, _, stats, _ in items], *keys, *item_keys)),
                      *([rejected_sql(stage, sorted(rejected.items()), gate=f"@pipeline_done = {n}")]
                        if rejected else [])]

        def attempts(results: list[Result]) -> list[int] | None:
            if results[0].rowcount != n:
                return None
            got = {}
            for part in (results[1].rows[0]["attempts"] or "").split(","):
                filename, shard, tries = part.split(" ")
                got[(filename, int(shard))] = int(tries)
            return [got.get((filename, shard), 0) for filename, shard, *_ in items]
        return statements, attempts

    def _conflict(self, stage, row, why):
        return Conflict(why, filename=row["filename"], shard=row["shard"], stage=stage, status=row["status"],
                        previous_status=row["prev"], owner=row["owner"])

    def _set(self, stage, row, to, action, actor, error=None, events=None, stats=None, extra="", args=(),
             duration=False) -> list:
        """The writes of one transition: the guarded-by-lock UPDATE and its log row."""
        return [(f"UPDATE pipeline_tracking SET {stage.status_column}=%s{extra} WHERE id=%s", (to, *args, row["id"])),
                log_sql([(row["id"], row["filename"], row["shard"], stage, row["status"], to, action, actor,
                          error, row["ran_ms"] if duration else None, events, stats)])]

    @staticmethod
    def _moved(stage, row, status, changed, attempts=None, **extra) -> Moved:
        return Moved(row["filename"], row["shard"], stage, status, changed,
                     row["attempts"] if attempts is None else attempts, extra)

    def _check_owner(self, stage, row, owner):
        if owner and row["owner"] and row["owner"] != owner:
            raise self._conflict(stage, row, f"task is held by {row['owner']!r}, not {owner!r} "
                                             f"(its lease was lost)")

    def _start(self, stage, row, owner, error, events, stats):
        if row["status"] == STARTED and owner and row["owner"] == owner:
            return self._moved(stage, row, STARTED, False), [
                ("UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND WHERE id=%s",
                 (self.lease_us, row["id"]))]
        if row["status"] != NEW:
            raise self._conflict(stage, row, f"{stage} can start only from '{NEW}'")
        if row["prev"] != DONE:
            raise self._conflict(stage, row, f"{stage.previous} is {row['prev']!r}; "
                                             f"{stage} starts only after it is done")
        att = stage.attempts_column
        return self._moved(stage, row, STARTED, True, row["attempts"] + 1), self._set(
            stage, row, STARTED, Action.START, owner,
            extra=f", owner=%s, started_at=NOW(3), lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND, {att}={att}+1",
            args=(owner, self.lease_us))

    def _done(self, stage, row, owner, error, events, stats):
        if row["status"] == DONE:
            by = row["last"].get("actor") if row["last"].get("to_status") == DONE else None
            if owner and by and by != owner:
                raise self._conflict(stage, row, f"{stage} was finished by {by!r}, not {owner!r} "
                                                 f"(its lease was lost and the task taken over)")
            return self._moved(stage, row, DONE, False), []
        if row["status"] != STARTED:
            raise self._conflict(stage, row, f"{stage} can be done only from '{STARTED}'")
        self._check_owner(stage, row, owner)
        return self._moved(stage, row, DONE, True), self._set(
            stage, row, DONE, Action.DONE, owner or row["owner"], events=events, stats=stats,
            extra=", owner=NULL, lease_expires_at=NULL", duration=True)

    def _fail(self, stage, row, owner, error, events, stats):
        if row["status"] == FAILED:
            return self._moved(stage, row, FAILED, False), []
        if row["status"] not in (NEW, STARTED):
            raise self._conflict(stage, row, f"{stage} can fail only from '{NEW}' or '{STARTED}'")
        if row["status"] == STARTED:
            self._check_owner(stage, row, owner)
        return self._moved(stage, row, FAILED, True), self._set(
            stage, row, FAILED, Action.FAIL, owner or row["owner"], error=error, events=events, stats=stats,
            extra=", owner=NULL, lease_expires_at=NULL, last_error=%s", args=(error,),
            duration=row["status"] == STARTED)

    def _retry(self, stage, row, owner, error, events, stats):
        if row["status"] == NEW and row["last"].get("action") == Action.RETRY:
            return self._moved(stage, row, NEW, False), []
        if row["status"] != FAILED:
            raise self._conflict(stage, row, f"{stage} can be retried only from '{FAILED}'")
        return self._moved(stage, row, NEW, True, 0), self._set(
            stage, row, NEW, Action.RETRY, owner, extra=f", {stage.attempts_column}=0")

    def _release(self, stage, row, owner, error, events, stats):
        """A daemon hands a task back unfinished (clean shutdown): no attempt is spent."""
        if row["status"] == NEW and row["last"].get("action") == Action.RELEASE:
            return self._moved(stage, row, NEW, False), []
        if row["status"] != STARTED:
            raise self._conflict(stage, row, f"{stage} can be released only from '{STARTED}'")
        self._check_owner(stage, row, owner)
        att = stage.attempts_column
        return self._moved(stage, row, NEW, True, max(row["attempts"] - 1, 0)), self._set(
            stage, row, NEW, Action.RELEASE, owner or row["owner"], error=error,
            extra=f", owner=NULL, lease_expires_at=NULL, {att}=GREATEST({att}-1, 0)")

    def _rewind(self, stage, row, owner, error, events, stats):
        """The stage's input file is missing: send the task back to the stage that produces it."""
        upstream = stage.previous
        if upstream is FIRST:
            raise self._conflict(stage, row, f"{stage} reads the registered source file; nothing "
                                             "upstream can rebuild it: fail the task instead")
        if row["status"] == NEW and row["prev"] == NEW and row["last"].get("action") == Action.REWIND:
            return self._moved(stage, row, NEW, False, rewound_to=upstream), []
        if row["status"] not in (NEW, STARTED):
            raise self._conflict(stage, row, f"{stage} can be rewound only from '{NEW}' or '{STARTED}'")
        if row["status"] == STARTED:
            self._check_owner(stage, row, owner)
        if row["attempts"] >= self.max_attempts:
            reason = f"input missing after {row['attempts']} attempts: {error or 'no reason given'}"
            return self._fail(stage, row, owner, reason[:ERROR_MAX], None, None)
        reason = f"input missing, rebuilt by {upstream}: {error or 'no reason given'}"[:ERROR_MAX]
        writes = self._set(stage, row, NEW, Action.REWIND, owner or row["owner"], error=reason,
                           extra=f", {upstream.status_column}={NEW.sql}, owner=NULL, lease_expires_at=NULL,"
                                 f" last_error=%s", args=(reason,))
        writes.append(log_sql([(row["id"], row["filename"], row["shard"], upstream, row["prev"], NEW, Action.REWIND,
                                owner, reason, None, None, None)]))
        return self._moved(stage, row, NEW, True, rewound_to=upstream), writes

    def retry_all(self, stage: str, shard: int | None, actor: str | None) -> dict:
        stage = Stage(stage)
        status_col, att = stage.status_column, stage.attempts_column
        where, args = f"{status_col}={FAILED.sql}", []
        if shard is not None:
            where, args = where + " AND shard=%s", [shard]

        def tx(t: Transaction):
            rows = t.run((f"SELECT id, filename, shard FROM pipeline_tracking WHERE {where} ORDER BY id FOR UPDATE",
                          args))[0].rows
            writes = []
            for start in range(0, len(rows), 1000):
                chunk = rows[start:start + 1000]
                writes += [(f"UPDATE pipeline_tracking SET {status_col}={NEW.sql}, {att}=0"
                            f" WHERE id IN ({marks(chunk)})", [r["id"] for r in chunk]),
                           log_sql([(r["id"], r["filename"], r["shard"], stage, FAILED, NEW, Action.RETRY, actor,
                                     None, None, None, None) for r in chunk])]
            t.finish(*writes)
            return {"stage": stage, "shard": shard, "retried": len(rows),
                    "items": [{"filename": r["filename"], "shard": r["shard"]} for r in rows[:1000]]}
        return self.store.tx(tx)
