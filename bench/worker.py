"""Shard-worker throughput: events per second deciding one shard file, and peak RSS.

    .venv/bin/python bench/worker.py [--events 200000] [--data generator|harsh] [--batch 8000]
                                     [--private] [--keep] [--history 2000000] [--by-statement]
                                     [--shards 2]

Builds a shard-0 file of --events lines: `generator` (default) takes the shard-0 lines of the
project's event generator (app/ingest/generator.py, its default world and fault rates: duplicates,
purchases beyond the balance, returns before their purchase, ...), as the splitter would route
them; `harsh` is this bench's own mix with far more rule hits (5,000 users overspending, stock
going negative, inactive shops, zero prices, 10% of returns before their purchase and 10% of
unknown orders, malformed lines). Then, in a child process on a fresh pipeline database, it
decides the file (first run) and decides it again with the prepared file deleted (replay from
the records). Prints the figures, with the CPU seconds the worker and (with --private,
a mariadbd of the bench's own, so other programs' queries do not share it) the server spent.
Target: >= 50,000 events/s on 200,000 events. `--history N` first decides N events of history
in files of --events (printing each file's rate and CPU per event: how the cost grows with the
state), then measures the next file; the state's size per event decided is printed at the end.
`--by-statement` (with --private) sends each statement of the worker's scripts alone and prints
the server's CPU per kind (and for pruning, the dedup keys' sealing and the young balances'
sealing, `Ledger.seal`, as a whole; with BENCH_SEAL_STATEMENTS=1 each of their statements
too). `--shards 2` runs a worker
per shard at once on one database, as the pipeline does (their balances shared): wall time, each
worker's CPU, the server's for both, and the batches decided again (deadlocks, conflicts).
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import layout  # noqa: E402


def from_generator(path: Path, n: int, seed: int = 7, shard: int = 0, shard_count: int = 2) -> None:
    """The lines of the project's generator that the splitter would route to `shard`."""
    from app.ingest.generator import Generator

    gen = Generator(seed=seed)
    start, kept, files = datetime(2026, 1, 1), 0, 0
    with open(path, "wb") as f:
        while kept < n:
            buffer = io.BytesIO()
            gen.write(buffer, (start + timedelta(seconds=10 * files)).strftime("%Y%m%d%H%M%S"), 20_000)
            files += 1
            for line in buffer.getvalue().splitlines(keepends=True):
                try:
                    shop = orjson.loads(line)["payload"].get("shop_id")
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue
                if type(shop) is int and shop % shard_count == shard and kept < n:
                    f.write(line)
                    kept += 1


