"""How fast mysql-sender loads a prepared file, against the server's own floor.

    .venv/bin/python bench/load.py [--rows 1000000] [--methods load_data,insert] [--repeat N]
                                   [--url mysql://root:@127.0.0.1:3306/x | --private]

Writes one prepared file of `--rows` realistic rows for shard 0, then, each into a fresh shard
database created by the sender's own schema code:
  floor      the server reading the same rows itself: LOAD DATA INFILE (no client, no checks)
             of a TSV prepared untimed beforehand, one transaction;
  <method>   loader.load_file() end to end: read, check every line, convert, send, record
             the file in loaded_files, commit.
One untimed floor run first grows the server's undo and redo files (else the first timed run
pays for it); then `--repeat` rounds, the order flipped every round, and the medians are compared.
Prints rows/s for each and the ratio of each method to the floor (target: load_data >= 0.90).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import db  # noqa: E402
from app.sender import loader  # noqa: E402
from app.config import MySQLURL  # noqa: E402
from app.events import event_key  # noqa: E402
from app.supervision.embedded_mariadb import EmbeddedMariaDB  # noqa: E402

SOURCE = "20990101000000"


def prepared_rows(n: int, shard: int = 0, shard_count: int = 2, seed: int = 7):
    """Prepared lines like the worker writes: the generator's mix of the five event types."""
    rnd = random.Random(seed)
    base = 4_102_444_800_000  # 2100-01-01 in ms
    for i in range(n):
        shop = rnd.randrange(0, 500) * shard_count + shard
        user = rnd.randrange(1, 100_000)
        good = rnd.randrange(1, 5000)
        ms = base + i * 3
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"
        kind = rnd.random()
        order = user_id = qty = amount = None
        if kind < 0.55:
            etype, order, user_id, qty = 1, rnd.randrange(-(1 << 63), 1 << 63), user, rnd.randrange(1, 5)
            price = rnd.randrange(100, 100_000) / 100
            amount = f"{price:.2f}"
            payload = {"order_id": order, "user_id": user, "shop_id": shop, "good_id": good, "qty": qty,
                       "price_at_order": price}
        elif kind < 0.65:
            etype, order, user_id, qty = 3, rnd.randrange(-(1 << 63), 1 << 63), user, 1
            refund = rnd.randrange(100, 100_000) / 100
            amount = f"{refund:.2f}"
            payload = {"order_id": order, "user_id": user, "good_id": good, "qty": qty, "refund_amount": refund}
        elif kind < 0.85:
            etype, qty = 0, rnd.randrange(1, 50)
            payload = {"shop_id": shop, "good_id": good, "delta_count": qty, "reason": "bench restock",
                       "sub_event_type": "restock"}
        elif kind < 0.97:
            etype = 2
            price = rnd.randrange(100, 100_000) / 100
            amount = f"{price:.2f}"
            payload = {"shop_id": shop, "good_id": good, "new_price": price}
        else:
            etype = 4
            payload = {"shop_id": shop, "active": rnd.random() < 0.5}
        event = {"event_type": etype, "payload": payload, "timestamp": ts}
        yield orjson.dumps({
            "event_key": event_key(event), "event_type": etype, "shop_id": shop, "user_id": user_id,
            "timestamp": ts, "shard": shard, "order_id": order, "good_id": good, "qty": qty, "amount": amount,
            "source_file": SOURCE, "payload": payload}) + b"\n"


def fresh_database(server: MySQLURL, label: str) -> MySQLURL:
    url = server.with_database(f"bench_{label}_{uuid.uuid4().hex[:8]}")
    loader.prepare_database(url)
    return url


def drop(url: MySQLURL) -> None:
    conn = db.connect(url, database=None)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
    conn.close()


def count(url: MySQLURL) -> int:
    conn = db.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM events")
        n = cur.fetchone()[0]
    conn.close()
    return n


