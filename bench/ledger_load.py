"""Server CPU per ledger row (`worker_orders`) for candidate keys of the table: the new orders'
LOAD DATA, the orders read, the credits and the pruning, same rows, alternated.

    .venv/bin/python bench/ledger_load.py [--prefill 200000] [--rows 4300] [--rounds 60]
                                          [--variants today,by_order,bare]

A private mariadbd (128 MiB pool; only this bench's statements count), one database per
variant, each holding only `worker_orders` in that variant's form:

- `today`: clustered by (shard, file_id, line), appended; a unique `uq_order (order_id)` (the
  worker's table since migration 0003);
- `by_order`: clustered by the order id (its uniqueness checked in the one insert), and a
  non-unique `(shard, file_id)` index, appended, for pruning by file;
- `bare`: clustered by the order id, no second index (how cheap one tree is: pruning would have
  to find the rows another way).

Each database is first filled with `--prefill` rows (files of 10,000 lines, ~0.43 of them
purchases, random 63-bit order ids). Then each round is one "file": `--rows` new ledger rows by
`LOAD DATA LOCAL` (the worker's statement), a read of `--rows`/2 order ids (half of them stored,
as the worker's orders read of returns and possible duplicates), and credits of `--rows`/10
stored orders (`UPDATE ... WHERE order_id IN`), one transaction per variant, the variants
taking turns going first. Last, pruning: the first `--prune-files` files deleted by file
(`today`, `by_order`; `bare` by order id lists, as a packed per-file list would give them),
the purge waited for. Prints the server's CPU per row of each part, and each table's bytes a
row (data + index after ANALYZE), from /proc and information_schema.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import db  # noqa: E402
from app.config import MySQLURL  # noqa: E402
from bench.worker_state_sql import cpu  # noqa: E402

COLUMNS = """  shard TINYINT NOT NULL,
  file_id INT NOT NULL,
  line INT NOT NULL,
  order_id BIGINT NOT NULL,
  shop_id BIGINT NOT NULL,
  buyer BIGINT NOT NULL,
  qty INT NOT NULL,
  amount DECIMAL(15,2) NOT NULL,
  state TINYINT NOT NULL,
