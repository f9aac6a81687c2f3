"""A `done-batch` that claims, alone: the API's CPU (in-process tracker, no HTTP) and the
database server's per batch, this checkout's code and another's (`--other`, e.g. a `git
archive` of the base) in rounds alternated on one private server (prints figures; not a test).

    .venv/bin/python bench/apidonebatch.py [--files 300] [--rounds 4] [--other DIR]

Each round runs in a child process of its checkout: it registers `--files` complete files of
two shards, then times the splitter's calls for small files: each file's two tasks reported in
one `done-batch` (with rejected-lines counts in the stats, as the splitter sends them) that
claims the next file's two (`Tracker.done_and_claim`, limit 2); then the workers' and senders'
pattern: `--hold` files of a shard reported together, claiming as many. Server statements
(`Com_*`, triggers included) and temporary tables are counted over the timed part.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(url: str, root: str, files: int, hold: int, server_pid: int, tag: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from bench.procstat import cpu_seconds
    from bench.wire import tracker_of

    tracker = tracker_of(Path(root), url)
    names = [f"{tag}-{i:06d}" for i in range(files + 1)]
    for name in names:
        tracker.register(name, [0, 1], True, "bench/ingest", 500)

    def status(name: str) -> dict:
        return {r["Variable_name"]: int(r["Value"]) for r in tracker.store.read(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Created_tmp_tables', 'Sort_rows')")}

    def stats(k: int, shard: int) -> dict:
        return {"lines": 250, "rejected": {"malformed_json": 1 + k % 2, "duplicate": 3},
                "rejected_file_written": shard == 0}

    out = {}
    # The splitter: a file's two tasks a batch, claiming the next file's.
    owner = "bench/splitter"
    held = tracker.claim("shard-splitter", 2, None, owner)
    st0, c0, s0 = status(""), time.process_time(), cpu_seconds(server_pid)
    for k in range(files):
        items = [(r["filename"], r["shard"], 250, stats(k, r["shard"])) for r in held]
        held = tracker.done_and_claim("shard-splitter", items, owner, 2, None)[1]
    c1, s1, st1 = time.process_time(), cpu_seconds(server_pid), status("")
    out["splitter"] = {"api_us": (c1 - c0) * 1e6 / files, "server_us": (s1 - s0) * 1e6 / files,
                       **{k: (st1[k] - st0[k]) / files for k in st0}}
    # A worker of shard 0: `hold` files a batch, claiming as many.
    owner = "bench/worker-0"
    batches = files // hold - 1
    held = tracker.claim("shard-worker", hold, 0, owner)
    st0, c0, s0 = status(""), time.process_time(), cpu_seconds(server_pid)
    for k in range(batches):
        items = [(r["filename"], 0, 250, {"rejected": {"duplicate": 1}}) for r in held]
        held = tracker.done_and_claim("shard-worker", items, owner, hold, 0)[1]
    c1, s1, st1 = time.process_time(), cpu_seconds(server_pid), status("")
    out["worker"] = {"api_us": (c1 - c0) * 1e6 / batches, "server_us": (s1 - s0) * 1e6 / batches,
                     **{k: (st1[k] - st0[k]) / batches for k in st0}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--hold", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--other", help="another checkout, alternated with this one")
    parser.add_argument("--child", nargs=4, metavar=("URL", "ROOT", "SERVER_PID", "TAG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, root, pid, tag = args.child
        print(json.dumps(child(url, root, args.files, args.hold, int(pid), tag)))
        return
    sys.path.insert(0, str(ROOT))
    from bench.wire import child_rounds
    results: dict[str, list[dict]] = {}
    for r, label, got in child_rounds(__file__, args.other, args.rounds, "donebatch",
                                      ["--files", str(args.files), "--hold", str(args.hold)]):
        results.setdefault(label, []).append(got)
        print(f"round {r + 1} ({label}): " + "; ".join(
            f"{who}: API {g['api_us']:.0f} us, server {g['server_us']:.0f} us, {g['Questions']:.1f} questions,"
            f" {g['Created_tmp_tables']:.1f} tmp tables, {g['Sort_rows']:.1f} sorted rows a batch"
            for who, g in got.items()), flush=True)
    for label, rows in results.items():
        for who in rows[0]:
            print(f"{label} {who}: median of {len(rows)} rounds: API"
                  f" {statistics.median(x[who]['api_us'] for x in rows):.0f} us, server"
                  f" {statistics.median(x[who]['server_us'] for x in rows):.0f} us a batch")

if __name__ == "__main__":
    main()
