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
from typing import NamedTuple
from decimal import Decimal
from importlib import resources

import pymysql
import pymysql.cursors
from pymysql.constants import CR, ER
from pymysql.protocol import LoadLocalPacketWrapper, MysqlPacket

from .config import MySQLURL

# The SQL files (migrations, worked examples): the project's db/ folder, package data of
# `app` (app/sql links to it; a wheel holds the files themselves). Read only through `sql_files`.
SQL_DIR = resources.files(__package__) / "sql"

# -- what the server says (one set of names, pymysql's constants where it has them) ------------
# The server is not there or the connection broke: PyMySQL raises OperationalError or
# InterfaceError for it (wrapping the socket's OSError); a bare ConnectionError escapes a few
# paths. A daemon that also touches files catches its file system errors (OSError) apart.
UNAVAILABLE = (pymysql.err.OperationalError, pymysql.err.InterfaceError, ConnectionError)
DEADLOCK = ER.LOCK_DEADLOCK
LOCK_WAIT_TIMEOUT = ER.LOCK_WAIT_TIMEOUT
DEADLOCK_CODES = frozenset({DEADLOCK, LOCK_WAIT_TIMEOUT})  # retry the transaction
NO_SUCH_TABLE = ER.NO_SUCH_TABLE
NO_SUCH_ROUTINE = ER.SP_DOES_NOT_EXIST
DUP_ENTRY = ER.DUP_ENTRY
# A CHECK constraint refused a row (MariaDB 4025, ER_CONSTRAINT_FAILED; MySQL 8.0 3819): e.g. a
# JSON column's json_valid, which in MariaDB refuses documents nested deeper than 31 levels.
CONSTRAINT_FAILED = frozenset({4025, 3819})
# LOAD DATA LOCAL INFILE refused: by the server (MySQL 8.0 with local_infile=OFF answers 3948,
# ER_CLIENT_LOCAL_FILES_DISABLED; MariaDB 4166, ER_LOAD_INFILE_CAPABILITY_DISABLED; older ones
# 1148) or by the client library (2068). PyMySQL names only the first and the last.
LOCAL_INFILE_REFUSED = frozenset({ER.NOT_ALLOWED_COMMAND, 3948, 4166, CR.CR_LOAD_DATA_LOCAL_INFILE_REJECTED})
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


LOCAL_PACKET = 1 << 16  # bytes per packet of LOAD DATA LOCAL data


class LocalFileRefused(pymysql.err.OperationalError):
    """The server asked for a local file the running statement did not offer."""


# Column descriptions a connection remembers (`_Result`); cleared when full (a few dozen shapes
# of the application's own statements in practice).
DESCRIPTIONS_KEPT = 256


class _Replay:
    """The connection as `MySQLResult._get_descriptions` uses it, answering `_read_packet`
    from packets read off the wire already."""

    def __init__(self, conn, packets):
        self.use_unicode, self.encoding, self.decoders = conn.use_unicode, conn.encoding, conn.decoders
        self._packets = iter(packets)

    def _read_packet(self, packet_type=MysqlPacket):
        return packet_type(next(self._packets), self.encoding)


class _Result(pymysql.connections.MySQLResult):
    """A result whose column descriptions are parsed once per connection and shape: PyMySQL
    parses every column's descriptor packet of every result set in Python (~3.5 µs a column
    more than reading it), and a small file's worker scripts answer ~47 columns, the same few
    shapes each time (every daemon and the API connect through `connect`). The packets are
    still read off the wire; identical bytes (name, table, type, charset, length, flags) give
    what PyMySQL's own parse of them gave, so that parse (PyMySQL's code, replayed from the
    bytes) runs only for bytes not seen before on this connection."""

    def _get_descriptions(self):
        conn = self.connection
        read = conn._read_packet
        packets = tuple([read().get_all_data() for _ in range(self.field_count)])
        eof = read()
        known = conn._descriptions.get(packets)
        if known is None:
            self.connection = _Replay(conn, packets + (eof.get_all_data(),))
            try:
                super()._get_descriptions()
            finally:
                self.connection = conn
            if len(conn._descriptions) >= DESCRIPTIONS_KEPT:
                conn._descriptions.clear()
            conn._descriptions[packets] = (tuple(self.fields), tuple(self.converters), self.description)
            return
        if not eof.is_eof_packet():
            raise pymysql.err.OperationalError(2014, "commands out of sync: no EOF after the column descriptions")
        fields, converters, self.description = known
        self.fields, self.converters = list(fields), list(converters)


