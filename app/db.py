"""MySQL connections: opened from a `MySQLURL`, UTC sessions, checked before reuse.

Connections are never shared between threads; `ThreadConnections` gives each thread its own,
created lazily (so after a fork) and pinged before use so a restarted server is survived.
"""
from __future__ import annotations

import re
import threading
import time
from decimal import Decimal
from pathlib import Path

import pymysql
import pymysql.cursors

from .config import MySQLURL

# The SQL files (schemas, worked examples), at the top of the project.
SQL_DIR = Path(__file__).resolve().parent.parent / "db"

# Errors meaning "the server is not there or the connection broke", as opposed to bad SQL.
UNAVAILABLE = (pymysql.err.OperationalError, pymysql.err.InterfaceError, ConnectionError, OSError)
DEADLOCK_CODES = {1213, 1205}  # deadlock, lock wait timeout: retry the transaction


def connect(url: MySQLURL, database: str | None = "", *, autocommit: bool = True,
            connect_timeout: float = 5, local_infile: bool = False,
            multi_statements: bool = False) -> pymysql.connections.Connection:
    """Open a connection; `database=None` connects without selecting a database.
    `multi_statements`: one execute may send several `;`-separated statements (one round trip).
    TLS as the URL's options say; without them TLS is off, because PyMySQL's default (TLS if
    the server offers it) loads the CA bundle on every connect (~25 ms) and checks nothing."""
    conn = pymysql.connect(
        host=url.host, port=url.port, user=url.user, password=url.password,
        database=(url.database if database == "" else database),
        autocommit=autocommit, charset="utf8mb4", connect_timeout=connect_timeout,
        read_timeout=600, write_timeout=600, local_infile=local_infile,
        ssl=url.tls.context() if url.tls else None, ssl_disabled=url.tls is None,
        init_command="SET time_zone = '+00:00'",
        client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS if multi_statements else 0,
    )
    if url.tls and not conn.server_capabilities & pymysql.constants.CLIENT.SSL:
        # Older PyMySQL releases carry on unencrypted when the server offers no TLS.
        conn.close()
        raise pymysql.err.OperationalError(2026, f"{url} requires TLS, which the server does not offer")
    return conn


def ensure_database(url: MySQLURL) -> None:
    """Create the URL's database if it is missing (idempotent)."""
    conn = connect(url, database=None)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{url.database}` CHARACTER SET utf8mb4")
    finally:
        conn.close()


def split_sql(text: str) -> list[str]:
    """Statements of a DDL file: `;` at a line end separates them, `--` lines are comments."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.M) if s.strip()]


def apply_sql_file(conn, path: Path, lock_name: str) -> None:
    """Run an idempotent DDL file under a named lock, so two services starting together
    do not race on CREATE/ALTER."""
    with conn.cursor() as cur:
        cur.execute("SELECT GET_LOCK(%s, 60)", (lock_name,))
        try:
            for stmt in split_sql(path.read_text()):
                cur.execute(stmt)
        finally:
            cur.execute("SELECT RELEASE_LOCK(%s)", (lock_name,))


class ThreadConnections:
    """One connection per thread, opened on first use and checked before each reuse."""

    def __init__(self, url: MySQLURL, check_after: float = 1.0, **connect_options):
        self.url = url
        self.check_after = check_after
        self.connect_options = connect_options
        self._local = threading.local()

    def get(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and time.monotonic() - self._local.used > self.check_after:
            try:
                conn.ping(reconnect=False)
            except Exception:
                self.discard()
                conn = None
        if conn is None:
            conn = connect(self.url, **self.connect_options)
            self._local.conn = conn
        self._local.used = time.monotonic()
        return conn

    def discard(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


def literal_renderer(conn):
    """A function rendering one value as an SQL literal, by type, as PyMySQL's parameter
    escaping does but without its per-value dispatch (half the cost, which matters at
    hundreds of thousands of values per second): ints and finite Decimals are written as
    numbers (they cannot carry SQL), everything else through the connection's own escaping
    (which honours NO_BACKSLASH_ESCAPES)."""
    escape = conn.escape

    def literal(value) -> str:
        kind = type(value)
        if kind is int:
            return str(value)
        if value is None:
            return "NULL"
        if kind is Decimal and value.is_finite():
            return format(value, "f")
        return escape(value)
    return literal


def sql_list(conn, values) -> str:
    """`(v1,v2,...)` for an IN clause, each value rendered by `literal_renderer`. The result
    goes into a statement executed without args (a `%` in a value must not meet formatting)."""
    return "(" + ",".join(map(literal_renderer(conn), values)) + ")"


def insert_statements(conn, head: str, rows: list, tail: str = "", max_bytes: int = 1_000_000,
                      render=None) -> list[str]:
    """`head` ("INSERT INTO t (a, b) VALUES ") + one `(...)` per row + `tail` (e.g. an ON
    DUPLICATE KEY UPDATE clause), as statements of at most ~max_bytes each. Values are rendered
    by `literal_renderer`, or a row at once by `render(row)`, which must be as strict (e.g. `%d`
    for ints, numbers for finite Decimals, nothing unescaped)."""
    if not rows:
        return []
    if render is None:
        literal = literal_renderer(conn)

        def render(row) -> str:
            return "(" + ",".join(map(literal, row)) + ")"
    statements, parts, size = [], [], 0
    for row in rows:
        text = render(row)
        if parts and size + len(text) > max_bytes:
            statements.append(head + ",".join(parts) + tail)
            parts, size = [], 0
        parts.append(text)
        size += len(text) + 1
    statements.append(head + ",".join(parts) + tail)
    return statements


def insert_rows(cur, head: str, rows: list, tail: str = "", max_bytes: int = 1_000_000, render=None) -> int:
    """Run `insert_statements`; the affected-row count."""
    return sum(cur.execute(sql) for sql in insert_statements(cur.connection, head, rows, tail, max_bytes, render))


class Script:
    """Statements sent together: one round trip per ~max_bytes instead of one per statement
    (the connection needs `multi_statements`). Each statement has a tag; `run` answers per tag
    the rows its SELECTs returned and the rows its other statements affected. The server stops
    at the first failing statement, whose error is raised."""

    def __init__(self, max_bytes: int = 4_000_000):
        self.max_bytes = max_bytes
        self.items: list[tuple[str, str]] = []

    def add(self, tag: str, statements) -> None:
        self.items.extend((tag, sql) for sql in ([statements] if isinstance(statements, str) else statements))

    def run(self, cur) -> dict[str, tuple[list, int]]:
        results: dict[str, tuple[list, int]] = {}
        chunk: list[tuple[str, str]] = []
        size = 0
        for tag, sql in self.items + [("", "")]:
            if chunk and (not sql or size + len(sql) > self.max_bytes):
                cur.execute(";".join(s for _, s in chunk))
                for i, (t, _) in enumerate(chunk):
                    if i and not cur.nextset():
                        raise pymysql.err.InterfaceError(f"no result for statement {i + 1} of {len(chunk)}")
                    rows, affected = results.get(t, ([], 0))
                    if cur.description:
                        rows.extend(cur.fetchall())
                    else:
                        affected += max(cur.rowcount, 0)
                    results[t] = (rows, affected)
                chunk, size = [], 0
            if sql:
                chunk.append((tag, sql))
                size += len(sql) + 1
        self.items = []
        return results
