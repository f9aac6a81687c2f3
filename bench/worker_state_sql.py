"""Server CPU per state row the worker writes: INSERT ... VALUES texts against LOAD DATA LOCAL
INFILE from memory (`db.load_local`), same rows, same transaction shape, alternated.

    .venv/bin/python bench/worker_state_sql.py [--rounds 40] [--rows 4000] [--pool 128M]

A private mariadbd (so only this bench's statements count), two databases with the worker's
schema (db/migrations/worker), one per variant. Each round writes a batch of dedup keys
(`worker_seen`: a minute, random 64-bit hashes), a batch of ledger rows (`worker_orders`:
appended by (file, line), random order ids) and the balances of the batch's users
(`worker_balances`: locked FOR UPDATE, then written; users drawn from a growing population), in
one transaction per variant, committed; the variants take turns going first. Prints the
server's and the client's CPU per row, by table, from /proc.
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


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch(rng, i, rows):
    seen = [(1000 + i // 4, rng.getrandbits(64) - (1 << 63)) for _ in range(rows)]
    orders = [(i, n + 1, rng.getrandbits(63), rng.randint(1, 100), rng.getrandbits(64) - (1 << 63), rng.randint(1, 3),
               Decimal(rng.randint(100, 99999)) / 100, 1) for n in range(rows)]
    top = 5000 + i * rows // 3
    users = sorted({rng.randint(1, top) for _ in range(rows)})
    return seen, orders, users


PARTS: dict = {}


def mark(name, part, t0):
    """Add the server CPU since `t0` to (name, part); the new mark."""
    now = cpu(PID)
    PARTS[(name, part)] = PARTS.get((name, part), 0.0) + now - t0
    return now


def values(conn, cur, seen, orders, users, balances):
    t = cpu(PID)
    n = cur.execute(db.insert_statements(conn, "INSERT INTO worker_seen (shard, bucket, hash) VALUES ", seen,
                                         " ON DUPLICATE KEY UPDATE hash=hash",
                                         render=lambda k: "(0,%d,%d)" % k)[0])
    assert n == len(seen), n
    t = mark("values", "seen", t)
    n = cur.execute(db.insert_statements(conn, "INSERT INTO worker_orders (shard, file_id, line, order_id, shop_id, "
                                               "buyer, qty, amount, state) VALUES ", orders,
                                         " ON DUPLICATE KEY UPDATE order_id=order_id",
                                         render=lambda o: "(0,%d,%d,%d,%d,%d,%d,%s,%d)" % o)[0])
    assert n == len(orders), n
    t = mark("values", "orders", t)
    cur.execute(db.insert_statements(conn, "INSERT INTO worker_balances (user_id, balance) VALUES ",
                                     [(u, balances[u]) for u in users],
                                     " ON DUPLICATE KEY UPDATE balance=VALUES(balance)",
                                     render=lambda r: "(%d,%s)" % r)[0])
    mark("values", "balances", t)


def loads(conn, cur, seen, orders, users, balances):
    t = cpu(PID)
    data = "".join("%d\t%d\n" % k for k in seen).encode()
    n = db.load_local(cur, "LOAD DATA LOCAL INFILE 'seen' INTO TABLE worker_seen (bucket, hash) SET shard=0",
                      None, "seen", data)
    assert n == len(seen), n
    t = mark("loads", "seen", t)
    data = "".join("%d\t%d\t%d\t%d\t%d\t%d\t%s\t%d\n" % o for o in orders).encode()
    n = db.load_local(cur, "LOAD DATA LOCAL INFILE 'orders' INTO TABLE worker_orders "
                           "(file_id, line, order_id, shop_id, buyer, qty, amount, state) SET shard=0",
                      None, "orders", data)
    assert n == len(orders), n
    t = mark("loads", "orders", t)
    data = "".join("%d\t%s\n" % (u, balances[u]) for u in users).encode()
    db.load_local(cur, "LOAD DATA LOCAL INFILE 'bal' REPLACE INTO TABLE worker_balances (user_id, balance)",
                  None, "bal", data)
    mark("loads", "balances", t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--pool", default="128M")
    args = ap.parse_args()
    from tests import servers
    server = servers.new_private_mariadb([f"--innodb-buffer-pool-size={args.pool}"])
    try:
        run(args, server)
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)


def run(args, server) -> None:
    global PID
    pid = PID = server.proc.pid
    conns = {}
    for name in ("values", "loads"):
        url = MySQLURL.parse("BENCH", f"mysql://root:@127.0.0.1:{server.port}/bench_{name}")
        db.ensure_database(url)
        conn = db.connect(url, local_infile=True, multi_statements=True)
        db.migrate(conn, "worker")
        conns[name] = conn
    fns = {"values": values, "loads": loads}
    totals = {k: [0.0, 0.0] for k in fns}
    rng = random.Random(5)
    parts = {k: {"seen": 0.0, "orders": 0.0, "balances": 0.0} for k in fns}
    for i in range(args.rounds):
        seen, orders, users = batch(rng, i, args.rows)
        order = ("values", "loads") if i % 2 else ("loads", "values")
        for name in order:
            conn = conns[name]
            with conn.cursor() as cur:
                s0, c0 = cpu(pid), time.process_time()
                conn.begin()
                t = cpu(pid)
                cur.execute("SELECT COUNT(*), GROUP_CONCAT(user_id, ' ', balance) FROM worker_balances "
                            "WHERE user_id IN "
                            + db.sql_list(conn, users) + " FOR UPDATE")
                cur.fetchall()
                mark(name, "lock", t)
                balances = {u: Decimal(rng.randint(0, 10**6)) / 100 for u in users}
                fns[name](conn, cur, seen, orders, users, balances)
                t = cpu(pid)
                conn.commit()
                mark(name, "commit", t)
                s1, c1 = cpu(pid), time.process_time()
                if i >= 2:
                    totals[name][0] += s1 - s0
                    totals[name][1] += c1 - c0
    n = (args.rounds - 2) * args.rows
    for name, (server_s, client_s) in totals.items():
        print(f"{name:>7}: server {server_s / n * 1e6:.2f} µs per (key + order + balance), client "
              f"{client_s / n * 1e6:.2f} µs")
    for (name, part), v in sorted(PARTS.items()):
        print(f"  {name:>7} {part:>9}: {v / (args.rounds * args.rows) * 1e6:.2f} µs per row (all rounds)")
    print(f"rows per table per round {args.rows}, rounds {args.rounds}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