class Connection(pymysql.connections.Connection):
    """PyMySQL's connection, its results' column descriptions parsed once per shape (`_Result`)."""

    _result_class = _Result

    def __init__(self, *args, **kwargs):
        self._descriptions: dict = {}
        super().__init__(*args, **kwargs)

    def _read_query_result(self, unbuffered=False):
        self._result = None
        result = self._result_class(self)
        if unbuffered:
            result.init_unbuffered_query()
        else:
            result.read()
        self._result = result
        if result.server_status is not None:
            self.server_status = result.server_status
        return result.affected_rows


class _OfferingResult(_Result):
    """A result whose LOAD DATA LOCAL request is answered with the bytes the running
    statement offered (`LocalDataConnection.offered`), never with a file of this machine."""

    def _read_load_local_packet(self, first_packet):
        conn = self.connection
        wanted = LoadLocalPacketWrapper(first_packet).filename
        data = (conn.offered or {}).get(wanted)
        try:
            if data is not None:
                view = memoryview(data)
                step = min(conn.max_allowed_packet, LOCAL_PACKET)
                for start in range(0, len(view), step):
                    conn.write_packet(view[start:start + step])
        finally:
            conn.write_packet(b"")  # end of the data (none at all for a request refused)
            answer = conn._read_packet()
        if data is None:
            raise LocalFileRefused(2000, f"the server asked for the local file {wanted[:200]!r}, which this "
                                         f"statement does not send: refused")
        if not answer.is_ok_packet():
            raise pymysql.err.OperationalError(2014, "commands out of sync after LOAD DATA LOCAL")
        self._read_ok_packet(answer)


class LocalDataConnection(Connection):
    """A connection that can run LOAD DATA LOCAL INFILE (`load_local`) and nothing more: it
    tells the server it may send local data, but a request is answered only while a
    `load_local` statement runs, and only with the bytes that statement offers. PyMySQL's own
    `local_infile=True` would send any file of this machine the server names, at any
    statement (a rogue or hijacked server could read the daemon's environment)."""

    offered: dict[bytes, bytes] | None = None
    _result_class = _OfferingResult


def load_local(cur, sql: str, args, name: str, data: bytes) -> int:
    """Run a `LOAD DATA LOCAL INFILE <name> ...` statement whose file is `data` (in memory:
    no file is written or read). The cursor's connection comes from `connect(local_infile=True)`."""
    conn = cur.connection
    if not isinstance(conn, LocalDataConnection):
        raise TypeError("LOAD DATA LOCAL needs a connection opened with db.connect(..., local_infile=True)")
    conn.offered = {name.encode(): data}
    try:
        return cur.execute(sql, args)
    finally:
        conn.offered = None


def load_local_after(cur, first: str, first_args, sql: str, args, name: str, data: bytes) -> tuple[int, int]:
    """`first` and then a `load_local` statement in ONE round trip (a connection opened with
    `multi_statements` too): the rows `first` affected and the rows the load stored. When
    `first` affected none (a claim that found its row already there), the server's request is
    answered with an empty file, so the load stores nothing. `first` failing stops the server
    before the load."""
    conn = cur.connection
    if not isinstance(conn, LocalDataConnection) or not conn.client_flag & pymysql.constants.CLIENT.MULTI_STATEMENTS:
        raise TypeError("load_local_after needs db.connect(..., local_infile=True, multi_statements=True)")
    conn.offered = {}
    try:
        affected = cur.execute(cur.mogrify(first, first_args) + ";\n" + cur.mogrify(sql, args))
        conn.offered = {name.encode(): data if affected else b""}
        if not cur.nextset():
            raise pymysql.err.InterfaceError(2014, "no result for the LOAD DATA sent after the first statement")
        return affected, cur.rowcount
    finally:
        conn.offered = None


