"""One client connection: its upstream, two pumps, the STLS boundary, and its capture file."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from popproxy import __version__
from popproxy.capture import format as fmt
from popproxy.capture.writer import CaptureWriter, create_capture_file
from popproxy.core import Command, Direction, Event
from popproxy.hints import Leg, client_silent_hint
from popproxy.netutil import STREAM_ERRORS, describe_error, is_ip, stream_address
from popproxy.proxy import control
from popproxy.proxy.config import ProxyConfig, StlsMode
from popproxy.proxy.faults import ProxyFaults, reset
from popproxy.proxy.tap import Tap
from popproxy.proxy.view import SessionView
from popproxy.tls.ca import CAError
from popproxy.tls.contexts import describe_tls, server_context

C, S = Direction.CLIENT, Direction.SERVER
CHUNK = 65536  # first read size; a pump that fills its reads grows them up to MAX_CHUNK
MAX_CHUNK = 1 << 20  # large reads amortise the per-chunk cost of parsing and recording
FLUSH_INTERVAL = 0.05  # relayed bytes reach the file well within ~100 ms (crash safety)
FLUSH_SIZE = 1 << 20
SMALL_WRITE = 64 << 10  # smaller batches are written inline, larger ones in a worker thread
HIGH_WATER = 8 << 20  # released bytes the disk may lag behind before the pumps wait

_counter = itertools.count(1)
_server_contexts: dict[tuple[str, str | None, str | None], ssl.SSLContext] = {}


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
        self._connect = connect or partial(trio.open_tcp_stream, *config.upstream)
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
        self.faults: ProxyFaults | None = None  # fault rules (docs/faults.md)
        self._client_last = 0.0
        self._fd: int | None = None
        self._t0 = trio.current_time()
        self._last = self._t0
        self._eof = {C: False, S: False}
        self._first_eof: str | None = None  # "client" or "server": who closed first
        self._tls = {C: False, S: False}
        self._scope: trio.CancelScope | None = None
        self._dirty = trio.Event()  # records are waiting for the flusher
        self._wake = trio.Event()  # ... and enough of them to write at once
        self._space = trio.Event()  # the flusher wrote: pumps held back may go on
        self._to_client = trio.StrictFIFOLock()
        self._to_server = trio.StrictFIFOLock()
        self._stls_done: trio.Event | None = None
        self._replied = trio.Event()  # set after each server chunk reached the client
        self._poke = trio.Event()  # wakes the watchdog when a direction closes
        self._capa_seqs: set[int] = set()
        self._plus_seqs: dict[int, str] = {}  # CAPA and AUTH bodies open, for --hide-plus
        self._unfed: deque[tuple[Direction, float, bytes]] = deque()  # relayed, not parsed yet

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
        except OSError as exc:
            reason = f"cannot create a capture file in {self.config.out_dir}: {describe_error(exc)}"
            if self.view:
                self.view.failed(self.number, self.peer, reason)
            with trio.move_on_after(2):
                await _send_quietly(
                    self.client, b"-ERR [SYS/TEMP] popproxy cannot record this session\r\n"
                )
            await _close_quietly(self.client)
            return
        assert self.tap is not None
        if self.view:
            self.view.started(self.number, self.peer, self.config.upstream_text, self.path)
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._watchdog)
                if self.faults is not None:
                    nursery.start_soon(self._fault_watch, self.faults)
                with contextlib.suppress(_Abort):
                    await self._connect_and_relay()
                nursery.cancel_scope.cancel()
        finally:
            if self.how is None and trio.current_effective_deadline() == float("-inf"):
                self.how = "proxy-shutdown"
            self._finish()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                for stream in (self.client, self.upstream):
                    if stream is not None:
                        await _close_quietly(stream)

    def _open_capture(self) -> None:
        cfg = self.config
        started = datetime.now(UTC)
        name = f"{started:%Y%m%dT%H%M%S}.{started:%f}Z-{self.number:05d}{fmt.SUFFIX}"
        self.path = path = cfg.out_dir / name
        self._fd = create_capture_file(path)
        header: dict[str, Any] = {
            "popproxy": __version__,
            "start": started.isoformat().replace("+00:00", "Z"),
            "t0": time.time(),
            "session": self.number,
            "client": self.peer,
            "listen": self.local,
            "upstream": cfg.upstream_text,
            "keep_secrets": cfg.keep_secrets,
            "listen_tls": cfg.listen_tls,
            "upstream_tls": cfg.upstream_tls,
            "upstream_stls": cfg.upstream_stls,
            "stls": cfg.stls.value,
            "insecure": cfg.insecure,
            **({"hide_plus": True} if cfg.hide_plus else {}),
            **cfg.extra_header,
        }
        writer = CaptureWriter(header, keep_secrets=cfg.keep_secrets)
        try:
            fmt.write_all(self._fd, writer.take())  # the header at once: a capture from now on
        except OSError:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                path.unlink()  # an empty file would only fail to read later
            raise
        sink = None
        if self.view is not None and self.view.detail:
            view, number = self.view, self.number
            sink = lambda items: view.items(number, items)  # noqa: E731
        self.tap = Tap(writer, sink, body_items=65536 if cfg.verbose else 0)
        if cfg.faults is not None:
            notice = getattr(self.view, "notice", None)  # the live view shows each fault
            note = None
            if notice is not None:
                note = lambda text: notice(f"#{self.number} {text}", "pop.warning")  # noqa: E731
            self.faults = ProxyFaults(cfg.faults.session(), self.tap, note)

    def _finish(self) -> None:
        """Close the observer's streams and write the end record, synchronously."""
        tap = self.tap
        assert tap is not None and self._fd is not None
        self._observe()  # chunks relayed (or received) just before the end
        t = self.now()
        for direction in (S, C):
            if not self._eof[direction]:
                tap.data(direction, t, b"")
        session = tap.builder.session
        first = self._first_eof
        how = self.how or ("quit" if session.quit else f"{first}-closed" if first else "closed")
        if how in ("client-closed", "server-closed") and session.quit:
            how = "quit"
        stats = tap.writer.stats
        end: dict[str, Any] = {
            "r": fmt.END,
            "t": round(t, 6),
            "how": how,
            "error": self.error,
            "octets": {"c": tap.offsets[C], "s": tap.offsets[S]},
            "commands": session.commands,
            "user": session.user,
            "mechanism": session.mechanism,
            "anomalies": len(session.anomalies),
            "anomaly_kinds": _kinds(session.anomalies),
            "errors": session.errors,
            "verbs": session.verbs,
            "tls": tap.tls_legs,
            "redactions": stats.redactions,
            "observer_error": tap.broken,
        }
        if stats.late_redactions:
            end["late_redactions"] = stats.late_redactions
        tap.writer.flush_all()
        tap.writer.meta(end)
        tap.writer.flush_all()
        try:
            fmt.write_all(self._fd, tap.writer.take())
        except OSError as exc:
            self.error = self.error or f"capture write failed: {describe_error(exc)}"
        finally:
            os.close(self._fd)
        if self.view:
            self.view.ended(self.number, how, self.error, t, session)

    # ----------------------------------------------------------------- connecting

    async def _connect_and_relay(self) -> None:
        cfg = self.config
        assert self.tap is not None
        if cfg.listen_tls:
            self.client = await self._client_handshake(self.client, "implicit")
        try:
            with trio.fail_after(cfg.connect_timeout):
                stream: trio.abc.Stream = await self._connect()
        except (OSError, trio.TooSlowError) as exc:
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else describe_error(exc)
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
            self.upstream = await self._upstream_handshake(stream, "implicit")
        elif cfg.upstream_stls:
            try:
                await self._upstream_stls()
            except STREAM_ERRORS as exc:
                await self._refuse(
                    "upstream-error",
                    f"STLS with upstream failed: {describe_error(exc, Leg.UPSTREAM)}",
                )
        async with trio.open_nursery() as pumps:
            pumps.start_soon(self._pump, C)
            pumps.start_soon(self._pump, S)

    async def _refuse(self, how: str, reason: str) -> None:
        """Tell the client in one POP3 line why there is no session, then stop."""
        self.end(how, reason)
        line = f"-ERR [SYS/TEMP] popproxy: {reason}\r\n".encode()
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self._originate(line)
        raise _Abort

    async def _client_handshake(self, stream: trio.abc.Stream, mode: str) -> trio.abc.Stream:
        assert self.tap is not None
        try:
            # First use may create the CA (a key, files, a lock): off the event loop.
            ctx = await trio.to_thread.run_sync(_server_context, self.config, self.local)
        except (CAError, OSError, ssl.SSLError) as exc:
            self.end("client-tls-error", f"popproxy's CA is unusable: {exc}")
            raise _Abort from None
        tls = trio.SSLStream(stream, ctx, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(self.config.connect_timeout):
                await tls.do_handshake()
        except (*STREAM_ERRORS, trio.TooSlowError) as exc:
            reason = (
                f"timed out (hint: {client_silent_hint()})"
                if isinstance(exc, trio.TooSlowError)
                else describe_error(exc, Leg.CLIENT)
            )
            self.end("client-tls-error", f"TLS handshake with the client failed: {reason}")
            raise _Abort from None
        self._tls[C] = True
        self.tap.start_tls(C, self.now(), _tls_info(tls, "client", mode))
        return tls

    async def _upstream_handshake(self, stream: trio.abc.Stream, mode: str) -> trio.abc.Stream:
        cfg = self.config
        assert cfg.upstream_context is not None and self.tap is not None
        host = cfg.upstream[0]
        sni = None if is_ip(host) else host
        tls = trio.SSLStream(
            stream, cfg.upstream_context, server_hostname=sni or host, https_compatible=True
        )
        try:
            with trio.fail_after(cfg.connect_timeout):
                await tls.do_handshake()
        except (*STREAM_ERRORS, trio.TooSlowError) as exc:
            reason = (
                "timed out"
                if isinstance(exc, trio.TooSlowError)
                else describe_error(exc, Leg.UPSTREAM)
            )
            # Never relay mail from an upstream whose certificate failed verification.
            await self._refuse("upstream-tls-error", f"TLS with upstream failed: {reason}")
        self._tls[S] = True
        self.tap.start_tls(S, self.now(), _tls_info(tls, "upstream", mode))
        return tls

    async def _upstream_stls(self) -> None:
        """``--upstream-stls``: popproxy upgrades the upstream leg itself (RFC 2595 §4)."""
        assert self.upstream is not None and self.tap is not None
        greeting = await self._read_line(self.upstream)
        self.tap.data(S, self.now(), greeting)
        async with self._to_client:
            await self.client.send_all(greeting)
        self.tap.data(C, self.now(), b"STLS\r\n", proxy=True)
        await self.upstream.send_all(b"STLS\r\n")
        reply = await self._read_line(self.upstream)
        start = self.tap.offsets[S]
        events = self.tap.data(S, self.now(), reply)
        self.tap.drop(S, start, len(reply), "reply to popproxy's own STLS")
        answer = self.tap.stls_reply(events)
        if answer is None or answer.status != "+OK":
            await self._refuse("upstream-tls-error", "upstream refused STLS")
        self.upstream = await self._upstream_handshake(self.upstream, "stls")
        self.tap.start_tls(C, self.now(), {"leg": "client", "mode": "unchanged"})

    async def _read_line(self, stream: trio.abc.Stream, limit: int = 4096) -> bytes:
        buf = b""
        with trio.move_on_after(self.config.connect_timeout) as timeout:
            while b"\n" not in buf and len(buf) < limit:
                data = await stream.receive_some(limit)
                if not data:
                    break
                buf += data
        if timeout.cancelled_caught or not buf:
            await self._refuse("upstream-error", "upstream did not answer")
        return buf

    # ----------------------------------------------------------------- relaying

    async def _pump(self, direction: Direction) -> None:
        tap = self.tap
        assert tap is not None
        who = "client" if direction is C else "server"
        size = CHUNK
        try:
            while True:
                src = self.client if direction is C else self.upstream
                assert src is not None
                try:
                    data = bytes(await src.receive_some(size))
                except STREAM_ERRORS as exc:
                    self.end(f"{who}-reset", describe_error(exc))
                    return
                self._last = trio.current_time()
                if direction is C:
                    self._client_last = self._last
                if len(data) == size and size < MAX_CHUNK:
                    size *= 4
                self._unfed.append((direction, self.now(), data))
                if not data:
                    self._observe()
                    if self.faults is not None and direction is S:
                        await self.faults.flush(self._to_client_send)
                    elif self.faults is not None:
                        await self.faults.flush_client(partial(self._send, C))
                    self._eof[direction] = True
                    self._first_eof = self._first_eof or who
                    await self._half_close(direction)
                    return
                if self._needs_control(direction, data):
                    # Relay control (STLS boundary, strip mode): parse first, then relay.
                    start, events = self._observe()
                    if direction is C:
                        await self._client_chunk(data, events, start)
                    else:
                        await self._server_chunk(data, events, start)
                else:
                    # The common case: relay first, parse after (the relay never waits on
                    # the parser); chunks are parsed in arrival order whichever pump runs.
                    await self._send(direction, data)
                    self._observe()
                    if direction is S:
                        self._replied.set()
                self._dirty.set()
                if tap.writer.buffered > FLUSH_SIZE:
                    self._wake.set()
                while tap.writer.buffered > HIGH_WATER and self.how is None:
                    await self._space.wait()  # bounded memory: the disk sets the pace
        except STREAM_ERRORS as exc:
            other = "server" if direction is C else "client"
            self.end(f"{other}-reset", describe_error(exc))
        except _Abort:
            return

    def _observe(self) -> tuple[int, list[Event]]:
        """Feed the tap every chunk not yet fed, oldest first (both directions keep their
        arrival order, so a reply is never parsed before its command); return the last
        chunk's stream offset and events."""
        tap = self.tap
        assert tap is not None
        start, events = 0, []
        while self._unfed:
            direction, t, data = self._unfed.popleft()
            start = tap.offsets[direction]
            events = tap.data(direction, t, data)
            if self.faults is not None:
                self.faults.observe(events)
        return start, events

    def _needs_control(self, direction: Direction, data: bytes) -> bool:
        """Whether relay control must see this chunk parsed before it is relayed."""
        if direction is C:
            # A chunk that may carry STLS: the pump must stop reading after it (intercept)
            # or popproxy answers it itself (strip, or a leg already in TLS).
            return (
                b"STLS" in data.upper()
                or self.config.stls is StlsMode.STRIP
                or (self.faults is not None and self.faults.wants_client())
            )
        if self._stls_done is not None or self._hide_stls() or self.config.hide_plus:
            return True
        # Fault rules (docs/faults.md): parse first while a rule acts on a reply under way,
        # or while other chunks wait to be parsed (a command a rule may select).
        return self.faults is not None and (self.faults.busy() or len(self._unfed) > 1)

    async def _client_chunk(self, data: bytes, events: list[Event], start: int) -> None:
        assert self.upstream is not None and self.tap is not None
        stls = next((e for e in events if isinstance(e, Command) and e.verb == "STLS"), None)
        if stls is not None and self._stls_is_local():
            await self._local_stls(data, stls, start)
            return
        if stls is None and self.faults is not None and self.faults.wants_client():
            await self.faults.client_chunk(
                data, events, start, partial(self._send, C), self._fault_answer, self.now
            )
            return
        if stls is not None:
            # The client's next bytes are a TLS ClientHello: stop reading until the server
            # has answered STLS and (on +OK) both handshakes are done.
            self._stls_done = trio.Event()
        await self._send(C, data)
        if self._stls_done is not None:
            await self._stls_done.wait()
            self._stls_done = None

    async def _server_chunk(self, data: bytes, events: list[Event], start: int) -> None:
        assert self.tap is not None
        faults = self.faults
        if faults is not None and self._stls_done is None and not self._hide_stls():
            await faults.server_chunk(data, events, start, self._to_client_send, self.now)
            self._replied.set()
            if faults.ended is not None:
                if faults.rst:
                    reset(self.client)
                self.end(*faults.ended)
                raise _Abort
            return
        if self._stls_done is not None:
            reply = self.tap.stls_reply(events)
            if reply is not None:
                if reply.status == "+OK":
                    cut = reply.offset + len(reply.raw) - start
                    # RFC 2595 §4: nothing after the +OK line may reach the TLS leg.
                    self.tap.drop(S, start + cut, len(data) - cut, "plaintext after STLS +OK")
                    await self._to_client_send(data[:cut])
                    await self._after_stls_ok()
                else:
                    await self._to_client_send(data)
                self._stls_done.set()
                return
        if self._hide_stls() or self.config.hide_plus:
            data = self._strip_capability(data, events, start)
        await self._to_client_send(data)
        self._replied.set()

    async def _to_client_send(self, data: bytes) -> None:
        if data:
            await self._send(S, data)

    async def _send(self, direction: Direction, data: bytes) -> None:
        """Pass ``direction``'s bytes on, under that leg's lock.

        The stream is looked up only once the lock is held: an STLS upgrade replaces it
        while holding the same lock, so no byte can slip onto the plaintext socket after
        the switch.  A free lock is taken without ``async with``'s scheduling round trip.
        """
        lock = self._to_server if direction is C else self._to_client
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            stream = self.upstream if direction is C else self.client
            assert stream is not None
            await stream.send_all(data)
        finally:
            lock.release()

    async def _originate(self, line: bytes) -> None:
        """Send bytes popproxy itself makes to the client; recorded as such."""
        assert self.tap is not None
        self.tap.data(S, self.now(), line, proxy=True)
        async with self._to_client:
            await _send_quietly(self.client, line)

    async def _half_close(self, direction: Direction) -> None:
        """Pass an EOF on (RFC 1939 §6: the server closes after QUIT's reply)."""
        self._poke.set()
        dst = self.upstream if direction is C else self.client
        if isinstance(dst, trio.abc.HalfCloseableStream):
            lock = self._to_server if direction is C else self._to_client
            async with lock:
                with contextlib.suppress(*STREAM_ERRORS):
                    await dst.send_eof()
        elif direction is S:
            # A TLS leg cannot half-close (trio.SSLStream has no send_eof).  The server is
            # done and its direction drained: close the client leg now (close_notify).
            self.end("server-closed")
        # A client EOF towards a TLS upstream: the watchdog's linger ends the session once
        # the server has been quiet for a while (it may still be answering).

    async def _fault_answer(self, seq: int, reply: bytes) -> None:
        """A fault rule's answer to command ``seq``, in its place among the replies."""
        await self._replies_before(seq)
        await self._originate(reply)

    async def _fault_watch(self, faults: ProxyFaults) -> None:
        """A fault's idle limit: once the client is silent that long, (a line and) close."""
        while True:
            await faults.watch_armed.wait()
            faults.watch_armed = trio.Event()
            watch, armed_at = faults.watch, trio.current_time()
            while watch is not None and faults.watch is watch:
                quiet_since = max(self._client_last, armed_at)
                remaining = quiet_since + watch.seconds - trio.current_time()
                if remaining <= 0:
                    assert self.tap is not None
                    self.tap.event(self.now(), "fault-close", detail=watch.why)
                    faults.say(watch.why)
                    if watch.reply:
                        await self._originate(watch.reply)
                    self.end("fault", watch.why)
                    return
                if self._client_last > armed_at:
                    break  # the client spoke: this limit is spent
                with trio.move_on_after(remaining):
                    await faults.watch_armed.wait()

    async def _watchdog(self) -> None:
        cfg = self.config
        while True:
            limit = cfg.idle_timeout
            if self._eof[C] or self._eof[S]:
                limit = min(limit, cfg.linger)
            remaining = self._last + limit - trio.current_time()
            if remaining <= 0:
                if self._eof[S]:
                    self.end("server-closed")
                elif self._eof[C]:
                    self.end("client-closed")
                else:
                    self.end("idle-timeout", f"no traffic for {limit:g} s")
                return
            with trio.move_on_after(min(remaining, 1.0)):
                await self._poke.wait()  # an EOF shortens the limit: look again at once
            self._poke = trio.Event()

    async def _flusher(self) -> None:
        assert self.tap is not None and self._fd is not None
        writer, fd = self.tap.writer, self._fd
        while True:
            await self._dirty.wait()  # an idle session costs no wake-ups
            self._dirty = trio.Event()
            with trio.move_on_after(FLUSH_INTERVAL):  # gather ~50 ms of records per write
                await self._wake.wait()  # ... unless a pump says there is a lot already
            self._wake = trio.Event()
            size = writer.buffered
            pieces = writer.take()
            if pieces:
                try:
                    if size <= SMALL_WRITE:
                        # A few KiB into the page cache costs less than a thread hop (and
                        # with 1,000 sessions, many hops fight over the GIL).
                        fmt.write_all(fd, pieces)
                    else:
                        await trio.to_thread.run_sync(fmt.write_all, fd, pieces)
                except trio.Cancelled:
                    # Cancelled before the thread started: hand the records back, so the
                    # end-of-session write still puts them on disk.
                    writer.untake(pieces)
                    raise
                except OSError as exc:
                    reason = describe_error(exc)
                    if exc.errno == errno.ENOSPC:
                        reason = "disk full"
                    # Never relay unrecorded: this session stops, others go on.
                    self.end("capture-error", f"capture write failed: {reason}")
                    return
            self._space.set()
            self._space = trio.Event()

    # ----------------------------------------------------------------- STLS (relay control)

    def _stls_is_local(self) -> bool:
        """Whether popproxy answers the client's STLS itself instead of the server."""
        return self.config.stls is StlsMode.STRIP or self._tls[C] or self._tls[S]

    def _hide_stls(self) -> bool:
        """Hide STLS from CAPA when the client must not (or cannot) use it through us."""
        return self.config.stls is StlsMode.STRIP or (self._tls[C] and not self._tls[S])

    async def _local_stls(self, data: bytes, stls: Command, start: int) -> None:
        assert self.tap is not None and self.upstream is not None
        lo, hi = stls.offset - start, stls.offset - start + len(stls.raw)
        self.tap.drop(C, stls.offset, len(stls.raw), "STLS answered by popproxy")
        before, after = data[:lo], data[hi:]
        if before:
            await self._send(C, before)
        # RFC 2449 §6.6: replies come in command order, so answer STLS only after the server
        # has answered every command pipelined before it.
        await self._replies_before(stls.seq)
        if self._tls[C]:
            await self._originate(b"-ERR TLS is already active.\r\n")
        elif self.config.stls is StlsMode.STRIP:
            self.tap.event(self.now(), "strip", detail="STLS refused by popproxy (strip mode)")
            await self._originate(b"-ERR STLS not available.\r\n")
        else:
            # RFC 2595 §4: bytes sent after STLS, before the handshake, are injected plaintext:
            # never forward them (the upstream leg is TLS: they would arrive as if encrypted).
            self.tap.drop(C, start + hi, len(after), "plaintext after STLS")
            # The upstream leg is TLS already: upgrade only the client leg, holding its lock
            # so that no server byte reaches the client between +OK and the handshake.
            line = b"+OK Begin TLS negotiation now.\r\n"
            self.tap.data(S, self.now(), line, proxy=True)
            async with self._to_client:
                await _send_quietly(self.client, line)
                self.client = await self._client_handshake(self.client, "stls")
            self.tap.start_tls(S, self.now(), {"leg": "upstream", "mode": "already-tls"})
            return
        if after:  # after -ERR the session goes on in plaintext: relay what followed STLS
            await self._send(C, after)

    async def _replies_before(self, seq: int) -> None:
        """Wait until every exchange before command ``seq`` is finished (bodies included)."""
        tap = self.tap
        assert tap is not None
        while tap.broken is None and any(
            ex.seq is not None and ex.seq < seq for ex in tap.builder.unfinished()
        ):
            self._replied = trio.Event()
            await self._replied.wait()

    async def _after_stls_ok(self) -> None:
        assert self.tap is not None and self.upstream is not None
        if self.config.stls is StlsMode.PASSTHROUGH:
            info = {"leg": "both", "mode": "passthrough"}
            self.tap.start_tls(S, self.now(), info, decrypted=False)
            self.tap.start_tls(C, self.now(), info, decrypted=False)
            return
        self.upstream = await self._upstream_handshake(self.upstream, "stls")
        self.client = await self._client_handshake(self.client, "stls")

    def _strip_capability(self, data: bytes, events: list[Event], start: int) -> bytes:
        assert self.tap is not None
        stls = control.stls_capability_spans(events, self._capa_seqs) if self._hide_stls() else []
        plus = (
            control.plus_mechanism_spans(events, self._plus_seqs) if self.config.hide_plus else []
        )
        if stls:
            self.tap.event(self.now(), "strip", detail="STLS hidden from CAPA")
        if plus:
            self.tap.event(self.now(), "hide-plus", detail="-PLUS mechanisms hidden (--hide-plus)")
        drops = sorted([(o, n, "STLS capability hidden by popproxy") for o, n in stls] + plus)
        if not drops:
            return data
        out, prev = [], 0
        for offset, length, why in drops:
            self.tap.drop(S, offset, length, why)
            out.append(data[prev : offset - start])
            prev = offset - start + length
        out.append(data[prev:])
        return b"".join(out)


def _kinds(anomalies: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for anomaly in anomalies:
        counts[anomaly["kind"]] = counts.get(anomaly["kind"], 0) + 1
    return counts


def _server_context(config: ProxyConfig, local: str) -> ssl.SSLContext:
    ca = config.certificate_authority()
    host = config.upstream[0]
    local_ip = local.rsplit(":", 1)[0].strip("[]")
    key = (str(ca.cert_path), None if is_ip(host) else host, local_ip)
    ctx = _server_contexts.get(key)
    if ctx is None:
        ctx = _server_contexts[key] = server_context(ca, default_host=key[1], local_ip=local_ip)
    return ctx


def _tls_info(stream: trio.SSLStream[Any], leg: str, mode: str) -> dict[str, Any]:
    info = describe_tls(stream)
    return {
        "leg": leg,
        "mode": mode,
        "version": info.version,
        "cipher": info.cipher,
        "sni": info.sni,
        "peer_subject": info.peer_subject,
        "peer_sha256": info.peer_fingerprint_sha256,
    }


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (*STREAM_ERRORS, trio.BusyResourceError):
        pass


async def _close_quietly(stream: trio.abc.Stream) -> None:
    try:
        await stream.aclose()
    except (*STREAM_ERRORS, trio.BusyResourceError):
        pass
