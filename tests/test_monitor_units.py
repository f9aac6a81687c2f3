"""The dashboard's pure parts: text formatting, the stuck rules, tables that keep their cursor,
and the command line."""
from __future__ import annotations

import asyncio

import pytest
from textual.app import App

from app.config import Settings
from monitor import formatting as fmt
from monitor.__main__ import build_app, parse_args
from monitor.screens import ConfirmScreen
from monitor.stuck import Thresholds
from monitor.widgets import Banner, SyncTable


def test_durations_counts_and_sparklines():
    assert [fmt.seconds(v) for v in (None, 0.25, 42, 185, 7800, 3 * 86400 + 4 * 3600)] == \
        ["—", "250ms", "42s", "3m05s", "2h10m", "3d04h"]
    assert [fmt.count(v) for v in (0, 99_999, 123_456, 45_000_000)] == ["0", "99999", "123k", "45.0M"]
    assert fmt.sparkline([0, 0, 0]) == "···"
    assert fmt.sparkline([1, 2, 4, 8]) == "▂▃▅█"
    assert fmt.sparkline(list(range(30)), 5) == "▇▇███"  # the newest 5, scaled to the largest shown
    assert fmt.bar(5, 1, 10, 10) == ("█████", "█", "░░░░")
    assert fmt.bar(100, 1, 1000, 10) == ("█", "█", "░" * 8)  # one failure still shows
    assert fmt.clip("a  very\nlong text", 8) == "a very …"
    assert fmt.stamp("2025-01-01T10:00:05.123Z") == "2025-01-01 10:00:05.123"


def test_stuck_rules():
    t = Thresholds(stuck_after=60, factor=5, floor=10)
    assert t.stage_state({"ready": 0, "oldest_ready_age_seconds": None}) == "ok"
    assert t.stage_state({"ready": 3, "oldest_ready_age_seconds": 59, "done_last_minute": 0}) == "ok"
    assert t.stage_state({"ready": 3, "oldest_ready_age_seconds": 61, "done_last_minute": 4}) == "lagging"
    assert t.stage_state({"ready": 3, "oldest_ready_age_seconds": 61, "done_last_minute": 0}) == "stuck"
    assert t.task_reason({"lease_expired": True, "running_ms": 10}, 1000) == "lease expired"
    assert t.task_reason({"lease_expired": False, "running_ms": 9_000}, 100) is None  # under the floor
    assert t.task_reason({"lease_expired": False, "running_ms": 11_000}, 100) == "far past median 100ms"
    assert t.task_reason({"lease_expired": False, "running_ms": 40_000}, 10_000) is None  # under 5x median
    assert t.task_reason({"lease_expired": False, "running_ms": 51_000}, 10_000) is not None
    assert t.task_reason({"lease_expired": False, "running_ms": 61_000}, None) == "running over 60s"


class Table(SyncTable):
    COLUMNS = (("name", "name"), ("value", "value"))


class TableApp(App):
    def compose(self):
        yield Table(id="t")


def test_sync_keeps_cursor_and_scroll_on_the_same_row():
    async def scenario():
        app = TableApp()
        async with app.run_test(size=(40, 12)) as pilot:
            table = app.query_one(Table)
            rows = [(f"k{i:02d}", (f"row {i}", str(i))) for i in range(50)]
            table.sync(rows)
            await pilot.pause()
            table.focus()
            table.move_cursor(row=30)
            await pilot.pause()
            scroll = table.scroll_y
            assert scroll > 0 and table.selected_key == "k30"

            table.sync([(k, (name, value + "!")) for k, (name, value) in rows])  # values change only
            await pilot.pause()
            assert table.selected_key == "k30" and table.scroll_y == scroll
            assert table.get_row("k30")[1].plain == "30!"

            table.sync(rows[:10] + rows[11:] + [("k99", ("new", "99"))])  # one above goes, one added
            await pilot.pause()
            assert table.selected_key == "k30" and table.row_keys()[-1] == "k99"

            table.sync([("first", ("inserted", "0"))] + rows)  # reordered: the table is rebuilt
            await pilot.pause()
            await pilot.pause()
            assert table.selected_key == "k30" and table.cursor_row == 31
            assert abs(table.scroll_y - scroll) <= 1

            table.sync(rows[:5])  # the selected row is gone: the cursor stays in range
            await pilot.pause()
            assert table.row_count == 5 and 0 <= table.cursor_row < 5
    asyncio.run(scenario())


def test_command_line_defaults_and_validation(capsys):
    settings = Settings.from_env({"PIPELINE_URL": "http://api.example:8082/api/v1/pipeline",
                                  "SUPERVISOR_SOCKET": "/run/x/supervisor.sock"})
    args = parse_args([], settings)
    assert (args.api_url, args.supervisor_socket, args.interval) == \
        ("http://api.example:8082/api/v1/pipeline", "/run/x/supervisor.sock", 1.0)
    app = build_app(parse_args(["--interval", "2.5", "--stuck-after", "30", "--supervisor-socket", ""], settings),
                    settings)
    assert app.interval == 2.5 and app.thresholds.stuck_after == 30 and app.supervisor is None
    for bad in (["--interval", "0"], ["--interval", "soon"], ["--size", "10x5"]):
        with pytest.raises(SystemExit):
            parse_args(bad, settings)
    assert "must be above 0" in capsys.readouterr().err


class BannerApp(App):
    def compose(self):
        yield Banner(id="b")


def test_texts_from_outside_are_not_markup():
    """Error texts carry brackets ([Errno 111], [/path]); shown as markup they would vanish or crash."""
    async def scenario():
        app = BannerApp()
        async with app.run_test(size=(80, 10)) as pilot:
            banner = app.query_one(Banner)
            banner.say("ConnectionError: [Errno 111] refused [/oops] [b]")
            await pilot.pause()
            assert banner.display and "[Errno 111] refused [/oops] [b]" in str(banner.render())
            answers = []
            app.push_screen(ConfirmScreen("Retry? last error: [/bold] broken [red"), answers.append)
            await pilot.pause()
            assert "[/bold] broken [red" in str(app.screen.query_one("#question").render())
            await pilot.press("y")
            assert answers == [True]
            banner.say(None)
            await pilot.pause()
            assert not banner.display
    asyncio.run(scenario())
