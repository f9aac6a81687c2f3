"""What PyMySQL sends and reads while a bench's window runs, in-process: round trips, statements
(results read), rows, and round trips by their statement's first words. For the per-file benches
(`split_files.py`, `worker_files.py`) that run a stage's code against another checkout, where
the server's own counters would also count the bench's setup; their window (`window`); and
`use_app_of`, which points them (and `worker_lines.py`) at that checkout."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def use_app_of(root) -> None:
    """Import `app` from the checkout at `root` (e.g. a `git archive` of the base) from here on:
    this checkout's `app` modules a bench module imported already are forgotten."""
    sys.path.insert(0, str(root.resolve()))
    for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        del sys.modules[name]


def tracker_of(root, url: str):
    """The API's `Tracker` from the checkout at `root` (`use_app_of`) on database `url`, its
    schema made: how the API benches drive the tracking table without HTTP in between."""
    use_app_of(root)
    from app import db
    from app.api import tracking
    from app.config import MySQLURL
    tracker = tracking.Tracker(db.ThreadConnections(MySQLURL.parse("bench", url), multi_statements=True), 1, 600, 3)
    tracker.schema.ensure()
    return tracker


def child_rounds(script: str, other: str | None, rounds: int, prefix: str, args: list[str]):
    """(round, label, figures) of `script --child URL ROOT SERVER_PID TAG` run for this
    checkout ("this") and `other`, alternated (the order flips each round), each child on a fresh
    database of one private mariadb; figures are the child's last stdout line, as JSON."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from app import db
    from tests import servers
    roots = {"this": root, **({"other": Path(other).resolve()} if other else {})}
    server = servers.new_private_mariadb()
    try:
        for r in range(rounds):
            for label, tree in (roots.items() if r % 2 == 0 else reversed(roots.items())):
                url = server.url(f"{prefix}_{label}_{r}")
                db.ensure_database(url)
                out = subprocess.run([sys.executable, script, *args, "--child", str(url), str(tree),
                                      str(server.proc.pid), f"r{r}"], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr)
                yield r, label, json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()


@contextmanager
def counting():
    """(counts, kinds) filled while the block runs; PyMySQL is put back as it was after."""
    import pymysql.connections as pc

    counts = {"round_trips": 0, "statements": 0, "rows": 0}
    kinds: dict[str, int] = {}
    execute, read, row = pc.Connection._execute_command, pc.MySQLResult.read, pc.MySQLResult._read_row_from_packet

    def counted_execute(self, command, sql):
        counts["round_trips"] += 1
        text = sql if isinstance(sql, str) else bytes(sql[:100]).decode("utf-8", "replace")
        kind = " ".join(text.split()[:3])[:40] or "(ping)"
        kinds[kind] = kinds.get(kind, 0) + 1
        return execute(self, command, sql)

    def counted_read(self):
        counts["statements"] += 1
        return read(self)

    def counted_row(self, packet):
        counts["rows"] += 1
        return row(self, packet)

    pc.Connection._execute_command, pc.MySQLResult.read = counted_execute, counted_read
    pc.MySQLResult._read_row_from_packet = counted_row
    try:
        yield counts, kinds
    finally:
        pc.Connection._execute_command, pc.MySQLResult.read, pc.MySQLResult._read_row_from_packet = execute, read, row


def window(work: Callable[[list], None], names: list, n: int, server_cpu: Callable[[], float]):
    """The per-file benches' window over `names` (2n + 10 files): 10 to warm up, n timed (this
    process's CPU, the server's by `server_cpu()`, wall seconds), n counted on the wire (apart
    from the timed ones: counting costs CPU). (cpu, server, wall, counts, kinds)."""
    work(names[:10])
    cpu, server, wall, kernel = time.process_time(), server_cpu(), time.perf_counter(), os.times().system
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work(names[10:n + 10])
    cpu, server, wall = time.process_time() - cpu, server_cpu() - server, time.perf_counter() - wall
    window.system = os.times().system - kernel   # of `cpu`, the kernel's part (syscalls, page faults)
    window.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults   # minor page faults
    with counting() as (counts, kinds):
        work(names[n + 10:])
    return cpu, server, wall, counts, kinds


def by_first_words(kinds: dict[str, int], n: int) -> str:
    return "round trips per file by first words: " + ", ".join(
        f"{k} {v / n:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
