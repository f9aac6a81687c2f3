"""The server's CPU per purchase row of the order index's write, by form (prints figures; not a test).

    .venv/bin/python bench/order_index_load.py [--rows 400000] [--chunk 4500] [--rounds 2] [--forms a,b]

One private mariadbd (128 MiB pool). Each form writes --rows purchases (random 63-bit order ids,
as the generator's; shops below 10^6) in chunks of --chunk rows, one chunk a transaction, into a
fresh database migrated to this tree's splitter schema, the epoch moving on every EPOCH_ROWS
rows as the splitter's does (no sealing, no lookups): the server's CPU per row from /proc, the
client's too. Forms run alternated, --rounds times each.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tsv(rows) -> bytes:
    return b"".join(b"%d\t%d\t%d\t%d\n" % r for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--chunk", type=int, default=4500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--forms", default="insert,load,insert_sorted,load_sorted")
    ap.add_argument("--pool", default="128M")
    args = ap.parse_args()
    from app import db
    from app.splitter import order_index as oi
    from bench.procstat import cpu_seconds
    from tests import servers

    rng = random.Random(7)
    chunks = []
    file_id = 0
    for start in range(0, args.rows, args.chunk):
        file_id += 1
        chunks.append([(rng.getrandbits(63), file_id, 3 * n + 1, rng.randrange(1, 1_000_000))
                       for n in range(min(args.chunk, args.rows - start))])
    private = servers.new_private_mariadb([f"--innodb-buffer-pool-size={args.pool}"])
    forms = args.forms.split(",")
    print(f"{args.rows:,} rows in chunks of {args.chunk:,}; private mariadbd, pool {args.pool}; "
          f"load average {os.getloadavg()[0]:.1f}")
    results: dict[str, list[tuple[float, float]]] = {f: [] for f in forms}
    try:
        for round_ in range(args.rounds):
            for form in forms:
                name = f"bench_oil_{round_}_{form}"
                admin = servers.admin_connect(port=private.port)
                with admin.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS {name}")
                    cur.execute(f"CREATE DATABASE {name}")
                admin.close()
                url = private.url(name)
                conn = db.connect(url, local_infile=True, multi_statements=True)
                db.migrate(conn, oi.SCHEMA)
                mods = form.split("_")
                kind, mods = mods[0], set(mods[1:])
                sorted_ = "sorted" in mods
                with conn.cursor() as cur:
                    if "nopart" in mods:
                        cur.execute("ALTER TABLE splitter_order REMOVE PARTITIONING")
                    if "append" in mods:
                        cur.execute("ALTER TABLE splitter_order DROP PRIMARY KEY, ADD PRIMARY KEY (epoch, file_id, line)")
                replace = "IGNORE" if "ignore" in mods else "REPLACE"
                s0, c0, w0 = cpu_seconds(private.proc.pid), _self_cpu(), time.perf_counter()
                done = 0
                with conn.cursor() as cur:
                    for n, rows in enumerate(chunks):
                        epoch = done // oi.EPOCH_ROWS
                        done += len(rows)
                        if sorted_:
                            rows = sorted(rows)
                        data = _tsv(rows)
                        if kind == "insert":
                            cur.execute("START TRANSACTION;" + oi._insert_rows_sql(data, epoch) + ";COMMIT")
                            while cur.nextset():
                                pass
                        elif kind == "load":
                            db.load_local(cur, f"LOAD DATA LOCAL INFILE %s {replace} INTO TABLE splitter_order "
                                               "(order_id, file_id, line, shop_id) SET epoch = %s",
                                          (f"c{n}.tsv", epoch), f"c{n}.tsv", data)
                        else:
                            raise SystemExit(f"unknown form {form}")
                server, client, wall = cpu_seconds(private.proc.pid) - s0, _self_cpu() - c0, time.perf_counter() - w0
                with conn.cursor() as cur:
                    cur.execute("SELECT COUNT(*) FROM splitter_order")
                    count = cur.fetchone()[0]
                    cur.execute("SELECT data_length + index_length FROM information_schema.tables "
                                "WHERE table_schema = DATABASE() AND table_name = 'splitter_order'")
                    size = cur.fetchone()[0]
                conn.close()
                results[form].append((server / done * 1e6, client / done * 1e6))
                print(f"[{form} r{round_ + 1}] {count:,} rows; server {server / done * 1e6:.3f} µs/row, client "
                      f"{client / done * 1e6:.3f} µs/row, wall {wall:.1f}s, {size / count:.1f} B/row", flush=True)
                admin = servers.admin_connect(port=private.port)
                with admin.cursor() as cur:
                    cur.execute(f"DROP DATABASE {name}")
                admin.close()
        for form, figures in results.items():
            print(f"{form}: server " + " / ".join(f"{s:.3f}" for s, _ in figures) + " µs/row; client "
                  + " / ".join(f"{c:.3f}" for _, c in figures))
    finally:
        private.stop()
        shutil.rmtree(private.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
