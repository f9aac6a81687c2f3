"""The client's CPU to run one multi-statement `db.Script` (prints figures; not a test).

    .venv/bin/python bench/script_read.py [--runs 2000] [--repeat 5] [--private] [--root DIR]

A script of 10 statements as a worker's are made (START TRANSACTION, INSERT ... ON DUPLICATE
KEY UPDATE, UPDATE, DELETE, DO, a one-row SELECT, INSERT, UPDATE, DO, COMMIT: nine answer an
OK packet, one a result set) is run --runs times on one `db.connect(multi_statements=True)`
connection, --repeat times; printed: the client's CPU per script (`time.process_time`, best
and median of the repeats; its user and system parts), the server's per script when
`--private` (a mariadbd of the bench's own, 128 MiB pool, CPU from /proc), and the statements
read per script. `--root DIR`: the app code of another checkout (e.g. a `git archive` of the
base); run the two alternated, the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STATEMENTS = [
    ("begin", "START TRANSACTION", None),
    ("put", "INSERT INTO script_rows (id, n) VALUES (%s, 1) ON DUPLICATE KEY UPDATE n = n + 1", (1,)),
    ("bump", "UPDATE script_rows SET n = n + 1 WHERE id = %s", (2,)),
    ("drop", "DELETE FROM script_rows WHERE id = %s", (3,)),
    ("do", "DO 1", None),
    ("read", "SELECT id, n FROM script_rows WHERE id = %s", (1,)),
    ("add", "INSERT INTO script_rows (id, n) VALUES (%s, 1)", (3,)),
    ("bump2", "UPDATE script_rows SET n = n - 1 WHERE id = %s", (2,)),
    ("do2", "DO 2", None),
    ("end", "COMMIT", None),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench import wire
    from bench.worker import server_cpu
    wire.use_app_of(args.root)
    from app import db
    from tests import servers

    with servers.bench_database("t_script_read", args.private) as (url, pid):
        conn = db.connect(url, multi_statements=True)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE script_rows (id INT PRIMARY KEY, n INT NOT NULL)")
            cur.execute("INSERT INTO script_rows VALUES (1, 0), (2, 0), (3, 0)")

        def run(count: int) -> None:
            with conn.cursor() as cur:
                for _ in range(count):
                    script = db.Script()
                    for tag, sql, values in STATEMENTS:
                        script.add(tag, sql, values)
                    got = script.run(cur)
                    assert got["read"].rows and got["drop"].rowcount == 1 and got["add"].rowcount == 1

        run(200)
        figures = []
        for _ in range(args.repeat):
            t0, s0, server = os.times(), time.process_time(), server_cpu(pid)
            run(args.runs)
            t1 = os.times()
            figures.append((time.process_time() - s0, t1.user - t0.user, t1.system - t0.system,
                            server_cpu(pid) - server))
        with wire.counting() as (counts, _):
            run(100)
        conn.close()
    per = lambda seconds: round(seconds / args.runs * 1e6, 1)  # noqa: E731  µs per script
    cpu = [per(f[0]) for f in figures]
    print(json.dumps({
        "root": str(args.root), "runs": args.runs, "repeat": args.repeat,
        "client_cpu_us_per_script_best": min(cpu), "client_cpu_us_per_script_median": statistics.median(cpu),
        "client_cpu_us_per_script_each": cpu,
        "client_user_us_median": statistics.median(per(f[1]) for f in figures),
        "client_system_us_median": statistics.median(per(f[2]) for f in figures),
        **({"server_cpu_us_per_script_median": statistics.median(per(f[3]) for f in figures)} if args.private else {}),
        "round_trips_per_script": counts["round_trips"] / 100, "statements_per_script": counts["statements"] / 100,
    }))


if __name__ == "__main__":
    main()
