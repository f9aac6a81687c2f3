"""Benchmark of the shard splitter: lines/s into 2 shards, against the plain read-and-write
floor measured in the same run, and peak RSS at 10k and 1M lines.

    .venv/bin/python bench/split.py [--lines 1000000] [--small 10000]

Targets (issue 3): >= 500,000 lines/s for 1,000,000 lines; RSS(1M) <= 1.2 x RSS(10k).
Uses the real code path (app.splitter.split_file with the order index in MariaDB at
BENCH_MYSQL_URL, default mysql://root:@127.0.0.1:3306, in a scratch database dropped after).
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymysql  # noqa: E402

from app import db, layout  # noqa: E402
from app.config import MySQLURL, Settings  # noqa: E402
from app.ingest.generator import generate_files  # noqa: E402
from app.lines import READ_BUFFER, LineReader  # noqa: E402
from app.splitter.order_index import FileRouting, OrderIndex  # noqa: E402
from app.splitter.stage import split_file, split_stream  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "original-generator" / "20261126221520.event-ingest.txt"


def peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def floor(source: Path, out_dir: Path) -> float:
    """Plain Python: read each line, write it to one of two files (lines/s)."""
    start = time.perf_counter()
    n = 0
    with open(source, "rb", buffering=1 << 20) as f, open(out_dir / "floor.0", "wb", buffering=1 << 20) as a, \
            open(out_dir / "floor.1", "wb", buffering=1 << 20) as b:
        outs = (a.write, b.write)
        for line in f:
            outs[n & 1](line)
            n += 1
    seconds = time.perf_counter() - start
    (out_dir / "floor.0").unlink()
    (out_dir / "floor.1").unlink()
    return n / seconds


def loop_alone(source: Path, rounds: int = 5) -> float:
    """The splitting loop without the database (the file's index known, no lookup answers a
    return): microseconds of CPU per line, best of `rounds` (other work only slows a round)."""
    data = source.read_bytes()
    best = float("inf")
    for _ in range(rounds):
        routing = FileRouting(None, "loop", 1, 0, True)
        routing.lookup_async = lambda orders: _Answered([None] * len(orders))
        routing.lookup = lambda orders, finish=False: [None] * len(orders)
        outs = [io.BytesIO(), io.BytesIO()]
        reader = LineReader(io.BufferedReader(io.BytesIO(data), READ_BUFFER), Settings.max_line_bytes)
        cpu = time.process_time()
        result = split_stream(reader, 2, [o.write for o in outs], [True, True], routing, io.BytesIO().write)
        best = min(best, (time.process_time() - cpu) / result.lines_in * 1e6)
    return best


def small_files(shared: Path, url: MySQLURL, count: int, size: int = 500) -> tuple[float, float, float]:
    """`count` files of `size` lines split one after the other (after one to warm up): CPU ms
    and wall ms per file, SQL round trips per file (commands sent by PyMySQL, counted)."""
    names = generate_files(layout.events_dir(shared), count + 1, size, seed=3, start="20260501000000")
    trips = [0]
    send = pymysql.connections.Connection._execute_command

    def counted(self, *args, **kwargs):
        trips[0] += 1
        return send(self, *args, **kwargs)
    index = OrderIndex(url)
    index.ensure_schema()
    pymysql.connections.Connection._execute_command = counted
    try:
        split_file(layout.source_file(shared, names[0]), names[0], shared, 2, [0, 1], [0, 1], index, True)
        wall, cpu, before = time.perf_counter(), time.process_time(), trips[0]
        for name in names[1:]:
            split_file(layout.source_file(shared, name), name, shared, 2, [0, 1], [0, 1], index, True)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        pymysql.connections.Connection._execute_command = send
        index.close()
    return 1e3 * cpu / count, 1e3 * wall / count, (trips[0] - before) / count


class _Answered:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def split_once(shared: Path, url: MySQLURL, name: str, source: Path | None = None) -> tuple[float, dict, float]:
    """lines/s (wall clock), the split's stats (with the purchases indexed and lines per CPU
    second of this process), seconds spent in LOAD DATA."""
    folder = layout.splitter_dir(shared)
    folder.mkdir(parents=True, exist_ok=True)
    index = OrderIndex(url)
    index.ensure_schema()
    loads = []
    original_load = index.load

    def timed_load(*args):
        t = time.perf_counter()
        original_load(*args)
        loads.append(time.perf_counter() - t)
    index.load = timed_load
    start, cpu = time.perf_counter(), time.process_time()
    result = split_file(source or layout.source_file(shared, name), name, shared, 2, [0, 1], [0, 1], index, True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    index.close()
    for s in (0, 1):
        layout.splitter_output(shared, name, s).unlink()
    layout.splitter_rejected(shared, name).unlink(missing_ok=True)
    return (result.lines_in / seconds,
            {**result.stats(), "purchases": result.purchases, "per_cpu_second": result.lines_in / cpu}, sum(loads))


def child(shared: str, url: str, name: str) -> None:
    """Run in a fresh process: one split, then print the peak RSS in kB."""
    u = MySQLURL.parse("BENCH_MYSQL_URL", url)
    split_once(Path(shared), u, name)
    print(peak_rss_kb())


def rss_of(shared: Path, url: str, name: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", str(shared), url, name], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--small-files", type=int, default=100, help="500-line files for the cost per file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    base = MySQLURL.parse("BENCH_MYSQL_URL", os.environ.get("BENCH_MYSQL_URL", "mysql://root:@127.0.0.1:3306/x"))
    url = base.with_database(f"bench_split_{uuid.uuid4().hex[:8]}")
    url_text = f"mysql://{url.user}:{url.password}@{url.host}:{url.port}/{url.database}"
    db.ensure_database(url)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
            shared = Path(tmp)
            events = layout.events_dir(shared)
            t = time.perf_counter()
            big, = generate_files(events, 1, args.lines, seed=1, start="20260101000000")
            small, = generate_files(events, 1, args.small, seed=2, start="20260201000000")
            print(f"generated {args.lines:,} + {args.small:,} lines in {time.perf_counter() - t:.1f}s "
                  f"(our generator, default injection rates)")
            load = os.getloadavg()[0]
            print(f"load average before measuring: {load:.2f} on {os.cpu_count()} cores")
            source = layout.source_file(shared, big)
            # Best of 3 of each: other work on this machine only ever slows a run down.
            fl = max(floor(source, shared) for _ in range(3))
            firsts = [split_once(shared, url, f"{big}-{i}", source) for i in range(3)]
            first, stats, load_s = max(firsts, key=lambda r: r[0])
            agains = [split_once(shared, url, f"{big}-0", source) for _ in range(3)]
            again, again_stats, _ = max(agains, key=lambda r: r[0])
            print(f"plain read-and-write floor : {fl:12,.0f} lines/s")
            print(f"split, first time          : {first:12,.0f} lines/s  (indexing {stats['purchases']:,} "
                  f"purchases; {load_s:.2f}s of LOAD DATA in a second thread; "
                  f"{stats['per_cpu_second']:,.0f} lines per CPU-second of the splitter)")
            print(f"split again (index known)  : {again:12,.0f} lines/s  "
                  f"({again_stats['per_cpu_second']:,.0f} lines per CPU-second)")
            print(f"  per shard {stats['lines_by_shard']}, rejected {stats['rejected']}")
            print(f"the splitting loop alone   : {loop_alone(source):12.3f} us of CPU per line (no database, "
                  f"best of 5)")
            if FIXTURE.exists():
                orig = layout.source_file(shared, "20261126221520")
                copies = max(1, args.lines // 82)
                orig.write_bytes(FIXTURE.read_bytes() * copies)
                o_rate, o_stats, _ = split_once(shared, url, "20261126221520")
                print(f"split, original-format data: {o_rate:11,.0f} lines/s  "
                      f"({o_stats['rejected'].get('unroutable', 0):,} shop-less returns, each looked up)")
            ms_cpu, ms_wall, trips = small_files(shared, url, args.small_files)
            print(f"per 500-line file          : {ms_cpu:8.2f} ms of CPU, {ms_wall:.1f} ms wall, {trips:.1f} SQL round "
                  f"trips ({args.small_files} files, one after the other)")
            rss_small = rss_of(shared, url_text, small)
            rss_big = rss_of(shared, url_text, big)
            print(f"peak RSS {args.small:>9,} lines: {rss_small / 1024:8.1f} MiB")
            print(f"peak RSS {args.lines:>9,} lines: {rss_big / 1024:8.1f} MiB  "
                  f"(ratio {rss_big / rss_small:.2f}; target <= 1.20)")
            verdict = "meets" if first >= 500_000 else "MISSES"
            print(f"throughput target >= 500,000 lines/s: {verdict} ({first:,.0f}); "
                  f"load average now {os.getloadavg()[0]:.2f}")
    finally:
        conn = db.connect(url, database=None)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        conn.close()


if __name__ == "__main__":
    main()