"""
TODAY_KEYS = "PRIMARY KEY (shard, file_id, line), UNIQUE KEY uq_order (order_id)"
LOAD = ("LOAD DATA LOCAL INFILE 'worker_orders' INTO TABLE worker_orders (file_id, line, order_id, shop_id, buyer, "
        "qty, amount, state) SET shard=0")
# name: (the table's keys, its columns, the load statement, how a row is rendered)
ROW = "%d\t%d\t%d\t%d\t%d\t%d\t%s\t%d\n"
VARIANTS = {
    "today": (TODAY_KEYS, COLUMNS, LOAD, lambda r: ROW % r),
    "by_order": ("PRIMARY KEY (order_id), KEY ix_file (shard, file_id)", COLUMNS, LOAD, lambda r: ROW % r),
    "bare": ("PRIMARY KEY (order_id)", COLUMNS, LOAD, lambda r: ROW % r),
    # today's keys, the shard a field of each row instead of the load's SET
    "shard_col": (TODAY_KEYS, COLUMNS, LOAD.replace("(file_id", "(shard, file_id").replace(" SET shard=0", ""),
                  lambda r: "0\t" + ROW % r),
    # today's load with IGNORE said (LOAD DATA LOCAL ignores duplicates anyway: the same path?)
    "ignore": (TODAY_KEYS, COLUMNS, LOAD.replace(" INTO TABLE", " IGNORE INTO TABLE"), lambda r: ROW % r),
    # today's keys, the amount in cents (BIGINT), qty a SMALLINT: integers only to convert
    "cents": (TODAY_KEYS, COLUMNS.replace("amount DECIMAL(15,2)", "amount BIGINT").replace("qty INT", "qty SMALLINT"),
              LOAD, lambda r: ROW % (r[:6] + (int(r[6] * 100),) + r[7:])),
    # today's table, the load sending only the keys and the state (the other columns their
    # defaults): what parsing the four other fields costs (a lower bound, not a schema)
    "few_fields": (TODAY_KEYS, "  shard TINYINT NOT NULL, file_id INT NOT NULL, line INT NOT NULL, order_id BIGINT NOT NULL,\n"
                  "  state TINYINT NOT NULL DEFAULT 1, shop_id BIGINT NOT NULL DEFAULT 0, buyer BIGINT NOT NULL DEFAULT 0,\n"
                  "  qty INT NOT NULL DEFAULT 0, amount DECIMAL(15,2) NOT NULL DEFAULT 0,\n",
                  LOAD.replace("shop_id, buyer, qty, amount, state", "state"), lambda r: "%d\t%d\t%d\t%d\n" % (r[:3] + r[7:])),
}
PARTS = ("load", "read", "credit")


def file_rows(rng, file_id: int, rows: int) -> list[tuple]:
    lines = sorted(rng.sample(range(1, 10_001), rows))
    return [(file_id, line, rng.getrandbits(63), rng.randint(0, 50) * 2, rng.getrandbits(64) - (1 << 63),
             rng.randint(1, 3), Decimal(rng.randint(100, 99999)) / 100, 1) for line in lines]


def render(rows, name: str = "today") -> bytes:
    fmt = VARIANTS[name][3]
    return "".join(fmt(r) for r in rows).encode()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=200_000)
    ap.add_argument("--rows", type=int, default=4300, help="new ledger rows a round (a 10,000-event file)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--prune-files", type=int, default=20)
    ap.add_argument("--settle", type=float, default=5, help="seconds waited for the purge (prefill, each prune)")
    ap.add_argument("--variants", default="today,by_order,bare", help="of " + ",".join(VARIANTS))
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    from tests import servers
    server = servers.new_private_mariadb(["--innodb-buffer-pool-size=128M"])
    try:
        return run(args, server, variants)
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)


def run(args, server, variants) -> dict:
    pid = server.proc.pid
    rng = random.Random(5)
    prefill_files = [file_rows(rng, f + 1, 4300) for f in range(max(1, args.prefill // 4300))]
    conns = {}
    for name in variants:
        url = MySQLURL.parse("BENCH", f"mysql://root:@127.0.0.1:{server.port}/bench_ledger_{name}")
        db.ensure_database(url)
        conn = conns[name] = db.connect(url, local_infile=True)
        with conn.cursor() as cur:
            keys, columns, load, _ = VARIANTS[name]
            cur.execute(f"CREATE TABLE worker_orders (\n{columns}  {keys}\n) ENGINE=InnoDB")
            for rows in prefill_files:
                conn.begin()
                db.load_local(cur, load, None, "worker_orders", render(rows, name))
                conn.commit()
    stored = [r for rows in prefill_files for r in rows]
    next_file = len(prefill_files) + 1
    spent = {(v, p): 0.0 for v in variants for p in PARTS}
    counted = dict.fromkeys(PARTS, 0)
    credited: set[int] = set()
    time.sleep(args.settle)   # the prefill's purge and flushing out of the way
    for r in range(args.rounds):
        rows = file_rows(rng, next_file, args.rows)
        next_file += 1
        data = {name: render(rows, name) for name in variants}
        known = {rng.choice(stored)[2] for _ in range(args.rows // 4)}
        reads = sorted(known | {rng.getrandbits(63) for _ in range(args.rows // 4)})
        credits = []
        while len(credits) < args.rows // 10:
            o = rng.choice(stored)[2]
            if o not in credited:
                credited.add(o)
                credits.append(o)
        credits.sort()
        read_sql = ("SELECT order_id, shop_id, buyer, qty, amount, state, file_id, line FROM worker_orders "
                    "WHERE order_id IN (" + ",".join(map(str, reads)) + ")")
        credit_sql = "UPDATE worker_orders SET state=2 WHERE state=1 AND order_id IN (" + ",".join(map(str, credits)) + ")"
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name in order:
            conn = conns[name]
            with conn.cursor() as cur:
                conn.begin()
                t0 = cpu(pid)
                n = db.load_local(cur, VARIANTS[name][2], None, "worker_orders", data[name])
                t1 = cpu(pid)
                cur.execute(read_sql)
                got = len(cur.fetchall())
                t2 = cpu(pid)
                c = cur.execute(credit_sql)
                t3 = cpu(pid)
                conn.commit()
            if n != len(rows) or c != len(credits) or got < len(known):
                raise AssertionError(f"{name}: {n} rows loaded, {got} read, {c} credited")
            spent[(name, "load")] += t1 - t0
            spent[(name, "read")] += t2 - t1
            spent[(name, "credit")] += t3 - t2
        counted["load"] += len(rows)
        counted["read"] += len(reads)
        counted["credit"] += len(credits)
        stored.extend(rows)
    figures = {}
    for name in variants:
        figures[name] = {p: spent[(name, p)] / counted[p] * 1e6 for p in PARTS}
    # pruning: the first files, with their purge (the server's CPU over the same wait for each)
    time.sleep(args.settle)
    by_file: dict[int, list[int]] = {}
    for row in prefill_files[:args.prune_files]:
        for rr in row:
            by_file.setdefault(rr[0], []).append(rr[2])
    pruned = sum(len(v) for v in by_file.values())
    for name in variants:
        conn = conns[name]
        t0 = cpu(pid)
        with conn.cursor() as cur:
            for file_id, ids in sorted(by_file.items()):
                conn.begin()
                if name == "bare":
                    cur.execute("DELETE FROM worker_orders WHERE order_id IN (" + ",".join(map(str, sorted(ids))) + ")")
                else:
                    cur.execute("DELETE FROM worker_orders WHERE shard=0 AND file_id <= %s", (file_id,))
                conn.commit()
        time.sleep(args.settle)
        figures[name]["prune"] = (cpu(pid) - t0) / pruned * 1e6
        with conn.cursor() as cur:
            cur.execute("ANALYZE TABLE worker_orders")
            cur.fetchall()
            cur.execute("SELECT COUNT(*), SUM(state = 2) FROM worker_orders")
            total, credited_rows = cur.fetchone()
        figures[name]["rows"], figures[name]["credited"] = total, int(credited_rows or 0)
        with conn.cursor() as cur:
            cur.execute("SELECT data_length, index_length FROM information_schema.tables "
                        "WHERE table_schema=DATABASE() AND table_name='worker_orders'")
            data, index = cur.fetchone()
        figures[name]["bytes"] = (data + index) / total
        figures[name]["data_bytes"], figures[name]["index_bytes"] = data / total, index / total
        conn.close()
    t0 = cpu(pid)
    time.sleep(args.settle)
    idle = (cpu(pid) - t0) / max(1, pruned) * 1e6
    print(f"{'variant':>9} {'load µs/row':>12} {'read µs/id':>11} {'credit µs':>10} {'prune µs/row':>13} "
          f"{'B/row (data+index)':>20}")
    for name, f in figures.items():
        print(f"{name:>9} {f['load']:12.2f} {f['read']:11.2f} {f['credit']:10.2f} {f['prune']:13.2f} "
              f"{f['bytes']:8.1f} ({f['data_bytes']:.1f}+{f['index_bytes']:.1f})")
    print(f"{args.prefill:,} rows first, {args.rounds} rounds of {args.rows:,} rows, {args.rows // 2:,} ids read "
          f"and {args.rows // 10:,} credits; prune {pruned:,} rows (idle over the same wait: {idle:.2f} µs/row); "
          f"load {os.getloadavg()[0]:.2f}")
    return figures


if __name__ == "__main__":
    main()
