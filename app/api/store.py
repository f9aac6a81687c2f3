"""The one store every part of the tracker works through: this thread's connection (READ
COMMITTED, short lock waits), transactions in as few round trips as their logic allows, retried
on deadlock, and reads. A table gone (dropped by hand) surfaces as SchemaMissing.

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

from .errors import SchemaMissing

DEADLOCK = 1213  # retried at once; a lock wait timeout (1205) is not: it already took LOCK_WAIT_SECONDS
LOCK_WAIT_SECONDS = 5


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

    def tx(self, fn: Callable[[Tx], Any]):
        """Run fn(Tx), again after a deadlock (up to five times). If fn did not `finish`, its
        transaction is committed, or rolled back when fn returned exactly False."""
        conn = self.conn()
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

    def read(self, sql: str, args=()) -> list[dict]:
        conn = self.conn()
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except pymysql.err.ProgrammingError as exc:
            if exc.args and exc.args[0] == 1146:
                raise SchemaMissing(str(exc)) from exc
            raise

    def execute(self, sql: str, args=()) -> int:
        """One autocommitted statement; its affected-row count."""
        with self.conn().cursor() as cur:
            return cur.execute(sql, args)
