"""The browser's screens beyond the list: a session, a message, raw bytes, help, prompts."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from popproxy import fsutil
from popproxy.browse.session import (
    Line,
    Message,
    Transcript,
    escaped,
    extract_message,
    hexdump,
    load_transcript,
    raw_records,
)
from popproxy.core import Direction
from popproxy.views.safe import escape as clean

#: (keys, what they do, where): the help screen and the README list these.
KEYS: tuple[tuple[str, str, str], ...] = (
    ("↑ ↓  j k", "move", "everywhere"),
    ("PgUp PgDn  g G", "page, first, last", "everywhere"),
    ("enter", "open the session / the message under the cursor", "list, session"),
    ("q  esc", "back (quit from the list)", "everywhere"),
    ("f", "filter sessions (popproxy docs browse; empty clears)", "list"),
    ("/  n  N", "search text; next, previous match", "list, session"),
    ("o  O", "sort by the next column; reverse the order (or click a header)", "list"),
    ("a  A", "next, previous anomaly", "session"),
    ("b", "raw bytes of both sides", "session"),
    ("m", "raw view: escaped ↔ hex", "raw"),
    ("e", "export the message as .eml", "session, message"),
    ("w", "export the session (.txt, .html or .pcap, by the name's suffix)", "list, session"),
    ("r", "replay the session against its server (popproxy replay)", "list, session"),
    ("y", "copy a `popproxy show` command line", "list, session"),
    ("?", "this help", "everywhere"),
)

MOVES: list[BindingType] = [
    Binding("j", "cursor_down", "down", show=False),
    Binding("k", "cursor_up", "up", show=False),
    Binding("g", "first", "first", show=False),
    Binding("G", "last", "last", show=False),
]


class Lines(OptionList):
    """An OptionList that also moves with vi keys."""

    BINDINGS: ClassVar[list[BindingType]] = MOVES


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        table = Table(title="popproxy browse: keys", title_justify="left", expand=True)
        table.add_column("keys", no_wrap=True, style="bold")
        table.add_column("action")
        table.add_column("where", style="dim")
        for keys, what, where in KEYS:
            table.add_row(Text(keys), Text(what), Text(where))
        with VerticalScroll(id="help"):
            yield Static(table)
            yield Static(Text("Mouse: click a row to select it, a column header to sort."))


class Prompt(ModalScreen[str | None]):
    """One line of input: enter gives it back, escape gives None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt"):
            yield Label(Text(self.question))
            yield Input(value=self.value, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SessionScreen(Screen[None]):
    """A session's transcript with timings; enter on a RETR/TOP opens the message."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "app.pop_screen", "back"),
        Binding("enter", "open", "open message", show=False),
        Binding("a", "anomaly(1)", "next anomaly"),
        Binding("A", "anomaly(-1)", "prev anomaly", show=False),
        Binding("b", "raw", "raw bytes"),
        Binding("e", "eml", "export .eml"),
        Binding("w", "app.export_session", "export"),
        Binding("r", "app.replay", "replay"),
        Binding("y", "app.copy_show", "copy show"),
        Binding("slash", "search", "search"),
        Binding("n", "next_match(1)", "next", show=False),
        Binding("N", "next_match(-1)", "prev", show=False),
    ]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.transcript: Transcript | None = None
        self.search_text: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text(clean(str(self.path)), style="bold"), id="title")
        yield Lines(id="transcript")
        yield Static(Text("reading…"), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True)
    def load(self) -> None:
        transcript = load_transcript(self.path)
        self.app.call_from_thread(self.show, transcript)

    def show(self, transcript: Transcript) -> None:
        self.transcript = transcript
        listing = self.query_one(Lines)
        listing.clear_options()
        listing.add_options([_option(line, i) for i, line in enumerate(transcript.lines)])
        s = transcript.summary
        facts = [
            f"{len(transcript.lines)} lines",
            f"{s.commands} commands",
            f"user {s.user}" if s.user else "",
            f"{len(s.anomalies)} anomalies" if s.anomalies else "",
            f"{s.errors} -ERR" if s.errors else "",
            *transcript.warnings,
        ]
        self.status(" · ".join(clean(f) for f in facts if f))
        if transcript.lines:
            listing.highlighted = 0
        listing.focus()

    def status(self, message: str) -> None:
        self.query_one("#status", Static).update(Text(message))

    def current(self) -> Line | None:
        listing = self.query_one(Lines)
        if self.transcript is None or listing.highlighted is None:
            return None
        return self.transcript.lines[listing.highlighted]

    def message_seq(self) -> int | None:
        line = self.current()
        if line is None or line.seq is None or self.transcript is None:
            return None
        for other in self.transcript.lines:
            if other.seq == line.seq and other.message:
                return line.seq
        return None

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        seq = self.message_seq()
        if seq is None:
            self.notify("no message here: move to a RETR or TOP", severity="warning")
            return
        self.status(f"reading message of exchange #{seq}…")
        self.open_message(seq, export=None)

    @work(thread=True)
    def open_message(self, seq: int, export: str | None) -> None:
        message = extract_message(self.path, seq)
        if message is None:
            self.app.call_from_thread(self.notify, "the body is empty", severity="warning")
            return
        if export is not None:
            try:
                write_eml(message, Path(export))
                self.app.call_from_thread(self.notify, f"wrote {export}")
            except (OSError, fsutil.Exists) as exc:
                self.app.call_from_thread(self.notify, clean(str(exc)), severity="error")
            finally:
                message.close()
            return
        self.app.call_from_thread(self.app.push_screen, MessageScreen(self.path, message))

    def action_eml(self) -> None:
        seq = self.message_seq()
        if seq is None:
            self.notify("no message here: move to a RETR or TOP", severity="warning")
            return

        def chosen(answer: str | None) -> None:
            if answer:
                self.open_message(seq, export=answer)

        self.app.push_screen(Prompt("Export the message to:", eml_name(self.path, seq)), chosen)

    def action_anomaly(self, step: int) -> None:
        self.jump(lambda line: line.kind == "anomaly", step, "no anomalies")

    def jump(self, test: Any, step: int, none: str) -> None:
        if self.transcript is None:
            return
        lines = self.transcript.lines
        listing = self.query_one(Lines)
        start = listing.highlighted if listing.highlighted is not None else -1
        for k in range(1, len(lines) + 1):
            i = (start + k * step) % len(lines)
            if test(lines[i]):
                listing.highlighted = i
                return
        self.notify(none, severity="warning")

    def action_search(self) -> None:
        def chosen(answer: str | None) -> None:
            if answer:
                self.search_text = answer.lower()
                self.action_next_match(1)

        self.app.push_screen(Prompt("Search the transcript for:", self.search_text or ""), chosen)

    def action_next_match(self, step: int) -> None:
        if self.search_text:
            text = self.search_text
            self.jump(lambda line: text in line.text.plain.lower(), step, f"{text!r} not found")

    def action_raw(self) -> None:
        self.app.push_screen(RawScreen(self.path))


def _option(line: Line, index: int) -> Option:
    text = line.text
    if line.message:
        text = text.copy()
        text.append("  ⏎", style="bold")
    return Option(text, id=str(index))


def eml_name(path: Path, seq: int) -> str:
    return f"{path.stem}-{seq:04d}.eml"


def write_eml(message: Message, target: Path) -> None:
    """The body as the client received it, in a 0600 file published when complete."""
    message.body.seek(0)
    with fsutil.output_file(target) as out:
        shutil.copyfileobj(message.body, out, 1 << 20)
    message.body.seek(0)


class MessageScreen(Screen[None]):
    """One message: its headers, MIME tree and attachments; bodies stay on disk."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "close", "back"),
        Binding("e", "eml", "export .eml"),
        *MOVES,
    ]

    def __init__(self, path: Path, message: Message) -> None:
        super().__init__()
        self.path, self.message = path, message

    def compose(self) -> ComposeResult:
        m = self.message
        title = Text(f"message of exchange #{m.seq}: {m.octets:,} octets", style="bold")
        if m.truncated:
            title.append("  TRUNCATED", style="bold red")
        headers = Table(title="headers", title_justify="left", show_header=False, expand=True)
        headers.add_column("name", style="bold", no_wrap=True)
        headers.add_column("value")
        for name, value in m.headers:
            headers.add_row(Text(name), Text(value))
        tree = Text()
        for part in m.parts:
            tree.append("  " * part.depth + ("└ " if part.depth else ""))
            tree.append(part.content_type, style="bold")
            if part.filename:
                tree.append(f"  📎 {part.filename}", style="yellow")
            tree.append(f"  {part.octets:,} octets\n", style="dim")
        attachments = Text("attachments: ", style="bold")
        names = [p.filename or p.content_type for p in m.attachments]
        attachments.append(", ".join(names) if names else "none", style="")
        with VerticalScroll(id="message"):
            yield Static(title)
            yield Static(headers)
            yield Static(Group(Text("MIME structure", style="bold"), tree))
            yield Static(attachments, id="attachments")
        yield Footer()

    def action_cursor_down(self) -> None:
        self.query_one(VerticalScroll).scroll_down()

    def action_cursor_up(self) -> None:
        self.query_one(VerticalScroll).scroll_up()

    def action_first(self) -> None:
        self.query_one(VerticalScroll).scroll_home()

    def action_last(self) -> None:
        self.query_one(VerticalScroll).scroll_end()

    def action_eml(self) -> None:
        def chosen(answer: str | None) -> None:
            if not answer:
                return
            try:
                write_eml(self.message, Path(answer))
                self.notify(f"wrote {answer}")
            except (OSError, fsutil.Exists) as exc:
                self.notify(clean(str(exc)), severity="error")

        self.app.push_screen(
            Prompt("Export the message to:", eml_name(self.path, self.message.seq)), chosen
        )

    def action_close(self) -> None:
        self.message.close()
        self.app.pop_screen()


