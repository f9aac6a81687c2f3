"""The one store every part of the tracker works through: this thread's connection (READ
COMMITTED, short lock waits), transactions in as few round trips as their logic allows
(`db.Transaction`), retried on deadlock, and reads. A table gone (dropped by hand) surfaces as
SchemaMissing.

Sessions run at READ COMMITTED: every rule is checked either by a conditional UPDATE (the
status it requires is in its WHERE; `rowcount` says whether it won) or under a row lock
(`FOR UPDATE`, `SKIP LOCKED` for claims), so the snapshot of REPEATABLE READ buys nothing,
while its gap locks on the many secondary indexes made concurrent claims deadlock.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import pymysql
import pymysql.cursors

from ..db import DEADLOCK, NO_SUCH_TABLE, Script, Transaction
from .errors import SchemaMissing

# A deadlock is retried at once; a lock wait timeout is not: it already took LOCK_WAIT_SECONDS.
LOCK_WAIT_SECONDS = 5
# While set, the count triggers skip this session's rows (migration 0007, app/api/counts.py).
COUNTED_ON = "SET @pipeline_counted = 1"
COUNTED_OFF = "SET @pipeline_counted = NULL"


class CountedTransaction(Transaction):
    """A transaction that may write its own task counts: `counted = True` before its first
    `run` sets @pipeline_counted right after START TRANSACTION, and its end (COMMIT or
    ROLLBACK) clears it in the same packet, so the variable never outlives the transaction
    that set it (an error mid-script: `Store._rollback` clears it). Such a transaction must
    send `counts.counts_sql` of every status it moves."""

    counted = False

    def _send(self, begin: bool, statements, end: str | None):
        if not self.counted:
            return super()._send(begin, statements, end)
        script = Script()
        if begin:
            script.add("begin", "START TRANSACTION")
            script.add("on", COUNTED_ON)
        for n, (sql, args) in enumerate(statements):
            script.add(str(n), sql, args)
        if end:
            script.add("off", COUNTED_OFF)
            script.add("end", end)
        got = script.run(self.cur)
        return [got[str(n)] for n in range(len(statements))]


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
        """Run fn(Transaction), again after a deadlock (up to five times). If fn did not `finish`, its
        transaction is committed, or rolled back when fn returned exactly False."""
        conn = self.conn()
        for attempt in range(6):
            tx = None
            try:
                with conn.cursor(pymysql.cursors.DictCursor) as cur:
                    tx = CountedTransaction(cur)
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
                if code == NO_SUCH_TABLE:
                    raise SchemaMissing(str(exc)) from exc
                raise
            except BaseException:
                if tx is not None and (tx.open or tx.counted):
                    self._rollback(conn)
                raise

    @staticmethod
    def _rollback(conn) -> None:
        """Roll back, and clear the count gate a script cut short by an error may have left set
        (the next transaction on this connection, e.g. the reaper's, would count nothing)."""
        for step in (conn.rollback, lambda: conn.query(COUNTED_OFF)):
            try:
                step()
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
