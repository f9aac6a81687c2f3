"""A file's registration, alone: the API's CPU (this process, in-process tracker, no HTTP) and
the database server's per registration of a complete file of two shards, by the stored procedure
of tracking 0007 (`Transitions.register`) and by the statements it replaced (a copy of them,
as `64fc690` sent them: two round trips), rounds alternated on one private server (prints
figures; not a test).

    .venv/bin/python bench/apiregister.py [--files 1500] [--rounds 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import db  # noqa: E402
from app.api import tracking  # noqa: E402
from app.api.queries import log_sql  # noqa: E402
from app.stages import FIRST, Action, Status  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402
from bench.wire import counting  # noqa: E402
from tests import servers  # noqa: E402

SHARDS = [0, 1]


def by_statements(tracker: tracking.Tracker, filename: str, actor: str, events: int) -> None:
    """Registration with `done` as the API made it before tracking 0007 (a new file's path)."""
    def tx(t: db.Transaction):
        inserted = t.run(*[(f"INSERT INTO pipeline_tracking (filename, shard, {FIRST.status_column}) "
                            f"VALUES (%s,%s,{Status.DONE.sql}) ON DUPLICATE KEY UPDATE id=id", (filename, shard))
                           for shard in SHARDS])
        created = [(r.lastrowid, shard) for r, shard in zip(inserted, SHARDS) if r.rowcount == 1]
        log = [(tid, filename, s, FIRST, None, Status.STARTED, Action.REGISTER, None, None, None, None, None)
               for tid, s in created]
        log += [(tid, filename, s, FIRST, Status.STARTED, Status.DONE, Action.DONE, actor, None, None,
                 events if n == 0 else None, None) for n, (tid, s) in enumerate(created)]
        t.finish(*([log_sql(log)] if log else []),
                 ("SELECT shard FROM pipeline_tracking WHERE filename=%s", (filename,)))
    tracker.store.tx(tx)


def by_procedure(tracker: tracking.Tracker, filename: str, actor: str, events: int) -> None:
    tracker.register(filename, SHARDS, True, actor, events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    server = servers.new_private_mariadb()
    try:
        tracker = tracking.Tracker(db.ThreadConnections(server.url("pipeline_db"), multi_statements=True),
                                   len(SHARDS), 60, 3)
        db.ensure_database(server.url("pipeline_db"))
        tracker.schema.ensure()
        ways = {"statements": by_statements, "procedure": by_procedure}
        for label, way in ways.items():
            for i in range(50):
                way(tracker, f"warm-{label}-{i}", "bench/ingest", 500)
            with counting() as (counts, kinds):
                way(tracker, f"count-{label}", "bench/ingest", 500)
            print(f"{label}: {counts['round_trips']} round trips, {counts['statements']} replies read", flush=True)
        results: dict[str, list[tuple[float, float]]] = {label: [] for label in ways}
        for r in range(args.rounds):
            for label, way in (ways.items() if r % 2 == 0 else reversed(ways.items())):
                c0, s0 = time.process_time(), cpu_seconds(server.proc.pid)
                for i in range(args.files):
                    way(tracker, f"r{r}-{label}-{i:06d}", "bench/ingest", 500)
                c1, s1 = time.process_time(), cpu_seconds(server.proc.pid)
                got = ((c1 - c0) * 1e6 / args.files, (s1 - s0) * 1e6 / args.files)
                results[label].append(got)
                print(f"round {r + 1} {label}: API {got[0]:.0f} us, server {got[1]:.0f} us per registration",
                      flush=True)
        for label, rows in results.items():
            print(f"{label}: median of {len(rows)} rounds: API {statistics.median(x for x, _ in rows):.0f} us, "
                  f"server {statistics.median(y for _, y in rows):.0f} us per registration")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
