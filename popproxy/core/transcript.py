"""Pairs observer events into exchanges (command, reply, body summary) for views and replay."""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any

from popproxy.core import sasl
from popproxy.core.actors import Actors, OwnLine
from popproxy.core.credentials import mask_spans
from popproxy.core.events import (
    Anomaly,
    AuthIdentity,
    BodyChunk,
    BodyEnd,
    Command,
    ConnectionClosed,
    Direction,
    Event,
    Greeting,
    Injected,
    PopproxyClosed,
    PopproxyDropped,
    PopproxySent,
    Reply,
    SaslChallenge,
    SaslResponse,
    Secret,
    State,
    StateChanged,
    TlsStarted,
    Unsolicited,
)
from popproxy.core.values import decode_text

MESSAGE_VERBS = frozenset({"RETR", "TOP"})
HEAD_LIMIT = 64 * 1024  # bytes of a message kept to summarise its headers
MAX_ATTACHMENTS = 20
_FILENAME_RE = re.compile(rb'(?i)\b(?:file)?name\*?=\s*"?([^";\r\n]{1,200})')


@dataclass
class MessageSummary:
    """What a folded body line says about a message: from a bounded look at its headers."""

    sender: str | None = None
    subject: str | None = None
    date: str | None = None
    attachments: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.sender,
            "subject": self.subject,
            "date": self.date,
            "attachments": self.attachments,
        }


class ExchangeKind(enum.StrEnum):
    """What an exchange is: a command with its reply, or a server line answering none."""

    COMMAND = "command"
    GREETING = "greeting"
    UNSOLICITED = "unsolicited"


class ItemKind(enum.StrEnum):
    """What a display item shows (``Item.what``)."""

    COMMAND = "command"  # a command was sent
    DONE = "done"  # an exchange is complete (its reply, and body if any)
    BODY = "body"  # a piece of a body, when bodies are shown
    SASL = "sasl"  # a SASL challenge or response
    IDENTITY = "identity"  # who logged in, decoded from the mechanism
    ANOMALY = "anomaly"
    STATE = "state"  # AUTHORIZATION, TRANSACTION, UPDATE (RFC 1939 §3)
    TLS = "tls"
    CLOSED = "closed"
    # export --text's own stream (inspect/text.py) adds these:
    NOTE = "note"  # a capture record worth a line (TLS, popproxy's own bytes, the end)
    REPLY = "reply"  # a multi-line reply's status line, before its body
    UNFINISHED = "unfinished"  # an exchange the capture left open
    WITHHELD = "withheld"  # popproxy kept a reply from the client (and maybe sent its own)


@dataclass(slots=True)
class Exchange:
    """A command and everything the server answered to it (or a greeting / unsolicited line)."""

    kind: ExchangeKind
    seq: int | None
    command: str | None = None
    args: str | None = None
    status: str | None = None
    code: str | None = None
    text: str | None = None
    multiline: bool = False
    body_lines: int | None = None
    body_octets: int | None = None
    body_sha256: str | None = None
    truncated: bool = False
    value: tuple[object, ...] | None = None
    listing: tuple[tuple[str, ...], ...] | None = None
    sasl: list[dict[str, Any]] = field(default_factory=list)
    t_sent: float | None = None
    t_reply: float | None = None
    t_end: float | None = None
    message: MessageSummary | None = None
    state: State | None = None  # the session state when the command was sent
    # Three actors (docs/show.schema.json): the status line is the one the client got.
    command_by: str | None = None  # "client", or "popproxy": its own (--upstream-stls)
    reply_by: str = "server"  # or "popproxy": it made the status line, or withheld the server's
    reply_why: str | None = None  # why popproxy made or withheld it
    withheld: dict[str, Any] | None = None  # the server's status line the client never got
    dropped: list[dict[str, Any]] = field(default_factory=list)  # bytes popproxy did not forward
    truncated_by: str | None = None  # whose close cut the body off: "server" or "popproxy"
    client_octets: int = 0
    server_octets: int = 0
    shown: int = 0
    _hash: Any = None
    _head: bytearray | None = None
    _reopened: bool = False  # a single-line reply that a body followed after all
    # Where its bytes lie in each stream, for drops (core/actors.py): -1 while none there.
    _c_lo: int = -1
    _c_hi: int = -1
    _s_lo: int = -1
    _s_hi: int = -1
    _status_lo: int = -1
    _status_hi: int = -1
    _status_dropped: int = 0

    @property
    def done(self) -> bool:
        return self.t_end is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq": self.seq,
            "command": self.command,
            "args": self.args,
            "status": self.status,
            "code": self.code,
            "text": self.text,
            "multiline": self.multiline,
            "body_lines": self.body_lines,
            "body_octets": self.body_octets,
            "body_sha256": self.body_sha256,
            "truncated": self.truncated,
            "truncated_by": self.truncated_by,
            "value": list(self.value) if self.value is not None else None,
            "listing": [list(x) for x in self.listing] if self.listing is not None else None,
            "sasl": self.sasl,
            "state": self.state,
            "command_by": self.command_by,
            "reply_by": self.reply_by,
            "reply_why": self.reply_why,
            "withheld": self.withheld,
            "dropped": self.dropped,
            "message": self.message.to_json() if self.message else None,
            "t_sent": self.t_sent,
            "t_reply": self.t_reply,
            "t_end": self.t_end,
        }


