"""The splitter's cost per small file (prints figures; not a test).

    .venv/bin/python bench/split_files.py [--lines 500] [--files 200] [--private] [--root DIR]

A real Splitter, in this process, splits --files source files of --lines lines (the project's
generator, both shards claimed, the rejected file and its rows written, the pass between files
run) after 10 warm-up files, on a fresh database, without the API (a claim of every shard of a
file asks it nothing). Prints the splitter's CPU per file (`time.process_time`, its threads
included), the wall time, then, over as many further files, the round trips (commands sent),
SQL statements (results read) and rows read per file, and the round trips by their first words.
`--private`: a mariadbd of the bench's own (128 MiB pool), whose CPU per file is printed too
(`server_cpu_ms_per_file`, from /proc). `--root DIR`: the app code of another checkout (e.g. a
`git archive` of the base), to compare two versions back to back, alternated.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=500)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--keep", type=int, default=0,
                    help="MiB of freed memory kept in the heap (app/heap.keep_freed) before setup: "
                         "what the process's settings do where the checkout has them")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench import wire
    from bench.worker import server_cpu
    wire.use_app_of(args.root)

    from app import layout
    from app.client import Task
    from app.config import Settings
    from app.daemon import Context
    from app.ingest.generator import generate_files
    from app.splitter.stage import Splitter
    from tests import servers

    n = args.files
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "shared"
        names = generate_files(layout.events_dir(shared), 2 * n + 10, args.lines, seed=3, start="20260501000000")
        with servers.bench_database("split_files", args.private) as (url, pid):
            settings = Settings.from_env(dict(os.environ, MYSQL_PIPELINE_URL=servers.url_text(url),
                                              SHARED_DIR=str(shared), SHARD_COUNT="2"))
            stage = Splitter(settings)
            ctx = Context(threading.Event(), logging.getLogger("bench"))
            if args.keep:
                from app import heap
                heap.keep_freed(args.keep << 20)
            stage.setup(ctx)

            def work(some):
                for f in some:
                    outcomes = stage.process([Task(f, 0), Task(f, 1)], ctx)
                    if type(outcomes[0]).__name__ != "Done":
                        raise SystemExit(f"{f}: {outcomes}")

            cpu, server, wall, counts, kinds = wire.window(work, names, n, lambda: server_cpu(pid))
            stage.teardown()
    print(json.dumps({"root": str(args.root), "lines_per_file": args.lines, "files": n,
                      "splitter_cpu_ms_per_file": round(cpu / n * 1000, 3),
                      "splitter_system_ms_per_file": round(wire.window.system / n * 1000, 3),
                      "minor_faults_per_file": round(wire.window.faults / n, 1),
                      **({"server_cpu_ms_per_file": round(server / n * 1000, 3)} if args.private else {}),
                      "wall_ms_per_file": round(wall / n * 1000, 2),
                      **{k + "_per_file": round(v / n, 2) for k, v in counts.items()}}))
    print(wire.by_first_words(kinds, n))


if __name__ == "__main__":
    main()
