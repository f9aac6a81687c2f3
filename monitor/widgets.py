"""The dashboard's panels. Each table knows how to show its part of a refresh, and keeps the
operator's cursor and scroll position while its rows change underneath."""
from __future__ import annotations

from typing import Iterable, Sequence

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable, Static
from textual.widgets.data_table import ColumnKey

from . import formatting as fmt
from .api import STAGES, WORK_STAGES, Snapshot, Status, key
from .stuck import Thresholds
from .supervisor import ProcessInfo

Row = tuple[str, Sequence]

STATUS_STYLE = {Status.NEW: "", Status.STARTED: "cyan", Status.DONE: "green", Status.FAILED: "bold red"}
PROCESS_STYLE = {"RUNNING": "bold green", "STARTING": "yellow", "BACKOFF": "bold yellow",
                 "STOPPING": "yellow", "STOPPED": "dim", "EXITED": "yellow", "FATAL": "bold white on red",
                 "UNKNOWN": "bold red"}


def plain(cells: Iterable) -> tuple:
    """Cells as Text: DataTable reads a str cell as markup, and task data (errors, owners) is not."""
    return tuple(Text(c) if isinstance(c, str) else c for c in cells)


def _num(value: int, style: str = "") -> Text:
    return Text(fmt.count(value), style=style if value else "dim", justify="right")


class SyncTable(DataTable):
    """A row-cursor table refreshed by `sync(rows)`: rows are matched by key, so the cursor stays
    on the same task or process and the view does not jump when rows come and go."""

    COLUMNS: Sequence[tuple[str, str]] = ()

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.show_cursor = False

    def on_focus(self) -> None:
        self.show_cursor = True

    def on_blur(self) -> None:
        self.show_cursor = False

    def on_mount(self) -> None:
        for col_key, label in self.COLUMNS:
            self.add_column(label, key=col_key, width=self.column_width(col_key))

    def column_width(self, col_key: str) -> int | None:
        """A fixed width for a column, or None to fit its content."""
        return None

    def remember(self, *args) -> None:
        """What `show` was last called with, to draw it again at a new width."""
        self._last = args

    def on_resize(self) -> None:
        """Columns whose width follows the table's (bars, sparklines) are refitted and redrawn;
        auto-width columns only ever grow, so they could not follow a shrinking table."""
        changed = False
        for col_key, _ in self.COLUMNS:
            width = self.column_width(col_key)
            column = self.columns.get(ColumnKey(col_key))
            if width is not None and column is not None and column.width != width:
                column.width = width
                changed = True
        if changed:
            self._require_update_dimensions = True
            if getattr(self, "_last", None) is not None:
                self.show(*self._last)
            self.refresh()

    @property
    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:
            return None

    def row_keys(self) -> list[str]:
        return [row.key.value for row in self.ordered_rows]

    def sync(self, rows: Iterable[Row]) -> None:
        rows = [(k, plain(cells)) for k, cells in rows]
        wanted = [k for k, _ in rows]
        cells = dict(rows)
        current = self.row_keys()
        selected = self.selected_key
        column_keys = [c for c, _ in self.COLUMNS]
        present = set(current)
        kept = [k for k in current if k in cells]
        if kept + [k for k in wanted if k not in present] == wanted:
            for k in current:
                if k not in cells:
                    self.remove_row(k)
            for k in kept:
                for col, old, new in zip(column_keys, self.get_row(k), cells[k]):
                    if old != new:
                        self.update_cell(k, col, new, update_width=True)
            for k in wanted:
                if k not in present:
                    self.add_row(*cells[k], key=k)
        else:
            x, y = self.scroll_x, self.scroll_y
            self.clear()
            for k in wanted:
                self.add_row(*cells[k], key=k)
            self.call_after_refresh(self.scroll_to, x, y, animate=False)
        if selected in cells:
            index = wanted.index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index, scroll=False)


