"""Screenshots of the main screen at 80x24 and 160x48, compared with the accepted SVGs in
__snapshots__/ (`pytest --snapshot-update` rewrites them after a deliberate change; look at
snapshot_report.html first).

The data is fixed and the clock stands still, so the picture depends only on the code: the real
polling path is what tests/test_monitor_live.py covers.
"""
from __future__ import annotations

import asyncio
import threading
import time

from monitor.api import Snapshot
from textual.widgets import Footer

from monitor.app import ApiPolled, MonitorApp, ProcessesPolled
from monitor.supervisor import ProcessInfo

NOW = 1_800_000_000


def snapshot_data() -> Snapshot:
    summary = {
        "total": 240,
        "by_stage": {
            "event_ingest": {"new": 0, "started": 2, "done": 238, "failed": 0},
            "shard_splitter": {"new": 30, "started": 2, "done": 205, "failed": 3},
            "shard_worker": {"new": 56, "started": 2, "done": 181, "failed": 1},
            "mysql_sender": {"new": 73, "started": 1, "done": 165, "failed": 1},
        },
        "by_shard": [{"shard": 0, "total": 120, "done": 90, "failed": 1, "new": 29, "started": 0},
                     {"shard": 1, "total": 120, "done": 75, "failed": 0, "new": 44, "started": 1}],
        "stages": {
            "shard_splitter": {"ready": 28, "oldest_ready_age_seconds": 412.5, "done_last_minute": 0,
                               "events_last_minute": 0, "median_run_ms": 850.0},
            "shard_worker": {"ready": 20, "oldest_ready_age_seconds": 75.0, "done_last_minute": 9,
                             "events_last_minute": 4410, "median_run_ms": 1200.0},
            "mysql_sender": {"ready": 15, "oldest_ready_age_seconds": 12.0, "done_last_minute": 11,
                             "events_last_minute": 5390, "median_run_ms": 640.0},
        },
    }
    wave = [3, 5, 8, 12, 9, 7, 10, 14, 16, 12, 9, 6, 4, 8, 11, 13, 15, 12, 10, 9, 7, 5, 8, 10, 12, 14, 11, 9, 0, 0]
    throughput = {"minutes": 30, "stages": {
        "event_ingest": {"files": [2] * 30, "events": [1000] * 30},
        "shard_splitter": {"files": wave, "events": [v * 490 for v in wave]},
        "shard_worker": {"files": wave[1:] + [9], "events": [v * 490 for v in wave[1:] + [9]]},
        "mysql_sender": {"files": wave[2:] + [10, 11], "events": [v * 490 for v in wave[2:] + [10, 11]]},
    }}
    failed = {
        "shard-splitter": [
            {"filename": f"2025101517{m:02d}00", "shard": 0, "attempts": 5, "updated_at": f"2025-10-15T17:{m:02d}:09.120Z",
             "last_error": "source missing: /shared/events/... not found"} for m in (10, 11, 12)],
        "shard-worker": [{"filename": "20251015170500", "shard": 1, "attempts": 3,
                          "updated_at": "2025-10-15T17:06:41.002Z",
                          "last_error": "bad event on line 17: payload.qty must be an integer"}],
        "mysql-sender": [{"filename": "20251015170000", "shard": 0, "attempts": 5,
                          "updated_at": "2025-10-15T17:02:00.500Z",
                          "last_error": "(1146) Table 'shop_shard_0.events' doesn't exist"}],
    }
    started = {
        "shard-splitter": [
            {"filename": "20251015172000", "shard": 0, "attempts": 1, "owner": "splitter@host:41",
             "lease_expired": False, "running_ms": 400},
            {"filename": "20251015172000", "shard": 1, "attempts": 2, "owner": "splitter@host:41",
             "lease_expired": True, "running_ms": 95_000}],
        "shard-worker": [
            {"filename": "20251015171500", "shard": 0, "attempts": 1, "owner": "worker-0@host:52",
             "lease_expired": False, "running_ms": 1500},
            {"filename": "20251015171000", "shard": 1, "attempts": 1, "owner": "worker-1@host:53",
             "lease_expired": False, "running_ms": 48_000}],
        "mysql-sender": [{"filename": "20251015170900", "shard": 1, "attempts": 1, "owner": "sender-1@host:61",
                          "lease_expired": False, "running_ms": 300}],
    }
    hosts = [
        {"host": "host-a", "holding": 2, "last_seen": "2025-10-15T17:20:01.300Z", "programs": [
            {"owner": "host-a/shard-splitter-0", "program": "shard-splitter-0", "holding": 1, "done": 205,
             "last_seen": "2025-10-15T17:20:01.300Z", "lease_expired": False},
            {"owner": "host-a/shard-worker-0", "program": "shard-worker-0", "holding": 1, "done": 90,
             "last_seen": "2025-10-15T17:19:58.000Z", "lease_expired": False}]},
        {"host": "host-b", "holding": 1, "last_seen": "2025-10-15T17:19:40.000Z", "programs": [
            {"owner": "host-b/mysql-sender-1", "program": "mysql-sender-1", "holding": 1, "done": 75,
             "last_seen": "2025-10-15T17:19:40.000Z", "lease_expired": True}]},
    ]
    return Snapshot(summary, throughput, failed, started, hosts=hosts)


