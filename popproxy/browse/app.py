"""The browser's application: the session list, filters, sorting, live updates, actions."""

from __future__ import annotations

import os
import queue
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SuspendNotSupported
from textual.binding import Binding, BindingType
from textual.widgets import Footer, Static

from popproxy.browse.rows import CLEAN_ENDINGS, COLUMNS, SessionRow, Sources, update_live
from popproxy.browse.screens import HelpScreen, Prompt, SessionScreen
from popproxy.browse.table import SessionTable
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.inspect.filter import Expr, FilterError, parse, quick
from popproxy.inspect.select import capture_matches
from popproxy.views.render import fmt_ms, fmt_size
from popproxy.views.safe import escape as clean
from popproxy.views.theme import THEME

CSS = """
#status { height: 1; background: $boost; }
#title { height: 1; }
Lines { height: 1fr; }
SessionTable { height: 1fr; }
Prompt, HelpScreen { align: center middle; }
#prompt { width: 80%; height: auto; border: round $accent; background: $surface; }
#help { width: 90%; height: 80%; border: round $accent; background: $surface; }
"""


class BrowseApp(App[None]):
    """``popproxy browse``: sessions from capture files and folders, and a live feed."""

    TITLE = "popproxy browse"
    CSS = CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("f", "filter", "filter"),
        Binding("slash", "search", "search"),
        Binding("n", "next_match(1)", "next", show=False),
        Binding("N", "next_match(-1)", "prev", show=False),
        Binding("o", "sort", "sort"),
        Binding("O", "reverse", "reverse", show=False),
        Binding("w", "export_session", "export"),
        Binding("r", "replay", "replay"),
        Binding("y", "copy_show", "copy show"),
    ]

    def __init__(
        self,
        targets: Iterable[str | os.PathLike[str]],
        *,
        filter_expr: Expr | None = None,
        live: queue.SimpleQueue[tuple[Any, ...]] | None = None,
        poll: float = 1.0,
        banner: str = "",
    ) -> None:
        super().__init__()
        self.console.push_theme(THEME)
        self.sources = Sources(targets)
        self.filter_expr = filter_expr
        self.live = live
        self.poll_every = poll
        self.banner = banner
        self.shown_keys: set[str] = set()
        self.sort_column = 0
        self.sort_reverse = False
        self.search_text: str | None = None
        self.live_paths: dict[int, str] = {}

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield SessionTable(cells, id="sessions")
        yield Static(Text("reading captures…"), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_rows(self.sources.poll(), initial=True)
        self.set_interval(self.poll_every, self.poll_sources)
        if self.live is not None:
            self.set_interval(0.2, self.drain_live)
        self.query_one(SessionTable).focus()

    # ------------------------------------------------------------------ rows

    def rows(self) -> list[SessionRow]:
        key, _title = COLUMNS[self.sort_column]
        shown = [r for k, r in self.sources.rows.items() if k in self.shown_keys]

        def order(row: SessionRow) -> tuple[int, Any, str]:
            value = getattr(row, key)
            return (value is None, value if value is not None else 0, row.start)

        return sorted(shown, key=order, reverse=self.sort_reverse)

    def refresh_rows(self, changed: list[SessionRow], *, initial: bool = False) -> None:
        """Apply the filter to changed rows, then show them (rebuild or update in place)."""
        undecided = []
        for row in changed:
            verdict = True if self.filter_expr is None else quick(self.filter_expr, row.facts)
            if verdict is None and row.finished:
                undecided.append(row)
            elif verdict is False:
                self.shown_keys.discard(row.key)
            else:
                self.shown_keys.add(row.key)  # undecided running sessions stay in sight
        if undecided:
            self.scan_rows(undecided, self.filter_expr)
        self.rebuild()
        self.show_status()

    def rebuild(self) -> None:
        self.query_one(SessionTable).set_rows(self.rows())

    @work(thread=True, exclusive=True, group="filter")
    def scan_rows(self, rows: list[SessionRow], expr: Expr | None) -> None:
        """Filters the end records cannot decide read those captures, off the UI thread."""
        chosen = []
        for row in rows:
            if expr is None:
                return
            try:
                with CaptureReader(row.path) as reader:
                    if capture_matches(expr, reader, row.facts):
                        chosen.append(row.key)
            except CaptureError:
                continue
        self.call_from_thread(self._scanned, chosen, expr)

    def _scanned(self, keys: list[str], expr: Expr | None) -> None:
        if expr is self.filter_expr and keys:
            self.shown_keys.update(keys)
            self.rebuild()
            self.show_status()

    def show_status(self, note: str = "") -> None:
        total, shown = len(self.sources.rows), len(self.shown_keys)
        text = Text(f" {shown} of {total} sessions", style="bold")
        if self.filter_expr is not None:
            text.append(f"  filter: {self.filter_expr}")
        _key, title = COLUMNS[self.sort_column]
        text.append(f"  sorted by {title}{' ↓' if self.sort_reverse else ''}", style="dim")
        if self.banner:
            text.append(f"  {self.banner}", style="dim")
        if note:
            text.append(f"  {note}", style="yellow")
        self.query_one("#status", Static).update(text)

    def poll_sources(self) -> None:
        changed = self.sources.poll()
        if changed:
            self.refresh_rows(changed)

    def drain_live(self) -> None:
        """Apply what the relay reported (record --browse) since the last tick."""
        assert self.live is not None
        touched: dict[str, SessionRow] = {}
        fresh = False
        while True:
            try:
                message = self.live.get_nowait()
            except queue.Empty:
                break
            kind, number = message[0], message[1]
            if kind == "started":
                path = message[2]
                if path is None:
                    continue
                self.live_paths[number] = str(path)
                fresh = True
            elif kind in ("items", "ended"):
                key = self.live_paths.get(number)
                if key is None:
                    continue
                if key not in self.sources.rows:
                    self.sources.poll()
                row = self.sources.rows.get(key)
                if row is None:
                    continue
                if kind == "items":
                    update_live(row, message[2])
                else:
                    row.size = -1  # re-read its end record at the next poll
                touched[key] = row
        if fresh:
            self.poll_sources()
        changed = [r for r in touched.values() if r.how == "running"]
        if changed:
            self.refresh_rows(changed)

    def selected(self) -> SessionRow | None:
        return self.query_one(SessionTable).selected

    # ------------------------------------------------------------------ actions

    LIST_ONLY = frozenset({"filter", "search", "next_match", "sort", "reverse"})

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The list's own keys do nothing (and are not shown) over another screen."""
        return not (action in self.LIST_ONLY and len(self.screen_stack) > 1)

    def on_session_table_selected(self, event: SessionTable.Selected) -> None:
        self.push_screen(SessionScreen(event.row.path))

    def on_session_table_header_clicked(self, event: SessionTable.HeaderClicked) -> None:
        index = event.column
        if index == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = index, False
        self.rebuild()
        self.show_status()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_sort(self) -> None:
        self.sort_column = (self.sort_column + 1) % len(COLUMNS)
        self.rebuild()
        self.show_status()

    def action_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self.rebuild()
        self.show_status()

    def action_filter(self) -> None:
        current = str(self.filter_expr) if self.filter_expr is not None else ""
        self.push_screen(
            Prompt("Filter (e.g. ~c RETR & ~e; empty: all):", current), self.set_filter
        )

    def set_filter(self, answer: str | None) -> None:
        if answer is None:
            return
        if not answer.strip():
            self.filter_expr = None
        else:
            try:
                self.filter_expr = parse(answer)
            except FilterError as exc:
                self.notify(clean(str(exc)), title="bad filter", severity="error")
                return
        self.shown_keys.clear()
        self.refresh_rows(list(self.sources.rows.values()), initial=True)

    def action_search(self) -> None:
        def chosen(answer: str | None) -> None:
            if answer:
                self.search_text = answer.lower()
                self.action_next_match(1)

        self.push_screen(Prompt("Search the list for:", self.search_text or ""), chosen)

    def action_next_match(self, step: int) -> None:
        if not self.search_text:
            return
        table = self.query_one(SessionTable)
        count = table.row_count
        for k in range(1, count + 1):
            i = (table.cursor + k * step) % count
            if any(self.search_text in cell.plain.lower() for cell in table.row_cells(i)):
                table.move_cursor(row=i)
                return
        self.notify(f"{self.search_text!r} not found", severity="warning")

    def target(self) -> SessionRow | None:
        screen = self.screen
        if isinstance(screen, SessionScreen):
            return self.sources.rows.get(str(screen.path)) or SessionRow(screen.path)
        row = self.selected()
        if row is None:
            self.notify("no session selected", severity="warning")
        return row

    def action_copy_show(self) -> None:
        row = self.target()
        if row is None:
            return
        command = shlex.join(["popproxy", "show", str(row.path)])
        self.copy_to_clipboard(command)
        self.notify(clean(command), title="copied")

    def action_export_session(self) -> None:
        row = self.target()
        if row is None:
            return

        def chosen(answer: str | None) -> None:
            if answer:
                self.export_session(row.path, Path(answer))

        self.push_screen(
            Prompt("Export the session to (.txt, .html or .pcap):", f"{row.path.stem}.html"),
            chosen,
        )

    @work(thread=True)
    def export_session(self, path: Path, target: Path) -> None:
        from popproxy.browse.actions import export_session

        try:
            note = export_session(path, target)
        except Exception as exc:  # an export failure is a notice, never a crash
            self.call_from_thread(self.notify, clean(str(exc)), severity="error")
            return
        self.call_from_thread(self.notify, clean(note))

    def replay_command(self, row: SessionRow) -> list[str]:
        return [
            sys.executable,
            "-m",
            "popproxy",
            "replay",
            str(row.path),
            "--server",
            row.upstream or "?",
        ]

    def action_replay(self) -> None:
        row = self.target()
        if row is None:
            return
        if not row.upstream:
            self.notify("the capture names no upstream server", severity="error")
            return
        command = self.replay_command(row)
        shown = shlex.join(["popproxy", *command[3:]])
        try:
            with self.suspend():
                print(f"$ {shown}", flush=True)
                subprocess.run(command, check=False)
                input("press Enter to return to popproxy browse ")
        except SuspendNotSupported:
            self.notify(clean(shown), title="run this to replay", severity="warning")


def cells(row: SessionRow) -> list[Text]:
    """The row's cells, in COLUMNS order; peer-supplied values are made safe."""
    start = row.start.replace("T", " ").rstrip("Z").partition(".")[0]
    ended = Text(
        row.how,
        style="green" if row.how in CLEAN_ENDINGS else "yellow" if not row.finished else "bold red",
    )
    if row.error:
        ended.append(f" ({clean(row.error)})", style="dim")
    anomalies, errors = row.anomalies, row.errors
    return [
        Text(start),
        Text(clean(row.client or "?")),
        Text(clean(row.upstream or "?")),
        Text(clean(row.user or "")),
        Text(clean(row.mechanism or "")),
        Text(row.tls),
        Text(_count(row.commands), justify="right"),
        Text(_size(row.client_octets), justify="right"),
        Text(_size(row.server_octets), justify="right"),
        Text(fmt_ms(row.duration) if row.duration is not None else "?", justify="right"),
        ended,
        Text(_count(anomalies), style="bold yellow" if anomalies else "", justify="right"),
        Text(_count(errors), style="bold red" if errors else "", justify="right"),
    ]


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _size(value: int | None) -> str:
    return "?" if value is None else fmt_size(value)
