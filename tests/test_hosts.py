"""Several hosts run one pipeline, and losing a host loses nothing.

Three "hosts", each a UTS namespace of its own with its own host name (`unshare --uts`, as
root; all traffic on this machine's loopback), each running its own `pipeline-supervise` with
the programs PIPELINE_PROGRAMS names, all sharing one folder, one MariaDB and two API
instances (PIPELINE_URL lists both, in a different order per host):

- host-a: pipeline-apid, a splitter, both workers, both senders (and the files' import);
- host-b: a splitter, both workers, both senders; SIGKILLed whole (supervisord and every
  process of its namespace) at a moment it holds tasks, and brought back later: the tasks it
  held are done by host-a once their leases run out;
- host-c: the second pipeline-apid only; SIGKILLed whole for good, first, so host-b's daemons
  (which ask it first) fail over to host-a's.

Afterwards the end-to-end oracle holds (tests/pipeline_harness.check_against_truth: every event
exactly once in the right shard or rejected with its reason, balances never negative, nothing
left started or failed), and nothing host-b's restart emptied was host-a's: every rejected-line
file host-a's splitter and workers wrote is still there and right. Stopping both hosts leaves
the shared folders empty. Figures are printed (`pytest -s`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bench import procstat
from tests import ground_truth, servers
from tests.pipeline_harness import Pipeline, check_against_truth
from tests.test_deploy import CONFIG
from tests.test_end_to_end import TWO_SPLITTERS, generate

FILES, EVENTS = 50, 60
DAEMONS = "shard-splitter-0,shard-worker-0,shard-worker-1,mysql-sender-0,mysql-sender-1"
PROGRAMS = {"host-a": f"pipeline-apid,{DAEMONS}", "host-b": DAEMONS, "host-c": "pipeline-apid"}


def uts_namespaces_work() -> str | None:
    """Why a UTS namespace with a host name of its own cannot be made here (None: it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    out = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname ns-probe && hostname"], capture_output=True,
                         text=True)
    if out.returncode != 0 or out.stdout.strip() != "ns-probe":
        return (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[0]
    return None


def in_host(host: str, argv: list[str]) -> list[str]:
    """`argv` run in a new UTS namespace named `host`."""
    return ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *argv]


def uts_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def where_things_stand(pipeline_db) -> str:
    """What a failed run leaves to read: the tasks not yet loaded and the last moves (the
    database is dropped with the test)."""
    try:
        open_tasks = servers.query(pipeline_db, "SELECT filename, shard, shard_splitter_status, shard_worker_status,"
                                                " mysql_sender_status, owner, lease_expires_at, NOW(3) FROM"
                                                " pipeline_tracking WHERE mysql_sender_status <> 'done'")
        moves = servers.query(pipeline_db, "SELECT id, at, filename, shard, stage, action, from_status, to_status,"
                                           " actor, LEFT(error, 300) FROM pipeline_transitions ORDER BY id DESC LIMIT 60")
    except Exception as exc:  # the state is for reading; its absence must not hide the failure
        return f"\n(state unreadable: {exc!r})"
    return "\n".join(["", "tasks not loaded:", *map(repr, open_tasks), "last moves (newest first):",
                       *map(repr, moves)])


