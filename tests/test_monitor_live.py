"""The dashboard against the real API and database: what it shows is what the table holds, and
what the operator does through it lands in the database."""
from __future__ import annotations

import asyncio
import socket
import time


from app.config import MySQLURL
from app.rejected import RejectedWriter
from monitor.api import STAGES, WORK_STAGES, ApiSource
from monitor.app import MonitorApp
from monitor.screens import ConfirmScreen, FileScreen
from monitor.widgets import FailedTable, PipelineTable, ShardTable, StuckTable, task_key
from tests import servers

FILES = [f"2025010100000{i}" for i in range(1, 8)]
WORKER = "w-monitor-test"


def populate(client) -> None:
    """Tasks in every state of every stage (LEASE_SECONDS is long, so nothing is reaped)."""
    for f in FILES:
        client.register(f, [0, 1])
    for f in FILES[:-1]:  # the last file's ingest stays 'started'
        client.ingest_done(f, events=100)

    def run(stage, f, shard, outcome="done", error="boom"):
        client.start(stage, f, shard, worker=WORKER)
        if outcome == "done":
            client.done(stage, f, shard, worker=WORKER, events=50, stats={"lines": 50})
        elif outcome == "fail":
            client.fail(stage, f, shard, error, worker=WORKER)

    for shard in (0, 1):
        for stage in WORK_STAGES:
            run(stage, FILES[0], shard)
    run("shard-splitter", FILES[1], 0), run("shard-worker", FILES[1], 0)
    run("mysql-sender", FILES[1], 0, "fail", "duplicate key on events")
    run("shard-splitter", FILES[1], 1), run("shard-worker", FILES[1], 1), run("mysql-sender", FILES[1], 1, "start")
    run("shard-splitter", FILES[2], 0), run("shard-worker", FILES[2], 0, "fail", "balance would go negative [/user 7]")
    run("shard-splitter", FILES[2], 1), run("shard-worker", FILES[2], 1, "start")
    run("shard-splitter", FILES[3], 0, "start"), run("shard-splitter", FILES[3], 1, "start")
    run("shard-splitter", FILES[4], 0, "fail", "source missing")


def db_query(api, sql: str, args=()) -> list[tuple]:
    return servers.query(servers.server_url(api.process.env["MYSQL_PIPELINE_URL"].rsplit("/", 1)[1]), sql, args)


def db_counts(api) -> dict[str, dict[str, int]]:
    out = {}
    for stage in STAGES:
        col = stage.replace("-", "_") + "_status"
        rows = db_query(api, f"SELECT {col}, COUNT(*) FROM pipeline_tracking GROUP BY {col}")
        out[stage] = {"new": 0, "started": 0, "done": 0, "failed": 0, **{s: n for s, n in rows}}
    return out


def status_of(api, stage: str, filename: str, shard: int) -> str:
    col = stage.replace("-", "_") + "_status"
    return db_query(api, f"SELECT {col} FROM pipeline_tracking WHERE filename=%s AND shard=%s",
                    (filename, shard))[0][0]


async def until(pilot, predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cells(table, key: str) -> list[str]:
    return [getattr(c, "plain", str(c)) for c in table.get_row(key)]


def make_app(api, **kw) -> MonitorApp:
    return MonitorApp(ApiSource(api.base, timeout=2.0), None, interval=kw.pop("interval", 0.5), **kw)


def test_matrix_shards_failed_and_started_show_the_database(api_factory, api_env):
    api = api_factory({**api_env, "LEASE_SECONDS": "600"})
    populate(api.client())
    truth = db_counts(api)
    assert all(truth[s]["failed"] for s in WORK_STAGES) and all(truth[s]["started"] for s in STAGES)

    async def scenario():
        app = make_app(api)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, what="first poll")
            await pilot.pause(0.1)
            table = app.query_one(PipelineTable)
            assert table.row_keys() == list(STAGES)
            for stage in STAGES:
                row = cells(table, stage)
                shown = dict(zip(("new", "started", "done", "failed"), map(int, row[1:5])))
                assert shown == truth[stage], stage
            ready = int(cells(table, "shard-worker")[5])
            assert ready == db_query(api, "SELECT COUNT(*) FROM pipeline_tracking WHERE "
                                          "shard_splitter_status='done' AND shard_worker_status='new'")[0][0]

            failed_in_db = {task_key(stage, f, s) for stage in WORK_STAGES for f, s in db_query(
                api, f"SELECT filename, shard FROM pipeline_tracking WHERE {stage.replace('-', '_')}_status='failed'")}
            assert set(app.query_one(FailedTable).row_keys()) == failed_in_db
            started_in_db = {task_key(stage, f, s) for stage in WORK_STAGES for f, s in db_query(
                api, f"SELECT filename, shard FROM pipeline_tracking WHERE {stage.replace('-', '_')}_status='started'")}
            assert set(app.query_one(StuckTable).row_keys()) == started_in_db

            shards = app.query_one(ShardTable)
            for shard, total, done in db_query(api, "SELECT shard, COUNT(*), SUM(mysql_sender_status='done') "
                                                    "FROM pipeline_tracking GROUP BY shard"):
                assert cells(shards, str(shard))[2] == f"{done}/{total}"
            assert "API ok" in str(app.query_one("#status").render())
    asyncio.run(scenario())


