"""The real supervisord running the project's supervisord.conf (a byte-for-byte copy in a folder
of the test's own) under pipeline-supervise, the image's entrypoint, every program real: all
RUNNING, files through end to end, supervisorctl stop/start of each daemon, SIGTERM to
supervisord, a crash-looping program going FATAL."""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from app import layout
from app.supervision import fatal_listener, local_run, supervise
from app.config import Supervision
from tests import servers
from tests.test_deploy import CONFIG, image_command

MODULES = ("app.api", "app.ingest", "app.splitter", "app.worker", "app.sender")
SHARDS = 2
STOP_WAIT = 30  # supervisord.conf's stopwaitsecs
FIXTURE = Path("/work/shared/fixtures/original-generator/20261126221520.event-ingest.txt")
SUPERVISORCTL = str(Path(sys.executable).parent / "supervisorctl")
STATUS = {"event-ingest": "event_ingest_status", "shard-splitter": "shard_splitter_status",
          "shard-worker": "shard_worker_status", "mysql-sender": "mysql_sender_status"}


def require_modules() -> None:
    """These tests run every program of the group: a stage module not written yet blocks them."""
    missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"BLOCKED: {', '.join(missing)} does not exist yet, so its program cannot run")


def process_of(program: str) -> tuple[str, int | None]:
    """(stage, shard or None) of a program's full name: `mysql-sender:mysql-sender-3` is
    process 3 of the senders, serving shard 3 mod SHARDS."""
    group, _, process = program.rpartition(":")
    number = re.search(r"-(\d+)$", process)
    stage = group or process
    if stage in ("shard-worker", "mysql-sender"):
        return stage, int(number.group(1)) % SHARDS
    return stage, None


def daemon_folder(shared: Path, program: str) -> Path:
    stage, shard = process_of(program)
    if stage == "event-ingest":
        return layout.ingest_dir(shared)
    if stage == "shard-splitter":
        return layout.splitter_dir(shared)
    if stage == "shard-worker":
        return layout.worker_dir(shared, shard)
    return layout.sender_dir(shared, shard)


