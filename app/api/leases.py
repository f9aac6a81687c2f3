"""Claims, leases and the reaper: how a started task belongs to exactly one daemon at a time.

A claim hands a daemon the tasks it already holds (a restarted daemon resumes its own work),
then ready ones, oldest first, each to exactly one caller; ordered stages take a shard's files
in registration order. A started task carries a lease its owner extends (heartbeat); the
reaper returns a task whose lease ran out to `new`, or to `failed` after MAX_ATTEMPTS.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from ..stages import ORDERED, WORK_STAGES, Action, Stage
from .errors import Conflict, NotFound
from .queries import (FAILED, NEW, SQL_BEFORE_GATE, SQL_EXPIRED, STARTED, iso, iso_s, log_sql, marks, sql_held,
                      sql_ready, sql_shard_gate)
from ..db import Transaction
from .store import Store


class Leases:
    def __init__(self, store: Store, lease_seconds: float, max_attempts: int):
        self.store = store
        self.lease_seconds = lease_seconds
        self.lease_us = int(lease_seconds * 1_000_000)
        self.max_attempts = max_attempts

    def _lease_until(self) -> str:
        """The lease end a heartbeat just set, as the API host's clock sees it."""
        return iso(datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=self.lease_seconds))

    def claim(self, stage: str, limit: int, shard: int | None, owner: str) -> list[dict]:
        """Up to `limit` tasks for `owner`: first those it already holds (a restarted daemon
        resumes its own work), then ready ones, oldest first, each won by exactly one caller.
        Two round trips: lock what the owner holds and up to `limit` ready rows nobody else
        is locking; then write. Ready rows locked but not needed are freed by the commit."""
        return self.store.tx(lambda t: self.claim_in(t, stage, limit, shard, owner))

    def claim_in(self, t: Transaction, stage: str, limit: int, shard: int | None, owner: str,
                 first: tuple = (), proceed=None) -> list[dict] | None:
        """The claim inside the transaction `t`, which it commits. `first`: statements sent
        ahead of the claim's reads in the same round trip (a `done` of the caller's previous
        task, so the two cost one transaction); `proceed(results of first)` False rolls
        everything back before anything is claimed, and the answer is None."""
        stage = Stage(stage)
        status_col, att = stage.status_column, stage.attempts_column
        cols = f"id, filename, shard, created_at, {att} AS attempts"
        ordered = stage in ORDERED and shard is not None
        reads = [*first, (sql_held(stage, shard is not None), (owner, *([shard] if shard is not None else []), limit))]
        if ordered:
            reads += self._ordered_reads(stage, shard, owner, limit, cols)
        else:
            reads.append((sql_ready(stage, shard is not None, cols, "LIMIT %s FOR UPDATE SKIP LOCKED"),
                          (*([shard] if shard is not None else []), limit)))
        results = t.run(*reads)
        before, results = results[:len(first)], results[len(first):]
        if proceed is not None and not proceed(before):
            t.finish(commit=False)
            return None
        mine = results[0].rows
        want = limit - len(mine)
        fresh = results[-1].rows[:want] if want > 0 else []
        writes = []
        if mine:
            ids = [r["id"] for r in mine]
            writes += [(f"UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND "
                        f"WHERE id IN ({marks(ids)})", (self.lease_us, *ids)),
                       (f"SELECT {cols} FROM pipeline_tracking WHERE id IN ({marks(ids)}) ORDER BY id", ids)]
        if fresh:
            writes += [(f"UPDATE pipeline_tracking SET {status_col}={STARTED.sql}, owner=%s, started_at=NOW(3),"
                        f" lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND, {att}={att}+1"
                        f" WHERE id IN ({marks(fresh)})", (owner, self.lease_us, *[r["id"] for r in fresh])),
                       log_sql([(r["id"], r["filename"], r["shard"], stage, NEW, STARTED, Action.CLAIM, owner,
                                 None, None, None, None) for r in fresh])]
        done = t.finish(*writes)
        mine = done[1].rows if mine else []
        return ([self._claimed(r, r["attempts"], True) for r in mine]
                + [self._claimed(r, r["attempts"] + 1, False) for r in fresh])

    def may_claim(self, stage: str, shard: int | None, owner: str) -> bool:
        """Whether a claim could find anything: `owner` holds a task of the stage (of `shard`)
        or one is ready. One autocommitted read of two index probes, no lock, no transaction:
        a long-poll claim asks first, so one that finds nothing costs this statement instead
        of a claim's four to six. (Ready is not enough for an ordered stage, whose claim may
        still find the shard's next file blocked upstream: then it claims and finds nothing.)"""
        stage = Stage(stage)
        sharded = shard is not None
        args = (owner, *([shard] if sharded else []), *([shard] if sharded else []))
        rows = self.store.read(f"SELECT EXISTS({sql_held(stage, sharded, lock=False)})"
                               f" OR EXISTS({sql_ready(stage, sharded, '1', 'LIMIT 1')}) AS maybe", args)
        return bool(rows[0]["maybe"])

    def upstream(self, stage: str, shard: int) -> tuple[int, int]:
        """(ready tasks of `stage` on `shard`, tasks the previous stage has started there), from
        the counts the triggers keep: one primary-key read, no lock. What a claim that came up
        short asks before it lingers for more (a lone file, nothing upstream, never waits)."""
        stage = Stage(stage)
        rows = self.store.read("SELECT stage, status, n FROM pipeline_task_counts WHERE (stage, shard, status)"
                               " IN ((%s,%s,'ready'),(%s,%s,%s))",
                               (stage, shard, stage.previous, shard, STARTED))
        got = {(r["stage"], r["status"]): int(r["n"]) for r in rows}
        return got.get((stage, "ready"), 0), got.get((stage.previous, STARTED), 0)

    @staticmethod
    def _claimed(r: dict, attempts: int, resumed: bool) -> dict:
        return {"filename": r["filename"], "shard": r["shard"], "created_at": iso_s(r["created_at"]),
                "attempts": attempts, "resumed": resumed}

    @staticmethod
    def _ordered_reads(stage: Stage, shard: int, owner: str, limit: int, cols: str) -> list:
        """An ordered claim takes the shard's claim lock (the upsert locks its row, so two
        replicas cannot take consecutive files at once), reads in one statement whether another
        daemon holds one of the shard's files and which is the oldest file still waiting upstream,
        and then, in the same round trip, the shard's oldest ready tasks below that file (none
        while another daemon holds one). Pending = the previous stage has not finished yet
        (new/started) although ingest is done; files still being written (ingest not done) and
        files the previous stage failed are not in the shard's stream and block nothing. Rows
        locked beyond what the owner still wants are freed by the commit."""
        return [("INSERT INTO pipeline_claim_lock (stage, shard) VALUES (%s,%s) ON DUPLICATE KEY UPDATE shard=shard",
                 (stage, shard)),
                (sql_shard_gate(stage), (shard, owner, shard, shard)),
                (sql_ready(stage, True, cols, "LIMIT %s FOR UPDATE", SQL_BEFORE_GATE), (shard, limit))]

    def reap(self, limit: int = 500) -> list[dict]:
        """Return tasks whose lease expired to `new` (attempt counted) or, after `max_attempts`,
        to `failed` with the reason."""
        def tx(t: Transaction):
            writes, reaped = [], []
            for r in t.run((SQL_EXPIRED, (limit,)))[0].rows:
                stage = next((s for s in WORK_STAGES if r[s.status_column] == STARTED), None)
                if stage is None:
                    writes.append(("UPDATE pipeline_tracking SET owner=NULL, lease_expires_at=NULL WHERE id=%s",
                                   (r["id"],)))
                    continue
                attempts = r[stage.attempts_column]
                to = FAILED if attempts >= self.max_attempts else NEW
                holder = "a daemon that gave no id" if r["owner"] is None else repr(r["owner"])
                error = (f"lease of {holder} expired (attempt {attempts} of {self.max_attempts})"
                         + ("; attempts exhausted" if to == FAILED else ""))
                writes += [(f"UPDATE pipeline_tracking SET {stage.status_column}=%s, owner=NULL, "
                            f"lease_expires_at=NULL, last_error=%s WHERE id=%s", (to, error, r["id"])),
                           log_sql([(r["id"], r["filename"], r["shard"], stage, STARTED, to, Action.REAP, r["owner"],
                                     error, r["ran_ms"], None, None)])]
                reaped.append({"filename": r["filename"], "shard": r["shard"], "stage": stage, "status": to,
                               "error": error})
            t.finish(*writes)
            return reaped
        return self.store.tx(tx)

    def heartbeat(self, stage: str, filename: str, shard: int, owner: str) -> dict:
        """One autocommitted UPDATE: extends the lease only while `owner` holds the task."""
        stage = Stage(stage)
        status_col = stage.status_column
        conn = self.store.conn()
        with conn.cursor() as cur:
            cur.execute(f"UPDATE pipeline_tracking SET lease_expires_at=NOW(3) + INTERVAL %s MICROSECOND "
                        f"WHERE filename=%s AND shard=%s AND {status_col}={STARTED.sql} AND owner=%s",
                        (self.lease_us, filename, shard, owner))
            extended = cur.rowcount == 1
        body = {"filename": filename, "shard": shard, "stage": stage, "status": STARTED, "worker": owner,
                "lease_seconds": self.lease_seconds, "lease_expires_at": self._lease_until()}
        if extended:
            return body
        rows = self.store.read(f"SELECT {status_col} AS status, owner FROM pipeline_tracking WHERE filename=%s "
                               f"AND shard=%s", (filename, shard))
        if not rows:
            raise NotFound(f"no task ({filename!r}, shard {shard})", filename=filename, shard=shard)
        if rows[0]["status"] == STARTED and rows[0]["owner"] == owner:
            return body  # two heartbeats in one millisecond: the second changed nothing
        raise Conflict(f"{owner!r} does not hold this task (lease lost or task finished)",
                       filename=filename, shard=shard, stage=stage, status=rows[0]["status"],
                       owner=rows[0]["owner"])
