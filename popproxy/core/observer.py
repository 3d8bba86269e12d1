"""The sans-IO POP3 observer: both directions of a session in, events out.

Theory of operation
-------------------
The IO layer feeds a copy of every byte each side sends (``receive_data``; ``b""`` is
EOF) plus the facts only it knows (``start_tls``).  The observer never sees a socket, a
clock or a file, so the live proxy and an offline re-read of a capture produce the same
events.

Framing follows docs/protocol-notes.md §1–§3: the client side is split into lines; each line is a
command pushed on a FIFO of pending commands (RFC 2449 §6.6 pipelining: POP3 has no
tags, order is the only key).  The server side is split into lines while it expects a
status line; the head of the FIFO decides what a status line means, and only
(verb, has-argument, status) decides whether a multi-line body follows (RFC 1939 §3).
Bodies are scanned chunk-wise (``core/body.py``: a compiled pattern jumps between lines
that start with a dot, ``bytes.count`` counts lines): no Python loop runs per message
line.  Only listing bodies (LIST, UIDL, CAPA, ...) are split into lines, for their values.

Client lines sent while an AUTH or STLS command is outstanding are *held*: only the
server's next reply tells whether they were SASL responses, commands, or plaintext
injected before TLS.  ``settled(direction)`` is the offset up to which events (and the
credential spans among them) are final; a recorder writes bytes only below it.

The session state and each side's read mode change only through the tables of
``core/state.py``: the methods below say what happened, the tables say where it leads.

Every input byte lands in exactly one ``RawEvent``; nothing here raises on bad input:
oddities become ``Anomaly`` events, and a direction that cannot be followed goes opaque.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from popproxy.core import credentials, sasl, values
from popproxy.core.body import Body
from popproxy.core.events import (
    Anomaly,
    AnomalyKind,
    AuthIdentity,
    BodyChunk,
    BodyEnd,
    Command,
    ConnectionClosed,
    Direction,
    Event,
    Greeting,
    Injected,
    LineTail,
    Opaque,
    Reply,
    SaslChallenge,
    SaslResponse,
    Secret,
    SecretKind,
    State,
    StateChanged,
    TlsStarted,
    Unsolicited,
)
from popproxy.core.state import (
    INITIAL_MODE,
    OK_REPLY_EVENTS,
    Mode,
    ObserverError,
    SessionEvent,
    Trigger,
    next_mode,
    next_state,
)
from popproxy.hints import first_bytes_hint

# docs/protocol-notes.md §2: multi-line on +OK, always or only without an argument.
ML_ON_OK = frozenset({"CAPA", "RETR", "TOP", "XTND", "*ENV"})
ML_ON_OK_IF_NO_ARG = frozenset({"LIST", "UIDL", "AUTH", "LANG"})
LISTING_VERBS = frozenset({"LIST", "UIDL", "CAPA", "AUTH", "LANG", "XTND"})
KNOWN_VERBS = frozenset(
    {
        "USER",
        "PASS",
        "APOP",
        "AUTH",
        "STLS",
        "CAPA",
        "UTF8",
        "LANG",
        "QUIT",
        "STAT",
        "LIST",
        "RETR",
        "DELE",
        "NOOP",
        "RSET",
        "TOP",
        "UIDL",
        "LAST",
        "RPOP",
        "XTND",
    }
)
SASL_IDENTITY_MECHANISMS = frozenset({"PLAIN", "LOGIN", "CRAM-MD5"}) | sasl.OAUTH_MECHANISMS
MAX_COMMAND = 255  # RFC 2449 §4, including CRLF
MAX_STATUS = 512  # RFC 1939 §3 / RFC 2449 §4, first line of a response incl. CRLF
FILLER = ord("#")
FILLER_BYTE = b"#"
_LINE_OVERLONG = Trigger.LINE_OVERLONG  # read once: Enum class attributes are slow (3.11)
INJECTED_DETAIL = "plaintext before the TLS handshake, not forwarded"


@dataclass
class _Pending:
    seq: int
    verb: str
    has_arg: bool
    mechanism: str | None = None
    responses: list[bytes] = field(default_factory=list)
    identity_done: bool = False


@dataclass
class _Side:
    direction: Direction
    mode: Mode
    offset: int = 0  # stream offset of the first byte not yet accounted for
    buf: bytes = b""
    after_tail: Mode = Mode.LINES
    tail_secret: SecretKind | None = None
    scan_tail: bool | None = None  # SCAN: inside an over-long line (True: a credential)
    bare_lf_seen: bool = False
    reported: set[str] = field(default_factory=set)  # anomalies reported once per side
    head: bytes | None = b""  # the stream's first bytes, until sniffed for TLS (then None)


class Observer:
    """Frames one POP3 session from both directions into events."""

    def __init__(
        self,
        *,
        max_pending: int = 100_000,
        max_line: int = 8192,
        listings: frozenset[str] = LISTING_VERBS,
        count_lines: bool = True,
    ) -> None:
        """``listings``: the verbs whose bodies are parsed into ``BodyEnd.listing`` (a line
        loop: a live proxy keeps it to the short CAPA and AUTH lists).  Without
        ``count_lines``, ``BodyEnd.lines`` is 0 (a live proxy that shows no transcript)."""
        self.listings = listings
        self.count_lines = count_lines
        self.max_pending = max_pending
        self.max_line = max_line
        self.state = State.AUTHORIZATION
        self.capabilities: tuple[tuple[str, ...], ...] | None = None
        self._client = _Side(Direction.CLIENT, INITIAL_MODE[Direction.CLIENT])
        self._server = _Side(Direction.SERVER, INITIAL_MODE[Direction.SERVER])
        self._pending: deque[_Pending] = deque()
        self._held: list[tuple[int, bytes]] = []
        self._held_bytes = 0
        self._auth_open = 0
        self._stls_open = 0
        self._awaiting_response = False
        self._body: Body | None = None
        self._last: tuple[int, str, bool, str] | None = None  # seq, verb, has_arg, status
        self._quit_done = False
        self._seq = 0
        self._secrets: list[tuple[bytes, bool]] = []  # echo forms (credentials.echo_forms)
        self._scan_auth: _Pending | None = None  # the last AUTH seen in SCAN mode
        self._out: list[Event] = []

    # ----------------------------------------------------------------- public API

    def receive_data(self, direction: Direction, data: bytes) -> list[Event]:
        """Feed bytes ``direction`` sent; ``b""`` means it closed.  Returns new events."""
        side = self._side(direction)
        out: list[Event] = []
        self._out = out
        if not isinstance(data, bytes):
            if not isinstance(data, (bytearray, memoryview)):
                raise ObserverError(f"data must be bytes, not {type(data).__name__}")
            data = bytes(data)
        if side.mode is Mode.CLOSED:
            if data:
                if self._held and direction is Direction.CLIENT:
                    self._release_held(as_secret=True)  # keep stream order
                self._anomaly_once(side, AnomalyKind.DATA_AFTER_CLOSE, None, "bytes after EOF")
                self._emit_raw(Opaque, side, data)
            return out
        if side.head is not None:
            self._sniff(side, data)
        if not data:
            self._close(side)
        else:
            self._feed(side, side.buf + data if side.buf else data)
        return out

    def _sniff(self, side: _Side, data: bytes) -> None:
        """A TLS record where POP3 lines were due: a client or server on the wrong kind of port.

        Decided on the stream's first three bytes whatever the segmentation (none of them
        can end a line when they are a TLS record header).
        """
        head = (side.head or b"") + data[:3]
        if len(head) < 3 and data:
            side.head = head
            return
        side.head = None
        client = side.direction is Direction.CLIENT
        hint = first_bytes_hint(head, from_client=client, leg_tls=False)
        if hint is not None:
            self._anomaly(AnomalyKind.TLS_ON_PLAINTEXT, side.direction, None, hint)

    def start_tls(self, direction: Direction, *, decrypted: bool = True) -> list[Event]:
        """TLS starts on ``direction`` at its current offset (implicit TLS or after STLS).

        With ``decrypted`` the caller goes on feeding plaintext; without it (passthrough)
        the rest of that direction is opaque.
        """
        side = self._side(direction)
        out: list[Event] = []
        self._out = out
        side.head = None  # TLS from here on: what follows is not sniffed
        if side.buf:
            # RFC 2595 §4: bytes before the handshake that were not a whole line.
            self._injected(side, side.buf)
            side.buf = b""
        out.append(TlsStarted(direction, side.offset))
        if direction is Direction.SERVER:
            self.capabilities = None  # RFC 2595 §4: discard cached capabilities
        self._move(side, Trigger.TLS_DECRYPTED if decrypted else Trigger.TLS_PASSTHROUGH)
        return out

    def go_opaque(self, direction: Direction, reason: str) -> list[Event]:
        """Stop interpreting ``direction``; its later bytes become ``Opaque`` events."""
        side = self._side(direction)
        out: list[Event] = []
        self._out = out
        if side.buf:
            if direction is Direction.CLIENT and credentials.could_carry_credential(side.buf):
                self._secret(direction, side.offset, len(side.buf), SecretKind.SASL)
            self._emit_raw(Opaque, side, side.buf)
            side.buf = b""
        self._move(side, Trigger.OPAQUE_REQUESTED)
        self._anomaly(AnomalyKind.OPAQUE, direction, None, reason)
        return out

    def settled(self, direction: Direction) -> int:
        """Offset below which every event of ``direction`` (credential spans too) is final."""
        side = self._side(direction)
        if direction is Direction.CLIENT and self._held:
            return self._held[0][0]
        if side.buf and self._cannot_hold_secret(side):
            return side.offset + len(side.buf)  # a partial line that can hold no credential
        return side.offset

    def _cannot_hold_secret(self, side: _Side) -> bool:
        if side.mode is Mode.BODY:
            return True
        if side.mode is not Mode.LINES:
            return False
        if side.direction is Direction.SERVER:
            return not self._secrets and not self._auth_open
        if self._auth_open or self._stls_open or self._awaiting_response:
            return False
        return not credentials.could_carry_credential(side.buf)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    # ----------------------------------------------------------------- plumbing

    def _side(self, direction: Direction) -> _Side:
        if not isinstance(direction, Direction):
            raise ObserverError(f"direction must be a Direction, not {direction!r}")
        return self._client if direction is Direction.CLIENT else self._server

    def _emit_raw(
        self, cls: type[Opaque] | type[Injected] | type[LineTail], side: _Side, raw: bytes
    ) -> None:
        self._out.append(cls(side.direction, side.offset, raw))
        side.offset += len(raw)

    def _anomaly(
        self, kind: AnomalyKind, direction: Direction, seq: int | None, detail: str = ""
    ) -> None:
        self._out.append(Anomaly(kind, direction, seq, detail))

    def _anomaly_once(self, side: _Side, kind: AnomalyKind, seq: int | None, detail: str) -> None:
        """An anomaly that could repeat per ``receive_data`` call: report it once per side, so
        events do not depend on how the stream was segmented."""
        if kind not in side.reported:
            side.reported.add(kind)
            self._anomaly(kind, side.direction, seq, detail)

    def _secret(self, direction: Direction, offset: int, length: int, kind: SecretKind) -> None:
        if length > 0:
            self._out.append(Secret(direction, offset, length, kind))

    def _move(self, side: _Side, trigger: Trigger) -> None:
        """Change ``side``'s read mode as the table says (core/state.py)."""
        new = next_mode(side.direction, side.mode, trigger, side.after_tail)
        if trigger is _LINE_OVERLONG:
            side.after_tail = side.mode
        side.mode = new

    def _session(self, event: SessionEvent) -> None:
        """Change the session state as the table says (core/state.py)."""
        new = next_state(self.state, event)
        if new is not self.state:
            self._out.append(StateChanged(self.state, new))
            self.state = new

    def _feed(self, side: _Side, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            mode = side.mode
            if mode is Mode.BODY:
                pos = self._body_data(side, data, pos)
                if side.mode is Mode.BODY:
                    break  # the rest (at most ".\r") waits for more data
            elif mode is Mode.TAIL:
                pos = self._tail(side, data, pos)
                if side.mode is Mode.TAIL:
                    break  # the line goes on in the next data
            elif mode is Mode.SCAN:
                pos = self._scan(side, data, pos)
                if pos < end:
                    break  # an unfinished line waits for more data
            elif mode is Mode.OPAQUE:
                self._emit_raw(Opaque, side, data[pos:])
                pos = end
            elif mode is Mode.TLS_WAIT:
                # RFC 2595 §4: nothing may follow STLS's +OK before the handshake.
                self._injected(side, data[pos:])
                pos = end
            else:
                nl = data.find(b"\n", pos)
                # A line is over-long when no LF is among its first max_line + 1 octets; the
                # head is always max_line octets, so events do not depend on segmentation.
                if (nl < 0 and end - pos > self.max_line) or nl - pos > self.max_line:
                    self._overlong_head(side, data[pos : pos + self.max_line])
                    pos += self.max_line
                    continue
                if nl < 0:
                    break
                self._line(side, data[pos : nl + 1])
                pos = nl + 1
        side.buf = data[pos:]

    def _line(self, side: _Side, line: bytes) -> None:
        if not line.endswith(b"\r\n") and line.endswith(b"\n") and not side.bare_lf_seen:
            side.bare_lf_seen = True  # RFC 1939 §3: lines end in CRLF; reported once per side
            self._anomaly(AnomalyKind.BARE_LF, side.direction, None, "line ended by LF alone")
        if side.direction is Direction.CLIENT:
            self._client_line(side, line)
        elif side.mode is Mode.GREETING:
            self._greeting(side, line)
        else:
            self._server_line(side, line)

    def _injected(self, side: _Side, raw: bytes) -> None:
        """Plaintext sent where the TLS handshake was due: not forwarded (RFC 2595 §4)."""
        self._anomaly_once(side, AnomalyKind.PLAINTEXT_AFTER_STLS, None, INJECTED_DETAIL)
        self._emit_raw(Injected, side, raw)

    def _tail(self, side: _Side, data: bytes, pos: int) -> int:
        """TAIL mode: the rest of an over-long line, up to and including its LF."""
        nl = data.find(b"\n", pos)
        stop = len(data) if nl < 0 else nl + 1
        if nl < 0 and data.endswith(b"\r"):
            stop -= 1  # a CR that may end the line: decide with the next byte
        if stop > pos:
            self._tail_piece(side, data[pos:stop], nl >= 0)
        return stop

    def _tail_piece(self, side: _Side, piece: bytes, last: bool) -> None:
        if side.tail_secret is not None:
            content = len(values.strip_eol(piece)) if last else len(piece)
            self._secret(side.direction, side.offset, content, side.tail_secret)
        self._emit_raw(LineTail, side, piece)
        if last:
            self._move(side, Trigger.TAIL_ENDED)

    def _overlong_head(self, side: _Side, head: bytes) -> None:
        """Emit the head of a line with no LF in sight; the rest follows as ``LineTail``."""
        self._anomaly(
            AnomalyKind.LINE_TOO_LONG, side.direction, None, f"no line end within {len(head)}"
        )
        before = len(self._out)
        offset = side.offset
        if side.direction is Direction.CLIENT:
            if self._held:
                # The tail is emitted before the server decides held lines: release them now,
                # conservatively, so events stay in stream order.
                self._anomaly(
                    AnomalyKind.HELD_OVERFLOW, side.direction, None, "over-long undecided line"
                )
                self._release_held(as_secret=True)
            if self._undecided():
                self._emit_raw(Opaque, side, head)
                self._secret(side.direction, offset, len(head), SecretKind.SASL)
            else:
                self._client_line(side, head, overlong=True)
        elif side.mode is Mode.GREETING:
            self._greeting(side, head)
        else:
            self._server_line(side, head)
        if side.mode is Mode.BODY and isinstance(self._out[-1], BodyChunk):
            return  # resynchronised into a body, which takes lines of any length
        side.tail_secret = None
        for event in self._out[before:]:
            if isinstance(event, Secret) and event.offset + event.length >= offset + len(head) - 1:
                side.tail_secret = event.kind  # the secret runs on to the line's end
        self._move(side, Trigger.LINE_OVERLONG)

    # ----------------------------------------------------------------- lost sync

    def _scan(self, side: _Side, data: bytes, pos: int) -> int:
        """SCAN mode: pass lines on as opaque, still finding credentials and their echoes.

        The same framing as ``LINES`` (over-long heads of ``max_line``, a trailing CR held
        back) keeps events independent of segmentation.
        """
        end = len(data)
        while pos < end:
            nl = data.find(b"\n", pos)
            if side.scan_tail is not None:
                stop = end if nl < 0 else nl + 1
                if nl < 0 and data.endswith(b"\r"):
                    stop -= 1
                if stop > pos:
                    self._scan_tail_piece(side, data[pos:stop], nl >= 0)
                pos = stop
                if nl < 0:
                    break
            elif (nl < 0 and end - pos > self.max_line) or nl - pos > self.max_line:
                head = data[pos : pos + self.max_line]
                side.scan_tail = self._scan_line(side, head)
                pos += self.max_line
            elif nl < 0:
                break
            else:
                self._scan_line(side, data[pos : nl + 1])
                pos = nl + 1
        return pos

    def _scan_tail_piece(self, side: _Side, piece: bytes, last: bool) -> None:
        if side.scan_tail:
            content = len(values.strip_eol(piece)) if last else len(piece)
            self._secret(side.direction, side.offset, content, SecretKind.SASL)
        self._emit_raw(Opaque, side, piece)
        if last:
            side.scan_tail = None

    def _scan_line(self, side: _Side, line: bytes) -> bool:
        """One line (or over-long head) in SCAN mode; True when its rest is a credential."""
        body = values.strip_eol(line)
        offset = side.offset
        secret = False
        if side.direction is Direction.SERVER:
            for start, stop in credentials.find_echoes(body, self._secrets):
                self._secret(Direction.SERVER, offset + start, stop - start, SecretKind.ECHO)
        else:
            cmd = credentials.split_command(body)
            span = credentials.credential_span(cmd, body)
            if span is not None:
                start, stop, kind = span
                self._secret(Direction.CLIENT, offset + start, stop - start, kind)
                self._remember_secret(body[start:stop])
                secret = True
            if cmd.verb == "AUTH":
                mech, ir = credentials.mechanism_and_response(cmd)
                self._scan_auth = _Pending(0, "AUTH", True, mech, [] if ir is None else [ir])
                self._remember_decoded(self._scan_auth)
            elif cmd.verb not in KNOWN_VERBS and body:
                # Perhaps a SASL response (there is no reply to tell): a credential.
                self._secret(Direction.CLIENT, offset, len(body), SecretKind.SASL)
                self._remember_secret(body)
                if self._scan_auth is not None:
                    self._scan_auth.responses.append(body)
                    self._remember_decoded(self._scan_auth)
                secret = True
        self._emit_raw(Opaque, side, line)
        return secret

    # ----------------------------------------------------------------- client side

    def _undecided(self) -> bool:
        """Whether a client line arriving now is held: only the server's next reply can tell
        a SASL response, a command or plaintext injected before TLS apart
        (docs/protocol-notes.md §3.2).  True while earlier lines are held, or an AUTH or
        STLS is outstanding with no challenge waiting for its response."""
        return bool(self._held) or (
            bool(self._auth_open or self._stls_open) and not self._awaiting_response
        )

    def _client_line(self, side: _Side, line: bytes, overlong: bool = False) -> None:
        undecided = self._undecided()
        if undecided and self._server.mode is Mode.CLOSED:
            # No reply will ever decide this line's role: treat it as a credential.
            self._out.append(Opaque(side.direction, side.offset, line))
            self._secret(side.direction, side.offset, len(values.strip_eol(line)), SecretKind.SASL)
            side.offset += len(line)
            return
        if undecided:
            if self._held_bytes + len(line) > 65536 or len(self._held) >= 1000:
                self._anomaly(
                    AnomalyKind.HELD_OVERFLOW, side.direction, None, "too many undecided lines"
                )
                self._release_held(as_secret=True)
            else:
                self._held.append((side.offset, line))
                self._held_bytes += len(line)
                side.offset += len(line)
                return
        if self._awaiting_response and self._pending:
            self._sasl_response(side.offset, line)
        else:
            self._command(side.offset, line, overlong)
        side.offset += len(line)

    def _command(self, offset: int, line: bytes, overlong: bool = False) -> None:
        body = values.strip_eol(line)
        # Servers split at a run of SP or TAB and fold the verb's case; Dovecot skips
        # repeated spaces (docs/protocol-notes.md §1.5): the argument starts after them.
        cmd = credentials.split_command(body)
        verb, arg_start, rest = cmd.verb, cmd.arg_start, cmd.rest
        has_arg = bool(rest.strip(credentials.BLANKS))
        self._seq += 1
        seq = self._seq
        masked = self._mask_credential(offset, cmd, body)
        args = values.decode_text(masked[arg_start:]) if has_arg else None
        if len(line) > MAX_COMMAND:
            overlong = True  # RFC 2449 §4: 255 octets including CRLF
            self._anomaly(
                AnomalyKind.COMMAND_TOO_LONG, Direction.CLIENT, seq, f"{len(line)} octets"
            )
        self._out.append(Command(Direction.CLIENT, offset, line, seq, verb, args, overlong))
        pending = _Pending(seq, verb, has_arg)
        if verb == "AUTH" and has_arg:
            self._open_auth(pending, cmd)
        elif verb == "STLS":
            self._stls_open += 1
        if self._quit_done:
            self._anomaly(AnomalyKind.COMMAND_AFTER_QUIT, Direction.CLIENT, seq, verb)
        self._push(pending)

    def _mask_credential(self, offset: int, cmd: credentials.CommandLine, body: bytes) -> bytes:
        """Report a command's credential as a ``Secret``; return the line with it masked."""
        # RFC 1939 §7: a password is the rest of the line and may hold blanks
        # (docs/protocol-notes.md §7).
        span = credentials.credential_span(cmd, body)
        if span is not None and span[2] is SecretKind.AUTH_IR:
            mech, ir = credentials.mechanism_and_response(cmd)
            if not sasl.client_data_is_secret(mech, 0, ir or b""):
                span = None  # a SCRAM client-first: user name and nonce, no credential
        if span is None:
            return body
        start, stop, kind = span
        self._secret(Direction.CLIENT, offset + start, stop - start, kind)
        self._remember_secret(body[start:stop])
        return body[:start] + FILLER_BYTE * (stop - start) + body[stop:]

    def _open_auth(self, pending: _Pending, cmd: credentials.CommandLine) -> None:
        """``AUTH mech [initial-response]``: a SASL exchange starts (RFC 5034 §4)."""
        pending.mechanism, ir = credentials.mechanism_and_response(cmd)
        if sasl.is_plus(pending.mechanism):
            binding = sasl.channel_binding(pending.mechanism) or ""
            self._anomaly(AnomalyKind.CHANNEL_BINDING, Direction.CLIENT, pending.seq, binding)
        if ir is not None:
            pending.responses.append(ir)
            self._maybe_identity(pending)
            self._remember_decoded(pending)
        self._auth_open += 1

    def _push(self, pending: _Pending) -> None:
        """Queue a command for its reply (RFC 2449 §6.6: order is the only key)."""
        self._pending.append(pending)
        if len(self._pending) > self.max_pending:
            self._anomaly(
                AnomalyKind.PIPELINE_OVERFLOW,
                Direction.CLIENT,
                pending.seq,
                f"more than {self.max_pending} commands outstanding",
            )
            self._pending.clear()
            # Redaction never switches off: both sides are still scanned line by line.
            self._move(self._client, Trigger.PIPELINE_OVERFLOW)
            self._move(self._server, Trigger.PIPELINE_OVERFLOW)

    def _sasl_response(self, offset: int, line: bytes) -> None:
        head = self._pending[0]
        body = values.strip_eol(line)
        cancel = body == b"*"
        if not cancel and sasl.client_data_is_secret(head.mechanism, len(head.responses), body):
            self._secret(Direction.CLIENT, offset, len(body), SecretKind.SASL)
            self._remember_secret(body)
        head.responses.append(body)
        self._awaiting_response = False
        self._out.append(SaslResponse(Direction.CLIENT, offset, line, head.seq, cancel))
        self._maybe_identity(head)
        self._remember_decoded(head)

    def _maybe_identity(self, pending: _Pending) -> None:
        mech = pending.mechanism
        if pending.identity_done or mech is None:
            return
        if mech not in SASL_IDENTITY_MECHANISMS and not sasl.is_scram(mech):
            return
        found = sasl.identity(mech, pending.responses)
        if found is not None:
            pending.identity_done = True
            self._out.append(AuthIdentity(pending.seq, mech, found[0], found[1]))
            binding = sasl.channel_binding(None, values.b64decode(pending.responses[0]))
            if binding is not None and not sasl.is_plus(mech):
                self._anomaly(AnomalyKind.CHANNEL_BINDING, Direction.CLIENT, pending.seq, binding)

    def _remember_secret(self, token: bytes) -> None:
        """Keep the forms in which the server may echo a credential (the latest 64)."""
        forms = [f for f in credentials.echo_forms(token) if f not in self._secrets]
        if forms:
            self._secrets.extend(forms)
            del self._secrets[:-64]

    def _remember_decoded(self, pending: _Pending) -> None:
        for value in credentials.decoded_secrets(pending.mechanism, pending.responses):
            self._remember_secret(value)

    def _release_held(self, *, injected: bool = False, as_secret: bool = False) -> None:
        """Decide the role of held client lines, in arrival order (docs/protocol-notes.md §3.2)."""
        held, self._held, self._held_bytes = self._held, [], 0
        if not held:
            return
        for i, (offset, line) in enumerate(held):
            if injected:
                self._out.append(Injected(Direction.CLIENT, offset, line))
            elif as_secret:
                self._out.append(Opaque(Direction.CLIENT, offset, line))
                self._secret(Direction.CLIENT, offset, len(line), SecretKind.SASL)
            elif self._awaiting_response and self._pending:
                self._sasl_response(offset, line)
            elif self._undecided():
                self._held = held[i:]  # another AUTH/STLS is outstanding: keep waiting
                self._held_bytes = sum(len(x[1]) for x in self._held)
                return
            else:
                self._command(offset, line)
        if injected:
            self._anomaly_once(
                self._client, AnomalyKind.PLAINTEXT_AFTER_STLS, None, INJECTED_DETAIL
            )

    # ----------------------------------------------------------------- server side

    def _greeting(self, side: _Side, line: bytes) -> None:
        body = values.strip_eol(line)
        status, odd, rest = values.classify_status(body)
        code, text = values.split_code(rest)
        if status is None or status == values.CONT:
            self._anomaly(
                AnomalyKind.BAD_GREETING, Direction.SERVER, None, values.decode_text(body[:80])
            )
        elif odd:
            self._anomaly(odd, Direction.SERVER, None, values.decode_text(body[:16]))
        if len(line) > MAX_STATUS:
            self._anomaly(
                AnomalyKind.STATUS_TOO_LONG, Direction.SERVER, None, f"{len(line)} octets"
            )
        stamp = values.apop_timestamp(body)
        self._out.append(
            Greeting(
                Direction.SERVER,
                side.offset,
                line,
                status or values.decode_text(body.partition(b" ")[0]),
                code,
                text,
                stamp,
            )
        )
        side.offset += len(line)
        self._move(side, Trigger.GREETING_READ)

    def _mask_echo(self, side: _Side, body: bytes) -> bytes:
        """Mask a server line's echo of a credential (docs/protocol-notes.md §7, Dovecot's %s)."""
        if not self._secrets:
            return body
        masked: bytearray | None = None
        for start, stop in credentials.find_echoes(body, self._secrets):
            masked = masked if masked is not None else bytearray(body)
            masked[start:stop] = FILLER_BYTE * (stop - start)
            self._secret(Direction.SERVER, side.offset + start, stop - start, SecretKind.ECHO)
        return body if masked is None else bytes(masked)

    def _server_line(self, side: _Side, line: bytes) -> None:
        """A line where a status line is due: the head of the FIFO says what it answers."""
        body = self._mask_echo(side, values.strip_eol(line))
        status, odd, rest = values.classify_status(body)
        if status is None and self._resync_into_body(side, line):
            return
        head = self._pending[0] if self._pending else None
        if head is None or status is None:
            self._unsolicited(side, line, body, status, rest, head)
            return
        if odd:
            self._anomaly(odd, Direction.SERVER, head.seq, values.decode_text(body[:16]))
        if head.mechanism is not None and status == values.CONT:
            self._challenge(side, line, rest, head)
        else:
            self._reply(side, line, rest, head, status)

    def _unsolicited(
        self,
        side: _Side,
        line: bytes,
        body: bytes,
        status: str | None,
        rest: bytes,
        head: _Pending | None,
    ) -> None:
        """A server line that answers nothing: no command pending, or not a status line."""
        code, text = values.split_code(rest) if status else (None, values.decode_text(body))
        if self._quit_done:
            self._anomaly(AnomalyKind.DATA_AFTER_QUIT, Direction.SERVER, None, text[:80])
        elif head is None:
            self._anomaly(AnomalyKind.UNSOLICITED, Direction.SERVER, None, text[:80])
        else:
            self._anomaly(AnomalyKind.UNEXPECTED_LINE, Direction.SERVER, head.seq, text[:80])
        self._out.append(Unsolicited(Direction.SERVER, side.offset, line, status, code, text))
        side.offset += len(line)

    def _reply(self, side: _Side, line: bytes, rest: bytes, head: _Pending, status: str) -> None:
        """The status line answering ``head``; a body follows when ``multiline`` (RFC 1939 §3)."""
        # RFC 5034 §4: SASL exchanges are exempt from line limits.
        overlong = len(line) > MAX_STATUS and head.mechanism is None
        if overlong:
            self._anomaly(
                AnomalyKind.STATUS_TOO_LONG, Direction.SERVER, head.seq, f"{len(line)} octets"
            )
        code, text = values.split_code(rest)
        multiline = status == values.OK and (
            head.verb in ML_ON_OK or (head.verb in ML_ON_OK_IF_NO_ARG and not head.has_arg)
        )
        if status == values.CONT:
            self._anomaly(
                AnomalyKind.CONTINUATION_OUTSIDE_AUTH, Direction.SERVER, head.seq, head.verb
            )
        value: tuple[object, ...] | None = None
        if status == values.OK and head.verb == "STAT":
            value = values.parse_drop_listing(text)
        elif status == values.OK and head.verb in ("LIST", "UIDL") and head.has_arg:
            value = values.single_listing(head.verb, text)
        self._out.append(
            Reply(
                Direction.SERVER,
                side.offset,
                line,
                head.seq,
                head.verb,
                status,
                code,
                text,
                multiline,
                value,
                overlong,
            )
        )
        side.offset += len(line)
        self._pending.popleft()
        self._last = (head.seq, head.verb, head.has_arg, status)
        self._after_reply(side, head, status)
        if multiline:
            self._open_body(side, head.seq, head.verb)

    def _challenge(self, side: _Side, line: bytes, rest: bytes, head: _Pending) -> None:
        data = values.b64decode(rest.strip()) if rest.strip() else b""
        if sasl.server_data_is_secret(head.mechanism, data):
            # RFC 5802 §9: the server signature lets a dictionary attack test passwords.
            start = 2 + len(rest) - len(rest.lstrip())
            self._secret(Direction.SERVER, side.offset + start, len(rest.strip()), SecretKind.SASL)
        self._out.append(SaslChallenge(Direction.SERVER, side.offset, line, head.seq, data))
        side.offset += len(line)
        if self._awaiting_response:
            self._anomaly(AnomalyKind.CHALLENGE_WITHOUT_RESPONSE, Direction.SERVER, head.seq)
        self._awaiting_response = True
        if self._held:
            first, self._held = self._held[0], self._held[1:]
            self._held_bytes -= len(first[1])
            self._sasl_response(*first)

    def _after_reply(self, side: _Side, head: _Pending, status: str) -> None:
        ok = status == values.OK
        if head.mechanism is not None:
            self._auth_open -= 1
            self._awaiting_response = False
        if head.verb == "STLS":
            self._stls_open -= 1
            if ok:
                # RFC 2595 §4: TLS begins right after this line's CRLF, on both sides.
                self._move(side, Trigger.STLS_ACCEPTED)
                self._move(self._client, Trigger.STLS_ACCEPTED)
                self._release_held(injected=True)
                return
        event = OK_REPLY_EVENTS.get((head.verb, head.has_arg)) if ok else None
        if event is not None:
            self._session(event)
            if event is SessionEvent.QUIT_ACCEPTED:
                self._quit_done = True
        if self._held and not self._auth_open and not self._stls_open:
            self._release_held()

    def _resync_into_body(self, side: _Side, line: bytes) -> bool:
        """Listing lines after a single-line +OK to ``LIST n``/``UIDL n`` or an unknown verb mean
        the server sent a body after all: read it until the terminator (protocol-notes §4)."""
        last = self._last
        if last is None or last[3] != values.OK or self._body is not None:
            return False
        seq, verb, has_arg, _ = last
        if not ((verb in ("LIST", "UIDL") and has_arg) or verb not in KNOWN_VERBS):
            return False
        if self._pending and self._pending[0].seq != seq + 1:
            return False
        self._anomaly(AnomalyKind.MULTILINE_REPLY_TO_SINGLE, Direction.SERVER, seq, verb)
        self._last = None
        self._open_body(side, seq, verb)
        self._feed(side, line)  # re-read this line as body data
        if side.buf:  # a lone "." at close: body data after all
            rest, side.buf = side.buf, b""
            assert self._body is not None
            self._emit_body(side, self._body, *self._body.take_rest(rest))
        return True

    def _open_body(self, side: _Side, seq: int, verb: str) -> None:
        listing: list[tuple[str, ...]] | None = [] if verb in self.listings else None
        self._body = Body(seq, verb, listing=listing, count_lines=self.count_lines)
        self._move(side, Trigger.BODY_OPENED)

    # ----------------------------------------------------------------- bodies

    def _body_data(self, side: _Side, data: bytes, pos: int) -> int:
        """Consume body bytes from ``pos``; return where parsing stopped (RFC 1939 §3)."""
        body = self._body
        assert body is not None
        if not side.bare_lf_seen:
            # Cheap check of the first and last line end; a bare-LF body switches the search
            # to "\n." so that its terminator is still found.
            first, last = data.find(b"\n", pos), data.rfind(b"\n", pos)
            if (first > pos and data[first - 1] != 13) or (last > pos and data[last - 1] != 13):
                side.bare_lf_seen = True
                self._anomaly(
                    AnomalyKind.BARE_LF, side.direction, body.seq, "body line ended by LF alone"
                )
        stop, pieces, terminator = body.scan(data, pos, bare_lf=side.bare_lf_seen)
        for raw, unstuffed in pieces:
            self._emit_body(side, body, raw, unstuffed)
        if terminator is not None:
            self._end_body(side, body, terminator, truncated=False)
        return stop

    def _emit_body(self, side: _Side, body: Body, raw: bytes, data: bytes) -> None:
        self._out.append(BodyChunk(side.direction, side.offset, raw, body.seq, data))
        side.offset += len(raw)

    def _end_body(self, side: _Side, body: Body, raw: bytes, *, truncated: bool) -> None:
        if body.unstuffed_dots:
            self._anomaly(
                AnomalyKind.UNSTUFFED_DOT,
                side.direction,
                body.seq,
                f"{body.unstuffed_dots} body lines start with an unstuffed '.'",
            )
        if truncated:
            self._anomaly(AnomalyKind.TRUNCATED_BODY, side.direction, body.seq, "closed before '.'")
        listing = body.finish()
        if body.verb == "CAPA" and listing is not None:
            self.capabilities = listing
        self._out.append(
            BodyEnd(
                side.direction,
                side.offset,
                raw,
                body.seq,
                body.lines,
                body.octets,
                truncated,
                listing,
            )
        )
        side.offset += len(raw)
        self._body = None
        self._move(side, Trigger.BODY_ENDED)

    # ----------------------------------------------------------------- close

    def _close(self, side: _Side) -> None:
        if side.buf:
            rest, side.buf = side.buf, b""
            self._flush(side, rest)
        if side.mode is Mode.BODY and self._body is not None:
            self._end_body(side, self._body, b"", truncated=True)
        if side.direction is Direction.SERVER:
            self._server_gone()
        self._move(side, Trigger.EOF)
        self._out.append(ConnectionClosed(side.direction, side.offset))

    def _flush(self, side: _Side, rest: bytes) -> None:
        """The bytes a close left unframed: a partial line or the last bytes of a body."""
        if side.mode is Mode.BODY:
            assert self._body is not None
            self._emit_body(side, self._body, *self._body.take_rest(rest))
        elif side.mode in (Mode.LINES, Mode.GREETING):
            self._anomaly(
                AnomalyKind.UNTERMINATED_LINE, side.direction, None, f"{len(rest)} octets"
            )
            self._line(side, rest)
        elif side.mode is Mode.TAIL:
            self._tail_piece(side, rest, True)
        elif side.mode is Mode.SCAN:
            if side.scan_tail is not None:
                self._scan_tail_piece(side, rest, True)
            else:
                self._scan_line(side, rest)
        else:
            self._feed(side, rest)
            side.buf = b""

    def _server_gone(self) -> None:
        """The server closed: what it left unanswered gets no reply."""
        auth_open = self._auth_open
        if self._pending:
            head = self._pending[0]
            # docs/protocol-notes.md §5: a close ends the head command without a reply.
            self._anomaly(
                AnomalyKind.NO_REPLY,
                Direction.SERVER,
                head.seq,
                f"{len(self._pending)} command(s) unanswered at close",
            )
            self._pending.clear()
            self._auth_open = self._stls_open = 0
            self._awaiting_response = False
        if self._held:
            # Lines sent during an AUTH the server never finished: their role stays
            # unknown, so treat them as credentials (docs/protocol-notes.md §7).
            self._release_held(as_secret=bool(auth_open))
