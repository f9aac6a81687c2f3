"""MySQL connections: opened from a `MySQLURL`, UTC sessions, checked before reuse; and the
schema of every database, as numbered migrations applied in order.

Connections are never shared between threads; `ThreadConnections` gives each thread its own,
created lazily (so after a fork) and pinged before use so a restarted server is survived.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pymysql
import pymysql.cursors
from pymysql.constants import CR, ER

from .config import MySQLURL

# The SQL files (migrations, worked examples), at the top of the project. Read only through
# `sql_files`.
SQL_DIR = Path(__file__).resolve().parent.parent / "db"

# Errors meaning "the server is not there or the connection broke", as opposed to bad SQL.
UNAVAILABLE = (pymysql.err.OperationalError, pymysql.err.InterfaceError, ConnectionError, OSError)
DEADLOCK_CODES = {1213, 1205}  # deadlock, lock wait timeout: retry the transaction
# The connection broke or never opened (client-side codes), or the server is shutting down.
CONNECTION_LOST = frozenset({CR.CR_CONNECTION_ERROR, CR.CR_CONN_HOST_ERROR, CR.CR_SERVER_GONE_ERROR,
                             CR.CR_SERVER_LOST, CR.CR_SERVER_LOST_EXTENDED, ER.SERVER_SHUTDOWN,
                             ER.NORMAL_SHUTDOWN, ER.SHUTDOWN_COMPLETE, ER.CON_COUNT_ERROR})


def is_connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the server is unreachable or the connection broke (retry later), as
    opposed to the server refusing a statement (retrying changes nothing)."""
    if isinstance(exc, (pymysql.err.InterfaceError, ConnectionError)):
        return True
    code = exc.args[0] if isinstance(exc, pymysql.err.MySQLError) and exc.args else None
    return code in CONNECTION_LOST or code in DEADLOCK_CODES


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

# -- schema migrations ------------------------------------------------------------------------
# Each component owns a sequence of files db/migrations/<component>/NNNN_<name>.sql: `tracking`,
# `worker` and `splitter` in the pipeline database, `shard` in each shard database. `migrate`
# applies those a database lacks, in order, each recorded in that database's schema_migrations
# table, under a named lock per database (see db/README.md).

MIGRATIONS = "migrations"
MIGRATION_LOCK_SECONDS = 300.0  # an upgrade of a big original table may take minutes
_MIGRATION_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_CREATES = re.compile(r"^--\s*creates:(.*)$", re.M)
_LEDGER = """CREATE TABLE IF NOT EXISTS schema_migrations (
  component VARCHAR(32) NOT NULL,
  version INT NOT NULL,
  name VARCHAR(128) NOT NULL,
  checksum CHAR(64) NOT NULL,
  applied_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  adopted TINYINT(1) NOT NULL DEFAULT 0,
  PRIMARY KEY (component, version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""


class MigrationError(Exception):
    """The schema files are missing or malformed, or disagree with what the database records:
    an operator must fix it. Deliberately not a database error, so no caller mistakes it for
    an outage to wait out."""


class MigrationLockTimeout(MigrationError):
    """Another process held the database's migration lock for the whole wait."""


def sql_files(folder: str) -> dict[str, str]:
    """Name -> text of each `.sql` file in `folder` under the SQL files' root: the one place
    that reads them (make the files package data by changing only this). A folder or file that
    cannot be read is a MigrationError naming it, never an OSError (which reads as an outage)."""
    path = SQL_DIR / folder
    try:
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(path.iterdir(), key=lambda p: p.name)
                if p.name.endswith(".sql")}
    except (OSError, UnicodeDecodeError) as exc:
        raise MigrationError(f"cannot read the SQL files in {path}: {exc}") from None


@dataclass(frozen=True)
class Migration:
    component: str
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def creates(self) -> tuple[str, ...]:
        """The `table` and `table.column` names its `-- creates:` lines list: where all exist, the
        migration's work is there (see `_migrate_locked`)."""
        return tuple(word for line in _CREATES.findall(self.text) for word in line.split())

    def statements(self) -> list[str]:
        return split_sql(self.text)

    def __str__(self) -> str:
        return f"{self.component} {self.version:04d}_{self.name}"


