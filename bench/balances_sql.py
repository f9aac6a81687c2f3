"""Server CPU of a batch's balance statements, in the shapes a worker could send them, alternated.

    .venv/bin/python bench/balances_sql.py [--old 300000] [--young 20000] [--users 2700] [--rounds 40]

A private mariadbd (128 MiB pool; only this bench's statements count) and one database with the
worker's schema: `--old` users sealed in `worker_balances` (ids 1..old, `worker_ledger`'s bound
above them) and `--young` in `worker_balances_young` just above. Each round draws a batch of
`--users`: a quarter old users, a fifth known young ones, the rest new (ids above every table's,
fresh each round: a fresh big file's mix, ~0.34 users an event at 8,000 lines a batch). Each
shape runs in a transaction of its own, rolled back (the state is the same for every shape and
round), the shapes taking turns going first; only the measured statement is in the CPU window.

The locking read (the balances of the batch's users, `Ledger.lock_sql`):
- `read_both`: every user looked up in both tables (the worker's before the tenth round);
- `read_bound`: `worker_balances` only for users below the ledger's bound (none above it is
  there), the young table for all.

The balance writes of users the batch read (after the locking read, outside the window):
- `young_replace` / `main_replace`: `LOAD DATA ... REPLACE` (an insert attempt, a read of the
  duplicate, an update: the worker's);
- `young_odku` / `main_odku`: `INSERT ... VALUES ... ON DUPLICATE KEY UPDATE` (the worker's
  path without LOAD DATA LOCAL);
- `young_json` / `main_json`: one `UPDATE` joined to the values as `JSON_TABLE` (one descent a
  user).

Prints the server's CPU per user of the batch (reads) or per user written, from /proc; each
round checks that both reads found the same balances and that each write stored them.
"""
from __future__ import annotations

import argparse
import json
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
from app.worker import ledger as L  # noqa: E402
from bench.worker_state_sql import cpu  # noqa: E402

READS = ("read_both", "read_bound")
WRITES = ("replace", "odku", "json")


def read_sql(conn, shape: str, users: list[int], bound: int) -> str:
    """The worker's locking read: before the ledger's bound is known (both tables for every
    user), or after (`worker_balances` only for users at or below it)."""
    ledger = L.Ledger(Decimal(0))
    if shape == "read_bound":
        ledger.bound = bound
    return ledger.lock_sql(conn, users)


def packed(rows) -> dict[int, str]:
    out = {}
    for tag, count, text in rows:
        if count:
            t = text.decode() if type(text) is bytes else text
            parts = t.split(" ")
            out.update(zip(map(int, parts[0::2]), parts[1::2]))
    return out


def write(cur, shape: str, table: str, users: list[int], balances: dict[int, Decimal]) -> int:
    if shape == "replace":
        return db.load_local(cur, f"LOAD DATA LOCAL INFILE '{table}' REPLACE INTO TABLE {table} (user_id, balance)",
                             None, table, L.balance_rows(users, balances))
    if shape == "odku":
        return cur.execute(f"INSERT INTO {table} (user_id, balance) VALUES "
                           + ",".join("(%d,%s)" % (u, balances[u]) for u in users)
                           + " ON DUPLICATE KEY UPDATE balance=VALUES(balance)")
    doc = json.dumps([[u, str(balances[u])] for u in users])
    return cur.execute(f"UPDATE JSON_TABLE(%s, '$[*]' COLUMNS (u BIGINT PATH '$[0]', b DECIMAL(18,2) PATH '$[1]')) v "
                       f"STRAIGHT_JOIN {table} t ON t.user_id = v.u SET t.balance = v.b", (doc,))


def main(argv=None) -> dict[str, tuple[int, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=int, default=300_000)
    ap.add_argument("--young", type=int, default=20_000)
    ap.add_argument("--users", type=int, default=2700)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    from tests import servers
    server = servers.new_private_mariadb(["--innodb-buffer-pool-size=128M"])
    try:
        return run(args, server)
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)


