"""What each part of the shard `events` table costs the server, fresh and after history.

    .venv/bin/python bench/shard_schema.py [--rows 200000] [--history 2000000] [--variants a,b,...]

On a private mariadbd with the machine server's InnoDB settings (128 MiB buffer pool, a flush
at every commit, O_DIRECT; `--pool` to change the pool), each variant of the table gets its own
fresh database and is loaded by the server's own `LOAD DATA INFILE` in 10,000-row transactions
(the sender's file size): `--rows` rows timed on the empty table, then `--history` rows untimed,
then `--rows` more timed. Printed per variant: rows/s and server CPU µs per row (from
/proc/<pid>/stat) both times, the ratio after/fresh, and the table's bytes per row. The
`reference` variant is the fixed floor table of issue 12 (the contract's columns, an
auto-increment key, a unique random 32-character key, an index on shop_id and one on timestamp).
The rows are realistic (bench/load.py's mix of event types, random 64-bit order ids, 500 shops,
100,000 users, timestamps 3 ms apart) and cached under var/bench/.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from tests import servers  # noqa: E402

# The machine server's settings that shape a load (read from it on this machine).
OPTIONS = ["--innodb-log-file-size=96M", "--innodb-flush-log-at-trx-commit=1", "--innodb-flush-method=O_DIRECT",
           "--innodb-adaptive-hash-index=OFF", "--innodb-change-buffering=none", "--innodb-doublewrite=ON",
           "--innodb-io-capacity=200", "--innodb-autoinc-lock-mode=1", "--performance-schema=OFF",
           "--sql-mode=STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION"]

CHUNK = 10_000
COLUMNS = {  # the columns every variant loads (a variant's TSV has exactly these, in this order)
    "reference": "event_type, shop_id, user_id, `timestamp`, shard, event_key",
    "full": "event_key, event_type, shop_id, user_id, `timestamp`, order_id, good_id, qty, amount, payload, "
            "shard, source_file",
}

BASE = """CREATE TABLE events (
    id          BIGINT NOT NULL AUTO_INCREMENT,
    event_type  TINYINT NOT NULL,
    shop_id     BIGINT NULL,
    user_id     BIGINT NULL,
    `timestamp` DATETIME(3) NOT NULL,
    shard       TINYINT NOT NULL,
    created_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    event_key   VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin {key_null},
    source_file VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
    order_id    BIGINT NULL,
    good_id     BIGINT NULL,
    qty         INT NULL,
    amount      DECIMAL(18,2) NULL,
    payload     {payload} NULL,
    PRIMARY KEY (id){keys}
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""

LEAN = (",\n    UNIQUE KEY uq_events_time_key (`timestamp`, event_key),"
        "\n    KEY ix_events_shop_time (shop_id, `timestamp`)")
OLD_KEYS = (",\n    UNIQUE KEY uq_events_event_key (event_key),\n    KEY ix_events_shop_time (shop_id, `timestamp`),"
            "\n    KEY ix_events_user_time (user_id, `timestamp`),"
            "\n    KEY ix_events_type_time (event_type, `timestamp`),\n    KEY ix_events_order (order_id)")

VARIANTS = {
    "reference": ("reference", """CREATE TABLE events (
    id          BIGINT NOT NULL AUTO_INCREMENT,
    event_type  TINYINT NOT NULL,
    shop_id     BIGINT NULL,
    user_id     BIGINT NULL,
    `timestamp` DATETIME(3) NOT NULL,
    shard       TINYINT NOT NULL,
    created_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    event_key   CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_event_key (event_key),
    KEY ix_shop (shop_id),
    KEY ix_timestamp (`timestamp`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"""),
    # the table of db/migrations/shard/0001_events.sql
    "old": ("full", BASE.format(key_null="NOT NULL", payload="JSON", keys=OLD_KEYS)),
    # the primary key only: what the rows themselves cost
    "rows-only": ("full", BASE.format(key_null="NULL", payload="JSON", keys="")),
    "unique-random": ("full", BASE.format(key_null="NULL", payload="JSON",
                                          keys=",\n    UNIQUE KEY uq_events_event_key (event_key)")),
    "unique-time": ("full", BASE.format(key_null="NULL", payload="JSON",
                                        keys=",\n    UNIQUE KEY uq_events_time_key (`timestamp`, event_key)")),
    # the new schema: unique (timestamp, event_key) and (shop_id, timestamp)
    "lean": ("full", BASE.format(key_null="NULL", payload="JSON", keys=LEAN)),
    "lean-text-payload": ("full", BASE.format(key_null="NULL", payload="MEDIUMTEXT", keys=LEAN)),
    "lean+user": ("full", BASE.format(key_null="NULL", payload="JSON",
                                      keys=LEAN + ",\n    KEY ix_events_user_time (user_id, `timestamp`)")),
    "lean+order": ("full", BASE.format(key_null="NULL", payload="JSON",
                                       keys=LEAN + ",\n    KEY ix_events_order (order_id)")),
    "lean+type": ("full", BASE.format(key_null="NULL", payload="JSON",
                                      keys=LEAN + ",\n    KEY ix_events_type_time (event_type, `timestamp`)")),
}


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tsv_files(total: int) -> dict[str, Path]:
    """Two TSVs of the same rows, cached: the reference table's columns and the full ones,
    in 10,000-row pieces (one LOAD each)."""
    from bench.load import prepared_rows  # (bench.load imports this module)
    folder = ROOT / "var" / "bench" / f"shard-schema-{total}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.monotonic()
        outs = {kind: None for kind in COLUMNS}
        for i, line in enumerate(prepared_rows(total)):
            if i % CHUNK == 0:
                for f in outs.values():
                    if f:
                        f.close()
                outs = {kind: open(folder / f"{kind}-{i // CHUNK:05d}.tsv", "w") for kind in COLUMNS}
            ev = orjson.loads(line)
            n = "\\N"
            user = n if ev["user_id"] is None else ev["user_id"]
            outs["reference"].write(f"{ev['event_type']}\t{ev['shop_id']}\t{user}\t{ev['timestamp']}\t0\t"
                                    f"{hashlib.md5(ev['event_key'].encode()).hexdigest()}\n")
            payload = orjson.dumps(ev["payload"]).decode().replace("\\", "\\\\")
            vals = [ev["event_key"], ev["event_type"], ev["shop_id"], user, ev["timestamp"],
                    *(n if ev[k] is None else ev[k] for k in ("order_id", "good_id", "qty", "amount")),
                    payload, 0, ev["source_file"]]
            outs["full"].write("\t".join(map(str, vals)) + "\n")
        for f in outs.values():
            f.close()
        os.chmod(folder, 0o755)
        done.write_text("ok")
        print(f"rows written to {folder} in {time.monotonic() - started:.0f}s", flush=True)
    return {kind: folder for kind in COLUMNS}


def load(cur, conn, folder: Path, kind: str, first: int, count: int) -> None:
    for piece in range(first // CHUNK, (first + count) // CHUNK):
        cur.execute(f"LOAD DATA INFILE %s INTO TABLE events CHARACTER SET utf8mb4 ({COLUMNS[kind]})",
                    (str(folder / f"{kind}-{piece:05d}.tsv"),))
        conn.commit()


def measure(db: servers.MariaDB, name: str, rows: int, history: int, folder: Path) -> dict:
    kind, ddl = VARIANTS[name]
    database = f"bench_schema_{name.replace('-', '_').replace('+', '_')}"
    conn = servers.admin_connect("127.0.0.1", db.port)
    conn.autocommit(False)
    out = {}
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        cur.execute(f"CREATE DATABASE `{database}`")
        cur.execute(f"USE `{database}`")
        cur.execute(ddl)
        for label, first in (("fresh", 0), ("after", rows + history)):
            if label == "after":
                load(cur, conn, folder, kind, rows, history)
                time.sleep(3)  # let the background flushing of the history settle a little
            cpu, started = server_cpu(db.proc.pid), time.monotonic()
            load(cur, conn, folder, kind, first, rows)
            wall, cpu = time.monotonic() - started, server_cpu(db.proc.pid) - cpu
            out[label] = (rows / wall, 1e6 * cpu / rows)
        cur.execute("ANALYZE TABLE events")
        cur.fetchall()
        cur.execute("SELECT data_length + index_length, table_rows FROM information_schema.TABLES "
                    "WHERE table_schema = DATABASE() AND table_name = 'events'")
        size, _ = cur.fetchone()
        out["bytes_per_row"] = size / (2 * rows + history)
        cur.execute(f"DROP DATABASE `{database}`")
    conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--history", type=int, default=2_000_000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--pool", default="128M", help="innodb_buffer_pool_size of the private server")
    args = parser.parse_args()
    if args.rows % CHUNK or args.history % CHUNK:
        parser.error(f"--rows and --history must be multiples of {CHUNK}")
    folders = tsv_files(2 * args.rows + args.history)
    db = servers.MariaDB(Path(tempfile.mkdtemp(prefix="bench-schema-db-")),
                         options=[*OPTIONS, f"--innodb-buffer-pool-size={args.pool}"])
    db.install().start()
    print(f"private mariadbd, buffer pool {args.pool}; {args.rows:,} rows timed fresh and after "
          f"{args.history:,} rows of history; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'variant':<18} {'fresh rows/s':>12} {'µs/row':>7} {'after rows/s':>12} {'µs/row':>7} "
          f"{'after/fresh':>11} {'bytes/row':>9}", flush=True)
    try:
        for name in args.variants.split(","):
            r = measure(db, name, args.rows, args.history, folders[VARIANTS[name][0]])
            (fr, fc), (ar, ac) = r["fresh"], r["after"]
            print(f"{name:<18} {fr:12,.0f} {fc:7.2f} {ar:12,.0f} {ac:7.2f} {ar / fr:11.2f} "
                  f"{r['bytes_per_row']:9.0f}", flush=True)
    finally:
        db.stop()
        shutil.rmtree(db.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