def connect(url: MySQLURL, database: str | None = "", *, autocommit: bool = True,
            connect_timeout: float = 5, local_infile: bool = False,
            multi_statements: bool = False) -> pymysql.connections.Connection:
    """Open a connection; `database=None` connects without selecting a database.
    `multi_statements`: one execute may send several `;`-separated statements (one round trip).
    `local_infile`: a `LocalDataConnection`, which sends LOAD DATA LOCAL data only through
    `load_local` (the server can read no file of this machine).
    TLS as the URL's options say; without them TLS is off, because PyMySQL's default (TLS if
    the server offers it) loads the CA bundle on every connect (~25 ms) and checks nothing."""
    flags = pymysql.constants.CLIENT.MULTI_STATEMENTS if multi_statements else 0
    if local_infile:
        flags |= pymysql.constants.CLIENT.LOCAL_FILES
    conn = (LocalDataConnection if local_infile else Connection)(
        host=url.host, port=url.port, user=url.user, password=url.password,
        database=(url.database if database == "" else database),
        autocommit=autocommit, charset="utf8mb4", connect_timeout=connect_timeout,
        read_timeout=600, write_timeout=600, local_infile=False,
        ssl=url.tls.context() if url.tls else None, ssl_disabled=url.tls is None,
        init_command="SET time_zone = '+00:00'",
        client_flag=flags,
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
_REPLACES = re.compile(r"^--\s*replaces:(.*)$", re.M)
_CHECKSUM = re.compile(r"[0-9a-f]{64}")
_LEDGER = """CREATE TABLE IF NOT EXISTS schema_migrations (
  component VARCHAR(32) NOT NULL,
  version INT NOT NULL,
  name VARCHAR(128) NOT NULL,
  checksum CHAR(64) NOT NULL,
  applied_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  adopted TINYINT(1) NOT NULL DEFAULT 0,
  PRIMARY KEY (component, version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""


# A ledger row's checksum while its migration runs (no file's SHA-256 is empty).
STARTED = ""


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
        """The `table`, `table.column` and `routine()` names its `-- creates:` lines list: where all exist, the
        migration's work is there (see `_migrate_locked`)."""
        return tuple(word for line in _CREATES.findall(self.text) for word in line.split())

    @property
    def replaces(self) -> frozenset[str]:
        """The checksums its `-- replaces:` lines name: earlier texts of this file (same version
        and name) that a database may have recorded instead of this one, e.g. a released
        migration rewritten to run on MySQL 8.0 too (db/README.md)."""
        return frozenset(word for line in _REPLACES.findall(self.text) for word in line.split())

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
        migration = Migration(component, int(m.group(1)), m.group(2), text)
        bad = sorted(c for c in migration.replaces if not _CHECKSUM.fullmatch(c) or c == migration.checksum)
        if bad or (_REPLACES.search(text) and not migration.replaces):
            raise MigrationError(f"db/{MIGRATIONS}/{component}/{filename}: a `-- replaces:` line names the SHA-256 "
                                 f"checksums (64 lower-case hex digits) of earlier texts of the file, found "
                                 f"{', '.join(bad) or 'none'}")
        found.append(migration)
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
    files migration 0001 replaced): record it as adopted, without running it; else run it. A
    recorded checksum must be the file's, or one its `-- replaces:` lines name (an earlier text
    of the same version and name, whose work is there: nothing runs). A migration is recorded
    as started (`STARTED`, an empty checksum) before its first statement: one whose process
    died half-way runs again from its start, and is never taken for a pre-ledger database's and
    adopted with its later statements (a seed row, a copy of rows) never run."""
    cur.execute(_LEDGER)
    cur.execute("SELECT version, name, checksum FROM schema_migrations WHERE component=%s", (component,))
    rows = cur.fetchall()
    started = {version for version, _, checksum in rows if checksum == STARTED}
    applied = {version: (name, checksum) for version, name, checksum in rows if checksum != STARTED}
    by_version = {m.version: m for m in wanted}
    for version, (name, checksum) in sorted(applied.items()):
        m = by_version.get(version)
        if m is None:
            raise MigrationError(f"database {database!r} has {component} migration {version:04d}_{name}, which this "
                                 f"code does not know: newer code migrated it; run that version")
        if name != m.name or (checksum != m.checksum and checksum not in m.replaces):
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
        if m.version not in applied and there and m.version not in started:
            _record(conn, cur, m, adopted=True)
            done.append(m)
            continue
        _record(conn, cur, m, adopted=False, checksum=STARTED)
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
    """`table`, `table.column` and `routine()` names of the connection's database, lower case (a
    dump restored without its routines, `mysqldump` without `--routines`, loses the procedures)."""
    cur.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema=DATABASE()")
    present = set()
    for table, column in cur.fetchall():
        present.update((table.lower(), f"{table}.{column}".lower()))
    cur.execute("SELECT routine_name FROM information_schema.routines WHERE routine_schema=DATABASE()")
    present.update(f"{name.lower()}()" for name, in cur.fetchall())
    return present


def _record(conn, cur, m: Migration, adopted: bool, checksum: str | None = None) -> None:
    cur.execute("INSERT INTO schema_migrations (component, version, name, checksum, adopted) VALUES (%s,%s,%s,%s,%s)"
                " ON DUPLICATE KEY UPDATE checksum=VALUES(checksum), applied_at=CURRENT_TIMESTAMP(3),"
                " adopted=VALUES(adopted)",
                (m.component, m.version, m.name, m.checksum if checksum is None else checksum, int(adopted)))
    if not conn.get_autocommit():
        conn.commit()


class Reconnecting:
    """The one reconnecting connection: opened on first use, and again after it broke.

    Before a reuse it is checked (`ping`) when it has been idle `check_after` seconds (0: every
    time; None: never, the owner calls `discard` after an error). A new connection goes through
    `on_open(conn)` (the schema, the session) before anyone uses it; `create_database` first
    creates the URL's database if it is missing. Never shared between threads.
    """

    def __init__(self, url: MySQLURL, *, check_after: float | None = 0.0, on_open=None,
                 create_database: bool = False, **connect_options):
        self.url = url
        self.check_after = check_after
        self.on_open = on_open
        self.create_database = create_database
        self.connect_options = connect_options
        self.conn = None
        self._used = 0.0

    def get(self):
        conn = self.conn
        if conn is not None and self.check_after is not None and time.monotonic() - self._used >= self.check_after:
            try:
                conn.ping(reconnect=False)
            except Exception:
                self.discard()
                conn = None
        if conn is None:
            if self.create_database:
                ensure_database(self.url)
            conn = connect(self.url, **self.connect_options)
            try:
                if self.on_open is not None:
                    self.on_open(conn)
            except BaseException:
                conn.close()
                raise
            self.conn = conn
        self._used = time.monotonic()
        return conn

    def check_next(self) -> None:
        """Check the connection on the next `get`, however recently it was used."""
        self._used = float("-inf")

    def discard(self) -> None:
        """Close and forget the connection (after an error): the next `get` opens a new one."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


