"""The one store every part of the tracker works through: this thread's connection (READ
COMMITTED, short lock waits), transactions in as few round trips as their logic allows
(`db.Transaction`), retried on deadlock, and reads. A table or the registration's procedure gone
(dropped by hand, a dump restored without its routines) surfaces as SchemaMissing.

Sessions run at READ COMMITTED: every rule is checked either by a conditional UPDATE (the
status it requires is in its WHERE; `rowcount` says whether it won) or under a row lock
(`FOR UPDATE`, `SKIP LOCKED` for claims), so the snapshot of REPEATABLE READ buys nothing,
while its gap locks on the many secondary indexes made concurrent claims deadlock.
"""
from __future__ import annotations

import random
import time
from typing import Any, Callable

import pymysql
import pymysql.cursors

from ..db import DEADLOCK, NO_SUCH_ROUTINE, NO_SUCH_TABLE, Transaction
from .errors import SchemaMissing

# A deadlock is retried at once; a lock wait timeout is not: it already took LOCK_WAIT_SECONDS.
LOCK_WAIT_SECONDS = 5
DEADLOCK_ATTEMPTS = 6
DEADLOCK_BACKOFF = 0.002


def deadlock_pause(attempt: int) -> float:
    """Seconds to wait before retry `attempt + 1`: growing, and spread at random (0.5-1.5x),
    because transactions that deadlocked each other would otherwise all come back after the
    same pause and meet again; in step, one of 32 racing claims now and then met six deadlocks
    in a row and had to answer 503."""
    return DEADLOCK_BACKOFF * (attempt + 1) * random.uniform(0.5, 1.5)


class Store:
    """`conns` hands out this thread's connection (`db.ThreadConnections` opened with
    `multi_statements=True`)."""

    def __init__(self, conns):
        self.conns = conns

    def conn(self):
        """This thread's connection, its session set up once."""
        conn = self.conns.get()
        if not getattr(conn, "pipeline_read_committed", False):
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                # Locks here are held for milliseconds; a wait this long means trouble, and an
                # answer (503, retry) beats a client timing out on a request stuck for 50 s.
                cur.execute(f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECONDS}")
            conn.pipeline_read_committed = True
        return conn

    def tx(self, fn: Callable[[Transaction], Any]):
        """Run fn(Transaction), again after a deadlock (up to five times, `deadlock_pause` apart).
        If fn did not `finish`, its transaction is committed, or rolled back when fn returned
        exactly False."""
        conn = self.conn()
        for attempt in range(DEADLOCK_ATTEMPTS):
            tx = None
            try:
                with conn.cursor(pymysql.cursors.DictCursor) as cur:
                    tx = Transaction(cur)
                    result = fn(tx)
                    if tx.open and not tx.closed:
                        tx.finish(commit=result is not False)
                return result
            except pymysql.err.MySQLError as exc:
                self._rollback(conn)
                code = exc.args[0] if exc.args else None
                if code == DEADLOCK and attempt < DEADLOCK_ATTEMPTS - 1:
                    time.sleep(deadlock_pause(attempt))
                    continue
                if code in (NO_SUCH_TABLE, NO_SUCH_ROUTINE):
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

    def read(self, sql: str, args=()) -> list[dict]:
        conn = self.conn()
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except pymysql.err.ProgrammingError as exc:
            if exc.args and exc.args[0] == NO_SUCH_TABLE:
                raise SchemaMissing(str(exc)) from exc
            raise

    def execute(self, sql: str, args=()) -> int:
        """One autocommitted statement; its affected-row count."""
        with self.conn().cursor() as cur:
            return cur.execute(sql, args)
