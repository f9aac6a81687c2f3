"""Peak RSS of the real splitter, worker and sender processes when one line is enormous.

    .venv/bin/python bench/hostile.py [--sizes 1K,100M,1G]

For each size, on fresh databases of the MariaDB at BENCH_MYSQL_URL's host (default
127.0.0.1:3306) and a fresh temporary folder (deleted after): one line of that size (a valid
price change but for its size) in a source file the splitter reads, then in a shard file the
worker reads, then in a prepared file the sender reads (tests/pipeline_harness.big_line_run;
the bench plays the stages before the one measured). Prints each process's peak RSS (VmHWM,
read just before it stops) and what became of the line. The smallest size is the baseline:
flat means every size shows the baseline's figures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.config import MySQLURL  # noqa: E402
from tests import servers  # noqa: E402
from tests.pipeline_harness import BIG_LINE_NAMES, Pipeline, big_line_run  # noqa: E402

UNITS = {"K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}


def size_of(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def database(server: MySQLURL, prefix: str) -> MySQLURL:
    name = servers.unique_name(prefix)
    conn = servers.admin_connect(server.host, server.port)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    conn.close()
    return servers.server_url(name, server.host, server.port)


def drop(url: MySQLURL) -> None:
    conn = servers.admin_connect(url.host, url.port)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
    conn.close()


def fate(shards: list[dict], stage: str) -> str:
    """What the stage made of its file: its rejections, or the failure."""
    for s in shards:
        if "failed" in (s["shard_splitter_status"], s["shard_worker_status"], s["mysql_sender_status"]):
            return f"failed: {(s['last_error'] or '')[:90]}"
    key = {"source": "shard-splitter", "worker": "shard-worker", "sender": "mysql-sender"}[stage]
    rejected: dict = {}
    loaded = 0
    for s in shards[:1] if key == "shard-splitter" else shards:   # the splitter's counts are the file's
        for reason, n in (s["stats"].get(key, {}).get("rejected") or {}).items():
            rejected[reason] = rejected.get(reason, 0) + n
    for s in shards:
        loaded += (s["stats"].get("mysql-sender") or {}).get("events") or 0
    return f"rejected {rejected or 'nothing'}, {loaded} rows loaded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1K,100M,1G", help="line sizes, e.g. 1K,100M,1G")
    args = parser.parse_args()
    server = MySQLURL.parse("BENCH_MYSQL_URL", os.environ.get("BENCH_MYSQL_URL", "mysql://root:@127.0.0.1:3306/x"))
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; code under {ROOT}")
    for text in args.sizes.split(","):
        size = size_of(text)
        urls = [database(server, "bench_hostile_pipe")] + [database(server, f"bench_hostile_shard{n}") for n in (0, 1)]
        work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
        pipe = Pipeline(work / "run", urls[0], urls[1:])
        started = time.monotonic()
        try:
            rss, codes, files = big_line_run(pipe, size, work)
        finally:
            pipe.stop()
            shutil.rmtree(work, ignore_errors=True)
            for url in urls:
                drop(url)
        print(f"\none line of {size:,} bytes ({time.monotonic() - started:.0f}s); peak RSS in MiB:")
        for stage, prefix in (("source", "shard-splitter"), ("worker", "shard-worker"), ("sender", "mysql-sender")):
            peaks = ", ".join(f"{n} {v:.0f}" for n, v in sorted(rss.items()) if n.startswith(prefix))
            print(f"  line in the {stage:<6} input -> {fate(files[BIG_LINE_NAMES[stage]], stage)}")
            print(f"      {peaks}")
        died = {n: c for n, c in codes.items() if c != 0}
        print(f"  every daemon stopped cleanly: {'yes' if not died else died}")


if __name__ == "__main__":
    main()
