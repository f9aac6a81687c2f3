"""End-to-end throughput and latency of the whole pipeline (prints figures; not a test).

    .venv/bin/python bench/pipeline.py [--events 1000000] [--files 20] [--private]

1. Generates the input once (cached under var/bench/, reused by later runs with the same sizes).
2. Runs the real processes (API, splitter, a worker and a sender per shard; default settings)
   on fresh databases, imports every file through event-ingest, and waits until every task is
   loaded: events/s end to end, the time from the last file's registration to the last
   mysql-sender done, and each process's peak RSS.
3. The floor: the same rows, exported from the shard tables, loaded by the server's own
   LOAD DATA INFILE into a fresh copy of the table; the ratio pipeline time / floor time.
4. Latency: 100-event files registered one at a time on the idle pipeline, registration to
   loaded (from the API's transition log).
Targets: the whole pipeline within 2x of the floor; a 100-event file loaded in under 1 s.
`--private` runs everything on a mariadbd of the bench's own with a 1 GiB buffer pool (the
machine's server has 128 MiB, less than the loaded tables), alone on its data.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.ingest.generator import Rates, generate_files  # noqa: E402
from tests import servers  # noqa: E402
from tests.pipeline_harness import Pipeline  # noqa: E402
from tests.servers import query  # noqa: E402

RATES = Rates(duplicate=0.01, later_duplicate=0.005, return_first=0.01, return_first_later=0.005,
              over_balance=0.005, malformed=0.002, unroutable_return=0.002, shopless_return=0.0)
COLUMNS = "event_type, shop_id, user_id, `timestamp`, shard, created_at, event_key, source_file, order_id, " \
          "good_id, qty, amount, payload"
DEFAULTS = {"POLL_MIN_SECONDS": "", "POLL_MAX_SECONDS": "", "LEASE_SECONDS": "", "REAP_INTERVAL": "",
            "HOLD_SECONDS": "", "HOLD_WALL_CAP_SECONDS": "", "MAX_ATTEMPTS": ""}


def source_files(events: int, files: int) -> Path:
    folder = ROOT / "var" / "bench" / f"pipeline-{events}-{files}"
    done = folder / ".complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.txt"):
            old.unlink()
        started = time.monotonic()
        generate_files(folder, files, events // files, seed=1, rates=RATES, start="20260301000000")
        done.write_text("ok")
        print(f"generated {events:,} events in {files} files in {time.monotonic() - started:.1f}s")
    return folder


SERVER = {"host": servers.MYSQL_HOST, "port": servers.MYSQL_PORT}
PRIVATE_OPTIONS = ["--innodb-buffer-pool-size=1G", "--innodb-log-file-size=512M"]


def fresh(prefix: str):
    name = servers.unique_name(prefix)
    conn = servers.admin_connect(**SERVER)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    conn.close()
    return servers.server_url(name, **SERVER)


def drop(url) -> None:
    conn = servers.admin_connect(url.host, url.port)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
    conn.close()


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (gunicorn workers), in MiB."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total = max(total, int(line.split()[1]))
        except OSError:
            pass
    return total / 1024


def floor_seconds(shard_dbs, work: Path) -> tuple[float, int]:
    """The shard rows reloaded by the server itself into fresh copies of `events`."""
    seconds, rows = 0.0, 0
    for n, url in enumerate(shard_dbs):
        tsv = work / f"floor-{n}.tsv"
        tsv.unlink(missing_ok=True)
        query(url, f"SELECT {COLUMNS} INTO OUTFILE %s FROM events", (str(tsv),))
        target = fresh("floor")
        try:
            query(target, "CREATE TABLE events LIKE `%s`.events" % url.database)
            conn = servers.admin_connect(target.host, target.port, target.database)
            with conn.cursor() as cur:
                started = time.monotonic()
                conn.begin()
                cur.execute(f"LOAD DATA INFILE %s INTO TABLE events ({COLUMNS})", (str(tsv),))
                conn.commit()
                seconds += time.monotonic() - started
                cur.execute("SELECT COUNT(*) FROM events")
                rows += cur.fetchone()[0]
            conn.close()
        finally:
            drop(target)
            tsv.unlink(missing_ok=True)
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--latency-files", type=int, default=10)
    parser.add_argument("--private", action="store_true", help="a mariadbd of the bench's own (1 GiB buffer pool)")
    args = parser.parse_args()
    private = servers.new_private_mariadb(PRIVATE_OPTIONS) if args.private else None
    if private:
        SERVER.update(host="127.0.0.1", port=private.port)
        print(f"private mariadbd on port {private.port} ({' '.join(PRIVATE_OPTIONS)})")
    try:
        run(args)
    finally:
        if private:
            private.stop()
            shutil.rmtree(private.datadir, ignore_errors=True)


def run(args) -> None:

    source = source_files(args.events, args.files)
    names = sorted(p.name.split(".")[0] for p in source.glob("*.event-ingest.txt"))
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.chmod(0o777)
    pipeline_db, shard_dbs = fresh("bench_pipe"), [fresh(f"bench_shard{n}") for n in range(2)]
    pipe = Pipeline(work / "run", pipeline_db, shard_dbs, extra_env=DEFAULTS).start()
    try:
        time.sleep(1)  # every daemon connected and polling
        started = time.monotonic()
        pipe.import_files(source)
        pipe.wait_loaded(len(names), timeout=1800)
        elapsed = time.monotonic() - started
        (last_registered, last_loaded), = query(
            pipeline_db, "SELECT (SELECT MAX(at) FROM pipeline_transitions WHERE stage='event-ingest' AND "
                         "to_status='done'), (SELECT MAX(at) FROM pipeline_transitions WHERE "
                         "stage='mysql-sender' AND to_status='done')")
        rss = {name: peak_rss_mb(p.proc.pid) for name, p in pipe.daemons.items()}
        rss["pipeline-apid"] = peak_rss_mb(pipe.api.process.proc.pid)
        loaded = sum(query(url, "SELECT COUNT(*) FROM events")[0][0] for url in shard_dbs)
        stage_seconds = {stage: ms / 1000 for stage, ms in query(
            pipeline_db, "SELECT stage, SUM(duration_ms) FROM pipeline_transitions WHERE to_status='done' "
                         "AND duration_ms IS NOT NULL GROUP BY stage")}

        print(f"\nend to end: {args.events:,} events in {len(names)} files, {loaded:,} rows loaded")
        print(f"  import -> all loaded      {elapsed:8.2f}s   {args.events / elapsed:10,.0f} events/s")
        print(f"  last registration -> last load  {(last_loaded - last_registered).total_seconds():.2f}s")
        print("  busy time per stage (sum of task run times): " +
              ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stage_seconds.items())))
        print("  peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items())))

        floor, floor_rows = floor_seconds(shard_dbs, work)
        print(f"\nfloor: the same {floor_rows:,} rows by the server's LOAD DATA INFILE: {floor:.2f}s "
              f"({floor_rows / floor:,.0f} rows/s)")
        print(f"  pipeline / floor = {elapsed / floor:.2f}x   (target <= 2x)")

        latencies = []
        for i in range(args.latency_files):
            one = work / f"latency{i}"
            gen = generate_files(one, 1, 100, seed=100 + i, rates=Rates(**{n: 0.0 for n in Rates.names()}),
                                 start=f"2026040100{i:02d}00")
            pipe.import_files(one)
            pipe.wait_loaded(len(names) + i + 1, timeout=60)
            (seconds,), = query(pipeline_db, "SELECT TIMESTAMPDIFF(MICROSECOND, "
                                "(SELECT MIN(at) FROM pipeline_transitions WHERE filename=%s),"
                                "(SELECT MAX(at) FROM pipeline_transitions WHERE filename=%s AND "
                                "stage='mysql-sender' AND to_status='done')) / 1e6", (gen[0], gen[0]))
            latencies.append(float(seconds))
        print(f"\nlatency of a 100-event file, registration -> loaded ({len(latencies)} files, default polls): "
              f"median {statistics.median(latencies):.3f}s, max {max(latencies):.3f}s   (target < 1 s)")
    finally:
        pipe.stop()
        for url in (pipeline_db, *shard_dbs):
            drop(url)


if __name__ == "__main__":
    main()
