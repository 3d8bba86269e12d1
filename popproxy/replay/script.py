"""A capture read back as a script: the greeting, then each command with its recorded answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popproxy.capture import format as fmt
from popproxy.capture.events import replay_events
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader, some_capture_paths
from popproxy.core import (
    BodyChunk,
    BodyEnd,
    Command,
    Direction,
    Greeting,
    LineTail,
    PopproxySent,
    Reply,
    SaslChallenge,
    SaslResponse,
    Unsolicited,
)
from popproxy.core.transcript import Exchange, TranscriptBuilder


@dataclass
class Step:
    """One recorded command and everything the server sent in answer, as raw bytes.

    ``reply`` is the final status line plus any body, exactly as recorded (dot-stuffed);
    ``sasl`` is an AUTH exchange's middle part, ``("s", challenge)`` and ``("c", response)``
    lines in wire order (RFC 5034 §4).  ``batch`` names the client data record that carried
    the command: commands sharing one were pipelined (RFC 2449 §6.6).
    """

    seq: int
    verb: str
    args: str | None
    line: bytes
    batch: int
    reply: bytes = b""
    status: str | None = None
    sasl: list[tuple[str, bytes]] = field(default_factory=list)
    tls_after: bool = False
    exchange: Exchange | None = None
    reply_by: str = "server"  # "popproxy": the recorded status line was popproxy's own

    @property
    def command_text(self) -> str:
        return self.verb if self.args is None else f"{self.verb} {self.args}"

    @property
    def mechanism(self) -> str | None:
        if self.verb != "AUTH" or not self.args:
            return None
        return self.args.split()[0].upper()  # any blanks (docs/protocol-notes.md §1.5)

    @property
    def initial_response(self) -> str | None:
        """The masked (or kept) AUTH initial response, RFC 5034 §4."""
        words = (self.args or "").split(None, 1) if self.verb == "AUTH" else []
        return words[1].strip() if len(words) > 1 else None


@dataclass
class RecordedSession:
    """One capture as a script for either side of a replay."""

    path: Path
    header: dict[str, Any]
    greeting: bytes | None = None
    greeting_exchange: Exchange | None = None
    steps: list[Step] = field(default_factory=list)
    trailer: bytes = b""  # server bytes after the last answer (an unsolicited goodbye)
    identity: str | None = None
    mechanism: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def user(self) -> str | None:
        """The login name: USER's argument, APOP's name, or the SASL identity record."""
        for step in self.steps:
            if step.verb == "USER" and step.args:
                return step.args.strip()
            if step.verb == "APOP" and step.args:
                return step.args.split()[0]
        return self.identity

    @property
    def implicit_tls(self) -> bool:
        return bool(self.header.get("listen_tls"))


MAX_HELD = 48 << 20  # serve and replay hold a recording's server side in memory


class HeldBytes:
    """What serve and replay keep in memory, bounded: past ``MAX_HELD`` the input is refused
    in one line (docs/replay.md, "Limits") instead of growing the process without end."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, size: int, where: str | Path) -> None:
        self.total += size
        if self.total > MAX_HELD:
            raise CaptureError(
                f"{where}: more than {MAX_HELD >> 20} MiB of recorded mail to hold in memory; "
                "serve and replay keep it all (docs/replay.md, Limits)"
            )


def load_session(path: str | Path) -> RecordedSession:
    """Read one capture into a ``RecordedSession``; raises ``CaptureError`` if unusable or
    if its server side is larger than ``MAX_HELD``."""
    held = HeldBytes()
    replies: dict[int, bytearray] = {}  # appended chunk by chunk: no quadratic copying
    with CaptureReader(path) as reader:
        session = RecordedSession(Path(path), dict(reader.header))
        builder = TranscriptBuilder(hash_bodies=True, keep_listings=True)
        steps: dict[int, Step] = {}
        last: Step | None = None
        data_records = 0
        for record, t, events in replay_events(reader):
            if record is not None and record.kind == fmt.DATA:
                data_records += 1
            if (
                record is not None
                and record.kind == fmt.TLS
                and last is not None
                and last.verb == "STLS"
            ):
                last.tls_after = True
            if record is not None and record.kind == fmt.IDENTITY:
                session.identity = str(record.fields.get("identity") or "") or None
                session.mechanism = str(record.fields.get("mech") or "") or None
            # Three actors: popproxy's own commands (--upstream-stls) are not the client's,
            # so they are not replayed; its own replies are marked as such.
            own = next((e.direction for e in events if isinstance(e, PopproxySent)), None)
            for event in events:
                if isinstance(event, Command) and own is Direction.CLIENT:
                    continue
                if isinstance(event, Greeting):
                    session.greeting = event.raw
                elif isinstance(event, Command):
                    last = steps[event.seq] = Step(
                        event.seq, event.verb, event.args, event.raw, data_records
                    )
                    session.steps.append(last)
                elif isinstance(event, Reply) and event.seq in steps:
                    step = steps[event.seq]
                    held.add(len(event.raw), path)
                    replies.setdefault(event.seq, bytearray()).extend(event.raw)
                    step.status = event.status
                    if own is Direction.SERVER:
                        step.reply_by = "popproxy"
                elif isinstance(event, BodyChunk | BodyEnd) and event.seq in steps:
                    held.add(len(event.raw), path)
                    replies.setdefault(event.seq, bytearray()).extend(event.raw)
                elif isinstance(event, SaslChallenge) and event.seq in steps:
                    steps[event.seq].sasl.append(("s", event.raw))
                elif isinstance(event, SaslResponse) and event.seq in steps:
                    steps[event.seq].sasl.append(("c", event.raw))
                elif isinstance(event, Unsolicited):
                    session.trailer += event.raw
                elif isinstance(event, LineTail) and last is not None:
                    if event.direction is Direction.CLIENT:
                        last.line += event.raw
                    else:
                        held.add(len(event.raw), path)
                        replies.setdefault(last.seq, bytearray()).extend(event.raw)
            for item in builder.feed(t, events):
                ex = item.exchange
                if item.what != "done" or ex is None:
                    continue
                if ex.kind == "greeting":
                    session.greeting_exchange = ex
                elif ex.seq is not None and ex.seq in steps:
                    steps[ex.seq].exchange = ex
        for ex in builder.unfinished():
            if ex.seq is not None and ex.seq in steps and steps[ex.seq].exchange is None:
                steps[ex.seq].exchange = ex
        session.warnings.extend(reader.warnings)
    for seq, reply in replies.items():
        steps[seq].reply = bytes(reply)
    return session


def load_sessions(targets: list[str]) -> list[RecordedSession]:
    """Every capture named by files and folders, in order; a folder without any is an error."""
    paths = some_capture_paths(targets)
    return [load_session(path) for path in paths]


def require_client_side(session: RecordedSession) -> None:
    """A capture with nothing the client said cannot be replayed against a server."""
    if session.greeting is None and not session.steps:
        raise CaptureError(f"{session.path}: the capture holds no POP3 session")
    if not session.steps:
        raise CaptureError(f"{session.path}: the capture has no client side (no commands)")
