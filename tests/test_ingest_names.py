"""Two writers of events/ never collide: two generators (two ingest hosts, or the daemon and a
one-shot `--files` run) claim each name by link(2), and one that finds its second taken moves on
to the next free one, before writing or at the moment it publishes; neither dies and every file
is whole, under its own tick, with that tick inside. File names outside the ticks: imported and
processed as they are, never taken for a tick."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import orjson

from app import layout
from app.ingest.generator import Generator, existing_ticks, tick_of, write_event_file
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



def _env(shared_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "INGEST_"))}
    return {**env, "SHARED_DIR": str(shared_dir), "INGEST_INTERVAL": "1", "EVENTS_PER_FILE": "5",
            "INGEST_RATE_MALFORMED": "0"}


def _files(shared_dir) -> dict[str, bytes]:
    suffix = layout.SOURCE_SUFFIX
    return {p.name[: -len(suffix)]: p.read_bytes() for p in (shared_dir / "events").glob(f"*{suffix}")}


def test_a_one_shot_run_and_the_daemon_never_write_the_same_tick(tmp_path, shared_dir):
    env = _env(shared_dir)
    daemon = servers.Process("app.ingest", ["--no-register"], env, tmp_path / "daemon.log").start()
    try:
        servers.wait_until(lambda: _files(shared_dir), 20, 0.1, what="the daemon's first file")
        # The one-shot's files start 2 s ahead: the daemon's next ticks are among them.
        start = tick_of(datetime.now(timezone.utc) + timedelta(seconds=2))
        out = subprocess.run([sys.executable, "-m", "app.ingest", "--no-register", "--files", "6", "--events", "5",
                              "--start", start], cwd=servers.ROOT, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        one_shot = re.findall(r"^(\d{14})$", out.stdout, re.M)
        assert len(one_shot) == 6
        time.sleep(9)       # the daemon's ticks run into and past the one-shot's
        assert daemon.proc.poll() is None, daemon.output()[-3000:]
    finally:
        daemon.stop()
    assert "FileExistsError" not in daemon.output() and "Traceback" not in daemon.output(), daemon.output()[-3000:]
    files = _files(shared_dir)
    assert set(one_shot) <= set(files) and len(files) >= 6 + 8
    for name, body in files.items():           # every file is whole and its lines carry its tick
        lines = body.splitlines()
        assert 1 <= len(lines) <= 5 and body.endswith(b"\n")
        saved = {orjson.loads(line)["saved_at"] for line in lines}
        when = datetime.strptime(name, "%Y%m%d%H%M%S")
        assert saved == {when.strftime("%Y-%m-%d %H:%M:%S.000")}, name
    assert not [p.name for p in (shared_dir / "events").iterdir() if not p.name.endswith(layout.SOURCE_SUFFIX)]


def test_names_outside_the_ticks_are_imported_and_never_taken_for_ticks(api, tmp_path, shared_dir):
    """Decided: the generator writes ticks only; `--import` and the API take any name of
    letters, digits, `_` and `-` (a fixed file `<tick>-fix`, a batch by hand); such a name is
    processed like any other but is not a tick, so the daemon's clock never reads it."""
    src = tmp_path / "src"
    src.mkdir()
    line = (b'{"event_type":4,"payload":{"shop_id":3,"active":true},"saved_at":"2026-01-01 00:00:00.000",'
            b'"timestamp":"2026-01-01 00:00:00.001"}\n')
    for name in ("manual_batch-1", "12345", "99999999999999"):
        (src / f"{name}{layout.SOURCE_SUFFIX}").write_bytes(line)
    env = {**api.process.env}
    out = subprocess.run([sys.executable, "-m", "app.ingest", "--import", str(src)], cwd=servers.ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    client = api.client()
    for name in ("manual_batch-1", "12345", "99999999999999"):
        assert [s["event_ingest_status"] for s in client.file(name)["shards"]] == ["done", "done"]
    assert existing_ticks(shared_dir / "events") == []
    # The daemon starts next to them and writes ticks as usual.
    daemon = servers.Process("app.ingest", [], {**env, "INGEST_INTERVAL": "1", "EVENTS_PER_FILE": "3"},
                             tmp_path / "daemon.log").start()
    try:
        servers.wait_until(lambda: existing_ticks(shared_dir / "events"), 20, 0.1, what="a tick written")
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.output(), daemon.output()[-3000:]
