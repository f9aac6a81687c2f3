"""The shard worker's Python per line on big files, two checkouts alternated in one process
(prints figures; not a test).

    .venv/bin/python bench/worker_python.py [--other DIR] [--events 60000] [--rounds 12]

Takes the shard-0 lines of the project's generator (as bench/worker.py does), cut into files of
--file-lines lines (a big run's shard file: 10,000 events split in two), and times, with
`time.process_time`, the worker's own Python of a group of such files, as `_process_group` runs
it, without a database:

- `validate`: `FileRun._batch` of each file (the validator's map, the Plan, the digest);
- `decide`: `FileRun._decide_lines` of each file against empty state (every user at the opening
  balance, no orders, keys, stock or holds before the file), into its `Batch`;
- `writes`: the batch's LOAD DATA rows as `_write` renders them (`Ledger.add_writes` into a
  script that is not run, `WorkerState.add_seen`) and the keys and orders remembered (`Recent`);
- `emit`: `FileRun._emit` of the file to a null writer, from its codes.

`--other DIR`: the app code of another checkout (e.g. a `git archive` of the base), loaded into
this same process beside this checkout's, so both run on the same lines, alternated part by
part and round by round (the order flips each round): the machine's load hits both alike. For
each part: the best and the median µs per line of each, and in how many rounds this checkout's
was the lower. The cyclic GC is off while timing, as it is in the worker.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("validate", "decide", "writes", "emit")


class Null:
    deferred = True

    def write(self, data) -> None:
        pass


def load(root: Path) -> dict:
    """The worker's modules of the checkout at `root`, imported apart: no `app` module stays
    in sys.modules, so the next checkout's import is its own."""
    from bench import wire
    wire.use_app_of(root)
    from app import config, db
    from app.worker import ledger, rules, stage, state
    mods = dict(config=config, db=db, ledger=ledger, rules=rules, stage=stage, state=state)
    sys.path.remove(str(root.resolve()))
    for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        del sys.modules[name]
    return mods


class Tree:
    """One checkout's worker, set up to run the parts on the same files."""

    def __init__(self, label: str, root: Path, files: list[list[bytes]]):
        self.label, self.files = label, files
        m = self.m = load(root)
        self.settings = m["config"].Settings.from_env({"SHARD_COUNT": "2"})
        stage = object.__new__(m["stage"].WorkerStage)
        stage.settings, stage.shard = self.settings, 0
        stage.ledger = m["ledger"].Ledger(self.settings.opening_balance)
        self.stage = stage
        self.state = object.__new__(m["state"].WorkerState)
        self.state.shard, self.state.use_infile = 0, True
        self.runs: dict = {}

    def run(self, name: str, k: int) -> None:
        """Part `name` of file `k` (the parts of a file in order: each uses the one before)."""
        m, stage, raws = self.m, self.stage, self.files[k]
        if name == "validate":
            run = object.__new__(m["stage"].FileRun)
            run.stage, run.settings, run.rules, run.shard = stage, self.settings, self.settings.rules, 0
            run.filename, run.file_id, run.seq = f"20260101{k:06d}", k + 1, 0
            run.validate = m["rules"].validator(0, 2, self.settings.max_line_bytes, self.settings.max_json_depth)
            if hasattr(m["rules"], "lines_validator"):   # a checkout's validation of a list at a time
                run.validate_lines = m["rules"].lines_validator(0, 2, self.settings.max_line_bytes,
                                                                self.settings.max_json_depth)
            run.prepare = m["stage"].PreparedLines(0, run.filename)
            run.item = run._batch(raws, True)
            self.runs[k] = run
            return
        run = self.runs[k]
        if name == "decide":
            plan = run.item[2]
            run.orders, run.stock, run.holds, run.newest = {}, {}, m["state"].HoldBook(), None
            run.balances = dict.fromkeys(plan.users | {e.user_id for e in plan.returns}, self.settings.opening_balance)
            run.b = m["stage"].Batch()
            codes, _ = run._decide_lines(raws, run.item[1], 1, set(), set(), {})
            run.codes = bytes(codes)
        elif name == "writes":
            b = run.b
            writes = m["db"].Script()
            self.state.add_seen(writes, "seen", b.new_keys, b.return_minutes)
            stage.ledger.add_writes(writes, None, 0, run.file_id, b.new_orders, list(b.credited.values()),
                                    run.balances, b.changed_users, set(), infile=True)
            if not k:
                stage.recent_keys, stage.recent_orders = m["state"].Recent(), m["state"].Recent()
            stage.remember([b])
        else:
            run.out, run.rej, run.counts, run.pending = Null(), Null(), m["stage"].Counts(), {}
            run._emit(raws, 1, run.codes, run.item[1], m["stage"].ShopOf(run.orders))
            del self.runs[k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path)
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--file-lines", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.worker import from_generator
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.txt"
        from_generator(path, args.events)
        raws = path.read_bytes().splitlines(keepends=True)
    files = [raws[i:i + args.file_lines] for i in range(0, len(raws), args.file_lines)]
    trees = [Tree("this", ROOT, files)] + ([Tree("other", args.other, files)] if args.other else [])
    times: dict = {(t.label, p): [] for t in trees for p in PARTS + ("total",)}
    gc.disable()
    rounds = 0
    for r in range(args.rounds + 1):     # round 0 warms the caches (amounts, seconds, minutes) up
        for k in range(len(files)):
            order = trees if (r + k) % 2 == 0 else trees[::-1]
            totals = dict.fromkeys([t.label for t in trees], 0.0)
            for part in PARTS:           # a file's part by both back to back: the same load for both
                for tree in order:
                    t = time.process_time()
                    tree.run(part, k)
                    spent = (time.process_time() - t) / len(files[k]) * 1e6
                    totals[tree.label] += spent
                    if r:
                        times[tree.label, part].append(spent)
            if r:
                rounds += 1
                for label, total in totals.items():
                    times[label, "total"].append(total)
    for part in PARTS + ("total",):
        line = [f"{part:>8}:"]
        for tree in trees:
            got = times[tree.label, part]
            line.append(f"{tree.label} best {min(got):.3f} median {statistics.median(got):.3f}")
        if len(trees) == 2:
            diffs = [a - b for a, b in zip(times["this", part], times["other", part])]
            line.append(f"this-other median {statistics.median(diffs):+.3f}, this lower in "
                        f"{sum(d < 0 for d in diffs)} of {rounds}")
        print("  ".join(line))
    print(f"{len(raws):,} lines in {len(files)} files, µs per line; load average "
          f"{open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