class PipelineTable(SyncTable):
    """Stage x status, with each stage's ready queue and how long its oldest task has waited."""

    COLUMNS = (("stage", "stage"), *((s.value, s.value) for s in Status), ("ready", "ready"), ("oldest", "waiting"),
               ("spark", "files/min"), ("median", "median"))
    BINDINGS = [Binding("a", "app.retry_all", "Retry stage")]
    SPARK = 10

    def show(self, snap: Snapshot, thresholds: Thresholds) -> None:
        self.sync(self.rows_for(snap, thresholds))

    def rows_for(self, snap: Snapshot, thresholds: Thresholds) -> list[Row]:
        rows = []
        series = (snap.throughput.get("stages") or {})
        for stage in STAGES:
            c = snap.counts(stage)
            m = snap.stage_metrics(stage)
            state = thresholds.stage_state(m) if stage in WORK_STAGES else "ok"
            name_style = {"stuck": "bold white on red", "lagging": "bold yellow"}.get(state, "bold")
            files = (series.get(key(stage)) or {}).get("files") or []
            if stage in WORK_STAGES:
                age = m.get("oldest_ready_age_seconds")
                oldest = Text(("⚠ " if state != "ok" else "") + fmt.seconds(age) if m.get("ready") else "—",
                              style={"stuck": "bold red", "lagging": "bold yellow"}.get(state, ""),
                              justify="right")
                ready = _num(m.get("ready") or 0, "bold")
                median = Text(fmt.millis(m.get("median_run_ms")), justify="right")
            else:
                oldest = ready = median = Text("—", style="dim", justify="right")
            rows.append((stage, (
                Text(stage, style=name_style),
                *(_num(c.get(s, 0), STATUS_STYLE[s]) for s in Status), ready, oldest,
                Text(fmt.sparkline(files, self.SPARK), style="green"), median)))
        return rows

    @property
    def selected_stage(self) -> str | None:
        return self.selected_key


class ShardTable(SyncTable):
    """Per shard: how far its files got through the last stage (mysql-sender). The bar takes
    whatever width the other columns leave."""

    COLUMNS = (("shard", "shard"), ("bar", "progress"), (Status.DONE.value, "loaded"),
               (Status.FAILED.value, Status.FAILED.value))
    OTHER_COLUMNS = 26
    PERCENT = 5

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cursor_type = "none"

    def column_width(self, col_key: str) -> int | None:
        return self.bar_width() + self.PERCENT if col_key == "bar" else None

    def bar_width(self) -> int:
        return max(6, min(50, (self.size.width or 60) - self.OTHER_COLUMNS - self.PERCENT))

    def show(self, snap: Snapshot) -> None:
        self.remember(snap)
        width = self.bar_width()
        rows = []
        for s in snap.summary.get("by_shard") or []:
            total, done, failed = s.get("total", 0), s.get(Status.DONE, 0), s.get(Status.FAILED, 0)
            d, f, rest = fmt.bar(done, failed, total, width)
            pct = f" {100 * done // total:3d}%" if total else "    "
            bar = Text.assemble((d, "green"), (f, "red"), (rest, "dim"), (pct, "bold"))
            rows.append((str(s["shard"]), (
                Text(str(s["shard"]), justify="right"), bar,
                Text(f"{fmt.count(done)}/{fmt.count(total)}", justify="right"), _num(failed, "bold red"))))
        self.sync(rows)


def task_key(stage: str, filename: str, shard: int) -> str:
    return f"{stage}|{filename}|{shard}"


def parse_task_key(value: str) -> tuple[str, str, int]:
    stage, filename, shard = value.split("|")
    return stage, filename, int(shard)


class FailedTable(SyncTable):
    COLUMNS = (("stage", "stage"), ("file", "file"), ("shard", "shard"), ("attempts", "att"),
               ("error", "error"), ("updated", "at (UTC)"))
    BINDINGS = [
        Binding("r", "app.retry_one", "Retry"),
        Binding("a", "app.retry_all", "Retry stage"),
        Binding("enter,f", "app.open_selected", "Detail"),
    ]

    def show(self, snap: Snapshot) -> None:
        rows = []
        for stage in WORK_STAGES:
            for t in snap.failed.get(stage) or []:
                rows.append((task_key(stage, t["filename"], t["shard"]), (
                    stage, t["filename"], Text(str(t["shard"]), justify="right"),
                    Text(str(t.get("attempts", 0)), justify="right"),
                    Text(fmt.clip(t.get("last_error"), 60) or "—", style="red"),
                    fmt.stamp(t.get("updated_at"))[11:19])))
        self.sync(rows)


