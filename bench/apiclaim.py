"""A worker's `done` + claim (an ordered stage), alone: the API's CPU (in-process tracker, no
HTTP) and the database server's per `done` of a file and claim of the shard's next one, this
checkout's code and another's (`--other`, e.g. a `git archive` of the base) in rounds
alternated on one private server (prints figures; not a test).

    .venv/bin/python bench/apiclaim.py [--files 400] [--rounds 4] [--other DIR]

Each round runs in a child process of its checkout: it registers `--files` files of shard 0,
moves them through the splitter (not timed), then times the worker taking them one by one, each
`done` claiming the next (`Tracker.done_and_claim`, limit 1), as a worker with one file a claim
does; round trips are counted on the wire in a last, untimed cycle.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(url: str, root: str, files: int, server_pid: int, tag: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from bench.procstat import cpu_seconds
    from bench.wire import tracker_of
    from bench.wire import counting

    tracker = tracker_of(Path(root), url)
    names = [f"{tag}-{i:06d}" for i in range(files + 2)]
    for name in names:
        tracker.register(name, [0], True, "bench/ingest", 500)
        tracker.transition("shard-splitter", "start", name, 0, owner="bench/splitter")
        tracker.transition("shard-splitter", "done", name, 0, owner="bench/splitter")
    owner = "bench/worker-0"
    held = tracker.claim("shard-worker", 1, 0, owner)
    c0, s0 = time.process_time(), cpu_seconds(server_pid)
    for _ in range(files):
        held = tracker.done_and_claim("shard-worker", [(held[0]["filename"], 0, 250, None)], owner, 1, 0)[1]
    c1, s1 = time.process_time(), cpu_seconds(server_pid)
    with counting() as (counts, _):
        tracker.done_and_claim("shard-worker", [(held[0]["filename"], 0, 250, None)], owner, 1, 0)
    return {"api_us": (c1 - c0) * 1e6 / files, "server_us": (s1 - s0) * 1e6 / files,
            "round_trips": counts["round_trips"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--other", help="another checkout, alternated with this one")
    parser.add_argument("--child", nargs=4, metavar=("URL", "ROOT", "SERVER_PID", "TAG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, root, pid, tag = args.child
        print(json.dumps(child(url, root, args.files, int(pid), tag)))
        return
    sys.path.insert(0, str(ROOT))
    from bench.wire import child_rounds
    results: dict[str, list[dict]] = {}
    for r, label, got in child_rounds(__file__, args.other, args.rounds, "claim", ["--files", str(args.files)]):
        results.setdefault(label, []).append(got)
        print(f"round {r + 1} ({label}): API {got['api_us']:.0f} us, server {got['server_us']:.0f} us"
              f" per done + claim, {got['round_trips']} round trips", flush=True)
    for label, rows in results.items():
        print(f"{label}: median of {len(rows)} rounds: API {statistics.median(x['api_us'] for x in rows):.0f} us,"
              f" server {statistics.median(x['server_us'] for x in rows):.0f} us per done + claim,"
              f" {rows[-1]['round_trips']} round trips")

if __name__ == "__main__":
    main()
