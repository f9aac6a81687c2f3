"""Real servers for the tests: the API and daemons as subprocesses, private MariaDB instances.

Nothing here is a fake: each helper starts the same program production runs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal as signals
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pymysql
import requests

from app.config import MySQLURL

ROOT = Path(__file__).resolve().parent.parent
MYSQL_HOST = os.environ.get("TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("TEST_MYSQL_USER", "root")
MYSQL_PASSWORD = os.environ.get("TEST_MYSQL_PASSWORD", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_url(database: str, host: str = MYSQL_HOST, port: int = MYSQL_PORT) -> MySQLURL:
    return MySQLURL(host, port, MYSQL_USER, MYSQL_PASSWORD, database)


def url_text(url: MySQLURL) -> str:
    return url.secret_text()


def admin_connect(host: str = MYSQL_HOST, port: int = MYSQL_PORT, database: str | None = None, ssl=None,
                  unix_socket: str | None = None):
    """`ssl`: an SSLContext for a server that requires TLS; `unix_socket` instead of TCP."""
    return pymysql.connect(host=host, port=port, user=MYSQL_USER, password=MYSQL_PASSWORD,
                           database=database, autocommit=True, ssl=ssl, ssl_disabled=ssl is None,
                           unix_socket=unix_socket, init_command="SET time_zone = '+00:00'")


def query(url: MySQLURL, sql: str, args=()) -> list[tuple]:
    """Run one statement on a database of the test servers (over TLS if the URL says so); its rows."""
    conn = admin_connect(url.host, url.port, url.database, ssl=url.tls.context() if url.tls else None)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def count_round_trips(conn) -> list:
    """The statements (or `;`-joined batches) sent on `conn` from now on, one per round trip."""
    sent = []
    original = conn._execute_command

    def counting(command, sql):
        sent.append(sql)
        return original(command, sql)
    conn._execute_command = counting
    return sent


def session_statements(conn) -> int:
    """The session's statements so far (each statement of a multi-statement batch counts)."""
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Questions'")
        return int(cur.fetchone()[1])


def server_statements(conn) -> int:
    """Statements the whole server has run so far (its Com_* counters, SHOW STATUS not counted)."""
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Com\\_%%'")
        rows = cur.fetchall()
    return sum(int(v) for k, v in rows if k != "Com_show_status")