def test_retry_through_the_ui_changes_the_database(api_factory, api_env):
    api = api_factory({**api_env, "LEASE_SECONDS": "600"})
    populate(api.client())
    target = ("shard-worker", FILES[2], 0)

    async def scenario():
        app = make_app(api)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, what="first poll")
            await pilot.pause(0.1)
            failed = app.query_one(FailedTable)
            failed.focus()
            failed.move_cursor(row=failed.row_keys().index(task_key(*target)))
            await pilot.pause()
            assert "balance would go negative [/user 7]" in cells(failed, task_key(*target))  # not markup

            await pilot.press("r")  # asked, then declined: nothing changes
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
            assert "attempts so far: 1" in app.screen.question and "balance would go negative" in app.screen.question
            await pilot.press("n")
            await pilot.pause(0.3)
            assert status_of(api, *target) == "failed"

            await pilot.press("r")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
            await pilot.press("y")
            await until(pilot, lambda: status_of(api, *target) == "new", what="retry in the database")
            await until(pilot, lambda: task_key(*target) not in failed.row_keys(), what="row gone")

            # retry every failed task of a stage, chosen in the stage table; the count is asked first
            stages = app.query_one(PipelineTable)
            stages.focus()
            stages.move_cursor(row=list(STAGES).index("mysql-sender"))
            await pilot.press("a")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirmation")
            assert "Retry all 1 failed tasks of mysql-sender" in app.screen.question
            await pilot.press("y")
            await until(pilot, lambda: status_of(api, "mysql-sender", FILES[1], 0) == "new", what="retry all")
            assert db_query(api, "SELECT COUNT(*) FROM pipeline_tracking WHERE mysql_sender_status='failed'")[0][0] == 0
            assert status_of(api, "shard-splitter", FILES[4], 0) == "failed"  # another stage untouched
    asyncio.run(scenario())


def test_file_detail_shows_every_shard_and_its_history(api_factory, api_env):
    api = api_factory({**api_env, "LEASE_SECONDS": "600"})
    populate(api.client())
    transitions = db_query(api, "SELECT COUNT(*) FROM pipeline_transitions WHERE filename=%s", (FILES[1],))[0][0]
    writer = RejectedWriter(MySQLURL.parse("MYSQL_PIPELINE_URL", api.process.env["MYSQL_PIPELINE_URL"]))
    tee = writer.tee(lambda _: None, FILES[1], "shard-splitter", None)
    tee(b'{"line_no":7,"reason":"missing_shop_id","line":"{\\"event_type\\":0,\\"payload\\":{}}"}')
    tee.flush()
    writer.close()

    async def scenario():
        app = make_app(api)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, what="first poll")
            await pilot.pause(0.1)
            failed = app.query_one(FailedTable)
            failed.focus()
            failed.move_cursor(row=failed.row_keys().index(task_key("mysql-sender", FILES[1], 0)))
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, FileScreen), what="file screen")
            screen = app.screen
            history = screen.query_one("#file-history")
            await until(pilot, lambda: history.row_count == transitions, what="history rows")
            shards = screen.query_one("#file-shards")
            assert shards.row_count == 2
            sender_status = [getattr(c, "plain", c) for c in shards.get_row_at(0)][4]
            assert sender_status == "failed"
            texts = [" ".join(getattr(c, "plain", str(c)) for c in history.get_row_at(i))
                     for i in range(history.row_count)]
            assert any("duplicate key on events" in t and "mysql-sender" in t for t in texts)
            rejected = screen.query_one("#file-rejected")
            await until(pilot, lambda: rejected.row_count == 1, what="rejected lines")
            row = " ".join(getattr(c, "plain", str(c)) for c in rejected.get_row_at(0))
            assert "missing_shop_id" in row and '{"event_type":0,"payload":{}}' in row and " 7 " in row, row
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, FileScreen), what="back to the dashboard")

            await pilot.press("o")  # open by name
            await pilot.pause()
            for ch in FILES[6]:
                await pilot.press(ch)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, FileScreen), what="file screen by name")
            await until(pilot, lambda: app.screen.query_one("#file-shards").row_count == 2, what="shards")
    asyncio.run(scenario())