def run_floor(server: MySQLURL, prepared: Path, work: Path, rows: int) -> float:
    tsv = work / "floor.tsv"
    with open(prepared, "rb") as f, open(tsv, "w", encoding="utf-8") as out:
        for line_no, line in enumerate(f, 1):
            out.write(loader._tsv(loader.check_line(line, line_no, SOURCE, 0, 2)))
    tsv.chmod(0o644)
    url = fresh_database(server, "floor")
    try:
        conn = db.connect(url, autocommit=False)
        with conn.cursor() as cur:
            sql = loader._LOAD_DATA.replace("LOCAL INFILE", "INFILE")
            started = time.monotonic()
            conn.begin()
            cur.execute(sql, (str(tsv), 0, SOURCE))
            conn.commit()
            seconds = time.monotonic() - started
        conn.close()
        assert count(url) == rows, "the floor load lost rows"
        return seconds
    finally:
        drop(url)
        tsv.unlink(missing_ok=True)


def run_method(server: MySQLURL, prepared: Path, work: Path, rows: int, method: str) -> float:
    url = fresh_database(server, method)
    try:
        conn = db.connect(url, autocommit=False, local_infile=True)
        started = time.monotonic()
        result = loader.load_file(conn, prepared, SOURCE, 0, 2, method=method)
        seconds = time.monotonic() - started
        conn.close()
        assert result.loaded == rows and count(url) == rows, f"{method} stored {result.loaded} of {rows} rows"
        assert result.method == method, f"{method} fell back to {result.method}"
        return seconds
    finally:
        drop(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--methods", default="load_data,insert")
    parser.add_argument("--repeat", type=int, default=1, help="alternate floor and methods this many times")
    parser.add_argument("--url", default=os.environ.get("BENCH_MYSQL_URL", "mysql://root:@127.0.0.1:3306/bench"),
                        help="server to use (the database part is ignored)")
    parser.add_argument("--private", action="store_true",
                        help="start a private mariadbd (128 MB buffer pool) for the run, away from other users "
                             "of the shared server")
    args = parser.parse_args()
    private = None
    if args.private:
        private = EmbeddedMariaDB(Path(tempfile.mkdtemp(prefix="bench-load-db-")))
        private.start()
        server = private.url("bench")
        print(f"private mariadbd on port {server.port}")
    else:
        server = MySQLURL.parse("--url", args.url)
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    work.chmod(0o755)  # the server's LOAD DATA INFILE reads the floor's TSV from here
    prepared = work / f"{SOURCE}.shard-worker.0.prepared.txt"
    started = time.monotonic()
    with open(prepared, "wb") as out:
        for line in prepared_rows(args.rows):
            out.write(line)
    size = prepared.stat().st_size
    print(f"prepared file: {args.rows:,} rows, {size / 1e6:.0f} MB, written in {time.monotonic() - started:.1f}s")
    print(f"load: {os.getloadavg()[0]:.2f} (1-min load average, {os.cpu_count()} CPUs)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    times: dict[str, list[float]] = {"floor": [], **{m: [] for m in methods}}
    try:
        warm = run_floor(server, prepared, work, args.rows)  # grows undo/redo files once: not timed
        print(f"  warm-up    {warm:6.2f}s  (untimed)", flush=True)
        for r in range(args.repeat):  # alternated, so outside load and server state hit all sides alike
            order = ["floor", *methods] if r % 2 == 0 else [*methods, "floor"]
            for kind in order:
                if kind == "floor":
                    times[kind].append(run_floor(server, prepared, work, args.rows))
                else:
                    times[kind].append(run_method(server, prepared, work, args.rows, kind))
                print(f"  {kind:<10} {times[kind][-1]:6.2f}s  (load {os.getloadavg()[0]:.2f})", flush=True)
        floor = statistics.median(times["floor"])
        print(f"floor      LOAD DATA INFILE by the server: {floor:6.2f}s  {args.rows / floor:9,.0f} rows/s"
              f"  (median of {args.repeat})")
        for method in methods:
            seconds = statistics.median(times[method])
            print(f"{method:<10} loader.load_file:         {seconds:6.2f}s  {args.rows / seconds:9,.0f} rows/s"
                  f"  ratio to floor {floor / seconds:.2f}")
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
        if private is not None:
            private.stop()
            shutil.rmtree(private.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
