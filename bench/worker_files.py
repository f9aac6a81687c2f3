"""The shard worker's cost per small file (prints figures; not a test).

    .venv/bin/python bench/worker_files.py [--lines 250] [--files 100] [--claim 1] [--root DIR]

A real WorkerStage, in this process, decides --files shard-0 files of --lines lines each (the
project's generator lines, as bench/worker.py takes them), after 10 warm-up files, on a fresh
database of the test server (127.0.0.1:3306), without the API. Prints the worker's CPU per
(file, shard) (`time.process_time`), then, over as many further files, the round trips
(commands sent), SQL statements (results read) and rows read per file, and the round trips by
their first words. `--root DIR`: the app code of another checkout (e.g. a `git archive` of the
base), to compare two versions back to back; run them alternated, the machine is shared.
`--private`: a mariadbd of the bench's own (128 MiB pool), whose CPU per file is printed too
(`server_cpu_ms_per_file`, from /proc). The wall time per file is printed too (a COMMIT's
fsync is waited for, not CPU). `--claim N`: the files come N at a time, as a claim of N hands them to the daemon loop
(`stage.group`, then `process` per group: a stage that decides a claim's files together does).
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
    ap.add_argument("--lines", type=int, default=250)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--claim", type=int, default=1)
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--keep", type=int, default=0,
                    help="MiB of freed memory kept in the heap (app/heap.keep_freed) before setup: "
                         "what the process's settings do where the checkout has them")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    from bench import wire
    from bench.worker import from_generator, server_cpu
    wire.use_app_of(args.root)   # bench.worker imported this checkout's app.layout

    from app import layout
    from app.client import Task
    from app.config import Settings
    from app.daemon import Context
    from app.worker.stage import WorkerStage
    from tests import servers

    n, per = args.files, args.lines
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "lines.txt"
        from_generator(source, (2 * n + 10) * per)
        lines = source.read_bytes().splitlines(keepends=True)
        with servers.bench_database("worker_files", args.private) as (url, pid):
            settings = Settings.from_env(dict(os.environ, MYSQL_PIPELINE_URL=servers.url_text(url),
                                              SHARED_DIR=str(Path(tmp) / "shared")))
            stage = WorkerStage(settings, 0)
            ctx = Context(threading.Event(), logging.getLogger("bench"))
            if args.keep:
                from app import heap
                heap.keep_freed(args.keep << 20)
            stage.setup(ctx)
            names = []
            for i in range(2 * n + 10):
                filename = f"20260101{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}"
                path = layout.splitter_output(settings.shared_dir, filename, 0)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"".join(lines[i * per:(i + 1) * per]))
                names.append(filename)
            def work(some):
                """As the daemon loop: a claim of --claim files, worked group by group."""
                for i in range(0, len(some), args.claim):
                    for group in stage.group([Task(f, 0) for f in some[i:i + args.claim]]):
                        stage.process(group, ctx)

            cpu, server, wall, counts, kinds = wire.window(work, names, n, lambda: server_cpu(pid))
            stage.teardown()
    print(json.dumps({"root": str(args.root), "lines_per_file": per, "files": n, "claim": args.claim,
                      "worker_cpu_ms_per_file": round(cpu / n * 1000, 2),
                      "worker_system_ms_per_file": round(wire.window.system / n * 1000, 2),
                      "minor_faults_per_file": round(wire.window.faults / n, 1),
                      **({"server_cpu_ms_per_file": round(server / n * 1000, 2)} if args.private else {}),
                      "wall_ms_per_file": round(wall / n * 1000, 2),
                      **{k + "_per_file": round(v / n, 2) for k, v in counts.items()}}))
    print(wire.by_first_words(kinds, n))


if __name__ == "__main__":
    main()