def folder_files(folder: Path) -> list[str]:
    """What a daemon's folder holds besides its activity log."""
    return sorted(p.name for p in folder.iterdir() if p.name != "activity.log") if folder.is_dir() else []


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment holds `text` (a test's own run dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (text.encode() in cmdline or text.encode() in environ):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


@dataclass
class Group:
    process: servers.Process
    env: dict
    sup: Supervision
    shared: Path
    pipeline_db: object
    shard_dbs: list

    @property
    def programs(self) -> list[str]:
        return supervise.program_names(self.sup.config_file, self.env)

    def infos(self) -> dict[str, dict]:
        return {local_run.full_name(i): i for i in local_run.process_infos(self.sup)}

    def states(self) -> dict[str, str]:
        return {n: i["statename"] for n, i in self.infos().items()}

    def wait_all_running(self, timeout: float = 60.0) -> None:
        expected = set(self.programs) | {"fatal-listener"}

        def all_running():
            if self.process.proc.poll() is not None:
                raise AssertionError(f"supervisord exited:\n{self.process.output()[-4000:]}")
            states = self.states()
            bad = {n: s for n, s in states.items() if s in ("FATAL", "EXITED", "BACKOFF")}
            assert not any(s == "FATAL" for s in bad.values()), f"{bad}\n{self.process.output()[-4000:]}"
            return set(states) == expected and all(s == "RUNNING" for s in states.values())
        servers.wait_until(all_running, timeout, 0.2, what=f"every program RUNNING ({self.states()})")

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SUPERVISORCTL, "-c", str(self.sup.config_file), *args],
                              capture_output=True, text=True, timeout=180)  # start waits startsecs per program

    def query(self, sql: str, args=(), url=None) -> list[tuple]:
        return servers.query(url or self.pipeline_db, sql, args)

    def started_tasks(self, program: str) -> list[tuple]:
        stage, shard = process_of(program)
        sql = f"SELECT filename, shard FROM pipeline_tracking WHERE {STATUS[stage]}='started'"
        if shard is not None:
            return self.query(sql + " AND shard=%s", (shard,))
        return self.query(sql)

    def push(self, names: list[str]) -> None:
        """Act as the original generator: register, write the file in place, report done."""
        client = servers.ApiServer(self.process, int(self.env["PIPELINE_API_PORT"])).client()
        lines = FIXTURE.read_text().splitlines(keepends=True)
        for name in names:
            client.register(name, list(range(SHARDS)))
            path = layout.source_file(self.shared, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(lines))
            client.call("POST", "/stages/event-ingest/done", {"filename": name})

    def wait_loaded(self, timeout: float = 90.0) -> None:
        """Until every registered task is loaded (or failed: reported with its error)."""
        def quiet():
            rows = self.query("SELECT filename, shard, shard_splitter_status, shard_worker_status, "
                              "mysql_sender_status, last_error FROM pipeline_tracking")
            failed = [r for r in rows if "failed" in r[2:5]]
            assert not failed, f"tasks failed: {failed}"
            return rows and all(r[4] == "done" for r in rows)
        servers.wait_until(quiet, timeout, 0.25, what="every task loaded by mysql-sender")

    def check_rows_loaded_exactly_once(self) -> int:
        """Rows in each shard database == what the workers accepted == what the senders loaded."""
        total = 0
        for shard, url in enumerate(self.shard_dbs):
            (rows,), = self.query("SELECT COUNT(*) FROM events", url=url)
            worker, sender = self.query(
                "SELECT SUM(CASE WHEN t.stage='shard-worker' THEN t.events END), "
                "       SUM(CASE WHEN t.stage='mysql-sender' THEN t.events END) "
                "FROM pipeline_transitions t JOIN pipeline_tracking p ON p.id=t.tracking_id "
                "WHERE p.shard=%s AND t.to_status='done' AND t.id = (SELECT MAX(id) FROM pipeline_transitions x "
                "  WHERE x.tracking_id=t.tracking_id AND x.stage=t.stage AND x.to_status='done')", (shard,))[0]
            assert rows > 0, f"shard {shard} database holds no events"
            assert rows == int(worker) == int(sender), (shard, rows, worker, sender)
            total += rows
        return total


