"""SIGTERM always stops a daemon: the signal handler takes no lock the interrupted code may hold.

The bug this guards against: the handler called `threading.Event.set()`, which takes the
Event's lock; when SIGTERM landed while the main thread was inside `Event.wait()` holding that
lock, the handler waited for itself for ever. An idle daemon polling with zero delay spends
most of its time there, so a few SIGTERMs at random moments hang it with near certainty.
"""
from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from app.shutdown import StopFlag, stop_on_signals

from .servers import ROOT

IDLE_DAEMON = textwrap.dedent("""
    import sys
    from pathlib import Path
    from app.client import PipelineClient
    from app.config import Settings
    from app.daemon import Daemon, StageWork
    from app.logs import setup_logging

    class NoWork(PipelineClient):
        def claim(self, *args, **kwargs):
            return []

    class Idle(StageWork):
        name = "shard-splitter"
        service = "idle-daemon"
        shard = None

        def __init__(self, folder):
            self.folder = folder

        def process(self, tasks, ctx):
            raise AssertionError("no task was ever given")

    settings = Settings.from_env()
    stage = Idle(Path(sys.argv[1]))
    setup_logging(stage.service, stage.folder)
    daemon = Daemon(stage, settings, client=NoWork(settings.pipeline_url))
    daemon.install_signals()
    daemon.run()
""")


DAEMONS = 8


def _env(tmp_path, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHARED_DIR": str(tmp_path / "shared"),
           # zero polls: the loop does nothing but ask for work and wait 0 s, again and again
           "POLL_MIN_SECONDS": "0", "POLL_MAX_SECONDS": "0",
           # nothing listens there: the test must not depend on an API
           "PIPELINE_URL": "http://127.0.0.1:9/api/v1/pipeline"}
    env.update(extra)
    return env


def _wait_for_line(proc: subprocess.Popen, marker: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            if marker in seen:
                return
    raise AssertionError(f"{marker!r} never appeared; output so far:\n{seen.decode(errors='replace')}")


def _terminate_at_random_moments(procs: list[subprocess.Popen], rng: random.Random) -> None:
    """One to three SIGTERMs each, at random moments within the first half second."""
    plan = sorted((rng.uniform(0, 0.5), p) for p in procs for _ in range(rng.randint(1, 3)))
    began = time.monotonic()
    for at, proc in plan:
        time.sleep(max(0.0, at - (time.monotonic() - began)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def _assert_all_exit(procs: list[subprocess.Popen], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    hung = []
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(proc)
    for proc in hung:
        proc.kill()
        proc.wait(5)
    assert not hung, f"{len(hung)} of {len(procs)} {what} ignored SIGTERM for {timeout:.0f}s (deadlocked handler)"
    # 0, or killed by a last SIGTERM that landed after the daemon finished, while the
    # interpreter was shutting down and had restored the default handler
    assert all(p.returncode in (0, -signal.SIGTERM) for p in procs), [p.returncode for p in procs]


@pytest.mark.parametrize("batch", range(3))
def test_idle_daemon_stops_on_sigterm_at_any_moment(tmp_path, batch):
    rng = random.Random(batch)
    procs = []
    for i in range(DAEMONS):
        folder = tmp_path / f"d{i}"
        procs.append(subprocess.Popen([sys.executable, "-c", IDLE_DAEMON, str(folder)], cwd=ROOT,
                                      env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            _wait_for_line(proc, b"starting as", 30)
        _terminate_at_random_moments(procs, rng)
        _assert_all_exit(procs, "idle daemons")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
    for i in range(DAEMONS):
        assert [p.name for p in (tmp_path / f"d{i}").iterdir()] == ["activity.log"], "folder not emptied"
        assert b"SIGTERM received" in (tmp_path / f"d{i}" / "activity.log").read_bytes()


def test_ingest_daemon_stops_on_sigterm_at_any_moment(tmp_path):
    rng = random.Random(7)
    procs = []
    for i in range(6):
        env = _env(tmp_path, SHARED_DIR=str(tmp_path / f"s{i}"), INGEST_INTERVAL="0.002", EVENTS_PER_FILE="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "app.ingest", "--no-register"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            _wait_for_line(proc, b"writing a file every", 30)
        _terminate_at_random_moments(procs, rng)
        _assert_all_exit(procs, "event-ingest daemons")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()


def test_stop_flag_wakes_every_waiter_and_stays_set():
    flag = StopFlag()
    woke = []
    threads = [threading.Thread(target=lambda: woke.append(flag.wait(30))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert woke == [] and not flag.is_set()
    began = time.monotonic()
    flag.set()
    for t in threads:
        t.join(5)
    assert woke == [True] * 4 and time.monotonic() - began < 2
    assert flag.wait(0) and flag.wait(30) and flag.is_set()  # stays set: later waits return at once


def test_stop_flag_wait_times_out_when_not_set():
    flag = StopFlag()
    began = time.monotonic()
    assert flag.wait(0.05) is False
    assert 0.04 < time.monotonic() - began < 2
    assert flag.wait(0) is False


def test_signal_during_wait_in_main_thread_sets_the_flag():
    flag = StopFlag()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop_on_signals(flag, (signal.SIGUSR1,))
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        began = time.monotonic()
        assert flag.wait(30) is True
        assert time.monotonic() - began < 5
        assert flag.signal == signal.SIGUSR1 and flag.signal_name == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, previous)
