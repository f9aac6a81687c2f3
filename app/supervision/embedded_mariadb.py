"""The local run's own MariaDB: the machine's installed server binaries, data in a project folder.

Used by `bin/pipeline start` when no MYSQL_*_URL is configured, so a fresh checkout runs with no
database set up by hand. It listens on 127.0.0.1 only, on a spare port remembered in its data
folder; root has no password there, which is why it must never listen anywhere else.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .. import db
from ..config import MySQLURL
from ..processes import pid_alive

INSTALL_HINT = (
    "no MariaDB server found: install one (Debian/Ubuntu: sudo apt-get install mariadb-server; "
    "Fedora: sudo dnf install mariadb-server; macOS: brew install mariadb), or use an existing "
    "server: export MYSQL_PIPELINE_URL=mysql://user:password@host:3306/pipeline_db and "
    "MYSQL_SHARD_<N>_URL for each shard")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/libexec", "/opt/homebrew/sbin", "/opt/homebrew/bin",
         "/usr/local/opt/mariadb/bin", "/usr/local/bin")


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for folder in _SBIN:
            candidate = Path(folder) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def _cmdline(pid: int) -> str | None:
    """The process's command line where /proc has it (None elsewhere)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mariadbd binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class EmbeddedMariaDB:
    def __init__(self, datadir: Path):
        self.datadir = datadir.absolute()
        self.server = _find("mariadbd", "mysqld")
        self.installer = _find("mariadb-install-db", "mysql_install_db")

    @property
    def available(self) -> bool:
        return bool(self.server and self.installer)

    @property
    def pid_file(self) -> Path:
        return self.datadir / "mariadbd.pid"

    @property
    def port_file(self) -> Path:
        return self.datadir / "port"

    @property
    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def pid(self) -> int | None:
        """The server's pid while it runs."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        cmdline = _cmdline(pid)
        if cmdline is not None and str(self.datadir) not in cmdline:
            return None  # a stale pid file and the number reused by another process
        return pid

    def url(self, database: str) -> MySQLURL:
        return MySQLURL("127.0.0.1", self.port or 0, "root", "", database)

    def _user_args(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []

    def _install(self) -> None:
        """Create the system tables once; a half-done install (no marker) is redone."""
        marker = self.datadir / "installed"
        if marker.exists():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.datadir / "data", ignore_errors=True)
        done = subprocess.run([self.installer, "--no-defaults", f"--datadir={self.datadir / 'data'}",
                               "--auth-root-authentication-method=normal", "--skip-test-db",
                               *self._user_args()], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{self.installer} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        marker.touch()

    def _pick_port(self) -> int:
        port = self.port
        if port is None or not _port_free(port):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.port_file.write_text(f"{port}\n")
        return port

    def start(self, timeout: float = 60.0) -> None:
        """Start the server unless it already runs (idempotent); wait until it answers."""
        if not self.available:
            raise RuntimeError(INSTALL_HINT)
        if self.pid() is None:
            self._install()
            port = self._pick_port()
            with open(self.datadir / "server.log", "ab") as log:
                subprocess.Popen(
                    [self.server, "--no-defaults", f"--datadir={self.datadir / 'data'}", f"--port={port}",
                     "--bind-address=127.0.0.1", f"--socket={self.datadir / 'mariadbd.sock'}",
                     f"--pid-file={self.pid_file}", f"--log-error={self.datadir / 'error.log'}",
                     "--skip-name-resolve", "--local-infile=1", "--max-connections=300",
                     "--innodb-buffer-pool-size=128M", *self._user_args()],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                db.connect(self.url(""), database=None, connect_timeout=2).close()
                return
            except db.UNAVAILABLE as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"private MariaDB did not come up in {timeout:.0f}s ({exc}); "
                                       f"see {self.datadir / 'error.log'}") from None
                time.sleep(0.2)

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the server if it runs; True when it was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        return True
