"""The sender's own CPU per prepared file, user and kernel apart, this checkout's loader and
another's (`--other`, e.g. a `git archive` of the base) in rounds alternated on one private
mariadbd (prints figures; not a test).

    .venv/bin/python bench/sender_files.py [--rows 5000] [--files 24] [--batch 1] [--rounds 4] [--other DIR]

The files are bench/load.py's realistic prepared rows (shard 0 of 2), `--files` distinct ones of
`--rows` rows each (cached under var/bench/). Each round runs one child process per checkout
(the order flipped every round) on a fresh database: it loads 4 files untimed, then the rest,
`--batch` at a time (`loader.load_batch`, as a sender loads a claim of small files) or one by
one (`loader.load_file`, at `--batch 1`), with what the sender process sets for itself at start
(`stage.tune_process`, where the checkout has it), and reports its user and system CPU
(os.times), its page faults and the server's CPU, per file and per row. `--rows 5000` is a big run's shard file (10,000-event source
files), `--rows 250 --batch 4` a small run's claim.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARM = 4


def faults() -> int:
    """This process's minor page faults so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def files_of(rows: int, files: int) -> tuple[Path, list[str]]:
    sys.path.insert(0, str(ROOT))
    from bench.load import write_file
    folder = ROOT / "var" / "bench" / f"sender-files-{rows}x{files}"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"2099010{i:07d}" for i in range(files)]
    for i, name in enumerate(names):
        write_file(folder / f"{name}.prepared.txt", rows, name, i * rows)
    return folder, names


def child(url: str, root: str, server_pid: int, rows: int, files: int, batch: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from bench.procstat import cpu_seconds
    from bench.wire import use_app_of
    folder, names = files_of(rows, files)
    use_app_of(Path(root))
    from app.config import MySQLURL, Settings
    from app.sender import loader, stage
    tune = getattr(stage, "tune_process", None)   # what the sender process sets at start, where it does
    tuned = bool(tune and tune(Settings.from_env()))
    conn = loader.connect(MySQLURL.parse("bench", url))
    loader.prepare(conn)
    paths = [(folder / f"{name}.prepared.txt", name) for name in names]

    def load(group):
        if batch > 1:
            got = loader.load_batch(conn, group, 0, 2, root=folder)
            assert all(r is not None and r.loaded == rows for r in got), got
        else:
            for path, name in group:
                assert loader.load_file(conn, path, name, 0, 2, root=folder).loaded == rows

    for i in range(0, WARM, batch):
        load(paths[i:min(i + batch, WARM)])
    t0, s0, f0 = os.times(), cpu_seconds(server_pid), faults()
    for i in range(WARM, files, batch):
        load(paths[i:i + batch])
    t1, s1 = os.times(), cpu_seconds(server_pid)
    conn.close()
    n = files - WARM
    return {"user_ms": (t1.user - t0.user) * 1e3 / n, "system_ms": (t1.system - t0.system) * 1e3 / n,
            "server_ms": (s1 - s0) * 1e3 / n, "faults": (faults() - f0) / n, "rows": rows, "tuned": tuned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--other", help="another checkout, alternated with this one")
    parser.add_argument("--child", nargs=4, metavar=("URL", "ROOT", "SERVER_PID", "TAG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, root, pid, _tag = args.child
        print(json.dumps(child(url, root, int(pid), args.rows, args.files, args.batch)))
        return
    files_of(args.rows, args.files)
    sys.path.insert(0, str(ROOT))
    from bench.wire import child_rounds
    results: dict[str, list[dict]] = {}
    rounds = child_rounds(__file__, args.other, args.rounds, "sender_files",
                          ["--rows", str(args.rows), "--files", str(args.files), "--batch", str(args.batch)])
    for r, label, got in rounds:
        results.setdefault(label, []).append(got)
        cpu = got["user_ms"] + got["system_ms"]
        print(f"round {r + 1} ({label}): sender {cpu:.2f} ms a file ({got['user_ms']:.2f} user, "
              f"{got['system_ms']:.2f} system, {got['faults']:.0f} page faults{', tuned' if got['tuned'] else ''}) = "
              f"{cpu * 1e3 / args.rows:.3f} us a row; server "
              f"{got['server_ms']:.2f} ms a file; load average {os.getloadavg()[0]:.1f}", flush=True)
    for label, rows in results.items():
        cpu = [x["user_ms"] + x["system_ms"] for x in rows]
        print(f"{label}: sender per file {', '.join(f'{c:.2f}' for c in cpu)} ms (median {statistics.median(cpu):.2f};"
              f" {statistics.median(cpu) * 1e3 / args.rows:.3f} us a row), server median "
              f"{statistics.median(x['server_ms'] for x in rows):.2f} ms")
    if len(results) == 2:
        this, other = ([x["user_ms"] + x["system_ms"] for x in results[k]] for k in ("this", "other"))
        print(f"this checkout lower in {sum(a < b for a, b in zip(this, other))} of {len(this)} rounds")


if __name__ == "__main__":
    main()
