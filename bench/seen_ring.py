"""The server's CPU for a shard's dedup keys, loaded and then sealed, with `worker_seen` a ring of
partitions (db/migrations/worker/0008: the sealing pass truncates) or one table (deletes).

    .venv/bin/python bench/seen_ring.py [--keys 5000] [--rounds 12] [--settle 1] [--pairs 2]

A private mariadbd (128 MiB pool), the worker's schema, one database per mode: `ring` (as
migrated) and `delete` (`worker_seen` with its partitioning removed, as before 0008). Each round
loads a minute's --keys random keys of shard 0 (`LOAD DATA LOCAL`, as a batch does), then runs
the worker's own sealing pass (`WorkerState.seal`) for the minutes SEAL_MINUTES behind the newest
(one minute a pass once it runs, as between the pipeline's 10,000-event files), then waits
--settle seconds (InnoDB's purge of deleted keys runs in the background); an idle stretch of the
same length is subtracted. Prints the server CPU µs per key for the load and for the pass (with
the purge after it), and checks that every key ended packed or in `worker_seen`. The modes take
turns, --pairs times.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import db  # noqa: E402
from app.config import MySQLURL  # noqa: E402
from app.worker.state import SEAL_MINUTES, WorkerState  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402

MODES = ("delete", "ring")
LOAD = "LOAD DATA LOCAL INFILE 'worker_seen' INTO TABLE worker_seen (bucket, hash) SET shard=0"


def one_mode(port: int, pid: int, mode: str, keys: int, rounds: int, settle: float, seed: int) -> tuple[float, float]:
    """Server CPU µs per key: (load, sealing pass and purge), idle subtracted."""
    name = f"bench_seen_{mode}"
    url = MySQLURL.parse("url", f"mysql://root:@127.0.0.1:{port}/{name}")
    admin = db.connect(url, database=None)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
    admin.close()
    state = WorkerState(url, 0)
    conn = state.open()
    if mode == "delete":
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE worker_seen REMOVE PARTITIONING")
        state.close()
        conn = state.open()
    assert state.seen_ring == (mode == "ring")
    rng = random.Random(seed)
    loaded = sealed = 0.0
    stored = 0
    with conn.cursor() as cur:
        for r in range(rounds):
            minute = 1000 + r
            data = "".join("%d\t%d\n" % (minute, rng.getrandbits(64) - (1 << 63)) for _ in range(keys)).encode()
            t0 = cpu_seconds(pid)
            conn.begin()
            stored += db.load_local(cur, LOAD, None, "worker_seen", data)
            conn.commit()
            t1 = cpu_seconds(pid)
            state.seal(minute - SEAL_MINUTES, max_rows=20_000)
            time.sleep(settle)
            t2 = cpu_seconds(pid)
            loaded += t1 - t0
            sealed += t2 - t1
        cur.execute("SELECT COUNT(*) FROM worker_seen")
        hot = cur.fetchone()[0]
        cur.execute("SELECT COALESCE(SUM(LENGTH(hashes)), 0) DIV 8 FROM worker_seen_sealed")
        packed = int(cur.fetchone()[0])
    assert hot + packed == stored == keys * rounds, f"{mode}: {hot} + {packed} keys of {stored}"
    t0 = cpu_seconds(pid)
    time.sleep(settle * rounds)
    idle = cpu_seconds(pid) - t0
    state.close()
    moved = keys * (rounds - SEAL_MINUTES)
    return loaded / stored * 1e6, (sealed - idle) / moved * 1e6


def main(argv: list[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=5_000, help="keys of a minute, loaded per round")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after each pass (purge)")
    ap.add_argument("--pairs", type=int, default=2, help="times the modes are run, alternated")
    args = ap.parse_args(argv)

    from tests import servers
    srv = servers.new_private_mariadb(["--innodb-buffer-pool-size=128M"])
    figures: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    try:
        for p in range(args.pairs):
            for mode in (MODES if p % 2 == 0 else MODES[::-1]):
                figures[mode].append(one_mode(srv.port, srv.proc.pid, mode, args.keys, args.rounds, args.settle, p))
    finally:
        srv.stop()
    for mode in MODES:
        print(f"{mode:7s} server CPU µs per key: load " + " / ".join(f"{a:.2f}" for a, _ in figures[mode])
              + "; sealing pass and purge " + " / ".join(f"{b:.2f}" for _, b in figures[mode]))
    print(f"({args.keys:,} keys a minute, {args.rounds} rounds; load average {os.getloadavg()[0]:.2f})")
    return figures


if __name__ == "__main__":
    main()
