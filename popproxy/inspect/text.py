"""``export --text``: a plain transcript, ``C:``/``S:`` lines with time offsets, secrets masked."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from popproxy import fsutil
from popproxy.capture import format as fmt
from popproxy.capture.format import Record
from popproxy.capture.reader import CaptureReader
from popproxy.core import BodyChunk, Direction, Reply
from popproxy.core.transcript import (
    MESSAGE_VERBS,
    Exchange,
    ExchangeKind,
    Item,
    ItemKind,
    TranscriptBuilder,
)
from popproxy.core.values import decode_text
from popproxy.inspect import Progress, metered_events
from popproxy.views import render, safe

INDENT = " " * 14  # under the text after "   12.345s S: "


@dataclass(frozen=True)
class Note:
    """A line about the session rather than the protocol: TLS, popproxy's own acts, the end."""

    kind: str  # "tls" | "event" | "drop" | "proxy" | "end"
    text: str
    alert: bool = False


def record_note(record: Record) -> Note | None:
    """What a non-protocol record says, in words (the same facts ``popproxy show`` prints)."""
    kind, fields = record.kind, record.fields
    t = fields.get("t")
    when = float(t) if isinstance(t, int | float) else None
    if kind == fmt.TLS:
        return Note(
            "tls",
            render.tls_line(fields, when).plain.strip(),
            alert=fields.get("decrypted") is False,
        )
    if kind == fmt.EVENT:
        detail = fields.get("detail") or fields.get("addr") or ""
        return Note(
            "event",
            f"● {fields.get('kind')} {detail}".rstrip(),
            alert=fields.get("kind") in ("insecure", "observer-error"),
        )
    if kind == fmt.DROP:
        who = "client" if record.direction is Direction.CLIENT else "server"
        return Note(
            "drop",
            f"✂ popproxy did not forward {record.length} octets from the {who}: {record.why}",
            alert=True,
        )
    if kind == fmt.DATA and record.proxy:
        return Note("proxy", f"✎ the next {record.length} octets were sent by popproxy", alert=True)
    if kind == fmt.END:
        how = fields.get("how")
        text = f"session ended: {how}"
        if fields.get("error"):
            text += f" — {fields['error']}"
        return Note("end", text, alert=how not in ("quit", "closed"))
    return None


def walk(reader: CaptureReader, progress: Progress | None = None) -> Iterator[Item]:
    """The capture as display items, in event order.

    Besides the builder's items (``command``, ``done``, ``sasl``, ``anomaly``, ``state``,
    ``closed``) this yields ``note`` (detail: a Note), ``reply`` (the status line of a
    multi-line answer, before its body), ``body`` (detail: unstuffed bytes, as they come)
    and ``unfinished`` (exchanges still open at the end).  Nothing is accumulated.
    """
    builder = TranscriptBuilder(hash_bodies=False, keep_listings=True)
    open_ex: dict[int, Exchange] = {}
    for record, t, events in metered_events(reader, progress):
        if record is not None:
            note = record_note(record)
            if note is not None:
                yield Item(ItemKind.NOTE, t, None, note)
        for event in events:
            items = builder.feed(t, [event])
            if isinstance(event, Reply) and event.multiline:
                ex = open_ex.get(event.seq)
                if ex is None:  # no command seen for it (cannot happen with a sane observer)
                    ex = open_ex[event.seq] = Exchange(
                        ExchangeKind.COMMAND,
                        event.seq,
                        event.verb,
                        status=event.status,
                        code=event.code,
                        text=event.text,
                        multiline=True,
                        t_reply=t,
                    )
                yield Item(ItemKind.REPLY, t, ex)
                continue
            if isinstance(event, BodyChunk):
                ex = open_ex.get(event.seq)
                if ex is not None:
                    yield Item(ItemKind.BODY, t, ex, event.data)
                continue
            for item in items:
                ex = item.exchange
                if item.what == "command" and ex is not None and ex.seq is not None:
                    open_ex[ex.seq] = ex
                elif item.what == "done" and ex is not None and ex.seq is not None:
                    open_ex.pop(ex.seq, None)
                yield item
    for ex in builder.unfinished():
        yield Item(ItemKind.UNFINISHED, ex.t_sent or 0.0, ex)


