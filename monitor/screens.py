"""Screens over the dashboard: confirmations, the file detail, and asking for a filename."""
from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, Static

from . import formatting as fmt
from .api import STAGES, WORK_STAGES
from .widgets import STATUS_STYLE, plain


class ConfirmScreen(ModalScreen[bool]):
    """Every action that changes state passes through here: `y` does it, `n`/Esc does not."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes"):
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Grid(id="confirm"):
            yield Label(Text(self.question), id="question")
            yield Button(f"{self.yes} (y)", variant="error", id="yes")
            yield Button("Cancel (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class AskFileScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="ask"):
            yield Label("Open the detail of file (e.g. 20251015172520):")
            yield Input(placeholder="filename", id="filename")

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class FileScreen(Screen):
    """Every shard of one file at every stage, then its history of transitions."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "Back"), Binding("g", "reload", "Reload")]

    def __init__(self, filename: str, source):
        super().__init__()
        self.filename = filename
        self.source = source

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble("File ", (self.filename, "bold"), " — loading…"), id="file-title")
        shards = DataTable(id="file-shards", cursor_type="row", zebra_stripes=True)
        shards.border_title = "shards × stages"
        yield shards
        history = DataTable(id="file-history", cursor_type="row", zebra_stripes=True)
        history.border_title = "history"
        yield history
        rejected = DataTable(id="file-rejected", cursor_type="row", zebra_stripes=True)
        rejected.border_title = "rejected lines"
        yield rejected
        yield Footer()

    def on_mount(self) -> None:
        shards = self.query_one("#file-shards", DataTable)
        shards.add_columns("shard", *STAGES, "last error", "attempts s/w/m", "owner", "updated")
        history = self.query_one("#file-history", DataTable)
        history.add_columns("at (UTC)", "shard", "stage", "from → to", "error", "action", "by", "took",
                            "events")
        self.query_one("#file-rejected", DataTable).add_columns("stage", "shard", "line", "reason", "detail",
                                                                "bytes", "the line")
        self.action_reload()

    def action_reload(self) -> None:
        self.app.background(self.load)

    def load(self) -> None:
        try:
            detail, error = self.source.file(self.filename), None
        except Exception as exc:
            detail, error = None, str(exc)
        try:
            lines = self.source.rejected(self.filename)
        except Exception as exc:   # an API without GET /rejected, or down: the rest still shows
            lines = [{"stage": "", "reason": f"rejected lines unavailable: {exc}"[:160]}]
        self.app.from_thread(self.show, detail, error)
        self.app.from_thread(self.show_rejected, lines)

    def show_rejected(self, lines: list[dict]) -> None:
        table = self.query_one("#file-rejected", DataTable)
        table.clear()
        for r in lines:
            shard = r.get("shard")
            size = r.get("line_bytes")
            table.add_row(*plain((
                r.get("stage") or "", "—" if shard is None else str(shard),
                "" if r.get("line_no") is None else str(r["line_no"]), Text(r.get("reason") or "", style="red"),
                fmt.clip(r.get("detail"), 60) or "", "" if size is None else str(size),
                fmt.clip(r.get("line"), 200) + (" …" if r.get("line_truncated") else ""))))
        table.border_title = f"rejected lines ({len(lines)}{'+' if len(lines) >= 500 else ''})"

    def show(self, detail: dict | None, error: str | None) -> None:
        title = self.query_one("#file-title", Static)
        if detail is None:
            title.update(Text.assemble(("File ", ""), (self.filename, "bold"), (f" — {error}", "bold red")))
            return
        shards = self.query_one("#file-shards", DataTable)
        history = self.query_one("#file-history", DataTable)
        shards.clear()
        history.clear()
        events = []
        for s in detail.get("shards") or []:
            att = s.get("attempts") or {}
            statuses = [Text(s.get(stage.status_column) or "—",
                             style=STATUS_STYLE.get(s.get(stage.status_column), "")) for stage in STAGES]
            shards.add_row(*plain((
                str(s["shard"]), *statuses, Text(fmt.clip(s.get("last_error"), 120) or "—", style="red"),
                "/".join(str(att.get(st, 0)) for st in WORK_STAGES), s.get("owner") or "—",
                fmt.stamp(s.get("updated_at")))))
            events += [(h, s["shard"]) for h in s.get("history") or []]
        events.sort(key=lambda e: e[0].get("at") or "")
        for h, shard in events:
            history.add_row(*plain((
                fmt.stamp(h.get("at")), str(shard), h.get("stage") or "",
                Text.assemble((h.get("from") or "·", STATUS_STYLE.get(h.get("from"), "")), " → ",
                              (h.get("to") or "", STATUS_STYLE.get(h.get("to"), ""))),
                Text(fmt.clip(h.get("error"), 160), style="red"),
                h.get("action") or "", fmt.clip(h.get("by"), 30) or "—", fmt.millis(h.get("duration_ms")),
                "—" if h.get("events") is None else str(h["events"]))))
        n = len(detail.get("shards") or [])
        title.update(Text.assemble(("File ", ""), (self.filename, "bold"),
                                   (f" — {n} shard{'s' if n != 1 else ''}, {len(events)} transitions", "")))