class ThreadConnections:
    """One `Reconnecting` connection per thread (opened lazily, so after a fork), checked
    before a reuse once idle `check_after` seconds, and after any thread found the server
    gone (`discard`): a server restarted within `check_after` would otherwise leave the other
    threads' connections broken for one request each."""

    def __init__(self, url: MySQLURL, check_after: float = 1.0, **connect_options):
        self.url = url
        self.check_after = check_after
        self.connect_options = connect_options
        self._local = threading.local()
        self._discards = 0   # bumped by any thread's discard; an int store, no lock needed

    def _mine(self) -> Reconnecting:
        mine = getattr(self._local, "conn", None)
        if mine is None:
            mine = self._local.conn = Reconnecting(self.url, check_after=self.check_after, **self.connect_options)
            self._local.discards = self._discards
        return mine

    def get(self):
        mine = self._mine()
        if self._local.discards != self._discards:
            self._local.discards = self._discards
            mine.check_next()
        return mine.get()

    def discard(self) -> None:
        self._discards += 1
        self._mine().discard()


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
    texts = list(map(render, rows))
    if sum(map(len, texts)) + len(texts) <= max_bytes:
        return [head + ",".join(texts) + tail]
    statements, parts, size = [], [], 0
    for text in texts:
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


class Result(NamedTuple):
    """What one tag's statements answered: the rows of its SELECTs, the rows its other
    statements affected, and the last insert id."""

    rows: list
    rowcount: int
    lastrowid: int | None = None

    def one(self):
        return self.rows[0] if self.rows else None