def test_cursor_stays_on_its_task_while_rows_come_and_go(api_factory, api_env):
    api = api_factory({**api_env, "LEASE_SECONDS": "600"})
    client = api.client()
    populate(client)

    async def scenario():
        app = make_app(api, interval=0.3)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.snapshot is not None, what="first poll")
            await pilot.pause(0.1)
            failed = app.query_one(FailedTable)
            failed.focus()
            chosen = task_key("mysql-sender", FILES[1], 0)
            failed.move_cursor(row=failed.row_keys().index(chosen))
            await pilot.pause()
            before = failed.row_keys()
            # A new failure sorts before the chosen row: the table is rebuilt under the cursor.
            client.start("shard-splitter", FILES[5], 0, worker=WORKER)
            client.fail("shard-splitter", FILES[5], 0, "disk full", worker=WORKER)
            await until(pilot, lambda: len(failed.row_keys()) == len(before) + 1, what="new failed row")
            assert failed.row_keys().index(chosen) == before.index(chosen) + 1
            assert failed.selected_key == chosen
            # a row above disappears
            client.retry("shard-splitter", FILES[4], 0)
            await until(pilot, lambda: len(failed.row_keys()) == len(before), what="row removed")
            assert failed.selected_key == chosen
    asyncio.run(scenario())


def test_banner_while_the_api_is_down_and_recovery(api_factory, api_env):
    api = api_factory({**api_env, "LEASE_SECONDS": "600"})
    populate(api.client())

    async def scenario():
        app = make_app(api, interval=0.3)
        async with app.run_test(size=(80, 24)) as pilot:
            banner = app.query_one("#api-banner")
            await until(pilot, lambda: app.snapshot is not None, what="first poll")
            assert not banner.display
            api.process.stop()
            await until(pilot, lambda: banner.display, what="banner")
            text = str(banner.render())
            assert "unreachable" in text and str(api.port) in text
            assert "API down" in str(app.query_one("#status").render())
            assert app.query_one(PipelineTable).row_count == 4  # the last data stays on screen, dimmed
            assert app.screen.has_class("-stale")
            await pilot.press("plus")  # still responsive
            assert app.interval == 0.5
            restarted = api_factory(api.process.env)
            assert restarted.port == api.port
            await until(pilot, lambda: not banner.display, timeout=20, what="banner cleared")
            assert "API ok" in str(app.query_one("#status").render())
            assert not app.screen.has_class("-stale")
    asyncio.run(scenario())


def test_slow_api_never_freezes_the_screen():
    """A listener that accepts and never answers: the poll hangs on its worker thread while
    keys still work and the status line says what it is waiting for."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    try:
        async def scenario():
            clock = [0.0]
            app = MonitorApp(ApiSource(f"http://127.0.0.1:{port}/api/v1/pipeline", timeout=20.0), None,
                             interval=1.0, clock=lambda: clock[0])
            async with app.run_test(size=(80, 24)) as pilot:
                await pilot.pause(0.2)
                assert app.api_since is not None and app.polls == 0  # the first poll hangs
                started = time.monotonic()
                await pilot.press("plus")
                await pilot.press("plus")
                assert time.monotonic() - started < 1.0
                assert app.interval == 5.0
                clock[0] = 12.0
                app.render_status()
                assert "waiting for API 12s" in str(app.query_one("#status").render())
        asyncio.run(scenario())
    finally:
        server.close()


def test_interval_keys():
    async def scenario():
        app = MonitorApp(ApiSource(f"http://127.0.0.1:{servers.free_port()}/api/v1/pipeline", timeout=1.0), None)
        async with app.run_test(size=(80, 24)) as pilot:
            for key, expected in (("plus", 2.0), ("plus", 5.0), ("minus", 2.0), ("minus", 1.0),
                                  ("minus", 0.5), ("minus", 0.5)):
                await pilot.press(key)
                assert app.interval == expected
            assert "every 500ms" in str(app.query_one("#status").render())
    asyncio.run(scenario())
