"""The whole pipeline's throughput, CPU, state and latency, by workload (prints figures; not a test).

    .venv/bin/python bench/pipeline.py [--workloads big,small,latency,sustained,idle] [--quick]
                                       [--json PATH] [--shared | --private-big] [--count] [--profile DIR]
    .venv/bin/python bench/pipeline.py --compare before.json after.json

The real processes (tests/pipeline_harness.Pipeline: API under gunicorn, splitter, a worker and a
sender per shard, 2 shards, default settings) on fresh databases, fed by the real importer
(`python -m app.ingest --import`) with generated files holding every injected case (RATES below),
cached under var/bench/. Each workload gets its own fresh databases and processes, and its own
folder in a block group nobody deleted from lately (bench/fsgroup.py: on ext4 without a journal a
file created among freshly deleted inodes costs up to ~0.8 ms of kernel CPU):

  big        1,000,000 events in files of 10,000. Wall time from the first registration to the
             last mysql-sender done (the tracking table's created_at / updated_at). The floor:
             the accepted rows, exported from the shard tables, loaded by the server's own
             LOAD DATA INFILE into a fresh fixed reference table (REFERENCE below), one shard
             after the other; ratio = pipeline wall / floor. The old floor (a fresh copy of the
             project's own `events` table) is printed beside it.
  small      200,000 events in files of 500: events/s and CPU per file. CPU is split into a cost
             per event and a cost per file with a second run of as many events in files of
             10,000 (fresh databases again, so both see the same history depth): per process
             group, CPU = events x e + files x f, solved from the two runs.
  latency    100-event files registered one at a time on an idle pipeline: registration ->
             loaded (both shards), median and max.
  sustained  2,000,000 events of history pushed in chunks, then the next 200,000 measured:
             CPU per event and rate against the first chunk (fresh databases, same run); the
             pipeline database's bytes per event of history (data + index of every table after
             ANALYZE TABLE) and the shard databases' bytes per row. Loaded inputs are moved out
             of events/ between chunks (else each `--import` start checks every older file).
  idle       the group with nothing to do: CPU % of one core over --idle-seconds, per process.

CPU: utime + stime from /proc/<pid>/stat for each process tree (gunicorn's workers included),
sampled at the start and the end of each window; the importer's from its rusage; the database
server's likewise. By default the server is a PRIVATE mariadbd started here with the machine
server's settings (read from its variables: 128 MiB buffer pool, flush at every commit, ...), so
its CPU is ours alone; `--private-big` gives it a 1 GiB buffer pool, `--shared` uses the
machine's server (its CPU then includes everyone else's queries).

`--quick` divides every size by 10 (about two minutes). `--count` counts the API's requests per
file (a counter wrapped around the API's WSGI app). `--profile DIR` also records py-spy profiles
of the splitter, worker 0, sender 0 and the API during the big and small runs, counts the API's
requests, turns on the private server's performance_schema and counts SQL statements per
process; its figures carry the profilers' overhead and are not a baseline.
Targets (issue 12) are printed beside each figure.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The only imports of the project itself: the generator and the test harness.
from app.ingest.generator import Rates, generate_files  # noqa: E402
from bench import fsgroup, machine, procstat  # noqa: E402
from tests import servers  # noqa: E402
from tests.pipeline_harness import Pipeline  # noqa: E402

SUFFIX = ".event-ingest.txt"
# Every injected case of the generator; shop-less returns (routed by the splitter's order index)
# at a small rate, like the other rare cases.
RATES = Rates(duplicate=0.01, later_duplicate=0.005, return_first=0.01, return_first_later=0.005,
              over_balance=0.005, malformed=0.002, unroutable_return=0.002, shopless_return=0.002)
# Default settings: empty values make app/config.py use its defaults (the harness's are fast).
DEFAULTS = {"POLL_MIN_SECONDS": "", "POLL_MAX_SECONDS": "", "LEASE_SECONDS": "", "REAP_INTERVAL": "",
            "HOLD_SECONDS": "", "HOLD_WALL_CAP_SECONDS": "", "MAX_ATTEMPTS": ""}
SHARDS = 2
# (folder, parties) from --barrier: each window starts when every party's bench reached it.
BARRIER: tuple[Path, int] | None = None

# The fixed floor table of issue 12: the contract's columns, an auto-increment key, a unique
# 32-character event key and indexes on shop_id and timestamp, nothing else.
REFERENCE = """CREATE TABLE reference_events (
    id          BIGINT NOT NULL AUTO_INCREMENT,
    event_type  TINYINT NOT NULL,
    shop_id     BIGINT NULL,
    user_id     BIGINT NULL,
    `timestamp` DATETIME(3) NOT NULL,
    shard       TINYINT NOT NULL,
    created_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    event_key   CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_event_key (event_key),
    KEY ix_shop (shop_id),
    KEY ix_timestamp (`timestamp`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""
# The 32-character key: MD5 of the pipeline's event key (as random as any hash key).
REFERENCE_EXPORT = "SELECT event_type, shop_id, user_id, `timestamp`, shard, MD5(event_key) INTO OUTFILE %s FROM events"
REFERENCE_LOAD = "LOAD DATA INFILE %s INTO TABLE reference_events (event_type, shop_id, user_id, `timestamp`, shard, " \
                 "event_key)"
OLD_COLUMNS = "event_type, shop_id, user_id, `timestamp`, shard, created_at, event_key, source_file, order_id, " \
              "good_id, qty, amount, payload"

TARGETS = {"ratio": 2.0, "big_us": 20.0, "small_rate": 30_000, "small_file_ms": 10.0, "latency_s": 1.0,
           "sustained_us": 40.0, "sustained_rate": 0.7, "state_bytes": 100.0, "idle_pct": 3.0}
GROUPS = ("api", "splitter", "workers", "senders", "ingest", "server")

# The machine server's settings a private server copies (read from its variables); these values
# stand in when it cannot be reached. Not query_cache_size: setting it at start turns the query
# cache on whatever query_cache_type says (the machine has the default size, cache off).
MIRRORED = {
    "innodb_buffer_pool_size": "134217728", "innodb_log_file_size": "100663296",
    "innodb_log_buffer_size": "16777216", "innodb_flush_log_at_trx_commit": "1", "innodb_flush_method": "O_DIRECT",
    "innodb_io_capacity": "200", "innodb_io_capacity_max": "2000", "innodb_doublewrite": "ON",
    "innodb_flush_neighbors": "1", "innodb_adaptive_hash_index": "OFF", "innodb_change_buffering": "none",
    "innodb_autoinc_lock_mode": "1", "innodb_purge_threads": "4", "innodb_read_io_threads": "4",
    "innodb_write_io_threads": "4", "innodb_max_dirty_pages_pct": "90.000000",
    "innodb_max_dirty_pages_pct_lwm": "0.000000", "innodb_adaptive_flushing": "ON", "innodb_use_native_aio": "ON",
    "innodb_file_per_table": "ON", "character_set_server": "utf8mb4", "collation_server": "utf8mb4_general_ci",
    "sql_mode": "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION",
    "tx_isolation": "REPEATABLE-READ", "query_cache_type": "OFF",
    "max_allowed_packet": "16777216", "tmp_table_size": "16777216", "max_heap_table_size": "16777216",
    "table_open_cache": "2000", "key_buffer_size": "134217728", "sort_buffer_size": "2097152",
    "join_buffer_size": "262144", "thread_cache_size": "151", "thread_handling": "one-thread-per-connection",
    "performance_schema": "OFF", "skip_name_resolve": "ON",
}
OPTION_NAMES = {"tx_isolation": "transaction-isolation"}
BIG_POOL = {"innodb_buffer_pool_size": "1073741824", "innodb_log_file_size": "536870912"}


def log(text: str = "") -> None:
    print(text, flush=True)


# -- the database server ---------------------------------------------------------------------------

class Server:
    """The server every database of the run lives on, and its process for CPU figures."""

    def __init__(self, mode: str, performance_schema: bool = False):
        self.mode = mode
        self.private: servers.MariaDB | None = None
        self.settings: dict[str, str] = {}
        self.note = ""
        if mode == "shared":
            self.host, self.port = servers.MYSQL_HOST, servers.MYSQL_PORT
            self.pid = self._shared_pid()
            self.settings = self._variables(self.host, self.port)
            self.note = "the machine's shared server: its CPU includes every other user's queries"
            return
        wanted = self._machine_settings()
        if mode == "private-big":
            wanted.update(BIG_POOL)
        if performance_schema:
            wanted["performance_schema"] = "ON"
        options = [f"--{OPTION_NAMES.get(k, k).replace('_', '-')}={v}" for k, v in wanted.items()]
        if performance_schema:
            from bench import profiling
            options += profiling.HISTORY_OPTIONS
        self.private = servers.MariaDB(Path(tempfile.mkdtemp(prefix="bench-pipeline-db-")), options=options)
        self.private.install().start()
        self.host, self.port, self.pid = "127.0.0.1", self.private.port, self.private.proc.pid
        self.settings = self._variables(self.host, self.port)
        differ = {k: (v, self.settings.get(k)) for k, v in wanted.items() if self.settings.get(k) != v}
        if differ:
            log(f"warning: the private server's settings differ from those asked for: {differ}")

    def _machine_settings(self) -> dict[str, str]:
        try:
            found = self._variables(servers.MYSQL_HOST, servers.MYSQL_PORT)
        except Exception as exc:  # the machine's server is down: use the recorded defaults
            self.note = f"machine's server unreachable ({exc}): its recorded settings used"
            return dict(MIRRORED)
        self.note = f"settings copied from the machine's server at {servers.MYSQL_HOST}:{servers.MYSQL_PORT}"
        return {k: found.get(k, v) for k, v in MIRRORED.items()}

    @staticmethod
    def _variables(host: str, port: int) -> dict[str, str]:
        conn = servers.admin_connect(host, port)
        try:
            with conn.cursor() as cur:
                names = ", ".join(f"'{n}'" for n in MIRRORED)
                cur.execute(f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({names})")
                return {k: str(v) for k, v in cur.fetchall()}
        finally:
            conn.close()

    def _shared_pid(self) -> int | None:
        try:
            conn = servers.admin_connect(servers.MYSQL_HOST, servers.MYSQL_PORT)
            with conn.cursor() as cur:
                cur.execute("SELECT @@pid_file")
                pid_file = cur.fetchone()[0]
            conn.close()
            return int(Path(pid_file).read_text().split()[0])
        except Exception as exc:
            log(f"warning: no pid for the shared server ({exc}); its CPU is not measured")
            return None

    def describe(self) -> str:
        pool = int(self.settings.get("innodb_buffer_pool_size", 0)) >> 20
        flush = self.settings.get("innodb_flush_log_at_trx_commit")
        kind = {"private": "private mariadbd", "private-big": "private mariadbd (1 GiB pool)",
                "shared": "shared mariadbd"}[self.mode]
        return (f"{kind} on port {self.port}: innodb_buffer_pool_size {pool} MiB, flush_log_at_trx_commit {flush}, "
                f"performance_schema {self.settings.get('performance_schema')}; {self.note}")

    def cpu(self) -> float:
        return procstat.cpu_seconds(self.pid) if self.pid else 0.0

    def rss(self) -> float:
        return max(procstat.peak_rss_mib(self.pid).values(), default=0.0) if self.pid else 0.0

    def connect(self, database: str | None = None):
        return servers.admin_connect(self.host, self.port, database)

    def url(self, database: str):
        return servers.server_url(database, self.host, self.port)

    def fresh(self, prefix: str):
        name = servers.unique_name(prefix)
        self.execute(f"CREATE DATABASE `{name}`")
        return self.url(name)

    def drop(self, *urls) -> None:
        for url in urls:
            self.execute(f"DROP DATABASE IF EXISTS `{url.database}`")

    def execute(self, sql: str, args=(), database: str | None = None) -> list[tuple]:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        finally:
            conn.close()

    def status(self, like: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.execute("SHOW GLOBAL STATUS LIKE %s", (like,)) if v.lstrip("-").isdigit()}

    def settle(self, limit: float) -> float:
        """Wait until the buffer pool's dirty pages are written (at most `limit` seconds), so that
        a window does not pay for the writes of the one before. A private server is told to
        flush at once; the shared one is only waited for."""
        started = time.monotonic()
        if self.private:
            old = self.execute("SELECT @@innodb_max_dirty_pages_pct")[0][0]
            self.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
        try:
            while time.monotonic() - started < limit:
                pages = self.status("Innodb_buffer_pool_pages_%")
                dirty = pages.get("Innodb_buffer_pool_pages_dirty", 0)
                if dirty <= max(64, pages.get("Innodb_buffer_pool_pages_total", 0) // 100):
                    break
                time.sleep(0.5)
        finally:
            if self.private:
                self.execute(f"SET GLOBAL innodb_max_dirty_pages_pct = {float(old)}")
        return time.monotonic() - started

    def stop(self) -> None:
        if self.private:
            self.private.stop()
            shutil.rmtree(self.private.datadir, ignore_errors=True)


# -- inputs ---------------------------------------------------------------------------------------

def rates_tag() -> str:
    return hashlib.sha1(repr(RATES).encode()).hexdigest()[:8]


def source_files(kind: str, events: int, per_file: int, seed: int) -> tuple[list[Path], int]:
    """Generated files (cached under var/bench/, one continuous generator) and their line count."""
    files = -(-events // per_file)
    folder = ROOT / "var" / "bench" / f"pipeline-{kind}-{files}x{per_file}-s{seed}-{rates_tag()}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.monotonic()
        generate_files(folder, files, per_file, seed=seed, rates=RATES, start="20260301000000")
        lines = sum(p.read_bytes().count(b"\n") for p in folder.glob(f"*{SUFFIX}"))
        done.write_text(json.dumps({"files": files, "lines": lines}))
        log(f"  generated {lines:,} events in {files} files of {per_file:,} into {folder.relative_to(ROOT)} "
            f"({time.monotonic() - started:.1f}s)")
    return sorted(folder.glob(f"*{SUFFIX}")), json.loads(done.read_text())["lines"]


def lines_of(paths: list[Path]) -> int:
    return sum(p.read_bytes().count(b"\n") for p in paths)


def name_of(path: Path) -> str:
    return path.name[: -len(SUFFIX)]


# -- a running pipeline and its meters ---------------------------------------------------------------

def group_of(process: str) -> str:
    for prefix, group in (("shard-splitter", "splitter"), ("shard-worker", "workers"), ("mysql-sender", "senders")):
        if process.startswith(prefix):
            return group
    return process


@dataclass
class Run:
    """One workload's pipeline: fresh databases, the real processes, and what measures them."""

    server: Server
    pipe: Pipeline
    counts_dir: Path | None = None
    registered: int = 0          # events registered so far (the history the state holds)
    bench_statements: int = 0    # the bench's own statements (its polls), to leave out of Com_*

    def processes(self) -> dict[str, int]:
        pids = {name: d.proc.pid for name, d in self.pipe.daemons.items()}
        pids["api"] = self.pipe.api.process.proc.pid
        return pids

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process (tree), the server's and the importer's (reaped children)."""
        sample = {name: procstat.cpu_seconds(pid) for name, pid in self.processes().items()}
        sample["server"] = self.server.cpu()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Children reaped so far are the importers (the daemons are reaped only at the end).
        sample["ingest"] = usage.ru_utime + usage.ru_stime
        return sample

    def com(self) -> Counter:
        return Counter({k: v for k, v in self.server.status("Com\\_%").items()})

    def peak_rss(self) -> dict[str, float]:
        peaks = {}
        for name, pid in self.processes().items():
            tree = procstat.peak_rss_mib(pid)
            if name == "api":
                peaks["api master"] = tree.pop(pid, 0.0)
                peaks["api worker (max)"] = max(tree.values(), default=0.0)
            else:
                peaks[name] = tree.get(pid, 0.0)
        peaks["server"] = self.server.rss()
        return peaks

    def check_alive(self) -> None:
        for name, d in self.pipe.daemons.items():
            if d.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {d.proc.returncode}:\n{d.output()[-3000:]}")
        if self.pipe.api.process.proc.poll() is not None:
            raise RuntimeError(f"pipeline-apid exited:\n{self.pipe.api.process.output()[-3000:]}")

    def wait_loaded(self, names: list[str], timeout: float = 3600.0) -> None:
        """Poll the tracking table (contract columns, one cheap query) until every task of `names`
        is loaded; fail loudly if a task failed or a process died."""
        conn = self.server.connect(self.pipe.pipeline_db.database)
        marks = ", ".join(["%s"] * len(names))
        sql = (f"SELECT COUNT(*), SUM(mysql_sender_status = 'done'), SUM(shard_splitter_status = 'failed' OR "
               f"shard_worker_status = 'failed' OR mysql_sender_status = 'failed') FROM pipeline_tracking "
               f"WHERE filename IN ({marks})")
        deadline = time.monotonic() + timeout
        try:
            with conn.cursor() as cur:
                while True:
                    cur.execute(sql, names)
                    self.bench_statements += 1
                    total, done, failed = (int(x or 0) for x in cur.fetchone())
                    if failed:
                        raise RuntimeError(f"{failed} task(s) failed:\n{self.pipe.logs()}")
                    if total == SHARDS * len(names) and done == total:
                        return
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"not loaded after {timeout}s: {done}/{SHARDS * len(names)}")
                    self.check_alive()
                    time.sleep(0.2)
        finally:
            conn.close()

    def tracked_wall(self, names: list[str]) -> float:
        """First registration -> last mysql-sender done, from the tracking table's own clock."""
        marks = ", ".join(["%s"] * len(names))
        (seconds,), = self.server.execute(
            f"SELECT TIMESTAMPDIFF(MICROSECOND, MIN(created_at), MAX(updated_at)) / 1e6 FROM pipeline_tracking "
            f"WHERE filename IN ({marks})", names, self.pipe.pipeline_db.database)
        return float(seconds)

    def window(self, files: list[Path], settle: float = 0.0) -> dict:
        """Import `files` and wait until they are loaded: the figures of that window."""
        names = [name_of(p) for p in files]
        events = lines_of(files)
        if settle:
            self.server.settle(settle)
        api_before = apicount_read(self.counts_dir)
        if BARRIER:
            machine.barrier(*BARRIER)
        meter = machine.Window().start()
        com_before, cpu_before, own_before = self.com(), self.cpu(), self.bench_statements
        started = time.monotonic()
        self.pipe.import_files(files, timeout=3600)
        self.wait_loaded(names)
        seconds = time.monotonic() - started
        cpu_after = self.cpu()
        com = self.com() - com_before
        # Leave out the bench's own statements: its polls and the status query that ends the window.
        com["Com_select"] -= self.bench_statements - own_before
        com["Com_show_status"] -= 1
        self.registered += events
        wall = self.tracked_wall(names)
        by_process = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
        cpu = {g: 0.0 for g in GROUPS}
        for name, value in by_process.items():
            cpu[group_of(name)] += value
        total = sum(cpu.values())
        beside = meter.stop(total)
        result = {
            "events": events, "files": len(files), "wall_s": round(wall, 3), "window_s": round(seconds, 3),
            "events_per_s": round(events / wall), "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
            "cpu_s_total": round(total, 3), "cpu_s_by_process": {k: round(v, 3) for k, v in by_process.items()},
            "us_per_event": {k: round(1e6 * v / events, 2) for k, v in cpu.items()},
            "us_per_event_total": round(1e6 * total / events, 2),
            "ms_per_file_total": round(1e3 * total / len(files), 2),
            "overlap": round(total / seconds, 2),
            "sql_per_file": {k.removeprefix("Com_"): round(v / len(files), 1) for k, v in com.most_common() if v > 0},
            "sql_per_file_total": round(sum(v for v in com.values() if v > 0) / len(files), 1),
            "machine": beside,
        }
        if self.counts_dir:
            api = apicount_read(self.counts_dir)
            api.subtract(api_before)
            result["api_requests_per_file"] = {k: round(v / len(files), 2) for k, v in api.most_common() if v > 0}
            result["api_requests_per_file_total"] = round(sum(v for v in api.values() if v > 0) / len(files), 2)
        return result

    def state_bytes(self) -> dict:
        """Bytes the pipeline database and the shard databases hold (data + index, after ANALYZE)."""
        pipeline = self._table_bytes(self.pipe.pipeline_db.database)
        shards = [self._table_bytes(url.database) for url in self.pipe.shard_dbs]
        rows = sum(self.server.execute("SELECT COUNT(*) FROM events", (), url.database)[0][0]
                   for url in self.pipe.shard_dbs)
        total = sum(pipeline.values())
        shard_total = sum(sum(s.values()) for s in shards)
        return {"pipeline_bytes": total, "pipeline_bytes_per_event": round(total / max(1, self.registered), 1),
                "pipeline_tables": dict(sorted(pipeline.items(), key=lambda kv: -kv[1])),
                "pipeline_bytes_per_event_by_table": {
                    t: round(b / max(1, self.registered), 1) for t, b in sorted(pipeline.items(), key=lambda kv: -kv[1])},
                "pipeline_index_bytes_per_event": {
                    f"{t}.{i}": round(b / max(1, self.registered), 2)
                    for (t, i), b in self._index_bytes(self.pipe.pipeline_db.database).items()},
                "shard_rows": rows, "shard_bytes": shard_total,
                "shard_bytes_per_row": round(shard_total / max(1, rows), 1)}

    def _index_bytes(self, database: str) -> dict[tuple[str, str], int]:
        """Each index's pages (InnoDB's persistent statistics, after ANALYZE), largest first."""
        return {(t, i): int(n) * 16384 for t, i, n in self.server.execute(
            "SELECT table_name, index_name, stat_value FROM mysql.innodb_index_stats WHERE database_name = %s"
            " AND stat_name = 'size' ORDER BY stat_value DESC", (database,))}

    def _table_bytes(self, database: str) -> dict[str, int]:
        tables = [t for (t,) in self.server.execute(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE'",
            (database,))]
        for t in tables:
            self.server.execute(f"ANALYZE TABLE `{database}`.`{t}`")
        return {t: int(n) for t, n in self.server.execute(
            "SELECT TABLE_NAME, DATA_LENGTH + INDEX_LENGTH FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE'", (database,))}


def machine_line(m: dict) -> str:
    """The machine beside the window (bench/machine.py): a run is comparable with another only if
    these are alike."""
    return (f"machine: probe {m['probe_ms']} ms/piece (min {m['probe_min_ms']}, {m['probe_n']} pieces), other "
            f"processes {m['others_s']}s CPU = {m['others_cores']} cores, interrupts {m['irq_s']}s, steal "
            f"{m['steal_s']}s, load average {m['load_average']}")


def apicount_read(folder: Path | None) -> Counter:
    if folder is None:
        return Counter()
    from bench import apicount
    return Counter(apicount.read_counts(folder))


@contextmanager
def running(server: Server, work: Path, name: str, count_requests: bool = False):
    """Fresh databases and a started pipeline for one workload; everything dropped after. Its
    folder gets a random name below `work` (flagged by bench/fsgroup.py), so the file system puts
    it in a block group of its own, away from the inodes the previous workload just deleted."""
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    pipeline_db = server.fresh(f"bench_{name}")
    shard_dbs = [server.fresh(f"bench_{name}_s{n}") for n in range(SHARDS)]
    env = dict(DEFAULTS)
    counts_dir = None
    if count_requests:
        counts_dir = root / "api-counts"
        counts_dir.mkdir(parents=True)
        env["BENCH_API_COUNTS"] = str(counts_dir)
    pipe = Pipeline(root, pipeline_db, shard_dbs, extra_env=env,
                    api_module="bench.apicount" if count_requests else "app.apid")
    run = Run(server, pipe, counts_dir)
    try:
        pipe.start()
        wait_started(run)
        yield run
    finally:
        pipe.stop()
        server.drop(pipeline_db, *shard_dbs)


def wait_started(run: Run, quiet: float = 0.15) -> None:
    """Until every daemon has done its start-up (schemas, first polls): CPU nearly still."""
    deadline = time.monotonic() + 60
    time.sleep(1.0)
    last = sum(run.cpu().values())
    while time.monotonic() < deadline:
        time.sleep(1.0)
        run.check_alive()
        now = sum(run.cpu().values())
        if now - last < quiet:
            return
        last = now


# -- the workloads ------------------------------------------------------------------------------------

@dataclass
class Sizes:
    big_events: int = 1_000_000
    big_file: int = 10_000
    small_events: int = 200_000
    small_file: int = 500
    latency_files: int = 10
    latency_file: int = 100
    history_events: int = 2_000_000
    sustained_events: int = 200_000
    sustained_file: int = 10_000
    idle_seconds: float = 30.0
    settle_seconds: float = 30.0

    def quick(self) -> "Sizes":
        return Sizes(self.big_events // 10, self.big_file, self.small_events // 10, self.small_file,
                     max(3, self.latency_files // 2), self.latency_file, self.history_events // 10,
                     self.sustained_events // 10, self.sustained_file, max(5.0, self.idle_seconds / 3),
                     min(5.0, self.settle_seconds))


@dataclass
class Bench:
    server: Server
    sizes: Sizes
    work: Path
    profile_dir: Path | None = None
    count: bool = False          # API requests per file (the counting wrapper around the API)
    server_threads: bool = False  # the server's CPU by thread in each window (--profile does)
    results: dict = field(default_factory=dict)

    def measured(self, run: Run, files: list[Path], label: str) -> dict:
        """A window, profiled with --profile (big and small files only)."""
        spies = self._start_profile(run, label) if self.profile_dir else None
        sampler = None
        if (self.server_threads or self.profile_dir) and self.server.pid:
            sampler = self._thread_sampler(run).start()
        result = run.window(files)
        if sampler is not None:
            from bench import server_threads
            result["server_threads_s"] = sampler.stop()
            result["server_threads_us_per_event"] = server_threads.summary(result["server_threads_s"],
                                                                           result["events"])
        if spies is not None:
            result["profile"] = self._stop_profile(run, spies, result)
        return result

    def big(self) -> dict:
        s = self.sizes
        files, _ = source_files("big", s.big_events, s.big_file, seed=1)
        log(f"\n== big: {len(files)} files of {s.big_file:,} events")
        self.server.settle(s.settle_seconds)
        exports = []
        with running(self.server, self.work, "big", self.count) as run:
            result = self.measured(run, files, "big")
            result["peak_rss_mib"] = {k: round(v, 1) for k, v in run.peak_rss().items()}
            run.pipe.stop()
            result["state"] = run.state_bytes()
            for n, url in enumerate(run.pipe.shard_dbs):
                ref, old = self.work / f"reference-{n}.tsv", self.work / f"old-{n}.tsv"
                self.server.execute(REFERENCE_EXPORT, (str(ref),), url.database)
                self.server.execute(f"SELECT {OLD_COLUMNS} INTO OUTFILE %s FROM events", (str(old),), url.database)
                exports.append((ref, old, url.database))
            if self.profile_dir:
                result["per_request"] = self._per_request_statements(run)
            old_schema = self.server.execute("SHOW CREATE TABLE events", (), exports[0][2])[0][1]
        self.server.settle(s.settle_seconds)
        result["floor"] = self._floor(exports, old_schema)
        floor = result["floor"]
        floor["ratio"] = round(result["wall_s"] / floor["reference_s"], 2)
        floor["old_ratio"] = round(result["wall_s"] / floor["old_s"], 2)
        # Steadier on a busy machine than the wall ratio: all our CPU per event against the
        # server's CPU per row of the floor.
        floor["cpu_ratio"] = round(result["us_per_event_total"] / floor["reference_server_us_per_row"], 1)
        for ref, old, _ in exports:
            ref.unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        self._print_window("big", result)
        f = result["floor"]
        log(f"  floor (reference table, {f['rows']:,} rows): {f['reference_s']:.2f}s = {f['reference_rows_per_s']:,} "
            f"rows/s, server {f['reference_server_us_per_row']} us/row; pipeline / floor = {f['ratio']:.2f}x "
            f"(target <= {TARGETS['ratio']}x); by CPU {f['cpu_ratio']}x")
        log(f"  old floor (the project's events table): {f['old_s']:.2f}s = {f['old_rows_per_s']:,} rows/s; "
            f"pipeline / old floor = {f['old_ratio']:.2f}x")
        return result

    def _floor(self, exports, old_schema: str) -> dict:
        """The server's own LOAD DATA INFILE of the accepted rows, each shard into a fresh table."""
        out = {"rows": 0, "reference_s": 0.0, "old_s": 0.0, "reference_server_s": 0.0, "old_server_s": 0.0}
        for kind in ("reference", "old"):
            for ref, old, _ in exports:
                self.server.settle(self.sizes.settle_seconds)
                url = self.server.fresh("bench_floor")
                try:
                    conn = self.server.connect(url.database)
                    with conn.cursor() as cur:
                        cur.execute(REFERENCE if kind == "reference" else old_schema)
                        cpu, started = self.server.cpu(), time.monotonic()
                        if kind == "reference":
                            cur.execute(REFERENCE_LOAD, (str(ref),))
                        else:
                            cur.execute(f"LOAD DATA INFILE %s INTO TABLE events ({OLD_COLUMNS})", (str(old),))
                        out[f"{kind}_s"] += time.monotonic() - started
                        out[f"{kind}_server_s"] += self.server.cpu() - cpu
                        if kind == "reference":
                            out["rows"] += cur.rowcount
                    conn.close()
                finally:
                    self.server.drop(url)
        for kind in ("reference", "old"):
            out[f"{kind}_rows_per_s"] = round(out["rows"] / out[f"{kind}_s"])
            out[f"{kind}_server_us_per_row"] = round(1e6 * out[f"{kind}_server_s"] / out["rows"], 2)
            out[f"{kind}_s"] = round(out[f"{kind}_s"], 3)
            out[f"{kind}_server_s"] = round(out[f"{kind}_server_s"], 3)
        return out

    def small(self) -> dict:
        s = self.sizes
        files, _ = source_files("small", s.small_events, s.small_file, seed=2)
        log(f"\n== small: {len(files)} files of {s.small_file:,} events")
        self.server.settle(s.settle_seconds)
        with running(self.server, self.work, "small", self.count) as run:
            result = self.measured(run, files, "small")
            result["peak_rss_mib"] = {k: round(v, 1) for k, v in run.peak_rss().items()}
            run.pipe.stop()
            result["state"] = run.state_bytes()
        self._print_window("small", result)
        # The same number of events in big files, for the cost per event at the same history depth.
        ref_files, _ = source_files("small-ref", s.small_events, s.big_file, seed=2)
        self.server.settle(s.settle_seconds)
        with running(self.server, self.work, "small_ref", self.count) as run:
            ref = run.window(ref_files)
        log(f"  the same in {ref['files']} files of {s.big_file:,}: {ref['events_per_s']:,} events/s, "
            f"{ref['us_per_event_total']} us/event; {machine_line(ref['machine'])}")
        result["big_files_run"] = {k: ref[k] for k in ("events", "files", "events_per_s", "cpu_s", "us_per_event",
                                                       "us_per_event_total", "wall_s", "machine")}
        result["split"] = split_per_file(ref, result)
        sp = result["split"]
        log("  split, per group (cpu = events x e + files x f, from the two runs): " +
            ", ".join(f"{g} {sp[g]['us_per_event']} us/event + {sp[g]['ms_per_file']} ms/file" for g in GROUPS) +
            f"; total {sp['total']['us_per_event']} us/event + {sp['total']['ms_per_file']} ms/file "
            f"(target <= {TARGETS['small_file_ms']} ms per file)")
        return result

    def latency(self) -> dict:
        s = self.sizes
        files, _ = source_files("latency", s.latency_files * s.latency_file, s.latency_file, seed=4)
        log(f"\n== latency: {len(files)} files of {s.latency_file} events, one at a time")
        self.server.settle(s.settle_seconds)
        seconds = []
        with running(self.server, self.work, "latency") as run:
            for path in files:
                time.sleep(1.0)   # idle: every poller has backed off to its slowest interval
                run.pipe.import_files([path])
                run.wait_loaded([name_of(path)], timeout=120)
                seconds.append(round(run.tracked_wall([name_of(path)]), 3))
        result = {"files": len(files), "events_per_file": s.latency_file, "seconds": seconds,
                  "median_s": round(statistics.median(seconds), 3), "max_s": max(seconds)}
        log(f"  registration -> loaded: median {result['median_s']:.3f}s, max {result['max_s']:.3f}s "
            f"(target < {TARGETS['latency_s']} s); each: {', '.join(f'{x:.2f}' for x in seconds)}")
        return result

    def sustained(self) -> dict:
        s = self.sizes
        per_chunk = -(-s.sustained_events // s.sustained_file)
        chunks = -(-s.history_events // s.sustained_events) + 1
        files, _ = source_files("sustained", chunks * per_chunk * s.sustained_file, s.sustained_file, seed=3)
        log(f"\n== sustained: {chunks - 1} chunks of {per_chunk} files x {s.sustained_file:,} events of history, "
            f"then one measured")
        self.server.settle(s.settle_seconds)
        windows = []
        with running(self.server, self.work, "sustained") as run:
            archive = run.pipe.root / "archived"
            archive.mkdir()
            for c in range(chunks):
                chunk = files[c * per_chunk:(c + 1) * per_chunk]
                w = run.window(chunk)
                windows.append(w)
                log(f"  chunk {c + 1:2d}/{chunks}: history {run.registered - w['events']:>9,} -> "
                    f"{w['events_per_s']:>7,} events/s, {w['us_per_event_total']:6.1f} us/event "
                    f"(server {w['us_per_event']['server']:.1f})")
                # The loaded inputs leave events/, as an operator would archive them: else every
                # later `--import` start asks the API about each older file.
                for p in chunk:
                    shutil.move(str(run.pipe.shared / "events" / p.name), archive / p.name)
            peak = run.peak_rss()
            run.pipe.stop()
            history = run.registered - windows[-1]["events"]
            state = run.state_bytes()
        fresh, last = windows[0], windows[-1]
        result = {**last, "history_events": history, "fresh": fresh,
                  "chunks": [{k: w[k] for k in ("events", "events_per_s", "us_per_event_total", "us_per_event")}
                             for w in windows],
                  "rate_vs_fresh": round(last["events_per_s"] / fresh["events_per_s"], 2),
                  "peak_rss_mib": {k: round(v, 1) for k, v in peak.items()}, "state": state}
        self._print_window("sustained (measured chunk)", result)
        log(f"  after {history:,} events of history: {result['rate_vs_fresh']:.2f}x the fresh rate "
            f"({fresh['events_per_s']:,} events/s, {fresh['us_per_event_total']} us/event) "
            f"(target >= {TARGETS['sustained_rate']}x, <= {TARGETS['sustained_us']} us/event)")
        return result

    def idle(self) -> dict:
        s = self.sizes
        log(f"\n== idle: the whole group with nothing to do, {s.idle_seconds:.0f}s")
        self.server.settle(s.settle_seconds)
        with running(self.server, self.work, "idle") as run:
            files, _ = source_files("latency", s.latency_files * s.latency_file, s.latency_file, seed=4)
            run.pipe.import_files(files[:2])       # some work done first: the state an idle pipeline has
            run.wait_loaded([name_of(p) for p in files[:2]])
            time.sleep(3.0)
            before, started = run.cpu(), time.monotonic()
            time.sleep(s.idle_seconds)
            after, seconds = run.cpu(), time.monotonic() - started
        by_process = {k: round(100 * (after[k] - before[k]) / seconds, 2) for k in after if k != "ingest"}
        group = round(sum(v for k, v in by_process.items() if k != "server"), 2)
        result = {"seconds": round(seconds, 1), "pct_by_process": by_process, "group_pct": group,
                  "server_pct": by_process["server"], "group_and_server_pct": round(group + by_process["server"], 2)}
        log(f"  group {group:.2f}% of one core (target <= {TARGETS['idle_pct']}%), server {by_process['server']:.2f}% "
            f"more; " + ", ".join(f"{k} {v:.2f}%" for k, v in by_process.items()))
        return result

    # -- printing -------------------------------------------------------------------------------------

    def _print_window(self, name: str, r: dict) -> None:
        log(f"  {name}: {r['events']:,} events in {r['files']} files, {r['wall_s']:.2f}s first registration -> "
            f"last load = {r['events_per_s']:,} events/s; CPU {r['cpu_s_total']:.1f}s = {r['us_per_event_total']} "
            f"us/event, {r['ms_per_file_total']} ms/file; overlap {r['overlap']} cores")
        log("    us/event by group: " + ", ".join(f"{g} {r['us_per_event'][g]}" for g in GROUPS))
        log("    " + machine_line(r["machine"]))
        log("    peak RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mib"].items()))
        st = r["state"]
        log(f"    state: pipeline db {st['pipeline_bytes'] / 2**20:.1f} MiB = {st['pipeline_bytes_per_event']} B/event "
            f"({', '.join(f'{t} {b / 2**20:.1f}' for t, b in list(st['pipeline_tables'].items())[:6])} MiB); "
            f"shards {st['shard_bytes_per_row']} B/row")
        log("    state B/event by table: " + ", ".join(
            f"{t} {b}" for t, b in st.get("pipeline_bytes_per_event_by_table", {}).items() if b >= 0.05))
        log("    state B/event by index: " + ", ".join(
            f"{t} {b}" for t, b in st.get("pipeline_index_bytes_per_event", {}).items() if b >= 0.05))
        log(f"    SQL statements per file: {r['sql_per_file_total']} (" +
            ", ".join(f"{k} {v}" for k, v in list(r["sql_per_file"].items())[:8]) + ")")
        if "server_threads_s" in r:
            log("    server CPU by thread, us/event (bench/server_threads.py): " + "; ".join(
                f"{k} {v}" for k, v in r["server_threads_us_per_event"].items()))
            log("      by connection and database: " + "; ".join(
                f"{k} {round(1e6 * v / r['events'], 2)}" for k, v in r["server_threads_s"].items()))
        if "api_requests_per_file" in r:
            log(f"    API requests per file: {r['api_requests_per_file_total']} (" +
                ", ".join(f"{k} {v}" for k, v in r["api_requests_per_file"].items()) + ")")

    # -- profiling --------------------------------------------------------------------------------------

    def _start_profile(self, run: Run, label: str):
        from bench import profiling
        conn = self.server.connect()
        with conn.cursor() as cur:
            profiling.reset(cur)
        conn.close()
        pids = run.processes()
        targets = {"splitter": (pids["shard-splitter-r1"], False), "worker-0": (pids["shard-worker-0-r1"], False),
                   "sender-0": (pids["mysql-sender-0-r1"], False), "api": (pids["api"], True)}
        return {name: profiling.Spy(name, pid, self.profile_dir / f"{label}-{name}.txt", sub)
                for name, (pid, sub) in targets.items()}

    def _thread_sampler(self, run: Run):
        """The server's CPU by thread: connections by the stage that opened them, InnoDB's own
        threads by name (bench/server_threads.py)."""
        from bench import server_threads
        owners: dict[int, str] = {}

        def owner_of(pid: int) -> str:
            if pid not in owners:
                for name, root in run.processes().items():
                    for p in procstat.tree(root):
                        owners[p] = group_of(name)
                owners.setdefault(os.getpid(), "bench")
            return owners.get(pid, "other")

        roles = {run.pipe.pipeline_db.database: "pipeline",
                 **{url.database: f"shard{n}" for n, url in enumerate(run.pipe.shard_dbs)}}

        def counted(n: int) -> None:     # its statements are the bench's, left out of Com_*
            run.bench_statements += n

        return server_threads.ThreadSampler(self.server.pid, self.server.connect, owner_of, roles, counted=counted)

    def _stop_profile(self, run: Run, spies, result: dict) -> dict:
        from bench import profiling
        for spy in spies.values():
            spy.stop()
        out = {"py_spy": {name: profiling.summarise(spy.out) for name, spy in spies.items()}}
        roles = {run.pipe.pipeline_db.database: "pipeline",
                 **{url.database: f"shard{n}" for n, url in enumerate(run.pipe.shard_dbs)}}
        conn = self.server.connect()
        with conn.cursor() as cur:
            out["statements"] = profiling.top_statements(cur)
            out["tables"] = profiling.table_io(cur)
            out["digests"] = profiling.digests(cur)
            for row in (*out["statements"], *out["tables"]):
                row["schema"] = roles.get(row["schema"], row["schema"])
            by_pid = profiling.statements_by_pid(cur)
            total = profiling.statements_total(cur)
        conn.close()
        owner = {}
        for name, pid in run.processes().items():
            for p in procstat.tree(pid):
                owner[p] = group_of(name)
        owner[os.getpid()] = "bench"
        for row in out["digests"]:
            row["schema"] = roles.get(row["schema"], row["schema"])
            stages: Counter = Counter()
            for pid, n in row.pop("pids").items():
                stages[owner.get(pid, "other")] += n
            row["stages"] = dict(stages)
        per_group: dict[str, Counter] = {}
        for pid, kinds in by_pid.items():
            per_group.setdefault(owner.get(pid, "other (importer, closed connections)"), Counter()).update(kinds)
        attributed = sum(sum(c.values()) for c in per_group.values())
        files = result["files"]
        out["statements_per_file"] = {
            g: {"total": round(sum(c.values()) / files, 1), **{k: round(v / files, 1) for k, v in c.most_common(6)}}
            for g, c in sorted(per_group.items())}
        out["statements_per_file"]["unattributed (connections closed)"] = {
            "total": round((sum(total.values()) - attributed) / files, 1)}
        return out

    def _per_request_statements(self, run: Run) -> dict:
        """SQL statements the API runs for one request of each kind, on its own (daemons stopped)."""
        from bench import profiling
        from app.client import PipelineClient
        run.pipe.api.process.stop()      # restart it alone: the daemons are gone, so are their requests
        run.pipe.api = servers.start_api(run.pipe.env, run.pipe.root / "logs", run.pipe.api_module)
        api_pids = set(procstat.tree(run.pipe.api.process.proc.pid))
        client = PipelineClient(run.pipe.api.base, max_wait=10)
        conn = self.server.connect()

        def statements() -> int:
            with conn.cursor() as cur:
                return sum(sum(c.values()) for pid, c in profiling.statements_by_pid(cur).items() if pid in api_pids)

        samples: dict[str, list[int]] = {}

        def measure(kind: str, call) -> None:
            before = statements()
            call()
            samples.setdefault(kind, []).append(statements() - before)

        worker = "bench/requests"
        for i in range(10):
            name = f"bench{i:05d}"
            measure("register", lambda: client.register(name, list(range(SHARDS))))
            measure("event-ingest done", lambda: client.ingest_done(name, events=100, worker="bench"))
            for stage in ("shard-splitter", "shard-worker", "mysql-sender"):
                # As the daemons claim: the splitter every shard at once, the others their own shard.
                for shard, limit in [(None, 4)] if stage == "shard-splitter" else [(n, 1) for n in range(SHARDS)]:
                    got = []
                    measure(f"{stage} claim", lambda: got.extend(client.claim(stage, worker, limit, shard)))
                    for t in got:
                        measure(f"{stage} heartbeat", lambda: client.heartbeat(stage, t.filename, t.shard, worker))
                        measure(f"{stage} done", lambda: client.done(stage, t.filename, t.shard, worker, events=100,
                                                                     stats={"bench": 1}))
                    measure(f"{stage} claim (nothing ready)", lambda: client.claim(stage, worker, limit, shard))
        conn.close()
        return {kind: {"median": statistics.median(v), "min": min(v), "max": max(v)} for kind, v in samples.items()}


def split_per_file(big: dict, small: dict) -> dict:
    """Per group: cpu = events x e + files x f, solved from two runs with different file sizes."""
    eb, fb, es, fs = big["events"], big["files"], small["events"], small["files"]
    det = es * fb - eb * fs
    split = {}
    for g in GROUPS:
        cb, cs = big["cpu_s"][g], small["cpu_s"][g]
        e = (cs * fb - cb * fs) / det      # seconds per event
        f = (es * cb - eb * cs) / det      # seconds per file
        split[g] = {"us_per_event": round(1e6 * e, 2), "ms_per_file": round(1e3 * f, 2)}
    split["total"] = {k: round(sum(split[g][k] for g in GROUPS), 2) for k in ("us_per_event", "ms_per_file")}
    return split


def print_table(results: dict) -> None:
    log("\n== summary (targets of issue 12 in brackets)")
    rows = []
    if "big" in results:
        r = results["big"]
        f = r["floor"]
        rows.append(("big", f"{r['events_per_s']:,}/s", f"{f['ratio']:.2f}x [<=2] (old floor {f['old_ratio']:.2f}x)",
                     f"{r['us_per_event_total']} [<=20]", f"{r['ms_per_file_total']}", f"{r['overlap']}",
                     f"{r['state']['pipeline_bytes_per_event']}"))
    if "small" in results:
        r = results["small"]
        per_file = r["split"]["total"]["ms_per_file"]
        rows.append(("small", f"{r['events_per_s']:,}/s [>=30k]", "",
                     f"{r['us_per_event_total']}", f"{r['ms_per_file_total']} (beyond per-event: {per_file} [<=10])",
                     f"{r['overlap']}", f"{r['state']['pipeline_bytes_per_event']}"))
    if "sustained" in results:
        r = results["sustained"]
        rows.append(("sustained", f"{r['events_per_s']:,}/s = {r['rate_vs_fresh']}x fresh [>=0.7]", "",
                     f"{r['us_per_event_total']} [<=40]", f"{r['ms_per_file_total']}", f"{r['overlap']}",
                     f"{r['state']['pipeline_bytes_per_event']} [<=100]"))
    header = ("workload", "events/s", "pipeline/floor", "CPU us/event", "CPU ms/file", "overlap", "state B/event")
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        log("  " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    groups = [(n, results[n]) for n in ("big", "small", "sustained") if n in results]
    if groups:
        log("  CPU us/event by group: " + "; ".join(
            f"{n}: " + ", ".join(f"{g} {r['us_per_event'][g]}" for g in GROUPS) for n, r in groups))
    if "small" in results:
        sp = results["small"]["split"]
        log("  small files, per group (cpu = events x e + files x f, from 500- and 10,000-event files): " +
            ", ".join(f"{g} {sp[g]['us_per_event']} us + {sp[g]['ms_per_file']} ms" for g in GROUPS))
    if "latency" in results:
        r = results["latency"]
        log(f"  latency (100-event file, registration -> loaded): median {r['median_s']}s, max {r['max_s']}s [< 1 s]")
    if "idle" in results:
        r = results["idle"]
        log(f"  idle: group {r['group_pct']}% of one core [<= 3%], server {r['server_pct']}% more")


KEY_FIGURES = [  # (label, workload, path in its figures)
    ("big events/s", "big", "events_per_s"), ("big pipeline/floor", "big", "floor.ratio"),
    ("big pipeline/old floor", "big", "floor.old_ratio"),
    ("big CPU / floor CPU", "big", "floor.cpu_ratio"), ("big floor rows/s", "big", "floor.reference_rows_per_s"),
    ("big CPU us/event", "big", "us_per_event_total"), ("big server us/event", "big", "us_per_event.server"),
    ("big overlap", "big", "overlap"), ("big state B/event", "big", "state.pipeline_bytes_per_event"),
    ("small events/s", "small", "events_per_s"), ("small CPU us/event", "small", "us_per_event_total"),
    ("small ms/file beyond events", "small", "split.total.ms_per_file"),
    ("latency median s", "latency", "median_s"), ("latency max s", "latency", "max_s"),
    ("sustained events/s", "sustained", "events_per_s"), ("sustained vs fresh", "sustained", "rate_vs_fresh"),
    ("sustained CPU us/event", "sustained", "us_per_event_total"),
    ("sustained server us/event", "sustained", "us_per_event.server"),
    ("sustained state B/event", "sustained", "state.pipeline_bytes_per_event"),
    ("sustained shard B/row", "sustained", "state.shard_bytes_per_row"),
    ("idle group %", "idle", "group_pct"), ("idle server %", "idle", "server_pct"),
]


def compare(paths: list[Path]) -> None:
    """The key figures of earlier --json files side by side."""
    docs = [json.loads(p.read_text()) for p in paths]
    rows = [("", *[f"{d['commit']} {d['date'][:16]}" for d in docs])]
    for label, workload, path in KEY_FIGURES:
        cells = []
        for d in docs:
            value = d["workloads"].get(workload)
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            cells.append("" if value is None else f"{value:,}" if isinstance(value, int) else str(value))
        if any(cells):
            rows.append((label, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        log("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="big,small,latency,sustained,idle",
                        help="comma-separated, run in this order (default: all)")
    parser.add_argument("--quick", action="store_true", help="every size divided by 10 (about two minutes)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--shared", action="store_true", help="the machine's server instead of a private one")
    where.add_argument("--private-big", action="store_true", help="a private server with a 1 GiB buffer pool")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy profiles, API request and SQL statement counts of the big and small runs, "
                             "into DIR")
    parser.add_argument("--count", action="store_true",
                        help="count the API's requests per file (a counter wrapped around the API; --profile does)")
    parser.add_argument("--server-threads", action="store_true",
                        help="the server's CPU by thread in each window: connections by the stage that opened them "
                             "and their database, InnoDB's own threads (bench/server_threads.py; --profile does)")
    parser.add_argument("--barrier", type=Path, metavar="DIR",
                        help="start each window together with the other benches given this folder "
                             "(bench/pairs.py --together), so both see the same machine")
    parser.add_argument("--barrier-parties", type=int, default=2)
    parser.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                        help="print the key figures of earlier --json files side by side, run nothing")
    sizes = Sizes()
    for name, value in asdict(sizes).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    if args.compare:
        return compare(args.compare)
    sizes = Sizes(**{k: getattr(args, k) for k in asdict(sizes)})
    if args.barrier:
        global BARRIER
        BARRIER = (args.barrier, args.barrier_parties)
    if args.quick:
        sizes = sizes.quick()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - {"big", "small", "latency", "sustained", "idle"}
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    if args.profile:
        from bench import profiling
        if not Path(profiling.PY_SPY).exists():
            parser.error("--profile needs py-spy in the venv: .venv/bin/pip install py-spy")
        args.profile.mkdir(parents=True, exist_ok=True)

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    mode = "shared" if args.shared else "private-big" if args.private_big else "private"
    server = Server(mode, performance_schema=bool(args.profile))
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.chmod(0o777)   # the shared server writes its exports here
    spread = fsgroup.spread_subfolders(work)
    load_start = os.getloadavg()[0]
    log(f"server: {server.describe()}; load average {load_start:.1f}; workload folders "
        f"{'spread over block groups' if spread else 'not spread (no FS_TOPDIR_FL here)'}")
    log(f"sizes: {asdict(sizes)}")
    bench = Bench(server, sizes, work, args.profile, args.count or bool(args.profile),
                  server_threads=args.server_threads)
    results: dict = {}
    started = time.monotonic()
    try:
        for w in workloads:
            results[w] = getattr(bench, w)()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    for name in ("big", "small"):
        if "profile" in results.get(name, {}):
            print_profile(name, results[name])
    log(f"\ntotal {time.monotonic() - started:.0f}s; load average now {os.getloadavg()[0]:.1f} (other users' work "
        f"slows the wall-clock figures)")
    if args.json:
        doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit.stdout.strip(),
               "command": " ".join(sys.argv), "load_average": {"start": load_start, "end": os.getloadavg()[0]},
               "server": {"mode": mode, "settings": server.settings},
               "rates": asdict(RATES), "sizes": asdict(sizes), "workloads": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, default=str))
        log(f"figures written to {args.json}")


def print_profile(name: str, big: dict) -> None:
    p = big["profile"]
    log(f"\n== profile of the {name} run (py-spy, samples holding the GIL; self time / inclusive)")
    for name, s in p["py_spy"].items():
        log(f"  {name} ({s['samples']} samples)")
        log("    self:      " + "; ".join(f"{f} {pct}%" for f, pct in s["self"][:6]))
        log("    inclusive: " + "; ".join(f"{f} {pct}%" for f, pct in s["inclusive"][:6]))
        log("    modules:   " + "; ".join(f"{f} {pct}%" for f, pct in s["modules"][:8]))
    files = big["files"]
    log("  server, statements by total time (performance_schema digests; time includes waits), per file:")
    for st in p["digests"][:12]:
        sender = max(st["stages"], key=st["stages"].get) if st["stages"] else "-"
        text = " ".join((st["sample"] or st["statement"]).split())
        rows = st["examined"] / max(1, st["count"])
        log(f"    {st['us'] / files:7.0f} us {st['count'] / files:5.2f}x {rows:7.1f} rows {sender:>8}"
            f" {st['schema'] or '-'}: {text[:100]}")
    log("  server, tables by I/O wait: " + "; ".join(
        f"{t['schema']}.{t['table']} {t['seconds']:.1f}s ({t['insert']:,} ins, {t['fetch']:,} fetch)"
        for t in p["tables"][:8]))
    log("  SQL statements per file by process group: " + "; ".join(
        f"{g} {c['total']}" for g, c in p["statements_per_file"].items()))
    if "per_request" in big:
        log("  API statements per request (median): " + ", ".join(
            f"{k} {v['median']}" for k, v in big["per_request"].items()))


if __name__ == "__main__":
    main()
