"""This checkout against another, `bench/pipeline.py` run alternately in pairs (prints figures; not a test).

    .venv/bin/python bench/pairs.py OTHER [--pairs 4] [--workloads small] [--out DIR]

On this 2-core machine the same code moves ±15% between runs of the small workload and ±2 us/event
of server CPU on big files, and a run's place in a series moves it too (the file system's recent
deletions, the page cache). So: pairs, in ABBA order (this tree first in odd pairs, OTHER first in
even ones), and for each figure the median of each side and in how many pairs this tree came out
lower. Each tree runs its own `bench/pipeline.py` with this interpreter; to compare code on one
bench, put this tree's `bench/` into OTHER first (a `git archive` of it, `bench/` replaced).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (its own bench/pipeline.py runs there)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--workloads", default="small")
    parser.add_argument("--out", type=Path, help="keep every run's output and --json here")
    parser.add_argument("--bench-args", default="", help="more options for both sides' bench/pipeline.py, "
                                                         "e.g. '--small-events 50000'")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-pairs-"))
    roots = {"this": ROOT, "other": args.other.resolve()}
    out, docs = run_pairs(roots, out, args.pairs, args.workloads, args.bench_args.split())
    print(f"\nmedians of {args.pairs} pairs (ABBA), this tree {ROOT} against {roots['other']}; runs in {out}")
    rows = summary(docs["this"], docs["other"])
    if not rows:   # latency and idle have none of the compared figures: read the runs' outputs
        print("  none of the compared figures (events/s, CPU per event and per file) in these workloads")
        return
    width = max(len(r[0]) for r in rows)
    for name, here, there, lower, pairs in rows:
        print(f"  {name:<{width}}  {here:>10,.2f}  {there:>10,.2f}  this lower in {lower} of {pairs}")


if __name__ == "__main__":
    main()
