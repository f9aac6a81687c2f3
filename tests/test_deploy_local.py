"""The README's start command from a clean checkout: `make run` creates the venv, starts a
private MariaDB under ./var and every program; a generated file reaches the shard databases;
a second start says so; `make stop` leaves no process behind."""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import servers
from tests.test_supervisor import processes_mentioning, require_modules

ROOT = servers.ROOT


def clean_checkout() -> Path:
    """A clone of the repository plus the working tree's uncommitted changes (in CI there are
    none), without any .venv or var/: what a fresh machine gets."""
    dest = Path(tempfile.mkdtemp(prefix="pl-"))  # short: unix socket paths live under it
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, capture_output=True)

    def listed(*flags: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *flags], cwd=ROOT, check=True, capture_output=True)
        return [p for p in out.stdout.decode().split("\0") if p]

    deleted = set(listed("-d"))
    for rel in listed("-m", "-o", "--exclude-standard"):
        if rel in deleted:
            (dest / rel).unlink(missing_ok=True)
        elif (ROOT / rel).is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).unlink(missing_ok=True)
            os.symlink(os.readlink(ROOT / rel), dest / rel)
        elif (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def query(port: int, database: str, sql: str, args=()) -> list[tuple]:
    return servers.query(servers.server_url(database, "127.0.0.1", port), sql, args)


@pytest.fixture
def checkout():
    require_modules()
    dest = clean_checkout()
    yield dest
    leftovers = processes_mentioning(str(dest))
    for line in leftovers:
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(dest, ignore_errors=True)
    assert not leftovers, f"processes outlived `make stop`: {leftovers}"


def test_make_run_from_a_clean_checkout_processes_a_file_and_make_stop_leaves_nothing(checkout, make_database):
    assert not (checkout / ".venv").exists()
    assert [p.relative_to(checkout).as_posix() for p in (checkout / "var").rglob("*")] == \
        ["var/run", "var/run/.gitignore"], "a fresh checkout holds only the run folder supervisord.conf needs"
    port = servers.free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MYSQL_", "PIPELINE_", "SHARD_", "SUPERVISOR_", "VIRTUAL_ENV"))
           and k not in ("SHARED_DIR", "VENV")}
    # Only the API's port changes: PIPELINE_URL follows it (it is not set).
    env.update({"PIPELINE_API_PORT": str(port), "LEASE_SECONDS": "2", "API_WORKERS": "1",
                "INGEST_INTERVAL": "1", "EVENTS_PER_FILE": "50", "HOLD_SECONDS": "1"})

    started = run(["make", "run"], checkout, env, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "event pipeline running" in started.stdout
    assert "bin/pipeline monitor" in started.stdout and "make stop" in started.stdout
    assert (checkout / ".venv" / "bin" / "python").exists()
    db_port = int((checkout / "var" / "mariadb" / "port").read_text())
    assert f"private MariaDB on 127.0.0.1:{db_port}" in started.stdout

    # The event-ingest program generates files; one of them goes all the way to the shards.
    def a_file_loaded():
        return query(db_port, "pipeline_db",
                     "SELECT filename FROM pipeline_tracking GROUP BY filename "
                     "HAVING SUM(mysql_sender_status='done') = COUNT(*) LIMIT 1")
    [(filename,)] = servers.wait_until(a_file_loaded, 90, 0.5, what="a generated file loaded")
    loaded = sum(query(db_port, f"shop_shard_{n}", "SELECT COUNT(*) FROM events WHERE source_file=%s",
                       (filename,))[0][0] for n in range(2))
    assert loaded > 0
    assert list((checkout / "var" / "shared" / "events").glob(f"{filename}.event-ingest.txt"))

    # A clean start logs nothing at WARNING or above but supervisord's documented CRIT about
    # its socket (docs/operations.md, Logs).
    noisy = [ln for ln in (checkout / "var" / "log" / "pipeline.log").read_text().splitlines()
             if re.search(r" (WARNING|ERROR|CRIT|CRITICAL) ", ln) and "without any HTTP authentication" not in ln]
    assert noisy == [], noisy

    # The README's ingest command, as written, from the checkout with its venv: it finds the
    # running group (var/run/pipeline.env) and its files go all the way.
    readme = (checkout / "README.md").read_text()
    assert "python -m app.ingest --files 5 --events 1000" in readme
    venv_env = {**env, "PATH": f"{checkout / '.venv' / 'bin'}:{env['PATH']}"}
    pushed = run(["python", "-m", "app.ingest", "--files", "2", "--events", "30"], checkout, venv_env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    pushed_names = re.findall(r"^(\d{14})$", pushed.stdout, re.M)
    assert len(pushed_names) == 2
    assert all((checkout / "var" / "shared" / "events" / f"{n}.event-ingest.txt").exists() for n in pushed_names)

    def pushed_loaded():
        rows = query(db_port, "pipeline_db", "SELECT COUNT(*) FROM pipeline_tracking WHERE filename IN (%s, %s) "
                                              "AND mysql_sender_status='done'", tuple(pushed_names))
        return rows[0][0] == 4
    servers.wait_until(pushed_loaded, 90, 0.5, what="the README's ingest files loaded")

    again = run(["make", "run"], checkout, env)
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    status = run(["make", "status"], checkout, env)
    assert status.returncode == 0 and f"API: http://127.0.0.1:{port}/api/v1/pipeline answers" in status.stdout, \
        status.stdout + status.stderr
    status = run(["bin/pipeline", "status"], checkout, env)
    assert status.returncode == 0 and status.stdout.count("RUNNING") == 8, status.stdout
    # supervisor's own client on the checkout's supervisord.conf finds the same group.
    venv_env = {**env, "PATH": f"{checkout / '.venv' / 'bin'}:{env['PATH']}"}
    ctl = run(["supervisorctl", "-c", "supervisord.conf", "status"], checkout, venv_env)
    assert ctl.returncode == 0 and ctl.stdout.count("RUNNING") == 8, ctl.stdout + ctl.stderr
    assert "shard-worker:shard-worker-1" in ctl.stdout
    assert stat.S_IMODE((checkout / "var" / "run").stat().st_mode) == 0o700

    stopped = run(["make", "stop"], checkout, env, timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "supervisord" in stopped.stdout and "private MariaDB" in stopped.stdout, stopped.stdout
    assert processes_mentioning(str(checkout)) == []
    status = run(["bin/pipeline", "status"], checkout, env)
    assert status.returncode == 3 and "not running" in status.stdout, status.stdout
    status = run(["make", "status"], checkout, env)      # an answer, not a make error
    assert status.returncode == 0 and "not running" in status.stdout, status.stdout + status.stderr
    assert "make:" not in status.stdout + status.stderr and "Error" not in status.stdout + status.stderr
    assert "not running" in run(["make", "stop"], checkout, env).stdout
    assert not (checkout / "var" / "run" / "pipeline.env").exists()

    # Daemons given a PIPELINE_URL where no API answers: make run says so and leaves nothing.
    wrong = run(["make", "run"], checkout, {**env, "PIPELINE_URL": f"http://127.0.0.1:{servers.free_port()}"
                                                                   f"/api/v1/pipeline"}, timeout=300)
    assert wrong.returncode != 0 and "no pipeline-apid answers there" in wrong.stderr, wrong.stdout + wrong.stderr
    assert processes_mentioning(str(checkout)) == []

    # Then the README's plain supervisor commands, from the same checkout with its venv first
    # on PATH and only the README's exports (plus databases of the test's own and a free port).
    urls = {"MYSQL_PIPELINE_URL": servers.url_text(make_database("plain"))}
    urls.update({f"MYSQL_SHARD_{n}_URL": servers.url_text(make_database(f"plain{n}")) for n in range(2)})
    plain = {**venv_env, **urls, "APID_PROCESSES": "1", "INGEST_PROCESSES": "1", "SPLITTER_PROCESSES": "1",
             "WORKER_PROCESSES": "2", "SENDER_PROCESSES": "2", "SPLITTER_FIRST": "0", "WORKER_FIRST": "0",
             "SENDER_FIRST": "0",
             "SHARED_DIR": str(checkout / "var" / "shared"), "PIPELINE_API_PORT": str(port),
             "PIPELINE_URL": f"http://127.0.0.1:{port}/api/v1/pipeline"}
    with open(checkout / "supervisord.out", "wb") as out:
        supervisord = subprocess.Popen(["supervisord", "-c", "supervisord.conf"], cwd=checkout, env=plain,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def all_running():
            assert supervisord.poll() is None, (checkout / "supervisord.out").read_text()[-3000:]
            out = run(["supervisorctl", "-c", "supervisord.conf", "status"], checkout, plain).stdout
            return out.count("RUNNING") == 8 and out
        servers.wait_until(all_running, 90, 0.5, what="plain supervisord: every program RUNNING")
        stop = run(["supervisorctl", "-c", "supervisord.conf", "stop", "shard-worker:shard-worker-1"], checkout, plain)
        assert stop.stdout.strip() == "shard-worker:shard-worker-1: stopped", stop.stdout + stop.stderr
        start = run(["supervisorctl", "-c", "supervisord.conf", "start", "shard-worker:*"], checkout, plain)
        assert start.stdout.strip() == "shard-worker:shard-worker-1: started", start.stdout + start.stderr
        down = run(["supervisorctl", "-c", "supervisord.conf", "shutdown"], checkout, plain)
        assert down.returncode == 0, down.stdout + down.stderr
        assert supervisord.wait(120) == 0
    finally:
        if supervisord.poll() is None:
            os.killpg(supervisord.pid, signal.SIGKILL)
    assert "SIGKILL" not in (checkout / "supervisord.out").read_text()
    assert processes_mentioning(str(checkout)) == []