def unique_name(prefix: str) -> str:
    return f"t_{prefix}_{uuid.uuid4().hex[:10]}"


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # a server not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class Process:
    """A service started as `python -m <module>`, output captured to a log file."""

    module: str
    args: list[str]
    env: dict
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], cwd=ROOT,
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_group(self, sig: int = signals.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> int | None:
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signals.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                self.proc.wait(5)
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def service_env(pipeline_db: MySQLURL, shared_dir: Path, api_port: int, shard_dbs: list[MySQLURL] | None = None,
                **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYSQL_", "PIPELINE_", "SHARD_"))}
    shard_dbs = shard_dbs or []
    env.update({
        "MYSQL_PIPELINE_URL": url_text(pipeline_db),
        "SHARED_DIR": str(shared_dir),
        "PIPELINE_API_HOST": "127.0.0.1",
        "PIPELINE_API_PORT": str(api_port),
        "PIPELINE_URL": f"http://127.0.0.1:{api_port}/api/v1/pipeline",
        "SHARD_COUNT": str(extra.pop("SHARD_COUNT", max(len(shard_dbs), 2))),
        "PYTHONUNBUFFERED": "1",
    })
    for n, url in enumerate(shard_dbs):
        env[f"MYSQL_SHARD_{n}_URL"] = url_text(url)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class ApiServer:
    process: Process
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/pipeline"

    def client(self, **kw):
        from app.client import PipelineClient
        kw.setdefault("max_wait", 10.0)
        return PipelineClient(self.base, self.process.env.get("PIPELINE_API_TOKEN"), **kw)

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready():
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"pipeline-apid exited:\n{self.process.output()[-3000:]}")
            return requests.get(f"{self.base}/ready", timeout=2).status_code == 200
        wait_until(ready, timeout, what="pipeline-apid /ready")


def start_api(env: dict, log_dir: Path, module: str = "app.apid") -> ApiServer:
    port = int(env["PIPELINE_API_PORT"])
    server = ApiServer(Process(module, [], env, log_dir / f"apid-{port}.log").start(), port)
    server.wait_ready()
    return server


@dataclass
class MariaDB:
    """A private mariadbd on a spare port with its own data folder (for tests that stop the
    server, or need one server per shard)."""

    datadir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    options: list[str] = field(default_factory=list)  # more mariadbd options; later ones win

    @property
    def socket(self) -> Path:
        return self.datadir / "mysqld.sock"

    @property
    def tmpdir(self) -> Path:
        """Its own temporary folder, never the machine's: a mariadbd starting deletes every `#sql*`
        file in its tmpdir, and with the default (/tmp, the test server's too) that included the
        on-disk temporary tables of statements running on the test server at that moment (an
        information_schema query's: `Error on delete of '/tmp/#sql-temptable-...MAI'`, errno 6, a
        pymysql InternalError in whatever test was running beside it). Kept out of the databases."""
        return self.datadir / ".tmp"

    def install(self) -> "MariaDB":
        self.datadir.mkdir(parents=True, exist_ok=True)
        if not (self.datadir / "mysql").exists():
            installer = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
            if not installer:
                raise RuntimeError("mariadb-install-db not found: apt-get install mariadb-server")
            self.tmpdir.mkdir(exist_ok=True)
            subprocess.run([installer, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
                            "--auth-root-authentication-method=normal", "--skip-test-db",
                            f"--tmpdir={self.tmpdir}", "--ignore-db-dirs=.tmp"],
                           check=True, capture_output=True)
        return self

    def start(self, timeout: float = 60.0) -> "MariaDB":
        binary = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        log = open(self.datadir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [binary, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.socket}", "--user=root",
             f"--pid-file={self.datadir / 'mysqld.pid'}", "--skip-grant-tables=0",
             "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M", "--max-connections=300",
             "--local-infile=1", "--skip-name-resolve", "--log-error=" + str(self.datadir / "error.log"),
             f"--tmpdir={self.tmpdir}", "--ignore-db-dirs=.tmp", *self.options],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        # Over the unix socket: a server started with --require-secure-transport refuses
        # plain TCP, and the socket comes up with the TCP port.
        wait_until(lambda: admin_connect(unix_socket=str(self.socket)).close() or True, timeout, 0.1,
                   what=f"private mariadbd on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def url(self, database: str) -> MySQLURL:
        return server_url(database, "127.0.0.1", self.port)


def new_private_mariadb(options: list[str] | None = None) -> MariaDB:
    return MariaDB(Path(tempfile.mkdtemp(prefix="pipeline-mariadb-")), options=options or []).install().start()


@contextlib.contextmanager
def bench_database(prefix: str, private: bool, pool: str = "128M"):
    """(url, server pid) of a fresh database for a bench: on a mariadbd of its own (`private`,
    whose pid lets the bench read the server's CPU) or on the test server (pid 0). Dropped, and
    the private server stopped and its folder removed, on the way out, whatever happened."""
    name = unique_name(prefix)
    server = new_private_mariadb([f"--innodb-buffer-pool-size={pool}"]) if private else None
    try:
        admin = admin_connect(port=server.port) if server else admin_connect()
        try:
            with admin.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}`")
            try:
                yield (server.url(name) if server else server_url(name)), (server.proc.pid if server else 0)
            finally:
                with admin.cursor() as cur:
                    cur.execute(f"DROP DATABASE `{name}`")
        finally:
            admin.close()
    finally:
        if server:
            server.stop()
            shutil.rmtree(server.datadir, ignore_errors=True)