class RawScreen(Screen[None]):
    """The recorded bytes of both sides, per chunk: escaped, or as a hex dump (m)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "app.pop_screen", "back"),
        Binding("m", "mode", "escaped/hex"),
    ]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.hex = False
        self.records, self.more = raw_records(path)

    def compose(self) -> ComposeResult:
        yield Static(Text(f"raw bytes: {clean(str(self.path))}", style="bold"), id="title")
        yield Lines(id="raw")
        note = f"{len(self.records)} data records"
        if self.more:
            note += f" (the first ones; all: popproxy show --raw {shlex.quote(str(self.path))})"
        yield Static(Text(note), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.fill()

    def fill(self) -> None:
        listing = self.query_one(Lines)
        listing.clear_options()
        options = []
        for i, r in enumerate(self.records):
            who = "C" if r.direction is Direction.CLIENT else "S"
            text = Text(f"{r.t:9.3f}s ", style="dim cyan")
            text.append(
                f"{who} {r.octets:>6} ", style="bold cyan" if who == "C" else "bold magenta"
            )
            if r.proxy:
                text.append("(sent by popproxy) ", style="yellow")
            if self.hex:
                text.append("\n" + "\n".join(hexdump(r.preview)))
            else:
                text.append(escaped(r.preview))
            if r.octets > len(r.preview):
                text.append(f" … +{r.octets - len(r.preview):,} octets", style="dim")
            options.append(Option(text, id=str(i)))
        listing.add_options(options)
        listing.focus()

    def action_mode(self) -> None:
        self.hex = not self.hex
        self.fill()
