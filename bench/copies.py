"""One fixed piece of start-up work from several trees, alternated round by round (prints figures; not a test).

    .venv/bin/python bench/copies.py TREE [TREE ...] [--rounds 15]

Whether a tree's place (a `git archive` copy under /var/tmp, a worktree under /work, the path's
length) changes what its processes cost: every daemon, the API and each importer run start by
importing the tree's own `app` (compiled from source: PYTHONDONTWRITEBYTECODE is set here, so no
tree has bytecode), and that is the only work of a run that reads the tree itself (the inputs
are read once per window by the importer; the workload folders and the server's files are in
TMPDIR). Each round runs, for every tree in turn (the order rotated each round), a child that
imports every stage's modules with the tree as its working folder, and takes the child's CPU
from its rusage. The trees alternate within seconds, so the machine's drift, which moves whole
pipeline runs by 5-9%, is shared; a difference that survives is the tree's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODULES = ("app.worker.stage", "app.splitter.stage", "app.sender.stage", "app.apid", "app.ingest.service",
           "app.api.service")
CHILD = "import importlib, os, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n" \
        "assert all(sys.modules[m].__file__.startswith(os.getcwd()) for m in sys.argv[1:])\n"


def child_cpu(tree: Path) -> float:
    """CPU seconds (user + system) of one child importing MODULES from `tree`."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *MODULES], cwd=tree, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"the import child failed in {tree} ({proc.returncode})")
    return usage.ru_utime + usage.ru_stime


def rounds(trees: list[Path], n: int) -> dict[Path, list[float]]:
    """Each tree's CPU per child, `n` rounds, the trees' order rotated every round."""
    got: dict[Path, list[float]] = {t: [] for t in trees}
    for r in range(n):
        for t in trees[r % len(trees):] + trees[:r % len(trees)]:
            got[t].append(child_cpu(t))
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    got = rounds(trees, args.rounds)
    base = statistics.median(got[trees[0]])
    print(f"CPU of one child importing {len(MODULES)} stages' modules, {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}")
    for t in trees:
        lowest = sum(min(got, key=lambda k: got[k][r]) == t for r in range(args.rounds))
        m = statistics.median(got[t])
        print(f"  {str(t):<40} median {1e3 * m:7.1f} ms ({100 * (m / base - 1):+5.1f}% against the first), "
              f"lowest of the trees in {lowest} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