def harsh(path: Path, n: int, seed: int = 7, shard: int = 0, shard_count: int = 2) -> None:
    rng = random.Random(seed)
    shops = [s for s in range(100) if s % shard_count == shard]
    start = datetime(2026, 1, 1)
    purchases: list[dict] = []
    later_purchases: list[tuple[int, bytes]] = []
    recent: list[bytes] = []
    inactive: set[int] = set()

    def line(etype: int, payload: dict, i: int) -> bytes:
        ts = (start + timedelta(milliseconds=i)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        return orjson.dumps({"event_type": etype, "payload": payload, "saved_at": ts, "timestamp": ts})

    with open(path, "wb") as f:
        for i in range(n):
            if later_purchases and later_purchases[0][0] <= i:
                out = later_purchases.pop(0)[1]
            else:
                r = rng.random()
                shop = rng.choice(shops)
                good = rng.randint(1, 20)
                if r < 0.003:
                    out = b'{"event_type":1,"payload":{"order_id":'
                elif r < 0.02 and recent:
                    out = rng.choice(recent)
                elif r < 0.20:
                    delta = rng.randint(1, 20) if rng.random() < 0.85 else -rng.randint(1, 10)
                    sub = "restock" if delta > 0 else rng.choice(["defect", "loss"])
                    out = line(0, {"shop_id": shop, "good_id": good, "delta_count": delta,
                                   "reason": "bench", "sub_event_type": sub}, i)
                elif r < 0.55:
                    p = {"order_id": rng.getrandbits(63), "user_id": rng.randint(1, 5000), "shop_id": shop,
                         "good_id": good, "qty": rng.randint(1, 3),
                         "price_at_order": round(rng.uniform(5, 150), 2)}
                    purchases.append(p)
                    out = line(1, p, i)
                elif r < 0.65:
                    price = round(rng.uniform(1, 200), 2) if rng.random() > 0.01 else 0
                    out = line(2, {"shop_id": shop, "good_id": good, "new_price": price}, i)
                elif r < 0.80:
                    kind = rng.random()
                    if kind < 0.8 and purchases:
                        p = purchases.pop(rng.randrange(len(purchases)))
                        out = line(3, {"order_id": p["order_id"], "user_id": p["user_id"], "shop_id": p["shop_id"],
                                       "good_id": p["good_id"], "qty": p["qty"],
                                       "refund_amount": p["price_at_order"]}, i)
                    elif kind < 0.9:
                        p = {"order_id": rng.getrandbits(63), "user_id": rng.randint(1, 5000), "shop_id": shop,
                             "good_id": good, "qty": 1, "price_at_order": round(rng.uniform(5, 150), 2)}
                        out = line(3, {"order_id": p["order_id"], "user_id": p["user_id"], "shop_id": shop,
                                       "good_id": good, "qty": 1, "refund_amount": p["price_at_order"]}, i)
                        later_purchases.append((i + rng.randint(1, 5000), line(1, p, i + 1)))
                        later_purchases.sort(key=lambda x: x[0])
                    else:
                        out = line(3, {"order_id": rng.getrandbits(63), "user_id": rng.randint(1, 5000),
                                       "shop_id": shop, "good_id": good, "qty": 1, "refund_amount": 9.99}, i)
                else:
                    active = shop in inactive or rng.random() > 0.1
                    (inactive.discard if active else inactive.add)(shop)
                    out = line(4, {"shop_id": shop, "active": active}, i)
            recent.append(out)
            if len(recent) > 1000:
                recent.pop(0)
            f.write(out + b"\n")


def server_cpu(pid: int | None) -> float:
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


STATE_BYTES = ("SELECT table_name, data_length + index_length FROM information_schema.tables "
               "WHERE table_schema = DATABASE() AND table_name LIKE 'worker\\_%' ORDER BY 2 DESC")


def state_bytes(stage) -> dict[str, int]:
    """Bytes of each worker_ table (data and indexes, after ANALYZE so InnoDB's figures are fresh)."""
    with stage.state.conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() "
                    "AND table_name LIKE 'worker\\_%'")
        for (table,) in cur.fetchall():
            cur.execute(f"ANALYZE TABLE `{table}`")
            cur.fetchall()
        cur.execute(STATE_BYTES)
        return {t: int(n) for t, n in cur.fetchall()}


# The server's counters `--by-statement` adds up per kind of statement with BENCH_COUNTERS=1:
# rows and index reads (handler calls), and page accesses (buffer pool requests).
COUNTERS = ("Handler_read_key", "Handler_read_next", "Handler_write", "Handler_update", "Handler_delete",
            "Innodb_buffer_pool_read_requests", "Innodb_buffer_pool_write_requests")
COUNTER_NAMES = ("key", "next", "write", "update", "delete", "pages", "pagew")