def run(args, server) -> dict[str, tuple[int, float]]:
    pid = server.proc.pid
    rng = random.Random(5)
    url = MySQLURL.parse("BENCH", f"mysql://root:@127.0.0.1:{server.port}/bench_balances")
    db.ensure_database(url)
    conn = db.connect(url, local_infile=True, multi_statements=True)
    db.migrate(conn, "worker")
    old, young = args.old, args.young
    bound = old + 1
    with conn.cursor() as cur:
        cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")   # as the worker
        cur.execute("SET SESSION group_concat_max_len = 1 << 30")
        conn.begin()
        for table, lo, hi in (("worker_balances", 1, old), ("worker_balances_young", old + 1, old + young)):
            data = "".join("%d\t%d.%02d\n" % (u, rng.randint(0, 999), rng.randint(0, 99))
                           for u in range(lo, hi + 1)).encode()
            db.load_local(cur, f"LOAD DATA LOCAL INFILE 't' INTO TABLE {table} (user_id, balance)", None, "t", data)
        cur.execute("UPDATE worker_ledger SET sealed_below = %s WHERE id = 1", (bound,))
        conn.commit()
    spent = {s: 0.0 for s in READS}
    spent.update({f"{t}_{s}": 0.0 for t in ("young", "main") for s in WRITES})
    counted = dict.fromkeys(spent, 0)
    top = old + young
    for r in range(args.rounds):
        n_old, n_young = args.users // 4, args.users // 5
        users = sorted(set(rng.sample(range(1, old + 1), n_old)) | set(rng.sample(range(old + 1, top + 1), n_young))
                       | set(range(top + 1 + r * args.users, top + 1 + r * args.users + args.users - n_old - n_young)))
        answers = {}
        for shape in READS[r % 2:] + READS[:r % 2]:
            with conn.cursor() as cur:
                conn.begin()
                t0 = cpu(pid)
                cur.execute(read_sql(conn, shape, users, bound))
                got = cur.fetchall()
                if r:
                    spent[shape] += cpu(pid) - t0
                    counted[shape] += len(users)
                conn.rollback()
            answers[shape] = packed(got[1:])
        if answers["read_both"] != answers["read_bound"] or len(answers["read_both"]) != n_old + n_young:
            raise AssertionError("the two reads found different balances")
        found = answers["read_both"]
        for table, lo, hi in (("young", old + 1, top), ("main", 1, old)):
            known = [u for u in users if lo <= u <= hi]
            balances = {u: Decimal(found[u]) + 1 for u in known}
            order = WRITES[r % 3:] + WRITES[:r % 3]
            for shape in order:
                with conn.cursor() as cur:
                    conn.begin()
                    cur.execute(read_sql(conn, "read_both", users, bound))
                    cur.fetchall()
                    t0 = cpu(pid)
                    write(cur, shape, f"worker_balances{'_young' if table == 'young' else ''}", known, balances)
                    if r:
                        spent[f"{table}_{shape}"] += cpu(pid) - t0
                        counted[f"{table}_{shape}"] += len(known)
                    cur.execute(f"SELECT SUM(balance) FROM worker_balances{'_young' if table == 'young' else ''} "
                                f"WHERE user_id IN {db.sql_list(conn, known)}")
                    total = cur.fetchone()[0]
                    conn.rollback()
                if total != sum(balances.values()):
                    raise AssertionError(f"{table}_{shape}: balances written {total}, {sum(balances.values())} expected")
    conn.close()
    figures = {k: (counted[k], spent[k] / max(1, counted[k]) * 1e6) for k in spent}
    for k, (n, us) in figures.items():
        print(f"{k:>14}: {us:.3f} µs of server CPU per user ({n:,} users)")
    print(f"{old:,} sealed users, {young:,} young, {args.users:,} users a batch, {args.rounds} rounds (the first not "
          f"counted); load {os.getloadavg()[0]:.2f}")
    return figures


if __name__ == "__main__":
    main()
