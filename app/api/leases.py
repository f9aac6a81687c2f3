"""Claims, leases and the reaper: how a started task belongs to exactly one daemon at a time.

A claim hands a daemon the tasks it already holds (a restarted daemon resumes its own work),
then ready ones, oldest first, each to exactly one caller; ordered stages take a shard's files
in registration order. A started task carries a lease its owner extends (heartbeat); the
reaper returns a task whose lease ran out to `new`, or to `failed` after MAX_ATTEMPTS.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from ..stages import WORK_STAGES, Action, Stage
from .errors import Conflict, NotFound
from .queries import FAILED, NEW, SQL_EXPIRED, STARTED, iso, iso_s, log_sql, sql_claim, sql_held, sql_ready
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
        One round trip: the stored procedure of migration tracking 0008 locks what the owner
        holds and the ready rows nobody else is locking, writes, and answers the tasks."""
        return self.store.tx(lambda t: self.claim_in(t, stage, limit, shard, owner))

    def claim_in(self, t: Transaction, stage: str, limit: int, shard: int | None, owner: str,
                 first: tuple = (), proceed=None, gate: str = "TRUE") -> list[dict] | None:
        """The claim inside the transaction `t`, which it commits, in one round trip. `first`:
        statements sent ahead of the claim in the same packet (a `done` of the caller's
        previous task, so the two cost one transaction); `gate`: the SQL condition, true when
        they took effect (`@pipeline_done = n`), false making the procedure roll everything
        back and claim nothing; `proceed(results of first)` says the same in Python (False:
        the answer is None)."""
        stage = Stage(stage)
        results = t.finish(*first, (sql_claim(gate), (stage, shard, owner, limit, self.lease_us)))
        if proceed is not None and not proceed(results[:len(first)]):
            return None
        # In the lists' order (`n`): held first, then new, each by id (no ORDER BY: a sort a claim).
        return [self._claimed(r, r["attempts"], bool(r["resumed"])) for r in sorted(results[-1].rows,
                                                                                   key=lambda r: r["n"])]

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
