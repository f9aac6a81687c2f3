"""Benchmark of the splitter's order index as history grows: CPU per event (the splitter's
process and the server, from /proc) and bytes per event of its tables, for this tree and for
another (e.g. main, unsealed), each on its own database of one private mariadbd, in one run.

    git archive main | tar -x -C /tmp/oi-base
    .venv/bin/python bench/order_index.py --base /tmp/oi-base [--events 2000000] [--file-events 10000]

The purchases are what the splitter indexes: 36% of the generator's events are purchases
(random 63-bit order ids), in files of `--file-events` events; every file also looks up 50
orders mid-file (returns without shop_id: earlier orders and unknown ones), synchronously so
their Python CPU is timed apart.
Each file goes through the real path (`open_file`, `add_purchase`, `finish`), then the
splitter's own pass between files (`prune_due` / `prune`: sealing and pruning), timed apart.
Runs alternate (base, this tree, base, this tree...) with `--rounds`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURCHASE_SHARE = 0.36
TABLES = ("splitter_order", "splitter_sealed", "splitter_epoch", "splitter_file", "splitter_seq")


def child(root: str, url_text: str, server_pid: int, events: int, file_events: int) -> None:
    sys.path.insert(0, root)
    from app.config import MySQLURL
    from app.splitter.order_index import OrderIndex
    sys.path.insert(0, str(ROOT))
    from bench.procstat import cpu_seconds

    url = MySQLURL.parse("BENCH_URL", url_text)
    rng = random.Random(1)
    epoch_rows = os.environ.get("BENCH_EPOCH_ROWS")
    idx = OrderIndex(url, **({"epoch_rows": int(epoch_rows)} if epoch_rows else {}))
    if os.environ.get("BENCH_NO_SEAL"):
        idx.seal = lambda: None  # this tree's layout and lookups, nothing ever sealed
    idx.ensure_schema()
    per_file = round(file_events * PURCHASE_SHARE)
    files = max(1, events // file_events)
    recent: list[int] = []
    digest = hashlib.sha256()
    pass_cpu = pass_server = lookup_cpu = 0.0
    start_cpu, start_server, start_wall = _self_cpu(), cpu_seconds(server_pid), time.perf_counter()
    for n in range(files):
        routing = idx.open_file(f"2026{n:010d}")
        orders = []
        for line in range(1, per_file + 1):
            order = rng.getrandbits(63)
            orders.append(order)
            routing.add_purchase(order, rng.randrange(1, 1_000_000), line * 3)
            if line == per_file // 2:      # the file's returns of orders not in memory, mid-split
                asked = [rng.choice(recent) for _ in range(40)] if recent else []
                asked += [rng.getrandbits(63) for _ in range(50 - len(asked))]
                t0 = time.thread_time()
                digest.update(repr(routing.lookup([(o, line) for o in asked])).encode())
                lookup_cpu += time.thread_time() - t0
        routing.finish()
        recent = (recent + orders[::97])[-20000:]
        if idx.prune_due(time.monotonic()):
            c0, s0 = _self_cpu(), cpu_seconds(server_pid)
            idx.prune()
            pass_cpu += _self_cpu() - c0
            pass_server += cpu_seconds(server_pid) - s0
    cpu, server, wall = _self_cpu() - start_cpu, cpu_seconds(server_pid) - start_server, time.perf_counter() - start_wall
    conn = idx.conn()
    with conn.cursor() as cur:
        sizes = {}
        for table in TABLES:
            try:
                cur.execute(f"ANALYZE TABLE {table}")
                cur.fetchall()
            except Exception:
                continue
        cur.execute("SELECT table_name, data_length + index_length FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_name LIKE 'splitter%%'")
        sizes = {name: int(size) for name, size in cur.fetchall()}
        cur.execute("SELECT * FROM splitter_seq")
        seq = [list(r) for r in cur.fetchall()]
    idx.close()
    print(json.dumps({"files": files, "purchases": files * per_file, "events": files * file_events, "cpu": cpu,
                      "server": server, "wall": wall, "pass_cpu": pass_cpu, "pass_server": pass_server, "lookup_cpu": lookup_cpu,
                      "sizes": sizes, "seq": seq, "lookups": digest.hexdigest()[:16]}, default=str))


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="another tree to measure beside this one (its app/ is imported)")
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--file-events", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-seal-too", action="store_true", help="also this tree with sealing held off")
    ap.add_argument("--pool", default="128M", help="the private mariadbd's innodb_buffer_pool_size")
    ap.add_argument("--epoch-rows-too", type=int, help="also this tree with epochs of this many purchases")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        root, url, pid, events, file_events = args.child
        child(root, url, int(pid), int(events), int(file_events))
        return
    sys.path.insert(0, str(ROOT))
    from tests import servers
    private = servers.new_private_mariadb([f"--innodb-buffer-pool-size={args.pool}"])
    try:
        trees = ([("base", args.base, {})] if args.base else []) + [("this", str(ROOT), {})]
        if args.no_seal_too:
            trees.append(("this, no sealing", str(ROOT), {"BENCH_NO_SEAL": "1"}))
        if args.epoch_rows_too:
            trees.append((f"this, epochs of {args.epoch_rows_too:,}", str(ROOT),
                          {"BENCH_EPOCH_ROWS": str(args.epoch_rows_too)}))
        print(f"{args.events:,} events in files of {args.file_events:,} ({PURCHASE_SHARE:.0%} purchases); "
              f"private mariadbd, buffer pool {args.pool}; load average {os.getloadavg()[0]:.1f}")
        for round_ in range(args.rounds):
            for label, root, env in trees:
                name = f"bench_oi_{uuid.uuid4().hex[:8]}"
                conn = servers.admin_connect(port=private.port)
                with conn.cursor() as cur:
                    cur.execute(f"CREATE DATABASE {name}")
                conn.close()
                url = f"mysql://root:@127.0.0.1:{private.port}/{name}"
                proc = subprocess.run([sys.executable, __file__, "--child", root, url, str(private.proc.pid),
                                       str(args.events), str(args.file_events)], capture_output=True, text=True,
                                      env={**os.environ, **env})
                if proc.returncode:
                    print(proc.stdout, proc.stderr)
                    raise SystemExit(proc.returncode)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                ev = r["events"]
                sizes = r["sizes"]
                total = sum(sizes.values())
                print(f"[{label} r{round_ + 1}] {ev:,} events, {r['purchases']:,} purchases in {r['files']} files, "
                      f"{r['wall']:.1f}s wall; lookups {r['lookups']}")
                print(f"   CPU µs/event: splitter {r['cpu'] / ev * 1e6:.3f} + server {r['server'] / ev * 1e6:.3f} = "
                      f"{(r['cpu'] + r['server']) / ev * 1e6:.3f}; of which the pass between files (seal/prune): "
                      f"splitter {r['pass_cpu'] / ev * 1e6:.3f} + server {r['pass_server'] / ev * 1e6:.3f}; "
                      f"the lookups' Python {r['lookup_cpu'] / ev * 1e6:.3f}")
                print(f"   state {total / ev:.1f} B/event (" + ", ".join(
                    f"{k} {v / ev:.1f}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])) + f"); seq {r['seq']}")
                conn = servers.admin_connect(port=private.port)
                with conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE {name}")
                conn.close()
    finally:
        private.stop()
        shutil.rmtree(private.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