PROCESSES = [
    ProcessInfo("pipeline-apid", "pipeline-apid", "RUNNING", 101, NOW - 7260, NOW),
    ProcessInfo("event-ingest", "event-ingest", "RUNNING", 102, NOW - 7250, NOW),
    ProcessInfo("shard-splitter", "shard-splitter", "RUNNING", 103, NOW - 7250, NOW),
    ProcessInfo("shard-worker-0", "shard-worker", "RUNNING", 104, NOW - 95, NOW),
    ProcessInfo("shard-worker-1", "shard-worker", "BACKOFF", 0, NOW - 20, NOW, "Exited too quickly"),
    ProcessInfo("mysql-sender-0", "mysql-sender", "RUNNING", 106, NOW - 7249, NOW),
    ProcessInfo("mysql-sender-1", "mysql-sender", "STOPPED", 0, NOW - 600, NOW, "Nov 26 10:00 PM"),
]


class FixedSource:
    base_url = "http://127.0.0.1:8082/api/v1/pipeline"

    def fetch(self) -> Snapshot:
        return snapshot_data()


class FixedSupervisor:
    socket_path = "/tmp/event-pipeline/supervisor.sock"

    def processes(self) -> list[ProcessInfo]:
        return list(PROCESSES)


def fixed_app() -> MonitorApp:
    return MonitorApp(FixedSource(), FixedSupervisor(), interval=1.0, clock=lambda: 1000.0)


async def first_data(pilot) -> None:
    app = pilot.app
    for _ in range(200):
        if app.polls and app.supervisor_polls:
            break
        await asyncio.sleep(0.02)
    await pilot.pause(0.2)


def test_main_screen_80x24(snap_compare):
    assert snap_compare(fixed_app(), terminal_size=(80, 24), run_before=first_data)


def test_main_screen_160x48(snap_compare):
    assert snap_compare(fixed_app(), terminal_size=(160, 48), run_before=first_data)


def test_processes_tab_80x24(snap_compare):
    async def show_processes(pilot) -> None:
        await first_data(pilot)
        await pilot.press("3")
        await pilot.pause(0.2)
    assert snap_compare(fixed_app(), terminal_size=(80, 24), run_before=show_processes)


async def settled(pilot, condition, seconds: float = 10.0) -> bool:
    """Whether `condition()` holds once the app has laid out again: a resize is applied over
    several refreshes, and a loaded machine takes longer than any fixed pause."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        await pilot.pause(0.05)
    return condition()


def test_layout_follows_the_terminal_size():
    """Narrow: one lower panel behind tabs; wide: all four; and back, while running."""
    async def scenario():
        app = fixed_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await first_data(pilot)
            shown = lambda: [p.id for p in app.query(".panel") if p.display and p.region.height > 0]  # noqa: E731
            assert await settled(pilot, lambda: app.query_one("#tabs").display and shown() == ["failed"]), shown()
            await pilot.press("4")
            assert await settled(pilot, lambda: shown() == ["throughput"]), shown()
            assert app.focused.id == "throughput"
            await pilot.resize_terminal(200, 50)
            wide = ["failed", "stuck", "processes-panel", "throughput"]
            assert await settled(pilot, lambda: app.screen.has_class("-wide") and shown() == wide), shown()
            assert not app.query_one("#tabs").region.height
            spark = lambda: app.query_one("#throughput").get_row("shard-splitter")[1].plain  # noqa: E731
            assert await settled(pilot, lambda: len(spark()) > 20), spark()  # sparklines widen with their panel
            wide_spark = spark()
            await pilot.resize_terminal(80, 24)
            assert await settled(pilot, lambda: shown() == ["throughput"] and len(spark()) < len(wide_spark)), \
                (shown(), spark())
    asyncio.run(scenario())


def test_the_footer_keeps_each_label_apart_from_the_next_key():
    """The interval keys' label used to run into the next key: `+- intervalo Open file`."""
    async def scenario():
        app = MonitorApp(FixedSource(), None, interval=1.0, clock=lambda: 1000.0)
        async with app.run_test(size=(160, 48)) as pilot:
            footer = app.screen.query_one(Footer)
            for _ in range(100):
                await pilot.pause(0.05)
                if any(w.region.width for w in footer.query("FooterLabel")):
                    break
            parts = sorted((w.region for w in footer.query("FooterKey, FooterLabel") if w.region.width),
                           key=lambda r: r.x)
            labels = [w.region for w in footer.query("FooterLabel")]
            return parts, labels
    parts, labels = asyncio.run(scenario())
    assert labels, "the interval group's label"
    for label in labels:
        after = [r for r in parts if r.x >= label.right]
        assert not after or after[0].x > label.right, (label, after[0])


def test_a_late_timer_tick_after_the_widgets_are_gone_draws_nothing():
    """Under load a poll tick can land while the app winds down and its status line is already
    removed: the tick must not raise (it used to: NoMatches '#status', failing a live test)."""
    async def scenario():
        app = fixed_app()
        async with app.run_test(size=(80, 24)) as pilot:
            await first_data(pilot)
            await app.query_one("#status").remove()
            app.render_status()
    asyncio.run(scenario())


def test_polls_that_land_while_the_app_winds_down_draw_nothing():
    """A poll's answer arrives from its thread whenever the fetch ends. One that lands after the
    app began to shut down found its panels gone and raised NoMatches (failed CI once, in
    test_layout_follows_the_terminal_size): answers queued as the app exits must do nothing."""
    def keep_answering(app, stop):
        while not stop.is_set():
            app.post_message(ApiPolled(snapshot_data(), None))
            app.post_message(ProcessesPolled(list(PROCESSES), None))
            time.sleep(0.0005)

    async def scenario():
        app, stop = fixed_app(), threading.Event()
        answers = threading.Thread(target=keep_answering, args=(app, stop), daemon=True)
        try:
            async with app.run_test(size=(80, 24)) as pilot:
                await first_data(pilot)
                answers.start()
                await pilot.pause(0.1)
        finally:
            stop.set()
            answers.join()
        return app.polls
    assert asyncio.run(scenario()) > 2
