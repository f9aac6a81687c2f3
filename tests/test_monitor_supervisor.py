"""The process panel against a real supervisord on a unix socket of the test's own."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from monitor.api import ApiSource
from monitor.app import MonitorApp
from monitor.screens import ConfirmScreen
from monitor.supervisor import SupervisorClient, SupervisorError, SupervisorUnavailable
from monitor.widgets import ProcessTable
from tests import servers
from tests.test_monitor_live import until

CONF = """
[unix_http_server]
file={dir}/supervisor.sock

[supervisord]
nodaemon=true
logfile={dir}/supervisord.log
pidfile={dir}/supervisord.pid
childlogdir={dir}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:sleeper]
command=sleep 1000
startsecs=0
stopwaitsecs=5

[program:idle]
command=sleep 1000
autostart=false
startsecs=0

[program:broken]
command=/bin/false
startsecs=1
startretries=0
"""


@pytest.fixture
def supervisord():
    # A short folder: a unix socket path must fit in 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="mon-sd-"))
    (folder / "supervisord.conf").write_text(CONF.format(dir=folder))
    binary = shutil.which("supervisord") or str(Path(sys.executable).parent / "supervisord")
    proc = subprocess.Popen([binary, "-c", str(folder / "supervisord.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    client = SupervisorClient(str(folder / "supervisor.sock"))
    states = lambda: {p.name: p.statename for p in client.processes()}  # noqa: E731
    servers.wait_until(lambda: states().get("sleeper") == "RUNNING" and states().get("broken") == "FATAL",
                       timeout=20, what="supervisord with sleeper RUNNING and broken FATAL")
    yield proc, client
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    shutil.rmtree(folder, ignore_errors=True)


def dead_api() -> ApiSource:
    return ApiSource(f"http://127.0.0.1:{servers.free_port()}/api/v1/pipeline", timeout=1.0)


def row(table: ProcessTable, name: str) -> list[str]:
    return [getattr(c, "plain", str(c)) for c in table.get_row(name)]


def test_client_speaks_to_supervisord(supervisord):
    _, client = supervisord
    by_name = {p.name: p for p in client.processes()}
    assert by_name["sleeper"].statename == "RUNNING" and by_name["sleeper"].uptime is not None
    assert by_name["idle"].statename == "STOPPED" and by_name["idle"].uptime is None
    with pytest.raises(SupervisorError, match="BAD_NAME"):
        client.start("no-such-program")
    with pytest.raises(SupervisorUnavailable):
        SupervisorClient("/nonexistent/supervisor.sock").processes()


def test_process_panel_shows_states_and_starts_stops_restarts(supervisord):
    proc, client = supervisord
    state = lambda name: next(p for p in client.processes() if p.name == name)  # noqa: E731

    async def scenario():
        app = MonitorApp(dead_api(), client, interval=0.3)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("3")  # the processes panel
            table = app.query_one(ProcessTable)
            await until(pilot, lambda: table.row_count == 3, what="three processes")
            assert row(table, "sleeper")[1] == "RUNNING"
            assert row(table, "idle")[1] == "STOPPED"
            assert row(table, "broken")[1] == "FATAL"
            assert "trouble: broken" in str(app.query_one("#supervisor-status").render())
            assert app.focused is table

            async def act(name: str, key: str):
                table.move_cursor(row=table.row_keys().index(name))
                await pilot.press(key)
                await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
                assert name in app.screen.question
                await pilot.press("y")

            await act("sleeper", "x")
            await until(pilot, lambda: state("sleeper").statename == "STOPPED", what="sleeper stopped")
            await until(pilot, lambda: row(table, "sleeper")[1] == "STOPPED", what="panel shows STOPPED")
            await act("idle", "s")
            await until(pilot, lambda: state("idle").statename == "RUNNING", what="idle started")
            await until(pilot, lambda: row(table, "idle")[1] == "RUNNING", what="panel shows RUNNING")
            pid = state("idle").pid
            await act("idle", "r")
            await until(pilot, lambda: state("idle").statename == "RUNNING" and state("idle").pid != pid,
                        what="idle restarted with a new pid")
            # declined: nothing happens
            table.move_cursor(row=table.row_keys().index("idle"))
            await pilot.press("x")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
            await pilot.press("n")
            await pilot.pause(0.5)
            assert state("idle").statename == "RUNNING"

            # supervisord goes away: the panel says so and the app keeps running
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            status = app.query_one("#supervisor-status")
            await until(pilot, lambda: "supervisord not reachable" in str(status.render()), what="unreachable")
            assert table.row_count == 0
    asyncio.run(scenario())


def test_missing_socket_is_reported_not_fatal(tmp_path):
    async def scenario():
        app = MonitorApp(dead_api(), SupervisorClient(str(tmp_path / "none.sock")), interval=0.3)
        async with app.run_test(size=(160, 48)) as pilot:
            status = app.query_one("#supervisor-status")
            await until(pilot, lambda: app.supervisor_polls > 0, what="a supervisor poll")
            text = str(status.render())
            assert "supervisord not reachable" in text and "none.sock" in text
            started = time.monotonic()
            await pilot.press("q")
            assert time.monotonic() - started < 2
    asyncio.run(scenario())
