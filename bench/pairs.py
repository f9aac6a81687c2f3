"""This checkout against another, `bench/pipeline.py` run alternately in pairs (prints figures; not a test).

    .venv/bin/python bench/pairs.py OTHER [--pairs 4] [--workloads small] [--out DIR]
                                          [--bench-args '--small-events 50000']
    .venv/bin/python bench/pairs.py OTHER --together ...    # both sides at once, windows started together
    .venv/bin/python bench/pairs.py --report --out DIR     # the summary of runs already made

On this 2-core machine the same code moves ±15% between runs of the small workload and ±2 us/event
of server CPU on big files, and a run's place in a series moves it too (the file system's recent
deletions, the page cache). So: pairs, in ABBA order (this tree first in odd pairs, OTHER first in
even ones), and for each figure the median of each side and in how many pairs this tree came out
lower. Each tree runs its own `bench/pipeline.py` with this interpreter; to compare code on one
bench, put this tree's `bench/` into OTHER first (a `git archive` of it, `bench/` replaced).

How to compare two trees honestly. Two `git archive` copies of one commit are the same program:
nothing of a window depends on the copy (inputs byte-identical, no bytecode written, nothing
written inside the copy, one interpreter), and their 4.5-8% differences, the same copy "lower in
every pair", come from the machine: the CPU a process is charged for its work depends on what
else runs beside it from moment to moment (caches, memory bandwidth). docs/performance.md, "Two copies
of one commit". So:
- read the machine beside each run, printed at the end (bench/machine.py: a fixed probe's CPU per
  piece, other processes' cores, interrupts, steal). A pair whose probes differ by more than
  PROBE_TOLERANCE, or a run beside more than QUIET_CORES of other processes, is flagged NOT
  COMPARABLE: its difference is the machine's, not the code's; run again when the machine is quiet;
- on a machine others use, `--together` runs both sides at once, each window started with the
  other's: both meet the same neighbours (A/A pairs 0.3-5.7% apart, median 2.3%, at load 13-21,
  against 1-21% one after the other), at the price of both sharing the two cores;
- a difference counts only if it is larger than an A/A of the same tree under the same conditions
  (`pairs.py .` on this very folder: no copy at all) and comes out in every pair;
- below ~5% end to end, measure the changed part with a focused bench that alternates both
  variants inside one process (bench/worker.py and the like), not with this.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline import GROUPS  # noqa: E402


def order(pairs: int) -> list[tuple[int, str]]:
    """(pair, side) in the order they run: ABBA, so neither side always goes first."""
    runs = []
    for n in range(1, pairs + 1):
        sides = ("this", "other") if n % 2 else ("other", "this")
        runs += [(n, side) for side in sides]
    return runs


def figures(doc: dict) -> dict[str, float]:
    """The figures compared, by name, from one `pipeline.py --json` document."""
    out = {}
    for workload, w in doc["workloads"].items():
        if "events_per_s" in w:
            out[f"{workload} events/s"] = w["events_per_s"]
        if "us_per_event_total" in w:
            out[f"{workload} CPU us/event"] = w["us_per_event_total"]
        for group in GROUPS:
            if group in w.get("us_per_event", {}):
                out[f"{workload} {group} us/event"] = w["us_per_event"][group]
        if "machine" in w:      # the machine beside the run (bench/machine.py): alike on both sides, or no result
            out[f"{workload} machine probe ms/piece"] = w["machine"]["probe_ms"]
            out[f"{workload} other processes, cores"] = w["machine"]["others_cores"]
        for group, part in w.get("split", {}).items():
            out[f"{workload} {group} ms/file beyond the per-event cost"] = part["ms_per_file"]
    return out


def summary(this: list[dict], other: list[dict]) -> list[tuple[str, float, float, int, int]]:
    """(figure, median here, median there, pairs where this tree was lower, pairs) for every
    figure both sides have, in the order of the first document."""
    mine = [figures(d) for d in this]
    theirs = [figures(d) for d in other]
    rows = []
    for name in mine[0]:
        pairs = [(a[name], b[name]) for a, b in zip(mine, theirs) if name in a and name in b]
        if pairs:
            lower = sum(a < b for a, b in pairs)
            rows.append((name, statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
                         lower, len(pairs)))
    return rows


# Two runs are on the same machine only if the probe's CPU per piece (bench/machine.py) is within
# this fraction on both sides of a pair and nobody else used more than QUIET_CORES meanwhile.
PROBE_TOLERANCE = 0.03
QUIET_CORES = 0.1


def machine_rows(docs: dict[str, list[dict]]) -> list[tuple[int, str, str, dict]]:
    """(pair, side, workload, figures) of every run in pair order: its CPU per event and the machine
    beside it (probe, other processes' cores, steal, load), so a reader sees which runs ran alone."""
    rows = []
    for n in range(1, 1 + max(len(v) for v in docs.values())):
        for side in ("this", "other"):
            if n > len(docs[side]):
                continue
            for workload, w in docs[side][n - 1]["workloads"].items():
                m = w.get("machine")
                if m and "us_per_event_total" in w:
                    rows.append((n, side, workload, {"us_per_event": w["us_per_event_total"], **m}))
    return rows


def unequal_machines(docs: dict[str, list[dict]], together: bool = False) -> list[str]:
    """Why this comparison is not one: each pair whose probes differ by more than PROBE_TOLERANCE,
    each run beside more than QUIET_CORES of other processes."""
    why = []
    rows = machine_rows(docs)
    probes = {(n, side, w): m["probe_ms"] for n, side, w, m in rows}
    for n, side, workload, m in rows:
        if m["others_cores"] > QUIET_CORES and not together:   # together, the other side is one
            why.append(f"pair {n} {side} {workload}: other processes used {m['others_cores']} cores")
        there = probes.get((n, "other", workload))
        if side == "this" and there and m["probe_ms"] and abs(m["probe_ms"] / there - 1) > PROBE_TOLERANCE:
            why.append(f"pair {n} {workload}: probe {m['probe_ms']} ms here against {there} there "
                       f"({100 * (m['probe_ms'] / there - 1):+.1f}%)")
    return why


def run_together(roots: dict[str, Path], out: Path, pairs: int, workloads: str,
                 extra: list[str] = ()) -> tuple[Path, dict[str, list[dict]]]:
    """Both sides at once, each window of one started with the same window of the other
    (`pipeline.py --barrier`): both meet the same neighbours, at the price of sharing the two
    cores with each other, the same for both."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs: dict[str, list[dict]] = {"this": [], "other": []}
    for n in range(1, pairs + 1):
        procs = {}
        for side in ("this", "other") if n % 2 else ("other", "this"):
            name = out / f"{side}-{n}"
            procs[side] = subprocess.Popen(
                [sys.executable, "bench/pipeline.py", "--workloads", workloads, *extra, "--json", f"{name}.json",
                 "--barrier", str(out / f"barrier-{n}"), "--barrier-parties", "2"],
                cwd=roots[side], stdout=open(f"{name}.txt", "w"), stderr=subprocess.STDOUT)
        for side, proc in procs.items():
            if proc.wait():
                raise RuntimeError(f"pair {n} {side} failed: see {out / f'{side}-{n}.txt'}")
        for side in ("this", "other"):
            docs[side].append(json.loads((out / f"{side}-{n}.json").read_text()))
        print(f"pair {n}: both done", flush=True)
    return out, docs


def run_pairs(roots: dict[str, Path], out: Path, pairs: int, workloads: str,
              extra: list[str] = ()) -> tuple[Path, dict[str, list[dict]]]:
    """Each side's `pipeline.py --json` documents, runs in ABBA order. Every run goes to `out`
    made absolute: each tree's bench runs in its own folder, so a relative path would put the
    other tree's output in that tree and the read-back would miss it."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs: dict[str, list[dict]] = {"this": [], "other": []}
    for n, side in order(pairs):
        name = out / f"{side}-{n}"
        with open(f"{name}.txt", "w") as log:
            subprocess.run([sys.executable, "bench/pipeline.py", "--workloads", workloads, *extra, "--json",
                            f"{name}.json"], cwd=roots[side], stdout=log, stderr=subprocess.STDOUT, check=True)
        docs[side].append(json.loads(Path(f"{name}.json").read_text()))
        print(f"pair {n}: {side} done", flush=True)
    return out, docs


def report(out: Path) -> None:
    """The summary of an earlier run's folder (its side-N.json files)."""
    docs = {side: [json.loads(p.read_text()) for p in sorted(out.glob(f"{side}-*.json"),
                                                              key=lambda p: int(p.stem.split("-")[1]))]
            for side in ("this", "other")}
    for name, here, there, lower, pairs in summary(docs["this"], docs["other"]):
        print(f"  {name:<48}  {here:>10,.2f}  {there:>10,.2f}  this lower in {lower} of {pairs}")
    print_machines(docs, together=any(out.glob("barrier-*")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, nargs="?", help="the other checkout (its own bench/pipeline.py runs there)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--workloads", default="small")
    parser.add_argument("--out", type=Path, help="keep every run's output and --json here")
    parser.add_argument("--bench-args", default="", help="more options for both sides' bench/pipeline.py, "
                                                         "e.g. '--small-events 50000'")
    parser.add_argument("--together", action="store_true",
                        help="run both sides at once, their windows started together: both see the same machine")
    parser.add_argument("--report", action="store_true", help="run nothing: summarise the runs already in --out")
    args = parser.parse_args()
    if args.report or args.other is None:
        if not args.out:
            parser.error("--report needs --out DIR; a comparison needs OTHER")
        return report(args.out)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-pairs-"))
    roots = {"this": ROOT, "other": args.other.resolve()}
    runner = run_together if args.together else run_pairs
    out, docs = runner(roots, out, args.pairs, args.workloads, args.bench_args.split())
    print(f"\nmedians of {args.pairs} pairs (ABBA), this tree {ROOT} against {roots['other']}; runs in {out}")
    rows = summary(docs["this"], docs["other"])
    if not rows:   # latency and idle have none of the compared figures: read the runs' outputs
        print("  none of the compared figures (events/s, CPU per event and per file) in these workloads")
        return
    width = max(len(r[0]) for r in rows)
    for name, here, there, lower, pairs in rows:
        print(f"  {name:<{width}}  {here:>10,.2f}  {there:>10,.2f}  this lower in {lower} of {pairs}")
    print_machines(docs, args.together)


def print_machines(docs: dict[str, list[dict]], together: bool = False) -> None:
    print("\nthe machine beside each run (bench/machine.py):")
    for n, side, workload, m in machine_rows(docs):
        print(f"  pair {n} {side:<5} {workload:<6} {m['us_per_event']:>8.2f} us/event  probe {m['probe_ms']:>6.3f} ms  "
              f"others {m['others_cores']:>5.2f} cores  irq {m['irq_s']:>5.2f}s  steal {m['steal_s']:>5.2f}s  "
              f"load {m['load_average']}")
    why = unequal_machines(docs, together)
    if why:
        print("NOT COMPARABLE, the two sides did not run on the same machine:\n  " + "\n  ".join(why))


if __name__ == "__main__":
    main()
