"""Bytes per row of the worker's ledger and balances under each candidate schema, filled the
way the worker fills them (prints figures; not a test).

    .venv/bin/python bench/worker_state_size.py [--orders 600000] [--users 400000] [--batch 2250]

Orders come in batches of `--batch` (a 5,000-line batch holds ~45% purchases), with random
64-bit order ids and (file, line) growing; balances are users 1..N created in ascending order
(the generator's new customers) and then updated in place. Each figure is data + index length
after ANALYZE TABLE, and the server's CPU seconds spent filling the table (from /proc).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import subprocess  # noqa: E402

from bench.procstat import cpu_seconds  # noqa: E402
from tests import servers  # noqa: E402

ORDERS = {
    "0003: clustered (shard, file, line) + UNIQUE(order_id), full columns": (
        "CREATE TABLE t (shard TINYINT NOT NULL, file_id INT NOT NULL, line INT NOT NULL, order_id BIGINT NOT NULL,"
        " user_id BIGINT NOT NULL, shop_id BIGINT NOT NULL, good_id BIGINT NOT NULL, qty INT NOT NULL,"
        " amount DECIMAL(18,2) NOT NULL, debited TINYINT(1) NOT NULL, credit DECIMAL(18,2) NULL,"
        " PRIMARY KEY (shard, file_id, line), UNIQUE KEY uq_order (order_id)) ENGINE=InnoDB",
        lambda s, f, l, o, r: "(%d,%d,%d,%d,%d,%d,%d,%d,%s,1,NULL)" % (s, f, l, o, r.getrandbits(20), r.getrandbits(20),
                                                                      r.getrandbits(10), 2, "12.50")),
    "0004: clustered (shard, file, line) + UNIQUE(order_id), needed columns": (
        "CREATE TABLE t (shard TINYINT NOT NULL, file_id INT NOT NULL, line INT NOT NULL, order_id BIGINT NOT NULL,"
        " shop_id BIGINT NOT NULL, buyer BIGINT NOT NULL, qty INT NOT NULL, amount DECIMAL(15,2) NOT NULL,"
        " state TINYINT NOT NULL, PRIMARY KEY (shard, file_id, line), UNIQUE KEY uq_order (order_id)) ENGINE=InnoDB",
        lambda s, f, l, o, r: "(%d,%d,%d,%d,%d,%d,%d,%s,1)" % (s, f, l, o, r.getrandbits(20), r.getrandbits(63), 2,
                                                               "12.50")),
    "clustered (order_id), needed columns (pruning by file would scan it)": (
        "CREATE TABLE t (order_id BIGINT NOT NULL PRIMARY KEY, shard TINYINT NOT NULL, file_id INT NOT NULL,"
        " shop_id BIGINT NOT NULL, buyer BIGINT NOT NULL, qty INT NOT NULL, amount DECIMAL(15,2) NOT NULL,"
        " state TINYINT NOT NULL) ENGINE=InnoDB",
        lambda s, f, l, o, r: "(%d,%d,%d,%d,%d,%d,%s,1)" % (o, s, f, r.getrandbits(20), r.getrandbits(63), 2, "12.50")),
}

BALANCES = {
    "0003: user_id, balance, updated_at": (
        "CREATE TABLE t (user_id BIGINT NOT NULL PRIMARY KEY, balance DECIMAL(18,2) NOT NULL, updated_at DATETIME(3)"
        " NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)) ENGINE=InnoDB"),
    "0004: user_id, balance": (
        "CREATE TABLE t (user_id BIGINT NOT NULL PRIMARY KEY, balance DECIMAL(18,2) NOT NULL) ENGINE=InnoDB"),
}


def size_of(cur) -> int:
    cur.execute("ANALYZE TABLE t")
    cur.fetchall()
    cur.execute("SELECT data_length + index_length FROM information_schema.tables WHERE table_schema=DATABASE() "
                "AND table_name='t'")
    return int(cur.fetchone()[0])


def server_cpu() -> float:
    """The CPU seconds of the machine's mariadbd (shared with other users: compare runs made
    one after another)."""
    pids = subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True, text=True).stdout.split()
    return sum(cpu_seconds(int(pid)) for pid in pids)


def fill(ddl: str, statements) -> tuple[int, float]:
    name = servers.unique_name("wsize")
    conn = servers.admin_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
            cur.execute(f"USE `{name}`")
            cur.execute(ddl)
            before = server_cpu()
            for sql in statements:
                cur.execute(sql)
                conn.commit()
            return size_of(cur), server_cpu() - before
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def order_statements(render, orders: int, batch: int):
    rng = random.Random(1)
    line = 0
    for start in range(0, orders, batch):
        rows = []
        for _ in range(min(batch, orders - start)):
            line += 2
            rows.append(render(0, 1 + line // 10_000, line % 10_000, rng.randrange(-2**63, 2**63), rng))
        yield "INSERT INTO t VALUES " + ",".join(rows)


def balance_statements(users: int, batch: int):
    rng = random.Random(2)
    for start in range(1, users + 1, batch):
        new = range(start, min(start + batch, users + 1))
        old = sorted({rng.randint(1, start) for _ in range(batch)} - set(new))
        yield "INSERT INTO t (user_id, balance) VALUES " + ",".join("(%d,1000.00)" % u for u in new)
        if old:
            yield ("INSERT INTO t (user_id, balance) VALUES " + ",".join("(%d,987.50)" % u for u in old)
                   + " ON DUPLICATE KEY UPDATE balance=VALUES(balance)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=600_000)
    parser.add_argument("--users", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=2_250)
    parser.add_argument("--only", default="", help="run only the schemas whose label contains this text")
    args = parser.parse_args()
    for label, (ddl, render) in ORDERS.items():
        if args.only in label:
            size, cpu = fill(ddl, order_statements(render, args.orders, args.batch))
            print(f"worker_orders   {label:<72} {size / args.orders:6.1f} B/order, server "
                  f"{cpu / args.orders * 1e6:5.1f} us/order", flush=True)
    for label, ddl in BALANCES.items():
        if args.only in label:
            size, cpu = fill(ddl, balance_statements(args.users, args.batch))
            print(f"worker_balances {label:<72} {size / args.users:6.1f} B/user, server "
                  f"{cpu / args.users * 1e6:5.1f} us/user", flush=True)


if __name__ == "__main__":
    main()
