"""A fake POP3 server: plays recorded server sides, byte for byte, to live clients."""

from __future__ import annotations

import base64
import contextlib
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from rich.text import Text

from popproxy.core import credentials
from popproxy.faults.fake import FakeFaults, FaultEnded
from popproxy.faults.matcher import FaultSet, Injection
from popproxy.faults.rules import Answer
from popproxy.hints import Leg, client_silent_hint
from popproxy.netutil import STREAM_ERRORS, describe_error, open_listeners, stream_address
from popproxy.replay import auth
from popproxy.replay.matching import closest, find_any
from popproxy.replay.script import RecordedSession, Step
from popproxy.replay.served import PIECE
from popproxy.tls.ca import CertificateAuthority

if TYPE_CHECKING:
    from popproxy.replay.mailbox import Maildrop
    from popproxy.replay.served import ServedCapture
    from popproxy.replay.sources import MailboxSource

MODERN_SERVER_MECHANISMS = frozenset({"SCRAM-SHA-1", "SCRAM-SHA-256", "XOAUTH2", "OAUTHBEARER"})
MAX_LINE = 8192  # RFC 2449 §4 allows 255 octets a command; anything near this is garbage
SKIPPABLE = frozenset({"CAPA", "NOOP"})  # lenient mode: a client may skip or repeat these

Log = Callable[[Text], None]


@dataclass
class ServeConfig:
    """What ``popproxy serve`` (and the pytest plugin) plays, and how."""

    sessions: list[RecordedSession]
    listen: tuple[str, int] = ("127.0.0.1", 1110)
    password: str | None = None
    token: str | None = None  # XOAUTH2 / OAUTHBEARER: the only bearer token accepted
    persona: str | None = None  # mailbox: a provider's behaviour (popproxy/replay/personas.py)
    strict: bool = False
    tls: bool = False
    repeat: bool = False
    timeout: float = 60.0  # a silent client is dropped after this long
    ca: CertificateAuthority | None = None
    ca_dir: Path | None = None
    mailbox: MailboxSource | None = None  # set: a stateful mailbox instead of scripts
    persist: bool = False  # mailbox: deletions last across the sessions of one run
    mailbox_user: str | None = None  # mailbox: the only user name that may log in
    offer_stls: bool = False
    match: str = "ordered"  # recorded replay: "ordered" or "any" (order-free)
    faults: FaultSet | None = None  # docs/faults.md
    out_dir: Path | None = None  # set: one capture per served session (docs/replay.md)
    # Connections beyond the recorded sessions go here instead of getting -ERR.
    fallback: Callable[[trio.SocketStream], Awaitable[None]] | None = None

    def certificate_authority(self) -> CertificateAuthority:
        if self.ca is None:
            from popproxy.tls.ca import default_ca_dir

            self.ca = CertificateAuthority.load_or_create(self.ca_dir or default_ca_dir())
        return self.ca


@dataclass
class NearMiss:
    """A client command the recording did not expect, and the closest recorded one."""

    connection: int
    received: str
    closest: str | None
    differed: str

    def describe(self) -> str:
        where = f"closest recorded: {self.closest}" if self.closest else "nothing recorded left"
        return f"#{self.connection} got {self.received!r}: {self.differed} ({where})"


@dataclass
class ConnectionReport:
    """One client connection: which capture it got and how far it went."""

    number: int
    capture: Path | None
    peer: str
    played: set[int] = field(default_factory=set)
    unplayed: list[str] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    ended: str = "open"
    faults: list[str] = field(default_factory=list)  # each injected fault, what it did
    fault_ended: bool = False  # a fault cut or closed it


@dataclass
class ServeReport:
    """Everything the fake server saw; read it after the server stopped."""

    connections: list[ConnectionReport] = field(default_factory=list)
    unserved: list[Path] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def near_misses(self) -> list[NearMiss]:
        return [m for c in self.connections for m in c.near_misses]

    @property
    def faults(self) -> list[str]:
        """Every injected fault, ``#N`` naming its connection."""
        return [f"#{c.number} {line}" for c in self.connections for line in c.faults]

    def unplayed(self) -> list[str]:
        """Recorded exchanges no client asked for, and captures no client connected for.

        What follows a connection's first injected fault is left out: the client's reaction
        to the fault, not the recording, decides what it asks next.
        """
        out = [f"{c.capture}: {cmd}" for c in self.connections for cmd in c.unplayed]
        out.extend(
            f"{path}: the whole session (no client connected for it)" for path in self.unserved
        )
        return out