class Host:
    def __init__(self, name: str, root: Path, env: dict):
        self.name = name
        self.dir = root / name
        (self.dir / "var" / "run").mkdir(parents=True, exist_ok=True)
        shutil.copy(CONFIG, self.dir / "supervisord.conf")
        self.env = {**env, "PIPELINE_PROGRAMS": PROGRAMS[name]}
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "host.log"
        self.uts: str | None = None

    def start(self) -> "Host":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(in_host(self.name, [sys.executable, "-m", "app.supervision.supervise", "-c",
                                                             str(self.dir / "supervisord.conf")]),
                                         cwd=self.dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        servers.wait_until(lambda: (u := uts_of(self.proc.pid)) and u != uts_of(os.getpid()) and u, 10,
                           what=f"{self.name}'s namespace")
        self.uts = uts_of(self.proc.pid)
        return self

    def status(self) -> str:
        config = str(self.dir / "supervisord.conf")
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", config, "status"],
                              capture_output=True, text=True, env=self.env, timeout=30).stdout

    def wait_running(self, timeout: float = 90) -> None:
        want = len(PROGRAMS[self.name].split(","))

        def running():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            lines = [ln for ln in self.status().splitlines() if ln.strip() and not ln.startswith("fatal-listener")]
            return len(lines) == want and all("RUNNING" in ln for ln in lines)
        servers.wait_until(running, timeout, 0.3, what=f"{self.name}: {want} programs RUNNING")

    def pids(self) -> list[int]:
        """Every process of this host: those in its UTS namespace."""
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and uts_of(int(p)) == self.uts]

    def kill(self) -> int:
        """SIGKILL the whole host: supervisord and every child, at once."""
        pids = self.pids()
        assert self.proc.pid in pids and len(pids) > 1
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        servers.wait_until(lambda: not self.pids(), 10, what=f"{self.name} gone")
        self.proc.wait(10)
        return len(pids)

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 120) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def stage(source: Path, folder: Path, names: list[str]) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copy(source / f"{name}{ground_truth.SUFFIX}", folder)
    return folder