def counters_reader(url: str):
    """A function reading COUNTERS of the whole (private) server, on a connection of its own,
    or None without BENCH_COUNTERS."""
    if not os.environ.get("BENCH_COUNTERS"):
        return None
    import pymysql
    from app.config import MySQLURL
    parsed = MySQLURL.parse("BENCH", url)
    conn = pymysql.connect(host=parsed.host, port=parsed.port, user=parsed.user, password=parsed.password or "",
                           autocommit=True)
    wanted = ", ".join(f"'{c}'" for c in COUNTERS)

    def read() -> dict[str, int]:
        with conn.cursor() as cur:
            cur.execute(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({wanted})")
            return {k: int(v) for k, v in cur.fetchall()}
    return read


def by_statement(server_pid: int, counters=None) -> dict:
    """Send each statement of every `db.Script` alone and add up the server's CPU per kind
    (first word and tag): where the server's time goes inside the worker's scripts. Costs a
    round trip per statement more than the scripts do (that shows as their own cost).
    `counters` (`counters_reader`): also the server's counters per kind, read outside the
    CPU's window."""
    import re
    from app import db

    run = db.Script.run
    spent: dict = {}
    counted: dict = {}
    spent["counters"] = counted

    def one_by_one(self, cur):
        items, offered = self.items, getattr(self, "offered", {})
        self.items, results = [], {}
        if hasattr(self, "offered"):
            self.offered = {}
        for item in items:
            tag, sql = item[0], item[1]
            single = db.Script()
            single.items = [item]
            name = re.search(r"INFILE '([^']+)'", sql) if len(item) > 3 and item[3] else None
            if name:
                single.offered = {name[1].encode(): offered[name[1].encode()]}
            c0 = counters() if counters else None
            t0 = server_cpu(server_pid)
            got = run(single, cur)
            t1 = server_cpu(server_pid)
            table = re.sub(r"[^a-z_]", "", sql.split(" INTO TABLE ")[-1].split()[0]) if name else tag
            key = f"{sql.split()[0]} {table}"
            cpu, n = spent.get(key, (0.0, 0))
            spent[key] = (cpu + t1 - t0, n + 1)
            if counters:
                c1, mine = counters(), counted.setdefault(key, {})
                for c in COUNTERS:
                    mine[c] = mine.get(c, 0) + c1[c] - c0[c]
            for t, r in got.items():
                old = results.get(t)
                results[t] = r if old is None else db.Result(old.rows + r.rows, old.rowcount + r.rowcount, r.lastrowid)
        return results
    db.Script.run = one_by_one

    from app.worker.state import WorkerState

    def timed(cls, name):
        """The server's CPU in a method of its own (outside the scripts, e.g. sealing)."""
        method = getattr(cls, name)

        def wrapper(*a, **k):
            t0 = server_cpu(server_pid)
            try:
                return method(*a, **k)
            finally:
                cpu, n = spent.get(f"{cls.__name__}.{name} (all)", (0.0, 0))
                spent[f"{cls.__name__}.{name} (all)"] = (cpu + server_cpu(server_pid) - t0, n + 1)
        setattr(cls, name, wrapper)
    for name in ("prune", "seal", "start_file"):
        timed(WorkerState, name)
    from app.worker.ledger import Ledger
    timed(Ledger, "seal")
    if os.environ.get("BENCH_SEAL_STATEMENTS"):
        import pymysql.cursors
        execute = pymysql.cursors.Cursor.execute

        def each(self, query, args=None):
            t0 = server_cpu(server_pid)
            try:
                return execute(self, query, args)
            finally:
                if ("worker_seen" in query and not query.startswith(("LOAD", "SELECT bucket, hash"))
                        or "worker_ledger" in query and not query.startswith("(")
                        or "worker_balances_young WHERE" in query):
                    key = "  " + query[:60]
                    cpu, n = spent.get(key, (0.0, 0))
                    spent[key] = (cpu + server_cpu(server_pid) - t0, n + 1)
        pymysql.cursors.Cursor.execute = each
    return spent


def child(url: str, shared: str, filename: str, batch: int, server_pid: int) -> None:
    """Decide the history files (`filename` is a comma-separated list; all but the last are
    history), then the last file twice: fresh, then replayed with its output deleted."""
    from app.client import Task
    from app.config import Settings
    from app.daemon import Context
    from app.worker.stage import WorkerStage

    if os.environ.get("BENCH_LOG"):
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    env = dict(os.environ, MYSQL_PIPELINE_URL=url, SHARED_DIR=shared, WORKER_BATCH_LINES=str(batch))
    settings = Settings.from_env(env)
    shard = int(os.environ.get("BENCH_SHARD") or 0)
    stage = WorkerStage(settings, shard)
    ctx = Context(threading.Event(), logging.getLogger("bench"))
    stage.setup(ctx)
    results = {"history": []}
    spent = (by_statement(server_pid, counters_reader(url)) if os.environ.get("BENCH_BY_STATEMENT") and server_pid
             else None)
    *history, filename = filename.split(",")
    for name in history:
        server0, cpu0, t0 = server_cpu(server_pid), time.process_time(), time.perf_counter()
        [done] = stage.process([Task(name, shard)], ctx)
        results["history"].append({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - cpu0,
                                   "server_cpu": server_cpu(server_pid) - server0, "events": done.stats["in"]})
    for run in ("first", "replay")[:1 if os.environ.get("BENCH_NO_REPLAY") else 2]:
        if spent is not None:
            counted = spent["counters"]
            counted.clear()
            spent.clear()
            spent["counters"] = counted
        layout.worker_output(settings.shared_dir, filename, shard).unlink(missing_ok=True)
        server0, cpu0, t0 = server_cpu(server_pid), time.process_time(), time.perf_counter()
        [done] = stage.process([Task(filename, shard)], ctx)
        results[run] = {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - cpu0,
                        "server_cpu": server_cpu(server_pid) - server0, "events": done.events, "stats": done.stats}
        if spent is not None:
            results[run]["by_statement"] = dict(spent, counters=dict(spent["counters"]))
    results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["state_bytes"] = state_bytes(stage)
    stage.teardown()
    print(orjson.dumps(results).decode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--data", choices=("generator", "harsh"), default="generator")
    ap.add_argument("--batch", type=int, default=8000)
    ap.add_argument("--history", type=int, default=0,
                    help="decide this many events first, in files of --events, then measure the next file")
    ap.add_argument("--private", action="store_true", help="run a mariadbd of the bench's own")
    ap.add_argument("--pool", default=None,
                    help="the private mariadbd's innodb_buffer_pool_size (default: the test servers' 64M; "
                         "the machine's server has 128M)")
    ap.add_argument("--keep", action="store_true", help="keep the database and files")
    ap.add_argument("--shards", type=int, choices=(1, 2), default=1,
                    help="2: a worker per shard at once (each its shard's lines of the same generator run), "
                         "sharing the balances as in the pipeline; the first run only, the server's CPU for both")
    ap.add_argument("--by-statement", action="store_true",
                    help="with --private: the server's CPU per kind of statement, each statement sent alone")
    ap.add_argument("--child", nargs=5, metavar=("URL", "SHARED", "FILE", "BATCH", "PID"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        url, shared, filename, batch, pid = args.child
        child(url, shared, filename, int(batch), int(pid))
        return

    from tests import servers
    options = [f"--innodb-buffer-pool-size={args.pool}"] if args.pool else None
    private = servers.new_private_mariadb(options) if args.private else None
    try:
        run(args, private)
    finally:
        if private:
            private.stop()
            shutil.rmtree(private.datadir, ignore_errors=True)


def both(args, port: int, shared: Path, filename: str, pid: int, db_name: str, load) -> None:
    """A worker per shard at once on one database (the balances shared, as in the pipeline):
    wall time, each worker's CPU, the server's CPU for both, batches decided again."""
    import pymysql
    server0, t0 = server_cpu(pid), time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", f"mysql://root:@127.0.0.1:{port}/{db_name}",
                               str(shared), filename, str(args.batch), str(pid)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, BENCH_SHARD=str(shard), BENCH_NO_REPLAY="1", BENCH_LOG="1"))
             for shard in range(args.shards)]
    outs = [p.communicate() for p in procs]
    wall, server = time.perf_counter() - t0, server_cpu(pid) - server0
    events = 0
    for shard, (p, (out, err)) in enumerate(zip(procs, outs)):
        if p.returncode:
            print(out, err)
            raise SystemExit(p.returncode)
        res = orjson.loads(out.strip().splitlines()[-1])
        files = res["history"] + [res["first"]]
        n = sum(r["events"] if "stats" not in r else r["stats"]["in"] for r in files)
        cpu = sum(r["cpu"] for r in files)
        events += n
        again = err.count("deciding the batch again")
        print(f"shard {shard}: {n:,} events, {n / res['first']['seconds']:,.0f} events/s on the last file; worker CPU "
              f"{cpu / n * 1e6:.1f} µs/event; batches decided again: {again}; stats of the last file "
              f"{orjson.dumps(res['first']['stats']).decode()}")
        for line in [line for line in err.splitlines() if "deciding the batch again" in line][:3]:
            print(f"    {line[:200]}")
    print(f"both: {events:,} events in {wall:.2f}s wall = {events / wall:,.0f} events/s; mariadbd "
          f"{server / events * 1e6:.1f} µs/event (both workers, setup included); load average before: {load[0]:.2f}")
    if not args.keep:
        conn = pymysql.connect(host="127.0.0.1", port=port, user="root", autocommit=True)
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{db_name}`")
        conn.close()
        shutil.rmtree(shared, ignore_errors=True)


def run(args, private) -> None:
    import pymysql
    port = private.port if private else 3306
    shared = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    n_files = 1 + -(-args.history // args.events)
    names = [f"20260101{i // 60:04d}{i % 60:02d}" for i in range(n_files)]
    filename = ",".join(names)
    t0 = time.perf_counter()
    for shard in range(args.shards):
        whole = shared / "all.txt"
        (from_generator if args.data == "generator" else harsh)(whole, args.events * n_files, shard=shard)
        with open(whole, "rb") as f:
            for name in names:
                path = layout.splitter_output(shared, name, shard)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"".join(f.readline() for _ in range(args.events)))
        print(f"{args.data}: {args.events * n_files:,} events of shard {shard} in {n_files} file(s) "
              f"({whole.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
        whole.unlink()
    db_name = f"bench_worker_{uuid.uuid4().hex[:8]}"
    load = os.getloadavg()
    pid = private.proc.pid if private else 0
    if args.shards > 1:
        both(args, port, shared, filename, pid, db_name, load)
        return
    env = dict(os.environ, BENCH_BY_STATEMENT="1" if args.by_statement else "")
    proc = subprocess.run([sys.executable, __file__, "--child", f"mysql://root:@127.0.0.1:{port}/{db_name}",
                           str(shared), filename, str(args.batch), str(pid)], capture_output=True, text=True, env=env)
    if proc.returncode:
        print(proc.stdout, proc.stderr)
        raise SystemExit(proc.returncode)
    res = orjson.loads(proc.stdout.strip().splitlines()[-1])
    n = args.events
    history = res["history"]
    for i, h in enumerate(history):
        server = f", {h['server_cpu'] / h['events'] * 1e6:.1f} in mariadbd" if private else ""
        print(f"history file {i + 1}: {h['events'] / h['seconds']:>9,.0f} events/s; CPU µs/event "
              f"{h['cpu'] / h['events'] * 1e6:.1f} in the worker{server}")
    for which in ("first", "replay"):
        r = res[which]
        server = f", {r['server_cpu']:.2f}s in mariadbd" if private else ""
        print(f"{which:>6}: {n / r['seconds']:>9,.0f} events/s  ({r['seconds']:.2f}s wall; CPU {r['cpu']:.2f}s in the "
              f"worker{server}; accepted {r['events']:,})")
        print(f"        CPU µs/event: {r['cpu'] / n * 1e6:.1f} in the worker"
              + (f", {r['server_cpu'] / n * 1e6:.1f} in mariadbd" if private else ""))
    for which in ("first", "replay"):
        spent = res[which].get("by_statement")
        if spent:
            print(f"{which}: mariadbd CPU µs per event, by statement (--by-statement: each sent alone):")
            counted = spent.pop("counters", {})
            for key, (cpu, count) in sorted(spent.items(), key=lambda kv: -kv[1][0]):
                per = counted.get(key)
                extra = ("  " + " ".join(f"{short}={per[c] / n:.2f}" for c, short in zip(COUNTERS, COUNTER_NAMES))
                         if per else "")
                print(f"    {key:<40} {cpu / n * 1e6:6.2f}  ({count} statements){extra}")
            if counted:
                print("    (BENCH_COUNTERS: per event, " + ", ".join(f"{short} = {c}" for c, short in
                                                                   zip(COUNTERS, COUNTER_NAMES)) + ")")
    print(f"stats: {orjson.dumps(res['first']['stats']).decode()}")
    total = sum(res["state_bytes"].values())
    decided = n * (len(history) + 1)
    print(f"state: {total / 2**20:.1f} MiB in worker_ tables for {decided:,} events = {total / decided:.0f} "
          f"bytes/event (" + ", ".join(f"{t} {b / 2**20:.1f}" for t, b in res["state_bytes"].items()) + ")")
    print(f"peak RSS of the worker process: {res['max_rss_mb']:.0f} MB; batch {args.batch} lines; "
          f"{'private' if private else 'shared'} mariadbd{f' (buffer pool {args.pool})' if args.pool else ''}; "
          f"load average before: {load[0]:.2f}")
    print(f"target: >= 50,000 events/s -> {'met' if n / res['first']['seconds'] >= 50_000 else 'NOT met'}")
    if not args.keep:
        conn = pymysql.connect(host="127.0.0.1", port=port, user="root", autocommit=True)
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{db_name}`")
        conn.close()
        shutil.rmtree(shared, ignore_errors=True)


if __name__ == "__main__":
    main()