# What the server says of a LOAD DATA statement (its OK packet's info text).
_LOADED = re.compile(rb"Records: (\d+)\s+Deleted: (\d+)\s+Skipped: (\d+)\s+Warnings: (\d+)")


class LoadWarnings(pymysql.err.DataError):
    """A LOAD DATA LOCAL statement of a `Script` stored something with a warning other than a
    skipped duplicate (a value out of range or cut short, a line without every column)."""


class Call(str):
    """The text of a `CALL` of a stored procedure that answers one result set: the server
    then sends the CALL's own OK as one more result, which `Script` reads with it."""


class Script:
    """The one multi-statement batch runner: statements sent together, one round trip per
    ~max_bytes instead of one per statement (the connection needs `multi_statements`). Each
    statement has a tag and, optionally, args the cursor renders (`%s`); `run` answers per tag
    (`Result`). The server stops at the first failing statement, whose error is raised. The
    values are rendered before sending: a `%` in them never meets formatting again."""

    def __init__(self, max_bytes: int = 4_000_000):
        self.max_bytes = max_bytes
        self.items: list[tuple[str, str, tuple | list | None, bool]] = []
        self.offered: dict[bytes, bytes] = {}

    def add(self, tag: str, statements, args: tuple | list | None = None) -> None:
        """One statement (with `args`, if any), or several without. A `Call` answers its
        result set, then its own OK, which is read here too."""
        if isinstance(statements, str):
            self.items.append((tag, statements, args, False))
        else:
            self.items.extend((tag, sql, None, False) for sql in statements)

    def load(self, tag: str, sql: str, name: str, data: bytes) -> None:
        """A `LOAD DATA LOCAL INFILE '<name>' ...` statement (`sql`, no args) whose file is
        `data`, sent from memory when the server asks for `name` (`load_local`; the connection
        from `connect(local_infile=True, multi_statements=True)`; each name once a script).
        The server parses a row of it for a fraction of what an INSERT's `(...)` text costs.
        Unlike an INSERT, a LOCAL load never fails on a row: a duplicate key is skipped (the
        tag's affected-row count says how many rows went in) and a bad value is stored with a
        warning; `run` raises `LoadWarnings` for any warning but a skipped duplicate, so a
        load is as strict as an INSERT in strict mode."""
        key = name.encode()
        if key in self.offered:
            raise ValueError(f"a second file named {name!r} in one script")
        self.items.append((tag, sql, None, True))
        self.offered[key] = data

    def run(self, cur) -> dict[str, Result]:
        conn = cur.connection
        if self.offered:
            multi = conn.client_flag & pymysql.constants.CLIENT.MULTI_STATEMENTS
            if not isinstance(conn, LocalDataConnection) or not multi:
                raise TypeError("a script with LOAD DATA LOCAL needs db.connect(..., local_infile=True, "
                                "multi_statements=True)")
            conn.offered = self.offered
        try:
            return self._run(cur, conn)
        finally:
            if self.offered:
                conn.offered = None
            self.items, self.offered = [], {}

    def _run(self, cur, conn) -> dict[str, Result]:
        results: dict[str, Result] = {}
        chunk: list[tuple[str, str, bool, bool]] = []
        size = 0
        for tag, sql, args, load in self.items + [("", "", None, False)]:
            call = isinstance(sql, Call)
            if args is not None:
                sql = cur.mogrify(sql, args)
            if chunk and (not sql or size + len(sql) > self.max_bytes):
                at = 0
                try:
                    cur.execute(";".join(s for _, s, _, _ in chunk))
                except pymysql.err.MySQLError as exc:
                    raise _named(exc, chunk, at)
                warned = []
                for i, (t, _, loaded, called) in enumerate(chunk):
                    at = i
                    try:
                        more = not i or cur.nextset()
                    except pymysql.err.MySQLError as exc:
                        raise _named(exc, chunk, at)
                    if not more:
                        raise pymysql.err.InterfaceError(f"no result for statement {i + 1} of {len(chunk)}")
                    rows, affected, _ = results.get(t, ([], 0, None))
                    if cur.description:
                        rows.extend(cur.fetchall())
                    else:
                        affected += max(cur.rowcount, 0)
                    if called and not cur.nextset():
                        raise pymysql.err.InterfaceError(f"no OK after the result of CALL {i + 1} of {len(chunk)}")
                    if loaded:
                        info = _LOADED.search(conn._result.message or b"") if conn._result else None
                        if info is None or int(info[4]) > int(info[3]):
                            warned.append(f"{t}: {(conn._result.message or b'').decode(errors='replace')}"
                                          if conn._result else t)
                    results[t] = Result(rows, affected, cur.lastrowid)
                if warned:   # every result is read: the connection stays usable (for the rollback)
                    raise LoadWarnings(1265, "LOAD DATA stored rows with warnings: " + "; ".join(warned))
                chunk, size = [], 0
            if sql:
                chunk.append((tag, sql, load, call))
                size += len(sql) + 1
        return results


