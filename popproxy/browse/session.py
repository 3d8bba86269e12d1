"""One session for the browser: transcript lines, one message on demand, raw records."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import IO, Any

from rich.text import Text

from popproxy.capture import format as fmt
from popproxy.capture.events import replay_events
from popproxy.capture.format import Record
from popproxy.capture.reader import CaptureReader
from popproxy.core import BodyChunk, BodyEnd, Direction
from popproxy.core.transcript import MESSAGE_VERBS, Item, SessionSummary, TranscriptBuilder
from popproxy.escapes import escape_bytes
from popproxy.views import render
from popproxy.views.safe import ONE_LINE, sanitise
from popproxy.views.safe import escape as clean

MAX_RAW_RECORDS = 5000  # the raw view lists this many data records (show --raw has all)
RAW_PREVIEW = 4096  # octets of each record shown
HEADER_BLOCK = 256 * 1024  # a part's header block is read up to this size
LINE_LIMIT = 64 * 1024  # body lines are read in pieces of at most this size


@dataclass
class Line:
    """One transcript line; ``seq`` ties it to its exchange, ``message`` when it opens one."""

    text: Text
    kind: str  # command, reply, sasl, anomaly, state, tls, note, closed
    seq: int | None = None
    message: bool = False


@dataclass
class Transcript:
    lines: list[Line]
    summary: SessionSummary
    header: dict[str, Any]
    warnings: list[str]


def load_transcript(path: Path) -> Transcript:
    """Read a capture into display lines (bodies folded: memory grows with commands only)."""
    with CaptureReader(path) as reader:
        builder = TranscriptBuilder(hash_bodies=False, keep_listings=True)
        lines: list[Line] = []
        for record, t, events in replay_events(reader):
            if record is not None:
                note = record_line(record, t)
                if note is not None:
                    lines.append(Line(sanitise(note, ONE_LINE), record.kind))
            for item in builder.feed(t, events):
                line = item_line(item)
                if line is not None:
                    line.text = sanitise(line.text, ONE_LINE)
                    lines.append(line)
        for ex in builder.unfinished():
            lines.append(Line(sanitise(render.reply_line(ex), ONE_LINE), "reply", ex.seq))
        return Transcript(lines, builder.session, dict(reader.header), list(reader.warnings))


def item_line(item: Item) -> Line | None:
    """A transcript item as rendered by views/render.py."""
    ex = item.exchange
    if item.what == "command" and ex is not None:
        return Line(render.command_line(ex), "command", ex.seq)
    if item.what == "done" and ex is not None:
        opens = ex.multiline and ex.command in MESSAGE_VERBS and ex.status == "+OK"
        return Line(render.reply_line(ex), "reply", ex.seq, opens)
    if item.what == "sasl":
        return Line(render.sasl_line(item.detail, item.t), "sasl", ex.seq if ex else None)
    if item.what == "anomaly":
        return Line(render.anomaly_line(item.detail, item.t), "anomaly", item.detail.get("seq"))
    if item.what == "state":
        return Line(render.state_line(item.detail, item.t), "state")
    if item.what == "closed":
        return Line(
            render.note_line(f"{item.detail} closed the connection", item.t, "pop.muted"), "closed"
        )
    return None


def record_line(record: Record, t: float) -> Text | None:
    """What a non-data record says (TLS, events, drops, popproxy's own bytes, the end)."""
    kind, fields = record.kind, record.fields
    if kind == fmt.TLS:
        return render.tls_line(fields, t)
    if kind == fmt.EVENT:
        style = "pop.error" if fields.get("kind") in ("insecure", "observer-error") else "pop.muted"
        detail = fields.get("detail") or fields.get("addr") or ""
        return render.note_line(f"● {fields.get('kind')} {detail}".rstrip(), t, style)
    if kind == fmt.DROP:
        who = "client" if record.direction is Direction.CLIENT else "server"
        return render.note_line(
            f"✂ popproxy did not forward {record.length} octets from the {who}: {record.why}",
            None,
            "pop.warning",
        )
    if kind == fmt.END:
        how = str(fields.get("how"))
        return render.session_end_line(
            how, fields.get("error"), float(fields.get("t") or 0.0), _end_summary(fields)
        )
    return None


def _end_summary(fields: dict[str, Any]) -> SessionSummary:
    summary = SessionSummary(user=fields.get("user"), commands=int(fields.get("commands") or 0))
    summary.anomalies = [{}] * int(fields.get("anomalies") or 0)
    return summary


# ----------------------------------------------------------------- one message


@dataclass
class Part:
    """One node of a message's MIME tree: no payload, only what describes it."""

    depth: int
    content_type: str
    filename: str | None = None
    disposition: str | None = None
    octets: int = 0


@dataclass
class Message:
    """A RETR/TOP body, spooled to a private temp file, and what its headers say."""

    seq: int
    body: IO[bytes]  # the dot-unstuffed body, as the client received it
    octets: int
    truncated: bool
    headers: list[tuple[str, str]] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.filename or p.disposition == "attachment"]

    def close(self) -> None:
        self.body.close()


def extract_message(
    path: Path, seq: int, progress: Callable[[int], None] | None = None
) -> Message | None:
    """Stream exchange ``seq``'s body to a temp file: memory stays bounded at any size."""
    spool: IO[bytes] = tempfile.TemporaryFile(prefix="popproxy-")  # noqa: SIM115 - Message owns it
    octets, seen, truncated = 0, False, False
    with CaptureReader(path) as reader:
        for _record, _t, events in replay_events(reader):
            for event in events:
                if isinstance(event, BodyChunk) and event.seq == seq:
                    spool.write(event.data)
                    octets += len(event.data)
                    seen = True
                elif isinstance(event, BodyEnd) and event.seq == seq:
                    truncated = event.truncated
            if progress is not None and reader.position:
                progress(reader.position)
    if not seen:
        spool.close()
        return None
    message = Message(seq, spool, octets, truncated)
    spool.seek(0)
    message.headers = _headers(_header_block(spool))
    spool.seek(0)
    message.parts = mime_tree(spool)
    spool.seek(0)
    return message


