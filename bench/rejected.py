"""What keeping rejected lines costs: N rejected-line records through the stages' tee
(app/rejected.py) into a fresh pipeline database, as a stage writes them. Prints wall time,
rows per second, and CPU seconds of this process and of mariadbd.

    python -m bench.rejected [--rows 200000] [--line-bytes 200]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
import uuid

import orjson

from app import db, rejected
from app.config import MySQLURL
from bench.procstat import cpu_seconds


def server_pid(port: int) -> int:
    """The pid of the server listening on `port` (several mariadbd may run)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--line-bytes", type=int, default=200)
    p.add_argument("--url", default="mysql://root:@127.0.0.1:3306/bench_rejected_" + uuid.uuid4().hex[:8])
    args = p.parse_args()
    url = MySQLURL.parse("url", args.url)
    db.ensure_database(url)
    mariadbd = server_pid(url.port)
    line = "x" * args.line_bytes
    records = [orjson.dumps({"line_no": n, "reason": "malformed_json", "line": line}) + b"\n"
               for n in range(1, args.rows + 1)]
    w = rejected.RejectedWriter(url)
    w.write([])
    w._conn.get()
    me, server, began = cpu_seconds(os.getpid()), cpu_seconds(mariadbd), time.monotonic()
    tee = w.tee(lambda _: None, "20260101000000", "shard-splitter", None)
    for r in records:
        tee(r)
    tee.flush()
    wall = time.monotonic() - began
    me, server = cpu_seconds(os.getpid()) - me, cpu_seconds(mariadbd) - server
    print(f"{args.rows} rejected lines of {args.line_bytes} bytes: {wall:.2f} s wall, {args.rows / wall:,.0f} rows/s; "
          f"CPU: this process {me:.2f} s ({me / args.rows * 1e6:.1f} us/line), mariadbd {server:.2f} s")
    conn = db.connect(url, database=None)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE `{url.database}`")
    conn.close()


if __name__ == "__main__":
    main()