def _named(exc: pymysql.err.MySQLError, chunk: list, at: int) -> pymysql.err.MySQLError:
    """The server's error for a script's statement, its message naming which one (its tag,
    its place in the round trip, its first words): a script of forty statements that fails
    with only "Duplicate entry" leaves an operator guessing. Class and error code stay, so
    callers that act on the code (deadlocks, a refused LOCAL load) are unchanged."""
    if len(exc.args) == 2 and isinstance(exc.args[0], int):
        tag, sql = chunk[at][0], chunk[at][1]
        words = []
        for word in sql.split()[:4]:
            if any(c in word for c in "'\"(`%"):
                break   # a value or a column list from here: the statement's kind is enough
            words.append(word)
        head = " ".join(words)[:60]
        exc.args = (exc.args[0], f"{exc.args[1]} (script statement {at + 1} of {len(chunk)}, "
                                 f"{tag!r}: {head} ...)")
    return exc


class Transaction:
    """One transaction in as few round trips as its logic allows, over a `Script`.

    The first `run` opens the transaction, typically with the locking read the rules need;
    `finish` sends the writes and the COMMIT together. So a transition of the tracker is two
    round trips and a claim two, where one statement per trip made them four to six: on this
    machine each trip costs more CPU (system calls, wake-ups) than the SQL itself.
    """

    def __init__(self, cur):
        self.cur = cur
        self.open = False
        self.closed = False

    def run(self, *statements: tuple[str, tuple | list | None]) -> list[Result]:
        """Each (sql, args)'s Result, the transaction opened first if it is not yet."""
        begin = not self.open
        self.open = True
        return self._send(begin, statements, None)

    def finish(self, *statements: tuple[str, tuple | list | None], commit: bool = True) -> list[Result]:
        """Each (sql, args)'s Result, sent with the COMMIT (or ROLLBACK)."""
        if not self.open and not statements:
            self.closed = True
            return []
        results = self._send(not self.open, statements, "COMMIT" if commit else "ROLLBACK")
        self.open, self.closed = False, True
        return results

    def _send(self, begin: bool, statements, end: str | None) -> list[Result]:
        script = Script()
        if begin:
            script.add("begin", "START TRANSACTION")
        for n, (sql, args) in enumerate(statements):
            script.add(str(n), sql, args)
        if end:
            script.add("end", end)
        got = script.run(self.cur)
        return [got[str(n)] for n in range(len(statements))]