def import_from(host: str, folder: Path, env: dict) -> subprocess.Popen:
    """event-ingest --import of a folder's files, run on `host` (its owner id names it)."""
    return subprocess.Popen(in_host(host, [sys.executable, "-m", "app.ingest", "--import", str(folder)]),
                            cwd=servers.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def held_by(pipeline_db, host: str) -> list[tuple[str, int, str]]:
    """The tasks `host`'s daemons hold: (filename, shard, stage) of each started one."""
    rows = servers.query(pipeline_db, "SELECT filename, shard, shard_splitter_status, shard_worker_status,"
                                      " mysql_sender_status FROM pipeline_tracking WHERE owner LIKE %s",
                         (f"{host}/%",))
    stages = ("shard_splitter", "shard_worker", "mysql_sender")
    return [(f, s, stage) for f, s, *statuses in rows for stage, st in zip(stages, statuses) if st == "started"]


def kill_while_holding(host: Host, pipeline_db, within: float = 60) -> list[tuple[str, int, str]]:
    """SIGKILL the whole host at a moment its daemons hold tasks; those tasks.

    Files must be flowing. The host is frozen (SIGSTOP) the moment it is seen holding work, and
    its requests already in flight are given time to be answered: what it holds then is what it
    holds at its death. If it finished everything meanwhile, it is let go on and tried again.
    However fast the pipeline runs, the kill lands on work in progress (killing on a count read
    a moment earlier found every file already loaded in some runs, and then nothing was left
    for the others to take over)."""
    deadline = time.monotonic() + within
    while True:
        if held_by(pipeline_db, host.name):
            host.signal_all(signal.SIGSTOP)
            time.sleep(0.3)
            orphans = held_by(pipeline_db, host.name)
            if orphans:
                host.kill()
                return orphans
            host.signal_all(signal.SIGCONT)
        assert time.monotonic() < deadline, f"{host.name} held no task while files flowed ({within}s)"
        time.sleep(0.01)


def last_done_by(info: dict, stage: str) -> str | None:
    done = [h["by"] for h in info["history"] if h["stage"] == stage and h["action"] == "done"]
    return done[-1] if done else None


def test_three_hosts_one_killed_and_back_one_api_killed_for_good_lose_nothing(tmp_path, pipeline_db, shard_dbs):
    why = uts_namespaces_work()
    if why is not None:
        pytest.fail(f"cannot make UTS namespaces here ({why}): the multi-host test needs root and unshare",
                    pytrace=False)
    source, names, truth = generate(tmp_path, files=FILES, events=EVENTS, seed=20261128, rates=TWO_SPLITTERS)
    port_a, port_c = servers.free_port(), servers.free_port()
    url_a, url_c = (f"http://127.0.0.1:{p}/api/v1/pipeline" for p in (port_a, port_c))
    pipe = Pipeline(tmp_path / "run", pipeline_db, shard_dbs, extra_env={"API_WORKERS": "1"})
    base = {**pipe.env, "API_WORKERS": "1"}
    base.pop("WORKER_ID", None)
    hosts = {
        "host-a": Host("host-a", tmp_path, {**base, "PIPELINE_API_PORT": str(port_a),
                                            "PIPELINE_URL": f"{url_a},{url_c}"}),
        "host-b": Host("host-b", tmp_path, {**base, "PIPELINE_URL": f"{url_c},{url_a}"}),
        "host-c": Host("host-c", tmp_path, {**base, "PIPELINE_API_PORT": str(port_c), "PIPELINE_URL": url_c}),
    }
    pipe.api = servers.ApiServer(servers.Process("app.apid", [], hosts["host-a"].env, tmp_path / "unused.log"), port_a)
    client = pipe.api.client(max_wait=30)
    figures = {"files": FILES, "events": sum(len(p.read_bytes().splitlines())
                                             for p in source.glob(f"*{ground_truth.SUFFIX}"))}
    importer = None
    began = time.monotonic()
    try:
        for host in hosts.values():
            host.start()
        for host in hosts.values():
            host.wait_running()
        def loaded() -> int:
            return client.summary()["by_stage"]["mysql_sender"]["done"]

        def db_now():
            return servers.query(pipeline_db, "SELECT NOW(3)")[0][0]

        def first_move_by(host: str, since) -> float | None:
            rows = servers.query(pipeline_db, "SELECT MIN(at) FROM pipeline_transitions "
                                              "WHERE actor LIKE %s AND at > %s AND action <> 'reap'",
                                 (f"{host}/%", since))
            return (rows[0][0] - since).total_seconds() if rows[0][0] else None

        # The files arrive in four parts through host-a's event-ingest, each when a step needs
        # work flowing (a step that waited on files already loaded would wait for ever): the
        # last once host-b is back (so it comes back to work).
        bounds = [0, 15, 25, 35, len(names)]
        parts = [stage(source, tmp_path / f"part-{n}", names[a:b]) for n, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        importer = import_from("host-a", parts[0], hosts["host-a"].env)

        def next_part(n: int) -> subprocess.Popen:
            assert importer.wait(180) == 0, importer.stdout.read()
            return import_from("host-a", parts[n], hosts["host-a"].env)

        # 1. The second API instance dies for good, with work flowing: host-b's daemons, which
        #    ask it first, carry on through host-a's.
        servers.wait_until(lambda: loaded() >= 6, 120, 0.2, what="files flowing")
        killed_c_at = db_now()
        figures["processes killed with host-c"] = hosts["host-c"].kill()
        importer = next_part(1)
        figures["failover s"] = servers.wait_until(lambda: first_move_by("host-b", killed_c_at), 60, 0.1,
                                                   what="host-b working through the other API")
        # 2. host-b dies whole while it holds work, and comes back later.
        importer = next_part(2)
        orphans = kill_while_holding(hosts["host-b"], pipeline_db)
        killed_b_mono = time.monotonic()
        figures["tasks host-b held when killed"] = len(orphans)

        # The others carry on without it: its tasks come back when their leases expire.
        def orphans_done() -> bool:
            rows = {(f, s): st for f, s, *st in servers.query(
                pipeline_db, "SELECT filename, shard, shard_splitter_status, shard_worker_status, mysql_sender_status"
                             " FROM pipeline_tracking")}
            order = ("shard_splitter", "shard_worker", "mysql_sender")
            return all(rows[(f, s)][order.index(stage)] == "done" for f, s, stage in orphans)
        servers.wait_until(orphans_done, 120, 0.1, what=f"host-b's tasks {orphans} done by host-a")
        figures["host-b's tasks done by host-a s (from its kill)"] = round(time.monotonic() - killed_b_mono, 2)
        restarted_b_at = db_now()
        hosts["host-b"].start().wait_running()
        importer = next_part(3)
        servers.wait_until(lambda: first_move_by("host-b", restarted_b_at), 60, 0.1, what="host-b back at work")
        figures["host-b back at work s (from its kill)"] = round(time.monotonic() - killed_b_mono, 2)
        assert importer.wait(180) == 0, importer.stdout.read()
        pipe.wait_loaded(len(names), timeout=240)
        figures["all loaded s (from host-b's kill)"] = round(time.monotonic() - killed_b_mono, 2)

        # The oracle of the end-to-end test.
        check_against_truth(pipe, truth, names, check_rejected_files=False)
        # Nothing host-b's restart emptied was host-a's: the rejected-line files host-a wrote
        # last for each file are all there, and right.
        fates = ground_truth.resolved_fates(truth)
        checked = Counter()
        for name in names:
            info = client.file(name)
            by_split = {last_done_by(s, "shard-splitter") for s in info["shards"]}
            if by_split == {"host-a/shard-splitter-0"} and truth.splitter_rejected[name]:
                path = pipe.shared / "shard-splitter" / f"{name}.shard-splitter.rejected.txt"
                records = [json.loads(x) for x in path.read_text().splitlines()]
                assert len(records) == sum(truth.splitter_rejected[name].values()), name
                assert all(fates[(name, r["line_no"])] == r["reason"] for r in records)
                checked["splitter"] += 1
            for s in info["shards"]:
                shard = s["shard"]
                if last_done_by(s, "shard-worker") == f"host-a/shard-worker-{shard}" and \
                        truth.worker_rejected[(name, shard)]:
                    path = pipe.shared / f"shard-worker-{shard}" / f"{name}.shard-worker.{shard}.rejected.txt"
                    got = Counter(json.loads(x)["reason"] for x in path.read_text().splitlines())
                    assert got == truth.worker_rejected[(name, shard)], (name, shard)
                    checked["worker"] += 1
        assert checked["splitter"] and checked["worker"], checked
        figures["host-a rejected files checked after host-b's restart"] = dict(checked)
        # Which host ran what: both daemon hosts, with their programs, from owner ids.
        view = {h["host"]: {p["program"] for p in h["programs"]} for h in client.hosts(minutes=30)["hosts"]}
        assert view["host-a"] >= {"event-ingest", "shard-splitter-0", "shard-worker-0", "shard-worker-1",
                                  "mysql-sender-0", "mysql-sender-1"}, view
        assert view["host-b"] <= set(DAEMONS.split(",")) and "mysql-sender-0" in view["host-b"], view
        assert "host-c" not in view  # an API is no task owner
        figures["kills"] = "host-c (API) for good, host-b whole once"
        figures["CPU s per host (its supervise tree; host-b since its restart)"] = {
            n: round(procstat.cpu_seconds(h.proc.pid), 1) for n, h in hosts.items() if h.proc.poll() is None}
        figures["wall s"] = round(time.monotonic() - began, 1)
    except BaseException:
        print(where_things_stand(pipeline_db))
        raise
    finally:
        if importer and importer.poll() is None:
            importer.kill()
        for host in hosts.values():
            host.stop()
        print(f"\nmulti-host figures: {figures}")
    for name, host in hosts.items():
        assert "RUNNING" not in host.status(), name
    # Stopped, the hosts left every stage folder empty between them (activity logs stay).
    for folder in ["shard-splitter", "shard-worker-0", "shard-worker-1", "mysql-sender/shard-0",
                   "mysql-sender/shard-1"]:
        left = [p.name for p in (pipe.shared / folder).iterdir() if p.name != "activity.log"]
        assert left == [], (folder, left)
