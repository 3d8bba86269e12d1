"""Fault rules in the live proxy's server-to-client path (docs/faults.md, "In popproxy record").

The server's bytes are shaped reply by reply at the observer's positions: a reply under a
rule goes through a ``ReplyShaper``; withheld bytes are recorded as ``drop`` records, every
fault as an ``event`` record of kind ``fault``, popproxy's own lines as its own data.
Bytes the observer has not placed yet (an unfinished line) wait for the next read.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from popproxy.core.events import (
    BodyEnd,
    Command,
    Direction,
    Event,
    Greeting,
    RawEvent,
    Reply,
    State,
    StateChanged,
)
from popproxy.faults.matcher import Injection, SessionFaults
from popproxy.faults.rules import Advertise, Answer, Rule
from popproxy.faults.shape import (
    Close,
    Forward,
    Hang,
    Originate,
    Pause,
    ReplyShaper,
    Watch,
    Withhold,
)
from popproxy.proxy.tap import Tap

S = Direction.SERVER
GREETING_KEY = -1


def proxy_unsupported(rule: Rule) -> str | None:
    """Why ``popproxy record`` cannot apply this rule (None: it can)."""
    if isinstance(rule.action, Advertise):
        return "advertising a SASL mechanism"
    return None


@dataclass
class _Open:
    shaper: ReplyShaper
    multiline: bool


class ProxyFaults:
    """One proxy session's faults: decides per command, shapes the server's replies."""

    def __init__(
        self, faults: SessionFaults, tap: Tap, note: Callable[[str], None] | None = None
    ) -> None:
        self.faults = faults
        self.tap = tap
        self.note = note  # the live view's one-line notices
        self.state = State.AUTHORIZATION
        self.pending = b""  # server bytes not yet placed by the observer
        self.pending_offset = 0
        self.client_pending = b""  # an unfinished client line: it may be a faulted command
        self.client_offset = 0
        self.stalled = False
        self.ended: tuple[str, str] | None = None  # (how, why) once a fault ends the session
        self.rst = False
        self.watch: Watch | None = None
        self.watch_armed = trio.Event()
        self._injections: dict[int, Injection] = {}
        self._open: dict[int, _Open] = {}
        greeting = faults.greeting()
        if greeting is not None:
            self._injections[GREETING_KEY] = greeting

    def observe(self, events: list[Event]) -> None:
        """Every chunk's events, in arrival order: note which commands a rule selects."""
        for event in events:
            if isinstance(event, StateChanged):
                self.state = event.new
            elif isinstance(event, Command):
                user = self.tap.builder.session.user
                inj = self.faults.command(event.verb, event.args, self.state, user)
                if inj is not None:
                    self._injections[event.seq] = inj

    async def server_chunk(
        self,
        data: bytes,
        events: list[Event],
        start: int,
        send: Callable[[bytes], Awaitable[None]],
        now: Callable[[], float],
    ) -> None:
        """Relay one server chunk, shaped where a rule applies."""
        if not self.busy():
            await send(data)  # no rule selected anything under way: relay as it is
            return
        if not self.pending:
            self.pending_offset = start
        buf, base = self.pending + data, self.pending_offset
        pos = 0  # bytes of buf handled
        placed = [e for e in events if isinstance(e, RawEvent) and e.direction is S]
        if self.tap.broken is not None:
            placed = []  # no more events: relay the rest as it is
            await self._emit(Forward(buf), base, send, now)
            self.pending = b""
            return
        for event in placed:
            lo = max(event.offset - base, pos)
            hi = event.offset + len(event.raw) - base
            if hi <= pos:
                continue
            if lo > pos:  # bytes no event claims: relay them as they are
                await self._pass(buf[pos:lo], base + pos, send, now)
            pos = lo
            await self._piece(event, buf[lo:hi], base + lo, send, now)
            pos = hi
            if self.ended is not None:
                rest = buf[pos:]
                if rest:
                    self.tap.drop(S, base + pos, len(rest), "after a fault ended the session")
                self.pending = b""
                return
        self.pending = buf[pos:]
        self.pending_offset = base + pos

    def busy(self) -> bool:
        """Whether server bytes must be placed by the observer before they are relayed:
        a rule selected a command whose reply is not through, or bytes are held."""
        return bool(self._injections or self._open or self.stalled or self.pending)

    def wants_client(self) -> bool:
        """Whether client chunks must be parsed before they are relayed (answer rules)."""
        return bool(self.client_pending) or any(
            isinstance(r.action, Answer) for r in self.faults.faults.rules
        )

    async def client_chunk(
        self,
        data: bytes,
        events: list[Event],
        start: int,
        forward: Callable[[bytes], Awaitable[None]],
        answer: Callable[[int, bytes], Awaitable[None]],
        now: Callable[[], float],
    ) -> None:
        """Relay one client chunk; a command a rule answers never reaches the server.

        Its bytes are recorded as dropped, and popproxy's answer goes to the client once
        the server has answered every command before it (RFC 2449 §6.6).
        """
        if not self.client_pending:
            self.client_offset = start
        buf, base = self.client_pending + data, self.client_offset
        pos = 0
        for event in events:
            if not isinstance(event, Command) or event.direction is not Direction.CLIENT:
                continue
            inj = self._injections.get(event.seq)
            if inj is None or not isinstance(inj.action, Answer):
                continue
            del self._injections[event.seq]
            lo = event.offset - base
            if lo < pos:  # relayed before the observer placed it (behind an AUTH)
                self.tap.event(now(), "fault-missed", detail=f"{inj.describe()}: already sent")
                continue
            if lo > pos:
                await forward(buf[pos:lo])
            pos = lo + len(event.raw)
            why = f"{inj.describe()}: answered by popproxy"
            self.tap.event(
                now(), "fault", rule=inj.rule.text, index=inj.index, detail=why, verb=inj.verb
            )
            self.tap.drop(Direction.CLIENT, event.offset, len(event.raw), why)
            self.say(f"{inj.describe()} on {inj.verb}")
            await answer(event.seq, inj.action.reply)
        rest = buf[pos:]
        line_end = rest.rfind(b"\n") + 1
        if self.tap.broken is not None:
            line_end = len(rest)
        if line_end:
            await forward(rest[:line_end])
        self.client_pending = rest[line_end:]
        self.client_offset = base + pos + line_end

    async def flush_client(self, forward: Callable[[bytes], Awaitable[None]]) -> None:
        """The client closed: an unfinished last line goes on as it is."""
        data, self.client_pending = self.client_pending, b""
        if data:
            await forward(data)

    async def flush(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """The server closed: what was waiting for its line end goes on as it is."""
        data, self.pending = self.pending, b""
        if data:
            await self._pass(data, self.pending_offset, send, lambda: 0.0)

    async def _pass(
        self,
        data: bytes,
        offset: int,
        send: Callable[[bytes], Awaitable[None]],
        now: Callable[[], float],
    ) -> None:
        if self.stalled:
            self.tap.drop(S, offset, len(data), "withheld: the server's replies are stalled")
        elif data:
            await send(data)

    async def _piece(
        self,
        event: RawEvent,
        data: bytes,
        offset: int,
        send: Callable[[bytes], Awaitable[None]],
        now: Callable[[], float],
    ) -> None:
        seq = GREETING_KEY if isinstance(event, Greeting) else getattr(event, "seq", None)
        inj = self._injections.get(seq) if seq is not None else None
        if inj is not None and isinstance(inj.action, Answer) and seq != GREETING_KEY:
            # The command went to the server after all (the observer placed it late):
            # its own reply stands.
            del self._injections[seq]  # type: ignore[arg-type]
            self.tap.event(now(), "fault-missed", detail=f"{inj.describe()}: already sent")
            inj = None
        if inj is None:
            await self._pass(data, offset, send, now)
            return
        entry = self._open.get(seq)  # type: ignore[arg-type]
        if entry is None:
            multiline = isinstance(event, Reply) and event.multiline
            shaper = ReplyShaper(inj, multiline=multiline)
            entry = self._open[seq] = _Open(shaper, multiline)  # type: ignore[index]
            self.tap.event(
                now(),
                "fault",
                rule=inj.rule.text,
                index=inj.index,
                detail=inj.describe(),
                verb=inj.verb,
            )
            self.say(f"{inj.describe()} on {inj.verb or 'the greeting'}")
            steps = shaper.begin()
        else:
            steps = []
        steps += entry.shaper.feed(data)
        done = isinstance(event, BodyEnd) or (
            isinstance(event, Reply | Greeting) and not entry.multiline
        )
        if done:
            steps += entry.shaper.finish()
            del self._open[seq]  # type: ignore[arg-type]
            self._injections.pop(seq, None)  # type: ignore[arg-type]
        at = offset
        for step in steps:
            if self.ended is not None and not isinstance(step, Withhold):
                continue  # after a cut, only the record of what was withheld
            at = await self._emit(step, at, send, now)

    async def _emit(
        self,
        step: object,
        at: int,
        send: Callable[[bytes], Awaitable[None]],
        now: Callable[[], float],
    ) -> int:
        if isinstance(step, Forward):
            await self._pass(step.data, at, send, now)
            return at + len(step.data)
        if isinstance(step, Withhold):
            self.tap.drop(S, at, len(step.data), step.why)
            return at + len(step.data)
        if isinstance(step, Originate):  # the greeting answered by popproxy
            self.tap.data(S, now(), step.data, proxy=True, why=step.why)
            await send(step.data)
        if isinstance(step, Pause):
            await trio.sleep(step.seconds)
        elif isinstance(step, Close):
            self.tap.event(now(), "fault-cut", detail=step.why, how=step.how, offset=at)
            self.say(step.why)
            self.rst = step.how == "rst"
            self.ended = ("fault", step.why)
        elif isinstance(step, Hang):
            self.tap.event(now(), "fault-stall", detail=step.why, offset=at)
            self.say(step.why)
            self.stalled = True
        elif isinstance(step, Watch):
            self.watch = step
            self.watch_armed.set()
        return at

    def say(self, text: str) -> None:
        if self.note is not None:
            self.note(text)


def reset(stream: trio.abc.Stream) -> None:
    """Make the coming close an RST (``SO_LINGER`` 0), through TLS layers too."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