def _header_block(f: IO[bytes] | _Lines) -> bytes:
    block = bytearray()
    while len(block) < HEADER_BLOCK:
        line = f.readline(LINE_LIMIT)
        if not line:
            break
        block += line
        if line in (b"\r\n", b"\n"):
            break
    return bytes(block)


def _headers(block: bytes) -> list[tuple[str, str]]:
    try:
        parsed = BytesHeaderParser(policy=default_policy).parsebytes(block)
        return [(clean(k), clean(" ".join(str(v).split()))) for k, v in parsed.items()]
    except Exception:  # the email package raises many kinds on hostile headers
        return [("(unparsable header block)", clean(block[:200].decode("latin-1")))]


def _describe(block: bytes, depth: int) -> tuple[Part, str | None]:
    """A part from its header block, and its multipart boundary if it has one (RFC 2046 §5.1)."""
    try:
        msg = BytesHeaderParser(policy=default_policy).parsebytes(block)
        ctype = msg.get_content_type()
        boundary = msg.get_boundary() if msg.get_content_maintype() == "multipart" else None
        filename = msg.get_filename()
        disposition = msg.get_content_disposition()
    except Exception:  # a hostile header: describe what we can
        return Part(depth, "text/plain"), None
    part = Part(depth, clean(ctype), clean(filename) if filename else None, disposition)
    return part, boundary


class _Lines:
    """Lines of a file, with a fast skip over lines that cannot be MIME boundaries."""

    BLOCK = 1 << 20

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.buf = b""
        self.pos = 0
        self.eof = False

    def _fill(self) -> bool:
        """Append a block to what is left; False at the end of the file."""
        if self.eof:
            return False
        block = self.f.read(self.BLOCK)
        if not block:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + block
        self.pos = 0
        return True

    def readline(self, limit: int = LINE_LIMIT) -> bytes:
        while True:
            nl = self.buf.find(b"\n", self.pos, self.pos + limit)
            if nl >= 0 or len(self.buf) - self.pos >= limit or not self._fill():
                end = nl + 1 if nl >= 0 else min(len(self.buf), self.pos + limit)
                line, self.pos = self.buf[self.pos : end], end
                return line

    def skip(self) -> int:
        """Consume whole lines up to the next one starting with ``--``; their octet count."""
        total = 0
        while True:
            if len(self.buf) - self.pos < 2 and not self._fill():
                total += len(self.buf) - self.pos
                self.pos = len(self.buf)
                return total
            if self.buf.startswith(b"--", self.pos):
                return total
            found = self.buf.find(b"\n--", self.pos)
            if found >= 0:
                total += found + 1 - self.pos
                self.pos = found + 1
                return total
            last = self.buf.rfind(b"\n", self.pos)
            if last >= 0:
                total += last + 1 - self.pos
                self.pos = last + 1
            elif len(self.buf) - self.pos > LINE_LIMIT:
                line = self.readline()  # an endless line: it cannot be a boundary
                total += len(line)
            if not self._fill():
                total += len(self.buf) - self.pos
                self.pos = len(self.buf)
                return total


def mime_tree(f: IO[bytes]) -> list[Part]:
    """The MIME skeleton of a message file, in one streaming pass (payloads never kept)."""
    lines = _Lines(f)
    root, boundary = _describe(_header_block(lines), 0)
    parts = [root]
    stack: list[tuple[bytes, int]] = []  # (boundary, depth of its multipart)
    if boundary:
        stack.append((boundary.encode("latin-1", "replace"), 0))
    current = root
    while True:
        current.octets += lines.skip()
        line = lines.readline()
        if not line:
            break
        stripped = line.rstrip(b"\r\n")
        hit = None
        for i in range(len(stack) - 1, -1, -1):
            marker = b"--" + stack[i][0]
            if stripped == marker or stripped == marker + b"--":
                hit = (i, stripped != marker)
                break
        if hit is None:
            current.octets += len(line)
            continue
        index, closing = hit
        del stack[index + 1 :]
        if closing:
            stack.pop()
            current = parts[0]
            continue
        depth = stack[index][1] + 1
        current, inner = _describe(_header_block(lines), depth)
        parts.append(current)
        if inner:
            stack.append((inner.encode("latin-1", "replace"), depth))
    return parts


# ----------------------------------------------------------------- raw records


@dataclass
class RawRecord:
    direction: Direction
    t: float
    octets: int
    preview: bytes
    proxy: bool


def raw_records(path: Path, limit: int = MAX_RAW_RECORDS) -> tuple[list[RawRecord], bool]:
    """The first ``limit`` data records (their first octets); True when there were more."""
    out: list[RawRecord] = []
    with CaptureReader(path) as reader:
        for record in reader.records():
            direction = record.direction
            if record.kind != fmt.DATA or record.data is None or direction is None:
                continue
            if len(out) >= limit:
                return out, True
            out.append(
                RawRecord(
                    direction,
                    record.t,
                    len(record.data),
                    record.data[:RAW_PREVIEW],
                    record.proxy,
                )
            )
    return out, False


escaped = escape_bytes  # the same escaping as show --raw


def hexdump(data: bytes, width: int = 16) -> list[str]:
    """``offset  hex bytes  |ascii|`` lines."""
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off : off + width]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {hexes:<{width * 3}} |{text}|")
    return lines
