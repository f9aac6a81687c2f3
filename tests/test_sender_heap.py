"""The sender process keeps a file's buffers for the next file (app/heap.py)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent

# A sender as its process runs it (Sender.setup at start, then `process` file after file), loading
# big run's shard files (5,000 rows, ~1.6 MB each); prints the page faults of each file's load.
CHILD = r"""
import json, logging, resource
from app.client import Task
from app.config import Settings
from app.daemon import Context
from app.sender import stage
from app.shutdown import StopFlag
from tests.test_sender import prepared_rows, write_prepared

settings = Settings.from_env()
sender = stage.Sender(settings, 0)
ctx = Context(StopFlag(), logging.getLogger("test"))
sender.setup(ctx)
names = [f"2026010100{i:04d}" for i in range(6)]
for i, name in enumerate(names):
    write_prepared(settings.shared_dir, name, 0, prepared_rows(name, 0, 5000, start=5000 * i))
faults = []
for name in names:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    [out] = sender.process([Task(name, 0)], ctx)
    assert out.events == 5000, out
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
sender.teardown()
print(json.dumps(faults))
"""


def _faults_per_file(url, shared: Path, keep: str) -> float:
    shared.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MYSQL_SHARD_0_URL": url.secret_text(),
           "SHARED_DIR": str(shared), "SHARD_COUNT": "2", "SENDER_HEAP_KEEP_MB": keep}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1])[2:])


def test_the_sender_keeps_a_files_buffers_for_the_next_one(make_database, tmp_path):
    """With the C library's defaults each big file's buffers (its lines, rows, TSV: megabytes)
    are unmapped when freed and faulted in again for the next file, ~1,500 page faults a file;
    the sender keeps them in its heap (SENDER_HEAP_KEEP_MB, set at start): a fraction of that."""
    kept = _faults_per_file(make_database("shard"), tmp_path / "kept", "64")
    default = _faults_per_file(make_database("shard"), tmp_path / "default", "0")
    assert kept < default / 2, (kept, default)


def test_the_setting():
    assert Settings.from_env({}).sender_heap_keep_mb == 64
    assert Settings.from_env({"SENDER_HEAP_KEEP_MB": "0"}).sender_heap_keep_mb == 0