@dataclass
class SessionSummary:
    """Session-wide facts gathered while building the transcript."""

    greeting: str | None = None
    apop_timestamp: str | None = None
    user: str | None = None
    mechanism: str | None = None
    state: State = State.AUTHORIZATION
    quit: bool = False
    commands: int = 0
    errors: int = 0  # -ERR replies
    verbs: dict[str, int] = field(default_factory=dict)  # commands sent, per verb
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    closes: list[dict[str, Any]] = field(default_factory=list)  # d, by, why (popproxy's)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # every drop: from, octets, why


@dataclass(frozen=True)
class Item:
    """Something a live view can show: ``what`` is command, done, anomaly, state, tls, closed."""

    what: ItemKind
    t: float
    exchange: Exchange | None = None
    detail: Any = None


class TranscriptBuilder:
    """Consumes (time, events) and yields display items; keeps only unfinished exchanges."""

    def __init__(
        self,
        *,
        hash_bodies: bool = True,
        keep_listings: bool = True,
        body_items: int = 0,
        reveal_secrets: bool = False,
        scan_attachments: bool = True,
        summarise_messages: bool = True,
    ) -> None:
        self.summarise_messages = summarise_messages  # From/Subject of RETR/TOP bodies
        self.scan_attachments = scan_attachments  # a full scan of every message body
        self.reveal_secrets = reveal_secrets  # args from the raw bytes, not the masked copy
        self.hash_bodies = hash_bodies
        self.keep_listings = keep_listings
        self.body_items = body_items  # bytes of each body to pass on as "body" items
        self.session = SessionSummary()
        self._open: dict[int, Exchange] = {}
        self._identities: set[int] = set()  # a re-read capture may name one twice
        self._echoes: list[Secret] = []
        self._by_popproxy: Direction | None = None  # whose bytes the current batch holds
        self._why: str | None = None  # and why popproxy made them
        self._last_done: Exchange | None = None  # the last exchange a status line finished
        self._actors: Actors[Exchange] = Actors()  # popproxy's drops (core/actors.py)
        self.session.dropped = self._actors.dropped

    def feed(self, t: float, events: list[Event]) -> list[Item]:
        items: list[Item] = []
        self._by_popproxy = None
        actors = self._actors
        actors.batch += 1
        settled = False  # this batch holds more than drop records
        for event in events:
            if isinstance(event, (PopproxySent, PopproxyClosed)):
                # What the observer makes of these bytes (or this close) is popproxy's act.
                self._by_popproxy, self._why = event.direction, event.why
                continue
            if type(event) is not PopproxyDropped:
                settled = True
            item = self._one(t, event)
            if item is not None:
                items.append(item)
        if settled and actors.waiting:
            items[0:0] = self._shown(actors.release(t))
        if actors.out:
            items += self._shown(actors.out)
            actors.out.clear()
        return items

    @property
    def waiting(self) -> bool:
        """Whether an exchange just done may still change with the next record (a drop
        record saying popproxy withheld its reply follows the reply's data)."""
        return self._actors.waiting

    def _popproxys(self, direction: Direction) -> bool:
        return self._by_popproxy is direction

    def _one(self, t: float, event: Event) -> Item | None:
        handler = _HANDLERS.get(type(event))
        return handler(self, t, event) if handler is not None else None

    def _command(self, t: float, event: Command) -> Item | None:
        session = self.session
        session.commands += 1
        session.verbs[event.verb] = session.verbs.get(event.verb, 0) + 1
        args = event.args
        if self.reveal_secrets and args is not None:
            line = decode_text(event.raw.rstrip(b"\r\n")).lstrip(" \t")
            args = line.partition(" ")[2].lstrip(" ") or args
        ex = Exchange(
            ExchangeKind.COMMAND,
            event.seq,
            event.verb,
            args,
            t_sent=t,
            state=session.state,
            command_by="popproxy" if self._by_popproxy is Direction.CLIENT else "client",
            client_octets=len(event.raw),
        )
        self._actors.recent.append(ex)
        self._actors.place(ex, event, t)
        if event.verb == "USER" and event.args:
            session.user = event.args
        elif event.verb == "APOP" and event.args:
            session.user = event.args.split(" ")[0]
        self._open[event.seq] = ex
        return Item(ItemKind.COMMAND, t, ex)

    def _reply(self, t: float, event: Reply) -> Item | None:
        session = self.session
        ex = self._open.get(event.seq)
        if ex is None:
            ex = Exchange(ExchangeKind.COMMAND, event.seq, event.verb)
            self._actors.recent.append(ex)
        ex.status, ex.code, ex.text = event.status, event.code, event.text
        if self._popproxys(event.direction):
            ex.reply_by, ex.reply_why = "popproxy", self._why
        self._actors.place(ex, event, t, True)
        if event.status == "-ERR":
            session.errors += 1
        if event.verb == "QUIT" and event.status == "+OK":
            session.quit = True  # RFC 1939 §6: the server acknowledged QUIT
        ex.multiline, ex.value, ex.t_reply = event.multiline, event.value, t
        ex.server_octets += len(event.raw)
        if event.multiline:
            ex.body_lines = ex.body_octets = 0
            if self.hash_bodies:
                ex._hash = hashlib.sha256()
            if event.verb in MESSAGE_VERBS and self.summarise_messages:
                ex._head = bytearray()
                ex.message = MessageSummary()
            self._open[event.seq] = ex
            return None
        ex.t_end = t
        self._open.pop(event.seq, None)
        self._last_done = ex
        return Item(ItemKind.DONE, t, ex)

    def _chunk(self, t: float, event: BodyChunk) -> Item | None:
        found = self._open.get(event.seq)
        if found is None:  # a resynchronised body for an exchange already finished
            found = self._reopen(event.seq)
            found._hash = hashlib.sha256() if self.hash_bodies else None
        ex = found
        ex.server_octets += len(event.raw)
        self._actors.place(ex, event, t)
        if ex._hash is not None:
            ex._hash.update(event.data)
        if ex._head is not None and len(ex._head) < HEAD_LIMIT:
            ex._head += event.data[: HEAD_LIMIT - len(ex._head)]
        if self.scan_attachments and ex.message is not None and b"name" in event.data:
            names = ex.message.attachments
            for match in _FILENAME_RE.finditer(event.data):
                name = decode_text(match.group(1)).strip()
                if name not in names and len(names) < MAX_ATTACHMENTS:
                    names.append(name)
        if self.body_items and ex.shown < self.body_items:
            piece = event.data[: self.body_items - ex.shown]
            ex.shown += len(piece)
            return Item(ItemKind.BODY, t, ex, piece)
        return None

    def _body_end(self, t: float, event: BodyEnd) -> Item | None:
        if event.seq not in self._open:
            return None
        ex = self._open.pop(event.seq)
        ex.multiline = True
        ex.body_lines, ex.body_octets, ex.truncated = event.lines, event.octets, event.truncated
        if event.truncated:
            ex.truncated_by = "popproxy" if self._popproxys(event.direction) else "server"
        ex.server_octets += len(event.raw)
        if event.raw:
            self._actors.place(ex, event, t)
        if self.keep_listings:
            ex.listing = event.listing
        if ex._hash is not None:
            ex.body_sha256 = ex._hash.hexdigest()
            ex._hash = None
        if ex._head is not None and ex.message is not None:
            _summarise(ex.message, bytes(ex._head))
            ex._head = None
        ex.t_end = t
        if ex._reopened:
            return None  # its "done" came with the status line; it is complete now
        return Item(ItemKind.DONE, t, ex)

    def _secret(self, t: float, event: Secret) -> Item | None:
        if event.direction is Direction.SERVER:
            self._echoes.append(event)  # a server line's echo of a credential
            del self._echoes[:-32]
        return None

    def _challenge(self, t: float, event: SaslChallenge) -> Item | None:
        sasl_ex = self._open.get(event.seq)
        if sasl_ex is not None:
            sasl_ex.server_octets += len(event.raw)
            self._actors.place(sasl_ex, event, t)
            raw = event.raw
            if not self.reveal_secrets:  # a challenge that echoes a credential
                raw = mask_spans(raw, event.offset, self._echoes)
            entry = sasl.server_entry(sasl_ex.args, raw, event.data)
            sasl_ex.sasl.append(entry)
            return Item(ItemKind.SASL, t, sasl_ex, entry)
        return None

    def _response(self, t: float, event: SaslResponse) -> Item | None:
        sasl_ex = self._open.get(event.seq)
        if sasl_ex is not None:
            sasl_ex.client_octets += len(event.raw)
            self._actors.place(sasl_ex, event, t)
            entry = sasl.client_entry(sasl_ex.args, sasl_ex.sasl, event.raw)
            sasl_ex.sasl.append(entry)
            return Item(ItemKind.SASL, t, sasl_ex, entry)
        return None

    def _greeting(self, t: float, event: Greeting) -> Item | None:
        session = self.session
        session.greeting = decode_text(event.raw.rstrip(b"\r\n"))
        session.apop_timestamp = event.apop_timestamp
        return Item(ItemKind.DONE, t, self._server_line(ExchangeKind.GREETING, event, t))

    def _unsolicited(self, t: float, event: Unsolicited) -> Item | None:
        before = self._actors.last_server
        ex = self._server_line(ExchangeKind.UNSOLICITED, event, t)
        if ex.reply_by == "popproxy":
            line = OwnLine(event.offset, ex.status, ex.code, ex.text, t, ex.reply_why, ex)
            if self._actors.own_line(line, before):
                return None  # the reply to a withheld exchange (or it may be, once a drop says)
        return Item(ItemKind.DONE, t, ex)

    def _injected(self, t: float, event: Injected) -> Item | None:
        """popproxy's line where the server's withheld ``+OK`` to STLS was (the upstream
        handshake failed): the reply the client got."""
        if event.direction is Direction.SERVER and self._popproxys(event.direction):
            line = Actors.parse(event.offset, event.raw, t, self._why)
            self._actors.own_line(line, self._actors.last_server)
        return None

    def _identity(self, t: float, event: AuthIdentity) -> Item | None:
        session = self.session
        if event.seq in self._identities:
            return None
        self._identities.add(event.seq)
        session.user, session.mechanism = event.identity, event.mechanism
        detail = {
            "mechanism": event.mechanism,
            "identity": event.identity,
            "details": dict(event.details),
        }
        return Item(ItemKind.IDENTITY, t, self._open.get(event.seq), detail)

    def _anomaly(self, t: float, event: Anomaly) -> Item | None:
        session = self.session
        record = {
            "kind": event.kind,
            "dir": event.direction.value,
            "seq": event.seq,
            "detail": event.detail,
            "t": t,
            "by": "popproxy" if self._popproxys(event.direction) else _peer(event.direction),
        }
        session.anomalies.append(record)
        return Item(ItemKind.ANOMALY, t, None, record)

    def _state(self, t: float, event: StateChanged) -> Item | None:
        session = self.session
        session.state = event.new
        return Item(ItemKind.STATE, t, None, event.new.value)

    def _tls(self, t: float, event: TlsStarted) -> Item | None:
        return Item(ItemKind.TLS, t, None, event.direction.value)

    def _closed(self, t: float, event: ConnectionClosed) -> Item | None:
        session = self.session
        who = "popproxy" if self._popproxys(event.direction) else _peer(event.direction)
        session.closed.append(who)
        why = self._why if who == "popproxy" else None
        session.closes.append({"d": event.direction.value, "by": who, "why": why})
        return Item(ItemKind.CLOSED, t, None, who)

    def _reopen(self, seq: int) -> Exchange:
        """The exchange a resynchronised body belongs to: ``LIST n`` answered with a list
        (the observer's ``multiline-reply-to-single``) keeps its list, in order."""
        last = self._last_done
        if last is not None and last.seq == seq:
            last.multiline, last.body_lines, last.body_octets = True, 0, 0
            last._reopened = True
            self._open[seq] = last
            return last
        orphan = Exchange(ExchangeKind.COMMAND, seq, multiline=True, body_lines=0, body_octets=0)
        self._open[seq] = orphan
        return orphan

    def unfinished(self) -> list[Exchange]:
        """Exchanges still open (no reply, or a body cut off): shown at the end of a session;
        with popproxy's last line if the capture ended while it waited for a drop."""
        out = sorted(self._open.values(), key=lambda ex: ex.seq or 0)
        return out + self._actors.held()

    def _server_line(self, kind: ExchangeKind, event: Greeting | Unsolicited, t: float) -> Exchange:
        """An exchange of one server line answering no command: the greeting, or unsolicited."""
        ex = Exchange(
            kind,
            None,
            status=event.status,
            code=event.code,
            text=event.text,
            t_reply=t,
            t_end=t,
            server_octets=len(event.raw),
        )
        if self._popproxys(event.direction):
            ex.reply_by, ex.reply_why = "popproxy", self._why
        self._actors.recent.append(ex)
        self._actors.place(ex, event, t, True)
        return ex

    # ----------------------------------------------------------------- three actors

    def _dropped(self, t: float, event: PopproxyDropped) -> Item | None:
        self._actors.drop(event.direction, event.offset, event.length, event.why, t)
        return None

    @staticmethod
    def _shown(what: list[tuple[str, Exchange, float]]) -> list[Item]:
        """Items the three-actor tracker has for the views (withheld replies, lines)."""
        return [Item(ItemKind(kind), when, ex, ex.withheld) for kind, ex, when in what]