def migrations(component: str) -> list[Migration]:
    """The component's migrations, in order; versions run 1, 2, 3... without a gap."""
    found = []
    for filename, text in sql_files(f"{MIGRATIONS}/{component}").items():
        m = _MIGRATION_FILE.fullmatch(filename)
        if not m:
            raise MigrationError(f"db/{MIGRATIONS}/{component}/{filename}: a migration is named NNNN_name.sql "
                                 f"(four digits, lower-case letters, digits and _)")
        found.append(Migration(component, int(m.group(1)), m.group(2), text))
    if not found:
        raise MigrationError(f"no migrations for {component!r} in db/{MIGRATIONS}/{component}/")
    found.sort(key=lambda x: x.version)
    versions = [x.version for x in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"db/{MIGRATIONS}/{component}/: versions must run 1, 2, 3... without gaps or "
                             f"repeats, found {versions}")
    return found


def migrate(conn, component: str, lock_seconds: float = MIGRATION_LOCK_SECONDS) -> list[Migration]:
    """Bring `component`'s schema in the connection's database up to date; the migrations it
    ran or recorded. Several processes may call it at once: a named lock per database
    serialises them, and one that cannot get it in `lock_seconds` raises MigrationLockTimeout
    instead of going on unprotected. The files are read before the database is touched, so a
    missing file is reported as such whatever the server's state."""
    wanted = migrations(component)
    with conn.cursor() as cur:
        cur.execute("SELECT DATABASE()")
        database = cur.fetchone()[0]
        lock = f"schema_migrations.{database}"[:64]
        cur.execute("SELECT GET_LOCK(%s, %s)", (lock, lock_seconds))
        if cur.fetchone()[0] != 1:
            raise MigrationLockTimeout(f"could not take the migration lock {lock!r} of database {database!r} in "
                                       f"{lock_seconds:g} s: another process is applying migrations there "
                                       f"(or hangs holding the lock; see SELECT IS_USED_LOCK({lock!r}))")
        try:
            return _migrate_locked(conn, cur, database, component, wanted)
        finally:
            try:
                cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
            except pymysql.err.MySQLError:
                pass  # the connection is gone, and its locks with it


def _migrate_locked(conn, cur, database: str, component: str, wanted: list[Migration]) -> list[Migration]:
    """For each migration, in order: recorded and its `creates` present: nothing to do; recorded
    but something it creates is gone (a table dropped by hand): run it again; not recorded but
    everything it creates present (a database made before schema_migrations existed, by the DDL
    files migration 0001 replaced): record it as adopted, without running it; else run it."""
    cur.execute(_LEDGER)
    cur.execute("SELECT version, name, checksum FROM schema_migrations WHERE component=%s", (component,))
    applied = {version: (name, checksum) for version, name, checksum in cur.fetchall()}
    by_version = {m.version: m for m in wanted}
    for version, (name, checksum) in sorted(applied.items()):
        m = by_version.get(version)
        if m is None:
            raise MigrationError(f"database {database!r} has {component} migration {version:04d}_{name}, which this "
                                 f"code does not know: newer code migrated it; run that version")
        if (name, checksum) != (m.name, m.checksum):
            raise MigrationError(f"{m} is not the file that was applied to database {database!r} (recorded: "
                                 f"{version:04d}_{name}, checksum {checksum[:12]}): an applied migration is never "
                                 f"edited; add a new one")
    present = _present(cur)
    done: list[Migration] = []
    for m in wanted:
        creates = [name.lower() for name in m.creates]
        there = bool(creates) and all(name in present for name in creates)
        if m.version in applied and (there or not creates):
            continue
        if m.version not in applied and there:
            _record(conn, cur, m, adopted=True)
            done.append(m)
            continue
        for n, statement in enumerate(m.statements(), 1):
            try:
                cur.execute(statement)
                if cur.description:
                    cur.fetchall()
            except pymysql.err.MySQLError as exc:
                if is_connection_lost(exc):
                    raise
                raise MigrationError(f"{m}, statement {n} failed in database {database!r}: {exc}; the statements "
                                     f"before it were applied (DDL commits at once), and the migration runs again "
                                     f"from its start next time") from exc
        _record(conn, cur, m, adopted=False)
        done.append(m)
        present = _present(cur)
    return done


def _present(cur) -> set[str]:
    """`table` and `table.column` names of the connection's database, lower case."""
    cur.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema=DATABASE()")
    present = set()
    for table, column in cur.fetchall():
        present.update((table.lower(), f"{table}.{column}".lower()))
    return present


def _record(conn, cur, m: Migration, adopted: bool) -> None:
    cur.execute("INSERT INTO schema_migrations (component, version, name, checksum, adopted) VALUES (%s,%s,%s,%s,%s)"
                " ON DUPLICATE KEY UPDATE applied_at=CURRENT_TIMESTAMP(3), adopted=VALUES(adopted)",
                (m.component, m.version, m.name, m.checksum, int(adopted)))
    if not conn.get_autocommit():
        conn.commit()


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
