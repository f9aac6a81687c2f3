"""The importer's CPU (`python -m app.ingest --import`, the bench's "ingest" group) per event and
per file: the same events imported as small files and as big files into a fresh events/ folder,
against a real API on a fresh pipeline database of the machine's server; the importer's own CPU
(utime + stime of the reaped child, kernel time included), and the API's from /proc. Rounds
alternate this checkout and `--root` (another checkout, e.g. a `git archive` of the base).
Every import gets a folder of its own, in a block group of its own (bench/fsgroup.py), kept
until the end, so no import creates its files among inodes deleted just before. Prints
figures; not a test.

    .venv/bin/python bench/ingest.py [--root OTHER_CHECKOUT] [--rounds 2] [--small DIR] [--big DIR]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fsgroup import spread_subfolders  # noqa: E402
from bench.procstat import cpu_seconds, tree  # noqa: E402
from tests import servers  # noqa: E402

SUFFIX = ".event-ingest.txt"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def api_cpu(api: servers.ApiServer) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in tree(api.process.proc.pid))


def import_once(checkout: Path, env: dict, files: list[Path]) -> tuple[float, float]:
    """(importer CPU s, wall s) of one `--import` of `files` run from `checkout`."""
    before, started = children_cpu(), time.monotonic()
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "app.ingest", "--import", *map(str, files)],
                         cwd=checkout, env={**env, "WORKER_ID": "bench/ingest"}, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
    return children_cpu() - before, time.monotonic() - started


def cached(kind: str) -> Path:
    found = sorted((ROOT / "var" / "bench").glob(f"pipeline-{kind}-*"))
    if not found:
        raise SystemExit(f"no var/bench/pipeline-{kind}-*: run bench/pipeline.py --workloads small once")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="another checkout to alternate with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small", type=Path, help="folder of small files (default: bench/pipeline.py's cache)")
    parser.add_argument("--big", type=Path, help="folder of the same events in big files")
    args = parser.parse_args()
    small = sorted((args.small or cached("small-400x500")).glob(f"*{SUFFIX}"))
    big = sorted((args.big or cached("small-ref")).glob(f"*{SUFFIX}"))
    events = sum(p.read_bytes().count(b"\n") for p in small)
    checkouts = [("branch", ROOT)] + ([("other", args.root.resolve())] if args.root else [])
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    spread_subfolders(work)
    name = servers.unique_name("fs_ingest")
    with servers.admin_connect() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    api = None
    figures: dict[str, list[dict]] = {label: [] for label, _ in checkouts}
    try:
        env = servers.service_env(servers.server_url(name), work / "unused", servers.free_port())
        api = servers.start_api(env, work / "logs")
        for files in (small, big):   # every measured import then re-registers known files
            import_once(ROOT, {**env, "SHARED_DIR": tempfile.mkdtemp(dir=work)}, files)
        for r in range(args.rounds):
            for label, checkout in checkouts if r % 2 == 0 else checkouts[::-1]:
                row = {}
                for size, files in (("small", small), ("big", big)):
                    run_env = {**env, "SHARED_DIR": tempfile.mkdtemp(dir=work)}
                    a0 = api_cpu(api)
                    cpu, wall = import_once(checkout, run_env, files)
                    row[size] = {"files": len(files), "cpu": cpu, "api": api_cpu(api) - a0, "wall": wall}
                per_file = (row["small"]["cpu"] - row["big"]["cpu"]) / (len(small) - len(big))
                per_event = (row["big"]["cpu"] - per_file * len(big)) / events
                api_file = (row["small"]["api"] - row["big"]["api"]) / (len(small) - len(big))
                row["ms_per_file"], row["us_per_event"], row["api_ms_per_file"] = \
                    1e3 * per_file, 1e6 * per_event, 1e3 * api_file
                figures[label].append(row)
                print(f"round {r + 1} {label:6}: importer {row['small']['cpu']:.3f}s ({len(small)} files) / "
                      f"{row['big']['cpu']:.3f}s ({len(big)} files) -> {row['ms_per_file']:.3f} ms/file + "
                      f"{row['us_per_event']:.3f} us/event; API {row['api_ms_per_file']:.3f} ms/file", flush=True)
    finally:
        if api:
            api.process.stop()
        with servers.admin_connect() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        shutil.rmtree(work, ignore_errors=True)
    for label, rows in figures.items():
        print(f"{label:6}: importer {statistics.mean(r['ms_per_file'] for r in rows):.3f} ms/file + "
              f"{statistics.mean(r['us_per_event'] for r in rows):.3f} us/event (mean of {len(rows)}); "
              f"small-file run {statistics.mean(r['small']['cpu'] for r in rows):.3f} s CPU")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
