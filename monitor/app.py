"""The dashboard App: polls on worker threads, shows, and runs the operator's confirmed actions.

The UI thread never waits on the network. A poll that is still running when the next tick comes
is not doubled up; the status line says how long it has been waiting instead. The workers are
daemon threads rather than Textual's thread workers, which run on an executor that is joined at
exit: with those, quitting while the API or supervisord hangs would wait out the timeout.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import Footer, Static, Tab, Tabs

from . import formatting as fmt
from .api import STAGES, WORK_STAGES, Snapshot, Status, describe
from .screens import AskFileScreen, ConfirmScreen, FileScreen
from .stuck import Thresholds
from .supervisor import ProcessInfo
from .widgets import (Banner, FailedTable, HostTable, PipelineTable, ProcessTable, ShardTable, StuckTable,
                      ThroughputTable, parse_task_key)

INTERVALS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
FAILED = Status.FAILED.value  # the panel of the tasks in that status
PANELS = (FAILED, "stuck", "processes", "throughput")
INTERVAL_KEYS = Binding.Group("interval", compact=True)


class ApiPolled(Message):
    def __init__(self, snapshot: Snapshot | None, error: str | None):
        super().__init__()
        self.snapshot, self.error = snapshot, error


class ProcessesPolled(Message):
    def __init__(self, processes: list[ProcessInfo] | None, error: str | None):
        super().__init__()
        self.processes, self.error = processes, error


class MonitorApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "pipeline-monitor"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("plus,equals", "interval(1)", "Slower", key_display="+", group=INTERVAL_KEYS),
        Binding("minus", "interval(-1)", "Faster", key_display="-", group=INTERVAL_KEYS),
        Binding("o", "ask_file", "Open file"),
        Binding("g", "refresh_now", "Refresh", show=False),
        *(Binding(str(n), f"panel('{name}')", name.title(), show=False) for n, name in enumerate(PANELS, 1)),
    ]

    def __init__(self, source, supervisor=None, interval: float = 1.0, thresholds: Thresholds | None = None,
                 clock: Callable[[], float] = time.monotonic, api_label: str | None = None):
        """`source` answers fetch()/retry()/retry_all()/file() (an `ApiSource`); `supervisor`
        answers processes()/start()/stop()/restart() (a `SupervisorClient`), or is None."""
        super().__init__()
        self.source = source
        self.supervisor = supervisor
        self.interval = float(interval)
        self.thresholds = thresholds or Thresholds()
        self.clock = clock
        self.api_label = api_label or getattr(source, "base_url", "the API")
        self.snapshot: Snapshot | None = None
        self.api_error: str | None = None
        self.last_ok: float | None = None
        self.api_since: float | None = None  # when the poll in flight began
        self.processes: list[ProcessInfo] | None = None
        self.supervisor_error: str | None = None
        self.supervisor_since: float | None = None
        self.polls = 0
        self.supervisor_polls = 0
        self._timer = None

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Banner(id="api-banner")
        with Container(id="top"):
            pipeline = PipelineTable(id="pipeline")
            pipeline.border_title = "stages"
            yield pipeline
            shards = ShardTable(id="shards")
            shards.border_title = f"shards (files loaded by {STAGES[-1]})"
            yield shards
        yield Tabs(*(Tab(name.title(), id=f"tab-{name}") for name in PANELS), id="tabs")
        with Container(id="lower", classes=f"show-{FAILED}"):
            failed = FailedTable(id=FAILED, classes="panel")
            failed.border_title = "failed tasks"
            yield failed
            stuck = StuckTable(id="stuck", classes="panel")
            stuck.border_title = "running tasks"
            yield stuck
            with Vertical(id="processes-panel", classes="panel") as panel:
                panel.border_title = "processes (supervisord)"
                yield Static(id="supervisor-status")
                yield ProcessTable(id="processes")
                yield HostTable(id="hosts")
            throughput = ThroughputTable(id="throughput", classes="panel")
            throughput.border_title = "throughput per minute"
            yield throughput
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.render_status()
        self.show_supervisor_status()
        self.query_one(f"#{FAILED}", FailedTable).focus()
        self._timer = self.set_interval(self.interval, self.poll)
        self.set_interval(1.0, self.render_status)
        self.poll()

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        name = (event.tab.id or f"tab-{FAILED}").removeprefix("tab-")
        lower = self.query_one("#lower")
        for panel in PANELS:
            lower.set_class(panel == name, f"show-{panel}")

    def action_panel(self, name: str) -> None:
        self.query_one("#tabs", Tabs).active = f"tab-{name}"
        target = self.query_one("#processes" if name == "processes" else f"#{name}")
        self.call_after_refresh(target.focus)

    # -- polling --------------------------------------------------------------------------------

    def background(self, fn: Callable, *args) -> None:
        threading.Thread(target=fn, args=args, name=f"monitor-{fn.__name__}", daemon=True).start()

    def from_thread(self, fn: Callable, *args, **kwargs) -> None:
        """Run fn on the UI thread, unless the app has gone meanwhile."""
        try:
            self.call_from_thread(fn, *args, **kwargs)
        except RuntimeError:
            pass

    def poll(self) -> None:
        now = self.clock()
        if self.api_since is None:
            self.api_since = now
            self.background(self.fetch_api)
        if self.supervisor is not None and self.supervisor_since is None:
            self.supervisor_since = now
            self.background(self.fetch_processes)
        self.render_status()

    def fetch_api(self) -> None:
        try:
            self.post_message(ApiPolled(self.source.fetch(), None))
        except Exception as exc:
            self.post_message(ApiPolled(None, describe(exc)))

    def fetch_processes(self) -> None:
        try:
            self.post_message(ProcessesPolled(self.supervisor.processes(), None))
        except Exception as exc:
            self.post_message(ProcessesPolled(None, str(exc) or type(exc).__name__))

    def on_api_polled(self, message: ApiPolled) -> None:
        """A fetch thread answers whenever its request ends, even once the app has begun to shut
        down and prune its panels: such a late answer has nothing left to draw on."""
        if not self.is_running:
            return
        self.api_since = None
        self.polls += 1
        self.api_error = message.error
        if message.snapshot is not None:
            self.snapshot = message.snapshot
            self.last_ok = self.clock()
            self.show_snapshot(message.snapshot)
        self.screen.set_class(message.error is not None and self.snapshot is not None, "-stale")
        self.render_status()

    def on_processes_polled(self, message: ProcessesPolled) -> None:
        if not self.is_running:
            return
        self.supervisor_since = None
        self.supervisor_polls += 1
        self.supervisor_error = message.error
        if message.processes is not None:
            self.processes = message.processes
        self.query_one(ProcessTable).show(self.processes if message.error is None else [])
        self.show_supervisor_status()
        self.render_status()

    # -- showing --------------------------------------------------------------------------------

    def show_snapshot(self, snap: Snapshot) -> None:
        self.query_one(PipelineTable).show(snap, self.thresholds)
        self.query_one(ShardTable).show(snap)
        self.query_one(FailedTable).show(snap)
        n_stuck = self.query_one(StuckTable).show(snap, self.thresholds)
        self.query_one(ThroughputTable).show(snap)
        self.query_one(HostTable).show(snap.hosts)
        n_failed = sum(snap.counts(s).get(Status.FAILED, 0) for s in WORK_STAGES)
        n_started = sum(len(snap.started.get(s) or []) for s in WORK_STAGES)
        self.query_one(f"#{FAILED}").border_title = f"failed tasks ({n_failed})"
        self.query_one("#stuck").border_title = (f"running tasks ({n_started}, {n_stuck} stuck)"
                                                 if n_stuck else f"running tasks ({n_started})")
        self.query_one(f"#tab-{FAILED}", Tab).label = Text.assemble(
            "Failed ", (str(n_failed), "bold red" if n_failed else ""))
        self.query_one("#tab-stuck", Tab).label = Text.assemble(
            "Stuck ", (str(n_stuck), "bold red" if n_stuck else ""))

    def show_supervisor_status(self) -> None:
        label = self.query_one("#supervisor-status", Static)
        sock = getattr(self.supervisor, "socket_path", None)
        if self.supervisor is None:
            text = Text("supervisord not configured (--supervisor-socket)", style="dim")
        elif self.supervisor_error is not None:
            text = Text.assemble(("supervisord not reachable", "bold red"), f" at {sock}: ",
                                 (fmt.clip(self.supervisor_error, 120), "red"))
        elif self.processes is None:
            text = Text(f"asking supervisord at {sock}…", style="dim")
        else:
            running = sum(p.statename == "RUNNING" for p in self.processes)
            bad = [p.full_name for p in self.processes if p.statename in ("FATAL", "BACKOFF", "EXITED", "UNKNOWN")]
            text = Text.assemble(f"{running}/{len(self.processes)} running",
                                 (f" · trouble: {', '.join(bad)}" if bad else "", "bold red"))
        label.update(text)
        tab = self.query_one("#tab-processes", Tab)
        tab.label = Text.assemble("Processes", (" !", "bold red") if self.supervisor_error else "")

    def render_status(self) -> None:
        """The status line. A timer may still tick while the app winds down and its widgets are
        already gone (seen under load at the end of a run): then there is nothing to draw."""
        now = self.clock()
        try:
            status = self.query_one("#status", Static)
        except NoMatches:
            return
        parts: list = []
        if self.api_error is None and self.last_ok is not None:
            parts.append(("● API ok", "bold green"))
        elif self.api_error is None:
            parts.append(("○ API …", "yellow"))
        else:
            parts.append(("✖ API down", "bold red"))
        ago = "never" if self.last_ok is None else f"{int(max(now - self.last_ok, 0))} s ago"
        parts.append(f" · updated {ago} · every {fmt.seconds(self.interval)}")
        if self.snapshot is not None:
            parts.append(f" · {fmt.count(self.snapshot.summary.get('total', 0))} tasks")
        if self.supervisor_error is not None:
            parts.append((" · supervisord unreachable", "bold yellow"))
        elif self.processes is not None:
            up = sum(p.statename == "RUNNING" for p in self.processes)
            parts.append((f" · {up}/{len(self.processes)} processes up",
                          "" if up == len(self.processes) else "bold yellow"))
        if self.api_since is not None and now - self.api_since >= max(2 * self.interval, 2.0):
            parts.append((f" · waiting for API {fmt.seconds(now - self.api_since)}", "bold yellow"))
        status.update(Text.assemble(*parts))
        banner = self.query_one("#api-banner", Banner)
        if self.api_error is None:
            banner.say(None)
        else:
            held = "" if self.snapshot is None else f" · showing data from {ago}"
            banner.say(f"⚠ pipeline-apid unreachable ({self.api_label}): {self.api_error}{held} · "
                       f"retrying every {fmt.seconds(self.interval)}")

    # -- actions ----------------------------------------------------------------------------------

    def action_interval(self, step: int) -> None:
        """The next longer (step > 0) or shorter interval of INTERVALS, from wherever it is now."""
        if step > 0:
            choice = next((s for s in INTERVALS if s > self.interval), INTERVALS[-1])
        else:
            choice = next((s for s in reversed(INTERVALS) if s < self.interval), INTERVALS[0])
        self.set_interval_seconds(choice)

    def set_interval_seconds(self, seconds: float) -> None:
        self.interval = seconds
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_interval(self.interval, self.poll)
        self.notify(f"refreshing every {fmt.seconds(seconds)}", timeout=2)
        self.render_status()

    def action_refresh_now(self) -> None:
        self.poll()

    def _focused_task(self) -> tuple[str, str, int] | None:
        table = self.focused
        if isinstance(table, (FailedTable, StuckTable)) and table.selected_key:
            return parse_task_key(table.selected_key)
        return None

    def action_retry_one(self) -> None:
        task = self._focused_task()
        if task is None or not isinstance(self.focused, FailedTable):
            self.notify("select a failed task first", severity="warning")
            return
        stage, filename, shard = task
        item = next((t for t in (self.snapshot.failed.get(stage) or [])
                     if t["filename"] == filename and t["shard"] == shard), {}) if self.snapshot else {}
        question = (f"Retry {stage} of file {filename}, shard {shard}?\n"
                    f"attempts so far: {item.get('attempts', '?')}\n"
                    f"last error: {fmt.clip(item.get('last_error'), 150) or '—'}")

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_action_in_thread(f"retried {stage} {filename}/{shard}",
                                          self.source.retry, stage, filename, shard)
        self.push_screen(ConfirmScreen(question, "Retry"), answered)

    def action_retry_all(self) -> None:
        stage = None
        if isinstance(self.focused, PipelineTable):
            stage = self.focused.selected_stage
        else:
            task = self._focused_task()
            stage = task[0] if task else None
        if stage not in WORK_STAGES:
            self.notify(f"select a stage ({', '.join(WORK_STAGES[:-1])} or {WORK_STAGES[-1]}) or a failed task",
                        severity="warning")
            return
        n = self.snapshot.counts(stage).get(Status.FAILED, 0) if self.snapshot else 0
        if not n:
            self.notify(f"{stage} has no failed tasks", severity="information")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_action_in_thread(f"retried every failed task of {stage}",
                                          self.source.retry_all, stage)
        self.push_screen(ConfirmScreen(f"Retry all {n} failed tasks of {stage}?\n"
                                       f"They go back to '{Status.NEW}' with their attempts reset.", f"Retry {n}"),
                         answered)

    def action_open_selected(self) -> None:
        task = self._focused_task()
        if task is None:
            self.notify("select a task first", severity="warning")
            return
        self.push_screen(FileScreen(task[1], self.source))

    def action_ask_file(self) -> None:
        def answered(filename: str | None) -> None:
            if filename:
                self.push_screen(FileScreen(filename, self.source))
        self.push_screen(AskFileScreen(), answered)

    def action_process(self, verb: str) -> None:
        table = self.query_one(ProcessTable)
        name = table.selected_key if self.focused is table else None
        if self.supervisor is None or name is None:
            self.notify("select a process first", severity="warning")
            return
        current = next((p.statename for p in self.processes or [] if p.full_name == name), "?")

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_action_in_thread(f"{verb}ed {name}".replace("stoped", "stopped"),
                                          getattr(self.supervisor, verb), name)
        self.push_screen(ConfirmScreen(f"{verb.title()} process {name}? (now {current})", verb.title()),
                         answered)

    def run_action_in_thread(self, done_text: str, fn, *args) -> None:
        self.background(self._run_action, done_text, fn, *args)

    def _run_action(self, done_text: str, fn, *args) -> None:
        try:
            result = fn(*args)
        except Exception as exc:
            self.from_thread(self.notify, f"failed: {exc}", severity="error", timeout=8, markup=False)
        else:
            if isinstance(result, int) and not isinstance(result, bool):
                done_text += f": {result}"
            self.from_thread(self.notify, done_text, timeout=4, markup=False)
        self.from_thread(self.poll)
