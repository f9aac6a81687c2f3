"""The server's CPU to move a young table's rows into the main one, by how the young rows go.

    .venv/bin/python bench/young_seal.py [--rows 20000] [--rounds 6] [--settle 2] [--pairs 2]

The young balances' sealing pass (app/worker/ledger.py `seal`) copies the young users into
`worker_balances` in key order and deletes them from `worker_balances_young`: each row is
written twice and deleted once (then purged). This bench measures the price of that move in a
private mariadbd (128 MiB pool), per row moved, for three ways of emptying the young table:
`delete` (today's `DELETE ... WHERE user_id < bound`, purge included), `truncate` (`TRUNCATE
TABLE`) and `partition` (`ALTER TABLE ... TRUNCATE PARTITION` of a ring partitioned by an epoch
column, as the splitter's order index seals). Each round inserts --rows young rows with
ascending ids, waits --settle seconds, then times the copy and the emptying, and --settle
seconds more (InnoDB's purge runs in the background); an idle stretch of the same length is
subtracted. The modes are alternated, --pairs times.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.procstat import cpu_seconds  # noqa: E402

MODES = ("delete", "truncate", "partition")
MAIN = "CREATE TABLE main (user_id BIGINT NOT NULL PRIMARY KEY, balance DECIMAL(18,2) NOT NULL) ENGINE=InnoDB"
YOUNG = {
    "partition": "CREATE TABLE young (user_id BIGINT NOT NULL, epoch INT NOT NULL, balance DECIMAL(18,2) NOT NULL, "
                 "PRIMARY KEY (user_id, epoch)) ENGINE=InnoDB PARTITION BY HASH (epoch) PARTITIONS 3",
    "delete": "CREATE TABLE young (user_id BIGINT NOT NULL PRIMARY KEY, balance DECIMAL(18,2) NOT NULL) ENGINE=InnoDB",
}
YOUNG["truncate"] = YOUNG["delete"]


def one_mode(conn, pid: int, mode: str, rows: int, rounds: int, settle: float) -> float:
    """Server CPU µs per row moved, idle subtracted."""
    cur = conn.cursor()
    cur.execute("DROP TABLE IF EXISTS main")
    cur.execute("DROP TABLE IF EXISTS young")
    cur.execute(MAIN)
    cur.execute(YOUNG[mode])
    first, spent = 1, 0.0
    for r in range(rounds):
        if mode == "partition":
            values = ",".join("(%d,%d,100.00)" % (first + i, r) for i in range(rows))
        else:
            values = ",".join("(%d,100.00)" % (first + i) for i in range(rows))
        cur.execute("INSERT INTO young VALUES " + values)
        time.sleep(settle)
        t0 = cpu_seconds(pid)
        conn.begin()
        if mode == "partition":
            cur.execute("INSERT INTO main SELECT user_id, balance FROM young WHERE epoch = %s ORDER BY user_id", (r,))
        else:
            cur.execute("INSERT INTO main SELECT user_id, balance FROM young ORDER BY user_id")
        if mode == "delete":
            cur.execute("DELETE FROM young WHERE user_id < %s", (first + rows,))
        conn.commit()
        if mode == "truncate":
            cur.execute("TRUNCATE TABLE young")
        elif mode == "partition":
            cur.execute(f"ALTER TABLE young TRUNCATE PARTITION p{r % 3:d}")
        time.sleep(settle)
        spent += cpu_seconds(pid) - t0
        first += rows
    cur.execute("SELECT COUNT(*) FROM main")
    assert cur.fetchone()[0] == rows * rounds, "rows lost on the way"
    t0 = cpu_seconds(pid)
    time.sleep(settle * rounds)
    idle = cpu_seconds(pid) - t0
    return (spent - idle) / (rows * rounds) * 1e6


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000, help="young rows moved per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before and after each move (purge)")
    ap.add_argument("--pairs", type=int, default=2, help="times the modes are run, alternated")
    args = ap.parse_args(argv)
    import pymysql

    from tests import servers
    srv = servers.new_private_mariadb(["--innodb-buffer-pool-size=128M"])
    figures: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        conn = pymysql.connect(host="127.0.0.1", port=srv.port, user="root", autocommit=True)
        conn.cursor().execute("CREATE DATABASE bench_young")
        conn.select_db("bench_young")
        for _ in range(args.pairs):
            for mode in MODES:
                figures[mode].append(one_mode(conn, srv.proc.pid, mode, args.rows, args.rounds, args.settle))
        conn.close()
    finally:
        srv.stop()
    for mode in MODES:
        print(f"{mode:10s} server CPU µs per row moved: " + " / ".join(f"{v:.2f}" for v in figures[mode]))
    print(f"({args.rows:,} rows a round, {args.rounds} rounds; load average {os.getloadavg()[0]:.2f})")
    return figures


if __name__ == "__main__":
    main()