def _matches(step: Step, verb: str, args: str | None) -> bool:
    """Verb case-insensitive (RFC 1939 §3); credentials never compared here."""
    if step.verb != verb:
        return False
    if verb in ("PASS", "RPOP"):
        return True
    if verb == "APOP":
        return _word(args, 0) == _word(step.args, 0)
    if verb == "AUTH":
        return (step.mechanism or "") == _word(args, 0).upper()
    return (args or "").split() == (step.args or "").split()


class ClientGone(Exception):
    """The client closed, went silent past the timeout, or failed its TLS handshake."""


class ClientIO:
    """A fake server's side of one client connection: send, read a line, accept TLS.

    Shared by the recorded replay (``FakeSession``) and the mailbox
    (``replay/mailbox_server.py``); a subclass sets ``stream``, ``config``, ``report``.
    """

    stream: trio.abc.Stream
    config: ServeConfig
    report: ConnectionReport
    faults: FakeFaults | None = None
    capture: ServedCapture | None = None  # replay/served.py, with ``serve --out``
    _buf: bytes = b""

    async def run(self) -> None:
        """Serve the connection to its end (the report says how it ended)."""
        raise NotImplementedError

    def attach(self, capture: ServedCapture) -> None:
        """Record this connection in ``capture``, its faults included."""
        self.capture = capture
        if self.faults is not None:
            self.faults.ledger = capture

    async def _send(self, data: bytes, why: str | None = None) -> None:
        """Send the server's bytes (``why``: popproxy's own, a fault's) to the client."""
        capture = self.capture
        try:
            with trio.fail_after(self.config.timeout):
                if capture is None:
                    await self.stream.send_all(data)
                    return
                for start in range(0, len(data), PIECE):
                    piece = data[start : start + PIECE]
                    await capture.room()
                    capture.sent(piece, why)
                    await self.stream.send_all(piece)
        except (*STREAM_ERRORS, trio.TooSlowError):
            raise ClientGone from None

    async def _read_line(
        self,
        idle_limit: float | None = None,
        on_idle: Callable[[], Awaitable[None]] | None = None,
    ) -> bytes:
        """The next client line (with its LF, at most MAX_LINE octets), b"" at EOF.

        A client silent past ``--timeout`` ends the session; past ``idle_limit`` (a fault's,
        when shorter) ``on_idle`` runs first.
        """
        limit = self.config.timeout if idle_limit is None else idle_limit
        timeout = min(self.config.timeout, limit)
        capture = self.capture
        while b"\n" not in self._buf and len(self._buf) < MAX_LINE:
            try:
                if capture is not None:
                    await capture.room()
                with trio.fail_after(timeout):
                    data = bytes(await self.stream.receive_some(65536))
            except trio.TooSlowError:
                if on_idle is not None and limit <= self.config.timeout:
                    await on_idle()
                self.report.ended = f"idle for {self.config.timeout:g} s"
                raise ClientGone from None
            except STREAM_ERRORS:
                data = b""
            if capture is not None:
                capture.received(data)
            if not data:
                rest, self._buf = self._buf, b""
                if capture is not None:
                    capture.line_read(len(rest), len(rest))
                return rest
            self._buf += data
        end = self._buf.find(b"\n")
        end = MAX_LINE if end < 0 else end + 1
        if capture is not None:
            capture.line_read(len(self._buf), min(end, len(self._buf)))
        line, self._buf = self._buf[:end], self._buf[end:]
        return line

    def _discard_unread(self) -> bool:
        """RFC 2595 §4: client bytes after STLS's +OK are thrown away; whether there were."""
        if not self._buf:
            return False
        if self.capture is not None:
            self.capture.discarded(len(self._buf), "plaintext after STLS discarded")
        self._buf = b""
        return True

    async def _handshake(self) -> None:
        tls = await accept_tls(self.stream, self.config)
        if isinstance(tls, str):
            self.report.ended = tls
            raise ClientGone
        self.stream = tls
        if self.capture is not None:
            self.capture.started_tls(tls)


