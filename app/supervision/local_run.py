"""The local run behind `bin/pipeline` / `make run`: start, stop, status, ctl, monitor.

`start` brings up, in the background, everything a fresh checkout needs: the private MariaDB
(when no MYSQL_*_URL is set) with the pipeline and shard databases, then `pipeline-supervise
-c supervisord.conf` with all programs, and waits until every program is RUNNING. Everything it
owns lives under ./var: var/mariadb (database), var/shared (SHARED_DIR unless set), var/run
(supervisorctl socket, pid file, pipeline.env) and var/log/pipeline.log (all output).
`stop` ends supervisord (each program hands back its work), then the private MariaDB, and makes
sure no process of the run is left.
"""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from contextlib import contextmanager
from pathlib import Path

import requests
from supervisor.xmlrpc import SupervisorTransport

from .. import db
from ..config import RUN_ENV_FILE, ConfigError, Settings, Supervision, database_urls_configured, read_run_env
from ..processes import pid_alive
from ..stages import Stage
from .embedded_mariadb import INSTALL_HINT, EmbeddedMariaDB
from .supervise import StartError, prepare_run_dir, program_names

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "supervisord.conf"
VAR = ROOT / "var"
LOG = VAR / "log" / "pipeline.log"
ENV_FILE = RUN_ENV_FILE
START_TIMEOUT = 90.0
STOP_WAIT = 30  # supervisord.conf's stopwaitsecs


