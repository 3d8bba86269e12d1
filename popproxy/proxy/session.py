"""One client connection: a thin pump that does the IO the relay controller asks for."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import trio

from popproxy.capture.format import SessionEnd
from popproxy.capture.recorder import MIN_ROOM, CaptureUnavailable, Recorder
from popproxy.core import Direction
from popproxy.hints import Leg as HintLeg
from popproxy.netutil import (
    STREAM_ERRORS,
    abort_on_close,
    close_quietly,
    describe_error,
    send_quietly,
    stream_address,
)
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.controller import (
    Controller,
    Cut,
    DataReceived,
    EndSession,
    EofReceived,
    Forward,
    ForwardEof,
    HoldReads,
    Input,
    Leg,
    Note,
    ObserverFailed,
    Parsed,
    RelayCommand,
    ResumeReads,
    Send,
    StartTls,
    Tick,
    TlsEstablished,
    TlsFailed,
    goes_to,
)
from popproxy.proxy.feed import Feed
from popproxy.proxy.legs import HandshakeFailed, first_cause, handshake
from popproxy.proxy.tap import Tap
from popproxy.proxy.turns import Turns, leg_of
from popproxy.proxy.view import SessionView

C, S = Direction.CLIENT, Direction.SERVER
CHUNK = 65536  # first read size; a pump that fills its reads grows them up to MAX_CHUNK
MAX_CHUNK = 256 << 10  # large reads amortise the per-chunk cost of parsing and recording
REFUSED = b"-ERR [SYS/TEMP] popproxy cannot record this session: %s\r\n"
NAMES = {Leg.CLIENT: "client", Leg.UPSTREAM: "server"}

_counter = itertools.count(1)


class _Abort(Exception):
    """Ends the session from inside a pump after ``Session.end`` recorded why."""


class Session:
    """Relays one connection byte for byte and records it; never lets the tap stall it."""

    def __init__(
        self,
        config: ProxyConfig,
        client: trio.abc.Stream,
        view: SessionView | None = None,
        connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        self.config = config
        # How to reach the upstream: TCP by default; tests pass in-memory streams.
        self._connect = connect or partial(_connect_tcp, *config.upstream)
        self.number = next(_counter)
        self.client: trio.abc.Stream = client
        self.upstream: trio.abc.Stream | None = None
        self.peer = stream_address(client, peer=True)
        self.local = stream_address(client, peer=False)
        self.view = view
        self.how: str | None = None
        self.error: str | None = None
        self.path: Path | None = None
        self.tap: Tap | None = None
        self.recorder: Recorder | None = None
        self.ctl = Controller(
            config.stls,
            client_tls=config.listen_tls,
            upstream_tls=config.upstream_tls,
            upstream_stls=config.upstream_stls,
            hide_plus=config.hide_plus,
            idle_timeout=config.idle_timeout,
            linger=config.linger,
            answer_timeout=config.connect_timeout,
            faults=None if config.faults is None else config.faults.session(),
        )
        self._timed = config.faults is not None  # fault pauses move the deadline
        self._t0 = trio.current_time()
        self._eof = {C: False, S: False}
        self._first_eof: str | None = None  # "client" or "server": who closed first
        self._cut = Cut.FIN
        self._scope: trio.CancelScope | None = None
        self._turns = Turns()  # each leg serves batches in the controller's order
        self.feed: Feed | None = None
        self._wake = float("inf")  # when the watchdog looks next
        self._reading = {Leg.CLIENT: trio.Event(), Leg.UPSTREAM: trio.Event()}
        self._poke = trio.Event()  # wakes the watchdog when a direction closes
        self._told_broken = False

    # ----------------------------------------------------------------- life cycle

    def now(self) -> float:
        return trio.current_time() - self._t0

    def end(self, how: str, error: str | None = None) -> None:
        """Record why the session ends (first reason wins) and stop it."""
        if self.how is None:
            self.how, self.error = how, error
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        try:
            self._open_capture()
        except CaptureUnavailable as exc:
            if self.view:
                self.view.failed(self.number, self.peer, exc.reason)
            with trio.move_on_after(2):
                await send_quietly(self.client, REFUSED % exc.cause.encode(errors="replace"))
            await close_quietly(self.client)
            return
        recorder = self.recorder
        assert recorder is not None
        if self.view:
            self.view.started(self.number, self.peer, self.config.upstream_text, self.path)
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                recorder.start(nursery, partial(self.end, "capture-error"))
                with contextlib.suppress(_Abort):
                    await self._connect_and_relay(nursery)
                nursery.cancel_scope.cancel()  # both directions are done: the session is over
        finally:
            if self.how is None and trio.current_effective_deadline() == float("-inf"):
                self.how = "proxy-shutdown"
            self._finish()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                for stream in (self.client, self.upstream):
                    if stream is not None:
                        if self._cut is Cut.RST:
                            abort_on_close(stream)
                        await close_quietly(stream)
            self.feed = None  # it calls back into the session: let both go by refcount

    def _open_capture(self) -> None:
        cfg = self.config
        started = datetime.now(UTC)
        name, header = cfg.capture_header(self.number, self.peer, self.local, started)
        path = cfg.out_dir / name
        self.recorder = Recorder.create(path, header, keep_secrets=cfg.keep_secrets)
        self.path = path
        sink = None
        if self.view is not None and self.view.detail:
            view, number = self.view, self.number
            sink = lambda items: view.items(number, items)  # noqa: E731
        self.tap = Tap(self.recorder.writer, sink, body_items=65536 if cfg.verbose else 0)
        self.feed = Feed(self.tap, self.now, self._notice)

    def _finish(self) -> None:
        """Close the observer's streams and write the end record, synchronously."""
        tap, recorder, feed = self.tap, self.recorder, self.feed
        assert tap is not None and recorder is not None and feed is not None
        feed.observe()  # chunks relayed (or received) just before the end
        t = self.now()
        for direction in (S, C):
            if not self._eof[direction]:
                # The peer did not close: popproxy ends this direction (a close is
                # attributed to whoever closed).
                tap.data(direction, t, b"", proxy=True, why=self.how or "session ended")
        session = tap.builder.session
        first = self._first_eof
        how = self.how or ("quit" if session.quit else f"{first}-closed" if first else "closed")
        if how in ("client-closed", "server-closed") and session.quit:
            how = "quit"
        self.error = recorder.failure() or self.error
        recorder.finish(SessionEnd.of(t, how, self.error, session, observer_error=tap.broken))
        self.error = self.error or recorder.failure()
        if self.view:
            self.view.ended(self.number, how, self.error, t, session)

    # ----------------------------------------------------------------- connecting

    async def _connect_and_relay(self, nursery: trio.Nursery) -> None:
        cfg = self.config
        assert self.tap is not None
        if cfg.listen_tls:
            await self._implicit_tls(Leg.CLIENT)
        try:
            with trio.fail_after(cfg.connect_timeout):
                stream: trio.abc.Stream = await self._connect()
        except (OSError, trio.TooSlowError) as exc:
            reason = (
                "timed out"
                if isinstance(exc, trio.TooSlowError)
                else describe_error(first_cause(exc), HintLeg.UPSTREAM)
            )
            await self._refuse(
                "upstream-error", f"cannot reach upstream {cfg.upstream_text}: {reason}"
            )
        self.upstream = stream
        self.tap.event(self.now(), "upstream-connected", addr=stream_address(stream, peer=True))
        if cfg.insecure:
            self.tap.event(
                self.now(), "insecure", detail="upstream certificate verification is OFF"
            )
        if cfg.upstream_tls:
            await self._implicit_tls(Leg.UPSTREAM)
        self._reading[Leg.CLIENT].set()
        self._reading[Leg.UPSTREAM].set()
        await self._execute(self.ctl.start())
        # One nursery per session (the caller's): the watchdog and the client's pump run
        # beside the upstream's pump, which runs here.
        client_done = trio.Event()
        nursery.start_soon(self._watchdog)
        nursery.start_soon(self._client_pump, client_done)
        await self._pump(Leg.UPSTREAM)
        await client_done.wait()

    async def _client_pump(self, done: trio.Event) -> None:
        try:
            await self._pump(Leg.CLIENT)
        finally:
            done.set()

    async def _implicit_tls(self, leg: Leg) -> None:
        stream = self.client if leg is Leg.CLIENT else self.upstream
        assert stream is not None and self.tap is not None
        try:
            tls, info = await handshake(self.config, leg, stream, self.local, "implicit")
        except HandshakeFailed as exc:
            if leg is Leg.CLIENT:
                self.end("client-tls-error", f"TLS handshake with the client failed: {exc}")
                raise _Abort from None
            # Never relay mail from an upstream whose certificate failed verification.
            await self._refuse("upstream-tls-error", f"TLS with upstream failed: {exc}")
        if leg is Leg.CLIENT:
            self.client = tls
        else:
            self.upstream = tls
        self.tap.start_tls(leg.sender, self.now(), info)

    async def _refuse(self, how: str, reason: str) -> None:
        """Tell the client in one POP3 line why there is no session, then stop."""
        self.end(how, reason)
        line = f"-ERR [SYS/TEMP] popproxy: {reason}\r\n".encode()
        assert self.feed is not None
        self.feed.own(S, line, reason)
        self.feed.observe()
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await send_quietly(self.client, line)
        raise _Abort

    # ----------------------------------------------------------------- the pump

    async def _pump(self, leg: Leg) -> None:
        recorder, ctl, feed = self.recorder, self.ctl, self.feed
        assert recorder is not None and feed is not None
        direction = leg.sender
        size = CHUNK
        with contextlib.suppress(_Abort):
            while True:
                reading = self._reading[leg]
                if not reading.is_set():
                    await reading.wait()
                    continue
                room = recorder.room()
                if room < MIN_ROOM:
                    await recorder.wait_for_room()  # bounded loss: the disk sets the pace
                    if recorder.error is not None:
                        return
                    continue
                src = self.client if leg is Leg.CLIENT else self.upstream
                assert src is not None
                try:
                    data = bytes(await src.receive_some(min(size, room)))
                except STREAM_ERRORS as exc:
                    self.end(f"{NAMES[leg]}-reset", describe_error(exc))
                    return
                t = self.now()
                if len(data) == size and size < MAX_CHUNK:
                    size = min(size * 4, MAX_CHUNK)
                if not data:
                    self._eof[direction] = True
                    self._first_eof = self._first_eof or NAMES[leg]
                    self._poke.set()
                    commands = ctl.handle(EofReceived(direction, t))
                    feed.record(commands)  # popproxy's last words go before the EOF
                    feed.received(direction, t, data)
                    await self._execute(commands, recorded=True)
                    return
                feed.received(direction, t, data)
                await self._execute(ctl.handle(DataReceived(direction, data, t)))
                recorder.changed()

    async def _execute(self, commands: list[RelayCommand], *, recorded: bool = False) -> None:
        """Do what the controller asked, then report what the observer made of it."""
        ctl, feed, tap = self.ctl, self.feed, self.tap
        assert feed is not None and tap is not None
        while True:
            first = commands[0] if len(commands) == 1 else None
            if isinstance(first, Forward):
                await self._forward(first)  # the hot path
            elif commands:
                if not recorded:
                    feed.record(commands)  # before any await: the record's order is the wire's
                recorded = False
                outcome = await self._run(commands)
                if outcome is not None:
                    await self._execute(ctl.handle(outcome))
            if self._timed and ctl.deadline < self._wake:
                self._poke.set()  # a fault's pause began: the watchdog ends it on time
            feed.observe()
            if tap.broken is not None and not self._told_broken:
                self._told_broken = True  # no more events will come: relay control lets go
                feed.forget()
                commands = ctl.handle(ObserverFailed(tap.broken))
                continue
            events = feed.take()
            if not events:
                return
            commands = ctl.handle(Parsed(events))
            if not commands and not feed.waiting:
                return  # the common case: the events changed nothing

    async def _run(self, commands: list[RelayCommand]) -> Input | None:
        """Execute one batch, each leg's commands in their turn; a handshake's outcome is
        returned, to be handled once the batch has let go of its legs."""
        turns = self._turns
        tickets: dict[Leg, int] = {}
        last: dict[Leg, int] = {}
        legs = [leg_of(command) for command in commands]
        for i, leg in enumerate(legs):
            if leg is not None:
                if leg not in tickets:
                    tickets[leg] = turns.take(leg)
                last[leg] = i
        outcome: Input | None = None
        try:
            for i, (command, leg) in enumerate(zip(commands, legs, strict=True)):
                if leg is not None:
                    await turns.wait(leg, tickets[leg])
                if isinstance(command, StartTls):
                    outcome = await self._start_tls(command.leg, command.mode)
                else:
                    await self._act(command)
                if leg is not None and last[leg] == i:
                    del tickets[leg]
                    turns.done(leg)
        finally:
            for leg in tickets:  # an abort: later batches must not wait for this one
                turns.done(leg)
        return outcome

    def _notice(self, note: Note) -> None:
        """The live view's one-line notice of a fault (docs/faults.md)."""
        notice = getattr(self.view, "notice", None)
        if notice is not None:
            verb = dict(note.fields).get("verb") if note.kind == "fault" else None
            on = f" on {verb}" if verb else " on the greeting" if note.kind == "fault" else ""
            notice(f"#{self.number} {note.detail}{on}", "pop.warning")

    async def _act(self, command: RelayCommand) -> None:
        if isinstance(command, Forward):
            await self._send(goes_to(command.direction), command.data)
        elif isinstance(command, Send):
            # popproxy's own bytes: a peer already gone shows up as its EOF or reset.
            await self._send(command.leg, command.data, quiet=True)
        elif isinstance(command, HoldReads):
            if self._reading[command.leg].is_set():
                self._reading[command.leg] = trio.Event()
        elif isinstance(command, ResumeReads):
            self._reading[command.leg].set()
        elif isinstance(command, ForwardEof):
            await self._half_close(command.direction)
        elif isinstance(command, EndSession):
            self._cut = command.cut
            self.end(command.how, command.error)
            raise _Abort

    async def _forward(self, command: Forward) -> None:
        """Relay a peer's bytes: a batch of one, in its leg's turn."""
        leg, turns = goes_to(command.direction), self._turns
        ticket = turns.take(leg)
        try:
            await turns.wait(leg, ticket)
            await self._send(leg, command.data)
        finally:
            turns.done(leg)

    async def _send(self, leg: Leg, data: bytes, *, quiet: bool = False) -> None:
        """Send on ``leg`` (the caller holds the leg's turn: an STLS upgrade swaps the
        stream under it)."""
        stream = self.client if leg is Leg.CLIENT else self.upstream
        assert stream is not None
        try:
            await stream.send_all(data)
        except STREAM_ERRORS as exc:
            if quiet:
                return
            self.end(f"{NAMES[leg]}-reset", describe_error(exc))
            raise _Abort from None

    async def _start_tls(self, leg: Leg, mode: str) -> TlsEstablished | TlsFailed:
        """The handshake a controller's ``StartTls`` asked for; its outcome to report."""
        stream = self.client if leg is Leg.CLIENT else self.upstream
        assert stream is not None and self.feed is not None
        try:
            tls, info = await handshake(self.config, leg, stream, self.local, mode)
        except HandshakeFailed as exc:
            return TlsFailed(leg, exc.reason)
        if leg is Leg.CLIENT:
            self.client = tls
        else:
            self.upstream = tls
        self.feed.tls(leg.sender, info, decrypted=True)
        return TlsEstablished(leg)

    async def _half_close(self, direction: Direction) -> None:
        """Pass an EOF on (RFC 1939 §6: the server closes after QUIT's reply)."""
        self._poke.set()
        dst = self.upstream if direction is C else self.client
        if isinstance(dst, trio.abc.HalfCloseableStream):
            with contextlib.suppress(*STREAM_ERRORS):
                await dst.send_eof()
        elif direction is S:
            # A TLS leg cannot half-close (trio.SSLStream has no send_eof).  The server is
            # done and its direction drained: close the client leg now (close_notify).
            self.end("server-closed")
        # A client EOF towards a TLS upstream: the controller's linger ends the session
        # once the server has been quiet for a while (it may still be answering).

    async def _watchdog(self) -> None:
        ctl = self.ctl
        while ctl.ended is None:
            self._wake = ctl.deadline
            remaining = self._wake - self.now()
            if remaining <= 0:
                with contextlib.suppress(_Abort):
                    await self._execute(ctl.handle(Tick(self.now())))
                await trio.sleep(0)  # a deadline the tick did not move cannot spin the loop
                continue
            with trio.move_on_after(min(remaining, 1.0)):
                await self._poke.wait()  # an EOF or a fault's pause moves the limit: look again
            self._poke = trio.Event()


async def _connect_tcp(host: str, port: int) -> trio.abc.Stream:
    """A TCP connection to the upstream.  An IP address is connected to at once (no
    resolver call, no happy-eyeballs nursery per session); a name goes through trio's."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