class FakeSession(ClientIO):
    """One client connection answered from one recorded session."""

    def __init__(
        self,
        config: ServeConfig,
        session: RecordedSession,
        stream: trio.abc.Stream,
        report: ConnectionReport,
        log: Log | None,
    ) -> None:
        self.config = config
        self.session = session
        self.steps = session.steps
        self.stream = stream
        self.report = report
        self.log = log
        self.cursor = 0
        self.skipped: set[int] = set()
        self.last_capa: bytes | None = None
        self._buf = b""
        self.faults: FakeFaults | None = None
        self._fault_cursor: int | None = None  # where the first fault struck
        if config.faults is not None:
            self.faults = FakeFaults(
                config.faults.session(report.number),
                lambda line: self._say(line, "pop.warning"),
                session.identity,
            )
            self.faults.log = report.faults
        self._shown_args: str | None = None

    # ------------------------------------------------------------------ IO

    async def _line(self) -> bytes:
        """The next client line (with its LF), b"" at EOF; a silent client ends the session."""
        watching = self.faults.watching if self.faults else None
        if watching is None:
            return await self._read_line()
        faults = self.faults
        assert faults is not None
        line = await self._read_line(watching.seconds, lambda: faults.watched(watching, self._send))
        faults.watching = None  # one wait only
        return line

    def _say(self, text: str, style: str = "pop.muted") -> None:
        if self.log is not None:
            tag = Text(f"#{self.report.number} ", style="pop.session")
            tag.append(text, style=style)
            self.log(tag)

    # ------------------------------------------------------------------ the session

    async def run(self) -> None:
        try:
            if self.config.tls:
                await self._handshake()
            greeting = self.session.greeting or b"+OK popproxy fake server ready\r\n"
            fault = self.faults.greeting() if self.faults else None
            await self._reply(None, None, greeting, fault)
            while True:
                line = await self._line()
                if not line:
                    self.report.ended = (
                        self.report.ended if self.report.ended != "open" else "client closed"
                    )
                    break
                if not await self._command(line):
                    break
        except ClientGone:
            if self.report.ended == "open":
                self.report.ended = "connection lost"
        except FaultEnded as end:
            self.report.ended, self.report.fault_ended = end.how, True
        finally:
            limit = len(self.steps) if self._fault_cursor is None else self._fault_cursor
            self.report.unplayed = [
                s.command_text
                for i, s in enumerate(self.steps[:limit])
                if i not in self.report.played and i not in self.skipped and s.verb not in SKIPPABLE
            ]

    async def _command(self, line: bytes) -> bool:
        """Answer one client line; False ends the session."""
        body = line.rstrip(b"\r\n")
        cmd = credentials.split_command(body)
        verb = cmd.verb
        args = _decode(cmd.rest).strip() or None
        # What the log and near-miss reports may show: the observer's masking rules.
        masked = credentials.mask_line(body)
        shown = _decode(masked).strip(" \t")
        self._shown_args = _decode(masked[cmd.arg_start :]).strip() or None
        if self.config.match == "any":
            index = find_any(self.steps, self.report.played, verb, args, _matches)
        else:
            index = self._find(verb, args)
        fault = self.faults.command(verb, args) if self.faults else None
        if fault is not None and isinstance(fault.action, Answer):
            return await self._answered(fault, index, verb)
        if index is None:
            if not self.config.strict and verb == "CAPA" and self._capa() is not None:
                capa = self._capa()
                assert capa is not None
                self._say(f"{shown} → recorded CAPA reply again (lenient)")
                await self._reply(verb, args, capa, fault)
                return True
            if not self.config.strict and verb == "NOOP":
                # RFC 1939 §5: NOOP just answers +OK
                await self._reply(verb, args, b"+OK\r\n", fault)
                return True
            return await self._mismatch(shown, verb, args, fault)
        for skipped in range(self.cursor, index):
            if self.steps[skipped].verb in SKIPPABLE:
                self.skipped.add(skipped)
        step = self.steps[index]
        self.cursor = index + 1
        if verb in ("PASS", "RPOP", "APOP") and not self._credentials_ok(step, verb, args):
            return await self._refuse_login(index, f"{shown} → wrong password")
        if verb == "AUTH":
            return await self._auth(step, index, args, shown, fault)
        self.report.played.add(index)
        self._say(f"{shown} → {_first_line(step.reply)}")
        if verb == "CAPA":
            self.last_capa = step.reply
        await self._reply(verb, args, step.reply, fault)
        if verb == "STLS" and step.reply.startswith(b"+OK"):
            if self._discard_unread():
                self._say("plaintext after STLS discarded (RFC 2595 §4)", "pop.warning")
            await self._handshake()
        return self._more(index)

    def _more(self, index: int) -> bool:
        """After the last recorded answer the server closes, as the recording did."""
        if self.config.match == "any":  # order-free: QUIT or the last unplayed exchange
            done = self.steps[index].verb == "QUIT" or len(self.report.played) == len(self.steps)
            if done:
                self.report.ended = "script finished"
            return not done
        if index == len(self.steps) - 1:
            self.report.ended = "script finished"
            return False
        return True

    def _find(self, verb: str, args: str | None) -> int | None:
        steps, cursor = self.steps, self.cursor
        if cursor < len(steps) and _matches(steps[cursor], verb, args):
            return cursor
        if self.config.strict:
            return None
        j = cursor
        while j < len(steps) and steps[j].verb in SKIPPABLE:
            j += 1  # lenient: the client skipped a recorded CAPA or NOOP
            if j < len(steps) and _matches(steps[j], verb, args):
                return j
        if verb == "QUIT":
            for k in range(cursor, len(steps)):
                if steps[k].verb == "QUIT":
                    return k  # an early QUIT: what it skipped stays unplayed
        return None

    def _capa(self) -> bytes | None:
        if self.last_capa is not None:
            return self.last_capa
        return next((s.reply for s in self.steps if s.verb == "CAPA"), None)

    async def _mismatch(
        self, shown: str, verb: str, args: str | None, fault: Injection | None = None
    ) -> bool:
        if self.config.match == "any":
            return await self._mismatch_any(shown, verb, args, fault)
        remaining = list(enumerate(self.steps))[self.cursor :]
        same = next((s for _, s in remaining if s.verb == verb), None)
        nxt = remaining[0][1] if remaining else None
        if same is not None:
            closest = same
            differed = (
                f"arguments differ: got {self._shown_args!r}, recorded {same.args!r}"
                if same is nxt
                else f"out of order: the next recorded command is "
                f"{nxt.command_text if nxt else 'none'}"
            )
        elif nxt is not None:
            closest, differed = nxt, f"command differs: expected {nxt.verb}"
        else:
            closest, differed = None, "the recording has no more commands"
        miss = NearMiss(
            self.report.number, shown, closest.command_text if closest else None, differed
        )
        self.report.near_misses.append(miss)
        self._say(f"near miss: {miss.describe()}", "pop.warning")
        expected = f" (next recorded: {nxt.command_text})" if nxt else ""
        line = f"-ERR popproxy serve: not in the recording{expected}\r\n".encode()
        await self._reply(verb, args, line, fault)
        if self.config.strict:
            self.report.ended = "mismatch (strict)"
            return False
        return True

    async def _mismatch_any(
        self, shown: str, verb: str, args: str | None, fault: Injection | None = None
    ) -> bool:
        """Order-free: no unplayed recorded exchange matches; report the closest, scored."""
        near = closest(self.steps, self.report.played, verb, args)
        again = any(_matches(s, verb, args) for s in self.steps)
        differed = "played already, once as recorded; " if again else ""
        if near:
            differed += "no unplayed recorded exchange matches; closest: " + "; ".join(
                c.describe() for c in near
            )
        else:
            left = [s.command_text for i, s in enumerate(self.steps) if i not in self.report.played]
            differed += "no unplayed recorded exchange is like it" + (
                f" (unplayed: {', '.join(left[:5])})" if left else ""
            )
        miss = NearMiss(
            self.report.number, shown, near[0].step.command_text if near else None, differed
        )
        self.report.near_misses.append(miss)
        self._say(f"near miss: {miss.describe()}", "pop.warning")
        line = b"-ERR popproxy serve: not in the recording (or played already)\r\n"
        await self._reply(verb, args, line, fault)
        if self.config.strict:
            self.report.ended = "mismatch (strict)"
            return False
        return True

    def _credentials_ok(self, step: Step, verb: str, args: str | None) -> bool:
        password = self.config.password
        if password is None:
            return True  # docs/replay.md: accept any credentials unless told the password
        if verb in ("PASS", "RPOP"):
            return (args or "") == password
        digest = _word(args, -1)
        return auth.check_apop(_timestamp(self.session.greeting), password, digest)

    async def _auth(
        self, step: Step, index: int, args: str | None, shown: str, fault: Injection | None
    ) -> bool:
        """Replay the recorded SASL exchange (RFC 5034 §4), checking the password if given."""
        mech = step.mechanism or ""
        if mech in MODERN_SERVER_MECHANISMS:
            return await self._auth_dialog(step, index, args, shown, fault)
        parts = (args or "").split(None, 1)
        responses = [parts[1].strip()] if len(parts) > 1 else []
        challenges: list[bytes] = []
        for kind, raw in step.sasl:
            if kind == "s":
                await self._send(raw)
                challenges.append(raw.rstrip(b"\r\n")[2:])
                continue
            line = (await self._line()).rstrip(b"\r\n").decode("utf-8", "replace")
            if line.strip() == "*":
                return await self._refuse_login(
                    index, f"{shown} cancelled by the client", cancelled=True
                )
            responses.append(line)
        password = self.config.password
        if password is not None and not _sasl_ok(mech, password, responses, challenges):
            return await self._refuse_login(index, f"{shown} → wrong password")
        return await self._accept_login(step, index, args, shown, fault)

    async def _refuse_login(self, index: int, said: str, *, cancelled: bool = False) -> bool:
        """A login that failed or was cancelled: the client may try again (RFC 1939 §7)."""
        self.cursor = index
        self._say(said, "pop.warning" if cancelled else "pop.err")
        if cancelled:
            await self._send(b"-ERR popproxy serve: authentication cancelled\r\n")
        else:
            await self._send(b"-ERR [AUTH] popproxy serve: authentication failed.\r\n")
        return not self.config.strict

    async def _accept_login(
        self, step: Step, index: int, args: str | None, shown: str, fault: Injection | None
    ) -> bool:
        self.report.played.add(index)
        self._say(f"{shown} → {_first_line(step.reply)}")
        await self._reply("AUTH", args, step.reply, fault)
        return self._more(index)

    async def _auth_dialog(
        self, step: Step, index: int, args: str | None, shown: str, fault: Injection | None
    ) -> bool:
        """SCRAM and OAuth answered afresh (nonces, signatures): replay/sasl_server.py."""
        from popproxy.replay import sasl_server

        parts = (args or "").split(None, 1)
        initial = parts[1].strip() if len(parts) > 1 else None
        recorded = [raw for kind, raw in step.sasl if kind == "s"]
        dialog = sasl_server.recorded_dialog(
            step.mechanism or "", initial, self.config.password, self.config.token, recorded
        )
        try:
            challenge = next(dialog)
            while True:
                await self._send(b"+ " + base64.b64encode(challenge) + b"\r\n")
                line = (await self._line()).rstrip(b"\r\n").decode("ascii", "replace").strip()
                if line == "*":
                    return await self._refuse_login(
                        index, f"{shown} cancelled by the client", cancelled=True
                    )
                challenge = dialog.send(line)
        except StopIteration as done:
            login = done.value
        if not login.ok:
            return await self._refuse_login(index, f"{shown} → refused: {login.why}")
        return await self._accept_login(step, index, args, shown, fault)

    # ------------------------------------------------------------------ faults (docs/faults.md)

    async def _reply(
        self, verb: str | None, args: str | None, reply: bytes, fault: Injection | None
    ) -> None:
        """Send a reply (or the greeting), shaped by ``fault`` when one applies."""
        if self.faults is None:
            await self._send(reply)
            return
        if fault is not None and self._fault_cursor is None:
            self._fault_cursor = self.cursor
        try:
            sent = await self.faults.send(
                fault, reply, self._send, lambda: self.stream, verb=verb, args=args
            )
        except FaultEnded:
            self._buf = b""
            raise
        if verb is not None:
            self.faults.replied(verb, sent)

    async def _answered(self, fault: Injection, index: int | None, verb: str) -> bool:
        """A fault answers instead of the recording; the recorded step counts as used."""
        assert self.faults is not None
        if index is not None:
            self.cursor = index + 1
            self.skipped.add(index)
        await self._reply(verb, None, b"", fault)
        if verb == "QUIT":
            self.report.ended = "QUIT answered by a fault"
            return False
        return True