class StuckTable(SyncTable):
    """Started tasks, the stuck ones first and highlighted."""

    COLUMNS = (("stage", "stage"), ("file", "file"), ("shard", "shard"), ("running", "running"),
               ("why", "stuck?"), ("owner", "owner"))
    BINDINGS = [Binding("enter,f", "app.open_selected", "Detail")]

    def show(self, snap: Snapshot, thresholds: Thresholds) -> int:
        stuck, fine = [], []
        for stage in WORK_STAGES:
            median = snap.stage_metrics(stage).get("median_run_ms")
            for t in snap.started.get(stage) or []:
                reason = thresholds.task_reason(t, median)
                style = "bold red" if reason else ""
                row = (task_key(stage, t["filename"], t["shard"]), (
                    Text(("⚠ " if reason else "") + stage, style=style), Text(t["filename"], style=style),
                    Text(str(t["shard"]), style=style, justify="right"),
                    Text(fmt.millis(t.get("running_ms")), style=style, justify="right"),
                    Text(reason or "no", style="bold red" if reason else "dim"),
                    Text(fmt.clip(t.get("owner"), 40) or "—", style=style)))
                (stuck if reason else fine).append(row)
        self.sync(stuck + fine)
        return len(stuck)


class ThroughputTable(SyncTable):
    COLUMNS = (("stage", "stage"), ("files", "files/min"), ("files_now", "last"),
               ("events", "events/min"), ("events_now", "last"))

    def column_width(self, col_key: str) -> int | None:
        return self.spark_width() if col_key in ("files", "events") else None

    def spark_width(self) -> int:
        return max(8, min(60, ((self.size.width or 80) - 44) // 2))

    def show(self, snap: Snapshot) -> None:
        self.remember(snap)
        width = self.spark_width()
        series = snap.throughput.get("stages") or {}
        rows = []
        for stage in STAGES:
            s = series.get(key(stage)) or {}
            files, events = s.get("files") or [], s.get("events") or []
            rows.append((stage, (
                Text(stage, style="bold"), Text(fmt.sparkline(files, width), style="green"),
                _num(files[-1] if files else 0), Text(fmt.sparkline(events, width), style="cyan"),
                _num(events[-1] if events else 0))))
        self.sync(rows)


class ProcessTable(SyncTable):
    COLUMNS = (("name", "process"), ("state", "state"), ("uptime", "uptime"), ("pid", "pid"),
               ("info", "info"))
    BINDINGS = [
        Binding("s", "app.process('start')", "Start"),
        Binding("x", "app.process('stop')", "Stop"),
        Binding("r", "app.process('restart')", "Restart"),
    ]

    def show(self, processes: list[ProcessInfo]) -> None:
        rows = []
        for p in processes:
            info = p.spawnerr or ("" if p.statename == "RUNNING" else p.description)
            rows.append((p.full_name, (
                Text(p.full_name, style="bold"), Text(p.statename, style=PROCESS_STYLE.get(p.statename, "")),
                Text(fmt.seconds(p.uptime) if p.uptime is not None else "—", justify="right"),
                Text(str(p.pid) if p.pid else "—", justify="right"), Text(fmt.clip(info, 80), style="dim"))))
        self.sync(rows)


class HostTable(SyncTable):
    """GET /hosts: each host's programs (owner ids `<host>/<program>`), what they hold now and
    when they last moved a task."""

    COLUMNS = (("host", "host"), ("program", "program"), ("holding", "holding"), (Status.DONE.value, Status.DONE.value),
               ("seen", "last move (UTC)"))

    def on_mount(self) -> None:  # Textual runs SyncTable's on_mount (the columns) too
        self.display = False

    def show(self, hosts: list[dict]) -> None:
        """Shown only with several hosts: on one, the supervisord table above says it all and
        keeps the room."""
        self.display = len(hosts) > 1
        rows = []
        for h in hosts:
            for p in h.get("programs") or []:
                expired = p.get("lease_expired")
                rows.append((p.get("owner") or f"{h['host']}/{p.get('program')}", (
                    Text(h["host"], style="bold"), Text(p.get("program") or "—"),
                    Text(str(p.get("holding", 0)), style="bold red" if expired else "", justify="right"),
                    _num(int(p.get(Status.DONE) or 0)),
                    Text(fmt.stamp(p.get("last_seen"))[11:19] if p.get("last_seen") else "—", style="dim"))))
        self.sync(rows)


class Banner(Static):
    """A full-width alarm line; hidden while there is nothing to say."""

    def say(self, text: str | None) -> None:
        self.display = bool(text)
        if text:
            self.update(Text(text))  # plain: error texts carry brackets such as [Errno 111]