@pytest.fixture
def group_factory(make_database, tmp_path):
    """Start the image's ENTRYPOINT (pipeline-supervise -c supervisord.conf, its console script
    run as `python -m app.supervision.supervise`) over fresh databases, on a copy of
    supervisord.conf in a short folder of its own (a unix socket path has a length limit)."""
    started: list[Group] = []

    def start(prepare=None, **extra) -> Group:
        require_modules()
        command = image_command()
        assert command[:2] == ["pipeline-supervise", "-c"]
        pipeline_db = make_database("pipe")
        shard_dbs = [make_database(f"shard{n}") for n in range(SHARDS)]
        shared = tmp_path / "shared"
        shared.mkdir(exist_ok=True)
        here = Path(tempfile.mkdtemp(prefix="sv-"))
        shutil.copy(CONFIG, here / "supervisord.conf")
        settings = dict(SHARD_COUNT=SHARDS, LEASE_SECONDS=2, REAP_INTERVAL=1, API_WORKERS=1, API_THREADS=8,
                        INGEST_INTERVAL=3600, EVENTS_PER_FILE=50, HOLD_SECONDS=1, POLL_MAX_SECONDS=0.1)
        settings.update(extra)
        env = servers.service_env(pipeline_db, shared, servers.free_port(), shard_dbs, **settings)
        if prepare:
            prepare(shared)
        process = servers.Process("app.supervision.supervise", ["-c", str(here / "supervisord.conf")], env,
                                  tmp_path / f"supervisord-{len(started)}.log")
        group = Group(process, env, Supervision.from_env(env, here / "supervisord.conf"), shared, pipeline_db,
                      shard_dbs)
        started.append(group)
        process.start()
        return group

    yield start
    for group in started:
        if group.process.proc.poll() is None:
            group.process.stop(timeout=STOP_WAIT * 10)
        here = group.sup.config_file.parent  # every child's SUPERVISOR_SERVER_URL names it
        leftovers = processes_mentioning(str(here))
        for line in leftovers:
            try:
                os.killpg(int(line.split(":")[0]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(here, ignore_errors=True)
        assert not leftovers, f"processes outlived supervisord: {leftovers}"


def test_every_program_runs_and_generated_files_reach_the_shard_databases(group_factory):
    """With two splitters and two senders per shard: replicas share the work, load once."""
    group = group_factory(SPLITTER_REPLICAS=2, SENDER_REPLICAS=2)
    group.wait_all_running()
    assert {"shard-splitter:shard-splitter-1", "mysql-sender:mysql-sender-2",
            "mysql-sender:mysql-sender-3"} <= set(group.states())
    ingest = subprocess.run([sys.executable, "-m", "app.ingest", "--files", "3", "--events", "50"],
                            env=group.env, cwd=servers.ROOT, capture_output=True, text=True, timeout=60)
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    registered = group.query("SELECT COUNT(DISTINCT filename) FROM pipeline_tracking")[0][0]
    assert registered >= 3
    group.wait_loaded()
    group.check_rows_loaded_exactly_once()
    out = group.ctl("status")
    for name in group.programs:
        assert re.search(rf"^{re.escape(name)}\s+RUNNING", out.stdout, re.M), out.stdout


def test_supervisorctl_stop_empties_each_folder_and_start_resumes_work(group_factory):
    group = group_factory()
    group.wait_all_running()
    group.push([f"203001010000{n:02d}" for n in range(8)])
    daemons = [n for n in reversed(group.programs) if n != "pipeline-apid"]
    had_files = {}
    for program in daemons:
        folder = daemon_folder(group.shared, program)
        had_files[program] = folder_files(folder)
        out = group.ctl("stop", program)
        assert out.returncode == 0 and f"{program}: stopped" in out.stdout, out.stdout + out.stderr
        assert group.states()[program] == "STOPPED"
        assert folder_files(folder) == [], f"{program} left {folder_files(folder)} in {folder}"
        assert group.started_tasks(program) == [], f"{program} left tasks started"
    # Stopping while work was in flight is the point: some folder held files when stopped.
    assert any(had_files.values()), f"nothing was in flight when the daemons stopped: {had_files}"
    group.push([f"203001010001{n:02d}" for n in range(2)])  # queued while every stage is down
    out = group.ctl("start", *daemons)
    assert out.returncode == 0, out.stdout + out.stderr
    for program in daemons:
        assert f"{program}: started" in out.stdout, out.stdout
    group.wait_all_running()
    group.wait_loaded()
    group.check_rows_loaded_exactly_once()


def test_sigterm_to_supervisord_stops_every_child_within_stopwaitsecs(group_factory):
    group = group_factory()
    group.wait_all_running()
    children = {n: i["pid"] for n, i in group.infos().items()}
    group.push([f"203002010000{n:02d}" for n in range(6)])
    servers.wait_until(lambda: group.query("SELECT COUNT(*) FROM pipeline_tracking WHERE "
                                           "shard_splitter_status='done'")[0][0] > 0, 30, what="work in flight")
    began = time.monotonic()
    group.process.signal(signal.SIGTERM)
    rc = group.process.proc.wait(STOP_WAIT * (len(children) + 1))
    took = time.monotonic() - began
    output = group.process.output()
    assert rc == 0, output[-3000:]
    assert "SIGKILL" not in output, "a program outlived stopwaitsecs and was killed"
    for name in group.programs:
        process = name.rpartition(":")[2]  # supervisord's log names the process alone
        assert re.search(rf"stopped: {re.escape(process)} \(exit status 0\)", output), \
            f"{name} did not exit cleanly on SIGTERM:\n{output[-3000:]}"
    for name, pid in children.items():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text(), name
    assert processes_mentioning(str(group.sup.config_file.parent)) == []
    for program in group.programs[1:]:
        assert folder_files(daemon_folder(group.shared, program)) == [], program
        assert group.started_tasks(program) == [], program
    assert took < STOP_WAIT * len(children), took


@pytest.mark.parametrize("exit_on_fatal", [True, False], ids=["container", "local"])
def test_crash_looping_program_becomes_fatal_and_is_reported(group_factory, exit_on_fatal):
    def block_worker_folder(shared: Path) -> None:
        layout.worker_dir(shared, 1).write_text("a file where shard-worker-1's folder should be\n")

    # The worker dies within a second or two of each start (its folder is a file), well inside
    # supervisord.conf's startsecs (5): after startretries (3) more tries supervisord gives up.
    worker = "shard-worker:shard-worker-1"
    group = group_factory(prepare=block_worker_folder, PIPELINE_EXIT_ON_FATAL=int(exit_on_fatal))
    banner = f"FATAL: program {worker} keeps crashing"
    if exit_on_fatal:
        rc = group.process.proc.wait(90)
        output = group.process.output()
        assert rc == 1, output[-3000:]
        assert banner in output and "PIPELINE_EXIT_ON_FATAL is set" in output, output[-3000:]
        assert f"supervisord stopped because a program is FATAL: {worker}" in output
        assert f"supervisorctl -c {group.sup.config_file} start {worker}" in output
        assert len(re.findall(r"FATAL: program ", output)) == 1, "only the crashing program is FATAL"
        assert "SIGKILL" not in output
        assert processes_mentioning(str(group.sup.config_file.parent)) == []
    else:
        servers.wait_until(lambda: group.states().get(worker) == "FATAL", 90, 0.2, what=f"{worker} FATAL")
        servers.wait_until(lambda: banner in group.process.output(), 10, what="the FATAL banner")
        servers.wait_until(lambda: all(s == "RUNNING" for n, s in group.states().items() if n != worker),
                           30, 0.2, what="the other programs RUNNING")
        assert group.process.proc.poll() is None, "supervisord must keep running the rest"
        out = group.ctl("status", worker)
        assert "FATAL" in out.stdout
        group.process.signal(signal.SIGTERM)
        assert group.process.proc.wait(STOP_WAIT * 10) == 0


def test_program_restarted_again_and_again_is_stopped_and_reported(group_factory):
    """A program that dies after startsecs counts as started, so supervisord alone would
    restart it forever; the listener counts its exits and stops it. The crash here is a
    SIGKILL each time the worker has come up."""
    worker = "shard-worker:shard-worker-1"
    group = group_factory()
    group.wait_all_running()
    banner = f"FATAL: program {worker} keeps crashing: it exited unexpectedly"
    killed = []
    for _ in range(fatal_listener.CRASH_LOOP_EXITS):
        assert banner not in group.process.output(), f"banner after only {len(killed)} crashes"
        info = servers.wait_until(lambda: (i := group.infos()[worker])["statename"] == "RUNNING"
                                  and i["pid"] not in killed and i, 30, 0.2, what=f"{worker} RUNNING again")
        os.kill(info["pid"], signal.SIGKILL)
        killed.append(info["pid"])
        servers.wait_until(lambda: group.infos()[worker]["pid"] != info["pid"], 10, 0.1, what="the crash seen")
    servers.wait_until(lambda: banner in group.process.output(), 10, 0.2, what="the crash-loop banner")
    servers.wait_until(lambda: group.states().get(worker) == "STOPPED", 15, 0.2,
                       what=f"{worker} stopped by the listener ({group.states().get(worker)}; "
                            f"{group.process.output()[-2000:]})")
    states = group.states()
    assert all(s == "RUNNING" for n, s in states.items() if n != worker), states
    assert group.process.proc.poll() is None