async def accept_tls(stream: trio.abc.Stream, config: ServeConfig) -> trio.SSLStream[Any] | str:
    """TLS towards a client with popproxy's CA (pop3s, or after STLS); on failure the
    reason, with the flag that fixes it when it is known."""
    from popproxy.tls.contexts import server_context

    local = getattr(stream, "socket", None)
    local_ip = local.getsockname()[0] if local is not None else "127.0.0.1"
    ctx = server_context(
        config.certificate_authority(), default_host="localhost", local_ip=local_ip
    )
    tls = trio.SSLStream(stream, ctx, server_side=True, https_compatible=True)
    try:
        with trio.fail_after(config.timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        return f"TLS handshake failed: timed out (hint: {client_silent_hint('--tls')})"
    except (*STREAM_ERRORS, ssl.SSLError) as exc:
        return f"TLS handshake failed: {describe_error(exc, Leg.CLIENT, listen_flag='--tls')}"
    return tls


def _sasl_ok(mech: str, password: str, responses: list[str], challenges: list[bytes]) -> bool:
    if mech == "PLAIN":
        return bool(responses) and auth.check_plain(responses[0], password)
    if mech == "LOGIN":
        return len(responses) >= 2 and auth.check_login_password(responses[1], password)
    if mech == "CRAM-MD5":
        challenge = auth.b64(challenges[0].decode("ascii", "replace")) if challenges else None
        return (
            challenge is not None
            and bool(responses)
            and auth.check_cram_md5(challenge, responses[0], password)
        )
    return False  # a mechanism popproxy cannot verify: refuse rather than pretend


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def _word(text: str | None, index: int) -> str:
    """A word of an argument string, split at any blanks (docs/protocol-notes.md §1.5)."""
    words = (text or "").split()
    return words[index] if words else ""


def _timestamp(greeting: bytes | None) -> str | None:
    from popproxy.core.values import apop_timestamp

    return apop_timestamp(greeting) if greeting else None


def _first_line(data: bytes) -> str:
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "backslashreplace")[:100]