def is_message(ex: Exchange) -> bool:
    return ex.command in MESSAGE_VERBS


class BodyLines:
    """Writes a body's lines indented, chunk by chunk, without holding more than one chunk."""

    def __init__(self, out: IO[str], indent: str = INDENT) -> None:
        self.out = out
        self.indent = indent
        self.at_start = True
        self._cr = False

    def write(self, data: bytes) -> None:
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        parts = decode_text(data.replace(b"\r\n", b"\n")).split("\n")
        out = self.out
        for i, part in enumerate(parts):
            if part:
                if self.at_start:
                    out.write(self.indent)
                out.write(safe.escape(part, "\t"))
                self.at_start = False
            if i < len(parts) - 1:
                out.write("\n")
                self.at_start = True

    def close(self) -> None:
        if self._cr:  # a lone CR ends a cut-off body: show it
            self._cr = False
            self.write(b"\\r")
        if not self.at_start:
            self.out.write("\n")
            self.at_start = True


def header_lines(reader: CaptureReader) -> list[str]:
    """Session facts from the capture header, as ``#`` comment lines."""
    h = reader.header
    lines = [f"# popproxy transcript of {reader.path.name}"]
    facts: list[tuple[str, Any]] = [
        ("session", h.get("session")),
        ("started", h.get("start")),
        ("client", h.get("client")),
        ("upstream", h.get("upstream")),
        ("listen", h.get("listen")),
        ("stls", h.get("stls")),
    ]
    lines.extend(f"# {key}: {value}" for key, value in facts if value not in (None, ""))
    if h.get("keep_secrets"):
        lines.append("# recorded with --keep-secrets; commands still show credentials masked")
    lines.append("# times are seconds since the session started; credentials are masked")
    return lines


def export_text(
    reader: CaptureReader,
    path: Path,
    *,
    replace: bool = False,
    progress: Progress | None = None,
) -> int:
    """Write the transcript to ``path``; return the number of lines written."""
    lines = 0
    body: BodyLines | None = None
    with (
        fsutil.output_file(path, replace=replace) as raw,
        io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as out,
    ):
        for line in header_lines(reader):
            out.write(safe.escape(line) + "\n")
            lines += 1
        for item in walk(reader, progress):
            if item.what == "body":
                ex = item.exchange
                if ex is not None and not is_message(ex):
                    body = body or BodyLines(out)
                    body.write(item.detail)
                continue
            if body is not None:
                body.close()
                body = None
            text = render_item(item)
            if text is not None:
                out.write(safe.escape(text) + "\n")  # render escaped peer text already
                lines += 1
    return lines


def render_item(item: Item) -> str | None:
    """One transcript line for ``item`` (bodies aside), or None when it shows nothing."""
    ex, t = item.exchange, item.t
    if item.what == "command" and ex is not None:
        return render.command_line(ex).plain
    if item.what == "reply" and ex is not None:
        return render.reply_line(ex, folded=False).plain
    if item.what == "done" and ex is not None:
        if ex.multiline and ex.kind == "command" and ex.t_reply is not None:
            if is_message(ex) or ex.truncated:
                return INDENT + render.body_summary(ex).plain
            return None  # a listing: its lines were written as they came
        return render.reply_line(ex).plain
    if item.what == "unfinished" and ex is not None:
        return render.reply_line(ex).plain
    if item.what == "sasl":
        return render.sasl_line(item.detail, t).plain
    if item.what == "anomaly":
        return render.anomaly_line(item.detail, t).plain
    if item.what == "identity":
        return render.identity_line(item.detail, t).plain
    if item.what == "state":
        return render.state_line(item.detail, t).plain
    if item.what == "closed":
        return render.note_line(f"{item.detail} closed the connection", t, "").plain
    if item.what == "note":
        note: Note = item.detail
        return render.prefix(t).plain + note.text
    return None
