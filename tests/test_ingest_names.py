"""Two generators (two ingest hosts) sharing one events folder never overwrite or share a file:
the name is claimed by link(2), and a generator that finds its second taken moves on to the
next free one, before writing or at the moment it publishes."""
from __future__ import annotations

import os
import subprocess
import sys

from app import layout
from app.ingest.generator import Generator, write_event_file
from tests import servers

SUFFIX = layout.SOURCE_SUFFIX


def test_a_name_taken_while_writing_moves_the_file_to_the_next_free_second(tmp_path):
    events = tmp_path / "events"
    other = Generator(seed=2)

    class Racing(Generator):
        def write(self, out, filename, lines, last_file=False):
            # Another host publishes this very name, and the next second, while we write.
            write_event_file(other, events, filename, 3)
            write_event_file(other, events, f"{filename[:-1]}1", 3)
            return super().write(out, filename, lines, last_file)

    path, count = write_event_file(Racing(seed=1), events, "20260101000000", 5, move_on=True)
    assert path.name == f"20260101000002{SUFFIX}" and count == 5
    assert sorted(p.name for p in events.iterdir()) == [f"2026010100000{n}{SUFFIX}" for n in range(3)]
    assert [len(p.read_bytes().splitlines()) for p in sorted(events.iterdir())] == [3, 3, 5]


def test_two_generators_started_in_the_same_second_write_distinct_files(tmp_path):
    shared = tmp_path / "shared"
    env = {**servers.service_env(servers.server_url("unused"), shared, servers.free_port()),
           "WORKER_ID": "test/ingest"}
    runs = [subprocess.Popen([sys.executable, "-m", "app.ingest", "--files", "20", "--events", "40", "--seed",
                              str(seed), "--start", "20260101000000", "--no-register"], cwd=servers.ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    outputs = [r.communicate(timeout=120)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    files = sorted((shared / "events").glob(f"*{SUFFIX}"))
    assert len(files) == 40  # none overwritten, none shared
    assert sum(len(f.read_bytes().splitlines()) for f in files) == 40 * 40
    assert not [n for n in os.listdir(shared / "events") if ".tmp-" in n]