# ------------------------------------------------------------------ the listener


class FakeServer:
    """Hands recorded sessions to successive connections, in order (cycling with ``repeat``)."""

    def __init__(self, config: ServeConfig, log: Log | None = None) -> None:
        self.config = config
        self.log = log
        self.report = ServeReport(unserved=[s.path for s in config.sessions])
        self._next = 0
        self._count = 0
        self.maildrop: Maildrop | None = None
        if config.mailbox is not None:
            from popproxy.replay.mailbox import Maildrop

            self.maildrop = Maildrop(config.mailbox, persist=config.persist)

    def _take(self, *, peek: bool = False) -> RecordedSession | None:
        """The next recorded session (``peek``: without using it up)."""
        sessions = self.config.sessions
        index = self._next
        if index >= len(sessions):
            if not self.config.repeat or not sessions:
                return None
            index = 0
        session = sessions[index]
        if peek:
            return session
        self._next = index + 1
        with self.report.lock:
            if session.path in self.report.unserved:
                self.report.unserved.remove(session.path)
        return session

    async def handle(self, stream: trio.SocketStream) -> None:
        self._count += 1
        number = self._count
        peer = stream_address(stream, peer=True)
        if self.maildrop is not None:
            await self._serve_mailbox(number, peer, stream)
            return
        session = self._take(peek=True)
        if session is None and self.config.fallback is not None:
            await self.config.fallback(stream)  # e.g. record a new episode upstream
            return
        if session is None:
            self.report.refused += 1
            self._say(number, f"from {peer}: no recorded session left", "pop.error")
            await _refuse(stream, b"-ERR [SYS/TEMP] popproxy serve: no recorded session left\r\n")
            return
        opened, capture = await self._capture(number, peer, stream, session.path)
        if not opened:
            return
        self._take()
        report = ConnectionReport(number, session.path, peer)
        with self.report.lock:
            self.report.connections.append(report)
        self._say(number, f"from {peer}: playing {session.path}{_into(capture)}", "pop.session")
        fake = FakeSession(self.config, session, stream, report, self.log)
        await self._play(fake, capture)

    async def _serve_mailbox(self, number: int, peer: str, stream: trio.SocketStream) -> None:
        from popproxy.replay.mailbox_server import MailboxConnection

        assert self.maildrop is not None
        opened, capture = await self._capture(number, peer, stream, None)
        if not opened:
            return
        report = ConnectionReport(number, None, peer)
        with self.report.lock:
            self.report.connections.append(report)
        self._say(number, f"from {peer}: the mailbox{_into(capture)}", "pop.session")
        connection = MailboxConnection(self.config, self.maildrop, stream, report, self.log)
        if self.config.persona is not None:
            from popproxy.replay.personas import PERSONAS, hook_for

            connection.hook = hook_for(PERSONAS[self.config.persona], connection.session)
        await self._play(connection, capture)

    async def _capture(
        self, number: int, peer: str, stream: trio.SocketStream, played: Path | None
    ) -> tuple[bool, ServedCapture | None]:
        """With ``out_dir``, the session's capture; (False, None): it cannot be written, and
        the client was told so (save or stop, as in ``record``)."""
        folder = self.config.out_dir
        if folder is None:
            return True, None
        from popproxy.capture.recorder import CaptureUnavailable
        from popproxy.replay.served import ServedCapture

        try:
            return True, ServedCapture.create(self.config, folder, number, stream, played)
        except CaptureUnavailable as exc:
            self.report.refused += 1
            self._say(number, f"from {peer}: {exc.reason}", "pop.error")
            cause = exc.cause.encode("utf-8", "replace")
            await _refuse(
                stream, b"-ERR [SYS/TEMP] popproxy cannot record this session: %s\r\n" % cause
            )
            return False, None

    async def _play(self, connection: ClientIO, capture: ServedCapture | None) -> None:
        """Run one connection (and its capture's flusher) to its end; close it, log it."""
        report = connection.report
        try:
            if capture is None:
                await connection.run()
            else:
                connection.attach(capture)
                async with trio.open_nursery() as nursery:

                    def failed(reason: str) -> None:  # the disk failed: stop, as record does
                        report.ended = reason
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(capture.run, failed)
                    await connection.run()
                    nursery.cancel_scope.cancel()
        finally:
            cancelled = trio.current_effective_deadline() == float("-inf")
            await _close(connection.stream)
            problem = None
            if capture is not None:
                problem = capture.finish(report, cancelled=cancelled)
            left = (
                f", {len(report.unplayed)} recorded exchange(s) unplayed" if report.unplayed else ""
            )
            self._say(report.number, f"ended: {report.ended}{left}", "pop.muted")
            if problem is not None and problem != report.ended:
                self._say(
                    report.number, f"{capture.path if capture else ''}: {problem}", "pop.error"
                )

    def _say(self, number: int, text: str, style: str) -> None:
        if self.log:
            self.log(Text(f"#{number} {text}", style))


def _into(capture: ServedCapture | None) -> str:
    return f", recording to {capture.path}" if capture is not None else ""


async def _refuse(stream: trio.SocketStream, line: bytes) -> None:
    """One -ERR line to a client that cannot be served, then close."""
    with trio.move_on_after(2), contextlib.suppress(*STREAM_ERRORS):
        await stream.send_all(line)
    await _close(stream)


async def serve_replay(
    config: ServeConfig,
    log: Log | None = None,
    *,
    announce: bool = True,
    server: FakeServer | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and play until cancelled; prints ``listening on HOST:PORT`` like ``record``."""
    fake = server or FakeServer(config, log)
    listeners, addresses = await open_listeners(*config.listen, announce=announce)
    async with trio.open_nursery() as nursery:
        task_status.started(addresses)
        await trio.serve_listeners(partial(_handle, fake), listeners, handler_nursery=nursery)


async def _handle(fake: FakeServer, stream: trio.SocketStream) -> None:
    await fake.handle(stream)


async def _close(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(1), trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (*STREAM_ERRORS, trio.BusyResourceError):
            pass