def local_env() -> dict[str, str]:
    """The environment of the run: the caller's, with the project's folders as defaults."""
    env = dict(os.environ)
    env.setdefault("SHARED_DIR", str(VAR / "shared"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def supervision(env: dict[str, str]) -> Supervision:
    """The run's supervision: the checkout's own supervisord.conf, state in var/run."""
    return Supervision.from_env(env, CONFIG)


def rpc(sup: Supervision) -> xmlrpc.client.ServerProxy:
    transport = SupervisorTransport(None, None, f"unix://{sup.socket}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def running_pid(sup: Supervision) -> int | None:
    """supervisord's pid when it answers on the run's socket."""
    if not sup.socket.exists():
        return None
    try:
        return int(rpc(sup).supervisor.getPID())
    except (OSError, xmlrpc.client.Error):
        return None


def pidfile_pid(sup: Supervision) -> int | None:
    """supervisord's pid from its pid file, when that process is still our supervisord (a hung
    one does not answer on the socket, but must still be stopped)."""
    try:
        pid = int((sup.run_dir / "supervisord.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"app.supervision.supervise" in cmdline and pid_alive(pid) else None


def process_infos(sup: Supervision) -> list[dict]:
    try:
        return rpc(sup).supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error):
        return []


def full_name(info: dict) -> str:
    """The name supervisorctl takes: `group:process` inside a group of several processes."""
    return info["name"] if info["name"] == info["group"] else f"{info['group']}:{info['name']}"


@contextmanager
def run_lock(sup: Supervision):
    """One start or stop at a time."""
    prepare_run_dir(sup)
    with open(sup.run_dir / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# What a shell needs to talk to the run as the group does (besides the URLs and folders).
SHARED_SETTINGS = ("PIPELINE_API_HOST", "PIPELINE_API_PORT", "PIPELINE_API_TOKEN", "PIPELINE_API_TOKEN_FILE",
                   "OPENING_BALANCE", "EVENTS_PER_FILE", "MAX_LINE_BYTES", "MAX_JSON_DEPTH",
                   "INGEST_SHOPS", "INGEST_GOODS", "INGEST_USERS")


def _write_env_file(sup: Supervision, env: dict[str, str], settings: Settings) -> Path:
    """What a shell or the dashboard needs to talk to this run: app/config.py reads it for
    every variable a command's environment does not set (`python -m app.ingest ...` from the
    checkout, `bin/pipeline monitor`)."""
    values = {"SHARD_COUNT": str(settings.shard_count), "MYSQL_PIPELINE_URL": env.get("MYSQL_PIPELINE_URL"),
              **{f"MYSQL_SHARD_{n}_URL": env.get(f"MYSQL_SHARD_{n}_URL") for n in range(settings.shard_count)},
              "SHARED_DIR": str(Path(env["SHARED_DIR"]).absolute()), "PIPELINE_URL": settings.pipeline_url,
              **{k: env.get(k) for k in SHARED_SETTINGS}}
    path = sup.run_dir / ENV_FILE
    tmp = path.with_name(f".{ENV_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        for key, value in values.items():
            if value and "\n" not in value:
                out.write(f"{key}={value}\n")
    os.replace(tmp, path)
    return path


def api_answers(url: str, timeout: float = 10.0) -> str | None:
    """None when an API at `url` (the PIPELINE_URL the daemons were given: one or several
    instances, comma-separated, any of which will do) answers its health check within `timeout`
    seconds, else why not."""
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while True:
        for one in url.split(","):
            try:
                r = requests.get(f"{one}/health", timeout=2)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return None
                problem = f"HTTP {r.status_code} from {one}/health"
            except (requests.RequestException, ValueError) as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:160]}"
        if time.monotonic() >= deadline:
            return problem
        time.sleep(0.3)


def _unreachable(settings: Settings, problem: str) -> str:
    return (f"the daemons were given PIPELINE_URL={settings.pipeline_url}, and no pipeline-apid answers there "
            f"({problem}); the API listens on {settings.api_host}:{settings.api_port}. Unset PIPELINE_URL (it "
            f"follows PIPELINE_API_HOST/PIPELINE_API_PORT) or set it to this API's address")


def _wait_all_running(sup: Supervision, proc: subprocess.Popen, expected: list[str]) -> str | None:
    """None once every program is RUNNING, else what went wrong."""
    deadline = time.monotonic() + START_TIMEOUT
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"supervisord exited with status {proc.returncode}"
        states = {full_name(i): i["statename"] for i in process_infos(sup)}
        fatal = sorted(n for n, s in states.items() if s == "FATAL")
        if fatal:
            return f"program(s) {', '.join(fatal)} keep crashing (FATAL)"
        if states and all(states.get(n) == "RUNNING" for n in expected):
            return None
        time.sleep(0.2)
    waiting = sorted(n for n in expected if states.get(n) != "RUNNING")
    return f"not RUNNING after {START_TIMEOUT:.0f}s: {', '.join(waiting) or 'supervisord socket'}"


def start() -> int:
    env = local_env()
    try:
        sup = supervision(env)
        prepare_run_dir(sup)
    except (ConfigError, StartError) as exc:
        print(exc.code, file=sys.stderr)
        return 2
    with run_lock(sup):
        pid = running_pid(sup) or pidfile_pid(sup)
        if pid:
            print(f"the pipeline is already running (supervisord pid {pid}); "
                  f"`bin/pipeline status` shows it, `make stop` stops it")
            return 0
        mariadb = None
        if not database_urls_configured(env):
            mariadb = EmbeddedMariaDB(VAR / "mariadb")
            if not mariadb.available:
                print(INSTALL_HINT, file=sys.stderr)
                return 1
        try:
            shard_count = Settings.from_env(env).shard_count
            if mariadb:
                mariadb.start()
                env["MYSQL_PIPELINE_URL"] = _url_text(mariadb.url("pipeline_db"))
                for n in range(shard_count):
                    env[f"MYSQL_SHARD_{n}_URL"] = _url_text(mariadb.url(f"shop_shard_{n}"))
            settings = Settings.from_env(env)
            if mariadb:
                for url in (settings.pipeline_db, *settings.shard_dbs):
                    db.ensure_database(url)
        except ConfigError as exc:
            print(exc.code, file=sys.stderr)
            return 2
        except (RuntimeError, *db.UNAVAILABLE) as exc:
            print(f"could not start the private MariaDB: {exc}", file=sys.stderr)
            if mariadb:
                mariadb.stop()
            return 1
        programs = program_names(CONFIG, env)  # PIPELINE_PROGRAMS: maybe not every program here
        if "pipeline-apid" in programs and not _port_free(settings.api_host, settings.api_port):
            print(f"port {settings.api_port} on {settings.api_host} is in use (another pipeline, or another "
                  f"program): set PIPELINE_API_PORT and PIPELINE_URL to another port", file=sys.stderr)
            if mariadb:
                mariadb.stop()
            return 1
        Path(env["SHARED_DIR"]).mkdir(parents=True, exist_ok=True)
        env_file = _write_env_file(sup, env, settings)
        LOG.parent.mkdir(parents=True, exist_ok=True)
        with open(LOG, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "app.supervision.supervise", "-c", str(CONFIG)],
                                    cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        problem = _wait_all_running(sup, proc, programs)
        if not problem and (why := api_answers(settings.pipeline_url)):
            problem = _unreachable(settings, why)
        if problem:
            print(f"the pipeline did not come up: {problem}\n--- last lines of {_rel(LOG)} ---\n"
                  f"{_tail(LOG)}\n---", file=sys.stderr)
            _stop_locked(sup, quiet=True)
            return 1
    if mariadb:
        databases = f"private MariaDB on 127.0.0.1:{mariadb.port} (data in {_rel(mariadb.datadir)})"
    else:
        databases = f"{settings.pipeline_db} and {len(settings.shard_dbs)} shard server(s)"
    print(f"""event pipeline running: {settings.shard_count} shards, supervisord pid {proc.pid}
  API        {settings.pipeline_url}
  databases  {databases}
  files      {_rel(settings.shared_dir)}
  dashboard  bin/pipeline monitor   (= python -m monitor with the settings in {_rel(env_file)})
  status     bin/pipeline status    (control: bin/pipeline ctl stop|start|restart <program>)
  logs       tail -f {_rel(LOG)}   (per daemon: {_rel(settings.shared_dir)}/<service>/activity.log)
  stop       make stop              (or bin/pipeline stop)""")
    return 0


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _url_text(url) -> str:
    return f"mysql://{url.user}:{url.password}@{url.host}:{url.port}/{url.database}"


def _stop_locked(sup: Supervision, quiet: bool = False) -> list[str]:
    """Stop supervisord and its programs, then the private MariaDB; what was stopped."""
    stopped = []
    sup_pid = running_pid(sup) or pidfile_pid(sup)
    child_pids = [int(i["pid"]) for i in process_infos(sup) if i.get("pid")]
    if sup_pid:
        n_programs = len(child_pids) + 1
        try:
            rpc(sup).supervisor.shutdown()
        except (OSError, xmlrpc.client.Error):
            os.kill(sup_pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT * n_programs + 10
        while pid_alive(sup_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(sup_pid):
            print(f"supervisord (pid {sup_pid}) did not stop in time: killing it", file=sys.stderr)
            os.kill(sup_pid, signal.SIGKILL)
        stopped.append(f"supervisord (pid {sup_pid}) and {len(child_pids)} program(s)")
    for pid in child_pids:
        if pid_alive(pid):
            print(f"program pid {pid} outlived supervisord: killing its process group", file=sys.stderr)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    mariadb = EmbeddedMariaDB(VAR / "mariadb")
    if mariadb.stop():
        stopped.append(f"private MariaDB (port {mariadb.port})")
    (sup.run_dir / ENV_FILE).unlink(missing_ok=True)   # its settings name what no longer runs
    if not quiet:
        print("stopped: " + ", ".join(stopped) if stopped else "the pipeline was not running")
    return stopped


def stop() -> int:
    sup = supervision(local_env())
    with run_lock(sup):
        _stop_locked(sup)
    return 0


def status() -> int:
    sup = supervision(local_env())
    mariadb = EmbeddedMariaDB(VAR / "mariadb")
    db_line = (f"private MariaDB: running on 127.0.0.1:{mariadb.port} (pid {mariadb.pid()})" if mariadb.pid()
               else "private MariaDB: not running")
    pid = running_pid(sup)
    if not pid:
        print(f"the pipeline is not running\n{db_line}")
        return 3
    print(f"supervisord pid {pid} ({sup.config_file})")
    for info in process_infos(sup):
        print(f"  {full_name(info):<34} {info['statename']:<9} {info['description']}")
    print(db_line)
    settings = Settings.from_env(_run_settings(sup))
    why = api_answers(settings.pipeline_url, timeout=3.0)
    print(f"API: {settings.pipeline_url} " + ("answers" if why is None else f"NOT reachable: {_unreachable(settings, why)}"))
    return 0 if why is None else 1


def _run_settings(sup: Supervision) -> dict[str, str]:
    """The environment the group was started with, as far as var/run/pipeline.env says."""
    env = local_env()
    env.update(read_run_env(sup.run_dir / ENV_FILE))
    return env


def ctl(args: list[str]) -> int:
    sup = supervision(local_env())
    supervisorctl = str(Path(sys.executable).parent / "supervisorctl")
    os.execv(supervisorctl, [supervisorctl, "-c", str(sup.config_file), *args])
    return 1  # not reached


def monitor(args: list[str]) -> int:
    env = local_env()
    sup = supervision(env)
    env.update(read_run_env(sup.run_dir / ENV_FILE))
    os.execve(sys.executable, [sys.executable, "-m", "monitor", *args], env)
    return 1  # not reached


USAGE = f"""usage: bin/pipeline start|stop|status|monitor|ctl <supervisorctl arguments>
  start    create what is missing (private MariaDB, databases) and start every program
  stop     stop every program (each hands back its work), supervisord and the private MariaDB
  status   each program's state
  monitor  the dashboard (python -m monitor) pointed at this run
  ctl      supervisorctl on this run, e.g. `bin/pipeline ctl restart {Stage.WORKER}:{Stage.WORKER.program(0)}`"""


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "start":
        return start()
    if command == "stop":
        return stop()
    if command == "status":
        return status()
    if command == "ctl":
        return ctl(args)
    if command == "monitor":
        return monitor(args)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
