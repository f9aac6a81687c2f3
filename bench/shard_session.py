"""What the shard load's session settings cost the server: the same rows loaded into copies of the
shard's `events` table, one per variant of the loading session, chunk by chunk in turn.

    .venv/bin/python bench/shard_session.py [--rows 400000] [--variants rr,rc] [--pool 128M]

On a private mariadbd with the machine server's InnoDB settings (bench/shard_schema.py OPTIONS),
each variant gets its own database with the shard's table (`lean`: the table now) and its own
connection, set up by the variant's statements. The rows (bench/load.py's realistic mix, the
sender's TSV) go in by the server's own `LOAD DATA INFILE ... CHARACTER SET binary` in
10,000-row transactions, as a big run's shard files do; the variants take turns chunk by
chunk, so every variant sees the same buffer pool, history and machine load. Printed: the
server's CPU per row of each variant (schedstat of every server thread around each chunk) and
its loading connection's thread's alone: the median and mean of its chunks, and in how many
turns the variant was the lowest.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.shard_schema import CHUNK, COLUMNS, OPTIONS, VARIANTS, tsv_files  # noqa: E402
from tests import servers  # noqa: E402

def server_cpu(pid: int) -> float:
    """CPU seconds of the server's threads alive now, from schedstat (nanoseconds: a chunk's
    ~50 ms would be 5 clock ticks in /proc/<pid>/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def thread_cpu(pid: int, tid: int) -> float:
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9


SESSIONS = {
    "rr": [],                                                          # as the sender's session is
    "rc": ["SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"],
    "nocheck": ["SET SESSION check_constraint_checks = 0"],              # MariaDB: JSON's json_valid() skipped
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--variants", default=",".join(SESSIONS))
    parser.add_argument("--table", default="lean", help="a bench/shard_schema.py variant")
    parser.add_argument("--pool", default="128M")
    parser.add_argument("--skip", type=int, default=2, help="chunks of each variant left out of the figures (warm-up)")
    args = parser.parse_args()
    names = args.variants.split(",")
    kind, ddl = VARIANTS[args.table]
    folder = tsv_files(args.rows)[kind]
    db = servers.MariaDB(Path(tempfile.mkdtemp(prefix="bench-session-db-")),
                         options=[*OPTIONS, f"--innodb-buffer-pool-size={args.pool}"])
    db.install().start()
    print(f"private mariadbd, pool {args.pool}; {args.rows:,} rows per variant in {CHUNK:,}-row chunks; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    conns, tids = {}, {}
    try:
        for name in names:
            conn = servers.admin_connect("127.0.0.1", db.port)
            conn.autocommit(False)
            with conn.cursor() as cur:
                database = f"bench_session_{name.replace('-', '_')}"
                cur.execute(f"CREATE DATABASE `{database}`")
                cur.execute(f"USE `{database}`")
                cur.execute(ddl)
                for sql in SESSIONS[name]:
                    cur.execute(sql)
                cur.execute("SELECT TID FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()")
                tids[name] = int(cur.fetchone()[0])
            conns[name] = conn
        per_chunk: dict[str, list[float]] = {n: [] for n in names}
        own: dict[str, list[float]] = {n: [] for n in names}     # the loading connection's thread alone
        for piece in range(args.rows // CHUNK):
            order = names if piece % 2 == 0 else names[::-1]
            for name in order:
                conn = conns[name]
                path = str(folder / f"{kind}-{piece:05d}.tsv")
                before, mine = server_cpu(db.proc.pid), thread_cpu(db.proc.pid, tids[name])
                with conn.cursor() as cur:
                    cur.execute(f"LOAD DATA INFILE %s INTO TABLE events CHARACTER SET binary ({COLUMNS[kind]})",
                                (path,))
                conn.commit()
                per_chunk[name].append(1e6 * (server_cpu(db.proc.pid) - before) / CHUNK)
                own[name].append(1e6 * (thread_cpu(db.proc.pid, tids[name]) - mine) / CHUNK)
        print(f"{'variant':<10} {'server: median us/row':>21} {'mean':>6} {'lowest in':>9}   "
              f"{'its connection: median':>22} {'mean':>6} {'lowest in':>9}")
        rows = {}
        for figures in (per_chunk, own):
            lowest = {n: 0 for n in names}
            for i in range(args.skip, args.rows // CHUNK):
                lowest[min(names, key=lambda n: figures[n][i])] += 1
            for name in names:
                kept = figures[name][args.skip:]
                rows.setdefault(name, []).append(f"{statistics.median(kept):21.2f} {statistics.fmean(kept):6.2f} "
                                                 f"{lowest[name]:>5}/{len(kept)}")
        for name in names:
            print(f"{name:<10} " + "   ".join(rows[name]), flush=True)
    finally:
        for conn in conns.values():
            conn.close()
        db.stop()
        shutil.rmtree(db.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