# One handler per event type (events are final classes): a dict lookup per event.  A table
# of the class's functions, not of bound methods: those would make every builder a
# reference cycle, freed only by the garbage collector.
_HANDLERS: dict[type[Event], Callable[[TranscriptBuilder, float, Any], Item | None]] = {
    Command: TranscriptBuilder._command,
    Reply: TranscriptBuilder._reply,
    BodyChunk: TranscriptBuilder._chunk,
    BodyEnd: TranscriptBuilder._body_end,
    Secret: TranscriptBuilder._secret,
    SaslChallenge: TranscriptBuilder._challenge,
    SaslResponse: TranscriptBuilder._response,
    Greeting: TranscriptBuilder._greeting,
    Unsolicited: TranscriptBuilder._unsolicited,
    AuthIdentity: TranscriptBuilder._identity,
    Anomaly: TranscriptBuilder._anomaly,
    StateChanged: TranscriptBuilder._state,
    TlsStarted: TranscriptBuilder._tls,
    ConnectionClosed: TranscriptBuilder._closed,
    Injected: TranscriptBuilder._injected,
    PopproxyDropped: TranscriptBuilder._dropped,
}


def _summarise(summary: MessageSummary, head: bytes) -> None:
    """Read From, Subject and Date from a message's first bytes (RFC 5322 §3.6)."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    block = head if end < 0 else head[: end + 2]
    try:
        headers = BytesHeaderParser(policy=default_policy).parsebytes(block)
        summary.sender = _header(headers, "From")
        summary.subject = _header(headers, "Subject")
        summary.date = _header(headers, "Date")
    except Exception:  # a malformed header must not stop the transcript: show none of it
        summary.sender = summary.subject = summary.date = None


def _header(headers: Any, name: str) -> str | None:
    try:
        value = headers.get(name)
    except Exception:  # the email package raises many kinds
        return None
    return None if value is None else " ".join(str(value).split())[:200]


def _peer(direction: Direction) -> str:
    return "client" if direction is Direction.CLIENT else "server"
