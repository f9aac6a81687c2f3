"""`pipeline-supervise` (= `python -m app.supervision.supervise`): supervisord for the whole
process group, from supervisord.conf exactly as it is.

It is the container's entrypoint, what `bin/pipeline start` launches and what the tests start.
It adds to a plain `supervisord -c supervisord.conf` only what a config file cannot do:

- defaults for the settings the file names: supervisor has none for `%(ENV_X)s`, so
  SHARD_COUNT, SPLITTER_REPLICAS and SENDER_PROCESSES are set here when missing (a bad setting
  stops the start with one line, once, not in every program);
- the run folder (var/run next to the config: socket, pid file, supervisord's log) created
  0700, and refused when another user owns it or anyone may write it;
- `python` in the config is this interpreter: its folder goes first on PATH;
- with PIPELINE_API_TOKEN_FILE set and no token yet, a token generated into that file (0600);
- with EMBEDDED_MARIADB_DIR set and no MYSQL_*_URL, a private MariaDB: started (and its
  databases created) before the first program, stopped after the last one (the API), and its
  death stops the group;
- supervisord's main loop runs in this process, not exec'd, so a program gone FATAL (with
  PIPELINE_EXIT_ON_FATAL=1) or a dead embedded MariaDB ends it with exit status 1: supervisord
  itself always exits 0 after a shutdown.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Mapping

from ..config import ConfigError, Settings, Supervision, database_urls_configured
from ..stages import Stage

FATAL_MARKER = "fatal"
UNIX_PATH_MAX = 107  # bytes of a unix socket's path (108 with the terminating NUL)


class StartError(SystemExit):
    """Why the group cannot start, in one line (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = message


# -- the environment supervisord.conf expands ---------------------------------------------------

# The program groups of supervisord.conf and the variables saying what of each this host runs:
# (group, count variable, first-number variable or None for a single program).
API_PROGRAM = "pipeline-apid"
GROUPS = ((API_PROGRAM, "APID_PROCESSES", None), (Stage.INGEST.value, "INGEST_PROCESSES", None),
          (Stage.SPLITTER.value, "SPLITTER_PROCESSES", "SPLITTER_FIRST"),
          (Stage.WORKER.value, "WORKER_PROCESSES", "WORKER_FIRST"),
          (Stage.SENDER.value, "SENDER_PROCESSES", "SENDER_FIRST"))


def _count(env: Mapping[str, str], name: str, default: int, top: int = 2048) -> int:
    raw = env.get(name) or str(default)
    if not raw.isdigit() or int(raw) > top:
        raise ConfigError(name, f"must be a number of processes (0 to {top}), got {raw!r}")
    return int(raw)


def selection(env: Mapping[str, str], every: Mapping[str, int]) -> dict[str, tuple[int, int]] | None:
    """PIPELINE_PROGRAMS as (first process number, count) per group; None when unset or empty
    (this host runs every program). Names are supervisorctl's (`<group>-1`, also
    `<group>:<group>-1`), or a group's (`<group>`, `<group>:*`) for all of it. supervisord
    numbers a group's processes from one first number on, so what a host runs of one group
    must be a contiguous range (`<group>-1,<group>-2`, not `-0` and `-2`)."""
    raw = env.get("PIPELINE_PROGRAMS") or ""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    if not names:
        return None
    chosen: dict[str, set[int]] = {group: set() for group, _, _ in GROUPS}
    for name in names:
        group, _, process = name.rpartition(":") if ":" in name else ("", "", name)
        if process == "*" or (process in chosen and group in ("", process)):
            key = group or process
            if key not in chosen:
                raise ConfigError("PIPELINE_PROGRAMS", f"no program group {key!r} (groups: {', '.join(chosen)})")
            chosen[key].update(range(every[key]))
            continue
        owner, _, number = process.rpartition("-")
        if owner not in chosen or (group and group != owner) or not number.isdigit() or \
                int(number) >= every[owner]:
            known = ", ".join(f"{g}-0..{every[g] - 1}" if v else g for g, _, v in GROUPS)
            raise ConfigError("PIPELINE_PROGRAMS", f"no program {name!r} here (programs: {known})")
        chosen[owner].add(int(number))
    out = {}
    for group, numbers in chosen.items():
        if numbers and max(numbers) - min(numbers) + 1 != len(numbers):
            raise ConfigError("PIPELINE_PROGRAMS", f"{group}: {sorted(numbers)} is not a contiguous range; "
                                                   f"supervisord runs a group's processes from one first number on")
        out[group] = (min(numbers), len(numbers)) if numbers else (0, 0)
    return out


def config_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The values of the settings supervisord.conf names as %(ENV_X)s, defaults filled in:
    every program, or those PIPELINE_PROGRAMS selects; a variable set in `env` wins."""
    settings = Settings.from_env(env)
    sup = Supervision.from_env(env)
    every = {API_PROGRAM: 1, Stage.INGEST.value: 1, Stage.SPLITTER.value: sup.splitter_replicas,
             Stage.WORKER.value: settings.shard_count,
             Stage.SENDER.value: _count(env, "SENDER_PROCESSES", settings.shard_count * sup.sender_replicas)}
    chosen = selection(env, every)
    out = {"SHARD_COUNT": str(settings.shard_count), "SPLITTER_REPLICAS": str(sup.splitter_replicas)}
    for group, count_var, first_var in GROUPS:
        if chosen is None:
            first, count = _count(env, first_var, 0) if first_var else 0, _count(env, count_var, every[group])
        else:
            first, count = chosen[group]
        out[count_var] = str(count)
        if first_var:
            out[first_var] = str(first)
    return out


def supervisord_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` as supervisord and its programs get it: the config's settings with their defaults,
    this interpreter's folder first on PATH."""
    out = dict(env)
    out.update(config_defaults(env))
    bindir = str(Path(sys.executable).parent)
    path = out.get("PATH", os.defpath).split(os.pathsep)
    if path[0] != bindir:
        out["PATH"] = os.pathsep.join([bindir, *path])
    return out


def parse_config(config: Path, env: Mapping[str, str]):
    """supervisor's own reading of `config` under `env` (supervisor.options.ServerOptions)."""
    from supervisor.options import ServerOptions

    options = ServerOptions()
    options.environ_expansions = {f"ENV_{k}": v for k, v in env.items()}
    options.configfile = str(config)
    options.process_config(do_usage=False)
    return options


def program_names(config: Path, env: Mapping[str, str]) -> list[str]:
    """Every program process `config` runs under `env`, as supervisorctl names them
    (`group:process` inside a group of several), in start order; no event listeners."""
    if not (config.parent / "var" / "run").is_dir():  # supervisor insists on its log's folder
        with tempfile.TemporaryDirectory() as here:
            (Path(here) / "var" / "run").mkdir(parents=True)
            shutil.copy(config, Path(here) / config.name)
            return program_names(Path(here) / config.name, env)
    groups = sorted((g for g in parse_config(config, supervisord_env(env)).process_group_configs
                     if not hasattr(g, "pool_events")), key=lambda g: (g.priority, g.name))
    return [p.name if p.name == g.name else f"{g.name}:{p.name}"
            for g in groups for p in sorted(g.process_configs, key=lambda p: (len(p.name), p.name))]


# -- the run folder ----------------------------------------------------------------------------

def prepare_run_dir(sup: Supervision) -> Path:
    """var/run next to the config: created 0700; an existing one must be a folder of ours that
    nobody else may write (else another user could plant a socket or pid file in it)."""
    run_dir = sup.run_dir
    try:
        run_dir.parent.mkdir(exist_ok=True)
        run_dir.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(run_dir)
    except OSError as exc:
        raise StartError(f"cannot create the run folder {run_dir}: {exc.strerror} (supervisord keeps its "
                         f"socket next to {sup.config_file.name}: put the file where you may write)") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StartError(f"the run folder {run_dir} is not a folder (a link or a file): remove it")
    if info.st_uid != os.geteuid():
        raise StartError(f"the run folder {run_dir} belongs to uid {info.st_uid}, not to you (uid "
                         f"{os.geteuid()}): refusing a socket and pid file another user controls")
    if info.st_mode & stat.S_IWOTH:
        raise StartError(f"the run folder {run_dir} is writable by everyone: refusing it "
                         f"(remove it, or chmod 700 it after checking what it holds)")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(run_dir, 0o700)
    if len(str(sup.socket).encode()) > UNIX_PATH_MAX:
        raise StartError(f"supervisord's socket path {sup.socket} is longer than a unix socket allows "
                         f"({UNIX_PATH_MAX} bytes): use a copy of {sup.config_file.name} in a shorter path")
    return run_dir


def running_here(sup: Supervision) -> bool:
    """Whether a supervisord already answers on this config's socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(sup.socket))
        except OSError:
            return False
        return True


# -- the API token ------------------------------------------------------------------------------

def ensure_token_file(env: Mapping[str, str]) -> Path | None:
    """With PIPELINE_API_TOKEN_FILE set, no PIPELINE_API_TOKEN and no such file yet: write a new
    random token there (0600, never over an existing file or link). The path when it did."""
    path = env.get("PIPELINE_API_TOKEN_FILE")
    if env.get("PIPELINE_API_TOKEN") or not path or os.path.lexists(path):
        return None
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StartError(f"cannot create PIPELINE_API_TOKEN_FILE {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return Path(path)


# -- the embedded MariaDB -----------------------------------------------------------------------

class EmbeddedDatabase:
    """The private MariaDB of a container with no MYSQL_*_URL: its URLs go into the programs'
    environment; a watcher stops the group if it dies."""

    def __init__(self, datadir: Path, settings: Settings):
        from .embedded_mariadb import EmbeddedMariaDB

        self.server = EmbeddedMariaDB(datadir)
        self.settings = settings
        self.stopping = threading.Event()
        self.died = False

    def start(self, env: dict[str, str]) -> None:
        from .. import db

        if not self.server.available:
            from .embedded_mariadb import INSTALL_HINT
            raise StartError(INSTALL_HINT)
        try:
            self.server.start()
            env["MYSQL_PIPELINE_URL"] = _url_text(self.server.url(self.settings.pipeline_db.database))
            for n, url in enumerate(self.settings.shard_dbs):
                env[f"MYSQL_SHARD_{n}_URL"] = _url_text(self.server.url(url.database))
            for name in (self.settings.pipeline_db.database, *(u.database for u in self.settings.shard_dbs)):
                db.ensure_database(self.server.url(name))
        except (RuntimeError, *db.UNAVAILABLE) as exc:
            self.server.stop()
            raise StartError(f"the embedded MariaDB did not start: {exc}") from None
        print(f"pipeline-supervise: embedded MariaDB on 127.0.0.1:{self.server.port}, data in "
              f"{self.server.datadir}", file=sys.stderr, flush=True)
        threading.Thread(target=self._watch, name="embedded-mariadb-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            if self.server.pid() is None and not self.stopping.is_set():
                self.died = True
                print(f"pipeline-supervise: the embedded MariaDB exited unexpectedly (see "
                      f"{self.server.datadir / 'error.log'}): stopping every program", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)  # supervisord's own handler: a graceful shutdown
                return

    def stop(self) -> None:
        self.stopping.set()
        if self.server.stop():
            print("pipeline-supervise: embedded MariaDB stopped", file=sys.stderr, flush=True)


def _url_text(url) -> str:
    return f"mysql://{url.user}:{url.password}@{url.host}:{url.port}/{url.database}"


# -- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from supervisor import supervisord

    parser = argparse.ArgumentParser(
        prog="pipeline-supervise", description="supervisord for the whole pipeline, in the foreground; "
        "other arguments go to supervisord")
    parser.add_argument("-c", "--configuration", type=Path, default=None,
                        help="the supervisord.conf to run (default: the project's, package data)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    sup = Supervision.from_env(os.environ, args.configuration)
    if not sup.config_file.is_file():
        raise StartError(f"no supervisord config at {sup.config_file}")
    run_dir = prepare_run_dir(sup)
    if running_here(sup):
        raise StartError(f"a supervisord already runs with {sup.config_file} (socket {sup.socket}): "
                         f"`supervisorctl -c {sup.config_file} status` shows it")
    generated = ensure_token_file(os.environ)
    if generated:
        print(f"pipeline-supervise: generated an API token in {generated}: every POST to the API needs "
              f"`Authorization: Bearer <the file's line>`", file=sys.stderr, flush=True)
    env = supervisord_env(os.environ)
    settings = Settings.from_env(env)
    database = None
    if sup.embedded_mariadb_dir and not database_urls_configured(env):
        database = EmbeddedDatabase(sup.embedded_mariadb_dir, settings)
        database.start(env)
    marker = run_dir / FATAL_MARKER
    marker.unlink(missing_ok=True)
    os.environ.clear()
    os.environ.update(env)  # supervisord reads its %(ENV_X)s and the programs' environment here
    try:
        # As root, supervisord logs CRIT "running as root" unless told the user to run as.
        user = ["-u", "root"] if os.getuid() == 0 and not {"-u", "--user"} & {a.split("=")[0] for a in rest} else []
        supervisord.main(["-n", "-c", str(sup.config_file), *user, *rest])
    finally:
        if database:
            database.stop()
    if database and database.died:
        return 1
    if marker.exists():
        print(f"supervisord stopped because a program is FATAL: {marker.read_text().strip()}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
