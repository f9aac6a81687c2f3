"""Server CPU per credit on the ledger (`worker_orders`): three statement shapes for the same
credits, alternated, each on a database of its own with the same rows.

    .venv/bin/python bench/worker_credits.py [--rows 300000] [--credits 2000] [--rounds 30]

A private mariadbd (128 MiB pool; only this bench's statements count). Each database gets the
worker's schema and `--rows` debited orders (files of 10,000 lines, random 63-bit order ids).
Each round credits `--credits` orders drawn at random (each once over the run), in one
transaction per shape, the shapes taking turns going first:

- `odku`: `INSERT ... VALUES (the whole row) ON DUPLICATE KEY UPDATE state=IF(state=1, 2, state)`
  (the worker's credits before the eighth round; 2 rows a credit);
- `order_id`: `UPDATE ... SET state=2 WHERE state=1 AND order_id IN (...)` (the worker's now);
- `key`: the same through the primary key, `(shard, file_id, line) IN (...)`.

Prints the server's CPU per credit for each, from /proc.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import db  # noqa: E402
from app.config import MySQLURL  # noqa: E402
from bench.worker_state_sql import cpu  # noqa: E402

SHAPES = ("odku", "order_id", "key")


def credit_sql(shape: str, rows: list) -> tuple[str, int]:
    """The statement crediting `rows` (as loaded), and the rows it must count."""
    if shape == "odku":
        return ("INSERT INTO worker_orders (shard, file_id, line, order_id, shop_id, buyer, qty, amount, state) VALUES "
                + ",".join("(0,%d,%d,%d,%d,%d,%d,%s,2)" % r[:7] for r in rows)
                + " ON DUPLICATE KEY UPDATE state=IF(state=1, 2, state)", 2 * len(rows))
    if shape == "order_id":
        return ("UPDATE worker_orders SET state=2 WHERE state=1 AND order_id IN ("
                + ",".join("%d" % r[2] for r in rows) + ")", len(rows))
    return ("UPDATE worker_orders SET state=2 WHERE state=1 AND (shard, file_id, line) IN ("
            + ",".join("(0,%d,%d)" % r[:2] for r in rows) + ")", len(rows))


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--credits", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    if args.credits * args.rounds > args.rows:
        ap.error("--credits x --rounds must not exceed --rows (each order is credited once)")
    from tests import servers
    server = servers.new_private_mariadb(["--innodb-buffer-pool-size=128M"])
    try:
        return run(args, server)
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)


def run(args, server) -> dict[str, float]:
    pid = server.proc.pid
    rng = random.Random(3)
    rows = [(i // 10_000 + 1, i % 10_000 + 1, rng.getrandbits(63), rng.randint(0, 50) * 2,
             rng.getrandbits(64) - (1 << 63), rng.randint(1, 3), Decimal(rng.randint(100, 99999)) / 100, 1)
            for i in range(args.rows)]
    data = "".join("%d\t%d\t%d\t%d\t%d\t%d\t%s\t%d\n" % r for r in rows).encode()
    conns = {}
    for shape in SHAPES:
        url = MySQLURL.parse("BENCH", f"mysql://root:@127.0.0.1:{server.port}/bench_credits_{shape}")
        db.ensure_database(url)
        conn = conns[shape] = db.connect(url, local_infile=True, multi_statements=True)
        db.migrate(conn, "worker")
        with conn.cursor() as cur:
            conn.begin()
            db.load_local(cur, "LOAD DATA LOCAL INFILE 'orders' INTO TABLE worker_orders (file_id, line, order_id, "
                               "shop_id, buyer, qty, amount, state) SET shard=0", None, "orders", data)
            conn.commit()
    picks = list(range(args.rows))
    rng.shuffle(picks)
    spent = dict.fromkeys(SHAPES, 0.0)
    for r in range(args.rounds):
        chosen = [rows[i] for i in sorted(picks[r * args.credits:(r + 1) * args.credits], key=lambda i: rows[i][2])]
        for shape in SHAPES[r % 3:] + SHAPES[:r % 3]:
            conn = conns[shape]
            sql, want = credit_sql(shape, chosen)
            with conn.cursor() as cur:
                t0 = cpu(pid)
                conn.begin()
                got = cur.execute(sql)
                conn.commit()
                if r:
                    spent[shape] += cpu(pid) - t0
            if got != want:
                raise AssertionError(f"{shape}: {got} rows counted, {want} expected")
    figures = {}
    for shape, conn in conns.items():
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM worker_orders WHERE state=2")
            figures[shape] = (cur.fetchone()[0], spent[shape] / max(1, (args.rounds - 1) * args.credits) * 1e6)
        conn.close()
    for shape, (credited, us) in figures.items():
        print(f"{shape:>8}: {us:.2f} µs of server CPU per credit ({credited:,} orders credited)")
    print(f"{args.rows:,} orders, {args.credits:,} credits a round, {args.rounds} rounds (the first not counted); "
          f"load {os.getloadavg()[0]:.2f}")
    return figures


if __name__ == "__main__":
    main()
