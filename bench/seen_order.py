"""`worker_seen`'s size when a batch's dedup keys are inserted in arrival order or sorted
(prints figures; not a test).

    .venv/bin/python bench/seen_order.py [--keys 400000] [--batch 2500]

Keys are (shard, minute, random 64-bit hash) as the worker writes them, a minute holding
`--per-minute` keys and a few keys of each batch in the next minute. Sorted batches land among
the minute's earlier keys, where InnoDB's sequential-insert page split leaves pages part empty.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import servers  # noqa: E402

TABLE = ("CREATE TABLE worker_seen (shard TINYINT NOT NULL, bucket INT NOT NULL, hash BIGINT NOT NULL, "
         "PRIMARY KEY (shard, bucket, hash)) ENGINE=InnoDB")


def run(sort: bool, keys: int, batch: int, per_minute: int) -> tuple[int, float]:
    """Bytes the table takes after `keys` inserts, and the client's wall seconds."""
    name = servers.unique_name("seen_order")
    conn = servers.admin_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
            cur.execute(f"USE `{name}`")
            cur.execute(TABLE)
            rng = random.Random(1)
            began = time.monotonic()
            for start in range(0, keys, batch):
                rows = [(start // per_minute + (rng.random() < 0.05), rng.getrandbits(63)) for _ in range(batch)]
                if sort:
                    rows.sort()
                cur.execute("INSERT INTO worker_seen (shard, bucket, hash) VALUES "
                            + ",".join("(0,%d,%d)" % r for r in rows) + " ON DUPLICATE KEY UPDATE hash=hash")
                conn.commit()
            wall = time.monotonic() - began
            cur.execute("ANALYZE TABLE worker_seen")
            cur.fetchall()
            cur.execute("SELECT data_length + index_length FROM information_schema.tables "
                        "WHERE table_schema=%s AND table_name='worker_seen'", (name,))
            return int(cur.fetchone()[0]), wall
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=2_500)
    parser.add_argument("--per-minute", type=int, default=25_000)
    args = parser.parse_args()
    for sort in (False, True, False, True):
        size, wall = run(sort, args.keys, args.batch, args.per_minute)
        print(f"{'sorted' if sort else 'arrival order':<14} {size / 2**20:7.1f} MiB = {size / args.keys:5.1f} B/key "
              f"({wall:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
