"""``popproxy show``: a capture's transcript, as text (rich) or one JSON object per capture."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.text import Text

from popproxy.capture import format as fmt
from popproxy.capture.events import replay_events
from popproxy.capture.format import CaptureError, Record
from popproxy.capture.reader import CaptureReader, some_capture_paths
from popproxy.capture.via import describe_via
from popproxy.core import Direction
from popproxy.core.transcript import Exchange, Item, TranscriptBuilder
from popproxy.errors import report
from popproxy.escapes import escape_bytes
from popproxy.inspect.document import capture_json
from popproxy.inspect.select import (
    FILTER_HELP,
    add_upstream_option,
    capture_matches,
    combined_filter,
    filter_arg,
)
from popproxy.views import render, safe
from popproxy.views.theme import make_console


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "show",
        help="show the transcript of captures",
        description="Show captures as a transcript: commands, replies, bodies "
        "folded, TLS, anomalies. Secrets stay masked.",
    )
    p.add_argument(
        "captures", nargs="+", metavar="CAPTURE|DIR", help="capture files, or folders of them"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per capture per line (schema: popproxy docs show.schema.json)",
    )
    p.add_argument("--bodies", action="store_true", help="expand message bodies")
    p.add_argument("--raw", action="store_true", help="the recorded bytes, escaped, per chunk")
    p.add_argument("--command", dest="verb", metavar="VERB", help="only exchanges of this command")
    p.add_argument("--errors", action="store_true", help="only -ERR replies and anomalies")
    p.add_argument("--grep", metavar="TEXT", help="only lines containing TEXT")
    p.add_argument("--filter", type=filter_arg, metavar="EXPR", help=FILTER_HELP)
    add_upstream_option(p)
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep reading a capture that is still being written",
    )
    p.add_argument(
        "--show-secrets",
        action="store_true",
        help="show credentials kept by --keep-secrets (masked otherwise)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    args.filter = combined_filter(args)
    paths = some_capture_paths(args.captures)
    console = make_console()
    status = 0
    for path in paths:
        try:
            with CaptureReader(path) as reader:
                if args.filter is not None and not capture_matches(args.filter, reader):
                    continue
                if args.json:
                    doc = capture_json(reader, reveal=args.show_secrets)
                    sys.stdout.write(safe.json_dumps(doc) + "\n")
                elif args.raw:
                    show_raw(console, reader, follow=args.follow)
                else:
                    show_text(console, reader, args)
                for warning in reader.warnings:
                    report("show", f"{warning}", level="warning")
        except CaptureError as exc:
            report("show", f"{exc}")
            status = 2
    sys.stdout.flush()
    return status


def _header_line(reader: CaptureReader) -> Text:
    h = reader.header
    text = safe.text(f"{reader.path}", "bold")
    safe.append(
        text,
        f"  {h.get('start', '?')}  {h.get('client', '?')} → {h.get('upstream', '?')}",
        "pop.muted",
    )
    if isinstance(h.get("via"), dict) and h["via"].get("how") != "fixed":
        safe.append(text, f" ({describe_via(h)})", "pop.muted")
    if h.get("opaque"):
        text.append("  not POP3: relayed opaque", style="pop.warning")
    if h.get("keep_secrets"):
        text.append("  (secrets kept)", style="pop.warning")
    if h.get("insecure"):
        text.append("  INSECURE upstream TLS", style="pop.error")
    return text


def show_text(console: Console, reader: CaptureReader, args: argparse.Namespace) -> None:
    console.print(_header_line(reader))
    builder = TranscriptBuilder(
        hash_bodies=False,
        body_items=(1 << 62) if args.bodies else 0,
        reveal_secrets=args.show_secrets,
    )
    verb = args.verb.upper() if args.verb else None
    out = _Lines(console, args.grep)
    for record, t, events in replay_events(reader, follow=args.follow):
        if record is not None:
            line = _record_line(record, t)
            if line is not None and not verb and not args.errors:
                out.emit(line, None)
        for item in builder.feed(t, events):
            ex = item.exchange
            if item.what == "body" and ex is not None and out.opens(ex, verb, args.errors):
                # The status line goes before its body: it is known once the body starts.
                out.emit(render.reply_line(ex, folded=False), ex, context=True)
            if item.what == "done" and ex is not None and out.opened(ex):
                out.emit(_body_end_line(ex), ex)
            else:
                line = _item_line(item, verb, args.errors)
                if line is not None:
                    out.emit(line, ex, context=item.what == "command")
            if item.what == "done" and ex is not None:
                out.close(ex)
    for ex in builder.unfinished():
        if verb is None or ex.command == verb:
            console.print(render.reply_line(ex))


class _Lines:
    """Prints transcript lines, optionally only those containing ``grep``: a match inside an
    exchange brings its command and status line along, once, so it is never shown alone."""

    def __init__(self, console: Console, grep: str | None) -> None:
        self.console = console
        self.grep = grep.lower() if grep else None
        self._context: dict[int, list[Text]] = {}  # exchange -> its lines not yet printed
        self._opened: set[int] = set()  # exchanges whose status line went before the body

    def opens(self, ex: Exchange, verb: str | None, errors: bool) -> bool:
        """Whether this body item is the first of an exchange shown in full."""
        if id(ex) in self._opened or (verb is not None and ex.command != verb) or errors:
            return False
        self._opened.add(id(ex))
        return True

    def opened(self, ex: Exchange) -> bool:
        return id(ex) in self._opened

    def emit(self, line: Text, ex: Exchange | None, *, context: bool = False) -> None:
        if self.grep is None:
            self.console.print(line, overflow="fold")
            return
        if "\n" in line.plain:  # a body piece: grep its lines one by one
            for part in line.split("\n"):
                self.emit(part, ex, context=context)
            return
        if self.grep in line.plain.lower():
            for before in self._context.pop(id(ex), []) if ex is not None else []:
                self.console.print(before, overflow="fold")
            self.console.print(line, overflow="fold")
            if ex is not None:
                self._context[id(ex)] = []  # shown: later matches need no context again
        elif context and ex is not None and self._context.get(id(ex)) != []:
            self._context.setdefault(id(ex), []).append(line)

    def close(self, ex: Exchange) -> None:
        self._context.pop(id(ex), None)
        self._opened.discard(id(ex))


def _body_end_line(ex: Exchange) -> Text:
    """After a body shown in full: where it ended, and what it was."""
    text = render.prefix(ex.t_end)
    text.append("   ")
    text.append_text(render.body_summary(ex))
    return text


def _item_line(item: Item, verb: str | None, errors: bool) -> Text | None:
    ex = item.exchange
    if verb is not None and (ex is None or ex.command != verb):
        return None
    if (
        errors
        and item.what != "anomaly"
        and not (
            item.what in ("done", "withheld") and ex is not None and ex.status not in ("+OK", None)
        )
    ):
        return None
    if item.what == "command" and ex is not None:
        return render.command_line(ex)
    if item.what in ("done", "withheld") and ex is not None:
        if errors and ex.kind == "command":
            line = render.command_line(ex)
            line.append("  →  ")
            line.append_text(render.reply_line(ex))
            return line
        return render.reply_line(ex)
    if item.what == "body":
        return render.body_text(item.detail)
    if item.what == "sasl":
        return render.sasl_line(item.detail, item.t)
    if item.what == "anomaly":
        return render.anomaly_line(item.detail, item.t)
    if item.what == "identity":
        return render.identity_line(item.detail, item.t)
    if item.what == "state":
        return render.state_line(item.detail, item.t)
    if item.what == "closed":
        return render.note_line(f"{item.detail} closed the connection", item.t, "pop.muted")
    return None


def _record_line(record: Record, t: float) -> Text | None:
    kind, fields = record.kind, record.fields
    if kind == fmt.TLS:
        return render.tls_line(fields, t)
    if kind == fmt.EVENT:
        kind = str(fields.get("kind"))
        serious = kind in ("insecure", "observer-error") or kind.startswith("fault")
        style = "pop.error" if serious else "pop.muted"
        detail = fields.get("detail") or fields.get("addr") or ""
        return render.note_line(f"● {fields.get('kind')} {detail}".rstrip(), t, style)
    if kind == fmt.DROP:
        who = "client" if record.direction is Direction.CLIENT else "server"
        return render.note_line(
            f"✂ popproxy did not forward {record.length} octets from the {who}: {record.why}",
            None,
            "pop.warning",
        )
    if kind == fmt.DATA and record.proxy:
        return render.note_line(
            f"✎ the next {record.length} octets were sent by popproxy", t, "pop.warning"
        )
    if kind == fmt.END:
        how = fields.get("how")
        text = render.note_line(
            f"session ended: {how}", t, "pop.ok" if how in ("quit", "closed") else "pop.err"
        )
        if fields.get("error"):
            text.append(f" — {fields['error']}", style="pop.error")
        return text
    return None


def show_raw(console: Console, reader: CaptureReader, *, follow: bool) -> None:
    """Every data record, escaped: printable ASCII as is, other bytes as \\xNN."""
    console.print(_header_line(reader))
    for record in reader.records(follow=follow):
        if record.kind != fmt.DATA or record.data is None:
            continue
        who = "C" if record.direction is Direction.CLIENT else "S"
        style = "pop.client" if who == "C" else "pop.server"
        text = render.prefix(record.t)
        text.append(f"{who} {len(record.data):>6} ", style=style)
        text.append(escape_bytes(record.data[:4096]))
        if len(record.data) > 4096:
            text.append(f" … +{len(record.data) - 4096} octets", style="pop.muted")
        console.print(text, overflow="fold")
